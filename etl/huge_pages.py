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


def _prctl(option: int, arg: int) -> int | None:
    """prctl(option, arg) on Linux; None where there is no such call."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).prctl(option, arg, 0, 0, 0)
    except (OSError, AttributeError) as exc:
        log.debug("no prctl: %s", exc)
        return None


def huge_pages_disabled() -> bool | None:
    """Whether transparent huge pages are off for this process (None: unknown)."""
    state = _prctl(_PR_GET_THP_DISABLE, 0)
    return None if state is None or state < 0 else state == 1


def disable_transparent_huge_pages() -> bool:
    """Turn transparent huge pages off for this process and its children.

    True when they are off (now or already); False where the system has no such switch
    (not Linux, a kernel before 3.15) or OMOP_ETL_HUGE_PAGES=keep asks to leave them."""
    if os.environ.get(HUGE_PAGES_ENV, "").strip().lower() == "keep":
        return False
    if huge_pages_disabled():
        return True
    if _prctl(_PR_SET_THP_DISABLE, 1) != 0:
        log.debug("transparent huge pages left on: prctl errno %d", ctypes.get_errno())
        return False
    return True
