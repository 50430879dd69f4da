"""Transparent huge pages are switched off for the run's processes (etl/huge_pages.py)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from etl.huge_pages import HUGE_PAGES_ENV

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl is Linux's")

REPO = Path(__file__).resolve().parents[1]


# the switch is inherited: a child of a process that ran a pipeline (this one, after
# other tests) starts with it set, so each script first clears it
_CLEARED = """
import ctypes
ctypes.CDLL(None).prctl(41, 0, 0, 0, 0)  # PR_SET_THP_DISABLE, 0: huge pages as the system has them
"""


def _python(code: str, **env: str) -> list[str]:
    """Run `code` in a fresh interpreter, huge pages cleared first; its output words."""
    environ = {k: v for k, v in os.environ.items() if k != HUGE_PAGES_ENV} | env
    done = subprocess.run(
        [sys.executable, "-c", _CLEARED + textwrap.dedent(code)],
        cwd=REPO,
        env=environ,
        capture_output=True,
        text=True,
        check=True,
    )
    return done.stdout.split()


def test_a_run_turns_them_off_for_itself_and_the_processes_it_starts(tmp_path: Path) -> None:
    out = _python(
        f"""
        import subprocess, sys
        from pathlib import Path
        from etl.huge_pages import huge_pages_disabled
        print(huge_pages_disabled())
        from etl.pipeline.steps import NightlyRun
        NightlyRun(None, Path({str(tmp_path)!r}), "r1")
        print(huge_pages_disabled())
        child = "from etl.huge_pages import huge_pages_disabled; print(huge_pages_disabled())"
        print(subprocess.run([sys.executable, "-c", child], capture_output=True, text=True,
                             check=True).stdout.strip())
        """
    )
    assert out == ["False", "True", "True"]  # before the run, after, in a child process


def test_keep_leaves_the_system_setting() -> None:
    out = _python(
        """
        from etl.huge_pages import disable_transparent_huge_pages, huge_pages_disabled
        print(disable_transparent_huge_pages(), huge_pages_disabled())
        """,
        **{HUGE_PAGES_ENV: "keep"},
    )
    assert out == ["False", "False"]


def test_turning_them_off_twice_is_harmless() -> None:
    out = _python(
        """
        from etl.huge_pages import disable_transparent_huge_pages, huge_pages_disabled
        print(disable_transparent_huge_pages(), disable_transparent_huge_pages(),
              huge_pages_disabled())
        """
    )
    assert out == ["True", "True", "True"]
