"""Helpers shared by the benchmark scripts (imported with this folder on ``sys.path``)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from discreteflow_jax.models.generate import SamplingSettings, make_generate_fn


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
