"""The nightly run as separately callable steps whose state lives in the run folder.

`NightlyRun.start` writes `runs/RUN_ID/run.json`; every later step can run in another
process (an Airflow task, a retry) from `NightlyRun.resume(cfg, workdir, run_id)`:

    start -> extract(feed) -> land(feed)   (per feed, in any order or in parallel)
          -> build -> gate -> publish -> finish

State between steps: landed Parquet under `landing/FEED/` (a feed is moved there from
`landing/.FEED.partial/` only once its extraction completed), the build in the stage
schema (stamped with the run id, so a step never gates or publishes another run's build),
and one JSON fragment per step under `steps/` (its part of the report, its timings, its
error). A retried step overwrites its fragment. `finish` merges the fragments into
report.json and report.html.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import re
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.parquet as pq
import sqlalchemy as sa

# SQLAlchemy's ORM, imported here, before the gate's Great Expectations thread imports it:
# the gate's own SQLAlchemy calls load parts of it lazily, and the two threads importing it
# at once left one with a partially initialised module ("sqlalchemy.orm.exc has no
# attribute UnmappedClassError"), which failed the gate on PostgreSQL now and then
import sqlalchemy.orm

from etl import canonical
from etl.cdm.build.merges import merge_summary, publish_merges
from etl.cdm.schema import create_cdm
from etl.config import FeedConfig, SiteConfig
from etl.huge_pages import disable_transparent_huge_pages
from etl.json_text import readable
from etl.mapping.local_maps import read_local_maps
from etl.paths import MAPPINGS_DIR
from etl.pipeline import report as reporting
from etl.pipeline import scope
from etl.pipeline.build import build_steps
from etl.pipeline.delta import TOUCHED_PERSONS
from etl.pipeline.land import Landing, read_file_stats, replay_into
from etl.pipeline.lock import LockBusy, warehouse_lock
from etl.pipeline.publish import (
    prepare_tables,
    prepares_first,
    publish,
    publish_lineage,
    published_counts,
    published_tables,
    set_aside_build,
    tonight_in_cdm,
)
from etl.pipeline.schemas import Schemas
from etl.pipeline.stage import prepare
from etl.pseudonym import load_key
from etl.quality.dqd_json import dqd_results
from etl.quality.gate import run_checks
from etl.quality.plan import expectation_plan, sql_plan
from etl.sources.ehr import FileStats, extract_ehr
from etl.sources.merges import extract_merges
from etl.sources.profile import load_profile
from etl.vocab import load_vocabulary
from etl.warehouse import open_warehouse

if TYPE_CHECKING:  # Great Expectations is imported by the gate, in its own thread
    from etl.quality.expectations import SuiteResult

log = logging.getLogger(__name__)

EXIT_PUBLISHED, EXIT_REFUSED, EXIT_FAILED = 0, 1, 2
EXIT_CODES = {"published": EXIT_PUBLISHED, "refused": EXIT_REFUSED, "failed": EXIT_FAILED}
_RUN_ID = re.compile(r"[0-9A-Za-z_-]+")
_STAMP = "etl_run"  # the stage's owner: one row, the run id


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
    import secrets

    return dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ") + "-" + secrets.token_hex(3)


def warehouse_label(url: str) -> str:
    """The warehouse URL as reports and logs show it: the password hidden."""
    return sa.engine.make_url(url).render_as_string(hide_password=True)


FEED_WORKERS = 2  # feeds extracted at once by NightlyRun.extract_all
# run.log handlers open now: path -> (handler, blocks using it, the etl logger's level
# before the first); steps running side by side (the feeds' extractions) share one
_RUN_LOGS: dict[Path, tuple[logging.Handler, int, int]] = {}
_RUN_LOGS_LOCK = threading.Lock()


@contextmanager
def run_log(run_dir: Path) -> Iterator[None]:
    """Append the `etl` loggers' records to the run's run.log while the block runs.

    Blocks that overlap (in threads) share one handler, so each record is written once."""
    path = (run_dir / "run.log").resolve()
    root = logging.getLogger("etl")
    with _RUN_LOGS_LOCK:
        if path in _RUN_LOGS:
            handler, users, previous = _RUN_LOGS[path]
            _RUN_LOGS[path] = (handler, users + 1, previous)
        else:
            handler = logging.FileHandler(path, encoding="utf-8")
            fmt = "%(asctime)s %(levelname)s %(name)s: %(message)s"
            handler.setFormatter(logging.Formatter(fmt))
            root.addHandler(handler)
            _RUN_LOGS[path] = (handler, 1, root.level)
            if root.level == logging.NOTSET or root.level > logging.INFO:
                root.setLevel(logging.INFO)
    try:
        yield
    finally:
        with _RUN_LOGS_LOCK:
            handler, users, previous = _RUN_LOGS[path]
            if users > 1:
                _RUN_LOGS[path] = (handler, users - 1, previous)
            else:
                del _RUN_LOGS[path]
                root.removeHandler(handler)
                root.setLevel(previous)
                handler.close()


class _Fragment:
    """One step's share of the report: report keys, timings, errors (steps/NAME.json)."""

    def __init__(self, on_step: Callable[[str], None] | None) -> None:
        self.report: dict[str, Any] = {}
        self.timings: dict[str, float] = {}
        self.errors: list[str] = []
        self.state: dict[str, Any] = {}
        self._on_step = on_step

    @contextmanager
    def step(self, name: str) -> Iterator[None]:
        if self._on_step:
            self._on_step(name)
        started = time.perf_counter()
        try:
            yield
        finally:
            self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - started

    def as_json(self) -> dict[str, Any]:
        return {
            "report": self.report,
            "timings": self.timings,
            "errors": self.errors,
            "state": self.state,
        }


class NightlyRun:
    """One run of the pipeline, resumable step by step from its run folder."""

    # steps/NAME.json fragments of other steps (the vocabulary refresh), merged by finish
    EXTRA_FRAGMENTS = ("vocabulary", "vocabulary_diff")

    def __init__(self, cfg: SiteConfig, workdir: Path, run_id: str) -> None:
        if not _RUN_ID.fullmatch(run_id):
            raise ValueError(f"unexpected run id {run_id!r}")
        self.cfg = cfg
        self.workdir = Path(workdir)
        self.run_id = run_id
        self.run_dir = self.workdir / "runs" / run_id
        self.meta: dict[str, Any] = {}
        # every step, in whatever process runs it (etl/huge_pages.py: without them the
        # EHR feed took 12% less CPU at 100,000 patients)
        disable_transparent_huge_pages()

    # -- lifecycle ---------------------------------------------------------------------
    @classmethod
    def start(
        cls,
        cfg: SiteConfig,
        workdir: Path,
        *,
        replay: str | None = None,
        run_date: dt.date | None = None,
        vocabulary_schema: str | None = None,
        meta: dict[str, Any] | None = None,
    ) -> NightlyRun:
        """Create the run folder and its run.json; nothing is read from the feeds yet.

        `vocabulary_schema`: build against a staged vocabulary instead of the published
        one (the vocabulary refresh); `meta`: more to keep in run.json."""
        run = cls(cfg, workdir, new_run_id())
        if replay is not None and not _RUN_ID.fullmatch(replay):
            raise ValueError(f"unexpected run id {replay!r}")
        (run.run_dir / "landing").mkdir(parents=True, exist_ok=True)
        (run.run_dir / "steps").mkdir(exist_ok=True)
        run.meta = {
            "run_id": run.run_id,
            "replay_of": replay,
            "run_date": (run_date or dt.date.today()).isoformat(),
            "started_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "feeds": [f.name for f in cfg.feeds],
            "vocabulary_schema": vocabulary_schema,
            **(meta or {}),
        }
        if replay is None and any(f.delivery == "delta" for f in cfg.feeds):
            # the state delta feeds are applied to: the run published now (read here, once,
            # so extractions running side by side never open the warehouse)
            with open_warehouse(cfg.warehouse) as wh:
                run.meta["delta_base_run"] = _published_run(Schemas(wh, cfg.schema_name))
        (run.run_dir / "run.json").write_text(readable(run.meta, 2), encoding="utf-8")
        with run_log(run.run_dir):
            log.info("run %s started%s", run.run_id, f" (replay of {replay})" if replay else "")
        return run

    @classmethod
    def resume(cls, cfg: SiteConfig, workdir: Path, run_id: str) -> NightlyRun:
        """The run `run_id` as its run folder describes it (from another process)."""
        run = cls(cfg, workdir, run_id)
        path = run.run_dir / "run.json"
        if not path.is_file():
            raise RunFailed(f"no run {run_id} under {run.workdir / 'runs'}")
        run.meta = json.loads(path.read_text(encoding="utf-8"))
        return run

    @property
    def replay_of(self) -> str | None:
        return self.meta.get("replay_of")

    @property
    def feeds(self) -> list[str]:
        return list(self.meta["feeds"])

    def landing_dir(self, feed: str) -> Path:
        return self.run_dir / "landing" / feed

    def fragment_path(self, name: str) -> Path:
        return self.run_dir / "steps" / f"{name}.json"

    def fragment(self, name: str) -> dict[str, Any] | None:
        path = self.fragment_path(name)
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None

    @contextmanager
    def recorded(self, name: str, on_step: Callable[[str], None] | None) -> Iterator[_Fragment]:
        """A step: logs to run.log, records its error, always writes steps/NAME.json."""
        frag = _Fragment(on_step)
        with run_log(self.run_dir):
            try:
                yield frag
            except Exception as exc:
                log.error("run %s: %s failed: %s", self.run_id, name, exc)
                frag.errors.append(f"{type(exc).__name__}: {exc}")
                raise
            finally:
                self.fragment_path(name).write_text(readable(frag.as_json()), encoding="utf-8")

    @contextmanager
    def warehouse(self) -> Iterator[Schemas]:
        """The warehouse and the run's schemas (its vocabulary: staged or published),
        under the warehouse's run lock: one run at a time builds, gates or publishes."""
        with (
            warehouse_lock(self.cfg.warehouse, self.cfg.schema_name, self.run_id),
            open_warehouse(self.cfg.warehouse) as wh,
        ):
            yield Schemas(wh, self.cfg.schema_name, self.meta.get("vocabulary_schema"))

    # -- extract and land --------------------------------------------------------------
    def _feed(self, name: str) -> FeedConfig:
        for feed in self.cfg.feeds:
            if feed.name == name:
                return feed
        raise RunFailed(f"run {self.run_id}: no feed {name!r} in the site config")

    def _partial_dir(self, feed: str) -> Path:
        return self.run_dir / "landing" / f".{feed}.partial"

    def extract(
        self, feed: str, on_step: Callable[[str], None] | None = None, *, cores: int | None = None
    ) -> int:
        """Extract one feed (or copy it from the replayed run) into its partial landing.

        `cores`: the CPUs the feed may use (`extract_all`: the machine's, shared by the
        feeds extracted at once); default all of them."""
        with self.recorded(f"extract.{feed}", on_step) as frag:
            partial = self._partial_dir(feed)
            if partial.exists():
                shutil.rmtree(partial)  # a retried extraction starts over
            with frag.step("extract"):
                if self.replay_of:
                    source = self.workdir / "runs" / self.replay_of / "landing" / feed
                    files = replay_into(source, partial)
                else:
                    files = self._extract_feed(self._feed(feed), partial, frag, cores)
            n = sum(f.records_in for f in files)
            log.info("run %s: feed %s extracted, %d record(s) in", self.run_id, feed, n)
            return n

    def _extract_feed(
        self, feed: FeedConfig, partial: Path, frag: _Fragment, cores: int | None = None
    ) -> list[FileStats]:
        if not feed.path.is_dir():
            raise RunFailed(f"feed {feed.name}: {feed.path} is not a folder")
        key = load_key(self.cfg.pseudonym_key_env)
        if key is None:
            raise RunFailed("no pseudonymisation key")
        target = (
            partial if feed.delivery == "snapshot" else partial.with_name(f".{feed.name}.delivery")
        )
        if target.exists():
            shutil.rmtree(target)
        landing = Landing(target)
        files: list[FileStats] = []
        try:
            files = _dispatch(feed, self.cfg, key, landing, cores)
            if feed.delivery == "delta" and feed.kind == "ehr_csv":
                files += _extract_deletions(feed, self.cfg, key, landing)
        finally:
            landing.close(files)
        if feed.delivery == "delta":
            files = self._apply_delta(feed, target, partial, frag)
        return files

    def _apply_delta(
        self, feed: FeedConfig, delivery: Path, partial: Path, frag: _Fragment
    ) -> list[FileStats]:
        """Tonight's delivery applied to the feed's state as the published run landed it."""
        from etl.pipeline.delta import consolidate, prefix_source_files

        files = prefix_source_files(delivery, self.run_id)
        if "delta_base_run" in self.meta:
            base_run = self.meta["delta_base_run"]
        else:  # a run started without delta feeds in its config
            with open_warehouse(self.cfg.warehouse) as wh:
                base_run = _published_run(Schemas(wh, self.cfg.schema_name))
        base = None
        if base_run is not None:
            base = self.workdir / "runs" / base_run / "landing" / feed.name
            if not (base / "files.json").is_file():
                raise RunFailed(
                    f"feed {feed.name} delivers deltas, but the state the published run"
                    f" {base_run} landed is not in {base}: deliver one full snapshot"
                    " (delivery: snapshot) to start the feed's state again"
                )
        summary = consolidate(base, delivery, partial, base_run)
        shutil.rmtree(delivery)
        frag.state["delta_base"] = base_run
        frag.report["deltas"] = {feed.name: summary.as_json()}
        return files

    def land(self, feed: str, on_step: Callable[[str], None] | None = None) -> dict[str, int]:
        """Check a feed's extraction is complete and move it into the landing area."""
        with self.recorded(f"land.{feed}", on_step) as frag, frag.step("land"):
            partial, final = self._partial_dir(feed), self.landing_dir(feed)
            if not (partial / "files.json").is_file():
                if (final / "files.json").is_file():
                    return _landed_rows(final)  # landed by a previous try
                raise RunFailed(f"feed {feed}: nothing extracted to land")
            for shape in canonical.SHAPES:
                pq.ParquetFile(partial / f"{shape}.parquet")  # complete and readable
            if final.exists():
                shutil.rmtree(final)
            partial.rename(final)
            rows = _landed_rows(final)
            frag.state["rows"] = rows
            log.info("run %s: feed %s landed: %s", self.run_id, feed, rows)
            return rows

    def extract_all(
        self, on_step: Callable[[str], None] | None = None, *, workers: int = FEED_WORKERS
    ) -> None:
        """Extract and land every feed, `workers` feeds at a time, in the config's order.

        One EHR extraction keeps about 1.6 of 2 vCPUs busy; the lab and PACS feeds fill
        the rest beside it (as the nightly DAG's mapped feed tasks run). Each feed is
        given its share of the machine's CPUs (`extract`'s `cores`): on 2 vCPUs with two
        feeds at once, the lab feed parses its files in its own thread rather than in
        two processes beside the EHR's (at a million patients the phase took 5% less
        time and 8% less CPU: bench/HISTORY.md, thirty-fifth session), and the PACS
        feed reads its headers in its own thread too (the same time, 3-5% less CPU:
        thirty-sixth session). What each feed lands is the same as alone: feeds share
        nothing but the run's log. `on_step` sees `extract` once, for the whole phase; the
        report's `extract` sums each feed's own time, `extract.wall` is the phase's. After
        a failure no other feed starts; those running finish (their landings are kept for
        a retry), then the error is raised."""
        failed = threading.Event()

        at_once = max(1, min(workers, len(self.feeds)))
        cores = max(1, (os.cpu_count() or 1) // at_once)

        def one(feed: str) -> None:
            if failed.is_set():
                return
            try:
                self.extract(feed, cores=cores)
                self.land(feed)
            except BaseException:
                failed.set()
                raise

        with self.recorded("extract", None) as frag:  # each feed records its own error
            if on_step:
                on_step("extract")
            started = time.perf_counter()
            with ThreadPoolExecutor(max(1, workers), thread_name_prefix="feed") as pool:
                futures = [pool.submit(one, feed) for feed in self.feeds]
            frag.timings["extract.wall"] = time.perf_counter() - started
        errors = [e for f in futures if (e := f.exception()) is not None]
        if errors:
            raise errors[0]  # the first in the config's order

    # -- build, gate, publish ----------------------------------------------------------
    def build(self, on_step: Callable[[str], None] | None = None) -> None:
        """Stage the landed records and build the CDM tables in the stage schema."""
        with self.recorded("build", on_step) as frag:
            landed = self._landed()
            with self.warehouse() as s:
                self._stage(frag, s, landed)
                fp = scope.fingerprint(s, self.cfg, self.cfg.mappings or MAPPINGS_DIR)
                frag.state["fingerprint"] = fp
                reason = self._full_build_reason(s, fp)
                if reason is None:
                    frag.report["build_scope"] = self._scoped_build(frag, s)
                else:
                    log.info("run %s: full build (%s)", self.run_id, reason)
                    frag.report["build_scope"] = {"mode": "full", "reason": reason}
                    with s.wh.begin() as conn:
                        for name, fn in self._build_steps():
                            with frag.step(f"build.{name}"):
                                fn(s, conn)
                errors = self._build_report(frag, s, landed)
            if errors:
                frag.errors.extend(errors)
                raise RunFailed("row accounting does not add up; nothing published")

    # -- a person-scoped build (etl/pipeline/scope.py) ---------------------------------
    def _full_build_reason(self, s: Schemas, fp: str) -> str | None:
        """Why tonight's build must be a full one; None when only the patients the delta
        deliveries touched need rebuilding."""
        if os.environ.get(scope.SCOPE_ENV, "").strip().lower() == "full":
            return f"{scope.SCOPE_ENV}=full"
        if self.replay_of:
            return f"a replay of run {self.replay_of}"
        if self.meta.get("vocabulary_schema"):
            return "a build against a staged vocabulary"
        snapshots = [f for f in self.feeds if self._feed(f).delivery != "delta"]
        if snapshots:
            return f"snapshot feed(s): {', '.join(snapshots)}"
        base = self.meta.get("delta_base_run")
        if base is None:
            return "no published state yet: the first delivery"
        for feed in self.feeds:
            frag = self.fragment(f"extract.{feed}") or {}
            if frag.get("state", {}).get("delta_base") != base:
                return f"feed {feed} was not applied to run {base}'s state"
            touched = frag.get("report", {}).get("deltas", {}).get(feed, {})
            if (
                "reference_touched" not in touched
                or not (self.landing_dir(feed) / TOUCHED_PERSONS).is_file()
            ):
                return f"feed {feed}'s extraction did not record the patients it touched"
            if touched["reference_touched"]:
                changed = ", ".join(sorted(touched["reference_touched"]))
                return f"feed {feed} changed look-up records ({changed}) that every patient uses"
        published = _published_run(s)
        if published != base:
            return f"run {published} has published since run {base}"
        base_build = self.workdir / "runs" / base / "steps" / "build.json"
        base_fp = (
            json.loads(base_build.read_text(encoding="utf-8"))["state"].get("fingerprint")
            if base_build.is_file()
            else None
        )
        if base_fp != fp:
            return (
                f"the ETL code, local maps, feed settings or vocabulary differ from those"
                f" of run {base}'s build"
            )
        with s.wh.begin() as conn:
            unsplittable = scope.unsplittable_tables(s, conn)
        if unsplittable:
            return f"published table(s) {', '.join(unsplittable)} cannot be split by patient"
        return None

    def _scoped_build(self, frag: _Fragment, s: Schemas) -> dict[str, Any]:
        """The global steps over every record, the per-person steps over the touched
        patients, the other patients' rows copied from the warehouse; `build_scope`."""
        from etl.pipeline import shards as sharding

        global_steps, person_steps = sharding.split_steps(self._build_steps())
        with s.wh.begin() as conn:
            for name, fn in global_steps:
                with frag.step(f"build.{name}"):
                    fn(s, conn)
            with frag.step("build.scope"):
                touched = [self.landing_dir(f) / TOUCHED_PERSONS for f in self.feeds]
                scoped, persons = scope.create_scope(s, conn, touched)
            if scoped > scope.MAX_SCOPE_SHARE * persons:
                reason = f"{scoped} of {persons} patients touched: more than half"
                log.info("run %s: full build (%s)", self.run_id, reason)
                for name, fn in person_steps:
                    with frag.step(f"build.{name}"):
                        fn(s, conn)
                return {"mode": "full", "reason": reason}
        log.info(
            "run %s: rebuilding %d of %d patients; the others' rows come from the warehouse",
            self.run_id,
            scoped,
            persons,
        )
        sharding.build_shard(s, 0, 1, self.run_id, person_steps, frag.step, scoped=True)
        with frag.step("build.merge"), s.wh.begin() as conn:
            sharding.merge_shards(s, conn, 1, self.run_id)
        with frag.step("build.copy_untouched"), s.wh.begin() as conn:
            copied = scope.splice_published(s, conn)
        return {
            "mode": "persons",
            "persons": persons,
            "persons_rebuilt": scoped,
            "rows_copied": sum(copied.values()),
        }

    # -- a person-sharded build: build_global -> build_shard(k) for each k -> merge_shards
    @property
    def shards(self) -> int:
        """How many shards this run's build has (1: one build, `build`)."""
        frag = self.fragment("build")
        return int(frag["state"].get("shards", 1)) if frag else 1

    def build_global(
        self, shards: int = 1, on_step: Callable[[str], None] | None = None
    ) -> list[int]:
        """The first part of a build in `shards` shards of persons (etl/pipeline/shards.py):
        stage the landed records and run the global steps. The shard numbers to build
        (`build_shard`) before `merge_shards`; with one shard, the whole build (`build`)."""
        if shards < 1:
            raise ValueError(f"shards must be at least 1, not {shards}")
        if shards == 1:
            self.build(on_step)
            return [0]
        from etl.pipeline import shards as sharding

        with self.recorded("build", on_step) as frag:
            frag.state["shards"] = shards
            landed = self._landed()
            global_steps, _ = sharding.split_steps(self._build_steps())
            with self.warehouse() as s:
                self._stage(frag, s, landed)
                frag.state["fingerprint"] = scope.fingerprint(
                    s, self.cfg, self.cfg.mappings or MAPPINGS_DIR
                )
                frag.report["build_scope"] = {"mode": "full", "reason": "a person-sharded build"}
                with s.wh.begin() as conn:
                    for name, fn in global_steps:
                        with frag.step(f"build.{name}"):
                            fn(s, conn)
            log.info("run %s: global build steps done; %d shards to build", self.run_id, shards)
        return list(range(shards))

    def build_shard(self, shard: int, on_step: Callable[[str], None] | None = None) -> dict:
        """Build shard `shard` (0..N-1) of a sharded build in its own stage schema; rows
        per CDM table. Shards touch only their own schema and take no run lock, so they can
        run at the same time (the merge, under the lock, checks they are this run's)."""
        n = self.shards
        if n == 1 and shard == 0:
            return {}  # one shard: `build` built everything
        from etl.pipeline import shards as sharding

        with self.recorded(f"build.shard{shard}", on_step) as frag:
            _, shard_steps = sharding.split_steps(self._build_steps())
            with self._shard_warehouse() as s:
                self._check_stamp(s)
                rows = sharding.build_shard(s, shard, n, self.run_id, shard_steps, frag.step)
            frag.state["rows"] = rows
            return rows

    @contextmanager
    def _shard_warehouse(self) -> Iterator[Schemas]:
        """PostgreSQL: the warehouse without the run lock (shards run side by side).
        DuckDB: under the lock, as its single writer serialises the shards anyway; a
        shard task that finds it busy is retried (LockBusy)."""
        if self.cfg.warehouse.startswith("duckdb"):
            with self.warehouse() as s:
                yield s
            return
        with open_warehouse(self.cfg.warehouse) as wh:
            yield Schemas(wh, self.cfg.schema_name, self.meta.get("vocabulary_schema"))

    def merge_shards(self, on_step: Callable[[str], None] | None = None) -> None:
        """Merge the built shards into the stage schema (ids as one build numbers them)
        and write the build's part of the report; nothing to do for a one-shard build."""
        n = self.shards
        if n == 1:
            return
        from etl.pipeline import shards as sharding

        with self.recorded("build.merge", on_step) as frag:
            landed = self._landed()
            with self.warehouse() as s:
                self._check_stamp(s)
                with frag.step("build.merge"), s.wh.begin() as conn:
                    if not sharding.merged(conn, s):  # a retry after the commit: done
                        frag.state["rows"] = sharding.merge_shards(s, conn, n, self.run_id)
                errors = self._build_report(frag, s, landed)
            if errors:
                frag.errors.extend(errors)
                raise RunFailed("row accounting does not add up; nothing published")

    # -- the build's parts ---------------------------------------------------------------
    def _landed(self) -> tuple[list[Path], dict[str, list[FileStats]], pa.Table]:
        """The landed feeds: their folders, file statistics and extraction rejects."""
        missing = [f for f in self.feeds if not (self.landing_dir(f) / "files.json").is_file()]
        if missing:
            raise RunFailed(f"feed(s) not landed: {', '.join(missing)}")
        dirs = [self.landing_dir(f) for f in self.feeds]
        files = {f: read_file_stats(self.landing_dir(f)) for f in self.feeds}
        rejected = (
            pa.concat_tables([pq.read_table(d / "quarantine.parquet") for d in dirs])
            if dirs
            else canonical.QUARANTINE.empty_table()
        )
        return dirs, files, rejected

    def _build_steps(self) -> list[tuple[str, Callable]]:
        return build_steps(self.cfg.site_name, dt.date.fromisoformat(self.meta["run_date"]))

    def _stage(self, frag: _Fragment, s: Schemas, landed: tuple) -> None:
        """The vocabulary (when none is loaded yet) and a fresh stage schema, stamped."""
        with frag.step("vocabulary"):
            create_cdm(s.wh, s.cdm)
            if s.vocab is None:
                _ensure_vocabulary(s, self.cfg)
        with frag.step("stage"):
            prepare(s, landed[0], read_local_maps(self.cfg.mappings or MAPPINGS_DIR), self.run_id)
            self._stamp(s)

    def _build_report(self, frag: _Fragment, s: Schemas, landed: tuple) -> list[str]:
        """The build's part of the report (row accounting, unmapped codes, concept gaps,
        trace samples) and the quarantine files; the accounting errors."""
        _, files, rejected = landed
        with frag.step("report"), s.wh.begin() as conn:
            feeds, quarantine, filtered, errors = reporting.accounting(
                s, conn, files, _quarantine_summary(rejected)
            )
            frag.report.update(feeds=feeds, quarantine=quarantine, filtered=filtered)
            frag.report["unmapped"] = reporting.unmapped_codes(s, conn)
            frag.report["concept_gaps"] = reporting.concept_gaps(s, conn, published_tables())
            frag.report["trace_samples"] = reporting.trace_samples(s, conn)
            frag.report["merges"] = merge_summary(s, conn)
            _write_quarantine(s, conn, self.run_dir, rejected)
        return errors

    def gate(self, on_step: Callable[[str], None] | None = None) -> bool:
        """Run the quality gate on the staged build; False when it refuses the load."""
        with self.recorded("gate", on_step) as frag, self.warehouse() as stage:
            self._check_stamp(stage)
            # the checks read the built tables themselves, not their views in the stage
            # (`Schemas.reading_built`), unless the end of a run set them aside there
            s = stage.reading_built() if tonight_in_cdm(stage) else stage
            tables = published_tables()
            sql_checks = sql_plan(tables, self.cfg.quality)
            with s.wh.begin() as conn:
                counts = {t: s.wh.count_rows(conn, s.stage, t) for t in tables}

            def great_expectations() -> SuiteResult:
                # imported here, in GE's thread: Great Expectations takes seconds to import
                # (7 s at the start of the gate on a slow host), which now run beside the
                # DQD checks, and which a process that only builds (a shard worker) never
                # spends. The checks' thread imports nothing meanwhile.
                from etl.quality.expectations import run_expectations

                expectations = expectation_plan(tables, self.cfg.quality)
                return run_expectations(s, expectations, counts, self.run_dir)

            # GE validates beside the keying and the DQD checks: its work is mostly Python
            # (pandas), theirs is in the engine, so on two cores they overlap. GE only
            # reads; the keying changes no row, and a scan that began before it reads on.
            # `gate.great_expectations` is the wait for GE once the checks are done, so
            # the step timings still add up to the run; GE logs its own duration.
            with ThreadPoolExecutor(1, thread_name_prefix="great-expectations") as pool:
                pending = pool.submit(great_expectations)
                if s.reads_built:
                    with frag.step("gate.keys"):
                        _key_before_checks(stage)
                with frag.step("gate"):
                    gate_started = dt.datetime.now(dt.UTC)
                    gate = run_checks(s, sql_checks)
                _write_dqd_results(s, self.run_dir, gate.checks, gate_started)
                with frag.step("gate.great_expectations"):
                    suites = pending.result()
            gate.checks.extend(suites.checks)
            if suites.docs is not None:
                frag.report["data_docs"] = str(suites.docs.relative_to(self.run_dir))
            frag.report["checks"] = gate.checks
            frag.state["passed"] = gate.passed
            if not gate.passed:
                for c in gate.fatal_failures:
                    frag.errors.append(
                        f"refused by {c['name']} on {c['table']}.{c['field'] or ''}:"
                        f" {c['violating_rows']} of {c['total_rows']} rows"
                        f" ({c['violating_pct']:.2f}% > {c['threshold_pct']:.2f}%)"
                        + (f", e.g. ids {c['examples']}" if c.get("examples") else "")
                    )
                log.error("load refused by the quality gate; the warehouse is unchanged")
            return gate.passed

    def publish(
        self,
        on_step: Callable[[str], None] | None = None,
        *,
        also: Callable[[Schemas, sa.Connection], None] | None = None,
    ) -> dict[str, int]:
        """Swap the gated build into the CDM schema in one transaction (with `also`, e.g.
        the staged vocabulary, inside the same transaction); rows per published table."""
        with self.recorded("publish", on_step) as frag, self.warehouse() as s:
            gate = self.fragment("gate")
            if not (gate and gate["state"].get("passed")):
                raise RunFailed("the quality gate has not passed this run; nothing published")
            if self._published_run(s) == self.run_id:  # a retry after the commit
                log.warning("run %s was already published; not publishing twice", self.run_id)
                with s.wh.begin() as conn:
                    frag.report["tables"] = published_counts(s, conn)
                frag.state["published"] = True
                return frag.report["tables"]
            self._check_delta_bases(s)
            # DuckDB: tonight's tables, built in the CDM schema, keyed there first, so
            # that the swap below only renames them
            prepared = prepares_first(s)
            if prepared:
                self._check_stamp(s)
                with frag.step("publish.prepare"):
                    prepare_tables(s)
            with s.wh.begin() as conn:  # one transaction: CDM tables, key map, lineage
                self._check_stamp(s, conn)
                with frag.step("publish"):
                    frag.report["tables_before"] = published_counts(s, conn)
                    frag.report["tables"] = publish(s, conn, prepared=prepared)
                if also is not None:
                    with frag.step("publish.vocabulary"):
                        also(s, conn)
                with frag.step("publish.lineage"):
                    publish_lineage(s, conn, self.run_id)
                    publish_merges(s, conn, self.run_id)
                s.run(conn, "DROP TABLE {S}.{t}", t=_STAMP)  # this build is spent
            frag.state["published"] = True
            log.info("run %s published into %s", self.run_id, s.cdm)
            try:
                with s.wh.begin() as conn:
                    s.wh.drop_schema(conn, s.stage)
            except Exception as exc:  # published all the same; the next build drops it
                log.warning("run %s: could not drop %s: %s", self.run_id, s.stage, exc)
            return frag.report["tables"]

    def _published_run(self, s: Schemas) -> str | None:
        return _published_run(s)

    def _check_delta_bases(self, s: Schemas) -> None:
        """A delta feed was applied to the state of the run published then: refuse when
        another run has published since (its changes would be lost)."""
        if self.replay_of:
            return
        published = _published_run(s)
        for feed in self.feeds:
            frag = self.fragment(f"extract.{feed}") or {}
            state = frag.get("state", {})
            if "delta_base" in state and state["delta_base"] != published:
                raise RunFailed(
                    f"feed {feed}'s delivery was applied to the state of run"
                    f" {state['delta_base']}, but run {published} has published since:"
                    " run again so the delivery applies to the current state"
                )

    # -- the report --------------------------------------------------------------------
    def status(self) -> str:
        publish_frag = self.fragment("publish")
        if publish_frag and publish_frag["state"].get("published"):
            return "published"
        gate = self.fragment("gate")
        if gate and gate["state"].get("passed") is False:
            return "refused"
        return "failed"

    def finish(self, extra: dict[str, Any] | None = None) -> RunResult:
        """Merge the steps' fragments into report.json and report.html; the run's result.
        A run that did not publish sets its build aside (`publish.set_aside_build`)."""
        status = self.status()
        if status != "published":
            self._set_aside_build()
        report: dict[str, Any] = {
            "run_id": self.run_id,
            "status": status,
            "replay_of": self.replay_of,
            "started_at": self.meta["started_at"],
            "warehouse": warehouse_label(self.cfg.warehouse),
            "cdm_schema": self.cfg.schema_name,
            "feeds": {},
            "tables": {},
            "unmapped": [],
            "quarantine": [],
            "filtered": [],
            "checks": [],
            "timings": {},
            "errors": [],
        }
        names = ["extract"] + [f"extract.{f}" for f in self.feeds]
        names += [f"land.{f}" for f in self.feeds]
        sharded = [f"build.shard{k}" for k in range(self.shards)] + ["build.merge"]
        for name in [*names, *self.EXTRA_FRAGMENTS, "build", *sharded, "gate", "publish"]:
            frag = self.fragment(name)
            if frag is None:
                continue
            for k, v in frag["report"].items():
                if k == "deltas":  # one entry per delta feed, from each feed's extraction
                    report.setdefault(k, {}).update(v)
                else:
                    report[k] = v
            for k, v in frag["timings"].items():
                report["timings"][k] = report["timings"].get(k, 0.0) + v
            report["errors"].extend(frag["errors"])
        if extra:
            report.update(extra)
        report["finished_at"] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        with run_log(self.run_dir):
            json_path, _ = reporting.write_reports(report, self.run_dir)
            log.info("run %s %s; report %s", self.run_id, status, json_path)
        return RunResult(self.run_id, status, EXIT_CODES[status], self.run_dir, report)

    @property
    def report_path(self) -> Path:
        return self.run_dir / "report.json"

    def _set_aside_build(self) -> None:
        """On DuckDB, this run's unpublished tables out of the CDM schema, into its stage
        (only while the stage is this run's: never another run's build)."""
        if not self.cfg.warehouse.startswith("duckdb"):
            return
        try:
            with run_log(self.run_dir), self.warehouse() as s:
                if not s.tables_in_cdm or self._stamped_run(s) != self.run_id:
                    return
                started = time.perf_counter()
                moved = set_aside_build(s)
                if moved:
                    log.info(
                        "run %s not published: its %d tables moved from %s to %s in %.1fs",
                        self.run_id, len(moved), s.cdm, s.stage, time.perf_counter() - started,
                    )  # fmt: skip
        except LockBusy:  # another run holds the warehouse: the stage is not this run's
            return
        except Exception as exc:  # the next build drops them
            log.warning("run %s: could not set its build aside: %s", self.run_id, exc)

    # -- the stage's owner -------------------------------------------------------------
    def _stamp(self, s: Schemas) -> None:
        with s.wh.begin() as conn:
            s.run(conn, "CREATE TABLE {S}.{t} (run_id VARCHAR(64))", t=_STAMP)
            s.run(conn, "INSERT INTO {S}.{t} VALUES (:r)", {"r": self.run_id}, t=_STAMP)

    def _stamped_run(self, s: Schemas, conn: sa.Connection | None = None) -> str | None:
        """The run whose build the stage holds (None: no complete stage)."""

        def read(c: sa.Connection) -> str | None:
            present = sa.inspect(c).get_table_names(schema=s.stage)
            if _STAMP not in present:
                return None
            return s.run(c, "SELECT max(run_id) FROM {S}.{t}", t=_STAMP).scalar()

        if conn is None:
            with s.wh.begin() as c:
                return read(c)
        return read(conn)

    def _check_stamp(self, s: Schemas, conn: sa.Connection | None = None) -> None:
        owner = self._stamped_run(s, conn)
        if owner != self.run_id:
            raise RunFailed(
                f"the stage schema {s.stage} holds "
                + (f"run {owner}'s build" if owner else "no build")
                + f", not run {self.run_id}'s: build again"
            )


def _published_run(s: Schemas) -> str | None:
    """The run the published lineage store describes (None before any)."""
    with s.wh.begin() as conn:
        if "lineage" not in sa.inspect(conn).get_table_names(schema=s.etl):
            return None
        return s.run(conn, "SELECT max(run_id) FROM {E}.lineage").scalar()


def _extract_deletions(
    feed: FeedConfig, cfg: SiteConfig, key: bytes, landing: Landing
) -> list[FileStats]:
    """A delta EHR delivery's withdrawn rows (`deleted/`, laid out like the feed)."""
    from etl.pipeline.delta import DeletionSink

    folder = feed.path / "deleted"
    if not folder.is_dir():
        return []
    sink = DeletionSink(landing, "deleted/")
    stats = _ehr_extract(feed, cfg, key, sink, folder=folder, merges=False)
    return sink.account([st for st in stats if st.message is None or st.records_in])


def _dispatch(
    feed: FeedConfig, cfg: SiteConfig, key: bytes, landing: Landing, cores: int | None = None
) -> list[FileStats]:
    if feed.kind == "hl7v2":
        from etl.sources.hl7v2 import extract_hl7
        from etl.warehouse.duckdb import connection_config

        # the site's DuckDB resources (memory_limit, threads, temp_directory) bound the
        # status rules' DuckDB too; a PostgreSQL site's come from the environment
        return extract_hl7(feed, key, landing, connection_config(cfg.warehouse)[1], cores=cores)
    if feed.kind == "dicom":
        from etl.sources.dicom import extract_dicom

        return extract_dicom(feed, key, landing, cores=cores)
    return _ehr_extract(feed, cfg, key, landing, folder=feed.path, merges=True)


def _ehr_extract(
    feed: FeedConfig, cfg: SiteConfig, key: bytes, sink: Any, *, folder: Path, merges: bool
) -> list[FileStats]:
    profile_ref = feed.profile or "synthea"
    mappings = cfg.mappings or MAPPINGS_DIR
    candidate = mappings / "profiles" / f"{profile_ref}.yaml"
    profile = load_profile(candidate if candidate.is_file() else profile_ref)
    files = extract_ehr(feed.name, folder, profile, key, sink, exclude=feed.exclude)
    if merges:
        files += extract_merges(feed.name, folder, key, sink)
    return files


def _landed_rows(feed_dir: Path) -> dict[str, int]:
    return {
        shape: pq.ParquetFile(feed_dir / f"{shape}.parquet").metadata.num_rows
        for shape in canonical.SHAPES
    }


def _key_before_checks(s: Schemas) -> None:
    """DuckDB: tonight's tables given their NOT NULL and primary keys before the quality
    checks (`prepare_tables`, which the publish would run anyway and then finds done), so
    that each table's key check is answered by its constraint (etl/quality/gate.py)
    instead of grouping every key once more. A duplicate key or a missing required value
    makes the keying fail as a whole, leaving the tables as the build wrote them: the
    checks then count and name what is wrong, and the gate refuses the load."""
    try:
        prepare_tables(s)
    except sa.exc.DBAPIError as exc:  # its text may quote a value: only its kind is logged
        log.warning(
            "tonight's tables could not be keyed before the checks (%s); the checks will"
            " name what is wrong",
            type(exc.orig).__name__,
        )


def _write_dqd_results(
    s: Schemas, run_dir: Path, checks: list[dict[str, Any]], started: dt.datetime
) -> None:
    """The checks in DQD's results layout, for DQD's viewer and OHDSI Ares."""
    with s.wh.begin() as conn:
        source = s.run(conn, "SELECT * FROM {S}.cdm_source").mappings().first()
    results = dqd_results(checks, started, dt.datetime.now(dt.UTC), dict(source or {}))
    (run_dir / "dqd_results.json").write_text(readable(results), encoding="utf-8")


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
