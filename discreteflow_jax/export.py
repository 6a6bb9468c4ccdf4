"""Exports a trained workdir (its newest checkpoint that loads, or --step) to a self-describing
directory that ``discreteflow_jax.load`` reads without the original config file or workdir:
``config.json``, ``model.safetensors`` and the tokenizer files (``discreteflow_jax.io.export_format``).
A LLaMA teacher's export is also a Hugging Face directory.

    python -m discreteflow_jax.export --workdir=runs/baseline --out=exports/baseline
"""

from __future__ import annotations

from absl import flags

from discreteflow_jax import cli

FLAGS = cli.new_flags(__doc__)
flags.DEFINE_string("workdir", None, "training workdir (its newest checkpoint that loads is exported)",
                    flag_values=FLAGS)
flags.DEFINE_string("out", None, "output directory", flag_values=FLAGS)
flags.DEFINE_integer("step", None, "checkpoint step (default: the newest that loads)", flag_values=FLAGS)
flags.DEFINE_string("data_dir", None, "data folder holding the tokenizer files to ship", flag_values=FLAGS)
flags.mark_flags_as_required(["workdir", "out"], flag_values=FLAGS)


def main(argv: list[str]) -> int:
    """Loads the workdir's model and writes the export."""
    if (error := cli.positional_error(argv)) is not None:
        return error
    cli.setup_logging()
    from discreteflow_jax.inference.export import export_workdir
    from discreteflow_jax.training.experiment import USER_ERRORS

    try:
        out = export_workdir(FLAGS.workdir, FLAGS.out, FLAGS.data_dir, FLAGS.step)
    except (ValueError, OSError, *USER_ERRORS) as err:  # unreadable workdirs, unwritable --out: a message
        return cli.fail(err)
    print(f"exported {FLAGS.workdir} to {out}")
    return 0


run = cli.in_process(main, FLAGS, "discreteflow_jax.export")


if __name__ == "__main__":
    cli.run(main, FLAGS)
