"""Exports a trained workdir to a self-describing directory that ``discreteflow_jax.load`` reads
without the original config file or workdir (layout: ``discreteflow_jax.io.export_format``).

    python -m discreteflow_jax.export --workdir=runs/baseline --out=exports/baseline
"""

from __future__ import annotations

import logging
import sys

# ---------------------------------------------------------------------------------------------
# CLI


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description="Export a trained workdir to a self-describing directory.")
    parser.add_argument("--workdir", required=True,
                        help="training workdir (its newest checkpoint that loads is exported)")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest that loads)")
    parser.add_argument("--data_dir", default=None, help="data folder holding the tokenizer files to ship")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", force=True)
    logging.getLogger("absl").setLevel(logging.WARNING)
    from discreteflow_jax.inference.export import export_workdir
    from discreteflow_jax.training.experiment import USER_ERRORS

    try:
        out = export_workdir(args.workdir, args.out, args.data_dir, args.step)
    except (ValueError, OSError, *USER_ERRORS) as err:  # unreadable workdirs, unwritable --out: a message
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"exported {args.workdir} to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
