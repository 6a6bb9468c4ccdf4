"""GPT-2: learned position embeddings, pre-norm LayerNorm with bias, tanh-GELU MLP, biased attention,
head tied to the token embedding. Weights come from the Hugging Face checkpoint via
``discreteflow_jax.io.hf``. Parameter paths:

    wte.embedding                             [V, D]
    wpe.embedding                             [max_len, D]
    layers.{i}.ln_1.{scale,bias}              [D]
    layers.{i}.attn.{q,k,v,o}_proj.{kernel,bias}
    layers.{i}.ln_2.{scale,bias}              [D]
    layers.{i}.mlp.{up_proj,down_proj}.{kernel,bias}
    ln_f.{scale,bias}                         [D]

Positions: like Hugging Face's forward, positions default to 0..T-1 in every row (``decode``:
the cache slots). For left-padded rows pass ``positions_BT = max(cumsum(mask) - 1, 0)``, which is
what ``transformers`` ``generate`` does and what ``discreteflow_jax.models.generate`` does.
Positions at or beyond ``max_len`` are clamped by the embedding lookup, so callers must stay below it.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from discreteflow_jax.models.decoder import DecoderLM, PreNormBlock, tied_logits
from discreteflow_jax.models.layers import Attention, linear, truncated_normal_init


@dataclasses.dataclass(frozen=True)
class GPT2Config:
    vocab_size: int = 50257
    dim: int = 768
    num_layers: int = 12
    num_heads: int = 12
    max_len: int = 1024
    ffn_hidden: int | None = None  # None: 4 * dim (HF's n_inner=None)
    layer_norm_eps: float = 1e-5
    dtype: str = "float32"  # compute dtype; parameters are always stored in fp32
    # GPT-2's init: N(0, 0.02²) everywhere, residual output projections scaled by 1/sqrt(2 * layers).
    init_std: float = 0.02
    bos_id: int | None = 50256
    eos_id: int | None = 50256

    def __post_init__(self):
        if self.dim % self.num_heads:
            raise ValueError(f"dim={self.dim} is not divisible by num_heads={self.num_heads}")

    @property
    def mlp_hidden(self) -> int:
        return self.ffn_hidden or 4 * self.dim

    @property
    def kv_heads(self) -> int:
        return self.num_heads  # no grouped-query attention in GPT-2

    @property
    def head_size(self) -> int:
        return self.dim // self.num_heads


class LayerNorm(nnx.Module):
    """LayerNorm with scale and bias, statistics in fp32 (GPT-2 is sensitive to them in bf16)."""

    def __init__(self, dim: int, *, eps: float = 1e-5):
        self.eps = eps
        self.scale = nnx.Param(jnp.ones((dim,), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((dim,), jnp.float32))

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)  # biased, as torch
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * self.scale[...] + self.bias[...]).astype(x.dtype)


class GeluMLP(nnx.Module):
    """down(gelu_tanh(up(x))): HF's "gelu_new" is the tanh approximation."""

    def __init__(self, dim: int, hidden: int, *, rngs: nnx.Rngs, init_std: float, out_init_std: float, dtype):
        kw = {"rngs": rngs, "use_bias": True, "dtype": dtype}
        self.up_proj = linear(dim, hidden, stddev=init_std, **kw)
        self.down_proj = linear(hidden, dim, stddev=out_init_std, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down_proj(jax.nn.gelu(self.up_proj(x), approximate=True))


class GPT2Block(PreNormBlock):
    def __init__(self, config: GPT2Config, *, rngs: nnx.Rngs):
        c = config
        dtype = jnp.dtype(c.dtype)
        out_std = c.init_std / math.sqrt(2 * c.num_layers)
        self.ln_1 = LayerNorm(c.dim, eps=c.layer_norm_eps)
        self.attn = Attention(
            c.dim,
            c.num_heads,
            rngs=rngs,
            rope_theta=None,
            use_bias=True,
            init_std=c.init_std,
            out_init_std=out_std,
            dtype=dtype,
        )
        self.ln_2 = LayerNorm(c.dim, eps=c.layer_norm_eps)
        self.mlp = GeluMLP(c.dim, c.mlp_hidden, rngs=rngs, init_std=c.init_std, out_init_std=out_std, dtype=dtype)

    def _norms(self) -> tuple[LayerNorm, LayerNorm]:
        return self.ln_1, self.ln_2


class GPT2(DecoderLM):
    """GPT-2 LM; ``__call__``, ``hidden``, ``init_cache`` and ``decode`` come from ``DecoderLM``."""

    def __init__(self, config: GPT2Config, *, rngs: nnx.Rngs):
        self.config = config
        dtype = jnp.dtype(config.dtype)
        emb_init = truncated_normal_init(config.init_std)
        self.wte = nnx.Embed(config.vocab_size, config.dim, embedding_init=emb_init, dtype=dtype, rngs=rngs)
        self.wpe = nnx.Embed(config.max_len, config.dim, embedding_init=emb_init, dtype=dtype, rngs=rngs)
        self.layers = nnx.List([GPT2Block(config, rngs=rngs) for _ in range(config.num_layers)])
        self.ln_f = LayerNorm(config.dim, eps=config.layer_norm_eps)

    def _embed(self, tokens_BT: jax.Array, positions_BT: jax.Array | None, offset: jax.Array | int) -> jax.Array:
        if positions_BT is None:
            positions_BT = offset + jnp.arange(tokens_BT.shape[1], dtype=jnp.int32)[None, :]
        return self.wte(tokens_BT) + self.wpe(positions_BT)

    def _logits(self, x_BTD: jax.Array) -> jax.Array:
        return tied_logits(self.ln_f(x_BTD), self.wte)
