"""The ``gumbel`` config section of Gumbel reflow: its fields, their validation, and the
TokenFlow config the chosen conditioning needs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from discreteflow_jax.config.model import TokenFlowConfig
from discreteflow_jax.config.schema import ConfigError, check_whole

# "none": Gaussian x0 and no context; the student sees G only through the logit channel.
CONDITIONINGS = ("x0", "cross_attention", "none")
SOURCES = ("data_posterior", "teacher_sample")
G_CHANNELS = ("none", "softmax", "linear")


@dataclasses.dataclass(frozen=True)
class GumbelConfig:
    conditioning: str = "cross_attention"  # "x0" | "cross_attention" | "none" (logit channel only)
    source: str = "data_posterior"  # "data_posterior" | "teacher_sample"
    tau: float = 1.0  # temperature of softmax(G/τ) in the reduction of G to the student's input
    sample_temperature: float = 1.0  # scales the prior G at sampling time (< 1: closer to greedy)
    chunk_size: int = 0  # positions per chunk of the fused G reduction; 0 = automatic
    embed_grad: bool = False  # gradient through softmax(G)·E into the student embedding
    # The student's logits h estimate the teacher's conditional (trained by distillation) and its
    # tokens are argmax(h + G) with the sampling G (docs/gumbel_channel.md, "Design").
    logit_channel: bool = False
    logit_tau: float = 0.0  # logit channel: x̂₁ = E[argmax(h + G)] at 0, else softmax((h + G)/logit_tau)·E
    # What a warm-started logit-channel student's network reads of G (docs/warm_start.md).
    g_channel: str = "none"  # "none" | "softmax" | "linear"
    g_channel_rank: int = 64
    g_channel_tau: float = 1.0
    # Drafts (warm logit-channel students): after this many evenly spaced blocks the network emits
    # argmax(head + G) and reads it back at the next position; their KL to the teacher, times
    # draft_loss, joins the loss (docs/distill_cpu.md).
    drafts: int = 0
    draft_loss: float = 1.0
    draft_gate_init: float = 0.0  # > 0: the drafts enter from the start (the student is then not its teacher at t = 1)
    # Sampler-state training of a logit-channel student (``gumbel_distill.sampler_states``): the
    # share of each batch's sequences that enter as the K-step sampler's own state, K = rollout_steps.
    rollout_prob: float = 0.0
    rollout_steps: int = 4


def parse_gumbel_config(section: Mapping[str, Any] | None) -> GumbelConfig:
    """Validates a plain ``gumbel`` config section. Raises ConfigError with the field to fix."""
    section = dict(section or {})
    fields = {f.name for f in dataclasses.fields(GumbelConfig)}
    unknown = sorted(set(section) - fields)
    if unknown:
        raise ConfigError(
            f"config.gumbel has unknown field(s) {unknown}; valid fields are: {', '.join(sorted(fields))}"
        )
    g = GumbelConfig(**section)
    for name, valid in (("conditioning", CONDITIONINGS), ("source", SOURCES), ("g_channel", G_CHANNELS)):
        if getattr(g, name) not in valid:
            raise ConfigError(
                f"config.gumbel.{name}={getattr(g, name)!r} is not a valid choice; use one of: "
                f"{', '.join(repr(v) for v in valid)}"
            )
    if not g.tau > 0:
        # softmax(G/τ) is undefined at τ = 0 and inverts the noise for τ < 0.
        raise ConfigError(f"config.gumbel.tau must be > 0 (1 = the original), got {g.tau}")
    if not g.sample_temperature > 0:
        raise ConfigError(f"config.gumbel.sample_temperature must be > 0 (1 = no change), got {g.sample_temperature}")
    if not g.logit_tau >= 0:
        raise ConfigError(f"config.gumbel.logit_tau must be >= 0 (0 = one-hot x̂₁), got {g.logit_tau}")
    if g.conditioning == "none" and not g.logit_channel:
        raise ConfigError(
            "config.gumbel.conditioning='none' hands G to the student through the logit channel only; "
            "set config.gumbel.logit_channel=True or use conditioning 'x0' or 'cross_attention'"
        )
    if g.g_channel != "none" and not g.logit_channel:
        raise ConfigError(f"config.gumbel.g_channel={g.g_channel!r} feeds G to a logit-channel student; set "
                          "config.gumbel.logit_channel=True (and conditioning='none') or g_channel='none'")
    if not isinstance(g.g_channel_rank, int) or isinstance(g.g_channel_rank, bool) or g.g_channel_rank < 1:
        raise ConfigError(f"config.gumbel.g_channel_rank must be a positive integer, got {g.g_channel_rank!r}")
    if not g.g_channel_tau > 0:
        raise ConfigError(f"config.gumbel.g_channel_tau must be > 0, got {g.g_channel_tau}")
    check_whole(g.drafts, "gumbel.drafts", 0, " (0 = off)")
    if g.drafts and not g.logit_channel:
        raise ConfigError("config.gumbel.drafts > 0 drafts argmax(head + G) inside a logit-channel student; set "
                          "config.gumbel.logit_channel=True or drafts=0")
    if g.drafts and g.rollout_prob > 0:
        raise ConfigError("config.gumbel.drafts > 0 and rollout_prob > 0 are not combined; set one of them to 0")
    if not isinstance(g.draft_gate_init, (int, float)) or isinstance(g.draft_gate_init, bool):
        raise ConfigError(f"config.gumbel.draft_gate_init must be a number, got {g.draft_gate_init!r}")
    if not (isinstance(g.draft_loss, (int, float)) and g.draft_loss >= 0):
        raise ConfigError(f"config.gumbel.draft_loss must be >= 0 (the weight of the drafts' KL), got {g.draft_loss!r}")
    if not 0.0 <= g.rollout_prob <= 1.0:
        raise ConfigError(f"config.gumbel.rollout_prob is a share of the batch's sequences, in [0, 1]; "
                          f"got {g.rollout_prob}")
    if not isinstance(g.rollout_steps, int) or isinstance(g.rollout_steps, bool) or g.rollout_steps < 2:
        raise ConfigError(f"config.gumbel.rollout_steps (the K of the sampler whose states are trained on) must be an "
                          f"integer >= 2, got {g.rollout_steps!r}")
    if g.rollout_prob > 0 and not g.logit_channel:
        raise ConfigError("config.gumbel.rollout_prob > 0 trains a logit-channel student on its sampler's states; set "
                          "config.gumbel.logit_channel=True or rollout_prob=0")
    check_whole(g.chunk_size, "gumbel.chunk_size", 0, " (0 = automatic)")
    return g


def student_config(model: TokenFlowConfig, gumbel: GumbelConfig) -> TokenFlowConfig:
    """The TokenFlow config the Gumbel conditioning needs: cross-attention layers exist exactly when
    ``conditioning == "cross_attention"`` (the gumbel section decides, so it always reaches the model).
    The logit channel needs the network logits alone, whole (see ``check_logit_channel``)."""
    wants = gumbel.conditioning == "cross_attention"
    if gumbel.logit_channel:
        check_logit_channel(model)
    if model.cross_attention and not wants:
        raise ConfigError(
            f"config.model.cross_attention=True but config.gumbel.conditioning={gumbel.conditioning!r} does not "
            "use cross-attention; "
            "leave model.cross_attention=False (the gumbel section sets it) or use conditioning='cross_attention'"
        )
    if model.context_dim not in (0, model.flow_width):
        raise ConfigError(
            f"config.model.context_dim={model.context_dim}: the Gumbel context softmax(G)·E has the student's "
            f"embedding width {model.flow_width}; set context_dim=0"
        )
    if gumbel.g_channel != "none" and not model.warm_start:
        raise ConfigError(f"config.gumbel.g_channel={gumbel.g_channel!r} is read by warm-started students only; "
                          "set config.model.warm_start=True (with config.teacher) or g_channel='none'")
    if gumbel.drafts and not model.warm_start:
        raise ConfigError(f"config.gumbel.drafts={gumbel.drafts} drafts through the teacher's head: warm-started "
                          "students only; set config.model.warm_start=True (with config.teacher) or drafts=0")
    if model.warm_align > 0 and not gumbel.logit_channel:
        raise ConfigError("config.model.warm_align > 0 is a term of the logit-channel distillation loss; set "
                          "config.gumbel.logit_channel=True or warm_align=0")
    if model.warm_start and wants:
        raise ConfigError("config.model.warm_start=True: a warm student has no cross-attention layers; use "
                          "config.gumbel.conditioning='none' (logit channel) or 'x0'")
    return dataclasses.replace(model, cross_attention=wants, context_dim=0, g_channel=gumbel.g_channel,
                               g_channel_rank=gumbel.g_channel_rank, g_channel_tau=gumbel.g_channel_tau,
                               g_drafts=gumbel.drafts, g_draft_gate_init=float(gumbel.draft_gate_init))


def check_logit_channel(model: TokenFlowConfig) -> None:
    """Raises ConfigError for a student the logit-channel distillation cannot train."""
    if model.singular_logits:
        # The singular term is the likelihood of x_t given x_i: at large t it points at x_i, which
        # the distillation target (the teacher's conditional given x_<i) does not contain.
        raise ConfigError(
            "config.gumbel.logit_channel=True needs config.model.singular_logits=False: the student's logits must "
            "estimate the teacher's conditional, which the singular term (the likelihood of the token itself) biases"
        )
    if model.loss_chunk > 0:
        raise ConfigError(
            f"config.gumbel.logit_channel=True needs config.model.loss_chunk=0 (got {model.loss_chunk}): the "
            "distillation loss takes the teacher's whole distribution, the chunked loss only hard labels"
        )
    if model.self_condition:
        raise ConfigError(
            "config.gumbel.logit_channel=True does not support config.model.self_condition=True (the sampler's "
            "estimate x̂₁ is the embedding of argmax(h + G), which training does not reproduce); set it to False"
        )
