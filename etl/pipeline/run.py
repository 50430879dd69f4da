"""One nightly run: extract every feed -> land -> stage -> map + build -> publish -> report.

Exit codes (the contract): 0 published, 1 refused by the quality gate (warehouse
unchanged), 2 failed (warehouse unchanged).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import secrets
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import sqlalchemy as sa

from etl import canonical
from etl.cdm.schema import create_cdm
from etl.config import FeedConfig, SiteConfig
from etl.mapping.local_maps import read_local_maps
from etl.paths import MAPPINGS_DIR
from etl.pipeline import report as reporting
from etl.pipeline.build import build_steps
from etl.pipeline.land import Landing, replay_into
from etl.pipeline.publish import (
    publish,
    publish_lineage,
    published_counts,
    published_tables,
)
from etl.pipeline.schemas import Schemas
from etl.pipeline.stage import prepare
from etl.pseudonym import load_key
from etl.quality.dqd_json import dqd_results
from etl.quality.expectations import run_expectations
from etl.quality.gate import run_checks
from etl.quality.plan import gate_plan
from etl.sources.ehr import FileStats, extract_ehr
from etl.sources.profile import load_profile
from etl.vocab import load_vocabulary
from etl.warehouse import open_warehouse

log = logging.getLogger(__name__)

EXIT_PUBLISHED, EXIT_REFUSED, EXIT_FAILED = 0, 1, 2


@dataclass
class RunResult:
    run_id: str
    status: str  # published | refused | failed
    exit_code: int
    run_dir: Path
    report: dict[str, Any] = field(default_factory=dict)


class RunFailed(RuntimeError):
    """A run that cannot publish; the message says why."""


def new_run_id() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ") + "-" + secrets.token_hex(3)


class _Timer:
    def __init__(self) -> None:
        self.timings: dict[str, float] = {}

    @contextmanager
    def step(self, name: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - started


def _extract_feed(
    feed: FeedConfig, cfg: SiteConfig, key: bytes | None, landing: Landing
) -> list[FileStats]:
    if not feed.path.is_dir():
        raise RunFailed(f"feed {feed.name}: {feed.path} is not a folder")
    if key is None:
        raise RunFailed("no pseudonymisation key")
    if feed.kind == "hl7v2":
        from etl.sources.hl7v2 import extract_hl7

        return extract_hl7(feed, key, landing)
    if feed.kind == "dicom":
        from etl.sources.dicom import extract_dicom

        return extract_dicom(feed, key, landing)
    profile_ref = feed.profile or "synthea"
    mappings = cfg.mappings or MAPPINGS_DIR
    candidate = mappings / "profiles" / f"{profile_ref}.yaml"
    profile = load_profile(candidate if candidate.is_file() else profile_ref)
    return extract_ehr(feed.name, feed.path, profile, key, landing, exclude=feed.exclude)


@contextmanager
def _run_log(run_dir: Path) -> Iterator[None]:
    handler = logging.FileHandler(run_dir / "run.log", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("etl")
    root.addHandler(handler)
    previous = root.level
    if root.level == logging.NOTSET or root.level > logging.INFO:
        root.setLevel(logging.INFO)
    try:
        yield
    finally:
        root.removeHandler(handler)
        root.setLevel(previous)
        handler.close()


def run_pipeline(
    cfg: SiteConfig,
    workdir: Path,
    *,
    replay: str | None = None,
    run_date: dt.date | None = None,
    on_step: Callable[[str], None] | None = None,
) -> RunResult:
    """Run the nightly job once; never raises for bad input or a failed step."""
    run_id = new_run_id()
    run_dir = Path(workdir) / "runs" / run_id
    (run_dir / "landing").mkdir(parents=True, exist_ok=True)
    timer = _Timer()
    report: dict[str, Any] = {
        "run_id": run_id,
        "status": "failed",
        "replay_of": replay,
        "started_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "warehouse": sa.engine.make_url(cfg.warehouse).render_as_string(hide_password=True),
        "cdm_schema": cfg.schema_name,
        "feeds": {},
        "tables": {},
        "unmapped": [],
        "quarantine": [],
        "filtered": [],
        "checks": [],
        "timings": timer.timings,
        "errors": [],
    }
    status, code = "failed", EXIT_FAILED
    with _run_log(run_dir):
        log.info("run %s started%s", run_id, f" (replay of {replay})" if replay else "")
        try:
            status, code = _run(
                cfg, Path(workdir), run_dir, replay, run_date, timer, report, on_step
            )
        except Exception as exc:  # a failed run must still report, and never publish
            log.error("run %s failed: %s", run_id, exc)
            log.debug("%s", traceback.format_exc())
            report["errors"].append(f"{type(exc).__name__}: {exc}")
        report["status"] = status
        report["finished_at"] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        json_path, _ = reporting.write_reports(report, run_dir)
        log.info("run %s %s; report %s", run_id, status, json_path)
    return RunResult(run_id, status, code, run_dir, report)


def _run(
    cfg: SiteConfig,
    workdir: Path,
    run_dir: Path,
    replay: str | None,
    run_date: dt.date | None,
    timer: _Timer,
    report: dict[str, Any],
    on_step: Callable[[str], None] | None,
) -> tuple[str, int]:
    def step(name: str):
        if on_step:
            on_step(name)
        return timer.step(name)

    files: dict[str, list[FileStats]] = {}
    landing_dirs = [run_dir / "landing" / feed.name for feed in cfg.feeds]
    with step("extract"):
        key = None if replay else load_key(cfg.pseudonym_key_env)
        for feed, feed_dir in zip(cfg.feeds, landing_dirs, strict=True):
            if replay:
                source = workdir / "runs" / replay / "landing" / feed.name
                files[feed.name] = replay_into(source, feed_dir)
                continue
            landing = Landing(feed_dir)
            try:
                files[feed.name] = _extract_feed(feed, cfg, key, landing)
            finally:
                landing.close(files.get(feed.name, []))
    rejected = (
        pa.concat_tables([pq.read_table(d / "quarantine.parquet") for d in landing_dirs])
        if landing_dirs
        else canonical.QUARANTINE.empty_table()
    )
    extraction_quarantine = _quarantine_summary(rejected)

    with open_warehouse(cfg.warehouse) as wh:
        s = Schemas(wh, cfg.schema_name)
        with step("vocabulary"):
            create_cdm(wh, s.cdm)
            _ensure_vocabulary(s, cfg)
        with step("stage"):
            prepare(s, landing_dirs, read_local_maps(cfg.mappings or MAPPINGS_DIR))
        with wh.begin() as conn:
            for name, fn in build_steps(cfg.site_name, run_date or dt.date.today()):
                with step(f"build.{name}"):
                    fn(s, conn)
        with step("report"), wh.begin() as conn:
            feeds, quarantine, filtered, errors = reporting.accounting(
                s, conn, files, extraction_quarantine
            )
            report.update(feeds=feeds, quarantine=quarantine, filtered=filtered)
            report["unmapped"] = reporting.unmapped_codes(s, conn)
            report["concept_gaps"] = reporting.concept_gaps(s, conn, published_tables())
            report["trace_samples"] = reporting.trace_samples(s, conn)
            _write_quarantine(s, conn, run_dir, rejected)
        if errors:
            report["errors"].extend(errors)
            raise RunFailed("row accounting does not add up; nothing published")
        sql_checks, expectations = gate_plan(published_tables(), cfg.quality)
        with step("gate"):
            gate_started = dt.datetime.now(dt.UTC)
            gate = run_checks(s, sql_checks)
        _write_dqd_results(s, run_dir, gate.checks, gate_started)
        with step("gate.great_expectations"):
            with wh.begin() as conn:
                counts = {t: wh.count_rows(conn, s.stage, t) for t in published_tables()}
            suites = run_expectations(s, expectations, counts, run_dir)
            gate.checks.extend(suites.checks)
            if suites.docs is not None:
                report["data_docs"] = str(suites.docs.relative_to(run_dir))
        report["checks"] = gate.checks
        if not gate.passed:
            for c in gate.fatal_failures:
                report["errors"].append(
                    f"refused by {c['name']} on {c['table']}.{c['field'] or ''}:"
                    f" {c['violating_rows']} of {c['total_rows']} rows"
                    f" ({c['violating_pct']:.2f}% > {c['threshold_pct']:.2f}%)"
                    + (f", e.g. ids {c['examples']}" if c.get("examples") else "")
                )
            log.error("load refused by the quality gate; the warehouse is unchanged")
            return "refused", EXIT_REFUSED
        with wh.begin() as conn:  # one transaction: CDM tables, key map, lineage
            with step("publish"):
                report["tables_before"] = published_counts(s, conn)
                report["tables"] = publish(s, conn)
            with step("publish.lineage"):
                publish_lineage(s, conn, run_dir.name)
        with wh.begin() as conn:
            wh.drop_schema(conn, s.stage)
    return "published", EXIT_PUBLISHED


def _write_dqd_results(
    s: Schemas, run_dir: Path, checks: list[dict[str, Any]], started: dt.datetime
) -> None:
    """The checks in DQD's results layout, for DQD's viewer and OHDSI Ares."""
    with s.wh.begin() as conn:
        source = s.run(conn, "SELECT * FROM {S}.cdm_source").mappings().first()
    results = dqd_results(checks, started, dt.datetime.now(dt.UTC), dict(source or {}))
    (run_dir / "dqd_results.json").write_text(
        json.dumps(results, indent=1, default=str), encoding="utf-8"
    )


def _ensure_vocabulary(s: Schemas, cfg: SiteConfig) -> None:
    with s.wh.begin() as conn:
        concepts = s.wh.count_rows(conn, s.cdm, "concept")
    if concepts == 0:
        if cfg.vocabulary is None:
            raise RunFailed("the warehouse has no vocabulary and the config names none")
        log.info("no vocabulary in %s yet: loading %s", s.cdm, cfg.vocabulary)
        load_vocabulary(s.wh, cfg.vocabulary, s.cdm)


def _quarantine_summary(quarantine: pa.Table) -> list[dict[str, Any]]:
    if quarantine.num_rows == 0:
        return []
    grouped = quarantine.group_by(["feed", "source_file", "reason"]).aggregate(
        [("source_line", "count")]
    )
    return [
        {
            "feed": r["feed"],
            "file": r["source_file"],
            "reason": r["reason"],
            "rows": r["source_line_count"],
        }
        for r in grouped.to_pylist()
    ]


def _write_quarantine(s: Schemas, conn: sa.Connection, run_dir: Path, extraction: pa.Table) -> None:
    """The run's quarantine files: what extraction rejected, and what the build set aside."""
    out = run_dir / "quarantine"
    out.mkdir(exist_ok=True)
    pq.write_table(extraction, out / "extraction.parquet")
    table = s.wh.fetch_arrow(
        conn,
        s.sql(
            "SELECT feed, source_file, source_line, record_set, status, rule"
            " FROM {S}.disposition ORDER BY feed, source_file, source_line"
        ),
    )
    pq.write_table(table, out / "build.parquet")
