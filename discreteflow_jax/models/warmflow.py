"""WarmFlow: a flow student whose network is its autoregressive teacher's decoder (LLaMA or GPT-2),
so that training starts from what the teacher already computes (docs/warm_start.md).

How the pieces fit, and why each new part starts at zero:

* Flow space. x_t lives in a small flow space E [V, f] (normalized rows, as in TokenFlow). The
  network reads the analytic posterior's expectation of the *teacher's* input embedding,
  u_j = Σ_v softmax(c(t)·⟨x_t,j, e_v⟩ + b_v)·W_v, with W the teacher's token embedding and b a
  learned prior (zero at init). At t = 1 the softmax is one-hot, so u_j is the teacher's input.
* Shift. The output at position i predicts token i (as the flow losses expect), and, as in the
  autoregressive model, it sits where token i − 1 is read: the network input is
  [BOS, u_0, ..., u_{T−2}]. The last position's own evidence enters through the singular term.
* Time. Sinusoidal features of the time of the predicted token and of the token read at that
  position go through one zero-initialized linear map added to the input (the only time input).
* Attention. ``causal``: the teacher's. ``gated``: plus an attention over later positions whose
  output is multiplied by a per-layer, per-head gate that starts at 0, so the student can learn to
  read the noisy future without being moved away from the teacher at initialization.
* G channel (Gumbel students). A zero-initialized map of the noise G_i added at position i, the
  position whose output decides token i; under causal attention h_i then depends on G_≤i.
* Drafts (Gumbel logit-channel students, ``g_drafts``). After evenly spaced blocks the teacher's
  head reads the residual stream and d_j = argmax(head_j + G_j) — the token the sampler would emit
  if the network stopped there — re-enters at position j + 1 as the teacher's embedding of d_j, times
  a zero-initialized gate. A linear map of G cannot compute an argmax over V of the logits plus G;
  this does, so one call can read a guess of the earlier tokens its own G implies (a Jacobi step of
  the teacher's decode inside the network).

With every new part at zero, the untrained student's network logits at t = 1 are the teacher's
logits of [BOS] + x[:−1] (a test). The teacher's weights are copied in by ``warm_params`` after the
random initialization (``tasks.warm``), outside any jitted program.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from discreteflow_jax.config.model import TokenFlowConfig
from discreteflow_jax.models.gpt2 import GPT2, GPT2Config
from discreteflow_jax.models.layers import Attention, apply_rope, dot_product_attention, linear, truncated_normal_init
from discreteflow_jax.models.linear_ce import cross_entropy
from discreteflow_jax.models.llama import Llama, LlamaConfig
from discreteflow_jax.models.noisy_argmax import over_position_chunks
from discreteflow_jax.models.tokenflow import FlowSpace, per_position, singular_coefficient, timestep_features

WARM_ATTENTIONS = ("causal", "gated")
# The future gate is stored divided by this. Adam moves a parameter by about the learning rate per
# step whatever its gradient, so an unscaled gate starting at 0 stayed below 0.03 after 250 steps at
# 3e-4 (docs/distill_cpu.md): too slow to ever open. Scaled, it can reach O(1) in a few hundred steps.
FUTURE_GATE_GAIN = 20.0
G_CHANNELS = ("none", "softmax", "linear")
# The draft gate is stored divided by this, for the reason the future gate is (FUTURE_GATE_GAIN).
DRAFT_GATE_GAIN = 20.0
EULER_GAMMA = 0.5772156649015329  # mean of a standard Gumbel variable
GUMBEL_STD = math.pi / math.sqrt(6.0)  # its standard deviation


def per_position_times(t_B: jax.Array, seq_len: int) -> jax.Array:
    """A per-sequence [B] or per-position [B, T] time as [B, T] fp32."""
    t = t_B.astype(jnp.float32)
    return jnp.broadcast_to(t[:, None], (t.shape[0], seq_len)) if t.ndim == 1 else t


@dataclasses.dataclass(frozen=True)
class GumbelInput:
    """What a drafting WarmFlow reads of the noise G besides x_t: its G-channel features [B, T, D]
    (or None) and the logit channel's noise as a function of the positions, ``noise_fn(positions [C])
    -> [B, C, V]`` (drawn ``chunk`` positions at a time, so [B, T, V] never exists whole)."""

    features: jax.Array | None
    noise_fn: Callable[[jax.Array], jax.Array]
    chunk: int
    known_tokens: jax.Array | None = None  # [B, T]: where known_mask is True the draft is this token
    known_mask: jax.Array | None = None


def whole_noise(g_BTV: jax.Array) -> Callable[[jax.Array], jax.Array]:
    """``noise_fn`` of a noise array that exists whole (training): its slice at the positions."""
    return lambda positions: jnp.take(g_BTV, positions, axis=1)


def draft_layers(num_layers: int, drafts: int) -> tuple[int, ...]:
    """The blocks (0-based) after which a draft is taken: ``drafts`` evenly spaced, never the last."""
    if not 0 <= drafts < num_layers:
        raise ValueError(f"g_drafts={drafts}: a draft is taken after one of the first {num_layers - 1} of the "
                         f"teacher's {num_layers} blocks (one at most per block, never after the last); "
                         f"use 0..{num_layers - 1}")
    return tuple(sorted({(num_layers * j) // (drafts + 1) - 1 for j in range(1, drafts + 1)}))


def token_embedding_table(backbone: nnx.Module) -> jax.Array:
    """The teacher's input token embedding [V, D] (``embed`` for LLaMA, ``wte`` for GPT-2)."""
    table = backbone.wte if isinstance(backbone, GPT2) else backbone.embed
    return table.embedding[...]


class WarmFlow(FlowSpace, nnx.Module):
    """Flow student on a teacher's decoder. ``backbone`` is a freshly built ``Llama`` or ``GPT2`` of
    the teacher's config (its weights are replaced by the teacher's in ``warm_params``)."""

    def __init__(self, cfg: TokenFlowConfig, backbone: Llama | GPT2, *, bos_id: int, rngs: nnx.Rngs):
        if cfg.warm_attention not in WARM_ATTENTIONS:
            raise ValueError(f"warm_attention={cfg.warm_attention!r} is not one of {WARM_ATTENTIONS}")
        if cfg.g_channel not in G_CHANNELS:
            raise ValueError(f"g_channel={cfg.g_channel!r} is not one of {G_CHANNELS}")
        self.cfg = cfg
        self.bos_id = bos_id
        self.backbone = backbone
        d, f, v = backbone.config.dim, cfg.flow_width, cfg.vocab_size
        self.embedding = nnx.Param(truncated_normal_init(1.0 / math.sqrt(f))(rngs.params(), (v, f)))
        self.prior_bias = nnx.Param(jnp.zeros((v,), jnp.float32))  # b: the input posterior's log-prior
        self.time_proj = linear(2 * cfg.time_features, d, rngs=rngs, use_bias=True, zero_init=True)
        heads = backbone.config.num_heads
        self.future_gate = (
            nnx.Param(jnp.zeros((backbone.config.num_layers, heads), jnp.float32))
            if cfg.warm_attention == "gated" else None
        )
        # softmax channel: W_g [V, D]; linear channel: U [V, r] (random, learned), then a zero-initialized r -> D map.
        softmax, lin = cfg.g_channel == "softmax", cfg.g_channel == "linear"
        self.g_table = nnx.Param(jnp.zeros((v, d), jnp.float32)) if softmax else None
        self.g_down = (
            nnx.Param(truncated_normal_init(1.0 / math.sqrt(v))(rngs.params(), (v, cfg.g_channel_rank)))
            if lin else None
        )
        self.g_up = linear(cfg.g_channel_rank, d, rngs=rngs, zero_init=True) if lin else None
        self.draft_after = draft_layers(backbone.config.num_layers, cfg.g_drafts)
        self.draft_gate = (
            nnx.Param(jnp.full((cfg.g_drafts, d), cfg.g_draft_gate_init / DRAFT_GATE_GAIN, jnp.float32))
            if cfg.g_drafts else None
        )
        self.time_warp = None  # the learned time sampler is not offered for warm students

    @property
    def dtype(self) -> Any:
        return jnp.dtype(self.backbone.config.dtype)

    # -- G channel ---------------------------------------------------------------------------
    def g_features(self, g_BTV: jax.Array) -> jax.Array:
        """What the network reads of the noise G [B, T, V] (fp32): [B, T, D] in fp32."""
        g = g_BTV.astype(jnp.float32)
        if self.g_table is not None:
            weights = jax.nn.softmax(g / self.cfg.g_channel_tau, axis=-1)
            return jnp.einsum("btv,vd->btd", weights, self.g_table[...])
        if self.g_down is not None:
            low = jnp.einsum("btv,vr->btr", (g - EULER_GAMMA) / GUMBEL_STD, self.g_down[...])
            return self.g_up(low)
        raise ValueError("this WarmFlow has no G channel (config g_channel='none')")

    # -- network ---------------------------------------------------------------------------
    def teacher_inputs(self, x_t: jax.Array, t_B: jax.Array) -> jax.Array:
        """u [B, T, D]: the input posterior's expectation of the teacher's token embedding (fp32)."""
        cfg = self.cfg
        coeff = per_position(singular_coefficient(t_B, cfg.sigma, cfg.singular_eps))
        scores = coeff * jnp.einsum("btf,vf->btv", x_t.astype(jnp.float32), self.embeddings()) + self.prior_bias[...]
        table = token_embedding_table(self.backbone).astype(jnp.float32)
        if cfg.warm_input_topk <= 0:
            return jnp.einsum("btv,vd->btd", jax.nn.softmax(scores, axis=-1), table)
        # Only the k most likely tokens (renormalized): a [B, T, k] gather instead of a V-wide matmul.
        # Exact wherever the posterior's mass sits on k tokens, as at t = 1 (one token).
        top, idx = jax.lax.top_k(scores, cfg.warm_input_topk)
        return jnp.einsum("btk,btkd->btd", jax.nn.softmax(top, axis=-1), jnp.take(table, idx, axis=0))

    def backbone_input(self, x_t: jax.Array, t_B: jax.Array, g_context: jax.Array | None) -> jax.Array:
        """[BOS, u_0, ..., u_{T−2}] + time features (+ G channel) + GPT-2 positions, [B, T, D]."""
        b, seq_len, _ = x_t.shape
        u = self.teacher_inputs(x_t, t_B)
        bos = jnp.broadcast_to(token_embedding_table(self.backbone)[self.bos_id].astype(jnp.float32),
                               (b, 1, u.shape[-1]))
        x = jnp.concatenate([bos, u[:, :-1]], axis=1)
        t_out = per_position_times(t_B, seq_len)
        t_in = jnp.concatenate([jnp.ones((b, 1), jnp.float32), t_out[:, :-1]], axis=1)  # BOS is clean
        feats = jnp.concatenate(
            [timestep_features(t_out, self.cfg.time_features), timestep_features(t_in, self.cfg.time_features)], -1
        )
        x = x + self.time_proj(feats)
        if g_context is not None:
            x = x + g_context.astype(jnp.float32)
        if isinstance(self.backbone, GPT2):
            x = x + self.backbone.wpe.embedding[...][:seq_len].astype(jnp.float32)[None]
        return x.astype(self.dtype)

    def _attention(self, attn: Attention, x: jax.Array, gate_H: jax.Array | None) -> jax.Array:
        if gate_H is None:
            return attn(x, causal=True)[0]
        b, t, _ = x.shape
        q = attn.q_proj(x).reshape(b, t, attn.num_heads, attn.head_dim)
        k = attn.k_proj(x).reshape(b, t, attn.num_kv_heads, attn.head_dim)
        v = attn.v_proj(x).reshape(b, t, attn.num_kv_heads, attn.head_dim)
        if attn.rope_theta is not None:
            positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
            q, k = apply_rope(q, positions, attn.rope_theta), apply_rope(k, positions, attn.rope_theta)
        past = dot_product_attention(q, k, v, causal=True, implementation=attn.implementation)
        later = jnp.arange(t)[None, :] > jnp.arange(t)[:, None]  # key after query
        future = dot_product_attention(q, k, v, jnp.broadcast_to(later, (b, t, t)), implementation="einsum")
        # The last position has no later key (its masked softmax is meaningless): it gets none.
        has_later = (jnp.arange(t) < t - 1).astype(future.dtype)[None, :, None, None]
        out = past + gate_H.astype(past.dtype)[None, None, :, None] * future * has_later
        return attn.o_proj(out.reshape(b, t, attn.num_heads * attn.head_dim))

    def hidden(self, x_t: jax.Array, t_B: jax.Array, context: Any = None,
               self_cond: jax.Array | None = None) -> jax.Array:
        """The backbone's residual stream after its last block, [B, T, D] (before the final norm).
        A drafting student's ``context`` is a ``GumbelInput``; otherwise the G-channel features or None."""
        return self.hidden_and_drafts(x_t, t_B, context, self_cond)[0]

    def hidden_and_drafts(self, x_t: jax.Array, t_B: jax.Array, context: Any = None,
                          self_cond: jax.Array | None = None) -> tuple[jax.Array, list[jax.Array]]:
        """(``hidden``, the residual stream [B, T, D] at each draft, before the draft enters)."""
        if self_cond is not None:
            raise ValueError("a WarmFlow does not take a self-conditioning input")
        gumbel_input = context if isinstance(context, GumbelInput) else None
        if self.draft_gate is not None and gumbel_input is None:
            raise ValueError("this WarmFlow drafts tokens from the Gumbel noise (g_drafts > 0): call it with a "
                             "GumbelInput context (gumbel_sampling / gumbel_distill build one)")
        features = gumbel_input.features if gumbel_input is not None else context
        x = self.backbone_input(x_t, t_B, features)
        drafts_at = []
        for layer, block in enumerate(self.backbone.layers):
            attn_norm, mlp_norm = block._norms()
            gate = None if self.future_gate is None else FUTURE_GATE_GAIN * self.future_gate[...][layer]
            x = x + self._attention(block.attn, attn_norm(x), gate)
            x = x + block.mlp(mlp_norm(x))
            if self.draft_gate is not None and layer in self.draft_after:
                slot = self.draft_after.index(layer)
                drafts_at.append(x)
                x = x + self.draft_input(self.draft_tokens(x, gumbel_input), slot)
        return x, drafts_at

    def draft_tokens(self, h_BTD: jax.Array, gumbel_input: GumbelInput) -> jax.Array:
        """argmax(head(h) + G) [B, T] int32, ``gumbel_input.chunk`` positions at a time (no gradient);
        known positions keep their tokens."""
        seq_len = h_BTD.shape[1]
        chunk = gumbel_input.chunk if gumbel_input.chunk > 0 else seq_len
        h = jax.lax.stop_gradient(h_BTD)

        def one_chunk(start: jax.Array) -> jax.Array:
            logits = self.backbone._logits(jax.lax.dynamic_slice_in_dim(h, start, chunk, axis=1))
            return jnp.argmax(logits + gumbel_input.noise_fn(start + jnp.arange(chunk)), axis=-1).astype(jnp.int32)

        tokens = over_position_chunks(one_chunk, seq_len, chunk)
        if gumbel_input.known_mask is not None:  # a prompt's tokens are known: no need to guess them
            tokens = jnp.where(gumbel_input.known_mask, gumbel_input.known_tokens.astype(jnp.int32), tokens)
        return tokens

    def draft_input(self, tokens_BT: jax.Array, slot: int) -> jax.Array:
        """The gated teacher embedding of the drafted token j at position j + 1 (where the network
        reads token j), [B, T, D]; position 0 (BOS) gets nothing."""
        emb = jnp.take(token_embedding_table(self.backbone), tokens_BT, axis=0).astype(jnp.float32)
        shifted = jnp.concatenate([jnp.zeros_like(emb[:, :1]), emb[:, :-1]], axis=1)
        return (DRAFT_GATE_GAIN * self.draft_gate[...][slot] * shifted).astype(self.dtype)

    def network_logits(self, x_t: jax.Array, t_B: jax.Array, context: Any = None) -> jax.Array:
        """The backbone's logits (the teacher's head), fp32 [B, T, V]."""
        return self.backbone._logits(self.hidden(x_t, t_B, context))

    def __call__(self, x_t: jax.Array, t_B: jax.Array, context: Any = None,
                 self_cond: jax.Array | None = None) -> jax.Array:
        """Logits [B, T, V] fp32: network logits, plus the singular term when enabled (it equals the
        reference log-softmax form up to a per-position constant: the rows of E share one norm)."""
        return self.output_logits(self.hidden(x_t, t_B, context), x_t, t_B)

    def output_logits(self, h_BTD: jax.Array, x_t: jax.Array, t_B: jax.Array) -> jax.Array:
        """Logits [B, T, V] fp32 of the residual stream ``hidden`` returned (any slice of positions,
        with the x_t and t of the same positions)."""
        logits = self.backbone._logits(h_BTD)
        if not self.cfg.singular_logits:
            return logits
        coeff = per_position(singular_coefficient(t_B, self.cfg.sigma, self.cfg.singular_eps))
        return logits + coeff * jnp.einsum("btf,vf->btv", x_t.astype(jnp.float32), self.embeddings())

    def token_losses(
        self, x_t: jax.Array, t_B: jax.Array, tokens_BT: jax.Array, weights_BT: jax.Array,
        context: Any = None, self_cond: jax.Array | None = None,
    ) -> tuple[jax.Array, jax.Array]:
        """(Σ weights·CE, CE per token [B, T]) of the clean tokens, from the full logits."""
        token_loss = cross_entropy(self(x_t, t_B, context, self_cond), tokens_BT)
        return jnp.sum(token_loss * weights_BT), token_loss


def flow_space_from_teacher(teacher_embedding: np.ndarray, flow_width: int) -> np.ndarray:
    """An initial flow table [V, f]: the teacher's token embeddings projected on their top-f principal
    directions, so that tokens the teacher treats alike start close in the flow space too (rows are
    normalized by the model). Rows that vanish in the projection get a tiny random direction."""
    w = np.asarray(teacher_embedding, np.float64)
    centered = w - w.mean(axis=0, keepdims=True)
    _, _, vt = np.linalg.svd(centered, full_matrices=False)
    proj = centered @ vt[:flow_width].T
    if proj.shape[1] < flow_width:  # a flow space wider than the teacher's embedding
        proj = np.concatenate([proj, np.zeros((proj.shape[0], flow_width - proj.shape[1]))], axis=1)
    norms = np.linalg.norm(proj, axis=1, keepdims=True)
    rng = np.random.default_rng(0)
    tiny = norms[:, 0] < 1e-8 * max(float(norms.max()), 1e-30)
    proj[tiny] = rng.standard_normal((int(tiny.sum()), flow_width))
    return (proj / np.linalg.norm(proj, axis=1, keepdims=True)).astype(np.float32)


def warm_params(params: dict, teacher_params: dict, *, flow_init: str = "teacher") -> dict:
    """A WarmFlow's pure parameter dict with the backbone replaced by the teacher's weights and,
    with ``flow_init="teacher"``, the flow table by the teacher's principal directions. Runs on the
    host (numpy), so no teacher weight becomes a constant of a compiled program."""
    out = dict(params)
    out["backbone"] = jax.tree.map(lambda a: np.asarray(a, np.float32), teacher_params)
    if flow_init == "teacher":
        table = teacher_params["wte" if "wte" in teacher_params else "embed"]["embedding"]
        out["embedding"] = flow_space_from_teacher(np.asarray(table), np.asarray(params["embedding"]).shape[1])
    return out


def backbone_description(kind: str, config: Any, bos_id: int) -> dict:
    """What a checkpoint records about a warm student's backbone so that it can be rebuilt without
    the teacher: its family, its config fields and the BOS id it reads first."""
    return {"kind": kind, "config": dataclasses.asdict(config), "bos_id": int(bos_id)}


def build_warmflow(model_cfg: TokenFlowConfig, description: dict, rngs: nnx.Rngs) -> WarmFlow:
    """A WarmFlow (random weights) on the backbone a ``backbone_description`` names; the backbone
    computes in the student's dtype."""
    kind = description["kind"]
    if kind not in ("llama", "gpt2"):
        raise ValueError(f"unknown warm-start backbone {kind!r}; expected llama or gpt2")
    fields = dict(description["config"], dtype=model_cfg.dtype)
    backbone = GPT2(GPT2Config(**fields), rngs=rngs) if kind == "gpt2" else Llama(LlamaConfig(**fields), rngs=rngs)
    return WarmFlow(model_cfg, backbone, bos_id=int(description["bos_id"]), rngs=rngs)
