"""The logit-channel Gumbel student's training loss: its network logits are distilled to the
teacher's conditional.

h on the plain flow path is matched to ℓ_i = log p_teacher(· | x_<i) by the masked mean
KL(teacher ‖ student) per token; G enters at sampling time only, as argmax(h + G)
(``gumbel_sampling.sample_gumbel_flow``). Why G enters through the logits: docs/gumbel_channel.md.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from discreteflow_jax import flow
from discreteflow_jax import gumbel as gmb
from discreteflow_jax.models.generate import teacher_fns, teacher_inputs
from discreteflow_jax.models.tokenflow import TokenFlow, per_position


def teacher_log_probs(teacher: Any, tokens_BT: jax.Array, bos_id: int) -> jax.Array:
    """ℓ [B, T, V] fp32 with ℓ[:, i] = log p_teacher(· | [BOS] + x_<i), no gradient."""
    return teacher_pass(teacher, tokens_BT, bos_id)[0]


def teacher_pass(teacher: Any, tokens_BT: jax.Array, bos_id: int) -> tuple[jax.Array, jax.Array]:
    """(ℓ [B, T, V], the teacher's last residual stream [B, T, D]) on [BOS] + x[:−1], no gradient."""
    fns = teacher_fns(teacher)
    hidden = jax.lax.stop_gradient(fns.hidden(teacher_inputs(tokens_BT, bos_id)))
    return jax.lax.stop_gradient(gmb.log_probs(fns.head(hidden))), hidden


def alignment_loss(student_hidden: jax.Array, teacher_hidden: jax.Array, mask_BT: jax.Array) -> jax.Array:
    """Masked mean of 1 − cos(student, teacher) between last residual streams (representation
    alignment to the frozen teacher, docs/warm_start.md)."""
    s = student_hidden.astype(jnp.float32)
    t = teacher_hidden.astype(jnp.float32)
    cos = jnp.sum(s * t, -1) * jax.lax.rsqrt(jnp.sum(s * s, -1) * jnp.sum(t * t, -1) + 1e-12)
    return jnp.sum((1.0 - cos) * mask_BT) / jnp.maximum(mask_BT.sum(), 1.0)


def distill_pairs(
    model: TokenFlow,
    teacher: Any,
    tokens_BT: jax.Array,
    key: jax.Array,
    gumbel: gmb.GumbelConfig,
    *,
    bos_id: int,
    source: str,
) -> tuple[jax.Array, jax.Array | None, jax.Array | None, jax.Array, jax.Array, jax.Array]:
    """(tokens, x0 or None, context or None, ℓ [B, T, V], G [B, T, V], the teacher's last residual
    stream [B, T, D]) of one batch: G is the noise
    whose Gumbel-max under ℓ gives the tokens (the exact posterior for data, the prior draws for
    teacher samples), from the same draws the context (if any) is built from."""
    b, t = tokens_BT.shape
    v = model.cfg.vocab_size
    if gumbel.conditioning == "none":
        if source == "teacher_sample":
            tokens_BT = jax.lax.stop_gradient(gmb.teacher_sample_tokens(teacher, key, b, t, bos_id, v)[0])
        elif source != "data_posterior":
            raise ValueError(f"unknown Gumbel source {source!r}; valid: {', '.join(gmb.SOURCES)}")
        x0, context = None, None
    else:
        tokens_BT, ctx, _ = gmb.gumbel_pairs(model, teacher, tokens_BT, key, gumbel, bos_id=bos_id, source=source)
        x0, context = gmb.student_inputs(model, ctx, gumbel)
    logp, teacher_hidden = teacher_pass(teacher, tokens_BT, bos_id)
    if source == "teacher_sample":
        g = gmb.sample_prior(key, b, t, v)
    else:
        g = gmb.posterior_from_draws(logp, tokens_BT, *gmb.chunk_draws(key, jnp.arange(t), b, v))
    return tokens_BT, x0, context, logp, g, teacher_hidden


def gumbel_distill_loss(
    model: TokenFlow,
    teacher: Any,
    tokens_BT: jax.Array,
    mask_BT: jax.Array,
    key: jax.Array,
    gumbel: gmb.GumbelConfig,
    *,
    bos_id: int,
    source: str | None = None,
    time_sampler: str = "uniform",
    time_param: float = 1.0,
    num_buckets: int = 10,
    t_B: jax.Array | None = None,
    known_BT: jax.Array | None = None,
    token_time_prob: float = 0.0,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Masked mean over tokens of KL(p_teacher(· | x_<i) ‖ softmax(h_i)), h the student's network
    logits on x_t (Gaussian x0 unless conditioning="x0"). Known positions (``known_BT``) enter clean
    and are not scored, as in ``flow.flow_loss``. Metrics: ``flow.flow_metrics`` of the per-token KL,
    ``teacher_nll_sum`` over ``teacher_tokens`` targets, ``gumbel_agree_sum`` = Σ mask·[argmax(h + G) = x]
    (how often a sampler at that t would emit the teacher's token for the same G) and its t-buckets
    ``bucket_agree_sum``."""
    noise_key, flow_key = jax.random.split(key)
    t_key, x0_key = jax.random.split(flow_key)
    tokens, x0, context, logp, g, teacher_hidden = distill_pairs(
        model, teacher, tokens_BT, noise_key, gumbel, bos_id=bos_id, source=source or gumbel.source
    )
    warp = model.time_warp[...] if model.time_warp is not None else None
    if t_B is None:
        t_B = flow.training_times(t_key, tokens.shape, time_sampler, time_param, token_time_prob, warp)
    x1 = model.embed(tokens)
    if x0 is None:
        x0 = model.cfg.sigma * jax.random.normal(x0_key, x1.shape, jnp.float32)
    x_t = flow.noisy_path(x1, x0, t_B)
    mask = mask_BT.astype(jnp.float32)
    if known_BT is not None:
        x_t = jnp.where(known_BT[..., None], x1, x_t)
        mask = mask * (1.0 - known_BT.astype(jnp.float32))
    if getattr(model.cfg, "g_channel", "none") != "none":
        context = model.g_features(g)  # the G channel: the network reads the noise of the pair
    align = getattr(model.cfg, "warm_align", 0.0)
    if align > 0:  # a warm student: its last residual stream is aligned with the teacher's
        student_hidden = model.hidden(x_t, t_B, context)
        h = model.backbone._logits(student_hidden)
    else:
        h = model(x_t, t_B, context)  # network logits only: the config rejects singular_logits
    kl = jnp.sum(jnp.exp(logp) * (logp - jax.nn.log_softmax(h, axis=-1)), axis=-1)  # [B, T]
    loss = jnp.sum(kl * mask) / jnp.maximum(mask.sum(), 1.0)
    if align > 0:
        loss = loss + align * alignment_loss(student_hidden, teacher_hidden, mask)
    if warp is not None:
        loss = loss + flow.warp_fit_loss(model.time_warp[...], per_position(t_B)[..., 0], kl, mask)
    metrics = flow.flow_metrics(jax.lax.stop_gradient(kl), mask, t_B, num_buckets)
    agree = (jnp.argmax(jax.lax.stop_gradient(h) + g, axis=-1) == tokens).astype(jnp.float32)
    t_BT = jnp.broadcast_to(per_position(t_B)[..., 0], agree.shape)
    metrics["gumbel_agree_sum"] = jnp.sum(agree * mask)
    metrics["bucket_agree_sum"] = flow.bucket_sums(agree, t_BT, mask, num_buckets)[0]
    nll = -jnp.take_along_axis(logp, tokens[..., None], axis=-1)[..., 0]
    # Over every target, known ones included: its own count (``tokens`` counts the scored ones).
    metrics["teacher_nll_sum"] = jnp.sum(nll * mask_BT.astype(jnp.float32))
    metrics["teacher_tokens"] = jnp.sum(mask_BT.astype(jnp.float32))
    return loss, metrics
