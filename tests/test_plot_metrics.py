"""The per-t-bucket validation plot reads metrics.jsonl and writes a PNG."""

from __future__ import annotations

import json

import pytest

from discreteflow_jax.plot_metrics import bucket_curves, plot


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


def test_missing_metrics_file_is_explained(tmp_path):
    with pytest.raises(FileNotFoundError, match="training workdir"):
        bucket_curves(str(tmp_path / "metrics.jsonl"))
