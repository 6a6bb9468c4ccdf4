"""Memory planning: per-device compiled memory and FLOPs of the full train step on a simulated
multi-device mesh, over per-device batch sizes and remat policies. JSON out.

    python benchmarks/memory.py [--configs=fineweb_baseline,fineweb_gumbel] [--devices=8] \
        [--per_device_batch=1,4] [--remat=none,full,save_dots] [--dtype=bfloat16] \
        [--mesh=-1,1,1] [--out=FILE]

Nothing runs and no state is materialized: each point lowers the exact jitted step that training
runs (``Trainer.train_step``: same shardings, donation, remat, micro-batching) with abstract
inputs and reads XLA's ``memory_analysis()`` and ``cost_analysis()`` of the compiled per-device
program. Each point is one compile (about a minute for the FineWeb models on a 2-core CPU), so
the default grid is small; memory is linear in the batch, so two batch sizes per policy give
the line ``fixed + per_sequence · batch`` that ``--fit`` prints and the launch README's
recommendations come from. With the fused chunked loss (``model.loss_chunk > 0``) the FLOPs come
from a second compile with ``loss_chunk=0``: XLA counts a loop body once.

Caveats: this is the CPU backend's plan. TPU/GPU compilers fuse and schedule differently and
keep bf16 natively (the CPU may widen some bf16 temporaries), so treat the numbers as a guide
with ~15% headroom, not a guarantee. Remat does not show on the CPU: XLA:CPU drops the
optimization barriers that keep the recomputation apart, so CSE merges it back and the
remat="full"/"save_dots" plans keep every activation (their rows still show the extra FLOPs).
On the accelerator itself, ``--backend=native`` reads the real plan, remat included.
Gumbel teachers have random weights (values do not change the cost): GPT-2 124M shapes for
FineWeb, the configs/shakespeare_teacher.py LLaMA for Shakespeare; their parameters are step
inputs (``argument`` memory).
"""

from __future__ import annotations

import os
import sys


def _early_flag(argv: list[str], name: str, default: str) -> str:
    for arg in argv:
        if arg.startswith(f"--{name}="):
            return arg.split("=", 1)[1]
    return default


def _early_device_count(argv: list[str]) -> int:
    return int(_early_flag(argv, "devices", "8"))


# The simulated device count must be fixed before JAX starts (CPU planning, the default).
# --backend=native plans on the machine's own accelerators instead (the real compiler's plan).
if "jax" not in sys.modules and _early_flag(sys.argv, "backend", "cpu") == "cpu":
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={_early_device_count(sys.argv)}"
    ).strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

import importlib.util  # noqa: E402
import json  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import jax  # noqa: E402
from absl import app, flags  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from step_time import RandomTokens, compiled_stats, unchunked_gflops  # noqa: E402

from discreteflow_jax.config import parse_config  # noqa: E402
from discreteflow_jax.models import sharding as shd  # noqa: E402
from discreteflow_jax.tasks import build_task  # noqa: E402
from discreteflow_jax.training.trainer import Trainer  # noqa: E402

_CONFIGS = flags.DEFINE_list("configs", ["fineweb_baseline", "fineweb_gumbel"], "configs/<name>.py to plan.")
_DEVICES = flags.DEFINE_integer("devices", 8, "Simulated devices (read before JAX starts).")
_BACKEND = flags.DEFINE_enum("backend", "cpu", ["cpu", "native"],
                             "cpu: simulated CPU devices; native: this machine's accelerators (TPU/GPU).")
_BATCH = flags.DEFINE_list("per_device_batch", ["1", "4"], "Sequences per device per micro-batch.")
_REMAT = flags.DEFINE_list("remat", ["none", "full", "save_dots"], "Remat policies (config.model.remat).")
_DTYPE = flags.DEFINE_string("dtype", "bfloat16", "Activation dtype (config.model.dtype); params stay fp32.")
_MESH = flags.DEFINE_list("mesh", ["-1", "1", "1"], "data,fsdp,tensor (one may be -1).")
_SET = flags.DEFINE_multi_string("set", [], "Extra config overrides, e.g. --set=data.seq_len=512.")
# --out (write the JSON there too) comes with step_time's flags.


def load_config(name: str):
    spec = importlib.util.spec_from_file_location(f"config_{name}", REPO / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(None)


def _set(config, dotted: str, value: Any) -> None:
    node = config
    *parents, leaf = dotted.split(".")
    for p in parents:
        node = node[p]
    node[leaf] = type(node[leaf])(value) if not isinstance(node[leaf], bool) else value in (True, "True", "true")


def gpt2_teacher(vocab: int, max_len: int, dtype: str) -> Any:
    """GPT-2 124M shapes with random weights, as a TeacherBundle (the real one needs the Hub)."""
    from flax import nnx

    from discreteflow_jax.io.teacher import TeacherBundle
    from discreteflow_jax.models.gpt2 import GPT2, GPT2Config

    cfg = GPT2Config(vocab_size=vocab, max_len=max_len, dtype=dtype)
    graphdef, state = nnx.split(GPT2(cfg, rngs=nnx.Rngs(0)))
    return TeacherBundle(graphdef=graphdef, params=nnx.to_pure_dict(state), config=cfg, kind="gpt2",
                         bos_id=cfg.bos_id, vocab_size=vocab, max_len=max_len, source="random GPT-2 124M")


def llama_teacher(teacher_config: str, seq_len: int, dtype: str) -> Any:
    """The teacher config's LLaMA shapes with random weights (experiment 2.2's teacher)."""
    from flax import nnx

    from discreteflow_jax.io.teacher import TeacherBundle
    from discreteflow_jax.models.llama import Llama, LlamaConfig

    section = dict(load_config(teacher_config).model)
    section.update(dtype=dtype, max_len=max(seq_len, section["max_len"]),
                   num_kv_heads=section.get("num_kv_heads") or None)
    cfg = LlamaConfig(**section)
    graphdef, state = nnx.split(Llama(cfg, rngs=nnx.Rngs(0)))
    return TeacherBundle(graphdef=graphdef, params=nnx.to_pure_dict(state), config=cfg, kind="llama",
                         bos_id=cfg.bos_id, vocab_size=cfg.vocab_size, max_len=cfg.max_len, source="random LLaMA")


def plan_point(name: str, per_device: int, remat: str, dtype: str, mesh: list[int], teacher_cache: dict) -> dict:
    config = load_config(name)
    _set(config, "mesh.data", mesh[0])
    _set(config, "mesh.fsdp", mesh[1])
    _set(config, "mesh.tensor", mesh[2])
    data, fsdp, _ = shd.mesh_shape(*mesh, jax.device_count())
    shards = data * fsdp  # the batch is split over data×fsdp
    config.train.batch_size = per_device * shards
    config.train.grad_accum = 1  # the per-device micro-batch is what memory depends on
    if "remat" in config.model:  # TokenFlow students; the LLaMA teacher task has no remat field
        config.model.remat = remat
    config.model.dtype = dtype
    for item in _SET.value:
        key, value = item.split("=", 1)
        _set(config, key, value)
    cfg = parse_config(config)
    kwargs = {}
    if cfg.task == "gumbel":
        key = (cfg.model.vocab_size, cfg.data.seq_len, dtype)
        if key not in teacher_cache:
            if (cfg.extra.get("teacher") or {}).get("hf"):
                teacher_cache[key] = gpt2_teacher(cfg.model.vocab_size, cfg.data.seq_len, dtype)
            else:  # a teacher trained by configs/shakespeare_teacher.py
                teacher_cache[key] = llama_teacher("shakespeare_teacher", cfg.data.seq_len, dtype)
        kwargs["teacher"] = teacher_cache[key]
    task = build_task(cfg, **kwargs)
    with tempfile.TemporaryDirectory() as workdir:
        trainer = Trainer(cfg, task, workdir, RandomTokens(cfg.model.vocab_size, cfg.data.seq_len), None)
        tokens = jax.ShapeDtypeStruct((cfg.train.batch_size, cfg.data.seq_len), jax.numpy.int32,
                                      sharding=shd.batch_sharding(trainer.mesh))
        t0 = time.perf_counter()
        compiled = trainer.train_step.lower(trainer.abstract_state, task.aux, tokens, trainer.base_key).compile()
        compile_s = time.perf_counter() - t0
        trainer.ckpt.close()
    stats = compiled_stats(compiled)
    if getattr(cfg.model, "loss_chunk", 0) and "gflops_per_step" in stats:
        # XLA counts a loop body once: read the FLOPs of the fused loss from its unchunked twin.
        stats["gflops_per_step"] = unchunked_gflops(config, **kwargs)
    devices = jax.device_count()
    return {
        "config": name, "task": cfg.task, "per_device_batch": per_device, "global_batch": cfg.train.batch_size,
        "remat": remat, "dtype": dtype, "mesh": dict(trainer.mesh.shape), "devices": devices,
        "seq_len": cfg.data.seq_len, "params_m": trainer.num_params / 1e6, "compile_s": round(compile_s, 1),
        # XLA's cost analysis of the SPMD program is per device; the step's total is devices × that.
        "gflops_per_device": stats.get("gflops_per_step"),
        "per_device_mb": {k: round(v, 1) for k, v in stats.items() if k.endswith("_mb")},
    }


def fit_lines(points: list[dict]) -> list[dict]:
    """peak_mb ≈ fixed + per_seq · per_device_batch for each (config, remat) with two or more batches."""
    groups: dict[tuple, list[dict]] = {}
    for p in points:
        groups.setdefault((p["config"], p["remat"], p["dtype"]), []).append(p)
    out = []
    for (name, remat, dtype), ps in groups.items():
        ps = sorted(ps, key=lambda p: p["per_device_batch"])
        if len(ps) < 2:
            continue
        lo, hi = ps[0], ps[-1]
        slope = (hi["per_device_mb"]["peak_estimate_mb"] - lo["per_device_mb"]["peak_estimate_mb"]) / (
            hi["per_device_batch"] - lo["per_device_batch"])
        fixed = lo["per_device_mb"]["peak_estimate_mb"] - slope * lo["per_device_batch"]
        gflops_per_seq = (hi["gflops_per_device"] - lo["gflops_per_device"]) / (
            hi["per_device_batch"] - lo["per_device_batch"])
        out.append({"config": name, "remat": remat, "dtype": dtype, "fixed_mb": round(fixed, 1),
                    "per_sequence_mb": round(slope, 1), "gflops_per_sequence": round(gflops_per_seq, 2)})
    return out


def main(argv):
    del argv
    mesh = [int(v) for v in _MESH.value]
    points, teachers = [], {}
    for name in _CONFIGS.value:
        for remat in _REMAT.value:
            for b in _BATCH.value:
                point = plan_point(name, int(b), remat, _DTYPE.value, mesh, teachers)
                points.append(point)
                print(json.dumps(point), file=sys.stderr, flush=True)
    result = {"backend": jax.default_backend(), "devices": jax.device_count(), "points": points,
              "fits": fit_lines(points)}
    text = json.dumps(result, indent=2)
    print(text)
    if flags.FLAGS.out:
        with open(flags.FLAGS.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    app.run(main)
