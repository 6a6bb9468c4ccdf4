"""Sampler-state training of the logit-channel student (``gumbel.rollout_prob``): the states it trains
on are exactly the ones the K-step sampler reaches, the rows it replaces get the grid's times, the
loss keeps a gradient, and the config rejects what it cannot train."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from discreteflow_jax import flow
from discreteflow_jax import gumbel as gmb
from discreteflow_jax.config import ConfigError, GumbelConfig, TokenFlowConfig, parse_config, parse_gumbel_config
from discreteflow_jax.config.gumbel import student_config
from discreteflow_jax.gumbel_distill import sampler_states
from discreteflow_jax.models.tokenflow import TokenFlow

LOGIT = GumbelConfig(conditioning="none", logit_channel=True)


def _student(vocab: int = 37, t: int = 8) -> TokenFlow:
    cfg = student_config(TokenFlowConfig(vocab_size=vocab, dim=32, num_layers=1, num_heads=2, max_len=t,
                                         tie_embeddings=False, singular_logits=False, loss_chunk=0), LOGIT)
    return TokenFlow(cfg, rngs=nnx.Rngs(0))


def test_the_trained_states_are_the_samplers_own() -> None:
    b, t, vocab, steps = 4, 8, 37, 4
    model = _student(vocab, t)
    x0 = flow.gaussian_source(jax.random.key(1), b, t, model)
    g = gmb.sample_prior(jax.random.key(2), b, t, vocab)
    grid = flow.time_grid(steps)
    done = jnp.array([0, 1, 2, 3])
    got = np.asarray(sampler_states(model, x0, g, None, done, grid, chunk=2))
    np.testing.assert_array_equal(got[0], np.asarray(x0[0]))  # no step taken: the source itself
    for row in range(1, b):
        k = int(done[row])
        # The sampler run for k steps on the first k + 1 grid times, its state after the last step.
        want = flow.sample_flow(model, x0, grid[: k + 1], logit_noise=lambda p: g[:, p], final_state=True)[1]
        np.testing.assert_allclose(got[row], np.asarray(want[row]), rtol=1e-5, atol=1e-5)
    # The states are built from the student's own tokens, not the clean path to some fixed tokens.
    assert not np.allclose(got[1], got[2], atol=1e-3)


def _task(rollout_prob: float):
    # test_gumbel_logit's logit-channel student of a tiny random LLaMA (V 32, T 8), 8 sequences a batch.
    from test_gumbel_logit import _llama_task

    from discreteflow_jax.tasks.gumbel import gumbel_task

    c, bundle, _ = _llama_task("none", "data_posterior")
    c.train.batch_size = 8
    c.gumbel.rollout_prob, c.gumbel.rollout_steps = rollout_prob, 4
    c.flow.num_buckets = 10
    return gumbel_task(parse_config(c), teacher=bundle)


def test_the_loss_trains_on_the_grid_times_with_a_gradient() -> None:
    tokens = jax.random.randint(jax.random.key(0), (8, 8), 0, 32)
    losses = {}
    for share in (0.0, 0.5, 1.0):
        task = _task(share)
        model = task.create_model(nnx.Rngs(0))

        def loss_of(m):
            return task.loss_fn(m, task.aux, tokens, jax.random.key(1))

        (loss, metrics), grads = nnx.value_and_grad(loss_of, has_aux=True)(model)
        norm = float(optax_global_norm(grads))
        assert np.isfinite(float(loss)) and norm > 0
        losses[share] = float(loss)
        counts = np.asarray(metrics["bucket_tokens"])
        on_grid = counts[[2, 5, 7]].sum()  # t = 0.25, 0.5, 0.75 of the K = 4 grid
        if share == 1.0:  # every sequence is a sampler state: only the grid's buckets hold tokens
            assert on_grid == counts.sum() == 64
        if share == 0.5:  # 4 of 8 sequences on the grid, the rest anywhere
            assert on_grid >= 32
        # Validation keeps the clean path at stratified times: buckets off the grid are used.
        val = np.asarray(task.eval_fn(model, task.aux, tokens, jax.random.key(1))["bucket_tokens"])
        assert (np.delete(val, [2, 5, 7]) > 0).sum() >= 4
    assert losses[0.0] != losses[0.5] != losses[1.0]


def optax_global_norm(tree) -> jax.Array:
    leaves = [jnp.asarray(x) for x in jax.tree_util.tree_leaves(nnx.to_pure_dict(tree))]
    return jnp.sqrt(sum(jnp.sum(x * x) for x in leaves))


def test_config_errors() -> None:
    with pytest.raises(ConfigError, match="rollout_prob"):
        parse_gumbel_config({"rollout_prob": 1.5, "logit_channel": True, "conditioning": "none"})
    with pytest.raises(ConfigError, match="logit_channel=True"):
        parse_gumbel_config({"rollout_prob": 0.5})
    with pytest.raises(ConfigError, match="rollout_steps"):
        parse_gumbel_config({"rollout_prob": 0.5, "rollout_steps": 1, "logit_channel": True, "conditioning": "none"})
    ok = parse_gumbel_config({"rollout_prob": 0.5, "logit_channel": True, "conditioning": "none"})
    assert dataclasses.asdict(ok)["rollout_steps"] == 4
