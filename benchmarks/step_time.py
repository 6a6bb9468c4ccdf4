"""Train-step cost of a config: step time, tokens/s, compiled memory and FLOPs. JSON to stdout.

    python benchmarks/step_time.py --config=configs/shakespeare_baseline.py \
        --config.train.batch_size=8 --config.train.grad_accum=1 [--steps=5] [--out=FILE]

Random tokens (no data folder needed); the step is exactly the one training runs. Memory and
FLOPs come from XLA (``compiled.memory_analysis()`` / ``cost_analysis()``), so they can also be
read for shapes too large to run here (``--steps=0``). XLA's cost analysis counts the body of a
loop once, so with the fused chunked loss (``model.loss_chunk > 0``) ``gflops_per_step`` is read
from the same step compiled with ``loss_chunk=0`` (the same matmuls, formed whole);
``gflops_per_step_xla`` keeps XLA's count of the chunked program.

Efficiency: ``achieved_gflops_per_s`` is ``gflops_per_step / step_s_min``. On the CPU it is set
against the throughput of one fp32 matmul of the step's dominant shape (tokens per micro-batch
per device, capped at 2048, × dim × vocab: the V-wide output layer), measured at start in the same
process (``matmul_gflops_per_s``; ``cpu_mfu`` = achieved / matmul). On GPU/TPU ``mfu`` is achieved
/ the dense bf16 peak of the device kind (``common.PEAK_BF16_TFLOPS``) × devices. The CPU model
and its vector extensions are reported, since they decide what a CPU step costs.
"""

from __future__ import annotations

import copy
import json
import os
import sys
import tempfile
import time

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import cpu_info, efficiency_fields, matmul_gflops  # noqa: E402

from discreteflow_jax.config import parse_config
from discreteflow_jax.models import sharding as shd
from discreteflow_jax.tasks import build_task
from discreteflow_jax.training.trainer import Trainer

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
_STEPS = flags.DEFINE_integer("steps", 5, "Timed steps after one warm-up step (0: compile only).")
_OUT = flags.DEFINE_string("out", None, "Also write the JSON here.")
_MATMUL = flags.DEFINE_bool("matmul", True, "CPU: measure the dense-matmul throughput at start (for cpu_mfu).")


class RandomTokens:
    def __init__(self, vocab: int, seq_len: int):
        self.vocab, self.seq_len = vocab, seq_len

    def train_batch(self, step: int, batch: int) -> np.ndarray:
        return np.random.default_rng(step).integers(0, self.vocab, (batch, self.seq_len), dtype=np.int32)


def compiled_stats(compiled) -> dict:
    out = {}
    mem = compiled.memory_analysis()
    if mem is not None:
        for name in ("temp_size_in_bytes", "argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes"):
            out[name.replace("_in_bytes", "_mb")] = getattr(mem, name, 0) / 2**20
        out["peak_estimate_mb"] = (
            out["temp_size_mb"] + out["argument_size_mb"] + out["output_size_mb"] - out["alias_size_mb"]
        )
    cost = compiled.cost_analysis()
    if isinstance(cost, list):
        cost = cost[0] if cost else {}
    if cost:
        out["gflops_per_step"] = float(cost.get("flops", 0.0)) / 1e9
    return out


def unchunked_gflops(config, **task_kwargs) -> float | None:
    """GFLOPs of the train step of ``config`` with ``model.loss_chunk=0`` (compiled, not run), or
    None for a model without that field. Any loop of the step other than the fused loss's is still
    counted once."""
    if "loss_chunk" not in config.model:
        return None
    config = copy.deepcopy(config)
    config.model.loss_chunk = 0
    cfg = parse_config(config)
    task = build_task(cfg, **task_kwargs)
    data = RandomTokens(cfg.model.vocab_size, cfg.data.seq_len)
    with tempfile.TemporaryDirectory() as workdir:
        trainer = Trainer(cfg, task, workdir, data, tokenizer=None)
        tokens = jax.ShapeDtypeStruct((cfg.train.batch_size, cfg.data.seq_len), jax.numpy.int32,
                                      sharding=shd.batch_sharding(trainer.mesh))
        compiled = trainer.train_step.lower(trainer.abstract_state, task.aux, tokens, trainer.base_key).compile()
        trainer.ckpt.close()
    return compiled_stats(compiled).get("gflops_per_step")


def dominant_matmul(cfg) -> tuple[int, int, int]:
    """(m, k, n) of the step's largest matmul: a micro-batch's tokens on one device (capped at
    2048, beyond which CPU throughput no longer grows) × dim × vocab."""
    per_device = cfg.train.batch_size // cfg.train.grad_accum // max(jax.device_count(), 1)
    return min(max(per_device, 1) * cfg.data.seq_len, 2048), cfg.model.dim, cfg.model.vocab_size


def benchmark(config, steps: int, measure_matmul: bool = True, **task_kwargs) -> dict:
    """Compiles (and with ``steps > 0`` times) the train step of ``config``; see the module doc."""
    cfg = parse_config(config)
    matmul = None
    if steps > 0 and measure_matmul and jax.default_backend() == "cpu":
        matmul = matmul_gflops(*dominant_matmul(cfg))
    task = build_task(cfg, **task_kwargs)
    data = RandomTokens(cfg.model.vocab_size, cfg.data.seq_len)
    with tempfile.TemporaryDirectory() as workdir:
        trainer = Trainer(cfg, task, workdir, data, tokenizer=None)
        state = trainer.init_state()
        tokens = shd.global_batch_from_local(data.train_batch(0, trainer.local_batch), trainer.mesh)
        t0 = time.perf_counter()
        lowered = trainer.train_step.lower(state, task.aux, tokens, trainer.base_key)
        compiled = lowered.compile()
        result = {
            "task": cfg.task, "batch_size": cfg.train.batch_size, "grad_accum": cfg.train.grad_accum,
            "seq_len": cfg.data.seq_len, "vocab_size": cfg.model.vocab_size, "dim": cfg.model.dim,
            "num_layers": cfg.model.num_layers, "dtype": getattr(cfg.model, "dtype", "float32"),
            "devices": jax.device_count(), "backend": jax.default_backend(),
            "params_m": trainer.num_params / 1e6, "compile_s": time.perf_counter() - t0,
            **cpu_info(), **compiled_stats(compiled),
        }
        if getattr(cfg.model, "loss_chunk", 0) and "gflops_per_step" in result:
            result["gflops_per_step_xla"] = result["gflops_per_step"]
            result["gflops_per_step"] = unchunked_gflops(config, **task_kwargs)
        if steps > 0:
            state, metrics = compiled(state, task.aux, tokens, trainer.base_key)  # warm-up
            jax.block_until_ready(metrics)
            times = []
            for i in range(steps):
                tokens = shd.global_batch_from_local(data.train_batch(i + 1, trainer.local_batch), trainer.mesh)
                t0 = time.perf_counter()
                state, metrics = compiled(state, task.aux, tokens, trainer.base_key)
                jax.block_until_ready(metrics)
                times.append(time.perf_counter() - t0)
            step_s = float(np.median(times))
            result.update(
                step_s=step_s, step_s_min=float(min(times)), all_step_s=[round(t, 4) for t in times],
                tokens_per_s=cfg.train.batch_size * cfg.data.seq_len / step_s,
                matmul_shape=list(dominant_matmul(cfg)) if matmul else None,
                **efficiency_fields(result.get("gflops_per_step"), float(min(times)), matmul),
            )
        trainer.ckpt.close()
    return result


def main(argv):
    del argv
    result = benchmark(_CONFIG.value, _STEPS.value, _MATMUL.value)
    text = json.dumps(result, indent=2)
    print(text)
    if _OUT.value:
        with open(_OUT.value, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    sys.exit(app.run(main))
