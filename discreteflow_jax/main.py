r"""Trains a model: a TokenFlow baseline, a LLaMA teacher or a Gumbel TokenFlow, as the config says.

    python -m discreteflow_jax.main --config=configs/shakespeare_baseline.py[:cpu|:smoke] \
        --workdir=DIR [--config.causal=True] [--config.train.num_steps=...] [--data_dir=DIR] [--resume_step=N]

Trains (or resumes from the newest checkpoint in --workdir that loads, or from --resume_step),
evaluates the validation loss per t-bucket, prints and saves samples, and writes checkpoints and
metrics. Any config field can be overridden with --config.<section>.<field>=value (the fields are
those of the config file). A preempted run (SIGTERM) saves a checkpoint and exits 0; rerunning the
same command resumes it.
"""

from __future__ import annotations

import logging

from absl import flags
from ml_collections import config_flags

from discreteflow_jax import cli

FLAGS = cli.new_flags(__doc__)
config_flags.DEFINE_config_file(
    "config", None, "Experiment config file, e.g. configs/shakespeare_baseline.py or configs/…py:cpu",
    flag_values=FLAGS, lock_config=True,
)
flags.DEFINE_string("workdir", None, "Folder for checkpoints, metrics, samples; reused to resume.", flag_values=FLAGS)
flags.DEFINE_string(
    "data_dir", None, "Offline data folder (overrides config.data.data_dir and $DISCRETEFLOW_DATA_DIR).",
    flag_values=FLAGS,
)
flags.DEFINE_integer(
    "resume_step", None,
    "Resume from this checkpoint step instead of the newest that loads; newer checkpoints are moved to "
    "<workdir>/checkpoints_skipped/ (kept). Drop the flag on later reruns.", flag_values=FLAGS,
)
flags.DEFINE_enum(
    "distributed", "auto", ["auto", "on", "off"],
    "Multi-process runtime: auto (start it when the flags/env below or an srun/multi-host TPU say so), "
    "on (always; JAX detects Cloud TPU VMs, SLURM, MPI), off.", flag_values=FLAGS,
)
flags.DEFINE_string("coordinator_address", None,
                    "host:port of process 0 for a multi-process run (or $JAX_COORDINATOR_ADDRESS).", flag_values=FLAGS)
flags.DEFINE_integer("num_processes", None, "Number of processes (or $JAX_NUM_PROCESSES).", flag_values=FLAGS)
flags.DEFINE_integer("process_id", None, "This process's index, 0-based (or $JAX_PROCESS_ID).", flag_values=FLAGS)
flags.mark_flags_as_required(["config", "workdir"], flag_values=FLAGS)


def main(argv: list[str]) -> int:
    """Starts the multi-process runtime when asked, then runs the experiment."""
    if (error := cli.positional_error(argv)) is not None:
        return error
    cli.setup_logging()
    import jax

    from discreteflow_jax.training import distributed, experiment

    try:
        distributed.initialize(FLAGS.distributed, FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    except ValueError as err:
        return cli.fail(err)
    if jax.process_index() > 0:  # one process speaks for the run; the others only report problems
        logging.getLogger().setLevel(logging.WARNING)
    logging.getLogger("discreteflow_jax").info(
        "process %d/%d, %d local / %d global devices (%s)",
        jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count(), jax.default_backend(),
    )
    try:
        result = experiment.run(FLAGS.config, FLAGS.workdir, data_dir=FLAGS.data_dir, resume_step=FLAGS.resume_step)
    except experiment.USER_ERRORS as err:  # a readable message, not a traceback
        return cli.fail(err)
    if result.get("preempted") and jax.process_index() == 0:
        # Exit code 0: the run stopped cleanly; schedulers that requeue on exit restart the same command.
        print(f"preempted: checkpoint saved at step {result['step']} in {FLAGS.workdir}; "
              "rerun the same command to resume", flush=True)
    return 0


run = cli.in_process(main, FLAGS, "discreteflow_jax.main")


if __name__ == "__main__":
    cli.run(main, FLAGS)
