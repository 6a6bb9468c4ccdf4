"""Command-line entry point.

    python -m discreteflow_jax.main --config=configs/shakespeare_baseline.py[:cpu|:smoke] \
        --workdir=DIR [--config.causal=True] [--config.train.num_steps=...] [--data_dir=DIR] [--resume_step=N]

Trains (or resumes from the newest checkpoint in --workdir that loads, or from --resume_step),
evaluates the validation loss per t-bucket, prints and saves samples, and writes checkpoints and
metrics. Any config field can be overridden with --config.<section>.<field>=value; run with
--helpfull to list all flags.
"""

from __future__ import annotations

import logging
import sys

import jax
from absl import app, flags
from ml_collections import config_flags

from discreteflow_jax.training import experiment

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file, e.g. configs/shakespeare_baseline.py or configs/…py:cpu", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Folder for checkpoints, metrics, samples; reused to resume.")
_DATA_DIR = flags.DEFINE_string(
    "data_dir", None, "Offline data folder (overrides config.data.data_dir and $DISCRETEFLOW_DATA_DIR)."
)
_RESUME_STEP = flags.DEFINE_integer(
    "resume_step", None,
    "Resume from this checkpoint step instead of the newest that loads; newer checkpoints are moved to "
    "<workdir>/checkpoints_skipped/ (kept). Drop the flag on later reruns.",
)
_DISTRIBUTED = flags.DEFINE_enum(
    "distributed", "auto", ["auto", "on", "off"],
    "Multi-process runtime: auto (start it when the flags/env below or an srun/multi-host TPU say so), "
    "on (always; JAX detects Cloud TPU VMs, SLURM, MPI), off.",
)
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0 for a multi-process run (or $JAX_COORDINATOR_ADDRESS)."
)
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes (or $JAX_NUM_PROCESSES).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index, 0-based (or $JAX_PROCESS_ID).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", force=True)
    logging.getLogger("absl").setLevel(logging.WARNING)
    try:
        experiment.maybe_initialize_distributed(
            _DISTRIBUTED.value, _COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value
        )
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    if jax.process_index() > 0:  # one process speaks for the run; the others only report problems
        logging.getLogger().setLevel(logging.WARNING)
    logging.getLogger("discreteflow_jax").info(
        "process %d/%d, %d local / %d global devices (%s)",
        jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count(), jax.default_backend(),
    )
    try:
        result = experiment.run(_CONFIG.value, _WORKDIR.value, data_dir=_DATA_DIR.value, resume_step=_RESUME_STEP.value)
    except experiment.USER_ERRORS as err:  # a readable message, not a traceback
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    if result.get("preempted") and jax.process_index() == 0:
        # Exit code 0: the run stopped cleanly; schedulers that requeue on exit restart the same command.
        print(
            f"preempted: checkpoint saved at step {result['step']} in {_WORKDIR.value}; "
            "rerun the same command to resume",
            flush=True,
        )


def cli() -> None:
    app.run(main)


if __name__ == "__main__":
    cli()
