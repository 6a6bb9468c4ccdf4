"""Loading a frozen teacher for distillation: from one of our teacher workdirs (parameters only,
through ``io.restore``) or from a Hugging Face checkpoint (``io.hf``), as a ``TeacherBundle``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import ml_collections
from etils import epath
from flax import nnx

from discreteflow_jax.config import ConfigError, LlamaConfig, parse_config
from discreteflow_jax.io import checkpoint as ckpt
from discreteflow_jax.io import restore
from discreteflow_jax.io.hf import load_hf_checkpoint
from discreteflow_jax.models.llama import Llama

TEACHER_COMMAND = "python -m discreteflow_jax.main --config=configs/shakespeare_teacher.py --workdir=DIR"


@dataclasses.dataclass
class TeacherBundle:
    """A frozen teacher ready to be passed into a jitted step (params as a pure pytree)."""

    graphdef: Any
    params: Any
    config: Any
    kind: str  # "llama" | "gpt2"
    bos_id: int
    vocab_size: int
    max_len: int
    source: str
    step: int | None = None  # the checkpoint step, for a teacher loaded from one of our workdirs
    tokenizer: str | None = None  # the tokenizer of the teacher's training data, when known (our workdirs)

    def model(self) -> nnx.Module:
        return nnx.merge(self.graphdef, self.params)


def _bundle(model: nnx.Module, config: Any, source: str, bos_fallback: int | None) -> TeacherBundle:
    graphdef, state = nnx.split(model)
    kind = "gpt2" if type(model).__name__ == "GPT2" else "llama"
    bos = config.bos_id if config.bos_id is not None else bos_fallback
    if bos is None:
        raise ConfigError(f"the teacher at {source} does not declare a BOS token id; set it in its config")
    return TeacherBundle(
        graphdef=graphdef, params=nnx.to_pure_dict(state), config=config, kind=kind, bos_id=int(bos),
        vocab_size=config.vocab_size, max_len=config.max_len, source=source,
    )


def load_teacher_checkpoint(workdir: str, step: int | None = None) -> TeacherBundle:
    """Loads one checkpoint of one of our teacher runs (parameters only): ``step``, or the newest
    that loads (a damaged newer one is reported, logged and left in place)."""
    ckpt_dir = restore.checkpoints_dir(workdir)
    if not epath.Path(ckpt_dir).is_dir():  # also a gs:// teacher workdir
        raise ConfigError(
            f"no teacher checkpoint found: {ckpt_dir} does not exist. Train the teacher first:\n  {TEACHER_COMMAND}\n"
            "then pass --config.teacher.checkpoint=DIR"
        )
    with restore.reader(workdir) as mngr:
        available = restore.steps(mngr)
        if not available:
            raise ConfigError(f"{ckpt_dir} holds no finished checkpoint; train the teacher first:\n  {TEACHER_COMMAND}")
        if step is not None and step not in available:
            raise ConfigError(
                f"{ckpt_dir} holds no checkpoint of step {step}; the steps kept there are: "
                f"{', '.join(map(str, available))}"
            )
        bundle, _, _ = ckpt.select(
            mngr, lambda s: restore_teacher_step(mngr, workdir, s), step=step, steps=available,
            how="--config.teacher.step={}",
        )
    return bundle


def restore_teacher_step(mngr: Any, workdir: str, step: int) -> TeacherBundle:
    """One step of a teacher workdir (parameters only); CheckpointDamagedError when it does not
    read, ConfigError when it is not a teacher."""
    raw = restore.read_meta(mngr, step)["config"]
    if raw.get("task") != "teacher":
        raise ConfigError(
            f"{workdir} holds a checkpoint of task {raw.get('task')!r}, not an autoregressive teacher. "
            f"Point --config.teacher.checkpoint at a teacher workdir made by:\n  {TEACHER_COMMAND}"
        )
    saved = parse_config(ml_collections.ConfigDict(raw))
    model_cfg: LlamaConfig = saved.model
    graphdef, abstract_params = nnx.split(nnx.eval_shape(lambda: Llama(model_cfg, rngs=nnx.Rngs(0))))
    params = restore.restore_params(mngr, step, nnx.to_pure_dict(abstract_params))
    model = nnx.merge(graphdef, params)
    return dataclasses.replace(_bundle(model, model_cfg, f"{workdir} (step {step})", bos_fallback=1), step=step,
                               tokenizer=saved.data.tokenizer)


def load_teacher(section: dict, data_dir: str | None = None) -> TeacherBundle:
    """Teacher from ``section['checkpoint']`` (our workdir; ``section['step']``, 0 = its newest
    checkpoint) or ``section['hf']`` (Hub id / HF dir)."""
    del data_dir  # teachers carry their own config; kept for a uniform call signature
    checkpoint, hf = section.get("checkpoint", ""), section.get("hf", "")
    step = section.get("step", 0) or 0
    if checkpoint and hf:
        raise ConfigError("set only one of config.teacher.checkpoint and config.teacher.hf")
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise ConfigError(f"config.teacher.step must be a checkpoint step >= 0 (0 = the newest), got {step!r}")
    if step and not checkpoint:
        raise ConfigError("config.teacher.step selects a checkpoint of config.teacher.checkpoint; set that too")
    if checkpoint:
        return load_teacher_checkpoint(checkpoint, step or None)
    if hf:
        model, config = load_hf_checkpoint(hf, dtype=section.get("dtype", "float32"))
        return _bundle(model, config, hf, bos_fallback=None)
    raise ConfigError(
        "no teacher given: set --config.teacher.checkpoint=DIR (a workdir of ours, made by "
        f"`{TEACHER_COMMAND}`) or --config.teacher.hf=gpt2 (a Hugging Face id or local HF directory)"
    )
