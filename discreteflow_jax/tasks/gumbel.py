"""The ``gumbel`` task (experiments 2.2 and 3.2): a TokenFlow student distilled from a frozen
autoregressive teacher by Gumbel reflow (see ``discreteflow_jax.gumbel``).

Config sections read here (plain dicts in ``ExperimentConfig.extra``):

* ``gumbel``: parsed by ``config.parse_gumbel_config`` (conditioning, source, tau, ...);
* ``teacher``: passed to ``io.teacher.load_teacher`` (``checkpoint`` = a workdir of our teacher run,
  or ``hf`` = a Hugging Face id / local HF directory, ``dtype`` = its compute dtype).

The teacher's parameters are the task's ``aux``: placed on the mesh once, passed to every jitted
step, never differentiated (``stop_gradient``), never in the optimizer state.

Everything that can be wrong with the combination (teacher missing or of the wrong kind, its
vocabulary or context length not matching the student, an untrainable Gumbel setting) is
reported before anything compiles.
"""

from __future__ import annotations

import logging
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from discreteflow_jax import gumbel as gmb
from discreteflow_jax import gumbel_sampling
from discreteflow_jax.config import ExperimentConfig, parse_gumbel_config, student_config
from discreteflow_jax.config.presets import teacher_section
from discreteflow_jax.gumbel_distill import gumbel_distill_loss
from discreteflow_jax.models import sharding as shd
from discreteflow_jax.models.tokenflow import TokenFlow
from discreteflow_jax.tasks.base import Task, bucket_edges, known_positions, stratified_times, summarize_flow
from discreteflow_jax.tasks.students import (  # noqa: F401  (check_teacher, TEACHER_KINDS: re-exported)
    TEACHER_KINDS,
    check_teacher,
    load_teacher_bundle,
    student_factory,
    teacher_graphdef,
)

log = logging.getLogger("discreteflow_jax")


def add_gumbel_sections(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Turns a TokenFlow config (``presets.tokenflow_defaults()``) into a Gumbel reflow config:
    task, the ``gumbel`` and ``teacher`` sections (every field commented), untied output (docs/experiments.md)."""
    c.task = "gumbel"
    c.model.tie_embeddings = False  # the Gumbel students use an untied output projection (docs/experiments.md)

    c.gumbel = ml_collections.ConfigDict()
    # How the student sees G: "cross_attention" (Gaussian x0, softmax(G)·E as a position-aligned
    # cross-attention context; the model gets cross-attention layers) | "x0" (softmax(G/τ)·E is x0)
    # | "none" (Gaussian x0, no context: G only through the logit channel).
    c.gumbel.conditioning = "cross_attention"
    # Where (G, x) pairs come from: "data_posterior" (data + one teacher pass + exact posterior of G)
    # | "teacher_sample" (G from the prior, x decoded by the teacher with a KV cache; no data needed).
    c.gumbel.source = "data_posterior"
    c.gumbel.tau = 1.0  # τ in softmax(G/τ)·E (> 0; 1 = the original)
    c.gumbel.sample_temperature = 1.0  # G is scaled by this when sampling (< 1: closer to greedy)
    c.gumbel.chunk_size = 0  # positions per chunk of the fused teacher-head/posterior/reduction; 0 = auto
    c.gumbel.embed_grad = False  # gradient through softmax(G)·E into the student embedding (recomputes chunks)
    # Logit channel (docs/gumbel_channel.md): the student's logits h are distilled to the teacher's
    # conditional (KL per token) and its tokens are argmax(h + G). Needs model.singular_logits=False
    # and model.loss_chunk=0; `:cpu,cold,logit_channel` sets them.
    c.gumbel.logit_channel = False
    c.gumbel.logit_tau = 0.0  # sampling: x̂₁ = E[argmax(h + G)] at 0, else softmax((h + G)/logit_tau)·E
    # G channel (warm-started logit-channel students): the network also reads G at each position, so
    # one call can couple positions. none | softmax (softmax(G/τ)·W) | linear (G through a rank-r map).
    c.gumbel.g_channel = "none"
    c.gumbel.g_channel_rank = 64  # r of the linear channel
    c.gumbel.g_channel_tau = 1.0  # τ of the softmax channel
    # Drafts (warm logit-channel students): after `drafts` evenly spaced blocks the teacher's head
    # reads the residual stream, d_j = argmax(head_j + G_j) re-enters at position j + 1 as the
    # teacher's embedding of d_j (gated, zero at init); draft_loss weighs the drafts' KL. 0: off.
    c.gumbel.drafts = 0
    c.gumbel.draft_loss = 1.0
    c.gumbel.draft_gate_init = 0.0  # the gate's start; > 0 opens it from step 0 (no longer the teacher at t = 1)
    # Sampler-state training (logit channel): this share of each batch's sequences is trained on the
    # state the K-step sampler (K = rollout_steps, uniform grid) reaches from its own x0 and G after
    # 1..K−1 of its steps, instead of on the clean path x_t (docs/distill_cpu.md). 0: off.
    c.gumbel.rollout_prob = 0.0
    c.gumbel.rollout_steps = 4

    c.teacher = teacher_section()
    return c


def summarize_gumbel(sums: dict, prefix: str, num_buckets: int) -> dict[str, float]:
    out = summarize_flow(sums, prefix, num_buckets)
    tokens = max(float(sums["tokens"]), 1.0)
    if "teacher_nll_sum" in sums:
        # The teacher NLL covers every target; ``tokens`` excludes the known positions.
        teacher_tokens = max(float(sums.get("teacher_tokens", sums["tokens"])), 1.0)
        out[f"{prefix}/teacher_nll"] = float(sums["teacher_nll_sum"]) / teacher_tokens
    if "draft_kl_sum" in sums:  # the drafts' mean KL to the teacher (gumbel.drafts > 0)
        out[f"{prefix}/draft_kl"] = float(sums["draft_kl_sum"]) / tokens
    if "gumbel_agree_sum" in sums:
        out[f"{prefix}/gumbel_agree"] = float(sums["gumbel_agree_sum"]) / tokens
        per_bucket, n_bucket = np.asarray(sums["bucket_agree_sum"]), np.asarray(sums["bucket_tokens"])
        for name, value, n in zip(bucket_edges(num_buckets), per_bucket, n_bucket):
            if n > 0:
                out[f"{prefix}/gumbel_agree_t{name}"] = float(value / n)
    return out


def gumbel_task(cfg: ExperimentConfig, teacher: Any | None = None) -> Task:
    """Gumbel reflow task. ``teacher`` (a ``TeacherBundle``) overrides ``config.teacher`` (tests,
    benchmarks with random teachers)."""
    gcfg = parse_gumbel_config(cfg.extra.get("gumbel"))
    student = student_config(cfg.model, gcfg)
    if gcfg.conditioning == "x0" and student.singular_logits:
        log.info(
            "gumbel.conditioning='x0': the singular logits assume a Gaussian source; the network logits "
            "absorb the mismatch (set --config.model.singular_logits=False to drop them)"
        )
    if teacher is None:
        teacher = load_teacher_bundle(cfg)
    check_teacher(teacher, student, cfg.data.seq_len, cfg.data.tokenizer)
    t_graphdef = teacher_graphdef(teacher, (cfg.extra.get("teacher") or {}).get("dtype"))
    bos = int(teacher.bos_id)
    mesh = shd.make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)
    # Not strict: a teacher dimension the mesh does not divide (GPT-2's 50257) is replicated.
    aux, aux_shardings = shd.shard_params(teacher.params, mesh)
    fc = cfg.flow

    factory = student_factory(student, teacher)

    def frozen_teacher(aux: Any) -> nnx.Module:
        return nnx.merge(t_graphdef, jax.lax.stop_gradient(aux))

    # The logit channel distills the teacher's conditional; the other students learn the flow CE.
    student_loss = gumbel_distill_loss if gcfg.logit_channel else gmb.gumbel_flow_loss

    # Sampler-state rows are a training device: validation keeps the clean path at stratified t.
    rollout_args = {"rollout_prob": gcfg.rollout_prob} if gcfg.rollout_prob > 0 else {}

    def loss_fn(model: TokenFlow, aux: Any, tokens: jax.Array, key: jax.Array):
        mask = jnp.ones(tokens.shape, jnp.float32)
        return student_loss(
            model, frozen_teacher(aux), tokens, mask, key, gcfg, bos_id=bos, time_sampler=fc.time_sampler,
            time_param=fc.time_param, num_buckets=fc.num_buckets, known_BT=known_positions(fc, tokens.shape, key),
            token_time_prob=fc.token_time_prob, stagger_prob=fc.stagger_prob, stagger_width=fc.stagger_width,
            **rollout_args,
        )

    def eval_fn(model: TokenFlow, aux: Any, tokens: jax.Array, key: jax.Array):
        # Validation always pairs held-out text with its exact posterior noise (also for
        # source="teacher_sample"): how well the student realizes the teacher's map on real text.
        mask = jnp.ones(tokens.shape, jnp.float32)
        t = stratified_times(jax.random.fold_in(key, 1), tokens.shape[0])
        return student_loss(
            model, frozen_teacher(aux), tokens, mask, key, gcfg, bos_id=bos, source="data_posterior",
            num_buckets=fc.num_buckets, t_B=t,
        )[1]

    samplers: dict[int, Any] = {}

    def sample_fn(graphdef: Any, params: Any, aux: Any, key: jax.Array, steps: int) -> jax.Array:
        del aux  # G comes from the prior: sampling needs no teacher
        if steps not in samplers:
            samplers[steps] = gumbel_sampling.make_sampler(
                graphdef, gcfg, batch=cfg.sample.num_samples, seq_len=cfg.data.seq_len, steps=steps,
                schedule=cfg.sample.schedule, schedule_param=cfg.sample.schedule_param,
                temperature=cfg.sample.temperature, stagger=cfg.sample.stagger,
            )
        return samplers[steps](params, key)

    return Task(
        name="gumbel",
        create_model=factory.create_model,
        init_params=factory.init_params,
        loss_fn=loss_fn,
        eval_fn=eval_fn,
        summarize=lambda sums, prefix: summarize_gumbel(sums, prefix, fc.num_buckets),
        sample_fn=sample_fn,
        aux=aux,
        aux_shardings=aux_shardings,
        # A teacher workdir that trained on since this student started is a different teacher.
        identity=dict(factory.identity, **({"teacher.step": teacher.step}
                                            if getattr(teacher, "step", None) is not None else {})),
    )

