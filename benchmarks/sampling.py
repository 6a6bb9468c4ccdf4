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
from collections.abc import Callable
from typing import Any

import jax
from flax import nnx

from discreteflow_jax import flow
from discreteflow_jax.models.llama import Llama, LlamaConfig
from discreteflow_jax.models.tokenflow import TokenFlow, TokenFlowConfig

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import ar_program, compile_and_time, csv_ints, emit_json, random_init, speed_fields  # noqa: E402

VOCAB, DIM, LAYERS, HEADS, FFN = 32000, 512, 8, 8, 2048


def flow_program(graphdef: nnx.GraphDef, steps: int, batch: int, length: int, schedule: str) -> Callable:
    grid = flow.time_grid(steps, schedule)

    def run(state: nnx.State, key: jax.Array) -> jax.Array:
        model = nnx.merge(graphdef, state)
        x0 = flow.gaussian_source(key, batch, length, model)
        return flow.sample_flow(model, x0, grid)[0]

    return jax.jit(run)


def bench_flow(graphdef, state, steps: int, batch: int, length: int, repeats: int, schedule: str) -> dict:
    args = (state, jax.random.key(0))
    program = flow_program(graphdef, steps, batch, length, schedule)
    _, compile_s, times = compile_and_time(program, args, repeats, warmup=True)
    return {
        "sampler": "flow", "steps": steps, "batch": batch, "length": length, "new_tokens": length,
        **speed_fields(compile_s, times, steps, batch * length),
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

    flow_cfg = TokenFlowConfig(
        vocab_size=VOCAB, dim=DIM, num_layers=LAYERS, num_heads=HEADS, ffn_hidden=FFN, max_len=max_len,
        dtype=args.dtype,
    )
    ar_cfg = LlamaConfig(
        vocab_size=VOCAB, dim=DIM, num_layers=LAYERS, num_heads=HEADS, ffn_hidden=FFN, max_len=max_len,
        dtype=args.dtype,
    )
    flow_graph, flow_state, flow_params = random_init(TokenFlow, flow_cfg)
    ar_graph, ar_state, ar_params = random_init(Llama, ar_cfg)
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
    emit_json(report, args.out)
    return report


if __name__ == "__main__":
    main()
