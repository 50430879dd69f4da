"""A run killed with SIGKILL at any point leaves the published warehouse exactly as it was,
and the next run completes normally (stale staging replaced, the run lock released)."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
from pathlib import Path

import sqlalchemy as sa

from tests.conftest import DEMO_SYNTHEA
from tests.pipeline_helpers import run, write_config
from tests.test_nightly_runs import snapshot

KILLED_RUN = """
import os, signal, sys
from etl.config import load_config
from etl.pipeline.run import run_pipeline

def on_step(name):
    if name == sys.argv[3]:
        os.kill(os.getpid(), signal.SIGKILL)

run_pipeline(load_config(sys.argv[1]), sys.argv[2], on_step=on_step)
"""
# Every phase: extraction, the build, the gate, and inside the publish transaction (after
# the CDM tables were replaced, before the lineage store and the commit).
# (A subset keeps the suite fast: each point is a process run up to that step.)
KILL_POINTS = {
    "duckdb": ["extract", "build.events", "gate", "publish.lineage"],
    "postgresql": ["build.events", "publish.lineage"],
}


def _kill_at(config: Path, workdir: Path, step: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", KILLED_RUN, str(config), str(workdir), step],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == -signal.SIGKILL, (step, proc.returncode, proc.stderr[-2000:])


def _lineage_rows(wh, schema: str) -> int:
    with wh.engine.connect() as conn:
        return conn.execute(sa.text(f'SELECT count(*) FROM "{schema}_etl".lineage')).scalar()


def test_sigkill_anywhere_leaves_the_before_state(warehouse, tmp_path: Path) -> None:
    wh, schema = warehouse
    first = run(write_config(tmp_path, wh, schema, DEMO_SYNTHEA), tmp_path)
    assert first.status == "published"
    before, lineage_before = snapshot(wh, schema), _lineage_rows(wh, schema)
    wh.engine.dispose()  # DuckDB: one writer process at a time

    # the next night's feed differs: half the conditions are gone
    feed = tmp_path / "night2"
    shutil.copytree(DEMO_SYNTHEA, feed)
    lines = (feed / "conditions.csv").read_text(encoding="utf-8").splitlines(keepends=True)
    (feed / "conditions.csv").write_text("".join(lines[: len(lines) // 2]), encoding="utf-8")
    night2 = tmp_path / "night2.yaml"
    night2.write_text(
        write_config(tmp_path, wh, schema, feed).read_text(encoding="utf-8"), encoding="utf-8"
    )

    for step in KILL_POINTS[wh.dialect]:
        _kill_at(night2, tmp_path, step)
        assert snapshot(wh, schema) == before, f"killed at {step}: published tables changed"
        assert _lineage_rows(wh, schema) == lineage_before, f"killed at {step}: lineage changed"
        wh.engine.dispose()

    after = run(night2, tmp_path)
    assert after.status == "published", after.report["errors"]
    published = snapshot(wh, schema)
    assert len(published["condition_occurrence"]) < len(before["condition_occurrence"])
    assert published["person"] == before["person"]  # same persons, same ids
