"""The nightly run extracts its feeds side by side (NightlyRun.extract_all): what lands is
what one feed after another lands, the run log holds each record once, and a failed feed
stops the feeds not yet started and fails the run with its error, once."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from etl import canonical
from etl.config import load_config
from etl.pipeline.steps import NightlyRun, RunFailed, run_log
from tests.conftest import DEMO_SYNTHEA, REPO
from tests.pipeline_helpers import run, write_feeds_config

DEMO_LAB = REPO / "demo" / "lab"
DEMO_PACS = REPO / "demo" / "pacs"


def _config(tmp: Path, name: str, **feeds: Path) -> Path:
    url = f"duckdb:///{tmp / f'{name}.duckdb'}"
    return write_feeds_config(tmp / f"{name}.yaml", url, "main", ehr=DEMO_SYNTHEA, **feeds)


def _landed(night: NightlyRun) -> dict[tuple[str, str], list[dict]]:
    return {
        (feed, shape): pq.read_table(night.landing_dir(feed) / f"{shape}.parquet").to_pylist()
        for feed in night.feeds
        for shape in canonical.SHAPES
    }


def test_feeds_side_by_side_land_what_one_at_a_time_lands(tmp_path: Path) -> None:
    config = load_config(_config(tmp_path, "w", lab=DEMO_LAB, pacs=DEMO_PACS))
    landed, steps = {}, {}
    for workers in (1, 3):
        night = NightlyRun.start(config, tmp_path / f"workers{workers}")
        seen: list[str] = []
        night.extract_all(seen.append, workers=workers)
        landed[workers], steps[workers] = _landed(night), seen
        log_lines = (night.run_dir / "run.log").read_text(encoding="utf-8").splitlines()
        for feed in ("ehr", "lab", "pacs"):
            assert sum(f"feed {feed} landed" in line for line in log_lines) == 1, feed
        assert len(log_lines) == len(set(log_lines))  # no record written twice
        wall = night.fragment("extract")["timings"]["extract.wall"]
        per_feed = [night.fragment(f"extract.{f}")["timings"]["extract"] for f in night.feeds]
        assert wall > 0 and all(t > 0 for t in per_feed)
    assert steps == {1: ["extract"], 3: ["extract"]}
    assert landed[1] == landed[3]
    assert len(landed[3][("lab", "event")]) == 251  # the demo lab feed's results
    assert len(landed[3][("pacs", "image")]) == 1


def test_two_feeds_are_extracted_at_once(tmp_path: Path, monkeypatch) -> None:
    """The first two feeds are both inside their extraction at the same moment: each
    waits at a barrier for the other, which one feed after another would never reach."""
    config = load_config(_config(tmp_path, "w", lab=DEMO_LAB, pacs=DEMO_PACS))
    both_started = threading.Barrier(2, timeout=60)
    original = NightlyRun.extract

    def extract(self: NightlyRun, feed: str, on_step=None, *, cores=None) -> int:  # type: ignore[no-untyped-def]
        if feed in ("ehr", "lab"):
            both_started.wait()
        return original(self, feed, on_step, cores=cores)

    monkeypatch.setattr(NightlyRun, "extract", extract)
    night = NightlyRun.start(config, tmp_path / "run")
    night.extract_all(workers=2)
    assert all((night.landing_dir(f) / "files.json").is_file() for f in night.feeds)


def test_a_failed_feed_stops_the_feeds_not_started_and_fails_the_run(tmp_path: Path) -> None:
    config = load_config(_config(tmp_path, "w", lab=tmp_path / "absent", pacs=DEMO_PACS))
    night = NightlyRun.start(config, tmp_path / "one")
    with pytest.raises(RunFailed, match="absent is not a folder"):
        night.extract_all(workers=1)
    assert (night.landing_dir("ehr") / "files.json").is_file()  # landed before the failure
    assert night.fragment("extract.pacs") is None  # never started
    # the whole run: failed, its report names the error once
    result = run(tmp_path / "w.yaml", tmp_path / "two")
    assert (result.status, result.exit_code) == ("failed", 2)
    errors = [e for e in result.report["errors"] if "absent is not a folder" in e]
    assert len(errors) == 1, result.report["errors"]
    assert "extract.wall" in result.report["timings"]


def test_overlapping_run_logs_write_each_record_once(tmp_path: Path) -> None:
    log = logging.getLogger("etl.test_feed_extraction")
    inside = threading.Barrier(2)

    def step(name: str) -> None:
        with run_log(tmp_path):
            inside.wait()  # both blocks open at once
            log.info("record of %s", name)
            inside.wait()

    threads = [threading.Thread(target=step, args=(n,)) for n in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    with run_log(tmp_path):
        log.info("after")
    lines = (tmp_path / "run.log").read_text(encoding="utf-8").splitlines()
    assert sorted(line.split(": ", 1)[1] for line in lines) == [
        "after",
        "record of a",
        "record of b",
    ]
    assert not logging.getLogger("etl").handlers  # every handler removed


def test_each_feed_gets_its_share_of_the_cores(tmp_path: Path, monkeypatch) -> None:
    """Feeds extracted at once share the machine: on 2 vCPUs with two feeds at a time the
    lab feed is told it has one core (and parses in its own thread), alone all of them."""
    from etl.pipeline import steps

    config = load_config(_config(tmp_path, "c", lab=DEMO_LAB, pacs=DEMO_PACS))
    given: dict[str, int | None] = {}

    def dispatch(feed, cfg, key, landing, cores=None):  # type: ignore[no-untyped-def]
        given[feed.name] = cores
        return []

    monkeypatch.setattr(steps, "_dispatch", dispatch)
    monkeypatch.setattr(steps.os, "cpu_count", lambda: 2)
    NightlyRun.start(config, tmp_path / "two").extract_all(workers=2)
    assert given == {"ehr": 1, "lab": 1, "pacs": 1}
    monkeypatch.setattr(steps.os, "cpu_count", lambda: 8)
    NightlyRun.start(config, tmp_path / "eight").extract_all(workers=2)
    assert given == {"ehr": 4, "lab": 4, "pacs": 4}
    NightlyRun.start(config, tmp_path / "alone").extract("lab")
    assert given["lab"] is None  # one feed on its own: the machine's


def test_the_lab_and_pacs_feeds_are_handed_their_cores(tmp_path: Path, monkeypatch) -> None:
    """`_dispatch` passes the feed's share of the cores on to the lab and PACS readers,
    which cap their parsing processes at it."""
    import etl.sources.dicom as dicom
    import etl.sources.hl7v2 as hl7v2
    from etl.config import FeedConfig
    from etl.pipeline import steps

    config = load_config(_config(tmp_path, "d", lab=DEMO_LAB, pacs=DEMO_PACS))
    handed: dict[str, int | None] = {}

    def reader(kind: str):  # type: ignore[no-untyped-def]
        def read(*args, cores=None, **kwargs):  # type: ignore[no-untyped-def]
            handed[kind] = cores
            return []

        return read

    monkeypatch.setattr(hl7v2, "extract_hl7", reader("hl7v2"))
    monkeypatch.setattr(dicom, "extract_dicom", reader("dicom"))
    for kind, path in (("hl7v2", DEMO_LAB), ("dicom", DEMO_PACS)):
        feed = FeedConfig(name=kind, kind=kind, path=path)
        steps._dispatch(feed, config, b"k" * 32, None, 1)  # type: ignore[arg-type]
    assert handed == {"hl7v2": 1, "dicom": 1}


def test_a_worker_count_that_is_not_a_number_is_refused_by_name(monkeypatch) -> None:
    """A site's OMOP_ETL_HL7_WORKERS / OMOP_ETL_DICOM_WORKERS that is not a whole number
    stops the feed with a message naming the variable, not a bare ValueError."""
    import etl.sources.dicom as dicom
    from etl.config import ConfigError
    from etl.sources.hl7v2 import extract as hl7_extract

    monkeypatch.setenv(dicom.WORKERS_ENV, "two")
    with pytest.raises(ConfigError, match="OMOP_ETL_DICOM_WORKERS='two': not a whole number"):
        dicom._workers(1)
    monkeypatch.setenv(hl7_extract.WORKERS_ENV, " 3 ")
    assert hl7_extract._workers([]) == 3  # spaces around a number are fine
