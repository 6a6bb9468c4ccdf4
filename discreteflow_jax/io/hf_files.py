"""Hugging Face checkpoint files: safetensors weights (sharded or not) read lazily, tensor by tensor.

Files are read with ``safetensors`` (numpy framework), never with torch. A missing, truncated or
foreign file, a shard index that does not match its shards, and an unreadable tensor raise
``ConversionError`` naming the file and the tensor.
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
from safetensors import safe_open


class ConversionError(ValueError):
    """A checkpoint does not fit the model: missing, unexpected or mis-shaped keys, unreadable
    files, or an architecture feature we do not implement."""


# safetensors dtype codes of floating-point tensors (all are read as fp32 parameters).
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")
INDEX_FILE = "model.safetensors.index.json"
_NUMPY_DTYPE_CODES = {"float16": "F16", "float32": "F32", "float64": "F64", "bfloat16": "BF16"}


class SafetensorsCheckpoint(Mapping[str, np.ndarray]):
    """Lazy read-only view of one or more ``.safetensors`` files: tensors are read on access.

    A file that is missing, truncated or not safetensors, and a tensor that does not read, raise
    ConversionError naming the file (and the tensor). ``index`` (the ``weight_map`` of a sharded
    checkpoint) is checked against the shards: every tensor it names must be in its shard."""

    def __init__(self, files: list[str], index: Mapping[str, str] | None = None):
        self._file_of: dict[str, str] = {}
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._dtypes: dict[str, str] = {}
        for path in files:
            try:
                with safe_open(path, framework="np") as f:
                    for key in f.keys():  # noqa: SIM118 (safe_open is not a Mapping)
                        sl = f.get_slice(key)
                        self._file_of[key] = path
                        self._shapes[key] = tuple(sl.get_shape())
                        self._dtypes[key] = str(sl.get_dtype())
            except Exception as e:  # FileNotFoundError, SafetensorError (truncated or corrupt header)
                raise ConversionError(f"cannot read {path}: {type(e).__name__}: {e}") from e
        if index is not None:
            directory = os.path.dirname(files[0]) if files else ""
            absent = sorted(k for k, shard in index.items() if self._file_of.get(k) != os.path.join(directory, shard))
            if absent:
                raise ConversionError(
                    f"{os.path.join(directory, INDEX_FILE)} puts {len(absent)} tensors in shards that do not hold "
                    f"them: " + ", ".join(f"{k} (in {index[k]})" for k in absent[:10])
                    + (" ..." if len(absent) > 10 else "") + "; the shards are incomplete or from another checkpoint"
                )

    def __getitem__(self, key: str) -> np.ndarray:
        path = self._file_of[key]
        try:
            if self._dtypes[key] == "BF16":  # numpy has no bfloat16: read through jax, keep fp32
                with safe_open(path, framework="flax") as f:
                    return np.asarray(f.get_tensor(key), np.float32)
            with safe_open(path, framework="np") as f:
                return f.get_tensor(key)
        except Exception as e:
            raise ConversionError(f"cannot read tensor {key} from {path}: {type(e).__name__}: {e}") from e

    def __iter__(self) -> Iterator[str]:
        return iter(self._file_of)

    def __len__(self) -> int:
        return len(self._file_of)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._shapes[key]

    def dtype(self, key: str) -> str:
        return self._dtypes[key]

    def file_of(self, key: str) -> str:
        return self._file_of[key]


def tensor_location(state_dict: Mapping[str, Any], key: str) -> str:
    """Where a tensor is, for error messages: its file for a checkpoint on disk, nothing for an
    in-memory state dict."""
    return f" in {state_dict.file_of(key)}" if isinstance(state_dict, SafetensorsCheckpoint) else ""


def tensor_dtype(state_dict: Mapping[str, Any], key: str) -> str:
    """The safetensors dtype code of a tensor (F32, BF16, I64...), read without loading it."""
    if isinstance(state_dict, SafetensorsCheckpoint):
        return state_dict.dtype(key)
    value = state_dict[key]
    name = str(getattr(value, "dtype", np.asarray(value).dtype)).removeprefix("torch.")
    return _NUMPY_DTYPE_CODES.get(name, name)


def tensor_shape(state_dict: Mapping[str, Any], key: str) -> tuple[int, ...]:
    """The shape of a tensor, read without loading it."""
    if isinstance(state_dict, SafetensorsCheckpoint):
        return state_dict.shape(key)
    return tuple(np.shape(state_dict[key]))


def safetensors_files(directory: str) -> tuple[list[str], dict[str, str] | None]:
    """The weight files of a checkpoint directory and, when sharded, its index's weight_map.
    A shard the index names but the directory lacks is reported with the tensors it holds."""
    index = os.path.join(directory, INDEX_FILE)
    if os.path.exists(index):  # sharded checkpoint
        try:
            with open(index) as f:
                weight_map = dict(json.load(f)["weight_map"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ConversionError(f"cannot read the shard index {index}: {type(e).__name__}: {e}") from e
        shards = sorted(set(weight_map.values()))
        missing = [s for s in shards if not os.path.isfile(os.path.join(directory, s))]
        if missing:
            lines = []
            for shard in missing:
                held = sorted(k for k, v in weight_map.items() if v == shard)
                lines.append(f"{os.path.join(directory, shard)} (holds {len(held)} tensors: "
                             + ", ".join(held[:5]) + (", ..." if len(held) > 5 else "") + ")")
            raise ConversionError(
                f"{index} names {len(shards)} shards but {len(missing)} of them are missing:\n  "
                + "\n  ".join(lines) + "\nDownload or copy the checkpoint again."
            )
        return [os.path.join(directory, s) for s in shards], weight_map
    files = sorted(glob.glob(os.path.join(directory, "*.safetensors")))
    if not files:
        raise ConversionError(f"no .safetensors files in {directory}")
    return files, None


def resolve_checkpoint_dir(path_or_hub_id: str) -> str:
    """A local checkpoint directory as given, or a Hub id downloaded (weights and configs only)."""
    if os.path.isdir(path_or_hub_id):
        return path_or_hub_id
    try:
        from huggingface_hub import snapshot_download
    except ImportError as e:
        raise ConversionError(f"{path_or_hub_id!r} is not a directory and huggingface_hub is not installed") from e
    return snapshot_download(path_or_hub_id, allow_patterns=["*.json", "*.safetensors"])
