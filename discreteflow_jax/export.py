"""Self-describing exports of trained models: one directory that ``discreteflow_jax.load`` reads
without the original config file or workdir.

    python -m discreteflow_jax.export --workdir=runs/baseline --out=exports/baseline

Layout of an export directory:

* ``config.json`` — ``format_version``, ``kind`` (tokenflow | gumbel | llama), ``architecture``
  (the model config fields), ``tokenizer`` (name, vocabulary size, files shipped), the full
  ``training_config``, the checkpoint ``step``, ``package_version`` and ``git_hash``.
  For a LLaMA teacher this file is also a Hugging Face ``LlamaForCausalLM`` config (our fields
  are extra keys, which transformers ignores).
* ``model.safetensors`` — fp32 parameters under flat dotted names (``blocks.0.attn.q_proj.kernel``);
  for a LLaMA teacher the Hugging Face names written by ``convert.export_llama_to_hf``.
* ``<tokenizer>_tokenizer/...`` — the tokenizer files when they were found locally, in the data-folder
  layout ``load_tokenizer`` reads (``llama_tokenizer/tokenizer.model``, ``gpt2_tokenizer/vocab.json`` +
  ``merges.txt``); a LLaMA teacher also carries ``tokenizer.model`` at the top for transformers.

``FORMAT_VERSION`` changes whenever the layout or a field's meaning changes; older versions are
migrated in ``MIGRATIONS`` (one function per version step), newer ones are refused with a message.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

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


def flatten_params(params: Any) -> dict[str, np.ndarray]:
    """Pure-dict parameters -> {"blocks.0.attn.q_proj.kernel": fp32 array}."""
    flat = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        name = ".".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
        flat[name] = np.ascontiguousarray(np.asarray(jax.device_get(leaf), np.float32))
    return flat


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

    def fill(path, leaf):
        name = ".".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
        return jnp.asarray(flat[name], dtype=leaf.dtype)

    return jax.tree_util.tree_map_with_path(fill, abstract_params)


def flatten_names(abstract_params: Any) -> dict[str, tuple[int, ...]]:
    return {
        ".".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path): tuple(leaf.shape)
        for path, leaf in jax.tree_util.tree_flatten_with_path(abstract_params)[0]
    }


# ---------------------------------------------------------------------------------------------
# Writing


def _copy_tokenizer(name: str, data_dir: str | None, out_dir: str) -> list[str]:
    """Copies the tokenizer's files (wherever the tokenizer loads from: a data folder, a workdir's
    copy, the Hub cache); returns the paths written (relative), or none when they cannot be found."""
    from discreteflow_jax.data.tokenizers import DataError, copy_tokenizer_files

    try:
        return copy_tokenizer_files(name, data_dir, out_dir)
    except DataError:
        return []  # ship all of a tokenizer's files or none (a half tokenizer is worse)


def _meta(kind: str, architecture: dict, cfg: Any, step: int | None, tokenizer: Any, files: list[str]) -> dict:
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


def export_model(model: Any, out_dir: str, data_dir: str | None = None) -> str:
    """Writes a loaded model (``discreteflow_jax.load(...)``) to ``out_dir``; returns out_dir."""
    from safetensors.numpy import save_file

    from discreteflow_jax.inference.api import TeacherModel, TokenFlowModel

    os.makedirs(out_dir, exist_ok=True)
    from discreteflow_jax.inference.api import tokenizer_folder

    cfg = model.config
    files = _copy_tokenizer(cfg.data.tokenizer, tokenizer_folder(cfg, data_dir, model.source), out_dir)
    if isinstance(model, TeacherModel):
        from discreteflow_jax.io.hf import export_llama_to_hf

        module = model.module
        top_tokenizer = os.path.join(out_dir, files[0]) if files and cfg.data.tokenizer == "llama" else None
        export_llama_to_hf(module, module.config, out_dir, tokenizer_path=top_tokenizer)
        config_path = os.path.join(out_dir, CONFIG_FILE)
        with open(config_path) as f:
            hf_config = json.load(f)
        meta = _meta("llama", dataclasses.asdict(module.config), cfg, model.step, model.tokenizer, files)
        clash = sorted(set(hf_config) & set(meta))
        if clash:  # our fields must never overwrite what transformers reads
            raise AssertionError(f"export fields clash with the Hugging Face config: {clash}")
        _write_json(config_path, {**hf_config, **meta})
        return out_dir
    if not isinstance(model, TokenFlowModel):
        raise TypeError(f"cannot export {type(model).__name__}")
    weights = os.path.join(out_dir, WEIGHTS_FILE)
    save_file(flatten_params(model.params), weights, metadata={"format": "np"})
    os.chmod(weights, 0o644)  # safetensors creates it owner-only; an export is meant to be shared
    from discreteflow_jax.inference.api import model_config

    meta = _meta(model.kind, dataclasses.asdict(model_config(cfg)), cfg, model.step, model.tokenizer, files)
    _write_json(os.path.join(out_dir, CONFIG_FILE), meta)
    return out_dir


def export_workdir(workdir: str, out_dir: str, data_dir: str | None = None, step: int | None = None) -> str:
    """Exports a workdir's newest checkpoint (or ``step``)."""
    from discreteflow_jax.inference.api import load

    return export_model(load(workdir, data_dir, step=step), out_dir, data_dir)


def _write_json(path: str, obj: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------
# Reading


def read_export_config(path: str) -> dict:
    """config.json of an export, migrated to FORMAT_VERSION; clear errors for other formats."""
    with open(os.path.join(path, CONFIG_FILE)) as f:
        meta = json.load(f)
    version = meta.get("format_version")
    if not isinstance(version, int):
        hint = " (it looks like a plain Hugging Face checkpoint: use convert.load_hf_checkpoint)" \
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


def _export_tokenizer(meta: dict, path: str, data_dir: str | None) -> Any:
    from discreteflow_jax.data.tokenizers import load_tokenizer

    name = meta["tokenizer"]["name"]
    # Shipped files first (the export is self-contained); else the caller's data folder.
    shipped = meta["tokenizer"].get("files") and all(os.path.isfile(os.path.join(path, f))
                                                      for f in meta["tokenizer"]["files"])
    return load_tokenizer(name, path if shipped else data_dir)


def load_export(path: str, data_dir: str | None = None) -> Any:
    """Loads an export directory (see the module docstring) as a TokenFlowModel or TeacherModel."""
    from safetensors.numpy import load_file

    from discreteflow_jax.inference.api import TeacherModel, TokenFlowModel, _config_from_raw, abstract_tokenflow

    meta = read_export_config(path)
    cfg = _config_from_raw(meta["training_config"])
    tokenizer = _export_tokenizer(meta, path, data_dir)
    if meta["kind"] == "llama":
        from discreteflow_jax.io.hf import load_hf_checkpoint

        module, _ = load_hf_checkpoint(path, dtype=cfg.model.dtype)
        return TeacherModel(cfg, module, tokenizer, path, meta.get("step"))
    graphdef, abstract_params = abstract_tokenflow(cfg)
    weights = os.path.join(path, WEIGHTS_FILE)
    try:
        flat = load_file(weights)
    except Exception as e:  # truncated or overwritten file: safetensors' own error, with the file named
        raise ExportFormatError(f"cannot read {weights}: {type(e).__name__}: {e}; export the workdir again") from e
    params = unflatten_params(flat, abstract_params, weights)
    return TokenFlowModel(cfg, graphdef, params, tokenizer, path, meta.get("step"))


# ---------------------------------------------------------------------------------------------
# CLI


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description="Export a trained workdir to a self-describing directory.")
    parser.add_argument("--workdir", required=True,
                        help="training workdir (its newest checkpoint that loads is exported)")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest that loads)")
    parser.add_argument("--data_dir", default=None, help="data folder holding the tokenizer files to ship")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", force=True)
    logging.getLogger("absl").setLevel(logging.WARNING)
    from discreteflow_jax.training.experiment import USER_ERRORS

    try:
        out = export_workdir(args.workdir, args.out, args.data_dir, args.step)
    except (ValueError, OSError, *USER_ERRORS) as err:  # unreadable workdirs, unwritable --out: a message
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"exported {args.workdir} to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
