"""The jitted pieces of training: the train state, the train step (micro-batch accumulation,
gradients, optimizer update), the eval step, the PRNG streams and the window metrics.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from discreteflow_jax.tasks.base import Task


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any


def _split_micro(tokens_BT: jax.Array, accum: int) -> jax.Array:
    """[B, T] -> [accum, B/accum, T] keeping each device's rows on that device (row r = m·accum + a)."""
    b, t = tokens_BT.shape
    return tokens_BT.reshape(b // accum, accum, t).transpose(1, 0, 2)


# Each use of randomness draws from its own stream of the seed: stream_key(seed, purpose). With one
# shared stream, fold_in(key(seed), c) for any constant c is also the key of training step c, and
# nnx.Rngs(seed) draws fold_in(key(seed), i), the keys of the first steps.
STREAMS = {"train": 1, "init": 2, "eval": 3, "samples": 4}


def stream_key(seed: int, purpose: str) -> jax.Array:
    """The root key of one purpose (``STREAMS``); keys inside a stream are fold_in(root, i)."""
    return jax.random.fold_in(jax.random.key(seed), STREAMS[purpose])


def build_train_step(task: Task, graphdef: Any, tx: optax.GradientTransformation, accum: int) -> Callable:
    """The jitted step. With ``accum`` > 1 the gradient is the token-weighted mean over the whole
    batch, the same as one big batch: each micro-batch's mean-loss gradient is weighted by its
    token count (they differ when masks or known positions vary), then divided by the total."""

    def step_fn(state: TrainState, aux: Any, tokens_BT: jax.Array, base_key: jax.Array):
        key = jax.random.fold_in(base_key, state.step)
        micro = _split_micro(tokens_BT, accum) if accum > 1 else None

        def loss_of(params, tokens, k):
            return task.loss_fn(nnx.merge(graphdef, params), aux, tokens, k)

        def accumulate(carry, xs):
            grads_acc, sums_acc = carry
            tokens, i = xs
            grad_fn = jax.value_and_grad(loss_of, has_aux=True)
            (_, sums), grads = grad_fn(state.params, tokens, jax.random.fold_in(key, i))
            weight = sums["tokens"].astype(jnp.float32)
            grads_acc = jax.tree.map(lambda acc, g: acc + weight * g, grads_acc, grads)
            return (grads_acc, jax.tree.map(jnp.add, sums_acc, sums)), None

        if accum == 1:  # no accumulation buffers at all
            (_, sums), grads = jax.value_and_grad(loss_of, has_aux=True)(state.params, tokens_BT, key)
        else:
            zero_grads = jax.tree.map(jnp.zeros_like, state.params)
            zero_sums = jax.tree.map(
                lambda s: jnp.zeros(s.shape, s.dtype),
                jax.eval_shape(lambda: loss_of(state.params, micro[0], key)[1]),
            )
            (grads, sums), _ = jax.lax.scan(accumulate, (zero_grads, zero_sums), (micro, jnp.arange(accum)))
            total = jnp.maximum(sums["tokens"].astype(jnp.float32), 1.0)
            grads = jax.tree.map(lambda g: g / total, grads)
        grad_norm = optax.global_norm(grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        loss = sums["loss_sum"] / jnp.maximum(sums["tokens"], 1.0)
        # No in-step rollback (it would keep a second copy of the state alive): the host checks
        # `finite` before every checkpoint and stops the run, so the last good checkpoint stays intact.
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        new_state = TrainState(state.step + 1, params, opt_state)
        metrics = dict(sums, grad_norm=grad_norm, finite=finite)
        return new_state, metrics

    return step_fn


def build_eval_step(task: Task, graphdef: Any, accum: int = 1) -> Callable:
    """The eval step: the task's metric sums of one validation batch. With ``accum`` > 1 the batch
    runs as ``accum`` micro-batches (as the train step does; micro-batch i with fold_in(key, i)) and
    their sums are added, so evaluation needs no more memory than a training micro-batch: a whole
    training batch at once does not fit where the train step only fits accumulated."""

    def eval_fn(params, aux, tokens_BT, key):
        model = nnx.merge(graphdef, params)
        if accum == 1:
            return task.eval_fn(model, aux, tokens_BT, key)

        def one(sums, xs):
            tokens, i = xs
            out = task.eval_fn(model, aux, tokens, jax.random.fold_in(key, i))
            return jax.tree.map(jnp.add, sums, out), None

        micro = _split_micro(tokens_BT, accum)
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                             jax.eval_shape(lambda: task.eval_fn(model, aux, micro[0], key)))
        return jax.lax.scan(one, zeros, (micro, jnp.arange(accum)))[0]

    return eval_fn


def validation_batches(dataset: Any, local_batch: int, eval_batches: int) -> list:
    """The validation batches of one evaluation: ``eval_batches`` of them, or with 0 every
    validation window once (as many full batches as the split holds without overlap)."""
    return dataset.val_batches(local_batch, eval_batches or None)


def window_metrics(task: Task, fetched: list[dict]) -> dict:
    """The training metrics of a logging window: every step's metric sums added up, then
    summarized (token-weighted, like validation), and the mean gradient norm; not the last step's."""
    totals = {
        k: np.sum([np.asarray(m[k], np.float64) for m in fetched], axis=0)
        for k in fetched[-1] if k not in ("grad_norm", "finite")
    }
    out = task.summarize(totals, "train")
    out["train/grad_norm"] = float(np.mean([float(m["grad_norm"]) for m in fetched]))
    return out
