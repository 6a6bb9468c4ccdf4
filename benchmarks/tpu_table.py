r"""Compiles every full experiment for every TPU slice of the table in launch/README.md and renders it.

    python benchmarks/tpu_table.py --out=runs/tpu_table [--experiments=1.1,3.2] [--slices=v5e-8]
    python benchmarks/tpu_table.py --out=runs/tpu_table --render   # the markdown table from the JSONs

Each cell is one ``python -m discreteflow_jax.compile_check`` command (printed, and stored in the
cell's JSON), run in a process of its own so that one cell that does not compile leaves the others
alone. A cell whose JSON exists is not compiled again (delete it to redo it). Needs libtpu
(``pip install -e '.[tpu-compile]'``); no TPU. FineWeb cells take minutes each on a small host.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time

BF16 = ["--config.model.dtype=bfloat16"]
# experiment -> (config, overrides beyond bf16 activations). The FineWeb ones as launch/README.md runs them.
EXPERIMENTS: dict[str, tuple[str, list[str]]] = {
    "1.1": ("configs/shakespeare_baseline.py", []),
    "1.2": ("configs/shakespeare_baseline.py", ["--config.causal=True"]),
    "2.1": ("configs/shakespeare_teacher.py", []),
    "2.2": ("configs/shakespeare_gumbel.py", []),
    "2.2-warm": ("configs/shakespeare_gumbel.py:warm", []),
    "3.1": ("configs/fineweb_baseline.py", ["--config.train.grad_accum=8"]),
    "3.2": ("configs/fineweb_gumbel.py", ["--config.teacher.dtype=bfloat16", "--config.train.grad_accum=8"]),
    "3.2-warm": ("configs/fineweb_gumbel.py:warm", ["--config.teacher.dtype=bfloat16", "--config.train.grad_accum=8"]),
}
# slice name -> (topology, number of slices)
SLICES: dict[str, tuple[str, int]] = {
    "v4-8": ("v4:2x2x1", 1), "v5e-8": ("v5e:2x4", 1), "v5p-8": ("v5p:2x2x1", 1), "v6e-8": ("v6e:2x4", 1),
    "v5e-32": ("v5e:4x8", 1),
}


def cell_command(experiment: str, slice_name: str, json_path: str, train_only: bool) -> list[str]:
    config, overrides = EXPERIMENTS[experiment]
    topology, num_slices = SLICES[slice_name]
    cmd = ["python", "-m", "discreteflow_jax.compile_check", f"--config={config}", f"--topology={topology}",
           *BF16, *overrides, f"--json={json_path}"]
    if num_slices > 1:
        cmd.append(f"--num_slices={num_slices}")
    if train_only:
        cmd += ["--skip_eval", "--skip_sampler"]
    return cmd


def cell_path(out: str, experiment: str, slice_name: str) -> str:
    return os.path.join(out, f"{experiment}__{slice_name}.json")


def run_cells(out: str, experiments: list[str], slices: list[str], train_only: bool, timeout: int) -> None:
    os.makedirs(out, exist_ok=True)
    for experiment in experiments:
        for slice_name in slices:
            path = cell_path(out, experiment, slice_name)
            if os.path.exists(path):
                continue
            cmd = cell_command(experiment, slice_name, path + ".tmp", train_only)
            print(f"[{time.strftime('%H:%M:%S')}] {experiment} on {slice_name}: {shlex.join(cmd)}", flush=True)
            start = time.time()
            try:
                proc = subprocess.run([sys.executable, *cmd[1:]], capture_output=True, text=True, timeout=timeout)
                status, tail = proc.returncode, (proc.stdout + proc.stderr)[-3000:]
            except subprocess.TimeoutExpired:
                status, tail = None, f"timed out after {timeout} s"
            seconds = time.time() - start
            report = {}
            if os.path.exists(path + ".tmp"):
                with open(path + ".tmp") as f:
                    report = json.load(f)
                os.remove(path + ".tmp")
            shown = cell_command(experiment, slice_name, path, train_only)  # the command a user runs
            cell = {"experiment": experiment, "slice": slice_name, "command": shlex.join(shown), "exit_status": status,
                    "compile_seconds": round(seconds, 1), "report": report}
            if not report:
                cell["log_tail"] = tail
            with open(path, "w") as f:
                json.dump(cell, f, indent=1)
            print(f"  exit {status} in {seconds:.0f} s", flush=True)


def _program(report: dict, prefix: str) -> dict | None:
    return next((p for p in report.get("programs", []) if p["name"].startswith(prefix)), None)


def _memory(program: dict | None, hbm_gib: float) -> str:
    if program is None:
        return "–"
    if program.get("error") and not program.get("total_bytes"):
        return "does not fit" if "RESOURCE" in program["error"] or "exceed" in program["error"] else "does not compile"
    gib = program["total_bytes"] / 2**30
    return f"{gib:.2f} ({gib / hbm_gib:.0%})" + ("" if program["fits"] else " **does not fit**")


def render(out: str) -> str:
    rows = ["| experiment | slice | seqs/device/micro-batch | train step | eval step | sampler | "
            "TFLOP per step | s/step at 40% MFU | chip-hours (run) |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for experiment in EXPERIMENTS:
        for slice_name in SLICES:
            path = cell_path(out, experiment, slice_name)
            if not os.path.exists(path):
                continue
            with open(path) as f:
                cell = json.load(f)
            report = cell["report"]
            if not report:
                status = cell["exit_status"]
                rows.append(f"| {experiment} | {slice_name} | | does not compile (exit {status}) | | | | | |")
                continue
            hbm = report["hbm_gib"]
            train = _program(report, "train_step")
            sampler = _program(report, "sampler")
            # The teacher (2.1) samples autoregressively; the flow models at the largest configured K.
            label = f" K={sampler['name'].split('K')[-1]}" if sampler else ""
            label = " (AR)" if cell["experiment"] == "2.1" else label
            sampler_cell = _memory(sampler, hbm) + label
            tflop = train["flops"] / 1e12 if train and train.get("flops") else None
            rows.append(
                f"| {experiment} | {slice_name} | {report['batch_per_device']:g} | {_memory(train, hbm)} | "
                f"{_memory(_program(report, 'eval_step'), hbm)} | {sampler_cell} | "
                + (f"{tflop:,.1f}" if tflop is not None else "–") + " | "
                + (f"{report['step_seconds']:.3g}" if report.get("step_seconds") else "–") + " | "
                + (f"{report['chip_hours']:,.3g} ({report['num_steps']:,} steps)" if report.get("chip_hours") else "–")
                + " |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder of the cells' JSON files")
    parser.add_argument("--experiments", default=",".join(EXPERIMENTS),
                        help="comma-separated, of " + ", ".join(EXPERIMENTS))
    parser.add_argument("--slices", default=",".join(SLICES), help="comma-separated, of " + ", ".join(SLICES))
    parser.add_argument("--train_only", action="store_true", help="compile the train step only (the memory peak)")
    parser.add_argument("--timeout", type=int, default=3600, help="seconds per cell")
    parser.add_argument("--render", action="store_true", help="print the markdown table from the JSONs and exit")
    args = parser.parse_args()
    if args.render:
        print(render(args.out))
        return
    experiments = [e.strip() for e in args.experiments.split(",")]
    slices = [s.strip() for s in args.slices.split(",")]
    unknown = [e for e in experiments if e not in EXPERIMENTS] + [s for s in slices if s not in SLICES]
    if unknown:
        parser.error(f"unknown experiment or slice: {', '.join(unknown)}")
    run_cells(args.out, experiments, slices, args.train_only, args.timeout)
    print(render(args.out))


if __name__ == "__main__":
    main()
