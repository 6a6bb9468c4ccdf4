"""Scale-out: sharding rules, remat, multi-device and multi-process equivalence, bad inputs,
preemption.

Multi-device cases run in subprocesses (``tests/scale_worker.py``): the number of simulated CPU
devices is fixed when JAX starts, and the rest of the suite expects one device. Every layout
trains the same tiny model for the same 3 steps on the same global batches, so the losses must
agree to float32 rounding.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from discreteflow_jax.config import TokenFlowConfig
from discreteflow_jax.models import sharding as shd
from discreteflow_jax.models.tokenflow import TokenFlow
from discreteflow_jax.training import distributed as dist

REPO = Path(__file__).resolve().parent.parent
WORKER = REPO / "tests" / "scale_worker.py"
DATA_DIR = REPO.parent / "shared" / "data"
LAYOUTS_8 = ("8x1x1", "2x4x1", "1x4x2")  # pure data parallel, 2 data × 4 FSDP, 4 FSDP × 2 tensor
TOL = 1e-5
HAS_GUMBEL = (REPO / "configs" / "shakespeare_gumbel.py").exists()
TEST_SETTINGS = ("JAX_COMPILATION_CACHE_DIR", "JAX_PERSISTENT_CACHE_")
TASKS = ["tokenflow", pytest.param("gumbel", marks=pytest.mark.skipif(not HAS_GUMBEL, reason="no Gumbel config"))]


# -- subprocess helpers ------------------------------------------------------------------------
def _env(devices: int) -> dict[str, str]:
    # The workers start clean of the caller's JAX/cluster settings, except the test run's
    # compilation cache and XLA flags (tests/conftest.py), so they compile as the caller does.
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("JAX_", "XLA_", "SLURM_", "TPU_")) or k.startswith(TEST_SETTINGS)}
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}".strip()
    env.update(XLA_FLAGS=flags, JAX_PLATFORMS="cpu")
    return env


def _result(stdout: str, stderr: str) -> dict:
    lines = [line for line in stdout.splitlines() if line.startswith('{"process"')]
    assert lines, f"the worker printed no result\nstdout:\n{stdout[-3000:]}\nstderr:\n{stderr[-3000:]}"
    return json.loads(lines[-1])["result"]


def run_worker(args: list[str], devices: int = 1, timeout: float = 600) -> dict:
    proc = subprocess.run(
        [sys.executable, str(WORKER), *args], env=_env(devices), capture_output=True, text=True, timeout=timeout,
        cwd=REPO,
    )
    assert proc.returncode == 0, f"worker failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return _result(proc.stdout, proc.stderr)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def run_two_processes(args: list[str], devices_each: int = 4, timeout: float = 600) -> list[dict]:
    """Starts the worker as processes 0 and 1 of one JAX runtime on localhost; returns both results."""
    port = free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), *args, f"--coordinator_address=localhost:{port}", "--num_processes=2",
             f"--process_id={i}"],
            env=_env(devices_each), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
        )
        for i in range(2)
    ]
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=timeout))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, f"process failed ({p.returncode}):\n{out[-3000:]}\n{err[-5000:]}"
    return [_result(out, err) for out, err in outs]


def assert_same_run(run: dict, ref: dict, what: str) -> None:
    np.testing.assert_allclose(run["losses"], ref["losses"], rtol=0, atol=TOL, err_msg=f"{what}: losses")
    np.testing.assert_allclose(run["grad_norms"], ref["grad_norms"], rtol=TOL, atol=TOL, err_msg=f"{what}: grad norms")
    np.testing.assert_allclose(run["param_sq"], ref["param_sq"], rtol=TOL, err_msg=f"{what}: parameters")


@pytest.fixture(scope="module")
def reference_runs(request) -> dict:
    """{task: (1-device result, {layout: 8-device result})}, both subprocesses run concurrently."""
    cache: dict = {}

    def get(task: str):
        if task not in cache:
            with ThreadPoolExecutor(2) as pool:
                one = pool.submit(run_worker, ["equiv", "--layouts=1x1x1", f"--task={task}"], 1)
                eight = pool.submit(run_worker, ["equiv", f"--layouts={','.join(LAYOUTS_8)}", f"--task={task}"], 8)
                cache[task] = (one.result()["1x1x1"], eight.result())
        return cache[task]

    return get


# -- logical-axis rules ------------------------------------------------------------------------
def _abstract_params(make) -> dict:
    return nnx.to_pure_dict(nnx.state(nnx.eval_shape(lambda: make(nnx.Rngs(0)))))


def _models() -> dict:
    from discreteflow_jax.models.gpt2 import GPT2, GPT2Config
    from discreteflow_jax.models.llama import Llama, LlamaConfig

    base = TokenFlowConfig(vocab_size=64, dim=32, num_layers=2, num_heads=2, max_len=16)
    gpt2_fields = {"vocab_size": 64, "dim": 32, "num_layers": 2, "num_heads": 2, "max_len": 16}
    return {
        "tokenflow_tied": lambda r: TokenFlow(base, rngs=r),
        "tokenflow_untied_cross": lambda r: TokenFlow(
            TokenFlowConfig(**{**base.__dict__, "tie_embeddings": False, "cross_attention": True}), rngs=r),
        "llama": lambda r: Llama(LlamaConfig(vocab_size=64, dim=32, num_layers=2, num_heads=4, num_kv_heads=2,
                                             ffn_hidden=64, max_len=16, tie_embeddings=False), rngs=r),
        "gpt2": lambda r: GPT2(GPT2Config(**gpt2_fields), rngs=r),
    }


@pytest.mark.parametrize("name", ["tokenflow_tied", "tokenflow_untied_cross", "llama", "gpt2"])
def test_rules_cover_every_matrix(name):
    params = _abstract_params(_models()[name])
    assert shd.unmatched_params(params) == []
    # Embeddings are sharded on both axes; GPT-2's position table is not mistaken for a vocabulary.
    flat = {shd._path_str(p): shd.param_logical_axes(shd._path_str(p), len(x.shape))
            for p, x in jax.tree_util.tree_leaves_with_path(params)}
    emb = {k: v for k, v in flat.items() if k.endswith("embedding")}
    assert emb and all(v in (("vocab", "embed"), (None, "embed")) for v in emb.values())
    if name == "gpt2":
        assert flat["wpe/embedding"] == (None, "embed")


def test_param_shardings_accept_nnx_state_and_pure_dicts():
    mesh = shd.make_mesh(1, 1, 1)
    model = nnx.eval_shape(lambda: TokenFlow(TokenFlowConfig(vocab_size=64, dim=32, num_layers=1, num_heads=2),
                                             rngs=nnx.Rngs(0)))
    state = nnx.state(model)
    from_state = jax.tree.leaves(shd.param_shardings(state, mesh))
    from_dict = jax.tree.leaves(shd.param_shardings(nnx.to_pure_dict(state), mesh))
    assert [s.spec for s in from_state] == [s.spec for s in from_dict]
    assert shd.P("tensor", "fsdp") in [s.spec for s in from_dict]


def test_divisibility_strict_and_replicated_fallback():
    mesh = jax.sharding.AbstractMesh((2, 2, 2), shd.MESH_AXES)
    with pytest.raises(shd.ShardingError, match=r"size 50257 .* tensor of size 2"):
        shd.param_spec("wte/embedding", (50257, 768), mesh)
    # Frozen inputs (a GPT-2 teacher): the vocabulary dimension is replicated, embed stays sharded.
    assert shd.param_spec("wte/embedding", (50257, 768), mesh, strict=False) == shd.P(None, "fsdp")


def test_activation_axes_never_reuse_a_mesh_axis():
    # batch takes data×fsdp, so embed (rule: fsdp) is replicated: the Megatron layout between blocks.
    assert shd.logical_to_spec(("batch", "length", "embed")) == shd.P(("data", "fsdp"), None, None)
    assert shd.logical_to_spec(("batch", "length", "vocab")) == shd.P(("data", "fsdp"), None, "tensor")
    assert shd.logical_to_spec(("vocab", "embed")) == shd.P("tensor", "fsdp")


def _tiny_forward_jaxpr(remat: str = "none") -> str:
    cfg = TokenFlowConfig(vocab_size=64, dim=32, num_layers=2, num_heads=2, max_len=8, remat=remat)
    model = TokenFlow(cfg, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    x = jnp.zeros((2, 8, 32))
    return str(jax.make_jaxpr(lambda p: nnx.merge(graphdef, p)(x, jnp.full((2,), 0.5)))(params))


def test_constraints_only_under_a_multi_device_mesh():
    assert "sharding_constraint" not in _tiny_forward_jaxpr()
    with shd.activation_mesh(shd.make_mesh(1, 1, 1)):  # one device: still no constraint ops
        assert "sharding_constraint" not in _tiny_forward_jaxpr()
    # With several devices the constraints are present; the subprocess tests below cover that case.


# -- remat ---------------------------------------------------------------------------------------
def test_remat_policies_give_the_same_loss_and_gradients():
    from discreteflow_jax import flow

    tokens = jax.random.randint(jax.random.key(1), (4, 8), 0, 32)
    mask = jnp.ones(tokens.shape)
    results = {}
    for policy in ("none", "full", "save_dots"):
        cfg = TokenFlowConfig(vocab_size=32, dim=16, num_layers=2, num_heads=2, max_len=8, time_features=16,
                              remat=policy)
        graphdef, params = nnx.split(TokenFlow(cfg, rngs=nnx.Rngs(0)))

        def loss(p):
            return flow.flow_loss(nnx.merge(graphdef, p), tokens, mask, jax.random.key(2))[0]

        results[policy] = jax.jit(jax.value_and_grad(loss))(params)
    ref_loss, ref_grads = results["none"]
    for policy in ("full", "save_dots"):
        value, grads = results[policy]
        np.testing.assert_allclose(value, ref_loss, rtol=1e-6)
        for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    assert "remat" in _tiny_forward_jaxpr("full")  # the policy really wraps the blocks


# -- multi-device and multi-process equivalence ----------------------------------------------------
@pytest.mark.parametrize("task", TASKS)
def test_same_loss_on_1_and_8_devices_in_every_layout(task, reference_runs):
    one, eight = reference_runs(task)
    assert len(one["losses"]) == 3 and np.all(np.isfinite(one["losses"])) and min(one["grad_norms"]) > 0
    if task == "tokenflow":  # (the Gumbel targets come from a random teacher: no trend in 3 steps)
        assert one["losses"][-1] < one["losses"][0]
    for layout in LAYOUTS_8:
        run = eight[layout]
        assert run["mesh"] == dict(zip(shd.MESH_AXES, map(int, layout.split("x"))))
        assert_same_run(run, one, f"{task} {layout} vs 1 device")


@pytest.mark.parametrize("task", TASKS)
def test_two_processes_match_one_process(task, reference_runs):
    # 4 FSDP × 2 tensor: parameter all-gathers and reduce-scatters cross the process boundary, and
    # each process feeds only its half of the global batch.
    layout = "1x4x2"
    results = run_two_processes(["equiv", f"--layouts={layout}", f"--task={task}"])
    one, eight = reference_runs(task)
    for proc, result in enumerate(results):
        assert_same_run(result[layout], eight[layout], f"{task} process {proc} vs single-process 8 devices")
        assert_same_run(result[layout], one, f"{task} process {proc} vs 1 device")


@pytest.mark.slow
def test_two_processes_checkpoint_and_resume(tmp_path):
    workdir = str(tmp_path / "run")
    results = run_two_processes(["run", "--layouts=2x4x1", f"--workdir={workdir}", "--steps=4,6", "--every=2"])
    for result in results:
        assert [(r["start"], r["step"]) for r in result["runs"]] == [(0, 4), (4, 6)]
        assert result["checkpoints"][-1] == 6
    # Only process 0 writes metrics and samples.
    assert {"metrics.jsonl", "samples", "checkpoints"} <= set(results[0]["files"])
    assert sorted(os.listdir(os.path.join(workdir, "samples")))[-1] == "step_0000006.txt"


def test_two_processes_resume_small(tmp_path):
    """The default suite's version of the slow test above: one device per process, a pure
    data-parallel mesh, no samples, a checkpoint at step 2 that a second run of both processes resumes."""
    workdir = str(tmp_path / "run")
    results = run_two_processes(["run", "--layouts=2x1x1", f"--workdir={workdir}", "--steps=2,3", "--every=2",
                                 "--sample_steps="], devices_each=1)
    for result in results:
        assert [(r["start"], r["step"]) for r in result["runs"]] == [(0, 2), (2, 3)]
        assert result["checkpoints"][-1] == 3
    assert results[0]["runs"][1]["loss"] == pytest.approx(results[1]["runs"][1]["loss"], rel=1e-6)
    assert "metrics.jsonl" in results[0]["files"] and results[1]["files"] == []
    steps = [json.loads(line)["step"] for line in open(os.path.join(workdir, "metrics.jsonl"))]
    assert steps == sorted(steps) and steps[-1] == 3  # one trajectory, resumed where it stopped


# -- bad inputs ------------------------------------------------------------------------------------
def test_bad_inputs_fail_before_compiling_with_numbers():
    result = run_worker(["errors"], devices=8)
    expected = {
        "mesh_product": ["data=2", "fsdp=3", "= 6", "8 devices"],
        "batch_divisible": ["12", "8 data-parallel shards", "multiple of 8"],
        "tensor_dim": ["embedding", "255", "tensor of size 2"],
        "tensor_heads": ["num_heads=2", "tensor=8"],
    }
    for case, parts in expected.items():
        got = result[case]
        assert got["error"] == "ShardingError", (case, got)
        assert got["compiles"] == 0, f"{case}: the error came after {got['compiles']} XLA compilations"
        for part in parts:
            assert part in got["message"], (case, part, got["message"])


def test_processes_must_agree_on_the_config():
    for result in run_two_processes(["config_mismatch"]):
        assert result["error"] == "ConfigError"
        assert "train.lr: 0.001 vs 0.002" in result["message"]


def test_distributed_settings_are_checked(monkeypatch):
    for var in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "SLURM_NTASKS",
                "TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES"):
        monkeypatch.delenv(var, raising=False)
    assert dist.initialize("auto") is False  # a plain single-process run
    assert dist.initialize("off", "localhost:1", 2, 0) is False
    with pytest.raises(dist.DistributedSetupError, match="missing num_processes, process_id"):
        dist.initialize("auto", coordinator_address="localhost:1234")
    monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
    monkeypatch.setenv("JAX_PROCESS_ID", "2")
    with pytest.raises(dist.DistributedSetupError, match="process_id=2, num_processes=2"):
        dist.initialize("auto", coordinator_address="localhost:1234")
    monkeypatch.setenv("JAX_NUM_PROCESSES", "1")
    monkeypatch.setenv("JAX_PROCESS_ID", "0")
    assert dist.initialize("auto", coordinator_address="localhost:1234") is False  # one process: nothing to start


# -- preemption -------------------------------------------------------------------------------------
def test_guard_turns_sigterm_into_a_flag():
    previous = signal.getsignal(signal.SIGTERM)
    with dist.PreemptionGuard() as guard:
        assert not guard.should_stop(1)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)  # the handler runs at the next bytecode boundary
        assert guard.should_stop(2) and guard.received == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) == previous


def _start_and_terminate(cmd: list[str], env: dict, ready: str, timeout: float = 300) -> tuple[int, str, str]:
    """Starts ``cmd``, sends SIGTERM once ``ready`` appears on stdout, returns (rc, stdout, stderr)."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    lines = []
    deadline = time.time() + timeout
    try:
        for line in proc.stdout:  # line-buffered: process 0 flushes every progress line
            lines.append(line)
            if ready in line:
                proc.send_signal(signal.SIGTERM)
                break
            if time.time() > deadline:
                raise TimeoutError(f"no {ready!r} within {timeout}s")
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, "".join(lines) + out, err


def test_sigterm_saves_a_checkpoint_and_the_run_resumes(tmp_path):
    """Stop a run with SIGTERM, rerun the same command: it resumes there, and stops again cleanly."""
    workdir = str(tmp_path / "run")
    cmd = [sys.executable, str(WORKER), "run", f"--workdir={workdir}", "--steps=100000", "--every=100000"]
    # The rerun compiles the very same programs: a persistent compilation cache halves the test's time.
    env = {**_env(1), "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "xla_cache"),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    stopped = 0
    for ready in ("step 3/", "step {}/"):
        rc, out, err = _start_and_terminate(cmd, env, ready=ready.format(stopped + 2))
        assert rc == 0, err[-3000:]
        result = _result(out, err)
        run = result["runs"][0]
        assert run["preempted"] and run["start"] == stopped and run["step"] >= max(3, stopped + 2)
        assert run["step"] in result["checkpoints"]
        stopped = run["step"]


@pytest.mark.slow
def test_sigterm_through_the_command_line(tmp_path):
    if not DATA_DIR.is_dir():
        pytest.skip(f"offline data folder {DATA_DIR} is absent")
    workdir = str(tmp_path / "run")
    cmd = [sys.executable, "-m", "discreteflow_jax.main", "--config=configs/shakespeare_baseline.py:smoke",
           f"--workdir={workdir}", f"--data_dir={DATA_DIR}", "--config.train.log_every=1",
           "--config.train.ckpt_every=100000", "--config.train.eval_every=100000"]
    env = {**_env(1), "PYTHONUNBUFFERED": "1"}
    rc, out, err = _start_and_terminate([*cmd, "--config.train.num_steps=100000"], env, ready="step 3/")
    assert rc == 0, err[-3000:]
    assert "preempted: checkpoint saved at step" in out and "rerun the same command to resume" in out
    stopped = int(out.split("preempted: checkpoint saved at step ")[1].split()[0])
    assert str(stopped) in os.listdir(os.path.join(workdir, "checkpoints"))
    proc = subprocess.run([*cmd, f"--config.train.num_steps={stopped + 2}"], env=env, capture_output=True,
                          text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"at step {stopped}" in proc.stderr and f"step {stopped + 2}/{stopped + 2}" in proc.stdout
