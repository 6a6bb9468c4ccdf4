"""Attention in models/layers.py against a naive reference: causal and padding masks, grouped KV
heads, the KV cache, and the implementation choice reaching JAX."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from discreteflow_jax.models.layers import Attention, KVCache, dot_product_attention


def naive_attention(q, k, v, mask_BTS, causal):
    """Every KV head repeated for its query heads, one softmax per head over masked fp32 logits."""
    b, t, n, d = q.shape
    s = k.shape[1]
    k = jnp.repeat(k, n // k.shape[2], axis=2).astype(jnp.float32)
    v = jnp.repeat(v, n // v.shape[2], axis=2).astype(jnp.float32)
    logits = jnp.einsum("btnd,bsnd->bnts", q.astype(jnp.float32), k) / math.sqrt(d)
    allowed = jnp.ones((b, t, s), bool) if mask_BTS is None else mask_BTS
    if causal:
        allowed = allowed & (jnp.arange(s)[None, :] <= jnp.arange(t)[:, None])
    logits = jnp.where(allowed[:, None], logits, -1e30)
    return jnp.einsum("bnts,bsnd->btnd", jax.nn.softmax(logits, axis=-1), v)


def _inputs(heads, kv_heads, dtype, b=3, t=7, d=8):
    keys = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(keys[0], (b, t, heads, d), dtype)
    k = jax.random.normal(keys[1], (b, t, kv_heads, d), dtype)
    v = jax.random.normal(keys[2], (b, t, kv_heads, d), dtype)
    probe = jax.random.normal(keys[3], (b, t, heads, d))
    # Right padding of different lengths; every query still sees key 0.
    lengths = jnp.array([t, t - 2, 3])
    padding = jnp.broadcast_to((jnp.arange(t)[None, :] < lengths[:, None])[:, None, :], (b, t, t))
    return q, k, v, probe, padding


@pytest.mark.parametrize("implementation", ["einsum", "xla"])
@pytest.mark.parametrize(
    "heads,kv_heads,dtype", [(4, 4, "float32"), (4, 2, "float32"), (4, 1, "float32"), (4, 2, "bfloat16")]
)
@pytest.mark.parametrize("causal,padded", [(False, False), (True, False), (False, True), (True, True)])
def test_attention_matches_naive_reference(implementation, heads, kv_heads, dtype, causal, padded):
    q, k, v, probe, padding = _inputs(heads, kv_heads, jnp.dtype(dtype))
    mask = padding if padded else None
    ours = lambda q, k, v, m, c: dot_product_attention(q, k, v, m, causal=c, implementation=implementation)

    def loss(fn, q, k, v):
        return jnp.sum(fn(q, k, v, mask, causal).astype(jnp.float32) * probe)

    # bf16 inputs: the reference is fp32 throughout, ours casts the probabilities to bf16 (2^-8).
    tol = 1e-5 if dtype == "float32" else 2e-2
    np.testing.assert_allclose(
        np.asarray(ours(q, k, v, mask, causal), np.float32), naive_attention(q, k, v, mask, causal), atol=tol, rtol=tol
    )
    grads = jax.grad(lambda *a: loss(ours, *a), argnums=(0, 1, 2))(q, k, v)
    expected = jax.grad(lambda *a: loss(naive_attention, *a), argnums=(0, 1, 2))(q, k, v)
    for name, a, e in zip("qkv", grads, expected, strict=True):
        scale = float(jnp.max(jnp.abs(e))) + 1e-12
        np.testing.assert_allclose(np.asarray(a, np.float32) / scale, np.asarray(e) / scale, atol=tol, err_msg=name)


def test_masks_matter():
    # The reference comparison above can fail: dropping the causal flag or the padding changes
    # the output.
    q, k, v, _, padding = _inputs(4, 2, jnp.float32)
    full = dot_product_attention(q, k, v)
    assert float(jnp.max(jnp.abs(dot_product_attention(q, k, v, causal=True) - full))) > 1e-2
    assert float(jnp.max(jnp.abs(dot_product_attention(q, k, v, padding) - full))) > 1e-2


def test_implementation_choice():
    q, k, v, _, padding = _inputs(4, 2, jnp.float32)
    # The default on the CPU is ours, exactly; jax.nn's XLA path agrees to float32 rounding.
    np.testing.assert_array_equal(
        dot_product_attention(q, k, v, padding, causal=True),
        dot_product_attention(q, k, v, padding, causal=True, implementation="einsum"),
    )
    np.testing.assert_allclose(
        dot_product_attention(q, k, v, padding, causal=True, implementation="xla"),
        dot_product_attention(q, k, v, padding, causal=True),
        atol=1e-6,
    )
    with pytest.raises(ValueError, match="not one of"):
        dot_product_attention(q, k, v, implementation="no-such-kernel")
    if jax.default_backend() != "gpu":  # the choice reaches JAX: cuDNN asked for where there is none
        with pytest.raises(RuntimeError, match="cuDNN"):
            dot_product_attention(q, k, v, implementation="cudnn")


def test_default_falls_back_to_ours_where_cudnn_refuses(monkeypatch):
    # As on a GPU in bf16, where the default asks for cuDNN first: where JAX refuses (here: no
    # cuDNN at all; on a GPU: shapes cuDNN does not take) ours runs, also under jax.grad.
    from discreteflow_jax.models import layers

    if jax.default_backend() == "gpu":
        pytest.skip("needs a machine without cuDNN")
    monkeypatch.setattr(layers, "_cudnn_may_apply", lambda q: True)
    q, k, v, probe, padding = _inputs(4, 2, jnp.bfloat16)

    def loss(implementation, q):
        out = dot_product_attention(q, k, v, padding, causal=True, implementation=implementation)
        return jnp.sum(out.astype(jnp.float32) * probe)

    np.testing.assert_array_equal(jax.grad(loss, 1)(None, q), jax.grad(loss, 1)("einsum", q))


@pytest.mark.parametrize("implementation", [None, "xla"])
def test_cached_decoding_matches_causal_attention(implementation):
    """Token-by-token decoding through the KV cache (an explicit position mask) equals one causal
    pass (the causal flag), with grouped KV heads and RoPE."""
    b, t, dim = 2, 6, 16
    attn = Attention(dim, 4, num_kv_heads=2, rngs=nnx.Rngs(0), implementation=implementation)
    x = jax.random.normal(jax.random.key(1), (b, t, dim))
    full, _ = attn(x, causal=True)
    cache = KVCache.zeros(b, t, 2, dim // 4)
    steps = []
    for i in range(t):
        out, cache = attn(x[:, i : i + 1], causal=True, cache=cache)
        steps.append(out)
    np.testing.assert_allclose(jnp.concatenate(steps, axis=1), full, atol=1e-5)
