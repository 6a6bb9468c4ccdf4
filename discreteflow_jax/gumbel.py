"""Gumbel reflow: the Gumbel prior, the exact posterior of G given the token a teacher emitted,
its chunked reduction to what the student sees (softmax(G/τ)·E), and the loss and sampler of a
Gumbel-conditioned TokenFlow. Pure functions (docs/math.md#gumbel-posterior, docs/gumbel.md).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from discreteflow_jax import flow
from discreteflow_jax.config.gumbel import (  # noqa: F401  (re-exported: gumbel.parse_gumbel_config, ...)
    CONDITIONINGS,
    SOURCES,
    GumbelConfig,
    parse_gumbel_config,
    student_config,
)
from discreteflow_jax.models import sharding as shd
from discreteflow_jax.models.generate import TeacherFns, teacher_fns, teacher_inputs
from discreteflow_jax.models.tokenflow import TokenFlow

# Log-probabilities below this are treated as equal to it: a token this unlikely never wins an
# argmax, and a finite floor keeps M − ℓ finite when a teacher assigns exactly zero (−inf).
LOGP_FLOOR = -1e4
# Target size (elements) of one chunk's [B, chunk, V] temporaries when chunk_size = 0.
AUTO_CHUNK_ELEMENTS = 1 << 24


# ---------------------------------------------------------------------------------------------
# Noise: prior and exact posterior


def position_key(key: jax.Array, position: jax.Array | int) -> jax.Array:
    """The key of one sequence position: every draw for position i derives from it."""
    return jax.random.fold_in(key, position)


def prior_draw(key: jax.Array, position: jax.Array | int, batch: int, vocab: int) -> jax.Array:
    """Standard Gumbel noise of one position, [B, V] fp32 (also ξ of the posterior)."""
    return jax.random.gumbel(position_key(key, position), (batch, vocab), jnp.float32)


def prior_draws(key: jax.Array, positions: jax.Array, batch: int, vocab: int) -> jax.Array:
    """``prior_draw`` of each position, [B, C, V] fp32."""
    return jax.vmap(lambda p: prior_draw(key, p, batch, vocab), out_axes=1)(positions)


def max_draw(key: jax.Array, position: jax.Array | int, batch: int) -> jax.Array:
    """M ~ Gumbel(0) of one position, [B] fp32: the perturbed value of the observed token."""
    return jax.random.gumbel(jax.random.fold_in(position_key(key, position), 1), (batch,), jnp.float32)


def chunk_draws(key: jax.Array, positions: jax.Array, batch: int, vocab: int) -> tuple[jax.Array, jax.Array]:
    """(ξ [B, C, V], M [B, C]) for the given positions; identical to drawing them one by one."""
    xi = prior_draws(key, positions, batch, vocab)
    m = jax.vmap(lambda p: max_draw(key, p, batch), out_axes=1)(positions)
    return xi, m


def log_probs(logits: jax.Array) -> jax.Array:
    """ℓ = log_softmax in fp32 (also for bf16 logits), floored at LOGP_FLOOR."""
    return jnp.maximum(jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1), LOGP_FLOOR)


def posterior_from_draws(logp: jax.Array, tokens: jax.Array, xi: jax.Array, m: jax.Array) -> jax.Array:
    """Exact posterior Gumbel noise given ``argmax(ℓ + G) == tokens`` (top-down construction).

    ``logp`` [..., V] is the normalized fp32 log-probability ℓ (see ``log_probs``), ``tokens`` [...]
    the observed ids, ``xi`` [..., V] and ``m`` [...] independent standard Gumbel draws. The
    observed token gets ``g = M − ℓ_x`` (its perturbed value is the maximum M, which is Gumbel(0)
    because ℓ is normalized); every other v gets ``g_v = −logaddexp(−ξ_v, ℓ_v − M)``, i.e.
    ℓ_v + g_v is Gumbel(ℓ_v) truncated below M. Returns g [..., V] fp32.

    Tie safety: mathematically ℓ_v + g_v < M; in fp32 the sum can round up to (or past) the
    observed value when ℓ_v + g_v is within an ulp of M, which happens for about one coordinate in
    10⁷. Such g_v are pushed down by a few ulps so that, evaluated in fp32 exactly as a caller
    would (``logp + g``), the observed token is the strict and unique argmax.
    """
    logp = logp.astype(jnp.float32)
    is_obs = jax.lax.broadcasted_iota(jnp.int32, logp.shape, logp.ndim - 1) == tokens[..., None]
    l_obs = jnp.take_along_axis(logp, tokens[..., None], axis=-1)
    m = m.astype(jnp.float32)[..., None]
    g_obs = m - l_obs
    top = l_obs + g_obs  # the observed perturbed value as fp32 evaluates ℓ + g (≈ M)
    g_rest = -jnp.logaddexp(-xi.astype(jnp.float32), logp - m)
    eps = jnp.finfo(jnp.float32).eps
    margin = 4.0 * eps * (jnp.abs(top) + jnp.abs(logp) + 1.0)  # exceeds the rounding of both sums
    excess = logp + g_rest - top  # >= 0 exactly where fp32 rounding broke the strict order
    g_rest = jnp.where(excess < 0, g_rest, g_rest - excess - margin)
    return jnp.where(is_obs, g_obs, g_rest)


def sample_posterior(key: jax.Array, logp_BTV: jax.Array, tokens_BT: jax.Array) -> jax.Array:
    """Posterior noise for a whole [B, T, V] block at once (the unfused reference; tests)."""
    b, t, v = logp_BTV.shape
    xi, m = chunk_draws(key, jnp.arange(t), b, v)
    return posterior_from_draws(logp_BTV, tokens_BT, xi, m)


def sample_prior(key: jax.Array, batch: int, seq_len: int, vocab: int) -> jax.Array:
    """Prior noise [B, T, V], the same numbers the chunked code draws (reference; tests)."""
    return chunk_draws(key, jnp.arange(seq_len), batch, vocab)[0]


# ---------------------------------------------------------------------------------------------
# Teachers


def teacher_sample_tokens(
    model: Any, key: jax.Array, batch: int, seq_len: int, bos_id: int, vocab: int
) -> tuple[jax.Array, jax.Array]:
    """The teacher run on prior noise: ``x_i = argmax(ℓ_i + G_i)`` with a KV cache and
    G_i = ``prior_draw(key, i)`` (so ``prior_context`` with the same key rebuilds the matching
    noise). Exact coupling without data. One ``lax.scan`` of T − 1 cached decode steps.
    Returns (tokens [B, T], teacher NLL −ℓ_i(x_i) [B, T])."""

    def pick(logits_BV: jax.Array, i: jax.Array) -> tuple[jax.Array, jax.Array]:
        logp = log_probs(logits_BV)
        x = jnp.argmax(logp + prior_draw(key, i, batch, vocab), axis=-1).astype(jnp.int32)
        return x, -jnp.take_along_axis(logp, x[:, None], axis=-1)[:, 0]

    cache = model.init_cache(batch, seq_len)
    logits, cache = model.decode(jnp.full((batch, 1), bos_id, jnp.int32), cache)
    first, first_nll = pick(logits[:, 0], jnp.zeros((), jnp.int32))
    if seq_len == 1:
        return first[:, None], first_nll[:, None]

    def step(carry, i):
        prev, cache = carry
        logits, cache = model.decode(prev[:, None], cache)
        nxt, nll = pick(logits[:, 0], i)
        return (nxt, cache), (nxt, nll)

    _, (rest, rest_nll) = jax.lax.scan(step, (first, cache), jnp.arange(1, seq_len))
    tokens = jnp.concatenate([first[:, None], rest.T], axis=1)
    return tokens, jnp.concatenate([first_nll[:, None], rest_nll.T], axis=1)


# ---------------------------------------------------------------------------------------------
# Fused reduction of G to [B, T, d]


def resolve_chunk(seq_len: int, batch: int, vocab: int, chunk_size: int = 0, shards: int | None = None) -> int:
    """Positions per chunk: the largest divisor of seq_len not above ``chunk_size`` (0: the largest
    one whose [B, C, V] temporaries stay under AUTO_CHUNK_ELEMENTS on each device).

    ``shards``: how many ways the batch is split over devices (default: the batch axis of the
    mesh the step is traced under, 1 outside one). Each device holds batch/shards rows, so the
    automatic chunk grows with the device count, as ``linear_ce`` sizes its chunks; sizing it by
    the global batch would run many more sequential chunks per step than memory requires.
    """
    if shards is None:
        shards = shd.axis_shards("batch")
    rows = batch // shards if shards > 0 and batch % shards == 0 else batch
    limit = chunk_size if chunk_size > 0 else max(AUTO_CHUNK_ELEMENTS // max(rows * vocab, 1), 1)
    limit = min(limit, seq_len)
    return max(c for c in range(1, limit + 1) if seq_len % c == 0)


def reduce_noise(g: jax.Array, emb_VD: jax.Array, tau: float) -> jax.Array:
    """softmax(G/τ)·E: [..., V] noise -> [..., d] (fp32)."""
    return jnp.einsum("...v,vd->...d", jax.nn.softmax(g.astype(jnp.float32) / tau, axis=-1), emb_VD)


def chunked_context(
    noise_fn: Callable[[jax.Array, jax.Array], tuple[jax.Array, jax.Array]],
    emb_VD: jax.Array,
    *,
    seq_len: int,
    chunk: int,
    tau: float,
    remat: bool,
    reduce: Callable[[jax.Array], jax.Array] | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Runs ``softmax(noise/τ)·E`` (or ``reduce(noise)``) over chunks of positions, one ``lax.map``
    iteration per chunk.

    ``noise_fn(start, positions)`` gives (noise [B, C, V], a per-position statistic [B, C]) for
    positions start..start+C−1. Returns ([B, T, d], [B, T]). With ``remat`` a chunk is recomputed
    in the backward pass instead of keeping its softmax weights.
    """
    if seq_len % chunk:
        raise ValueError(f"chunk={chunk} must divide seq_len={seq_len}")

    def one(ci: jax.Array) -> tuple[jax.Array, jax.Array]:
        start = ci * chunk
        noise, stat = noise_fn(start, start + jnp.arange(chunk))
        return (reduce_noise(noise, emb_VD, tau) if reduce is None else reduce(noise)), stat

    if remat:
        one = jax.checkpoint(one, policy=jax.checkpoint_policies.nothing_saveable)
    out, stat = jax.lax.map(one, jnp.arange(seq_len // chunk))  # [n, B, C, d], [n, B, C]
    n, b, c, d = out.shape
    return out.transpose(1, 0, 2, 3).reshape(b, n * c, d), stat.transpose(1, 0, 2).reshape(b, n * c)


def posterior_context(
    fns: TeacherFns,
    tokens_BT: jax.Array,
    key: jax.Array,
    emb_VD: jax.Array,
    *,
    bos_id: int,
    tau: float,
    chunk: int,
    remat: bool,
) -> tuple[jax.Array, jax.Array]:
    """softmax(G/τ)·E [B, T, d] with G the exact posterior given the data tokens, fused per chunk:
    teacher head -> log-softmax -> posterior -> reduction; and the teacher's NLL of the data
    tokens [B, T] (a check of the alignment: a mis-paired teacher would find the data unlikely).
    The teacher gets no gradient."""
    b, t = tokens_BT.shape
    h = jax.lax.stop_gradient(fns.hidden(teacher_inputs(tokens_BT, bos_id)))

    def noise_fn(start: jax.Array, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
        h_c = jax.lax.dynamic_slice_in_dim(h, start, positions.shape[0], axis=1)
        tok_c = jax.lax.dynamic_slice_in_dim(tokens_BT, start, positions.shape[0], axis=1)
        logp = jax.lax.stop_gradient(log_probs(fns.head(h_c)))
        xi, m = chunk_draws(key, positions, b, logp.shape[-1])
        nll = -jnp.take_along_axis(logp, tok_c[..., None], axis=-1)[..., 0]
        return posterior_from_draws(logp, tok_c, xi, m), nll

    return chunked_context(noise_fn, emb_VD, seq_len=t, chunk=chunk, tau=tau, remat=remat)


def prior_context(
    key: jax.Array,
    emb_VD: jax.Array,
    *,
    batch: int,
    seq_len: int,
    tau: float,
    chunk: int,
    remat: bool = False,
    scale: float = 1.0,
) -> jax.Array:
    """softmax(scale·G/τ)·E [B, T, d] with G from the prior (no teacher)."""
    vocab = emb_VD.shape[0]

    def noise_fn(start: jax.Array, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
        xi = prior_draws(key, positions, batch, vocab)
        return scale * xi, jnp.zeros((batch, positions.shape[0]), jnp.float32)

    return chunked_context(noise_fn, emb_VD, seq_len=seq_len, chunk=chunk, tau=tau, remat=remat)[0]


# ---------------------------------------------------------------------------------------------
# Student loss and sampler


def student_inputs(
    model: TokenFlow, context_BTD: jax.Array, gumbel: GumbelConfig
) -> tuple[jax.Array | None, jax.Array | None]:
    """(x0, cross-attention context) for a reduced noise softmax(G/τ)·E. x0 None: Gaussian."""
    if gumbel.conditioning == "x0":
        return context_BTD, None
    if gumbel.conditioning == "none":
        return None, None
    # The residual stream reads x_t / embed_scale; the context gets the same O(1) scale.
    return None, context_BTD / model.cfg.embed_scale_value


def gumbel_pairs(
    model: TokenFlow,
    teacher: Any,
    tokens_BT: jax.Array,
    key: jax.Array,
    gumbel: GumbelConfig,
    *,
    bos_id: int,
    source: str | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(target tokens [B, T], softmax(G/τ)·E [B, T, d], teacher NLL of the targets [B, T]) of one
    batch, from ``source`` (default: the configured one). ``teacher_sample`` ignores the data
    tokens except for their shape."""
    source = source or gumbel.source
    b, t = tokens_BT.shape
    emb = model.embeddings()
    if not gumbel.embed_grad:
        emb = jax.lax.stop_gradient(emb)
    chunk = resolve_chunk(t, b, emb.shape[0], gumbel.chunk_size)
    remat = gumbel.embed_grad
    if source == "data_posterior":
        ctx, nll = posterior_context(
            teacher_fns(teacher), tokens_BT, key, emb, bos_id=bos_id, tau=gumbel.tau, chunk=chunk, remat=remat
        )
        return tokens_BT, ctx, nll
    if source == "teacher_sample":
        tokens, nll = jax.lax.stop_gradient(teacher_sample_tokens(teacher, key, b, t, bos_id, emb.shape[0]))
        ctx = prior_context(key, emb, batch=b, seq_len=t, tau=gumbel.tau, chunk=chunk, remat=remat)
        return tokens, ctx, nll
    raise ValueError(f"unknown Gumbel source {source!r}; valid: {', '.join(SOURCES)}")


def gumbel_flow_loss(
    model: TokenFlow,
    teacher: Any,
    tokens_BT: jax.Array,
    mask_BT: jax.Array,
    key: jax.Array,
    gumbel: GumbelConfig,
    *,
    bos_id: int,
    source: str | None = None,
    **flow_kwargs: Any,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The Gumbel reflow loss: teacher pass, posterior (or teacher sampling), reduction of G and
    the student's flow loss. ``flow_kwargs`` go to ``flow.flow_loss`` (time sampler, buckets, t_B).
    Metrics are those of ``flow_loss`` plus ``teacher_nll_sum`` (the teacher's NLL of the targets) and
    ``teacher_tokens`` (their count)."""
    noise_key, flow_key = jax.random.split(key)
    tokens, ctx, nll = gumbel_pairs(model, teacher, tokens_BT, noise_key, gumbel, bos_id=bos_id, source=source)
    x0, context = student_inputs(model, ctx, gumbel)
    loss, metrics = flow.flow_loss(model, tokens, mask_BT, flow_key, x0=x0, context=context, **flow_kwargs)
    # Over every target, known ones included: its own count (``tokens`` counts the scored ones).
    metrics["teacher_nll_sum"] = jnp.sum(nll * mask_BT.astype(jnp.float32))
    metrics["teacher_tokens"] = jnp.sum(mask_BT.astype(jnp.float32))
    return loss, metrics


def sampling_keys(key: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(the key of the sampling G, the key of the Gaussian x0) of one sampler key. Every part of a
    sampler that reads G (the context, the logit channel's noise, the G-channel features, the
    teacher's Jacobi reference) draws it from the first, so all of them see one G."""
    g_key, x0_key = jax.random.split(key)
    return g_key, x0_key


def gumbel_source(
    model: TokenFlow, key: jax.Array, batch: int, seq_len: int, gumbel: GumbelConfig
) -> tuple[jax.Array, jax.Array | None]:
    """(x0, context) for sampling: G from the prior (scaled by ``sample_temperature``); no teacher."""
    g_key, x0_key = sampling_keys(key)
    if gumbel.conditioning == "none":
        return flow.gaussian_source(x0_key, batch, seq_len, model), None
    emb = model.embeddings()
    chunk = resolve_chunk(seq_len, batch, emb.shape[0], gumbel.chunk_size)
    ctx = prior_context(
        g_key, emb, batch=batch, seq_len=seq_len, tau=gumbel.tau, chunk=chunk, scale=gumbel.sample_temperature
    )
    x0, context = student_inputs(model, ctx, gumbel)
    if x0 is None:
        x0 = flow.gaussian_source(x0_key, batch, seq_len, model)
    return x0, context
