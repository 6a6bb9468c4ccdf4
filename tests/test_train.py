"""End-to-end training on the smoke config: train, resume, sample, interruption, divergence."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO, load_config

from discreteflow_jax import checkpoint as ckpt
from discreteflow_jax import experiment
from discreteflow_jax.presets import set_fields
from discreteflow_jax.tasks import build_task
from discreteflow_jax.train import Trainer, TrainingDivergedError


def smoke(**overrides):
    return set_fields(load_config("shakespeare_baseline", "smoke"), overrides)


def params_of(result) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.tree.leaves(result["state"].params)]


def test_train_resume_and_sample(tmp_path, data_dir, monkeypatch):
    import discreteflow_jax as dfj
    from discreteflow_jax.data import tokenizers
    from discreteflow_jax.evaluate import validation_loss
    from discreteflow_jax.export import export_workdir

    workdir = str(tmp_path / "run")
    first = experiment.run(smoke(**{"train.num_steps": 3}), workdir, data_dir=data_dir)
    assert int(first["state"].step) == 3
    # Same command, longer schedule: resumes from step 3 instead of starting over.
    second = experiment.run(smoke(**{"train.num_steps": 6}), workdir, data_dir=data_dir)
    assert int(second["state"].step) == 6
    lines = [json.loads(x) for x in open(os.path.join(workdir, "metrics.jsonl"))]
    train_steps = [x["step"] for x in lines if "train/loss" in x]
    assert train_steps == [2, 3, 4, 6]  # every log_every=2 step and the checkpoint at 3, none twice
    losses = [x["train/loss"] for x in lines if "train/loss" in x]
    assert all(0 < loss < 50 for loss in losses)
    evals = {x["step"]: x for x in lines if "val/loss" in x}
    assert sorted(evals) == [3, 6]
    buckets = [k for k in evals[6] if k.startswith("val/loss_t")]
    # 8 validation windows, one stratified t each: 8 of the 10 t-buckets at most, most of them hit.
    assert 5 <= len(buckets) <= 8 and all(np.isfinite(evals[6][k]) for k in buckets)

    # The workdir carries its tokenizer: it loads with no data folder and no Hub.
    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(tokenizers, "_hf_download", offline)
    monkeypatch.delenv("DISCRETEFLOW_DATA_DIR", raising=False)
    model = dfj.load(workdir)
    assert model.step == 6
    for a, b in zip(params_of(second), jax.tree.leaves(model.params)):
        np.testing.assert_array_equal(a, np.asarray(b))
    # The logged validation loss is the one the saved model has on the same windows.
    _, _, dataset = experiment.prepare(smoke(**{"train.num_steps": 6}), data_dir)
    assert validation_loss(model, dataset)["loss"] == pytest.approx(evals[6]["val/loss"], rel=1e-5)
    out = export_workdir(workdir, str(tmp_path / "export"))
    assert os.path.isfile(os.path.join(out, "llama_tokenizer", "tokenizer.model"))
    assert dfj.load(out).sample(1, 2, seed=0, prompt="ROMEO:")[0].startswith("ROMEO:")


def test_interrupted_run_matches_uninterrupted(tmp_path, data_dir, monkeypatch):
    straight = experiment.run(smoke(), str(tmp_path / "a"), data_dir=data_dir)

    # Stop after step 2 (not a checkpoint step) through the preemption path, then rerun.
    from discreteflow_jax import distributed as dist

    real = dist.PreemptionGuard.should_stop
    monkeypatch.setattr(dist.PreemptionGuard, "should_stop", lambda self, step: step == 2)
    stopped = experiment.run(smoke(), str(tmp_path / "b"), data_dir=data_dir)
    assert stopped["preempted"] and stopped["step"] == 2
    monkeypatch.setattr(dist.PreemptionGuard, "should_stop", real)
    resumed = experiment.run(smoke(), str(tmp_path / "b"), data_dir=data_dir)
    assert int(resumed["state"].step) == 6
    for a, b in zip(params_of(straight), params_of(resumed)):
        np.testing.assert_array_equal(a, b)


def test_divergence_stops_and_keeps_last_good_checkpoint(tmp_path, data_dir):
    workdir = str(tmp_path / "run")
    good = experiment.run(smoke(**{"train.num_steps": 3}), workdir, data_dir=data_dir)
    cfg, tokenizer, dataset = experiment.prepare(smoke(), data_dir)
    task = build_task(cfg)
    real_loss = task.loss_fn

    def nan_loss(model, aux, tokens, key):
        loss, sums = real_loss(model, aux, tokens, key)
        return loss * jnp.nan, dict(sums, loss_sum=sums["loss_sum"] * jnp.nan)

    task.loss_fn = nan_loss
    trainer = Trainer(cfg, task, workdir, dataset, tokenizer)
    with pytest.raises(TrainingDivergedError, match="last good checkpoint"):
        trainer.run()
    trainer.ckpt.wait_until_finished()
    assert trainer.ckpt.latest_step() == 3
    restored, _ = ckpt.restore(trainer.ckpt, 3, trainer.abstract_state)
    for a, b in zip(params_of(good), [np.asarray(x) for x in jax.tree.leaves(restored.params)]):
        np.testing.assert_array_equal(a, b)


def test_mismatched_checkpoint_is_refused(tmp_path, data_dir):
    workdir = str(tmp_path / "run")
    experiment.run(smoke(**{"train.num_steps": 3}), workdir, data_dir=data_dir)
    with pytest.raises(ckpt.CheckpointMismatchError, match="model.dim: checkpoint has 32, this run has 64"):
        experiment.run(smoke(**{"model.dim": 64}), workdir, data_dir=data_dir)


def test_compute_only_fields_do_not_block_resume():
    saved = {"task": "tokenflow", "model": {"dim": 32, "remat": "none"}, "data": {"name": "shakespeare"}}
    # A checkpoint written before model.loss_chunk existed, resumed with a chunked loss and remat.
    ckpt.check_compatible(saved, {"task": "tokenflow", "model": {"dim": 32, "remat": "full", "loss_chunk": 128},
                                  "data": {"name": "shakespeare"}}, "run")
    with pytest.raises(ckpt.CheckpointMismatchError, match="model.dim"):
        ckpt.check_compatible(saved, {"task": "tokenflow", "model": {"dim": 64, "loss_chunk": 128},
                                      "data": {"name": "shakespeare"}}, "run")


def test_cli_reports_bad_config_without_traceback(tmp_path, data_dir):
    env = dict(os.environ, DISCRETEFLOW_DATA_DIR=data_dir, JAX_PLATFORMS="cpu")
    cmd = [
        sys.executable, "-m", "discreteflow_jax.main", f"--config={REPO}/configs/shakespeare_baseline.py:smoke",
        f"--workdir={tmp_path}/run", "--config.flow.time_sampler=bogus",
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 2
    assert "uniform, logit_normal, power" in out.stderr
    assert "Traceback" not in out.stderr



def test_gumbel_and_teacher_fields_are_identity():
    saved = {"task": "gumbel", "model": {"dim": 32},
             "gumbel": {"conditioning": "cross_attention", "tau": 1.0, "chunk_size": 0, "sample_temperature": 1.0},
             "teacher": {"checkpoint": "runs/teacher", "hf": "", "dtype": "float32", "step": 0}}
    changed = json.loads(json.dumps(saved))
    changed["gumbel"].update(conditioning="x0", tau=0.5)
    changed["teacher"]["checkpoint"] = "runs/other_teacher"
    with pytest.raises(ckpt.CheckpointMismatchError) as err:
        ckpt.check_compatible(saved, changed, "run")
    text = str(err.value)
    for field in ("gumbel.conditioning", "gumbel.tau", "teacher.checkpoint"):
        assert f"{field}: checkpoint has" in text
    # Chunking, sampling temperature and pinning the teacher step that was already used are no change.
    same = json.loads(json.dumps(saved))
    same["gumbel"].update(chunk_size=64, sample_temperature=0.7)
    same["teacher"]["step"] = 4
    ckpt.check_compatible(saved, same, "run", {"teacher.step": 4}, {"teacher.step": 4})
    # The teacher workdir trained on since: its newest checkpoint is another teacher.
    with pytest.raises(ckpt.CheckpointMismatchError, match=r"(?s)teacher.step: checkpoint has 4, this run has 8.*"
                                                             r"--config.teacher.step=4\."):
        ckpt.check_compatible(saved, saved, "run", {"teacher.step": 4}, {"teacher.step": 8})


def test_default_evaluation_reads_each_validation_window_once(data_dir, caplog):
    from discreteflow_jax.train import validation_batches

    cfg, _, dataset = experiment.prepare(load_config("shakespeare_baseline", None), data_dir)
    with caplog.at_level("WARNING"):
        batches = validation_batches(dataset, cfg.train.batch_size, cfg.train.eval_batches)
    windows = np.concatenate(batches)
    fit = dataset.max_val_windows()
    # Every full batch the split holds, no window twice, no overlap warning.
    assert fit - cfg.train.batch_size < len(windows) <= fit
    assert len({w.tobytes() for w in windows}) == len(windows)
    offsets = np.sort(dataset.val_offsets(cfg.train.batch_size, None).ravel())
    assert np.all(np.diff(offsets) >= cfg.data.seq_len)
    assert "overlap" not in caplog.text
