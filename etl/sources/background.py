"""A feed's stages overlapped in threads: reading ahead, and writing behind.

Arrow's CSV parsing, DuckDB's queries and Parquet writing all release the GIL, so while
one block is queried the next is parsed and the one before is written: the stages use
both cores instead of taking turns. Order is kept; an error in a thread is raised in the
caller, and a caller that stops early stops the thread.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from typing import Protocol, TypeVar

import pyarrow as pa

T = TypeVar("T")
_DONE = object()


class _Failed:
    def __init__(self, error: BaseException) -> None:
        self.error = error


def prefetched(items: Iterator[T], depth: int = 2) -> Iterator[T]:
    """Yield what `items` yields, producing up to `depth` items ahead in a thread."""
    ready: queue.Queue[object] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item: object) -> bool:
        while not stop.is_set():
            try:
                ready.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put(item):
                    break
        except BaseException as exc:  # handed to the consumer, raised there
            put(_Failed(exc))
            return
        finally:
            close = getattr(items, "close", None)
            if close is not None and stop.is_set():
                close()  # a consumer that stopped early: run the producer's cleanup
        put(_DONE)

    worker = threading.Thread(target=produce, name="read-ahead", daemon=True)
    worker.start()
    try:
        while True:
            item = ready.get()
            if item is _DONE:
                break
            if isinstance(item, _Failed):
                raise item.error
            yield item  # type: ignore[misc]
    finally:
        stop.set()
        worker.join()


class RecordSink(Protocol):
    """Where extraction writes canonical records, shape by shape (the landing area)."""

    def write(self, shape: str, table: pa.Table) -> None: ...


class WrittenBehind:
    """A record sink whose writes to `sink` happen in a thread, in order, with at most
    `depth` tables waiting. The first failed write is raised by the next call to `write`
    or by `close`, once; the writes after it are dropped."""

    def __init__(self, sink: RecordSink, depth: int = 2) -> None:
        self._sink = sink
        self._queue: queue.Queue[tuple[str, pa.Table] | None] = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._reported = False
        self._worker = threading.Thread(target=self._drain, name="write-behind", daemon=True)
        self._worker.start()

    def _drain(self) -> None:
        while (item := self._queue.get()) is not None:
            if self._error is None:
                try:
                    self._sink.write(*item)
                except BaseException as exc:  # raised in the caller's thread
                    self._error = exc

    def _raise(self) -> None:
        if self._error is not None and not self._reported:
            self._reported = True
            raise self._error

    def write(self, shape: str, table: pa.Table) -> None:
        self._raise()
        self._queue.put((shape, table))

    def close(self) -> None:
        """Wait for every queued write; raise the first that failed, if not yet raised."""
        self._queue.put(None)
        self._worker.join()
        self._raise()
