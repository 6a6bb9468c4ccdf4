"""Checkpoints with ``orbax.checkpoint.CheckpointManager``.

Each checkpoint step holds two items: ``state`` (step, parameters, optimizer state; sharded
arrays written by all processes together) and ``meta`` (JSON: the full config, the data
position, the code version). Saves are asynchronous; old steps are pruned (keep-last-N); orbax
writes to a temporary folder and renames, so a crash never leaves a half-written "latest" step.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp

# Config sections whose change makes a checkpoint incompatible (a different model, data, or, for
# Gumbel reflow, a different conditioning or teacher: the student would continue on other targets).
# Training-schedule fields (num_steps, eval intervals...) may change on resume.
IDENTITY_FIELDS = ("task", "model", "data.name", "data.tokenizer", "data.seq_len", "causal", "gumbel", "teacher")
# Fields inside those sections that only choose how the same mathematics is computed (chunked
# loss, recomputation, the Gumbel chunking) or only affect sampling: changing them, or resuming a
# checkpoint written before they existed, is fine.
# teacher.step (0 = newest) is checked through the step it resolved to (see ``check_compatible``).
COMPUTE_ONLY_FIELDS = (
    "model.loss_chunk", "model.remat", "gumbel.chunk_size", "gumbel.sample_temperature", "teacher.step",
)


class CheckpointMismatchError(ValueError):
    """The workdir holds a checkpoint of a different experiment; never overwritten silently."""


def manager(workdir: str, keep: int, *, async_save: bool = True) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True, enable_async_checkpointing=async_save,
    )
    # Remote folders (gs://bucket/run) go to orbax unchanged: it writes them through tensorstore/epath.
    root = workdir if is_remote(workdir) else os.path.abspath(workdir)
    return ocp.CheckpointManager(
        os.path.join(root, "checkpoints"), options=options, item_names=("state", "meta")
    )


def is_remote(path: str) -> bool:
    """gs://, s3://... paths: written with etils.epath (gcsfs for gs://), never with os/open."""
    return "://" in str(path)


def save(mngr: ocp.CheckpointManager, step: int, state: Any, meta: dict, *, force: bool = False) -> bool:
    return mngr.save(
        step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=force,
    )


def read_meta(mngr: ocp.CheckpointManager, step: int) -> dict:
    return mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]


def restore(mngr: ocp.CheckpointManager, step: int, abstract_state: Any) -> tuple[Any, dict]:
    """Restores the state onto the shardings carried by ``abstract_state`` (ShapeDtypeStructs)."""
    restored = mngr.restore(
        step,
        args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()),
    )
    return restored["state"], restored["meta"]


def _lookup(tree: dict, dotted: str) -> Any:
    node: Any = tree
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return "<absent>"
        node = node[part]
    return node


def _flat_diff(a: Any, b: Any, prefix: str) -> list[str]:
    if prefix in COMPUTE_ONLY_FIELDS:
        return []
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in sorted(set(a) | set(b)):
            out += _flat_diff(a.get(key, "<absent>"), b.get(key, "<absent>"), f"{prefix}.{key}")
        return out
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        a, b = list(a), list(b)
    return [] if a == b else [f"{prefix}: checkpoint has {a!r}, this run has {b!r}"]


def check_compatible(
    saved_config: dict, config: dict, workdir: str, saved_identity: dict | None = None,
    identity: dict | None = None,
) -> None:
    """Raises CheckpointMismatchError listing every identity field that differs.

    ``saved_identity``/``identity``: what the task itself resolved (e.g. the step of the teacher
    checkpoint a Gumbel student distills), compared key by key when the checkpoint recorded it.
    """
    diffs: list[str] = []
    for field in IDENTITY_FIELDS:
        diffs += _flat_diff(_lookup(saved_config, field), _lookup(config, field), field)
    if saved_identity is not None and identity is not None:
        for key in sorted(set(saved_identity) | set(identity)):
            a, b = saved_identity.get(key, "<absent>"), identity.get(key, "<absent>")
            if a != b:
                diffs.append(f"{key}: checkpoint has {a!r}, this run has {b!r}")
    if diffs:
        hint = ""
        if saved_identity and identity and saved_identity.get("teacher.step") != identity.get("teacher.step"):
            hint = (" To distill from the same teacher checkpoint, pin it with "
                    f"--config.teacher.step={saved_identity.get('teacher.step')}.")
        raise CheckpointMismatchError(
            f"the workdir {workdir} holds a checkpoint of a different experiment:\n  "
            + "\n  ".join(diffs)
            + "\nUse a new --workdir, or run with the same config to resume." + hint
        )


def abstract_like(tree: Any, shardings: Any) -> Any:
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
