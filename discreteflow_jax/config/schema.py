"""The experiment schema: frozen dataclasses of every config section, the valid values of the
choice fields, and the error every validation raises. Plain Python: no model code is imported.
"""

from __future__ import annotations

import dataclasses
from typing import Any

TASKS = ("tokenflow", "teacher", "gumbel")
DATASETS = ("shakespeare", "fineweb")
TOKENIZERS = ("llama", "gpt2")
# How training draws flow times (see ``flow.sample_time``) and how sampling spaces them (``flow.time_grid``).
TIME_SAMPLERS = ("uniform", "logit_normal", "power", "learned")
TIME_GRIDS = ("uniform", "cosine", "power")
# Activation dtypes by name; the models map them to jnp dtypes.
DTYPE_NAMES = ("float32", "bfloat16")
REMAT_POLICIES = ("none", "full", "save_dots")
# Bins of the learned time sampler when the config does not give model.time_warp_bins.
DEFAULT_TIME_WARP_BINS = 32

# Choice fields: dotted path -> valid values. Checked with a message listing the valid values.
CHOICES: dict[str, tuple[str, ...]] = {
    "task": TASKS,
    "data.name": DATASETS,
    "data.tokenizer": TOKENIZERS,
    "flow.time_sampler": TIME_SAMPLERS,
    "sample.schedule": TIME_GRIDS,
    "model.dtype": DTYPE_NAMES,
    "model.remat": REMAT_POLICIES,
}


class ConfigError(ValueError):
    """A configuration value that cannot work; the message says which field and what to do."""


def check_whole(value: Any, name: str, minimum: int, meaning: str = "") -> None:
    """Raises ConfigError unless ``value`` (the field ``config.NAME``) is an integer >= ``minimum``
    (booleans are not integers here)."""
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ConfigError(f"config.{name} must be an integer >= {minimum}{meaning}, got {value!r}")


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
    token_time_prob: float = 0.0  # share of training sequences with one flow time per position (0: the original)
    stagger_prob: float = 0.0  # share of training sequences with staggered times (flow.staggered_times)
    stagger_width: float = 1.0  # w of those staggered times


@dataclasses.dataclass(frozen=True)
class SampleConfig:
    steps: int = 16
    schedule: str = "uniform"
    schedule_param: float = 2.0
    num_samples: int = 4
    temperature: float = 1.0
    eval_steps: tuple[int, ...] = (8, 128)
    stagger: float = 0.0


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
