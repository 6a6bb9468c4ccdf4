"""Hugging Face keys and configs <-> ours, for GPT-2 and LLaMA.

The key mapping is a declarative table of ``Rule``s: our parameter paths, one Hugging Face key, and
a pair of transforms (HF -> ours, ours -> HF). Facts the tables encode:

* LLaMA stores linear weights as torch ``[out, in]``; our kernels are ``[in, out]`` (transpose).
* GPT-2 uses ``Conv1D``, already ``[in, out]``, with q/k/v fused in ``c_attn`` (split in three).
* Tied heads have no ``lm_head.weight`` key; GPT-2 checkpoints saved by ``GPT2LMHeadModel`` prefix
  keys with ``transformer.``, the public ``gpt2`` repository does not; old checkpoints carry
  non-parameter buffers (``attn.bias``, ``attn.masked_bias``, ``rotary_emb.inv_freq``) that are skipped.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from flax import nnx

from discreteflow_jax.io.hf_files import ConversionError
from discreteflow_jax.models.gpt2 import GPT2, GPT2Config
from discreteflow_jax.models.llama import Llama, LlamaConfig

TeacherConfig = LlamaConfig | GPT2Config


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


def model_spec(config: TeacherConfig) -> tuple[type[nnx.Module], list[Rule], tuple[str, ...]]:
    """The model class, its key table, and the regular expressions of checkpoint keys to skip."""
    if isinstance(config, LlamaConfig):
        ignored = _IGNORED_LLAMA + ((r"lm_head\.weight",) if config.tie_embeddings else ())
        return Llama, llama_rules(config), ignored
    if isinstance(config, GPT2Config):
        return GPT2, gpt2_rules(config), _IGNORED_GPT2
    raise TypeError(f"unsupported config type {type(config).__name__}")


def normalize_key(key: str, config: TeacherConfig) -> str:
    """A checkpoint key as the tables spell it (GPT-2's optional ``transformer.`` prefix dropped)."""
    if isinstance(config, GPT2Config) and key.startswith("transformer."):
        return key[len("transformer.") :]
    return key


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
