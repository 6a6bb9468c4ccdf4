"""Numerics of the TokenFlow model and the flow process against naive references (tiny shapes)."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from discreteflow_jax import flow
from discreteflow_jax.config import TokenFlowConfig
from discreteflow_jax.models.tokenflow import TokenFlow, singular_logits

TINY = TokenFlowConfig(vocab_size=37, dim=16, num_layers=2, num_heads=2, max_len=12)


def make_model(**overrides) -> TokenFlow:
    return TokenFlow(dataclasses.replace(TINY, **overrides), rngs=nnx.Rngs(0))


def naive_singular(x_t, t, emb, sigma, eps):
    """Forms the full [B, T, V, d] difference tensor on purpose."""
    diff = x_t[:, :, None, :] - t[:, None, None, None] * emb[None, None, :, :]
    denom = 2 * sigma**2 * (1 - t[:, None, None]) ** 2 + eps**2
    return jax.nn.log_softmax(-jnp.sum(diff**2, axis=-1) / denom, axis=-1)


@pytest.mark.parametrize("t_value", [0.0, 0.3, 0.9, 0.999, 1.0])
def test_singular_logits_match_naive_reference(t_value):
    key = jax.random.key(1)
    emb = jax.random.normal(key, (37, 16))
    emb = emb / jnp.linalg.norm(emb, axis=-1, keepdims=True)
    tokens = jax.random.randint(jax.random.key(2), (2, 5), 0, 37)
    t = jnp.full((2,), t_value)
    x_t = flow.noisy_path(emb[tokens], 0.25 * jax.random.normal(jax.random.key(3), (2, 5, 16)), t)
    ours = singular_logits(x_t, t, emb, 0.25, 1e-3)
    ref = naive_singular(x_t, t, emb, 0.25, 1e-3)
    assert bool(jnp.all(jnp.isfinite(ours)))
    np.testing.assert_allclose(jnp.exp(ours), jnp.exp(ref), atol=1e-4)
    np.testing.assert_allclose(ours, ref, rtol=2e-3, atol=2e-3 * max(1.0, float(jnp.abs(ref).mean())))


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("t_value", [0.05, 0.5, 0.999, 1.0])
def test_fused_singular_equals_two_matmul_reference(tie, t_value):
    fused = make_model(tie_embeddings=tie)
    reference = nnx.merge(*nnx.split(fused))
    reference.cfg = dataclasses.replace(fused.cfg, fused_singular=False)
    tokens = jax.random.randint(jax.random.key(4), (3, 7), 0, 37)
    t = jnp.full((3,), t_value)
    x0 = fused.cfg.sigma * jax.random.normal(jax.random.key(5), (3, 7, 16))
    x_t = flow.noisy_path(fused.embed(tokens), x0, t)
    lp_fused = jax.nn.log_softmax(fused(x_t, t), axis=-1)
    lp_ref = jax.nn.log_softmax(reference(x_t, t), axis=-1)
    assert bool(jnp.all(jnp.isfinite(lp_fused)))
    np.testing.assert_allclose(jnp.exp(lp_fused), jnp.exp(lp_ref), atol=1e-4)
    if t_value < 0.99:  # at t→1 the log-probs of impossible tokens are ~-1e6: compare relatively
        np.testing.assert_allclose(lp_fused, lp_ref, atol=1e-3)


def test_flow_loss_matches_naive_reference():
    model = make_model(fused_singular=False)
    tokens = jax.random.randint(jax.random.key(6), (4, 9), 0, 37)
    mask = jnp.ones((4, 9)).at[0, 5:].set(0.0)  # padding must be ignored
    key = jax.random.key(7)
    loss, metrics = flow.flow_loss(model, tokens, mask, key)

    # Naive: recompute every piece by hand from the same random draws.
    t_key, x0_key = jax.random.split(key)
    t = jax.random.uniform(t_key, (4,))
    emb = model.embeddings()
    x1 = emb[tokens]
    x0 = model.cfg.sigma * jax.random.normal(x0_key, x1.shape)
    x_t = t[:, None, None] * x1 + (1 - t[:, None, None]) * x0
    h = model.hidden(x_t, t)
    logits = h @ emb.T + naive_singular(x_t, t, emb, model.cfg.sigma, model.cfg.singular_eps)
    nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[..., None], axis=-1)[..., 0]
    expected = float(jnp.sum(nll * mask) / jnp.sum(mask))
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
    assert float(metrics["tokens"]) == float(mask.sum())
    np.testing.assert_allclose(float(metrics["bucket_tokens"].sum()), float(mask.sum()))


def test_fused_loss_and_gradients_equal_reference():
    fused = make_model()
    graphdef, params = nnx.split(fused)
    tokens = jax.random.randint(jax.random.key(8), (2, 6), 0, 37)
    mask = jnp.ones((2, 6))

    def loss_with(fused_flag):
        def f(p):
            m = nnx.merge(graphdef, p)
            m.cfg = dataclasses.replace(m.cfg, fused_singular=fused_flag)
            t = jnp.array([0.05, 0.2])  # small t, where the loss (and its gradient) is not ~0
            return flow.flow_loss(m, tokens, mask, jax.random.key(9), t_B=t)[0]

        return jax.value_and_grad(f)(params)

    (l1, g1), (l2, g2) = loss_with(True), loss_with(False)
    assert float(l1) > 0.1
    np.testing.assert_allclose(l1, l2, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-3)


def test_embedding_rows_have_configured_norm():
    for scale in (0.0, 0.5):
        model = make_model(embed_scale=scale)
        norms = jnp.linalg.norm(model.embeddings(), axis=-1)
        np.testing.assert_allclose(norms, model.cfg.row_norm, rtol=1e-5)
    assert math.isclose(make_model().cfg.row_norm, 1.0)


def test_documented_init_is_applied():
    cfg = TokenFlowConfig(vocab_size=64, dim=256, num_layers=3, num_heads=4, max_len=8)
    model = TokenFlow(cfg, rngs=nnx.Rngs(0))
    truncation = 0.986  # std of a ±3σ truncated normal relative to σ
    for layer, block in enumerate(model.blocks):
        expected = truncation / math.sqrt(2 * cfg.dim * (layer + 1))
        np.testing.assert_allclose(float(jnp.std(block.attn.o_proj.kernel[...])), expected, rtol=0.05)
        np.testing.assert_allclose(float(jnp.std(block.mlp.down_proj.kernel[...])), expected, rtol=0.05)
        np.testing.assert_allclose(float(jnp.std(block.attn.q_proj.kernel[...])), truncation / 16.0, rtol=0.05)
        assert float(jnp.abs(block.modulation.kernel[...]).max()) == 0.0
        assert block.cross_attn is None  # created only when configured
    assert float(jnp.abs(model.blocks[0].attn.q_proj.kernel[...]).max()) <= 3.0 / 16.0 + 1e-6
    assert cfg.ffn_width == 704  # 8/3·256 rounded up to a multiple of 64
    assert TokenFlowConfig(dim=256, ffn_hidden=256).ffn_width == 256


def test_cross_attention_params_only_when_configured():
    with_ca = make_model(cross_attention=True)
    names = {"/".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(with_ca))}
    assert any("cross_attn" in n for n in names)
    without = {"/".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(make_model()))}
    assert not any("cross_attn" in n for n in without)


@pytest.mark.parametrize("causal", [True, False])
def test_causal_mask(causal):
    model = make_model(causal=causal, singular_logits=False)
    x = jax.random.normal(jax.random.key(10), (1, 8, 16)) * 0.25
    t = jnp.array([0.3])
    j = 5
    x2 = x.at[:, j].add(1.0)
    before = model(x, t)[:, :j]
    after = model(x2, t)[:, :j]
    if causal:
        np.testing.assert_allclose(before, after, atol=1e-6)
    else:
        assert float(jnp.abs(before - after).max()) > 1e-4


def test_sampler_is_deterministic_and_k1_is_one_step():
    model = make_model()
    x0 = flow.gaussian_source(jax.random.key(11), 2, 6, model)
    a, _ = flow.sample_flow(model, x0, flow.time_grid(4))
    b, _ = flow.sample_flow(model, x0, flow.time_grid(4))
    np.testing.assert_array_equal(a, b)
    c, _ = flow.sample_flow(model, flow.gaussian_source(jax.random.key(12), 2, 6, model), flow.time_grid(4))
    assert not np.array_equal(a, c)
    # K = 1: one model call at t = 0, tokens are its argmax and the final state is p·E.
    tokens, x1 = flow.sample_flow(model, x0, flow.time_grid(1), final_state=True)
    logits = model(x0, jnp.zeros((2,)))
    np.testing.assert_array_equal(tokens, jnp.argmax(logits, axis=-1))
    np.testing.assert_allclose(x1, jax.nn.softmax(logits) @ model.embeddings(), atol=1e-5)


def reference_sampler(model, x0, grid, temperature=1.0):
    """The K-step sampler written plainly: softmax·E at every step, tokens from the last logits."""
    x, logits = x0, None
    for i in range(grid.shape[0] - 1):
        t, t_next = grid[i], grid[i + 1]
        logits = model(x, jnp.full((x.shape[0],), t))
        x1_hat = jax.nn.softmax(logits / temperature, axis=-1) @ model.embeddings()
        x_last, x = x, flow.euler_update(x, x1_hat, t, t_next)
    return jnp.argmax(logits, axis=-1), x_last, x


@pytest.mark.parametrize("steps", [1, 3])
def test_sampler_last_step_is_argmax_only(steps):
    """The last step skips softmax·E: tokens as the plain sampler's, x is the state the last call
    read (the final p·E only with final_state=True)."""
    model = make_model()
    x0 = flow.gaussian_source(jax.random.key(14), 2, 6, model)
    grid = flow.time_grid(steps, "cosine")
    ref_tokens, ref_last, ref_final = reference_sampler(model, x0, grid, temperature=0.7)
    tokens, x = flow.sample_flow(model, x0, grid, temperature=0.7)
    np.testing.assert_array_equal(tokens, ref_tokens)
    np.testing.assert_allclose(x, ref_last, atol=1e-5)
    tokens_f, x_f = flow.sample_flow(model, x0, grid, temperature=0.7, final_state=True)
    np.testing.assert_array_equal(tokens_f, ref_tokens)
    np.testing.assert_allclose(x_f, ref_final, atol=1e-5)
    assert float(jnp.abs(ref_final - ref_last).max()) > 1e-3  # the two states differ: the test can fail


@pytest.mark.parametrize("steps", [1, 2, 7, 1024])
def test_sampler_any_number_of_steps(steps):
    model = make_model(num_layers=1)
    x0 = flow.gaussian_source(jax.random.key(13), 1, 4, model)
    tokens, x = jax.jit(lambda x0: flow.sample_flow(model, x0, flow.time_grid(steps)))(x0)
    assert tokens.shape == (1, 4) and bool(jnp.all((tokens >= 0) & (tokens < 37)))
    assert bool(jnp.all(jnp.isfinite(x)))


def test_time_grids_and_samplers():
    for schedule in flow.TIME_GRIDS:
        g = flow.time_grid(5, schedule)
        assert float(g[0]) == 0.0 and float(g[-1]) == pytest.approx(1.0)
        assert bool(jnp.all(jnp.diff(g) > 0))
    with pytest.raises(ValueError, match="valid"):
        flow.time_grid(4, "bogus")
    with pytest.raises(ValueError, match=">= 1"):
        flow.time_grid(0)
    for sampler in flow.TIME_SAMPLERS:
        warp = jnp.zeros((9,)) if sampler == "learned" else None
        t = flow.sample_time(jax.random.key(0), 4096, sampler, 2.0, warp)
        assert bool(jnp.all((t >= 0) & (t <= 1)))
    # Each sampler against its distribution (Kolmogorov-Smirnov distance; 0.03 is above the 99.9%
    # critical value 1.95/sqrt(n) for n = 4096): a wrong or degenerate sampler is far from it.
    from scipy.special import logit, ndtr

    x = np.linspace(0.005, 0.995, 199)
    cdfs = {
        ("uniform", 2.0): x,
        ("power", 2.0): x ** (1 / 2.0),  # P(u**p <= x) = x**(1/p)
        ("power", 3.0): x ** (1 / 3.0),
        ("logit_normal", 2.0): ndtr(logit(x) / 2.0),  # t = sigmoid(s·z)
        ("logit_normal", 0.5): ndtr(logit(x) / 0.5),
    }
    for (sampler, param), cdf in cdfs.items():
        t = np.asarray(flow.sample_time(jax.random.key(1), 4096, sampler, param))
        assert t.min() >= 0 and t.max() <= 1
        empirical = np.searchsorted(np.sort(t), x, side="right") / t.size
        assert np.max(np.abs(empirical - cdf)) < 0.03, (sampler, param)
    # The distances separate the distributions (the check can fail): logit-normal 2.0 is not 0.5.
    t = np.asarray(flow.sample_time(jax.random.key(1), 4096, "logit_normal", 2.0))
    empirical = np.searchsorted(np.sort(t), x, side="right") / t.size
    assert np.max(np.abs(empirical - ndtr(logit(x) / 0.5))) > 0.1
    t_power = flow.sample_time(jax.random.key(0), 4096, "power", 3.0)
    assert float(jnp.mean(t_power)) == pytest.approx(0.25, abs=0.02)  # E[u^3] = 1/4


def test_velocity_identity_and_euler_endpoint():
    x = jnp.ones((1, 1, 2))
    x1_hat = jnp.zeros((1, 1, 2))
    np.testing.assert_allclose(flow.euler_update(x, x1_hat, jnp.float32(0.5), jnp.float32(1.0)), x1_hat)
    np.testing.assert_allclose(flow.euler_update(x, x1_hat, jnp.float32(0.0), jnp.float32(0.5)), 0.5 * x)


# -- fused, chunked output layer + cross-entropy (model.loss_chunk) ------------------------------
def _reference_linear_ce(features, weights, layouts, scales, labels, loss_weights):
    logits = 0.0
    for f, w, lay, sc in zip(features, weights, layouts, scales):
        u = jnp.einsum("btk,vk->btv" if lay == "vk" else "btk,kv->btv", f, w)
        logits = logits + (u if sc is None else u * sc)
    token_loss = flow.cross_entropy(logits, labels)
    return jnp.sum(token_loss * loss_weights), token_loss


def _linear_ce_inputs(untied: bool, v: int = 48):
    """B=3, T=7; features of the fused tied head, or of an untied head plus a scaled embedding
    term. V=48: 16 vocabulary blocks of 3 rows; V=37: 16 blocks of 3 rows, the last 11 padding."""
    keys = jax.random.split(jax.random.key(20), 7)
    b, t, d = 3, 7, 8
    emb = jax.random.normal(keys[0], (v, d))
    scales = 1.0 + jax.random.uniform(keys[1], (v,))
    labels = jax.random.randint(keys[2], (b, t), 0, v)
    loss_weights = jax.random.uniform(keys[3], (b, t)).at[1, 4:].set(0.0)
    h = 2.0 * jax.random.normal(keys[4], (b, t, d))
    if not untied:
        return [h], [emb], ["vk"], [scales], labels, loss_weights
    kernel = jax.random.normal(keys[5], (d, v))
    x = jax.random.normal(keys[6], (b, t, d))
    return [h, x], [kernel, emb], ["kv", "vk"], [None, scales], labels, loss_weights


@pytest.mark.parametrize("vocab", [48, 37])
@pytest.mark.parametrize("untied", [False, True])
@pytest.mark.parametrize("tokens_per_chunk", [1, 6, 9, 21, 1000])  # 6 and 9 do not divide T=7 positions
def test_linear_cross_entropy_matches_full_logits(untied, tokens_per_chunk, vocab):
    from discreteflow_jax.models.linear_ce import linear_cross_entropy

    features, weights, layouts, scales, labels, lw = _linear_ce_inputs(untied, vocab)

    def ours(features, weights, scales, lw):
        return linear_cross_entropy(features, weights, layouts, labels, lw, tokens_per_chunk=tokens_per_chunk,
                                    scales=scales)

    def ref(features, weights, scales, lw):
        return _reference_linear_ce(features, weights, layouts, scales, labels, lw)

    # Without gradients (the primal path) and under value_and_grad (the fused forward+gradient path).
    (s1, tok1), (s0, tok0) = ours(features, weights, scales, lw), ref(features, weights, scales, lw)
    np.testing.assert_allclose(tok1, tok0, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(s1, s0, rtol=1e-5)
    argnums = (0, 1, 2, 3)
    (v1, _), g1 = jax.value_and_grad(ours, argnums, has_aux=True)(features, weights, scales, lw)
    (v0, _), g0 = jax.value_and_grad(ref, argnums, has_aux=True)(features, weights, scales, lw)
    np.testing.assert_allclose(v1, v0, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)

    # Differentiating the per-token losses as well takes the exact recomputing backward pass.
    def mixed(fn):
        def f(features, weights, scales, lw):
            total, tokens = fn(features, weights, scales, lw)
            return total + jnp.sum(jnp.sin(tokens))
        return jax.grad(f, argnums)(features, weights, scales, lw)

    for a, b in zip(jax.tree.leaves(mixed(ours)), jax.tree.leaves(mixed(ref)), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_linear_cross_entropy_rejects_bad_arguments():
    from discreteflow_jax.models.linear_ce import linear_cross_entropy

    features, weights, layouts, scales, labels, lw = _linear_ce_inputs(False)
    with pytest.raises(ValueError, match="tokens_per_chunk must be a positive number"):
        linear_cross_entropy(features, weights, layouts, labels, lw, tokens_per_chunk=0)
    with pytest.raises(ValueError, match="unknown weight layout"):
        linear_cross_entropy(features, weights, ["dv"], labels, lw, tokens_per_chunk=4)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize(
    "variant",
    [dict(tie_embeddings=True), dict(tie_embeddings=False), dict(tie_embeddings=True, singular_logits=False),
     dict(tie_embeddings=False, singular_logits=False), dict(fused_singular=False)],
    ids=["tied", "untied", "tied_no_singular", "untied_no_singular", "two_term_reference"],
)
def test_chunked_flow_loss_and_gradients_equal_unchunked(variant, dtype):
    """loss_chunk > 0 gives the loss, metrics and parameter gradients (embedding, untied head,
    blocks) of the full-logits path, for chunks that do and do not divide the sequence."""
    model = make_model(vocab_size=48, dtype=dtype, **variant)
    graphdef, params = nnx.split(model)
    tokens = jax.random.randint(jax.random.key(10), (3, 7), 0, 48)
    mask = jnp.ones((3, 7)).at[0, 5:].set(0.0)
    t = jnp.array([0.05, 0.3, 0.7])  # mostly small t: the loss and its gradient are not ~0

    def run(chunk):
        def f(p):
            m = nnx.merge(graphdef, p)
            m.cfg = dataclasses.replace(m.cfg, loss_chunk=chunk)
            return flow.flow_loss(m, tokens, mask, jax.random.key(11), t_B=t)

        return jax.value_and_grad(f, has_aux=True)(params)

    (l0, m0), g0 = run(0)
    assert float(l0) > 0.1
    assert model.lm_head is None or "lm_head" in nnx.to_pure_dict(g0)
    for chunk in (1, 5, 6, 1000):  # positions per chunk: 1, 1, 2 (pads 7 to 8), 7
        (l1, m1), g1 = run(chunk)
        np.testing.assert_allclose(l1, l0, rtol=1e-5)
        for name in ("loss_sum", "bucket_loss_sum"):
            # ~0 losses at large t differ by float32 rounding of a logsumexp (~1e-6 per token)
            np.testing.assert_allclose(m1[name], m0[name], rtol=1e-5, atol=5e-5)
        # bf16 activations: a float32 rounding difference in a gradient can flip one bf16 rounding
        # (2^-8 relative) on its way back through the network.
        tol = 2e-5 if dtype == "float32" else 1e-2
        for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g1), jax.tree.leaves(g0), strict=True):
            scale = float(jnp.max(jnp.abs(b))) + 1e-12
            np.testing.assert_allclose(a / scale, b / scale, atol=tol, err_msg=f"chunk {chunk}: {path}")


def test_swiglu_softmax_and_row_lookup_match_autodiff():
    """The memory-saving custom gradients of layers.py equal plain autodiff."""
    from discreteflow_jax.models.layers import softmax_last, swiglu_down, take_rows

    keys = jax.random.split(jax.random.key(12), 6)
    gate = 3.0 * jax.random.normal(keys[0], (2, 5, 12))
    up = jax.random.normal(keys[1], (2, 5, 12))
    kernel = jax.random.normal(keys[2], (12, 4))
    probe = jax.random.normal(keys[3], (2, 5, 4))

    def check(ours, ref, args, rtol):
        np.testing.assert_allclose(ours(*args), ref(*args), rtol=rtol, atol=rtol)
        argnums = tuple(range(len(args)))
        for a, b in zip(jax.grad(ours, argnums)(*args), jax.grad(ref, argnums)(*args), strict=True):
            np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol)

    check(lambda g, u, k: jnp.sum(swiglu_down(g, u, k) * probe),
          lambda g, u, k: jnp.sum(((jax.nn.silu(g) * u) @ k) * probe), (gate, up, kernel), 1e-5)
    bf = jnp.bfloat16
    check(lambda g, u, k: jnp.sum(swiglu_down(g, u, k).astype(jnp.float32) * probe),
          lambda g, u, k: jnp.sum(((jax.nn.silu(g) * u) @ k).astype(jnp.float32) * probe),
          (gate.astype(bf), up.astype(bf), kernel.astype(bf)), 3e-2)
    scores = 4.0 * jax.random.normal(keys[4], (2, 3, 6))
    weights = jax.random.normal(keys[5], (2, 3, 6))
    check(lambda x: jnp.sum(softmax_last(x) * weights), lambda x: jnp.sum(jax.nn.softmax(x) * weights),
          (scores,), 1e-5)
    table = jax.random.normal(keys[0], (9, 4))
    idx = jnp.array([[0, 3, 3], [8, 0, 1]])
    rows_probe = jax.random.normal(keys[1], (2, 3, 4))
    check(lambda tb: jnp.sum(take_rows(tb, idx) * rows_probe), lambda tb: jnp.sum(tb[idx] * rows_probe),
          (table,), 1e-6)


def test_staggered_times():
    seq_len = 9
    for w in (0.0, 0.5, 3.0):
        np.testing.assert_array_equal(flow.staggered_times(jnp.float32(0.0), seq_len, w), np.zeros(seq_len))
        np.testing.assert_allclose(flow.staggered_times(jnp.float32(1.0), seq_len, w), np.ones(seq_len))
    np.testing.assert_allclose(flow.staggered_times(jnp.float32(0.37), seq_len, 0.0), np.full(seq_len, 0.37))
    t = flow.staggered_times(jnp.float32(0.5), seq_len, 1.0)
    # w = 1: position 0 is clean at s = 1/2 and the last one has not started; times fall left to right.
    assert float(t[0]) == 1.0 and float(t[-1]) == 0.0 and bool(jnp.all(jnp.diff(t) < 0))


def reference_staggered_sampler(model, x0, grid, stagger):
    """The staggered sampler written plainly, position by position, with explicit times."""
    b, seq_len, _ = x0.shape
    x, logits = x0, None
    frac = np.arange(seq_len) / (seq_len - 1)
    for i in range(grid.shape[0] - 1):
        t = np.clip((1 + stagger) * float(grid[i]) - stagger * frac, 0, 1)
        t_next = np.clip((1 + stagger) * float(grid[i + 1]) - stagger * frac, 0, 1)
        logits = model(x, jnp.asarray(np.broadcast_to(np.minimum(t, flow.MAX_MODEL_TIME), (b, seq_len))))
        x1_hat = jax.nn.softmax(logits, axis=-1) @ model.embeddings()
        new = []
        for j in range(seq_len):
            if t[j] >= 1.0:  # reached the data: held
                new.append(x[:, j])
            elif t_next[j] >= 1.0:  # reaches the data now: the embedding of its argmax token
                new.append(model.embeddings()[jnp.argmax(logits[:, j], axis=-1)])
            else:
                new.append(x[:, j] + (t_next[j] - t[j]) / (1 - t[j]) * (x1_hat[:, j] - x[:, j]))
        x = jnp.stack(new, axis=1)
    return jnp.argmax(logits, axis=-1), x


def test_staggered_sampler_matches_plain_reference():
    model = make_model()
    x0 = flow.gaussian_source(jax.random.key(21), 2, 6, model)
    grid = flow.time_grid(6)
    ref_tokens, ref_x = reference_staggered_sampler(model, x0, grid, 1.5)
    tokens, x = flow.sample_flow(model, x0, grid, stagger=1.5, final_state=True)
    np.testing.assert_array_equal(tokens, ref_tokens)
    np.testing.assert_allclose(x, ref_x, atol=1e-5)
    plain, _ = flow.sample_flow(model, x0, grid)
    np.testing.assert_array_equal(flow.sample_flow(model, x0, grid, stagger=0.0)[0], plain)
    # The first position reaches the data after 1/(1 + w) of the grid and is held from then on.
    _, x_early = flow.sample_flow(model, x0, grid[:4], stagger=1.5, final_state=True)  # s = 0.5 > 1/2.5
    np.testing.assert_allclose(x_early[:, 0], x[:, 0], atol=1e-6)
    assert float(jnp.abs(x_early[:, -1] - x[:, -1]).max()) > 1e-3  # later positions still move
    # Every position ends on the embedding of its token (not on a blend of embeddings), also the
    # ones that finished before the last step and were read as context from then on.
    np.testing.assert_allclose(x, model.embeddings()[tokens], atol=1e-6)


def test_staggered_logit_channel_sampler_ends_on_its_tokens_embeddings():
    """With the Gumbel logit channel at noise_tau > 0, x̂₁ is a soft blend softmax((h + G)/τ)·E; a
    position that reaches t = 1 must still end on the embedding of its (noisy-argmax) token."""
    model = make_model()
    b, seq_len = 2, 6
    x0 = flow.gaussian_source(jax.random.key(22), b, seq_len, model)
    g = jax.random.gumbel(jax.random.key(23), (b, seq_len, model.cfg.vocab_size))
    grid = flow.time_grid(6)
    tokens, x = flow.sample_flow(model, x0, grid, logit_noise=lambda p: g[:, p], noise_tau=0.5,
                                 stagger=1.5, final_state=True)
    np.testing.assert_allclose(x, model.embeddings()[tokens], atol=1e-6)
    # The soft blend is what the unfinished positions move towards: far from any embedding.
    _, x_mid = flow.sample_flow(model, x0, grid[:4], logit_noise=lambda p: g[:, p], noise_tau=0.5,
                                stagger=1.5, final_state=True)
    assert float(jnp.abs(x_mid[:, -1] - x[:, -1]).max()) > 1e-3
