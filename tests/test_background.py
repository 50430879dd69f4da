"""Read-ahead and write-behind threads: order kept, errors raised in the caller."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pyarrow as pa
import pytest

from etl.sources.background import WrittenBehind, prefetched


def test_prefetched_yields_every_item_in_order() -> None:
    assert list(prefetched(iter(range(1000)), depth=3)) == list(range(1000))


def test_an_error_while_reading_ahead_is_raised_in_the_consumer() -> None:
    def items() -> Iterator[int]:
        yield 1
        yield 2
        raise ValueError("block 3 is unreadable")

    got: list[int] = []
    with pytest.raises(ValueError, match="block 3 is unreadable"):
        for item in prefetched(items()):
            got.append(item)
    assert got == [1, 2]


def test_a_consumer_that_stops_early_closes_the_producer() -> None:
    closed = threading.Event()

    def items() -> Iterator[int]:
        try:
            yield from range(10_000)
        finally:
            closed.set()

    reader = prefetched(items(), depth=2)
    assert [next(reader), next(reader)] == [0, 1]
    reader.close()  # the consumer's loop ends (break, error)
    assert closed.is_set()
    assert not [t for t in threading.enumerate() if t.name == "read-ahead"]


class _ListSink:
    def __init__(self, fail_on: int | None = None) -> None:
        self.written: list[tuple[str, int]] = []
        self.fail_on = fail_on

    def write(self, shape: str, table: pa.Table) -> None:
        value = table["n"][0].as_py()
        if value == self.fail_on:
            raise OSError(f"disk full at table {value}")
        self.written.append((shape, value))


def test_written_behind_writes_every_table_in_order_before_close_returns() -> None:
    sink = _ListSink()
    behind = WrittenBehind(sink, depth=2)
    for n in range(200):
        behind.write("event" if n % 2 else "visit", pa.table({"n": [n]}))
    behind.close()
    assert sink.written == [("event" if n % 2 else "visit", n) for n in range(200)]


def test_a_failed_write_is_raised_once_and_later_writes_are_dropped() -> None:
    sink = _ListSink(fail_on=3)
    behind = WrittenBehind(sink, depth=1)
    with pytest.raises(OSError, match="disk full at table 3"):
        for n in range(100):
            behind.write("event", pa.table({"n": [n]}))
    behind.close()  # the error was raised already: close only waits for the thread
    assert sink.written == [("event", 0), ("event", 1), ("event", 2)]
