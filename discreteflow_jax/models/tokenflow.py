"""TokenFlow: a transformer that reads noisy token embeddings x_t and time t and predicts the
clean token at every position. Normalized embedding rows, singular logits fused into the output
matmul (docs/math.md#singular-logits), adaLN time conditioning; the design choices and the optional
context levers are described in docs/models.md.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from discreteflow_jax.config.model import TokenFlowConfig
from discreteflow_jax.models.layers import (
    Attention,
    RMSNorm,
    SwiGLU,
    linear,
    take_rows,
    truncated_normal_init,
)
from discreteflow_jax.models.linear_ce import cross_entropy, linear_cross_entropy
from discreteflow_jax.models.sharding import constrain

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}  # config.model.dtype -> activation dtype
TIME_WARP_GAIN = 50.0  # the time-warp parameters are stored divided by this (see flow.warp_masses)


def timestep_features(t: jax.Array, num_features: int, max_period: float = 10000.0) -> jax.Array:
    """Sinusoidal features of 1000·t (fp32): [B] -> [B, F], or per position [B, T] -> [B, T, F]."""
    half = num_features // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    angles = 1000.0 * t.astype(jnp.float32)[..., None] * freqs
    return jnp.concatenate([jnp.cos(angles), jnp.sin(angles)], axis=-1)


def per_position(values: jax.Array) -> jax.Array:
    """A per-sequence [B] or per-position [B, T] quantity as [B, 1 or T, 1], to scale [B, T, ·]."""
    return values[:, None, None] if values.ndim == 1 else values[:, :, None]


def per_position_rows(cond: jax.Array) -> jax.Array:
    """A conditioning vector per sequence [B, D] or per position [B, T, D] as [B, 1 or T, D]."""
    return cond[:, None, :] if cond.ndim == 2 else cond


def singular_coefficient(t_B: jax.Array, sigma: float, eps: float) -> jax.Array:
    """c(t) = 2t / (2σ²(1−t)² + ε²): the weight of ⟨x_t, e_v⟩ in the analytic log-posterior."""
    t = t_B.astype(jnp.float32)
    return 2.0 * t / (2.0 * sigma**2 * (1.0 - t) ** 2 + eps**2)


class TimeEmbedding(nnx.Module):
    def __init__(self, num_features: int, dim: int, *, rngs: nnx.Rngs):
        self.num_features = num_features
        self.fc1 = linear(num_features, dim, rngs=rngs, use_bias=True)
        self.fc2 = linear(dim, dim, rngs=rngs, use_bias=True)

    def __call__(self, t_B: jax.Array) -> jax.Array:
        return self.fc2(jax.nn.silu(self.fc1(timestep_features(t_B, self.num_features))))


class FlowBlock(nnx.Module):
    """adaLN block: h = x + Attn((1+scale)·norm(x) + shift); out = h + gate·SwiGLU(norm(h)).

    With cross-attention, a sub-layer h += CrossAttn((1+scale)·norm(h) + shift, context) sits
    between the two (same modulation)."""

    def __init__(self, cfg: TokenFlowConfig, layer: int, *, rngs: nnx.Rngs):
        d, dtype = cfg.dim, DTYPES[cfg.dtype]
        out_std = 1.0 / math.sqrt(2.0 * d * (layer + 1))
        self.modulation = linear(d, 3 * d, rngs=rngs, use_bias=True, zero_init=True)
        self.attn_norm = RMSNorm(d, use_scale=False)
        self.attn = Attention(d, cfg.num_heads, rngs=rngs, rope_theta=cfg.rope_theta, out_init_std=out_std, dtype=dtype)
        if cfg.cross_attention:
            self.cross_norm = RMSNorm(d, use_scale=False)
            # The context (Gumbel noise) is aligned with the sequence. Without positions the layer
            # would be invariant to permuting it and could not tell which noise belongs to which
            # position: RoPE on queries and context keys, plus biases that give queries and keys a
            # content-independent part, let a head attend by relative position alone.
            self.cross_attn = Attention(
                d, cfg.num_heads, rngs=rngs, kv_dim=cfg.context_dim or cfg.flow_width, rope_theta=cfg.rope_theta,
                use_bias=True, out_init_std=out_std, dtype=dtype,
            )
        else:
            self.cross_norm = None
            self.cross_attn = None
        self.mlp_norm = RMSNorm(d, use_scale=False)
        self.mlp = SwiGLU(d, cfg.ffn_width, rngs=rngs, out_init_std=out_std, dtype=dtype)

    def __call__(self, x: jax.Array, cond_BD: jax.Array, causal: bool, context: jax.Array | None) -> jax.Array:
        modulation = per_position_rows(self.modulation(jax.nn.silu(cond_BD))).astype(x.dtype)
        shift, scale, gate = jnp.split(modulation, 3, axis=-1)
        h = x + self.attn((1 + scale) * self.attn_norm(x) + shift, causal=causal)[0]
        if self.cross_attn is not None:
            if context is None:
                raise ValueError("this TokenFlow has cross-attention layers; pass a context sequence")
            h = h + self.cross_attn((1 + scale) * self.cross_norm(h) + shift, context_BSE=context)[0]
        return h + gate * self.mlp(self.mlp_norm(h))


class FlowSpace:
    """The flow space every flow student shares: a table ``embedding`` [V, f] whose rows are
    normalized to ``cfg.row_norm`` (E), and the lookup of clean tokens in it (x₁)."""

    embedding: nnx.Param
    cfg: TokenFlowConfig

    def embeddings(self) -> jax.Array:
        """The normalized embedding matrix E [V, d] (fp32); every row has norm embed_scale·sqrt(d)."""
        return self.embedding[...].astype(jnp.float32) * self.embedding_row_scales()[:, None]

    def embedding_row_scales(self) -> jax.Array:
        """s [V] with E = diag(s)·embedding: the per-row factor of the normalization."""
        raw = self.embedding[...].astype(jnp.float32)
        return self.cfg.row_norm * jax.lax.rsqrt(jnp.sum(raw * raw, axis=-1) + 1e-12)

    def embed(self, tokens_BT: jax.Array) -> jax.Array:
        # Under FSDP, gather the table's embed dimension first: a lookup into the fsdp-sharded table
        # would come out sharded over embed and need an all-to-all back to batch sharding.
        # Rows of the raw table times their scales: the numbers of E[tokens], without forming E.
        raw = constrain(self.embedding[...].astype(jnp.float32), ("vocab", None))
        scales = jnp.take(self.embedding_row_scales(), tokens_BT, axis=0)[..., None]
        return constrain(take_rows(raw, tokens_BT) * scales, ("batch", "length", "embed"))


class TokenFlow(FlowSpace, nnx.Module):
    def __init__(self, cfg: TokenFlowConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        d, f = cfg.dim, cfg.flow_width
        self.embedding = nnx.Param(truncated_normal_init(1.0 / math.sqrt(f))(rngs.params(), (cfg.vocab_size, f)))
        self.time_embed = TimeEmbedding(cfg.time_features, d, rngs=rngs)
        # Modules that an option does not use are not created (no dead parameters in checkpoints).
        narrow = f != d
        self.in_proj = linear(f, d, rngs=rngs) if narrow else None
        self.self_cond_proj = linear(f, d, rngs=rngs) if cfg.self_condition else None
        self.blocks = nnx.List([FlowBlock(cfg, layer, rngs=rngs) for layer in range(cfg.num_layers)])
        self.final_norm = RMSNorm(d)
        self.out_modulation = (
            linear(d, 2 * d, rngs=rngs, use_bias=True, zero_init=True) if cfg.output_modulation else None
        )
        # Tied output: the features that multiply E live in the flow space.
        self.out_proj = linear(d, f, rngs=rngs) if narrow and cfg.tie_embeddings else None
        self.lm_head = None if cfg.tie_embeddings else linear(d, cfg.vocab_size, rngs=rngs)
        # Time warp: uniform bins, and a loss scale of log V (the loss of a uniform guess at t = 0).
        # (numpy, not jnp: building a model must not compile anything, see the mesh checks)
        warp = np.zeros((cfg.time_warp_bins + 1,), np.float32)
        warp[-1] = math.log(math.log(cfg.vocab_size)) / TIME_WARP_GAIN
        self.time_warp = nnx.Param(jnp.asarray(warp)) if cfg.time_warp_bins > 0 else None

    # -- network ----------------------------------------------------------------------------
    def hidden(
        self, x_t: jax.Array, t_B: jax.Array, context: jax.Array | None = None, self_cond: jax.Array | None = None
    ) -> jax.Array:
        """Output features in the compute dtype: final-normed hidden states [B, T, d], mapped to the
        flow width when the output is tied to a narrower embedding. ``t_B`` is [B] or [B, T];
        ``self_cond`` the previous estimate x̂₁ [B, T, flow_width] (self-conditioning models only)."""
        cfg = self.cfg
        cond = self.time_embed(t_B)
        x = (x_t / cfg.embed_scale_value).astype(DTYPES[cfg.dtype])
        if self.in_proj is not None:
            x = self.in_proj(x)
        if self.self_cond_proj is not None:
            if self_cond is None:
                self_cond = jnp.zeros(x_t.shape, x_t.dtype)
            x = x + self.self_cond_proj((self_cond / cfg.embed_scale_value).astype(DTYPES[cfg.dtype]))
        if context is not None:
            context = constrain(context.astype(DTYPES[cfg.dtype]), ("batch", "length", "embed"))

        def run_block(block: FlowBlock, x: jax.Array, cond: jax.Array, context: jax.Array | None) -> jax.Array:
            return block(x, cond, cfg.causal, context)

        if cfg.remat != "none":
            policy = jax.checkpoint_policies.dots_with_no_batch_dims_saveable if cfg.remat == "save_dots" else None
            run_block = nnx.remat(run_block, policy=policy)
        # Pin the residual stream at block boundaries to (batch over data×fsdp, replicated length and
        # embed) so XLA's propagation cannot drift to a layout that all-gathers activations inside
        # the blocks; a no-op unless the step is traced for a multi-device mesh.
        act = ("batch", "length", "embed")
        x = constrain(x, act)
        for block in self.blocks:
            x = constrain(run_block(block, x, cond, context), act)
        h = self.final_norm(x)
        if self.out_modulation is not None:
            shift, scale = jnp.split(per_position_rows(self.out_modulation(jax.nn.silu(cond))).astype(h.dtype), 2, -1)
            h = (1 + scale) * h + shift
        if self.out_proj is not None:
            h = self.out_proj(h)
        return h

    def __call__(
        self, x_t: jax.Array, t_B: jax.Array, context: jax.Array | None = None, self_cond: jax.Array | None = None
    ) -> jax.Array:
        """Logits [B, T, V] in fp32 (network logits plus the singular term when enabled)."""
        h = self.hidden(x_t, t_B, context, self_cond).astype(jnp.float32)
        x_t = constrain(x_t, ("batch", "length", "embed"))
        return constrain(self.output_logits(h, x_t, t_B), ("batch", "length", "vocab"))

    def output_logits(self, h_BTD: jax.Array, x_t: jax.Array, t_B: jax.Array) -> jax.Array:
        cfg = self.cfg
        emb = self.embeddings()
        x32 = x_t.astype(jnp.float32)
        if not cfg.singular_logits:
            return self._network_logits(h_BTD, emb)
        if cfg.fused_singular:
            coeff = per_position(singular_coefficient(t_B, cfg.sigma, cfg.singular_eps))
            if self.lm_head is None:
                return jnp.einsum("btd,vd->btv", h_BTD + coeff * x32, emb)
            return self._network_logits(h_BTD, emb) + jnp.einsum("btd,vd->btv", coeff * x32, emb)
        return self._network_logits(h_BTD, emb) + singular_logits(x32, t_B, emb, cfg.sigma, cfg.singular_eps)

    def _network_logits(self, h_BTD: jax.Array, emb: jax.Array) -> jax.Array:
        if self.lm_head is None:
            return jnp.einsum("btd,vd->btv", h_BTD, emb)
        kernel = self.lm_head.kernel[...].astype(jnp.float32)
        return jnp.einsum("btd,dv->btv", h_BTD, kernel)

    # -- training loss ----------------------------------------------------------------------
    def token_losses(
        self, x_t: jax.Array, t_B: jax.Array, tokens_BT: jax.Array, weights_BT: jax.Array,
        context: jax.Array | None = None, self_cond: jax.Array | None = None,
    ) -> tuple[jax.Array, jax.Array]:
        """(Σ weights·CE, CE per token [B, T]) of the clean tokens under ``self(x_t, t_B, context)``.

        Only the weighted sum is meant to be differentiated (it is the loss). With
        ``cfg.loss_chunk > 0`` the output layer and the cross-entropy run fused, a chunk of
        positions at a time (``linear_ce.linear_cross_entropy``), so the [B, T, V] logits and
        their gradient are never stored; same values and gradients up to float32 rounding.
        The reference two-term singular form (``fused_singular=False``) always uses full logits.
        """
        cfg = self.cfg
        if cfg.loss_chunk == 0 or (cfg.singular_logits and not cfg.fused_singular):
            token_loss = cross_entropy(self(x_t, t_B, context, self_cond), tokens_BT)
            return jnp.sum(token_loss * weights_BT), token_loss
        h = self.hidden(x_t, t_B, context, self_cond).astype(jnp.float32)
        x_t = constrain(x_t, ("batch", "length", "embed"))
        features, weights, layouts, scales = self._logit_terms(h, x_t, t_B)
        return linear_cross_entropy(
            features, weights, layouts, tokens_BT, weights_BT, tokens_per_chunk=cfg.loss_chunk, scales=scales
        )

    def _logit_terms(self, h_BTD: jax.Array, x_t: jax.Array, t_B: jax.Array):
        """``output_logits`` (fused forms) as Σ_i (features_i · weights_iᵀ) ⊙ scales_i, for
        ``linear_cross_entropy``. E enters as the raw table with its row scales, so the
        normalized [V, d] matrix is never formed in the training step."""
        cfg = self.cfg
        raw = self.embedding[...].astype(jnp.float32)
        row_scales = self.embedding_row_scales()
        if self.lm_head is None:
            head = (raw, "vk", row_scales)
        else:
            head = (self.lm_head.kernel[...].astype(jnp.float32), "kv", None)
        if not cfg.singular_logits:
            return [h_BTD], [head[0]], [head[1]], [head[2]]
        coeff = per_position(singular_coefficient(t_B, cfg.sigma, cfg.singular_eps))
        singular = coeff * x_t.astype(jnp.float32)
        if self.lm_head is None:
            return [h_BTD + singular], [raw], ["vk"], [row_scales]
        return [h_BTD, singular], [head[0], raw], ["kv", "vk"], [None, row_scales]


def singular_logits(x_t: jax.Array, t_B: jax.Array, emb_VD: jax.Array, sigma: float, eps: float) -> jax.Array:
    """Reference form: log_softmax_v( −‖x_t − t·e_v‖² / (2σ²(1−t)² + ε²) ), [B, T, V] fp32.

    Expanded as ‖x‖² − 2t⟨x, e_v⟩ + t²‖e_v‖² so no [B, T, V, d] tensor is formed. At t = 1 the
    denominator is ε² > 0, so the result stays finite.
    """
    t = per_position(t_B.astype(jnp.float32))
    x = x_t.astype(jnp.float32)
    denom = 2.0 * sigma**2 * (1.0 - t) ** 2 + eps**2
    sq_dist = (
        jnp.sum(x * x, axis=-1, keepdims=True)
        - 2.0 * t * jnp.einsum("btd,vd->btv", x, emb_VD)
        + t**2 * jnp.sum(emb_VD * emb_VD, axis=-1)[None, None, :]
    )
    return jax.nn.log_softmax(-sq_dist / denom, axis=-1)
