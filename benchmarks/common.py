"""Helpers shared by the benchmark scripts (imported with this folder on ``sys.path``)."""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from discreteflow_jax.models.generate import SamplingSettings, make_generate_fn
from discreteflow_jax.training.chips import CHIPS


def csv_ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def emit_json(report: dict, out: str | None) -> None:
    """The report on stdout (progress lines go to stderr), and in ``out`` when given."""
    text = json.dumps(report, indent=2)
    print(text)
    if out:
        with open(out, "w") as f:
            f.write(text + "\n")


def random_init(cls: type[nnx.Module], config: Any) -> tuple[nnx.GraphDef, nnx.State, int]:
    """``cls(config)`` with random weights: (graphdef, state, number of parameters)."""
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: cls(config, rngs=nnx.Rngs(0))))
    # Initialising under jit compiles one program instead of dispatching every initializer eagerly.
    state = jax.jit(lambda: nnx.split(cls(config, rngs=nnx.Rngs(0)))[1])()
    return graphdef, state, int(sum(x.size for x in jax.tree.leaves(state)))


def ar_program(graphdef: nnx.GraphDef, state: nnx.State, batch: int, new_tokens: int) -> tuple[Callable, tuple]:
    """``generate``'s jitted program and its arguments for ``batch`` 1-token prompts continued by
    ``new_tokens`` tokens at temperature 1 over the full vocabulary, no EOS (every step runs)."""
    settings = SamplingSettings(max_new_tokens=new_tokens)
    prompt = jnp.ones((batch, 1), jnp.int32)
    args = (state, prompt, jnp.ones((batch, 1), bool), jax.random.key(0), jnp.float32(1.0))
    return make_generate_fn(graphdef, settings), args


def compile_and_time(fn: Callable, args: tuple, repeats: int, *, warmup: bool) -> tuple[Any, float, list[float]]:
    """Compiles the jitted ``fn`` for ``args`` (timed apart) and times ``repeats`` runs:
    (compiled, compile_s, run times in seconds). ``warmup`` adds one untimed run first, since the
    first call of a compiled program also pays for buffer allocation."""
    start = time.perf_counter()
    compiled = fn.lower(*args).compile()
    compile_s = time.perf_counter() - start
    if warmup:
        jax.block_until_ready(compiled(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - start)
    return compiled, compile_s, times


def speed_fields(compile_s: float, times: list[float], steps: int, tokens: int) -> dict:
    """The timing columns of a sampling cell: the best run counts; ``steps`` network calls
    produce ``tokens`` tokens in all."""
    steady_s = min(times)
    return {
        "compile_s": round(compile_s, 3),
        "steady_s": round(steady_s, 4),
        "all_runs_s": [round(t, 4) for t in times],
        "ms_per_step": round(1000 * steady_s / steps, 3),
        "tokens_per_s": round(tokens / steady_s, 1),
    }


# -- the machine and its limit -----------------------------------------------------------------

# Vector extensions that decide CPU matmul speed, in the order they are reported.
VECTOR_FLAGS = ("sse4_2", "avx", "avx2", "fma", "avx_vnni", "avx512f", "avx512bw", "avx512vl", "avx512_vnni",
                "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8", "asimd", "sve", "sve2")

# Dense bf16 matmul peak per JAX device, TFLOP/s (vendor data sheets; SXM parts for NVIDIA; the
# TPUs from the package's chip table, discreteflow_jax/training/chips.py, with its sources).
# Matched as substrings of ``device.device_kind``, first match wins (so specific names first).
PEAK_BF16_TFLOPS = (
    ("H100 PCIe", 756.0), ("H100", 989.0), ("H200", 989.0), ("GH200", 989.0), ("B200", 2250.0),
    ("A100", 312.0), ("L40S", 362.0), ("L4", 121.0), ("A10G", 70.0), ("A10", 125.0),
    *((kind, chip.peak_bf16_tflops) for chip in CHIPS.values() for kind in chip.device_kinds),
    ("TPU v3", 61.5),
)


def cpu_info(path: str = "/proc/cpuinfo") -> dict:
    """CPU model name, core count and the matmul-relevant vector extensions (Linux /proc/cpuinfo;
    elsewhere only what ``platform`` knows)."""
    model, flags = None, set()
    try:
        with open(path) as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key in ("model name", "Model") and model is None:
                    model = value.strip()
                elif key in ("flags", "Features") and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    return {"cpu_model": model or platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
            "vector_extensions": [f for f in VECTOR_FLAGS if f in flags]}


def peak_tflops(device_kind: str) -> float | None:
    """Dense bf16 peak of one accelerator of this kind (``PEAK_BF16_TFLOPS``), None if unknown."""
    for name, peak in PEAK_BF16_TFLOPS:
        if name.lower() in device_kind.lower():
            return peak
    return None


def matmul_gflops(m: int, k: int, n: int, dtype: str = "float32", repeats: int = 3) -> float:
    """Measured throughput of one jitted [m, k]·[k, n] matmul on the default device, GFLOP/s
    (best of ``repeats`` after a warm-up): the machine's practical limit for the step's matmuls."""
    a = jnp.ones((m, k), dtype) * 0.01
    b = jnp.ones((k, n), dtype) * 0.01
    fn = jax.jit(lambda a, b: a @ b)
    _, _, times = compile_and_time(fn, (a, b), repeats, warmup=True)
    return 2.0 * m * k * n / min(times) / 1e9


def efficiency_fields(gflop: float | None, seconds: float | None, matmul_gflops_per_s: float | None,
                      devices: list | None = None) -> dict:
    """Achieved GFLOP/s of ``gflop`` in ``seconds`` and its fraction of the machine's limit: on the
    CPU the measured matmul throughput ("cpu_mfu"), on accelerators the bf16 peak table ("mfu",
    over all devices; None when the device kind is not in the table)."""
    if not gflop or not seconds:
        return {}
    achieved = gflop / seconds
    out: dict[str, Any] = {"achieved_gflops_per_s": round(achieved, 2)}
    devices = jax.devices() if devices is None else devices
    if devices and devices[0].platform != "cpu":
        kind = devices[0].device_kind
        peak = peak_tflops(kind)
        out.update(device_kind=kind, peak_bf16_tflops_per_device=peak,
                   mfu=round(achieved / (peak * 1e3 * len(devices)), 4) if peak else None)
    if matmul_gflops_per_s:
        out.update(matmul_gflops_per_s=round(matmul_gflops_per_s, 2),
                   cpu_mfu=round(achieved / matmul_gflops_per_s, 4))
    return out
