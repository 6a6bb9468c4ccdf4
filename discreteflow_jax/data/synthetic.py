"""Synthetic sequence tasks whose exact Bayes denoisers are known, to measure how much of the
available context a TokenFlow reads (docs/context_ablation.md).

Every task is a Markov chain over V tokens with a uniform start and the transition
``P(v | u) = p·[v = π(u)] + (1 − p)/V``:

* ``pool``: p = 1 and π the identity, every position holds the same token; the useful evidence
  is found by pooling all positions.
* ``runs``: π the identity, p < 1; each token repeats the previous one with probability p. The
  useful neighbours are the nearby ones (found by relative position).
* ``map``: π a fixed random permutation; the neighbour's token has to be mapped through a learned
  token-to-token table before it is evidence for this position.

Under the Gaussian path x_t = t·e_x + (1 − t)·σ·z the likelihood of token v at one position is
``exp(c·⟨x_t, e_v⟩)`` up to factors common to every v (rows of E have equal norms), with
``c = t / (σ²(1 − t)²)``. The per-position Bayes denoiser multiplies it with the stationary
(uniform) prior; the all-context Bayes denoiser runs forward-backward through the chain. The
cross-entropies of both bound what a network can reach without and with its context.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

TASKS = ("pool", "runs", "map")


@dataclasses.dataclass(frozen=True)
class MarkovTask:
    """A task: vocabulary size, repeat probability p and the successor table π [V]."""

    name: str
    vocab_size: int
    repeat_prob: float
    successor: np.ndarray

    @property
    def predecessor(self) -> np.ndarray:
        inverse = np.empty_like(self.successor)
        inverse[self.successor] = np.arange(self.vocab_size)
        return inverse


def make_task(name: str, vocab_size: int, repeat_prob: float = 0.75, seed: int = 0) -> MarkovTask:
    if name not in TASKS:
        raise ValueError(f"unknown synthetic task {name!r}; valid: {', '.join(TASKS)}")
    if not 0.0 < repeat_prob <= 1.0:
        raise ValueError(f"repeat_prob must be in (0, 1], got {repeat_prob}")
    if name == "pool":
        return MarkovTask(name, vocab_size, 1.0, np.arange(vocab_size))
    if name == "runs":
        return MarkovTask(name, vocab_size, repeat_prob, np.arange(vocab_size))
    return MarkovTask(name, vocab_size, repeat_prob, np.random.default_rng(seed).permutation(vocab_size))


def sample_sequences(task: MarkovTask, rng: np.random.Generator, batch: int, seq_len: int) -> np.ndarray:
    """[batch, seq_len] int32 sequences drawn from the chain."""
    out = np.empty((batch, seq_len), np.int32)
    out[:, 0] = rng.integers(0, task.vocab_size, batch)
    for i in range(1, seq_len):
        keep = rng.random(batch) < task.repeat_prob
        fresh = rng.integers(0, task.vocab_size, batch)
        out[:, i] = np.where(keep, task.successor[out[:, i - 1]], fresh)
    return out


def likelihood_coefficient(t: float | jax.Array, sigma: float) -> jax.Array:
    """c(t) = t / (σ²(1 − t)²): log p(x_t | v) = c·⟨x_t, e_v⟩ + terms equal for every v."""
    t = jnp.asarray(t, jnp.float32)
    return t / (sigma**2 * (1.0 - t) ** 2)


def position_log_likelihoods(x_t: jax.Array, emb: jax.Array, t: float | jax.Array, sigma: float) -> jax.Array:
    """log p(x_t,i | v) up to a per-position constant, [B, T, V]. ``t`` is a scalar or [B]."""
    c = likelihood_coefficient(t, sigma)
    c = c[:, None, None] if c.ndim == 1 else c
    return c * jnp.einsum("btd,vd->btv", x_t.astype(jnp.float32), emb.astype(jnp.float32))


def per_position_posterior(log_lik: jax.Array) -> jax.Array:
    """log posterior of each position alone (uniform stationary prior), [B, T, V]."""
    return jax.nn.log_softmax(log_lik, axis=-1)


def chain_posterior(log_lik: jax.Array, task: MarkovTask) -> jax.Array:
    """Exact log posterior of every position given all of x_t (forward-backward), [B, T, V].

    The transition is a permutation plus a uniform jump, so one step costs O(V), not O(V²):
    with a normalized message m, (m·P)(v) = p·m(π⁻¹(v)) + (1 − p)/V.
    """
    v = task.vocab_size
    p = task.repeat_prob
    succ = jnp.asarray(task.successor)
    pred = jnp.asarray(task.predecessor)
    log_uniform = jnp.log(jnp.float32((1.0 - p) / v)) if p < 1.0 else jnp.float32(-jnp.inf)
    log_p = jnp.log(jnp.float32(p))
    lik = jnp.moveaxis(log_lik, 1, 0)  # [T, B, V]

    def forward(alpha, lik_i):
        alpha = jax.nn.log_softmax(alpha, axis=-1)
        pushed = jnp.logaddexp(log_p + alpha[:, pred], log_uniform)
        new = lik_i + pushed
        return new, new

    alpha0 = lik[0]
    _, alphas = jax.lax.scan(forward, alpha0, lik[1:])
    alphas = jnp.concatenate([alpha0[None], alphas], axis=0)

    def backward(beta, lik_next):
        # beta_i(u) = log Σ_v P(v|u) L_{i+1}(v) β_{i+1}(v)
        w = jax.nn.log_softmax(lik_next + beta, axis=-1)  # normalized: Σ_v exp(w) = 1
        new = jnp.logaddexp(log_p + w[:, succ], log_uniform)
        return new, new

    beta_last = jnp.zeros_like(lik[-1])
    _, betas = jax.lax.scan(backward, beta_last, lik[1:][::-1])
    betas = jnp.concatenate([betas[::-1], beta_last[None]], axis=0)
    return jnp.moveaxis(jax.nn.log_softmax(alphas + betas, axis=-1), 0, 1)


def token_cross_entropy(log_post: jax.Array, tokens: jax.Array) -> jax.Array:
    """−log posterior of the true tokens, [B, T]."""
    return -jnp.take_along_axis(log_post, tokens[..., None], axis=-1)[..., 0]


def bayes_losses(
    tokens: jax.Array, x_t: jax.Array, emb: jax.Array, t: float | jax.Array, sigma: float, task: MarkovTask
) -> tuple[float, float]:
    """(per-position Bayes CE, all-context Bayes CE), means over tokens, at the given x_t."""
    log_lik = position_log_likelihoods(x_t, emb, t, sigma)
    alone = token_cross_entropy(per_position_posterior(log_lik), tokens)
    full = token_cross_entropy(chain_posterior(log_lik, task), tokens)
    return float(jnp.mean(alone)), float(jnp.mean(full))
