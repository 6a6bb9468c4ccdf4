"""What the decoder-only teachers (``Llama``, ``GPT2``) share: the pre-norm residual block, the
walk over the blocks with or without a KV cache, and the interface ``generate`` relies on.

The models keep their own attribute names (``ln_1`` vs ``attn_norm``, ``wte`` vs ``embed``):
they are the parameter paths that the Hugging Face conversion table, the sharding rules and saved
checkpoints refer to. Only behaviour lives here, no parameters.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from discreteflow_jax.models.layers import Attention, KVCache


class PreNormBlock(nnx.Module):
    """``x + attn(norm(x))`` then ``x + mlp(norm(x))``. Subclasses create ``attn`` (an
    ``Attention``), ``mlp`` and two norms, and return the norms from ``_norms``."""

    attn: Attention
    mlp: nnx.Module

    def _norms(self) -> tuple[nnx.Module, nnx.Module]:
        raise NotImplementedError

    def __call__(
        self,
        x_BTD: jax.Array,
        *,
        positions_BT: jax.Array | None,
        key_mask_BS: jax.Array | None,
        cache: KVCache | None = None,
    ) -> tuple[jax.Array, KVCache | None]:
        attn_norm, mlp_norm = self._norms()
        # Without RoPE (GPT-2) attention ignores the positions; they are added at the embedding.
        h, cache = self.attn(
            attn_norm(x_BTD), causal=True, positions_BT=positions_BT, key_mask_BS=key_mask_BS, cache=cache
        )
        x_BTD = x_BTD + h
        return x_BTD + self.mlp(mlp_norm(x_BTD)), cache


class DecoderLM(nnx.Module):
    """Causal LM over ``layers`` (``PreNormBlock``\\ s). Subclasses provide ``config`` (with
    ``kv_heads``, ``head_size``, ``dtype``, ``max_len``), ``_embed`` and ``_logits``; this gives
    ``hidden``, ``__call__``, ``init_cache`` and ``decode`` (what ``generate`` needs)."""

    layers: nnx.List

    def _embed(self, tokens_BT: jax.Array, positions_BT: jax.Array | None, offset: jax.Array | int) -> jax.Array:
        """Token (and, without RoPE, position) embeddings; positions default to offset..offset+T-1."""
        raise NotImplementedError

    def _logits(self, x_BTD: jax.Array) -> jax.Array:
        """Final norm and output projection: fp32 logits [B, T, V]."""
        raise NotImplementedError

    def hidden(
        self,
        tokens_BT: jax.Array,
        *,
        key_mask_BT: jax.Array | None = None,
        positions_BT: jax.Array | None = None,
    ) -> jax.Array:
        """The residual stream after the last block, before ``_logits`` (the final norm)."""
        x = self._embed(tokens_BT, positions_BT, 0)
        for layer in self.layers:
            x, _ = layer(x, positions_BT=positions_BT, key_mask_BS=key_mask_BT)
        return x

    def __call__(
        self,
        tokens_BT: jax.Array,
        *,
        key_mask_BT: jax.Array | None = None,
        positions_BT: jax.Array | None = None,
    ) -> jax.Array:
        """Causal forward. ``key_mask_BT`` is False at padding (never attended to); positions
        default to 0..T-1 for every row, as in Hugging Face's forward. For left-padded rows pass
        ``positions_BT = max(cumsum(mask) - 1, 0)`` so real tokens start at position 0.
        Returns fp32 logits [B, T, V]."""
        return self._logits(self.hidden(tokens_BT, key_mask_BT=key_mask_BT, positions_BT=positions_BT))

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
        x = self._embed(tokens_BT, positions_BT, cache[0].index)
        new_cache = []
        for layer, layer_cache in zip(self.layers, cache, strict=True):
            x, layer_cache = layer(x, positions_BT=positions_BT, key_mask_BS=key_mask_BS, cache=layer_cache)
            new_cache.append(layer_cache)
        return self._logits(x), new_cache


def tied_logits(x_BTD: jax.Array, embed: nnx.Embed) -> jax.Array:
    """Logits through the token embedding (tied head), accumulated in fp32 even with a bf16
    forward: they feed softmaxes and losses."""
    w_VD = embed.embedding[...].astype(x_BTD.dtype)
    return jnp.einsum("btd,vd->btv", x_BTD, w_VD, preferred_element_type=jnp.float32)
