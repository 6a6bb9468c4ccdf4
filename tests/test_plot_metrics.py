"""The per-t-bucket validation plot reads metrics.jsonl and writes a PNG."""

from __future__ import annotations

import json

import pytest

from discreteflow_jax.evaluation.curves import bucket_curves, plot


def test_bucket_curves_and_plot(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [
        {"step": 10, "train/loss": 3.0},
        {"step": 10, "val/loss": 2.0, "val/loss_t0.0-0.1": 6.0, "val/loss_t0.9-1.0": 0.0},
        {"step": 20, "val/loss": 1.5, "val/loss_t0.0-0.1": 5.5},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    curves = bucket_curves(str(path))
    assert curves["val/loss"] == [(10, 2.0), (20, 1.5)]
    assert curves["val/loss_t0.0-0.1"] == [(10, 6.0), (20, 5.5)]
    assert "train/loss" not in curves
    out = plot(curves, str(tmp_path / "plot.png"), reference=6.3)
    assert (tmp_path / "plot.png").stat().st_size > 1000 and out.endswith("plot.png")


def test_context_gain_gets_its_own_panel(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [
        {"step": 10, "val/loss": 2.0, "val/loss_t0.0-0.1": 6.0, "val/context_gain": 0.01,
         "val/context_gain_t0.1-0.2": 0.05},
        {"step": 20, "val/loss": 1.5, "val/loss_t0.0-0.1": 5.5, "val/context_gain": 0.02,
         "val/context_gain_t0.1-0.2": 0.09},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    curves = bucket_curves(str(path))
    assert curves["val/context_gain_t0.1-0.2"] == [(10, 0.05), (20, 0.09)]
    import matplotlib.pyplot as plt

    before = plt.get_fignums()
    plot(curves, str(tmp_path / "plot.png"))
    assert plt.get_fignums() == before  # closed after saving
    image = plt.imread(str(tmp_path / "plot.png"))
    assert image.shape[1] > image.shape[0] * 2  # two panels side by side


def test_missing_metrics_file_is_explained(tmp_path):
    with pytest.raises(FileNotFoundError, match="training workdir"):
        bucket_curves(str(tmp_path / "metrics.jsonl"))


def test_command_line_writes_the_plot(tmp_path, capsys):
    from discreteflow_jax import plot_metrics

    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 10, "val/loss": 2.0, "val/loss_t0.0-0.1": 6.0}) + "\n")
    assert plot_metrics.run([f"--workdir={tmp_path}", "--reference=6.3"]) == 0
    assert (tmp_path / "val_loss_by_t.png").stat().st_size > 1000
    assert plot_metrics.run([f"--workdir={tmp_path / 'nothing'}"]) == 2
    assert "training workdir" in capsys.readouterr().err


def test_a_step_logged_twice_draws_its_last_value(tmp_path):
    """A metrics.jsonl from before resumes rewrote it may hold a step twice: one point per step,
    the later record's."""
    path = tmp_path / "metrics.jsonl"
    rows = [{"step": 10, "val/loss": 2.0}, {"step": 20, "val/loss": 1.5}, {"step": 20, "val/loss": 1.7},
            {"step": 30, "val/loss": 1.4}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert bucket_curves(str(path))["val/loss"] == [(10, 2.0), (20, 1.7), (30, 1.4)]
