"""LLaMA-style decoder: pre-norm RMSNorm, RoPE, SwiGLU, causal (optionally grouped-query) attention.

Used as the Shakespeare teacher (trained from scratch) and as the target of the Hugging Face
LLaMA converter in ``discreteflow_jax.io.hf``. Parameter paths (the conversion table refers to them):

    embed.embedding                         [V, D]
    layers.{i}.attn_norm.scale              [D]
    layers.{i}.attn.{q,k,v,o}_proj.kernel   [in, out]
    layers.{i}.mlp_norm.scale               [D]
    layers.{i}.mlp.{gate,up,down}_proj.kernel
    final_norm.scale                        [D]
    lm_head.kernel                          [D, V]   (only when tie_embeddings=False)
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from discreteflow_jax.config.model import LlamaConfig
from discreteflow_jax.models.decoder import DecoderLM, PreNormBlock, tied_logits
from discreteflow_jax.models.layers import Attention, RMSNorm, SwiGLU, linear, truncated_normal_init


class LlamaBlock(PreNormBlock):
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

    def _norms(self) -> tuple[RMSNorm, RMSNorm]:
        return self.attn_norm, self.mlp_norm


class Llama(DecoderLM):
    """Decoder-only LM. ``__call__`` (the full causal forward), ``hidden``, ``init_cache`` and
    ``decode`` (with a KV cache) come from ``DecoderLM``."""

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

    def _embed(self, tokens_BT: jax.Array, positions_BT: jax.Array | None, offset: jax.Array | int) -> jax.Array:
        return self.embed(tokens_BT)  # positions enter through RoPE in the attention

    def _logits(self, x_BTD: jax.Array) -> jax.Array:
        x_BTD = self.final_norm(x_BTD)
        if self.lm_head is None:
            return tied_logits(x_BTD, self.embed)
        # fp32 accumulation even with a bf16 forward, as in tied_logits.
        w_DV = self.lm_head.kernel[...].astype(x_BTD.dtype)
        return jnp.einsum("btd,dv->btv", x_BTD, w_DV, preferred_element_type=jnp.float32)
