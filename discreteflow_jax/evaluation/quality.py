"""Sample-quality numbers that a sampling temperature cannot buy: MAUVE against held-out text, and
the Gen-PPL at the temperature that brings the samples' entropy to real text's (docs/sampling.md).

A third number tells whether a sampler couples positions at all: the Gen-PPL of the same samples
with each position's tokens shuffled across samples (``shuffle_positions``).

Gen-PPL alone rewards low-entropy samples: lowering the temperature lowers it without the samples
getting any better. Two numbers answer that:

* **MAUVE** compares the distribution of samples with that of real text in a feature space: here
  the scorer's final-normed hidden state after *every* token of every text (a few thousand vectors
  per side instead of one per text: with 64 texts, one last-token vector each, word salad and real
  text were not told apart, docs/sampling.md). Values are comparable within one table (same
  scorer, same number of texts), not with published numbers (one GPT-2-large vector per text).
* **Matched-entropy Gen-PPL**: the sampling temperature is searched (secant steps on log τ) until the
  samples' mean unigram entropy brackets real text's, and log Gen-PPL is interpolated linearly in
  entropy between the two bracketing temperatures. A model that only reaches a low Gen-PPL by
  collapsing its entropy gets no credit for it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

ENTROPY_TOLERANCE = 0.02  # nats: a temperature whose entropy is this close to the target is used as is
TEMPERATURE_RANGE = (0.2, 5.0)


def mauve_score(sample_features: np.ndarray, text_features: np.ndarray, *, seed: int = 25) -> float:
    """MAUVE (``mauve-text``) between two sets of feature vectors [N, D]."""
    try:
        import mauve
    except ImportError as e:  # an optional dependency of the sweep's MAUVE column
        raise ImportError("MAUVE needs the mauve-text package: pip install 'mauve-text>=0.4,<0.5' "
                          "(or run the sweep with --mauve=false)") from e
    p = np.asarray(sample_features, np.float32)
    q = np.asarray(text_features, np.float32)
    if len(p) < 2 or len(q) < 2:
        raise ValueError(f"MAUVE needs at least 2 texts on each side, got {len(p)} samples and {len(q)} texts")
    # One cluster per ~10 vectors (the package's own 'auto' rule), at least 2.
    buckets = max(2, min(len(p), len(q)) // 10)
    out = mauve.compute_mauve(p_features=p, q_features=q, num_buckets=buckets, seed=seed, verbose=False)
    return float(out.mauve)


def shuffle_positions(tokens: np.ndarray, seed: int = 0) -> np.ndarray:
    """[N, L] samples with each position's tokens permuted across the N samples (one permutation
    per position): the same per-position marginals, every dependence between positions destroyed.
    A sampler whose Gen-PPL is no better than its shuffled samples' draws positions independently."""
    rng = np.random.default_rng(seed)
    out = np.array(tokens, copy=True)
    for j in range(out.shape[1]):
        out[:, j] = out[rng.permutation(out.shape[0]), j]
    return out


def interpolate_at_entropy(points: Sequence[tuple[float, float, float]], target: float) -> dict[str, Any]:
    """Gen-PPL at entropy ``target`` from (temperature, entropy, gen_ppl) points: log Gen-PPL linear
    in entropy between the closest points on either side; NaN when no two points bracket the target
    (the row then says how close the nearest one came)."""
    pts = sorted(points, key=lambda p: p[1])
    nearest = min(pts, key=lambda p: abs(p[1] - target))
    base = {"matched_target_entropy": round(target, 4), "matched_points": [list(map(float, p)) for p in pts]}
    if abs(nearest[1] - target) <= ENTROPY_TOLERANCE:
        return base | {"matched_gen_ppl": float(nearest[2]), "matched_temperature": float(nearest[0])}
    below = [p for p in pts if p[1] < target]
    above = [p for p in pts if p[1] > target]
    if not below or not above:
        return base | {"matched_gen_ppl": math.nan, "matched_temperature": math.nan}
    (t0, h0, g0), (t1, h1, g1) = below[-1], above[0]
    w = (target - h0) / (h1 - h0)
    return base | {
        "matched_gen_ppl": float(math.exp((1 - w) * math.log(g0) + w * math.log(g1))),
        "matched_temperature": float(math.exp((1 - w) * math.log(t0) + w * math.log(t1))),
    }


def search_temperature(evaluate: Callable[[float], tuple[float, float]], target: float, *,
                       first: tuple[float, float, float] | None = None, max_evals: int = 4) -> dict[str, Any]:
    """Finds temperatures whose sample entropy brackets ``target`` and interpolates Gen-PPL there.

    ``evaluate(τ) -> (entropy, gen_ppl)`` samples at temperature τ; ``first`` is an already
    evaluated (τ, entropy, gen_ppl) point (the plain cell at τ = 1). At most ``max_evals`` more
    evaluations: entropy rises with τ, so each new τ is a secant step on log τ (or a fixed factor
    while only one side is known)."""
    points: list[tuple[float, float, float]] = [first] if first is not None else []
    low, high = TEMPERATURE_RANGE
    for _ in range(max_evals + (0 if first is not None else 1)):
        if points:
            nearest = min(points, key=lambda p: abs(p[1] - target))
            if abs(nearest[1] - target) <= ENTROPY_TOLERANCE:
                break
            below = [p for p in points if p[1] < target]
            above = [p for p in points if p[1] > target]
            if below and above:
                a = max(below, key=lambda p: p[1])
                b = min(above, key=lambda p: p[1])
                la, lb = math.log(a[0]), math.log(b[0])
                tau = math.exp(la + (target - a[1]) * (lb - la) / (b[1] - a[1]))
            else:
                side = max(points, key=lambda p: p[1]) if below else min(points, key=lambda p: p[1])
                tau = side[0] * (1.35 if below else 1 / 1.35)
            tau = min(max(tau, low), high)
            if any(abs(tau - p[0]) < 1e-3 for p in points):
                break  # the search cannot move (a bound reached): report what it has
        else:
            tau = 1.0
        entropy, ppl = evaluate(tau)
        points.append((tau, float(entropy), float(ppl)))
    return interpolate_at_entropy(points, target)
