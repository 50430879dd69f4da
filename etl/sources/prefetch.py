"""Read ahead: a background thread produces the next items while the caller works on one.

Arrow's CSV reader and DuckDB both release the GIL, so parsing block n+1 of an extract
overlaps the SQL that types, checks and pseudonymises block n: on two cores the parse
(one thread) no longer waits for the SQL, nor the SQL for the parse.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")
_DONE = object()


def prefetched(items: Iterable[T], depth: int = 2) -> Iterator[T]:
    """Yield `items` in order while a thread already produces up to `depth` more.

    An exception raised while producing is raised here, after the items before it.
    Closing the generator early (the caller failed or stopped) stops the producer and
    closes `items`. Memory: at most `depth` items wait.
    """
    if depth < 1:
        raise ValueError("depth must be at least 1")
    pending: queue.Queue[tuple[bool, object]] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(entry: tuple[bool, object]) -> bool:
        while not stop.is_set():
            try:
                pending.put(entry, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        source = iter(items)
        try:
            for item in source:
                if not put((True, item)):
                    return
            put((True, _DONE))
        except BaseException as exc:  # handed to the caller, raised in its thread
            put((False, exc))
        finally:
            close = getattr(source, "close", None)
            if close is not None:
                close()

    thread = threading.Thread(target=produce, name="prefetch", daemon=True)
    thread.start()
    try:
        while True:
            ok, item = pending.get()
            if not ok:
                assert isinstance(item, BaseException)
                raise item
            if item is _DONE:
                return
            yield item  # type: ignore[misc]
    finally:
        stop.set()
        thread.join()
