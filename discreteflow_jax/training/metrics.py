"""Metric output: ``metrics.jsonl`` (always) and TensorBoard event files (via tensorboardX) in
the workdir, written by process 0 only, plus the console progress line."""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any


class MetricWriter:
    def __init__(self, workdir: str, enabled: bool = True):
        self.enabled = enabled
        self._tb = None
        self._jsonl = None
        self._remote: Any = None  # etils.epath.Path of metrics.jsonl for a gs:// workdir
        self._remote_lines: list[str] = []
        if not enabled:
            return
        if "://" in workdir:
            # Cloud storage has no append: keep the lines and rewrite the (small) file at each write.
            from etils import epath

            self._remote = epath.Path(workdir) / "metrics.jsonl"
            self._remote.parent.mkdir(parents=True, exist_ok=True)
            if self._remote.exists():  # resumed run: keep the earlier lines
                self._remote_lines = self._remote.read_text().splitlines(keepends=True)
        else:
            os.makedirs(workdir, exist_ok=True)
            self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
        try:
            self._tb = _summary_writer_class()(os.path.join(workdir, "tensorboard"))
        except ImportError:  # TensorBoard output is optional; metrics.jsonl always exists
            self._tb = None

    def discard_after(self, step: int) -> list[int]:
        """Before training resumes from ``step``: the records of later steps (a trajectory the
        resume discards, after a checkpoint fallback or ``--resume_step``) leave ``metrics.jsonl``,
        which is rewritten atomically, and are appended to ``metrics_discarded.jsonl`` (kept, like
        the set-aside checkpoints). TensorBoard drops its later events too. Returns the dropped steps."""
        if not self.enabled:
            return []
        lines = self._remote_lines if self._remote is not None else self._read_local()
        kept, dropped = split_records(lines, step)
        if not dropped:
            return []
        if self._remote is not None:
            discarded = self._remote.parent / DISCARDED_FILE
            old = discarded.read_text() if discarded.exists() else ""
            discarded.write_text(old + "".join(dropped))
            self._remote_lines = kept
            self._remote.write_text("".join(kept))
        else:
            path = self._jsonl.name
            with open(os.path.join(os.path.dirname(path), DISCARDED_FILE), "a") as f:
                f.writelines(dropped)
            self._jsonl.close()
            with open(path + ".tmp", "w") as f:
                f.writelines(kept)
            os.replace(path + ".tmp", path)  # a crash leaves the old file or the new, never half
            self._jsonl = open(path, "a")
        if self._tb is not None:  # purge_step: TensorBoard hides the events of steps >= it
            logdir = self._tb.logdir
            self._tb.close()
            self._tb = _summary_writer_class()(logdir, purge_step=step + 1)
        return sorted({_record_step(line) for line in dropped} - {None})

    def _read_local(self) -> list[str]:
        self._jsonl.flush()
        with open(self._jsonl.name) as f:
            return f.readlines()

    def write_scalars(self, step: int, scalars: dict[str, Any]) -> None:
        if not self.enabled:
            return
        clean = {k: float(v) for k, v in scalars.items()}
        line = json.dumps({"step": step, "time": time.time(), **clean}) + "\n"
        if self._remote is not None:
            self._remote_lines.append(line)
            self._remote.write_text("".join(self._remote_lines))
        else:
            self._jsonl.write(line)
            self._jsonl.flush()
        if self._tb is not None:
            for k, v in clean.items():
                self._tb.add_scalar(k, v, step)

    def write_texts(self, step: int, texts: dict[str, str]) -> None:
        if self.enabled and self._tb is not None:
            for k, v in texts.items():
                self._tb.add_text(k, v, step)

    def write_hparams(self, config: dict) -> None:
        if self.enabled and self._tb is not None:
            self._tb.add_text("config", "```\n" + json.dumps(config, indent=2) + "\n```", 0)

    def flush(self) -> None:
        if self.enabled and self._tb is not None:
            self._tb.flush()


DISCARDED_FILE = "metrics_discarded.jsonl"


def _record_step(line: str) -> int | None:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None


def split_records(lines: list[str], step: int) -> tuple[list[str], list[str]]:
    """(records of steps <= ``step``, the others). A line that does not parse (cut short by a crash
    while writing) goes with the others."""
    kept, dropped = [], []
    for line in lines:
        s = _record_step(line)
        (kept if s is not None and s <= step and line.endswith("\n") else dropped).append(line)
    return kept, dropped


def _summary_writer_class() -> type:
    """tensorboardX's SummaryWriter, imported without PyTorch.

    tensorboardX imports torch whenever it is installed (only to convert torch tensors, which we
    never pass); in a training process that costs ~180 MB of resident memory and seconds of start-up.
    Hiding torch during the import makes tensorboardX take its torch-free path; a torch that is
    already imported is left alone.
    """
    if "torch" in sys.modules:
        from tensorboardX import SummaryWriter

        return SummaryWriter
    sys.modules["torch"] = None  # type: ignore[assignment]  # `import torch` raises ImportError
    try:
        from tensorboardX import SummaryWriter
    finally:
        del sys.modules["torch"]
    return SummaryWriter


def _fmt_time(seconds: float) -> str:
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def evaluations_left(done: int, total: int, every: int) -> int:
    """Evaluations the training loop still runs after step ``done``: one at every multiple of
    ``every`` up to ``total``, and one at ``total`` when it is not a multiple."""
    if done >= total:
        return 0
    return total // every - done // every + (1 if total % every else 0)


def eta_seconds(done: int, total: int, step_s: float, eval_every: int, eval_s: float | None) -> float:
    """Remaining wall time: the steps left at ``step_s`` each (measured on steps after the first of
    the run, which includes compilation) plus the evaluations left at ``eval_s`` each (the last
    one measured; None before the first: then they are not counted yet)."""
    steps = max(total - done, 0) * step_s
    return steps + (evaluations_left(done, total, eval_every) * eval_s if eval_s is not None else 0.0)


def format_progress(step: int, total: int, metrics: dict[str, float], eta: float | None) -> str:
    """One console line: step, main losses, lr, throughput, ETA. Bucket losses go on a second line."""
    main = [f"step {step}/{total}"]
    buckets, gains = [], []
    for key in sorted(metrics):
        value = metrics[key]
        short = key.split("/", 1)[-1]
        if "/loss_t" in key:
            buckets.append(f"{short.removeprefix('loss_')}={value:.3f}")
        elif "/context_gain_t" in key:
            gains.append(f"{short.removeprefix('context_gain_')}={value:+.3f}")
        elif short in ("loss", "ppl", "grad_norm"):
            main.append(f"{key}={value:.4f}")
        elif short == "lr":
            main.append(f"lr={value:.2e}")
        elif short == "tokens_per_s":
            main.append(f"tok/s={value:,.0f}")
    if eta is not None:
        main.append(f"ETA {_fmt_time(eta)}")
    line = "  ".join(main)
    if buckets:
        line += "\n    loss by t-bucket: " + " ".join(buckets)
    if gains:
        line += "\n    context gain by t-bucket (nats): " + " ".join(gains)
    return line
