"""Conditional generation quality of a trained flow model on real validation windows: infilling
(a blank in the middle of a window, the rest known) and prefix continuation (the first half known),
for each way of holding known tokens (``condition`` = path | clamp) and, as the reference, with
nothing known. Emits JSON.

    python benchmarks/conditional.py --workdir=runs/baseline --teacher=runs/teacher --num=32 --steps=16

Metrics (all on the generated positions only):
* ``acc``: fraction of generated tokens equal to the real text there (infilling has one real
  answer to compare with; it is a lower bound on quality, since many fills are plausible);
* ``teacher_nll``: with ``--teacher``, the teacher's mean NLL (nats/token) of the generated
  tokens given everything before them (for infilling: scored on the whole filled window, minus the
  known text's own NLL after the blank would be ambiguous, so it is the NLL of the blank tokens only);
* ``entropy``: unigram entropy of the generated tokens per window, averaged (low = repetitive).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np


def generated_nll(scorer, rows: np.ndarray, gen_mask: np.ndarray) -> float:
    """Mean teacher NLL of the generated positions, each given all tokens before it (BOS first)."""
    import jax.numpy as jnp

    from discreteflow_jax.flow import cross_entropy
    from discreteflow_jax.models.generate import teacher_inputs

    model = scorer.model() if hasattr(scorer, "model") else scorer
    logits = model(teacher_inputs(jnp.asarray(rows), scorer.bos_id))
    nll = np.asarray(cross_entropy(logits, jnp.asarray(rows)))
    return float((nll * gen_mask).sum() / gen_mask.sum())


def entropy(rows: np.ndarray, gen_mask: np.ndarray) -> float:
    out = []
    for row, m in zip(rows, gen_mask):
        _, counts = np.unique(row[m], return_counts=True)
        p = counts / counts.sum()
        out.append(float(-(p * np.log(p)).sum()))
    return float(np.mean(out))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True, help="flow model: training workdir or export")
    p.add_argument("--teacher", default=None, help="teacher workdir or export used to score the generated tokens")
    p.add_argument("--data_dir", default=None)
    p.add_argument("--num", type=int, default=32, help="validation windows")
    p.add_argument("--steps", default="16", help="comma-separated K values")
    p.add_argument("--blank", type=int, default=8, help="infilling: blank length (centred in the window)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="JSON output path")
    args = p.parse_args(argv)

    from discreteflow_jax.conditioning import CONDITION_MODES
    from discreteflow_jax.data import make_dataset
    from discreteflow_jax.inference.load import load

    model = load(args.workdir, args.data_dir)
    teacher = load(args.teacher, args.data_dir) if args.teacher else None
    cfg = model.config
    seq_len = model.seq_len
    data = make_dataset("shakespeare", seq_len, model.tokenizer, data_dir=args.data_dir or cfg.data.data_dir or None,
                        seed=cfg.seed, val_fraction=cfg.data.val_fraction)
    truth = np.asarray(data.val_batches(args.num, 1)[0], np.int32)
    start = (seq_len - args.blank) // 2
    tasks = {
        "infill": np.ones((args.num, seq_len), bool),
        "prefix": np.arange(seq_len)[None, :].repeat(args.num, 0) < seq_len // 2,
    }
    tasks["infill"][:, start : start + args.blank] = False
    results = []
    for name, known in tasks.items():
        gen = ~known
        for k in (int(s) for s in args.steps.split(",")):
            for condition in ("none", *CONDITION_MODES):
                t0 = time.time()
                if condition == "none":
                    rows = model.sample_tokens(args.num, k, args.seed)
                else:
                    rows = model.sample_tokens(args.num, k, args.seed, known_tokens=truth, known_mask=known,
                                               condition=condition)
                    assert (rows[known] == truth[known]).all()
                row = {"task": name, "K": k, "condition": condition, "num": args.num, "seq_len": seq_len,
                       "acc": float((rows[gen] == truth[gen]).mean()), "entropy": entropy(rows, gen),
                       "seconds": time.time() - t0}
                if teacher is not None:
                    # For "none" the known part is the model's own text: score it in the real context instead.
                    scored = np.where(known, truth, rows)
                    row["teacher_nll"] = generated_nll(teacher, scored, gen)
                results.append(row)
                print(json.dumps(row), flush=True)
        if teacher is not None:
            results.append({"task": name, "condition": "real_text", "teacher_nll": generated_nll(teacher, truth, gen),
                            "entropy": entropy(truth, gen)})
            print(json.dumps(results[-1]), flush=True)
    report = {"workdir": args.workdir, "step": model.step, "teacher": args.teacher,
              "teacher_step": teacher.step if teacher else None, "seed": args.seed, "results": results}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
