"""Parameters-only reading of a training workdir's checkpoints (loading a model, a teacher).

A reader opens the checkpoints folder read-only (it creates, prunes and moves nothing) and
restores only the ``params`` subtree of the saved train state: no optimizer is built and its
moments are never read. Every step is checksum-verified first (``checkpoint.verify``); a damaged
newest step falls back to the next older one that loads (``checkpoint.select``).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import jax
import orbax.checkpoint as ocp
from etils import epath

from discreteflow_jax.io import checkpoint as ckpt


class Restored(NamedTuple):
    params: Any
    meta: dict
    step: int


def checkpoints_dir(workdir: str) -> str:
    return os.path.join(workdir, "checkpoints")


def open_reader(workdir: str) -> ocp.CheckpointManager:
    """A read-only manager of ``<workdir>/checkpoints`` (CheckpointError when there is none)."""
    directory = checkpoints_dir(workdir if ckpt.is_remote(workdir) else os.path.abspath(workdir))
    if not epath.Path(directory).is_dir():
        raise ckpt.CheckpointError(f"{directory} does not exist")
    options = ocp.CheckpointManagerOptions(
        read_only=True, create=False, save_interval_steps=0, enable_async_checkpointing=False,
    )
    return ocp.CheckpointManager(directory, options=options, item_names=("state", "meta"))


@contextlib.contextmanager
def reader(workdir: str) -> Iterator[ocp.CheckpointManager]:
    """``open_reader`` as a context manager (closed on exit)."""
    mngr = open_reader(workdir)
    try:
        yield mngr
    finally:
        mngr.close()


def steps(mngr: ocp.CheckpointManager) -> list[int]:
    """The finished steps, newest first."""
    return sorted((int(s) for s in mngr.all_steps()), reverse=True)


def read_meta(mngr: ocp.CheckpointManager, step: int) -> dict:
    """The JSON metadata of ``step`` after verifying its checksums; CheckpointDamagedError when
    the step does not read or its metadata carries no config."""
    ckpt.verify(mngr, step)
    meta = ckpt.guarded(mngr, step, lambda: ckpt.read_meta(mngr, step))
    if not isinstance(meta.get("config"), dict):
        raise ckpt.damaged(mngr, step, "its metadata carries no config")
    return meta


def _on_default_device(abstract: Any) -> Any:
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.tree.map(
        lambda x: x if getattr(x, "sharding", None) is not None
        else jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
        abstract,
    )


def restore_params(mngr: ocp.CheckpointManager, step: int, abstract_params: Any) -> Any:
    """The ``params`` subtree of the train state saved at ``step``, on the shardings of
    ``abstract_params`` (ShapeDtypeStructs; the default device where they carry none).
    Does not verify checksums (``read_meta`` does)."""
    target = {"params": _on_default_device(abstract_params)}
    args = ocp.args.PyTreeRestore(
        item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target), partial_restore=True,
    )
    restored = ckpt.guarded(mngr, step, lambda: mngr.restore(step, args=ocp.args.Composite(state=args)))
    return restored["state"]["params"]


def load_params(
    mngr: ocp.CheckpointManager, abstract_for: Callable[[dict], Any], *, step: int | None = None,
    how: str = "step={}",
) -> Restored:
    """Parameters of ``step``, or of the newest step that loads (damaged newer ones are logged
    and left in place; a damaged ``step`` raises, naming the steps that load).

    ``abstract_for(meta)`` gives the abstract parameters for a step from its metadata (the
    saved config says which model); it may raise to reject the checkpoint outright.
    """

    def load_step(s: int) -> tuple[Any, dict]:
        meta = read_meta(mngr, s)
        return restore_params(mngr, s, abstract_for(meta)), meta

    (params, meta), chosen, _ = ckpt.select(mngr, load_step, step=step, steps=steps(mngr), how=how)
    return Restored(params, meta, chosen)
