"""Ahead-of-time compilation for a TPU slice on a host without one (``discreteflow_jax.compile_check``).

The compile tests need libtpu (the TPU compiler; ``pip install -e .[tpu-compile]``) and skip
without it; the slice table, the FLOP counter and the error paths run everywhere.
"""

from __future__ import annotations

import importlib.util
import os

import jax
import jax.numpy as jnp
import pytest
from conftest import load_config

from discreteflow_jax import compile_check
from discreteflow_jax.config import parse_config
from discreteflow_jax.models import sharding as shd
from discreteflow_jax.training import chips
from discreteflow_jax.training.flops import matmul_flops

needs_libtpu = pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None,
    reason="libtpu is not installed (pip install -e '.[tpu-compile]'): no TPU compiler to compile for a slice",
)


def test_slices_from_topologies_and_accelerator_types():
    v5e = chips.parse_slice("v5litepod-8")
    assert (v5e.topology, v5e.chips, v5e.chip.hbm_gib, v5e.accelerator_type) == ("v5e:2x4", 8, 16.0, "v5litepod-8")
    v4 = chips.parse_slice("v4-8")  # 8 TensorCores = 4 megacore chips
    assert (v4.topology, v4.chips, v4.accelerator_type) == ("v4:2x2x1", 4, "v4-8")
    assert chips.parse_slice("v5e:4x8").accelerator_type == "v5litepod-32"
    for bad in ("v5e:2x2x1", "v9-8", "v4-7"):
        with pytest.raises(ValueError):
            chips.parse_slice(bad)


def test_flops_count_every_loop_iteration():
    def f(x, w):
        return jax.lax.scan(lambda c, _: (c @ w, None), x, None, length=4)[0]

    x, w = jnp.ones((8, 16)), jnp.ones((16, 16))
    flops, exact = matmul_flops(jax.make_jaxpr(f)(x, w))
    assert exact and flops == 4 * 2 * 8 * 16 * 16
    grad_flops, _ = matmul_flops(jax.make_jaxpr(jax.grad(lambda x, w: f(x, w).sum(), argnums=1))(x, w))
    assert grad_flops == 3 * flops  # forward, and two matmuls per step backward


def test_config_errors_are_one_line_before_any_compilation(capsys):
    code = compile_check.run(["--config=configs/shakespeare_baseline.py:smoke", "--topology=v5e:2x2",
                              "--config.model.dtype=float16"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error:") and len(err.strip().splitlines()) == 1 and "model.dtype" in err
    assert compile_check.run(["--config=configs/shakespeare_baseline.py:smoke", "--topology=v7:2x2"]) == 2
    assert "unknown TPU slice" in capsys.readouterr().err


def _smoke(**overrides):
    raw = load_config("shakespeare_baseline", "smoke")
    for dotted, value in overrides.items():
        section, field = dotted.split(".")
        raw[section][field] = value
    return parse_config(raw)


@needs_libtpu
def test_smoke_train_step_compiles_for_v5e_with_the_cpu_sharding_rules():
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    from discreteflow_jax.training import aot

    slice_ = chips.parse_slice("v5e:2x2")
    devices = aot.topology_devices(slice_)
    cfg = _smoke(**{"mesh.data": 1, "mesh.fsdp": 2, "mesh.tensor": 2})
    report = aot.check(cfg, "smoke", slice_, devices, eval_step=False, sampler=False)
    (train,) = report.programs
    assert report.fits and train.compiled is not None and 0 < train.total_bytes < 2**30
    assert train.flops > 0 and report.chip_hours > 0
    state_in = train.compiled.input_shardings[0][0]
    params = state_in.params
    assert {d.platform for d in jax.tree.leaves(params)[0].device_set} == {"tpu"}
    # The executable takes each parameter sharded as the rules table says (models/sharding.py).
    _, programs = aot.build_for_devices(cfg, devices)
    mesh = programs.mesh
    expected = shd.tree_shardings(programs.abstract_state.params, mesh)
    shapes = programs.abstract_state.params
    checked = jax.tree.map(lambda got, want, x: got.is_equivalent_to(want, len(x.shape)), params, expected, shapes)
    assert all(jax.tree.leaves(checked))
    specs = {str(s.spec) for s in jax.tree.leaves(expected)}
    assert any("tensor" in s for s in specs) and any("fsdp" in s for s in specs)  # the check has teeth


@needs_libtpu
def test_sharding_errors_are_one_line_before_any_compilation(capsys):
    code = compile_check.run(["--config=configs/shakespeare_baseline.py:smoke", "--topology=v5e:2x2",
                              "--config.mesh.data=1", "--config.mesh.tensor=4"])  # 2 heads
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "config.mesh.tensor=4" in err


@needs_libtpu
def test_oversized_config_is_reported_with_the_numbers(capsys):
    # Full [batch, length, vocab] logits of 256 sequences x 1024 tokens x 32000 per device (2 micro-batches).
    code = compile_check.run([
        "--config=configs/shakespeare_baseline.py:smoke", "--topology=v5e:2x2", "--skip_sampler", "--skip_eval",
        "--config.model.loss_chunk=0", "--config.train.batch_size=2048", "--config.data.seq_len=1024",
        "--config.model.max_len=1024",
    ])
    captured = capsys.readouterr()
    assert code == compile_check.NOT_FIT, captured
    assert "does not fit v5litepod-4" in captured.err
    assert "G" in captured.err and any(ch.isdigit() for ch in captured.err.split("train_step")[1][:200])
    assert "--config.train.grad_accum=" in captured.err and "--config.model.loss_chunk=128" in captured.err
