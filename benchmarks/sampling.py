"""Flow sampling speed against autoregressive KV-cache sampling at the same model size (random weights).

A TokenFlow (d512, 8 layers, 8 heads, SwiGLU 2048) produces a whole sequence in K network calls;
the LLaMA teacher of the same size (d512, 8 layers, 8 heads, SwiGLU 2048) needs one cached decode
step per token. Both use the 32000-piece LLaMA vocabulary. For every (length, batch) cell this
times the flow sampler at each K and the autoregressive sampler once, and reports tokens/s and the
ratio flow / autoregressive (> 1: the flow is faster).

Each program is compiled first (``compile_s``, not part of the timing), run once untimed, and then
run ``--repeats`` times; the best run counts. The autoregressive sampler starts from a 1-token prompt and samples
``length - 1`` tokens with temperature 1, no EOS (every step runs); the flow sampler produces
``length`` tokens. Tokens/s counts generated tokens.

    python benchmarks/sampling.py --quick          # length 128, batch 1 and 16, one timed run
    python benchmarks/sampling.py --out sampling.json

Prints JSON to stdout (and writes it to ``--out``); progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from discreteflow_jax import flow
from discreteflow_jax.models.generate import SamplingSettings, make_generate_fn
from discreteflow_jax.models.llama import Llama, LlamaConfig
from discreteflow_jax.models.tokenflow import TokenFlow, TokenFlowConfig

VOCAB, DIM, LAYERS, HEADS, FFN = 32000, 512, 8, 8, 2048


def _csv_ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def _init(cls: type[nnx.Module], config: Any) -> tuple[nnx.GraphDef, nnx.State, int]:
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: cls(config, rngs=nnx.Rngs(0))))
    # Initialising under jit compiles one program instead of dispatching every initializer eagerly.
    state = jax.jit(lambda: nnx.split(cls(config, rngs=nnx.Rngs(0)))[1])()
    return graphdef, state, int(sum(x.size for x in jax.tree.leaves(state)))


def _time(compiled: Callable, args: tuple, repeats: int) -> list[float]:
    # One untimed run first: the first call of a compiled program also pays for buffer allocation.
    jax.block_until_ready(compiled(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - start)
    return times


def flow_program(graphdef: nnx.GraphDef, steps: int, batch: int, length: int, schedule: str) -> Callable:
    grid = flow.time_grid(steps, schedule)

    def run(state: nnx.State, key: jax.Array) -> jax.Array:
        model = nnx.merge(graphdef, state)
        x0 = flow.gaussian_source(key, batch, length, model)
        return flow.sample_flow(model, x0, grid)[0]

    return jax.jit(run)


def bench_flow(graphdef, state, steps: int, batch: int, length: int, repeats: int, schedule: str) -> dict:
    args = (state, jax.random.key(0))
    start = time.perf_counter()
    compiled = flow_program(graphdef, steps, batch, length, schedule).lower(*args).compile()
    compile_s = time.perf_counter() - start
    times = _time(compiled, args, repeats)
    steady_s = min(times)
    return {
        "sampler": "flow", "steps": steps, "batch": batch, "length": length, "new_tokens": length,
        "compile_s": round(compile_s, 3), "steady_s": round(steady_s, 4), "all_runs_s": [round(t, 4) for t in times],
        "ms_per_step": round(1000 * steady_s / steps, 3), "tokens_per_s": round(batch * length / steady_s, 1),
    }


def bench_ar(graphdef, state, batch: int, length: int, repeats: int) -> dict:
    new_tokens = length - 1  # the 1-token prompt (BOS) is part of the sequence
    settings = SamplingSettings(max_new_tokens=new_tokens)
    prompt = jnp.ones((batch, 1), jnp.int32)
    args = (state, prompt, jnp.ones((batch, 1), bool), jax.random.key(0), jnp.float32(1.0))
    start = time.perf_counter()
    compiled = make_generate_fn(graphdef, settings).lower(*args).compile()
    compile_s = time.perf_counter() - start
    times = _time(compiled, args, repeats)
    steady_s = min(times)
    return {
        "sampler": "autoregressive", "batch": batch, "length": length, "new_tokens": new_tokens,
        "compile_s": round(compile_s, 3), "steady_s": round(steady_s, 4), "all_runs_s": [round(t, 4) for t in times],
        "ms_per_step": round(1000 * steady_s / new_tokens, 3),
        "tokens_per_s": round(batch * new_tokens / steady_s, 1),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", default="1,4,8,32", help="flow sampling steps K")
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--lengths", default="128,1024", help="sequence lengths in tokens")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed runs per program, the best is reported (default 3, 1 with --quick)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="activation dtype")
    parser.add_argument("--schedule", default="uniform", choices=list(flow.TIME_GRIDS), help="flow time grid")
    parser.add_argument("--quick", action="store_true", help="length 128 only, one timed run per program")
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args(argv)
    if args.quick:
        args.lengths = "128"
    if args.repeats is None:
        args.repeats = 1 if args.quick else 3
    steps, batches, lengths = _csv_ints(args.steps), _csv_ints(args.batches), _csv_ints(args.lengths)
    if min(steps + batches + lengths) < 1 or min(lengths) < 2 or args.repeats < 1:
        parser.error("steps, batches and repeats must be >= 1 and lengths >= 2")
    max_len = max(lengths)

    flow_cfg = TokenFlowConfig(
        vocab_size=VOCAB, dim=DIM, num_layers=LAYERS, num_heads=HEADS, ffn_hidden=FFN, max_len=max_len,
        dtype=args.dtype,
    )
    ar_cfg = LlamaConfig(
        vocab_size=VOCAB, dim=DIM, num_layers=LAYERS, num_heads=HEADS, ffn_hidden=FFN, max_len=max_len,
        dtype=args.dtype,
    )
    flow_graph, flow_state, flow_params = _init(TokenFlow, flow_cfg)
    ar_graph, ar_state, ar_params = _init(Llama, ar_cfg)
    report: dict[str, Any] = {
        "benchmark": "sampling",
        "backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
        "cpu_count": os.cpu_count(),
        # The machine may be shared: a high load average means the numbers are pessimistic.
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "jax": jax.__version__,
        "python": platform.python_version(),
        "dtype": args.dtype,
        "schedule": args.schedule,
        "models": {
            "flow": {"dim": DIM, "layers": LAYERS, "heads": HEADS, "ffn": FFN, "vocab": VOCAB, "params": flow_params},
            "autoregressive": {
                "dim": DIM, "layers": LAYERS, "heads": HEADS, "ffn": FFN, "vocab": VOCAB, "params": ar_params,
            },
        },
        "results": [],
        "ratios": [],
    }
    for length in lengths:
        for batch in batches:
            ar = bench_ar(ar_graph, ar_state, batch, length, args.repeats)
            print(json.dumps(ar), file=sys.stderr, flush=True)
            report["results"].append(ar)
            for k in steps:
                cell = bench_flow(flow_graph, flow_state, k, batch, length, args.repeats, args.schedule)
                print(json.dumps(cell), file=sys.stderr, flush=True)
                report["results"].append(cell)
                report["ratios"].append({
                    "length": length, "batch": batch, "steps": k,
                    "flow_tokens_per_s": cell["tokens_per_s"], "ar_tokens_per_s": ar["tokens_per_s"],
                    "speedup": round(cell["tokens_per_s"] / ar["tokens_per_s"], 2),
                })
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return report


if __name__ == "__main__":
    main()
