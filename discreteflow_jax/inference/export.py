"""Writes a loaded model as an export directory (format: ``discreteflow_jax.io.export_format``)."""

from __future__ import annotations

import dataclasses
import os

from flax import nnx

from discreteflow_jax.inference.flow_model import TokenFlowModel, model_config
from discreteflow_jax.inference.load import load, tokenizer_folder
from discreteflow_jax.inference.teacher_model import TeacherModel
from discreteflow_jax.io import export_format as fmt
from discreteflow_jax.models.gpt2 import GPT2
from discreteflow_jax.models.warmflow import backbone_description


def export_model(model: TokenFlowModel | TeacherModel, out_dir: str, data_dir: str | None = None) -> str:
    """Writes a loaded model (``discreteflow_jax.load(...)``) to ``out_dir``; returns out_dir."""
    if not isinstance(model, (TeacherModel, TokenFlowModel)):
        raise TypeError(f"cannot export {type(model).__name__}")
    os.makedirs(out_dir, exist_ok=True)
    cfg = model.config
    files = fmt.copy_tokenizer(cfg.data.tokenizer, tokenizer_folder(cfg, data_dir, model.source), out_dir)
    if isinstance(model, TeacherModel):
        module = model.module
        meta = fmt.export_meta("llama", dataclasses.asdict(module.config), cfg, model.step, model.tokenizer, files)
        top_tokenizer = os.path.join(out_dir, files[0]) if files and cfg.data.tokenizer == "llama" else None
        return fmt.write_llama_export(out_dir, module, meta, top_tokenizer)
    architecture = dataclasses.asdict(model_config(cfg))
    if cfg.model.warm_start:  # the backbone's own config, so that loading needs no teacher
        module = nnx.merge(model.graphdef, model.params)
        kind = "gpt2" if isinstance(module.backbone, GPT2) else "llama"
        architecture["warm_backbone"] = backbone_description(kind, module.backbone.config, module.bos_id)
    meta = fmt.export_meta(model.kind, architecture, cfg, model.step, model.tokenizer, files)
    return fmt.write_flat_export(out_dir, model.params, meta)


def export_workdir(workdir: str, out_dir: str, data_dir: str | None = None, step: int | None = None) -> str:
    """Exports a workdir's newest checkpoint that loads (or ``step``)."""
    return export_model(load(workdir, data_dir, step=step), out_dir, data_dir)
