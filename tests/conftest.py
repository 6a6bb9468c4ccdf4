"""Shared test helpers: the offline data folder and loading config files by path."""

from __future__ import annotations

import atexit
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

# Tests never touch the network: Hub libraries must use local files only.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

# One XLA compilation cache for the whole run and the processes it starts (set before JAX is
# imported). Many tests train or sample the same smoke models, so most programs compile once and
# are then read back from disk (the xdist workers and subprocesses inherit the folder). A fresh
# folder per run keeps the run independent of earlier ones.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="discreteflow-jax-test-xla-")
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
# The tests' programs are tiny, so compiling them costs more than running them: XLA's backend
# optimizations off cut the CPU time of tests/test_flow.py by about a third. Numerics are unchanged in kind (no
# fast-math either way); set XLA_FLAGS yourself to test with the optimized backend.
os.environ.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0")


def load_config(name: str, variant: str | None = "smoke"):
    """get_config(variant) of configs/<name>.py."""
    spec = importlib.util.spec_from_file_location(f"cfg_{name}", REPO / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(variant)


@pytest.fixture
def data_dir() -> str:
    if not (SHARED_DATA / "tiny_shakespeare" / "input.txt").exists():
        pytest.skip(f"offline data folder not found at {SHARED_DATA}")
    return str(SHARED_DATA)


class _InputRecorder:
    """A model that records every (x_t, t) it is called with, then answers as the wrapped one."""

    def __init__(self, model, seen: list):
        self._model, self._seen = model, seen

    def __getattr__(self, name):
        return getattr(self._model, name)

    def __call__(self, x, t, *args):
        import jax
        import numpy as np

        jax.debug.callback(lambda x_, t_: self._seen.append((np.asarray(x_), np.asarray(t_))), x, t)
        return self._model(x, t, *args)


def record_network_inputs(monkeypatch) -> list:
    """[(x_t [B, T, d], t), ...]: what the network reads at every step of every flow sampler called
    afterwards (``flow.sample_flow``; also under jit). Checks on the sampler's input cannot be
    passed by the copy of known tokens into its output."""
    from discreteflow_jax import flow

    seen: list = []
    real = flow.sample_flow
    monkeypatch.setattr(flow, "sample_flow", lambda model, *a, **kw: real(_InputRecorder(model, seen), *a, **kw))
    return seen
