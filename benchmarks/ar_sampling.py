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
import platform
import sys
import time

import jax
import jax.numpy as jnp
from flax import nnx

from discreteflow_jax.models.generate import SamplingSettings, make_generate_fn
from discreteflow_jax.models.gpt2 import GPT2, GPT2Config
from discreteflow_jax.models.llama import Llama, LlamaConfig

MODELS = {
    # The Shakespeare teacher (experiment 2.1), LLaMA tokenizer vocabulary.
    "llama": (Llama, LlamaConfig(vocab_size=32000, dim=512, num_layers=8, num_heads=8, ffn_hidden=2048, max_len=1024)),
    # GPT-2 124M (experiment 3.2).
    "gpt2": (GPT2, GPT2Config()),
}


def _csv_ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def random_model(name: str, dtype: str) -> tuple[nnx.GraphDef, nnx.State, int]:
    cls, config = MODELS[name]
    config = dataclasses.replace(config, dtype=dtype)
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: cls(config, rngs=nnx.Rngs(0))))
    # Initialising under jit compiles one program instead of dispatching every initializer eagerly.
    state = jax.jit(lambda: nnx.split(cls(config, rngs=nnx.Rngs(0)))[1])()
    num_params = sum(x.size for x in jax.tree.leaves(state))
    return graphdef, state, num_params


def bench_cell(graphdef, state, batch: int, length: int, repeats: int, max_len: int) -> dict:
    new_tokens = min(length, max_len) - 1
    settings = SamplingSettings(max_new_tokens=new_tokens)
    prompt = jnp.ones((batch, 1), jnp.int32)
    args = (state, prompt, jnp.ones((batch, 1), bool), jax.random.key(0), jnp.float32(1.0))

    start = time.perf_counter()
    compiled = make_generate_fn(graphdef, settings).lower(*args).compile()
    compile_s = time.perf_counter() - start

    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - start)
    steady_s = min(times)
    cell = {
        "batch": batch,
        "length": new_tokens + 1,
        "new_tokens": new_tokens,
        "compile_s": round(compile_s, 3),
        "steady_s": round(steady_s, 4),
        "all_runs_s": [round(t, 4) for t in times],
        "ms_per_step": round(1000 * steady_s / new_tokens, 3),
        "tokens_per_s": round(batch * new_tokens / steady_s, 1),
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
        for length in _csv_ints(args.lengths):
            for batch in _csv_ints(args.batches):
                cell = {"model": name, "params": int(num_params), **bench_cell(
                    graphdef, state, batch, length, args.repeats, max_len
                )}
                print(json.dumps(cell), file=sys.stderr, flush=True)
                report["results"].append(cell)
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return report


if __name__ == "__main__":
    main()
