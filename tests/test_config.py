"""Config files, overrides and validation messages (all before anything compiles)."""

from __future__ import annotations

import importlib.util

import pytest
from conftest import REPO, load_config

from discreteflow_jax.config import ConfigError, parse_config, parse_gumbel_config, student_config
from discreteflow_jax.config.presets import set_fields
from discreteflow_jax.data import DataError
from discreteflow_jax.training import experiment

CONFIG_FILES = sorted(p.stem for p in (REPO / "configs").glob("*.py"))


def _variants(name: str) -> list[str | None]:
    spec = importlib.util.spec_from_file_location(f"variants_{name}", REPO / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return [None, *sorted(module.VARIANTS)]


def test_every_config_file_is_covered():
    assert set(CONFIG_FILES) >= {"shakespeare_baseline", "shakespeare_teacher", "shakespeare_gumbel",
                                 "fineweb_baseline", "fineweb_gumbel"}
    assert all({"cpu", "smoke"} <= set(_variants(name)[1:]) for name in CONFIG_FILES)


@pytest.mark.parametrize(("name", "variant"), [(n, v) for n in CONFIG_FILES for v in _variants(n)])
def test_every_config_variant_parses(name, variant):
    cfg = parse_config(load_config(name, variant))
    assert cfg.data.seq_len <= cfg.model.max_len
    assert cfg.task == ("teacher" if "teacher" in name else "gumbel" if "gumbel" in name else "tokenflow")
    assert cfg.data.name == ("fineweb" if name.startswith("fineweb") else "shakespeare")
    assert cfg.model.vocab_size == (50257 if name.startswith("fineweb") else 32000)
    if cfg.task == "gumbel":  # the gumbel section is valid and reaches the student (cross-attention layers)

        g = parse_gumbel_config(cfg.extra["gumbel"])
        assert student_config(cfg.model, g).cross_attention == (g.conditioning == "cross_attention")
        assert cfg.model.tie_embeddings is False
    if variant is None:  # the full experiments fit one evaluation of distinct validation windows
        assert cfg.train.eval_batches == 0


def _sizes(name: str) -> tuple:
    cfg = parse_config(load_config(name, None))
    m, t = cfg.model, cfg.train
    return (m.vocab_size, cfg.data.seq_len, m.dim, m.num_layers, m.num_heads, t.num_steps, t.batch_size,
            t.grad_accum, t.warmup_steps)


def test_full_configs_have_the_seed_experiment_sizes():
    # (vocab, context, dim, layers, heads, steps, batch, micro-batches, warm-up): docs/experiments.md.
    assert _sizes("shakespeare_baseline") == (32000, 128, 512, 8, 8, 10000, 128, 2, 1000)
    assert _sizes("shakespeare_gumbel") == (32000, 128, 512, 8, 8, 5000, 128, 2, 500)
    assert _sizes("fineweb_baseline") == (50257, 1024, 768, 12, 12, 30000, 256, 4, 2000)
    assert _sizes("fineweb_gumbel") == (50257, 1024, 768, 12, 12, 30000, 256, 4, 2000)
    shakespeare = parse_config(load_config("shakespeare_baseline", None))
    assert (shakespeare.train.lr, shakespeare.train.grad_clip, shakespeare.model.tie_embeddings) == (4e-4, 1.0, True)
    assert (shakespeare.train.b1, shakespeare.train.b2, shakespeare.train.weight_decay) == (0.9, 0.98, 0.02)
    teacher = parse_config(load_config("shakespeare_teacher", None))
    assert (teacher.model.dim, teacher.model.num_layers, teacher.model.num_heads, teacher.model.ffn_hidden) == (
        512, 8, 8, 2048)
    assert (teacher.train.num_steps, teacher.train.batch_size, teacher.train.lr, teacher.train.warmup_steps) == (
        5000, 128, 3e-4, 500)
    for name in ("shakespeare_gumbel", "fineweb_gumbel"):
        cfg = parse_config(load_config(name, None))
        assert cfg.extra["gumbel"]["conditioning"] == "cross_attention"
    assert parse_config(load_config("fineweb_gumbel", None)).extra["teacher"]["hf"] == "gpt2"


def test_causal_override_reaches_the_model():
    raw = load_config("shakespeare_baseline", "smoke")
    assert parse_config(raw).model.causal is False
    raw.causal = True
    assert parse_config(raw).model.causal is True


def test_unknown_variant_lists_valid_ones():
    with pytest.raises(ValueError, match="valid variants: context, cpu, original, smoke"):
        load_config("shakespeare_baseline", "tiny")


# Every bad value is refused by parse_config, i.e. before anything compiles; each row: the config file,
# the fields set on its :smoke variant, and (a regex of) the message.
BAD_VALUES = [
    ("shakespeare_baseline", {"flow.time_sampler": "bogus"}, "use one of: uniform, logit_normal, power"),
    ("shakespeare_baseline", {"model.dtype": "float16"}, "use one of: float32, bfloat16"),
    ("shakespeare_baseline", {"data.name": "wikitext"}, "use one of: shakespeare, fineweb"),
    ("shakespeare_baseline", {"model.num_heads": 3}, "must be divisible by config.model.num_heads=3"),
    ("shakespeare_baseline", {"data.seq_len": 64}, "longer than the model supports"),
    ("shakespeare_baseline", {"train.grad_accum": 3}, "must be divisible by config.train.grad_accum=3"),
    ("shakespeare_baseline", {"train.lr": -1.0}, "lr must be > 0"),
    ("shakespeare_baseline", {"model.num_layers": 0}, "positive integer"),
    ("shakespeare_baseline", {"model.loss_chunk": -1}, "loss_chunk must be a whole number of tokens >= 0"),
    ("shakespeare_baseline", {"train.eval_batches": -1},
     r"train.eval_batches must be an integer >= 0 \(0 = every validation window once\), got -1"),
    ("shakespeare_baseline", {"sample.eval_steps": (4, 0)},
     r"sample.eval_steps=\[4, 0\] holds 0; every entry must be a number of sampling steps >= 1"),
    ("shakespeare_baseline", {"sample.num_samples": 0}, "sample.num_samples must be a positive integer, got 0"),
    ("shakespeare_baseline", {"sample.temperature": 0.0}, "sample.temperature must be > 0"),
    ("shakespeare_baseline", {"sample.stagger": -0.5}, "sample.stagger must be a finite number >= 0"),
    ("shakespeare_baseline", {"flow.token_time_prob": 0.8, "flow.stagger_prob": 0.3},
     r"token_time_prob \+ config.flow.stagger_prob must be <= 1"),
    ("shakespeare_baseline", {"flow.stagger_width": 0.0}, "flow.stagger_width must be > 0"),
    ("shakespeare_baseline", {"sample.schedule": "power", "sample.schedule_param": 0.0},
     "sample.schedule_param must be > 0 for schedule='power'"),
    ("shakespeare_baseline", {"flow.num_buckets": 0}, "flow.num_buckets must be a positive integer, got 0"),
    ("shakespeare_baseline", {"flow.num_buckets": 101}, r"flow.num_buckets=101 must be at most 100"),
    ("shakespeare_baseline", {"flow.time_sampler": "power", "flow.time_param": -1.0},
     r"flow.time_param must be > 0 for time_sampler='power' \(t = u\*\*p; p <= 0 puts every t at 1\)"),
    ("shakespeare_baseline", {"flow.time_sampler": "power", "flow.time_param": 0.0}, "every t at 1"),
    ("shakespeare_baseline", {"flow.time_sampler": "logit_normal", "flow.time_param": 0.0},
     "flow.time_param must be > 0 for time_sampler='logit_normal'"),
    ("shakespeare_baseline", {"model.cross_attention": True},
     "cross_attention=True: the tokenflow task has no context to attend to"),
    ("shakespeare_teacher", {"model.dim": 0}, "model.dim must be a positive integer"),
    ("shakespeare_baseline", {"model.context_dim": 16}, "context_dim=16: the only cross-attention context"),
    ("shakespeare_gumbel", {"model.context_dim": 16}, "context_dim=16: the only cross-attention context"),
    ("shakespeare_gumbel", {"gumbel.conditioning": "x0", "model.cross_attention": True},
     "conditioning='x0' does not use cross-attention"),
    ("shakespeare_gumbel", {"gumbel.tau": 0.0}, "gumbel.tau must be > 0"),
    ("shakespeare_baseline", {"train.b2": 1.0}, r"train.b2 must be in \[0.0, 1.0\)"),
    ("shakespeare_baseline", {"train.min_lr_ratio": 1.5}, r"train.min_lr_ratio must be in \[0.0, 1.0\]"),
    ("shakespeare_baseline", {"train.weight_decay": -0.1},
     r"train.weight_decay must be >= 0 \(0 = no decay\), got -0.1"),
    ("shakespeare_baseline", {"data.val_rows": 0}, "data.val_rows must be a positive integer"),
    ("shakespeare_baseline", {"mesh.fsdp": 0}, "mesh.fsdp must be a positive integer"),
    ("shakespeare_baseline", {"mesh.data": 0}, r"mesh.data \(or -1 = all remaining devices\) must be a positive"),
]


@pytest.mark.parametrize(("config", "fields", "message"), BAD_VALUES)
def test_validation_messages(config, fields, message):
    raw = set_fields(load_config(config, "smoke"), fields)
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
