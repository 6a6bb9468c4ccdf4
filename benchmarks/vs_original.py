"""The original PyTorch DiscreteFlow and this package side by side, in one run, on this machine.

    git clone https://github.com/Baiyu-Su/DiscreteFlow ORIGINAL && git -C ORIGINAL checkout gumbel
    python benchmarks/vs_original.py --original=ORIGINAL [--rounds=2] [--steps=10] [--out=FILE]

Nothing of the original is part of this project: its ``model.py`` is loaded from the checkout
``--original`` points to (a folder with ``model.py`` and ``model_utils.py``; it needs ``torch``).
With a ``transformers`` other than 4.x, the version it was written for, the three names it imports
from it are replaced by plain stand-ins (``transformers_shim``), and one bug of branch ``gumbel``
that stops its plain training step is fixed in memory (``load_original_model``); both are
reported in the output. Three sides are measured, each in a fresh subprocess (so every side's
peak RSS is its own process peak, imports included), alternating in rounds (the order reversed
every other round, so a drift in machine speed hits every side alike):

* ``original``: the original's ``TokenFlowModel`` with its own FFN width (``dim`` rounded up to a
  multiple of 64) and a train step as its Hugging Face ``Trainer`` runs it in fp32: forward with
  labels, backward, gradient clipping at 1.0, AdamW (β2 0.98, weight decay 0.02), learning-rate
  schedule, zero_grad, and the re-normalization of the embedding rows after the optimizer step.
  Its sampler is ``TokenFlowModel.generate`` (K uniform steps, the full context).
* ``ours_same_arch``: this package's train step (exactly the one training runs, as in
  ``benchmarks/step_time.py``) and flow sampler with ``model.ffn_hidden`` set to the original's
  FFN width: the same architecture, so the ratio measures the implementation.
* ``ours``: the same with this package's own FFN width (``model.ffn_hidden=0``: 8/3·dim rounded up
  to a multiple of 64), i.e. what the configs train.

Timing: each process builds the model, runs one untimed warm-up (JAX: after compiling), then
``--steps`` timed train steps or ``--sample_repeats`` timed samples; step times are reported as
min and median over all rounds. After the timed part (so neither enters the peak RSS) each side
counts its FLOPs (PyTorch: ``torch.utils.flop_counter`` over one step, for the sampler at K = 1
and 2 and extrapolated linearly in K; JAX: XLA's cost analysis) and measures one fp32 matmul of
the V-wide shape in its own framework, giving achieved GFLOP/s and its fraction of the machine's
matmul throughput. Ratios are ours ÷ original (< 1: ours is
faster or smaller). The report names the CPU model and its vector extensions.

Random tokens, random weights: neither changes the cost. The JSON goes to stdout (and ``--out``);
progress to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
SIDES = ("original", "ours_same_arch", "ours")
KINDS = ("step", "sample")


def original_ffn(dim: int, multiple_of: int = 64) -> int:
    """The original's SwiGLU width: ``dim`` rounded up to a multiple of ``multiple_of``."""
    return multiple_of * ((dim + multiple_of - 1) // multiple_of)


def peak_rss_mb() -> float:
    """This process's peak resident set so far, MB (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def timing_fields(times: list[float]) -> dict:
    return {"times_s": [round(t, 4) for t in times], "min_s": round(min(times), 4),
            "median_s": round(statistics.median(times), 4)}


# -- the original (PyTorch) -----------------------------------------------------------------------

def check_original(path: str) -> None:
    """A clear error before anything runs when ``path`` is not a checkout of the original."""
    missing = [f for f in ("model.py", "model_utils.py") if not os.path.isfile(os.path.join(path, f))]
    if missing:
        raise SystemExit(
            f"--original={path!r} does not look like a checkout of the original DiscreteFlow (missing "
            f"{', '.join(missing)}). Clone https://github.com/Baiyu-Su/DiscreteFlow, check out branch "
            "`gumbel`, and pass its folder."
        )


def transformers_shim() -> None:
    """Stand-ins for the three ``transformers`` names the original's model.py imports, installed in
    ``sys.modules`` of the original's process only.

    Why: the original was written for transformers 4.x; under transformers >= 5 its config class
    fails at construction (it stores the RoPE base as ``rope_scaling``, which 5.x parses as a dict).
    The three names are plumbing that never runs in a forward or backward pass: ``PretrainedConfig``
    (an attribute holder), ``PreTrainedModel`` (``nn.Module`` plus ``self.config``) and
    ``CausalLMOutput`` (a record of loss and logits), so the timing is the original's own code.
    """
    import dataclasses
    import types

    import torch

    class PretrainedConfig:
        def __init__(self, **kwargs: Any):
            for key, value in kwargs.items():
                setattr(self, key, value)

    class PreTrainedModel(torch.nn.Module):
        def __init__(self, config: Any, *args: Any, **kwargs: Any):
            super().__init__()
            self.config = config

    @dataclasses.dataclass
    class CausalLMOutput:
        loss: Any = None
        logits: Any = None

    root = types.ModuleType("transformers")
    root.PretrainedConfig, root.PreTrainedModel = PretrainedConfig, PreTrainedModel
    outputs = types.ModuleType("transformers.modeling_outputs")
    outputs.CausalLMOutput = CausalLMOutput
    root.modeling_outputs = outputs
    sys.modules["transformers"], sys.modules["transformers.modeling_outputs"] = root, outputs


def needs_transformers_shim() -> bool:
    """True unless a transformers 4.x (the version the original was written for) is installed."""
    try:
        from importlib.metadata import version

        return int(version("transformers").split(".")[0]) != 4
    except Exception:  # not installed, or an unreadable version
        return True


def load_original_model(path: str) -> tuple[Any, list[str]]:
    """The original's ``model.py`` as module ``model``, and the load-time fixes applied to it.

    One fix, made in memory (the checkout is not touched): on branch ``gumbel``,
    ``TokenFlowModel.training_forward`` assigns ``gumbel_context`` only inside its Gumbel branch
    and reads it in every layer call, so the plain (Gaussian) training step raises
    UnboundLocalError. ``gumbel_context = None`` is put first in that method, which is what the
    Gaussian path means (no cross-attention context; the sampler already does the same). A
    checkout that already sets it is loaded unchanged.
    """
    import ast
    import importlib.util

    file = os.path.join(path, "model.py")
    with open(file) as f:
        tree = ast.parse(f.read(), file)
    fixes = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and node.name == "TokenFlowModel":
            for fn in node.body:
                if isinstance(fn, ast.FunctionDef) and fn.name == "training_forward":
                    top_level_names = {t.id for st in fn.body if isinstance(st, ast.Assign)
                                       for t in st.targets if isinstance(t, ast.Name)}
                    if "gumbel_context" not in top_level_names:
                        first = 1 if fn.body and isinstance(fn.body[0], ast.Expr) else 0  # after the docstring
                        fn.body.insert(first, ast.parse("gumbel_context = None").body[0])
                        fixes.append("TokenFlowModel.training_forward: gumbel_context = None before use")
    ast.fix_missing_locations(tree)
    spec = importlib.util.spec_from_loader("model", loader=None, origin=file)
    module = importlib.util.module_from_spec(spec)
    module.__file__ = file
    sys.modules["model"] = module
    exec(compile(tree, file, "exec"), module.__dict__)
    return module, fixes


def import_original(path: str) -> tuple[Any, bool, list[str]]:
    """(the original's ``model`` module, whether ``transformers_shim`` stands in for transformers,
    the load-time fixes of ``load_original_model``). Beyond transformers it needs only torch."""
    check_original(path)
    shim = needs_transformers_shim()
    if shim:
        transformers_shim()
    sys.path.insert(0, os.path.abspath(path))  # for its own `import model_utils`
    try:
        module, fixes = load_original_model(path)
    except ImportError as e:
        raise SystemExit(f"importing the original's model.py failed ({e}); it needs `pip install torch`") from e
    return module, shim, fixes


def torch_matmul_gflops(m: int, k: int, n: int, repeats: int = 3) -> float:
    import torch

    a, b = torch.full((m, k), 0.01), torch.full((k, n), 0.01)
    a @ b  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2.0 * m * k * n / best / 1e9


def run_original(args: argparse.Namespace, kind: str) -> dict:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    mod, shim, fixes = import_original(args.original)
    rss_imports = peak_rss_mb()
    torch.manual_seed(0)
    config = mod.TokenFlowConfig(
        ctx_len=args.seq_len, max_batch=args.batch, vocab_size=args.vocab, dim=args.dim, n_heads=args.heads,
        n_layers=args.layers, tie_word_embeddings=True, use_gumbel_flow=False,
    )
    model = mod.TokenFlowModel(config)
    model.reset_parameters()
    ffn = model.layers[0].feed_forward.w1.out_features
    gen = torch.Generator().manual_seed(0)

    def tokens() -> torch.Tensor:
        return torch.randint(0, args.vocab, (args.batch, args.seq_len), generator=gen)

    if kind == "step":
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=4e-4, betas=(0.9, 0.98), weight_decay=0.02)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 1000))

        def step() -> None:
            ids = tokens()
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            with torch.no_grad():
                model.token_embed._normalize_weights()

        repeats = args.steps
    else:
        model.eval()
        schedule = [i / args.sample_steps for i in range(args.sample_steps + 1)]

        def step() -> None:
            model.generate(batch_size=args.batch, time_schedule=schedule)

        repeats = args.sample_repeats
    step()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    rss = peak_rss_mb()

    def count(fn) -> float:
        counter = FlopCounterMode(display=False)
        with counter:
            fn()
        return counter.get_total_flops() / 1e9

    if kind == "step":
        gflop = count(step)
    else:
        # Every sampling step has the same shapes, so FLOPs are linear in K: count K = 1 and 2.
        one, two = (count(lambda k=k: model.generate(batch_size=args.batch,
                                                     time_schedule=[i / k for i in range(k + 1)]))
                    for k in (1, 2))
        gflop = one + (args.sample_steps - 1) * (two - one)
    matmul = torch_matmul_gflops(min(args.batch * args.seq_len, 2048), args.dim, args.vocab)
    return {
        "side": "original", "kind": kind, "framework": f"torch {torch.__version__}",
        "threads": torch.get_num_threads(), "ffn_hidden": ffn, "transformers_shim": shim,
        "original_fixes": fixes,
        "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 3),
        **timing_fields(times), "peak_rss_mb": round(rss, 1), "rss_after_imports_mb": round(rss_imports, 1),
        "gflop": round(gflop, 3), "achieved_gflops_per_s": round(gflop / min(times), 2),
        "matmul_gflops_per_s": round(matmul, 2), "cpu_mfu": round(gflop / min(times) / matmul, 4),
    }


# -- this package (JAX) ---------------------------------------------------------------------------

def ours_config(args: argparse.Namespace, ffn_hidden: int):
    """configs/shakespeare_baseline.py at the benchmark's shape: the step training runs."""
    from discreteflow_jax.config.presets import tokenflow_defaults

    c = tokenflow_defaults()
    c.model.vocab_size, c.model.dim = args.vocab, args.dim
    c.model.num_layers, c.model.num_heads = args.layers, args.heads
    c.model.ffn_hidden, c.model.max_len, c.data.seq_len = ffn_hidden, args.seq_len, args.seq_len
    c.train.batch_size, c.train.grad_accum = args.batch, 1
    return c


def run_ours(args: argparse.Namespace, kind: str, ffn_hidden: int) -> dict:
    import tempfile

    import jax

    sys.path.insert(0, HERE)
    from common import matmul_gflops
    from step_time import RandomTokens, unchunked_gflops

    from discreteflow_jax.config import parse_config
    from discreteflow_jax.models import sharding as shd

    rss_imports = peak_rss_mb()
    config = ours_config(args, ffn_hidden)
    cfg = parse_config(config)
    if kind == "step":
        from discreteflow_jax.tasks import build_task
        from discreteflow_jax.training.trainer import Trainer

        task = build_task(cfg)
        data = RandomTokens(cfg.model.vocab_size, cfg.data.seq_len)
        with tempfile.TemporaryDirectory() as workdir:
            trainer = Trainer(cfg, task, workdir, data, tokenizer=None)
            state = trainer.init_state()
            batch = shd.global_batch_from_local(data.train_batch(0, trainer.local_batch), trainer.mesh)
            compiled = trainer.train_step.lower(state, task.aux, batch, trainer.base_key).compile()
            state, metrics = compiled(state, task.aux, batch, trainer.base_key)  # warm-up
            jax.block_until_ready(metrics)
            times = []
            for i in range(args.steps):
                batch = shd.global_batch_from_local(data.train_batch(i + 1, trainer.local_batch), trainer.mesh)
                t0 = time.perf_counter()
                state, metrics = compiled(state, task.aux, batch, trainer.base_key)
                jax.block_until_ready(metrics)
                times.append(time.perf_counter() - t0)
            params_m = trainer.num_params / 1e6
            trainer.ckpt.close()
        rss = peak_rss_mb()
        # XLA counts a loop body once: the FLOPs of the chunked loss come from its loss_chunk=0 twin.
        gflop = unchunked_gflops(config) if cfg.model.loss_chunk else None
        if gflop is None:
            cost = compiled.cost_analysis()
            gflop = float((cost[0] if isinstance(cost, list) else cost).get("flops", 0.0)) / 1e9
    else:
        from common import random_init
        from sampling import bench_flow

        from discreteflow_jax.models.tokenflow import TokenFlow, TokenFlowConfig

        model_cfg = TokenFlowConfig(vocab_size=args.vocab, dim=args.dim, num_layers=args.layers,
                                    num_heads=args.heads, ffn_hidden=ffn_hidden, max_len=args.seq_len)
        graphdef, state, params = random_init(TokenFlow, model_cfg)
        cell = bench_flow(graphdef, state, args.sample_steps, args.batch, args.seq_len, args.sample_repeats,
                          "uniform")
        times, params_m, gflop = cell["all_runs_s"], params / 1e6, cell["gflop"]
        rss = peak_rss_mb()
    matmul = matmul_gflops(min(args.batch * args.seq_len, 2048), args.dim, args.vocab)
    return {
        "side": "ours" if ffn_hidden == 0 else "ours_same_arch", "kind": kind, "framework": f"jax {jax.__version__}",
        "ffn_hidden": cfg.model.ffn_width,
        "params_m": round(params_m, 3), **timing_fields(times), "peak_rss_mb": round(rss, 1),
        "rss_after_imports_mb": round(rss_imports, 1), "gflop": round(gflop, 3),
        "achieved_gflops_per_s": round(gflop / min(times), 2), "matmul_gflops_per_s": round(matmul, 2),
        "cpu_mfu": round(gflop / min(times) / matmul, 4),
    }


def run_worker(args: argparse.Namespace) -> dict:
    if args.worker == "original":
        return run_original(args, args.kind)
    return run_ours(args, args.kind, original_ffn(args.dim) if args.worker == "ours_same_arch" else 0)


# -- the driver -----------------------------------------------------------------------------------

def schedule(rounds: int, kinds: list[str], sides: list[str]) -> list[tuple[str, str]]:
    """(kind, side) runs in order: per round every kind, sides alternating, order reversed on odd rounds."""
    runs = []
    for r in range(rounds):
        order = sides if r % 2 == 0 else list(reversed(sides))
        runs += [(kind, side) for kind in kinds for side in order]
    return runs


def summarize(results: list[dict], kinds: list[str], sides: list[str]) -> dict:
    """Per kind: min and median over all rounds' timed runs per side, peak RSS (max over its
    processes) and ratios ours ÷ original."""
    out: dict[str, Any] = {}
    for kind in kinds:
        per_side: dict[str, dict] = {}
        for side in sides:
            runs = [r for r in results if r["kind"] == kind and r["side"] == side]
            if not runs:
                continue
            times = [t for r in runs for t in r["times_s"]]
            best, gflop = min(times), runs[0]["gflop"]
            matmul = statistics.median(r["matmul_gflops_per_s"] for r in runs)
            per_side[side] = {
                "min_s": round(best, 4), "median_s": round(statistics.median(times), 4),
                "peak_rss_mb": max(r["peak_rss_mb"] for r in runs), "gflop": gflop,
                "ffn_hidden": runs[0]["ffn_hidden"], "params_m": runs[0]["params_m"],
                "achieved_gflops_per_s": round(gflop / best, 2), "matmul_gflops_per_s": round(matmul, 2),
                "cpu_mfu": round(gflop / best / matmul, 4),
            }
        entry: dict[str, Any] = {"sides": per_side}
        base = per_side.get("original")
        if base:
            for side in ("ours_same_arch", "ours"):
                if side in per_side:
                    s = per_side[side]
                    entry[f"ratio_{side}"] = {
                        "time_min": round(s["min_s"] / base["min_s"], 3),
                        "time_median": round(s["median_s"] / base["median_s"], 3),
                        "peak_rss": round(s["peak_rss_mb"] / base["peak_rss_mb"], 3),
                        "flops": round(s["gflop"] / base["gflop"], 3) if base["gflop"] else None,
                    }
        out[kind] = entry
    return out


def original_revision(path: str) -> dict:
    """The checkout's git commit (None for an exported folder) and the sha256 of its model.py."""
    import hashlib

    with open(os.path.join(path, "model.py"), "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    try:
        commit = subprocess.run(["git", "-C", path, "rev-parse", "HEAD"], capture_output=True, text=True,
                                check=True).stdout.strip() or None
    except (OSError, subprocess.CalledProcessError):
        commit = None
    return {"commit": commit, "model_py_sha256": digest}


def worker_command(args: argparse.Namespace, kind: str, side: str) -> list[str]:
    return [sys.executable, os.path.abspath(__file__), f"--worker={side}", f"--kind={kind}",
            f"--original={args.original}", f"--dim={args.dim}", f"--layers={args.layers}", f"--heads={args.heads}",
            f"--batch={args.batch}", f"--seq_len={args.seq_len}", f"--vocab={args.vocab}", f"--steps={args.steps}",
            f"--sample_steps={args.sample_steps}", f"--sample_repeats={args.sample_repeats}"]


def run_driver(args: argparse.Namespace) -> dict:
    check_original(args.original)
    sys.path.insert(0, HERE)
    from common import cpu_info, emit_json

    kinds, sides = args.kinds, args.sides
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    results = []
    for kind, side in schedule(args.rounds, kinds, sides):
        print(f"[vs_original] {kind} {side} ...", file=sys.stderr, flush=True)
        proc = subprocess.run(worker_command(args, kind, side), capture_output=True, text=True, env=env, cwd=REPO)
        if proc.returncode != 0:
            sys.stderr.write(proc.stderr[-4000:])
            raise SystemExit(f"the {side} {kind} run failed (exit {proc.returncode}); its error is above")
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"[vs_original]   min {result['min_s']} s, median {result['median_s']} s, "
              f"peak RSS {result['peak_rss_mb']} MB", file=sys.stderr, flush=True)
        results.append(result)
    report = {
        "benchmark": "vs_original",
        "machine": {**cpu_info(), "platform": platform.platform(),
                    "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None},
        "original": {"path": os.path.abspath(args.original), **original_revision(args.original)},
        "shape": {"dim": args.dim, "layers": args.layers, "heads": args.heads, "batch": args.batch,
                  "seq_len": args.seq_len, "vocab": args.vocab, "dtype": "float32",
                  "original_ffn_hidden": original_ffn(args.dim), "sample_steps": args.sample_steps},
        "rounds": args.rounds,
        "summary": summarize(results, kinds, sides),
        "runs": results,
    }
    emit_json(report, args.out)
    return report


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--original", required=True, help="folder of a checkout of the original (branch gumbel)")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds (each side once per round)")
    parser.add_argument("--steps", type=int, default=10, help="timed train steps per process")
    parser.add_argument("--sample_steps", type=int, default=16, help="flow sampling steps K")
    parser.add_argument("--sample_repeats", type=int, default=2, help="timed samples per process")
    parser.add_argument("--kinds", default="step,sample", help="what to time: step, sample or both")
    parser.add_argument("--sides", default=",".join(SIDES), help=f"which of {', '.join(SIDES)}")
    for name, default in (("dim", 512), ("layers", 8), ("heads", 8), ("batch", 8), ("seq_len", 128),
                          ("vocab", 32000)):
        parser.add_argument(f"--{name}", type=int, default=default)
    parser.add_argument("--out", help="also write the JSON here")
    parser.add_argument("--worker", choices=SIDES, help=argparse.SUPPRESS)
    parser.add_argument("--kind", choices=KINDS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.kinds = [k for k in args.kinds.split(",") if k]
    args.sides = [s for s in args.sides.split(",") if s]
    bad = [k for k in args.kinds if k not in KINDS] + [s for s in args.sides if s not in SIDES]
    if bad or not args.kinds or not args.sides:
        parser.error(f"unknown or empty --kinds/--sides {bad}; kinds: {', '.join(KINDS)}; sides: {', '.join(SIDES)}")
    if min(args.rounds, args.steps, args.sample_steps, args.sample_repeats, args.dim, args.layers, args.heads,
           args.batch, args.seq_len, args.vocab) < 1:
        parser.error("every count and size must be >= 1")
    if args.dim % args.heads:
        parser.error(f"--dim={args.dim} must be divisible by --heads={args.heads}")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.worker:
        if args.kind is None:
            raise SystemExit("--worker needs --kind")
        result = run_worker(args)
        print(json.dumps(result), flush=True)
        return result
    return run_driver(args)


if __name__ == "__main__":
    main()
