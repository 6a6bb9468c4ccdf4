"""Sampling from a Gumbel-conditioned TokenFlow: the prior G drawn from a key, the student's
context from it, the logit channel's noise (a function of the positions, drawn a chunk at a time)
and its G-channel features, and the jitted K-step sampler."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from discreteflow_jax import flow
from discreteflow_jax.config.gumbel import GumbelConfig
from discreteflow_jax.gumbel import (
    chunked_context,
    gumbel_source,
    prior_draws,
    resolve_chunk,
    sample_prior,
    sampling_keys,
)
from discreteflow_jax.models.noisy_argmax import noisy_readout
from discreteflow_jax.models.tokenflow import TokenFlow
from discreteflow_jax.models.warmflow import GumbelInput


def sample_gumbel_flow(
    model: TokenFlow,
    key: jax.Array,
    grid: jax.Array,
    gumbel: GumbelConfig,
    *,
    batch: int,
    seq_len: int,
    temperature: float = 1.0,
    stagger: float = 0.0,
    polish_steps: int = 0,
) -> jax.Array:
    """Tokens [B, T] from a Gumbel-conditioned TokenFlow in ``len(grid) − 1`` flow steps (any K ≥ 1),
    then ``polish_steps`` Jacobi calls (``polish``; logit channel only)."""
    x0, context = gumbel_source(model, key, batch, seq_len, gumbel)
    context = g_channel_context(model, key, batch, seq_len, gumbel, context)
    noise_args = logit_noise_args(model, key, batch, seq_len, gumbel)
    context = with_drafts(model, context, noise_args)
    tokens = flow.sample_flow(model, x0, grid, context=context, temperature=temperature, stagger=stagger,
                              **noise_args)[0]
    return polish(model, tokens, context, noise_args, polish_steps, temperature=temperature)


def polish(model: Any, tokens: jax.Array, context: jax.Array | None, noise_args: dict, steps: int, *,
           temperature: float | jax.Array = 1.0, known_BT: jax.Array | None = None) -> jax.Array:
    """``steps`` Jacobi calls of a logit-channel student after its flow: the network reads its own
    tokens clean (t = ``flow.MAX_MODEL_TIME``) and each call's tokens are argmax(logits/temperature + G)
    with the sampler's G. The network logits estimate the teacher's conditional given the left
    context, so this is Jacobi iteration of the teacher's Gumbel-max decode of the same G: it can only
    fix positions left to right, and T calls reach its fixed point (docs/distill_cpu.md). Known
    positions (``known_BT``) are held. ``noise_args`` are ``logit_noise_args``'s; {} or 0 steps: no-op."""
    if steps <= 0:
        return tokens
    if not noise_args:
        raise ValueError("polishing needs the Gumbel logit channel (gumbel.logit_channel=True): its G fixes the "
                         "Jacobi iteration's target")
    emb = model.embeddings()
    t_B = jnp.full((tokens.shape[0],), flow.MAX_MODEL_TIME)

    def call(_, tok: jax.Array) -> jax.Array:
        new = noisy_readout(model, jnp.take(emb, tok, axis=0), t_B, context, noise_args["logit_noise"],
                            temperature=temperature, chunk=noise_args["noise_chunk"])[1]
        return new if known_BT is None else jnp.where(known_BT, tok, new)

    return jax.lax.fori_loop(0, steps, call, tokens)


def logit_noise(model: TokenFlow, key: jax.Array, batch: int, seq_len: int, gumbel: GumbelConfig) -> jax.Array | None:
    """The logit channel's noise for sampling, ``sample_temperature``·G [B, T, V] fp32, from the same
    key and draws as ``gumbel_source``'s context (both see one G); None without the channel. The
    sampler draws the same numbers a chunk at a time (``logit_noise_args``); this whole array is
    the reference."""
    if not gumbel.logit_channel:
        return None
    g_key = sampling_keys(key)[0]
    return gumbel.sample_temperature * sample_prior(g_key, batch, seq_len, model.cfg.vocab_size)


def logit_noise_args(model: Any, key: jax.Array, batch: int, seq_len: int, gumbel: GumbelConfig) -> dict:
    """``sample_flow``'s logit-channel arguments: the noise of ``logit_noise`` as a function of the
    positions (drawn a chunk at a time, the same numbers), its τ and chunk; {} without the channel."""
    if not gumbel.logit_channel:
        return {}
    g_key, vocab = sampling_keys(key)[0], model.cfg.vocab_size

    def noise_fn(positions: jax.Array) -> jax.Array:
        return gumbel.sample_temperature * prior_draws(g_key, positions, batch, vocab)

    return {"logit_noise": noise_fn, "noise_tau": gumbel.logit_tau,
            "noise_chunk": resolve_chunk(seq_len, batch, vocab, gumbel.chunk_size)}


def g_channel_context(model: Any, key: jax.Array, batch: int, seq_len: int, gumbel: GumbelConfig,
                      context: jax.Array | None) -> jax.Array | None:
    """A warm student's G-channel input for sampling: its features of the prior G the logit channel
    adds (same draws, unscaled), a chunk of positions at a time. Otherwise ``context``."""
    if not gumbel.logit_channel or getattr(model.cfg, "g_channel", "none") == "none":
        return context
    g_key, vocab = sampling_keys(key)[0], model.cfg.vocab_size
    chunk = resolve_chunk(seq_len, batch, vocab, gumbel.chunk_size)

    def noise_fn(start: jax.Array, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
        xi = prior_draws(g_key, positions, batch, vocab)
        return xi, jnp.zeros((batch, positions.shape[0]), jnp.float32)

    return chunked_context(noise_fn, None, seq_len=seq_len, chunk=chunk, tau=1.0, remat=False,
                           reduce=model.g_features)[0]


def with_drafts(model: Any, context: Any, noise_args: dict, known_tokens: jax.Array | None = None,
                known_mask: jax.Array | None = None) -> Any:
    """A drafting student's network input (``GumbelInput``): ``context`` (its G-channel features or
    None) and the logit channel's noise, which its drafts add to the head as the readout does.
    Other models: ``context`` unchanged."""
    if getattr(getattr(model, "cfg", None), "g_drafts", 0) <= 0:
        return context
    if not noise_args:
        raise ValueError("a drafting student (gumbel.drafts > 0) needs the Gumbel logit channel's noise")
    return GumbelInput(context, noise_args["logit_noise"], noise_args["noise_chunk"], known_tokens, known_mask)


def make_sampler(
    graphdef: nnx.GraphDef, gumbel: GumbelConfig, *, batch: int, seq_len: int, steps: int, schedule: str = "uniform",
    schedule_param: float = 2.0, temperature: float = 1.0, stagger: float = 0.0, polish_steps: int = 0,
) -> Callable[[Any, jax.Array], jax.Array]:
    """A jitted ``(params, key) -> tokens`` sampler for K = ``steps`` (then ``polish_steps`` Jacobi calls)."""
    grid = flow.time_grid(steps, schedule, schedule_param)

    def run(params: Any, key: jax.Array) -> jax.Array:
        model = nnx.merge(graphdef, params)
        return sample_gumbel_flow(model, key, grid, gumbel, batch=batch, seq_len=seq_len, temperature=temperature,
                                  stagger=stagger, polish_steps=polish_steps)

    return jax.jit(run)

