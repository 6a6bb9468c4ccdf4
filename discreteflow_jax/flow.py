"""The flow process over token embeddings: noise path, time samplers, the flow loss and the K-step
sampler (derived in docs/math.md). Pure functions of arrays, PRNG keys and a TokenFlow module.

t = 0 is noise and t = 1 is data; x_t = t·x1 + (1−t)·x0 with x1 = E[tokens], x0 ~ N(0, σ²I).
The model predicts the clean token (x1-prediction), so the velocity is (p·E − x_t)/(1−t).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

from discreteflow_jax.config.schema import TIME_GRIDS, TIME_SAMPLERS
from discreteflow_jax.models.linear_ce import cross_entropy  # noqa: F401  (re-exported: flow.cross_entropy)
from discreteflow_jax.models.noisy_argmax import NoiseFn, noisy_readout
from discreteflow_jax.models.tokenflow import TIME_WARP_GAIN, TokenFlow, per_position

# Share of the learned sampler's draws that stay uniform, so no region of t is ever starved.
WARP_UNIFORM_SHARE = 0.1
# The largest time a staggered sampler shows the model: positions that have reached the data
# (t = 1) are held there, and the model, trained on t ∈ [0, 1), sees them as nearly clean.
MAX_MODEL_TIME = 0.999


def sample_time(
    key: jax.Array, batch: int | tuple[int, ...], sampler: str = "uniform", param: float = 1.0,
    warp: jax.Array | None = None,
) -> jax.Array:
    """Flow times in [0, 1): one per sequence ([B]) or any shape (e.g. (B, T), one per position).

    uniform: U(0,1), the original's choice. logit_normal: sigmoid(param·N(0,1)), spends the batch
    near the middle. power: u**param; param > 1 puts more of the batch at small t, where the
    network has to do all the work (for larger t the singular term already identifies the token).
    learned: CDCD's time warping, t drawn where the fitted loss falls fastest (``warp`` holds the
    fit's parameters, see ``warp_inverse_cdf``), mixed with a uniform share.
    """
    shape = (batch,) if isinstance(batch, int) else tuple(batch)
    u = jax.random.uniform(key, shape, jnp.float32)
    if sampler == "uniform":
        return u
    if sampler == "power":
        return u**param
    if sampler == "logit_normal":
        return jax.nn.sigmoid(param * jax.random.normal(key, shape, jnp.float32))
    if sampler == "learned":
        if warp is None:
            raise ValueError(
                'time sampler "learned" needs a model with time-warp parameters (model.time_warp_bins > 0)'
            )
        k_mix, k_u = jax.random.split(key)
        warped = warp_inverse_cdf(jax.lax.stop_gradient(warp), jax.random.uniform(k_u, shape, jnp.float32))
        return jnp.where(jax.random.uniform(k_mix, shape) < WARP_UNIFORM_SHARE, u, warped)
    raise ValueError(f"unknown time sampler {sampler!r}; valid: {', '.join(TIME_SAMPLERS)}")


# -- learned time warping (CDCD) ------------------------------------------------------------
# The loss as a function of t is fitted by a monotone decreasing, piecewise-linear curve
# L̂(t) = scale·(1 − F(t)), F the CDF of K equal-width bins with masses softmax(w). Training times
# are then drawn from F: where the loss falls fastest, i.e. where the network has most to learn.
# warp = [w_1..w_K, log_scale] / TIME_WARP_GAIN. The gain lets Adam move the fit about 50 times
# faster than the network's learning rate would (the loss curve changes quickly early in
# training); the fit enters the objective scaled by WARP_FIT_WEIGHT so that its gradient takes
# no noticeable share of the global-norm clipping budget (Adam itself ignores the scale).
WARP_FIT_WEIGHT = 1e-4


def warp_masses(warp: jax.Array) -> jax.Array:
    return jax.nn.softmax(TIME_WARP_GAIN * warp[:-1])


def warp_fitted_loss(warp: jax.Array, t: jax.Array) -> jax.Array:
    """L̂(t) = scale·(1 − F(t)) for any shape of t."""
    masses = warp_masses(warp)
    k = masses.shape[0]
    cdf = jnp.concatenate([jnp.zeros((1,), masses.dtype), jnp.cumsum(masses)])
    pos = jnp.clip(t, 0.0, 1.0) * k
    idx = jnp.clip(jnp.floor(pos).astype(jnp.int32), 0, k - 1)
    f = cdf[idx] + (pos - idx) * masses[idx]
    return jnp.exp(TIME_WARP_GAIN * warp[-1]) * (1.0 - f)


def warp_inverse_cdf(warp: jax.Array, u: jax.Array) -> jax.Array:
    """t with F(t) = u (F piecewise linear, so the inverse is exact)."""
    masses = warp_masses(warp)
    k = masses.shape[0]
    cdf = jnp.cumsum(masses)
    idx = jnp.clip(jnp.searchsorted(cdf, u, side="right"), 0, k - 1)
    lower = jnp.where(idx > 0, cdf[jnp.maximum(idx - 1, 0)], 0.0)
    frac = jnp.clip((u - lower) / jnp.maximum(masses[idx], 1e-12), 0.0, 1.0)
    return jnp.clip((idx + frac) / k, 0.0, 1.0 - 1e-6)


def warp_fit_loss(warp: jax.Array, t: jax.Array, token_loss: jax.Array, weights: jax.Array) -> jax.Array:
    """Weighted mean squared error of L̂(t) against the observed per-token losses (no gradient to
    the network: only the warp parameters are fitted)."""
    err = warp_fitted_loss(warp, jnp.broadcast_to(t, token_loss.shape)) - jax.lax.stop_gradient(token_loss)
    return WARP_FIT_WEIGHT * jnp.sum(weights * err * err) / jnp.maximum(jnp.sum(weights), 1.0)


def training_times(
    key: jax.Array, shape: tuple[int, int], sampler: str, param: float, token_time_prob: float,
    warp: jax.Array | None = None, stagger_prob: float = 0.0, stagger_width: float = 1.0,
) -> jax.Array:
    """Training times: [B] (one per sequence, the original) when ``token_time_prob`` and
    ``stagger_prob`` are 0, else [B, T] where a share ``token_time_prob`` of the sequences draws one
    time per position, a share ``stagger_prob`` gets staggered times (``staggered_times`` at a
    progress s ~ U(0, 1) with w = ``stagger_width``, capped at ``MAX_MODEL_TIME``: clean left
    context beside noisy right context, as a staggered sampler shows it) and the rest keep one
    time for all their positions. Mixed noise levels put cleaner and noisier neighbours side by
    side, which is what teaches the network to read its context."""
    b, t = shape
    # The per-sequence draw uses the key itself: with token_time_prob = 0 the times are the original's.
    per_seq = sample_time(key, b, sampler, param, warp)
    k_tok, k_which = jax.random.split(jax.random.fold_in(key, 0x707))
    if token_time_prob <= 0 and stagger_prob <= 0:
        return per_seq
    per_tok = sample_time(k_tok, (b, t), sampler, param, warp)
    u = jax.random.uniform(k_which, (b, 1))
    times = jnp.where(u < token_time_prob, per_tok, per_seq[:, None])
    if stagger_prob <= 0:
        return times
    progress = jax.random.uniform(jax.random.fold_in(key, 0x5A6), (b,))
    staggered = jnp.minimum(staggered_times(progress[:, None], t, stagger_width), MAX_MODEL_TIME)
    use = (u >= token_time_prob) & (u < token_time_prob + stagger_prob)
    return jnp.where(use, staggered, times)


def noisy_path(x1: jax.Array, x0: jax.Array, t_B: jax.Array) -> jax.Array:
    """x_t = t·x1 + (1−t)·x0 with t [B] (per sequence) or [B, T] (per position)."""
    t = per_position(t_B.astype(x1.dtype))
    return t * x1 + (1.0 - t) * x0


def bucket_sums(
    values: jax.Array, t: jax.Array, weights: jax.Array, num_buckets: int
) -> tuple[jax.Array, jax.Array]:
    """Weighted sums and weights of values in equal t-buckets: ([K], [K]). ``values``, ``t`` and
    ``weights`` share a shape ([B] per sequence or [B, T] per token)."""
    idx = jnp.clip(jnp.floor(t * num_buckets).astype(jnp.int32), 0, num_buckets - 1).reshape(-1)
    onehot = jax.nn.one_hot(idx, num_buckets, dtype=jnp.float32)
    return onehot.T @ (values * weights).reshape(-1), onehot.T @ weights.reshape(-1)


def flow_loss(
    model: TokenFlow,
    tokens_BT: jax.Array,
    mask_BT: jax.Array,
    key: jax.Array,
    *,
    time_sampler: str = "uniform",
    time_param: float = 1.0,
    num_buckets: int = 10,
    x0: jax.Array | None = None,
    context: jax.Array | None = None,
    t_B: jax.Array | None = None,
    known_BT: jax.Array | None = None,
    token_time_prob: float = 0.0,
    stagger_prob: float = 0.0,
    stagger_width: float = 1.0,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Mean cross-entropy of the clean tokens given x_t, over unmasked positions.

    ``x0`` (the flow source) defaults to Gaussian noise with σ = model.cfg.sigma; the Gumbel
    reflow passes its own. ``known_BT`` (bool, optional) marks positions given as conditioning:
    they enter clean (x_t = e) and are left out of the loss, which teaches the model to fill in
    around known spans (see ``random_known_mask``). ``token_time_prob`` > 0 draws one time per
    position for that share of the sequences, ``stagger_prob`` gives a share staggered times
    (``training_times``); ``t_B`` may be given as [B]
    or [B, T]. A self-conditioning model gets, for a random half of the sequences, its own
    estimate x̂₁ from a first pass without gradient. A model with time-warp parameters adds
    their fit to the loss (``warp_fit_loss``; the network's gradients are unchanged). Returns
    (loss, metrics) where metrics hold token-weighted sums per t-bucket so that they can be
    averaged over many batches exactly.
    """
    t_key, x0_key = jax.random.split(key)
    warp = model.time_warp[...] if model.time_warp is not None else None
    if t_B is None:
        t_B = training_times(t_key, tokens_BT.shape, time_sampler, time_param, token_time_prob, warp,
                             stagger_prob, stagger_width)
    x1 = model.embed(tokens_BT)
    if x0 is None:
        x0 = model.cfg.sigma * jax.random.normal(x0_key, x1.shape, jnp.float32)
    x_t = noisy_path(x1, x0, t_B)
    mask = mask_BT.astype(jnp.float32)
    if known_BT is not None:
        x_t = jnp.where(known_BT[..., None], x1, x_t)
        mask = mask * (1.0 - known_BT.astype(jnp.float32))
    num_tokens = jnp.maximum(mask.sum(), 1.0)
    self_cond = None
    if model.cfg.self_condition:
        self_cond = training_self_condition(model, x_t, t_B, context, jax.random.fold_in(key, 0x5C))
    # The loss is Σ CE·mask / num_tokens; with model.loss_chunk the logits are never stored whole.
    loss, token_loss = model.token_losses(x_t, t_B, tokens_BT, mask / num_tokens, context, self_cond)
    if warp is not None:
        loss = loss + warp_fit_loss(model.time_warp[...], per_position(t_B)[..., 0], token_loss, mask)
    return loss, flow_metrics(jax.lax.stop_gradient(token_loss), mask, t_B, num_buckets)


def posterior_mean(model: TokenFlow, logits: jax.Array, temperature: float = 1.0) -> jax.Array:
    """x̂₁ = softmax(logits / temperature)·E, [B, T, flow_width]."""
    probs = jax.nn.softmax(logits / temperature, axis=-1)
    return jnp.einsum("btv,vd->btd", probs, model.embeddings())


def training_self_condition(
    model: TokenFlow, x_t: jax.Array, t: jax.Array, context: jax.Array | None, key: jax.Array
) -> jax.Array:
    """Self-conditioning input for training: x̂₁ from a first pass (no gradient) for a random half of
    the sequences, zeros for the other half, so the model learns both to use an estimate and to
    start without one."""
    estimate = jax.lax.stop_gradient(posterior_mean(model, model(x_t, t, context)))
    use = jax.random.uniform(key, (x_t.shape[0], 1, 1)) < 0.5
    return jnp.where(use, estimate, jnp.zeros_like(estimate))


def flow_metrics(
    token_loss_BT: jax.Array, mask_BT: jax.Array, t_B: jax.Array, num_buckets: int
) -> dict[str, jax.Array]:
    """Token-weighted loss sums, overall and per t-bucket, of per-token losses (``flow_loss``'s
    metrics). ``t_B`` is [B] or [B, T]; every token counts in the bucket of its own time."""
    t_BT = jnp.broadcast_to(per_position(t_B)[..., 0], token_loss_BT.shape)
    bucket_loss, bucket_weight = bucket_sums(token_loss_BT, t_BT, mask_BT, num_buckets)
    return {
        "loss_sum": jnp.sum(token_loss_BT * mask_BT),
        "tokens": mask_BT.sum(),
        "bucket_loss_sum": bucket_loss,
        "bucket_tokens": bucket_weight,
    }


def random_known_mask(
    key: jax.Array, batch: int, seq_len: int, prob: float, prefix_prob: float = 0.5, span_len: int = 8
) -> jax.Array:
    """Conditioning positions for training, [B, T] bool.

    Each sequence is conditioned with probability ``prob`` (else nothing is known). A conditioned
    sequence knows either a prefix (probability ``prefix_prob``; length uniform in 1..T−1) or
    random spans: the sequence is cut into blocks of ``span_len`` tokens and each block is known
    with a per-sequence rate drawn from U(0, 1), so every fraction of known text is practised.
    At least one position always stays unknown, so every conditioned sequence has a loss.
    """
    k_on, k_kind, k_len, k_rate, k_blocks = jax.random.split(key, 5)
    on = jax.random.uniform(k_on, (batch,)) < prob
    use_prefix = jax.random.uniform(k_kind, (batch,)) < prefix_prob
    pos = jnp.arange(seq_len)
    prefix_len = jax.random.randint(k_len, (batch,), 1, max(seq_len, 2))
    prefix = pos[None, :] < prefix_len[:, None]
    num_blocks = -(-seq_len // span_len)
    rate = jax.random.uniform(k_rate, (batch, 1))
    blocks = jax.random.uniform(k_blocks, (batch, num_blocks)) < rate
    spans = jnp.repeat(blocks, span_len, axis=1)[:, :seq_len]
    # Keep one position unknown (the last one of an all-known row): its loss must exist.
    spans = spans & ~(jnp.all(spans, axis=1, keepdims=True) & (pos[None, :] == seq_len - 1))
    return on[:, None] & jnp.where(use_prefix[:, None], prefix, spans)


def time_grid(steps: int, schedule: str = "uniform", param: float = 2.0) -> jax.Array:
    """K+1 increasing times from 0 to 1. cosine and power (u**param) take smaller first steps."""
    if steps < 1:
        raise ValueError(f"the number of sampling steps must be >= 1, got {steps}")
    u = jnp.linspace(0.0, 1.0, steps + 1, dtype=jnp.float32)
    if schedule == "uniform":
        return u
    if schedule == "cosine":
        return 1.0 - jnp.cos(0.5 * math.pi * u)
    if schedule == "power":
        return u**param
    raise ValueError(f"unknown time grid {schedule!r}; valid: {', '.join(TIME_GRIDS)}")


def euler_update(x_t: jax.Array, x1_hat: jax.Array, t: jax.Array, t_next: jax.Array) -> jax.Array:
    """x_{t'} = x_t + (t'−t)/(1−t)·(x̂1 − x_t); exact x̂1 at t' = 1. ``t`` may be per position
    ([T, 1]): a position already at t = 1 stays where it is."""
    done = t >= 1.0
    frac = jnp.where(done, 0.0, (t_next - t) / jnp.where(done, 1.0, 1.0 - t))
    return x_t + frac * (x1_hat - x_t)


def finish_positions(
    model: TokenFlow, tokens: jax.Array, x1_hat: jax.Array, t: jax.Array, t_next: jax.Array
) -> jax.Array:
    """A staggered sampler's x̂₁ for the positions that reach t = 1 at this step: the embedding of
    the step's token (the argmax of the logits, or of the noisy logits of the Gumbel logit channel),
    not the posterior mean or the channel's soft x̂₁. The ordinary sampler's tokens are the argmax
    of its last logits; a position that finishes before the last step would otherwise be left at a
    blend of embeddings, which later positions read as context and which the final read-out maps
    to the token nearest the blend (a different token whenever the posterior is not one-hot).
    ``tokens``: [B, T]; ``t``, ``t_next``: [T, 1]."""
    finishing = (t < 1.0) & (t_next >= 1.0)
    return jnp.where(finishing[None], jnp.take(model.embeddings(), tokens, axis=0), x1_hat)


def staggered_times(s: jax.Array, seq_len: int, stagger: float) -> jax.Array:
    """Per-position flow times [T] at sampler progress ``s`` ∈ [0, 1] (AR-Diffusion's schedule):
    t_j = clip((1 + w)·s − w·j/(T − 1), 0, 1) with w = ``stagger``. Every position runs from noise
    (s = 0) to data (s = 1), but position j starts at s = w·j/((T−1)(1+w)) and spends a share
    1/(1+w) of the grid on its way, so earlier positions are cleaner whenever a later one is
    denoised: the network reads cleaner left context, which a model trained with per-token times
    (``flow.token_time_prob``) has learnt to use. w = 0 is the ordinary sampler (one t)."""
    frac = jnp.arange(seq_len, dtype=jnp.float32) / max(seq_len - 1, 1)
    return jnp.clip((1.0 + stagger) * s - stagger * frac, 0.0, 1.0)


def sample_flow(
    model: TokenFlow,
    x0: jax.Array,
    grid: jax.Array,
    *,
    context: jax.Array | None = None,
    temperature: float = 1.0,
    clamp_fn: Callable[[jax.Array, jax.Array], jax.Array] | None = None,
    final_state: bool = False,
    logit_noise: NoiseFn | None = None,
    noise_tau: float = 0.0,
    noise_chunk: int = 0,
    stagger: float = 0.0,
) -> tuple[jax.Array, jax.Array]:
    """Integrates the flow from x0 along ``grid`` in one ``lax.fori_loop``.

    ``temperature`` divides the logits before the softmax (1: the model's posterior mean).
    ``clamp_fn(x_t, t)`` (optional) overwrites known positions at every step (conditional
    generation). Returns (tokens [B, T] = argmax of the last logits, x [B, T, d]).

    ``logit_noise`` (the Gumbel logit channel), ``positions [C] -> noise [B, C, V]``, is added to
    the tempered logits at every step: the step's tokens are argmax(logits/temperature + noise),
    x̂₁ is their embedding (``noise_tau`` = 0) or softmax((logits/temperature + noise)/noise_tau)·E,
    and the final tokens are the argmax of the last noisy logits. The output layer, the noise and
    the argmax then run ``noise_chunk`` positions at a time (0: all; ``models.noisy_argmax``), so no
    [B, T, V] array exists in the loop: the noise is drawn again for each chunk at each step.

    ``stagger`` w > 0 gives every position its own time (``staggered_times``; the grid is then the
    sampler's progress s, not t): left positions are denoised first, and each one ends, when it
    reaches t = 1, on the embedding of its token (the argmax of its last logits, of the noisy ones
    with the logit channel: ``finish_positions``), which the later positions read as clean context.
    ``clamp_fn`` then receives t as [T, 1]. The model's time input is capped at ``MAX_MODEL_TIME``
    (training never draws t = 1).

    The tokens need only the argmax of the last logits, so the last step skips the softmax and
    the V-wide p·E matmul (exact: same tokens; one of the 2K V-wide matmuls of a K-step sample)
    and x is the state the last network call read. ``final_state=True`` computes the final
    state p·E of the last step as well and returns it as x.
    """
    b, seq_len, _ = x0.shape
    steps = grid.shape[0] - 1
    use_self_cond = model.cfg.self_condition

    def body(i, carry):
        x, tokens, x1_prev = carry
        t, t_next = grid[i], grid[i + 1]
        if stagger > 0:  # per-position times, [T, 1] against x [B, T, d]
            t = staggered_times(t, seq_len, stagger)[:, None]
            t_next = staggered_times(t_next, seq_len, stagger)[:, None]
            t_B = jnp.broadcast_to(jnp.minimum(t[:, 0], MAX_MODEL_TIME), (b, seq_len))
        else:
            t_B = jnp.full((b,), t)
        if clamp_fn is not None:
            x = clamp_fn(x, t)
        if logit_noise is not None:
            noisy_x1, noisy_tokens = noisy_readout(model, x, t_B, context, logit_noise, temperature=temperature,
                                                   noise_tau=noise_tau, chunk=noise_chunk)
        else:
            logits = model(x, t_B, context, x1_prev) if use_self_cond else model(x, t_B, context)

        def advance(_):
            x1_hat = posterior_mean(model, logits, temperature) if logit_noise is None else noisy_x1
            if stagger > 0:
                step_tokens = jnp.argmax(logits, axis=-1) if logit_noise is None else noisy_tokens
                x1_hat = finish_positions(model, step_tokens, x1_hat, t, t_next)
            return euler_update(x, x1_hat, t, t_next), tokens, x1_hat

        def finish(_):
            out = jnp.argmax(logits, axis=-1).astype(jnp.int32) if logit_noise is None else noisy_tokens
            return (advance(None)[0] if final_state else x), out, x1_prev

        return jax.lax.cond(i == steps - 1, finish, advance, None)

    x0 = x0.astype(jnp.float32)
    init = (x0, jnp.zeros((b, seq_len), jnp.int32), jnp.zeros_like(x0))
    x, tokens, _ = jax.lax.fori_loop(0, steps, body, init)
    return tokens, x


def gaussian_source(key: jax.Array, batch: int, seq_len: int, model: TokenFlow) -> jax.Array:
    cfg = model.cfg
    return cfg.sigma * jax.random.normal(key, (batch, seq_len, cfg.flow_width), jnp.float32)
