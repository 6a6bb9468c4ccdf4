"""LLaMA-style decoder: pre-norm RMSNorm, RoPE, SwiGLU, causal (optionally grouped-query) attention.

Used as the Shakespeare teacher (trained from scratch) and as the target of the Hugging Face
LLaMA converter in ``discreteflow_jax.convert``. Parameter paths (the conversion table refers to them):

    embed.embedding                         [V, D]
    layers.{i}.attn_norm.scale              [D]
    layers.{i}.attn.{q,k,v,o}_proj.kernel   [in, out]
    layers.{i}.mlp_norm.scale               [D]
    layers.{i}.mlp.{gate,up,down}_proj.kernel
    final_norm.scale                        [D]
    lm_head.kernel                          [D, V]   (only when tie_embeddings=False)
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from discreteflow_jax.models.layers import Attention, KVCache, RMSNorm, SwiGLU, linear, truncated_normal_init


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int
    dim: int
    num_layers: int
    num_heads: int
    ffn_hidden: int
    max_len: int  # longest sequence the model is meant for; generate() refuses longer ones
    num_kv_heads: int | None = None  # None: plain multi-head attention; fewer heads: GQA
    head_dim: int | None = None  # None: dim // num_heads (HF checkpoints may set it explicitly)
    rope_theta: float = 10000.0
    # 1e-5 as in the original LLaMA code for models we train; the converter copies the
    # checkpoint's rms_norm_eps (HF's default is 1e-6), which matters for logit parity.
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    dtype: str = "float32"  # compute dtype; parameters are always stored in fp32
    # Std of embeddings and input projections (HF's initializer_range). Residual output projections
    # (o_proj, down_proj) use init_std / sqrt(2 * num_layers) so that the residual stream's variance
    # at init does not grow with depth (GPT-2 practice).
    init_std: float = 0.02
    bos_id: int | None = None
    eos_id: int | None = None

    def __post_init__(self):
        kv = self.num_kv_heads or self.num_heads
        if self.num_heads % kv:
            raise ValueError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={kv}")
        if self.head_dim is None and self.dim % self.num_heads:
            raise ValueError(f"dim={self.dim} is not divisible by num_heads={self.num_heads}")

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def head_size(self) -> int:
        return self.head_dim or self.dim // self.num_heads


class LlamaBlock(nnx.Module):
    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
        c = config
        dtype = jnp.dtype(c.dtype)
        out_std = c.init_std / math.sqrt(2 * c.num_layers)
        self.attn_norm = RMSNorm(c.dim, eps=c.norm_eps)
        self.attn = Attention(
            c.dim,
            c.num_heads,
            rngs=rngs,
            num_kv_heads=c.kv_heads,
            head_dim=c.head_size,
            rope_theta=c.rope_theta,
            init_std=c.init_std,
            out_init_std=out_std,
            dtype=dtype,
        )
        self.mlp_norm = RMSNorm(c.dim, eps=c.norm_eps)
        self.mlp = SwiGLU(c.dim, c.ffn_hidden, rngs=rngs, init_std=c.init_std, out_init_std=out_std, dtype=dtype)

    def __call__(
        self,
        x_BTD: jax.Array,
        *,
        positions_BT: jax.Array | None,
        key_mask_BS: jax.Array | None,
        cache: KVCache | None = None,
    ) -> tuple[jax.Array, KVCache | None]:
        h, cache = self.attn(
            self.attn_norm(x_BTD), causal=True, positions_BT=positions_BT, key_mask_BS=key_mask_BS, cache=cache
        )
        x_BTD = x_BTD + h
        return x_BTD + self.mlp(self.mlp_norm(x_BTD)), cache


class Llama(nnx.Module):
    """Decoder-only LM. ``__call__`` is the full causal forward; ``decode`` runs with a KV cache."""

    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
        self.config = config
        dtype = jnp.dtype(config.dtype)
        self.embed = nnx.Embed(
            config.vocab_size,
            config.dim,
            embedding_init=truncated_normal_init(config.init_std),
            dtype=dtype,
            rngs=rngs,
        )
        self.layers = nnx.List([LlamaBlock(config, rngs=rngs) for _ in range(config.num_layers)])
        self.final_norm = RMSNorm(config.dim, eps=config.norm_eps)
        self.lm_head = (
            None
            if config.tie_embeddings
            else linear(config.dim, config.vocab_size, rngs=rngs, stddev=config.init_std, dtype=dtype)
        )

    def _logits(self, x_BTD: jax.Array) -> jax.Array:
        x_BTD = self.final_norm(x_BTD)
        # Logits are accumulated in fp32 even with a bf16 forward: they feed softmaxes and losses.
        if self.lm_head is None:
            w_VD = self.embed.embedding[...].astype(x_BTD.dtype)
            return jnp.einsum("btd,vd->btv", x_BTD, w_VD, preferred_element_type=jnp.float32)
        w_DV = self.lm_head.kernel[...].astype(x_BTD.dtype)
        return jnp.einsum("btd,dv->btv", x_BTD, w_DV, preferred_element_type=jnp.float32)

    def __call__(
        self,
        tokens_BT: jax.Array,
        *,
        key_mask_BT: jax.Array | None = None,
        positions_BT: jax.Array | None = None,
    ) -> jax.Array:
        """Causal forward. ``key_mask_BT`` is False at padding (never attended to); positions
        default to 0..T-1 for every row, as in Hugging Face's forward. For left-padded rows pass
        ``positions_BT = max(cumsum(mask) - 1, 0)`` so real tokens start at position 0."""
        x = self.embed(tokens_BT)
        for layer in self.layers:
            x, _ = layer(x, positions_BT=positions_BT, key_mask_BS=key_mask_BT)
        return self._logits(x)

    def init_cache(self, batch: int, max_len: int) -> list[KVCache]:
        c = self.config
        return [KVCache.zeros(batch, max_len, c.kv_heads, c.head_size, jnp.dtype(c.dtype)) for _ in self.layers]

    def decode(
        self,
        tokens_BT: jax.Array,
        cache: list[KVCache],
        *,
        key_mask_BS: jax.Array | None = None,
        positions_BT: jax.Array | None = None,
    ) -> tuple[jax.Array, list[KVCache]]:
        """Appends ``tokens_BT`` at the cache's write index and returns their logits [B, T, V].

        ``key_mask_BS`` covers the whole cache length S (False for padding slots); positions
        default to the cache slots (index .. index+T-1)."""
        x = self.embed(tokens_BT)
        new_cache = []
        for layer, layer_cache in zip(self.layers, cache, strict=True):
            x, layer_cache = layer(x, positions_BT=positions_BT, key_mask_BS=key_mask_BS, cache=layer_cache)
            new_cache.append(layer_cache)
        return self._logits(x), new_cache
