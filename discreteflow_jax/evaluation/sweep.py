"""The steps-vs-quality sweep behind ``python -m discreteflow_jax.evaluate sweep``: every flow model
sampled at every K (and every teacher once), scored with ``discreteflow_jax.evaluate``, written as
``sweep.md`` (tables), ``sweep.csv`` (one row per model and K), ``sweep.json``, ``sweep.png``
(Gen-PPL and entropy against K, teachers and real text as horizontal lines) and the samples
themselves under ``samples/``.

Autoregressive models among the models (teachers) are sampled once (K does not apply; temperature
1 by default) and scored the same way: the reference point. Real validation windows of the same
length are scored as a second reference. Fixed seeds, no selection: every flow model samples
``num_samples`` sequences at every K from the same seed (batch i uses ``batch_seed(seed, i)``).
All samples are cut to one common length (the shortest model's: a teacher spends one context slot
on BOS), so entropies are comparable.

Finished cells are cached in ``<out>/cells``: rerunning with more models or more K computes only
what is missing; a cell is reused only when its settings, scorer and checkpoint step are identical.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import math
import os
import re
import time
from typing import Any

import jax
import numpy as np

from discreteflow_jax.data.tokenizers import Tokenizer
from discreteflow_jax.evaluate import (
    DEFAULT_STEPS,
    Scorer,
    is_autoregressive,
    sample_statistics,
    truncate_at_eos,
    validation_loss,
)
from discreteflow_jax.flow import TIME_GRIDS

log = logging.getLogger("discreteflow_jax")

MIN_STUDY_SAMPLES = 64  # fewer samples per cell make Gen-PPL and entropy too noisy to compare


@dataclasses.dataclass(frozen=True)
class SweepSettings:
    steps: tuple[int, ...] = DEFAULT_STEPS
    num_samples: int = 64
    seed: int = 0
    batch_size: int = 64  # samples per sampler call; the samples depend on it (one seed per batch)
    schedule: str = "uniform"
    schedule_param: float = 2.0
    temperature: float = 1.0  # flow models: divides the logits inside the sampler
    teacher_temperature: float = 1.0  # autoregressive models: ancestral sampling temperature
    ngram: int = 4
    length: int = 0  # 0: the shortest sample length among the models

    def validate(self) -> None:
        if not self.steps or min(self.steps) < 1:
            raise ValueError(f"--steps must be positive integers, got {self.steps}")
        if self.num_samples < 1 or self.batch_size < 1:
            raise ValueError("--num_samples and --batch_size must be >= 1")
        if self.schedule not in TIME_GRIDS:
            raise ValueError(f"--schedule must be one of {', '.join(TIME_GRIDS)}, got {self.schedule!r}")
        if self.temperature <= 0 or self.teacher_temperature <= 0:
            raise ValueError("temperatures must be > 0")
        if self.ngram < 1 or self.length < 0:
            raise ValueError("--ngram must be >= 1 and --length >= 0")


def batch_seed(seed: int, index: int) -> int:
    """The sampler seed of batch ``index``: distinct for every (seed, index), reproducible."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


def natural_length(model: Any) -> int:
    """How many tokens one sample of this model has: the context for flows, one less for teachers
    (BOS takes a slot of the KV cache)."""
    return model.sample_length


def draw_samples(model: Any, steps: int | None, settings: SweepSettings, length: int) -> np.ndarray:
    """[num_samples, length] token ids, in batches of ``settings.batch_size`` with per-batch seeds."""
    out = []
    n, b = settings.num_samples, settings.batch_size
    for i, start in enumerate(range(0, n, b)):
        count = min(b, n - start)
        seed = batch_seed(settings.seed, i)
        if is_autoregressive(model):
            rows = model.sample_tokens(count, None, seed, temperature=settings.teacher_temperature,
                                       length=natural_length(model))
        else:
            rows = model.sample_tokens(count, steps, seed, schedule=settings.schedule,
                                       schedule_param=settings.schedule_param, temperature=settings.temperature)
        out.append(np.asarray(rows)[:, :length])
    return np.concatenate(out, axis=0)


def model_description(name: str, model: Any) -> dict[str, Any]:
    cfg = model.config
    kind = "teacher" if is_autoregressive(model) else model.kind
    desc = {"model": name, "kind": kind, "path": str(model.source), "step": model.step}
    if cfg is not None:
        desc["causal"] = bool(getattr(cfg.model, "causal", True))
        desc["dtype"] = str(getattr(cfg.model, "dtype", "float32"))
    return desc


def evaluate_cell(model: Any, name: str, steps: int | None, scorer: Scorer, settings: SweepSettings,
                  length: int) -> tuple[dict[str, Any], list[str]]:
    """Samples one (model, K) cell and computes its metrics; returns (row, sample texts)."""
    start = time.perf_counter()
    tokens = draw_samples(model, steps, settings, length)
    sample_s = time.perf_counter() - start
    cut = [truncate_at_eos(row, model.tokenizer.eos_id) for row in tokens]
    row = {
        **model_description(name, model),
        "K": steps if steps is not None else "",
        "num_samples": len(cut),
        "length": length,
        **scorer.score(tokens, model.tokenizer),
        **sample_statistics(cut, settings.ngram),
        "sample_s": round(sample_s, 2),  # wall time including the sampler's compilation
    }
    texts = [model.tokenizer.decode(ids) for ids in cut]
    return row, texts


def reference_row(dataset: Any, tokenizer: Tokenizer, scorer: Scorer, settings: SweepSettings,
                  length: int) -> tuple[dict[str, Any], list[str]]:
    """The same metrics on real validation windows (evenly spread, num_samples of them)."""
    windows = np.asarray(dataset.val_batches(settings.num_samples, 1)[0])[:, :length]
    cut = [truncate_at_eos(row, tokenizer.eos_id) for row in windows]
    row = {
        "model": "validation text", "kind": "data", "path": "", "step": "", "K": "",
        "num_samples": len(cut), "length": length,
        **scorer.score(windows, tokenizer), **sample_statistics(cut, settings.ngram), "sample_s": 0.0,
    }
    return row, [tokenizer.decode(ids) for ids in cut]


def _cell_key(name: str, steps: int | None) -> str:
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", name)
    return f"{safe}_K{steps}" if steps is not None else safe


def _cell_identity(model_row: dict, settings: SweepSettings, scorer: Scorer, length: int) -> dict:
    return {"settings": dataclasses.asdict(settings) | {"steps": None}, "scorer": scorer.name, "length": length,
            "path": model_row.get("path"), "step": model_row.get("step")}


def _cached(path: str, identity: dict, compute: Any) -> Any:
    """``compute()`` (a JSON-able value), or the value stored at ``path`` under the same identity."""
    identity = json.loads(json.dumps(identity))  # normalize tuples/ints as JSON reads them back
    if os.path.isfile(path):
        with open(path) as f:
            cached = json.load(f)
        if cached.get("identity") == identity:
            log.info("reusing %s", path)
            return cached["value"]
    value = compute()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump({"identity": identity, "value": value}, f, indent=1)
    return value


def _cached_cell(out_dir: str, key: str, identity: dict, fn: Any) -> dict:
    """The row of ``fn() -> (row, texts)``, cached in ``cells/<key>.json``; texts go to ``samples/<key>.txt``."""

    def compute() -> dict:
        row, texts = fn()
        with open(os.path.join(out_dir, "samples", f"{key}.txt"), "w") as f:
            for j, text in enumerate(texts):
                f.write(f"=== {key} sample {j} ===\n{text}\n\n")
        return row

    return _cached(os.path.join(out_dir, "cells", f"{key}.json"), identity, compute)


def parse_models(spec: str) -> dict[str, str]:
    """``name=DIR,name=DIR`` -> {name: DIR} (order kept)."""
    models: dict[str, str] = {}
    for item in [x.strip() for x in spec.split(",") if x.strip()]:
        if "=" not in item:
            raise ValueError(f"--models entries look like name=WORKDIR, got {item!r}")
        name, path = (x.strip() for x in item.split("=", 1))
        if not name or not path:
            raise ValueError(f"--models entries look like name=WORKDIR, got {item!r}")
        if name in models:
            raise ValueError(f"--models names must be unique; {name!r} appears twice")
        models[name] = path
    if not models:
        raise ValueError("--models is empty; give name=WORKDIR,... (flow models and teachers)")
    return models


def run_sweep(models: dict[str, str], scorer_spec: str, settings: SweepSettings, out_dir: str,
              data_dir: str | None = None, scorer_tokenizer: str | None = None,
              scorer_batch_size: int = 32) -> dict[str, Any]:
    """Evaluates every flow model at every K (and every teacher once), writes the report files."""
    from discreteflow_jax.inference.load import load

    settings.validate()
    for name, path in models.items():  # every path is checked before anything is loaded or compiled
        if not os.path.isdir(os.path.expanduser(path)):
            raise ValueError(f"--models: {name}={path} is not a directory (a training workdir or an export)")
    if settings.num_samples < MIN_STUDY_SAMPLES:
        log.warning("num_samples=%d < %d: fine for a smoke test, too few for reported numbers",
                    settings.num_samples, MIN_STUDY_SAMPLES)
    scorer = Scorer.load(scorer_spec, data_dir, tokenizer=scorer_tokenizer, batch_size=scorer_batch_size)
    loaded = {name: load(path, data_dir) for name, path in models.items()}
    if not any(is_autoregressive(m) for m in loaded.values()):
        log.warning("no autoregressive teacher among --models: the table will have no teacher reference")
    length = settings.length or min(natural_length(m) for m in loaded.values())
    too_short = [n for n, m in loaded.items() if natural_length(m) < length]
    if too_short:
        raise ValueError(f"--length={length} is longer than the samples of {', '.join(too_short)}")
    os.makedirs(os.path.join(out_dir, "samples"), exist_ok=True)

    rows: list[dict[str, Any]] = []
    val_losses: dict[str, dict[str, float]] = {}
    first = next(iter(loaded.values()))
    dataset = _dataset_for(first, data_dir)
    ref_identity = {"settings": dataclasses.asdict(settings) | {"steps": None}, "scorer": scorer.name,
                    "length": length, "data": first.config.raw.get("data")}
    rows.append(_cached_cell(out_dir, "validation_text", ref_identity,
                             lambda: reference_row(dataset, first.tokenizer, scorer, settings, length)))
    for name, model in loaded.items():
        desc = model_description(name, model)
        identity = _cell_identity(desc, settings, scorer, length)
        val_key = os.path.join(out_dir, "cells", f"{_cell_key(name, None)}_val.json")
        # The validation loss depends on the checkpoint only, not on the sampling settings.
        val_losses[name] = _cached(val_key, {"path": desc["path"], "step": desc["step"]},
                                   lambda m=model: validation_loss(m, _dataset_for(m, data_dir)))
        ks: list[int | None] = [None] if is_autoregressive(model) else list(settings.steps)
        for k in ks:
            log.info("evaluating %s at K=%s", name, k if k is not None else "(autoregressive)")
            cell = _cached_cell(out_dir, _cell_key(name, k), identity | {"K": k},
                                lambda m=model, n=name, k=k: evaluate_cell(m, n, k, scorer, settings, length))
            cell["val_loss"] = val_losses[name].get("loss", math.nan)
            rows.append(cell)
            log.info("%s K=%s: Gen-PPL %.2f entropy %.3f rep%d %.3f", name, cell["K"] or "-", cell["gen_ppl"],
                     cell["entropy"], settings.ngram, cell[f"rep{settings.ngram}"])

    report = {
        "settings": dataclasses.asdict(settings), "length": length, "scorer": scorer.name,
        "sampling_dtype": {name: model_description(name, m).get("dtype", "float32") for name, m in loaded.items()},
        "backend": jax.default_backend(), "rows": rows, "val_losses": val_losses,
    }
    write_report(report, out_dir)
    return report


def _dataset_for(model: Any, data_dir: str | None) -> Any:
    """The dataset a model was trained on (its validation split is what the metrics use)."""
    import ml_collections

    from discreteflow_jax.training.experiment import prepare

    return prepare(ml_collections.ConfigDict(model.config.raw), data_dir)[2]


# ---------------------------------------------------------------------------------------------
# Report files

CSV_FIELDS = ("model", "kind", "causal", "K", "gen_ppl", "nll", "nll_se", "entropy", "entropy_std", "rep",
              "mean_length", "num_empty", "scored_tokens", "num_samples", "length", "val_loss", "sample_s",
              "dtype", "step", "path")


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None or value == "" or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, float):
        return f"{value:,.{digits}f}" if abs(value) < 1e5 else f"{value:.3g}"
    return str(value)


def settings_line(report: dict) -> str:
    s = report["settings"]
    grid = s["schedule"] + (f" (power {s['schedule_param']})" if s["schedule"] == "power" else "")
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
        for title, key, digits in (("Gen-PPL ↓", "gen_ppl", 1), ("Unigram entropy (nats)", "entropy", 2),
                                   (f"Repeated {ngram}-grams", rep, 3)):
            lines += [f"**{title}**", "", "| K | " + " | ".join(names) + " |",
                      "|---:|" + "---:|" * len(names)]
            for k in steps:
                cells = [_fmt(by[(n, k)][key], digits) if (n, k) in by else "–" for n in names]
                lines.append(f"| {k} | " + " | ".join(cells) + " |")
            lines.append("")
    lines += ["**Reference points** (sampled once, scored the same way)", "",
              f"| reference | Gen-PPL | entropy | {rep} |", "|---|---:|---:|---:|"]
    for r in refs:
        what = "autoregressive teacher samples" if r["kind"] == "teacher" else "real validation windows"
        lines.append(f"| {r['model']} ({what}) | {_fmt(r['gen_ppl'], 1)} | {_fmt(r['entropy'])} | "
                     f"{_fmt(r[rep], 3)} |")
    val = report.get("val_losses", {})
    if val:
        lines += ["", "**Validation loss** (each model's own objective: flow cross-entropy for flow models, the "
                  "first t-bucket being where the network does the work; next-token NLL for teachers)", "",
                  "| model | kind | val loss | val loss at t < 0.1 |", "|---|---|---:|---:|"]
        kinds = {r["model"]: r["kind"] + (" causal" if r.get("causal") and r["kind"] != "teacher" else "")
                 for r in rows}
        for name, v in val.items():
            lines.append(f"| {name} | {kinds.get(name, '')} | {_fmt(v.get('loss'), 3)} | "
                         f"{_fmt(v.get('loss_t0.0-0.1'), 3)} |")
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
