"""Tokenizers and datasets. Both datasets share one interface used by the train loop:

``train_batch(step, batch_size)``, ``val_batches(batch_size, num_batches)``, ``state()``, ``restore(state)``.
"""

from __future__ import annotations

from typing import Any

from discreteflow_jax.data.fineweb import FineWebData
from discreteflow_jax.data.shakespeare import ShakespeareData
from discreteflow_jax.data.tokenizers import (
    DataError,
    GPT2BPETokenizer,
    SentencePieceTokenizer,
    Tokenizer,
    load_tokenizer,
    resolve_data_dir,
)

DATASET_NAMES = ("shakespeare", "fineweb")


def make_dataset(
    name: str,
    seq_len: int,
    tokenizer: Tokenizer,
    *,
    data_dir: str | None = None,
    seed: int = 0,
    process_index: int = 0,
    process_count: int = 1,
    **kwargs: Any,
) -> ShakespeareData | FineWebData:
    """Builds ``"shakespeare"`` or ``"fineweb"``; ``kwargs`` go to the dataset's constructor.

    Shakespeare takes ``val_fraction``; FineWeb takes ``source``, ``subset``, ``local_path``, ``val_rows``,
    ``shuffle_buffer`` and ``prefetch``.
    """
    key = str(name).strip().lower()
    common: dict[str, Any] = {
        "data_dir": data_dir,
        "seed": seed,
        "process_index": process_index,
        "process_count": process_count,
    }
    if key == "shakespeare":
        return ShakespeareData(seq_len, tokenizer, **common, **kwargs)
    if key == "fineweb":
        return FineWebData(seq_len, tokenizer, **common, **kwargs)
    raise DataError(f"Unknown dataset {name!r}; valid names: {', '.join(DATASET_NAMES)}")


__all__ = [
    "DATASET_NAMES",
    "DataError",
    "FineWebData",
    "GPT2BPETokenizer",
    "SentencePieceTokenizer",
    "ShakespeareData",
    "Tokenizer",
    "load_tokenizer",
    "make_dataset",
    "resolve_data_dir",
]
