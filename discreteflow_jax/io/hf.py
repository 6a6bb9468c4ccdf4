"""Hugging Face checkpoints <-> our Flax NNX teachers (GPT-2 and LLaMA).

Loads a checkpoint directory (or Hub id) into a model and writes a LLaMA back out for
``transformers``. The key and config tables are in ``hf_tables``, file reading in ``hf_files``;
the names most callers need are importable from here too.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors.numpy import save_file

from discreteflow_jax.io.hf_files import (
    FLOAT_DTYPES,
    ConversionError,
    SafetensorsCheckpoint,
    resolve_checkpoint_dir,
    safetensors_files,
    tensor_dtype,
    tensor_location,
    tensor_shape,
)
from discreteflow_jax.io.hf_tables import (
    Rule,
    TeacherConfig,
    config_from_hf,
    llama_config_to_hf,
    model_spec,
    normalize_key,
)
from discreteflow_jax.models.llama import Llama, LlamaConfig

__all__ = [
    "ConversionError",
    "SafetensorsCheckpoint",
    "TeacherConfig",
    "abstract_model",
    "config_from_hf",
    "export_llama_to_hf",
    "llama_config_to_hf",
    "load_hf_checkpoint",
    "model_from_hf",
    "params_from_hf",
    "params_to_hf",
    "safetensors_files",
]


def _path_str(path: tuple[Any, ...]) -> str:
    return ".".join(str(p) for p in path)


def abstract_model(config: TeacherConfig) -> nnx.Module:
    """The model with shape-only parameters (nothing is initialised or allocated)."""
    cls, _, _ = model_spec(config)
    return nnx.eval_shape(lambda: cls(config, rngs=nnx.Rngs(0)))


def params_from_hf(state_dict: Mapping[str, np.ndarray], config: TeacherConfig) -> nnx.State:
    """Converts a Hugging Face state dict (numpy arrays, read lazily if the mapping is lazy) into
    the model's ``nnx.State``. Raises ``ConversionError`` listing every missing, unexpected or
    mis-shaped key before converting anything."""
    _, rules, ignored = model_spec(config)
    _, abstract_state = nnx.split(abstract_model(config))
    variables = {_path_str(p): v for p, v in nnx.to_flat_state(abstract_state)}
    covered = {p for r in rules for p in r.ours}
    if covered != set(variables):  # the table must describe the module exactly
        raise AssertionError(f"conversion table out of date: {sorted(covered ^ set(variables))}")

    keys = {normalize_key(k, config): k for k in state_dict}
    wanted = {r.hf for r in rules}
    missing = sorted(wanted - set(keys))
    unexpected = sorted(k for k in keys if k not in wanted and not any(re.fullmatch(p, k) for p in ignored))
    mismatched, wrong_dtype = [], []
    for rule in rules:
        if rule.hf not in keys:
            continue
        expected = _expected_hf_shape(rule, variables)
        got = tensor_shape(state_dict, keys[rule.hf])
        where = tensor_location(state_dict, keys[rule.hf])
        if got != expected:
            ours = ", ".join(f"{p} {tuple(variables[p].value.shape)}" for p in rule.ours)
            mismatched.append(f"{rule.hf}{where}: checkpoint shape {got}, expected {expected} (for {ours})")
        dtype = tensor_dtype(state_dict, keys[rule.hf])
        if dtype not in FLOAT_DTYPES:
            wrong_dtype.append(f"{rule.hf}{where}: dtype {dtype}, expected a floating-point tensor")
    problems = []
    if missing:
        problems.append(f"missing keys: {missing}")
    if unexpected:
        problems.append(f"unexpected keys: {unexpected}")
    if mismatched:
        problems.append("shape mismatches:\n  " + "\n  ".join(mismatched))
    if wrong_dtype:
        problems.append("wrong dtypes:\n  " + "\n  ".join(wrong_dtype))
    if problems:
        raise ConversionError(f"checkpoint does not fit {type(config).__name__}:\n" + "\n".join(problems))

    flat = []
    for rule in rules:
        for path, array in zip(rule.ours, rule.to_ours(np.asarray(state_dict[keys[rule.hf]])), strict=True):
            variable = variables[path]
            value = jnp.asarray(array, dtype=variable.value.dtype)
            flat.append((tuple(int(s) if s.isdigit() else s for s in path.split(".")), variable.replace(value)))
    return nnx.from_flat_state(flat)


def model_from_hf(state_dict: Mapping[str, np.ndarray], config: TeacherConfig) -> nnx.Module:
    """Builds the model directly from a Hugging Face state dict (no random init)."""
    graphdef, _ = nnx.split(abstract_model(config))
    return nnx.merge(graphdef, params_from_hf(state_dict, config))


def params_to_hf(model: nnx.Module, config: TeacherConfig) -> dict[str, np.ndarray]:
    """Our parameters as a Hugging Face state dict (fp32 numpy, contiguous, tied head omitted)."""
    _, rules, _ = model_spec(config)
    flat = {_path_str(p): v for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    out = {}
    for rule in rules:
        arrays = [np.asarray(flat[p].value, dtype=np.float32) for p in rule.ours]
        out[rule.hf] = np.ascontiguousarray(rule.to_hf(*arrays))
    return out


def _expected_hf_shape(rule: Rule, variables: Mapping[str, nnx.Variable]) -> tuple[int, ...]:
    # Run the inverse transform on zero-stride placeholders: no memory, and the table stays the
    # single source of truth for shapes too.
    fakes = [np.broadcast_to(np.zeros((), np.float32), variables[p].value.shape) for p in rule.ours]
    return tuple(rule.to_hf(*fakes).shape)


def load_hf_checkpoint(path_or_hub_id: str, *, dtype: str = "float32") -> tuple[nnx.Module, TeacherConfig]:
    """Loads a Hugging Face GPT-2 or LLaMA checkpoint (a local directory with ``config.json`` and
    ``*.safetensors``, sharded or not, or a Hub id when online). ``dtype`` is the compute dtype;
    parameters are always fp32."""
    directory = resolve_checkpoint_dir(path_or_hub_id)
    with open(os.path.join(directory, "config.json")) as f:
        config = config_from_hf(json.load(f), dtype=dtype)
    files, index = safetensors_files(directory)
    return model_from_hf(SafetensorsCheckpoint(files, index), config), config


_LLAMA_TOKENIZER_CONFIG = {
    "tokenizer_class": "LlamaTokenizer",
    "add_bos_token": True,
    "add_eos_token": False,
    "bos_token": "<s>",
    "eos_token": "</s>",
    "unk_token": "<unk>",
}
_TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def export_llama_to_hf(model: Llama, config: LlamaConfig, out_dir: str, tokenizer_path: str | None = None) -> None:
    """Writes ``config.json`` + ``model.safetensors`` loadable by
    ``transformers.LlamaForCausalLM.from_pretrained(out_dir)``. ``tokenizer_path`` (a
    ``tokenizer.model`` file or a directory of tokenizer files) is copied alongside."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(llama_config_to_hf(config), f, indent=2)
    # transformers expects the "format" metadata that torch-saved files carry.
    save_file(params_to_hf(model, config), os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    if tokenizer_path is None:
        return
    if os.path.isdir(tokenizer_path):
        sources = [os.path.join(tokenizer_path, n) for n in _TOKENIZER_FILES]
        sources = [s for s in sources if os.path.exists(s)]
    else:
        sources = [tokenizer_path]
    for source in sources:
        shutil.copy(source, os.path.join(out_dir, os.path.basename(source)))
    config_path = os.path.join(out_dir, "tokenizer_config.json")
    if not os.path.exists(config_path):
        # A bare SentencePiece file loads as a generic tokenizer that adds no BOS; name the LLaMA
        # tokenizer class and its special tokens so AutoTokenizer encodes as the model was trained.
        with open(config_path, "w") as f:
            json.dump(_LLAMA_TOKENIZER_CONFIG, f, indent=2)
