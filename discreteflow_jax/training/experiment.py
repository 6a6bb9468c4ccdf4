"""One call that runs an experiment from a ConfigDict: validate, load data, build the task, train.

Everything that can be wrong with the inputs is checked here, before anything compiles.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import jax
import ml_collections

from discreteflow_jax.config import ConfigError, ExperimentConfig, parse_config, to_plain
from discreteflow_jax.data import DataError, load_tokenizer, make_dataset
from discreteflow_jax.data.tokenizers import WORKDIR_TOKENIZER, copy_tokenizer_files
from discreteflow_jax.io import checkpoint as ckpt
from discreteflow_jax.io.hf import ConversionError
from discreteflow_jax.models import sharding as shd
from discreteflow_jax.tasks import build_task
from discreteflow_jax.training import distributed
from discreteflow_jax.training.trainer import Trainer

log = logging.getLogger("discreteflow_jax")

USER_ERRORS: tuple[type[Exception], ...] = (
    ConfigError, DataError, shd.ShardingError, ckpt.CheckpointMismatchError, ckpt.CheckpointError,
    ConversionError,
)


def prepare(config: ml_collections.ConfigDict, data_dir: str | None = None) -> tuple[ExperimentConfig, Any, Any]:
    """Validates the config and loads tokenizer and dataset. Returns (cfg, tokenizer, dataset)."""
    cfg = parse_config(config)
    if data_dir:
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, data_dir=data_dir))
    tokenizer = load_tokenizer(cfg.data.tokenizer, cfg.data.data_dir or None)
    if tokenizer.vocab_size != cfg.model.vocab_size:
        raise ConfigError(
            f"the {cfg.data.tokenizer} tokenizer has {tokenizer.vocab_size} tokens but "
            f"config.model.vocab_size={cfg.model.vocab_size}; set --config.model.vocab_size={tokenizer.vocab_size}"
        )
    d = cfg.data
    kwargs: dict[str, Any] = {}
    if d.name == "shakespeare":
        kwargs["val_fraction"] = d.val_fraction
    else:
        kwargs.update(source=d.fineweb_source, subset=d.fineweb_subset, local_path=d.local_path or None,
                      val_rows=d.val_rows)
    dataset = make_dataset(
        d.name, d.seq_len, tokenizer, data_dir=d.data_dir or None, seed=cfg.seed,
        process_index=jax.process_index(), process_count=jax.process_count(), **kwargs,
    )
    check = getattr(dataset, "check_readable", None)  # streamed data: read its start now, not at step 0
    if check is not None:
        check()
    return cfg, tokenizer, dataset


def run(config: ml_collections.ConfigDict, workdir: str, data_dir: str | None = None,
        resume_step: int | None = None) -> dict:
    """Trains (resuming from the newest checkpoint of ``workdir`` that loads, or from
    ``resume_step``) and returns the final state and metrics."""
    # First of all: a config that fails validation, data or teacher loading on some processes only
    # would leave the others waiting in their first collective.
    distributed.check_same_config(to_plain(config))
    cfg, tokenizer, dataset = prepare(config, data_dir)
    if jax.process_index() == 0:
        # The workdir carries its tokenizer (gs:// ones too): loading it later needs no --data_dir.
        tokenizer_dir = f"{workdir.rstrip('/')}/{WORKDIR_TOKENIZER}"
        copy_tokenizer_files(cfg.data.tokenizer, cfg.data.data_dir or None, tokenizer_dir)
    task = build_task(cfg)
    trainer = Trainer(cfg, task, workdir, dataset, tokenizer, resume_step=resume_step)
    return trainer.run()
