"""The ``tokenflow`` task (experiments 1.x): a TokenFlow trained with the flow loss on data,
validated per t-bucket together with how much its predictions use the surrounding text.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from discreteflow_jax import flow
from discreteflow_jax.config import ExperimentConfig
from discreteflow_jax.models.tokenflow import TokenFlow
from discreteflow_jax.tasks.base import Task, known_positions, stratified_times, summarize_flow
from discreteflow_jax.tasks.students import check_teacher, load_teacher_bundle, student_factory


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


def tokenflow_task(cfg: ExperimentConfig, teacher: Any | None = None) -> Task:
    """TokenFlow task. A warm-started student (``model.warm_start``) loads the teacher named by
    ``config.teacher`` (or takes ``teacher``, a ``TeacherBundle``: tests, benchmarks)."""
    fc = cfg.flow
    if cfg.model.warm_start and teacher is None:
        teacher = load_teacher_bundle(cfg)
    if teacher is not None:
        check_teacher(teacher, cfg.model, cfg.data.seq_len, cfg.data.tokenizer)
    factory = student_factory(cfg.model, teacher if cfg.model.warm_start else None)

    def loss_fn(model: TokenFlow, aux: Any, tokens: jax.Array, key: jax.Array):
        mask = jnp.ones(tokens.shape, jnp.float32)
        return flow.flow_loss(
            model, tokens, mask, key, time_sampler=fc.time_sampler, time_param=fc.time_param,
            num_buckets=fc.num_buckets, known_BT=known_positions(fc, tokens.shape, key),
            token_time_prob=fc.token_time_prob, stagger_prob=fc.stagger_prob, stagger_width=fc.stagger_width,
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
                return flow.sample_flow(model, x0, grid, temperature=cfg.sample.temperature,
                                        stagger=cfg.sample.stagger)[0]

            sample_cache[steps] = jax.jit(run)
        return sample_cache[steps](params, key)

    return Task(
        name="tokenflow",
        create_model=factory.create_model,
        init_params=factory.init_params,
        identity=factory.identity,
        loss_fn=loss_fn,
        eval_fn=eval_fn,
        summarize=lambda sums, prefix: summarize_flow(sums, prefix, fc.num_buckets),
        sample_fn=sample_fn,
    )
