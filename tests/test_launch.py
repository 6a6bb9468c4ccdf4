"""The launch scripts: their --dry-run output is the exact command list, and they are shellcheck-clean."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

LAUNCH = Path(__file__).resolve().parent.parent / "launch"
SCRIPTS = ["common.sh", "tpu.sh", "gpu.sh", "slurm.sh"]


def dry_run(script: str, *args: str, extra: tuple[str, ...] = ()) -> list[str]:
    """The `+ command` lines of a dry run; ``extra`` goes after `--` (to discreteflow_jax.main)."""
    cmd = ["bash", str(LAUNCH / script), *args, "--dry-run"] + (["--", *extra] if extra else [])
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=LAUNCH.parent)
    assert proc.returncode == 0, proc.stderr
    return [line for line in proc.stdout.splitlines() if line.startswith("+ ")]


def test_tpu_up_creates_installs_and_runs_on_every_worker():
    cmds = dry_run(
        "tpu.sh", "up", "--name", "df", "--zone", "us-central2-b", "--type", "v4-8", "--spot",
        "--config", "configs/fineweb_baseline.py", "--workdir", "gs://bucket/fb",
        extra=("--config.causal=True", "--config.sample.eval_steps=(1, 8)"),
    )
    create, archive, scp, setup, check, start = cmds
    assert create == ("+ gcloud compute tpus tpu-vm create df --zone=us-central2-b --accelerator-type=v4-8 "
                      "--version=tpu-ubuntu2204-base --spot")
    assert "git -C" in archive and "archive --format=tar.gz" in archive and archive.endswith(" HEAD")
    assert "tpu-vm scp" in scp and "--worker=all" in scp
    assert "--worker=all" in setup and "jax[tpu]>=0.10.2,<0.11" in setup and "[ -x .venv/bin/python ] ||" in setup
    # Pre-flight: the same experiment compiled for the slice on worker 0 before training starts.
    assert "--worker=0" in check and "python -m discreteflow_jax.compile_check --topology=v4-8" in check
    assert "--config=configs/fineweb_baseline.py --config.causal=True" in check and "exit 1" in check
    assert "--workdir" not in check.split("compile_check")[1]
    assert "--worker=all" in start
    for part in ("--distributed=on", "--config=configs/fineweb_baseline.py", "--workdir=gs://bucket/fb",
                 "--config.causal=True", "nohup", "discreteflow_run.pid"):
        assert part in start, part
    assert "'\\''--config.sample.eval_steps=(1, 8)'\\''" in start  # quoted for the remote shell


@pytest.mark.parametrize("tpu_type,version", [("v5litepod-8", "v2-alpha-tpuv5-lite"), ("v4-8", "tpu-ubuntu2204-base")])
def test_tpu_versions_logs_stop_delete(tpu_type, version):
    (create,) = dry_run("tpu.sh", "create", "--name", "df", "--type", tpu_type, "--preemptible", "--project", "p")
    assert f"--version={version}" in create and "--preemptible" in create and "--project=p" in create
    (logs,) = dry_run("tpu.sh", "logs", "--name", "df", "--type", tpu_type, "--worker", "1")
    assert "--worker=1" in logs and "tail -n 200 -F $HOME/discreteflow_run.log" in logs
    (stop,) = dry_run("tpu.sh", "stop", "--name", "df", "--type", tpu_type)
    assert "kill -TERM $(cat $HOME/discreteflow_run.pid)" in stop and "--worker=all" in stop
    (delete,) = dry_run("tpu.sh", "delete", "--name", "df", "--type", tpu_type)
    assert delete.startswith("+ gcloud compute tpus tpu-vm delete df") and delete.endswith("--quiet")


def test_tpu_preflight_can_be_skipped_and_run_here():
    args = ("--name", "df", "--type", "v5litepod-8", "--config", "configs/fineweb_gumbel.py", "--workdir", "gs://b/g")
    (start,) = dry_run("tpu.sh", "run", *args, "--no-preflight")
    assert "discreteflow_jax.main" in start
    (check,) = dry_run("tpu.sh", "check", "--type", "v5litepod-8", "--config", "configs/fineweb_gumbel.py",
                       extra=("--config.train.grad_accum=8", "--data_dir=/d"))
    assert check == ("+ python3 -m discreteflow_jax.compile_check --topology=v5litepod-8 "
                     "--config=configs/fineweb_gumbel.py --config.train.grad_accum=8")


def test_tpu_run_requires_config_and_workdir():
    proc = subprocess.run(["bash", str(LAUNCH / "tpu.sh"), "run", "--dry-run"], capture_output=True, text=True)
    assert proc.returncode == 2 and "needs --config" in proc.stderr


def test_gpu_setup_and_run():
    setup = dry_run("gpu.sh", "setup", "--cuda", "12", "--venv", "/opt/venv")
    assert any("pip install -q -e" in c and "'jax[cuda12]>=0.10.2,<0.11'" in c for c in setup)
    (run,) = dry_run("gpu.sh", "run", "--config", "configs/fineweb_gumbel.py", "--workdir", "runs/fg",
                     "--gpus", "0,1,2,3", extra=("--config.causal=True",))
    assert run.startswith("+ env PYTHONUNBUFFERED=1 CUDA_VISIBLE_DEVICES=0,1,2,3 ")
    assert run.endswith("/.venv/bin/python -m discreteflow_jax.main --distributed=off "
                        "--config=configs/fineweb_gumbel.py --workdir=runs/fg --config.causal=True")
    background = dry_run("gpu.sh", "run", "--config", "configs/x.py", "--workdir", "runs/x", "--background")
    assert background[0] == "+ mkdir -p runs/x" and "nohup env" in background[1] and "runs/x/run.log" in background[1]
    (stop,) = dry_run("gpu.sh", "stop", "--workdir", "runs/x")
    assert stop.startswith("+ kill -TERM")


@pytest.mark.parametrize("per_gpu", [False, True])
def test_slurm_submits_one_process_per_node_or_per_gpu(per_gpu):
    args = ["--nodes", "2", "--gpus-per-node", "8", "--config", "configs/fineweb_baseline.py", "--workdir", "/nfs/fb",
            "--partition", "gpu"] + (["--per-gpu"] if per_gpu else [])
    lines = dry_run("slurm.sh", *args, extra=("--config.causal=True",))
    exports = [line for line in lines if line.startswith("+ export ")]
    assert exports == ([] if per_gpu else ["+ export JAX_LOCAL_DEVICE_IDS=0,1,2,3,4,5,6,7"])
    mkdir, sbatch, srun = [line for line in lines if line not in exports]
    assert mkdir == "+ mkdir -p /nfs/fb"
    tasks = 8 if per_gpu else 1
    for part in ("sbatch ", "--nodes=2", f"--ntasks-per-node={tasks}", "--gpus-per-node=8", "--signal=TERM@120",
                 "--partition=gpu", "--wrap=", "--in-job", "--config.causal=True"):
        assert part in sbatch, part
    assert f"srun --kill-on-bad-exit=1 --ntasks-per-node={tasks}" in srun and "--distributed=auto" in srun
    assert f"# {2 * tasks} processes" in srun


def test_slurm_job_side_exports_all_gpus_for_one_process_per_node():
    proc = subprocess.run(
        ["bash", str(LAUNCH / "slurm.sh"), "--in-job", "--nodes", "2", "--gpus-per-node", "4", "--config", "c.py",
         "--workdir", "/nfs/w"], capture_output=True, text=True, env={"DRY_RUN": "1", "PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 0, proc.stderr
    assert "JAX_LOCAL_DEVICE_IDS=0,1,2,3" in proc.stdout and "+ srun" in proc.stdout


@pytest.mark.parametrize("script", SCRIPTS)
def test_shellcheck_clean(script):
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (apt-get install -y shellcheck)")
    proc = subprocess.run(["shellcheck", "-x", str(LAUNCH / script)], capture_output=True, text=True,
                          cwd=LAUNCH.parent)
    assert proc.returncode == 0, proc.stdout
