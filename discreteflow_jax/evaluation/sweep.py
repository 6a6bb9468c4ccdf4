"""The steps-vs-quality sweep behind ``python -m discreteflow_jax.evaluate sweep``: every flow model
sampled at every K (and every teacher once), scored by Gen-PPL, entropy and repeated n-grams,
with each model's validation loss; the report files are written by ``evaluation.report``.

Autoregressive models among the models (teachers) are sampled once (K does not apply; temperature
1 by default) and scored the same way: the reference point. Real validation windows of the same
length are scored as a second reference. Fixed seeds, no selection: every flow model samples
``num_samples`` sequences at every K from the same seed (batch i uses ``batch_seed(seed, i)``).
All samples are cut to one common length, so entropies are comparable: one token less than the
shortest context among the models (the slot a teacher spends on BOS), so that adding a teacher of
the same context leaves the length, and so every cached cell, as it is. Finished cells are cached in
``<out>/cells`` and reused only when their settings, scorer, length and checkpoint step are identical.
Each model's validation loss is its own training objective, named per row (``val_objective``).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from typing import Any

import jax
import ml_collections
import numpy as np

from discreteflow_jax.data.tokenizers import Tokenizer
from discreteflow_jax.evaluation.genppl import Scorer
from discreteflow_jax.evaluation.metrics import (
    sample_statistics,
    truncate_at_eos,
    validation_loss,
    validation_objective,
)
from discreteflow_jax.evaluation.quality import mauve_score, search_temperature, shuffle_positions
from discreteflow_jax.evaluation.report import cached, cached_cell, cell_key, write_report
from discreteflow_jax.flow import TIME_GRIDS
from discreteflow_jax.inference.batches import sample_batches
from discreteflow_jax.inference.load import load
from discreteflow_jax.inference.teacher_model import is_autoregressive
from discreteflow_jax.training.experiment import prepare

log = logging.getLogger("discreteflow_jax")

DEFAULT_STEPS = (1, 2, 4, 8, 16, 32, 128)
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
    stagger: float | None = None  # flow models: > 0 denoises left positions first; None: each model's config
    teacher_temperature: float = 1.0  # autoregressive models: ancestral sampling temperature
    ngram: int = 4
    length: int = 0  # 0: the shortest sample length among the models
    mauve: bool = True  # MAUVE of each cell against the validation text (scorer features)
    match_entropy: bool = True  # Gen-PPL at the temperature matching the validation text's entropy
    match_evals: int = 4  # at most this many extra sampling runs per cell for that search
    polish_steps: int = 0  # logit-channel students: Jacobi calls after the K flow steps (gumbel_sampling.polish)

    def validate(self) -> None:
        if not self.steps or min(self.steps) < 1:
            raise ValueError(f"--steps must be positive integers, got {self.steps}")
        if self.num_samples < 1 or self.batch_size < 1:
            raise ValueError("--num_samples and --batch_size must be >= 1")
        if self.schedule not in TIME_GRIDS:
            raise ValueError(f"--schedule must be one of {', '.join(TIME_GRIDS)}, got {self.schedule!r}")
        if self.temperature <= 0 or self.teacher_temperature <= 0:
            raise ValueError("temperatures must be > 0")
        if self.stagger is not None and not 0 <= self.stagger < float("inf"):
            raise ValueError(f"--stagger must be a finite number >= 0, got {self.stagger}")
        if self.polish_steps < 0:
            raise ValueError(f"--polish_steps must be >= 0, got {self.polish_steps}")
        if self.ngram < 1 or self.length < 0:
            raise ValueError("--ngram must be >= 1 and --length >= 0")


def draw_samples(model: Any, steps: int | None, settings: SweepSettings, length: int,
                 temperature: float | None = None) -> np.ndarray:
    """[num_samples, length] token ids, in batches of ``settings.batch_size`` with per-batch seeds
    (``inference.batches.sample_batches``: ``python -m discreteflow_jax.sample`` draws the same rows
    when given the same K, seed, batch size, temperature, schedule and stagger)."""
    if is_autoregressive(model):
        tau = settings.teacher_temperature if temperature is None else temperature
        kwargs: dict[str, Any] = {"temperature": tau, "length": model.sample_length}
        steps = None
    else:
        kwargs = {"schedule": settings.schedule, "schedule_param": settings.schedule_param,
                  "temperature": settings.temperature if temperature is None else temperature,
                  "stagger": settings.stagger}
        if settings.polish_steps:
            kwargs["polish_steps"] = settings.polish_steps
    rows = sample_batches(model, settings.num_samples, steps, settings.seed, batch_size=settings.batch_size, **kwargs)
    return rows[:, :length]


def model_description(name: str, model: Any) -> dict[str, Any]:
    cfg = model.config
    kind = "teacher" if is_autoregressive(model) else model.kind
    desc = {"model": name, "kind": kind, "path": str(model.source), "step": model.step}
    if cfg is not None:
        desc["causal"] = bool(getattr(cfg.model, "causal", True))
        desc["dtype"] = str(getattr(cfg.model, "dtype", "float32"))
    return desc


@dataclasses.dataclass(frozen=True)
class Reference:
    """What every cell is compared with: the validation text's entropy and scorer features."""

    entropy: float
    features: np.ndarray | None  # None: no MAUVE


def mauve_against(scorer: Scorer, tokens: np.ndarray, tokenizer: Tokenizer, text_features: np.ndarray,
                  settings: SweepSettings) -> float:
    """MAUVE of token rows against the held-out text's scorer features (rounded for the table)."""
    feats = scorer.features(scorer.prepare(tokens, tokenizer))
    return round(mauve_score(feats, text_features, seed=settings.seed + 25), 4)


def quality_columns(model: Any, steps: int | None, tokens: np.ndarray, plain: dict[str, Any], scorer: Scorer,
                    settings: SweepSettings, length: int, reference: Reference | None) -> dict[str, Any]:
    """MAUVE of the cell's samples and its matched-entropy Gen-PPL (``evaluation.quality``)."""
    out: dict[str, Any] = {}
    if reference is None:
        return out
    # The same samples with positions shuffled across samples (cut to the common length, EOS kept):
    # how much of the Gen-PPL comes from positions that depend on each other.
    out["shuffled_gen_ppl"] = scorer.score(shuffle_positions(tokens, settings.seed), model.tokenizer)["gen_ppl"]
    if settings.mauve and reference.features is not None:
        out["mauve"] = mauve_against(scorer, tokens, model.tokenizer, reference.features, settings)
    if settings.match_entropy:
        def at(tau: float) -> tuple[float, float]:
            rows = draw_samples(model, steps, settings, length, temperature=tau)
            cut = [truncate_at_eos(r, model.tokenizer.eos_id) for r in rows]
            return sample_statistics(cut, settings.ngram)["entropy"], scorer.score(rows, model.tokenizer)["gen_ppl"]

        tau0 = settings.teacher_temperature if is_autoregressive(model) else settings.temperature
        first = (tau0, plain["entropy"], plain["gen_ppl"])
        out.update(search_temperature(at, reference.entropy, first=first, max_evals=settings.match_evals))
    return out


def evaluate_cell(model: Any, name: str, steps: int | None, scorer: Scorer, settings: SweepSettings,
                  length: int, reference: Reference | None = None) -> tuple[dict[str, Any], list[str]]:
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
    if not is_autoregressive(model):  # the stagger this cell was sampled with
        row["stagger"] = float(model.config.sample.stagger if settings.stagger is None else settings.stagger)
        row["polish"] = settings.polish_steps  # network calls per sample: K + polish
    row.update(quality_columns(model, steps, tokens, row, scorer, settings, length, reference))
    texts = [model.tokenizer.decode(ids) for ids in cut]
    return row, texts


def validation_windows(dataset: Any, settings: SweepSettings, length: int, held_out: bool = False) -> np.ndarray:
    """num_samples real validation windows cut to ``length``, evenly spread. ``held_out``: windows
    that share no token with those (each starts half-way between two of them, so there is one
    fewer): MAUVE's real text,
    so that the reference row's MAUVE compares two disjoint sets of real text."""
    if not held_out:
        return np.asarray(dataset.val_batches(settings.num_samples, 1)[0])[:, :length]
    if hasattr(dataset, "val_offsets") and hasattr(dataset, "val_tokens"):
        offsets = np.asarray(dataset.val_offsets(settings.num_samples, 1)[0])
        gap = int(np.min(np.diff(offsets))) if len(offsets) > 1 else 0
        if gap >= 2 * length:  # half-way between neighbours: one window fewer than the reference set
            starts = offsets[:-1] + gap // 2
            return np.asarray(dataset.val_tokens)[starts[:, None] + np.arange(length)]
    # Other datasets: a second batch of windows (they can overlap the first where the split is short).
    return np.asarray(dataset.val_batches(settings.num_samples, 2)[1])[:, :length]


def reference_row(dataset: Any, tokenizer: Tokenizer, scorer: Scorer, settings: SweepSettings,
                  length: int, text_features: np.ndarray | None = None) -> tuple[dict[str, Any], list[str]]:
    """The same metrics on real validation windows (evenly spread, num_samples of them); with a
    ``text_features`` (MAUVE features of other held-out windows) its MAUVE is real text against real text."""
    windows = validation_windows(dataset, settings, length)
    cut = [truncate_at_eos(row, tokenizer.eos_id) for row in windows]
    row = {
        "model": "validation text", "kind": "data", "path": "", "step": "", "K": "",
        "num_samples": len(cut), "length": length,
        **scorer.score(windows, tokenizer), **sample_statistics(cut, settings.ngram), "sample_s": 0.0,
    }
    if text_features is not None and settings.mauve:
        row["mauve"] = mauve_against(scorer, windows, tokenizer, text_features, settings)
    return row, [tokenizer.decode(ids) for ids in cut]


def _cell_identity(model_row: dict, settings: SweepSettings, scorer: Scorer, length: int) -> dict:
    """What a cached cell must agree on to be reused (K is added per cell)."""
    return {"settings": dataclasses.asdict(settings) | {"steps": None}, "scorer": scorer.name, "length": length,
            "path": model_row.get("path"), "step": model_row.get("step")}


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


def check_model_dirs(models: dict[str, str]) -> None:
    """Raises ValueError for a ``--models`` path that is not a directory, before anything is loaded."""
    for name, path in models.items():
        if not os.path.isdir(os.path.expanduser(path)):
            raise ValueError(f"--models: {name}={path} is not a directory (a training workdir or an export)")


def run_sweep(models: dict[str, str], scorer_spec: str, settings: SweepSettings, out_dir: str,
              data_dir: str | None = None, scorer_tokenizer: str | None = None,
              scorer_batch_size: int = 32) -> dict[str, Any]:
    """Evaluates every flow model at every K (and every teacher once), writes the report files."""
    settings.validate()
    check_model_dirs(models)
    if settings.num_samples < MIN_STUDY_SAMPLES:
        log.warning("num_samples=%d < %d: fine for a smoke test, too few for reported numbers",
                    settings.num_samples, MIN_STUDY_SAMPLES)
    scorer = Scorer.load(scorer_spec, data_dir, tokenizer=scorer_tokenizer, batch_size=scorer_batch_size)
    loaded = {name: load(path, data_dir) for name, path in models.items()}
    if not any(is_autoregressive(m) for m in loaded.values()):
        log.warning("no autoregressive teacher among --models: the table will have no teacher reference")
    if settings.polish_steps:  # before any sampling: only logit-channel students polish
        for model in loaded.values():
            if not is_autoregressive(model):
                model.check_polish(settings.polish_steps)
    length = settings.length or default_length(loaded.values())
    too_short = [n for n, m in loaded.items() if m.sample_length < length]
    if too_short:
        raise ValueError(f"--length={length} is longer than the samples of {', '.join(too_short)}")
    os.makedirs(os.path.join(out_dir, "samples"), exist_ok=True)

    rows: list[dict[str, Any]] = []
    val_losses: dict[str, dict[str, float]] = {}
    objectives = {name: validation_objective(model) for name, model in loaded.items()}
    # Real text from a flow model's data when there is one: the listing order of teachers does not matter.
    first = next((m for m in loaded.values() if not is_autoregressive(m)), next(iter(loaded.values())))
    dataset = dataset_for(first, data_dir)
    ref_identity = {"settings": dataclasses.asdict(settings) | {"steps": None}, "scorer": scorer.name,
                    "length": length, "data": first.config.raw.get("data")}
    held_out = validation_windows(dataset, settings, length, held_out=True)  # MAUVE's real text
    features = scorer.features(scorer.prepare(held_out, first.tokenizer)) if settings.mauve else None
    ref_row = cached_cell(out_dir, "validation_text", ref_identity,
                          lambda: reference_row(dataset, first.tokenizer, scorer, settings, length, features))
    rows.append(ref_row)
    reference = Reference(entropy=float(ref_row["entropy"]), features=features)
    for name, model in loaded.items():
        desc = model_description(name, model)
        identity = _cell_identity(desc, settings, scorer, length)
        val_key = os.path.join(out_dir, "cells", f"{cell_key(name, None)}_val.json")
        # The validation loss depends on the checkpoint only, not on the sampling settings.
        val_losses[name] = cached(val_key, {"path": desc["path"], "step": desc["step"]},
                                  lambda m=model: validation_loss(m, dataset_for(m, data_dir)))
        ks: list[int | None] = [None] if is_autoregressive(model) else list(settings.steps)
        for k in ks:
            log.info("evaluating %s at K=%s", name, k if k is not None else "(autoregressive)")
            cell = cached_cell(out_dir, cell_key(name, k), identity | {"K": k},
                               lambda m=model, n=name, k=k: evaluate_cell(m, n, k, scorer, settings, length,
                                                                          reference))
            cell["val_loss"] = val_losses[name].get("loss", math.nan)
            cell["val_objective"] = objectives[name]
            rows.append(cell)
            log.info("%s K=%s: Gen-PPL %.2f entropy %.3f rep%d %.3f MAUVE %s matched Gen-PPL %s", name,
                     cell["K"] or "-", cell["gen_ppl"], cell["entropy"], settings.ngram, cell[f"rep{settings.ngram}"],
                     cell.get("mauve", "-"), cell.get("matched_gen_ppl", "-"))

    report = {
        "settings": dataclasses.asdict(settings), "length": length, "scorer": scorer.name,
        "sampling_dtype": {name: model_description(name, m).get("dtype", "float32") for name, m in loaded.items()},
        "backend": jax.default_backend(), "rows": rows, "val_losses": val_losses, "val_objectives": objectives,
    }
    write_report(report, out_dir)
    return report


def default_length(models: Any) -> int:
    """One token less than the shortest context among ``models`` (and no more than any model samples):
    a teacher spends one context slot on BOS, so its samples are that long, and adding it to a sweep
    of flow models with the same context changes neither the length nor their cached cells."""
    return min(min(m.sample_length, m.seq_len - 1) for m in models)


def dataset_for(model: Any, data_dir: str | None) -> Any:
    """The dataset a model was trained on (its validation split is what the metrics use)."""
    return prepare(ml_collections.ConfigDict(model.config.raw), data_dir)[2]
