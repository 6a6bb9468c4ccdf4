"""Gumbel reflow: exactness and statistics of the posterior noise, teacher alignment, the fused
step against an unfused reference, that the configured conditioning reaches the model, config
errors, teacher sampling, the sampler, and end-to-end smoke runs of both Gumbel configs."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from discreteflow_jax import flow
from discreteflow_jax import gumbel as gmb
from discreteflow_jax import gumbel_sampling as gsm
from discreteflow_jax.config import (
    ConfigError,
    GumbelConfig,
    TokenFlowConfig,
    parse_config,
    parse_gumbel_config,
    student_config,
)
from discreteflow_jax.config.presets import tokenflow_defaults
from discreteflow_jax.io.teacher import TeacherBundle
from discreteflow_jax.models.gpt2 import GPT2, GPT2Config
from discreteflow_jax.models.llama import Llama, LlamaConfig
from discreteflow_jax.models.tokenflow import TokenFlow
from discreteflow_jax.tasks.gumbel import add_gumbel_sections, gumbel_task

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
EULER_GAMMA = 0.5772156649015329
GUMBEL_VAR = math.pi**2 / 6.0
V, BOS = 64, 1


def _config(name: str, variant: str | None = "smoke") -> ml_collections.ConfigDict:
    spec = importlib.util.spec_from_file_location(f"cfg_{name}", REPO / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(variant)


def _tiny_llama(vocab: int = V, max_len: int = 32, seed: int = 0) -> Llama:
    cfg = LlamaConfig(vocab_size=vocab, dim=32, num_layers=2, num_heads=2, ffn_hidden=64, max_len=max_len, bos_id=BOS,
                      init_std=0.2)  # a large init std: peaked, non-trivial next-token distributions
    return Llama(cfg, rngs=nnx.Rngs(seed))


def _tiny_gpt2(vocab: int = V, max_len: int = 32) -> GPT2:
    return GPT2(GPT2Config(vocab_size=vocab, dim=32, num_layers=2, num_heads=2, max_len=max_len, bos_id=BOS,
                           eos_id=BOS, init_std=0.2), rngs=nnx.Rngs(0))


def _bundle(model: nnx.Module) -> TeacherBundle:
    graphdef, state = nnx.split(model)
    c = model.config
    kind = "gpt2" if isinstance(model, GPT2) else "llama"
    return TeacherBundle(graphdef=graphdef, params=nnx.to_pure_dict(state), config=c, kind=kind, bos_id=c.bos_id,
                         vocab_size=c.vocab_size, max_len=c.max_len, source="test teacher")


def _student(conditioning: str = "cross_attention", **model_kw) -> TokenFlow:
    base = TokenFlowConfig(vocab_size=V, dim=32, num_layers=2, num_heads=2, max_len=16, tie_embeddings=False,
                           **model_kw)
    cfg = student_config(base, GumbelConfig(conditioning=conditioning))
    return TokenFlow(cfg, rngs=nnx.Rngs(1))


def _strict_argmax(z: np.ndarray, tokens: np.ndarray) -> None:
    """The observed token is the argmax and the maximum is attained exactly once."""
    assert (z.argmax(-1) == tokens).all()
    assert ((z == z.max(-1, keepdims=True)).sum(-1) == 1).all()


# ---------------------------------------------------------------------------------------------
# The posterior: exact argmax


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_posterior_argmax_is_the_observed_token(dtype) -> None:
    b, t, v = 16, 32, 1000
    k1, k2, k3, k4 = jax.random.split(jax.random.key(0), 4)
    logits = (8.0 * jax.random.normal(k1, (b, t, v))).astype(dtype)  # peaked: many tiny probabilities
    logits = logits.at[0, 0, 5].set(-1e30)  # a token of probability 0 (log-softmax -inf -> floored)
    logp = gmb.log_probs(logits)
    sampled = jax.random.categorical(k2, logp)
    least_likely = jnp.argmin(logp, axis=-1)
    uniform = jax.random.randint(k3, (b, t), 0, v)
    which = jax.random.randint(k4, (b, t), 0, 3)
    tokens = jnp.where(which == 0, sampled, jnp.where(which == 1, least_likely, uniform)).at[0, 0].set(5)
    g = gmb.sample_posterior(jax.random.key(1), logp, tokens)
    assert g.dtype == jnp.float32 and bool(jnp.isfinite(g).all())
    assert float(logp[0, 0, 5]) == gmb.LOGP_FLOOR
    assert float(jnp.min(jnp.take_along_axis(logp, tokens[..., None], -1))) < -50  # tiny-probability rows exist
    _strict_argmax(np.asarray(logp + g), np.asarray(tokens))


def test_posterior_tie_guard_under_rounding() -> None:
    # ξ huge: ℓ_v + g_v = −logaddexp(−ξ_v − ℓ_v, −M) rounds to M for every v, i.e. a tie with the
    # observed token in fp32 unless the guard pushes the others strictly below.
    n, v = 512, 64
    logp = gmb.log_probs(3.0 * jax.random.normal(jax.random.key(0), (n, v)))
    tokens = jax.random.randint(jax.random.key(1), (n,), 0, v)
    xi = jnp.full((n, v), 1e4)
    m = jax.random.gumbel(jax.random.key(2), (n,))
    unguarded = -jnp.logaddexp(-xi, logp - m[:, None])
    z_bad = np.asarray(logp + jnp.where(jax.nn.one_hot(tokens, v, dtype=bool), (m[:, None] - logp), unguarded))
    assert ((z_bad == z_bad.max(-1, keepdims=True)).sum(-1) > 1).any()  # the hazard is real
    g = gmb.posterior_from_draws(logp, tokens, xi, m)
    _strict_argmax(np.asarray(logp + g), np.asarray(tokens))


# ---------------------------------------------------------------------------------------------
# The posterior: statistics when the tokens come from the teacher


def test_posterior_noise_is_iid_standard_gumbel() -> None:
    from scipy import stats

    probs = np.array([0.5, 0.25, 0.15, 0.07, 0.029, 0.001])
    b, t, v = 100, 1000, probs.size  # 10^5 draws of G in R^6
    logp = jnp.broadcast_to(jnp.log(jnp.asarray(probs, jnp.float32)), (b, t, v))
    tokens = jax.random.categorical(jax.random.key(10), logp)
    g = np.asarray(gmb.sample_posterior(jax.random.key(11), gmb.log_probs(logp), tokens)).reshape(-1, v)
    assert (np.argmax(np.log(probs) + g, -1) == np.asarray(tokens).reshape(-1)).all()
    n = g.shape[0]
    for j in range(v):
        col = g[:, j]
        assert abs(col.mean() - EULER_GAMMA) < 5 * math.sqrt(GUMBEL_VAR / n), (j, col.mean())
        assert abs(col.var() - GUMBEL_VAR) < 0.06, (j, col.var())
        assert stats.kstest(col, "gumbel_r").pvalue > 1e-4, j
    assert stats.kstest(g.reshape(-1), "gumbel_r").pvalue > 1e-4
    corr = np.corrcoef(g, rowvar=False)
    assert np.abs(corr - np.eye(v)).max() < 5 / math.sqrt(n)  # independent coordinates
    # Also independent of the token (the posterior is exact, so G carries no trace of x beyond argmax):
    # the max of ℓ + G is Gumbel(0) whatever was observed.
    top = (np.log(probs) + g).max(-1)
    assert stats.kstest(top, "gumbel_r").pvalue > 1e-4


def test_prior_is_standard_gumbel_and_chunk_independent() -> None:
    from scipy import stats

    g = gmb.sample_prior(jax.random.key(3), 8, 16, 256)
    assert stats.kstest(np.asarray(g).reshape(-1), "gumbel_r").pvalue > 1e-4
    emb = jax.random.normal(jax.random.key(4), (256, 8))
    ref = gmb.reduce_noise(g, emb, 0.7)
    for chunk in (1, 4, 16):
        got = gmb.prior_context(jax.random.key(3), emb, batch=8, seq_len=16, tau=0.7, chunk=chunk)
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Alignment: the log-probs that predict x_i come from x_<i


def _cycle_teacher(vocab: int, bos: int):
    """Deterministic-ish teacher: after u comes f(u) = (5u + 3) mod V with probability ~0.9999;
    after BOS, a uniform token."""
    f = (5 * np.arange(vocab) + 3) % vocab
    table = 12.0 * np.eye(vocab, dtype=np.float32)[f]
    table[bos] = 0.0
    table = jnp.asarray(table)
    return (lambda tokens: table[tokens]), f


def _looks_like_prior(g: np.ndarray) -> bool:
    from scipy import stats

    flat = g.reshape(-1)
    return (
        abs(flat.mean() - EULER_GAMMA) < 0.05 and abs(flat.var() - GUMBEL_VAR) < 0.15
        and stats.kstest(flat, "gumbel_r").pvalue > 1e-4
    )


def test_alignment_with_a_known_teacher_rejects_the_off_by_one_pairing() -> None:
    vocab, b, t = 16, 256, 24
    teacher, _ = _cycle_teacher(vocab, BOS)
    # Token sequences drawn from the teacher itself (BOS first, as in training).
    columns, prev = [], jnp.full((b,), BOS)
    for i in range(t):
        prev = jax.random.categorical(jax.random.fold_in(jax.random.key(0), i), teacher(prev))
        columns.append(prev)
    tokens = jnp.stack(columns, axis=1)
    key = jax.random.key(5)

    ours = gmb.log_probs(teacher(gmb.teacher_inputs(tokens, BOS)))  # output i from [BOS] + x[:-1]
    off_by_one = gmb.log_probs(teacher(tokens))  # the original's pairing: output i predicts x_{i+1}
    g_ours = gmb.sample_posterior(key, ours, tokens)
    g_off = gmb.sample_posterior(key, off_by_one, tokens)
    assert _looks_like_prior(np.asarray(g_ours))
    assert not _looks_like_prior(np.asarray(g_off))

    # The fused path the train step runs uses our pairing: same noise, tiny teacher NLL.
    emb = jax.random.normal(jax.random.key(6), (vocab, 8))
    fns = gmb.teacher_fns(teacher)
    ctx, nll = gmb.posterior_context(fns, tokens, key, emb, bos_id=BOS, tau=1.0, chunk=8, remat=False)
    np.testing.assert_allclose(ctx, gmb.reduce_noise(g_ours, emb, 1.0), rtol=1e-5, atol=1e-6)
    assert float(jnp.abs(ctx - gmb.reduce_noise(g_off, emb, 1.0)).max()) > 0.1
    nll_off = -jnp.take_along_axis(off_by_one, tokens[..., None], -1)[..., 0]
    assert float(nll.mean()) < 0.5 < 5.0 < float(nll_off.mean())  # the data is likely only under ours


# ---------------------------------------------------------------------------------------------
# The fused step equals an unfused reference


def _reference_loss(model, teacher, tokens, key, g_cfg, num_buckets=4):
    """Everything at full size: teacher logits [B, T, V], G [B, T, V], then the reduction."""
    noise_key, flow_key = jax.random.split(key)
    logp = gmb.log_probs(teacher(gmb.teacher_inputs(tokens, BOS)))
    g = gmb.sample_posterior(noise_key, logp, tokens)
    emb = model.embeddings() if g_cfg.embed_grad else jax.lax.stop_gradient(model.embeddings())
    x0, context = gmb.student_inputs(model, gmb.reduce_noise(g, emb, g_cfg.tau), g_cfg)
    mask = jnp.ones(tokens.shape)
    return flow.flow_loss(model, tokens, mask, flow_key, x0=x0, context=context, num_buckets=num_buckets)[0]


@pytest.mark.parametrize("conditioning,embed_grad", [("x0", True), ("cross_attention", False)])
def test_fused_step_matches_unfused_reference(conditioning: str, embed_grad: bool) -> None:
    g_cfg = GumbelConfig(conditioning=conditioning, tau=0.8, chunk_size=4, embed_grad=embed_grad)
    teacher = _tiny_llama()
    model = _student(conditioning)
    graphdef, params = nnx.split(model)
    tokens = jax.random.randint(jax.random.key(0), (4, 16), 0, V)
    key = jax.random.key(7)
    mask = jnp.ones(tokens.shape)

    def fused(p):
        m = nnx.merge(graphdef, p)
        return gmb.gumbel_flow_loss(m, teacher, tokens, mask, key, g_cfg, bos_id=BOS, num_buckets=4)[0]

    def reference(p):
        return _reference_loss(nnx.merge(graphdef, p), teacher, tokens, key, g_cfg)

    both = jax.jit(lambda p: (jax.value_and_grad(fused)(p), jax.value_and_grad(reference)(p)))  # one compile
    (loss_f, grads_f), (loss_r, grads_r) = both(params)
    np.testing.assert_allclose(loss_f, loss_r, rtol=1e-5)
    flat_f, flat_r = jax.tree.leaves(grads_f), jax.tree.leaves(grads_r)
    for a, b in zip(flat_f, flat_r, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    emb_grad = nnx.to_pure_dict(grads_f)["embedding"]
    assert float(jnp.abs(emb_grad).max()) > 0  # the embedding trains either way


@pytest.mark.parametrize("logit_channel", [False, True])
def test_teacher_nll_counts_the_positions_it_sums(logit_channel: bool) -> None:
    """With known positions (flow.condition_prob > 0) the loss skips them, but the teacher NLL is of
    every target: its mean must not change when positions are marked known."""
    from discreteflow_jax.gumbel_distill import gumbel_distill_loss
    from discreteflow_jax.tasks.gumbel import summarize_gumbel

    teacher = _tiny_llama()
    g_cfg = GumbelConfig(conditioning="none", logit_channel=True) if logit_channel else GumbelConfig()
    model = _student(g_cfg.conditioning, singular_logits=False) if logit_channel else _student()
    tokens = jax.random.randint(jax.random.key(0), (2, 16), 0, V)
    mask = jnp.ones(tokens.shape)
    known = jnp.arange(16)[None, :].repeat(2, 0) < 12  # 3/4 of the positions known
    loss_fn = gumbel_distill_loss if logit_channel else gmb.gumbel_flow_loss
    logged = []
    for known_bt in (None, known):
        sums = loss_fn(model, teacher, tokens, mask, jax.random.key(3), g_cfg, bos_id=BOS, num_buckets=4,
                       known_BT=known_bt)[1]
        logged.append(summarize_gumbel(jax.device_get(sums), "train", 4)["train/teacher_nll"])
    logp = np.asarray(gmb.log_probs(teacher(gmb.teacher_inputs(tokens, BOS))))
    expected = -np.take_along_axis(logp, np.asarray(tokens)[..., None], -1).mean()
    np.testing.assert_allclose(logged, [expected, expected], rtol=1e-4)


# ---------------------------------------------------------------------------------------------
# The configured conditioning reaches the model


def _task_config(conditioning: str, **gumbel_kw) -> ml_collections.ConfigDict:
    c = add_gumbel_sections(tokenflow_defaults())
    c.model.vocab_size, c.model.dim, c.model.num_layers, c.model.num_heads, c.model.max_len = V, 32, 2, 2, 16
    c.data.seq_len, c.train.batch_size, c.train.grad_accum = 16, 4, 1
    c.gumbel.conditioning = conditioning
    for k, val in gumbel_kw.items():
        c.gumbel[k] = val
    return c


def _param_paths(model: nnx.Module) -> list[str]:
    return ["/".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))]


def test_configured_conditioning_reaches_the_model() -> None:
    teacher = _bundle(_tiny_llama())
    tokens = jax.random.randint(jax.random.key(0), (4, 16), 0, V)
    mask = jnp.ones(tokens.shape)
    t_small = jnp.full((4,), 0.1)  # early in the flow, where the student must rely on its source/context
    for conditioning in ("x0", "cross_attention"):
        cfg = _task_config(conditioning)
        task = gumbel_task(parse_config(cfg), teacher=teacher)
        model = task.create_model(nnx.Rngs(0))
        has_cross = any("cross_attn" in p for p in _param_paths(model))
        assert has_cross == (conditioning == "cross_attention")
        assert model.cfg.cross_attention == (conditioning == "cross_attention")
        g_cfg = parse_gumbel_config(cfg.gumbel.to_dict())
        graphdef, params = nnx.split(model)

        @jax.jit
        def check(params, aux, key):
            model = nnx.merge(graphdef, params)
            noise_key, flow_key = jax.random.split(key)

            def loss_and_logits(noise_key):
                toks, ctx, _ = gmb.gumbel_pairs(model, nnx.merge(task_graphdef, aux), tokens, noise_key, g_cfg,
                                                bos_id=BOS)
                x0, context = gmb.student_inputs(model, ctx, g_cfg)
                if conditioning == "x0":
                    assert context is None and x0 is ctx
                else:
                    assert x0 is None and context.shape == (4, 16, 32)
                loss = flow.flow_loss(model, toks, mask, flow_key, x0=x0, context=context)[0]
                x0 = flow.gaussian_source(flow_key, 4, 16, model) if x0 is None else x0
                logits = model(flow.noisy_path(model.embed(toks), x0, t_small), t_small, context)
                return loss, logits

            loss_a, logits_a = loss_and_logits(noise_key)
            _, logits_b = loss_and_logits(jax.random.fold_in(noise_key, 1))
            return task.loss_fn(model, aux, tokens, key)[0], loss_a, jnp.abs(logits_a - logits_b).max()

        task_graphdef = teacher.graphdef
        task_loss, loss_a, logit_change = check(params, task.aux, jax.random.key(3))
        # The task's loss is this path, and the student's output depends on G.
        np.testing.assert_allclose(task_loss, loss_a, rtol=1e-6)
        assert float(logit_change) > 1e-3


def test_cross_attention_context_is_position_aligned() -> None:
    # Without positions in the cross-attention, permuting the context would not change the output:
    # the student could not tell which noise belongs to which position.
    model = _student("cross_attention")
    x = 0.2 * jax.random.normal(jax.random.key(1), (1, 8, 32))
    ctx = jax.random.normal(jax.random.key(2), (1, 8, 32))
    t = jnp.array([0.3])
    out = model(x, t, ctx)
    assert float(jnp.abs(out - model(x, t, ctx[:, ::-1])).max()) > 1e-3
    assert float(jnp.abs(out - model(x, t, ctx + 0.5)).max()) > 1e-3


def test_x0_conditioning_has_no_cross_attention_and_rejects_it() -> None:
    assert not any("cross_attn" in p for p in _param_paths(_student("x0")))
    with pytest.raises(ConfigError, match="cross_attention"):
        student_config(TokenFlowConfig(cross_attention=True), GumbelConfig(conditioning="x0"))


# ---------------------------------------------------------------------------------------------
# Errors before compilation


def test_config_errors() -> None:
    teacher = _bundle(_tiny_llama())
    with pytest.raises(ConfigError, match="tau"):
        gumbel_task(parse_config(_task_config("x0", tau=0.0)), teacher=teacher)
    with pytest.raises(ConfigError, match="conditioning"):
        gumbel_task(parse_config(_task_config("film")), teacher=teacher)
    with pytest.raises(ConfigError, match="source"):
        gumbel_task(parse_config(_task_config("x0", source="oracle")), teacher=teacher)
    with pytest.raises(ConfigError, match="vocabulary"):
        gumbel_task(parse_config(_task_config("x0")), teacher=_bundle(_tiny_llama(vocab=V + 1)))
    with pytest.raises(ConfigError, match="seq_len"):
        gumbel_task(parse_config(_task_config("x0")), teacher=_bundle(_tiny_llama(max_len=8)))
    c = _task_config("x0")
    with pytest.raises(ConfigError, match="shakespeare_teacher.py"):
        gumbel_task(parse_config(c))  # no teacher at all
    c.teacher.checkpoint = "/nonexistent/teacher_workdir"
    with pytest.raises(ConfigError, match="shakespeare_teacher.py"):
        gumbel_task(parse_config(c))


# ---------------------------------------------------------------------------------------------
# Teachers: split forward, KV-cache sampling on prior noise


@pytest.mark.parametrize("make", [_tiny_llama, _tiny_gpt2])
def test_teacher_split_and_teacher_sampling_are_exact(make) -> None:
    graphdef, state = nnx.split(make())
    tokens = jax.random.randint(jax.random.key(0), (3, 12), 0, V)
    key = jax.random.key(8)

    @jax.jit  # one compilation instead of one per eager op
    def run(state):
        teacher = nnx.merge(graphdef, state)
        fns = gmb.teacher_fns(teacher)
        split = fns.head(fns.hidden(tokens)) - teacher(tokens)
        sampled, nll = gmb.teacher_sample_tokens(teacher, key, 3, 12, BOS, V)
        logp = gmb.log_probs(teacher(gmb.teacher_inputs(sampled, BOS)))
        return split, sampled, nll, logp

    split, sampled, nll, logp = run(state)
    assert float(jnp.abs(split).max()) < 1e-4
    # Teacher forcing on the sampled tokens with the same prior noise reproduces every argmax.
    g = gmb.sample_prior(key, 3, 12, V)
    np.testing.assert_array_equal(jnp.argmax(logp + g, -1), sampled)
    np.testing.assert_allclose(nll, -jnp.take_along_axis(logp, sampled[..., None], -1)[..., 0], rtol=1e-4,
                               atol=1e-4)


def test_teacher_sample_source_pairs_tokens_with_their_prior_noise() -> None:
    t_graphdef, t_state = nnx.split(_tiny_llama())
    s_graphdef, s_state = nnx.split(_student("x0"))
    g_cfg = GumbelConfig(conditioning="x0", source="teacher_sample", chunk_size=4)
    data = jnp.zeros((2, 16), jnp.int32)
    key = jax.random.key(4)

    @jax.jit
    def run(t_state, s_state):
        teacher, model = nnx.merge(t_graphdef, t_state), nnx.merge(s_graphdef, s_state)
        tokens, ctx, _ = gmb.gumbel_pairs(model, teacher, data, key, g_cfg, bos_id=BOS)
        g = gmb.sample_prior(key, 2, 16, V)
        logp = gmb.log_probs(teacher(gmb.teacher_inputs(tokens, BOS)))
        return tokens, ctx, gmb.reduce_noise(g, model.embeddings(), 1.0), jnp.argmax(logp + g, -1)

    tokens, ctx, ctx_ref, argmax = run(t_state, s_state)
    assert not bool((tokens == data).all())
    np.testing.assert_allclose(ctx, ctx_ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(argmax, tokens)


# ---------------------------------------------------------------------------------------------
# Sampling


def _reference_sample(model: TokenFlow, key: jax.Array, steps: int, g_cfg: GumbelConfig, b: int, t: int) -> np.ndarray:
    """The sampler written out at full size: G [B, T, V] from the prior, softmax(G/τ)·E (numpy) as x0
    or context, K plain Euler steps on x̂₁ = softmax(logits)·E, tokens = argmax of the last logits."""
    g_key, x0_key = jax.random.split(key)
    g = np.asarray(gmb.sample_prior(g_key, b, t, V))
    z = g / g_cfg.tau
    w = np.exp(z - z.max(-1, keepdims=True))
    ctx = jnp.asarray((w / w.sum(-1, keepdims=True)) @ np.asarray(model.embeddings()))
    # The cross-attention context enters at the residual stream's O(1) scale.
    x0, context = (ctx, None) if g_cfg.conditioning == "x0" else (None, ctx / model.cfg.embed_scale_value)
    x = x0 if x0 is not None else model.cfg.sigma * jax.random.normal(x0_key, (b, t, model.cfg.flow_width))
    grid = np.linspace(0.0, 1.0, steps + 1)
    for i in range(steps):
        logits = model(x, jnp.full((b,), grid[i], jnp.float32), context)
        if i == steps - 1:
            return np.asarray(jnp.argmax(logits, axis=-1))
        x1_hat = jax.nn.softmax(logits, axis=-1) @ model.embeddings()
        x = x + (grid[i + 1] - grid[i]) / (1.0 - grid[i]) * (x1_hat - x)
    raise AssertionError("steps must be >= 1")


@pytest.mark.parametrize("conditioning,steps", [("x0", 1), ("cross_attention", 3)])
def test_sampler_matches_a_full_size_reference_and_noise_temperature(conditioning: str, steps: int) -> None:
    model = _student(conditioning)
    graphdef, params = nnx.split(model)
    g_cfg = GumbelConfig(conditioning=conditioning)
    key = jax.random.key(0)
    run = gsm.make_sampler(graphdef, g_cfg, batch=2, seq_len=16, steps=steps)
    out = run(params, key)
    assert out.shape == (2, 16) and out.dtype == jnp.int32
    np.testing.assert_array_equal(out, _reference_sample(model, key, steps, g_cfg, 2, 16))
    x0_a, ctx_a = gmb.gumbel_source(model, key, 2, 16, g_cfg)
    x0_b, ctx_b = gmb.gumbel_source(model, key, 2, 16, dataclasses.replace(g_cfg, sample_temperature=0.5))
    changed = (x0_a, x0_b) if conditioning == "x0" else (ctx_a, ctx_b)
    assert float(jnp.abs(changed[0] - changed[1]).max()) > 1e-3


# ---------------------------------------------------------------------------------------------
# End to end through experiment.run


def _run(config: ml_collections.ConfigDict, workdir: Path, data_dir: str | None = None) -> dict:
    from discreteflow_jax.training import experiment

    return experiment.run(config, str(workdir), data_dir=data_dir)


def assert_teacher_nll_is_the_teachers_own_loss(config: ml_collections.ConfigDict, workdir: Path,
                                               data_dir: str | None) -> None:
    """The teacher NLL the Gumbel validation logs is the teacher's own next-token loss on the same
    validation windows (the step's teacher pass feeds [BOS] + x[:-1], exactly like the teacher's)."""
    from discreteflow_jax.io.teacher import load_teacher
    from discreteflow_jax.tasks.teacher import next_token_sums
    from discreteflow_jax.training import experiment
    from discreteflow_jax.training.steps import validation_batches

    lines = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    logged = [x for x in lines if "val/teacher_nll" in x][-1]["val/teacher_nll"]
    cfg, _, dataset = experiment.prepare(config, data_dir)
    teacher = load_teacher(dict(cfg.extra["teacher"]))
    loss_sum = tokens = 0.0
    for batch in validation_batches(dataset, cfg.train.batch_size, cfg.train.eval_batches):
        sums = next_token_sums(teacher.model(), jnp.asarray(batch, jnp.int32), teacher.bos_id)[1]
        loss_sum, tokens = loss_sum + float(sums["loss_sum"]), tokens + float(sums["tokens"])
    assert logged == pytest.approx(loss_sum / tokens, rel=1e-4)
    assert 0 < logged < 2 * math.log(cfg.model.vocab_size)


@pytest.fixture(scope="module")
def shakespeare_teacher_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not (DATA / "tiny_shakespeare" / "input.txt").exists():
        pytest.skip(f"offline data folder not found at {DATA}")
    workdir = tmp_path_factory.mktemp("teacher")
    _run(_config("shakespeare_teacher"), workdir, str(DATA))
    return workdir


@pytest.mark.slow
@pytest.mark.parametrize("causal", [False, True])
def test_shakespeare_gumbel_smoke(shakespeare_teacher_dir: Path, tmp_path: Path, causal: bool) -> None:
    c = _config("shakespeare_gumbel")
    c.teacher.checkpoint = str(shakespeare_teacher_dir)
    c.causal = causal
    out = _run(c, tmp_path, str(DATA))
    assert np.isfinite(out["metrics"]["train/loss"])
    assert np.isfinite(out["metrics"]["train/teacher_nll"])
    assert_teacher_nll_is_the_teachers_own_loss(c, tmp_path, str(DATA))
    samples = (tmp_path / "samples" / "step_0000004.txt").read_text()
    assert samples.count("=== step 4 K=") == 4  # 2 samples at each of K = 1, 4


@pytest.fixture(scope="module")
def tiny_gpt2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random GPT-2 with the real 50257-token vocabulary, saved as a Hugging Face directory."""
    from safetensors.numpy import save_file

    from discreteflow_jax.io.hf import params_to_hf

    cfg = GPT2Config(vocab_size=50257, dim=32, num_layers=2, num_heads=2, max_len=32)
    model = GPT2(cfg, rngs=nnx.Rngs(0))
    out = tmp_path_factory.mktemp("gpt2")
    hf = {"model_type": "gpt2", "vocab_size": 50257, "n_embd": 32, "n_layer": 2, "n_head": 2, "n_positions": 32,
          "bos_token_id": 50256, "eos_token_id": 50256, "activation_function": "gelu_new"}
    (out / "config.json").write_text(json.dumps(hf))
    save_file(params_to_hf(model, cfg), str(out / "model.safetensors"))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("causal", [False, True])
def test_fineweb_gumbel_smoke(tiny_gpt2_dir: Path, tmp_path: Path, causal: bool) -> None:
    if not (DATA / "gpt2_tokenizer").exists() or not (DATA / "tiny_shakespeare" / "input.txt").exists():
        pytest.skip(f"offline data folder not found at {DATA}")
    text = (DATA / "tiny_shakespeare" / "input.txt").read_text()[:60000]
    docs = tmp_path / "docs.jsonl"
    with open(docs, "w") as f:
        for part in text.split("\n\n"):
            f.write(json.dumps({"text": part}) + "\n")
    c = _config("fineweb_gumbel")
    c.teacher.hf = str(tiny_gpt2_dir)
    c.data.local_path = str(docs)
    c.causal = causal
    out = _run(c, tmp_path / "run", str(DATA))
    assert np.isfinite(out["metrics"]["train/loss"])
    assert_teacher_nll_is_the_teachers_own_loss(c, tmp_path / "run", str(DATA))


def test_hf_gpt2_teacher_run_small(tmp_path: Path) -> None:
    """The default suite's GPT-2 teacher run: a random one-layer Hugging Face GPT-2 (transformers,
    the real 50257-token vocabulary) saved locally, one FineWeb Gumbel step on local documents; the
    logged teacher NLL is the PyTorch model's own next-token loss on the validation windows."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    if not (DATA / "gpt2_tokenizer").exists() or not (DATA / "tiny_shakespeare" / "input.txt").exists():
        pytest.skip(f"offline data folder not found at {DATA}")
    from discreteflow_jax.training import experiment
    from discreteflow_jax.training.steps import validation_batches

    torch.manual_seed(0)
    hf_config = transformers.GPT2Config(vocab_size=50257, n_embd=16, n_layer=1, n_head=2, n_positions=32,
                                        bos_token_id=50256, eos_token_id=50256)
    hf = transformers.GPT2LMHeadModel(hf_config).eval()
    with torch.no_grad():  # a larger init than HF's: the teacher's NLL then differs from log V
        for param in hf.parameters():
            if param.ndim > 1:
                param.normal_(0.0, 0.3)
    hf.save_pretrained(tmp_path / "gpt2")
    text = (DATA / "tiny_shakespeare" / "input.txt").read_text()[:20000]
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": part}) + "\n" for part in text.split("\n\n")))
    c = _config("fineweb_gumbel")
    c.teacher.hf, c.data.local_path = str(tmp_path / "gpt2"), str(docs)
    c.model.num_layers, c.train.num_steps, c.train.eval_every, c.train.ckpt_every = 1, 1, 1, 1
    c.sample.eval_steps = ()  # the sampler does not use the teacher
    out = _run(c, tmp_path / "run", str(DATA))
    assert np.isfinite(out["metrics"]["train/loss"])

    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    logged = [x for x in lines if "val/teacher_nll" in x][-1]["val/teacher_nll"]
    cfg, _, dataset = experiment.prepare(c, str(DATA))
    nll = []
    for batch in validation_batches(dataset, cfg.train.batch_size, cfg.train.eval_batches):
        tokens = torch.as_tensor(np.asarray(batch), dtype=torch.long)
        inputs = torch.cat([torch.full((tokens.shape[0], 1), 50256), tokens[:, :-1]], dim=1)
        with torch.no_grad():
            logp = torch.log_softmax(hf(inputs).logits.double(), dim=-1)
        nll.append(-logp.gather(-1, tokens[..., None])[..., 0].numpy().ravel())
    expected = float(np.concatenate(nll).mean())
    assert abs(expected - math.log(50257)) > 0.1  # a teacher that is not uniform
    assert logged == pytest.approx(expected, rel=1e-4)


def test_resume_refuses_another_conditioning_or_teacher(shakespeare_teacher_dir: Path, tmp_path: Path) -> None:
    """A Gumbel workdir resumed with another conditioning (a different parameter tree) or another
    teacher checkpoint is refused with the fields listed, before anything is restored. The run is a
    causal student: the default suite's end-to-end causal Gumbel run (the slow smoke runs both)."""
    import shutil

    from discreteflow_jax.io import checkpoint as ckpt

    def config(teacher: Path, conditioning: str) -> ml_collections.ConfigDict:
        c = _config("shakespeare_gumbel")
        c.teacher.checkpoint = str(teacher)
        c.gumbel.conditioning = conditioning
        c.causal = True
        c.train.num_steps, c.train.ckpt_every, c.train.eval_every = 1, 1, 1
        c.sample.eval_steps = (1,)
        return c

    other_teacher = tmp_path / "other_teacher"
    shutil.copytree(shakespeare_teacher_dir, other_teacher)
    first = config(shakespeare_teacher_dir, "cross_attention")
    out = _run(first, tmp_path / "run", str(DATA))
    assert out["state"] is not None and np.isfinite(out["metrics"]["train/loss"])
    assert_teacher_nll_is_the_teachers_own_loss(first, tmp_path / "run", str(DATA))
    with pytest.raises(ckpt.CheckpointMismatchError) as err:
        _run(config(other_teacher, "x0"), tmp_path / "run", str(DATA))
    text = str(err.value)
    assert "gumbel.conditioning: checkpoint has 'cross_attention', this run has 'x0'" in text
    assert f"teacher.checkpoint: checkpoint has {str(shakespeare_teacher_dir)!r}" in text


def test_causal_student_reads_no_later_position() -> None:
    """A causal Gumbel student (config.causal=True): its logits at positions < k do not change when
    x_t at positions >= k does (the cross-attention context held fixed), and a training step through
    the task gives finite gradients."""
    conditioning = "cross_attention"
    c = _task_config(conditioning)
    c.causal = True
    task = gumbel_task(parse_config(c), teacher=_bundle(_tiny_llama()))
    model = task.create_model(nnx.Rngs(0))
    assert model.cfg.causal
    x = jax.random.normal(jax.random.key(0), (2, 16, 32))
    later = x.at[:, 10:].add(jax.random.normal(jax.random.key(1), (2, 6, 32)))
    t = jnp.full((2,), 0.3)
    context = jax.random.normal(jax.random.key(2), (2, 16, 32))
    tokens = jax.random.randint(jax.random.key(3), (4, 16), 0, V)
    graphdef, params = nnx.split(model)

    @jax.jit  # one program: eager op-by-op execution would cost more than compiling
    def run(params, aux):
        m = nnx.merge(graphdef, params)
        grads = jax.grad(lambda p: task.loss_fn(nnx.merge(graphdef, p), aux, tokens, jax.random.key(4))[0])(params)
        return m(x, t, context), m(later, t, context), grads

    a, b, grads = run(params, task.aux)
    np.testing.assert_allclose(a[:, :10], b[:, :10], rtol=1e-5, atol=1e-5)
    assert float(jnp.abs(a[:, 10:] - b[:, 10:]).max()) > 1e-3
    assert all(bool(jnp.isfinite(g).all()) for g in jax.tree.leaves(grads))


def test_auto_chunk_is_sized_per_device(monkeypatch) -> None:
    """The automatic Gumbel chunk bounds each device's [rows, C, V] temporaries: with the batch
    split over 8 devices it is 8 times larger (fineweb_gumbel: micro-batch 64, context 1024,
    V = 50257), so a step runs 32 sequential chunks instead of 256."""
    from discreteflow_jax.models import sharding as shd

    assert gmb.resolve_chunk(1024, 64, 50257, 0, shards=1) == 4
    assert gmb.resolve_chunk(1024, 64, 50257, 0, shards=8) == 32
    assert gmb.resolve_chunk(1024, 64, 50257, 16, shards=8) == 16  # an explicit chunk_size wins
    assert gmb.resolve_chunk(1024, 60, 50257, 0, shards=8) == gmb.resolve_chunk(1024, 60, 50257, 0, shards=1)
    # Without ``shards``: the batch axis of the mesh the step is traced under.
    assert gmb.resolve_chunk(1024, 64, 50257) == 4
    monkeypatch.setattr(shd, "axis_shards", lambda logical: 8 if logical == "batch" else 1)
    assert gmb.resolve_chunk(1024, 64, 50257) == 32
