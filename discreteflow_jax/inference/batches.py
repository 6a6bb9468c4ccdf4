"""Many samples from one loaded model, drawn in fixed-size batches with reproducible per-batch
seeds: plain samples (``sample_batches``, ``sample_texts``) and continuations of given prefixes
(``continue_prefixes``).

The sampling command line and the sweep draw the same rows for the same seed, batch size, K and
sampling settings. Their defaults differ: ``sample`` takes the temperature, time grid and stagger
of the model's config (``sample.*``), the sweep its own flags (flow temperature 1, uniform grid);
pass them explicitly to reproduce a sweep cell with ``sample``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

from discreteflow_jax.inference.prompts import prompt_ids
from discreteflow_jax.inference.teacher_model import is_autoregressive

log = logging.getLogger("discreteflow_jax")


def batch_seed(seed: int, index: int) -> int:
    """The sampler seed of batch ``index``: distinct for every (seed, index), reproducible."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


def sample_batches(model: Any, num_samples: int, steps: int | None, seed: int, *, batch_size: int = 64,
                   **sample_kwargs: Any) -> np.ndarray:
    """[num_samples, length] token ids, ``batch_size`` rows per sampler call, batch i sampled with
    ``batch_seed(seed, i)``; keyword arguments go to ``model.sample_tokens``. The rows depend on
    ``batch_size``: keep it fixed when comparing runs."""
    if num_samples < 1 or batch_size < 1:
        raise ValueError(f"num_samples and batch_size must be >= 1, got {num_samples} and {batch_size}")
    out = []
    for i, start in enumerate(range(0, num_samples, batch_size)):
        count = min(batch_size, num_samples - start)
        out.append(np.asarray(model.sample_tokens(count, steps, batch_seed(seed, i), **sample_kwargs)))
    return np.concatenate(out, axis=0)


def sample_texts(model: Any, num_samples: int, steps: int | None = None, seed: int = 0, *, batch_size: int = 64,
                 length: int = 0, **sample_kwargs: Any) -> tuple[list[str], int | None]:
    """Texts (each up to its first EOS) of ``sample_batches``; returns (texts, the K used, None for
    a teacher). K defaults to the training config's; ``length`` 0 is the model's own sample length.
    Flow-only options (``schedule``, ``schedule_param``, ``condition``, ``stagger``, ``polish_steps``) are dropped
    for a teacher."""
    if is_autoregressive(model):
        if steps is not None:
            log.warning("steps (K) do not apply to an autoregressive model")
        steps = None
        for name in ("schedule", "schedule_param", "condition", "stagger", "polish_steps"):
            sample_kwargs.pop(name, None)
        sample_kwargs["length"] = length or model.sample_length
    else:
        steps = steps if steps is not None else model.config.sample.steps
        if length:
            sample_kwargs["length"] = length
    tokens = sample_batches(model, num_samples, steps, seed, batch_size=batch_size, **sample_kwargs)
    return [model.tokenizer.decode_until_eos(np.asarray(row)) for row in tokens], steps


def continue_prefixes(
    model: Any,
    prefixes: Sequence[str] | Sequence[Sequence[int]],
    steps: Sequence[int] = (1, 4, 16, 128),
    *,
    seed: int = 0,
    length: int | None = None,
    batch_size: int = 64,
    return_tokens: bool = False,
    **sample_kwargs: Any,
) -> dict[int, list[str]] | dict[int, list[np.ndarray]]:
    """Continuations of each prefix (text, or token ids such as real validation windows cut short)
    for every number of steps K: ``{K: [continuation of prefix 0, ...]}``.

    A sample is ``length`` tokens (default: the training context) with the prefix held at its
    start; the continuation is what follows the prefix, decoded up to its first EOS (or, with
    ``return_tokens``, its ids). Rows are sampled ``batch_size`` at a time, each batch with a seed
    derived from ``seed`` and its first row, so keep ``batch_size`` fixed when comparing runs.
    Teachers ignore K (one model call per token) and return the same continuations for every K.
    Extra keyword arguments (``condition``, ``temperature``, ``schedule``) go to ``sample_tokens``.
    """
    length = model.sample_length if length is None else length
    ids = [prompt_ids(model.tokenizer, p) for p in prefixes]
    for i, row in enumerate(ids):
        if not row or len(row) >= length:
            raise ValueError(f"prefix {i} is {len(row)} tokens long; each prefix needs 1 to {length - 1} tokens")
    out: dict[int, list] = {}
    for k in steps:
        results: list = []
        for start in range(0, len(ids), batch_size):
            chunk = ids[start : start + batch_size]
            tokens = np.zeros((len(chunk), length), np.int32)
            mask = np.zeros((len(chunk), length), bool)
            for j, row in enumerate(chunk):
                tokens[j, : len(row)], mask[j, : len(row)] = row, True
            seed_k = seed + start
            if is_autoregressive(model):
                sampled = model.continue_rows(chunk, length, seed_k, **sample_kwargs)
            else:
                sampled = model.sample_tokens(len(chunk), k, seed_k, known_tokens=tokens, known_mask=mask,
                                              length=length, **sample_kwargs)
            for j, row in enumerate(chunk):
                cont = np.asarray(sampled[j, len(row) :])
                results.append(cont if return_tokens else model.tokenizer.decode_until_eos(cont))
        out[int(k)] = results
    return out
