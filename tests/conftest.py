"""Shared test helpers: the offline data folder and loading config files by path."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

# Tests never touch the network: Hub libraries must use local files only.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


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
