"""The flow process over token embeddings: noise path, time samplers, the flow loss (SPEC §4)
and the K-step sampler (SPEC §5). Pure functions of arrays, PRNG keys and a TokenFlow module.

t = 0 is noise and t = 1 is data; x_t = t·x1 + (1−t)·x0 with x1 = E[tokens], x0 ~ N(0, σ²I).
The model predicts the clean token (x1-prediction), so the velocity is (p·E − x_t)/(1−t).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

from discreteflow_jax.models.linear_ce import cross_entropy  # noqa: F401  (re-exported: flow.cross_entropy)
from discreteflow_jax.models.tokenflow import TokenFlow

TIME_SAMPLERS = ("uniform", "logit_normal", "power")
TIME_GRIDS = ("uniform", "cosine", "power")


def sample_time(key: jax.Array, batch: int, sampler: str = "uniform", param: float = 1.0) -> jax.Array:
    """One flow time per sequence, [B] in [0, 1).

    uniform: U(0,1), the original's choice. logit_normal: sigmoid(param·N(0,1)), spends the batch
    near the middle. power: u**param; param > 1 puts more of the batch at small t, where the
    network has to do all the work (for larger t the singular term already identifies the token).
    """
    u = jax.random.uniform(key, (batch,), jnp.float32)
    if sampler == "uniform":
        return u
    if sampler == "power":
        return u**param
    if sampler == "logit_normal":
        return jax.nn.sigmoid(param * jax.random.normal(key, (batch,), jnp.float32))
    raise ValueError(f"unknown time sampler {sampler!r}; valid: {', '.join(TIME_SAMPLERS)}")


def noisy_path(x1: jax.Array, x0: jax.Array, t_B: jax.Array) -> jax.Array:
    t = t_B.astype(x1.dtype)[:, None, None]
    return t * x1 + (1.0 - t) * x0


def bucket_sums(
    values_B: jax.Array, t_B: jax.Array, weights_B: jax.Array, num_buckets: int
) -> tuple[jax.Array, jax.Array]:
    """Weighted sums and weights of per-sequence values in equal t-buckets: ([K], [K])."""
    idx = jnp.clip(jnp.floor(t_B * num_buckets).astype(jnp.int32), 0, num_buckets - 1)
    onehot = jax.nn.one_hot(idx, num_buckets, dtype=jnp.float32)
    return onehot.T @ (values_B * weights_B), onehot.T @ weights_B


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
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Mean cross-entropy of the clean tokens given x_t, over unmasked positions.

    ``x0`` (the flow source) defaults to Gaussian noise with σ = model.cfg.sigma; the Gumbel
    reflow passes its own. ``known_BT`` (bool, optional) marks positions given as conditioning:
    they enter clean (x_t = e) and are left out of the loss, which teaches the model to fill in
    around known spans (see ``random_known_mask``). Returns (loss, metrics) where metrics hold
    token-weighted sums per t-bucket so that they can be averaged over many batches exactly.
    """
    b = tokens_BT.shape[0]
    t_key, x0_key = jax.random.split(key)
    if t_B is None:
        t_B = sample_time(t_key, b, time_sampler, time_param)
    x1 = model.embed(tokens_BT)
    if x0 is None:
        x0 = model.cfg.sigma * jax.random.normal(x0_key, x1.shape, jnp.float32)
    x_t = noisy_path(x1, x0, t_B)
    mask = mask_BT.astype(jnp.float32)
    if known_BT is not None:
        x_t = jnp.where(known_BT[..., None], x1, x_t)
        mask = mask * (1.0 - known_BT.astype(jnp.float32))
    num_tokens = jnp.maximum(mask.sum(), 1.0)
    # The loss is Σ CE·mask / num_tokens; with model.loss_chunk the logits are never stored whole.
    loss, token_loss = model.token_losses(x_t, t_B, tokens_BT, mask / num_tokens, context)
    return loss, flow_metrics(jax.lax.stop_gradient(token_loss), mask, t_B, num_buckets)


def flow_metrics(
    token_loss_BT: jax.Array, mask_BT: jax.Array, t_B: jax.Array, num_buckets: int
) -> dict[str, jax.Array]:
    """Token-weighted loss sums, overall and per t-bucket, of per-token losses (``flow_loss``'s metrics)."""
    seq_tokens = mask_BT.sum(axis=1)
    seq_loss = jnp.sum(token_loss_BT * mask_BT, axis=1) / jnp.maximum(seq_tokens, 1.0)
    bucket_loss, bucket_weight = bucket_sums(seq_loss, t_B, seq_tokens, num_buckets)
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
    """x_{t'} = x_t + (t'−t)/(1−t)·(x̂1 − x_t); exact x̂1 at t' = 1."""
    return x_t + ((t_next - t) / (1.0 - t)) * (x1_hat - x_t)


def sample_flow(
    model: TokenFlow,
    x0: jax.Array,
    grid: jax.Array,
    *,
    context: jax.Array | None = None,
    temperature: float = 1.0,
    clamp_fn: Callable[[jax.Array, jax.Array], jax.Array] | None = None,
    final_state: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """Integrates the flow from x0 along ``grid`` in one ``lax.fori_loop``.

    ``temperature`` divides the logits before the softmax (1: the model's posterior mean).
    ``clamp_fn(x_t, t)`` (optional) overwrites known positions at every step (conditional
    generation). Returns (tokens [B, T] = argmax of the last logits, x [B, T, d]).

    The tokens need only the argmax of the last logits, so the last step skips the softmax and
    the V-wide p·E matmul (exact: same tokens; one of the 2K V-wide matmuls of a K-step sample)
    and x is the state the last network call read. ``final_state=True`` computes the final
    state p·E of the last step as well and returns it as x.
    """
    emb = model.embeddings()
    b, seq_len, _ = x0.shape
    steps = grid.shape[0] - 1

    def body(i, carry):
        x, tokens = carry
        t, t_next = grid[i], grid[i + 1]
        if clamp_fn is not None:
            x = clamp_fn(x, t)
        logits = model(x, jnp.full((b,), t), context)

        def advance(_):
            probs = jax.nn.softmax(logits / temperature, axis=-1)
            x1_hat = jnp.einsum("btv,vd->btd", probs, emb)
            return euler_update(x, x1_hat, t, t_next), tokens

        def finish(_):
            out = jnp.argmax(logits, axis=-1).astype(jnp.int32)
            return (advance(None)[0] if final_state else x), out

        return jax.lax.cond(i == steps - 1, finish, advance, None)

    x, tokens = jax.lax.fori_loop(0, steps, body, (x0.astype(jnp.float32), jnp.zeros((b, seq_len), jnp.int32)))
    return tokens, x


def gaussian_source(key: jax.Array, batch: int, seq_len: int, model: TokenFlow) -> jax.Array:
    cfg = model.cfg
    return cfg.sigma * jax.random.normal(key, (batch, seq_len, cfg.dim), jnp.float32)
