"""Config files, overrides and validation messages (all before anything compiles)."""

from __future__ import annotations

import pytest
from conftest import load_config

from discreteflow_jax import experiment
from discreteflow_jax.config import ConfigError, parse_config
from discreteflow_jax.data import DataError

CONFIGS = ["shakespeare_baseline", "fineweb_baseline", "shakespeare_teacher"]


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("variant", [None, "cpu", "smoke"])
def test_every_config_variant_parses(name, variant):
    cfg = parse_config(load_config(name, variant))
    assert cfg.data.seq_len <= cfg.model.max_len


def test_full_configs_have_the_seed_experiment_sizes():
    shakespeare = parse_config(load_config("shakespeare_baseline", None))
    assert (shakespeare.model.vocab_size, shakespeare.data.seq_len, shakespeare.model.dim) == (32000, 128, 512)
    assert (shakespeare.model.num_layers, shakespeare.model.num_heads, shakespeare.train.num_steps) == (8, 8, 10000)
    assert (shakespeare.train.b1, shakespeare.train.b2, shakespeare.train.weight_decay) == (0.9, 0.98, 0.02)
    fineweb = parse_config(load_config("fineweb_baseline", None))
    assert (fineweb.model.vocab_size, fineweb.data.seq_len, fineweb.model.dim) == (50257, 1024, 768)
    assert (fineweb.model.num_layers, fineweb.model.num_heads, fineweb.train.num_steps) == (12, 12, 30000)
    teacher = parse_config(load_config("shakespeare_teacher", None))
    assert (teacher.model.dim, teacher.model.num_layers, teacher.model.ffn_hidden) == (512, 8, 2048)


def test_causal_override_reaches_the_model():
    raw = load_config("shakespeare_baseline", "smoke")
    assert parse_config(raw).model.causal is False
    raw.causal = True
    assert parse_config(raw).model.causal is True


def test_unknown_variant_lists_valid_ones():
    with pytest.raises(ValueError, match="valid variants: cpu, smoke"):
        load_config("shakespeare_baseline", "tiny")


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("flow.time_sampler", "bogus", "use one of: uniform, logit_normal, power"),
        ("model.dtype", "float16", "use one of: float32, bfloat16"),
        ("data.name", "wikitext", "use one of: shakespeare, fineweb"),
        ("model.num_heads", 3, "must be divisible by config.model.num_heads=3"),
        ("data.seq_len", 64, "longer than the model supports"),
        ("train.grad_accum", 3, "must be divisible by config.train.grad_accum=3"),
        ("train.lr", -1.0, "lr must be > 0"),
        ("model.num_layers", 0, "positive integer"),
        ("model.loss_chunk", -1, "loss_chunk must be a whole number of tokens >= 0"),
    ],
)
def test_validation_messages(field, value, message):
    raw = load_config("shakespeare_baseline", "smoke")
    section, leaf = field.split(".")
    raw[section][leaf] = value
    with pytest.raises(ConfigError, match=message):
        parse_config(raw)


def test_unknown_field_is_rejected_by_the_locked_config():
    raw = load_config("shakespeare_baseline", "smoke")
    raw.lock()
    with pytest.raises(AttributeError):
        raw.model.dimm = 5


def test_vocabulary_mismatch_is_reported(data_dir):
    raw = load_config("shakespeare_baseline", "smoke")
    raw.model.vocab_size = 50257
    with pytest.raises(ConfigError, match="has 32000 tokens but config.model.vocab_size=50257"):
        experiment.prepare(raw, data_dir)


def test_missing_offline_data_names_folder_and_source(tmp_path, monkeypatch):
    from discreteflow_jax.data import tokenizers

    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(tokenizers, "_hf_download", offline)
    monkeypatch.setenv("DISCRETEFLOW_DATA_DIR", str(tmp_path))
    raw = load_config("shakespeare_baseline", "smoke")
    with pytest.raises(DataError) as err:
        experiment.prepare(raw, None)
    text = str(err.value)
    assert str(tmp_path) in text and "DISCRETEFLOW_DATA_DIR" in text
