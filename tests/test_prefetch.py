"""Read-ahead of extract blocks: order, errors, early stop and bounded memory."""

from __future__ import annotations

import threading

import pytest

from etl.sources.prefetch import prefetched


def test_items_come_in_order() -> None:
    assert list(prefetched(iter(range(1000)), depth=3)) == list(range(1000))
    assert list(prefetched([])) == []


def test_an_error_while_producing_is_raised_after_the_items_before_it() -> None:
    def source():
        yield 1
        yield 2
        raise ValueError("block 3 is unreadable")

    got = []
    with pytest.raises(ValueError, match="block 3 is unreadable"):
        for item in prefetched(source()):
            got.append(item)
    assert got == [1, 2]


def test_stopping_early_closes_the_source_and_ends_the_thread() -> None:
    closed = threading.Event()

    def source():
        try:
            yield from range(10**9)
        finally:
            closed.set()

    reader = prefetched(source(), depth=2)
    assert next(reader) == 0
    reader.close()
    assert closed.is_set()
    assert not any(t.name == "prefetch" and t.is_alive() for t in threading.enumerate())


def test_the_producer_runs_at_most_depth_items_ahead() -> None:
    produced: list[int] = []
    ahead: list[int] = []

    def source():
        for i in range(50):
            produced.append(i)
            yield i

    for item in prefetched(source(), depth=2):
        ahead.append(len(produced) - item - 1)
    # waiting in the queue (2) plus the one being put when the caller took one
    assert max(ahead) <= 3
