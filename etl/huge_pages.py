"""Transparent huge pages off for the nightly run's processes (Linux).

The run allocates and frees large buffers all night: Arrow's memory pool (mimalloc) as
the feeds parse their blocks, DuckDB's allocator, the buffers files are read into. Where
the kernel backs such memory with transparent huge pages, every fresh 2 MiB page is
zeroed whole when first touched, whether the buffer uses it all or not. Under `perf`, a
100,000-patient run spent about 6% of its CPU in the kernel zeroing pages
(clear_page_erms), most of it under huge-page faults. With huge pages off for the
process, the EHR feed's extraction at 100,000 patients took 22.0 s of CPU where it took
24.9-25.0 s (12% less), and whole runs 103-105 s where they took 108-111 s. At a million
patients the whole runs did not show a difference (bench/HISTORY.md, twenty-eighth
session).

`prctl(PR_SET_THP_DISABLE)` applies to this process and to every process it starts (the
lab and PACS feeds' workers): it is inherited across fork and exec. It changes nothing
but where memory comes from. Set OMOP_ETL_HUGE_PAGES=keep to leave the system's setting.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys

log = logging.getLogger(__name__)

HUGE_PAGES_ENV = "OMOP_ETL_HUGE_PAGES"
_PR_SET_THP_DISABLE = 41  # linux/prctl.h
_PR_GET_THP_DISABLE = 42


def disable_transparent_huge_pages() -> bool:
    """Turn transparent huge pages off for this process and its children.

    True when they are off (now or already); False where the system has no such switch
    (not Linux, a kernel before 3.15) or OMOP_ETL_HUGE_PAGES=keep asks to leave them."""
    if os.environ.get(HUGE_PAGES_ENV, "").strip().lower() == "keep":
        return False
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_GET_THP_DISABLE, 0, 0, 0, 0) == 1:
            return True
        if libc.prctl(_PR_SET_THP_DISABLE, 1, 0, 0, 0) != 0:
            log.debug("transparent huge pages left on: prctl errno %d", ctypes.get_errno())
            return False
    except (OSError, AttributeError) as exc:
        log.debug("transparent huge pages left on: %s", exc)
        return False
    return True


def huge_pages_disabled() -> bool | None:
    """Whether transparent huge pages are off for this process (None: unknown)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        state = ctypes.CDLL(None, use_errno=True).prctl(_PR_GET_THP_DISABLE, 0, 0, 0, 0)
    except (OSError, AttributeError):
        return None
    return None if state < 0 else state == 1
