"""The task registry: ``build_task(cfg)`` returns the ``Task`` of ``cfg.task``."""

from __future__ import annotations

from typing import Any

from discreteflow_jax.config import ExperimentConfig
from discreteflow_jax.tasks.base import Task, summarize_flow
from discreteflow_jax.tasks.gumbel import gumbel_task
from discreteflow_jax.tasks.teacher import teacher_task
from discreteflow_jax.tasks.tokenflow import tokenflow_task

TASK_BUILDERS = {"tokenflow": tokenflow_task, "teacher": teacher_task, "gumbel": gumbel_task}


def build_task(cfg: ExperimentConfig, **kwargs: Any) -> Task:
    if cfg.task not in TASK_BUILDERS:
        raise ValueError(f"task {cfg.task!r} is not available; valid tasks: {', '.join(sorted(TASK_BUILDERS))}")
    return TASK_BUILDERS[cfg.task](cfg, **kwargs)


__all__ = ["TASK_BUILDERS", "Task", "build_task", "summarize_flow"]
