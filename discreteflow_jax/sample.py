r"""Sample text from a trained model: a TokenFlow baseline, a Gumbel TokenFlow or an autoregressive
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
Every flag is checked before anything compiles.
"""

from __future__ import annotations

import hashlib
import os

from absl import flags

from discreteflow_jax import cli
from discreteflow_jax.conditioning import CONDITION_MODES
from discreteflow_jax.flow import TIME_GRIDS
from discreteflow_jax.inference.batches import sample_texts
from discreteflow_jax.inference.load import load
from discreteflow_jax.training.experiment import USER_ERRORS

FLAGS = cli.new_flags(__doc__)
flags.DEFINE_string("workdir", None, "training workdir or export directory", flag_values=FLAGS)
flags.DEFINE_integer("num_samples", 4, "number of samples", flag_values=FLAGS)
flags.DEFINE_integer("steps", None, "flow steps K (default: the training config's)", flag_values=FLAGS)
flags.DEFINE_integer("batch_size", 64, "samples per sampler call", flag_values=FLAGS)
flags.DEFINE_integer("seed", 0, "sampling seed", flag_values=FLAGS)
flags.DEFINE_float("temperature", None,
                   "flow: divides the logits inside the sampler; teacher: sampling temperature (default 1)",
                   flag_values=FLAGS)
flags.DEFINE_enum("schedule", None, list(TIME_GRIDS), "flow time grid (default: the config's)", flag_values=FLAGS)
flags.DEFINE_float("schedule_param", None, "exponent of the power time grid", flag_values=FLAGS)
flags.DEFINE_float("stagger", None, "flow: > 0 denoises left positions first (flow.staggered_times; "
                   "default: the config's)", flag_values=FLAGS)
flags.DEFINE_integer("polish_steps", 0, "logit-channel Gumbel students: Jacobi calls after the flow steps "
                     "(gumbel_sampling.polish)", flag_values=FLAGS)
flags.DEFINE_string("prompt", None, "text the samples start with", flag_values=FLAGS)
flags.DEFINE_string("template", None, "text with blanks (___) to fill in (flow models only)", flag_values=FLAGS)
flags.DEFINE_integer("blank_length", None, "tokens per blank of --template", flag_values=FLAGS)
flags.DEFINE_enum("condition", "clamp", list(CONDITION_MODES),
                  "how a flow model holds known tokens (see discreteflow_jax.conditioning)", flag_values=FLAGS)
flags.DEFINE_integer("length", 0, "tokens per sample (0: the training context)", flag_values=FLAGS)
flags.DEFINE_integer("step", None, "checkpoint step of a workdir (default: the newest that loads)", flag_values=FLAGS)
flags.DEFINE_string("data_dir", None, "offline data folder holding the tokenizer files", flag_values=FLAGS)
flags.DEFINE_string("out", None, "text file to write (default: <workdir>/samples/sample_K<K>_seed<S>.txt)",
                    flag_values=FLAGS)
flags.DEFINE_boolean("quiet", False, "do not print the samples", flag_values=FLAGS)
flags.mark_flag_as_required("workdir", flag_values=FLAGS)


def check_args(args: flags.FlagValues) -> None:
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
    if args.stagger is not None and not 0 <= args.stagger < float("inf"):
        raise ValueError(f"--stagger must be a finite number >= 0, got {args.stagger}")
    if args.prompt is not None and args.template is not None:
        raise ValueError("give --prompt or --template, not both")
    if args.blank_length is not None and args.template is None:
        raise ValueError("--blank_length only applies to --template")
    if args.length < 0:
        raise ValueError(f"--length must be >= 0, got {args.length}")


def default_out(args: flags.FlagValues, steps: int | None) -> str:
    """The file the samples go to without --out: one per K, seed and prompt/template."""
    tag = f"K{steps}" if steps is not None else "ar"
    name = f"sample_{tag}_seed{args.seed}"
    cond = args.prompt if args.prompt is not None else args.template
    if cond is not None:  # different prompts must not overwrite each other's file
        name += "_" + hashlib.sha1(cond.encode()).hexdigest()[:8]
    return os.path.join(os.path.expanduser(args.workdir), "samples", name + ".txt")


def main(argv: list[str]) -> int:
    """Loads the model, draws the samples, prints them and writes them to one file."""
    if (error := cli.positional_error(argv)) is not None:
        return error
    cli.setup_logging()

    args = FLAGS
    try:
        check_args(args)
        model = load(args.workdir, args.data_dir, step=args.step)
        kwargs = {"prompt": args.prompt, "template": args.template, "schedule": args.schedule,
                  "schedule_param": args.schedule_param, "condition": args.condition}
        if args.blank_length is not None:
            kwargs["blank_length"] = args.blank_length
        if args.temperature is not None:
            kwargs["temperature"] = args.temperature
        if args.stagger is not None:
            kwargs["stagger"] = args.stagger
        if args.polish_steps:
            kwargs["polish_steps"] = args.polish_steps
        texts, steps = sample_texts(model, args.num_samples, args.steps, args.seed, batch_size=args.batch_size,
                                    length=args.length, **kwargs)
    except (ValueError, *USER_ERRORS) as err:  # bad flags and unreadable workdirs: a message, no traceback
        return cli.fail(err)
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


run = cli.in_process(main, FLAGS, "discreteflow_jax.sample")


if __name__ == "__main__":
    cli.run(main, FLAGS)
