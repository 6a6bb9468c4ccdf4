"""FineWeb (or any text corpus with a ``text`` column) read, tokenized and packed into fixed-length rows.

Data flow for one process:

1. The corpus is read from parquet or JSON files (local, or a Hub dataset's files; see ``fineweb_source``). Its
   documents, numbered in file order, are cut into ``process_count`` contiguous ranges; process ``i`` reads
   range ``i`` (its shard), so processes read disjoint documents.
2. Every document is tokenized and followed by EOS; the token stream is cut into rows of exactly ``seq_len``
   tokens, the remainder of a document carrying over into the next row (no padding).
3. Validation: the first ``val_rows`` rows packed from the *unshuffled* start of the shard. The document that
   completes the last validation row is dropped from training together with all documents before it, so no
   document is in both splits, and the validation set does not depend on the seed or the epoch.
4. Training: the remaining documents in the order of ``fineweb_source.EpochOrder``: row-group blocks and windows
   of about ``shuffle_buffer`` documents permuted with seeds drawn from ``(seed, epoch, process_index)``. Each
   epoch visits every training document once; packing continues across the epoch boundary without a gap.
5. Batches are packed ``prefetch`` steps ahead in a background thread (``prefetch.Prefetcher``).

Resuming: ``state()`` records where the next row starts (epoch, index of the document in that epoch's order,
token offset inside it). ``restore`` reads only the window holding that document, so the cost does not grow with
the position, and the rows that follow are exactly those an uninterrupted run would have produced.
"""

from __future__ import annotations

import logging
import os
import weakref
from collections.abc import Iterator
from typing import Any

import numpy as np

from discreteflow_jax.data.fineweb_source import DocumentSource, EpochOrder, find_local_files, hub_files
from discreteflow_jax.data.packing import Position, batched, encode_docs, packed_rows
from discreteflow_jax.data.prefetch import Prefetcher
from discreteflow_jax.data.tokenizers import DataError, TokenDataset, Tokenizer, resolve_data_dir

logger = logging.getLogger(__name__)

DEFAULT_SOURCE = "HuggingFaceFW/fineweb"
DEFAULT_SUBSET = "sample-10BT"
# Subfolder of the data folder that, when present, is used instead of streaming from the Hub.
FINEWEB_RELPATH = "fineweb"
# Name of the training order in state(): a position is only meaningful in the order that produced it.
ORDER = "blocks"
DEFAULT_PREFETCH = 2

class FineWebData(TokenDataset):
    """Packed rows of tokens from FineWeb (or local files), with a held-out split and exact resume.

    ``train_batch(step, batch_size)`` consumes rows sequentially; steps must be called in order (a step beyond
    the next expected one fast-forwards with a warning, assuming the same ``batch_size`` for the skipped steps;
    an earlier step raises). ``val_batches`` raises ``DataError`` when more rows are requested than
    ``val_rows`` holds, rather than silently evaluating on fewer rows. ``prefetch`` is how many batches a
    background thread packs ahead (0: none, packed on demand); ``close()`` stops it.
    """

    def __init__(
        self,
        seq_len: int,
        tokenizer: Tokenizer,
        source: str = DEFAULT_SOURCE,
        subset: str | None = DEFAULT_SUBSET,
        local_path: str | None = None,
        val_rows: int = 256,
        seed: int = 0,
        process_index: int = 0,
        process_count: int = 1,
        shuffle_buffer: int = 10_000,
        data_dir: str | None = None,
        prefetch: int = DEFAULT_PREFETCH,
    ) -> None:
        super().__init__(seq_len, tokenizer, seed, process_index, process_count)
        if val_rows < 0:
            raise DataError(f"val_rows must be non-negative, got {val_rows}")
        if shuffle_buffer < 0:
            raise DataError(f"shuffle_buffer must be non-negative, got {shuffle_buffer}")
        if prefetch < 0:
            raise DataError(f"prefetch must be non-negative, got {prefetch}")
        self.val_rows = int(val_rows)
        self.shuffle_buffer = int(shuffle_buffer)
        self.prefetch = int(prefetch)

        if local_path is None:
            # Same rule as the other data files: an offline copy in the data folder wins over the Hub.
            folder = resolve_data_dir(data_dir)
            candidate = os.path.join(folder, FINEWEB_RELPATH) if folder else None
            if candidate and os.path.isdir(candidate):
                local_path = candidate
        self.local_path = local_path
        self.source = source
        self.subset = subset
        self._source = self._open()
        total = self._source.num_docs
        self._shard = (total * self.process_index // self.process_count,
                       total * (self.process_index + 1) // self.process_count)

        self._val: np.ndarray | None = None
        self._num_val_docs: int | None = None
        self._order: EpochOrder | None = None
        self._pos: Position = (0, 0, 0)
        self._rows_consumed = 0
        self._next_step: int | None = 0
        self._batches: Prefetcher[tuple[np.ndarray, Position]] | None = None
        self._batch_size = 0

    # ------------------------------------------------------------------ reading documents

    def describe_source(self) -> str:
        if self.local_path is not None:
            return f"local:{self.local_path}"
        return f"{self.source}/{self.subset}" if self.subset else self.source

    def _open(self) -> DocumentSource:
        if self.local_path is not None:
            files = find_local_files(self.local_path)
        else:
            try:
                files = hub_files(self.source, self.subset)
            except Exception as e:  # any network/auth failure gets the same actionable message
                raise DataError(
                    f"Could not list the files of {self.source!r} (subset {self.subset!r}) on the Hugging Face Hub "
                    f"({type(e).__name__}: {e}). Without network access, pass local_path (a .parquet/.jsonl/.json "
                    f"file or a folder of them with a 'text' column) or put such files in <data folder>/"
                    f"{FINEWEB_RELPATH}/."
                ) from e
        try:
            return DocumentSource(files, self.describe_source())
        except DataError:
            raise
        except Exception as e:  # surface any reader failure with the files involved
            raise DataError(f"Could not read the files of {self.describe_source()}: {e}") from e

    def _shard_texts(self) -> Iterator[tuple[int, int, str]]:
        """(0, index, text) of this process's documents in stored order, from the start of the shard."""
        return ((0, i, t) for i, t in enumerate(self._source.iter_texts(*self._shard)))

    def _train_order(self) -> EpochOrder:
        self._ensure_val()
        assert self._order is not None
        if self._order.num_docs <= 0:
            raise DataError(
                f"No training documents in shard {self.process_index}/{self.process_count} of "
                f"{self.describe_source()}: all {self._num_val_docs} documents went to the {self.val_rows} "
                "validation rows; lower val_rows or use more data"
            )
        return self._order

    def check_readable(self) -> None:
        """Reads the start of this process's shard now, so that files without a ``text`` column,
        with fewer tokens than one window or than the validation rows, or with no document left for
        training are refused before anything compiles (not at the first step)."""
        if self.val_rows > 0:
            self._train_order()
            return
        total = 0
        for _, _, tokens in encode_docs(self.tokenizer, self._shard_texts()):
            total += len(tokens)
            if total >= self.seq_len:
                return
        raise DataError(
            f"Shard {self.process_index}/{self.process_count} of {self.describe_source()} holds only {total} tokens "
            f"(EOS included), less than one window of seq_len={self.seq_len}; use more data or a shorter seq_len"
        )

    # ------------------------------------------------------------------ validation

    def _ensure_val(self) -> None:
        if self._num_val_docs is not None:
            return
        rows: list[np.ndarray] = []
        pieces: list[np.ndarray] = []
        filled = 0
        num_docs = 0
        if self.val_rows > 0:
            for _, index, tokens in encode_docs(self.tokenizer, self._shard_texts()):
                num_docs = index + 1
                while len(tokens) and len(rows) < self.val_rows:
                    take = min(len(tokens), self.seq_len - filled)
                    pieces.append(tokens[:take])
                    tokens = tokens[take:]
                    filled += take
                    if filled == self.seq_len:
                        rows.append(np.concatenate(pieces))
                        pieces, filled = [], 0
                if len(rows) == self.val_rows:
                    break
            if len(rows) < self.val_rows:
                raise DataError(
                    f"Shard {self.process_index}/{self.process_count} of {self.describe_source()} packs into only "
                    f"{len(rows)} rows of {self.seq_len} tokens, fewer than val_rows={self.val_rows} (and none would "
                    "be left for training); lower val_rows or seq_len, or use more data"
                )
        self._val = np.stack(rows) if rows else np.zeros((0, self.seq_len), dtype=np.int32)
        self._num_val_docs = num_docs
        first, stop = self._shard
        self._order = EpochOrder(
            self._source, first + num_docs, stop, self.shuffle_buffer, self.seed, self.process_index
        )

    @property
    def num_val_docs(self) -> int:
        """How many documents at the start of this process's shard are reserved for validation."""
        self._ensure_val()
        assert self._num_val_docs is not None
        return self._num_val_docs

    def val_batches(self, batch_size: int, num_batches: int | None = None) -> list[np.ndarray]:
        """The first ``batch_size * num_batches`` validation rows as int32 [batch_size, seq_len] batches.

        ``num_batches=None`` returns every full batch. Asking for more rows than ``val_rows`` raises DataError.
        """
        if batch_size <= 0:
            raise DataError(f"batch_size must be positive, got {batch_size}")
        self._ensure_val()
        assert self._val is not None
        available = len(self._val) // batch_size
        if num_batches is None:
            num_batches = available
        if num_batches <= 0 or num_batches > available:
            raise DataError(
                f"Requested {num_batches} validation batches of {batch_size} rows, but val_rows={self.val_rows} "
                f"holds {available} full batches; raise val_rows to at least {max(num_batches, 1) * batch_size} or "
                "request fewer batches"
            )
        return [self._val[b * batch_size : (b + 1) * batch_size] for b in range(num_batches)]

    # ------------------------------------------------------------------ training

    def close(self) -> None:
        """Stops the background packing (it restarts at the current position when a batch is asked for)."""
        if self._batches is not None:
            self._batches.close()
            self._batches = None

    def _next_batch(self, batch_size: int) -> tuple[np.ndarray, Position]:
        if self._batches is None or self._batch_size != batch_size:
            self.close()
            rows = packed_rows(self._train_order(), self.tokenizer, self.seq_len, self._pos)
            self._batches = Prefetcher(batched(rows, batch_size), self.prefetch, f"fineweb-{self.process_index}")
            self._batch_size = batch_size
            # The worker holds no reference to self, so an unused dataset is collected and its thread stopped.
            weakref.finalize(self, self._batches.close)
        try:
            return self._batches.get()
        except BaseException:
            # The stream re-opens at self._pos (the start of this batch) on the next call.
            self.close()
            raise

    def _skip_rows(self, count: int) -> None:
        self.close()
        rows = packed_rows(self._train_order(), self.tokenizer, self.seq_len, self._pos)
        for _ in range(count):
            _, self._pos = next(rows)
            self._rows_consumed += 1

    def train_batch(self, step: int, batch_size: int) -> np.ndarray:
        """The next ``batch_size`` (per process) training rows, int32 [batch_size, seq_len], for ``step``."""
        if batch_size <= 0:
            raise DataError(f"batch_size must be positive, got {batch_size}")
        if self._next_step is None:
            # Restored from a state without a step number: the caller's step defines the numbering.
            self._next_step = step
        if step < self._next_step:
            raise DataError(
                f"train_batch(step={step}) after the rows for step {self._next_step - 1} were already produced; "
                "streamed data cannot go back: create a new FineWebData and restore() a state() saved at that step"
            )
        if step > self._next_step:
            logger.warning(
                "FineWeb train_batch jumped from step %d to %d; fast-forwarding %d rows (assumes batch_size=%d)",
                self._next_step,
                step,
                (step - self._next_step) * batch_size,
                batch_size,
            )
            self._skip_rows((step - self._next_step) * batch_size)
        batch, self._pos = self._next_batch(batch_size)
        self._rows_consumed += batch_size
        self._next_step = step + 1
        return batch

    # ------------------------------------------------------------------ resume

    def _fingerprint(self) -> dict[str, Any]:
        return {
            "seq_len": self.seq_len,
            "seed": self.seed,
            "process_index": self.process_index,
            "process_count": self.process_count,
            "val_rows": self.val_rows,
            "shuffle_buffer": self.shuffle_buffer,
            "tokenizer": self.tokenizer.name,
            "shard_docs": self._shard[1] - self._shard[0],
        }

    def state(self) -> dict[str, Any]:
        """JSON-serializable position of the training stream (save it with the checkpoint)."""
        epoch, doc, offset = self._pos
        return {
            "dataset": "fineweb",
            "source": self.describe_source(),
            "order": ORDER,
            "rows_consumed": self._rows_consumed,
            "next_step": self._next_step,
            "epoch": epoch,
            "doc": doc,
            "offset": offset,
            **self._fingerprint(),
        }

    def restore(self, state: dict[str, Any]) -> None:
        """Continues from a ``state()``: the following rows equal those of the run that saved it.

        A state with only ``rows_consumed`` (and optionally ``next_step``) is honoured by packing and discarding
        that many rows from the start, which is exact but slower than seeking to the saved document. A position
        saved in another document order (states without ``order`` come from the earlier buffer-shuffled order)
        raises DataError, except where both orders agree (one process, no shuffling).
        """
        kind = state.get("dataset", "fineweb")
        if kind != "fineweb":
            raise DataError(f"Cannot restore FineWebData from a state of dataset {kind!r}")
        mismatched = {
            key: (state[key], value)
            for key, value in self._fingerprint().items()
            if key in state and state[key] != value
        }
        if mismatched:
            details = ", ".join(f"{k}: saved {a!r} vs now {b!r}" for k, (a, b) in mismatched.items())
            raise DataError(f"Data state does not match this FineWebData ({details}); the saved position is invalid")
        has_position = all(key in state for key in ("epoch", "doc", "offset"))
        order = state.get("order", "buffer")
        if has_position and order != ORDER and not (self.shuffle_buffer <= 1 and self.process_count == 1):
            raise DataError(
                f"The data state was saved in the {order!r} document order (shuffle_buffer={self.shuffle_buffer}, "
                f"{self.process_count} processes), which this version does not produce (it uses {ORDER!r}); the "
                "saved position cannot be continued exactly. Resume from a checkpoint saved by this version, or "
                "start a new run"
            )
        self.close()
        self._rows_consumed = 0
        self._pos = (0, 0, 0)
        rows = int(state.get("rows_consumed", 0))
        if has_position:
            self._pos = (int(state["epoch"]), int(state["doc"]), int(state["offset"]))
            self._rows_consumed = rows
        else:
            self._skip_rows(rows)
        self._next_step = int(state["next_step"]) if state.get("next_step") is not None else None
