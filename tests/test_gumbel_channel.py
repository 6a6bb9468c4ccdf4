"""The Gumbel channel analysis: its draws come from the package's exact posterior (checked against
rejection sampling), its closed forms match brute-force counts, and its decoders behave as stated."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest

from discreteflow_jax.evaluation import gumbel_channel as gc

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))


def ks(a: np.ndarray, b: np.ndarray) -> float:
    grid = np.sort(np.concatenate([a, b]))
    return float(np.abs(np.searchsorted(np.sort(a), grid, "right") / len(a)
                        - np.searchsorted(np.sort(b), grid, "right") / len(b)).max())


def joint_table(p: np.ndarray) -> np.ndarray:
    """P(x = i, a = k) from the closed form, one pair at a time."""
    s, f = gc.argmax_tables(p)
    v = len(p)
    return np.array([[p[k] / s[k] if i == k else (p[i] * (f[i] - f[k]) if p[i] > p[k] else 0.0)
                      for k in range(v)] for i in range(v)])


def test_posterior_matches_rejection_sampling():
    rng = np.random.default_rng(0)
    logp = gc.zipf_logp(4, 0.9)
    n = 20000
    for token in range(4):
        ref = gc.rejection_draws(logp, token, n, rng)
        g = gc.posterior_noise(logp, np.full(n, token), rng)
        assert (np.argmax(logp + g, axis=1) == token).all()
        assert max(ks(ref[:, v], g[:, v]) for v in range(4)) < 0.025
    # The same statistic separates the prior from the posterior of an unlikely token (the check has power).
    prior = rng.gumbel(size=(n, 4))
    assert ks(gc.rejection_draws(logp, 3, n, rng)[:, 3], prior[:, 3]) > 0.2


def test_argmax_joint_law_has_the_right_margins_and_matches_counts():
    rng = np.random.default_rng(1)
    logp = gc.normalize(rng.standard_normal(6) * 1.5)
    p = np.exp(logp)
    table = joint_table(p)
    np.testing.assert_allclose(table.sum(axis=1), p, atol=1e-12)  # x ~ p
    np.testing.assert_allclose(table.sum(axis=0), 1 / 6, atol=1e-12)  # argmax of i.i.d. G is uniform
    g = rng.gumbel(size=(400000, 6))
    counts = np.zeros((6, 6))
    np.add.at(counts, (np.argmax(logp + g, axis=1), np.argmax(g, axis=1)), 1)
    assert np.abs(counts / len(g) - table).max() < 3e-3


def test_argmax_accuracy_closed_form_against_posterior_draws():
    rng = np.random.default_rng(2)
    logp = gc.zipf_logp(50, 2.5)
    p = np.exp(logp)
    res = gc.argmax_channel(logp)
    # P(x = argmax G) = Σ_k p_k / Σ_j max(p_j, p_k), written without the sorted tables.
    direct = float(sum(pk / np.maximum(p, pk).sum() for pk in p))
    assert res["p_x_is_argmax"] == pytest.approx(direct, rel=1e-10)
    x, g = gc.posterior_draws(logp, 40000, rng)
    mc = float((np.argmax(g, axis=1) == x).mean())
    assert abs(mc - direct) < 4 * np.sqrt(direct * (1 - direct) / len(x))
    # It is not E[p_x] = Σ p²: that guess is far off (and gives 1/V instead of 1 for a uniform p).
    assert abs(direct - float((p**2).sum())) > 0.1
    assert gc.argmax_channel(np.full(7, -np.log(7)))["p_x_is_argmax"] == pytest.approx(1.0)


def test_argmax_bayes_decoder_and_mutual_information():
    rng = np.random.default_rng(3)
    logp = gc.normalize(rng.standard_normal(8) * 2.0)
    table = joint_table(np.exp(logp))
    res = gc.argmax_channel(logp)
    assert res["bayes_acc"] == pytest.approx(table.max(axis=0).sum(), rel=1e-10)
    marg = np.outer(table.sum(axis=1), table.sum(axis=0))
    nz = table > 0
    assert res["mi_exact"] and res["mi"] == pytest.approx(float((table[nz] * np.log(table[nz] / marg[nz])).sum()))
    sampled = gc.argmax_channel(logp, mi_columns=4, rng=rng)
    assert not sampled["mi_exact"] and abs(sampled["mi"] - res["mi"]) < 0.5 * gc.entropy(logp)


def test_gumbel_max_decoder_with_exact_logp_recovers_x():
    rng = np.random.default_rng(4)
    logp = gc.zipf_logp(1000, 4.0)
    x, g = gc.posterior_draws(logp, 256, rng)
    assert (np.argmax(logp.astype(np.float32) + g, axis=1) == x).all()
    assert gc.coupling_accuracy(logp, logp) == pytest.approx(1.0)


def test_coupling_accuracy_closed_form():
    rng = np.random.default_rng(5)
    logp, logq = gc.normalize(rng.standard_normal(7)), gc.normalize(rng.standard_normal(7))
    p, q = np.exp(logp), np.exp(logq)
    direct = sum(1 / np.maximum(p / p[i], q / q[i]).sum() for i in range(7))
    assert gc.coupling_accuracy(logp, logq) == pytest.approx(direct, rel=1e-10)
    g = rng.gumbel(size=(200000, 7))
    mc = float((np.argmax(logp + g, 1) == np.argmax(logq + g, 1)).mean())
    assert abs(mc - direct) < 4 * np.sqrt(direct * (1 - direct) / len(g))


def test_noisy_logq_hits_its_kl_and_loses_agreement():
    rng = np.random.default_rng(6)
    logp = gc.zipf_logp(500, 3.0)
    accs = []
    for target in (0.1, 0.5, 1.0):
        logq = gc.noisy_logq(logp, target, rng)
        assert gc.kl(logp, logq) == pytest.approx(target, rel=1e-6)
        accs.append(gc.coupling_accuracy(logp, logq))
    assert accs[0] > accs[1] > accs[2]


def test_topk_and_fitted_decoders_limits():
    rng = np.random.default_rng(7)
    logp = gc.zipf_logp(40, 2.0)
    x, g = gc.posterior_draws(logp, 2000, rng)
    top1 = gc.topk_scores(logp, g, x, 1)
    assert top1["p_x_in_set"] == top1["set_by_p_acc"] == float((np.argmax(g, 1) == x).mean())
    assert gc.topk_scores(logp, g, x, 40)["p_x_in_set"] == 1.0
    # λ = 0 alone is the mode of p: its accuracy is max p (up to sampling noise) and no information.
    fit = gc.fitted_score_decoder(logp, g, x, np.array([0.0]), 1000)
    assert abs(fit["acc"] - np.exp(logp).max()) < 0.05
    # score = G itself with λ = 1 is the Gumbel-max decoder: exact.
    assert gc.fitted_score_decoder(logp, g, x, np.array([0.0, 1.0]), 1000)["acc"] == 1.0


def test_training_loss_with_noise_inside():
    rng = np.random.default_rng(8)
    logp = gc.zipf_logp(16, 1.5)
    x, g = gc.posterior_draws(logp, 2000, rng)
    g = g.astype(np.float64)
    counts = np.bincount(x, minlength=16) / len(x)
    proper = gc.fit_logits(logp, g, x, add_noise=False, steps=2000)
    np.testing.assert_allclose(np.exp(proper), counts, atol=2e-3)  # CE(h) fits the label counts
    # CE(softmax(h + G), x) at T = 1 sharpens q well past the sampling noise of the counts...
    inside = gc.fit_logits(logp, g, x, add_noise=True, steps=2000)
    assert gc.kl(logp, inside) > 10 * gc.kl(logp, proper) + 0.02
    # ...while at a small T the same draws pin ℓ down more tightly than the labels alone do.
    cold = gc.fit_logits(logp, g, x, add_noise=True, temperature=0.1, steps=2000, lr=0.05)
    assert gc.kl(logp, cold) < 0.5 * gc.kl(logp, proper)


def test_benchmark_row_and_render():
    import gumbel_channel as bench

    rng = np.random.default_rng(9)
    row = bench.analyse_row("tiny", gc.zipf_logp(80, 2.0), 64, rng)
    assert row["gumbel_max"][0]["acc"] == pytest.approx(1.0) and row["gumbel_max"][0]["acc_draws"] == 1.0
    report = {"draws": 64, "seconds": 1.0, "rows": [row], "loss_check": [],
              "posterior_check": {"max_ks": 0.01, "ks_5pct_level": 0.0186}}
    text = bench.render(report)
    assert "| tiny |" in text and "top-64" in text


def test_jacobi_iteration_reaches_the_teachers_decode_within_t_plus_one_steps():
    rng = np.random.default_rng(10)
    table = gc.bigram_teacher(30, 2.0, rng)
    t = 12
    g = rng.gumbel(size=(200, t, 30))
    agree, done = gc.jacobi_agreement(table, g, t + 3)
    # Iteration k ≥ 2 has positions < k − 1 right, so the decode is reached by iteration T + 1
    # and stays (it is a fixed point).
    assert done.max() <= t + 1 and agree[t] == 1.0 and agree[-1] == 1.0
    assert all(agree[k - 1] >= (k - 1) / t for k in range(2, t + 2))
    assert agree[0] < 0.5  # the marginal alone rarely gives the teacher's token
