"""TokenFlow language models and Gumbel reflow distillation in JAX/Flax.

The Python API (``load``, ``TokenFlowModel``, ``TeacherModel``, ``LoadError``, ``continue_prefixes``,
``export_model``) is imported on first use, so ``import discreteflow_jax.data`` and the
command-line entry points do not pay for it and no submodule can run into a circular import
through this file.
"""

from __future__ import annotations

from typing import Any

_API = {
    "load": "discreteflow_jax.inference.load",
    "LoadError": "discreteflow_jax.inference.load",
    "TokenFlowModel": "discreteflow_jax.inference.flow_model",
    "TeacherModel": "discreteflow_jax.inference.teacher_model",
    "continue_prefixes": "discreteflow_jax.inference.batches",
    "export_model": "discreteflow_jax.inference.export",
}

__all__ = sorted(_API)


def __getattr__(name: str) -> Any:
    if name in _API:
        import importlib

        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'discreteflow_jax' has no attribute {name!r}")
