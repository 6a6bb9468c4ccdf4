"""Random access to the documents (``text`` column) of parquet or JSON files, and the order in which one
process visits its training documents in each epoch.

Documents are numbered in file order. Parquet files are read one row group at a time and JSON files whole,
so a document is reached without reading the ones before it. ``EpochOrder`` permutes blocks of consecutive
documents, then the documents inside windows of about ``shuffle_buffer`` of them, every permutation drawn from
its own seed: the document at (epoch, index) is found by reading one window.
"""

from __future__ import annotations

import bisect
import collections
import glob
import io
import json
import os
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np

from discreteflow_jax.data.tokenizers import DataError

PARQUET_EXTS = (".parquet",)
JSON_EXTS = (".jsonl", ".json", ".jsonl.gz", ".json.gz")
# Largest block that is permuted as one unit: bounds a window's memory when row groups are very large.
BLOCK_ROWS = 8192
# Parquet files kept open (footer parsed) at a time; windows jump between files.
_OPEN_FILES = 8


def file_kind(files: list[str], where: str) -> str:
    """"parquet" or "json" for a list of data files of one kind."""
    kinds = {"parquet" if f.endswith(PARQUET_EXTS) else "json" if f.endswith(JSON_EXTS) else "?" for f in files}
    if "?" in kinds:
        raise DataError(f"Unsupported file type {where!r}; expected .parquet, .jsonl or .json (optionally .gz)")
    if len(kinds) > 1:
        raise DataError(f"{where!r} mixes parquet and json files; point local_path at one kind")
    return kinds.pop()


def find_local_files(path: str) -> list[str]:
    """The data file ``path``, or the sorted data files under the folder ``path``."""
    if os.path.isfile(path):
        return [path]
    if not os.path.isdir(path):
        raise DataError(f"FineWeb local_path {path!r} does not exist")
    exts = PARQUET_EXTS + JSON_EXTS
    files = sorted(
        f for f in glob.glob(os.path.join(path, "**", "*"), recursive=True) if f.endswith(exts) and os.path.isfile(f)
    )
    if not files:
        raise DataError(f"No .parquet, .jsonl or .json files found under {path!r}")
    return files


def hub_files(source: str, subset: str | None) -> list[str]:
    """The ``hf://`` addresses of the train files of a Hub dataset (resolved without downloading data)."""
    import datasets

    builder = datasets.load_dataset_builder(source, name=subset)
    data_files = builder.config.data_files or {}
    files = sorted(str(f) for f in data_files.get("train", []))
    if not files:
        raise DataError(f"{source!r} (subset {subset!r}) lists no train data files")
    return files


def _open_binary(path: str) -> Any:
    if "://" not in path:
        return path
    import fsspec

    return fsspec.open(path, "rb").open()


def _json_records(path: str) -> list[dict[str, Any]]:
    """The objects of a JSON Lines file or of a JSON array (optionally gzip-compressed)."""
    import fsspec

    with fsspec.open(path, "rt", encoding="utf-8", compression="infer") as f:
        text = f.read()
    if text.lstrip().startswith("["):
        records = json.loads(text)
    else:
        records = [json.loads(line) for line in io.StringIO(text) if line.strip()]
    if not all(isinstance(r, dict) for r in records):
        raise DataError(f"{path!r} holds JSON values that are not objects; expected one object per document")
    return records


class DocumentSource:
    """The documents of ``files`` (all parquet or all JSON) by global index; safe to use from several threads.

    Opening reads the parquet footers only; JSON files have no index, so each is parsed once to count its
    documents (for large corpora, parquet opens in time independent of the corpus size).
    """

    def __init__(self, files: list[str], describe: str) -> None:
        self.files = files
        self.kind = file_kind(files, describe)
        self.describe = describe
        self._lock = threading.Lock()
        self._handles: collections.OrderedDict[int, Any] = collections.OrderedDict()
        self._cached: tuple[tuple[int, int], list[str]] | None = None
        sizes: list[tuple[int, int, int]] = []  # (file, row group or -1 for a whole JSON file, documents)
        for i in range(len(files)):
            if self.kind == "parquet":
                meta = self._parquet(i).metadata
                sizes += [(i, g, meta.row_group(g).num_rows) for g in range(meta.num_row_groups)]
            else:
                sizes.append((i, -1, len(self._load((i, -1)))))
        self.units = [(i, g) for i, g, _ in sizes]
        # Unit u holds the documents starts[u] <= index < starts[u + 1].
        self.starts = np.concatenate([[0], np.cumsum([n for _, _, n in sizes], dtype=np.int64)])
        self.num_docs = int(self.starts[-1])

    def _parquet(self, i: int) -> Any:
        import pyarrow.parquet as pq

        if i in self._handles:
            self._handles.move_to_end(i)
            return self._handles[i]
        try:
            pf = pq.ParquetFile(_open_binary(self.files[i]))
        except Exception as e:  # a damaged or unreadable file is named in the message
            raise DataError(f"Could not read parquet file {self.files[i]!r}: {e}") from e
        names = pf.schema_arrow.names
        if "text" not in names:
            raise DataError(f"{self.describe} has no 'text' column; columns found: {sorted(names)}")
        self._handles[i] = pf
        if len(self._handles) > _OPEN_FILES:
            self._handles.popitem(last=False)
        return pf

    def _load(self, unit: tuple[int, int]) -> list[str]:
        if self._cached is not None and self._cached[0] == unit:
            return self._cached[1]
        file_index, group = unit
        if group >= 0:
            values = self._parquet(file_index).read_row_group(group, columns=["text"]).column("text").to_pylist()
        else:
            records = _json_records(self.files[file_index])
            if records and not any("text" in r for r in records):
                columns = sorted(set().union(*records))
                raise DataError(f"{self.describe} has no 'text' column; columns found: {columns}")
            values = [r.get("text") for r in records]
        texts = ["" if t is None else str(t) for t in values]
        self._cached = (unit, texts)
        return texts

    def read(self, start: int, stop: int) -> list[str]:
        """The documents ``start <= index < stop``, reading only the row groups (or JSON files) that hold them."""
        out: list[str] = []
        with self._lock:
            u = int(np.searchsorted(self.starts, start, side="right")) - 1
            while start < stop:
                lo, hi = int(self.starts[u]), int(self.starts[u + 1])
                if hi > start:
                    take = min(stop, hi)
                    out += self._load(self.units[u])[start - lo : take - lo]
                    start = take
                u += 1
        return out

    def iter_texts(self, start: int, stop: int) -> Iterator[str]:
        """The documents from ``start`` (up to ``stop``) one by one, read a unit at a time."""
        while start < stop:
            u = int(np.searchsorted(self.starts, start, side="right")) - 1
            end = min(stop, int(self.starts[u + 1]))
            yield from self.read(start, end)
            start = end


class EpochOrder:
    """Every epoch's order of the training documents ``first <= index < stop`` of one process.

    With ``shuffle_buffer > 1`` an epoch permutes blocks (row groups cut to at most ``BLOCK_ROWS`` documents)
    with the seed ``(seed, epoch, process_index)``, groups consecutive blocks of that order into windows of at
    least ``shuffle_buffer`` documents, and permutes each window ``w`` with the seed ``(seed, epoch,
    process_index, w)``. Otherwise every epoch is the stored order.
    """

    def __init__(
        self, source: DocumentSource, first: int, stop: int, shuffle_buffer: int, seed: int, process_index: int
    ) -> None:
        self.source = source
        self.num_docs = stop - first
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.process_index = process_index
        cuts = sorted({first, stop} | {int(s) for s in source.starts if first < s < stop})
        self.blocks = [
            (lo, min(lo + BLOCK_ROWS, b)) for a, b in zip(cuts[:-1], cuts[1:]) for lo in range(a, b, BLOCK_ROWS)
        ]
        self._layout_cache: tuple[int, list[int], list[list[tuple[int, int]]]] | None = None

    def _layout(self, epoch: int) -> tuple[list[int], list[list[tuple[int, int]]]]:
        """(index where each window starts, plus the epoch's size; the blocks of each window in order)."""
        if self._layout_cache is not None and self._layout_cache[0] == epoch:
            return self._layout_cache[1], self._layout_cache[2]
        if self.shuffle_buffer > 1:
            rng = np.random.default_rng([self.seed, epoch, self.process_index])
            order = [self.blocks[i] for i in rng.permutation(len(self.blocks))]
        else:
            order = list(self.blocks)
        starts, windows, size = [0], [], 0
        for block in order:
            if not windows or size >= self.shuffle_buffer:
                if windows:
                    starts.append(starts[-1] + size)
                windows.append([])
                size = 0
            windows[-1].append(block)
            size += block[1] - block[0]
        starts.append(starts[-1] + size)
        self._layout_cache = (epoch, starts, windows)
        return starts, windows

    def docs(self, epoch: int, index: int) -> Iterator[tuple[int, int, str]]:
        """(epoch, index, text) from document ``index`` of ``epoch`` on, through all later epochs."""
        if self.num_docs <= 0:
            raise DataError("no training documents")
        while True:
            starts, windows = self._layout(epoch)
            for w in range(bisect.bisect_right(starts, index) - 1, len(windows)):
                texts: list[str] = []
                for lo, hi in windows[w]:
                    texts += self.source.read(lo, hi)
                if self.shuffle_buffer > 1:
                    perm = np.random.default_rng([self.seed, epoch, self.process_index, w]).permutation(len(texts))
                else:
                    perm = np.arange(len(texts))
                for j in range(max(index - starts[w], 0), len(texts)):
                    yield epoch, starts[w] + j, texts[perm[j]]
            epoch, index = epoch + 1, 0
