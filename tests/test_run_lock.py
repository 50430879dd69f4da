"""One run at a time per warehouse: a second run is refused; a dead run's lock is taken over."""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import time

import pytest

from etl.pipeline.lock import LockBusy, warehouse_lock

HOLDER = """
import sys, time
from etl.pipeline.lock import warehouse_lock
with warehouse_lock(sys.argv[1], sys.argv[2], "run-A"):
    print("held", flush=True)
    time.sleep(120)
"""


def _hold(url: str, schema: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, url, schema], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    return proc


def _acquire_eventually(url: str, schema: str, run_id: str, seconds: float = 10.0) -> None:
    """The server notices a killed client's closed socket within moments, not at once."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            with warehouse_lock(url, schema, run_id):
                return
        except LockBusy:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def test_a_second_run_is_refused_and_a_dead_runs_lock_taken_over(
    warehouse, caplog: pytest.LogCaptureFixture
) -> None:
    wh, schema = warehouse
    holder = _hold(wh.url, schema)
    try:
        with (
            pytest.raises(LockBusy, match="another run holds") as refused,
            warehouse_lock(wh.url, schema, "run-B"),
        ):
            pass
        if wh.dialect == "duckdb":
            assert "run run-A (pid" in str(refused.value)
        else:
            assert "omop-etl run run-A" in str(refused.value)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with caplog.at_level(logging.WARNING, logger="etl.pipeline.lock"):
        _acquire_eventually(wh.url, schema, "run-C")
    if wh.dialect == "duckdb":
        assert "run run-A" in caplog.text and "did not finish" in caplog.text
    # released at the end of a run: the next one gets it at once, with nothing to take over
    caplog.clear()
    with (
        caplog.at_level(logging.WARNING, logger="etl.pipeline.lock"),
        warehouse_lock(wh.url, schema, "run-D"),
    ):
        pass
    assert "did not finish" not in caplog.text


def test_locks_are_per_warehouse(tmp_path) -> None:
    first = f"duckdb:///{tmp_path / 'a.duckdb'}"
    second = f"duckdb:///{tmp_path / 'b.duckdb'}"
    with warehouse_lock(first, "main", "run-1"), warehouse_lock(second, "main", "run-2"):
        assert (tmp_path / "a.duckdb.omop-etl.lock").is_file()


def test_a_run_started_while_another_holds_the_warehouse_is_refused(duckdb_wh, tmp_path) -> None:
    from tests.conftest import DEMO_SYNTHEA
    from tests.pipeline_helpers import run, write_config

    wh, schema = duckdb_wh
    config = write_config(tmp_path, wh, schema, DEMO_SYNTHEA)
    holder = _hold(wh.url, schema)
    try:
        result = run(config, tmp_path)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert (result.status, result.exit_code) == ("failed", 2)
    assert any("another run holds" in e and "run-A" in e for e in result.report["errors"])
    assert "another run holds" in (result.run_dir / "run.log").read_text(encoding="utf-8")
    assert not (result.run_dir / "landing" / "ehr").exists()  # no feed was read
    # the holder is gone: the next run proceeds
    assert run(config, tmp_path).status == "published"
