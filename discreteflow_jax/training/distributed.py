"""Running as several processes: starting JAX's multi-controller runtime (``initialize``), making
sure every process runs the same experiment, gathering small host values, and stopping every
process at the same step on SIGTERM (``PreemptionGuard``). A single-process run only uses the
SIGTERM flag. How a run becomes multi-process and how preemption is agreed: docs/training.md.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import threading
from collections.abc import Iterable
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from discreteflow_jax.config import ConfigError

log = logging.getLogger("discreteflow_jax")

ENV_COORDINATOR = "JAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_PROCESS_ID"
MODES = ("auto", "on", "off")


class DistributedSetupError(ValueError):
    """Incomplete or contradictory multi-process settings; the message says what to pass."""


def _env_int(name: str) -> int | None:
    value = os.environ.get(name, "").strip()
    if not value:
        return None
    try:
        return int(value)
    except ValueError:
        raise DistributedSetupError(f"${name}={value!r} is not an integer") from None


def _cluster_has_several_processes() -> bool:
    if int(os.environ.get("SLURM_NTASKS", "1") or 1) > 1 and "SLURM_STEP_ID" in os.environ:
        return True  # inside `srun` with several tasks (sbatch alone is one process)
    hosts = os.environ.get("TPU_PROCESS_ADDRESSES") or os.environ.get("TPU_WORKER_HOSTNAMES") or ""
    return len([h for h in hosts.split(",") if h.strip()]) > 1


def initialize(
    mode: str = "auto",
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> bool:
    """Starts ``jax.distributed`` when this is one of several processes. Returns whether it did.

    Must run before anything touches a JAX device (it cannot be undone or redone).
    """
    if mode not in MODES:
        raise DistributedSetupError(f"distributed mode {mode!r} is not one of {', '.join(MODES)}")
    if mode == "off":
        return False
    address = coordinator_address or os.environ.get(ENV_COORDINATOR) or None
    count = num_processes if num_processes is not None else _env_int(ENV_NUM_PROCESSES)
    index = process_id if process_id is not None else _env_int(ENV_PROCESS_ID)
    explicit = {"coordinator_address": address, "num_processes": count, "process_id": index}
    if any(v is not None for v in explicit.values()):
        missing = [k for k, v in explicit.items() if v is None]
        if missing:
            raise DistributedSetupError(
                f"a multi-process run needs coordinator_address, num_processes and process_id together; missing "
                f"{', '.join(missing)} (flags --coordinator_address/--num_processes/--process_id or env "
                f"{ENV_COORDINATOR}/{ENV_NUM_PROCESSES}/{ENV_PROCESS_ID})"
            )
        if count < 1 or not 0 <= index < count:
            raise DistributedSetupError(f"need 0 <= process_id < num_processes, got process_id={index}, "
                                        f"num_processes={count}")
        if count == 1:
            return False
        _start(coordinator_address=address, num_processes=count, process_id=index)
        return True
    if mode == "on" or _cluster_has_several_processes():
        _start()  # JAX detects the cluster (TPU metadata, SLURM, MPI, Kubernetes)
        return True
    return False


def _start(**kwargs: Any) -> None:
    try:
        jax.distributed.initialize(**kwargs)
    except RuntimeError as err:  # already initialized (e.g. by a notebook or a test harness)
        if "already" not in str(err).lower():
            raise
    log.info("jax.distributed: process %d of %d", jax.process_index(), jax.process_count())


# -- small host values across processes --------------------------------------------------------
def allgather_host(values: np.ndarray) -> np.ndarray:
    """Stacks a small host array from every process: [process_count, *values.shape]."""
    values = np.asarray(values)
    if jax.process_count() == 1:
        return values[None]
    return np.asarray(multihost_utils.process_allgather(values))


def allgather_json(obj: Any) -> list[Any]:
    """One JSON-serializable value per process, in process order (used for data positions and
    configs: a few kilobytes, at startup and at checkpoints only)."""
    payload = np.frombuffer(json.dumps(obj, sort_keys=True).encode(), np.uint8)
    if jax.process_count() == 1:
        return [obj]
    lengths = allgather_host(np.asarray([payload.size], np.int32))[:, 0]
    padded = np.zeros(int(lengths.max()), np.uint8)
    padded[: payload.size] = payload
    rows = allgather_host(padded)
    return [json.loads(bytes(row[:n]).decode()) for row, n in zip(rows, lengths)]


def to_host(x: jax.Array) -> np.ndarray:
    """The full value of a (possibly cross-process sharded) array on every process."""
    if getattr(x, "is_fully_addressable", True) or getattr(x, "is_fully_replicated", False):
        return np.asarray(jax.device_get(x))
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def config_digest(raw: dict) -> np.ndarray:
    """Eight bytes of SHA-256 of the canonical JSON of a config, as two uint32 (no x64 needed)."""
    text = json.dumps(raw, sort_keys=True, default=str)
    return np.frombuffer(hashlib.sha256(text.encode()).digest()[:8], np.uint32).copy()


def _diff(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out: list[str] = []
        for key in sorted(set(a) | set(b)):
            out += _diff(a.get(key, "<absent>"), b.get(key, "<absent>"), f"{prefix}.{key}" if prefix else key)
        return out
    return [] if a == b else [f"{prefix}: {a!r} vs {b!r}"]


def check_same_config(raw: dict) -> None:
    """Raises ConfigError, on every process, unless all processes run the same config.

    Processes launched with different flags would otherwise compile different programs and hang
    in their first collective (or silently train different models). ``assert_equal`` all-gathers
    a hash, so every process sees a mismatch; only then the configs themselves are gathered to
    name the differing fields.
    """
    if jax.process_count() == 1:
        return
    try:
        multihost_utils.assert_equal(config_digest(raw), "the processes run different configs")
    except AssertionError:
        configs = allgather_json(raw)
    else:
        return
    lines = []
    for p, other in enumerate(configs):
        for d in _diff(configs[0], other)[:10]:
            lines.append(f"process 0 vs process {p}: {d}")
    distinct = len({json.dumps(c, sort_keys=True, default=str) for c in configs})
    raise ConfigError(
        f"the {jax.process_count()} processes were given {distinct} different configs (each process must get "
        "the same --config and overrides):\n  " + "\n  ".join(lines)
    )


# -- preemption ------------------------------------------------------------------------------
class PreemptionGuard:
    """Turns SIGTERM into "stop at the next agreed step boundary" (see the module docstring).

    Use as a context manager around the train loop; ``should_stop(step)`` after every step.
    """

    def __init__(self, sync_every: int = 10, signals: Iterable[int] = (signal.SIGTERM,)):
        self.sync_every = max(int(sync_every), 1)
        self.signals = tuple(signals)
        self.requested = False  # set by the handler on this process
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def _handler(self, signum: int, frame: Any) -> None:
        del frame
        self.requested = True
        self.received = signum
        # The handler runs between Python bytecodes of the main thread: only set the flag here.

    def __enter__(self) -> PreemptionGuard:
        if threading.current_thread() is threading.main_thread():  # Python allows handlers only there
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._handler)
        else:
            log.warning("not in the main thread: SIGTERM will not save a checkpoint before exiting")
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    def should_stop(self, step: int) -> bool:
        """Whether every process should save and stop after ``step``; the same answer on all."""
        # Not multihost_utils.reached_preemption_sync_point: it needs the coordination service's
        # preemption notifier (absent in single-process runs), which takes SIGTERM from this handler.
        if jax.process_count() == 1:
            return self.requested
        if step % self.sync_every:
            return False
        flags = allgather_host(np.asarray([int(self.requested)], np.int32))
        return bool(flags.any())
