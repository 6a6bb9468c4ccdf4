"""The context-gain diagnostic: a per-position network gains nothing, a naive loop agrees."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from discreteflow_jax import flow
from discreteflow_jax.config import TokenFlowConfig
from discreteflow_jax.models.tokenflow import TokenFlow
from discreteflow_jax.tasks.base import summarize_flow
from discreteflow_jax.tasks.tokenflow import context_gain_sums
from discreteflow_jax.training.metrics import format_progress

VOCAB, SEQ, BATCH, BUCKETS = 50, 6, 4, 5


def _model(num_layers: int, loss_chunk: int = 0) -> TokenFlow:
    cfg = TokenFlowConfig(
        vocab_size=VOCAB, dim=16, num_layers=num_layers, num_heads=2, max_len=SEQ, loss_chunk=loss_chunk
    )
    model = TokenFlow(cfg, rngs=nnx.Rngs(3))
    if num_layers:
        # Make attention matter at init (its output projection starts small).
        for block in model.blocks:
            block.attn.o_proj.kernel[...] = 3.0 * block.attn.o_proj.kernel[...]
    return model


def _inputs():
    tokens = jax.random.randint(jax.random.key(0), (BATCH, SEQ), 0, VOCAB)
    t = jnp.array([0.05, 0.3, 0.5, 0.9])
    return tokens, t


def _noisy(model: TokenFlow, tokens, t, key):
    x1 = model.embed(tokens)
    return flow.noisy_path(x1, model.cfg.sigma * jax.random.normal(key, x1.shape), t)


def _gain(model: TokenFlow, tokens, t, key):
    x_t = _noisy(model, tokens, t, key)
    intact = model.token_losses(x_t, t, tokens, jnp.ones(tokens.shape, jnp.float32))[1]
    return context_gain_sums(model, x_t, t, tokens, intact, BUCKETS)


def test_network_without_blocks_gains_nothing():
    tokens, t = _inputs()
    sums = _gain(_model(0), tokens, t, jax.random.key(1))
    np.testing.assert_allclose(np.asarray(sums["context_gain_sum"]), 0.0, atol=1e-5)
    assert float(sums["context_tokens"].sum()) == BATCH * (SEQ // 2)


@pytest.mark.parametrize("loss_chunk", [0, 4])
def test_matches_naive_loop(loss_chunk):
    model = _model(2, loss_chunk)
    tokens, t = _inputs()
    key = jax.random.key(1)
    sums = _gain(model, tokens, t, key)

    x_t = np.asarray(_noisy(model, tokens, t, key))
    scrambled = x_t.copy()
    for b in range(BATCH):
        for i in range(1, SEQ, 2):
            scrambled[b, i] = x_t[(b - 1) % BATCH, i]

    def ce(x):
        logits = np.asarray(model(jnp.asarray(x), t), np.float64)
        log_z = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
        return log_z - np.take_along_axis(logits, np.asarray(tokens)[..., None], -1)[..., 0]

    gain = (ce(scrambled) - ce(x_t))[:, ::2].mean(axis=1)
    expected = np.zeros(BUCKETS)
    for b in range(BATCH):
        expected[min(int(t[b] * BUCKETS), BUCKETS - 1)] += gain[b] * (SEQ // 2)
    np.testing.assert_allclose(np.asarray(sums["context_gain_sum"]), expected, rtol=1e-4, atol=1e-5)
    assert np.abs(expected).max() > 1e-3  # the check above can fail: attention does matter here


def test_single_sequence_batch_reports_nothing():
    tokens, t = _inputs()
    sums = _gain(_model(1), tokens[:1], t[:1], jax.random.key(1))
    assert float(sums["context_tokens"].sum()) == 0.0


def test_summary_and_console_line():
    zeros = np.zeros(BUCKETS)
    sums = {
        "loss_sum": 10.0, "tokens": 5.0, "bucket_loss_sum": zeros, "bucket_tokens": zeros,
        "context_gain_sum": np.array([0.6, 0.0, 0.2, 0.0, 0.0]),
        "context_tokens": np.array([3.0, 0.0, 1.0, 0.0, 0.0]),
    }
    out = summarize_flow(sums, "val", BUCKETS)
    assert out["val/context_gain_t0.0-0.2"] == pytest.approx(0.2)
    assert out["val/context_gain_t0.4-0.6"] == pytest.approx(0.2)
    assert out["val/context_gain"] == pytest.approx(0.2)
    assert "val/context_gain_t0.2-0.4" not in out
    assert "context gain by t-bucket (nats): t0.0-0.2=+0.200 t0.4-0.6=+0.200" in format_progress(1, 2, out, None)


def test_validation_loss_is_flow_loss():
    """The validation step shares its forward pass with the context gain; its loss metrics must
    still be exactly those of ``flow.flow_loss`` at the same times and key."""
    from conftest import load_config

    from discreteflow_jax.config import parse_config
    from discreteflow_jax.tasks.base import stratified_times
    from discreteflow_jax.tasks.tokenflow import tokenflow_task

    cfg = parse_config(load_config("shakespeare_baseline", "smoke"))
    task = tokenflow_task(cfg)
    model = task.create_model(nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(0), (4, cfg.data.seq_len), 0, cfg.model.vocab_size)
    key = jax.random.key(5)
    sums = task.eval_fn(model, None, tokens, key)
    t = stratified_times(jax.random.fold_in(key, 1), tokens.shape[0])
    expected = flow.flow_loss(model, tokens, jnp.ones(tokens.shape), key, num_buckets=cfg.flow.num_buckets, t_B=t)[1]
    for name, value in expected.items():
        np.testing.assert_allclose(np.asarray(sums[name]), np.asarray(value), rtol=1e-6, atol=1e-6)
    assert {"context_gain_sum", "context_tokens"} <= set(sums)
