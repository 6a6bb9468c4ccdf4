"""Known positions of a conditional sample: prompts (a prefix), templates (text with blanks) and
explicit token masks, turned into arrays and checked before anything compiles.

Templates mark each blank with a run of three or more underscores (``BLANK_PATTERN``); every blank
stands for ``blank_length`` tokens (default ``DEFAULT_BLANK_LENGTH``). The template is placed at
the start of the sequence; positions after it are generated freely.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from discreteflow_jax.data.tokenizers import Tokenizer

BLANK_PATTERN = r"_{3,}"
DEFAULT_BLANK_LENGTH = 4


@dataclasses.dataclass(frozen=True)
class Known:
    """Known tokens and where they are: tokens [B, T] int32, mask [B, T] bool."""

    tokens: np.ndarray
    mask: np.ndarray


def parse_template(template: str, tokenizer: Tokenizer, blank_length: int = DEFAULT_BLANK_LENGTH) -> Known:
    """Token ids and known-mask [1, L] of a template such as ``"To be or ____ to be"``."""
    if blank_length < 1:
        raise ValueError(f"blank_length must be >= 1, got {blank_length}")
    pieces = re.split(BLANK_PATTERN, template)
    if len(pieces) == 1:
        raise ValueError(
            f"the template {template!r} has no blank; mark each gap with three or more underscores, "
            "e.g. 'To be or ____ to be' (or use prompt= for a plain prefix)"
        )
    ids: list[int] = []
    known: list[bool] = []
    for i, piece in enumerate(pieces):
        if i > 0:
            ids += [0] * blank_length
            known += [False] * blank_length
        text = piece.strip()
        if text:
            seg = _encode_segment(tokenizer, text, first=not ids)
            ids += seg
            known += [True] * len(seg)
    return Known(np.asarray([ids], np.int32), np.asarray([known], bool))


def prompt_ids(tokenizer: Tokenizer, prompt: str | Sequence[int]) -> list[int]:
    """Token ids of a prompt given as text or as ids."""
    return tokenizer.encode(prompt) if isinstance(prompt, str) else [int(i) for i in prompt]


def _encode_segment(tokenizer: Tokenizer, text: str, first: bool) -> list[int]:
    # SentencePiece puts a word-start marker before every segment by itself; byte-level BPE (GPT-2)
    # needs the space spelled out or the segment would glue onto the blank before it.
    if tokenizer.name == "gpt2" and not first:
        text = " " + text
    return tokenizer.encode(text)


def build_known(
    tokenizer: Tokenizer,
    n: int,
    length: int,
    *,
    prompt: str | Sequence[int] | None = None,
    template: str | None = None,
    known_tokens: Any = None,
    known_mask: Any = None,
    blank_length: int = DEFAULT_BLANK_LENGTH,
) -> Known | None:
    """Turns one of prompt / template / (known_tokens, known_mask) into [n, length] arrays.

    Raises ValueError with a readable message for every inconsistent request; returns None when
    nothing is known (unconditional sampling).
    """
    given = [name for name, v in (("prompt", prompt), ("template", template), ("known_tokens", known_tokens))
             if v is not None]
    if len(given) > 1:
        raise ValueError(f"give only one of prompt, template and known_tokens/known_mask (got {', '.join(given)})")
    if known_mask is not None and known_tokens is None:
        raise ValueError("known_mask needs known_tokens")
    if not given:
        return None
    if prompt is not None:
        ids = prompt_ids(tokenizer, prompt)
        if not ids:
            raise ValueError("the prompt is empty")
        if len(ids) >= length:
            raise ValueError(
                f"the prompt is {len(ids)} tokens long but the model generates {length} tokens "
                f"(its context); use a prompt shorter than {length} tokens"
            )
        tokens = np.zeros((1, length), np.int32)
        tokens[0, : len(ids)] = ids
        mask = np.zeros((1, length), bool)
        mask[0, : len(ids)] = True
        return Known(np.repeat(tokens, n, 0), np.repeat(mask, n, 0))
    if template is not None:
        parsed = parse_template(template, tokenizer, blank_length)
        size = parsed.tokens.shape[1]
        if size > length:
            raise ValueError(
                f"the template is {size} tokens long (blanks included) but the model generates {length} "
                "tokens (its context); shorten the template or the blanks"
            )
        tokens = np.zeros((1, length), np.int32)
        mask = np.zeros((1, length), bool)
        tokens[:, :size], mask[:, :size] = parsed.tokens, parsed.mask
        return Known(np.repeat(tokens, n, 0), np.repeat(mask, n, 0))
    tokens = np.asarray(known_tokens)
    if known_mask is None:
        raise ValueError("known_tokens needs known_mask (True where the token is given)")
    mask = np.asarray(known_mask)
    if tokens.shape != mask.shape:
        raise ValueError(f"known_tokens has shape {tokens.shape} but known_mask has shape {mask.shape}")
    if tokens.ndim == 1:
        tokens, mask = tokens[None], mask[None]
    if tokens.ndim != 2 or tokens.shape[1] != length or tokens.shape[0] not in (1, n):
        raise ValueError(
            f"known_tokens/known_mask must have shape [{length}], [1, {length}] or [{n}, {length}] "
            f"(n samples × the model's {length} positions), got {tuple(np.asarray(known_tokens).shape)}"
        )
    if not np.issubdtype(tokens.dtype, np.integer):
        raise ValueError(f"known_tokens must be integer token ids, got dtype {tokens.dtype}")
    if mask.dtype != bool:
        if not np.all((mask == 0) | (mask == 1)):
            raise ValueError("known_mask must be boolean (or 0/1)")
        mask = mask.astype(bool)
    vocab = tokenizer.vocab_size
    if np.any(mask & ((tokens < 0) | (tokens >= vocab))):
        raise ValueError(f"known_tokens has ids outside the vocabulary [0, {vocab})")
    tokens = np.where(mask, tokens, 0).astype(np.int32)
    if tokens.shape[0] == 1:
        tokens, mask = np.repeat(tokens, n, 0), np.repeat(mask, n, 0)
    return Known(tokens, mask)


def text_windows(tokenizer: Tokenizer, texts: Sequence[str], seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """[W, seq_len] token windows of the texts (the last of each padded) and their masks [W, seq_len]:
    what scoring reads."""
    if isinstance(texts, str):
        texts = [texts]
    rows, masks = [], []
    for ids in tokenizer.encode_batch(list(texts)):
        for start in range(0, max(len(ids), 1), seq_len):
            chunk = ids[start : start + seq_len]
            rows.append(chunk + [tokenizer.pad_id] * (seq_len - len(chunk)))
            masks.append([1.0] * len(chunk) + [0.0] * (seq_len - len(chunk)))
    if not rows or not any(any(m) for m in masks):
        raise ValueError("nothing to score: the texts are empty")
    return np.asarray(rows, np.int32), np.asarray(masks, np.float32)
