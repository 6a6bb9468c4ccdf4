"""Experiment configuration: the schema (frozen dataclasses), its validation (``parse_config``)
and the model configs. Importing this package imports no model code.
"""

from discreteflow_jax.config.gumbel import CONDITIONINGS, SOURCES, GumbelConfig, parse_gumbel_config, student_config
from discreteflow_jax.config.model import LlamaConfig, TokenFlowConfig, swiglu_hidden
from discreteflow_jax.config.schema import (
    CHOICES,
    DATASETS,
    DEFAULT_TIME_WARP_BINS,
    DTYPE_NAMES,
    REMAT_POLICIES,
    TASKS,
    TIME_GRIDS,
    TIME_SAMPLERS,
    TOKENIZERS,
    ConfigError,
    DataConfig,
    ExperimentConfig,
    FlowConfig,
    MeshConfig,
    SampleConfig,
    TrainConfig,
)
from discreteflow_jax.config.validate import check_choices, parse_config, to_plain

__all__ = [
    "CHOICES", "CONDITIONINGS", "DATASETS", "DEFAULT_TIME_WARP_BINS", "DTYPE_NAMES", "REMAT_POLICIES", "SOURCES",
    "TASKS", "TIME_GRIDS", "TIME_SAMPLERS", "TOKENIZERS", "ConfigError", "DataConfig", "ExperimentConfig",
    "FlowConfig", "GumbelConfig", "LlamaConfig", "MeshConfig", "SampleConfig", "TokenFlowConfig", "TrainConfig",
    "check_choices", "parse_config", "parse_gumbel_config", "student_config", "swiglu_hidden", "to_plain",
]
