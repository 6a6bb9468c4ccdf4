"""The Python API: loading, conditional generation (prompts, templates, masks), exports."""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from conftest import load_config, record_network_inputs
from flax import nnx

import discreteflow_jax as dfj
from discreteflow_jax import conditioning, flow
from discreteflow_jax.config import TokenFlowConfig, parse_config
from discreteflow_jax.data.tokenizers import Tokenizer, load_tokenizer
from discreteflow_jax.inference import prompts
from discreteflow_jax.inference.batches import continue_prefixes
from discreteflow_jax.inference.export import export_model
from discreteflow_jax.inference.flow_model import TokenFlowModel, model_config
from discreteflow_jax.inference.load import LoadError, load
from discreteflow_jax.inference.teacher_model import TeacherModel
from discreteflow_jax.io import export_format
from discreteflow_jax.models.tokenflow import TokenFlow

# ---------------------------------------------------------------------------------------------
# Helpers


class CharTokenizer(Tokenizer):
    """One id per character of a fixed alphabet; enough to test prompts and templates."""

    ALPHABET = "\x00\x01\x02 abcdefghijklmnopqrstuvwxyz.,:'\n"

    def __init__(self):
        self.name, self.vocab_size = "char", len(self.ALPHABET)
        self.bos_id, self.eos_id, self.pad_id = 1, 2, 2

    def encode(self, text):
        return [self.ALPHABET.index(c) for c in text]

    def decode(self, ids):
        return "".join(self.ALPHABET[int(i)] for i in ids)


def tiny_flow(tokenizer: Tokenizer, seed: int = 0, **overrides) -> TokenFlowModel:
    """A randomly initialized TokenFlowModel on the smoke config (seq_len 16)."""
    c = load_config("shakespeare_baseline")
    c.model.vocab_size = tokenizer.vocab_size
    for key, value in overrides.items():
        node = c
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    cfg = parse_config(c)
    model = TokenFlow(model_config(cfg), rngs=nnx.Rngs(seed))
    graphdef, state = nnx.split(model)
    return TokenFlowModel(cfg, graphdef, nnx.to_pure_dict(state), tokenizer, "test", step=0)


class OracleFlow:
    """The exact clean-token posterior for data drawn uniformly from a finite set of sequences,
    behind the TokenFlow interface the sampler uses (embeddings, embed, cfg, __call__).

    log p(s | x_t) = Σ_j −‖x_t,j − t·e_{s_j}‖² / (2σ²(1−t)² + ε²) + const, so the logits at each
    position are log Σ_s p(s | x_t)·[s_j = v]: a hand-set model with only one answer for each
    consistent set of known tokens.
    """

    def __init__(self, sequences: np.ndarray, vocab: int, dim: int):
        self.cfg = TokenFlowConfig(vocab_size=vocab, dim=dim, num_layers=1, num_heads=1, max_len=sequences.shape[1])
        raw = jax.random.normal(jax.random.key(0), (vocab, dim))
        self.emb = raw / jnp.linalg.norm(raw, axis=-1, keepdims=True) * self.cfg.row_norm
        self.sequences = jnp.asarray(sequences)

    def embeddings(self):
        return self.emb

    def embed(self, tokens):
        return self.emb[tokens]

    def __call__(self, x_t, t_B, context=None):
        e_s = self.emb[self.sequences]  # [S, T, d]
        t = t_B[:, None, None, None]
        sq = jnp.sum((x_t[:, None] - t * e_s[None]) ** 2, axis=-1)  # [B, S, T]
        denom = 2 * self.cfg.sigma**2 * (1 - t_B[:, None]) ** 2 + self.cfg.singular_eps**2
        w = jax.nn.softmax(-sq.sum(-1) / denom, axis=1)  # [B, S]
        probs = jnp.einsum("bs,stv->btv", w, jax.nn.one_hot(self.sequences, self.cfg.vocab_size))
        return jnp.log(probs + 1e-30)


def assert_template_kept(tokens: np.ndarray, parsed: prompts.Known) -> None:
    size = parsed.mask.shape[1]
    known = parsed.mask[0]
    for row in tokens:
        np.testing.assert_array_equal(row[:size][known], parsed.tokens[0][known])


def counting_sequences(vocab: int, length: int) -> np.ndarray:
    """Row k is k, k+1, ... (mod vocab): any one known token pins down the whole row."""
    return (np.arange(vocab)[:, None] + np.arange(length)[None, :]) % vocab


# ---------------------------------------------------------------------------------------------
# Conditional generation


def test_oracle_infilling_recovers_the_only_consistent_sequence():
    # Clamping: each known token is fully visible from the first step on. (Holding known tokens on
    # their noise path gives them only the evidence of noisy positions; with this exact model it
    # recovers 78% of such rows, clamping 100%: see docs/conditional.md.)
    vocab, length = 11, 8
    seqs = counting_sequences(vocab, length)
    oracle = OracleFlow(seqs, vocab, dim=16)
    n = 8
    truth = seqs[np.arange(n) * 3 % vocab]  # eight different answers
    rng = np.random.default_rng(0)
    mask = np.zeros((n, length), bool)
    for row in mask:
        row[rng.choice(length, 4, replace=False)] = True  # scattered known tokens, four blanks
    tokens = conditioning.conditional_sample(oracle, jax.random.key(1), flow.time_grid(16),
                                    jnp.asarray(np.where(mask, truth, 0)), jnp.asarray(mask), condition="clamp")
    np.testing.assert_array_equal(np.asarray(tokens), truth)


def test_oracle_unconditional_samples_are_data():
    vocab, length = 11, 8
    seqs = counting_sequences(vocab, length)
    oracle = OracleFlow(seqs, vocab, dim=16)
    n = 8
    zeros = jnp.zeros((n, length), jnp.int32)
    tokens = np.asarray(conditioning.conditional_sample(oracle, jax.random.key(2), flow.time_grid(32), zeros,
                                               jnp.zeros((n, length), bool)))
    rows = {tuple(r) for r in seqs.tolist()}
    assert all(tuple(r) in rows for r in tokens.tolist())


def assert_known_inputs(seen: list, e_known: np.ndarray, mask: np.ndarray, condition: str) -> None:
    """At every step the network reads the known positions as ``condition`` says: their clean
    embedding (clamp) or t·e + (1−t)·x0 (path; x0 is what it read at t = 0), and the others not so."""
    assert len(seen) >= 2
    x_first = next(x for x, t in seen if np.all(t == 0))
    for x, t in seen:
        t = np.reshape(t, (-1,))[0]
        target = e_known if condition == "clamp" else t * e_known + (1 - t) * x_first
        np.testing.assert_allclose(x[mask], target[mask], rtol=1e-5, atol=1e-6)
        if t > 0:
            assert not np.allclose(x[~mask], target[~mask], atol=1e-3)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("condition", conditioning.CONDITION_MODES)
def test_known_positions_reach_the_network_held(causal, condition, monkeypatch):
    tok = CharTokenizer()
    model = tiny_flow(tok, causal=causal)
    rng = np.random.default_rng(0)
    # Same n and steps everywhere: one compiled program serves all three requests.
    known = rng.integers(0, tok.vocab_size, (2, 16))
    mask = rng.random((2, 16)) < 0.4
    seen = record_network_inputs(monkeypatch)
    out = model.sample_tokens(2, 2, seed=0, known_tokens=known, known_mask=mask, condition=condition)
    assert out.shape == (2, 16)
    np.testing.assert_array_equal(out[mask], known[mask])
    assert_known_inputs(seen, np.asarray(model.model().embed(jnp.asarray(known))), mask, condition)

    seen.clear()
    texts = model.sample(2, 2, seed=1, prompt="to be", condition=condition)
    assert all(t.startswith("to be") for t in texts)
    prompt = np.zeros((2, 16), int)
    prompt[:, :5] = tok.encode("to be")
    in_prompt = np.broadcast_to(np.arange(16) < 5, (2, 16))
    assert_known_inputs(seen, np.asarray(model.model().embed(jnp.asarray(prompt))), in_prompt, condition)
    filled = model.sample_tokens(2, 2, seed=1, template="to be ____ to be", blank_length=3, condition=condition)
    assert_template_kept(filled, prompts.parse_template("to be ____ to be", tok, blank_length=3))


def test_unconditional_sampling_matches_the_training_sampler():
    tok = CharTokenizer()
    model = tiny_flow(tok)
    ours = model.sample_tokens(2, 3, seed=5, schedule="uniform", temperature=1.0)
    m = model.model()
    x0 = flow.gaussian_source(jax.random.key(5), 2, 16, m)
    ref, _ = flow.sample_flow(m, x0, flow.time_grid(3))
    np.testing.assert_array_equal(ours, np.asarray(ref))
    staggered = model.sample_tokens(2, 6, seed=5, stagger=2.0)
    ref_staggered, _ = flow.sample_flow(m, x0, flow.time_grid(6), stagger=2.0)
    np.testing.assert_array_equal(staggered, np.asarray(ref_staggered))


def test_staggered_sampling_with_under_one_step_per_position_says_so(caplog):
    model = tiny_flow(CharTokenizer())
    with caplog.at_level("WARNING"):
        model.sample_tokens(1, 6, stagger=2.0)  # two steps per position
    assert "decoded greedily" not in caplog.text
    with caplog.at_level("WARNING"):
        model.sample_tokens(1, 2, stagger=2.0)  # 2/3 of a step per position
    assert "decoded greedily" in caplog.text and "steps >= 6" in caplog.text


def test_score_reports_every_t_bucket():
    model = tiny_flow(CharTokenizer())
    scores = model.score(["to be or not to be, that is the question"])
    assert set(scores) == {"loss"} | {f"loss_t{i / 10:.1f}-{(i + 1) / 10:.1f}" for i in range(10)}
    assert scores["loss_t0.0-0.1"] > scores["loss_t0.9-1.0"]


def test_template_parsing():
    tok = CharTokenizer()
    parsed = prompts.parse_template("ab ___ c ____", tok, blank_length=2)
    assert parsed.mask.tolist() == [[True, True, False, False, True, False, False]]
    assert tok.decode(parsed.tokens[0][parsed.mask[0]]) == "abc"


def test_bad_requests_fail_before_compiling(monkeypatch):
    tok = CharTokenizer()
    model = tiny_flow(tok)

    def no_compile(*args, **kwargs):
        raise AssertionError("compiled before validating the request")

    monkeypatch.setattr(model, "_program", no_compile)
    with pytest.raises(ValueError, match="prompt is 20 tokens long"):
        model.sample(1, 2, prompt="a" * 20)
    with pytest.raises(ValueError, match="has no blank"):
        model.sample(1, 2, template="to be or not to be")
    with pytest.raises(ValueError, match="known_mask has shape"):
        model.sample(1, 2, known_tokens=np.zeros((1, 16), int), known_mask=np.zeros((1, 15), bool))
    with pytest.raises(ValueError, match=r"shape \[16\]"):
        model.sample(2, 2, known_tokens=np.zeros((3, 16), int), known_mask=np.zeros((3, 16), bool))
    with pytest.raises(ValueError, match="template is"):
        model.sample(1, 2, template="abcdefgh ____ abcdefgh", blank_length=4)
    with pytest.raises(ValueError, match="only one of"):
        model.sample(1, 2, prompt="ab", template="a ___")
    with pytest.raises(ValueError, match="outside the vocabulary"):
        model.sample(1, 2, known_tokens=np.full(16, 999), known_mask=np.ones(16, bool))
    with pytest.raises(ValueError, match="condition must be"):
        model.sample(1, 2, prompt="ab", condition="pin")
    with pytest.raises(ValueError, match="stagger must be"):
        model.sample(1, 2, stagger=-1.0)


def test_continue_prefixes_keeps_each_prefix_and_returns_the_rest():
    tok = CharTokenizer()
    model = tiny_flow(tok)
    prefixes = ["to be", "or not to be"]
    out = continue_prefixes(model, prefixes, steps=(1, 2), return_tokens=True, batch_size=1)
    assert sorted(out) == [1, 2]
    for k in out:
        assert [len(c) for c in out[k]] == [16 - len(p) for p in prefixes]
    with pytest.raises(ValueError, match="prefix 0"):
        continue_prefixes(model, ["a" * 16], steps=(1,))


def test_gumbel_models_condition_with_posterior_noise():
    from discreteflow_jax import gumbel as gmb
    tok = CharTokenizer()
    c = load_config("shakespeare_baseline")
    c.model.vocab_size = tok.vocab_size
    c.task = "gumbel"
    c.gumbel = ml_collections.ConfigDict({"conditioning": "cross_attention"})
    cfg = parse_config(c)
    model_cfg = model_config(cfg)
    assert model_cfg.cross_attention  # the gumbel section reaches the module
    m = TokenFlow(model_cfg, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(m)
    model = TokenFlowModel(cfg, graphdef, nnx.to_pure_dict(state), tok, "test")
    assert model.kind == "gumbel"

    # No known position: exactly the training-time Gumbel source.
    key = jax.random.key(3)
    source = conditioning.gumbel_prior(cfg.extra["gumbel"])
    gcfg = gmb.parse_gumbel_config(cfg.extra["gumbel"])
    known = jnp.asarray(np.random.default_rng(0).integers(3, tok.vocab_size, (2, 16)), jnp.int32)

    @jax.jit  # one compilation instead of one per eager op
    def sources(params):
        m = nnx.merge(graphdef, params)
        zeros = jnp.zeros((2, 16), jnp.int32)
        return (source(key, m, zeros, jnp.zeros((2, 16), bool)), gmb.gumbel_source(m, key, 2, 16, gcfg),
                source(key, m, known, jnp.ones((2, 16), bool))[1], m.embeddings())

    ours, ref, ctx, emb = sources(model.params)
    np.testing.assert_allclose(ours[0], ref[0], rtol=1e-6)
    np.testing.assert_allclose(ours[1], ref[1], rtol=1e-5, atol=1e-6)

    # Known positions: the context there leans towards the known token's embedding.
    emb = emb / m.cfg.embed_scale_value
    nearest = jnp.argmax(jnp.einsum("btd,vd->btv", ctx, emb), axis=-1)
    assert float(jnp.mean(nearest == known)) > 0.5

    for known_noise in conditioning.KNOWN_NOISE:
        out = model.sample_tokens(2, 2, seed=0, template="to be ____ to be", known_noise=known_noise)
        assert_template_kept(out, prompts.parse_template("to be ____ to be", tok))


# ---------------------------------------------------------------------------------------------
# Conditional training option


def test_flow_loss_with_known_positions_keeps_them_clean_and_unscored():
    model = TokenFlow(TokenFlowConfig(vocab_size=23, dim=16, num_layers=1, num_heads=2, max_len=8),
                      rngs=nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(0), (3, 8), 0, 23)
    mask = jnp.ones((3, 8))
    known = jnp.zeros((3, 8), bool).at[:, :3].set(True)
    key = jax.random.key(1)
    graphdef, params = nnx.split(model)

    @jax.jit  # one compilation instead of one per eager op
    def both(params):
        model = nnx.merge(graphdef, params)
        loss, metrics = flow.flow_loss(model, tokens, mask, key, known_BT=known)
        t_key, x0_key = jax.random.split(key)
        t = jax.random.uniform(t_key, (3,))
        x1 = model.embed(tokens)
        x0 = model.cfg.sigma * jax.random.normal(x0_key, x1.shape)
        x_t = jnp.where(known[..., None], x1, flow.noisy_path(x1, x0, t))
        nll = flow.cross_entropy(model(x_t, t), tokens)
        return loss, metrics["tokens"], jnp.sum(nll * ~known) / 15

    loss, num_tokens, ref = both(params)
    assert float(num_tokens) == 3 * 5
    np.testing.assert_allclose(loss, ref, rtol=1e-5)


def test_gumbel_task_trains_with_known_positions():
    from discreteflow_jax.config.presets import tokenflow_defaults
    from discreteflow_jax.io.teacher import TeacherBundle
    from discreteflow_jax.models.llama import Llama, LlamaConfig
    from discreteflow_jax.tasks.gumbel import add_gumbel_sections, gumbel_task

    c = add_gumbel_sections(tokenflow_defaults())
    c.model.vocab_size, c.model.dim, c.model.num_layers, c.model.num_heads, c.model.max_len = 40, 16, 1, 2, 8
    c.data.seq_len = 8
    c.flow.condition_prob = 1.0
    cfg = parse_config(c)
    teacher_cfg = LlamaConfig(vocab_size=40, dim=16, num_layers=1, num_heads=2, ffn_hidden=32, max_len=8, bos_id=1)
    graphdef, state = nnx.split(Llama(teacher_cfg, rngs=nnx.Rngs(0)))
    bundle = TeacherBundle(graphdef=graphdef, params=nnx.to_pure_dict(state), config=teacher_cfg, kind="llama",
                           bos_id=1, vocab_size=40, max_len=8, source="test teacher")
    task = gumbel_task(cfg, teacher=bundle)
    s_graphdef, s_params = nnx.split(task.create_model(nnx.Rngs(0)))
    tokens = jax.random.randint(jax.random.key(0), (4, 8), 0, 40)
    key = jax.random.key(1)
    _, metrics = jax.jit(lambda p: task.loss_fn(nnx.merge(s_graphdef, p), task.aux, tokens, key))(s_params)
    from discreteflow_jax.tasks.base import known_positions

    known = known_positions(cfg.flow, (4, 8), key)
    assert float(metrics["tokens"]) == float((~known).sum()) < 32  # known positions are not scored


def test_random_known_mask():
    key = jax.random.key(0)
    assert not bool(flow.random_known_mask(key, 64, 16, 0.0).any())
    m = np.asarray(flow.random_known_mask(key, 256, 16, 1.0, prefix_prob=0.5, span_len=4))
    assert (~m).any(axis=1).all()  # every row keeps something to predict
    assert 0.2 < m.mean() < 0.8
    prefix_rows = [r for r in m if r.any() and (r == (np.arange(16) < r.sum())).all()]
    assert len(prefix_rows) > 50
    only_prefix = np.asarray(flow.random_known_mask(key, 64, 16, 1.0, prefix_prob=1.0))
    assert all((r == (np.arange(16) < r.sum())).all() and 1 <= r.sum() <= 15 for r in only_prefix)


def test_condition_config_is_validated_and_reaches_the_loss():
    from discreteflow_jax.config import ConfigError
    from discreteflow_jax.tasks.base import known_positions

    c = load_config("shakespeare_baseline")
    assert known_positions(parse_config(c).flow, (4, 16), jax.random.key(0)) is None
    c.flow.condition_prob = 1.0
    mask = known_positions(parse_config(c).flow, (4, 16), jax.random.key(0))
    assert mask.shape == (4, 16) and bool(mask.any())
    c.flow.condition_prob = 1.5
    with pytest.raises(ConfigError, match="condition_prob"):
        parse_config(c)


# ---------------------------------------------------------------------------------------------
# Loading and exporting


def _llama_flow(data_dir: str) -> TokenFlowModel:
    tok = load_tokenizer("llama", data_dir)
    c = load_config("shakespeare_baseline")
    c.data.data_dir = data_dir
    cfg = parse_config(c)
    model = TokenFlow(cfg.model, rngs=nnx.Rngs(7))
    graphdef, state = nnx.split(model)
    return TokenFlowModel(cfg, graphdef, nnx.to_pure_dict(state), tok, "test", step=3)


def _logits(model: TokenFlowModel) -> np.ndarray:
    m = model.model()
    x = m.cfg.sigma * jax.random.normal(jax.random.key(0), (2, 16, m.cfg.dim))
    return np.asarray(m(x, jnp.asarray([0.1, 0.7])))


def test_workdir_loads_in_one_call(tmp_path, data_dir, monkeypatch):
    from discreteflow_jax.io import checkpoint as ckpt
    from discreteflow_jax.training.optim import make_optimizer
    from discreteflow_jax.training.steps import TrainState

    model = _llama_flow(data_dir)
    tx = make_optimizer(model.config.train)
    state = TrainState(jnp.asarray(3, jnp.int32), model.params, tx.init(model.params))
    mngr = ckpt.manager(str(tmp_path), keep=2, async_save=False)
    ckpt.save(mngr, 3, state, {"config": model.config.raw, "step": 3, "data_state": {}}, force=True)
    mngr.close()
    import optax

    # Loading reads the parameters only: no optimizer is built, its moments are never read.
    monkeypatch.setattr(optax, "adamw", lambda *a, **k: pytest.fail("load() built an optimizer"))
    loaded = dfj.load(str(tmp_path))
    assert isinstance(loaded, dfj.TokenFlowModel) and loaded.step == 3
    assert loaded.config.raw == model.config.raw
    np.testing.assert_array_equal(_logits(loaded), _logits(model))
    texts = loaded.sample(2, 2, seed=0, prompt="ROMEO:")
    assert all(t.startswith("ROMEO:") for t in texts)


def test_tokenflow_export_round_trip(tmp_path, data_dir, monkeypatch):
    model = _llama_flow(data_dir)
    out = str(tmp_path / "export")
    export_model(model, out, data_dir)
    meta = json.loads((tmp_path / "export" / "config.json").read_text())
    assert meta["format_version"] == export_format.FORMAT_VERSION and meta["kind"] == "tokenflow"
    assert meta["architecture"]["dim"] == model.config.model.dim
    assert meta["tokenizer"]["name"] == "llama" and meta["training_config"] == model.config.raw
    assert os.path.isfile(os.path.join(out, "llama_tokenizer", "tokenizer.model"))
    from safetensors.numpy import load_file

    assert "blocks.0.attn.q_proj.kernel" in load_file(os.path.join(out, "model.safetensors"))

    # The export is self-contained: no data folder, no original config needed.
    monkeypatch.delenv("DISCRETEFLOW_DATA_DIR", raising=False)
    loaded = dfj.load(out)
    assert isinstance(loaded, dfj.TokenFlowModel) and loaded.step == 3
    np.testing.assert_array_equal(_logits(loaded), _logits(model))
    np.testing.assert_array_equal(loaded.sample_tokens(2, 3, seed=1), model.sample_tokens(2, 3, seed=1))


def test_teacher_export_is_hf_compatible_and_round_trips(tmp_path, data_dir):
    from discreteflow_jax.models.llama import Llama

    c = load_config("shakespeare_teacher")
    c.data.data_dir = data_dir
    cfg = parse_config(c)
    module = Llama(cfg.model, rngs=nnx.Rngs(0))
    teacher = TeacherModel(cfg, module, load_tokenizer("llama", data_dir), "test", step=4)
    out = str(tmp_path / "teacher")
    export_model(teacher, out, data_dir)
    meta = json.loads((tmp_path / "teacher" / "config.json").read_text())
    assert meta["model_type"] == "llama" and meta["kind"] == "llama" and meta["format_version"] == 1
    loaded = dfj.load(out)
    assert isinstance(loaded, dfj.TeacherModel)
    tokens = jnp.asarray([[1, 100, 200, 300]])
    np.testing.assert_allclose(loaded.module(tokens), module(tokens), rtol=1e-5, atol=1e-5)
    texts = loaded.sample(2, seed=0, prompt="ROMEO:", length=8)
    assert all(t.startswith("ROMEO:") for t in texts)
    prefixes = [[100, 200], [100, 200, 300, 400]]  # different lengths share one batch
    conts = continue_prefixes(loaded, prefixes, steps=(1,), length=8, return_tokens=True)[1]
    assert [len(c) for c in conts] == [6, 4]
    greedy = loaded.continue_rows(prefixes, 8, temperature=1e-6)
    alone = loaded.continue_rows(prefixes[1:], 8, temperature=1e-6)
    np.testing.assert_array_equal(greedy[1], alone[0])  # padding does not leak into a row
    scores = loaded.score(["ROMEO: what say you?"])
    assert scores["ppl"] == pytest.approx(np.exp(scores["loss"])) and scores["loss"] > 0
    with pytest.raises(ValueError, match="only continues a prefix"):
        loaded.sample(1, template="a ____ b")


def test_export_format_versions(tmp_path, data_dir, monkeypatch):
    model = _llama_flow(data_dir)
    out = tmp_path / "export"
    export_model(model, str(out), data_dir)
    meta = json.loads((out / "config.json").read_text())

    (out / "config.json").write_text(json.dumps({**meta, "format_version": export_format.FORMAT_VERSION + 1}))
    with pytest.raises(export_format.ExportFormatError, match="newer"):
        dfj.load(str(out))
    (out / "config.json").write_text(json.dumps({**meta, "format_version": 0, "arch": meta["architecture"]}))
    with pytest.raises(export_format.ExportFormatError, match="cannot migrate"):
        dfj.load(str(out))

    def v0_to_v1(old: dict) -> dict:  # e.g. a renamed field
        new = {k: v for k, v in old.items() if k != "arch"}
        return {**new, "architecture": old["arch"], "format_version": 1}

    monkeypatch.setitem(export_format.MIGRATIONS, 0, v0_to_v1)
    np.testing.assert_array_equal(_logits(dfj.load(str(out))), _logits(model))


def test_loading_something_that_is_not_a_model_says_what_is_missing(tmp_path):
    with pytest.raises(LoadError, match="does not exist"):
        dfj.load(str(tmp_path / "nothing"))
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(LoadError, match="missing model.safetensors"):
        dfj.load(str(tmp_path))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(LoadError, match="config.json, model.safetensors"):
        dfj.load(str(empty))
    (empty / "checkpoints").mkdir()
    with pytest.raises(LoadError, match="no finished checkpoint"):
        dfj.load(str(empty))


def test_top_level_exports_are_lazy():
    assert dfj.load is load and dfj.TokenFlowModel is TokenFlowModel and dfj.TeacherModel is TeacherModel
    assert dfj.LoadError is LoadError and dfj.continue_prefixes is continue_prefixes
    assert dfj.export_model is export_model
    with pytest.raises(AttributeError):
        dfj.no_such_name  # noqa: B018


def test_gumbel_architecture_in_export(tmp_path, data_dir):
    tok = load_tokenizer("llama", data_dir)
    c = load_config("shakespeare_baseline")
    c.task = "gumbel"
    c.gumbel = ml_collections.ConfigDict({"conditioning": "cross_attention"})
    cfg = parse_config(c)
    m = TokenFlow(model_config(cfg), rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(m)
    model = TokenFlowModel(cfg, graphdef, nnx.to_pure_dict(state), tok, "test")
    out = str(tmp_path / "g")
    export_model(model, out, data_dir)
    loaded = dfj.load(out)
    assert loaded.kind == "gumbel" and loaded.architecture.cross_attention
    assert json.loads(open(os.path.join(out, "config.json")).read())["architecture"]["cross_attention"] is True
    assert loaded.config.extra["gumbel"] == cfg.extra["gumbel"]
    # Every parameter comes back, the cross-attention layers included.
    flat = export_format.flatten_params(model.params)
    assert any("cross" in name for name in flat)
    loaded_flat = export_format.flatten_params(loaded.params)
    assert sorted(loaded_flat) == sorted(flat)
    for name, value in flat.items():
        np.testing.assert_array_equal(loaded_flat[name], value)
    np.testing.assert_array_equal(loaded.sample_tokens(1, 2, seed=0), model.sample_tokens(1, 2, seed=0))


def test_dataclass_configs_are_plain_json():
    # config.json must stay readable without this package: architecture values are JSON scalars.
    arch = dataclasses.asdict(TokenFlowConfig())
    assert json.loads(json.dumps(arch)) == arch


# ---------------------------------------------------------------------------------------------
# Answers to what was asked: teacher checkpoints by step, default lengths, Gumbel scoring


def _save_teacher_checkpoints(workdir: str, data_dir: str, steps: tuple[int, ...]) -> tuple[dict, dict]:
    """A teacher workdir holding one checkpoint per step, each with different parameters."""
    from discreteflow_jax.io import checkpoint as ckpt
    from discreteflow_jax.models.llama import Llama
    from discreteflow_jax.training.optim import make_optimizer
    from discreteflow_jax.training.steps import TrainState

    c = load_config("shakespeare_teacher")
    c.data.data_dir = data_dir
    cfg = parse_config(c)
    tx = make_optimizer(cfg.train)
    mngr = ckpt.manager(workdir, keep=10, async_save=False)
    modules = {}
    for step in steps:
        module = Llama(cfg.model, rngs=nnx.Rngs(step))
        params = nnx.to_pure_dict(nnx.state(module))
        state = TrainState(jnp.asarray(step, jnp.int32), params, tx.init(params))
        ckpt.save(mngr, step, state, {"config": cfg.raw, "step": step, "data_state": {}}, force=True)
        modules[step] = module
    mngr.close()
    return modules, cfg.raw


def test_teacher_workdir_loads_the_step_asked_for(tmp_path, data_dir):
    workdir = str(tmp_path / "teacher")
    modules, _ = _save_teacher_checkpoints(workdir, data_dir, (2, 4))
    tokens = jnp.asarray([[1, 100, 200, 300]])
    for step in (2, 4, None):
        loaded = dfj.load(workdir, step=step)
        want = 4 if step is None else step
        assert loaded.step == want
        np.testing.assert_allclose(loaded.module(tokens), modules[want](tokens), rtol=1e-6, atol=1e-6)
    assert not np.allclose(modules[2](tokens), modules[4](tokens))
    from discreteflow_jax.io import checkpoint as ckpt

    with pytest.raises(ckpt.CheckpointError, match="no checkpoint of step 3; the steps kept there are: 4, 2"):
        dfj.load(workdir, step=3)
    from discreteflow_jax.config import ConfigError
    from discreteflow_jax.io.teacher import load_teacher

    assert load_teacher({"checkpoint": workdir, "step": 2}).step == 2
    with pytest.raises(ConfigError, match="no checkpoint of step 3"):
        load_teacher({"checkpoint": workdir, "step": 3})


def test_teacher_default_length_fits_the_bos_slot(tmp_path, data_dir):
    workdir = str(tmp_path / "teacher")
    _save_teacher_checkpoints(workdir, data_dir, (1,))
    teacher = dfj.load(workdir)
    max_len = teacher.module.config.max_len
    assert teacher.seq_len == max_len  # the teacher configs train on their whole context
    tokens = teacher.sample_tokens(2, seed=0)  # no length: the default must work
    assert tokens.shape == (2, max_len - 1)
    conts = continue_prefixes(teacher, [[100, 200]], steps=(1,), return_tokens=True)[1]
    assert len(conts[0]) == max_len - 1 - 2


def _gumbel_flow_and_teacher(conditioning: str) -> tuple[TokenFlowModel, object]:
    from discreteflow_jax.io.teacher import TeacherBundle
    from discreteflow_jax.models.llama import Llama, LlamaConfig

    tok = CharTokenizer()
    c = load_config("shakespeare_baseline")
    c.model.vocab_size = tok.vocab_size
    c.task = "gumbel"
    c.gumbel = ml_collections.ConfigDict({"conditioning": conditioning})
    c.teacher = ml_collections.ConfigDict({"checkpoint": "", "hf": ""})
    cfg = parse_config(c)
    m = TokenFlow(model_config(cfg), rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(m)
    model = TokenFlowModel(cfg, graphdef, nnx.to_pure_dict(state), tok, "test")
    t_cfg = LlamaConfig(vocab_size=tok.vocab_size, dim=32, num_layers=1, num_heads=2, ffn_hidden=64, max_len=32,
                        bos_id=tok.bos_id, init_std=0.2)
    t_graphdef, t_state = nnx.split(Llama(t_cfg, rngs=nnx.Rngs(5)))
    bundle = TeacherBundle(graphdef=t_graphdef, params=nnx.to_pure_dict(t_state), config=t_cfg, kind="llama",
                           bos_id=tok.bos_id, vocab_size=tok.vocab_size, max_len=32, source="test teacher")
    return model, bundle


@pytest.mark.parametrize("conditioning", ["x0", "cross_attention"])
def test_gumbel_score_uses_the_teachers_posterior_noise(conditioning, monkeypatch):
    from discreteflow_jax import gumbel as gmb

    model, teacher = _gumbel_flow_and_teacher(conditioning)
    text = ["to be, or not to be: that is the question"]
    # No teacher to be had: refused up front, saying what to pass (nothing compiled).
    monkeypatch.setattr(jax, "jit", lambda *a, **k: pytest.fail("compiled before refusing"))
    with pytest.raises(ValueError, match="pass teacher="):
        model.score(text)
    with pytest.raises(ValueError, match="only applies to Gumbel models"):
        tiny_flow(CharTokenizer()).score(text, teacher=teacher)
    monkeypatch.undo()

    got = model.score(text, teacher=teacher, seed=3)
    # The same windows, times and keys through the Gumbel validation loss (posterior noise).
    windows, masks = prompts.text_windows(model.tokenizer, text, model.seq_len)
    nb = model.config.flow.num_buckets
    tokens, mask = np.repeat(windows, nb, axis=0), np.repeat(masks, nb, axis=0)
    bucket = jnp.tile(jnp.arange(nb, dtype=jnp.float32), windows.shape[0])
    key = jax.random.key(3)
    t = (bucket + jax.random.uniform(jax.random.fold_in(key, 1), bucket.shape)) / nb
    sums = gmb.gumbel_flow_loss(model.model(), teacher.model(), jnp.asarray(tokens), jnp.asarray(mask), key,
                                gmb.parse_gumbel_config(model.config.extra["gumbel"]), bos_id=teacher.bos_id,
                                source="data_posterior", num_buckets=nb, t_B=t)[1]
    want = float(sums["loss_sum"] / sums["tokens"])
    assert got["loss"] == pytest.approx(want, rel=1e-4)
    if conditioning == "cross_attention":
        return  # there is no Gaussian-only loss to compare with: the model needs the context
    # ...which is not the Gaussian-source loss the model never trained on.
    gauss = flow.flow_loss(model.model(), jnp.asarray(tokens), jnp.asarray(mask), key, num_buckets=nb, t_B=t)[1]
    assert abs(float(gauss["loss_sum"] / gauss["tokens"]) - want) > 1e-3
