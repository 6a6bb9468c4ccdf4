"""The full experiments users launch on a pod must at least trace: the train step, validation
step and sampler of every config's full variant, lowered on 8 simulated devices (no compile, no
model-size arrays). Runs in a subprocess (``tests/trace_worker.py``): the device count is fixed
when JAX starts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
CONFIGS = sorted(p.stem for p in (REPO / "configs").glob("*.py"))


def trace_on_8_devices(names: list[str], *options: str) -> dict[str, dict]:
    """{config: what tests/trace_worker.py reports} for the full variants of ``names``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_"))}
    env.update(XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "trace_worker.py"), *options, *names], env=env,
                          cwd=REPO, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, f"tracing failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    results = {r["config"]: r for r in map(json.loads, proc.stdout.strip().splitlines()[-len(names):])}
    assert sorted(results) == sorted(names)
    return results


def test_reduced_full_variant_traces_on_8_devices():
    """The default suite's version: the full FineWeb Gumbel variant (GPT-2 teacher, context 1024,
    the full batch over an 8-way mesh) with a one-layer student."""
    result = trace_on_8_devices(["fineweb_gumbel"], "--layers=1")["fineweb_gumbel"]
    assert result["devices"] == 8 and result["mesh"]["data"] == 8, result
    assert result["seq_len"] == 1024 and result["sample_shape"][1] == 1024, result
    assert result["params"] > 20_000_000, result  # full widths and vocabulary: 50257 × 768 twice


@pytest.mark.slow
def test_full_variants_trace_on_8_devices():
    results = trace_on_8_devices(CONFIGS)
    for name, r in results.items():
        assert r["devices"] == 8 and r["mesh"]["data"] == 8, r
        assert r["params"] > 20_000_000, r  # the full sizes, not a shrunk variant
        if r["sample_shape"] is not None and "teacher" not in name:
            assert r["sample_shape"][1] == (1024 if name.startswith("fineweb") else 128), r
