"""Transformer building blocks shared by TokenFlow, LLaMA and GPT-2.

All modules are Flax NNX. Parameters are kept in ``param_dtype`` (fp32 by default) and
the computation runs in ``dtype`` (fp32 or bf16). Softmaxes inside attention run in fp32.

Parameter names are part of the public contract: the logical-axis rules in
``discreteflow_jax.models.sharding`` and the Hugging Face conversion table refer to them.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx


def truncated_normal_init(stddev: float):
    """Normal(0, stddev²) truncated at ±3 standard deviations (stddev of the untruncated law)."""

    def init(key, shape, dtype=jnp.float32):
        return (stddev * jax.random.truncated_normal(key, -3.0, 3.0, shape, jnp.float32)).astype(dtype)

    return init


def linear(
    in_features: int,
    out_features: int,
    *,
    rngs: nnx.Rngs,
    stddev: float | None = None,
    use_bias: bool = False,
    zero_init: bool = False,
    dtype=jnp.float32,
    param_dtype=jnp.float32,
) -> nnx.Linear:
    """A Linear layer with the documented init: truncated normal, std 1/sqrt(in) unless given."""
    if zero_init:
        kernel_init = nnx.initializers.zeros_init()
    else:
        kernel_init = truncated_normal_init(stddev if stddev is not None else 1.0 / math.sqrt(in_features))
    return nnx.Linear(
        in_features,
        out_features,
        use_bias=use_bias,
        kernel_init=kernel_init,
        bias_init=nnx.initializers.zeros_init(),
        dtype=dtype,
        param_dtype=param_dtype,
        rngs=rngs,
    )


@jax.custom_vjp
def take_rows(table: jax.Array, idx: jax.Array) -> jax.Array:
    """``jnp.take(table, idx, axis=0)`` whose gradient (a scatter-add into a zero [rows, d] table)
    allocates that table only once the incoming gradient exists. Autodiff of ``jnp.take`` creates
    the zero table from a constant, which a scheduler may place at the start of the program,
    holding a full table-sized buffer through the whole forward pass."""
    return jnp.take(table, idx, axis=0)


def _take_rows_fwd(table, idx):
    return take_rows(table, idx), (table, idx)


def _take_rows_bwd(residuals, g):
    table, idx = residuals
    # +0 or −0 depending on the gradient: equal to zero either way, but not a constant.
    zero = jnp.where(jnp.isnan(g.reshape(-1)[0]), -0.0, 0.0).astype(g.dtype)
    base = jnp.broadcast_to(zero, table.shape)
    return base.at[idx].add(g), None


take_rows.defvjp(_take_rows_fwd, _take_rows_bwd)


class RMSNorm(nnx.Module):
    """Root-mean-square norm, computed in fp32. ``use_scale=False`` gives the affine-free
    variant used before adaLN modulation."""

    def __init__(self, dim: int, *, eps: float = 1e-6, use_scale: bool = True, param_dtype=jnp.float32):
        self.eps = eps
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype)) if use_scale else None

    def __call__(self, x: jax.Array) -> jax.Array:
        dtype = x.dtype
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        if self.scale is not None:
            y = y * self.scale[...].astype(jnp.float32)
        return y.astype(dtype)


def rope_tables(positions: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """cos/sin tables of shape positions.shape + (head_dim,), "rotate-half" layout (as HF LLaMA)."""
    half = head_dim // 2
    inv_freq = 1.0 / (theta ** (jnp.arange(half, dtype=jnp.float32) * 2.0 / head_dim))
    angles = positions.astype(jnp.float32)[..., None] * inv_freq
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x_BTHD: jax.Array, positions_BT: jax.Array, theta: float) -> jax.Array:
    """Rotary position embedding on the last axis of a [B, T, H, D] tensor."""
    cos, sin = rope_tables(positions_BT, x_BTHD.shape[-1], theta)
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    x32 = x_BTHD.astype(jnp.float32)
    half = x32.shape[-1] // 2
    rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
    return (x32 * cos + rotated * sin).astype(x_BTHD.dtype)


class KVCache(NamedTuple):
    """Keys/values of all positions written so far. ``index`` is the next position to write."""

    k: jax.Array  # [B, S, Hkv, D]
    v: jax.Array  # [B, S, Hkv, D]
    index: jax.Array  # scalar int32

    @staticmethod
    def zeros(batch: int, max_len: int, num_kv_heads: int, head_dim: int, dtype=jnp.float32) -> KVCache:
        shape = (batch, max_len, num_kv_heads, head_dim)
        return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.zeros((), jnp.int32))


# Attention implementations: "einsum" is ours below, "xla" and "cudnn" are those of
# ``jax.nn.dot_product_attention``. jax.nn's XLA path computes the same values, but its softmax
# leaves XLA more [T, S]-sized buffers to keep for the backward pass than ``softmax_last`` does, and
# the train step's compiled temporaries grow by about a tenth (docs/design.md). So the default is
# ours, except on a GPU with fp16/bf16 inputs, where cuDNN flash attention keeps no [T, S] buffer.
ATTENTION_IMPLEMENTATIONS = (None, "einsum", "xla", "cudnn")


def dot_product_attention(
    q_BTNH: jax.Array,
    k_BSKH: jax.Array,
    v_BSKH: jax.Array,
    mask_BTS: jax.Array | None = None,
    *,
    causal: bool = False,
    implementation: str | None = None,
) -> jax.Array:
    """Softmax attention with grouped KV heads (N a multiple of K); logits and softmax in fp32.

    ``mask_BTS`` is True where a query may attend a key (None: attend everything); ``causal`` also
    hides the keys after the query's own position (query i and key i at the same position).
    ``implementation``: "einsum" (ours), "xla" or "cudnn" (``jax.nn.dot_product_attention``'s; cuDNN
    needs a GPU and fp16/bf16), or None: cuDNN where it applies, else ours.
    """
    if implementation not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(f"attention implementation {implementation!r} is not one of {ATTENTION_IMPLEMENTATIONS}")
    if implementation is None and _cudnn_may_apply(q_BTNH):
        try:
            return _library_attention(q_BTNH, k_BSKH, v_BSKH, mask_BTS, causal, "cudnn")
        except (NotImplementedError, RuntimeError, ValueError):
            pass  # shapes cuDNN does not take, or no cuDNN: ours (the checks run while tracing)
    if implementation in ("xla", "cudnn"):
        return _library_attention(q_BTNH, k_BSKH, v_BSKH, mask_BTS, causal, implementation)
    if causal:
        t, s = q_BTNH.shape[1], k_BSKH.shape[1]
        lower = jnp.arange(s)[None, :] <= jnp.arange(t)[:, None]
        mask_BTS = lower[None] if mask_BTS is None else mask_BTS & lower
    return _einsum_attention(q_BTNH, k_BSKH, v_BSKH, mask_BTS)


def _cudnn_may_apply(q_BTNH: jax.Array) -> bool:
    return jax.default_backend() == "gpu" and q_BTNH.dtype in (jnp.bfloat16, jnp.float16)


def _library_attention(q, k, v, mask_BTS, causal, implementation):
    mask = None if mask_BTS is None else mask_BTS[:, None, :, :]
    return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=causal, implementation=implementation)


def _einsum_attention(q_BTNH, k_BSKH, v_BSKH, mask_BTS):
    num_heads, num_kv = q_BTNH.shape[2], k_BSKH.shape[2]
    group = num_heads // num_kv
    b, t, _, d = q_BTNH.shape
    q = q_BTNH.reshape(b, t, num_kv, group, d)
    logits = jnp.einsum("btkgd,bskd->bkgts", q, k_BSKH, preferred_element_type=jnp.float32)
    logits = logits / math.sqrt(d)
    if mask_BTS is not None:
        logits = jnp.where(mask_BTS[:, None, None, :, :], logits, jnp.finfo(jnp.float32).min)
    probs = softmax_last(logits).astype(v_BSKH.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v_BSKH)
    return out.reshape(b, t, num_heads, d)


@jax.custom_vjp
def softmax_last(x: jax.Array) -> jax.Array:
    """Softmax over the last axis as exp(x − logsumexp(x)), keeping only its output for the
    backward pass (y·(g − Σ y·g)). Written as exp of a shifted input rather than exp/sum so that
    XLA keeps the probabilities themselves, not the exponentials and a broadcast reciprocal of
    their sums that it would recombine in the backward pass (two more [.., T, S] buffers)."""
    return jnp.exp(x - jax.nn.logsumexp(x, axis=-1, keepdims=True))


def _softmax_last_fwd(x):
    y = softmax_last(x)
    return y, y


def _softmax_last_bwd(y, g):
    return (y * (g - jnp.sum(y * g, axis=-1, keepdims=True)),)


softmax_last.defvjp(_softmax_last_fwd, _softmax_last_bwd)


class Attention(nnx.Module):
    """Multi-head (optionally grouped-query) attention with RoPE, causal masking, an optional
    key padding mask, and an optional KV cache for autoregressive decoding.

    With ``rope_theta=None`` no rotary embedding is applied (GPT-2). In cross-attention with RoPE,
    context entry j is treated as sitting at position j (a context aligned with the sequence).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        rngs: nnx.Rngs,
        num_kv_heads: int | None = None,
        head_dim: int | None = None,
        kv_dim: int | None = None,
        rope_theta: float | None = 10000.0,
        use_bias: bool = False,
        init_std: float | None = None,
        out_init_std: float | None = None,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        implementation: str | None = None,
    ):
        self.num_heads = num_heads
        self.implementation = implementation  # see dot_product_attention
        self.num_kv_heads = num_kv_heads or num_heads
        self.head_dim = head_dim or dim // num_heads
        self.rope_theta = rope_theta
        kv_dim = kv_dim or dim
        kw = dict(rngs=rngs, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype)
        self.q_proj = linear(dim, num_heads * self.head_dim, stddev=init_std, **kw)
        self.k_proj = linear(kv_dim, self.num_kv_heads * self.head_dim, stddev=init_std, **kw)
        self.v_proj = linear(kv_dim, self.num_kv_heads * self.head_dim, stddev=init_std, **kw)
        self.o_proj = linear(num_heads * self.head_dim, dim, stddev=out_init_std, **kw)

    def __call__(
        self,
        x_BTD: jax.Array,
        *,
        causal: bool = False,
        positions_BT: jax.Array | None = None,
        key_mask_BS: jax.Array | None = None,
        context_BSE: jax.Array | None = None,
        cache: KVCache | None = None,
    ) -> tuple[jax.Array, KVCache | None]:
        b, t, _ = x_BTD.shape
        source = x_BTD if context_BSE is None else context_BSE
        q = self.q_proj(x_BTD).reshape(b, t, self.num_heads, self.head_dim)
        k = self.k_proj(source).reshape(b, source.shape[1], self.num_kv_heads, self.head_dim)
        v = self.v_proj(source).reshape(b, source.shape[1], self.num_kv_heads, self.head_dim)

        offset = jnp.zeros((), jnp.int32) if cache is None else cache.index
        if positions_BT is None:
            positions_BT = jnp.broadcast_to(offset + jnp.arange(t, dtype=jnp.int32), (b, t))
        if self.rope_theta is not None:
            k_positions = positions_BT
            if context_BSE is not None:
                # A position-aligned context (one entry per sequence position, e.g. Gumbel noise):
                # keys rotate by their own index, so a head can find the entry at relative offset 0.
                s_len = source.shape[1]
                k_positions = jnp.broadcast_to(jnp.arange(s_len, dtype=jnp.int32), (b, s_len))
            q = apply_rope(q, positions_BT, self.rope_theta)
            k = apply_rope(k, k_positions, self.rope_theta)

        new_cache = None
        if cache is not None:
            k_all = jax.lax.dynamic_update_slice(cache.k, k.astype(cache.k.dtype), (0, offset, 0, 0))
            v_all = jax.lax.dynamic_update_slice(cache.v, v.astype(cache.v.dtype), (0, offset, 0, 0))
            new_cache = KVCache(k_all, v_all, offset + t)
            k, v = k_all, v_all
            key_pos = jnp.arange(k.shape[1], dtype=jnp.int32)
            query_pos = offset + jnp.arange(t, dtype=jnp.int32)
            mask = key_pos[None, :] <= query_pos[:, None]  # written and not in the future
            mask = jnp.broadcast_to(mask, (b, t, k.shape[1]))
        else:
            mask = None
        # Without a cache, query i and key i are the same position: the causal flag is exact (and
        # lets an implementation skip the masked blocks). Cross-attention is never causal.
        is_causal = causal and cache is None and context_BSE is None
        if key_mask_BS is not None:
            key_mask = key_mask_BS[:, None, :]
            mask = key_mask if mask is None else mask & key_mask

        out = dot_product_attention(
            q, k.astype(q.dtype), v.astype(q.dtype), mask, causal=is_causal, implementation=self.implementation
        )
        return self.o_proj(out.reshape(b, t, self.num_heads * self.head_dim)), new_cache


class SwiGLU(nnx.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

    def __init__(
        self,
        dim: int,
        hidden: int,
        *,
        rngs: nnx.Rngs,
        init_std: float | None = None,
        out_init_std: float | None = None,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
    ):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.gate_proj = linear(dim, hidden, stddev=init_std, **kw)
        self.up_proj = linear(dim, hidden, stddev=init_std, **kw)
        self.down_proj = linear(hidden, dim, stddev=out_init_std, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        gate, up = self.gate_proj(x), self.up_proj(x)
        down = self.down_proj
        if down.bias is not None or down.dtype is None:
            return down(jax.nn.silu(gate) * up)
        # nnx.Linear's computation (the kernel cast to the compute dtype, then the matmul), with a
        # backward pass that keeps only gate and up (see ``swiglu_down``).
        return swiglu_down(gate, up, down.kernel[...].astype(down.dtype))


def _swiglu_down_primal(gate: jax.Array, up: jax.Array, kernel: jax.Array) -> jax.Array:
    h = jax.nn.silu(gate) * up
    return jax.lax.dot_general(h, kernel, (((h.ndim - 1,), (0,)), ((), ())))


@jax.custom_vjp
def swiglu_down(gate: jax.Array, up: jax.Array, kernel: jax.Array) -> jax.Array:
    """(silu(gate)·up) @ kernel, the SwiGLU output projection. Same values and derivatives as the
    plain expression, but the backward pass keeps only gate and up and recomputes silu(gate)·up
    and its derivative terms; autodiff of the plain form stores silu(gate)·up as well (and
    sigmoid(gate), silu(gate) unless XLA recomputes them), i.e. one to three more
    [tokens, hidden] buffers per layer through the whole forward pass."""
    return _swiglu_down_primal(gate, up, kernel)


def _swiglu_down_fwd(gate, up, kernel):
    return _swiglu_down_primal(gate, up, kernel), (gate, up, kernel)


def _swiglu_down_bwd(residuals, g):
    gate, up, kernel = residuals
    lead = tuple(range(g.ndim - 1))
    dh = jax.lax.dot_general(g, kernel, (((g.ndim - 1,), (1,)), ((), ())))
    # Make the recomputation depend on the incoming gradient, so that no scheduler can run it (and
    # keep its results) during the forward pass. Where dh is NaN, g is not finite and the
    # gradients are NaN either way.
    gate = jnp.where(jnp.isnan(dh), dh, gate)
    sig = jax.nn.sigmoid(gate)
    silu = gate * sig
    h = silu * up
    d_kernel = jax.lax.dot_general(h, g, ((lead, lead), ((), ())))
    # d silu(x)/dx = σ(x) + x·σ(x)(1 − σ(x)), the derivative autodiff takes of x·σ(x).
    return dh * up * (sig + silu * (1 - sig)), dh * silu, d_kernel


swiglu_down.defvjp(_swiglu_down_fwd, _swiglu_down_bwd)
