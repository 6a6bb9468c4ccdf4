"""Sample text from a trained model: a TokenFlow baseline, a Gumbel TokenFlow or an autoregressive
teacher, given as a training workdir (its newest checkpoint) or an export directory.

    python -m discreteflow_jax.sample --workdir=runs/baseline --num_samples=8 --steps=32
    python -m discreteflow_jax.sample --workdir=runs/baseline --num_samples=4 --steps=32 --prompt="ROMEO:"
    python -m discreteflow_jax.sample --workdir=runs/baseline --num_samples=4 --steps=32 \
        --template="To be, or ____ to be"
    python -m discreteflow_jax.sample --workdir=runs/teacher --num_samples=4   # --steps does not apply

Samples are printed and written to one text file, ``<workdir>/samples/sample_K<K>_seed<S>.txt`` by
default (``--out`` to choose). Batch i of the samples uses the seed ``inference.batches.batch_seed(seed, i)``,
the same as ``python -m discreteflow_jax.evaluate sweep``, so the sweep's samples for one K are
reproduced by ``--num_samples``, ``--steps``, ``--seed`` and ``--batch_size`` of that sweep.
Every argument is checked before anything compiles.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import sys

from discreteflow_jax.flow import TIME_GRIDS


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m discreteflow_jax.sample", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True, help="training workdir or export directory")
    p.add_argument("--num_samples", type=int, default=4)
    p.add_argument("--steps", type=int, default=None, help="flow steps K (default: the training config's)")
    p.add_argument("--batch_size", type=int, default=64, help="samples per sampler call")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--temperature", type=float, default=None,
                   help="flow: divides the logits inside the sampler; teacher: sampling temperature (default 1)")
    p.add_argument("--schedule", default=None, choices=list(TIME_GRIDS), help="flow time grid (default: config's)")
    p.add_argument("--schedule_param", type=float, default=None, help="exponent of the power time grid")
    p.add_argument("--prompt", default=None, help="text the samples start with")
    p.add_argument("--template", default=None, help="text with blanks (___) to fill in (flow models only)")
    p.add_argument("--blank_length", type=int, default=None, help="tokens per blank of --template")
    p.add_argument("--condition", default="clamp", choices=["clamp", "path"],
                   help="how a flow model holds known tokens (see discreteflow_jax.inference.api)")
    p.add_argument("--length", type=int, default=0, help="tokens per sample (0: the training context)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step of a workdir (default: the newest)")
    p.add_argument("--data_dir", default=None, help="offline data folder holding the tokenizer files")
    p.add_argument("--out", default=None,
                   help="text file to write (default: <workdir>/samples/sample_K<K>_seed<S>.txt)")
    p.add_argument("--quiet", action="store_true", help="do not print the samples")
    return p


def check_args(args: argparse.Namespace) -> None:
    """Errors a person can fix, raised before any checkpoint is read."""
    if not os.path.isdir(os.path.expanduser(args.workdir)):
        raise ValueError(f"--workdir={args.workdir} is not a directory (a training workdir or an export)")
    for name in ("num_samples", "batch_size"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.steps is not None and args.steps < 1:
        raise ValueError(f"--steps must be >= 1, got {args.steps}")
    if args.temperature is not None and args.temperature <= 0:
        raise ValueError(f"--temperature must be > 0, got {args.temperature}")
    if args.prompt is not None and args.template is not None:
        raise ValueError("give --prompt or --template, not both")
    if args.blank_length is not None and args.template is None:
        raise ValueError("--blank_length only applies to --template")
    if args.length < 0:
        raise ValueError(f"--length must be >= 0, got {args.length}")


def default_out(args: argparse.Namespace, steps: int | None) -> str:
    tag = f"K{steps}" if steps is not None else "ar"
    name = f"sample_{tag}_seed{args.seed}"
    cond = args.prompt if args.prompt is not None else args.template
    if cond is not None:  # different prompts must not overwrite each other's file
        name += "_" + hashlib.sha1(cond.encode()).hexdigest()[:8]
    return os.path.join(os.path.expanduser(args.workdir), "samples", name + ".txt")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", force=True)
    logging.getLogger("absl").setLevel(logging.WARNING)
    from discreteflow_jax.inference.batches import sample_texts
    from discreteflow_jax.inference.load import load
    from discreteflow_jax.training.experiment import USER_ERRORS

    try:
        check_args(args)
        model = load(args.workdir, args.data_dir, step=args.step)
        kwargs = {"prompt": args.prompt, "template": args.template, "schedule": args.schedule,
                  "schedule_param": args.schedule_param, "condition": args.condition}
        if args.blank_length is not None:
            kwargs["blank_length"] = args.blank_length
        if args.temperature is not None:
            kwargs["temperature"] = args.temperature
        texts, steps = sample_texts(model, args.num_samples, args.steps, args.seed, batch_size=args.batch_size,
                                    length=args.length, **kwargs)
    except (ValueError, *USER_ERRORS) as err:  # bad arguments and unreadable workdirs: a message, no traceback
        print(f"error: {err}", file=sys.stderr)
        return 2
    k_text = f"K={steps}" if steps is not None else "autoregressive"
    blocks = [f"=== sample {j} ({k_text}, seed {args.seed}) ===\n{text}\n" for j, text in enumerate(texts)]
    out = args.out or default_out(args, steps)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        f.write("\n".join(blocks))
    if not args.quiet:
        print("\n".join(blocks))
    print(f"wrote {len(texts)} samples to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
