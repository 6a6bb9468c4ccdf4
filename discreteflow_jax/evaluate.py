"""Command line of the steps-vs-quality sweep (``discreteflow_jax.evaluation.sweep``).

    python -m discreteflow_jax.evaluate sweep \
        --models=baseline=runs/baseline,gumbel=runs/gumbel,teacher=runs/teacher \
        --scorer=runs/teacher --steps=1,2,4,8,16,32,128 --num_samples=64 --seed=0 --out=runs/sweep

writes ``sweep.md`` (tables), ``sweep.csv`` (one row per model and K), ``sweep.json``, ``sweep.png``
(Gen-PPL and entropy against K) and every sample as text under ``samples/`` into ``--out``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from discreteflow_jax.evaluation.sweep import DEFAULT_STEPS
from discreteflow_jax.flow import TIME_GRIDS

# ---------------------------------------------------------------------------------------------
# CLI


def _csv_ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from e


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m discreteflow_jax.evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sw = sub.add_parser("sweep", help="steps-vs-quality sweep: every model at every K, table + CSV + plot")
    sw.add_argument("--models", required=True, help="name=WORKDIR,... flow models and teachers (workdirs or exports)")
    sw.add_argument("--scorer", required=True, help="teacher workdir/export, Hugging Face directory, or Hub id (gpt2)")
    sw.add_argument("--scorer_tokenizer", default=None, choices=["llama", "gpt2"],
                    help="tokenizer of a Hugging Face scorer (default: by architecture)")
    sw.add_argument("--steps", type=_csv_ints, default=DEFAULT_STEPS, help="comma-separated K values")
    sw.add_argument("--num_samples", type=int, default=64)
    sw.add_argument("--seed", type=int, default=0)
    sw.add_argument("--batch_size", type=int, default=64, help="samples per sampler call")
    sw.add_argument("--schedule", default="uniform", choices=list(TIME_GRIDS), help="flow time grid")
    sw.add_argument("--schedule_param", type=float, default=2.0, help="exponent of the power grid")
    sw.add_argument("--temperature", type=float, default=1.0, help="flow sampler temperature")
    sw.add_argument("--teacher_temperature", type=float, default=1.0, help="autoregressive sampling temperature")
    sw.add_argument("--ngram", type=int, default=4, help="n of the repeated-n-gram rate")
    sw.add_argument("--length", type=int, default=0, help="tokens per sample (0: the shortest model's)")
    sw.add_argument("--scorer_batch_size", type=int, default=32)
    sw.add_argument("--data_dir", default=None, help="offline data folder (tokenizers, validation text)")
    sw.add_argument("--out", required=True, help="output folder for sweep.md/.csv/.json/.png and samples/")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", force=True)
    logging.getLogger("absl").setLevel(logging.WARNING)
    from discreteflow_jax.evaluation.sweep import SweepSettings, markdown_tables, parse_models, run_sweep
    from discreteflow_jax.inference.load import LoadError
    from discreteflow_jax.training.experiment import USER_ERRORS

    settings = SweepSettings(
        steps=args.steps, num_samples=args.num_samples, seed=args.seed, batch_size=args.batch_size,
        schedule=args.schedule, schedule_param=args.schedule_param, temperature=args.temperature,
        teacher_temperature=args.teacher_temperature, ngram=args.ngram, length=args.length,
    )
    try:
        models = parse_models(args.models)
        report = run_sweep(models, args.scorer, settings, args.out, args.data_dir, args.scorer_tokenizer,
                           args.scorer_batch_size)
    except (ValueError, LoadError, *USER_ERRORS) as err:  # readable messages for input errors
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(markdown_tables(report))
    print(f"wrote {os.path.join(args.out, 'sweep.md')}, sweep.csv, sweep.json, sweep.png and samples/")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
