r"""Compiles an experiment for a TPU slice without a TPU: per-device memory, FLOPs and a cost plan.

    python -m discreteflow_jax.compile_check --config=configs/fineweb_gumbel.py --topology=v5e:2x4 \
        [--config.train.grad_accum=8] [--num_slices=1] [--json=PATH] [--mfu=0.4] [--skip_sampler] [--skip_eval]
        [--skip_train]

Builds the mesh from the devices of a TPU topology (``--topology=v5e:2x4`` or an accelerator type
such as ``v5litepod-8``; needs libtpu: ``pip install -e .[tpu-compile]``, no TPU), lowers the
experiment's train step, eval step and sampler from shapes with the config's shardings, compiles
them with the TPU compiler and prints per device: arguments, outputs, temporaries and their total
against the chip's HBM, the matmul FLOPs per step, the step time at an assumed MFU and the run's
chip-hours. Exit status 0: every program fits; 1: a program does not fit or does not compile (the
message names what to change); 2: a bad flag or config (one line, before anything compiles).
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys

from absl import flags
from ml_collections import config_flags

from discreteflow_jax import cli
from discreteflow_jax.config import parse_config
from discreteflow_jax.training import chips

NOT_FIT = 1  # exit status: a program does not fit the HBM or does not compile

FLAGS = cli.new_flags(__doc__)
config_flags.DEFINE_config_file(
    "config", None, "Experiment config file, e.g. configs/fineweb_gumbel.py (overrides as for main).",
    flag_values=FLAGS, lock_config=True,
)
flags.DEFINE_string("topology", None, "TPU slice: v5e:2x4, v4:2x2x1, v5p:2x2x1, v6e:2x4, v5e:4x8, or an "
                    "accelerator type such as v5litepod-8, v4-8.", flag_values=FLAGS)
flags.DEFINE_integer("num_slices", 1, "Number of such slices (multi-slice data parallelism).", flag_values=FLAGS)
flags.DEFINE_string("json", None, "Also write the report as JSON to this file.", flag_values=FLAGS)
flags.DEFINE_float("mfu", 0.4, "Assumed model FLOPs utilization for the step-time estimate (a planning "
                   "assumption, not a measurement).", flag_values=FLAGS)
flags.DEFINE_bool("skip_sampler", False, "Do not compile the sampler.", flag_values=FLAGS)
flags.DEFINE_bool("skip_eval", False, "Do not compile the eval step.", flag_values=FLAGS)
flags.DEFINE_bool("skip_train", False, "Do not compile the train step (no step-time estimate then).",
                  flag_values=FLAGS)
flags.DEFINE_string("teacher_config", None, "Gumbel configs with a LLaMA teacher: that teacher's experiment "
                    "config (default configs/shakespeare_teacher.py when present).", flag_values=FLAGS)
flags.mark_flags_as_required(["config", "topology"], flag_values=FLAGS)

DEFAULT_TEACHER_CONFIG = "configs/shakespeare_teacher.py"


def _teacher_model_config(path: str | None):
    """The model section of a teacher's experiment config file, or None."""
    if path is None:
        if not os.path.exists(DEFAULT_TEACHER_CONFIG):
            return None
        path = DEFAULT_TEACHER_CONFIG
    spec = importlib.util.spec_from_file_location("teacher_config", path)
    if spec is None or spec.loader is None:
        raise ValueError(f"--teacher_config={path}: not a Python config file")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return parse_config(module.get_config(None)).model


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f}"


def print_report(report) -> None:
    hbm = report.hbm_gib * 2**30
    mesh = " ".join(f"{k}={v}" for k, v in report.mesh.items())
    print(f"{report.config} on {report.topology} ({report.accelerator_type} x{report.num_slices}: {report.devices} "
          f"devices, mesh {mesh}), {report.hbm_gib:g} GiB HBM and {report.peak_bf16_tflops:g} TFLOP/s bf16 per chip; "
          f"{report.num_params / 1e6:.1f}M parameters, {report.batch_per_device:g} sequences per device "
          "and micro-batch")
    print(f"{'program':<14}{'arguments':>10}{'outputs':>9}{'aliased':>9}{'temps':>9}{'total':>9}{'of HBM':>8}"
          f"{'GFLOP/device':>14}  (GiB per device)")
    for p in report.programs:
        if p.compiled is None:
            verdict = "does not fit" if "RESOURCE_EXHAUSTED" in (p.error or "") else "does not compile"
            print(f"{p.name:<14} {verdict}: {p.error}")
            continue
        gflop = p.flops / report.devices / 1e9
        flops = (f"{gflop:,.0f}" if gflop >= 100 else f"{gflop:.3g}") + ("" if p.flops_exact else "+")
        print(f"{p.name:<14}{_gib(p.argument_bytes):>10}{_gib(p.output_bytes):>9}{_gib(p.alias_bytes):>9}"
              f"{_gib(p.temp_bytes):>9}{_gib(p.total_bytes):>9}{p.total_bytes / hbm:>8.0%}{flops:>14}"
              + ("" if p.fits else "  DOES NOT FIT"))
    if report.step_seconds is not None:
        hours = report.step_seconds * report.num_steps / 3600
        print(f"estimate: {report.step_seconds:.3f} s per train step at MFU {report.mfu:g} (matmul FLOPs from the "
              f"jaxpr / bf16 peak); {report.num_steps} steps = {hours:.1f} h x {report.devices} chips = "
              f"{report.chip_hours:.1f} chip-hours")


def main(argv: list[str]) -> int:
    if (error := cli.positional_error(argv)) is not None:
        return error
    # Before JAX starts (this module imports none of it): no TPU metadata server is asked for (there is
    # none off a TPU VM), and the host's own backend is the CPU, so a TPU VM's chips stay free.
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    from discreteflow_jax.training import aot
    from discreteflow_jax.training.experiment import USER_ERRORS

    if not 0 < FLAGS.mfu <= 1:
        return cli.fail(f"--mfu={FLAGS.mfu} must be in (0, 1]")
    if FLAGS.skip_train and FLAGS.skip_eval and FLAGS.skip_sampler:
        return cli.fail("--skip_train, --skip_eval and --skip_sampler leave nothing to compile; drop one of them")
    try:
        slice_ = chips.parse_slice(FLAGS.topology)
        cfg = parse_config(FLAGS.config)
        teacher = _teacher_model_config(FLAGS.teacher_config) if cfg.task == "gumbel" else None
    except (ValueError, *USER_ERRORS) as err:
        return cli.fail(err)
    try:  # first of all: the topology's devices (nothing is built on the host's backend before them)
        devices = aot.topology_devices(slice_, FLAGS.num_slices)
    except (ImportError, RuntimeError, ValueError) as err:
        missing = importlib.util.find_spec("libtpu") is None
        return cli.fail(f"cannot describe TPU topology {slice_.topology}: " + (
            "the TPU compiler comes with libtpu: pip install -e '.[tpu-compile]'" if missing else str(err)))
    name = os.path.basename(FLAGS["config"].config_filename or "config")
    try:
        report = aot.check(
            cfg, name, slice_, devices, num_slices=FLAGS.num_slices, teacher_config=teacher, mfu=FLAGS.mfu,
            eval_step=not FLAGS.skip_eval, sampler=not FLAGS.skip_sampler, train_step=not FLAGS.skip_train,
            on_program=lambda p: print(f"compiled {p.name}: " + ("fits" if p.fits else "DOES NOT FIT")
                                       + (f" ({p.seconds['trace_and_lower']:.0f} s tracing, "
                                          f"{p.seconds['compile']:.0f} s compiling)" if p.seconds else ""),
                                       file=sys.stderr, flush=True),
        )
    except (ValueError, *USER_ERRORS) as err:  # config, sharding and teacher errors: before any compile
        return cli.fail(err)
    print_report(report)
    if FLAGS.json:
        with open(FLAGS.json, "w") as f:
            json.dump(report.as_json(), f, indent=1)
    if report.fits:
        return 0
    failed = ", ".join(f"{p.name} ({p.error})" for p in report.programs if not p.fits)
    print(f"error: does not fit {report.accelerator_type}: {failed}\nto make it fit, any of:\n  "
          + "\n  ".join(report.hints), file=sys.stderr)
    return NOT_FIT


run = cli.in_process(main, FLAGS, "discreteflow_jax.compile_check")


if __name__ == "__main__":
    cli.run(main, FLAGS)
