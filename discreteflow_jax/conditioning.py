"""Flow sampling with known positions: the noise sources and the conditional sampler.

Known positions are overwritten before each step (``condition``): ``"clamp"`` sets them to their
clean embedding (the input a model trained with ``flow.condition_prob > 0`` sees at its known
spans); ``"path"`` holds them on their own noise path ``x_t = t·e + (1−t)·x0``, the input
distribution of unconditional training. Pure functions of arrays, keys and modules; the model
wrappers of ``discreteflow_jax.inference`` jit them.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from discreteflow_jax import flow, gumbel_sampling
from discreteflow_jax import gumbel as gmb
from discreteflow_jax.config import ExperimentConfig
from discreteflow_jax.models.tokenflow import TokenFlow

CONDITION_MODES = ("clamp", "path")
KNOWN_NOISE = ("posterior", "prior")

# source(key, model, known_tokens [B, T], known_mask [B, T]) -> (x0 [B, T, d], context or None)
SourceFn = Callable[[jax.Array, TokenFlow, jax.Array, jax.Array], tuple[jax.Array, jax.Array | None]]


def gaussian_prior(key: jax.Array, model: TokenFlow, known_tokens: jax.Array, known_mask: jax.Array
                   ) -> tuple[jax.Array, None]:
    """The baseline source: x0 ~ N(0, σ²I), no context (the known tokens do not change it)."""
    b, seq_len = known_tokens.shape
    return flow.gaussian_source(key, b, seq_len, model), None


def gumbel_prior(gumbel_section: dict | None, known_noise: str = "posterior") -> SourceFn:
    """The source of a Gumbel student: G from the prior, reduced to (x0, context) as in training.

    With ``known_noise="posterior"`` the noise at known positions is drawn from the exact
    posterior given that the known token won the Gumbel argmax under a flat teacher (ℓ uniform),
    so the noise the student reads agrees with the tokens it is told; ``"prior"`` keeps plain
    prior noise there. With no known position both equal ``gumbel.gumbel_source`` exactly (same
    keys, same draws).
    """
    if known_noise not in KNOWN_NOISE:
        raise ValueError(f"known_noise must be one of {', '.join(KNOWN_NOISE)}, got {known_noise!r}")
    gcfg = gmb.parse_gumbel_config(gumbel_section)

    def source(key: jax.Array, model: TokenFlow, known_tokens: jax.Array, known_mask: jax.Array
               ) -> tuple[jax.Array, jax.Array | None]:
        b, seq_len = known_tokens.shape
        if known_noise == "prior":
            return gmb.gumbel_source(model, key, b, seq_len, gcfg)
        g_key, x0_key = jax.random.split(key)  # the split gumbel_source makes
        emb = model.embeddings()
        vocab = emb.shape[0]
        chunk = gmb.resolve_chunk(seq_len, b, vocab, gcfg.chunk_size)
        flat_logp = jnp.full((b, chunk, vocab), -jnp.log(float(vocab)), jnp.float32)

        def noise_fn(start: jax.Array, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
            xi, m = gmb.chunk_draws(g_key, positions, b, vocab)
            tok = jax.lax.dynamic_slice_in_dim(known_tokens, start, chunk, axis=1)
            known = jax.lax.dynamic_slice_in_dim(known_mask, start, chunk, axis=1)
            post = gmb.posterior_from_draws(flat_logp, tok, xi, m)
            g = jnp.where(known[..., None], post, xi)
            return gcfg.sample_temperature * g, jnp.zeros((b, chunk), jnp.float32)

        ctx = gmb.chunked_context(noise_fn, emb, seq_len=seq_len, chunk=chunk, tau=gcfg.tau, remat=False)[0]
        x0, context = gmb.student_inputs(model, ctx, gcfg)
        if x0 is None:
            x0 = flow.gaussian_source(x0_key, b, seq_len, model)
        return x0, context

    return source


def source_for(cfg: ExperimentConfig, known_noise: str = "posterior") -> SourceFn:
    """How a task draws (x0, context) at sampling time; Gumbel models use their Gumbel prior."""
    if cfg.task == "gumbel":
        return gumbel_prior(cfg.extra.get("gumbel"), known_noise)
    return gaussian_prior


def conditional_sample(
    model: TokenFlow,
    key: jax.Array,
    grid: jax.Array,
    known_tokens_BT: jax.Array,
    known_mask_BT: jax.Array,
    *,
    source: SourceFn = gaussian_prior,
    temperature: jax.Array | float = 1.0,
    condition: str = "clamp",
    gumbel: gmb.GumbelConfig | None = None,
    stagger: float = 0.0,
    polish_steps: int = 0,
) -> jax.Array:
    """Samples [B, T] tokens; positions where ``known_mask_BT`` is True are held (see the module
    docstring for ``condition``) and returned unchanged. An all-False mask is plain sampling.
    ``gumbel`` (a ``GumbelConfig`` with ``logit_channel``): the prior G drawn from ``key`` as in
    ``gumbel_sampling.sample_gumbel_flow`` is added to the logits at every step (at known positions it is
    the prior draw: their tokens are held anyway). ``stagger``: see ``flow.staggered_times``.
    ``polish_steps``: Jacobi calls after the flow (``gumbel_sampling.polish``; logit channel only)."""
    if condition not in CONDITION_MODES:
        raise ValueError(f"condition must be one of {CONDITION_MODES}, got {condition!r}")
    x0, context = source(key, model, known_tokens_BT, known_mask_BT)
    noise_args = {}
    if gumbel is not None and gumbel.logit_channel:
        noise_args = gumbel_sampling.logit_noise_args(model, key, *known_tokens_BT.shape, gumbel)
        context = gumbel_sampling.g_channel_context(model, key, *known_tokens_BT.shape, gumbel, context)
        context = gumbel_sampling.with_drafts(model, context, noise_args, known_tokens_BT, known_mask_BT)
    e_known = model.embed(known_tokens_BT)
    mask = known_mask_BT[..., None]

    def clamp(x: jax.Array, t: jax.Array) -> jax.Array:
        target = e_known if condition == "clamp" else t * e_known + (1.0 - t) * x0
        return jnp.where(mask, target, x)

    tokens, _ = flow.sample_flow(model, x0, grid, context=context, temperature=temperature, clamp_fn=clamp,
                                 stagger=stagger, **noise_args)
    tokens = jnp.where(known_mask_BT, known_tokens_BT, tokens)
    return gumbel_sampling.polish(model, tokens, context, noise_args, polish_steps, temperature=temperature,
                                  known_BT=known_mask_BT)
