"""Task definitions plugged into the generic trainer: which model, loss, eval and sampler."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from discreteflow_jax import flow
from discreteflow_jax.config import ExperimentConfig
from discreteflow_jax.models.tokenflow import TokenFlow
from discreteflow_jax.training.trainer import Task


def bucket_edges(num_buckets: int) -> list[str]:
    return [f"{i / num_buckets:.1f}-{(i + 1) / num_buckets:.1f}" for i in range(num_buckets)]


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


def context_gain_sums(
    model: TokenFlow, x_t: jax.Array, t_B: jax.Array, tokens_BT: jax.Array, intact_ce_BT: jax.Array,
    num_buckets: int,
) -> dict[str, jax.Array]:
    """How much the network's predictions rely on the surrounding text, per t-bucket.

    Every odd position of x_t is replaced by the same position of another sequence of the batch
    (the previous row), and the cross-entropy on the even positions, whose own inputs are
    unchanged, is compared with that on the intact sequence: gain = CE(scrambled) − CE(intact).
    A network that denoises each position on its own (the unigram prior times the singular
    likelihood is the best such network) gains exactly 0. The mean flow loss cannot show the
    difference; this number can. ``intact_ce_BT`` is the per-token loss at ``x_t`` itself (the
    validation loss already computes it), so this costs one more forward pass. Token-weighted
    sums, like ``flow.flow_loss``'s metrics.
    """
    b, t = tokens_BT.shape
    if b < 2:  # no other sequence to borrow from
        zeros = jnp.zeros((num_buckets,), jnp.float32)
        return {"context_gain_sum": zeros, "context_tokens": zeros}
    keep = jnp.arange(t) % 2 == 0
    scrambled = jnp.where(keep[None, :, None], x_t, jnp.roll(x_t, 1, axis=0))
    # Through the model's loss path: with ``loss_chunk`` set, no [B, T, V] logits are formed here
    # either (validation batches are whole batches, not micro-batches).
    scrambled_ce = model.token_losses(scrambled, t_B, tokens_BT, jnp.ones(tokens_BT.shape, jnp.float32))[1]
    weight = keep.astype(jnp.float32)
    kept = jnp.sum(weight)
    gain_B = jnp.sum((scrambled_ce - intact_ce_BT) * weight, axis=1) / kept
    gain_sum, tokens = flow.bucket_sums(gain_B, t_B, jnp.full((b,), kept), num_buckets)
    return {"context_gain_sum": gain_sum, "context_tokens": tokens}


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


def tokenflow_task(cfg: ExperimentConfig) -> Task:
    fc = cfg.flow

    def create_model(rngs: nnx.Rngs) -> TokenFlow:
        return TokenFlow(cfg.model, rngs=rngs)

    def loss_fn(model: TokenFlow, aux: Any, tokens: jax.Array, key: jax.Array):
        mask = jnp.ones(tokens.shape, jnp.float32)
        return flow.flow_loss(
            model, tokens, mask, key, time_sampler=fc.time_sampler, time_param=fc.time_param,
            num_buckets=fc.num_buckets, known_BT=known_positions(fc, tokens.shape, key),
            token_time_prob=fc.token_time_prob,
        )

    def eval_fn(model: TokenFlow, aux: Any, tokens: jax.Array, key: jax.Array):
        mask = jnp.ones(tokens.shape, jnp.float32)
        t = stratified_times(jax.random.fold_in(key, 1), tokens.shape[0])
        # One forward pass at x_t serves the validation loss and the context gain; x_t uses the
        # noise flow_loss would draw from this key.
        x1 = model.embed(tokens)
        x0 = model.cfg.sigma * jax.random.normal(jax.random.split(key)[1], x1.shape, jnp.float32)
        x_t = flow.noisy_path(x1, x0, t)
        intact_ce = model.token_losses(x_t, t, tokens, mask)[1]
        sums = flow.flow_metrics(intact_ce, mask, t, fc.num_buckets)
        return dict(sums, **context_gain_sums(model, x_t, t, tokens, intact_ce, fc.num_buckets))

    sample_cache: dict[int, Any] = {}

    def sample_fn(graphdef: Any, params: Any, aux: Any, key: jax.Array, steps: int) -> jax.Array:
        if steps not in sample_cache:
            grid = flow.time_grid(steps, cfg.sample.schedule, cfg.sample.schedule_param)

            def run(params, key):
                model = nnx.merge(graphdef, params)
                x0 = flow.gaussian_source(key, cfg.sample.num_samples, cfg.data.seq_len, model)
                return flow.sample_flow(model, x0, grid, temperature=cfg.sample.temperature)[0]

            sample_cache[steps] = jax.jit(run)
        return sample_cache[steps](params, key)

    return Task(
        name="tokenflow",
        create_model=create_model,
        loss_fn=loss_fn,
        eval_fn=eval_fn,
        summarize=lambda sums, prefix: summarize_flow(sums, prefix, fc.num_buckets),
        sample_fn=sample_fn,
    )


def _teacher_task(cfg: ExperimentConfig, **kwargs: Any) -> Task:
    from discreteflow_jax.tasks.teacher import teacher_task

    return teacher_task(cfg, **kwargs)


def _gumbel_task(cfg: ExperimentConfig, **kwargs: Any) -> Task:
    from discreteflow_jax.tasks.gumbel import gumbel_task

    return gumbel_task(cfg, **kwargs)


TASK_BUILDERS = {"tokenflow": tokenflow_task, "teacher": _teacher_task, "gumbel": _gumbel_task}


def build_task(cfg: ExperimentConfig, **kwargs: Any) -> Task:
    if cfg.task not in TASK_BUILDERS:
        raise ValueError(f"task {cfg.task!r} is not available; valid tasks: {', '.join(sorted(TASK_BUILDERS))}")
    return TASK_BUILDERS[cfg.task](cfg, **kwargs)
