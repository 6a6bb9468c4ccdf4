"""How much each way of handing the Gumbel noise G to a student keeps about the token x.

For each teacher row p (Zipf-like rows scaled to a chosen entropy at V = 32000 and V = 1000, and
two head-plus-tail shapes), x ~ p and G is drawn from the package's exact posterior given x.
Channels and their decoders (see ``discreteflow_jax.evaluation.gumbel_channel``):

* ``argmax``: a = argmax G; P(x = a), the Bayes decoder (knows p) and I(x; a), all closed form;
* ``softmax``: softmax(G/τ)·E, random unit-norm E [V, d]; nearest embedding argmax_v e_v·c, and
  the fitted decoder argmax_v(ℓ_v + λ·e_v·c) (knows p and E; λ fitted on half the draws, scored on
  the other half);
* ``linear``: G·E (no softmax), same fitted decoder;
* ``log_softmax``: log softmax(G/τ) in fp32 (d = V, invertible up to a shift); decoder
  argmax(ℓ + τ·log w), losing only what fp32 underflow drops;
* ``topk``: the k largest coordinates of G, with or without their values;
* ``gumbel_max``: argmax(log q + G) for q = p, q at KL(p ‖ q) = 0.1/0.5/1, and q = a marginal over
  contexts (closed form, and on the draws);
* ``loss``: which logits h minimize a training loss when samples are argmax(h + G);
* ``jacobi``: sampling argmax(h + G) repeatedly with a student exact on a clean prefix.

    python benchmarks/gumbel_channel.py [--draws=256] [--out=FILE]
    python benchmarks/gumbel_channel.py --render=FILE.json   # markdown tables
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from discreteflow_jax.evaluation import gumbel_channel as gc  # noqa: E402

TAUS = (0.1, 0.3, 1.0, 3.0)
DIMS = (32, 256)
KS = (1, 4, 16, 64)
KLS = (0.1, 0.5, 1.0)
JACOBI_KS = (1, 2, 4, 8, 16)
LAMBDAS = np.concatenate([[0.0], np.geomspace(0.3, 3e3, 9)])


def rows() -> list[tuple[str, np.ndarray]]:
    out = [(f"zipf V=32000 H={h}", gc.zipf_logp(32000, h)) for h in (2.0, 4.0, 6.3)]
    out += [(f"zipf V=1000 H={h}", gc.zipf_logp(1000, h)) for h in (2.0, 4.0)]
    out += [("3 tokens hold 0.9, V=32000", gc.head_tail_logp(32000, 3, 0.9)),
            ("50 tokens hold 0.5, V=32000", gc.head_tail_logp(32000, 50, 0.5))]
    return out


def marginal_logq(logp: np.ndarray, rng: np.random.Generator, contexts: int = 32) -> np.ndarray:
    """A unigram-like q: the mean of p and ``contexts − 1`` rows of the same shape whose token ids
    are shuffled (contexts that rank the tokens differently)."""
    p = np.exp(logp)
    return np.log((p + sum(p[rng.permutation(p.shape[0])] for _ in range(contexts - 1))) / contexts)


def ks_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sample Kolmogorov–Smirnov statistic."""
    grid = np.sort(np.concatenate([a, b]))
    fa = np.searchsorted(np.sort(a), grid, side="right") / len(a)
    fb = np.searchsorted(np.sort(b), grid, side="right") / len(b)
    return float(np.abs(fa - fb).max())


def posterior_check(rng: np.random.Generator, n: int = 20000) -> dict:
    """The package's posterior against rejection sampling at V = 5, for every token: the largest
    of the 25 per-coordinate two-sample KS distances, and the 5 % level of that maximum
    (Bonferroni: each test at 0.2 %, c = sqrt(−ln(0.001)/2))."""
    logp = gc.zipf_logp(5, 1.0)
    worst = 0.0
    for token in range(5):
        ref = gc.rejection_draws(logp, token, n, rng)
        g = gc.posterior_noise(logp, np.full(n, token), rng)
        worst = max(worst, max(ks_distance(ref[:, v], g[:, v]) for v in range(5)))
    level = float(np.sqrt(-np.log(0.001) / 2) * (2 / n) ** 0.5)
    return {"vocab": 5, "draws": n, "max_ks": worst, "ks_5pct_level": level}


def analyse_row(name: str, logp: np.ndarray, draws: int, rng: np.random.Generator) -> dict:
    vocab = logp.shape[0]
    x, g = gc.posterior_draws(logp, draws, rng)
    half = draws // 2
    out: dict = {"row": name, "vocab": vocab, "entropy": gc.entropy(logp), "max_p": float(np.exp(logp).max())}
    out["x_in_g"] = gc.x_rank_stats(g, x)
    out["argmax"] = gc.argmax_channel(logp, rng=rng)
    out["argmax"]["p_x_is_argmax_draws"] = float((np.argmax(g, axis=1) == x).mean())
    embs = {d: gc.unit_embeddings(vocab, d, rng) for d in DIMS}
    out["softmax"], out["linear"] = [], []
    for tau in TAUS:
        w = gc.softmax_rows(g / tau)
        for d, emb in embs.items():
            scores = (w @ emb) @ emb.T
            fit = gc.fitted_score_decoder(logp, scores, x, LAMBDAS, half)
            out["softmax"].append({"d": d, "tau": tau, "nearest_acc": float((np.argmax(scores, 1) == x)[half:].mean()),
                                   **{f"fitted_{k}": v for k, v in fit.items()}})
    for d, emb in embs.items():
        fit = gc.fitted_score_decoder(logp, (g @ emb) @ emb.T, x, LAMBDAS, half)
        out["linear"].append({"d": d, **{f"fitted_{k}": v for k, v in fit.items()}})
    out["softmax"].sort(key=lambda r: (r["d"], r["tau"]))
    with np.errstate(divide="ignore"):  # weights that underflow to 0 in fp32 become −inf: never chosen
        out["log_softmax"] = [
            {"tau": tau, "acc": float((np.argmax(logp + tau * np.log(gc.softmax_rows(g / tau)), 1) == x).mean())}
            for tau in (0.1, 1.0)
        ]
    out["topk"] = [{"k": k, **gc.topk_scores(logp, g, x, k)} for k in KS]
    qs = [("exact", logp)] + [(f"kl={t}", gc.noisy_logq(logp, t, rng)) for t in KLS]
    qs.append(("marginal", marginal_logq(logp, rng)))
    out["gumbel_max"] = [
        {"q": label, "kl": gc.kl(logp, lq), "acc": gc.coupling_accuracy(logp, lq),
         "acc_draws": float((np.argmax(lq + g, 1) == x).mean())}
        for label, lq in qs
    ]
    return out


def loss_check(rng: np.random.Generator, draws: int = 2000) -> list[dict]:
    """Logits fitted on posterior pairs (G, x) at V = 16 by full-batch descent; the sample they
    give is argmax(h + G). CE(softmax(h), x) ignores G; CE(softmax((h + G)/T), x) puts the same
    posterior draw inside the loss. ``empirical`` is the KL of the label counts (the noise floor
    of any loss that reads only x)."""
    logp = gc.zipf_logp(16, 1.5)
    x, g = gc.posterior_draws(logp, draws, rng)
    g = g.astype(np.float64)
    counts = np.bincount(x, minlength=16) / draws
    out = [{"loss": "empirical", "kl_p_q": gc.kl(logp, np.log(counts)), "coupling_acc": None}]
    for label, add, temp in (("CE(h)", False, 1.0), ("CE(h+G)", True, 1.0), ("CE((h+G)/0.3)", True, 0.3),
                             ("CE((h+G)/0.1)", True, 0.1)):
        h = gc.fit_logits(logp, g, x, add, temp, steps=2000, lr=0.5 * temp)
        out.append({"loss": label, "kl_p_q": gc.kl(logp, h), "coupling_acc": gc.coupling_accuracy(logp, h)})
    return out


def jacobi_check(rng: np.random.Generator, vocab: int = 1000, length: int = 32, seqs: int = 64) -> list[dict]:
    """Sampling with the noise on the logits by a student that is exact on a clean prefix (a
    bigram teacher): share of positions equal to the teacher's decode of the same G after K
    iterations (K = 1: the marginal only), and iterations until the whole sequence is."""
    out = []
    for h in (1.0, 2.0, 4.0):
        table = gc.bigram_teacher(vocab, h, rng)
        agree, done = gc.jacobi_agreement(table, rng.gumbel(size=(seqs, length, vocab)), length + 1)
        out.append({"vocab": vocab, "length": length, "entropy": h,
                    "agree_after": {k: float(agree[k - 1]) for k in JACOBI_KS},
                    "iterations_mean": float(done.mean()), "iterations_max": int(done.max())})
    return out


def render(report: dict) -> str:
    lines = [f"Draws per row: {report['draws']}; {report['seconds']:.0f} s. Posterior vs rejection (V = 5): "
             f"max KS {report['posterior_check']['max_ks']:.4f} "
             f"(5 % level of the max over 25 coordinates: {report['posterior_check']['ks_5pct_level']:.4f}).", ""]
    head = ("| row | H | max p | x rank (median) | w_x τ=1 (median) | P(x=argmax G) | Bayes from argmax G "
            "| I(x; argmax G) |\n|---|---|---|---|---|---|---|---|")
    lines.append(head)
    for r in report["rows"]:
        a = r["argmax"]
        lines.append(f"| {r['row']} | {r['entropy']:.2f} | {r['max_p']:.3f} | {r['x_in_g']['median_rank']:.0f} | "
                     f"{r['x_in_g']['median_weight']:.4f} | {a['p_x_is_argmax']:.3f} "
                     f"({a['p_x_is_argmax_draws']:.3f}) | "
                     f"{a['bayes_acc']:.3f} | {a['mi']:.2f}{'' if a['mi_exact'] else '*'} |")
    lines += ["", "softmax(G/τ)·E, accuracy of: nearest embedding argmax e·c / fitted argmax(ℓ + λ·e·c)", ""]
    cols = [(s["d"], s["tau"]) for s in report["rows"][0]["softmax"]]
    lines.append("| row | " + " | ".join(f"d={d} τ={t}" for d, t in cols) + " | linear G·E d=32 / 256 |")
    lines.append("|---" * (len(cols) + 2) + "|")
    for r in report["rows"]:
        cells = [f"{s['nearest_acc']:.2f} / {s['fitted_acc']:.2f}" for s in r["softmax"]]
        lin = " / ".join(f"{s['fitted_acc']:.2f}" for s in r["linear"])
        lines.append(f"| {r['row']} | " + " | ".join(cells) + f" | {lin} |")
    lines += ["", "top-k of G: P(x in set) = acc with values / acc with the index set only; "
              "log softmax(G/τ) fp32 decoder acc; Gumbel-max argmax(log q + G) acc (closed form; on the draws)", ""]
    q_labels = [q["q"] for q in report["rows"][0]["gumbel_max"]]
    lines.append("| row | " + " | ".join(f"top-{k}" for k in KS) + " | logsm τ=0.1 / 1 | "
                 + " | ".join(f"q {q}" for q in q_labels) + " |")
    lines.append("|---" * (len(KS) + len(q_labels) + 2) + "|")
    for r in report["rows"]:
        tk = [f"{t['p_x_in_set']:.2f} / {t['set_by_p_acc']:.2f}" for t in r["topk"]]
        ls = " / ".join(f"{t['acc']:.2f}" for t in r["log_softmax"])
        gm = [f"{q['acc']:.3f} ({q['acc_draws']:.3f})" + ("" if q["q"] == "exact" else f" KL {q['kl']:.2f}")
              for q in r["gumbel_max"]]
        lines.append(f"| {r['row']} | " + " | ".join(tk) + f" | {ls} | " + " | ".join(gm) + " |")
    lines += ["", "Logits fitted on (G, x) pairs (V = 16, H = 1.5) when the sample is argmax(h + G):", "",
              "| loss | KL(p ‖ softmax h) | P(argmax(h+G) = x) |", "|---|---|---|"]
    for c in report["loss_check"]:
        acc = c["coupling_acc"]
        lines.append(f"| {c['loss']} | {c['kl_p_q']:.4f} | {'–' if acc is None or acc != acc else f'{acc:.4f}'} |")
    if report.get("jacobi"):
        j0 = report["jacobi"][0]
        lines += ["", f"Noise on the logits, student exact on a clean prefix (bigram teacher, V = {j0['vocab']}, "
                  f"T = {j0['length']}): share of positions equal to the teacher's decode of the same G after K "
                  "iterations; iterations to the whole sequence", "",
                  "| H | " + " | ".join(f"K={k}" for k in j0["agree_after"]) + " | iterations mean / max |",
                  "|---" * (len(j0["agree_after"]) + 2) + "|"]
        for j in report["jacobi"]:
            lines.append(f"| {j['entropy']} | " + " | ".join(f"{a:.3f}" for a in j["agree_after"].values())
                         + f" | {j['iterations_mean']:.1f} / {j['iterations_max']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--draws", type=int, default=256, help="posterior draws per teacher row")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="also write the JSON report here")
    ap.add_argument("--render", default=None, help="print the markdown tables of a JSON report and exit")
    args = ap.parse_args()
    if args.render:
        with open(args.render) as f:
            print(render(json.load(f)), end="")
        return
    rng = np.random.default_rng(args.seed)
    start = time.perf_counter()
    report: dict = {"draws": args.draws, "seed": args.seed, "posterior_check": posterior_check(rng)}
    report["rows"] = []
    for name, logp in rows():
        print(f"{name} ...", file=sys.stderr, flush=True)
        report["rows"].append(analyse_row(name, logp, args.draws, rng))
    report["loss_check"] = loss_check(rng)
    report["jacobi"] = jacobi_check(rng)
    report["seconds"] = time.perf_counter() - start
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
