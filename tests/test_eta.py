"""The ETA printed during training: its arithmetic, and the speed it uses leaving out the first
step of a run (which includes compilation)."""

from __future__ import annotations

import time

import jax
import pytest
from conftest import load_config

from discreteflow_jax.config.presets import set_fields
from discreteflow_jax.tasks import build_task
from discreteflow_jax.training import experiment
from discreteflow_jax.training.metrics import eta_seconds, evaluations_left
from discreteflow_jax.training.trainer import Trainer


def test_evaluations_left_matches_the_loop():
    for total, every in ((1500, 250), (10, 3), (6, 6), (7, 100)):
        for done in range(total + 1):
            # The loop evaluates at every multiple of `every` and at the last step.
            expected = sum(1 for s in range(done + 1, total + 1) if s % every == 0 or s == total)
            assert evaluations_left(done, total, every) == expected, (done, total, every)


def test_eta_arithmetic():
    # :cpu baseline shape: 1500 steps, an evaluation every 250.
    assert eta_seconds(25, 1500, 0.4, 250, None) == pytest.approx(1475 * 0.4)
    assert eta_seconds(250, 1500, 0.4, 250, 12.0) == pytest.approx(1250 * 0.4 + 5 * 12.0)
    assert eta_seconds(1500, 1500, 0.4, 250, 12.0) == 0.0
    assert eta_seconds(1499, 1500, 1.0, 250, 10.0) == pytest.approx(1.0 + 10.0)


def test_speed_leaves_out_the_compiling_first_step(tmp_path, data_dir):
    config = set_fields(load_config("shakespeare_baseline", "smoke"),
                        {"train.num_steps": 6, "train.log_every": 3, "train.eval_every": 6, "train.ckpt_every": 6})
    cfg, tokenizer, dataset = experiment.prepare(config, data_dir)
    trainer = Trainer(cfg, build_task(cfg), str(tmp_path / "run"), dataset, tokenizer)
    real_step, durations, logged = trainer.train_step, [], []
    pause = 5.0  # stands in for compilation

    def slow_first_step(*args):
        t0 = time.perf_counter()
        if not durations:
            time.sleep(pause)
        out = jax.block_until_ready(real_step(*args))
        durations.append(time.perf_counter() - t0)
        return out

    trainer.train_step = slow_first_step
    real_write = trainer.writer.write_scalars
    trainer.writer.write_scalars = lambda step, values: (logged.append((step, dict(values))), real_write(step, values))
    trainer.run()
    first = next(values for step, values in logged if "train/steps_per_s" in values)
    # Counted from step 2: about 2 / (d2 + d3) steps/s (plus loop overhead, allowed up to half the
    # pause). With the first step counted it would be 3 / (pause + d1 + d2 + d3), below this bound.
    assert first["train/steps_per_s"] > 2.0 / (durations[1] + durations[2] + pause / 2)


def test_a_first_step_that_is_logged_keeps_its_speed(tmp_path, data_dir):
    """A run whose first step is also a logging point (here a checkpoint step) reports that step's
    speed instead of an empty window (0 steps/s and an endless ETA)."""
    config = set_fields(load_config("shakespeare_baseline", "smoke"),
                        {"train.num_steps": 2, "train.warmup_steps": 1, "train.log_every": 3, "train.eval_every": 2,
                         "train.ckpt_every": 1})
    cfg, tokenizer, dataset = experiment.prepare(config, data_dir)
    trainer = Trainer(cfg, build_task(cfg), str(tmp_path / "run"), dataset, tokenizer)
    logged = []
    real_write = trainer.writer.write_scalars
    trainer.writer.write_scalars = lambda step, values: (logged.append((step, dict(values))), real_write(step, values))
    trainer.run()
    speeds = [values["train/steps_per_s"] for step, values in logged if "train/steps_per_s" in values]
    assert speeds and speeds[0] > 0.0


def test_metric_writer_does_not_import_torch(tmp_path):
    """tensorboardX imports PyTorch whenever it is installed (~180 MB resident in a training
    process); the writer keeps it out. Checked in a fresh interpreter, where nothing else has
    imported torch yet."""
    import subprocess
    import sys

    pytest.importorskip("torch")  # with torch absent there is nothing to keep out
    code = (
        "import sys\n"
        "from discreteflow_jax.training.metrics import MetricWriter\n"
        f"w = MetricWriter({str(tmp_path)!r}, enabled=True)\n"
        "w.write_scalars(1, {'train/loss': 2.5}); w.write_texts(1, {'samples': 'hello'}); w.flush()\n"
        "assert w._tb is not None, 'tensorboardX missing'\n"
        "print('torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
    events = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0
    assert '"train/loss": 2.5' in (tmp_path / "metrics.jsonl").read_text()
