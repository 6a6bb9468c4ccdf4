"""The Gumbel logit channel's readout through a model's output layer: tokens = argmax(logits/τ + G)
and their embedding, a chunk of positions at a time under ``lax.scan``, so that neither the
[B, T, V] logits nor the noise exist whole (as ``linear_ce`` does for the cross-entropy)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

# The logit channel's noise: positions [C] -> noise [B, C, V] (drawn again for each chunk of positions).
NoiseFn = Callable[[jax.Array], jax.Array]


def over_position_chunks(fn: Callable[[jax.Array], Any], seq_len: int, chunk: int) -> Any:
    """Runs ``fn(start)`` — a pytree of [B, C, ...] arrays for positions start..start+C−1 — for each
    chunk of ``chunk`` positions (0: one chunk) under ``lax.scan``, and joins them as [B, T, ...]."""
    chunk = seq_len if chunk <= 0 else chunk
    if seq_len % chunk:
        raise ValueError(f"noise_chunk={chunk} must divide the sequence length {seq_len}")
    _, out = jax.lax.scan(lambda _, index: (None, fn(index * chunk)), None, jnp.arange(seq_len // chunk))
    # [chunks, B, C, ...] -> [B, T, ...]
    return jax.tree.map(lambda a: jnp.moveaxis(a, 0, 1).reshape(a.shape[1], seq_len, *a.shape[3:]), out)


def noisy_readout(
    model: Any, x: jax.Array, t_B: jax.Array, context: jax.Array | None, noise_fn: NoiseFn, *,
    temperature: float = 1.0, noise_tau: float = 0.0, chunk: int = 0,
) -> tuple[jax.Array, jax.Array]:
    """The logit channel's readout of one network call: (x̂₁ [B, T, f], tokens [B, T]) with tokens =
    argmax(logits/temperature + noise) and x̂₁ their embedding (``noise_tau`` = 0) or the softmax of
    the noisy logits at ``noise_tau`` times E.

    The trunk runs once (``model.hidden``); the output layer, ``noise_fn(positions)`` and the
    argmax run ``chunk`` positions at a time under ``lax.scan`` (0 or T: one chunk), so the
    [B, T, V] logits and noise never exist whole. Models without ``hidden``/``output_logits``
    (test oracles) are read whole and sliced. ``t_B`` is [B] or [B, T]."""
    seq_len = x.shape[1]
    chunk = seq_len if chunk <= 0 else chunk
    if hasattr(model, "hidden") and hasattr(model, "output_logits"):
        h = model.hidden(x, t_B, context).astype(jnp.float32)

        def logits_of(start: jax.Array) -> jax.Array:
            t_c = t_B if t_B.ndim == 1 else jax.lax.dynamic_slice_in_dim(t_B, start, chunk, axis=1)
            return model.output_logits(jax.lax.dynamic_slice_in_dim(h, start, chunk, axis=1),
                                       jax.lax.dynamic_slice_in_dim(x, start, chunk, axis=1), t_c)
    else:
        whole = model(x, t_B, context)

        def logits_of(start: jax.Array) -> jax.Array:
            return jax.lax.dynamic_slice_in_dim(whole, start, chunk, axis=1)

    emb = model.embeddings()

    def one_chunk(start: jax.Array) -> tuple[jax.Array, jax.Array]:
        noisy = logits_of(start) / temperature + noise_fn(start + jnp.arange(chunk))
        tokens = jnp.argmax(noisy, axis=-1).astype(jnp.int32)
        if noise_tau > 0:
            x1 = jnp.einsum("bcv,vf->bcf", jax.nn.softmax(noisy / noise_tau, axis=-1), emb)
        else:
            x1 = jnp.take(emb, tokens, axis=0)
        return x1, tokens

    return over_position_chunks(one_chunk, seq_len, chunk)
