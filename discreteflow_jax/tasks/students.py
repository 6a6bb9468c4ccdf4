"""Building a flow student and the teacher it learns from: the teacher named by the config, the
checks that it can drive the student, and the student itself, cold (``TokenFlow``) or warm-started
on the teacher's decoder (``WarmFlow``, docs/warm_start.md).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from typing import Any

from flax import nnx

from discreteflow_jax.config import ConfigError, ExperimentConfig, TokenFlowConfig
from discreteflow_jax.io.teacher import TeacherBundle, load_teacher
from discreteflow_jax.models.gpt2 import GPT2
from discreteflow_jax.models.llama import Llama
from discreteflow_jax.models.tokenflow import TokenFlow
from discreteflow_jax.models.warmflow import WarmFlow, backbone_description, build_warmflow, warm_params

log = logging.getLogger("discreteflow_jax")

TEACHER_KINDS = ("llama", "gpt2")


def load_teacher_bundle(cfg: ExperimentConfig) -> TeacherBundle:
    """The teacher named by ``config.teacher``."""
    return load_teacher(dict(cfg.extra.get("teacher") or {}), data_dir=cfg.data.data_dir or None)


def check_teacher(teacher: Any, student: TokenFlowConfig, seq_len: int, tokenizer: str | None = None) -> None:
    """Raises ConfigError when the teacher cannot drive this student (``tokenizer``: the one of
    the student's data, compared with the teacher's when the teacher records it)."""
    source = getattr(teacher, "source", "the teacher")
    if teacher.kind not in TEACHER_KINDS:
        raise ConfigError(
            f"{source} is a {teacher.kind!r} model; Gumbel reflow needs one of: {', '.join(TEACHER_KINDS)}"
        )
    teacher_tokenizer = getattr(teacher, "tokenizer", None)
    if tokenizer and teacher_tokenizer and teacher_tokenizer != tokenizer:
        # Same ids would mean different text: the teacher's distribution would describe other tokens.
        raise ConfigError(
            f"the teacher ({source}) was trained on {teacher_tokenizer}-tokenized text (vocabulary "
            f"{teacher.vocab_size}) but the student reads {tokenizer} tokens (config.data.tokenizer={tokenizer!r}, "
            f"config.model.vocab_size={student.vocab_size}); set --config.data.tokenizer={teacher_tokenizer} "
            "and its vocabulary size, or use a teacher trained on the student's tokenizer"
        )
    if teacher.vocab_size != student.vocab_size:
        # G has one coordinate per teacher token and softmax(G)·E uses the student's embedding rows.
        raise ConfigError(
            f"the teacher ({source}) has a vocabulary of {teacher.vocab_size} tokens but the student has "
            f"config.model.vocab_size={student.vocab_size}; the student must use the teacher's tokenizer "
            f"(config.data.tokenizer) and vocabulary"
        )
    if teacher.max_len < seq_len:
        raise ConfigError(
            f"the teacher ({source}) handles at most {teacher.max_len} tokens but config.data.seq_len={seq_len}; "
            f"shorten --config.data.seq_len to <= {teacher.max_len}"
        )
    if teacher.bos_id is None or not 0 <= teacher.bos_id < teacher.vocab_size:
        raise ConfigError(f"the teacher ({source}) has no valid BOS token id (got {teacher.bos_id!r})")


def teacher_graphdef(teacher: Any, dtype: str | None) -> Any:
    """The teacher's graph, with its compute dtype replaced when ``dtype`` differs (parameters
    stay fp32; e.g. a bf16 teacher forward from an fp32 checkpoint)."""
    if not dtype or dtype == teacher.config.dtype:
        return teacher.graphdef
    if dtype not in ("float32", "bfloat16"):
        raise ConfigError(f"config.teacher.dtype={dtype!r} is not a valid choice; use float32 or bfloat16")
    config = dataclasses.replace(teacher.config, dtype=dtype)
    cls = GPT2 if teacher.kind == "gpt2" else Llama
    return nnx.split(nnx.eval_shape(lambda: cls(config, rngs=nnx.Rngs(0))))[0]


@dataclasses.dataclass
class StudentFactory:
    """``create_model(rngs)`` builds the student (random weights); ``init_params(params)`` turns the
    freshly initialized pure parameter dict into the one training starts from (the teacher's weights
    for a warm student; None: keep the random ones)."""

    create_model: Callable[[nnx.Rngs], nnx.Module]
    init_params: Callable[[dict], dict] | None = None
    identity: dict = dataclasses.field(default_factory=dict)  # recorded in checkpoints (Task.identity)


def student_factory(model_cfg: TokenFlowConfig, teacher: TeacherBundle | None) -> StudentFactory:
    """A cold TokenFlow, or (``model_cfg.warm_start``) a WarmFlow on ``teacher``'s decoder."""
    if not model_cfg.warm_start:
        return StudentFactory(lambda rngs: TokenFlow(model_cfg, rngs=rngs))
    if teacher is None:
        raise ConfigError("config.model.warm_start=True needs a teacher: set --config.teacher.checkpoint=DIR "
                          "or --config.teacher.hf=gpt2")
    if teacher.kind not in TEACHER_KINDS:
        raise ConfigError(f"config.model.warm_start=True: {teacher.source} is a {teacher.kind!r} model; a warm "
                          f"start needs one of: {', '.join(TEACHER_KINDS)}")
    if teacher.vocab_size != model_cfg.vocab_size:
        raise ConfigError(f"config.model.warm_start=True: the teacher ({teacher.source}) has {teacher.vocab_size} "
                          f"tokens but config.model.vocab_size={model_cfg.vocab_size}; use the teacher's tokenizer")
    backbone_cfg = teacher.config
    shape = (backbone_cfg.dim, backbone_cfg.num_layers, backbone_cfg.num_heads)
    if shape != (model_cfg.dim, model_cfg.num_layers, model_cfg.num_heads):
        log.info("warm start: the student takes the teacher's shape (dim %d, %d layers, %d heads), not the "
                 "config's (dim %d, %d layers, %d heads)", *shape, model_cfg.dim, model_cfg.num_layers,
                 model_cfg.num_heads)
    description = backbone_description(teacher.kind, dataclasses.replace(backbone_cfg, dtype="float32"),
                                       int(teacher.bos_id))

    def create_model(rngs: nnx.Rngs) -> WarmFlow:
        return build_warmflow(model_cfg, description, rngs)

    return StudentFactory(create_model, lambda params: warm_params(params, teacher.params,
                                                                   flow_init=model_cfg.warm_flow_init),
                          identity={"warm_backbone": description})
