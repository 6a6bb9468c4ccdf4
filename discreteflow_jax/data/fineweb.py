"""FineWeb (or any text corpus with a ``text`` column) streamed, tokenized and packed into fixed-length rows.

Data flow for one process:

1. The corpus is streamed with ``datasets`` (the Hub, or local .parquet/.jsonl/.json files) and reduced to this
   process's shard with ``split_dataset_by_node``; processes therefore read disjoint documents.
2. Every document is tokenized and followed by EOS; the token stream is cut into rows of exactly ``seq_len``
   tokens, the remainder of a document carrying over into the next row (no padding).
3. Validation: the first ``val_rows`` rows packed from the *unshuffled* start of the shard. The document that
   completes the last validation row is dropped from training together with all documents before it, so no
   document is in both splits, and the validation set does not depend on the seed or the epoch.
4. Training: the remaining documents, shuffled with a buffer of ``shuffle_buffer`` documents seeded by
   ``(seed, epoch, process_index)``. When the shard is exhausted, a new epoch starts over the same training
   documents in a new shuffled order; packing continues across the boundary without a gap.

Resuming: ``state()`` records where the next row starts (epoch, index of the document in that epoch's shuffled
order, token offset inside it). ``restore`` re-streams the shard and skips the documents before that one without
tokenizing them, so the rows that follow are exactly those an uninterrupted run would have produced.
"""

from __future__ import annotations

import collections
import glob
import itertools
import logging
import os
from collections.abc import Iterator
from typing import Any

import numpy as np

from discreteflow_jax.data.tokenizers import DataError, TokenDataset, Tokenizer, resolve_data_dir

logger = logging.getLogger(__name__)

DEFAULT_SOURCE = "HuggingFaceFW/fineweb"
DEFAULT_SUBSET = "sample-10BT"
# Subfolder of the data folder that, when present, is used instead of streaming from the Hub.
FINEWEB_RELPATH = "fineweb"
_PARQUET_EXTS = (".parquet",)
_JSON_EXTS = (".jsonl", ".json", ".jsonl.gz", ".json.gz")
# Documents are tokenized in groups so the tokenizers' batch path (native, multi-threaded) is used.
_ENCODE_CHUNK = 64

# (epoch, index of the document in the epoch's shuffled order, token offset inside the document + EOS)
Position = tuple[int, int, int]


def _find_local_files(path: str) -> tuple[str, list[str]]:
    """Returns the ``datasets`` builder name ("parquet" or "json") and the sorted data files under ``path``."""
    if os.path.isfile(path):
        files = [path]
    elif os.path.isdir(path):
        exts = _PARQUET_EXTS + _JSON_EXTS
        files = sorted(
            f
            for f in glob.glob(os.path.join(path, "**", "*"), recursive=True)
            if f.endswith(exts) and os.path.isfile(f)
        )
        if not files:
            raise DataError(f"No .parquet, .jsonl or .json files found under {path!r}")
    else:
        raise DataError(f"FineWeb local_path {path!r} does not exist")
    kinds = {"parquet" if f.endswith(_PARQUET_EXTS) else "json" if f.endswith(_JSON_EXTS) else "?" for f in files}
    if "?" in kinds:
        raise DataError(f"Unsupported file type {path!r}; expected .parquet, .jsonl or .json (optionally .gz)")
    if len(kinds) > 1:
        raise DataError(f"{path!r} mixes parquet and json files; point local_path at one kind")
    return kinds.pop(), files


class FineWebData(TokenDataset):
    """Packed GPT-2-token rows from FineWeb (or local files), with a held-out split and exact resume.

    ``train_batch(step, batch_size)`` consumes rows sequentially; steps must be called in order (a step beyond
    the next expected one fast-forwards with a warning, assuming the same ``batch_size`` for the skipped steps;
    an earlier step raises). ``val_batches`` raises ``DataError`` when more rows are requested than
    ``val_rows`` holds, rather than silently evaluating on fewer rows.
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
    ) -> None:
        super().__init__(seq_len, tokenizer, seed, process_index, process_count)
        if val_rows < 0:
            raise DataError(f"val_rows must be non-negative, got {val_rows}")
        if shuffle_buffer < 0:
            raise DataError(f"shuffle_buffer must be non-negative, got {shuffle_buffer}")
        self.val_rows = int(val_rows)
        self.shuffle_buffer = int(shuffle_buffer)

        if local_path is None:
            # Same rule as the other data files: an offline copy in the data folder wins over the Hub.
            folder = resolve_data_dir(data_dir)
            candidate = os.path.join(folder, FINEWEB_RELPATH) if folder else None
            if candidate and os.path.isdir(candidate):
                local_path = candidate
        self.local_path = local_path
        self.source = source
        self.subset = subset
        self._dataset = self._open()

        self._val: np.ndarray | None = None
        self._num_val_docs: int | None = None
        self._pos: Position = (0, 0, 0)
        self._rows_consumed = 0
        self._next_step: int | None = 0
        self._rows: Iterator[tuple[np.ndarray, Position]] | None = None

    # ------------------------------------------------------------------ reading documents

    def describe_source(self) -> str:
        if self.local_path is not None:
            return f"local:{self.local_path}"
        return f"{self.source}/{self.subset}" if self.subset else self.source

    def _open(self) -> Any:
        import datasets
        from datasets.distributed import split_dataset_by_node

        if self.local_path is not None:
            builder, files = _find_local_files(self.local_path)
            try:
                ds = datasets.load_dataset(builder, data_files=files, split="train", streaming=True)
            except Exception as e:  # surface any reader failure with the files involved
                raise DataError(f"Could not read {builder} files under {self.local_path!r}: {e}") from e
        else:
            try:
                ds = datasets.load_dataset(self.source, name=self.subset, split="train", streaming=True)
            except Exception as e:  # any network/auth failure gets the same actionable message
                raise DataError(
                    f"Could not stream {self.source!r} (subset {self.subset!r}) from the Hugging Face Hub "
                    f"({type(e).__name__}: {e}). Without network access, pass local_path (a .parquet/.jsonl/.json "
                    f"file or a folder of them with a 'text' column) or put such files in <data folder>/"
                    f"{FINEWEB_RELPATH}/."
                ) from e
        columns = ds.column_names
        if columns is not None:
            if "text" not in columns:
                raise DataError(f"{self.describe_source()} has no 'text' column; columns found: {sorted(columns)}")
            # Dropping the other columns avoids decoding metadata we never use.
            ds = ds.select_columns(["text"])
        return split_dataset_by_node(ds, rank=self.process_index, world_size=self.process_count)

    def _texts(self) -> Iterator[str]:
        """This process's documents in stored order, from the start of the shard."""
        for example in self._dataset:
            if "text" not in example:
                raise DataError(
                    f"{self.describe_source()} has no 'text' column; columns found: {sorted(example.keys())}"
                )
            text = example["text"]
            yield "" if text is None else str(text)

    def _shuffled_train_texts(self, epoch: int) -> Iterator[str]:
        """Training documents of one epoch: the shard minus the validation documents, buffer-shuffled."""
        self._ensure_val()
        texts = itertools.islice(self._texts(), self._num_val_docs, None)
        if self.shuffle_buffer <= 1:
            yield from texts
            return
        rng = np.random.default_rng([self.seed, epoch, self.process_index])
        buffer: list[str] = []
        for text in texts:
            if len(buffer) < self.shuffle_buffer:
                buffer.append(text)
                continue
            j = int(rng.integers(len(buffer)))
            yield buffer[j]
            buffer[j] = text
        rng.shuffle(buffer)
        yield from buffer

    def _train_docs(self, epoch: int, start_doc: int) -> Iterator[tuple[int, int, str]]:
        """(epoch, index, text) of the training documents from ``start_doc`` of ``epoch`` on, over all epochs."""
        while True:
            count = 0
            for index, text in enumerate(self._shuffled_train_texts(epoch)):
                count += 1
                if index >= start_doc:
                    yield epoch, index, text
            if count == 0:
                raise DataError(
                    f"No training documents in shard {self.process_index}/{self.process_count} of "
                    f"{self.describe_source()}: all {self._num_val_docs} documents went to the {self.val_rows} "
                    "validation rows; lower val_rows or use more data"
                )
            epoch, start_doc = epoch + 1, 0
            logger.info("FineWeb shard %d: starting epoch %d", self.process_index, epoch)

    def _encoded(self, docs: Iterator[tuple[int, int, str]]) -> Iterator[tuple[int, int, np.ndarray]]:
        """Tokenizes documents in chunks and appends EOS to each."""
        eos = np.asarray([self.tokenizer.eos_id], dtype=np.int32)
        while True:
            chunk = list(itertools.islice(docs, _ENCODE_CHUNK))
            if not chunk:
                return
            ids = self.tokenizer.encode_batch([text for _, _, text in chunk])
            for (epoch, index, _), tokens in zip(chunk, ids):
                yield epoch, index, np.concatenate([np.asarray(tokens, dtype=np.int32), eos])

    def check_readable(self) -> None:
        """Reads the start of this process's shard now, so that files without a ``text`` column,
        with fewer tokens than one window or than the validation rows, or with no document left for
        training are refused before anything compiles (not at the first step)."""
        if self.val_rows > 0:
            self._ensure_val()  # raises when the shard packs into fewer than val_rows rows
            if next(itertools.islice(self._texts(), self._num_val_docs, None), None) is None:
                raise DataError(
                    f"No training documents in shard {self.process_index}/{self.process_count} of "
                    f"{self.describe_source()}: all {self._num_val_docs} documents went to the {self.val_rows} "
                    "validation rows; lower val_rows or use more data"
                )
            return
        total = 0
        for _, _, tokens in self._encoded((0, i, t) for i, t in enumerate(self._texts())):
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
            docs = ((0, i, t) for i, t in enumerate(self._texts()))
            for _, index, tokens in self._encoded(docs):
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

    def _row_iterator(self, start: Position) -> Iterator[tuple[np.ndarray, Position]]:
        """Rows from position ``start`` on, each with the position where the following row starts."""
        start_epoch, start_doc, start_offset = start
        pending: collections.deque[list[Any]] = collections.deque()  # [epoch, index, tokens, consumed]
        available = 0
        first = True
        encoded = self._encoded(self._train_docs(start_epoch, start_doc))
        last_label = (start_epoch, start_doc - 1)
        while True:
            while available < self.seq_len:
                epoch, index, tokens = next(encoded)
                consumed = 0
                if first:
                    first = False
                    if start_offset:
                        if (epoch, index) != (start_epoch, start_doc) or start_offset >= len(tokens):
                            raise DataError(
                                f"Cannot resume at epoch {start_epoch}, document {start_doc}, token {start_offset}: "
                                "the data differs from the run that saved the state"
                            )
                        consumed = start_offset
                pending.append([epoch, index, tokens, consumed])
                available += len(tokens) - consumed
            need = self.seq_len
            parts = []
            while need:
                head = pending[0]
                take = min(need, len(head[2]) - head[3])
                parts.append(head[2][head[3] : head[3] + take])
                head[3] += take
                need -= take
                if head[3] == len(head[2]):
                    last_label = (head[0], head[1])
                    pending.popleft()
            available -= self.seq_len
            # The next row starts inside the head document, or at the document after the last one used up.
            nxt = (pending[0][0], pending[0][1], pending[0][3]) if pending else (last_label[0], last_label[1] + 1, 0)
            yield np.concatenate(parts), nxt

    def _next_row(self) -> np.ndarray:
        if self._rows is None:
            self._rows = self._row_iterator(self._pos)
        try:
            row, self._pos = next(self._rows)
        except BaseException:
            # A generator that raised is finished; drop it so the next call re-opens the stream at self._pos.
            self._rows = None
            raise
        self._rows_consumed += 1
        return row

    def _skip_rows(self, count: int) -> None:
        for _ in range(count):
            self._next_row()

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
        batch = np.stack([self._next_row() for _ in range(batch_size)])
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
        }

    def state(self) -> dict[str, Any]:
        """JSON-serializable position of the training stream (save it with the checkpoint)."""
        epoch, doc, offset = self._pos
        return {
            "dataset": "fineweb",
            "source": self.describe_source(),
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
        that many rows from the start, which is exact but slower than seeking to the saved document.
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
        self._rows = None
        self._rows_consumed = 0
        self._pos = (0, 0, 0)
        rows = int(state.get("rows_consumed", 0))
        if all(key in state for key in ("epoch", "doc", "offset")):
            self._pos = (int(state["epoch"]), int(state["doc"]), int(state["offset"]))
            self._rows_consumed = rows
        else:
            self._skip_rows(rows)
        self._next_step = int(state["next_step"]) if state.get("next_step") is not None else None
