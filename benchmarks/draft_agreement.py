"""How often a trained drafting student's first draft, and its output, equal the true token, by t.

Held-out Shakespeare text is paired with its exact posterior G (what training pairs: the teacher's
Gumbel-max decode of that G is the text), noised to x_t at each t, and read once: the first draft
argmax(head + G) after its block and the output argmax(h + G) are compared with the text. If the
output agrees no more often than the draft at small t, the later blocks gain nothing from reading
the drafts (docs/distill_cpu.md). JSON to stdout.

    python benchmarks/draft_agreement.py --model=runs/gumbel_drafts1 --teacher=runs/teacher_cpu \
        --data_dir=DATA_DIR [--batches=8 --batch=16] [--out=FILE]
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import emit_json  # noqa: E402

from discreteflow_jax import flow  # noqa: E402
from discreteflow_jax.config import GumbelConfig  # noqa: E402
from discreteflow_jax.data.shakespeare import ShakespeareData  # noqa: E402
from discreteflow_jax.gumbel_distill import distill_pairs  # noqa: E402
from discreteflow_jax.inference.load import load  # noqa: E402
from discreteflow_jax.io.teacher import load_teacher_checkpoint  # noqa: E402
from discreteflow_jax.models.warmflow import DRAFT_GATE_GAIN, GumbelInput, whole_noise  # noqa: E402

TIMES = (0.0, 0.05, 0.3, 0.6, 0.9)


def agreement(model_dir: str, teacher_dir: str, data_dir: str | None, batches: int, batch: int) -> dict:
    flow_model = load(model_dir, data_dir)
    model = flow_model.model()
    if getattr(model.cfg, "g_drafts", 0) < 1:
        raise SystemExit(f"{model_dir} is not a drafting student (gumbel.drafts = 0): nothing to measure")
    teacher = load_teacher_checkpoint(teacher_dir)
    seq_len = flow_model.config.data.seq_len
    val = ShakespeareData(seq_len, flow_model.tokenizer, data_dir).val_tokens
    starts = np.linspace(0, len(val) - seq_len - 1, batches * batch).astype(int)
    gcfg = GumbelConfig(conditioning="none", logit_channel=True, drafts=model.cfg.g_drafts)
    rows = {}
    for t in TIMES:
        drafts, outputs = [], []
        for b in range(batches):
            tokens = jnp.asarray(np.stack([val[s:s + seq_len] for s in starts[b * batch:(b + 1) * batch]]))
            key = jax.random.key(b)
            tok, _, _, _, g, _ = distill_pairs(model, teacher.model(), tokens, key, gcfg, bos_id=teacher.bos_id,
                                               source="data_posterior")
            x1 = model.embed(tok)
            x0 = model.cfg.sigma * jax.random.normal(jax.random.fold_in(key, 7), x1.shape)
            t_B = jnp.full((batch,), t)
            context = GumbelInput(None, whole_noise(g), seq_len)
            h, at_drafts = model.hidden_and_drafts(flow.noisy_path(x1, x0, t_B), t_B, context)
            drafts.append(np.asarray(model.draft_tokens(at_drafts[0], context)) == np.asarray(tok))
            outputs.append(np.asarray(jnp.argmax(model.backbone._logits(h) + g, axis=-1)) == np.asarray(tok))
        rows[str(t)] = {"first_draft": round(float(np.mean(drafts)), 4), "output": round(float(np.mean(outputs)), 4)}
        print(f"t={t}: {rows[str(t)]}", file=sys.stderr, flush=True)
    gate = DRAFT_GATE_GAIN * np.abs(np.asarray(model.draft_gate[...])).mean()
    return {"model": model_dir, "drafts": int(model.cfg.g_drafts), "tokens_per_t": batches * batch * seq_len,
            "draft_gate_abs_mean": round(float(gate), 4), "agreement": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="workdir of a drafting Gumbel student")
    parser.add_argument("--teacher", required=True, help="workdir of its teacher")
    parser.add_argument("--data_dir", default=None, help="local data folder (offline)")
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    emit_json(agreement(args.model, args.teacher, args.data_dir, args.batches, args.batch), args.out)


if __name__ == "__main__":
    main()
