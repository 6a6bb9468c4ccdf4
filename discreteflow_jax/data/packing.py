"""Documents to fixed-length rows: each document is tokenized and followed by EOS, and the token stream is cut
into rows of ``seq_len`` tokens, a document's remainder carrying over into the next row. Every row comes with
the position where the following one starts, which is what a resumable stream saves.
"""

from __future__ import annotations

import collections
import itertools
from collections.abc import Iterator
from typing import Any

import numpy as np

from discreteflow_jax.data.fineweb_source import EpochOrder
from discreteflow_jax.data.tokenizers import DataError, Tokenizer

# Documents are tokenized in groups so the tokenizers' batch path (native, multi-threaded) is used.
_ENCODE_CHUNK = 64

# (epoch, index of the document in the epoch's order, token offset inside the document + EOS)
Position = tuple[int, int, int]


def encode_docs(tokenizer: Tokenizer, docs: Iterator[tuple[int, int, str]]) -> Iterator[tuple[int, int, np.ndarray]]:
    """Tokenizes documents in chunks and appends EOS to each."""
    eos = np.asarray([tokenizer.eos_id], dtype=np.int32)
    while True:
        chunk = list(itertools.islice(docs, _ENCODE_CHUNK))
        if not chunk:
            return
        ids = tokenizer.encode_batch([text for _, _, text in chunk])
        for (epoch, index, _), tokens in zip(chunk, ids):
            yield epoch, index, np.concatenate([np.asarray(tokens, dtype=np.int32), eos])


def packed_rows(
    order: EpochOrder, tokenizer: Tokenizer, seq_len: int, start: Position
) -> Iterator[tuple[np.ndarray, Position]]:
    """Rows from position ``start`` on, each with the position where the following row starts."""
    start_epoch, start_doc, start_offset = start
    pending: collections.deque[list[Any]] = collections.deque()  # [epoch, index, tokens, consumed]
    available = 0
    first = True
    encoded = encode_docs(tokenizer, order.docs(start_epoch, start_doc))
    last_label = (start_epoch, start_doc - 1)
    while True:
        while available < seq_len:
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
        need = seq_len
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
        available -= seq_len
        # The next row starts inside the head document, or at the document after the last one used up.
        nxt = (pending[0][0], pending[0][1], pending[0][3]) if pending else (last_label[0], last_label[1] + 1, 0)
        yield np.concatenate(parts), nxt


def batched(rows: Iterator[tuple[np.ndarray, Position]], batch_size: int) -> Iterator[tuple[np.ndarray, Position]]:
    """Batches of ``batch_size`` rows, each with the position after its last row."""
    while True:
        batch = []
        pos: Position = (0, 0, 0)
        for _ in range(batch_size):
            row, pos = next(rows)
            batch.append(row)
        yield np.stack(batch), pos
