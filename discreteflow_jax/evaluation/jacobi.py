r"""The teacher as a K-call parallel sampler: Jacobi iteration of its Gumbel-max decode with the noise
held fixed, the reference a K-step logit-channel student has to beat.

An autoregressive teacher's sample for noise G is the fixed point of x_i = argmax(ℓ_i(x_<i) + G_i).
Jacobi iteration evaluates all positions at once from the previous iterate,
x⁽ʲ⁾_i = argmax(ℓ_i(x⁽ʲ⁻¹⁾_<i) + G_i), starting from x⁽⁰⁾_i = argmax(G_i) (no call); after j calls the
first j positions are exact, and T calls give the teacher's own sample. A student that needs K calls
should write better than K Jacobi calls of its teacher: otherwise it has not learnt to anticipate
the fixed point. The noise is the one the Gumbel students' sampler draws for the same seed and
batch (``gumbel_sampling.logit_noise``), so the rows pair with a sweep's student rows.

    python -m discreteflow_jax.evaluation.jacobi --teacher=runs/teacher --scorer=runs/teacher \
        --steps=1,2,4,8,32 --num_samples=64 --seed=0 --out=runs/jacobi.json
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from discreteflow_jax import cli
from discreteflow_jax import gumbel as gmb
from discreteflow_jax.evaluation.genppl import Scorer
from discreteflow_jax.evaluation.metrics import sample_statistics, truncate_at_eos
from discreteflow_jax.evaluation.quality import mauve_score, shuffle_positions
from discreteflow_jax.inference.batches import batch_seed
from discreteflow_jax.inference.load import load
from discreteflow_jax.inference.teacher_model import is_autoregressive
from discreteflow_jax.models.generate import teacher_fns, teacher_inputs

log = logging.getLogger("discreteflow_jax")


def jacobi_decode(teacher: Any, g_BTV: jax.Array, bos_id: int, iterations: int) -> jax.Array:
    """x⁽ᴷ⁾ [B, T] after K = ``iterations`` parallel teacher calls from x⁽⁰⁾ = argmax(G)."""
    fns = teacher_fns(teacher)
    x = jnp.argmax(g_BTV, axis=-1).astype(jnp.int32)

    def call(_, x):
        logp = gmb.log_probs(fns.head(fns.hidden(teacher_inputs(x, bos_id))))
        return jnp.argmax(logp + g_BTV, axis=-1).astype(jnp.int32)

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
        g_key = jax.random.split(jax.random.key(batch_seed(seed, i)))[0]  # the split gumbel_source makes
        out.append(np.asarray(run(gmb.sample_prior(g_key, count, seq_len, vocab))))
    return np.concatenate(out, axis=0)


FLAGS = cli.new_flags(__doc__)
flags.DEFINE_string("teacher", None, "teacher workdir or export", flag_values=FLAGS)
flags.DEFINE_string("scorer", None, "scoring model (as in evaluate sweep)", flag_values=FLAGS)
flags.DEFINE_list("steps", ["1", "2", "4", "8", "32"], "teacher calls K", flag_values=FLAGS)
flags.DEFINE_integer("num_samples", 64, "samples per K", flag_values=FLAGS)
flags.DEFINE_integer("seed", 0, "sampling seed (the sweep's)", flag_values=FLAGS)
flags.DEFINE_integer("seq_len", 0, "positions sampled (0: the teacher's training context)", flag_values=FLAGS)
flags.DEFINE_integer("length", 0, "tokens scored per sample (0: seq_len − 1, the sweep's length)", flag_values=FLAGS)
flags.DEFINE_string("data_dir", None, "offline data folder", flag_values=FLAGS)
flags.DEFINE_string("out", None, "JSON file of the rows", flag_values=FLAGS)
flags.mark_flags_as_required(["teacher", "scorer", "out"], flag_values=FLAGS)


def main(argv: list[str]) -> int:
    del argv
    cli.setup_logging()
    from discreteflow_jax.evaluation.sweep import SweepSettings, _dataset_for, validation_windows

    try:
        teacher = load(FLAGS.teacher, FLAGS.data_dir)
        if not is_autoregressive(teacher):
            raise ValueError(f"--teacher={FLAGS.teacher} is a flow model; give an autoregressive teacher")
        steps = [int(k) for k in FLAGS.steps]
        if min(steps) < 1:
            raise ValueError(f"--steps must be positive integers, got {FLAGS.steps}")
        scorer = Scorer.load(FLAGS.scorer, FLAGS.data_dir)
    except ValueError as err:
        return cli.fail(err)
    seq_len = FLAGS.seq_len or teacher.seq_len
    length = FLAGS.length or seq_len - 1
    settings = SweepSettings(num_samples=FLAGS.num_samples, seed=FLAGS.seed)
    tok = teacher.tokenizer
    held_out = validation_windows(_dataset_for(teacher, FLAGS.data_dir), settings, length, held_out=True)
    text_features = scorer.features(scorer.prepare(held_out, tok))
    rows = []
    for k in steps:
        tokens = jacobi_samples(teacher, FLAGS.num_samples, k, FLAGS.seed, seq_len=seq_len)[:, :length]
        cut = [truncate_at_eos(r, tok.eos_id) for r in tokens]
        row = {"model": "teacher_jacobi", "K": k, **scorer.score(tokens, tok), **sample_statistics(cut)}
        row["shuffled_gen_ppl"] = scorer.score(shuffle_positions(tokens, FLAGS.seed), tok)["gen_ppl"]
        feats = scorer.features(scorer.prepare(tokens, tok))
        row["mauve"] = round(mauve_score(feats, text_features, seed=FLAGS.seed + 25), 4)
        row["first_sample"] = tok.decode(cut[0])
        log.info("teacher Jacobi K=%d: Gen-PPL %.1f entropy %.3f shuffled %.1f MAUVE %.3f", k, row["gen_ppl"],
                 row["entropy"], row["shuffled_gen_ppl"], row["mauve"])
        rows.append(row)
    os.makedirs(os.path.dirname(os.path.abspath(FLAGS.out)), exist_ok=True)
    with open(FLAGS.out, "w") as f:
        json.dump({"teacher": FLAGS.teacher, "scorer": scorer.name, "length": length, "rows": rows}, f, indent=1,
                  default=float)
    print(json.dumps([{k: r[k] for k in ("K", "gen_ppl", "entropy", "shuffled_gen_ppl", "mauve")} for r in rows]))
    return 0


if __name__ == "__main__":
    cli.run(main, FLAGS)
