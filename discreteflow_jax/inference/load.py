"""``load()``: a trained model in one call, from a training workdir (its newest checkpoint that
loads, or a given step) or an export directory. Only the parameters are read: no optimizer
state, no training state.
"""

from __future__ import annotations

import os
from typing import Any

import ml_collections
from flax import nnx

from discreteflow_jax.config import ExperimentConfig, parse_config
from discreteflow_jax.data.tokenizers import (
    WORKDIR_TOKENIZER,
    Tokenizer,
    has_tokenizer_files,
    load_tokenizer,
    local_tokenizer_copy,
)
from discreteflow_jax.inference.flow_model import TokenFlowModel, model_config
from discreteflow_jax.inference.teacher_model import TeacherModel
from discreteflow_jax.io import export_format as fmt
from discreteflow_jax.io import restore
from discreteflow_jax.io.hf import load_hf_checkpoint
from discreteflow_jax.models.llama import Llama
from discreteflow_jax.models.tokenflow import TokenFlow
from discreteflow_jax.models.warmflow import build_warmflow


class LoadError(ValueError):
    """A path that is neither a workdir with a finished checkpoint nor an export directory."""


def load(path: str, data_dir: str | None = None, *, step: int | None = None) -> TokenFlowModel | TeacherModel:
    """Loads a trained model from a workdir (its newest checkpoint, or ``step``) or an export
    directory (``python -m discreteflow_jax.export``). ``data_dir`` is where tokenizer files are
    looked up when the export does not carry them (see ``discreteflow_jax.data``)."""
    path = os.path.expanduser(str(path))
    if not os.path.isdir(path):
        raise LoadError(f"{path} does not exist or is not a directory")
    if os.path.isdir(os.path.join(path, "checkpoints")):
        return _load_workdir(path, data_dir, step)
    missing = fmt.missing_files(path)
    if missing:
        raise LoadError(
            f"{path} is neither a training workdir (no checkpoints/ folder) nor an export: missing "
            f"{', '.join(missing)}. Export a workdir with `python -m discreteflow_jax.export --workdir=DIR --out=DIR`."
        )
    return load_export(path, data_dir)


def config_from_raw(raw: dict) -> ExperimentConfig:
    """The validated ExperimentConfig of a plain config dict (as checkpoints and exports store it)."""
    return parse_config(ml_collections.ConfigDict(raw))


def tokenizer_folder(cfg: ExperimentConfig, data_dir: str | None, source: str | None = None) -> str | None:
    """Where a model's tokenizer loads from: the caller's ``data_dir``; else the copy a workdir or
    an export carries; else the training config's data folder (or $DISCRETEFLOW_DATA_DIR / the Hub)."""
    if data_dir:
        return data_dir
    if source and "://" in str(source):  # a gs:// workdir or export: its copy, fetched to a local cache
        for folder in (f"{str(source).rstrip('/')}/{WORKDIR_TOKENIZER}", str(source)):
            local = local_tokenizer_copy(cfg.data.tokenizer, folder)
            if local:
                return local
    elif source:
        for folder in (os.path.join(source, WORKDIR_TOKENIZER), source):
            if has_tokenizer_files(cfg.data.tokenizer, folder):
                return folder
    return cfg.data.data_dir or None


def _tokenizer_for(cfg: ExperimentConfig, data_dir: str | None, source: str | None = None) -> Tokenizer:
    return load_tokenizer(cfg.data.tokenizer, tokenizer_folder(cfg, data_dir, source))


def abstract_tokenflow(cfg: ExperimentConfig) -> tuple[Any, Any]:
    """(graphdef, abstract pure-dict params) of the TokenFlow a config describes; nothing allocated."""
    model_cfg = model_config(cfg)
    abstract = nnx.eval_shape(lambda: TokenFlow(model_cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    return graphdef, nnx.to_pure_dict(state)


def abstract_warmflow(cfg: ExperimentConfig, backbone: dict | None) -> tuple[Any, Any]:
    """(graphdef, abstract pure-dict params) of a warm-started student, whose backbone the
    checkpoint (its task identity) or export (its architecture) records."""
    if not backbone:
        raise LoadError("this warm-started student's checkpoint does not record its backbone (warm_backbone); "
                        "it was saved by an incompatible version")
    abstract = nnx.eval_shape(lambda: build_warmflow(model_config(cfg), backbone, nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    return graphdef, nnx.to_pure_dict(state)


def _abstract_model(cfg: ExperimentConfig, meta: dict | None = None) -> tuple[Any, Any]:
    """(graphdef, abstract params) of the model a training config trains: a TokenFlow, a warm
    student (its backbone from the checkpoint's ``meta``) or a teacher."""
    if cfg.task != "teacher" and cfg.model.warm_start:
        return abstract_warmflow(cfg, ((meta or {}).get("task_identity") or {}).get("warm_backbone"))
    if cfg.task != "teacher":
        return abstract_tokenflow(cfg)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Llama(cfg.model, rngs=nnx.Rngs(0))))
    return graphdef, nnx.to_pure_dict(state)


def _load_workdir(workdir: str, data_dir: str | None, step: int | None) -> TokenFlowModel | TeacherModel:
    """The model of ``step``, or of the newest checkpoint that loads: a damaged newer one is
    reported (logged) and left in place; a damaged ``step`` raises, naming the steps that load.
    Only the parameters are read (``io.restore``), on the default device."""
    with restore.reader(workdir) as mngr:
        if not restore.steps(mngr):
            raise LoadError(f"{restore.checkpoints_dir(workdir)} holds no finished checkpoint yet")
        restored = restore.load_params(mngr, lambda meta: _abstract_model(config_from_raw(meta["config"]), meta)[1],
                                       step=step, how="step={} (--step={} on the command line)")
    cfg = config_from_raw(restored.meta["config"])
    graphdef, _ = _abstract_model(cfg, restored.meta)
    tokenizer = _tokenizer_for(cfg, data_dir, workdir)
    if cfg.task == "teacher":
        return TeacherModel(cfg, nnx.merge(graphdef, restored.params), tokenizer, workdir, restored.step)
    return TokenFlowModel(cfg, graphdef, restored.params, tokenizer, workdir, restored.step)


def load_export(path: str, data_dir: str | None = None) -> TokenFlowModel | TeacherModel:
    """Loads an export directory (``discreteflow_jax.io.export_format``) as a TokenFlowModel or TeacherModel."""
    meta = fmt.read_export_config(path)
    cfg = config_from_raw(meta["training_config"])
    tokenizer = fmt.read_tokenizer(meta, path, data_dir)
    if meta["kind"] == "llama":
        module, _ = load_hf_checkpoint(path, dtype=cfg.model.dtype)
        return TeacherModel(cfg, module, tokenizer, path, meta.get("step"))
    if cfg.model.warm_start:
        graphdef, abstract_params = abstract_warmflow(cfg, meta.get("architecture", {}).get("warm_backbone"))
    else:
        graphdef, abstract_params = abstract_tokenflow(cfg)
    params = fmt.unflatten_params(fmt.read_flat_params(path), abstract_params,
                                  os.path.join(path, fmt.WEIGHTS_FILE))
    return TokenFlowModel(cfg, graphdef, params, tokenizer, path, meta.get("step"))
