"""The teacher's Jacobi sampler (``evaluation.jacobi``): T calls give exactly the teacher's own
Gumbel-max decode of the same noise, j calls fix the first j positions, fewer calls differ."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from discreteflow_jax import gumbel as gmb
from discreteflow_jax.evaluation.jacobi import jacobi_decode
from discreteflow_jax.models.llama import Llama, LlamaConfig


def test_jacobi_reaches_the_teachers_decode_and_fixes_one_position_per_call() -> None:
    b, t, vocab, bos = 16, 10, 32, 1
    teacher = Llama(LlamaConfig(vocab_size=vocab, dim=32, num_layers=1, num_heads=2, ffn_hidden=64, max_len=t + 1,
                                bos_id=bos, init_std=0.2), rngs=nnx.Rngs(0))
    key = jax.random.key(4)
    want = np.asarray(gmb.teacher_sample_tokens(teacher, key, b, t, bos, vocab)[0])
    g = gmb.sample_prior(key, b, t, vocab)  # the noise teacher_sample_tokens decodes with
    np.testing.assert_array_equal(np.asarray(jacobi_decode(teacher, g, bos, t)), want)
    for calls in (1, 3):
        got = np.asarray(jacobi_decode(teacher, g, bos, calls))
        np.testing.assert_array_equal(got[:, :calls], want[:, :calls])
        assert (got != want).any()  # not settled yet: the test could fail


def test_polishing_a_student_that_is_its_teacher_reaches_the_teachers_decode() -> None:
    # The oracle student of test_gumbel_logit: the teacher's conditional given its clean input's tokens.
    from test_gumbel_logit import LOGIT, _bigram, _Oracle, _teacher_decode

    from discreteflow_jax import flow
    from discreteflow_jax import gumbel_sampling as gsm

    b, t = 32, 12
    table, key = _bigram(), jax.random.key(5)
    oracle = _Oracle(table)
    want = _teacher_decode(table, gsm.logit_noise(oracle, key, b, t, LOGIT))
    one = flow.time_grid(1)

    def run(polish: int) -> np.ndarray:
        return np.asarray(gsm.sample_gumbel_flow(oracle, key, one, LOGIT, batch=b, seq_len=t, polish_steps=polish))

    assert (run(0) != want).any()  # one flow step: a draw per position, not the decode
    for calls in (1, 4):  # call j fixes position j − 1 (its left context is exact by then)
        got = run(calls)
        np.testing.assert_array_equal(got[:, :calls], want[:, :calls])
        assert (got != want).any()
    np.testing.assert_array_equal(run(t), want)
    with pytest.raises(ValueError, match="logit channel"):
        gsm.polish(oracle, jnp.zeros((b, t), jnp.int32), None, {}, 2)
