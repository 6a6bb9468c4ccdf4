"""Checkpoints with ``orbax.checkpoint.CheckpointManager``: each step holds ``state`` (sharded
arrays) and ``meta`` (JSON config, data position). A CRC-32 of every file (``checksums.json``)
is checked before any read (``verify``); damaged steps are reported and never deleted, readers
fall back to the newest step that loads (``select``). Details: docs/training.md.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import zlib
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import jax
import orbax.checkpoint as ocp
from etils import epath

log = logging.getLogger("discreteflow_jax")
T = TypeVar("T")

# Files orbax writes into every finished step: a step without one of them cannot be restored.
REQUIRED_FILES = ("state/_METADATA", "meta/metadata")
CHECKSUM_FILE = "checksums.json"
# Where a training run moves step folders it will not resume from (kept, never deleted).
DAMAGED_DIR = "checkpoints_damaged"
SKIPPED_DIR = "checkpoints_skipped"

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


class CheckpointError(ValueError):
    """A checkpoint that cannot be used as asked: no such step, or none that reads."""


class CheckpointDamagedError(CheckpointError):
    """A checkpoint that cannot be read (a truncated or corrupted file, missing metadata)."""


class CheckpointWriteError(CheckpointError):
    """Writing a checkpoint failed (disk full, permissions): the run stops, older steps stay intact."""


def manager(workdir: str, keep: int, *, async_save: bool = True, clean_partial: bool = False
            ) -> ocp.CheckpointManager:
    """``clean_partial`` (the training run): remove the temporary folders of writes that never
    finished (a crash or a full disk mid-save); they are never steps, only wasted space."""
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True, enable_async_checkpointing=async_save,
        cleanup_tmp_directories=clean_partial,
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


def step_path(mngr: ocp.CheckpointManager, step: int) -> str:
    return str(epath.Path(mngr.directory) / str(step))


def damage_reason(err: BaseException) -> str:
    """Why a read failed, in one line: the messages of the exception chain without tensorstore's
    spec dumps (the file and array they name stay)."""
    parts: list[str] = []
    seen: set[int] = set()
    e: BaseException | None = err
    while e is not None and id(e) not in seen and len(parts) < 3:
        seen.add(id(e))
        text = str(e).split("[tensorstore_spec")[0].split("See full TensorStore details")[0]
        text = " ".join(text.split()).rstrip(". ")
        if text and all(text not in p for p in parts):
            parts.append(f"{type(e).__name__}: {text}")
        e = e.__cause__ or e.__context__
    reason = "; ".join(parts) or type(err).__name__
    # Long storage errors name the file first and the cause last (e.g. "... checksum verification
    # failed"): keep both ends.
    return reason if len(reason) <= 500 else reason[:300] + " … " + reason[-200:]


def damaged(mngr: ocp.CheckpointManager, step: int, reason: str) -> CheckpointDamagedError:
    return CheckpointDamagedError(f"the checkpoint at step {step} ({step_path(mngr, step)}) is damaged: {reason}")


def guarded(mngr: ocp.CheckpointManager, step: int, read: Callable[[], T]) -> T:
    """Runs ``read`` (an orbax read of ``step``), turning any failure into a
    CheckpointDamagedError that names the step, its folder and why."""
    base = epath.Path(step_path(mngr, step))
    missing = [f for f in REQUIRED_FILES if not (base / f).exists()]
    if missing:
        raise damaged(mngr, step, "; ".join(f"{f} is missing" for f in missing))
    _quiet_closed_loop_callbacks()
    try:
        return read()
    except Exception as err:  # orbax/tensorstore raise many types; all mean "this step does not read"
        raise damaged(mngr, step, damage_reason(err)) from err


def _step_files(directory: str) -> dict[str, epath.Path]:
    """The files of a local step folder, by path relative to it."""
    found: dict[str, epath.Path] = {}
    for folder, _, names in os.walk(directory):
        for name in names:
            rel = os.path.relpath(os.path.join(folder, name), directory)
            if rel != CHECKSUM_FILE:
                found[rel] = epath.Path(folder) / name
    return found


def _crc32(path: epath.Path) -> tuple[int, int]:
    size, crc = 0, 0
    with path.open("rb") as f:
        while chunk := f.read(1 << 24):
            size += len(chunk)
            crc = zlib.crc32(chunk, crc)
    return size, crc


def write_checksums(directory: str) -> None:
    """Records size and CRC-32 of every file of a finished local step folder (written atomically)."""
    base = epath.Path(directory)
    files = {rel: list(_crc32(path)) for rel, path in sorted(_step_files(directory).items())}
    tmp = base / (CHECKSUM_FILE + ".tmp")
    tmp.write_text(json.dumps({"algorithm": "crc32", "files": files}))
    tmp.rename(base / CHECKSUM_FILE)


def verify(mngr: ocp.CheckpointManager, step: int) -> None:
    """Raises CheckpointDamagedError when a file of the step is missing, has another size
    (truncated) or another CRC-32 (corrupted) than when it was written; a step without
    checksums passes unverified."""
    base = epath.Path(step_path(mngr, step))
    record = base / CHECKSUM_FILE
    if not record.exists():
        return
    try:
        files = json.loads(record.read_text())["files"]
    except (ValueError, KeyError, TypeError) as err:
        raise damaged(mngr, step, f"{CHECKSUM_FILE} does not read ({type(err).__name__}: {err})") from err
    problems = []
    for rel, (size, crc) in files.items():
        path = base / rel
        if not path.exists():
            problems.append(f"{rel} is missing")
            continue
        got_size, got_crc = _crc32(path)
        if got_size != size:
            problems.append(f"{rel} has {got_size} bytes, {size} when written (truncated or overwritten)")
        elif got_crc != crc:
            problems.append(f"{rel} does not match its checksum (corrupted)")
    if problems:
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise damaged(mngr, step, shown)


def _quiet_closed_loop_callbacks() -> None:
    """When a read fails, tensorstore's pending callbacks for the other arrays land on orbax's
    already closed event loop and each prints a "RuntimeError: Event loop is closed" traceback
    (harmless: nobody waits for them). Drop exactly those, so the message about the damaged
    checkpoint is not buried; every other unraisable exception is reported as before."""
    previous = sys.unraisablehook
    if getattr(previous, "_drops_closed_loop", False):
        return

    def hook(unraisable: Any) -> None:
        exc = unraisable.exc_value
        if isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed":
            return
        previous(unraisable)

    hook._drops_closed_loop = True  # type: ignore[attr-defined]
    sys.unraisablehook = hook


def select(
    mngr: ocp.CheckpointManager, load_step: Callable[[int], T], *, step: int | None = None,
    steps: Sequence[int] | None = None, how: str = "step={}",
) -> tuple[T, int, list[int]]:
    """Loads ``step``, or else the newest step that reads: (result, step, damaged newer steps).

    ``load_step(s)`` raises CheckpointDamagedError for a step that does not read (see
    ``guarded``); any other error propagates. A damaged newest step is reported and the next
    older one tried (the fallback is logged); damaged steps are left where they are. An explicit
    ``step`` that is damaged raises, naming the steps that do load (``how`` says how to pick one).
    """
    steps = sorted(mngr.all_steps() if steps is None else steps, reverse=True)
    where = str(mngr.directory)
    if step is not None:
        if step not in steps:
            raise CheckpointError(
                f"{where} holds no checkpoint of step {step}; the steps kept there are: {_steps_text(steps)}"
            )
        try:
            return load_step(step), step, []
        except CheckpointDamagedError as err:
            readable = [s for s in steps if s != step and _reads(load_step, s)]
            hint = (f"steps that load: {_steps_text(readable)}; pick one with {how.format(readable[0], readable[0])}"
                    if readable else "no other step there loads either")
            raise CheckpointDamagedError(f"{err}\n{hint}") from err
    bad: list[CheckpointDamagedError] = []
    for s in steps:
        try:
            result = load_step(s)
        except CheckpointDamagedError as err:
            log.warning("%s; trying the next older checkpoint", err)
            bad.append(err)
            continue
        if bad:
            log.warning("falling back to the checkpoint at step %d, the newest that loads; damaged and left in "
                        "place: step %s", s, _steps_text(steps[: len(bad)]))
        return result, s, list(steps[: len(bad)])
    raise CheckpointDamagedError(
        f"no checkpoint in {where} can be read:\n  " + "\n  ".join(str(e) for e in bad)
        + "\nThey are left in place. Restore them from a copy, or move the checkpoints folder away "
        "(or use a new --workdir) to start over."
    )


def _reads(load_step: Callable[[int], Any], step: int) -> bool:
    try:
        load_step(step)
    except CheckpointDamagedError:
        return False
    return True


def _steps_text(steps: Sequence[int]) -> str:
    return ", ".join(str(s) for s in steps) if steps else "none"


def set_aside(mngr: ocp.CheckpointManager, steps: Sequence[int], folder: str) -> list[str]:
    """Moves step folders out of the checkpoints folder into ``<workdir>/<folder>/`` (never
    deletes them); returns the new paths. Call on one process only, then ``mngr.reload()``."""
    root = epath.Path(mngr.directory)
    target = root.parent / folder
    moved = []
    for s in steps:
        target.mkdir(parents=True, exist_ok=True)
        dest = target / str(s)
        n = 1
        while dest.exists():  # the same step set aside before: keep both
            dest = target / f"{s}.{n}"
            n += 1
        (root / str(s)).rename(dest)
        moved.append(str(dest))
    return moved


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
