"""Tests of the background prefetcher: order, bounded look-ahead, errors and shutdown."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest

from discreteflow_jax.data.prefetch import Prefetcher


def _slow(n: int, produced: list[int], finished: threading.Event | None = None) -> Iterator[int]:
    try:
        for i in range(n):
            if i % 5 == 0:
                time.sleep(0.002)
            produced.append(i)
            yield i
    finally:
        if finished is not None:
            finished.set()


@pytest.mark.parametrize("depth", [0, 1, 4])
def test_prefetch_keeps_order(depth: int) -> None:
    produced: list[int] = []
    fetch = Prefetcher(_slow(200, produced), depth=depth)
    got = []
    for i, item in enumerate(fetch):
        if i % 7 == 0:
            time.sleep(0.001)  # a consumer slower than the producer, then faster
        got.append(item)
    assert got == list(range(200))
    with pytest.raises(RuntimeError, match="closed or finished"):
        fetch.get()


def test_prefetch_is_bounded_and_runs_ahead() -> None:
    produced: list[int] = []
    fetch = Prefetcher(_slow(1000, produced), depth=3)
    assert fetch.get() == 0
    deadline = time.monotonic() + 10
    while len(produced) < 4 and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.1)
    # One item taken, three waiting in the queue, one computed and waiting for room: no further.
    assert 4 <= len(produced) <= 5
    fetch.close()


def test_prefetch_error_reaches_consumer() -> None:
    def failing() -> Iterator[int]:
        yield from range(3)
        raise ValueError("row group 7 of part-0.parquet is damaged")

    fetch = Prefetcher(failing(), depth=2)
    assert [fetch.get() for _ in range(3)] == [0, 1, 2]
    with pytest.raises(ValueError, match="row group 7 of part-0.parquet is damaged") as info:
        fetch.get()
    # The traceback still shows where the worker failed.
    assert any(frame.name == "failing" for frame in info.traceback)
    with pytest.raises(RuntimeError, match="closed or finished"):
        fetch.get()


def test_prefetch_close_stops_worker() -> None:
    finished = threading.Event()
    produced: list[int] = []
    before = set(threading.enumerate())
    fetch = Prefetcher(_slow(10**9, produced, finished), depth=2, name="prefetch-test")
    assert [fetch.get() for _ in range(5)] == list(range(5))
    fetch.close()
    assert finished.is_set()  # the iterator was closed: its cleanup ran
    assert set(threading.enumerate()) <= before
    count = len(produced)
    time.sleep(0.05)
    assert len(produced) == count
    fetch.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed or finished"):
        fetch.get()
    with pytest.raises(ValueError, match="non-negative"):
        Prefetcher(iter([]), depth=-1)
