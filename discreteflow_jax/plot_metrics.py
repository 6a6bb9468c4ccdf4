"""Plots a run's validation loss per flow-time bucket from its ``metrics.jsonl``.

    python -m discreteflow_jax.plot_metrics --workdir=DIR [--out=FILE.png] [--reference=6.30]

The mean flow loss hides where the network learns (docs/math.md#reading-the-loss): one line per
t-bucket shows it.
``--reference`` draws a horizontal line, e.g. the unigram entropy of the training tokens. When
the run logged the context gain (TokenFlow baselines do), a second panel shows it per t-bucket:
how much the network's predictions use the surrounding text.
"""

from __future__ import annotations

import os

from absl import flags

from discreteflow_jax import cli
from discreteflow_jax.evaluation.curves import bucket_curves, plot

FLAGS = cli.new_flags(__doc__)
flags.DEFINE_string("workdir", None, "run folder holding metrics.jsonl", flag_values=FLAGS)
flags.DEFINE_string("out", None, "PNG path (default: WORKDIR/val_loss_by_t.png)", flag_values=FLAGS)
flags.DEFINE_float("reference", None, "draw a horizontal reference line (nats)", flag_values=FLAGS)
flags.mark_flag_as_required("workdir", flag_values=FLAGS)


def main(argv: list[str]) -> int:
    """Reads the curves and writes the plot; prints its path."""
    if (error := cli.positional_error(argv)) is not None:
        return error

    try:
        curves = bucket_curves(os.path.join(FLAGS.workdir, "metrics.jsonl"))
    except FileNotFoundError as err:
        return cli.fail(err)
    if not curves:
        return cli.fail(f"no validation metrics in {FLAGS.workdir}/metrics.jsonl yet")
    print(plot(curves, FLAGS.out or os.path.join(FLAGS.workdir, "val_loss_by_t.png"), FLAGS.reference))
    return 0


run = cli.in_process(main, FLAGS, "discreteflow_jax.plot_metrics")


if __name__ == "__main__":
    cli.run(main, FLAGS)
