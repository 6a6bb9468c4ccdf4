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
from flax import nnx

from discreteflow_jax import flow
from discreteflow_jax import gumbel as gmb
from discreteflow_jax.models.generate import teacher_fns, teacher_inputs
from discreteflow_jax.models.noisy_argmax import noisy_readout
from discreteflow_jax.models.tokenflow import TokenFlow, per_position
from discreteflow_jax.models.warmflow import GumbelInput, whole_noise


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


def kl_per_token(logp: jax.Array, logits: jax.Array) -> jax.Array:
    """KL(teacher ‖ softmax(logits)) per token [B, T] of the teacher's log-probs ``logp``."""
    return jnp.sum(jnp.exp(logp) * (logp - jax.nn.log_softmax(logits, axis=-1)), axis=-1)


def sampler_states(
    model: TokenFlow,
    x0: jax.Array,
    g: jax.Array,
    context: jax.Array | None,
    steps_done: jax.Array,
    grid: jax.Array,
    *,
    noise_tau: float = 0.0,
    chunk: int = 0,
) -> jax.Array:
    """The state x [B, T, d] of the logit-channel sampler (``flow.sample_flow`` with noise ``g``
    [B, T, V], temperature 1) after ``steps_done`` [B] of its steps along ``grid``, no gradient.

    Row b takes the sampler's first ``steps_done[b]`` steps from ``x0[b]`` (at most len(grid) − 2:
    the last step's state is never read). At sampling time the network reads exactly these states,
    built from its own earlier tokens; the clean path t·E[x] + (1 − t)·x0 it is trained on
    otherwise holds the true tokens instead."""
    graphdef, state = nnx.split(model)
    frozen = nnx.merge(graphdef, jax.lax.stop_gradient(state))
    context = None if context is None else jax.lax.stop_gradient(context)
    g = jax.lax.stop_gradient(g)

    def noise_fn(positions: jax.Array) -> jax.Array:
        return jnp.take(g, positions, axis=1)

    def body(i: jax.Array, x: jax.Array) -> jax.Array:
        t, t_next = grid[i], grid[i + 1]
        x1_hat, _ = noisy_readout(frozen, x, jnp.full((x.shape[0],), t), context, noise_fn,
                                  noise_tau=noise_tau, chunk=chunk)
        return jnp.where((i < steps_done)[:, None, None], flow.euler_update(x, x1_hat, t, t_next), x)

    x = jax.lax.fori_loop(0, grid.shape[0] - 2, body, x0.astype(jnp.float32))
    return jax.lax.stop_gradient(x)


def with_sampler_states(
    model: TokenFlow, x_t: jax.Array, t_B: jax.Array, x0: jax.Array, g: jax.Array, context: jax.Array | None,
    key: jax.Array, gumbel: gmb.GumbelConfig, share: float,
) -> tuple[jax.Array, jax.Array]:
    """(x_t, t_B) with the first round(share·B) sequences replaced by the sampler's own states
    (``sampler_states`` on a uniform grid of ``gumbel.rollout_steps`` steps, 1..K−1 steps taken, drawn per
    sequence) and their grid times. t_B keeps its shape ([B] or [B, T])."""
    b = x_t.shape[0]
    n = int(round(share * b))
    if n == 0:
        return x_t, t_B
    steps = gumbel.rollout_steps
    grid = flow.time_grid(steps)
    done = jax.random.randint(key, (n,), 1, steps)
    chunk = gmb.resolve_chunk(x_t.shape[1], n, g.shape[-1], gumbel.chunk_size)
    rolled = sampler_states(model, x0[:n], g[:n], None if context is None else context[:n], done, grid,
                            noise_tau=gumbel.logit_tau, chunk=chunk)
    x_t = x_t.at[:n].set(rolled.astype(x_t.dtype))
    t_rows = grid[done].astype(t_B.dtype)
    t_B = t_B.at[:n].set(t_rows if t_B.ndim == 1 else jnp.broadcast_to(t_rows[:, None], (n, t_B.shape[1])))
    return x_t, t_B


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
    stagger_prob: float = 0.0,
    stagger_width: float = 1.0,
    rollout_prob: float = 0.0,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Masked mean over tokens of KL(p_teacher(· | x_<i) ‖ softmax(h_i)), h the student's network
    logits on x_t (Gaussian x0 unless conditioning="x0"). Known positions (``known_BT``) enter clean
    and are not scored, as in ``flow.flow_loss``. ``rollout_prob`` > 0: that share of the sequences
    enters as the sampler's own state instead (``with_sampler_states``; the target is unchanged:
    the teacher's conditional given the true prefix, whose Gumbel-max under G is the true token).
    Metrics: ``flow.flow_metrics`` of the per-token KL,
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
        t_B = flow.training_times(t_key, tokens.shape, time_sampler, time_param, token_time_prob, warp,
                                  stagger_prob=stagger_prob, stagger_width=stagger_width)
    x1 = model.embed(tokens)
    if x0 is None:
        x0 = model.cfg.sigma * jax.random.normal(x0_key, x1.shape, jnp.float32)
    x_t = flow.noisy_path(x1, x0, t_B)
    if getattr(model.cfg, "g_channel", "none") != "none":
        context = model.g_features(g)  # the G channel: the network reads the noise of the pair
    drafting = getattr(model.cfg, "g_drafts", 0) > 0
    if drafting:  # the drafts read the pair's G as the sampler's do (models/warmflow.py)
        chunk = gmb.resolve_chunk(tokens.shape[1], tokens.shape[0], g.shape[-1], gumbel.chunk_size)
        context = GumbelInput(context, whole_noise(g), chunk)
    if rollout_prob > 0:
        x_t, t_B = with_sampler_states(model, x_t, t_B, x0, g, context, jax.random.fold_in(key, 0x2011),
                                       gumbel, rollout_prob)
    mask = mask_BT.astype(jnp.float32)
    if known_BT is not None:
        x_t = jnp.where(known_BT[..., None], x1, x_t)
        mask = mask * (1.0 - known_BT.astype(jnp.float32))
    align = getattr(model.cfg, "warm_align", 0.0)
    at_drafts: list[jax.Array] = []
    if align > 0 or drafting:  # a warm student: its residual streams are read
        student_hidden, at_drafts = model.hidden_and_drafts(x_t, t_B, context)
        h = model.backbone._logits(student_hidden)
    else:
        h = model(x_t, t_B, context)  # network logits only: the config rejects singular_logits
    kl = kl_per_token(logp, h)  # [B, T]
    count = jnp.maximum(mask.sum(), 1.0)
    loss = jnp.sum(kl * mask) / count
    if align > 0:
        loss = loss + align * alignment_loss(student_hidden, teacher_hidden, mask)
    draft_kl = None
    if at_drafts:  # each draft is a readout of the teacher's conditional too: the same KL, averaged
        draft_kl = sum(kl_per_token(logp, model.backbone._logits(hd)) for hd in at_drafts) / len(at_drafts)
        if gumbel.draft_loss > 0:
            loss = loss + gumbel.draft_loss * jnp.sum(draft_kl * mask) / count
    if warp is not None:
        loss = loss + flow.warp_fit_loss(model.time_warp[...], per_position(t_B)[..., 0], kl, mask)
    metrics = flow.flow_metrics(jax.lax.stop_gradient(kl), mask, t_B, num_buckets)
    agree = (jnp.argmax(jax.lax.stop_gradient(h) + g, axis=-1) == tokens).astype(jnp.float32)
    t_BT = jnp.broadcast_to(per_position(t_B)[..., 0], agree.shape)
    metrics["gumbel_agree_sum"] = jnp.sum(agree * mask)
    if draft_kl is not None:
        metrics["draft_kl_sum"] = jnp.sum(jax.lax.stop_gradient(draft_kl) * mask)
    metrics["bucket_agree_sum"] = flow.bucket_sums(agree, t_BT, mask, num_buckets)[0]
    nll = -jnp.take_along_axis(logp, tokens[..., None], axis=-1)[..., 0]
    # Over every target, known ones included: its own count (``tokens`` counts the scored ones).
    metrics["teacher_nll_sum"] = jnp.sum(nll * mask_BT.astype(jnp.float32))
    metrics["teacher_tokens"] = jnp.sum(mask_BT.astype(jnp.float32))
    return loss, metrics
