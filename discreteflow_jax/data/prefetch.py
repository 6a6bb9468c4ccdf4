"""Runs an iterator in a background thread, at most ``depth`` items ahead of its consumer.

Items arrive in the iterator's order, so the output does not depend on timing. An exception raised by the
iterator is re-raised, unchanged, by the consumer's next ``get()``; ``close()`` stops the thread.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Iterator
from typing import Any, Generic, TypeVar

logger = logging.getLogger(__name__)

T = TypeVar("T")

_ITEM, _ERROR, _END = range(3)
# How often a blocked worker or consumer wakes to check that the other side is still there.
_POLL_S = 0.1
# close() waits this long for the worker to finish the item it is computing.
_JOIN_S = 60.0


class Prefetcher(Generic[T]):
    """``get()`` returns the items of ``items`` in order, computed ahead by a daemon thread.

    ``depth=0`` runs the iterator in the caller's thread instead (no thread, same items). After an
    exception, the end of the iterator, or ``close()``, no further items are produced.
    """

    def __init__(self, items: Iterator[T], depth: int = 2, name: str = "prefetch") -> None:
        if depth < 0:
            raise ValueError(f"depth must be non-negative, got {depth}")
        self._items = items
        self._queue: queue.Queue[tuple[int, Any]] = queue.Queue(maxsize=max(depth, 1))
        self._stop = threading.Event()
        self._done = False
        self._thread: threading.Thread | None = None
        if depth > 0:
            self._thread = threading.Thread(target=self._work, name=name, daemon=True)
            self._thread.start()

    def _put(self, entry: tuple[int, Any]) -> bool:
        # A bounded wait, so that close() is noticed while the queue is full.
        while not self._stop.is_set():
            try:
                self._queue.put(entry, timeout=_POLL_S)
                return True
            except queue.Full:
                continue
        return False

    def _work(self) -> None:
        try:
            for item in self._items:
                if not self._put((_ITEM, item)):
                    return
            self._put((_END, None))
        except BaseException as err:  # noqa: BLE001 - every failure must reach the consumer
            self._put((_ERROR, err))

    def get(self) -> T:
        """The next item; re-raises the iterator's exception; StopIteration at its end."""
        if self._done:
            raise RuntimeError("Prefetcher is closed or finished; it produces no further items")
        if self._thread is None:
            try:
                return next(self._items)
            except BaseException:
                self._done = True
                raise
        while True:
            try:
                kind, value = self._queue.get(timeout=_POLL_S)
                break
            except queue.Empty:
                if not self._thread.is_alive() and self._queue.empty():
                    self._done = True
                    raise RuntimeError("the prefetch thread stopped without a result") from None
        if kind == _ITEM:
            return value
        self.close()
        if kind == _END:
            raise StopIteration
        raise value

    def __iter__(self) -> Iterator[T]:
        while True:
            try:
                yield self.get()
            except StopIteration:
                return

    def close(self) -> None:
        """Stops the worker after the item in progress and waits for it; idempotent."""
        self._done = True
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is threading.current_thread():
            return  # called from the worker itself (a finalizer run by its garbage collection): it stops on return
        if thread is not None:
            deadline = time.monotonic() + _JOIN_S
            while thread.is_alive() and time.monotonic() < deadline:
                try:  # unblock a worker waiting for room in the queue
                    self._queue.get_nowait()
                except queue.Empty:
                    pass
                thread.join(timeout=_POLL_S)
            if thread.is_alive():
                # A daemon thread: it cannot keep the interpreter from exiting.
                logger.warning("prefetch thread %s still busy %.0fs after close(); left running", thread.name, _JOIN_S)
                return
        close = getattr(self._items, "close", None)
        if close is not None:
            close()
