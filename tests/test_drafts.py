"""In-network drafts of a warm logit-channel student (``gumbel.drafts``): where they are taken, that a
draft is the Gumbel-max of the teacher's head on the residual stream, that it carries a position's
noise to later positions only, that the untrained student is still its teacher at t = 1, the loss
term, the sampler against a whole-array reference, and the config errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from test_warm_start import BOS, T, V, _bundle, _config, _gpt2, _llama, _teacher_logits, _tokens, _warm_student

from discreteflow_jax import flow
from discreteflow_jax import gumbel as gmb
from discreteflow_jax.config import ConfigError, GumbelConfig, parse_config, parse_gumbel_config
from discreteflow_jax.config.gumbel import student_config
from discreteflow_jax.gumbel_distill import gumbel_distill_loss, kl_per_token
from discreteflow_jax.gumbel_sampling import logit_noise, sample_gumbel_flow
from discreteflow_jax.models.warmflow import GumbelInput, draft_layers, whole_noise

DRAFTING = GumbelConfig(conditioning="none", logit_channel=True, drafts=1)


def _gumbel(seed: int = 5, batch: int = 3) -> jax.Array:
    return jax.random.gumbel(jax.random.key(seed), (batch, T, V))


def _drafting_student(teacher_fn=_llama, gate: float = 0.0, **kw):
    student = _warm_student(_bundle(teacher_fn()), g_drafts=1, singular_logits=False, **kw)
    if gate:
        student.draft_gate[...] = gate * jax.random.normal(jax.random.key(7), student.draft_gate[...].shape)
    return student


def test_drafts_are_evenly_spaced_and_never_after_the_last_block() -> None:
    assert draft_layers(4, 0) == ()
    assert draft_layers(4, 1) == (1,)
    assert draft_layers(4, 3) == (0, 1, 2)
    assert draft_layers(12, 1) == (5,)
    assert draft_layers(12, 2) == (3, 7)
    with pytest.raises(ValueError, match="g_drafts=4"):
        draft_layers(4, 4)


@pytest.mark.parametrize("teacher_fn", [_llama, _gpt2])
def test_untrained_drafting_student_at_t1_is_its_teacher(teacher_fn) -> None:
    teacher = _bundle(teacher_fn())
    student = _warm_student(teacher, g_drafts=1, singular_logits=False)
    tokens = _tokens()
    context = GumbelInput(None, whole_noise(_gumbel()), 4)
    got = np.asarray(student.network_logits(student.embed(tokens), jnp.ones((tokens.shape[0],)), context))
    np.testing.assert_allclose(got, _teacher_logits(teacher, tokens), atol=1e-4, rtol=0)


def test_a_draft_is_the_gumbel_max_of_the_heads_readout_chunk_by_chunk() -> None:
    student = _drafting_student(gate=0.3)
    tokens, g = _tokens(), _gumbel()
    x_t, t = 0.4 * student.embed(tokens), jnp.full((tokens.shape[0],), 0.4)
    h_mid = student.hidden_and_drafts(x_t, t, GumbelInput(None, whole_noise(g), T))[1][0]
    want = np.asarray(jnp.argmax(student.backbone._logits(h_mid) + g, axis=-1))
    for chunk in (3, 4, T):
        got = np.asarray(student.draft_tokens(h_mid, GumbelInput(None, whole_noise(g), chunk)))
        np.testing.assert_array_equal(got, want)
    # Known positions (a prompt) keep their tokens.
    known = jnp.zeros(tokens.shape, bool).at[:, :4].set(True)
    got = np.asarray(student.draft_tokens(h_mid, GumbelInput(None, whole_noise(g), 4, tokens, known)))
    np.testing.assert_array_equal(got[:, :4], np.asarray(tokens[:, :4]))
    np.testing.assert_array_equal(got[:, 4:], want[:, 4:])


def test_a_draft_carries_a_positions_noise_to_later_positions_only() -> None:
    tokens, g = _tokens(), _gumbel()
    x_t, t = 0.3 * _drafting_student().embed(tokens), jnp.full((tokens.shape[0],), 0.3)
    # Force another draft token at position 5: a huge Gumbel on a token the draft did not pick.
    student = _drafting_student(gate=0.5)
    h_mid = student.hidden_and_drafts(x_t, t, GumbelInput(None, whole_noise(g), T))[1][0]
    drafted = np.asarray(student.draft_tokens(h_mid, GumbelInput(None, whole_noise(g), T)))
    other = jnp.asarray((drafted[:, 5] + 1) % V)
    g2 = g.at[jnp.arange(g.shape[0]), 5, other].set(1e3)
    for gate, expect_change in ((0.0, False), (0.5, True)):
        student = _drafting_student(gate=gate)
        a = np.asarray(student.network_logits(x_t, t, GumbelInput(None, whole_noise(g), T)))
        b = np.asarray(student.network_logits(x_t, t, GumbelInput(None, whole_noise(g2), T)))
        # Output i reads token i − 1, so the draft of token 5 enters at position 6.
        np.testing.assert_allclose(a[:, :6], b[:, :6], atol=1e-6, rtol=0)
        assert (np.abs(a[:, 6:] - b[:, 6:]).max() > 1e-3) == expect_change, gate


def test_a_drafting_student_refuses_to_run_without_the_noise() -> None:
    student = _drafting_student()
    tokens = _tokens()
    with pytest.raises(ValueError, match="GumbelInput"):
        student.network_logits(student.embed(tokens), jnp.ones((tokens.shape[0],)))


def test_the_draft_term_is_the_drafts_kl_and_trains_the_gate() -> None:
    teacher = _bundle(_llama())
    student = _drafting_student(gate=0.2)
    tokens = _tokens(batch=4)
    mask = jnp.ones(tokens.shape, jnp.float32)
    key, t = jax.random.key(3), jnp.full((4,), 0.6)

    def loss_of(model, weight):
        return gumbel_distill_loss(model, teacher.model(), tokens, mask, key,
                                   GumbelConfig(conditioning="none", logit_channel=True, drafts=1, draft_loss=weight),
                                   bos_id=BOS, t_B=t)

    with_term, metrics = loss_of(student, 1.0)
    without, metrics0 = loss_of(student, 0.0)
    draft_kl = float(metrics["draft_kl_sum"]) / float(metrics["tokens"])
    assert draft_kl > 0
    assert float(with_term) - float(without) == pytest.approx(draft_kl, rel=1e-4)
    assert float(metrics0["draft_kl_sum"]) == pytest.approx(float(metrics["draft_kl_sum"]), rel=1e-6)
    grads = nnx.grad(lambda m: loss_of(m, 1.0)[0])(student)
    assert float(jnp.abs(grads.draft_gate[...]).max()) > 0
    # The KL itself against a naive reference.
    rng = np.random.default_rng(0)
    logp = np.log(rng.dirichlet(np.ones(6), size=(2, 3)))
    logits = rng.standard_normal((2, 3, 6))
    log_q = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    want = (np.exp(logp) * (logp - log_q)).sum(-1)
    np.testing.assert_allclose(np.asarray(kl_per_token(jnp.asarray(logp), jnp.asarray(logits))), want, rtol=1e-5)


def test_one_step_sampler_equals_the_whole_array_reference() -> None:
    student = _drafting_student(gate=0.5)
    key, batch = jax.random.key(11), 3
    g = logit_noise(student, key, batch, T, DRAFTING)
    x0, _ = gmb.gumbel_source(student, key, batch, T, DRAFTING)
    t0 = jnp.zeros((batch,))
    want = np.asarray(jnp.argmax(student.network_logits(x0, t0, GumbelInput(None, whole_noise(g), T)) + g, -1))
    grid = flow.time_grid(1)
    for chunk in (3, 0):
        cfg = GumbelConfig(conditioning="none", logit_channel=True, drafts=1, chunk_size=chunk)
        got = np.asarray(sample_gumbel_flow(student, key, grid, cfg, batch=batch, seq_len=T))
        np.testing.assert_array_equal(got, want)
    # The drafts matter: without the gate the same noise gives other tokens.
    student.draft_gate[...] = jnp.zeros_like(student.draft_gate[...])
    assert (np.asarray(sample_gumbel_flow(student, key, grid, DRAFTING, batch=batch, seq_len=T)) != want).any()


def test_config_errors() -> None:
    with pytest.raises(ConfigError, match="logit_channel=True"):
        parse_gumbel_config({"drafts": 1})
    with pytest.raises(ConfigError, match="drafts must be an integer"):
        parse_gumbel_config({"drafts": -1, "logit_channel": True, "conditioning": "none"})
    with pytest.raises(ConfigError, match="rollout_prob"):
        parse_gumbel_config({"drafts": 1, "rollout_prob": 0.5, "logit_channel": True, "conditioning": "none"})
    with pytest.raises(ConfigError, match="draft_loss"):
        parse_gumbel_config({"drafts": 1, "draft_loss": -1.0, "logit_channel": True, "conditioning": "none"})
    c = _config("shakespeare_gumbel", "smoke,logit_channel")
    c.gumbel.drafts = 1
    with pytest.raises(ConfigError, match="warm_start"):
        parse_config(c)
    c = _config("shakespeare_baseline", "smoke,warm")
    c.model.g_drafts = 1
    with pytest.raises(ConfigError, match="g_drafts"):
        parse_config(c)
    cfg = parse_config(_config("shakespeare_gumbel", "cpu,drafts"))
    assert student_config(cfg.model, parse_gumbel_config(cfg.extra["gumbel"])).g_drafts == 1


def test_an_open_gate_at_init_moves_the_student_off_its_teacher() -> None:
    teacher = _bundle(_llama())
    student = _warm_student(teacher, g_drafts=1, g_draft_gate_init=1.0, singular_logits=False)
    np.testing.assert_allclose(20.0 * np.asarray(student.draft_gate[...]), 1.0, rtol=1e-6)
    tokens = _tokens()
    got = np.asarray(student.network_logits(student.embed(tokens), jnp.ones((tokens.shape[0],)),
                                            GumbelInput(None, whole_noise(_gumbel()), T)))
    assert np.abs(got - _teacher_logits(teacher, tokens)).max() > 1e-3
    with pytest.raises(ConfigError, match="draft_gate_init"):
        parse_gumbel_config({"drafts": 1, "draft_gate_init": "open", "logit_channel": True, "conditioning": "none"})


def test_a_prompted_sample_keeps_its_prompt_and_drafts_it_as_known() -> None:
    from discreteflow_jax.conditioning import conditional_sample

    student = _drafting_student(gate=0.5)
    prompt = _tokens(seed=4)
    known = jnp.zeros(prompt.shape, bool).at[:, :5].set(True)
    grid = flow.time_grid(2)
    out = np.asarray(conditional_sample(student, jax.random.key(2), grid, prompt, known, gumbel=DRAFTING,
                                        polish_steps=1))
    np.testing.assert_array_equal(out[:, :5], np.asarray(prompt[:, :5]))
    # The free positions read the prompt: another prompt token changes them.
    other = prompt.at[:, 4].set((prompt[:, 4] + 1) % V)
    out2 = np.asarray(conditional_sample(student, jax.random.key(2), grid, other, known, gumbel=DRAFTING,
                                         polish_steps=1))
    assert (out2[:, 5:] != out[:, 5:]).any()
