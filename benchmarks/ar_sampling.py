"""Autoregressive sampling speed of the teachers with a KV cache (random weights).

Each (model, batch, length) cell compiles ``discreteflow_jax.models.generate``'s program once
(reported as ``compile_s``: lowering plus XLA compilation) and then times full generations
(``steady_s``, the best of ``--repeats``). A generation starts from a 1-token prompt and samples
``length - 1`` tokens with temperature 1 over the full vocabulary, no EOS, so every step runs.

    python benchmarks/ar_sampling.py --quick
    python benchmarks/ar_sampling.py --models gpt2 --batches 1,64 --lengths 1024 --out gpt2.json

Prints JSON to stdout (and writes it to ``--out``); progress goes to stderr.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys

import jax
from flax import nnx

from discreteflow_jax.models.gpt2 import GPT2, GPT2Config
from discreteflow_jax.models.llama import Llama, LlamaConfig

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import ar_program, compile_and_time, csv_ints, emit_json, random_init, speed_fields  # noqa: E402

MODELS = {
    # The Shakespeare teacher (experiment 2.1), LLaMA tokenizer vocabulary.
    "llama": (Llama, LlamaConfig(vocab_size=32000, dim=512, num_layers=8, num_heads=8, ffn_hidden=2048, max_len=1024)),
    # GPT-2 124M (experiment 3.2).
    "gpt2": (GPT2, GPT2Config()),
}


def random_model(name: str, dtype: str) -> tuple[nnx.GraphDef, nnx.State, int]:
    cls, config = MODELS[name]
    return random_init(cls, dataclasses.replace(config, dtype=dtype))


def bench_cell(graphdef, state, batch: int, length: int, repeats: int, max_len: int) -> dict:
    new_tokens = min(length, max_len) - 1
    program, args = ar_program(graphdef, state, batch, new_tokens)
    compiled, compile_s, times = compile_and_time(program, args, repeats, warmup=False)
    cell = {
        "batch": batch,
        "length": new_tokens + 1,
        "new_tokens": new_tokens,
        **speed_fields(compile_s, times, new_tokens, batch * new_tokens),
    }
    memory = compiled.memory_analysis()
    if memory is not None:  # not every backend reports it
        cell["temp_mib"] = round(memory.temp_size_in_bytes / 2**20, 1)
    return cell


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="llama,gpt2", help="comma-separated subset of: " + ",".join(MODELS))
    parser.add_argument("--batches", default="1,8,64")
    parser.add_argument("--lengths", default="128,1024", help="total sequence lengths (prompt of 1 included)")
    parser.add_argument("--repeats", type=int, default=3, help="timed generations per cell (best is reported)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--quick", action="store_true", help="batches 1,8, length 128, one timed run")
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args(argv)
    if args.quick:
        args.batches, args.lengths, args.repeats = "1,8", "128", 1

    report = {
        "benchmark": "ar_sampling",
        "backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
        "jax": jax.__version__,
        "python": platform.python_version(),
        "dtype": args.dtype,
        "results": [],
    }
    for name in args.models.split(","):
        graphdef, state, num_params = random_model(name, args.dtype)
        max_len = MODELS[name][1].max_len
        for length in csv_ints(args.lengths):
            for batch in csv_ints(args.batches):
                cell = {"model": name, "params": int(num_params), **bench_cell(
                    graphdef, state, batch, length, args.repeats, max_len
                )}
                print(json.dumps(cell), file=sys.stderr, flush=True)
                report["results"].append(cell)
    emit_json(report, args.out)
    return report


if __name__ == "__main__":
    main()
