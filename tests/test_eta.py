"""The ETA printed during training: its arithmetic, and the speed it uses leaving out the first
step of a run (which includes compilation)."""

from __future__ import annotations

import time

import pytest
from conftest import load_config

from discreteflow_jax import experiment
from discreteflow_jax.metrics import eta_seconds, evaluations_left
from discreteflow_jax.presets import set_fields
from discreteflow_jax.tasks import build_task
from discreteflow_jax.train import Trainer


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
    real_step, calls, logged = trainer.train_step, [], []

    def slow_first_step(*args):
        calls.append(1)
        if len(calls) == 1:
            time.sleep(2.0)  # stands in for compilation
        return real_step(*args)

    trainer.train_step = slow_first_step
    real_write = trainer.writer.write_scalars
    trainer.writer.write_scalars = lambda step, values: (logged.append((step, dict(values))), real_write(step, values))
    trainer.run()
    first = next(values for step, values in logged if "train/steps_per_s" in values)
    # Steps 2 and 3 only: far faster than 3 steps in > 2 s (about 1.4 steps/s with the first one counted).
    assert first["train/steps_per_s"] > 5.0
