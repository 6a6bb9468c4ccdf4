"""Metrics that a temperature cannot buy (evaluation/quality.py): matched-entropy Gen-PPL and MAUVE,
and the scorer features MAUVE reads (evaluation/genppl.py)."""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from discreteflow_jax.evaluation.quality import (
    interpolate_at_entropy,
    mauve_score,
    search_temperature,
    shuffle_positions,
)


def _model(tau: float) -> tuple[float, float]:
    """A sampler whose entropy grows with log τ and whose log Gen-PPL is linear in entropy."""
    entropy = 3.0 + 0.8 * math.log(tau)
    return entropy, math.exp(4.0 + 1.5 * (entropy - 3.0))


def test_search_finds_the_temperature_of_the_target_entropy() -> None:
    target = 3.61
    calls: list[float] = []

    def evaluate(tau: float) -> tuple[float, float]:
        calls.append(tau)
        return _model(tau)

    first = (1.0, *_model(1.0))
    out = search_temperature(evaluate, target, first=first, max_evals=4)
    want_tau = math.exp((target - 3.0) / 0.8)
    assert out["matched_temperature"] == pytest.approx(want_tau, rel=1e-3)
    assert out["matched_gen_ppl"] == pytest.approx(math.exp(4.0 + 1.5 * (target - 3.0)), rel=1e-3)
    assert 1 <= len(calls) <= 4 and all(t > 1.0 for t in calls)  # entropy too low at τ = 1: it only warms up


def test_search_reports_nan_when_the_target_is_out_of_reach() -> None:
    out = search_temperature(lambda tau: (2.0, 10.0), 3.6, first=(1.0, 2.0, 10.0), max_evals=3)
    assert math.isnan(out["matched_gen_ppl"]) and len(out["matched_points"]) >= 2


def test_interpolation_is_linear_in_log_gen_ppl() -> None:
    out = interpolate_at_entropy([(0.8, 3.0, 100.0), (1.2, 4.0, 10000.0)], 3.5)
    assert out["matched_gen_ppl"] == pytest.approx(1000.0, rel=1e-9)
    assert out["matched_temperature"] == pytest.approx(math.sqrt(0.8 * 1.2), rel=1e-9)
    assert math.isnan(interpolate_at_entropy([(1.0, 3.0, 100.0)], 3.5)["matched_gen_ppl"])


def test_mauve_separates_same_and_different_distributions() -> None:
    pytest.importorskip("mauve")
    rng = np.random.default_rng(0)
    real = rng.standard_normal((64, 16))
    same = rng.standard_normal((64, 16))
    shifted = rng.standard_normal((64, 16)) + 3.0
    assert mauve_score(same, real) > 0.9
    assert mauve_score(shifted, real) < 0.1


def test_scorer_features_are_final_normed_states_after_each_token() -> None:
    from discreteflow_jax.evaluation.genppl import Scorer
    from discreteflow_jax.models.llama import Llama, LlamaConfig

    llama = Llama(LlamaConfig(vocab_size=50, dim=16, num_layers=1, num_heads=2, ffn_hidden=32, max_len=8, bos_id=1),
                  rngs=nnx.Rngs(0))
    scorer = Scorer(llama, tokenizer=None, bos_id=1, batch_size=2)  # features read token ids only
    seqs = [[5, 6, 7], [9], list(range(10, 22))]  # the last is longer than the context: cut to max_len − 1
    every = scorer.features(seqs)
    last = scorer.features(seqs, every_position=False)
    assert every.shape == (3 + 1 + 7, 16) and last.shape == (3, 16)
    start = 0
    for j, ids in enumerate(seqs):
        ids = ids[:7]
        want = np.asarray(llama.final_norm(llama.hidden(jnp.asarray([[1] + ids]))))[0, 1:]
        np.testing.assert_allclose(every[start : start + len(ids)], want, atol=1e-5)
        np.testing.assert_allclose(last[j], want[-1], atol=1e-5)
        start += len(ids)


def test_shuffle_positions_keeps_marginals_and_breaks_pairs() -> None:
    rng = np.random.default_rng(1)
    first = rng.integers(0, 50, 200)
    tokens = np.stack([first, first + 100, rng.integers(0, 50, 200)], axis=1)  # column 1 copies column 0
    out = shuffle_positions(tokens, seed=3)
    for j in range(3):
        assert sorted(out[:, j]) == sorted(tokens[:, j])
    assert (out[:, 1] == out[:, 0] + 100).mean() < 0.1  # the dependence is gone
    assert (tokens[:, 1] == tokens[:, 0] + 100).all()
