"""``load()``: a trained model in one call, from a training workdir (its newest checkpoint that
loads, or a given step) or an export directory. Only the parameters are read: no optimizer
state, no training state.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import ml_collections
from flax import nnx

from discreteflow_jax.config import ExperimentConfig, parse_config
from discreteflow_jax.data.tokenizers import WORKDIR_TOKENIZER, Tokenizer, has_tokenizer_files, load_tokenizer
from discreteflow_jax.inference.flow_model import TokenFlowModel, model_config
from discreteflow_jax.inference.teacher_model import TeacherModel
from discreteflow_jax.io import export_format as fmt
from discreteflow_jax.models.tokenflow import TokenFlow


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
    if source and "://" not in str(source):
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


def _restore_tokenflow_params(mngr: Any, step: int, cfg: ExperimentConfig, abstract_params: Any) -> Any:
    """Parameters of one checkpoint step on the default device (CheckpointDamagedError when it
    does not read)."""
    import jax.numpy as jnp

    from discreteflow_jax.io import checkpoint as ckpt
    from discreteflow_jax.training.trainer import TrainState, make_optimizer

    tx = make_optimizer(cfg.train)
    abstract_state = jax.eval_shape(lambda p: TrainState(jnp.zeros((), jnp.int32), p, tx.init(p)), abstract_params)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), abstract_state)
    return ckpt.guarded(mngr, step, lambda: ckpt.restore(mngr, step, target))[0].params


def _load_workdir(workdir: str, data_dir: str | None, step: int | None) -> TokenFlowModel | TeacherModel:
    """The model of ``step``, or of the newest checkpoint that loads: a damaged newer one is
    reported (logged) and left in place; a damaged ``step`` raises, naming the steps that load."""
    from discreteflow_jax.io import checkpoint as ckpt

    mngr = ckpt.manager(workdir, keep=1000, async_save=False)
    try:
        if not mngr.all_steps():
            raise LoadError(f"{os.path.join(workdir, 'checkpoints')} holds no finished checkpoint yet")

        def load_step(s: int) -> tuple[ExperimentConfig, Any]:
            meta = ckpt.guarded(mngr, s, lambda: ckpt.read_meta(mngr, s))
            if not isinstance(meta.get("config"), dict):
                raise ckpt.damaged(mngr, s, "its metadata carries no config")
            cfg = config_from_raw(meta["config"])
            if cfg.task == "teacher":
                from discreteflow_jax.tasks.teacher import restore_teacher_step

                return cfg, restore_teacher_step(mngr, workdir, s)
            ckpt.verify(mngr, s)
            graphdef, abstract_params = abstract_tokenflow(cfg)
            return cfg, (graphdef, _restore_tokenflow_params(mngr, s, cfg, abstract_params))

        (cfg, loaded), step, _ = ckpt.select(mngr, load_step, step=step, how="step={} (--step={} on the command line)")
    finally:
        mngr.close()
    tokenizer = _tokenizer_for(cfg, data_dir, workdir)
    if cfg.task == "teacher":
        return TeacherModel(cfg, loaded.model(), tokenizer, workdir, step)
    graphdef, params = loaded
    return TokenFlowModel(cfg, graphdef, params, tokenizer, workdir, step)


def load_export(path: str, data_dir: str | None = None) -> TokenFlowModel | TeacherModel:
    """Loads an export directory (``discreteflow_jax.io.export_format``) as a TokenFlowModel or TeacherModel."""
    meta = fmt.read_export_config(path)
    cfg = config_from_raw(meta["training_config"])
    tokenizer = fmt.read_tokenizer(meta, path, data_dir)
    if meta["kind"] == "llama":
        from discreteflow_jax.io.hf import load_hf_checkpoint

        module, _ = load_hf_checkpoint(path, dtype=cfg.model.dtype)
        return TeacherModel(cfg, module, tokenizer, path, meta.get("step"))
    graphdef, abstract_params = abstract_tokenflow(cfg)
    params = fmt.unflatten_params(fmt.read_flat_params(path), abstract_params,
                                  os.path.join(path, fmt.WEIGHTS_FILE))
    return TokenFlowModel(cfg, graphdef, params, tokenizer, path, meta.get("step"))
