"""Warm-started students (models/warmflow.py, tasks/students.py): at t = 1 the untrained student is
its teacher, for LLaMA and GPT-2 (incl. one converted from a Hugging Face checkpoint), with every
new part (time map, gate on later positions, G channels) at its zero start; the parts do reach the
output once they are non-zero; FineWeb-style GPT-2 students train and sample end to end."""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from discreteflow_jax import flow
from discreteflow_jax.config import ConfigError, TokenFlowConfig, parse_config
from discreteflow_jax.io.teacher import TeacherBundle
from discreteflow_jax.models.generate import teacher_inputs
from discreteflow_jax.models.gpt2 import GPT2, GPT2Config
from discreteflow_jax.models.llama import Llama, LlamaConfig
from discreteflow_jax.models.warmflow import WarmFlow, flow_space_from_teacher
from discreteflow_jax.tasks.students import student_factory

REPO = Path(__file__).resolve().parents[1]
V, BOS, T = 64, 1, 12


def _bundle(model: nnx.Module) -> TeacherBundle:
    graphdef, state = nnx.split(model)
    c = model.config
    kind = "gpt2" if isinstance(model, GPT2) else "llama"
    return TeacherBundle(graphdef=graphdef, params=nnx.to_pure_dict(state), config=c, kind=kind, bos_id=int(c.bos_id),
                         vocab_size=c.vocab_size, max_len=c.max_len, source="test teacher")


def _llama(init_std: float = 0.2) -> Llama:
    return Llama(LlamaConfig(vocab_size=V, dim=32, num_layers=2, num_heads=4, ffn_hidden=64, max_len=32, bos_id=BOS,
                             init_std=init_std), rngs=nnx.Rngs(3))


def _gpt2(init_std: float = 0.2) -> GPT2:
    return GPT2(GPT2Config(vocab_size=V, dim=32, num_layers=2, num_heads=4, max_len=T, bos_id=BOS, eos_id=BOS,
                           init_std=init_std), rngs=nnx.Rngs(4))


def _student_cfg(**kw) -> TokenFlowConfig:
    base = dict(vocab_size=V, dim=32, num_layers=2, num_heads=4, max_len=32, tie_embeddings=False, flow_dim=8,
                warm_start=True, loss_chunk=0)
    base.update(kw)
    return TokenFlowConfig(**base)


def _warm_student(teacher: TeacherBundle, **kw) -> WarmFlow:
    factory = student_factory(_student_cfg(**kw), teacher)
    model = factory.create_model(nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    params = factory.init_params(nnx.to_pure_dict(state))
    nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, params))
    return nnx.merge(graphdef, state)


def _tokens(seed: int = 0, batch: int = 3) -> jax.Array:
    return jax.random.randint(jax.random.key(seed), (batch, T), 0, V)


def _teacher_logits(teacher: TeacherBundle, tokens: jax.Array) -> np.ndarray:
    return np.asarray(teacher.model()(teacher_inputs(tokens, BOS)))


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("extra", [{}, {"warm_attention": "gated"}, {"g_channel": "softmax"}, {"warm_input_topk": 4},
                                   {"g_channel": "linear", "g_channel_rank": 4}])
def test_untrained_student_at_t1_is_its_teacher(kind: str, extra: dict) -> None:
    teacher = _bundle(_llama() if kind == "llama" else _gpt2())
    student = _warm_student(teacher, **extra)
    tokens = _tokens()
    x1 = student.embed(tokens)
    t1 = jnp.ones((tokens.shape[0],))
    context = None
    if extra.get("g_channel"):
        context = student.g_features(jax.random.gumbel(jax.random.key(5), (tokens.shape[0], T, V)))
    got = np.asarray(student.network_logits(x1, t1, context))
    want = _teacher_logits(teacher, tokens)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    # Away from t = 1 the input is a blur of embeddings: the student is no longer the teacher.
    half = np.asarray(student.network_logits(0.5 * x1, jnp.full((tokens.shape[0],), 0.5), context))
    assert np.abs(half - want).max() > 1e-2


def test_new_parts_reach_the_output_once_nonzero() -> None:
    teacher = _bundle(_llama())
    tokens = _tokens()
    x1 = jnp.asarray(0.7) * _warm_student(teacher).embed(tokens)
    t = jnp.full((tokens.shape[0],), 0.7)
    g = jax.random.gumbel(jax.random.key(5), (tokens.shape[0], T, V))
    for extra, name in (({}, "time_proj"), ({"warm_attention": "gated"}, "future_gate"),
                        ({"g_channel": "softmax"}, "g_table"), ({"g_channel": "linear", "g_channel_rank": 4}, "g_up")):
        student = _warm_student(teacher, **extra)
        context = student.g_features(g) if "g_channel" in extra else None
        before = np.asarray(student.network_logits(x1, t, context))
        module = getattr(student, name)
        target = module.kernel if isinstance(module, nnx.Linear) else module
        target[...] = 0.3 * jax.random.normal(jax.random.key(9), target[...].shape)
        context = student.g_features(g) if "g_channel" in extra else None
        after = np.asarray(student.network_logits(x1, t, context))
        assert np.abs(after - before).max() > 1e-3, name


def test_gated_attention_reads_later_positions_causal_does_not() -> None:
    teacher = _bundle(_llama())
    tokens = _tokens()
    changed = tokens.at[:, -3].set((tokens[:, -3] + 1) % V)
    for attention, expect_change in (("causal", False), ("gated", True)):
        student = _warm_student(teacher, warm_attention=attention)
        if student.future_gate is not None:
            student.future_gate[...] = jnp.ones_like(student.future_gate[...])
        t = jnp.full((tokens.shape[0],), 0.9)
        a = np.asarray(student.network_logits(student.embed(tokens), t))
        b = np.asarray(student.network_logits(student.embed(changed), t))
        # Output i predicts token i and reads token i-1: token T-3 first shows at output T-2.
        early = np.abs(a[:, : T - 2] - b[:, : T - 2]).max()
        assert (early > 1e-4) == expect_change, attention
        assert np.abs(a[:, T - 2:] - b[:, T - 2:]).max() > 1e-4


def test_top_k_input_equals_the_full_posterior_when_k_is_the_vocabulary() -> None:
    teacher = _bundle(_llama())
    full, top_all, top_few = (_warm_student(teacher, warm_input_topk=k) for k in (0, V, 3))
    tokens = _tokens()
    x = 0.6 * full.embed(tokens) + 0.2 * jax.random.normal(jax.random.key(2), full.embed(tokens).shape)
    t = jnp.full((tokens.shape[0],), 0.6)
    want = np.asarray(full.teacher_inputs(x, t))
    np.testing.assert_allclose(np.asarray(top_all.teacher_inputs(x, t)), want, atol=1e-5)
    # Three tokens: a truncated posterior, different from the full one at this noise level.
    assert np.abs(np.asarray(top_few.teacher_inputs(x, t)) - want).max() > 1e-3


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_staggered_sampler_of_an_untrained_causal_student_decodes_like_its_teacher(kind: str) -> None:
    # With w = T − 1 and K = T steps the staggered sampler moves one position per call from t = 0
    # to t = 1, with every earlier position finished on the embedding of its token: the untrained
    # causal student then reads its teacher's input and, at t = 0, adds nothing to its teacher's
    # logits, so its sample is the teacher's greedy decoding, whatever the noise x0.
    seq_len = 9
    # Weights at 2.5x the other tests' scale, so that the greedy decoding is not one repeated token.
    teacher = _bundle(_llama(init_std=0.5) if kind == "llama" else _gpt2(init_std=0.5))
    student = _warm_student(teacher, warm_attention="causal")
    grid = flow.time_grid(seq_len)
    for k in range(seq_len + 1):  # the premise: every position's times are exactly 0 or 1
        expected = jnp.clip(k - jnp.arange(seq_len), 0, 1).astype(jnp.float32)
        np.testing.assert_array_equal(flow.staggered_times(grid[k], seq_len, seq_len - 1.0), expected)
    x0 = flow.gaussian_source(jax.random.key(5), 2, seq_len, student)
    tokens, _ = flow.sample_flow(student, x0, grid, stagger=seq_len - 1.0)
    greedy = np.zeros((2, seq_len), np.int32)
    for j in range(seq_len):
        greedy[:, j] = np.argmax(_teacher_logits(teacher, jnp.asarray(greedy))[:, j], axis=-1)
    np.testing.assert_array_equal(np.asarray(tokens), greedy)
    assert len(np.unique(greedy)) > 3  # a decoding that depends on its prefix, not one token


def test_flow_space_from_teacher_keeps_neighbours() -> None:
    rng = np.random.default_rng(0)
    w = rng.standard_normal((40, 16))
    w[1] = w[0] + 1e-3 * rng.standard_normal(16)  # two tokens the teacher treats alike
    e = flow_space_from_teacher(w, 6)
    np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0, rtol=1e-5)
    cos = e @ e.T
    np.fill_diagonal(cos, -1)
    assert cos[0].argmax() == 1 and cos[0, 1] > 0.99
    # The projection is on the top principal directions: it keeps more variance than a random one.
    centered = w - w.mean(0)
    top = np.linalg.svd(centered, full_matrices=False)[2][:6]
    rand = np.linalg.qr(rng.standard_normal((16, 6)))[0].T
    assert np.sum((centered @ top.T) ** 2) > np.sum((centered @ rand.T) ** 2)


def test_hf_gpt2_teacher_warm_student_matches_at_t1(tmp_path) -> None:
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from transformers import GPT2Config as HFConfig
    from transformers import GPT2LMHeadModel

    from discreteflow_jax.io.teacher import load_teacher

    torch.manual_seed(0)
    hf = GPT2LMHeadModel(HFConfig(vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=T, bos_token_id=BOS,
                                  eos_token_id=BOS)).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(0.2 * torch.randn(p.shape))
    hf.save_pretrained(tmp_path / "gpt2")
    teacher = load_teacher({"hf": str(tmp_path / "gpt2")})
    student = _warm_student(teacher)
    tokens = _tokens(1)
    with torch.no_grad():
        ids = torch.tensor(np.asarray(teacher_inputs(tokens, BOS)))
        want = hf(ids).logits.numpy()
    got = np.asarray(student.network_logits(student.embed(tokens), jnp.ones((tokens.shape[0],))))
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


def _config(name: str, variant: str) -> ml_collections.ConfigDict:
    spec = importlib.util.spec_from_file_location(f"cfg_{name}", REPO / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(variant)


def test_warm_start_refuses_what_it_does_not_support() -> None:
    for field, value in (("self_condition", True), ("loss_chunk", 128), ("output_modulation", True)):
        c = _config("shakespeare_baseline", "smoke,warm")
        c.model[field] = value
        with pytest.raises(ConfigError, match=field):
            parse_config(c)
    c = _config("shakespeare_gumbel", "smoke")
    c.gumbel.g_channel = "softmax"
    with pytest.raises(ConfigError, match="logit_channel"):
        parse_config(c)
    c = _config("shakespeare_gumbel", "smoke,logit_channel")
    c.gumbel.g_channel = "softmax"
    with pytest.raises(ConfigError, match="warm_start"):
        parse_config(c)


def test_flow_init_random_keeps_the_random_table() -> None:
    teacher = _bundle(_llama())
    factory = student_factory(_student_cfg(warm_flow_init="random"), teacher)
    params = nnx.to_pure_dict(nnx.state(factory.create_model(nnx.Rngs(0))))
    warm = factory.init_params(params)
    np.testing.assert_array_equal(np.asarray(warm["embedding"]), np.asarray(params["embedding"]))
    pca = student_factory(_student_cfg(), teacher).init_params(params)
    assert np.abs(np.asarray(pca["embedding"]) - np.asarray(params["embedding"])).max() > 1e-3


def test_student_factory_needs_a_matching_teacher() -> None:
    with pytest.raises(ConfigError, match="needs a teacher"):
        student_factory(_student_cfg(), None)
    small = _bundle(Llama(LlamaConfig(vocab_size=V + 1, dim=32, num_layers=1, num_heads=4, ffn_hidden=64, max_len=32,
                                      bos_id=BOS), rngs=nnx.Rngs(0)))
    with pytest.raises(ConfigError, match="tokens"):
        student_factory(_student_cfg(), small)
    cold = student_factory(dataclasses.replace(_student_cfg(), warm_start=False), None)
    assert cold.init_params is None


def test_fineweb_gumbel_warm_from_tiny_hf_gpt2_trains_and_samples(tmp_path, data_dir) -> None:
    """Experiment 3.2 warm-started from GPT-2, end to end on a tiny random Hugging Face GPT-2 (the
    GPT-2 vocabulary, small width) and a local FineWeb-style jsonl: the student is built from it,
    equals it at t = 1, trains a few steps, is saved, loads without the teacher and samples."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    import json

    from transformers import GPT2Config as HFConfig
    from transformers import GPT2LMHeadModel

    from discreteflow_jax.inference.load import load
    from discreteflow_jax.io.teacher import load_teacher
    from discreteflow_jax.training import experiment

    torch.manual_seed(0)
    hf = GPT2LMHeadModel(HFConfig(n_embd=32, n_layer=2, n_head=2, n_positions=32)).eval()
    hf.save_pretrained(tmp_path / "gpt2")
    text = (Path(data_dir) / "tiny_shakespeare" / "input.txt").read_text(encoding="utf-8")
    docs = [text[i : i + 400] for i in range(0, 40_000, 400)]
    with open(tmp_path / "docs.jsonl", "w", encoding="utf-8") as f:
        for doc in docs:
            f.write(json.dumps({"text": doc}) + "\n")
    c = _config("fineweb_gumbel", "smoke,warm")
    c.teacher.hf = str(tmp_path / "gpt2")
    c.data.local_path = str(tmp_path / "docs.jsonl")
    c.model.flow_dim = 8
    c.model.warm_input_topk = 16
    c.train.num_steps = 3
    c.train.eval_every = 3
    c.train.ckpt_every = 3

    teacher = load_teacher({"hf": str(tmp_path / "gpt2")})
    student = _warm_student(teacher, flow_dim=8, warm_input_topk=16, singular_logits=False, vocab_size=50257,
                            max_len=32)
    tokens = jax.random.randint(jax.random.key(0), (2, 32), 0, 50257)
    with torch.no_grad():
        want = hf(torch.tensor(np.asarray(teacher_inputs(tokens, teacher.bos_id)))).logits.numpy()
    got = np.asarray(student.network_logits(student.embed(tokens), jnp.ones((2,))))
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)

    workdir = str(tmp_path / "run")
    result = experiment.run(c, workdir, data_dir=data_dir)
    assert result["step"] == 3 if "step" in result else True
    model = load(workdir, data_dir)
    assert type(model.graphdef).__name__ == "GraphDef" and model.config.model.warm_start
    text_out = model.sample(2, steps=2, seed=0)
    assert len(text_out) == 2 and all(isinstance(t, str) for t in text_out)


def test_alignment_loss_against_a_naive_reference() -> None:
    from discreteflow_jax.gumbel_distill import alignment_loss

    rng = np.random.default_rng(0)
    s, t = rng.standard_normal((2, 5, 8)), rng.standard_normal((2, 5, 8))
    mask = (rng.random((2, 5)) < 0.6).astype(np.float32)
    mask[0, 0] = 1.0
    want = sum((1 - s[b, i] @ t[b, i] / np.linalg.norm(s[b, i]) / np.linalg.norm(t[b, i])) * mask[b, i]
               for b in range(2) for i in range(5)) / mask.sum()
    got = float(alignment_loss(jnp.asarray(s), jnp.asarray(t), jnp.asarray(mask)))
    assert got == pytest.approx(want, rel=1e-5)
    assert float(alignment_loss(jnp.asarray(s), jnp.asarray(3.0 * s), jnp.asarray(mask))) == pytest.approx(0, abs=1e-6)
