"""Record sets extracted in concurrent lanes land exactly as one after another."""

from __future__ import annotations

import shutil
import threading
from dataclasses import asdict
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from etl import canonical
from etl.pipeline.land import Landing
from etl.sources.ehr import Extract, extract_ehr
from etl.sources.lanes import lanes_by_shape, run_lanes
from etl.sources.profile import load_profile
from tests.conftest import DEMO_SYNTHEA
from tests.pipeline_helpers import rows

KEY = b"unit-test-key-0123456789"


def _feed_with_bad_rows(tmp_path: Path) -> Path:
    """The demo export with quarantined rows in files of three different lanes."""
    feed = tmp_path / "feed"
    shutil.copytree(DEMO_SYNTHEA, feed)
    patient = rows(feed / "patients.csv")[0]["Id"]
    with (feed / "conditions.csv").open("a", encoding="utf-8") as fh:
        fh.write(f"2020-02-30,,{patient},,195662009,Impossible date\n")
        fh.write("2020-01-01,,,,195662009,No patient\n")
    with (feed / "observations.csv").open("ab") as fh:
        fh.write(
            f"2020-01-01,{patient},,vital-signs,8302-2,Height,1,c\xe9m,numeric\n".encode("latin-1")
        )
    with (feed / "encounters.csv").open("a", encoding="utf-8") as fh:
        fh.write("e1,2020-13-01,,,,,,ambulatory,1,x,1,1,1,,\n")
    (feed / "allergies.csv").write_bytes(b"")  # a whole file quarantined: empty
    return feed


def _land(feed: Path, out: Path, lanes: int) -> list[dict]:
    landing = Landing(out)
    files = extract_ehr("ehr", feed, load_profile("synthea"), KEY, landing, lanes=lanes)
    landing.close(files)
    return [asdict(f) for f in files]


def test_every_number_of_lanes_lands_the_same_rows_in_the_same_order(tmp_path: Path) -> None:
    feed = _feed_with_bad_rows(tmp_path)
    one = _land(feed, tmp_path / "one", lanes=1)
    quarantine = pq.read_table(tmp_path / "one" / "quarantine.parquet")
    # the bad rows come from three record sets, in the profile's order
    assert quarantine.num_rows == 4
    sets = quarantine["record_set"].to_pylist()
    assert sets == sorted(sets, key=[f["record_set"] for f in one].index)
    assert {"conditions", "observations", "visits"} <= set(sets)
    for lanes in (2, 5):
        assert _land(feed, tmp_path / str(lanes), lanes=lanes) == one
        for shape in canonical.SHAPES:
            a = pq.read_table(tmp_path / "one" / f"{shape}.parquet")
            b = pq.read_table(tmp_path / str(lanes) / f"{shape}.parquet")
            assert a.equals(b), (lanes, shape)


def test_rows_keep_their_file_order_when_a_state_is_looked_up(tmp_path: Path) -> None:
    """The state look-up is a join; the rows still land in line order."""
    landing = Landing(tmp_path / "out")
    files = extract_ehr("ehr", DEMO_SYNTHEA, load_profile("synthea"), KEY, landing)
    landing.close(files)
    lines = pq.read_table(tmp_path / "out" / "person.parquet")["source_line"].to_pylist()
    assert lines == sorted(lines) and len(lines) == len(rows(DEMO_SYNTHEA / "patients.csv"))


class _Failing(Landing):
    def write(self, shape: str, table: pa.Table) -> None:
        if shape == "cost_line":
            raise OSError("disk full")
        super().write(shape, table)


def test_a_failed_lane_stops_the_extraction_with_its_own_error(tmp_path: Path) -> None:
    sink = _Failing(tmp_path / "out")
    with pytest.raises(OSError, match="disk full"):
        extract_ehr("ehr", DEMO_SYNTHEA, load_profile("synthea"), KEY, sink, lanes=2)
    sink.close([])
    # nothing of the quarantine spools is replayed after a failure
    assert pq.read_table(tmp_path / "out" / "quarantine.parquet").num_rows == 0


def test_lanes_group_a_shapes_record_sets_in_order_heaviest_first() -> None:
    sets = [("person", 5), ("event", 10), ("cost_line", 100), ("event", 20), ("visit", 1)]
    assert lanes_by_shape(sets) == [[2], [1, 3], [0], [4]]


def _work_meeting_at(barrier: threading.Barrier, met: list[int]):  # type: ignore[no-untyped-def]
    """Lane work that waits for the other lane at `barrier`, then quarantines one row."""

    def work(lane: list[int], sink_of) -> None:  # type: ignore[no-untyped-def]
        barrier.wait()
        met.extend(lane)
        row = {"record_set": "r", "reason": "x", "feed": "f", "source_file": "s"}
        sink_of(lane[0]).write(
            "quarantine", pa.Table.from_pylist([{**row, "source_line": lane[0]}])
        )

    return work


def test_lanes_run_side_by_side() -> None:
    """Two lanes on two workers run at once: each waits for the other at a barrier, which
    lanes run one after another never pass."""
    met: list[int] = []
    sink = Extract()
    run_lanes([[0], [1]], _work_meeting_at(threading.Barrier(2, timeout=10), met), sink)
    assert sorted(met) == [0, 1]
    # the quarantine comes back in set order, whichever lane finished first
    assert sink.table("quarantine")["source_line"].to_pylist() == [0, 1]
    one_at_a_time = _work_meeting_at(threading.Barrier(2, timeout=1), [])
    with pytest.raises(threading.BrokenBarrierError):
        run_lanes([[0], [1]], one_at_a_time, Extract(), workers=1)


def test_landed_files_skip_dictionaries_and_text_statistics_where_they_cost(
    tmp_path: Path,
) -> None:
    """The record's own key, its source line and its timestamps are written without a
    dictionary; codes, referred keys and provenance with one; statistics only for columns
    that are not text (etl/pipeline/land.py, writer_options)."""
    _land(DEMO_SYNTHEA, tmp_path / "out", lanes=2)
    meta = pq.ParquetFile(tmp_path / "out" / "event.parquet").metadata
    assert meta.num_rows > 1000
    chunks = {}
    for g in range(meta.num_row_groups):
        group = meta.row_group(g)
        for c in range(group.num_columns):
            chunks.setdefault(group.column(c).path_in_schema, []).append(group.column(c))

    def dictionary(name: str) -> bool:
        return all("RLE_DICTIONARY" in c.encodings for c in chunks[name])

    assert not any(dictionary(n) for n in ("event_key", "source_line", "start_datetime"))
    assert all(dictionary(n) for n in ("person_key", "code", "vocabulary_id", "source_file"))
    assert all(c.statistics is None for n in ("event_key", "code") for c in chunks[n])
    start = chunks["start_datetime"][0].statistics
    assert start is not None and start.has_min_max
    # read back as written
    landed = pq.read_table(tmp_path / "out" / "event.parquet")
    assert landed.schema == canonical.EVENT
    assert landed["event_key"].null_count == 0
