"""Hold-on-path vs clamp, and conditional training on or off, where the right answer is known.

Data: counting sequences ``s_i = (k + i) mod V`` with a uniformly random start k (V = 11, T = 8),
so any one known token determines the whole row. Three denoisers are compared:

* ``oracle``: the exact clean-token posterior of this data under the Gaussian path (the best any
  model trained without known positions can do; the same construction as in tests/test_api.py);
* ``trained``: a tiny TokenFlow trained on the flow loss (``flow.condition_prob = 0``);
* ``trained_cond``: the same with conditional training (``flow.condition_prob = 0.5``).

Each fills rows with 1, 2 or 4 random known positions, holding them on their noise path
(``path``) or clamping them to their embedding (``clamp``). Reported: the fraction of rows filled
exactly right and of generated tokens that are right. Runs in a minute or two on a CPU; emits JSON.

    python benchmarks/conditional_toy.py [--steps_train=600] [--out=FILE]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from discreteflow_jax import conditioning, flow
from discreteflow_jax.models.tokenflow import TokenFlow, TokenFlowConfig

VOCAB, LENGTH = 11, 8


def counting(rng: np.random.Generator, n: int) -> np.ndarray:
    return ((rng.integers(0, VOCAB, n)[:, None] + np.arange(LENGTH)[None, :]) % VOCAB).astype(np.int32)


def train(condition_prob: float, steps: int, seed: int = 0) -> TokenFlow:
    cfg = TokenFlowConfig(vocab_size=VOCAB, dim=32, num_layers=2, num_heads=2, max_len=LENGTH)
    model = TokenFlow(cfg, rngs=nnx.Rngs(seed))
    graphdef, params = nnx.split(model)
    tx = optax.adamw(optax.warmup_cosine_decay_schedule(0.0, 3e-3, 50, steps), weight_decay=0.0)
    opt = tx.init(params)

    @jax.jit
    def step(params, opt, tokens, key):
        def loss_fn(p):
            m = nnx.merge(graphdef, p)
            known = None
            if condition_prob > 0:
                known = flow.random_known_mask(jax.random.fold_in(key, 1), *tokens.shape, condition_prob, 0.5, 2)
            # power-2 times: more of the batch at small t, where the context matters
            return flow.flow_loss(m, tokens, jnp.ones(tokens.shape), key, time_sampler="power", time_param=2.0,
                                  known_BT=known)[0]

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt = tx.update(grads, opt, params)
        return optax.apply_updates(params, updates), opt, loss

    rng = np.random.default_rng(seed)
    for i in range(steps):
        params, opt, loss = step(params, opt, jnp.asarray(counting(rng, 64)), jax.random.key(i))
    print(f"trained condition_prob={condition_prob}: final loss {float(loss):.3f}", file=sys.stderr)
    return nnx.merge(graphdef, params)


def evaluate(model, name: str, n: int, sample_steps: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed + 1)
    truth = counting(rng, n)
    rows = []
    for num_known in (1, 2, 4):
        mask = np.zeros((n, LENGTH), bool)
        for r in mask:
            r[rng.choice(LENGTH, num_known, replace=False)] = True
        for condition in conditioning.CONDITION_MODES:
            out = np.asarray(conditioning.conditional_sample(model, jax.random.key(seed), flow.time_grid(sample_steps),
                                                    jnp.asarray(np.where(mask, truth, 0)), jnp.asarray(mask),
                                                    condition=condition))
            rows.append({"model": name, "known": num_known, "condition": condition, "K": sample_steps, "n": n,
                         "exact_rows": float((out == truth).all(1).mean()),
                         "token_acc": float((out == truth)[~mask].mean())})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps_train", type=int, default=600)
    p.add_argument("--sample_steps", type=int, default=32)
    p.add_argument("--n", type=int, default=200, help="rows per cell")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from test_api import OracleFlow  # the exact denoiser used by the tests

    t0 = time.time()
    seqs = (np.arange(VOCAB)[:, None] + np.arange(LENGTH)[None, :]) % VOCAB
    results = evaluate(OracleFlow(seqs, VOCAB, dim=32), "oracle", args.n, args.sample_steps, args.seed)
    for name, prob in (("trained", 0.0), ("trained_cond", 0.5)):
        results += evaluate(train(prob, args.steps_train, args.seed), name, args.n, args.sample_steps, args.seed)
    report = {"vocab": VOCAB, "length": LENGTH, "train_steps": args.steps_train, "seed": args.seed,
              "seconds": time.time() - t0, "results": results}
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
