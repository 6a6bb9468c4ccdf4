"""What a function of the Gumbel noise G keeps about the token x it produced.

For one teacher distribution p (log-probs ℓ) the pair (x, G) has x ~ p and G drawn from the exact
posterior given x (``gumbel.posterior_from_draws``), which is the same joint law as G ~ prior and
x = argmax(ℓ + G). A "channel" is a function c(G) handed to a student; each is scored by the
accuracy of a named decoder that recovers x from c(G) (knowing p where stated) and, for
c(G) = argmax G, the mutual information I(x; c(G)) in nats (x is a function of G: I(x; G) = H(p)).

Closed forms use the exponential-race view of the Gumbel-max trick: with E_v = exp(−G_v) i.i.d.
Exp(1), argmax G = argmin E_v and argmax(ℓ + G) = argmin E_v / p_v.
"""

from __future__ import annotations

import numpy as np

from discreteflow_jax.gumbel import posterior_from_draws

# ---------------------------------------------------------------------------------------------
# Teacher distributions


def entropy(logp: np.ndarray) -> float:
    p = np.exp(logp)
    return float(-(p * logp).sum())


def normalize(logits: np.ndarray) -> np.ndarray:
    """log-softmax in float64."""
    z = logits - logits.max()
    return z - np.log(np.exp(z).sum())


def scaled_to_entropy(shape: np.ndarray, target: float) -> np.ndarray:
    """log-softmax(β·shape) with β > 0 found by bisection so that the entropy is ``target`` nats
    (the entropy falls monotonically from log V at β = 0)."""
    lo, hi = 0.0, 1.0
    while entropy(normalize(hi * shape)) > target:
        hi *= 2.0
    for _ in range(80):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if entropy(normalize(mid * shape)) > target else (lo, mid)
    return normalize(0.5 * (lo + hi) * shape)


def zipf_logp(vocab: int, target_entropy: float) -> np.ndarray:
    """Zipf-like teacher row: logits −β·log(rank), β set to reach ``target_entropy`` nats."""
    return scaled_to_entropy(-np.log(np.arange(1, vocab + 1, dtype=np.float64)), target_entropy)


def head_tail_logp(vocab: int, head: int, head_mass: float) -> np.ndarray:
    """A row with ``head`` near-equal likely tokens holding ``head_mass`` and a Zipf tail (the
    shape of a teacher unsure between a few continuations)."""
    tail = 1.0 / np.arange(1, vocab - head + 1, dtype=np.float64)
    p = np.concatenate([np.full(head, head_mass / head), (1.0 - head_mass) * tail / tail.sum()])
    return np.log(p)


# ---------------------------------------------------------------------------------------------
# Draws


def posterior_noise(logp: np.ndarray, x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """G [n, V] float32 from the package's exact posterior given argmax(ℓ + G) = x [n]."""
    import jax.numpy as jnp

    n, v = x.shape[0], logp.shape[0]
    xi = rng.gumbel(size=(n, v)).astype(np.float32)
    m = rng.gumbel(size=n).astype(np.float32)
    lp = jnp.broadcast_to(jnp.asarray(logp, jnp.float32), (n, v))
    return np.asarray(posterior_from_draws(lp, jnp.asarray(x, jnp.int32), jnp.asarray(xi), jnp.asarray(m)))


def posterior_draws(logp: np.ndarray, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(x [n] ~ p, G [n, V] from the exact posterior given x)."""
    p = np.exp(logp)
    x = rng.choice(logp.shape[0], size=n, p=p / p.sum()).astype(np.int32)
    return x, posterior_noise(logp, x, rng)


def rejection_draws(logp: np.ndarray, token: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """G ~ prior conditioned on argmax(ℓ + G) = token by rejection (tiny V only): [n, V]."""
    out, have = [], 0
    while have < n:
        g = rng.gumbel(size=(max(4 * n, 1024), logp.shape[0]))
        keep = g[np.argmax(logp + g, axis=1) == token]
        out.append(keep)
        have += len(keep)
    return np.concatenate(out)[:n]


# ---------------------------------------------------------------------------------------------
# Channel (a): argmax G, in closed form


def argmax_tables(p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(S, F) at every token: S(p_v) = Σ_j max(p_j, p_v) and F(p_v) = ∫_0^{p_v} du / S(u)².

    Joint law of a = argmax G and x = argmax(ℓ + G): P(x = a = k) = p_k / S(p_k) and, for i ≠ k,
    P(x = i, a = k) = p_i·(F(p_i) − F(p_k)) when p_i > p_k, else 0 (condition the race on the
    values of E_i and E_k and integrate the other V − 2 exponentials out; S is piecewise linear).
    """
    order = np.argsort(p, kind="stable")
    a = p[order]  # ascending
    v = a.shape[0]
    suffix = np.concatenate([np.cumsum(a[::-1])[::-1], [0.0]])  # suffix[m] = Σ_{j ≥ m} a_j
    ranks = np.arange(v)
    s_sorted = ranks * a + suffix[ranks]  # tokens below a_m count a_m, the others themselves
    # ∫ over (a_m, a_{m+1}) where S(u) = m·u + suffix[m] (m = 1..V−1 tokens below u).
    m = np.arange(1, v, dtype=np.float64)
    inc = (1.0 / (m * a[:-1] + suffix[1:v]) - 1.0 / (m * a[1:] + suffix[1:v])) / m
    f_sorted = a[0] + np.concatenate([[0.0], np.cumsum(inc)])  # S ≡ 1 on (0, a_0)
    s, f = np.empty(v), np.empty(v)
    s[order], f[order] = s_sorted, f_sorted
    return s, f


def argmax_channel(logp: np.ndarray, mi_columns: int = 512, rng: np.random.Generator | None = None) -> dict:
    """Closed-form scores of c(G) = argmax G: P(x = argmax G), the Bayes decoder's accuracy
    (given a = k guess k or the mode of p, whichever has the larger joint probability: p_i·F(p_i)
    grows with p_i, so the mode is the best i ≠ k) and I(x; a) (exact for V ≤ ``mi_columns``,
    else averaged over that many uniformly drawn values of a, which is uniform)."""
    p = np.exp(logp)
    v = p.shape[0]
    s, f = argmax_tables(p)
    diag = p / s
    top = int(np.argmax(p))
    off = np.where(np.arange(v) == top, 0.0, p[top] * (f[top] - f))
    rng = rng or np.random.default_rng(0)
    cols = np.arange(v) if v <= mi_columns else rng.integers(0, v, mi_columns)
    h_cond = []
    for k in cols:  # H(x | a = k); P(a = k) = 1/V
        col = v * np.where(p > p[k], p * (f - f[k]), 0.0)
        col[k] = v * diag[k]
        col = col[col > 0]
        h_cond.append(float(-(col * np.log(col)).sum()))
    return {
        "p_x_is_argmax": float(diag.sum()),
        "bayes_acc": float(np.maximum(diag, off).sum()),
        "mi": entropy(logp) - float(np.mean(h_cond)),
        "mi_exact": bool(v <= mi_columns),
    }


# ---------------------------------------------------------------------------------------------
# Channel (d): the Gumbel-max decoder argmax(log q + G) with an estimate q of p


def coupling_accuracy(logp: np.ndarray, logq: np.ndarray) -> float:
    """P(argmax(log q + G) = argmax(log p + G)) for shared prior G, in closed form:
    Σ_i 1 / Σ_j max(p_j/p_i, q_j/q_i). Sorting by r = p/q splits the inner sum into a suffix sum
    of p (r_j ≥ r_i) and a prefix sum of q, so it costs O(V log V)."""
    p, q = np.exp(logp), np.exp(logq)
    order = np.argsort(logp - logq, kind="stable")
    ps, qs = p[order], q[order]
    p_suffix = np.cumsum(ps[::-1])[::-1]
    q_prefix = np.concatenate([[0.0], np.cumsum(qs)[:-1]])
    return float(np.sum(1.0 / (p_suffix / ps + q_prefix / qs)))


def kl(logp: np.ndarray, logq: np.ndarray) -> float:
    """KL(p ‖ q) in nats."""
    return float(np.sum(np.exp(logp) * (logp - logq)))


def noisy_logq(logp: np.ndarray, target_kl: float, rng: np.random.Generator) -> np.ndarray:
    """log q = log-softmax(ℓ + σ·z), z ~ N(0, 1) fixed, σ bisected to KL(p ‖ q) = target_kl."""
    z = rng.standard_normal(logp.shape)
    lo, hi = 0.0, 1.0
    while kl(logp, normalize(logp + hi * z)) < target_kl:
        hi *= 2.0
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if kl(logp, normalize(logp + mid * z)) < target_kl else (lo, mid)
    return normalize(logp + 0.5 * (lo + hi) * z)


# ---------------------------------------------------------------------------------------------
# Channels (b), (c), (e): decoders fitted or applied on draws


def unit_embeddings(vocab: int, dim: int, rng: np.random.Generator) -> np.ndarray:
    e = rng.standard_normal((vocab, dim)).astype(np.float32)
    return e / np.linalg.norm(e, axis=1, keepdims=True)


def softmax_rows(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    w = np.exp(z)
    return w / w.sum(axis=1, keepdims=True)


def fitted_score_decoder(
    logp: np.ndarray, scores: np.ndarray, x: np.ndarray, lambdas: np.ndarray, train: int
) -> dict:
    """The decoder argmax_v(ℓ_v + λ·score_v) with λ ≥ 0 picked on the first ``train`` draws (best
    accuracy; λ = 0 is the mode of p), scored on the rest."""
    lp = logp.astype(np.float32)
    hits = np.array([np.argmax(lp + np.float32(lam) * scores, axis=1) == x for lam in lambdas])
    best = int(np.argmax(hits[:, :train].mean(axis=1)))
    return {"acc": float(hits[best, train:].mean()), "lambda": float(lambdas[best])}


def topk_scores(logp: np.ndarray, g: np.ndarray, x: np.ndarray, k: int) -> dict:
    """c(G) = the k largest coordinates of G. Decoders: with their values, argmax over the set of
    ℓ + G (right exactly when x is in the set, so its accuracy is P(x ∈ top-k)); with the index
    set only, the most likely token of the set under p."""
    idx = np.argpartition(-g, k - 1, axis=1)[:, :k] if k < g.shape[1] else np.tile(np.arange(g.shape[1]), (len(g), 1))
    in_set = (idx == x[:, None]).any(axis=1)
    by_p = np.take_along_axis(idx, np.argmax(logp[idx], axis=1)[:, None], axis=1)[:, 0]
    return {"p_x_in_set": float(in_set.mean()), "set_by_p_acc": float((by_p == x).mean())}


def x_rank_stats(g: np.ndarray, x: np.ndarray, tau: float = 1.0) -> dict:
    """Where x sits in G: its rank (1 = argmax G) and its softmax(G/τ) weight, medians."""
    gx = np.take_along_axis(g, x[:, None], axis=1)
    rank = 1 + (g > gx).sum(axis=1)
    w = np.take_along_axis(softmax_rows(g / tau), x[:, None], axis=1)[:, 0]
    return {"median_rank": float(np.median(rank)), "median_weight": float(np.median(w))}


# ---------------------------------------------------------------------------------------------
# Which logits to train when the sample is argmax(logits + G)


def fit_logits(logp: np.ndarray, g: np.ndarray, x: np.ndarray, add_noise: bool, temperature: float = 1.0,
               steps: int = 3000, lr: float = 0.5) -> np.ndarray:
    """Minimizes the mean of CE(softmax((h + G)/T), x) over the draws (``add_noise``) or of
    CE(softmax(h), x) (G not in the loss) by full-batch gradient descent; returns log-softmax(h)."""
    h = np.zeros_like(logp)
    onehot = np.eye(logp.shape[0])[x]
    for _ in range(steps):
        z = (h[None] + g) / temperature if add_noise else np.broadcast_to(h, g.shape)
        grad = (softmax_rows(z) - onehot).mean(axis=0) / (temperature if add_noise else 1.0)
        h -= lr * grad
    return normalize(h)


# ---------------------------------------------------------------------------------------------
# Sampling with the noise on the logits: Jacobi iteration towards the teacher's decode


def bigram_teacher(vocab: int, target_entropy: float, rng: np.random.Generator) -> np.ndarray:
    """log p(next | previous) [V + 1, V] (row V: after BOS): each row the Zipf row of the given
    entropy with its own random token order."""
    row = zipf_logp(vocab, target_entropy)
    return np.stack([row[rng.permutation(vocab)] for _ in range(vocab + 1)])


def jacobi_agreement(table: np.ndarray, g: np.ndarray, max_iters: int) -> tuple[np.ndarray, np.ndarray]:
    """Tokens argmax(h + G) of a student whose logits are exact on a clean prefix, iterated.

    ``g`` [n, T, V] prior noise. Iteration 1 knows no prefix and uses the teacher's marginal
    (the mean row); iteration k + 1 uses the teacher's row after the tokens of iteration k. The
    teacher's own decode of ``g`` is its unique fixed point. Returns (share of positions equal
    to that decode after iterations 1..max_iters [max_iters], iterations until the whole
    sequence equals it [n], max_iters + 1 where it never does)."""
    n, t, _ = g.shape
    bos = table.shape[0] - 1
    ref = np.empty((n, t), np.int64)
    prev = np.full(n, bos)
    for i in range(t):  # the teacher's autoregressive Gumbel-max decode
        ref[:, i] = prev = np.argmax(table[prev] + g[:, i], axis=1)
    marginal = np.log(np.exp(table).mean(axis=0))
    x = np.argmax(marginal + g, axis=2)
    agree, done = [], np.full(n, max_iters + 1)
    for k in range(1, max_iters + 1):
        if k > 1:
            prefix = np.concatenate([np.full((n, 1), bos), x[:, :-1]], axis=1)
            x = np.argmax(table[prefix] + g, axis=2)
        same = x == ref
        agree.append(same.mean())
        done = np.where(same.all(axis=1) & (done > max_iters), k, done)
    return np.array(agree), done
