"""Vocabulary refresh: a new Athena release, the last landed run re-mapped against it,
gated, then vocabulary and CDM swapped together in one transaction, or refused.

Steps (each callable on its own, like the nightly run's; state in the run folder):

    start_refresh -> stage_release -> extract/land (replay of the last landed run)
        -> build (against SCHEMA_vocab_next) -> diff_release -> gate -> swap -> finish_refresh

The report (report.json, `vocabulary_refresh` and `vocabulary_changes`) says what the
release changes: concepts deprecated, mappings changed, domains changed, and the source
records whose rows would move to another CDM table. A refused refresh leaves the
published vocabulary and CDM exactly as they were.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from etl.config import SiteConfig
from etl.json_text import readable
from etl.pipeline.steps import NightlyRun, RunFailed, RunResult
from etl.vocab.diff import rows_moving, vocabulary_diff
from etl.vocab.loader import (
    drop_staged_vocabulary,
    stage_vocabulary,
    staged_vocabulary_schema,
    swap_staged_vocabulary,
)
from etl.warehouse import open_warehouse

log = logging.getLogger(__name__)


def last_landed_run(workdir: Path) -> str:
    """The newest run under WORKDIR/runs whose every feed landed completely."""
    runs_dir = Path(workdir) / "runs"
    candidates = []
    for run_dir in runs_dir.iterdir() if runs_dir.is_dir() else []:
        meta_path = run_dir / "run.json"
        if not meta_path.is_file():
            continue
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        feeds = meta.get("feeds") or []
        if feeds and all((run_dir / "landing" / f / "files.json").is_file() for f in feeds):
            candidates.append((meta.get("started_at", ""), meta_path.stat().st_mtime, run_dir.name))
    if not candidates:
        raise RunFailed(f"no landed run under {runs_dir} to re-map")
    return max(candidates)[2]


def start_refresh(
    cfg: SiteConfig, workdir: Path, release: Path, replay: str | None = None
) -> NightlyRun:
    """A run that replays `replay` (default: the last landed run) against `release`."""
    release = Path(release).resolve()
    if not release.is_dir():
        raise RunFailed(f"vocabulary release {release} is not a folder")
    replay = replay or last_landed_run(workdir)
    run = NightlyRun.start(
        cfg,
        workdir,
        replay=replay,
        vocabulary_schema=staged_vocabulary_schema(cfg.schema_name),
        meta={"vocabulary_release": str(release)},
    )
    log.info("vocabulary refresh %s: %s, re-mapping run %s", run.run_id, release, replay)
    return run


def stage_release(run: NightlyRun, on_step: Callable[[str], None] | None = None) -> dict:
    """Load and check the release into the staged vocabulary schema (nothing published)."""
    with run.recorded("vocabulary", on_step) as frag, frag.step("vocabulary.stage"):
        with open_warehouse(run.cfg.warehouse) as wh:
            result = stage_vocabulary(wh, Path(run.meta["vocabulary_release"]), run.cfg.schema_name)
        summary = {
            "release": run.meta["vocabulary_release"],
            "vocabulary_version": result.vocabulary_version,
            "rows": result.rows,
            "warnings": result.warnings,
        }
        frag.report["vocabulary_refresh"] = summary
        return summary


def diff_release(run: NightlyRun, on_step: Callable[[str], None] | None = None) -> dict:
    """What the staged release changes; written to vocabulary_changes.json too."""
    with run.recorded("vocabulary_diff", on_step) as frag, frag.step("vocabulary.diff"):
        with run.warehouse() as s:
            changes = vocabulary_diff(s.wh, s.cdm, staged_vocabulary_schema(s.cdm))
            changes["rows_moving"] = rows_moving(s)
        frag.report["vocabulary_changes"] = changes
        (run.run_dir / "vocabulary_changes.json").write_text(readable(changes), encoding="utf-8")
        log.info(
            "vocabulary refresh %s: %d concept(s) deprecated, %d mapping(s) changed,"
            " %d domain change(s), %d record(s) moving table",
            run.run_id,
            changes["concepts_deprecated"],
            changes["mappings_changed"],
            changes["domains_changed"],
            sum(m["rows"] for m in changes["rows_moving"]),
        )
        return changes


def swap(run: NightlyRun, on_step: Callable[[str], None] | None = None) -> dict[str, int]:
    """Publish the re-mapped CDM and the staged vocabulary in one transaction."""

    def vocabulary(s, conn) -> None:  # type: ignore[no-untyped-def]
        swap_staged_vocabulary(s.wh, conn, s.cdm)

    tables = run.publish(on_step, also=vocabulary)
    with open_warehouse(run.cfg.warehouse) as wh:
        drop_staged_vocabulary(wh, run.cfg.schema_name)
    return tables


def finish_refresh(run: NightlyRun) -> RunResult:
    """The report; a refresh that did not publish drops its staged vocabulary."""
    result = run.finish()
    if result.status != "published":
        with open_warehouse(run.cfg.warehouse) as wh, wh.begin() as conn:
            wh.drop_schema(conn, staged_vocabulary_schema(run.cfg.schema_name))
    return result


def refresh_vocabulary(
    cfg: SiteConfig,
    workdir: Path,
    release: Path,
    *,
    replay: str | None = None,
    on_step: Callable[[str], None] | None = None,
) -> RunResult:
    """The whole refresh in this process; never raises for a bad release or a failed step."""
    run = start_refresh(cfg, workdir, release, replay)
    try:
        stage_release(run, on_step)
        for feed in run.feeds:
            run.extract(feed, on_step)
            run.land(feed, on_step)
        run.build(on_step)
        diff_release(run, on_step)
        if run.gate(on_step):
            swap(run, on_step)
    except Exception as exc:  # recorded in the step's fragment
        log.debug("vocabulary refresh %s stopped: %s", run.run_id, exc)
    return finish_refresh(run)


def summary(result: RunResult) -> dict[str, Any]:
    """What a caller (a DAG task, the CLI) prints: status, report path, change counts."""
    changes = result.report.get("vocabulary_changes", {})
    return {
        "run_id": result.run_id,
        "status": result.status,
        "report": str(result.run_dir / "report.json"),
        **{k: changes.get(k) for k in ("concepts_deprecated", "mappings_changed")},
    }
