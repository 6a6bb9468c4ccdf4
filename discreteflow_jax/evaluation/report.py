"""What a sweep leaves on disk: cached cells (``cells/*.json``, reused when their identity
matches), the samples as text (``samples/``), and the report: ``sweep.md`` (tables), ``sweep.csv``
(one row per model and K), ``sweep.json`` and ``sweep.png`` (Gen-PPL and entropy against K,
teachers and real text as horizontal lines).
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import re
from typing import Any

log = logging.getLogger("discreteflow_jax")


def cell_key(name: str, steps: int | None) -> str:
    """The file name of one (model, K) cell; None for a teacher's single cell."""
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", name)
    return f"{safe}_K{steps}" if steps is not None else safe


def cached(path: str, identity: dict, compute: Any) -> Any:
    """``compute()`` (a JSON-able value), or the value stored at ``path`` under the same identity."""
    identity = json.loads(json.dumps(identity))  # normalize tuples/ints as JSON reads them back
    if os.path.isfile(path):
        with open(path) as f:
            stored = json.load(f)
        if stored.get("identity") == identity:
            log.info("reusing %s", path)
            return stored["value"]
    value = compute()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump({"identity": identity, "value": value}, f, indent=1)
    return value


def cached_cell(out_dir: str, key: str, identity: dict, fn: Any) -> dict:
    """The row of ``fn() -> (row, texts)``, cached in ``cells/<key>.json``; texts go to ``samples/<key>.txt``."""

    def compute() -> dict:
        row, texts = fn()
        with open(os.path.join(out_dir, "samples", f"{key}.txt"), "w") as f:
            for j, text in enumerate(texts):
                f.write(f"=== {key} sample {j} ===\n{text}\n\n")
        return row

    return cached(os.path.join(out_dir, "cells", f"{key}.json"), identity, compute)


CSV_FIELDS = ("model", "kind", "causal", "K", "stagger", "gen_ppl", "nll", "nll_se", "entropy", "entropy_std", "rep",
              "mean_length", "num_empty", "scored_tokens", "num_samples", "length", "val_loss", "val_objective",
              "sample_s", "dtype", "step", "path", "mauve", "matched_gen_ppl", "matched_temperature",
              "matched_target_entropy", "shuffled_gen_ppl")


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None or value == "" or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, float):
        return f"{value:,.{digits}f}" if abs(value) < 1e5 else f"{value:.3g}"
    return str(value)


def settings_line(report: dict) -> str:
    s = report["settings"]
    grid = s["schedule"] + (f" (power {s['schedule_param']})" if s["schedule"] == "power" else "")
    stagger = s.get("stagger", 0.0)
    if stagger is None:
        grid += ", stagger: each model's sample.stagger"
    elif stagger:
        grid += f", staggered (w = {stagger}: left positions first)"
    dtypes = sorted(set(report["sampling_dtype"].values()))
    return (
        f"N = {s['num_samples']} samples per cell, {report['length']} tokens each (cut at the first EOS), "
        f"seed {s['seed']} (batches of {s['batch_size']}), K = {', '.join(map(str, s['steps']))}, "
        f"time grid {grid}, sampling dtype {'/'.join(dtypes)}, flow temperature {s['temperature']}, "
        f"teacher temperature {s['teacher_temperature']}; scorer {report['scorer']} in fp32; "
        f"entropy in nats; rep{s['ngram']} = fraction of repeated {s['ngram']}-grams; backend {report['backend']}."
    )


def markdown_tables(report: dict) -> str:
    rows = report["rows"]
    ngram = report["settings"]["ngram"]
    rep = f"rep{ngram}"
    flows = [r for r in rows if r["kind"] not in ("teacher", "data")]
    refs = [r for r in rows if r["kind"] in ("teacher", "data")]
    names = list(dict.fromkeys(r["model"] for r in flows))
    steps = sorted({int(r["K"]) for r in flows})
    by = {(r["model"], int(r["K"])): r for r in flows}
    lines = [settings_line(report), ""]
    if flows:
        tables = [("Gen-PPL ↓", "gen_ppl", 1), ("Unigram entropy (nats)", "entropy", 2),
                  (f"Repeated {ngram}-grams", rep, 3)]
        if any("shuffled_gen_ppl" in r for r in flows):
            tables.append(("Gen-PPL of the same samples, positions shuffled across samples (above the Gen-PPL: "
                           "positions depend on each other)", "shuffled_gen_ppl", 1))
        if any("mauve" in r for r in flows):
            tables.append(("MAUVE against held-out text ↑ (scorer features; comparable within this table)", "mauve", 3))
        if any("matched_gen_ppl" in r for r in flows):
            tables += [("Gen-PPL at the validation text's entropy ↓ (temperature searched; – = not bracketed)",
                        "matched_gen_ppl", 1), ("…at temperature", "matched_temperature", 2)]
        for title, key, digits in tables:
            lines += [f"**{title}**", "", "| K | " + " | ".join(names) + " |",
                      "|---:|" + "---:|" * len(names)]
            for k in steps:
                cells = [_fmt(by[(n, k)][key], digits) if (n, k) in by else "–" for n in names]
                lines.append(f"| {k} | " + " | ".join(cells) + " |")
            lines.append("")
    lines += ["**Reference points** (sampled once, scored the same way)", "",
              f"| reference | Gen-PPL | entropy | {rep} | MAUVE | matched Gen-PPL (temperature) |",
              "|---|---:|---:|---:|---:|---:|"]
    for r in refs:
        what = "autoregressive teacher samples" if r["kind"] == "teacher" else "real validation windows"
        matched = (f"{_fmt(r.get('matched_gen_ppl'), 1)} ({_fmt(r.get('matched_temperature'))})"
                   if "matched_gen_ppl" in r else "–")
        lines.append(f"| {r['model']} ({what}) | {_fmt(r['gen_ppl'], 1)} | {_fmt(r['entropy'])} | "
                     f"{_fmt(r[rep], 3)} | {_fmt(r.get('mauve'), 3)} | {matched} |")
    val = report.get("val_losses", {})
    if val:
        lines += ["", "**Validation loss** (each model's own training objective, named per row; values of "
                  "different objectives are not comparable. The first t-bucket is where a flow network does "
                  "the work)", "",
                  "| model | kind | objective | val loss | val loss at t < 0.1 |", "|---|---|---|---:|---:|"]
        kinds = {r["model"]: r["kind"] + (" causal" if r.get("causal") and r["kind"] != "teacher" else "")
                 for r in rows}
        objectives = report.get("val_objectives", {})
        for name, v in val.items():
            lines.append(f"| {name} | {kinds.get(name, '')} | {objectives.get(name, '–')} | "
                         f"{_fmt(v.get('loss'), 3)} | {_fmt(v.get('loss_t0.0-0.1'), 3)} |")
    return "\n".join(lines) + "\n"


def write_csv(report: dict, path: str) -> None:
    rep = f"rep{report['settings']['ngram']}"
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(CSV_FIELDS))
        writer.writeheader()
        for r in report["rows"]:
            writer.writerow({k: (r.get(rep) if k == "rep" else r.get(k, "")) for k in CSV_FIELDS})


def plot(report: dict, path: str) -> None:
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["rows"]
    flows = [r for r in rows if r["kind"] not in ("teacher", "data")]
    refs = [r for r in rows if r["kind"] in ("teacher", "data")]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    panels = ((axes[0], "gen_ppl", "Gen-PPL (lower is better)"), (axes[1], "entropy", "unigram entropy (nats)"))
    for ax, key, label in panels:
        for name in dict.fromkeys(r["model"] for r in flows):
            mine = [r for r in flows if r["model"] == name]
            pts = sorted((int(r["K"]), r[key]) for r in mine)
            causal = bool(mine[0].get("causal"))  # squares and dashes tell causal models apart at a glance
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="s" if causal else "o",
                    linestyle="-." if causal else "-", label=name)
        for i, r in enumerate(refs):
            style = "--" if r["kind"] == "teacher" else ":"
            ax.axhline(r[key], color=f"C{(i + 7) % 10}" if r["kind"] == "teacher" else "gray", linestyle=style,
                       label=f"{r['model']} ({'autoregressive' if r['kind'] == 'teacher' else 'real text'})")
        ax.set_xscale("log", base=2)
        ks = sorted({int(r["K"]) for r in flows})
        if ks:  # label the K values themselves, not powers of two
            ax.set_xticks(ks, [str(k) for k in ks])
            ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        if key == "gen_ppl":
            ax.set_yscale("log")
        ax.set_xlabel("sampling steps K")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    s = report["settings"]
    fig.suptitle(f"N={s['num_samples']}, {report['length']} tokens, seed {s['seed']}, {s['schedule']} grid; "
                 f"scorer: {report['scorer']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(report: dict, out_dir: str) -> None:
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "sweep.json"), "w") as f:
        json.dump(report, f, indent=1)
    with open(os.path.join(out_dir, "sweep.md"), "w") as f:
        f.write(markdown_tables(report))
    write_csv(report, os.path.join(out_dir, "sweep.csv"))
    plot(report, os.path.join(out_dir, "sweep.png"))
