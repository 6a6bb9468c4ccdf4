"""Subprocess side of tests/test_scale.py: runs a few train steps on a given mesh and prints JSON.

It runs in its own process because the number of (simulated) CPU devices is fixed when JAX
starts (``XLA_FLAGS=--xla_force_host_platform_device_count=N``) and the rest of the test-suite
expects one device. Not collected by pytest (no ``test_`` prefix).

    python tests/scale_worker.py equiv --layouts=1x1x1,8x1x1 [--task=tokenflow] [--steps=3]
    python tests/scale_worker.py errors
    python tests/scale_worker.py run --workdir=DIR --steps=4,6   (Trainer.run twice: train, resume)

Multi-process: add --num_processes=2 --process_id=i --coordinator_address=localhost:PORT.
The last line of stdout is the JSON result (process 0 only).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# Shapes of the tiny model every layout trains: small enough to compile in seconds, with every
# dimension divisible by 8 so all test meshes fit.
TINY = {
    "model.vocab_size": 256, "model.dim": 32, "model.num_layers": 1, "model.num_heads": 2, "model.time_features": 32,
    "model.ffn_hidden": 64, "model.max_len": 16, "data.seq_len": 16, "train.batch_size": 16,
    "train.grad_accum": 2, "train.warmup_steps": 1, "train.num_steps": 3, "model.dtype": "float32",
    # Fused output+loss chunks of 24 tokens per device: several chunks (with a padded last one) on
    # one device, a different split on each mesh, all of which must give the same training.
    "model.loss_chunk": 24,
    # A larger ε caps the singular coefficient c(t) = 2t/(2σ²(1−t)²+ε²) at 200 instead of 2e6: a
    # draw with t near 1 would otherwise turn float32 reduction-order differences between layouts
    # into 1e-4..1e-3 relative differences of the gradient norm (the losses agree either way).
    "model.singular_eps": 0.1,
}


def load_config(name: str, variant: str | None = "smoke"):
    path = REPO / "configs" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"config_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(variant)


def parse_layout(text: str) -> dict[str, int]:
    data, fsdp, tensor = (int(v) for v in text.split("x"))
    return {"mesh.data": data, "mesh.fsdp": fsdp, "mesh.tensor": tensor}


class SyntheticTokens:
    """The global batch of a step is a fixed function of the step; process p reads only its rows,
    so any number of processes assembles the same global batch."""

    def __init__(self, vocab: int, seq_len: int, global_batch: int):
        import numpy as np

        self.np = np
        self.vocab, self.seq_len, self.global_batch = vocab, seq_len, global_batch

    def _global(self, step: int):
        return self.np.random.default_rng(1000 + step).integers(
            0, self.vocab, (self.global_batch, self.seq_len), dtype=self.np.int32)

    def train_batch(self, step: int, batch: int):
        import jax

        p = jax.process_index()
        return self._global(step)[p * batch:(p + 1) * batch]

    def val_batches(self, batch: int, num: int):
        import jax

        p = jax.process_index()
        return [self._global(10_000 + i)[p * batch:(p + 1) * batch] for i in range(num)]

    def state(self) -> dict:
        import jax

        return {"dataset": "synthetic", "process": jax.process_index()}

    def restore(self, state: dict) -> None:
        import jax

        if state.get("process") != jax.process_index():
            raise RuntimeError(f"process {jax.process_index()} was given the data state of {state}")


class ByteTokenizer:
    def decode_until_eos(self, ids: list[int]) -> str:
        return " ".join(str(i) for i in ids)


def build(task_name: str, layout: str, extra: dict | None = None):
    from discreteflow_jax.config import parse_config
    from discreteflow_jax.config.presets import set_fields
    from discreteflow_jax.tasks import build_task

    if task_name == "tokenflow":
        config = set_fields(load_config("shakespeare_baseline"), TINY)
    elif task_name == "gumbel":
        config = set_fields(load_config("shakespeare_gumbel"), TINY)
    else:
        raise ValueError(task_name)
    set_fields(config, parse_layout(layout))
    set_fields(config, extra or {})
    cfg = parse_config(config)
    if task_name == "gumbel":
        return cfg, build_task(cfg, teacher=random_teacher(cfg.model.vocab_size, cfg.data.seq_len))
    return cfg, build_task(cfg)


def random_teacher(vocab: int, seq_len: int):
    """A tiny randomly initialized LLaMA teacher (the same on every process: fixed seed)."""
    from flax import nnx

    from discreteflow_jax.io.teacher import _bundle
    from discreteflow_jax.models.llama import Llama, LlamaConfig

    config = LlamaConfig(vocab_size=vocab, dim=32, num_layers=1, num_heads=2, ffn_hidden=64, max_len=seq_len,
                         bos_id=1, eos_id=2)
    return _bundle(Llama(config, rngs=nnx.Rngs(7)), config, "random teacher", bos_fallback=1)


def train_steps(task_name: str, layout: str, steps: int) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from discreteflow_jax.models import sharding as shd
    from discreteflow_jax.training.trainer import Trainer

    cfg, task = build(task_name, layout)
    data = SyntheticTokens(cfg.model.vocab_size, cfg.data.seq_len, cfg.train.batch_size)
    with tempfile.TemporaryDirectory() as workdir:
        trainer = Trainer(cfg, task, workdir, data, ByteTokenizer())
        state = trainer.init_state()
        losses, grad_norms = [], []
        for step in range(steps):
            tokens = shd.global_batch_from_local(data.train_batch(step, trainer.local_batch), trainer.mesh)
            state, metrics = trainer.train_step(state, task.aux, tokens, trainer.base_key)
            m = jax.device_get(metrics)
            losses.append(float(m["loss_sum"] / m["tokens"]))
            grad_norms.append(float(m["grad_norm"]))
        sq = jax.jit(lambda p: sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(p)),
                     out_shardings=shd.replicated(trainer.mesh))(state.params)
        specs = sorted({str(s.spec) for s in jax.tree.leaves(trainer.state_shardings.params)})
        trainer.ckpt.close()
    return {"losses": losses, "grad_norms": grad_norms, "param_sq": float(np.asarray(sq)),
            "mesh": dict(trainer.mesh.shape), "param_specs": specs}


def count_compiles():
    """A list that grows by one entry per XLA backend compilation from now on."""
    import jax

    events: list[str] = []

    def listener(name: str, *args, **kwargs) -> None:
        if "backend_compile" in name:
            events.append(name)

    jax.monitoring.register_event_duration_secs_listener(listener)
    return events


def bad_inputs() -> dict:
    """Each bad input must raise a readable error from the Trainer constructor, before any compile."""
    from discreteflow_jax.training.trainer import Trainer

    cases = {
        "mesh_product": ("2x3x1", {}),
        "batch_divisible": ("8x1x1", {"train.batch_size": 12, "train.grad_accum": 1}),
        "tensor_dim": ("4x1x2", {"model.vocab_size": 255}),
        "tensor_heads": ("1x1x8", {}),
    }
    out = {}
    compiles = count_compiles()
    for name, (layout, extra) in cases.items():
        before = len(compiles)
        try:
            cfg, task = build("tokenflow", layout, extra)
            with tempfile.TemporaryDirectory() as workdir:
                Trainer(cfg, task, workdir, SyntheticTokens(256, 16, 16), ByteTokenizer())
            out[name] = {"error": None}
        except Exception as err:  # noqa: BLE001 - the test inspects type and message
            out[name] = {"error": type(err).__name__, "message": str(err), "compiles": len(compiles) - before}
    return out


def full_run(task_name: str, layout: str, workdir: str, runs: list[int], every: int,
             sample_steps: tuple[int, ...] = (2,)) -> dict:
    """Trainer.run (checkpoints, eval, samples, SIGTERM handling) once per entry of ``runs`` (its
    num_steps), each a fresh Trainer on the same workdir, so every run after the first resumes."""
    import jax

    from discreteflow_jax.training.trainer import Trainer

    results = []
    for num_steps in runs:
        cfg, task = build(task_name, layout, {
            "train.num_steps": num_steps, "train.ckpt_every": every, "train.eval_every": every,
            "train.log_every": 1, "sample.eval_steps": sample_steps, "sample.num_samples": 2,
        })
        data = SyntheticTokens(cfg.model.vocab_size, cfg.data.seq_len, cfg.train.batch_size)
        trainer = Trainer(cfg, task, workdir, data, ByteTokenizer(), preemption_sync_every=2)
        start = trainer.ckpt.latest_step() or 0
        out = trainer.run()
        results.append({"start": start, "step": int(jax.device_get(out["state"].step)),
                        "preempted": out["preempted"], "loss": out["metrics"].get("train/loss")})
        trainer.ckpt.close()
    return {
        "runs": results,
        "files": sorted(os.listdir(workdir)) if jax.process_index() == 0 else [],
        "checkpoints": sorted(int(c) for c in os.listdir(os.path.join(workdir, "checkpoints")) if c.isdigit()),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["equiv", "errors", "run", "config_mismatch"])
    parser.add_argument("--layouts", default="1x1x1")
    parser.add_argument("--task", default="tokenflow")
    parser.add_argument("--steps", default="3", help="equiv: steps; run: num_steps of each run, comma-separated")
    parser.add_argument("--every", type=int, default=2, help="run: checkpoint and eval interval")
    parser.add_argument("--sample_steps", default="2", help="run: K of the samples at each evaluation; empty: none")
    parser.add_argument("--workdir", default="")
    parser.add_argument("--coordinator_address", default=None)
    parser.add_argument("--num_processes", type=int, default=None)
    parser.add_argument("--process_id", type=int, default=None)
    args = parser.parse_args()

    import jax

    from discreteflow_jax.training import distributed

    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # cross-process CPU collectives
    distributed.initialize("auto", args.coordinator_address, args.num_processes, args.process_id)

    if args.mode == "equiv":
        result = {layout: train_steps(args.task, layout, int(args.steps)) for layout in args.layouts.split(",")}
    elif args.mode == "errors":
        result = bad_inputs()
    elif args.mode == "config_mismatch":
        from discreteflow_jax.training.trainer import Trainer

        lr = 1e-3 * (1 + jax.process_index())  # process 1 is launched "with a different flag"
        cfg, task = build(args.task, "8x1x1", {"train.lr": lr})
        try:
            with tempfile.TemporaryDirectory() as workdir:
                Trainer(cfg, task, workdir, SyntheticTokens(256, 16, 16), ByteTokenizer())
            result = {"error": None}
        except Exception as err:  # noqa: BLE001
            result = {"error": type(err).__name__, "message": str(err)}
    else:
        runs = [int(n) for n in args.steps.split(",")]
        sample_steps = tuple(int(k) for k in args.sample_steps.split(",") if k)
        result = full_run(args.task, args.layouts.split(",")[0], args.workdir, runs, args.every, sample_steps)
    result_line = json.dumps({"process": jax.process_index(), "result": result})
    print(result_line, flush=True)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
