"""Batched autoregressive sampling with a KV cache, as one jitted XLA program.

Works with any model that has ``init_cache(batch, max_len)`` and
``decode(tokens_BT, cache, *, key_mask_BS, positions_BT) -> (logits_BTV, cache)`` and a
``config.max_len`` (``Llama``, ``GPT2``).

Prompts of different lengths share one cache: every prompt is moved to the right end of the
prompt block (left padding), so all rows write new tokens into the same cache slot each step.
Padding slots are masked out as keys, and positions count real tokens only
(``max(cumsum(mask) - 1, 0)``), so a padded row computes what the unpadded prompt would.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from discreteflow_jax.models.decoder import DecoderLM


class GenerateOutput(NamedTuple):
    tokens: jax.Array  # [B, N] new tokens; after a row's first EOS every token is pad_id
    lengths: jax.Array  # [B] new tokens up to and including the first EOS (N if none)


@dataclasses.dataclass(frozen=True)
class SamplingSettings:
    """Static sampling options (each combination compiles once); temperature is traced."""

    max_new_tokens: int
    top_k: int = 0  # 0: no top-k filter
    top_p: float = 1.0  # 1.0: no nucleus filter
    greedy: bool = False
    eos_id: int | None = None
    pad_id: int | None = None  # None: eos_id (or 0 without EOS)


def sample_logits(
    logits_BV: jax.Array,
    rng: jax.Array,
    temperature: jax.Array | float,
    *,
    top_k: int = 0,
    top_p: float = 1.0,
    greedy: bool = False,
) -> jax.Array:
    """One token per row from fp32 logits: argmax, or a categorical draw after temperature,
    top-k and top-p (nucleus) filtering."""
    logits_BV = logits_BV.astype(jnp.float32)
    if greedy:
        return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    logits_BV = logits_BV / temperature
    if top_k > 0:
        kth_B1 = jax.lax.top_k(logits_BV, min(top_k, logits_BV.shape[-1]))[0][:, -1:]
        logits_BV = jnp.where(logits_BV < kth_B1, -jnp.inf, logits_BV)
    if top_p < 1.0:
        sorted_BV = jnp.sort(logits_BV, axis=-1)[:, ::-1]
        probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
        # Keep the smallest prefix whose mass reaches top_p: a token stays if the mass strictly
        # before it is below top_p (the most likely token always stays).
        keep_BV = (jnp.cumsum(probs_BV, axis=-1) - probs_BV) < top_p
        threshold_B1 = jnp.min(jnp.where(keep_BV, sorted_BV, jnp.inf), axis=-1, keepdims=True)
        logits_BV = jnp.where(logits_BV < threshold_B1, -jnp.inf, logits_BV)
    return jax.random.categorical(rng, logits_BV, axis=-1).astype(jnp.int32)


def left_align(tokens_BT: jax.Array, mask_BT: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Moves each row's real tokens (in order) to the right end: pads first, then the prompt.
    Works for right, left or mixed padding."""
    # Stable sort on the mask: False (pad) slots first, real tokens after, original order kept.
    order_BT = jnp.argsort(mask_BT.astype(jnp.int32), axis=-1, stable=True)
    return jnp.take_along_axis(tokens_BT, order_BT, axis=-1), jnp.take_along_axis(mask_BT, order_BT, axis=-1)


def _generate(
    graphdef: nnx.GraphDef,
    settings: SamplingSettings,
    state: nnx.State,
    prompt_BT: jax.Array,
    mask_BT: jax.Array,
    rng: jax.Array,
    temperature: jax.Array,
) -> GenerateOutput:
    model = nnx.merge(graphdef, state)
    s = settings
    batch, prompt_len = prompt_BT.shape
    n = s.max_new_tokens
    pad_id = s.pad_id if s.pad_id is not None else (s.eos_id if s.eos_id is not None else 0)
    sample = functools.partial(sample_logits, top_k=s.top_k, top_p=s.top_p, greedy=s.greedy)

    tokens_BT, mask_BT = left_align(prompt_BT, mask_BT)
    lengths_B = mask_BT.sum(-1).astype(jnp.int32)
    # Every cache slot after the prompt block is a real (generated) token.
    key_mask_BS = jnp.concatenate([mask_BT, jnp.ones((batch, n), bool)], axis=-1)
    positions_BT = jnp.maximum(jnp.cumsum(mask_BT, axis=-1) - 1, 0).astype(jnp.int32)

    cache = model.init_cache(batch, prompt_len + n)
    logits_BTV, cache = model.decode(tokens_BT, cache, key_mask_BS=key_mask_BS, positions_BT=positions_BT)
    first_B = sample(logits_BTV[:, -1], jax.random.fold_in(rng, 0), temperature)
    done_B = first_B == s.eos_id if s.eos_id is not None else jnp.zeros((batch,), bool)
    out_BN = jnp.full((batch, n), pad_id, jnp.int32).at[:, 0].set(first_B)

    def cond(carry):
        i, _, _, done_B, _ = carry
        return (i < n) & ~jnp.all(done_B)  # stop early once every row has emitted EOS

    def body(carry):
        i, last_B, cache, done_B, out_BN = carry
        positions_B1 = (lengths_B + i - 1)[:, None]
        logits_B1V, cache = model.decode(last_B[:, None], cache, key_mask_BS=key_mask_BS, positions_BT=positions_B1)
        next_B = sample(logits_B1V[:, 0], jax.random.fold_in(rng, i), temperature)
        next_B = jnp.where(done_B, pad_id, next_B)
        if s.eos_id is not None:
            done_B = done_B | (next_B == s.eos_id)
        out_BN = jax.lax.dynamic_update_slice(out_BN, next_B[:, None], (0, i))
        return i + 1, next_B, cache, done_B, out_BN

    carry = (jnp.ones((), jnp.int32), first_B, cache, done_B, out_BN)
    *_, out_BN = jax.lax.while_loop(cond, body, carry)

    if s.eos_id is None:
        new_lengths_B = jnp.full((batch,), n, jnp.int32)
    else:
        is_eos_BN = out_BN == s.eos_id
        first_eos_B = jnp.argmax(is_eos_BN, axis=-1).astype(jnp.int32)
        new_lengths_B = jnp.where(is_eos_BN.any(-1), first_eos_B + 1, n)
    return GenerateOutput(out_BN, new_lengths_B)


@functools.lru_cache(maxsize=32)
def make_generate_fn(
    graphdef: nnx.GraphDef, settings: SamplingSettings
) -> Callable[[nnx.State, jax.Array, jax.Array, jax.Array, jax.Array], GenerateOutput]:
    """The jitted program ``(state, prompt_BT, mask_BT, rng, temperature) -> GenerateOutput``,
    cached per (model structure, settings); jit itself caches per input shape."""
    return jax.jit(functools.partial(_generate, graphdef, settings))


def generate(
    model: nnx.Module,
    prompt_BT: jax.Array,
    prompt_mask_BT: jax.Array | None = None,
    *,
    prompt_lengths_B: jax.Array | None = None,
    max_new_tokens: int,
    rng: jax.Array,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    greedy: bool = False,
    eos_id: int | None = None,
    pad_id: int | None = None,
) -> GenerateOutput:
    """Samples ``max_new_tokens`` continuations of a batch of prompts.

    Give the real prompt tokens either as ``prompt_mask_BT`` (True at real tokens; right, left or
    mixed padding) or as ``prompt_lengths_B`` (right padding); neither means no padding. Each row
    needs at least one real token (e.g. BOS). Rows stop at ``eos_id``: later tokens are ``pad_id``
    (default ``eos_id``) and ``lengths`` counts new tokens including the EOS.
    """
    prompt_BT = jnp.asarray(prompt_BT, jnp.int32)
    batch, prompt_len = prompt_BT.shape
    if prompt_mask_BT is not None and prompt_lengths_B is not None:
        raise ValueError("give prompt_mask_BT or prompt_lengths_B, not both")
    if prompt_lengths_B is not None:
        prompt_mask_BT = jnp.arange(prompt_len)[None, :] < jnp.asarray(prompt_lengths_B)[:, None]
    if prompt_mask_BT is None:
        prompt_mask_BT = jnp.ones((batch, prompt_len), bool)
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    max_len = model.config.max_len
    if prompt_len + max_new_tokens > max_len:
        raise ValueError(f"prompt ({prompt_len}) + max_new_tokens ({max_new_tokens}) exceeds max_len {max_len}")
    if not greedy and temperature <= 0:
        raise ValueError("temperature must be > 0 (use greedy=True for argmax decoding)")

    settings = SamplingSettings(max_new_tokens, top_k, float(top_p), greedy, eos_id, pad_id)
    graphdef, state = nnx.split(model)
    fn = make_generate_fn(graphdef, settings)
    return fn(state, prompt_BT, jnp.asarray(prompt_mask_BT, bool), rng, jnp.asarray(temperature, jnp.float32))


# ---------------------------------------------------------------------------------------------
# Teachers as used by distillation


def teacher_inputs(tokens_BT: jax.Array, bos_id: int) -> jax.Array:
    """[BOS] + tokens[:-1]: the teacher's input whose logits at i predict tokens[i]."""
    bos = jnp.full((tokens_BT.shape[0], 1), bos_id, tokens_BT.dtype)
    return jnp.concatenate([bos, tokens_BT[:, :-1]], axis=1)


@dataclasses.dataclass(frozen=True)
class TeacherFns:
    """A teacher split at its output head, so the head can run chunk by chunk over positions.

    hidden(tokens [B, T]) -> features [B, T, ·]; head(features [B, C, ·]) -> fp32 logits [B, C, V].
    ``head(hidden(x))`` equals the teacher's forward ``model(x)``.
    """

    hidden: Callable[[jax.Array], jax.Array]
    head: Callable[[jax.Array], jax.Array]


def teacher_fns(model: Any) -> TeacherFns:
    """Splits a Llama or GPT2 teacher before its final norm + output projection (``_logits``);
    any other callable ``model(tokens) -> logits`` is used whole (then the full B×T×V teacher
    logits exist once; the rest of the reduction is still chunked)."""
    if isinstance(model, DecoderLM):
        return TeacherFns(model.hidden, model._logits)
    return TeacherFns(lambda tokens: model(tokens).astype(jnp.float32), lambda logits: logits)
