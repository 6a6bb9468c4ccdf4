"""What every task hands the trainer (``Task``), and the pieces the flow tasks share: the
per-t-bucket summaries, the validation times and the training-time known positions.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from discreteflow_jax import flow


@dataclasses.dataclass
class Task:
    """What differs between TokenFlow, teacher and Gumbel training.

    create_model(rngs) builds the trainable module. loss_fn(model, aux, tokens, key) returns
    (loss, metric sums) with loss the mean over the ``sums["tokens"]`` scored tokens (gradient
    accumulation weights each micro-batch by that count), and eval_fn(model, aux, tokens, key)
    the metric sums for validation.
    aux holds frozen inputs (a teacher's parameters), passed to the step but never updated.
    sample_fn(graphdef, params, aux, key, steps) returns decoded token arrays; summarize(sums)
    turns summed metrics into the numbers to log. identity: what the task resolved beyond the
    config that a resumed run must match (e.g. the teacher checkpoint's step), stored in checkpoints.
    init_params: see the field.
    """

    name: str
    create_model: Callable[[nnx.Rngs], nnx.Module]
    loss_fn: Callable[..., tuple[jax.Array, dict]]
    eval_fn: Callable[..., dict]
    summarize: Callable[[dict, str], dict]
    sample_fn: Callable[..., jax.Array] | None = None
    aux: Any = None
    aux_shardings: Any = None
    identity: dict = dataclasses.field(default_factory=dict)
    # init_params(params) -> params: the pure parameter dict training starts from, given the random
    # one (a warm-started student takes its teacher's weights here, on the host). None: keep it.
    init_params: Callable[[dict], dict] | None = None


def bucket_edges(num_buckets: int) -> list[str]:
    """Names of the equal t-buckets, "lo-hi" with the fewest decimals (at least one) that keep every
    edge distinct: 10 buckets give 0.0-0.1 … 0.9-1.0, 20 give 0.00-0.05 … 0.95-1.00. Colliding names
    would make the per-bucket metrics overwrite each other."""
    edges = [i / num_buckets for i in range(num_buckets + 1)]
    decimals = 1
    while len({f"{e:.{decimals}f}" for e in edges}) < len(edges):
        decimals += 1
    names = [f"{e:.{decimals}f}" for e in edges]
    return [f"{lo}-{hi}" for lo, hi in zip(names[:-1], names[1:])]


def summarize_flow(sums: dict, prefix: str, num_buckets: int) -> dict[str, float]:
    """Turns summed metrics into the mean loss and the loss per t-bucket (and, when the sums carry
    it, the context gain per t-bucket, see ``context_gain_sums``)."""
    out = {f"{prefix}/loss": float(sums["loss_sum"]) / max(float(sums["tokens"]), 1.0)}
    for metric, total, weights in (("loss", "bucket_loss_sum", "bucket_tokens"),
                                   ("context_gain", "context_gain_sum", "context_tokens")):
        if total not in sums:
            continue
        per_bucket, n_bucket = np.asarray(sums[total]), np.asarray(sums[weights])
        if metric == "context_gain" and n_bucket.sum() > 0:
            out[f"{prefix}/context_gain"] = float(per_bucket.sum() / n_bucket.sum())
        for name, value, n in zip(bucket_edges(num_buckets), per_bucket, n_bucket):
            if n > 0:
                out[f"{prefix}/{metric}_t{name}"] = float(value / n)
    return out


def stratified_times(key: jax.Array, batch: int) -> jax.Array:
    """One t per sequence spread evenly over [0, 1): every t-bucket is covered in validation."""
    return (jnp.arange(batch, dtype=jnp.float32) + jax.random.uniform(key, (batch,))) / batch


def known_positions(fc: Any, shape: tuple[int, ...], key: jax.Array) -> jax.Array | None:
    """Training-time conditioning mask (``flow.condition_prob``), or None when it is off so the
    default step stays exactly as before. Its own key stream: the noise and times do not change."""
    if fc.condition_prob <= 0:
        return None
    return flow.random_known_mask(
        jax.random.fold_in(key, 0xC0D), shape[0], shape[1], fc.condition_prob, fc.condition_prefix_prob,
        fc.condition_span_len,
    )
