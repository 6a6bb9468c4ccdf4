"""The optimizer: AdamW with warmup + cosine decay, global-norm clipping, and weight decay on
matrices only. The learning rate is an injected hyperparameter, so the value a step used is
read from the optimizer state (``learning_rate``) rather than recomputed from the schedule.
"""

from __future__ import annotations

from typing import Any

import jax
import optax

from discreteflow_jax.config import TrainConfig


def lr_schedule(train: TrainConfig) -> optax.Schedule:
    decay_steps = max(train.num_steps - train.warmup_steps, 1)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=train.lr, warmup_steps=max(train.warmup_steps, 1),
        decay_steps=decay_steps + max(train.warmup_steps, 1), end_value=train.lr * train.min_lr_ratio,
    )


def _decay_mask(params: Any) -> Any:
    """Weight decay on matrices only: not on norms, biases or the (normalized) embedding."""

    def keep(path, leaf):
        return leaf.ndim >= 2 and "embedding" not in jax.tree_util.keystr(path, simple=True, separator="/")

    return jax.tree_util.tree_map_with_path(keep, params)


def make_optimizer(train: TrainConfig) -> optax.GradientTransformation:
    """Clipping (when ``grad_clip`` > 0), then AdamW on the ``lr_schedule`` of ``train``."""
    parts = []
    if train.grad_clip > 0:
        parts.append(optax.clip_by_global_norm(train.grad_clip))
    # Only the learning rate lives in the optimizer state; the other settings stay Python constants.
    adamw = optax.inject_hyperparams(optax.adamw, static_args=("b1", "b2", "eps", "eps_root", "weight_decay", "mask"))
    parts.append(
        adamw(learning_rate=lr_schedule(train), b1=train.b1, b2=train.b2, weight_decay=train.weight_decay,
              mask=_decay_mask)
    )
    return optax.chain(*parts)


def learning_rate(opt_state: Any) -> jax.Array:
    """The learning rate of the last update made with ``opt_state`` (of ``make_optimizer``)."""
    return optax.tree_utils.tree_get(opt_state, "hyperparams")["learning_rate"]
