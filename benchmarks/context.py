"""Synthetic context benchmark: how much of the exact Bayes context gain each training recipe
recovers (see ``discreteflow_jax.evaluation.context_study`` for the numbers and ``synthetic`` for the tasks).

    python benchmarks/context.py --tasks=runs --recipes=original,token_time --steps=600 [--out=FILE]

Prints a progress line per 100 steps on stderr and the JSON report on stdout (and in ``--out``,
rewritten after every recipe so a long run can be read while it goes). Every recipe sees the same
data, the same initial weights and the same number of steps; seconds per step are reported so
that equal-step comparisons can be turned into equal-time ones.
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import emit_json  # noqa: E402

from discreteflow_jax.data import synthetic as syn  # noqa: E402
from discreteflow_jax.evaluation import context_study as cs  # noqa: E402


def markdown_table(paths: list[str]) -> str:
    """One row per task/recipe: per t, model CE and the share of the Bayes context gain recovered."""
    import json

    runs: dict = {}
    for path in paths:
        with open(path) as f:
            runs.update(json.load(f)["runs"])
    times = sorted({t for run in runs.values() for t in run if isinstance(run[t], dict) and "recovered" in run[t]},
                   key=float)
    head = "| task/recipe | s/step | " + " | ".join(f"t={t}: CE (share)" for t in times)
    lines = [head + " | Bayes CE per position → with context, at the t where context is worth most |",
             "|" + "---|" * (3 + len(times))]
    for name, run in runs.items():
        cells = [f"{run[t]['model_ce']:.2f} ({run[t]['recovered']:+.2f})" if t in run else "" for t in times]
        measured = [t for t in times if t in run]
        best = max(measured, key=lambda t: run[t]["bayes_position_ce"] - run[t]["bayes_context_ce"])
        bayes = f"t={best}: {run[best]['bayes_position_ce']:.2f} → {run[best]['bayes_context_ce']:.2f}"
        lines.append(f"| {name} | {run['sec_per_step']:.2f} | " + " | ".join(cells) + f" | {bayes} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", default="runs", help=f"comma-separated, from {', '.join(syn.TASKS)}")
    parser.add_argument("--recipes", default=",".join(cs.RECIPES),
                        help=f"comma-separated, from {', '.join(cs.RECIPES)}")
    parser.add_argument("--steps", type=int, default=cs.StudySettings.steps)
    parser.add_argument("--vocab_size", type=int, default=cs.StudySettings.vocab_size)
    parser.add_argument("--dim", type=int, default=cs.StudySettings.dim)
    parser.add_argument("--times", default="0.1,0.15,0.2,0.3", help="flow times at which to measure")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="also write the JSON report here")
    parser.add_argument("--render", nargs="+", default=None, metavar="REPORT",
                        help="print a markdown table of earlier JSON reports instead of training")
    args = parser.parse_args()
    if args.render:
        print(markdown_table(args.render))
        return
    for name in args.recipes.split(","):
        if name not in cs.RECIPES:
            parser.error(f"unknown recipe {name!r}; valid: {', '.join(cs.RECIPES)}")
    settings = dataclasses.replace(
        cs.StudySettings(), steps=args.steps, vocab_size=args.vocab_size, dim=args.dim, seed=args.seed
    )
    times = tuple(float(x) for x in args.times.split(","))
    report = {"settings": dataclasses.asdict(settings), "cpu": platform.processor() or platform.machine(), "runs": {}}
    for task_name in args.tasks.split(","):
        task = syn.make_task(task_name, settings.vocab_size, settings.repeat_prob, seed=settings.seed)
        for recipe in args.recipes.split(","):
            def progress(step: int, loss: float, tag: str = f"{task_name}/{recipe}") -> None:
                print(f"[{tag}] step {step}/{settings.steps} loss {loss:.3f}", file=sys.stderr, flush=True)

            model, per_step = cs.train(task, settings, cs.RECIPES[recipe], progress)
            result = cs.measure(model, task, times, seq_len=settings.seq_len)
            report["runs"][f"{task_name}/{recipe}"] = {"recipe": cs.RECIPES[recipe], "sec_per_step": per_step, **result}
            best = max(result.values(), key=lambda r: r["recovered"])
            print(f"[{task_name}/{recipe}] best recovered {best['recovered']:.3f}", file=sys.stderr, flush=True)
            if args.out:
                emit_json(report, args.out)
    emit_json(report, args.out)


if __name__ == "__main__":
    main()
