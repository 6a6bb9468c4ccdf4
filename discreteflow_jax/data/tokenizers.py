"""Tokenizers (LLaMA SentencePiece and GPT-2 byte-level BPE), data-folder resolution, and what the
datasets share (``check_process``, ``TokenDataset``).

Files are looked up in an offline *data folder* first (config field ``data.data_dir`` or, when that is
empty, the env var ``DISCRETEFLOW_DATA_DIR``), with this layout::

    llama_tokenizer/tokenizer.model
    gpt2_tokenizer/vocab.json
    gpt2_tokenizer/merges.txt
    tiny_shakespeare/input.txt

When a file is not there, it is fetched from its online source. Any failure ends in a ``DataError`` that
names the missing file, the folder searched, how to point at a data folder and the online source that failed.
"""

from __future__ import annotations

import abc
import logging
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

DATA_DIR_ENV = "DISCRETEFLOW_DATA_DIR"
DATA_DIR_CONFIG_FIELD = "data.data_dir"
CACHE_DIR_ENV = "DISCRETEFLOW_CACHE_DIR"

LLAMA_HUB_REPO = "huggyllama/llama-7b"
GPT2_HUB_REPO = "gpt2"
TOKENIZER_NAMES = ("llama", "gpt2")


class DataError(ValueError):
    """A dataset or tokenizer could not be loaded or used as requested."""


def resolve_data_dir(data_dir: str | None) -> str | None:
    """Returns the data folder: ``data_dir`` if non-empty, else ``$DISCRETEFLOW_DATA_DIR`` if non-empty, else None.

    The folder is not required to exist; callers fall back to the online source for any file missing in it.
    """
    for candidate in (data_dir, os.environ.get(DATA_DIR_ENV)):
        if candidate is not None and str(candidate).strip():
            return os.path.expanduser(str(candidate).strip())
    return None


def default_cache_dir() -> str:
    """Folder for downloads and token caches: ``$DISCRETEFLOW_CACHE_DIR`` or ``~/.cache/discreteflow_jax``."""
    override = os.environ.get(CACHE_DIR_ENV)
    if override and override.strip():
        return os.path.expanduser(override.strip())
    return os.path.join(os.path.expanduser("~"), ".cache", "discreteflow_jax")


def describe_data_dir(data_dir: str | None) -> str:
    """A human-readable description of where a data file was looked for (used in error messages)."""
    if data_dir is None:
        return f"no data folder configured (config field {DATA_DIR_CONFIG_FIELD} and env var {DATA_DIR_ENV} are unset)"
    if not os.path.isdir(data_dir):
        return f"data folder {data_dir!r} does not exist"
    return f"data folder {data_dir!r}"


def missing_file_error(relpath: str, data_dir: str | None, online_source: str, cause: BaseException) -> DataError:
    """Builds the DataError raised when a file is neither in the data folder nor fetchable online."""
    return DataError(
        f"Could not find {relpath!r}: {describe_data_dir(data_dir)} has no such file, and the online source "
        f"{online_source} failed ({type(cause).__name__}: {cause}). Put the file at <data folder>/{relpath} and "
        f"set the config field {DATA_DIR_CONFIG_FIELD} or the env var {DATA_DIR_ENV} to that folder."
    )


def check_process(process_index: int, process_count: int) -> None:
    """Raises DataError unless ``0 <= process_index < process_count``."""
    if process_count <= 0 or not 0 <= process_index < process_count:
        raise DataError(f"need 0 <= process_index < process_count, got {process_index} and {process_count}")


class TokenDataset:
    """Base of the datasets: checks and keeps the arguments every one takes. Rows are ``seq_len``
    tokens from ``tokenizer``; this process reads shard ``process_index`` of ``process_count``,
    in an order drawn from ``seed``. The train loop uses ``train_batch(step, batch_size)``,
    ``val_batches(batch_size, num_batches)``, ``state()`` and ``restore(state)``."""

    def __init__(self, seq_len: int, tokenizer: Tokenizer, seed: int, process_index: int, process_count: int) -> None:
        if seq_len <= 0:
            raise DataError(f"seq_len must be positive, got {seq_len}")
        check_process(process_index, process_count)
        self.seq_len = int(seq_len)
        self.tokenizer = tokenizer
        self.seed = int(seed)
        self.process_index = int(process_index)
        self.process_count = int(process_count)


def _local_file(data_dir: str | None, relpath: str) -> str | None:
    if data_dir is None:
        return None
    path = os.path.join(data_dir, relpath)
    return path if os.path.isfile(path) else None


def _hf_download(repo_id: str, filename: str) -> str:
    """Downloads one file from the Hugging Face Hub (module-level so tests can replace it)."""
    from huggingface_hub import hf_hub_download

    return hf_hub_download(repo_id=repo_id, filename=filename)


def _resolve_file(data_dir: str | None, relpath: str, repo_id: str, filename: str) -> str:
    """Path of ``relpath`` in the data folder, or of the same file downloaded from the Hub."""
    local = _local_file(data_dir, relpath)
    if local is not None:
        return local
    logger.info("%s not in %s; downloading %s from the Hub repo %s", relpath, data_dir, filename, repo_id)
    try:
        return _hf_download(repo_id, filename)
    except Exception as e:  # any network/auth/IO failure gets the same actionable message
        raise missing_file_error(relpath, data_dir, f"Hugging Face Hub repo {repo_id!r} (file {filename!r})", e) from e


def _as_id_list(ids: Any) -> list[int]:
    """Accepts lists, tuples, numpy or JAX arrays (any integer dtype) and returns plain Python ints."""
    arr = np.asarray(ids)
    if arr.ndim != 1:
        raise DataError(f"decode expects a 1-D sequence of token ids, got shape {arr.shape}")
    return [int(i) for i in arr.tolist()]


class Tokenizer(abc.ABC):
    """Common interface of the tokenizers. ``encode`` never adds BOS/EOS; ``decode`` drops no ids itself."""

    name: str
    vocab_size: int
    bos_id: int
    eos_id: int
    pad_id: int

    @abc.abstractmethod
    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` without BOS/EOS."""

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of several texts (subclasses use their library's faster batch path)."""
        return [self.encode(t) for t in texts]

    @abc.abstractmethod
    def decode(self, ids: Any) -> str:
        """Text of ``ids`` (list or array); the caller truncates at EOS if it wants to."""

    def decode_until_eos(self, ids: Any, skip_leading_bos: bool = False) -> str:
        """Text of ``ids`` up to (excluding) the first EOS.

        With ``skip_leading_bos`` a BOS at position 0 is dropped first; this matters for GPT-2, where BOS and
        EOS are the same id and a BOS-prefixed sequence would otherwise decode to the empty string.
        """
        id_list = _as_id_list(ids)
        if skip_leading_bos and id_list and id_list[0] == self.bos_id:
            id_list = id_list[1:]
        if self.eos_id in id_list:
            id_list = id_list[: id_list.index(self.eos_id)]
        return self.decode(id_list)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(name={self.name!r}, vocab_size={self.vocab_size}, bos_id={self.bos_id}, "
            f"eos_id={self.eos_id}, pad_id={self.pad_id})"
        )


class SentencePieceTokenizer(Tokenizer):
    """The LLaMA SentencePiece tokenizer (32000 pieces, BOS 1, EOS 2; no pad, so EOS doubles as pad)."""

    def __init__(self, model_file: str, name: str = "llama") -> None:
        import sentencepiece as spm

        self._sp = spm.SentencePieceProcessor(model_file=model_file)
        self.name = name
        self.vocab_size = int(self._sp.vocab_size())
        self.bos_id = int(self._sp.bos_id())
        self.eos_id = int(self._sp.eos_id())
        pad = int(self._sp.pad_id())
        # SentencePiece reports a missing pad piece as -1, which is not a valid embedding index.
        self.pad_id = pad if pad >= 0 else self.eos_id

    def encode(self, text: str) -> list[int]:
        return list(self._sp.encode(text))

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [list(x) for x in self._sp.encode(list(texts))]

    def decode(self, ids: Any) -> str:
        return self._sp.decode(_as_id_list(ids))


class GPT2BPETokenizer(Tokenizer):
    """The GPT-2 byte-level BPE (50257 tokens); ``<|endoftext|>`` (50256) is EOS, BOS and pad.

    ``<|endoftext|>`` is deliberately not registered as a special token, so document text that happens to
    contain that string is encoded as ordinary characters and cannot fake a document boundary.
    """

    def __init__(self, vocab_file: str, merges_file: str, name: str = "gpt2") -> None:
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models, pre_tokenizers

        tok = HFTokenizer(models.BPE.from_file(vocab_file, merges_file))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        self._tok = tok
        self.name = name
        self.vocab_size = int(tok.get_vocab_size())
        eos = tok.token_to_id("<|endoftext|>")
        if eos is None:
            raise DataError(f"GPT-2 vocabulary {vocab_file!r} has no '<|endoftext|>' token")
        self.eos_id = int(eos)
        self.bos_id = self.eos_id
        self.pad_id = self.eos_id

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text).ids)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [list(e.ids) for e in self._tok.encode_batch(list(texts))]

    def decode(self, ids: Any) -> str:
        return self._tok.decode(_as_id_list(ids), skip_special_tokens=False)


# Each tokenizer's files: path inside a data folder -> (Hub repo, file name) of its online source.
TOKENIZER_FILES: dict[str, dict[str, tuple[str, str]]] = {
    "llama": {"llama_tokenizer/tokenizer.model": (LLAMA_HUB_REPO, "tokenizer.model")},
    "gpt2": {"gpt2_tokenizer/vocab.json": (GPT2_HUB_REPO, "vocab.json"),
             "gpt2_tokenizer/merges.txt": (GPT2_HUB_REPO, "merges.txt")},
}


# A workdir keeps a copy of its tokenizer's files in this folder (data-folder layout), written when
# training starts, so loading the workdir needs no data folder.
WORKDIR_TOKENIZER = "tokenizer"


def tokenizer_files(name: str, data_dir: str | None = None) -> dict[str, str]:
    """{path inside a data folder: where that file is here} for the files ``load_tokenizer`` reads
    (from the data folder, else the Hub cache); copying them under those paths makes a folder that
    loads the same tokenizer offline."""
    key = str(name).strip().lower()
    if key not in TOKENIZER_FILES:
        raise DataError(f"Unknown tokenizer {name!r}; valid names: {', '.join(TOKENIZER_NAMES)}")
    folder = resolve_data_dir(data_dir)
    return {rel: _resolve_file(folder, rel, repo, filename) for rel, (repo, filename) in TOKENIZER_FILES[key].items()}


def has_tokenizer_files(name: str, folder: str) -> bool:
    """True when ``folder`` holds every file of the tokenizer (a data folder, a workdir's copy, an export)."""
    files = TOKENIZER_FILES.get(str(name).strip().lower(), {})
    return bool(files) and all(os.path.isfile(os.path.join(folder, rel)) for rel in files)


def copy_tokenizer_files(name: str, data_dir: str | None, out_dir: str) -> list[str]:
    """Copies the tokenizer's files into ``out_dir`` (data-folder layout); returns the paths written.
    ``out_dir`` may be a remote folder (gs://...), written through etils.epath."""
    import shutil

    written = []
    for rel, src in tokenizer_files(name, data_dir).items():
        if _is_remote(out_dir):
            from etils import epath

            dst_path = epath.Path(out_dir) / rel
            dst_path.parent.mkdir(parents=True, exist_ok=True)
            with open(src, "rb") as f:
                dst_path.write_bytes(f.read())
            written.append(rel)
            continue
        dst = os.path.join(out_dir, rel)
        if os.path.abspath(src) == os.path.abspath(dst):
            written.append(rel)
            continue
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        # copyfile, not copy: a read-only source (a shared data folder) must not make the copy read-only.
        tmp = dst + ".tmp"
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
        written.append(rel)
    return written


def _is_remote(path: str) -> bool:
    return "://" in str(path)


def local_tokenizer_copy(name: str, folder: str, cache_root: str | None = None) -> str | None:
    """A local folder holding the tokenizer files of a remote ``folder`` (a gs:// workdir's copy or
    export), fetched once into a cache keyed by the folder; None when the folder lacks any of them.
    The tokenizer libraries read local files only."""
    import hashlib

    from etils import epath

    files = TOKENIZER_FILES.get(str(name).strip().lower(), {})
    remote = epath.Path(folder)
    if not files or not all((remote / rel).exists() for rel in files):
        return None
    root = cache_root or os.path.join(os.path.expanduser("~"), ".cache", "discreteflow_jax", "tokenizers")
    local = os.path.join(root, hashlib.sha256(str(folder).encode()).hexdigest()[:16])
    for rel in files:
        dst = os.path.join(local, rel)
        if os.path.isfile(dst):
            continue
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        tmp = f"{dst}.tmp{os.getpid()}"
        with open(tmp, "wb") as f:
            f.write((remote / rel).read_bytes())
        os.replace(tmp, dst)
    return local


def load_tokenizer(name: str, data_dir: str | None = None) -> Tokenizer:
    """Loads ``"llama"`` or ``"gpt2"`` from the data folder (see ``resolve_data_dir``), else from the Hub."""
    key = str(name).strip().lower()
    if key == "llama":
        (model,) = tokenizer_files(key, data_dir).values()
        return SentencePieceTokenizer(model, name="llama")
    if key == "gpt2":
        files = tokenizer_files(key, data_dir)
        return GPT2BPETokenizer(files["gpt2_tokenizer/vocab.json"], files["gpt2_tokenizer/merges.txt"], name="gpt2")
    raise DataError(f"Unknown tokenizer {name!r}; valid names: {', '.join(TOKENIZER_NAMES)}")
