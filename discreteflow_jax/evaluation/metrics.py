"""Statistics of samples and a model's validation loss.

* **Entropy** = unigram entropy (nats) of each sample's own token counts, averaged over samples.
  Low entropy exposes repetitive text that fools Gen-PPL. Its value depends on the length (at
  most ln(length)), so compare samples of one length.
* **Repeated n-grams** = the fraction of a sample's n-grams (n = 4 by default) that already occurred
  earlier in the same sample, averaged over samples.
* **Validation loss**: each model's own training objective on the validation windows training uses.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from discreteflow_jax.inference.teacher_model import is_autoregressive
from discreteflow_jax.tasks import build_task
from discreteflow_jax.training.steps import build_eval_step
from discreteflow_jax.training.trainer import stream_key, validation_batches


def truncate_at_eos(ids: Sequence[int], eos_id: int | None) -> list[int]:
    """The ids before the first EOS (all of them when there is none)."""
    ids = [int(i) for i in np.asarray(ids).reshape(-1)]
    if eos_id is not None and eos_id in ids:
        ids = ids[: ids.index(eos_id)]
    return ids


def unigram_entropy(ids: Sequence[int]) -> float:
    """Entropy (nats) of the empirical distribution of one sample's tokens; 0 for an empty sample."""
    counts = np.asarray(list(Counter(int(i) for i in ids).values()), np.float64)
    if counts.size == 0:
        return 0.0
    p = counts / counts.sum()
    return float(-(p * np.log(p)).sum())


def repeated_ngram_rate(ids: Sequence[int], n: int = 4) -> float:
    """Fraction of the sample's n-grams that occurred earlier in the same sample; NaN below n tokens."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    ids = [int(i) for i in ids]
    grams = [tuple(ids[i : i + n]) for i in range(len(ids) - n + 1)]
    if not grams:
        return math.nan
    return 1.0 - len(set(grams)) / len(grams)


def sample_statistics(samples: Sequence[Sequence[int]], ngram: int = 4) -> dict[str, float]:
    """Mean unigram entropy and repeated-n-gram rate over samples (already cut at EOS).

    Empty samples (EOS first) count as entropy 0 in the mean: a sampler that stops at once is
    degenerate, and leaving it out would flatter it. ``num_empty`` says how many there were.
    """
    if not samples:
        raise ValueError("no samples to evaluate")
    entropies = np.asarray([unigram_entropy(s) for s in samples])
    rates = np.asarray([repeated_ngram_rate(s, ngram) for s in samples])
    lengths = np.asarray([len(s) for s in samples])
    valid = ~np.isnan(rates)
    return {
        "entropy": float(entropies.mean()),
        "entropy_std": float(entropies.std()),
        f"rep{ngram}": float(rates[valid].mean()) if valid.any() else math.nan,
        "mean_length": float(lengths.mean()),
        "num_empty": int((lengths == 0).sum()),
    }


OBJECTIVES = {"flow": "flow cross-entropy", "logit": "KL to the teacher", "teacher": "next-token NLL"}


def validation_objective(model: Any) -> str:
    """What ``validation_loss(model)["loss"]`` measures: the flow cross-entropy of a flow model, the
    KL to the teacher's conditional of a logit-channel student, a teacher's next-token NLL. Values of
    different objectives are not comparable."""
    if is_autoregressive(model):
        return OBJECTIVES["teacher"]
    gumbel = (model.config.extra.get("gumbel") or {}) if model.kind == "gumbel" else {}
    return OBJECTIVES["logit" if gumbel.get("logit_channel") else "flow"]


def validation_loss(model: Any, dataset: Any) -> dict[str, float]:
    """The validation metrics training logs (same windows, same eval key): flow loss and its
    t-buckets for flow models, next-token loss and perplexity for teachers."""
    cfg = model.config
    task = build_task(cfg)
    if is_autoregressive(model):
        graphdef, params = nnx.split(model.module)
    else:
        graphdef, params = model.graphdef, model.params

    # The trainer's eval step: with grad_accum > 1 it runs micro-batches, each with its own key.
    eval_step = jax.jit(build_eval_step(task, graphdef, cfg.train.grad_accum))

    eval_key = stream_key(cfg.seed, "eval")  # the key Trainer.evaluate uses
    sums = None
    for i, batch in enumerate(validation_batches(dataset, cfg.train.batch_size, cfg.train.eval_batches)):
        out = eval_step(params, task.aux, jnp.asarray(batch, jnp.int32), jax.random.fold_in(eval_key, i))
        sums = out if sums is None else jax.tree.map(jnp.add, sums, out)
    summary = task.summarize(jax.device_get(sums), "val")
    return {k.removeprefix("val/"): float(v) for k, v in summary.items()}
