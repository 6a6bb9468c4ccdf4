"""Validation curves of a training run from its ``metrics.jsonl``: the loss per flow-time bucket
(the mean flow loss hides where the network learns) and, when logged, the context gain per bucket
(how much the predictions use the surrounding text).
"""

from __future__ import annotations

import json
import os
from typing import Any


def bucket_curves(metrics_path: str, prefix: str = "val") -> dict[str, list[tuple[int, float]]]:
    """{metric name: [(step, value), ...]} for the mean loss, every t-bucket and the context gain,
    sorted by step. A step recorded twice (a file written before resumes rewrote it) keeps its
    last value: the later record is the trajectory the run continued."""
    if not os.path.exists(metrics_path):
        raise FileNotFoundError(f"{metrics_path} does not exist; is this a training workdir?")
    by_step: dict[str, dict[int, float]] = {}
    with open(metrics_path) as f:
        for line in f:
            row = json.loads(line)
            for key, value in row.items():
                if key == f"{prefix}/loss" or key.startswith((f"{prefix}/loss_t", f"{prefix}/context_gain")):
                    by_step.setdefault(key, {})[int(row["step"])] = float(value)
    return {key: sorted(points.items()) for key, points in by_step.items()}


def plot(curves: dict[str, list[tuple[int, float]]], out: str, reference: float | None = None) -> str:
    """Writes the loss panel (and a context-gain panel when logged) to the PNG ``out``; returns ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gain_keys = sorted(k for k in curves if "/context_gain" in k)
    loss_keys = sorted(k for k in curves if k not in gain_keys)
    fig, axes = plt.subplots(1, 2 if gain_keys else 1, figsize=(14 if gain_keys else 8, 5), squeeze=False)
    ax = axes[0, 0]
    _lines(ax, curves, loss_keys, mean_suffix="/loss")
    if reference is not None:
        ax.axhline(reference, color="gray", linestyle="--", label=f"reference {reference:.2f}")
    ax.set_ylabel("validation flow loss (nats/token)")
    ax.set_title("Validation loss by flow time t")
    ax.legend(fontsize=7, ncol=2)
    if gain_keys:
        ax = axes[0, 1]
        _lines(ax, curves, gain_keys, mean_suffix="/context_gain")
        ax.axhline(0.0, color="gray", linestyle="--")
        ax.set_ylabel("loss increase without context (nats/token)")
        ax.set_title("Context gain by flow time t (0: each position denoised alone)")
        ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def _lines(ax: Any, curves: dict[str, list[tuple[int, float]]], keys: list[str], mean_suffix: str) -> None:
    for key in keys:
        steps, values = zip(*sorted(curves[key]))
        style = {"color": "black", "linewidth": 2.5} if key.endswith(mean_suffix) else {}
        ax.plot(steps, values, marker="o", markersize=3, label=key.split("/", 1)[1], **style)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
