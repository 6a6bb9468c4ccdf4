"""Faults a run must survive, each injected on purpose: a damaged newest checkpoint, a full disk
while saving. Every test asserts the message and what was kept. Smoke shapes, seconds each."""

from __future__ import annotations

import dataclasses
import errno
import glob
import json
import logging
import os
import re
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import REPO, load_config

from discreteflow_jax.config.presets import set_fields
from discreteflow_jax.inference.load import load
from discreteflow_jax.io import checkpoint as ckpt
from discreteflow_jax.training import experiment

STEPS = 9  # checkpoints at steps 3, 6 and 9


def smoke(**overrides):
    base = {"train.num_steps": STEPS, "train.eval_every": 100}
    return set_fields(load_config("shakespeare_baseline", "smoke"), {**base, **overrides})


def params_of(state) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.tree.leaves(state.params)]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished smoke run with checkpoints 3, 6, 9, and its final parameters."""
    data = str(REPO.parent / "shared" / "data")
    if not os.path.exists(os.path.join(data, "tiny_shakespeare", "input.txt")):
        pytest.skip("offline data folder not found")
    workdir = str(tmp_path_factory.mktemp("faults") / "run")
    result = experiment.run(smoke(), workdir, data_dir=data)
    return workdir, params_of(result["state"])


def copy_run(trained, tmp_path) -> str:
    workdir = str(tmp_path / "run")
    shutil.copytree(trained[0], workdir)
    return workdir


def step_dir(workdir: str, step: int) -> str:
    return os.path.join(workdir, "checkpoints", str(step))


def flip_bytes(path: str) -> bytes:
    data = bytearray(open(path, "rb").read())
    middle = len(data) // 2
    for i in range(middle, min(len(data), middle + 16)):
        data[i] ^= 0xFF
    open(path, "wb").write(bytes(data))
    return bytes(data)


def damage(workdir: str, step: int, how: str) -> tuple[str, str]:
    """Damages one checkpoint as a failing disk or an interrupted copy would; returns (the file
    touched, a piece of the reason the message must give). ``*_unverified``: the step has no
    checksums (written before they existed), so orbax's own reading has to notice."""
    base = step_dir(workdir, step)
    if how.endswith("_unverified"):
        os.remove(os.path.join(base, ckpt.CHECKSUM_FILE))
    if how == "corrupted":  # bytes flipped in the largest array file, stored without compression
        path = max(glob.glob(os.path.join(base, "state", "ocdbt.process_0", "d", "*")), key=os.path.getsize)
        flip_bytes(path)
        return path, f"{os.path.relpath(path, base)} does not match its checksum (corrupted)"
    if how == "corrupted_unverified":  # bytes flipped in the data file that indexes every array
        (path,) = glob.glob(os.path.join(base, "state", "d", "*"))
        flip_bytes(path)
        return path, "CRC-32C checksum verification failed"
    if how in ("truncated", "truncated_unverified"):  # the largest array file cut to a third
        path = max(glob.glob(os.path.join(base, "state", "ocdbt.process_0", "d", "*")), key=os.path.getsize)
        size = os.path.getsize(path)
        os.truncate(path, size // 3)
        rel = os.path.relpath(path, base)
        return path, (f"{rel} has {size // 3} bytes, {size} when written (truncated" if how == "truncated"
                      else "Encountered error while reading array index")
    if how == "no_state_metadata":
        path = os.path.join(base, "state", "_METADATA")
        os.remove(path)
        return path, "state/_METADATA is missing"
    if how == "no_meta":
        path = os.path.join(base, "meta", "metadata")
        os.remove(path)
        return path, "meta/metadata is missing"
    raise ValueError(how)


DAMAGES = ["corrupted", "truncated", "corrupted_unverified", "truncated_unverified", "no_state_metadata", "no_meta"]


@pytest.mark.parametrize("how", DAMAGES)
def test_damaged_newest_checkpoint_falls_back(trained, tmp_path, data_dir, caplog, how):
    workdir = copy_run(trained, tmp_path)
    touched, reason = damage(workdir, STEPS, how)
    damaged_bytes = open(touched, "rb").read() if os.path.exists(touched) else None
    with caplog.at_level(logging.WARNING, logger="discreteflow_jax"):
        result = experiment.run(smoke(), workdir, data_dir=data_dir)
    log = caplog.text
    assert f"the checkpoint at step {STEPS} ({step_dir(workdir, STEPS)}) is damaged" in log
    assert reason in log
    assert "falling back to the checkpoint at step 6" in log
    # Resumed from step 6 and retrained 7..9 exactly as the first time: nothing lost.
    assert int(result["state"].step) == STEPS
    for a, b in zip(trained[1], params_of(result["state"])):
        np.testing.assert_array_equal(a, b)
    # The damaged checkpoint is kept, byte for byte, out of the way of the new step 9.
    kept = os.path.join(workdir, ckpt.DAMAGED_DIR, str(STEPS))
    assert os.path.isdir(kept)
    moved = touched.replace(step_dir(workdir, STEPS), kept)
    assert os.path.exists(moved) == (damaged_bytes is not None)
    if damaged_bytes is not None:
        assert open(moved, "rb").read() == damaged_bytes
    assert sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")) if s.isdigit()) == [3, 6, 9]
    assert os.path.isfile(os.path.join(step_dir(workdir, STEPS), ckpt.CHECKSUM_FILE))  # the new step 9 has them


def test_checksums_record_every_file_of_a_step(trained):
    for step in (3, 6, 9):
        base = step_dir(trained[0], step)
        record = json.load(open(os.path.join(base, ckpt.CHECKSUM_FILE)))
        files = {os.path.relpath(os.path.join(d, f), base) for d, _, fs in os.walk(base) for f in fs}
        assert set(record["files"]) == files - {ckpt.CHECKSUM_FILE}
        assert all(os.path.getsize(os.path.join(base, rel)) == size for rel, (size, _) in record["files"].items())


def test_every_checkpoint_damaged_stops_with_all_reasons(trained, tmp_path, data_dir):
    workdir = copy_run(trained, tmp_path)
    for step in (3, 6, 9):
        damage(workdir, step, "no_meta")
    with pytest.raises(ckpt.CheckpointDamagedError) as info:
        experiment.run(smoke(), workdir, data_dir=data_dir)
    message = str(info.value)
    assert "no checkpoint in" in message and "left in place" in message
    for step in (3, 6, 9):
        assert f"step {step} ({step_dir(workdir, step)}) is damaged: meta/metadata is missing" in message
        assert os.path.isdir(step_dir(workdir, step))  # nothing moved, nothing deleted


def test_resume_step_picks_a_checkpoint(trained, tmp_path, data_dir, caplog):
    workdir = copy_run(trained, tmp_path)
    with caplog.at_level(logging.WARNING, logger="discreteflow_jax"):
        result = experiment.run(smoke(), workdir, data_dir=data_dir, resume_step=3)
    assert "newer than step 3" in caplog.text
    for a, b in zip(trained[1], params_of(result["state"])):
        np.testing.assert_array_equal(a, b)
    assert sorted(os.listdir(os.path.join(workdir, ckpt.SKIPPED_DIR))) == ["6", "9"]
    with pytest.raises(ckpt.CheckpointError, match=r"no checkpoint of step 4; the steps kept there are: 9, 6, 3"):
        experiment.run(smoke(), workdir, data_dir=data_dir, resume_step=4)


def metric_records(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_resume_keeps_one_trajectory_in_metrics_jsonl(trained, tmp_path, data_dir, caplog):
    """Resuming from step 3 trains steps 4..9 again: metrics.jsonl must hold each step's records
    once (the rerun's), and the discarded records are kept beside it, not lost."""
    workdir = copy_run(trained, tmp_path)
    before = metric_records(os.path.join(workdir, "metrics.jsonl"))
    with caplog.at_level(logging.WARNING, logger="discreteflow_jax"):
        experiment.run(smoke(), workdir, data_dir=data_dir, resume_step=3)
    after = metric_records(os.path.join(workdir, "metrics.jsonl"))
    steps = [r["step"] for r in after]
    assert steps == sorted(steps), f"steps go back in metrics.jsonl: {steps}"
    assert [r for r in after if r["step"] <= 3] == [r for r in before if r["step"] <= 3]
    logged = [sorted(r["step"] for r in records if "train/loss" in r) for records in (before, after)]
    assert logged[0] == logged[1]
    discarded = metric_records(os.path.join(workdir, "metrics_discarded.jsonl"))
    assert discarded == [r for r in before if r["step"] > 3]
    assert "moved the records of steps 4, 6, 8, 9" in caplog.text


def test_resume_step_damaged_names_steps_that_load(trained, tmp_path, data_dir):
    workdir = copy_run(trained, tmp_path)
    damage(workdir, 6, "truncated")
    with pytest.raises(ckpt.CheckpointDamagedError) as info:
        experiment.run(smoke(), workdir, data_dir=data_dir, resume_step=6)
    assert f"step 6 ({step_dir(workdir, 6)}) is damaged" in str(info.value)
    assert "steps that load: 9, 3; pick one with --resume_step=9" in str(info.value)


def test_load_sample_export_fall_back_or_name_loadable_steps(trained, tmp_path, data_dir, caplog):
    workdir = copy_run(trained, tmp_path)
    damage(workdir, STEPS, "corrupted")
    with caplog.at_level(logging.WARNING, logger="discreteflow_jax"):
        model = load(workdir, data_dir)
    assert model.step == 6
    assert f"step {STEPS} ({step_dir(workdir, STEPS)}) is damaged" in caplog.text
    assert "falling back to the checkpoint at step 6" in caplog.text
    with pytest.raises(ckpt.CheckpointDamagedError, match=r"steps that load: 6, 3; pick one with step=6"):
        load(workdir, data_dir, step=STEPS)
    assert os.path.isdir(step_dir(workdir, STEPS))  # readers never move or delete anything

    env = dict(os.environ, DISCRETEFLOW_DATA_DIR=data_dir, JAX_PLATFORMS="cpu")
    for module, extra in (("sample", ["--num_samples=1", "--steps=1", f"--out={tmp_path}/s.txt"]),
                          ("export", [f"--out={tmp_path}/export"])):
        cmd = [sys.executable, "-m", f"discreteflow_jax.{module}", f"--workdir={workdir}", f"--step={STEPS}", *extra]
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=REPO)
        assert out.returncode == 2, out.stderr[-2000:]
        assert "Traceback" not in out.stderr
        assert f"the checkpoint at step {STEPS}" in out.stderr and "is damaged" in out.stderr
        assert "steps that load: 6, 3; pick one with step=6 (--step=6 on the command line)" in out.stderr


def test_disk_full_while_saving_stops_and_keeps_last_good_checkpoint(trained, tmp_path, data_dir, monkeypatch):
    from orbax.checkpoint._src.handlers import json_checkpoint_handler

    workdir = str(tmp_path / "run")
    real_write = json_checkpoint_handler.JsonCheckpointHandler._save_fn

    async def disk_full_from_step_6(self, item, directory):  # the state item is already half written
        if item.get("step", 0) >= 6:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(directory))
        return await real_write(self, item, directory)

    monkeypatch.setattr(json_checkpoint_handler.JsonCheckpointHandler, "_save_fn", disk_full_from_step_6)
    with pytest.raises(ckpt.CheckpointWriteError) as info:
        experiment.run(smoke(), workdir, data_dir=data_dir)
    message = str(info.value)
    assert f"could not write the checkpoint of step 6 to {step_dir(workdir, 6)}" in message
    assert "No space left on device" in message
    assert "the newest intact checkpoint is step 3" in message
    steps = os.listdir(os.path.join(workdir, "checkpoints"))
    assert "3" in steps and "6" not in steps and "9" not in steps  # the half-written step is no step
    assert any(s.startswith("6.") for s in steps)  # its unfinished temporary folder

    # Space is back: the same command resumes from step 3 (never from the half-written 6) and
    # ends exactly where an undisturbed run ends.
    monkeypatch.setattr(json_checkpoint_handler.JsonCheckpointHandler, "_save_fn", real_write)
    result = experiment.run(smoke(), workdir, data_dir=data_dir)
    for a, b in zip(trained[1], params_of(result["state"])):
        np.testing.assert_array_equal(a, b)
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["3", "6", "9"]  # temporary folder gone


def test_cli_reports_damaged_run_without_traceback(trained, tmp_path, data_dir):
    workdir = copy_run(trained, tmp_path)
    for step in (3, 6, 9):
        damage(workdir, step, "no_state_metadata")
    env = dict(os.environ, DISCRETEFLOW_DATA_DIR=data_dir, JAX_PLATFORMS="cpu")
    cmd = [sys.executable, "-m", "discreteflow_jax.main", f"--config={REPO}/configs/shakespeare_baseline.py:smoke",
           f"--workdir={workdir}", f"--config.train.num_steps={STEPS}"]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=REPO)
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    assert "error: no checkpoint in" in out.stderr and "state/_METADATA is missing" in out.stderr


# ---------------------------------------------------------------------------------------------
# Mismatched inputs between stages: refused before anything compiles, saying what differs


@pytest.fixture
def no_training(monkeypatch):
    """Fails the test if the run gets as far as building the trainer (and compiling)."""
    from discreteflow_jax.training import trainer as train

    def reached(*args, **kwargs):
        raise AssertionError("the input was accepted: the run reached the trainer")

    monkeypatch.setattr(train, "Trainer", reached)


def fineweb_smoke(path: str, **overrides):
    return set_fields(load_config("fineweb_baseline", "smoke"), {"data.local_path": path, **overrides})


def test_fineweb_file_without_text_column_is_refused(tmp_path, data_dir, no_training):
    path = tmp_path / "docs.jsonl"
    path.write_text('{"content": "First Citizen: Before we proceed", "url": "x"}\n' * 50)
    with pytest.raises(experiment.DataError, match=r"no 'text' column; columns found: \['content', 'url'\]"):
        experiment.run(fineweb_smoke(str(path)), str(tmp_path / "run"), data_dir=data_dir)


def test_data_file_shorter_than_one_window_is_refused(tmp_path, data_dir, no_training):
    from discreteflow_jax.data import load_tokenizer
    from discreteflow_jax.data.fineweb import FineWebData

    path = tmp_path / "docs.jsonl"
    path.write_text('{"text": "Before we proceed any further"}\n')  # 6 tokens with EOS; a window is 32
    with pytest.raises(experiment.DataError, match=re.escape("packs into only 0 rows of 32 tokens, fewer than "
                                                             "val_rows=2")):
        experiment.run(fineweb_smoke(str(path)), str(tmp_path / "run"), data_dir=data_dir)
    # Without validation rows (a dataset used for training only), the window itself is the limit.
    data = FineWebData(32, load_tokenizer("gpt2", data_dir), local_path=str(path), val_rows=0)
    with pytest.raises(experiment.DataError, match=re.escape("holds only 6 tokens (EOS included), less than one "
                                                             "window of seq_len=32")):
        data.check_readable()


def test_shakespeare_file_shorter_than_one_window_is_refused(tmp_path, data_dir, no_training):
    short = tmp_path / "data"
    (short / "tiny_shakespeare").mkdir(parents=True)
    (short / "tiny_shakespeare" / "input.txt").write_text("First Citizen:\nBefore we proceed any further, hear me.\n")
    os.symlink(os.path.join(data_dir, "llama_tokenizer"), short / "llama_tokenizer")
    with pytest.raises(experiment.DataError, match=r"seq_len=16 does not fit the Shakespeare (train|validation) split"):
        experiment.run(smoke(), str(tmp_path / "run"), data_dir=str(short))


def test_teacher_with_another_tokenizer_is_refused():
    from flax import nnx

    from discreteflow_jax.config import ConfigError, parse_config
    from discreteflow_jax.config.presets import tokenflow_defaults
    from discreteflow_jax.io.teacher import _bundle
    from discreteflow_jax.models.llama import Llama, LlamaConfig
    from discreteflow_jax.tasks.gumbel import add_gumbel_sections, gumbel_task

    vocab = 64
    llama = Llama(LlamaConfig(vocab_size=vocab, dim=16, num_layers=1, num_heads=2, ffn_hidden=32, max_len=32,
                              bos_id=1), rngs=nnx.Rngs(0))
    teacher = dataclasses.replace(_bundle(llama, llama.config, "teacher_run (step 4)", 1), tokenizer="gpt2")
    c = add_gumbel_sections(tokenflow_defaults())
    c.model.vocab_size, c.model.dim, c.model.num_layers, c.model.num_heads, c.model.max_len = vocab, 16, 1, 2, 16
    c.data.seq_len, c.data.tokenizer = 16, "llama"
    with pytest.raises(ConfigError, match=r"teacher \(teacher_run \(step 4\)\) was trained on gpt2-tokenized text "
                                          r"\(vocabulary 64\) but the student reads llama tokens"):
        gumbel_task(parse_config(c), teacher=teacher)
    gumbel_task(parse_config(c), teacher=dataclasses.replace(teacher, tokenizer="llama"))  # the same: accepted


# ---------------------------------------------------------------------------------------------
# Damaged exports and Hugging Face directories: the error names the file and the tensor


def tiny_llama_hf(out: str, shards: int = 1) -> dict[str, np.ndarray]:
    """A tiny LLaMA written as a Hugging Face directory, sharded into ``shards`` files with an index
    as transformers writes it; returns the tensors."""
    from flax import nnx
    from safetensors.numpy import save_file

    from discreteflow_jax.io import hf as convert
    from discreteflow_jax.models.llama import Llama, LlamaConfig

    config = LlamaConfig(vocab_size=64, dim=16, num_layers=2, num_heads=2, ffn_hidden=32, max_len=32, bos_id=1)
    convert.export_llama_to_hf(Llama(config, rngs=nnx.Rngs(0)), config, out)
    tensors = dict(convert.SafetensorsCheckpoint([os.path.join(out, "model.safetensors")]))
    if shards > 1:
        os.remove(os.path.join(out, "model.safetensors"))
        names = sorted(tensors)
        weight_map = {}
        for i in range(shards):
            shard = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            part = {n: tensors[n] for n in names[i::shards]}
            save_file(part, os.path.join(out, shard), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(part, shard))
        with open(os.path.join(out, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {}, "weight_map": weight_map}, f)
    return tensors


def test_hf_directory_with_a_missing_shard_names_it_and_its_tensors(tmp_path):
    from discreteflow_jax.io import hf as convert

    out = str(tmp_path / "hf")
    tensors = tiny_llama_hf(out, shards=3)
    convert.load_hf_checkpoint(out)  # intact: loads
    index = json.load(open(os.path.join(out, "model.safetensors.index.json")))["weight_map"]
    lost = "model-00002-of-00003.safetensors"
    os.remove(os.path.join(out, lost))
    with pytest.raises(convert.ConversionError) as info:
        convert.load_hf_checkpoint(out)
    message = str(info.value)
    held = sorted(k for k, v in index.items() if v == lost)
    assert "names 3 shards but 1 of them are missing" in message
    assert f"{os.path.join(out, lost)} (holds {len(held)} tensors: {held[0]}" in message
    assert len(held) < len(tensors)
    # The same directory as a Gumbel teacher: a message from the run, not a traceback.
    from discreteflow_jax.io.teacher import load_teacher

    with pytest.raises(experiment.USER_ERRORS, match="missing"):
        load_teacher({"hf": out})


def test_hf_tensor_of_wrong_dtype_or_shape_names_file_and_tensor(tmp_path):
    from safetensors.numpy import save_file

    from discreteflow_jax.io import hf as convert

    out = str(tmp_path / "hf")
    tensors = tiny_llama_hf(out)
    tensors["model.layers.1.mlp.up_proj.weight"] = tensors["model.layers.1.mlp.up_proj.weight"].astype(np.int32)
    tensors["model.norm.weight"] = tensors["model.norm.weight"][:8]
    weights = os.path.join(out, "model.safetensors")
    save_file(tensors, weights, metadata={"format": "pt"})
    with pytest.raises(convert.ConversionError) as info:
        convert.load_hf_checkpoint(out)
    message = str(info.value)
    assert f"model.layers.1.mlp.up_proj.weight in {weights}: dtype I32, expected a floating-point tensor" in message
    assert f"model.norm.weight in {weights}: checkpoint shape (8,), expected (16,)" in message
    # bfloat16 is a floating-point checkpoint like any other: read as fp32.
    tensors = {k: v.astype(np.float32) for k, v in tensors.items()}
    tensors["model.norm.weight"] = np.ones(16, np.float32)
    tensors["model.layers.1.mlp.up_proj.weight"] = np.ones((32, 16), np.float32)
    import ml_dtypes

    bf16 = {k: v.astype(ml_dtypes.bfloat16) for k, v in tensors.items()}
    save_file(bf16, weights, metadata={"format": "pt"})
    model, _ = convert.load_hf_checkpoint(out)
    np.testing.assert_array_equal(np.asarray(model.final_norm.scale.value), np.ones(16, np.float32))


def test_hf_truncated_weights_file_is_named(tmp_path):
    from discreteflow_jax.io import hf as convert

    out = str(tmp_path / "hf")
    tiny_llama_hf(out)
    weights = os.path.join(out, "model.safetensors")
    os.truncate(weights, os.path.getsize(weights) - 100)
    with pytest.raises(convert.ConversionError, match=re.escape(f"cannot read {weights}: SafetensorError")):
        convert.load_hf_checkpoint(out)


def test_damaged_export_names_file_and_tensor(trained, tmp_path, data_dir):
    from safetensors.numpy import load_file, save_file

    from discreteflow_jax.inference.export import export_workdir
    from discreteflow_jax.io import export_format

    out = str(tmp_path / "export")
    export_workdir(trained[0], out, data_dir)
    weights = os.path.join(out, export_format.WEIGHTS_FILE)
    tensors = load_file(weights)
    tensors["blocks.0.attn.q_proj.kernel"] = tensors["blocks.0.attn.q_proj.kernel"].astype(np.int64)
    tensors["final_norm.scale"] = tensors["final_norm.scale"][:-1]
    del tensors["blocks.1.mlp.up_proj.kernel"]
    save_file(tensors, weights)
    with pytest.raises(export_format.ExportFormatError) as info:
        load(out, data_dir)
    message = str(info.value)
    assert message.startswith(f"{weights} does not fit the model")
    assert "blocks.0.attn.q_proj.kernel: file has dtype int64, model needs floating point" in message
    assert "final_norm.scale: file has (31,), model needs (32,)" in message
    assert "missing parameters: ['blocks.1.mlp.up_proj.kernel']" in message
    os.truncate(weights, os.path.getsize(weights) // 2)
    with pytest.raises(export_format.ExportFormatError, match=re.escape(f"cannot read {weights}: SafetensorError")):
        load(out, data_dir)


def test_checkpoint_with_an_older_optimizer_layout_is_named_not_called_damaged(tmp_path, data_dir, monkeypatch):
    """A run saved before the learning rate became an injected hyperparameter: resuming it names
    the reason (not "damaged", nothing moved), and its parameters still load."""
    import optax

    from discreteflow_jax.training import optim, programs, trainer

    def plain_adamw(train):  # the layout such runs saved: the schedule inside AdamW
        return optax.chain(optax.clip_by_global_norm(train.grad_clip),
                           optax.adamw(optim.lr_schedule(train), b1=train.b1, b2=train.b2,
                                       weight_decay=train.weight_decay, mask=optim._decay_mask))

    workdir = str(tmp_path / "run")
    with monkeypatch.context() as patch:
        patch.setattr(programs, "make_optimizer", plain_adamw)
        patch.setattr(trainer, "learning_rate", lambda opt_state: 0.0)  # no injected rate to read back
        experiment.run(smoke(**{"train.num_steps": 3}), workdir, data_dir=data_dir)
    with pytest.raises(ckpt.CheckpointMismatchError, match="older layout") as info:
        experiment.run(smoke(), workdir, data_dir=data_dir)
    assert "damaged" not in str(info.value)
    assert os.path.isdir(step_dir(workdir, 3)) and not os.path.exists(os.path.join(workdir, ckpt.DAMAGED_DIR))
    assert load(workdir).step == 3
