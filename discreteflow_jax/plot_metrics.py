"""Plots a run's validation loss per flow-time bucket from its ``metrics.jsonl``.

    python -m discreteflow_jax.plot_metrics --workdir=DIR [--out=FILE.png] [--reference=6.30]

The mean flow loss hides where the network learns (SPEC §4): one line per t-bucket shows it.
``--reference`` draws a horizontal line, e.g. the unigram entropy of the training tokens.
"""

from __future__ import annotations

import json
import os
import sys

from absl import app, flags

_WORKDIR = flags.DEFINE_string("workdir", None, "Run folder holding metrics.jsonl.")
_OUT = flags.DEFINE_string("out", None, "PNG path (default: WORKDIR/val_loss_by_t.png).")
_REFERENCE = flags.DEFINE_float("reference", None, "Draw a horizontal reference line (nats).")


def bucket_curves(metrics_path: str, prefix: str = "val") -> dict[str, list[tuple[int, float]]]:
    """{metric name: [(step, value), ...]} for the mean loss and every t-bucket."""
    if not os.path.exists(metrics_path):
        raise FileNotFoundError(f"{metrics_path} does not exist; is this a training workdir?")
    curves: dict[str, list[tuple[int, float]]] = {}
    with open(metrics_path) as f:
        for line in f:
            row = json.loads(line)
            for key, value in row.items():
                if key == f"{prefix}/loss" or key.startswith(f"{prefix}/loss_t"):
                    curves.setdefault(key, []).append((int(row["step"]), float(value)))
    return curves


def plot(curves: dict[str, list[tuple[int, float]]], out: str, reference: float | None = None) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for key in sorted(curves):
        steps, values = zip(*sorted(curves[key]))
        style = {"color": "black", "linewidth": 2.5} if key.endswith("/loss") else {}
        ax.plot(steps, values, marker="o", markersize=3, label=key.split("/", 1)[1], **style)
    if reference is not None:
        ax.axhline(reference, color="gray", linestyle="--", label=f"reference {reference:.2f}")
    ax.set_xlabel("step")
    ax.set_ylabel("validation flow loss (nats/token)")
    ax.set_title("Validation loss by flow time t")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def main(argv: list[str]) -> None:
    del argv
    if not _WORKDIR.value:
        raise app.UsageError("--workdir is required")
    curves = bucket_curves(os.path.join(_WORKDIR.value, "metrics.jsonl"))
    if not curves:
        print(f"error: no validation metrics in {_WORKDIR.value}/metrics.jsonl yet", file=sys.stderr)
        sys.exit(2)
    out = plot(curves, _OUT.value or os.path.join(_WORKDIR.value, "val_loss_by_t.png"), _REFERENCE.value)
    print(out)


if __name__ == "__main__":
    app.run(main)
