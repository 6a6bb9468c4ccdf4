"""The export directory format: what ``python -m discreteflow_jax.export`` writes and
``discreteflow_jax.load`` reads, without the original config file or workdir.

* ``config.json`` — ``format_version``, ``kind`` (tokenflow | gumbel | llama), ``architecture``
  (the model config fields), ``tokenizer`` (name, vocabulary size, special ids, files shipped),
  the full ``training_config``, the checkpoint ``step``, ``package_version`` and ``git_hash``.
  For a LLaMA teacher this file is also a Hugging Face ``LlamaForCausalLM`` config (our fields
  are extra keys, which transformers ignores).
* ``model.safetensors`` — fp32 parameters under flat dotted names (``blocks.0.attn.q_proj.kernel``);
  for a LLaMA teacher the Hugging Face names written by ``io.hf.export_llama_to_hf``.
* ``<tokenizer>_tokenizer/...`` — the tokenizer files when they were found locally, in the data-folder
  layout ``load_tokenizer`` reads; a LLaMA teacher also carries ``tokenizer.model`` at the top.

``FORMAT_VERSION`` changes whenever the layout or a field's meaning changes; older versions are
migrated in ``MIGRATIONS`` (one function per version step), newer ones are refused with a message.
Reading and writing files only: building models from them is ``discreteflow_jax.inference``'s job.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from discreteflow_jax.data.tokenizers import DataError, Tokenizer, copy_tokenizer_files, load_tokenizer
from discreteflow_jax.io.hf import export_llama_to_hf

FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
REQUIRED_FILES = (CONFIG_FILE, WEIGHTS_FILE)
KINDS = ("tokenflow", "gumbel", "llama")

# format_version v -> function turning a v config.json into a v+1 one. Empty while only v1 exists.
MIGRATIONS: dict[int, Callable[[dict], dict]] = {}


class ExportFormatError(ValueError):
    """An export directory written in a format this version cannot read."""


def package_version() -> str:
    try:
        from importlib.metadata import version

        return version("discreteflow_jax")
    except Exception:  # not installed (running from a source tree)
        return "unknown"


def git_hash() -> str | None:
    """The commit of the source tree this package is imported from (None outside a git checkout)."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


# ---------------------------------------------------------------------------------------------
# Flat parameter names


def _dotted(path: Any) -> str:
    return ".".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def flatten_params(params: Any) -> dict[str, np.ndarray]:
    """Pure-dict parameters -> {"blocks.0.attn.q_proj.kernel": fp32 array}."""
    return {_dotted(path): np.ascontiguousarray(np.asarray(jax.device_get(leaf), np.float32))
            for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}


def flatten_names(abstract_params: Any) -> dict[str, tuple[int, ...]]:
    """{flat name: shape} of a (possibly abstract) pure-dict parameter tree."""
    return {_dotted(path): tuple(leaf.shape) for path, leaf in jax.tree_util.tree_flatten_with_path(abstract_params)[0]}


def unflatten_params(flat: dict[str, np.ndarray], abstract_params: Any, source: str) -> Any:
    """Fills the abstract pure-dict tree from flat names; lists every missing, unexpected or
    mis-shaped name before building anything."""
    expected = flatten_names(abstract_params)
    missing = sorted(set(expected) - set(flat))
    unexpected = sorted(set(flat) - set(expected))
    wrong = [f"{n}: file has {tuple(flat[n].shape)}, model needs {expected[n]}"
             for n in sorted(set(expected) & set(flat)) if tuple(flat[n].shape) != expected[n]]
    wrong_dtype = [f"{n}: file has dtype {flat[n].dtype}, model needs floating point"
                   for n in sorted(set(expected) & set(flat)) if not np.issubdtype(flat[n].dtype, np.floating)]
    problems = []
    if missing:
        problems.append(f"missing parameters: {missing}")
    if unexpected:
        problems.append(f"unexpected parameters: {unexpected}")
    if wrong:
        problems.append("shape mismatches:\n  " + "\n  ".join(wrong))
    if wrong_dtype:
        problems.append("wrong dtypes:\n  " + "\n  ".join(wrong_dtype))
    if problems:
        raise ExportFormatError(f"{source} does not fit the model its config.json describes:\n" + "\n".join(problems))
    return jax.tree_util.tree_map_with_path(lambda path, leaf: jnp.asarray(flat[_dotted(path)], dtype=leaf.dtype),
                                            abstract_params)


# ---------------------------------------------------------------------------------------------
# Writing


def copy_tokenizer(name: str, data_dir: str | None, out_dir: str) -> list[str]:
    """Copies the tokenizer's files (wherever the tokenizer loads from: a data folder, a workdir's
    copy, the Hub cache); returns the paths written (relative), or none when they cannot be found."""
    try:
        return copy_tokenizer_files(name, data_dir, out_dir)
    except DataError:
        return []  # ship all of a tokenizer's files or none (a half tokenizer is worse)


def export_meta(kind: str, architecture: dict, cfg: Any, step: int | None, tokenizer: Tokenizer,
                files: list[str]) -> dict:
    """The fields of ``config.json`` for a model of ``kind`` trained with the ExperimentConfig ``cfg``."""
    if kind not in KINDS:
        raise ValueError(f"unknown export kind {kind!r}; known: {', '.join(KINDS)}")
    return {
        "format_version": FORMAT_VERSION,
        "library": "discreteflow_jax",
        "kind": kind,
        "architecture": architecture,
        "tokenizer": {"name": cfg.data.tokenizer, "vocab_size": tokenizer.vocab_size, "bos_id": tokenizer.bos_id,
                      "eos_id": tokenizer.eos_id, "pad_id": tokenizer.pad_id, "files": files},
        "training_config": cfg.raw,
        "step": step,
        "package_version": package_version(),
        "git_hash": git_hash(),
    }


def write_json(path: str, obj: dict) -> None:
    """Writes ``obj`` atomically (a reader never sees half a file)."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


def write_flat_export(out_dir: str, params: Any, meta: dict) -> str:
    """``model.safetensors`` (flat fp32 names) and ``config.json`` of a TokenFlow model."""
    from safetensors.numpy import save_file

    os.makedirs(out_dir, exist_ok=True)
    weights = os.path.join(out_dir, WEIGHTS_FILE)
    save_file(flatten_params(params), weights, metadata={"format": "np"})
    os.chmod(weights, 0o644)  # safetensors creates it owner-only; an export is meant to be shared
    write_json(os.path.join(out_dir, CONFIG_FILE), meta)
    return out_dir


def write_llama_export(out_dir: str, module: Any, meta: dict, tokenizer_model: str | None = None) -> str:
    """A Hugging Face LLaMA directory whose ``config.json`` also carries our fields."""

    export_llama_to_hf(module, module.config, out_dir, tokenizer_path=tokenizer_model)
    config_path = os.path.join(out_dir, CONFIG_FILE)
    with open(config_path) as f:
        hf_config = json.load(f)
    clash = sorted(set(hf_config) & set(meta))
    if clash:  # our fields must never overwrite what transformers reads
        raise AssertionError(f"export fields clash with the Hugging Face config: {clash}")
    write_json(config_path, {**hf_config, **meta})
    return out_dir


# ---------------------------------------------------------------------------------------------
# Reading


def missing_files(path: str) -> list[str]:
    """The files an export needs that ``path`` lacks (empty for an export directory)."""
    return [f for f in REQUIRED_FILES if not os.path.exists(os.path.join(path, f))]


def is_export(path: str) -> bool:
    """True when ``path`` holds a config.json of ours (it has a ``format_version``)."""
    config = os.path.join(path, CONFIG_FILE)
    if not os.path.isfile(config):
        return False
    try:
        with open(config) as f:
            return "format_version" in json.load(f)
    except (OSError, ValueError):
        return False


def read_export_config(path: str) -> dict:
    """config.json of an export, migrated to FORMAT_VERSION; clear errors for other formats."""
    with open(os.path.join(path, CONFIG_FILE)) as f:
        meta = json.load(f)
    version = meta.get("format_version")
    if not isinstance(version, int):
        hint = " (it looks like a plain Hugging Face checkpoint: use io.hf.load_hf_checkpoint)" \
            if "model_type" in meta else ""
        raise ExportFormatError(f"{path}/{CONFIG_FILE} has no format_version: not a discreteflow_jax export{hint}")
    if version > FORMAT_VERSION:
        raise ExportFormatError(
            f"{path} was exported in format {version}, newer than this discreteflow_jax "
            f"({package_version()}) reads (format {FORMAT_VERSION}); upgrade discreteflow_jax to load it"
        )
    while version < FORMAT_VERSION:
        if version not in MIGRATIONS:
            raise ExportFormatError(
                f"{path} was exported in format {version}, which this version cannot migrate "
                f"(it reads format {FORMAT_VERSION}); re-export it from its workdir"
            )
        meta = MIGRATIONS[version](meta)
        version = meta["format_version"]
    if meta.get("kind") not in KINDS:
        raise ExportFormatError(f"{path}/{CONFIG_FILE}: unknown kind {meta.get('kind')!r}; known: {', '.join(KINDS)}")
    return meta


def read_tokenizer(meta: dict, path: str, data_dir: str | None) -> Tokenizer:
    """The export's tokenizer: its shipped files when all are there, else from ``data_dir``."""
    name = meta["tokenizer"]["name"]
    files = meta["tokenizer"].get("files")
    shipped = files and all(os.path.isfile(os.path.join(path, f)) for f in files)
    return load_tokenizer(name, path if shipped else data_dir)


def read_flat_params(path: str) -> dict[str, np.ndarray]:
    """The flat parameters of a TokenFlow export; ExportFormatError naming the file when it does
    not read (truncated or overwritten)."""
    from safetensors.numpy import load_file

    weights = os.path.join(path, WEIGHTS_FILE)
    try:
        return load_file(weights)
    except Exception as e:  # safetensors' own error, with the file named
        raise ExportFormatError(f"cannot read {weights}: {type(e).__name__}: {e}; export the workdir again") from e
