"""The context levers: per-token time, narrow flow space, time-modulated output, self-conditioning,
learned time warping; and the exact Bayes references of the synthetic tasks."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from discreteflow_jax import flow
from discreteflow_jax.config import TokenFlowConfig
from discreteflow_jax.data import synthetic as syn
from discreteflow_jax.models.tokenflow import TokenFlow


def make_model(**kw) -> TokenFlow:
    base = dict(vocab_size=37, dim=32, num_layers=2, num_heads=2, max_len=16)
    base.update(kw)
    return TokenFlow(TokenFlowConfig(**base), rngs=nnx.Rngs(0))


def perturb(model: TokenFlow, scale: float = 0.05) -> TokenFlow:
    """Random non-zero values in every parameter (zero-initialized layers would hide bugs)."""
    graphdef, params = nnx.split(model, nnx.Param)
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(9), len(leaves))
    leaves = [x + scale * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
    return nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves))


@pytest.mark.parametrize(
    "kw", [{}, {"output_modulation": True}, {"flow_dim": 8}, {"flow_dim": 8, "tie_embeddings": False}]
)
def test_per_token_time_equals_per_sequence_time_when_equal(kw):
    model = perturb(make_model(**kw))
    x = 0.3 * jax.random.normal(jax.random.key(1), (3, 6, model.cfg.flow_width))
    t = jnp.array([0.1, 0.5, 0.9])
    np.testing.assert_allclose(model(x, t), model(x, jnp.repeat(t[:, None], 6, axis=1)), rtol=1e-5, atol=1e-5)


def test_per_token_time_reaches_each_position():
    model = perturb(make_model(output_modulation=True))
    x = 0.3 * jax.random.normal(jax.random.key(1), (1, 6, 32))
    t = jnp.full((1, 6), 0.4)
    changed = model(x, t.at[0, 2].set(0.1)) - model(x, t)
    # Position 2's own logits change through its time; with attention the others may too, but a
    # causal model's earlier positions cannot.
    assert float(jnp.abs(changed[0, 2]).max()) > 1e-3
    causal = perturb(make_model(output_modulation=True, causal=True))
    changed = causal(x, t.at[0, 2].set(0.1)) - causal(x, t)
    assert float(jnp.abs(changed[0, :2]).max()) == 0.0
    assert float(jnp.abs(changed[0, 2]).max()) > 1e-3


def test_training_times_shapes_and_share():
    key = jax.random.key(0)
    t_seq = flow.training_times(key, (512, 8), "uniform", 1.0, 0.0)
    assert t_seq.shape == (512,)
    np.testing.assert_array_equal(t_seq, flow.sample_time(key, 512, "uniform"))  # the original's draws
    t_mix = flow.training_times(key, (512, 8), "uniform", 1.0, 0.5)
    assert t_mix.shape == (512, 8)
    varies = np.asarray(jnp.std(t_mix, axis=1) > 1e-6)
    assert 0.4 < varies.mean() < 0.6
    t_all = flow.training_times(key, (512, 8), "uniform", 1.0, 1.0)
    assert bool(jnp.all(jnp.std(t_all, axis=1) > 1e-6))


def test_staggered_training_times():
    key = jax.random.key(0)
    t_mix = flow.training_times(key, (2048, 8), "power", 2.0, 0.5)
    t_stag = flow.training_times(key, (2048, 8), "power", 2.0, 0.5, stagger_prob=0.25, stagger_width=2.0)
    # The per-token and per-sequence draws are unchanged; a quarter of the sequences (taken from the
    # per-sequence share) get staggered times.
    changed = np.asarray(jnp.any(t_mix != t_stag, axis=1))
    per_seq = np.asarray(jnp.std(t_mix, axis=1) < 1e-7)
    assert not changed[~per_seq].any()
    assert 0.2 < changed.mean() < 0.3
    rows = np.asarray(t_stag)[changed]
    assert (np.diff(rows, axis=1) <= 0).all() and rows.max() <= flow.MAX_MODEL_TIME and rows.min() >= 0
    # Each staggered row is staggered_times at some progress s: t_0 − t_j = w·j/(T−1) where unclipped.
    inside = (rows[:, :1] > 0) & (rows[:, :1] < flow.MAX_MODEL_TIME) & (rows[:, 1:2] > 0)
    np.testing.assert_allclose((rows[:, 0] - rows[:, 1])[inside[:, 0]], 2.0 / 7, rtol=1e-4)


def test_flow_metrics_bucket_each_token_by_its_own_time():
    loss = jnp.array([[1.0, 2.0, 3.0]])
    t = jnp.array([[0.05, 0.55, 0.95]])
    m = flow.flow_metrics(loss, jnp.ones((1, 3)), t, 10)
    np.testing.assert_allclose(m["bucket_loss_sum"][jnp.array([0, 5, 9])], [1.0, 2.0, 3.0])
    np.testing.assert_allclose(m["bucket_tokens"].sum(), 3.0)
    # One time per sequence gives the same as that time repeated per token.
    m_seq = flow.flow_metrics(loss, jnp.ones((1, 3)), jnp.array([0.55]), 10)
    m_tok = flow.flow_metrics(loss, jnp.ones((1, 3)), jnp.full((1, 3), 0.55), 10)
    np.testing.assert_allclose(m_seq["bucket_loss_sum"], m_tok["bucket_loss_sum"])


def test_flow_loss_with_per_token_times_matches_naive():
    model = perturb(make_model(loss_chunk=5))
    tokens = jax.random.randint(jax.random.key(2), (2, 7), 0, 37)
    key = jax.random.key(3)
    loss, metrics = flow.flow_loss(model, tokens, jnp.ones((2, 7)), key, token_time_prob=1.0)
    t_key, x0_key = jax.random.split(key)
    t = flow.training_times(t_key, (2, 7), "uniform", 1.0, 1.0)
    emb = model.embeddings()
    x0 = model.cfg.sigma * jax.random.normal(x0_key, (2, 7, 32))
    x_t = t[..., None] * emb[tokens] + (1 - t[..., None]) * x0
    c = 2 * t / (2 * model.cfg.sigma**2 * (1 - t) ** 2 + model.cfg.singular_eps**2)
    logits = (model.hidden(x_t, t) + c[..., None] * x_t) @ emb.T
    nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[..., None], axis=-1)[..., 0]
    np.testing.assert_allclose(float(loss), float(nll.mean()), rtol=1e-5)
    np.testing.assert_allclose(float(metrics["bucket_loss_sum"].sum()), float(nll.sum()), rtol=1e-5)


@pytest.mark.parametrize("tie", [True, False])
def test_narrow_flow_space_shapes_and_singular_term(tie):
    """Embeddings, noise and x_t live in flow_dim; the fused singular term equals the reference."""
    fused = perturb(make_model(flow_dim=8, tie_embeddings=tie))
    reference = nnx.merge(*nnx.split(make_model(flow_dim=8, tie_embeddings=tie, fused_singular=False)))
    nnx.update(reference, nnx.state(fused, nnx.Param))
    assert fused.embeddings().shape == (37, 8)
    np.testing.assert_allclose(jnp.linalg.norm(fused.embeddings(), axis=-1), 1.0, rtol=1e-5)
    x0 = flow.gaussian_source(jax.random.key(4), 2, 5, fused)
    assert x0.shape == (2, 5, 8)
    tokens = jnp.array([[1, 2, 3, 4, 5], [6, 7, 8, 9, 10]])
    t = jnp.array([0.3, 0.7])
    x_t = flow.noisy_path(fused.embed(tokens), x0, t)
    np.testing.assert_allclose(
        jax.nn.log_softmax(fused(x_t, t)), jax.nn.log_softmax(reference(x_t, t)), atol=2e-4
    )
    out, x = flow.sample_flow(fused, x0, flow.time_grid(3))
    assert out.shape == (2, 5) and x.shape == (2, 5, 8)


def test_output_modulation_starts_as_identity_and_follows_time():
    plain = make_model()
    modulated = make_model(output_modulation=True)
    x = 0.3 * jax.random.normal(jax.random.key(1), (2, 4, 32))
    t = jnp.array([0.2, 0.6])
    # Zero-initialized modulation: the same function as the plain model at init.
    np.testing.assert_allclose(plain(x, t), modulated(x, t), rtol=1e-5, atol=1e-5)
    bumped = perturb(modulated)
    assert bumped.out_modulation is not None
    assert float(jnp.abs(bumped(x, t) - bumped(x, t[::-1])).max()) > 1e-3


def test_self_conditioning_input_is_used_and_zero_means_none():
    model = perturb(make_model(self_condition=True))
    x = 0.3 * jax.random.normal(jax.random.key(1), (2, 4, 32))
    t = jnp.array([0.2, 0.6])
    estimate = model.embeddings()[jnp.array([[1, 2, 3, 4], [5, 6, 7, 8]])]
    np.testing.assert_allclose(model(x, t), model(x, t, None, jnp.zeros_like(x)), rtol=1e-6)
    assert float(jnp.abs(model(x, t, None, estimate) - model(x, t)).max()) > 1e-3
    loss, _ = flow.flow_loss(model, jnp.array([[1, 2, 3, 4]]), jnp.ones((1, 4)), jax.random.key(0))
    assert bool(jnp.isfinite(loss))
    # The sampler feeds the previous step's estimate back: it differs from a model that ignores it.
    x0 = flow.gaussian_source(jax.random.key(5), 2, 4, model)
    _, with_sc = flow.sample_flow(model, x0, flow.time_grid(4))
    plain = nnx.merge(*nnx.split(make_model()))
    nnx.update(plain, {k: v for k, v in nnx.state(model, nnx.Param).items() if k != "self_cond_proj"})
    _, without = flow.sample_flow(plain, x0, flow.time_grid(4))
    assert float(jnp.abs(with_sc - without).max()) > 1e-4


def test_warp_inverse_cdf_and_fit():
    warp = jnp.concatenate([jnp.array([0.0, 0.02, -0.01, 0.03]), jnp.zeros(1)])
    u = jnp.linspace(0.001, 0.999, 101)
    t = flow.warp_inverse_cdf(warp, u)
    # L̂ = scale·(1 − F): F(t) = 1 − L̂(t)/scale must give back u.
    np.testing.assert_allclose(1.0 - flow.warp_fitted_loss(warp, t), u, atol=1e-5)
    assert bool(jnp.all(jnp.diff(t) >= 0))
    # Fitting a loss that falls only on t in [0.25, 0.5] moves the sampler there.
    t_obs = jnp.linspace(0.0, 1.0, 400)
    target = 5.0 * jnp.clip((0.5 - t_obs) / 0.25, 0.0, 1.0)
    w = jnp.zeros(5)
    tx = optax.adam(1e-3)  # the trainer's optimizer family at a typical learning rate
    state = tx.init(w)
    grad = jax.jit(jax.grad(lambda w: flow.warp_fit_loss(w, t_obs, target, jnp.ones_like(t_obs))))
    for _ in range(600):
        updates, state = tx.update(grad(w), state)
        w = w + updates
    draws = flow.sample_time(jax.random.key(0), 4000, "learned", warp=w)
    share = float(jnp.mean((draws >= 0.25) & (draws < 0.5)))
    assert share > 0.6  # uniform would give 0.25
    assert float(flow.warp_fitted_loss(w, jnp.array(0.0))) == pytest.approx(5.0, rel=0.15)


def test_learned_sampler_trains_its_warp_only_through_the_fit():
    model = perturb(make_model(time_warp_bins=8))
    tokens = jax.random.randint(jax.random.key(2), (4, 6), 0, 37)
    graphdef, params = nnx.split(model, nnx.Param)

    def loss_of(p):
        return flow.flow_loss(nnx.merge(graphdef, p), tokens, jnp.ones((4, 6)), jax.random.key(0),
                              time_sampler="learned")[0]

    grads = jax.grad(loss_of)(params)
    assert float(jnp.abs(grads["time_warp"][...]).max()) > 0.0
    with pytest.raises(ValueError, match="time_warp_bins"):
        flow.flow_loss(make_model(), tokens, jnp.ones((4, 6)), jax.random.key(0), time_sampler="learned")


@pytest.mark.parametrize("name", syn.TASKS)
def test_chain_posterior_matches_brute_force(name):
    task = syn.make_task(name, 4, 0.6, seed=1)
    v, length = 4, 4
    log_lik = jnp.asarray(np.random.default_rng(0).normal(size=(2, length, v)).astype(np.float32))
    post = np.exp(np.asarray(syn.chain_posterior(log_lik, task)))
    trans = np.full((v, v), (1 - task.repeat_prob) / v)
    trans[np.arange(v), task.successor] += task.repeat_prob
    for b in range(2):
        joint = np.zeros([v] * length)
        for seq in itertools.product(range(v), repeat=length):
            prob = 1.0 / v
            for i in range(1, length):
                prob *= trans[seq[i - 1], seq[i]]
            joint[seq] = prob * np.exp(sum(float(log_lik[b, i, seq[i]]) for i in range(length)))
        joint /= joint.sum()
        for i in range(length):
            marginal = joint.sum(axis=tuple(j for j in range(length) if j != i))
            np.testing.assert_allclose(post[b, i], marginal, atol=1e-5)


def test_bayes_references_order_and_sequences():
    task = syn.make_task("runs", 64, 0.75)
    tokens = syn.sample_sequences(task, np.random.default_rng(0), 256, 16)
    repeats = np.mean(tokens[:, 1:] == tokens[:, :-1])
    assert 0.7 < repeats < 0.8
    emb = jax.random.normal(jax.random.key(0), (64, 16))
    emb = emb / jnp.linalg.norm(emb, axis=-1, keepdims=True)
    sigma = 0.25
    noise = sigma * jax.random.normal(jax.random.key(1), (256, 16, 16))
    x_t = flow.noisy_path(emb[tokens], noise, jnp.full((256,), 0.3))
    alone, full = syn.bayes_losses(jnp.asarray(tokens), x_t, emb, 0.3, sigma, task)
    assert full < alone - 0.1  # context helps on runs
    mapped = syn.make_task("map", 64, 0.75, seed=3)
    assert sorted(mapped.successor.tolist()) == list(range(64))
    assert np.all(mapped.successor[mapped.predecessor] == np.arange(64))
