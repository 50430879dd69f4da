"""A feed's stages overlapped in threads: reading ahead, and writing behind.

Arrow's CSV parsing, DuckDB's queries and Parquet writing all release the GIL, so while
one block is queried the next is parsed and the one before is written: the stages use
both cores instead of taking turns; blocks can also be worked on two at a time
(`mapped_in_order`). Order is kept; an error in a thread is raised in the caller, and a
caller that stops early stops the thread.
"""

from __future__ import annotations

import queue
import threading
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Protocol, TypeVar

import pyarrow as pa

T = TypeVar("T")
R = TypeVar("R")
U = TypeVar("U")
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


def mapped_in_order(
    items: Iterator[T], work: Callable[[T, R], U], resources: Sequence[R]
) -> Iterator[U]:
    """`work(item, resource)` for each of `items`, up to one per resource at once in
    threads (each call holds one of `resources`, e.g. a DuckDB connection, alone), the
    results yielded in the items' order. An error is raised in the caller at its item; a
    caller that stops early cancels the items not started and waits for the others."""
    if len(resources) == 1:  # no thread: one resource does every item in turn
        for item in items:
            yield work(item, resources[0])
        return
    idle: queue.SimpleQueue[R] = queue.SimpleQueue()
    for resource in resources:
        idle.put(resource)

    def run(item: T) -> U:
        resource = idle.get()
        try:
            return work(item, resource)
        finally:
            idle.put(resource)

    pending: deque[Future[U]] = deque()
    with ThreadPoolExecutor(len(resources), thread_name_prefix="in-order") as pool:
        try:
            for item in items:
                pending.append(pool.submit(run, item))
                if len(pending) >= len(resources):
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for future in pending:
                future.cancel()


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
