"""One command for a single GPU (or TPU chip): compile and time the full FineWeb train steps.

    python benchmarks/device_check.py [--configs=fineweb_baseline,fineweb_gumbel] [--steps=5] [--out=FILE]

For each config (each in its own process, so peak device memory is per step) it builds exactly
the step training runs (``benchmarks/step_time.py``: the configs' model at bf16 activations,
context 1024, one micro-batch) with the per-device batch the memory plan recommends for this
device's memory (launch/README.md: the largest power of two with ``fixed + b · per_sequence ≤
85%`` of it), compiles it, runs one warm-up and ``--steps`` timed steps, and prints tokens/s, MFU
(XLA's FLOP count ÷ step time ÷ the device kind's dense bf16 peak, ``common.PEAK_BF16_TFLOPS``)
and the peak device memory (``memory_stats()["peak_bytes_in_use"]``). The Gumbel teacher is a
GPT-2 124M with random weights (no download; values do not change the cost). Meant to finish
within 5 minutes on one H100/H200, most of it compilation (two compiles per config: the step, and
its ``loss_chunk=0`` twin for the FLOP count, since XLA counts a loop body once); the report's
``total_wall_s`` says how long it took.

On a machine with several GPUs it uses the first (``CUDA_VISIBLE_DEVICES=0`` unless set); on a
TPU host every chip JAX sees runs the per-device batch (MFU over all of them). Without a GPU or
TPU it stops with a message. ``--cpu_dry`` runs the same path on the CPU at tiny
shapes (to check the script, not to measure anything).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
CONFIGS = ("fineweb_baseline", "fineweb_gumbel")
# launch/README.md, "Memory plan": per-device compiled MiB = fixed + per_sequence · b (bf16, context
# 1024, remat none), from benchmarks/memory.py.
MEMORY_PLAN_MIB = {"fineweb_baseline": (2458.0, 2208.0), "fineweb_gumbel": (3747.0, 3762.0)}
DRY = {"model.dim": 32, "model.num_layers": 1, "model.num_heads": 2, "model.max_len": 16, "data.seq_len": 16}


def recommended_batch(config: str, device_mib: float, fraction: float = 0.85) -> int:
    """The largest power of two b with fixed + b · per_sequence ≤ fraction · device memory (>= 1)."""
    fixed, per_seq = MEMORY_PLAN_MIB[config]
    b = 1
    while fixed + 2 * b * per_seq <= fraction * device_mib:
        b *= 2
    return b


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default=",".join(CONFIGS), help="configs/<name>.py to time")
    parser.add_argument("--steps", type=int, default=5, help="timed steps after one warm-up step")
    parser.add_argument("--per_device_batch", type=int, default=0,
                        help="sequences per step; 0: the memory plan's recommendation for this device")
    parser.add_argument("--seq_len", type=int, default=1024)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--cpu_dry", action="store_true", help="tiny shapes on the CPU (checks the script only)")
    parser.add_argument("--out", help="also write the JSON here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.configs = [c for c in args.configs.split(",") if c]
    unknown = [c for c in args.configs if c not in CONFIGS]
    if unknown or not args.configs:
        parser.error(f"unknown or empty --configs {unknown}; valid: {', '.join(CONFIGS)}")
    if args.steps < 1 or args.per_device_batch < 0 or args.seq_len < 2:
        parser.error("--steps must be >= 1, --per_device_batch >= 0 (0: recommended), --seq_len >= 2")
    return args


def require_accelerator(cpu_dry: bool) -> Any:
    """The single accelerator to use; a clear stop when there is none (unless ``cpu_dry``)."""
    import jax

    devices = jax.devices()
    if cpu_dry:
        return devices[0]
    if devices[0].platform == "cpu":
        raise SystemExit(
            "device_check needs a GPU or TPU, but JAX sees only the CPU (backend "
            f"{jax.default_backend()!r}). Install JAX for the accelerator (e.g. `pip install -U \"jax[cuda12]\"`), "
            "or pass --cpu_dry to check the script on tiny CPU shapes."
        )
    return devices[0]


def device_memory_mib(device: Any) -> float | None:
    """The device's whole memory, MiB: JAX's allocator limit divided by the fraction it was given
    (XLA_PYTHON_CLIENT_MEM_FRACTION, JAX's default 0.75), as the memory plan counts it."""
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if not stats or "bytes_limit" not in stats:
        return None
    return stats["bytes_limit"] / 2**20 / float(os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.75"))


def build_config(name: str, args: argparse.Namespace, batch: int):
    import importlib.util

    from discreteflow_jax.config.presets import set_fields

    spec = importlib.util.spec_from_file_location(f"config_{name}", os.path.join(REPO, "configs", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(None)
    fields: dict[str, Any] = {"model.dtype": args.dtype, "data.seq_len": args.seq_len,
                              "model.max_len": max(args.seq_len, config.model.max_len),
                              "train.batch_size": batch, "train.grad_accum": 1}
    if args.cpu_dry:
        fields.update(DRY)
    return set_fields(config, fields)


def random_gpt2_teacher(vocab: int, max_len: int, dtype: str, tiny: bool) -> Any:
    """GPT-2 124M shapes (tiny ones with ``tiny``) with random weights, as the Gumbel task's teacher."""
    from flax import nnx

    from discreteflow_jax.io.teacher import TeacherBundle
    from discreteflow_jax.models.gpt2 import GPT2, GPT2Config

    sizes = {"dim": 32, "num_layers": 1, "num_heads": 2} if tiny else {}
    cfg = GPT2Config(vocab_size=vocab, max_len=max_len, dtype=dtype, **sizes)
    graphdef, state = nnx.split(GPT2(cfg, rngs=nnx.Rngs(0)))
    return TeacherBundle(graphdef=graphdef, params=nnx.to_pure_dict(state), config=cfg, kind="gpt2",
                         bos_id=cfg.bos_id, vocab_size=vocab, max_len=max_len, source="random GPT-2")


def run_worker(args: argparse.Namespace) -> dict:
    """One config in this process: compile, time, and read the device's peak memory."""
    device = require_accelerator(args.cpu_dry)
    sys.path.insert(0, HERE)
    from step_time import benchmark

    from discreteflow_jax.config import parse_config

    name = args.worker
    memory = device_memory_mib(device)
    batch = args.per_device_batch or (2 if args.cpu_dry or memory is None else recommended_batch(name, memory))
    import jax

    config = build_config(name, args, batch * jax.device_count())
    kwargs = {}
    cfg = parse_config(config)
    if cfg.task == "gumbel":
        kwargs["teacher"] = random_gpt2_teacher(cfg.model.vocab_size, cfg.data.seq_len, args.dtype, args.cpu_dry)
    t0 = time.perf_counter()
    result = benchmark(config, args.steps, measure_matmul=False, **kwargs)
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    return {
        "config": name, "device": str(device), "device_kind": device.device_kind, "devices": jax.device_count(),
        "device_memory_gib": round(memory / 1024, 1) if memory else None, "per_device_batch": batch,
        "seq_len": cfg.data.seq_len, "dtype": args.dtype, "wall_s": round(time.perf_counter() - t0, 1),
        "compile_s": round(result["compile_s"], 1), "step_s": round(result["step_s"], 4),
        "step_s_min": round(result["step_s_min"], 4), "tokens_per_s": round(result["tokens_per_s"], 1),
        "gflops_per_step": result.get("gflops_per_step"), "mfu": result.get("mfu"),
        "achieved_tflops_per_s": round(result["achieved_gflops_per_s"] / 1e3, 2)
        if result.get("achieved_gflops_per_s") else None,
        "peak_device_memory_gib": round(stats["peak_bytes_in_use"] / 2**30, 2)
        if stats and "peak_bytes_in_use" in stats else None,
        "compiled_peak_estimate_gib": round(result["peak_estimate_mb"] / 1024, 2)
        if "peak_estimate_mb" in result else None,
    }


def worker_command(args: argparse.Namespace, name: str) -> list[str]:
    cmd = [sys.executable, os.path.abspath(__file__), f"--worker={name}", f"--steps={args.steps}",
           f"--per_device_batch={args.per_device_batch}", f"--seq_len={args.seq_len}", f"--dtype={args.dtype}"]
    return cmd + (["--cpu_dry"] if args.cpu_dry else [])


def run_driver(args: argparse.Namespace) -> dict:
    require_accelerator(args.cpu_dry)  # fail here, before any subprocess, when there is no accelerator
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.9")  # the plan aims at 85% of the device memory
    env.setdefault("CUDA_VISIBLE_DEVICES", "0")  # one GPU (set it to choose another)
    results, start = [], time.perf_counter()
    for name in args.configs:
        print(f"[device_check] {name} ...", file=sys.stderr, flush=True)
        proc = subprocess.run(worker_command(args, name), capture_output=True, text=True, env=env, cwd=REPO)
        if proc.returncode != 0:
            sys.stderr.write(proc.stderr[-4000:])
            raise SystemExit(f"device_check: {name} failed (exit {proc.returncode}); its error is above")
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"[device_check]   {result['tokens_per_s']:,.0f} tokens/s, step {result['step_s']} s, MFU "
              f"{result['mfu']}, peak memory {result['peak_device_memory_gib']} GiB", file=sys.stderr, flush=True)
        results.append(result)
    report = {"benchmark": "device_check", "total_wall_s": round(time.perf_counter() - start, 1),
              "cpu_dry": args.cpu_dry, "results": results}
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return report


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.worker:
        if args.worker not in CONFIGS:
            raise SystemExit(f"unknown --worker {args.worker!r}")
        result = run_worker(args)
        print(json.dumps(result), flush=True)
        return result
    return run_driver(args)


if __name__ == "__main__":
    main()
