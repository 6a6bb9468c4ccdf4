"""Turns an ``ml_collections.ConfigDict`` into validated, frozen dataclasses.

Validation happens once, before anything compiles, and every error says what was wrong and
what to set instead. Library code below this boundary never sees a ConfigDict.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import ml_collections

from discreteflow_jax.config.gumbel import parse_gumbel_config, student_config
from discreteflow_jax.config.model import LlamaConfig, TokenFlowConfig
from discreteflow_jax.config.schema import (
    CHOICES,
    DEFAULT_TIME_WARP_BINS,
    ConfigError,
    DataConfig,
    ExperimentConfig,
    FlowConfig,
    MeshConfig,
    SampleConfig,
    TrainConfig,
    check_whole,
)

MAX_BUCKETS = 100  # flow.num_buckets: one logged metric per bucket and loss


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


def _in_range(value: Any, name: str, low: float, high: float, *, high_open: bool = False, why: str = "") -> None:
    bad = not isinstance(value, (int, float)) or isinstance(value, bool) or not (
        low <= value < high if high_open else low <= value <= high
    )
    if bad:
        interval = f"[{low}, {high})" if high_open else f"[{low}, {high}]"
        raise ConfigError(f"config.{name} must be in {interval}{why}, got {value!r}")


def _greater_than_zero(value: Any, name: str, why: str = "") -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
        raise ConfigError(f"config.{name} must be > 0{why}, got {value!r}")


def validate_tokenflow_model(model: TokenFlowConfig, data: DataConfig, task: str = "tokenflow") -> None:
    for name in ("vocab_size", "dim", "num_layers", "num_heads", "max_len"):
        _positive(getattr(model, name), f"model.{name}")
    if model.cross_attention and task != "gumbel":
        raise ConfigError(
            f"config.model.cross_attention=True: the {task} task has no context to attend to (only the gumbel task "
            "with gumbel.conditioning='cross_attention' does, and it sets the layers itself); leave it False"
        )
    if model.context_dim not in (0, model.flow_width):
        raise ConfigError(
            f"config.model.context_dim={model.context_dim!r}: the only cross-attention context (Gumbel "
            f"softmax(G)·E) has the model's embedding width {model.flow_width}; leave context_dim=0"
        )
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
    if not isinstance(model.flow_dim, int) or model.flow_dim < 0:
        raise ConfigError(f"config.model.flow_dim must be a whole number >= 0 (0 = dim), got {model.flow_dim!r}")
    if model.time_warp_bins < 0:
        raise ConfigError(f"config.model.time_warp_bins must be >= 0, got {model.time_warp_bins}")
    validate_warm_start(model, task)
    if model.singular_eps <= 0:
        raise ConfigError("config.model.singular_eps must be > 0 (it keeps the singular logits finite at t=1)")


def validate_warm_start(model: TokenFlowConfig, task: str) -> None:
    """A warm-started student (models/warmflow.py) and the options it does not combine with."""
    if model.warm_attention not in ("causal", "gated"):
        raise ConfigError(f"config.model.warm_attention={model.warm_attention!r} is not a valid choice; use one of: "
                          "causal, gated")
    if model.g_channel != "none" and (task != "gumbel" or not model.warm_start):
        raise ConfigError("config.model.g_channel is set by config.gumbel.g_channel (warm-started Gumbel students); "
                          "leave it 'none'")
    if model.g_drafts and (task != "gumbel" or not model.warm_start):
        raise ConfigError("config.model.g_drafts is set by config.gumbel.drafts (warm-started Gumbel students); "
                          "leave it 0")
    if model.warm_flow_init not in ("teacher", "random"):
        raise ConfigError(f"config.model.warm_flow_init={model.warm_flow_init!r} is not a valid choice; use one of: "
                          "teacher, random")
    check_whole(model.warm_input_topk, "model.warm_input_topk", 0, " (0 = the whole vocabulary)")
    if model.warm_input_topk > model.vocab_size:
        raise ConfigError(f"config.model.warm_input_topk={model.warm_input_topk} exceeds the vocabulary "
                          f"({model.vocab_size}); use 0 for all tokens")
    if not (isinstance(model.warm_align, (int, float)) and model.warm_align >= 0):
        raise ConfigError(f"config.model.warm_align must be >= 0 (0 = off), got {model.warm_align!r}")
    if model.warm_align > 0 and (task != "gumbel" or not model.warm_start):
        raise ConfigError("config.model.warm_align > 0 aligns a warm student with the teacher it distills: it needs "
                          "config.model.warm_start=True and the gumbel task with gumbel.logit_channel=True")
    if not model.warm_start:
        return
    refused = {
        "self_condition": (model.self_condition, "False"),
        "time_warp_bins": (model.time_warp_bins > 0, "0 (and a time sampler other than 'learned')"),
        "loss_chunk": (model.loss_chunk > 0, "0 (a warm student forms its logits whole)"),
        "output_modulation": (model.output_modulation, "False (time enters through the input only)"),
    }
    for name, (bad, fix) in refused.items():
        if bad:
            raise ConfigError(f"config.model.warm_start=True does not support config.model.{name}="
                              f"{getattr(model, name)!r}; set it to {fix}")


def validate_train(train: TrainConfig) -> None:
    for name in ("batch_size", "grad_accum", "num_steps", "log_every", "eval_every", "ckpt_every", "keep_checkpoints"):
        _positive(getattr(train, name), f"train.{name}")
    check_whole(train.eval_batches, "train.eval_batches", 0, " (0 = every validation window once)")
    _in_range(train.min_lr_ratio, "train.min_lr_ratio", 0.0, 1.0, why=" (the final lr as a fraction of the peak)")
    for name in ("b1", "b2"):
        _in_range(getattr(train, name), f"train.{name}", 0.0, 1.0, high_open=True, why=" (an AdamW decay rate)")
    for name, meaning in (("weight_decay", "no decay"), ("grad_clip", "no clipping")):
        value = getattr(train, name)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not value >= 0:
            raise ConfigError(f"config.train.{name} must be >= 0 (0 = {meaning}), got {value!r}")
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


def validate_flow(flow_cfg: FlowConfig) -> None:
    """The training-time flow settings; a degenerate time sampler would train on one t only."""
    _positive(flow_cfg.num_buckets, "flow.num_buckets")
    if flow_cfg.num_buckets > MAX_BUCKETS:
        # Every bucket is a logged metric per loss; more would flood the logs without resolving t better.
        raise ConfigError(f"config.flow.num_buckets={flow_cfg.num_buckets} must be at most {MAX_BUCKETS} "
                          "(each t-bucket is its own logged metric)")
    if flow_cfg.time_sampler == "power":
        _greater_than_zero(flow_cfg.time_param, "flow.time_param",
                           " for time_sampler='power' (t = u**p; p <= 0 puts every t at 1)")
    if flow_cfg.time_sampler == "logit_normal":
        _greater_than_zero(flow_cfg.time_param, "flow.time_param",
                           " for time_sampler='logit_normal' (the std of the logit; 0 puts every t at 0.5)")
    for name in ("condition_prob", "condition_prefix_prob", "token_time_prob", "stagger_prob"):
        _in_range(getattr(flow_cfg, name), f"flow.{name}", 0.0, 1.0)
    if flow_cfg.token_time_prob + flow_cfg.stagger_prob > 1.0:
        raise ConfigError(f"config.flow.token_time_prob + config.flow.stagger_prob must be <= 1 (shares of the "
                          f"training sequences), got {flow_cfg.token_time_prob} + {flow_cfg.stagger_prob}")
    _greater_than_zero(flow_cfg.stagger_width, "flow.stagger_width", " (w of the staggered training times)")
    _positive(flow_cfg.condition_span_len, "flow.condition_span_len")


def validate_sample(sample: SampleConfig) -> None:
    _positive(sample.steps, "sample.steps")
    _positive(sample.num_samples, "sample.num_samples")
    if not isinstance(sample.eval_steps, tuple):
        raise ConfigError(f"config.sample.eval_steps must be a list of step counts, e.g. (8, 128); got "
                          f"{sample.eval_steps!r}")
    for k in sample.eval_steps:
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise ConfigError(
                f"config.sample.eval_steps={list(sample.eval_steps)} holds {k!r}; every entry must be a number "
                "of sampling steps >= 1"
            )
    _greater_than_zero(sample.temperature, "sample.temperature", " (1 = the model's posterior mean)")
    if not (isinstance(sample.stagger, (int, float)) and 0 <= sample.stagger < float("inf")):
        raise ConfigError(f"config.sample.stagger must be a finite number >= 0 (0 = one time for every position), "
                          f"got {sample.stagger!r}")
    if sample.schedule == "power":
        _greater_than_zero(sample.schedule_param, "sample.schedule_param", " for schedule='power' (t = u**p)")


def validate_data(data: DataConfig) -> None:
    _positive(data.seq_len, "data.seq_len")
    if not 0.0 < data.val_fraction < 1.0:
        raise ConfigError(f"config.data.val_fraction must be in (0, 1), got {data.val_fraction}")
    _positive(data.val_rows, "data.val_rows")


def validate_mesh(mesh: MeshConfig) -> None:
    if mesh.data != -1:
        _positive(mesh.data, "mesh.data (or -1 = all remaining devices)")
    _positive(mesh.fsdp, "mesh.fsdp")
    _positive(mesh.tensor, "mesh.tensor")


def parse_config(cfg: ml_collections.ConfigDict) -> ExperimentConfig:
    """Validates a ConfigDict and returns the frozen ExperimentConfig. Raises ConfigError."""
    check_choices(cfg)
    raw = to_plain(cfg)
    data = _build(DataConfig, raw.get("data", {}), "data")
    validate_data(data)
    train = _build(TrainConfig, raw.get("train", {}), "train")
    validate_train(train)
    flow_cfg = _build(FlowConfig, raw.get("flow", {}), "flow")
    validate_flow(flow_cfg)
    sample = _build(SampleConfig, raw.get("sample", {}), "sample")
    validate_sample(sample)
    mesh = _build(MeshConfig, raw.get("mesh", {}), "mesh")
    validate_mesh(mesh)
    task = raw.get("task", "tokenflow")
    causal = bool(raw.get("causal", False))
    model_section = dict(raw.get("model", {}))
    if task == "teacher":
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
        overrides = {"causal": causal}
        if flow_cfg.time_sampler == "learned" and not model_section.get("time_warp_bins"):
            overrides["time_warp_bins"] = DEFAULT_TIME_WARP_BINS  # the learned sampler needs its parameters
        model = _build(TokenFlowConfig, model_section, "model", overrides)
        validate_tokenflow_model(model, data, task)
        if task == "gumbel":  # the gumbel section decides the student's conditioning layers
            student_config(model, parse_gumbel_config(raw.get("gumbel")))
    known = {"task", "seed", "causal", "model", "data", "train", "flow", "sample", "mesh"}
    extra = {k: v for k, v in raw.items() if k not in known}
    return ExperimentConfig(
        task=task, seed=int(raw.get("seed", 0)), causal=causal, model=model, data=data, train=train,
        flow=flow_cfg, sample=sample, mesh=mesh, raw=raw, extra=extra,
    )
