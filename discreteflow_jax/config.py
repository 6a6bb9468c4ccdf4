"""Turns an ``ml_collections.ConfigDict`` into validated, frozen dataclasses.

Validation happens once, before anything compiles, and every error says what was wrong and
what to set instead. Library code below this boundary never sees a ConfigDict.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import ml_collections

from discreteflow_jax.flow import TIME_GRIDS, TIME_SAMPLERS
from discreteflow_jax.models.tokenflow import DTYPES, REMAT_POLICIES, TokenFlowConfig

TASKS = ("tokenflow", "teacher", "gumbel")
DATASETS = ("shakespeare", "fineweb")
TOKENIZERS = ("llama", "gpt2")

# Choice fields: dotted path -> valid values. Checked with a message listing the valid values.
CHOICES: dict[str, tuple[str, ...]] = {
    "task": TASKS,
    "data.name": DATASETS,
    "data.tokenizer": TOKENIZERS,
    "flow.time_sampler": TIME_SAMPLERS,
    "sample.schedule": TIME_GRIDS,
    "model.dtype": tuple(DTYPES),
    "model.remat": REMAT_POLICIES,
}


class ConfigError(ValueError):
    """A configuration value that cannot work; the message says which field and what to do."""


@dataclasses.dataclass(frozen=True)
class DataConfig:
    name: str = "shakespeare"
    tokenizer: str = "llama"
    seq_len: int = 128
    data_dir: str = ""
    val_fraction: float = 0.1
    fineweb_source: str = "HuggingFaceFW/fineweb"
    fineweb_subset: str = "sample-10BT"
    local_path: str = ""
    val_rows: int = 256


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    batch_size: int = 64
    grad_accum: int = 1
    num_steps: int = 10000
    lr: float = 4e-4
    warmup_steps: int = 1000
    min_lr_ratio: float = 0.0
    b1: float = 0.9
    b2: float = 0.98
    weight_decay: float = 0.02
    grad_clip: float = 1.0
    log_every: int = 50
    eval_every: int = 500
    eval_batches: int = 8
    ckpt_every: int = 500
    keep_checkpoints: int = 3


@dataclasses.dataclass(frozen=True)
class FlowConfig:
    time_sampler: str = "uniform"
    time_param: float = 1.0
    num_buckets: int = 10
    condition_prob: float = 0.0  # fraction of training sequences with known (clean, unscored) positions
    condition_prefix_prob: float = 0.5  # of those: known prefix vs random known spans
    condition_span_len: int = 8  # block length of the random known spans


@dataclasses.dataclass(frozen=True)
class SampleConfig:
    steps: int = 16
    schedule: str = "uniform"
    schedule_param: float = 2.0
    num_samples: int = 4
    temperature: float = 1.0
    eval_steps: tuple[int, ...] = (8, 128)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    data: int = -1
    fsdp: int = 1
    tensor: int = 1


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
    task: str
    seed: int
    causal: bool
    model: Any  # TokenFlowConfig, or a teacher config for task="teacher"
    data: DataConfig
    train: TrainConfig
    flow: FlowConfig
    sample: SampleConfig
    mesh: MeshConfig
    raw: dict  # the full config as plain data, stored in checkpoints and exports
    extra: dict = dataclasses.field(default_factory=dict)  # task-specific sections (e.g. gumbel, teacher)


def _get(cfg: ml_collections.ConfigDict, dotted: str) -> Any:
    node = cfg
    for part in dotted.split("."):
        if part not in node:
            return None
        node = node[part]
    return node


def _build(cls, section: dict, name: str, overrides: dict | None = None):
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(section) - set(fields))
    if unknown:
        raise ConfigError(
            f"config.{name} has unknown field(s) {unknown}; valid fields are: {', '.join(sorted(fields))}"
        )
    values = dict(section)
    values.update(overrides or {})
    for key, value in list(values.items()):
        if isinstance(value, list):
            values[key] = tuple(value)
    return cls(**values)


def to_plain(cfg: ml_collections.ConfigDict) -> dict:
    """JSON-compatible copy of a ConfigDict (for checkpoints, exports and hparams)."""
    return json.loads(cfg.to_json_best_effort()) if isinstance(cfg, ml_collections.ConfigDict) else dict(cfg)


def check_choices(cfg: ml_collections.ConfigDict) -> None:
    for dotted, valid in CHOICES.items():
        value = _get(cfg, dotted)
        if value is not None and value not in valid:
            raise ConfigError(
                f"config.{dotted}={value!r} is not a valid choice; use one of: {', '.join(valid)} "
                f"(e.g. --config.{dotted}={valid[0]})"
            )


def _positive(value: Any, name: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"config.{name} must be a positive integer, got {value!r}")


def validate_tokenflow_model(model: TokenFlowConfig, data: DataConfig) -> None:
    for name in ("vocab_size", "dim", "num_layers", "num_heads", "max_len"):
        _positive(getattr(model, name), f"model.{name}")
    if model.dim % model.num_heads:
        raise ConfigError(f"config.model.dim={model.dim} must be divisible by config.model.num_heads={model.num_heads}")
    if (model.dim // model.num_heads) % 2:
        raise ConfigError(f"the head size dim/num_heads={model.dim // model.num_heads} must be even for RoPE")
    if data.seq_len > model.max_len:
        raise ConfigError(
            f"config.data.seq_len={data.seq_len} is longer than the model supports "
            f"(config.model.max_len={model.max_len}); raise max_len or shorten seq_len"
        )
    if not isinstance(model.loss_chunk, int) or isinstance(model.loss_chunk, bool) or model.loss_chunk < 0:
        raise ConfigError(
            f"config.model.loss_chunk must be a whole number of tokens >= 0 (0 = full logits), got {model.loss_chunk!r}"
        )
    if model.singular_eps <= 0:
        raise ConfigError("config.model.singular_eps must be > 0 (it keeps the singular logits finite at t=1)")


def validate_train(train: TrainConfig) -> None:
    for name in ("batch_size", "grad_accum", "num_steps", "log_every", "eval_every", "ckpt_every", "keep_checkpoints"):
        _positive(getattr(train, name), f"train.{name}")
    if train.batch_size % train.grad_accum:
        raise ConfigError(
            f"config.train.batch_size={train.batch_size} must be divisible by "
            f"config.train.grad_accum={train.grad_accum}"
        )
    if train.lr <= 0:
        raise ConfigError(f"config.train.lr must be > 0, got {train.lr}")
    if train.warmup_steps < 0 or train.warmup_steps > train.num_steps:
        raise ConfigError(
            f"config.train.warmup_steps={train.warmup_steps} must be between 0 and num_steps={train.num_steps}"
        )


def parse_config(cfg: ml_collections.ConfigDict) -> ExperimentConfig:
    """Validates a ConfigDict and returns the frozen ExperimentConfig. Raises ConfigError."""
    check_choices(cfg)
    raw = to_plain(cfg)
    data = _build(DataConfig, raw.get("data", {}), "data")
    _positive(data.seq_len, "data.seq_len")
    if not 0.0 < data.val_fraction < 1.0:
        raise ConfigError(f"config.data.val_fraction must be in (0, 1), got {data.val_fraction}")
    train = _build(TrainConfig, raw.get("train", {}), "train")
    validate_train(train)
    flow_cfg = _build(FlowConfig, raw.get("flow", {}), "flow")
    for name in ("condition_prob", "condition_prefix_prob"):
        if not 0.0 <= getattr(flow_cfg, name) <= 1.0:
            raise ConfigError(f"config.flow.{name} must be in [0, 1], got {getattr(flow_cfg, name)}")
    _positive(flow_cfg.condition_span_len, "flow.condition_span_len")
    sample = _build(SampleConfig, raw.get("sample", {}), "sample")
    _positive(sample.steps, "sample.steps")
    mesh = _build(MeshConfig, raw.get("mesh", {}), "mesh")
    task = raw.get("task", "tokenflow")
    causal = bool(raw.get("causal", False))
    model_section = dict(raw.get("model", {}))
    if task == "teacher":
        from discreteflow_jax.models.llama import LlamaConfig  # teacher models are optional here

        if not model_section.get("num_kv_heads"):
            model_section["num_kv_heads"] = None  # 0 in a config file means "plain multi-head"
        for name in ("vocab_size", "dim", "num_layers", "num_heads", "ffn_hidden", "max_len"):
            _positive(model_section.get(name), f"model.{name}")
        model = _build(LlamaConfig, model_section, "model")
        if data.seq_len > model.max_len:
            raise ConfigError(
                f"config.data.seq_len={data.seq_len} is longer than the teacher supports "
                f"(config.model.max_len={model.max_len})"
            )
    else:
        model = _build(TokenFlowConfig, model_section, "model", {"causal": causal})
        validate_tokenflow_model(model, data)
    known = {"task", "seed", "causal", "model", "data", "train", "flow", "sample", "mesh"}
    extra = {k: v for k, v in raw.items() if k not in known}
    return ExperimentConfig(
        task=task, seed=int(raw.get("seed", 0)), causal=causal, model=model, data=data, train=train,
        flow=flow_cfg, sample=sample, mesh=mesh, raw=raw, extra=extra,
    )
