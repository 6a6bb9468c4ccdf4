"""Model configs as frozen dataclasses: the TokenFlow and the LLaMA-style teacher.

They live with the rest of the schema so that validating a config imports no model code; the
modules in ``discreteflow_jax.models`` build from them.
"""

from __future__ import annotations

import dataclasses
import math


def swiglu_hidden(dim: int, multiple_of: int = 64) -> int:
    """Standard SwiGLU width: 8/3·dim rounded up to a multiple of ``multiple_of``."""
    hidden = int(8 * dim / 3)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


@dataclasses.dataclass(frozen=True)
class TokenFlowConfig:
    vocab_size: int = 32000
    dim: int = 512
    num_layers: int = 8
    num_heads: int = 8
    ffn_hidden: int = 0  # 0: standard SwiGLU width (8/3·dim rounded up to a multiple of 64)
    max_len: int = 128
    causal: bool = False
    tie_embeddings: bool = True
    embed_scale: float = 0.0  # 0: 1/sqrt(dim), i.e. unit-norm embedding rows
    noise_scale: float = 0.0  # σ of the Gaussian source x0 per coordinate; 0: equal to embed_scale
    singular_logits: bool = True
    singular_eps: float = 1e-3
    fused_singular: bool = True
    time_features: int = 256
    rope_theta: float = 10000.0
    cross_attention: bool = False  # create cross-attention sub-layers (Gumbel "cross_attention")
    context_dim: int = 0  # width of the cross-attention context; 0: flow_width (the embedding width)
    dtype: str = "float32"  # activation dtype; parameters and logits stay fp32
    remat: str = "none"
    loss_chunk: int = 0  # training loss: tokens per chunk (per device) of the fused output+CE loop; 0: full logits
    flow_dim: int = 0  # width of embeddings, noise and x_t; 0: dim (the original: no in/out maps)
    output_modulation: bool = False  # time-dependent shift/scale of the final norm (DiT final layer)
    self_condition: bool = False  # input the previous estimate x̂₁ (training: half the sequences)
    time_warp_bins: int = 0  # > 0: learned time-warp parameters (flow.time_sampler="learned")
    # Warm start (docs/warm_start.md): the network is the teacher's decoder, initialized with its
    # weights; dim, layers, heads and FFN width then come from the teacher, not from these fields.
    warm_start: bool = False
    warm_attention: str = "causal"  # causal | gated (causal plus a zero-initialized gate on later positions)
    warm_input_topk: int = 0  # > 0: the input posterior keeps its k most likely tokens (cheaper); 0: all V
    warm_flow_init: str = "teacher"  # teacher (its embedding's top principal directions) | random
    warm_align: float = 0.0  # weight of the alignment of the last residual stream to the teacher's (Gumbel)
    # G channel (Gumbel students only; the gumbel section sets these): how the network reads the noise G.
    g_channel: str = "none"  # none | softmax (softmax(G/τ)·W) | linear (standardized G through a rank-r map)
    g_channel_rank: int = 64  # r of the linear channel
    g_channel_tau: float = 1.0  # τ of the softmax channel
    g_drafts: int = 0  # in-network drafts argmax(head + G) fed back at the next position (models/warmflow.py)
    g_draft_gate_init: float = 0.0  # the drafts' gate at init; 0 keeps the untrained student its teacher at t = 1

    @property
    def ffn_width(self) -> int:
        return self.ffn_hidden or swiglu_hidden(self.dim)

    @property
    def flow_width(self) -> int:
        """Width of the embeddings, the noise and x_t."""
        return self.flow_dim or self.dim

    @property
    def embed_scale_value(self) -> float:
        return self.embed_scale or 1.0 / math.sqrt(self.flow_width)

    @property
    def row_norm(self) -> float:
        return self.embed_scale_value * math.sqrt(self.flow_width)

    @property
    def sigma(self) -> float:
        return self.noise_scale or self.embed_scale_value


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
