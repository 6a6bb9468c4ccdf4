"""Tiny Shakespeare as a token stream with random training windows and fixed validation windows."""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import urllib.request
from typing import Any

import numpy as np

from discreteflow_jax.data.tokenizers import (
    DataError,
    TokenDataset,
    Tokenizer,
    check_process,
    default_cache_dir,
    missing_file_error,
    resolve_data_dir,
)

logger = logging.getLogger(__name__)

SHAKESPEARE_RELPATH = "tiny_shakespeare/input.txt"
SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"


def _download_url(url: str, dest: str, timeout: float = 60.0) -> None:
    """Downloads ``url`` to ``dest`` atomically (module-level so tests can replace it)."""
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    with urllib.request.urlopen(url, timeout=timeout) as response:
        payload = response.read()
    _atomic_write_bytes(dest, payload)


def _atomic_write_bytes(dest: str, payload: bytes) -> None:
    # Write-then-rename so that concurrent processes never read a half-written cache file.
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(dest), prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
        os.replace(tmp, dest)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def load_shakespeare_text(data_dir: str | None = None) -> str:
    """The tiny-shakespeare text from the data folder, the download cache, or the char-rnn repository."""
    folder = resolve_data_dir(data_dir)
    if folder is not None:
        local = os.path.join(folder, SHAKESPEARE_RELPATH)
        if os.path.isfile(local):
            with open(local, encoding="utf-8") as f:
                return f.read()
    cached = os.path.join(default_cache_dir(), SHAKESPEARE_RELPATH)
    if not os.path.isfile(cached):
        logger.info("%s not in %s; downloading %s", SHAKESPEARE_RELPATH, folder, SHAKESPEARE_URL)
        try:
            _download_url(SHAKESPEARE_URL, cached)
        except Exception as e:  # any network/IO failure gets the same actionable message
            raise missing_file_error(SHAKESPEARE_RELPATH, folder, SHAKESPEARE_URL, e) from e
    with open(cached, encoding="utf-8") as f:
        return f.read()


def _encode_cached(text: str, tokenizer: Tokenizer) -> np.ndarray:
    """Token ids of the whole text, cached as .npy keyed by the text hash and the tokenizer."""
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()[:24]
    fname = f"shakespeare_{tokenizer.name}_v{tokenizer.vocab_size}_{digest}.npy"
    path = os.path.join(default_cache_dir(), "tokens", fname)
    if os.path.isfile(path):
        try:
            return np.load(path).astype(np.int32, copy=False)
        except (OSError, ValueError) as e:
            # A corrupt cache entry is only a lost speed-up: re-tokenize and overwrite it.
            logger.warning("Ignoring unreadable token cache %s (%s)", path, e)
    tokens = np.asarray(tokenizer.encode(text), dtype=np.int32)
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-", suffix=".npy")
        with os.fdopen(fd, "wb") as f:
            np.save(f, tokens)
        os.replace(tmp, path)
    except OSError as e:
        logger.warning("Could not write token cache %s (%s); continuing without it", path, e)
    return tokens


class ShakespeareData(TokenDataset):
    """Tiny Shakespeare tokenized as one string and split by token position: train first, validation last.

    Training windows start at uniformly random offsets drawn from ``np.random.default_rng([seed, step,
    process_index])``, so the data of a step is a pure function of those numbers and resuming needs no
    iterator state. Validation windows are fixed, evenly spread over the validation split.
    """

    def __init__(
        self,
        seq_len: int,
        tokenizer: Tokenizer,
        data_dir: str | None = None,
        val_fraction: float = 0.1,
        seed: int = 0,
        process_index: int = 0,
        process_count: int = 1,
    ) -> None:
        super().__init__(seq_len, tokenizer, seed, process_index, process_count)
        if not 0.0 < val_fraction < 1.0:
            raise DataError(f"val_fraction must be in (0, 1), got {val_fraction}")
        self.val_fraction = float(val_fraction)

        tokens = _encode_cached(load_shakespeare_text(data_dir), tokenizer)
        num_train = int(len(tokens) * (1.0 - val_fraction))
        self.train_tokens: np.ndarray = tokens[:num_train]
        self.val_tokens: np.ndarray = tokens[num_train:]
        for split, arr in (("train", self.train_tokens), ("validation", self.val_tokens)):
            # Train needs strictly more tokens than seq_len only so that there is more than one window.
            if len(arr) <= self.seq_len:
                raise DataError(
                    f"seq_len={self.seq_len} does not fit the Shakespeare {split} split of {len(arr)} tokens "
                    f"(total {len(tokens)} tokens, val_fraction={val_fraction}); use a shorter seq_len"
                )

    @property
    def num_train_tokens(self) -> int:
        return len(self.train_tokens)

    @property
    def num_val_tokens(self) -> int:
        return len(self.val_tokens)

    def train_offsets(self, step: int, batch_size: int, process_index: int | None = None) -> np.ndarray:
        """Start offsets (into the train split) of the windows of ``train_batch``."""
        if step < 0:
            raise DataError(f"step must be non-negative, got {step}")
        if batch_size <= 0:
            raise DataError(f"batch_size must be positive, got {batch_size}")
        pidx = self.process_index if process_index is None else int(process_index)
        rng = np.random.default_rng([self.seed, int(step), pidx])
        return rng.integers(0, len(self.train_tokens) - self.seq_len + 1, size=batch_size)

    def train_batch(
        self,
        step: int,
        batch_size: int,
        process_index: int | None = None,
        process_count: int | None = None,
    ) -> np.ndarray:
        """int32 [batch_size, seq_len] windows for ``step``; ``batch_size`` is per process.

        ``process_index``/``process_count`` default to the constructor's values. ``process_count`` does not
        change the data: every process draws independently from its own seed stream.
        """
        if process_count is not None:
            check_process(self.process_index if process_index is None else process_index, process_count)
        offsets = self.train_offsets(step, batch_size, process_index)
        return self.train_tokens[offsets[:, None] + np.arange(self.seq_len)]

    def max_val_windows(self) -> int:
        """How many non-overlapping windows fit in the validation split."""
        return len(self.val_tokens) // self.seq_len

    def val_offsets(
        self,
        batch_size: int,
        num_batches: int | None = None,
        process_index: int | None = None,
        process_count: int | None = None,
    ) -> np.ndarray:
        """Start offsets (into the validation split) of ``val_batches``, shape [num_batches, batch_size]."""
        pidx = self.process_index if process_index is None else int(process_index)
        pcount = self.process_count if process_count is None else int(process_count)
        check_process(pidx, pcount)
        if batch_size <= 0:
            raise DataError(f"batch_size must be positive, got {batch_size}")
        if num_batches is None:
            num_batches = self.max_val_windows() // (batch_size * pcount)
            if num_batches == 0:
                raise DataError(
                    f"The validation split ({len(self.val_tokens)} tokens) holds {self.max_val_windows()} windows "
                    f"of {self.seq_len} tokens, fewer than one global batch of {batch_size * pcount}"
                )
        if num_batches <= 0:
            raise DataError(f"num_batches must be positive, got {num_batches}")
        per_process = batch_size * num_batches
        total = per_process * pcount
        if total > self.max_val_windows():
            logger.warning(
                "%d validation windows of %d tokens requested but only %d fit without overlap; windows will overlap",
                total,
                self.seq_len,
                self.max_val_windows(),
            )
        span = len(self.val_tokens) - self.seq_len
        # Exact integer spacing: consecutive starts differ by at least floor(span / (total - 1)) tokens.
        offsets = (np.arange(total, dtype=np.int64) * span) // max(total - 1, 1)
        return offsets[pidx * per_process : (pidx + 1) * per_process].reshape(num_batches, batch_size)

    def val_batches(
        self,
        batch_size: int,
        num_batches: int | None = None,
        process_index: int | None = None,
        process_count: int | None = None,
    ) -> list[np.ndarray]:
        """Fixed validation batches, int32 [batch_size, seq_len] each; ``batch_size`` is per process.

        The ``batch_size * num_batches * process_count`` windows are spread evenly over the validation split;
        they do not overlap as long as they fit (see ``max_val_windows``), otherwise a warning is logged and
        neighbouring windows share tokens. Process ``p`` gets the ``p``-th contiguous block of windows, so the
        processes' windows are disjoint and their union does not depend on how the global batch is divided.
        ``num_batches=None`` takes as many full batches as fit without overlap.
        """
        offsets = self.val_offsets(batch_size, num_batches, process_index, process_count)
        return list(self.val_tokens[offsets[..., None] + np.arange(self.seq_len)])

    def unigram_entropy(self) -> float:
        """Entropy (nats) of the unigram distribution of the training tokens: a baseline for the loss."""
        counts = np.bincount(self.train_tokens, minlength=self.tokenizer.vocab_size).astype(np.float64)
        probs = counts[counts > 0] / counts.sum()
        return float(-(probs * np.log(probs)).sum())

    def state(self) -> dict[str, Any]:
        """The data of a step depends only on (seed, step, process_index): there is no iterator state."""
        return {"dataset": "shakespeare", "seed": self.seed}

    def restore(self, state: dict[str, Any]) -> None:
        """Accepts a ``state()`` dict; nothing needs restoring, only the dataset kind is checked."""
        kind = state.get("dataset", "shakespeare") if state else "shakespeare"
        if kind != "shakespeare":
            raise DataError(f"Cannot restore ShakespeareData from a state of dataset {kind!r}")
        if state and state.get("seed", self.seed) != self.seed:
            logger.warning("Restoring a data state saved with seed %s into seed %s", state["seed"], self.seed)
