r"""The teacher as a K-call parallel sampler: Jacobi iteration of its Gumbel-max decode with the noise
held fixed, the reference a K-step logit-channel student has to beat.

An autoregressive teacher's sample for noise G is the fixed point of x_i = argmax(ℓ_i(x_<i) + G_i).
Jacobi iteration evaluates all positions at once from the previous iterate,
x⁽ʲ⁾_i = argmax(ℓ_i(x⁽ʲ⁻¹⁾_<i) + G_i), starting from x⁽⁰⁾_i = argmax(G_i) (no call); after j calls the
first j positions are exact, and T calls give the teacher's own sample. A student that needs K calls
should write better than K Jacobi calls of its teacher: otherwise it has not learnt to anticipate
the fixed point. The noise is the one the Gumbel students' sampler draws for the same seed and
batch (``gumbel_sampling.logit_noise``), so the rows pair with a sweep's student rows.

    python -m discreteflow_jax.evaluate jacobi --models=teacher=runs/teacher --scorer=runs/teacher \
        --steps=1,2,4,8,32 --num_samples=64 --seed=0 --out=runs/jacobi
"""

from __future__ import annotations

import logging
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from discreteflow_jax import gumbel as gmb
from discreteflow_jax.evaluation.genppl import Scorer
from discreteflow_jax.evaluation.metrics import sample_statistics, truncate_at_eos
from discreteflow_jax.evaluation.quality import mauve_score, shuffle_positions
from discreteflow_jax.evaluation.sweep import SweepSettings, dataset_for, validation_windows
from discreteflow_jax.gumbel_distill import teacher_log_probs
from discreteflow_jax.inference.batches import batch_seed
from discreteflow_jax.inference.teacher_model import is_autoregressive

log = logging.getLogger("discreteflow_jax")


def jacobi_decode(teacher: Any, g_BTV: jax.Array, bos_id: int, iterations: int) -> jax.Array:
    """x⁽ᴷ⁾ [B, T] after K = ``iterations`` parallel teacher calls from x⁽⁰⁾ = argmax(G)."""
    x = jnp.argmax(g_BTV, axis=-1).astype(jnp.int32)

    def call(_, x):
        return jnp.argmax(teacher_log_probs(teacher, x, bos_id) + g_BTV, axis=-1).astype(jnp.int32)

    return jax.lax.fori_loop(0, iterations, call, x)


def jacobi_samples(teacher: Any, num_samples: int, iterations: int, seed: int, *, seq_len: int,
                   batch_size: int = 64) -> np.ndarray:
    """[num_samples, seq_len] Jacobi samples of a loaded teacher (``inference.load``), batch i with
    the G a Gumbel student's sampler draws from ``batch_seed(seed, i)``."""
    module, vocab = teacher.module, teacher.module.config.vocab_size
    run = jax.jit(lambda g: jacobi_decode(module, g, int(teacher.bos_id), iterations))
    out = []
    for i, start in enumerate(range(0, num_samples, batch_size)):
        count = min(batch_size, num_samples - start)
        g_key = gmb.sampling_keys(jax.random.key(batch_seed(seed, i)))[0]
        out.append(np.asarray(run(gmb.sample_prior(g_key, count, seq_len, vocab))))
    return np.concatenate(out, axis=0)


def jacobi_rows(teacher: Any, scorer: Scorer, steps: list[int], *, num_samples: int = 64, seed: int = 0,
                data_dir: str | None = None, length: int = 0) -> list[dict[str, Any]]:
    """One row per K: Gen-PPL, unigram entropy, Gen-PPL with positions shuffled across samples and
    MAUVE against held-out text (the sweep's columns, same seed and held-out windows) of the Jacobi
    samples, ``length`` tokens each (0: context − 1, the sweep's default)."""
    if not is_autoregressive(teacher):
        raise ValueError(f"{teacher.source} is a flow model; Jacobi sampling needs an autoregressive teacher")
    if not steps or min(steps) < 1:
        raise ValueError(f"--steps must be positive integers, got {steps}")
    seq_len = teacher.seq_len
    length = length or seq_len - 1
    settings = SweepSettings(num_samples=num_samples, seed=seed)
    tok = teacher.tokenizer
    held_out = validation_windows(dataset_for(teacher, data_dir), settings, length, held_out=True)
    text_features = scorer.features(scorer.prepare(held_out, tok))
    rows = []
    for k in steps:
        tokens = jacobi_samples(teacher, num_samples, k, seed, seq_len=seq_len)[:, :length]
        cut = [truncate_at_eos(r, tok.eos_id) for r in tokens]
        row = {"model": "teacher, Jacobi", "K": k, **scorer.score(tokens, tok), **sample_statistics(cut)}
        row["shuffled_gen_ppl"] = scorer.score(shuffle_positions(tokens, seed), tok)["gen_ppl"]
        feats = scorer.features(scorer.prepare(tokens, tok))
        row["mauve"] = round(mauve_score(feats, text_features, seed=seed + 25), 4)
        row["first_sample"] = tok.decode(cut[0])
        log.info("teacher Jacobi K=%d: Gen-PPL %.1f entropy %.3f shuffled %.1f MAUVE %.3f", k, row["gen_ppl"],
                 row["entropy"], row["shuffled_gen_ppl"], row["mauve"])
        rows.append(row)
    return rows


def jacobi_table(rows: list[dict[str, Any]]) -> str:
    """The rows as a markdown table."""
    lines = ["| K (teacher calls) | Gen-PPL (entropy) | positions shuffled | MAUVE |", "|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['K']} | {r['gen_ppl']:,.1f} ({r['entropy']:.2f}) | {r['shuffled_gen_ppl']:,.1f} "
                     f"| {r['mauve']:.3f} |")
    return "\n".join(lines)
