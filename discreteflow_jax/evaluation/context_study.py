"""Train small TokenFlows on the synthetic tasks of ``synthetic`` and measure how much of the
Bayes context gain each training recipe recovers (``benchmarks/context.py`` drives it; a test
runs one recipe). A recipe is a set of dotted overrides of the ``model`` and ``flow`` sections.

Measured at one flow time for every position (as sampling runs), per t:
  model_ce             the network's cross-entropy of the clean tokens;
  bayes_position_ce    the best a network that reads no other position can do;
  bayes_context_ce     the best any network can do (forward-backward through the chain);
  recovered            (bayes_position_ce − model_ce) / (bayes_position_ce − bayes_context_ce):
                       the share of the available context gain the network realizes;
  scramble_gain        CE increase when the odd positions of x_t come from another sequence
                       (the validation metric ``context_gain`` of the trainer).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from discreteflow_jax import flow
from discreteflow_jax.config import DEFAULT_TIME_WARP_BINS, FlowConfig, TrainConfig
from discreteflow_jax.data import synthetic as syn
from discreteflow_jax.models.tokenflow import TokenFlow, TokenFlowConfig
from discreteflow_jax.training.optim import make_optimizer

# Recipes: the original (one uniform t per sequence, embedding width = model width, nothing else)
# and one lever at a time, then combinations.
RECIPES: dict[str, dict[str, Any]] = {
    "original": {},
    "token_time": {"flow.token_time_prob": 0.5},
    "token_time_all": {"flow.token_time_prob": 1.0},
    "learned_time": {"flow.time_sampler": "learned"},
    "flow_dim32": {"model.flow_dim": 32},
    "output_modulation": {"model.output_modulation": True},
    "self_condition": {"model.self_condition": True},
    "token_time+output_modulation": {"flow.token_time_prob": 0.5, "model.output_modulation": True},
    "token_time+learned_time": {"flow.token_time_prob": 0.5, "flow.time_sampler": "learned"},
    "flow_dim16": {"model.flow_dim": 16},
    "flow_dim32+token_time": {"model.flow_dim": 32, "flow.token_time_prob": 0.5},
    "flow_dim16+token_time": {"model.flow_dim": 16, "flow.token_time_prob": 0.5},
    "flow_dim32+token_time+output_modulation": {
        "model.flow_dim": 32, "flow.token_time_prob": 0.5, "model.output_modulation": True,
    },
}


@dataclasses.dataclass(frozen=True)
class StudySettings:
    vocab_size: int = 4096
    dim: int = 128
    num_layers: int = 2
    num_heads: int = 4
    seq_len: int = 64
    batch_size: int = 32
    steps: int = 600
    lr: float = 1e-3
    warmup_steps: int = 50
    repeat_prob: float = 0.75
    seed: int = 0


def build(settings: StudySettings, recipe: dict[str, Any]) -> tuple[TokenFlowConfig, FlowConfig]:
    model_kw: dict[str, Any] = dict(
        vocab_size=settings.vocab_size, dim=settings.dim, num_layers=settings.num_layers,
        num_heads=settings.num_heads, max_len=settings.seq_len,
    )
    flow_kw: dict[str, Any] = {}
    for dotted, value in recipe.items():
        section, name = dotted.split(".", 1)
        {"model": model_kw, "flow": flow_kw}[section][name] = value
    if flow_kw.get("time_sampler") == "learned":
        model_kw.setdefault("time_warp_bins", DEFAULT_TIME_WARP_BINS)  # as parse_config does
    return TokenFlowConfig(**model_kw), FlowConfig(**flow_kw)


def train(
    task: syn.MarkovTask, settings: StudySettings, recipe: dict[str, Any],
    progress: Callable[[int, float], None] | None = None,
) -> tuple[TokenFlow, float]:
    """Trains a TokenFlow on ``task`` with ``recipe``; returns (model, seconds per step after compile)."""
    model_cfg, fc = build(settings, recipe)
    model = TokenFlow(model_cfg, rngs=nnx.Rngs(settings.seed))
    graphdef, params = nnx.split(model, nnx.Param)
    tx = make_optimizer(TrainConfig(
        lr=settings.lr, warmup_steps=settings.warmup_steps, num_steps=settings.steps, weight_decay=0.0,
    ))
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state, tokens, key):
        def loss_of(p):
            m = nnx.merge(graphdef, p)
            return flow.flow_loss(
                m, tokens, jnp.ones(tokens.shape), key, time_sampler=fc.time_sampler, time_param=fc.time_param,
                token_time_prob=fc.token_time_prob,
            )[0]

        loss, grads = jax.value_and_grad(loss_of)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return jax.tree.map(lambda p, u: p + u, params, updates), opt_state, loss

    rng = np.random.default_rng(settings.seed + 1)
    key = jax.random.key(settings.seed + 2)
    start = None
    for i in range(settings.steps):
        tokens = jnp.asarray(syn.sample_sequences(task, rng, settings.batch_size, settings.seq_len))
        params, opt_state, loss = step(params, opt_state, tokens, jax.random.fold_in(key, i))
        if i == 0:
            jax.block_until_ready(loss)
            start = time.perf_counter()
        if progress is not None and (i + 1) % 100 == 0:
            progress(i + 1, float(loss))
    jax.block_until_ready(params)
    per_step = (time.perf_counter() - start) / max(settings.steps - 1, 1) if start else 0.0
    return nnx.merge(graphdef, params), per_step


def measure(
    model: TokenFlow, task: syn.MarkovTask, times: tuple[float, ...], *, batch: int = 64, seq_len: int = 64,
    seed: int = 123,
) -> dict[str, dict[str, float]]:
    """The numbers of the module docstring at each t (one held-out batch, the same for every model)."""
    tokens = jnp.asarray(syn.sample_sequences(task, np.random.default_rng(seed), batch, seq_len))
    emb = model.embeddings()
    sigma = model.cfg.sigma
    noise = sigma * jax.random.normal(jax.random.key(seed), (batch, seq_len, model.cfg.flow_width), jnp.float32)
    ce_fn = jax.jit(lambda m, x, t: m.token_losses(x, t, tokens, jnp.ones(tokens.shape))[1])
    out = {}
    keep = jnp.arange(seq_len) % 2 == 0
    for t_value in times:
        t_B = jnp.full((batch,), t_value, jnp.float32)
        x_t = flow.noisy_path(emb[tokens], noise, t_B)
        ce = ce_fn(model, x_t, t_B)
        scrambled = jnp.where(keep[None, :, None], x_t, jnp.roll(x_t, 1, axis=0))
        scrambled_ce = ce_fn(model, scrambled, t_B)
        alone, full = syn.bayes_losses(tokens, x_t, emb, t_value, sigma, task)
        model_ce = float(jnp.mean(ce))
        available = alone - full
        out[f"{t_value:g}"] = {
            "model_ce": model_ce,
            "bayes_position_ce": alone,
            "bayes_context_ce": full,
            "recovered": (alone - model_ce) / available if available > 1e-6 else float("nan"),
            "scramble_gain": float(jnp.mean((scrambled_ce - ce)[:, keep])),
        }
    return out
