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
from conftest import REPO, load_config, record_network_inputs
from flax import nnx

from discreteflow_jax.config.presets import set_fields
from discreteflow_jax.io import checkpoint as ckpt
from discreteflow_jax.tasks import build_task
from discreteflow_jax.training import experiment
from discreteflow_jax.training.trainer import Trainer, TrainingDivergedError


def smoke(**overrides):
    return set_fields(load_config("shakespeare_baseline", "smoke"), overrides)


def params_of(result) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.tree.leaves(result["state"].params)]


def test_train_resume_and_sample(tmp_path, data_dir, monkeypatch):
    import discreteflow_jax as dfj
    from discreteflow_jax.data import tokenizers
    from discreteflow_jax.evaluation.metrics import validation_loss
    from discreteflow_jax.inference.export import export_workdir

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
    # The samples written at step 6 are the saved model's samples from the sampling stream.
    from discreteflow_jax.training.steps import stream_key

    written = open(os.path.join(workdir, "samples", "step_0000006.txt")).read()
    task = build_task(model.config)
    for k in (1, 4):
        rows = task.sample_fn(model.graphdef, model.params, None, stream_key(model.config.seed, "samples"), k)
        assert len(rows) == 2
        for j, row in enumerate(np.asarray(rows)):
            assert f"=== step 6 K={k} sample {j} ===\n{model.tokenizer.decode_until_eos(row.tolist())}\n" in written
    out = export_workdir(workdir, str(tmp_path / "export"))
    assert os.path.isfile(os.path.join(out, "llama_tokenizer", "tokenizer.model"))
    # The exported model holds the prompt in the network's input at every step (the output copies
    # known tokens back, so only the input shows that the prompt conditions the sample).
    exported = dfj.load(out)
    seen = record_network_inputs(monkeypatch)
    assert exported.sample(1, 2, seed=0, prompt="ROMEO:", condition="clamp")[0].startswith("ROMEO:")
    ids = exported.tokenizer.encode("ROMEO:")
    e_prompt = np.asarray(exported.model().embed(jnp.asarray([ids], jnp.int32)))[0]
    assert len(seen) == 2
    for x, _ in seen:
        np.testing.assert_allclose(x[0, :len(ids)], e_prompt, rtol=1e-5, atol=1e-6)


def test_interrupted_run_matches_uninterrupted(tmp_path, data_dir, monkeypatch):
    straight = experiment.run(smoke(), str(tmp_path / "a"), data_dir=data_dir)

    # Stop after step 2 (not a checkpoint step) through the preemption path, then rerun.
    from discreteflow_jax.training import distributed as dist

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
    from discreteflow_jax.training.steps import validation_batches

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


def test_logged_train_metrics_average_the_logging_window():
    from discreteflow_jax.tasks.base import Task, summarize_flow
    from discreteflow_jax.training.steps import window_metrics

    task = Task("t", None, None, None, lambda sums, prefix: summarize_flow(sums, prefix, 2))
    steps = [  # two steps with different token counts: the window loss is token-weighted
        {"loss_sum": 10.0, "tokens": 10.0, "bucket_loss_sum": np.array([4.0, 6.0]),
         "bucket_tokens": np.array([5.0, 5.0]), "grad_norm": 1.0, "finite": True},
        {"loss_sum": 30.0, "tokens": 5.0, "bucket_loss_sum": np.array([0.0, 30.0]),
         "bucket_tokens": np.array([0.0, 5.0]), "grad_norm": 3.0, "finite": True},
    ]
    out = window_metrics(task, steps)
    assert out["train/loss"] == pytest.approx(40.0 / 15.0)
    assert out["train/loss_t0.0-0.5"] == pytest.approx(4.0 / 5.0)
    assert out["train/loss_t0.5-1.0"] == pytest.approx(36.0 / 10.0)
    assert out["train/grad_norm"] == pytest.approx(2.0)


@pytest.mark.parametrize("num_buckets", [2, 10, 20, 30, 64, 100])
def test_every_t_bucket_gets_its_own_metric(num_buckets):
    """One metric per bucket: names that collide would overwrite each other's values."""
    from discreteflow_jax.tasks.base import bucket_edges, summarize_flow

    sums = {"loss_sum": 1.0, "tokens": 1.0, "bucket_loss_sum": np.arange(num_buckets, dtype=np.float64),
            "bucket_tokens": np.ones(num_buckets)}
    out = summarize_flow(sums, "val", num_buckets)
    per_bucket = {k: v for k, v in out.items() if k.startswith("val/loss_t")}
    assert len(set(bucket_edges(num_buckets))) == num_buckets
    assert sorted(per_bucket.values()) == list(range(num_buckets))
    # Names read as t ranges close to the true edges; ten buckets keep their familiar names.
    lows = [float(name.split("-")[0]) for name in bucket_edges(num_buckets)]
    np.testing.assert_allclose(lows, np.arange(num_buckets) / num_buckets, atol=0.5 / num_buckets)
    if num_buckets == 10:
        assert bucket_edges(10)[0] == "0.0-0.1" and bucket_edges(10)[-1] == "0.9-1.0"


def test_grad_accumulation_equals_one_big_batch():
    """Micro-batches with different numbers of scored tokens: accumulating must give the gradient
    of the token-weighted mean over the whole batch, i.e. the one-big-batch step."""
    from flax import nnx

    from discreteflow_jax.config import TrainConfig
    from discreteflow_jax.flow import cross_entropy
    from discreteflow_jax.tasks.base import Task
    from discreteflow_jax.training.optim import make_optimizer
    from discreteflow_jax.training.steps import TrainState, build_train_step

    vocab = 11

    def loss_fn(model, aux, tokens, key):
        mask = (tokens % 3 != 0).astype(jnp.float32)  # a different count of scored tokens per row
        ce = cross_entropy(model(tokens), (tokens + 1) % vocab)
        sums = {"loss_sum": jnp.sum(ce * mask), "tokens": jnp.sum(mask)}
        return sums["loss_sum"] / jnp.maximum(sums["tokens"], 1.0), sums

    task = Task("toy", None, loss_fn, None, None)
    graphdef, state = nnx.split(nnx.Embed(vocab, vocab, rngs=nnx.Rngs(0)))
    params = nnx.to_pure_dict(state)
    tx = make_optimizer(TrainConfig(lr=0.1, warmup_steps=0, num_steps=10, weight_decay=0.0, grad_clip=0.0))
    rows = np.random.default_rng(0).integers(0, vocab, (8, 12))
    rows[::2, :8] = 3  # rows 0, 2, 4, 6 (all in micro-batch 0 of 2) score few tokens
    tokens = jnp.asarray(rows, jnp.int32)
    results = {}
    for accum in (1, 2, 4):
        step = jax.jit(build_train_step(task, graphdef, tx, accum))
        state0 = TrainState(jnp.zeros((), jnp.int32), params, tx.init(params))
        new, metrics = step(state0, None, tokens, jax.random.key(0))
        results[accum] = (new.params, float(metrics["grad_norm"]), float(metrics["loss_sum"]))
    for accum in (2, 4):
        assert results[accum][1] == pytest.approx(results[1][1], rel=1e-5)
        assert results[accum][2] == pytest.approx(results[1][2], rel=1e-5)
        for a, b in zip(jax.tree.leaves(results[accum][0]), jax.tree.leaves(results[1][0])):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_logged_learning_rate_is_the_one_each_update_used():
    """The trainer logs the learning rate read from the optimizer state: after the update of step
    s it must be the schedule at s (warmup changes it every step, so an off-by-one shows)."""
    from discreteflow_jax.config import TrainConfig
    from discreteflow_jax.training.optim import learning_rate, lr_schedule, make_optimizer

    train = TrainConfig(lr=0.1, warmup_steps=4, num_steps=10)
    tx = make_optimizer(train)
    params = {"w": jnp.ones((2, 3))}
    opt_state = tx.init(params)
    seen = []
    for step in range(6):
        _, opt_state = tx.update({"w": jnp.full((2, 3), 0.5)}, opt_state, params)
        seen.append(float(learning_rate(opt_state)))
        assert seen[-1] == pytest.approx(float(lr_schedule(train)(step)), rel=1e-6)
    assert len(set(seen)) == len(seen)  # the schedule moved at every one of these steps


def test_prng_streams_do_not_collide(tmp_path, data_dir, monkeypatch):
    """Evaluation, sampling and init keys are none of the training steps' keys (30k-step runs)."""
    from flax import nnx

    seeds = []
    real_rngs = nnx.Rngs

    def recording_rngs(seed, *args, **kwargs):
        # The shape-only model (built under eval_shape, before the sharding checks) gets a traced
        # key that never produces numbers; the concrete init key is the one that matters.
        if not isinstance(seed, jax.core.Tracer):
            seeds.append(seed)
        return real_rngs(seed, *args, **kwargs)

    cfg, tokenizer, dataset = experiment.prepare(smoke(), data_dir)
    task = build_task(cfg)
    monkeypatch.setattr(nnx, "Rngs", recording_rngs)
    trainer = Trainer(cfg, task, str(tmp_path / "run"), dataset, tokenizer)
    monkeypatch.setattr(nnx, "Rngs", real_rngs)
    seeds.append(trainer.init_key)  # the key the concrete model is initialized with
    used: dict[str, set] = {"eval": set(), "samples": set(), "init": set()}

    def as_tuple(key):
        return tuple(np.asarray(jax.random.key_data(key)).tolist())

    def fake_eval(params, aux, tokens, key):
        used["eval"].add(as_tuple(key))
        return {"loss_sum": np.float32(0.0), "tokens": np.float32(1.0)}

    def fake_sample(graphdef, params, aux, key, steps):
        used["samples"].add(as_tuple(key))
        return np.zeros((1, 4), np.int32)

    trainer.eval_step, trainer.task.sample_fn = fake_eval, fake_sample
    trainer.evaluate(None)
    trainer.samples(None, 0)
    assert seeds and used["eval"] and used["samples"]
    for seed in seeds:  # what the model init draws: fold_in(root, i) for its i-th key
        root = jax.random.key(seed) if isinstance(seed, int) else seed
        used["init"] |= {as_tuple(jax.random.fold_in(root, i)) for i in range(16)}
    step_keys = jax.vmap(lambda s: jax.random.key_data(jax.random.fold_in(trainer.base_key, s)))(
        jnp.arange(30001)
    )
    step_set = {tuple(k) for k in np.asarray(step_keys).tolist()}
    for purpose, keys in used.items():
        assert not step_set & keys, f"{purpose} keys are training step keys"
    assert not used["eval"] & used["samples"] and not (used["eval"] | used["samples"]) & used["init"]


def test_an_accumulated_eval_step_adds_its_micro_batches_sums() -> None:
    # The eval step runs a batch as grad_accum micro-batches (the memory of a training micro-batch);
    # its sums are those of the micro-batches evaluated one by one with keys fold_in(key, i).
    import types

    from discreteflow_jax.training.steps import _split_micro, build_eval_step

    layer = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(layer)

    def eval_fn(model, aux, tokens, key):
        noise = jax.random.uniform(key, tokens.shape)
        feats = jnp.stack([tokens, tokens * 2, tokens + 1], -1).astype(jnp.float32)
        return {"loss_sum": jnp.sum(model(feats)[..., 0] * noise), "tokens": jnp.asarray(tokens.size, jnp.float32)}

    task = types.SimpleNamespace(eval_fn=eval_fn)
    tokens = jax.random.randint(jax.random.key(1), (8, 5), 0, 9)
    key = jax.random.key(2)
    got = build_eval_step(task, graphdef, accum=4)(params, None, tokens, key)
    micro = _split_micro(tokens, 4)
    want = [eval_fn(layer, None, micro[i], jax.random.fold_in(key, i)) for i in range(4)]
    np.testing.assert_allclose(got["loss_sum"], sum(w["loss_sum"] for w in want), rtol=1e-6)
    assert float(got["tokens"]) == 40.0
    # One micro-batch: the task's eval of the whole batch with the key itself.
    one = build_eval_step(task, graphdef)(params, None, tokens, key)
    np.testing.assert_allclose(one["loss_sum"], eval_fn(layer, None, tokens, key)["loss_sum"], rtol=1e-6)
