"""The teacher wrapper of the Python API: a trained autoregressive LLaMA (ours, or an exported
one) that samples with its KV cache, continues prefixes in one batch and scores text by its
next-token loss.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from discreteflow_jax.config import ExperimentConfig
from discreteflow_jax.data.tokenizers import Tokenizer
from discreteflow_jax.flow import cross_entropy
from discreteflow_jax.inference.prompts import prompt_ids, text_windows
from discreteflow_jax.models.generate import generate, teacher_inputs

FLOW_KINDS = ("tokenflow", "gumbel")


def is_autoregressive(model: Any) -> bool:
    """True for the teachers that ``load`` returns, False for TokenFlow models (baseline or Gumbel)."""
    return getattr(model, "kind", "") not in FLOW_KINDS


class TeacherModel:
    """A trained autoregressive LLaMA teacher (ours, or an exported one)."""

    kind = "llama"

    def __init__(self, cfg: ExperimentConfig | None, model: nnx.Module, tokenizer: Tokenizer, source: str,
                 step: int | None = None):
        self.config = cfg
        self.module = model
        self.tokenizer = tokenizer
        self.source = source
        self.step = step
        self._score: Callable | None = None
        mc = model.config
        self.bos_id = mc.bos_id if mc.bos_id is not None else tokenizer.bos_id
        self.eos_id = mc.eos_id if mc.eos_id is not None else tokenizer.eos_id

    def __repr__(self) -> str:
        return f"TeacherModel(source={self.source!r}, step={self.step}, max_len={self.module.config.max_len})"

    @property
    def seq_len(self) -> int:
        return self.config.data.seq_len if self.config is not None else self.module.config.max_len - 1

    @property
    def sample_length(self) -> int:
        """Tokens one sample has by default: the training context, less the KV-cache slot BOS takes."""
        return min(self.seq_len, self.module.config.max_len - 1)

    def model(self) -> nnx.Module:
        return self.module

    def sample_tokens(
        self,
        n: int,
        steps: int | None = None,
        seed: int = 0,
        *,
        temperature: float | None = None,
        prompt: str | Sequence[int] | None = None,
        template: str | None = None,
        known_tokens: Any = None,
        known_mask: Any = None,
        length: int | None = None,
        top_k: int = 0,
        top_p: float = 1.0,
        **unused: Any,
    ) -> np.ndarray:
        """[n, length] ids: the prompt (if any) followed by sampled tokens (after EOS: EOS).
        ``steps`` is ignored: generation takes one model call per token."""

        del steps, unused
        if template is not None or known_tokens is not None or known_mask is not None:
            raise ValueError("an autoregressive teacher only continues a prefix: use prompt=, not a template or mask")
        length = self.sample_length if length is None else length
        max_len = self.module.config.max_len
        if not 1 <= length <= max_len - 1:
            raise ValueError(f"length must be in [1, {max_len - 1}] (max_len minus the BOS slot), got {length}")
        ids: list[int] = []
        if prompt is not None:
            ids = prompt_ids(self.tokenizer, prompt)
            if len(ids) >= length:
                raise ValueError(f"the prompt is {len(ids)} tokens long; use one shorter than {length} tokens")
        temperature = 1.0 if temperature is None else temperature
        prompt_arr = jnp.asarray([[self.bos_id] + ids] * n, jnp.int32)
        out = generate(self.module, prompt_arr, max_new_tokens=length - len(ids), rng=jax.random.key(seed),
                       temperature=temperature, top_k=top_k, top_p=top_p, eos_id=self.eos_id)
        new = np.asarray(jax.device_get(out.tokens))
        return np.concatenate([np.asarray(prompt_arr)[:, 1:], new], axis=1).astype(np.int32)

    def sample(self, n: int, steps: int | None = None, seed: int = 0, **kwargs: Any) -> list[str]:
        tokens = self.sample_tokens(n, steps, seed, **kwargs)
        return [self.tokenizer.decode_until_eos(row) for row in tokens]

    def continue_rows(self, prefixes: Sequence[Sequence[int]], length: int, seed: int = 0, *,
                      temperature: float | None = None, top_k: int = 0, top_p: float = 1.0,
                      **unused: Any) -> np.ndarray:
        """[B, length]: each prefix (ids, BOS added here) followed by sampled tokens, in one batch."""

        del unused
        shortest = min(len(p) for p in prefixes)
        if length > self.module.config.max_len - 1:
            raise ValueError(f"length must be <= {self.module.config.max_len - 1} (max_len minus the BOS slot)")
        width = 1 + max(len(p) for p in prefixes)
        prompt = np.zeros((len(prefixes), width), np.int32)
        mask = np.zeros((len(prefixes), width), bool)
        for j, p in enumerate(prefixes):
            prompt[j, : 1 + len(p)] = [self.bos_id, *p]
            mask[j, : 1 + len(p)] = True
        # Right-padded prompts are re-aligned inside generate, so every row gets the same number of
        # new tokens; enough for the shortest prefix, and longer rows are cut back to ``length``.
        out = generate(self.module, jnp.asarray(prompt), jnp.asarray(mask), max_new_tokens=length - shortest,
                       rng=jax.random.key(seed), temperature=1.0 if temperature is None else temperature,
                       top_k=top_k, top_p=top_p, eos_id=self.eos_id)
        new = np.asarray(jax.device_get(out.tokens))
        rows = np.zeros((len(prefixes), length), np.int32)
        for j, p in enumerate(prefixes):
            rows[j, : len(p)] = p
            rows[j, len(p) :] = new[j, : length - len(p)]
        return rows

    def score(self, texts: Sequence[str]) -> dict[str, float]:
        """Next-token loss and perplexity of the texts (windows of the context, BOS first)."""

        windows, masks = text_windows(self.tokenizer, texts, self.seq_len)
        if self._score is None:  # one compiled program instead of one per eager op
            graphdef, state = nnx.split(self.module)
            bos = self.bos_id

            def token_nll(state, tokens):
                logits = nnx.merge(graphdef, state)(teacher_inputs(tokens, bos))
                return cross_entropy(logits, tokens)

            self._score = functools.partial(jax.jit(token_nll), state)
        nll = np.asarray(self._score(jnp.asarray(windows)))
        loss = float((nll * masks).sum() / masks.sum())
        return {"loss": loss, "ppl": float(np.exp(min(loss, 50.0)))}
