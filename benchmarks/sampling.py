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

Efficiency of the flow cells: ``gflop`` = K network calls (XLA's cost analysis of one call at
the cell's shape) plus K − 1 V-wide p·E matmuls (the last step needs only the argmax), and
``achieved_gflops_per_s`` = gflop / steady_s. On the CPU ``cpu_mfu`` sets it against one fp32
matmul of the V-wide shape (min(batch·length, 2048) × dim × vocab) measured at start; on GPU/TPU
``mfu`` against the device kind's bf16 peak (``common.PEAK_BF16_TFLOPS``).

Prints JSON to stdout (and writes it to ``--out``); progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from collections.abc import Callable
from typing import Any

import jax
from flax import nnx

from discreteflow_jax import flow
from discreteflow_jax.config import TokenFlowConfig
from discreteflow_jax.models.llama import Llama, LlamaConfig
from discreteflow_jax.models.tokenflow import TokenFlow

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (  # noqa: E402
    ar_program,
    compile_and_time,
    cpu_info,
    csv_ints,
    efficiency_fields,
    emit_json,
    matmul_gflops,
    random_init,
    speed_fields,
)

VOCAB, DIM, LAYERS, HEADS, FFN = 32000, 512, 8, 8, 2048


def flow_program(graphdef: nnx.GraphDef, steps: int, batch: int, length: int, schedule: str) -> Callable:
    grid = flow.time_grid(steps, schedule)

    def run(state: nnx.State, key: jax.Array) -> jax.Array:
        model = nnx.merge(graphdef, state)
        x0 = flow.gaussian_source(key, batch, length, model)
        return flow.sample_flow(model, x0, grid)[0]

    return jax.jit(run)


def flow_gflops(graphdef: nnx.GraphDef, state: nnx.State, steps: int, batch: int, length: int) -> float:
    """FLOPs of a K-step flow sample, GFLOP: K network calls (XLA's count of one call) and K − 1
    p·E matmuls (the last step takes only the argmax)."""
    cfg = nnx.merge(graphdef, state).cfg

    def call(state, x, t):
        return nnx.merge(graphdef, state)(x, t)

    x = jax.ShapeDtypeStruct((batch, length, cfg.dim), jax.numpy.float32)
    t = jax.ShapeDtypeStruct((batch,), jax.numpy.float32)
    cost = jax.jit(call).lower(state, x, t).compile().cost_analysis()
    cost = (cost[0] if cost else {}) if isinstance(cost, list) else (cost or {})
    return (steps * float(cost.get("flops", 0.0)) + (steps - 1) * 2.0 * batch * length * cfg.vocab_size * cfg.dim) / 1e9


def bench_flow(graphdef, state, steps: int, batch: int, length: int, repeats: int, schedule: str,
               matmul: float | None = None) -> dict:
    args = (state, jax.random.key(0))
    program = flow_program(graphdef, steps, batch, length, schedule)
    _, compile_s, times = compile_and_time(program, args, repeats, warmup=True)
    gflop = flow_gflops(graphdef, state, steps, batch, length)
    return {
        "sampler": "flow", "steps": steps, "batch": batch, "length": length, "new_tokens": length,
        **speed_fields(compile_s, times, steps, batch * length),
        "gflop": round(gflop, 4), **efficiency_fields(gflop, min(times), matmul),
    }


def bench_ar(graphdef, state, batch: int, length: int, repeats: int) -> dict:
    new_tokens = length - 1  # the 1-token prompt (BOS) is part of the sequence
    _, compile_s, times = compile_and_time(*ar_program(graphdef, state, batch, new_tokens), repeats, warmup=True)
    return {
        "sampler": "autoregressive", "batch": batch, "length": length, "new_tokens": new_tokens,
        **speed_fields(compile_s, times, new_tokens, batch * new_tokens),
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
    parser.add_argument("--ar", default="yes", choices=["yes", "no"], help="also time the autoregressive sampler")
    parser.add_argument("--no-matmul", dest="matmul", action="store_false",
                        help="CPU: skip the matmul throughput measurement (no cpu_mfu)")
    parser.add_argument("--dim", type=int, default=DIM)
    parser.add_argument("--layers", type=int, default=LAYERS)
    parser.add_argument("--heads", type=int, default=HEADS)
    parser.add_argument("--ffn", type=int, default=FFN, help="SwiGLU width (the original's: --ffn=DIM)")
    parser.add_argument("--vocab", type=int, default=VOCAB)
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args(argv)
    if args.quick:
        args.lengths = "128"
    if args.repeats is None:
        args.repeats = 1 if args.quick else 3
    steps, batches, lengths = csv_ints(args.steps), csv_ints(args.batches), csv_ints(args.lengths)
    if min(steps + batches + lengths) < 1 or min(lengths) < 2 or args.repeats < 1:
        parser.error("steps, batches and repeats must be >= 1 and lengths >= 2")
    max_len = max(lengths)

    shape = {"vocab_size": args.vocab, "dim": args.dim, "num_layers": args.layers, "num_heads": args.heads,
             "ffn_hidden": args.ffn, "max_len": max_len, "dtype": args.dtype}
    flow_graph, flow_state, flow_params = random_init(TokenFlow, TokenFlowConfig(**shape))
    if args.ar == "yes":
        ar_graph, ar_state, ar_params = random_init(Llama, LlamaConfig(**shape))
    matmul = None
    if args.matmul and jax.default_backend() == "cpu":
        matmul = matmul_gflops(min(max(batches) * max(lengths), 2048), args.dim, args.vocab)
    sizes = {"dim": args.dim, "layers": args.layers, "heads": args.heads, "ffn": args.ffn, "vocab": args.vocab}
    report: dict[str, Any] = {
        "benchmark": "sampling",
        "backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
        **cpu_info(),
        # The machine may be shared: a high load average means the numbers are pessimistic.
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "jax": jax.__version__,
        "python": platform.python_version(),
        "dtype": args.dtype,
        "schedule": args.schedule,
        "matmul_gflops_per_s": round(matmul, 2) if matmul else None,
        "models": {"flow": {**sizes, "params": flow_params}},
        "results": [],
        "ratios": [],
    }
    if args.ar == "yes":
        report["models"]["autoregressive"] = {**sizes, "params": ar_params}
    for length in lengths:
        for batch in batches:
            ar = None
            if args.ar == "yes":
                ar = bench_ar(ar_graph, ar_state, batch, length, args.repeats)
                print(json.dumps(ar), file=sys.stderr, flush=True)
                report["results"].append(ar)
            for k in steps:
                cell = bench_flow(flow_graph, flow_state, k, batch, length, args.repeats, args.schedule, matmul)
                print(json.dumps(cell), file=sys.stderr, flush=True)
                report["results"].append(cell)
                if ar is not None:
                    report["ratios"].append({
                        "length": length, "batch": batch, "steps": k,
                        "flow_tokens_per_s": cell["tokens_per_s"], "ar_tokens_per_s": ar["tokens_per_s"],
                        "speedup": round(cell["tokens_per_s"] / ar["tokens_per_s"], 2),
                    })
    emit_json(report, args.out)
    return report


if __name__ == "__main__":
    main()
