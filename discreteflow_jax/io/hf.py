"""Hugging Face checkpoints <-> our Flax NNX teachers (GPT-2 and LLaMA).

The mapping is a declarative table of ``Rule``s: our parameter paths, one Hugging Face key, and a
pair of transforms (HF -> ours, ours -> HF). Facts the tables encode:

* LLaMA stores linear weights as torch ``[out, in]``; our kernels are ``[in, out]`` (transpose).
* GPT-2 uses ``Conv1D``, already ``[in, out]``, with q/k/v fused in ``c_attn`` (split in three).
* Tied heads have no ``lm_head.weight`` key; GPT-2 checkpoints saved by ``GPT2LMHeadModel`` prefix
  keys with ``transformer.``, the public ``gpt2`` repository does not; old checkpoints carry
  non-parameter buffers (``attn.bias``, ``attn.masked_bias``, ``rotary_emb.inv_freq``) that are skipped.

Checkpoints are read with ``safetensors`` (numpy framework, tensor by tensor), never with torch.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import re
import shutil
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

from discreteflow_jax.models.gpt2 import GPT2, GPT2Config
from discreteflow_jax.models.llama import Llama, LlamaConfig

TeacherConfig = LlamaConfig | GPT2Config


class ConversionError(ValueError):
    """A checkpoint does not fit the model: missing, unexpected or mis-shaped keys, or an
    architecture feature we do not implement."""


# ---------------------------------------------------------------------------------------------
# The tables


@dataclasses.dataclass(frozen=True)
class Rule:
    ours: tuple[str, ...]  # our parameter paths, "." joined
    hf: str  # one Hugging Face key
    to_ours: Callable[[np.ndarray], tuple[np.ndarray, ...]]
    to_hf: Callable[..., np.ndarray]


def _copy(ours: str, hf: str) -> Rule:
    return Rule((ours,), hf, lambda a: (a,), lambda a: a)


def _transpose(ours: str, hf: str) -> Rule:
    return Rule((ours,), hf, lambda a: (a.T,), lambda a: a.T)


def _split_qkv(ours_q: str, ours_k: str, ours_v: str, hf: str) -> Rule:
    # GPT-2's c_attn: weight [D, 3D] / bias [3D], q|k|v concatenated on the last axis.
    return Rule(
        (ours_q, ours_k, ours_v),
        hf,
        lambda a: tuple(np.split(a, 3, axis=-1)),
        lambda q, k, v: np.concatenate([q, k, v], axis=-1),
    )


_ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
_SWIGLU = ("gate_proj", "up_proj", "down_proj")


def llama_rules(config: LlamaConfig) -> list[Rule]:
    rules = [_copy("embed.embedding", "model.embed_tokens.weight"), _copy("final_norm.scale", "model.norm.weight")]
    for i in range(config.num_layers):
        ours, hf = f"layers.{i}", f"model.layers.{i}"
        rules += [
            _copy(f"{ours}.attn_norm.scale", f"{hf}.input_layernorm.weight"),
            _copy(f"{ours}.mlp_norm.scale", f"{hf}.post_attention_layernorm.weight"),
        ]
        rules += [_transpose(f"{ours}.attn.{p}.kernel", f"{hf}.self_attn.{p}.weight") for p in _ATTN]
        rules += [_transpose(f"{ours}.mlp.{p}.kernel", f"{hf}.mlp.{p}.weight") for p in _SWIGLU]
    if not config.tie_embeddings:
        rules.append(_transpose("lm_head.kernel", "lm_head.weight"))
    return rules


def gpt2_rules(config: GPT2Config) -> list[Rule]:
    rules = [
        _copy("wte.embedding", "wte.weight"),
        _copy("wpe.embedding", "wpe.weight"),
        _copy("ln_f.scale", "ln_f.weight"),
        _copy("ln_f.bias", "ln_f.bias"),
    ]
    for i in range(config.num_layers):
        ours, hf = f"layers.{i}", f"h.{i}"
        for ln in ("ln_1", "ln_2"):
            rules += [_copy(f"{ours}.{ln}.scale", f"{hf}.{ln}.weight"), _copy(f"{ours}.{ln}.bias", f"{hf}.{ln}.bias")]
        for kind in ("kernel", "bias"):
            suffix = "weight" if kind == "kernel" else "bias"
            q, k, v = (f"{ours}.attn.{p}_proj.{kind}" for p in "qkv")
            rules += [
                _split_qkv(q, k, v, f"{hf}.attn.c_attn.{suffix}"),
                _copy(f"{ours}.attn.o_proj.{kind}", f"{hf}.attn.c_proj.{suffix}"),
                _copy(f"{ours}.mlp.up_proj.{kind}", f"{hf}.mlp.c_fc.{suffix}"),
                _copy(f"{ours}.mlp.down_proj.{kind}", f"{hf}.mlp.c_proj.{suffix}"),
            ]
    return rules


# Keys that are not parameters (causal-mask buffers, RoPE tables) or are the tied head's copy.
_IGNORED_GPT2 = (r"h\.\d+\.attn\.(bias|masked_bias)", r"lm_head\.weight")
_IGNORED_LLAMA = (r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq",)


def _spec(config: TeacherConfig) -> tuple[type[nnx.Module], list[Rule], tuple[str, ...]]:
    if isinstance(config, LlamaConfig):
        ignored = _IGNORED_LLAMA + ((r"lm_head\.weight",) if config.tie_embeddings else ())
        return Llama, llama_rules(config), ignored
    if isinstance(config, GPT2Config):
        return GPT2, gpt2_rules(config), _IGNORED_GPT2
    raise TypeError(f"unsupported config type {type(config).__name__}")


def _normalize_key(key: str, config: TeacherConfig) -> str:
    if isinstance(config, GPT2Config) and key.startswith("transformer."):
        return key[len("transformer.") :]
    return key


# ---------------------------------------------------------------------------------------------
# Parameters <-> state dicts


def _path_str(path: tuple[Any, ...]) -> str:
    return ".".join(str(p) for p in path)


def abstract_model(config: TeacherConfig) -> nnx.Module:
    """The model with shape-only parameters (nothing is initialised or allocated)."""
    cls, _, _ = _spec(config)
    return nnx.eval_shape(lambda: cls(config, rngs=nnx.Rngs(0)))


def params_from_hf(state_dict: Mapping[str, np.ndarray], config: TeacherConfig) -> nnx.State:
    """Converts a Hugging Face state dict (numpy arrays, read lazily if the mapping is lazy) into
    the model's ``nnx.State``. Raises ``ConversionError`` listing every missing, unexpected or
    mis-shaped key before converting anything."""
    _, rules, ignored = _spec(config)
    _, abstract_state = nnx.split(abstract_model(config))
    variables = {_path_str(p): v for p, v in nnx.to_flat_state(abstract_state)}
    covered = {p for r in rules for p in r.ours}
    if covered != set(variables):  # the table must describe the module exactly
        raise AssertionError(f"conversion table out of date: {sorted(covered ^ set(variables))}")

    keys = {_normalize_key(k, config): k for k in state_dict}
    wanted = {r.hf for r in rules}
    missing = sorted(wanted - set(keys))
    unexpected = sorted(k for k in keys if k not in wanted and not any(re.fullmatch(p, k) for p in ignored))
    mismatched, wrong_dtype = [], []
    for rule in rules:
        if rule.hf not in keys:
            continue
        expected = _expected_hf_shape(rule, variables)
        got = _shape_of(state_dict, keys[rule.hf])
        where = _where(state_dict, keys[rule.hf])
        if got != expected:
            ours = ", ".join(f"{p} {tuple(variables[p].value.shape)}" for p in rule.ours)
            mismatched.append(f"{rule.hf}{where}: checkpoint shape {got}, expected {expected} (for {ours})")
        dtype = _dtype_of(state_dict, keys[rule.hf])
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
    _, rules, _ = _spec(config)
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


def _where(state_dict: Mapping[str, Any], key: str) -> str:
    return f" in {state_dict.file_of(key)}" if isinstance(state_dict, SafetensorsCheckpoint) else ""


_NUMPY_DTYPE_CODES = {"float16": "F16", "float32": "F32", "float64": "F64", "bfloat16": "BF16"}


def _dtype_of(state_dict: Mapping[str, Any], key: str) -> str:
    """The safetensors dtype code of a tensor (F32, BF16, I64...), read without loading it."""
    if isinstance(state_dict, SafetensorsCheckpoint):
        return state_dict.dtype(key)
    value = state_dict[key]
    name = str(getattr(value, "dtype", np.asarray(value).dtype)).removeprefix("torch.")
    return _NUMPY_DTYPE_CODES.get(name, name)


def _shape_of(state_dict: Mapping[str, Any], key: str) -> tuple[int, ...]:
    if isinstance(state_dict, SafetensorsCheckpoint):
        return state_dict.shape(key)
    return tuple(np.shape(state_dict[key]))


# ---------------------------------------------------------------------------------------------
# Configs


def config_from_hf(hf_config: Mapping[str, Any], *, dtype: str = "float32") -> TeacherConfig:
    """Our config from a Hugging Face ``config.json`` dict; refuses features we do not implement."""
    model_type = hf_config.get("model_type")
    if model_type == "gpt2":
        return _gpt2_config(hf_config, dtype)
    if model_type == "llama":
        return _llama_config(hf_config, dtype)
    raise ConversionError(f"unsupported model_type {model_type!r} (supported: 'gpt2', 'llama')")


def _gpt2_config(c: Mapping[str, Any], dtype: str) -> GPT2Config:
    if c.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
        raise ConversionError(f"unsupported GPT-2 activation {c['activation_function']!r}")
    if c.get("scale_attn_by_inverse_layer_idx") or not c.get("scale_attn_weights", True):
        raise ConversionError("only standard 1/sqrt(head_dim) attention scaling is supported")
    if c.get("add_cross_attention"):
        raise ConversionError("GPT-2 with cross-attention is not supported")
    return GPT2Config(
        vocab_size=c["vocab_size"],
        dim=c["n_embd"],
        num_layers=c["n_layer"],
        num_heads=c["n_head"],
        max_len=c["n_positions"],
        ffn_hidden=c.get("n_inner"),
        layer_norm_eps=c.get("layer_norm_epsilon", 1e-5),
        dtype=dtype,
        init_std=c.get("initializer_range", 0.02),
        bos_id=c.get("bos_token_id"),
        eos_id=_first(c.get("eos_token_id")),
    )


def _llama_config(c: Mapping[str, Any], dtype: str) -> LlamaConfig:
    # transformers 5 keeps RoPE settings in rope_parameters; older files have top-level rope_theta.
    rope = c.get("rope_parameters") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default" or c.get("rope_scaling"):
        raise ConversionError(f"RoPE scaling {rope_type!r} / {c.get('rope_scaling')!r} is not supported")
    if c.get("attention_bias") or c.get("mlp_bias"):
        raise ConversionError("LLaMA with attention/MLP biases is not supported")
    if c.get("hidden_act", "silu") != "silu":
        raise ConversionError(f"unsupported LLaMA activation {c['hidden_act']!r}")
    head_dim = c.get("head_dim")
    if head_dim == c["hidden_size"] // c["num_attention_heads"]:
        head_dim = None  # the default; keeps configs of exported-then-reloaded models equal
    return LlamaConfig(
        vocab_size=c["vocab_size"],
        dim=c["hidden_size"],
        num_layers=c["num_hidden_layers"],
        num_heads=c["num_attention_heads"],
        num_kv_heads=c.get("num_key_value_heads"),
        head_dim=head_dim,
        ffn_hidden=c["intermediate_size"],
        max_len=c.get("max_position_embeddings", 2048),
        rope_theta=float(rope.get("rope_theta", c.get("rope_theta", 10000.0))),
        norm_eps=c.get("rms_norm_eps", 1e-6),
        tie_embeddings=c.get("tie_word_embeddings", False),
        dtype=dtype,
        init_std=c.get("initializer_range", 0.02),
        bos_id=c.get("bos_token_id"),
        eos_id=_first(c.get("eos_token_id")),
    )


def _first(ids: int | list[int] | None) -> int | None:
    # Some checkpoints list several EOS ids; our samplers stop on one.
    return ids[0] if isinstance(ids, list) else ids


def llama_config_to_hf(config: LlamaConfig) -> dict[str, Any]:
    """A transformers-5 ``config.json`` for ``LlamaForCausalLM``."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": config.vocab_size,
        "hidden_size": config.dim,
        "intermediate_size": config.ffn_hidden,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.kv_heads,
        "head_dim": config.head_size,
        "max_position_embeddings": config.max_len,
        "rms_norm_eps": config.norm_eps,
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
        "tie_word_embeddings": config.tie_embeddings,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "initializer_range": config.init_std,
        "bos_token_id": config.bos_id,
        "eos_token_id": config.eos_id,
        "dtype": "float32",
    }


# ---------------------------------------------------------------------------------------------
# Files


# safetensors dtype codes of floating-point tensors (all are read as fp32 parameters).
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")


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


INDEX_FILE = "model.safetensors.index.json"


def _safetensors_files(directory: str) -> tuple[list[str], dict[str, str] | None]:
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


def _resolve(path_or_hub_id: str) -> str:
    if os.path.isdir(path_or_hub_id):
        return path_or_hub_id
    try:
        from huggingface_hub import snapshot_download
    except ImportError as e:
        raise ConversionError(f"{path_or_hub_id!r} is not a directory and huggingface_hub is not installed") from e
    return snapshot_download(path_or_hub_id, allow_patterns=["*.json", "*.safetensors"])


def load_hf_checkpoint(path_or_hub_id: str, *, dtype: str = "float32") -> tuple[nnx.Module, TeacherConfig]:
    """Loads a Hugging Face GPT-2 or LLaMA checkpoint (a local directory with ``config.json`` and
    ``*.safetensors``, sharded or not, or a Hub id when online). ``dtype`` is the compute dtype;
    parameters are always fp32."""
    directory = _resolve(path_or_hub_id)
    with open(os.path.join(directory, "config.json")) as f:
        config = config_from_hf(json.load(f), dtype=dtype)
    files, index = _safetensors_files(directory)
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
