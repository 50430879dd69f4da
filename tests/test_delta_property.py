"""Property: delta deliveries applied night after night land the same state as a snapshot.

For random sequences of nights (inserted, changed and deleted condition rows, changed
patients, patient merges), the state a delta feed lands after the last night (each
night's delivery applied to the previous night's state) holds exactly the records that
extracting a snapshot of the final source gives: same keys, same content; only the
provenance (which delivery, which line) differs. The build is a function of the landed
state and the key map, so equal states build equal warehouses; test_delta_loads.py shows
that end to end on both engines.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pyarrow.parquet as pq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from etl import canonical
from etl.config import FeedConfig, SiteConfig
from etl.pipeline.delta import consolidate, prefix_source_files
from etl.pipeline.land import Landing
from etl.pipeline.steps import _dispatch, _extract_deletions
from tests.pipeline_helpers import write_rows

KEY = b"property-test-key-0123456789"
PATIENT_HEADER = ["Id", "BIRTHDATE", "DEATHDATE", "GENDER", "RACE", "ETHNICITY", "STATE", "ZIP"]
CONDITION_HEADER = ["START", "STOP", "PATIENT", "ENCOUNTER", "CODE", "DESCRIPTION"]
PATIENTS = [f"p{i}" for i in range(5)]
CODES = ["195662009", "444814009", "10509002", "233604007"]

ops = st.one_of(
    st.tuples(
        st.just("insert"),
        st.sampled_from(PATIENTS),
        st.sampled_from(CODES),
        st.integers(1, 28),
    ),
    st.tuples(st.just("stop"), st.integers(0, 50), st.integers(1, 28)),
    st.tuples(st.just("delete"), st.integers(0, 50)),
    st.tuples(st.just("zip"), st.sampled_from(PATIENTS), st.sampled_from(["02139", "10001"])),
    st.tuples(st.just("merge"), st.sampled_from(PATIENTS), st.sampled_from(PATIENTS)),
)
nights = st.lists(st.lists(ops, min_size=1, max_size=6), min_size=1, max_size=3)


class Source:
    """The EHR's current rows, and what changed since the last delivery."""

    def __init__(self, bystanders: int = 0) -> None:
        """`bystanders`: more patients, whom only a stop or delete op may touch."""
        self.everyone = [*PATIENTS, *(f"q{i}" for i in range(bystanders))]
        self.patients = {
            p: {"Id": p, "BIRTHDATE": "1950-01-01", "GENDER": "F", "RACE": "white",
                "ETHNICITY": "nonhispanic", "STATE": "Massachusetts", "ZIP": "01001"}
            for p in self.everyone
        }  # fmt: skip
        self.conditions: dict[tuple, dict[str, str]] = {}
        self.merges: dict[str, str] = {}
        for i, p in enumerate(self.everyone):
            self._put(p, CODES[i % len(CODES)], 1 + i % 28)
        self.changed_patients: set[str] = set(self.everyone)
        self.changed: set[tuple] = set(self.conditions)
        self.deleted: dict[tuple, dict[str, str]] = {}
        self.new_merges: dict[str, str] = {}

    def _put(self, patient: str, code: str, day: int) -> tuple:
        row = {"START": f"2020-01-{day:02d}", "STOP": "", "PATIENT": patient,
               "ENCOUNTER": "", "CODE": code, "DESCRIPTION": "a condition"}  # fmt: skip
        key = (patient, code, row["START"])
        self.conditions[key] = row
        return key

    def apply(self, op: tuple) -> None:
        keys = sorted(self.conditions)
        if op[0] == "insert":
            key = self._put(op[1], op[2], op[3])
            self.changed.add(key)
            self.deleted.pop(key, None)
        elif op[0] == "stop" and keys:
            key = keys[op[1] % len(keys)]
            self.conditions[key]["STOP"] = f"2021-02-{op[2]:02d}"
            self.changed.add(key)
        elif op[0] == "delete" and keys:
            key = keys[op[1] % len(keys)]
            self.deleted[key] = self.conditions.pop(key)
            self.changed.discard(key)
        elif op[0] == "zip":
            self.patients[op[1]]["ZIP"] = op[2]
            self.changed_patients.add(op[1])
        elif op[0] == "merge" and op[1] != op[2]:
            self.merges[op[1]] = op[2]
            self.new_merges[op[1]] = op[2]

    def write(self, folder: Path, *, delta: bool) -> None:
        folder.mkdir(parents=True)
        chosen = self.changed_patients if delta else self.everyone
        patients = [self.patients[p] for p in sorted(chosen)]
        conditions = sorted(self.changed if delta else self.conditions)
        write_rows(folder / "patients.csv", PATIENT_HEADER, patients)
        write_rows(
            folder / "conditions.csv", CONDITION_HEADER, [self.conditions[k] for k in conditions]
        )
        merges = self.new_merges if delta else self.merges
        if merges:
            lines = "".join(f"{a},{b}\n" for a, b in sorted(merges.items()))
            (folder / "person_merges.csv").write_text("merged,surviving\n" + lines)
        if delta and self.deleted:
            (folder / "deleted").mkdir()
            rows = [self.deleted[k] for k in sorted(self.deleted)]
            write_rows(folder / "deleted" / "conditions.csv", CONDITION_HEADER, rows)
        if delta:
            self.changed, self.changed_patients = set(), set()
            self.deleted, self.new_merges = {}, {}


def _land(folder: Path, out: Path, delivery: str) -> None:
    feed = FeedConfig(name="ehr", kind="ehr_csv", path=folder, delivery=delivery)
    cfg = SiteConfig(warehouse="duckdb:///unused.duckdb", feeds=[feed])
    landing = Landing(out)
    files = []
    try:
        files = _dispatch(feed, cfg, KEY, landing)
        if delivery == "delta":
            files += _extract_deletions(feed, cfg, KEY, landing)
    finally:
        landing.close(files)


def _content(folder: Path) -> dict[str, list[tuple]]:
    """Every landed record without its provenance, per shape, sorted."""
    out = {}
    for shape in canonical.RECORD_KEYS:
        table = pq.read_table(folder / f"{shape}.parquet")
        table = table.drop_columns(["source_file", "source_line"])
        out[shape] = sorted(tuple(r.values()) for r in table.to_pylist())
    return out


@settings(
    max_examples=12,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(nights=nights)
def test_delta_state_equals_snapshot(tmp_path_factory, nights) -> None:
    tmp = tmp_path_factory.mktemp("delta")
    source = Source()
    state: Path | None = None
    for n, night in enumerate([[], *nights]):  # night 0 delivers everything
        for op in night:
            source.apply(op)
        delivery, landed = tmp / f"delivery{n}", tmp / f"landed{n}"
        source.write(tmp / f"feed{n}", delta=True)
        _land(tmp / f"feed{n}", delivery, "delta")
        prefix_source_files(delivery, f"night{n}")
        consolidate(state, delivery, landed, f"night{n - 1}" if state else None)
        shutil.rmtree(delivery)
        state = landed
    source.write(tmp / "final", delta=False)
    _land(tmp / "final", tmp / "snapshot", "snapshot")
    assert _content(state) == _content(tmp / "snapshot")


def _deliver(source: Source, folder: Path, workdir: Path, url: str, delivery: str):
    """One night of the pipeline over `folder` into the DuckDB warehouse at `url`."""
    import yaml

    from tests.conftest import DEMO_VOCAB, REPO
    from tests.pipeline_helpers import run

    cfg = {
        "warehouse": url,
        "vocabulary": str(DEMO_VOCAB),
        "quality": str(REPO / "quality" / "demo"),
        "feeds": [{"name": "ehr", "kind": "ehr_csv", "path": str(folder), "delivery": delivery}],
    }
    path = folder.with_suffix(".yaml")
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    result = run(path, workdir)
    assert result.status == "published", result.report["errors"]
    return result


@settings(
    max_examples=3,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(nights=st.lists(st.lists(ops, min_size=1, max_size=4), min_size=2, max_size=2))
def test_scoped_nights_equal_a_full_rebuild(tmp_path_factory, nights) -> None:
    """End to end: the warehouse the delta nights publish (each built person-scoped when
    it can) is what a full build from a snapshot of the final source publishes into it:
    the same rows with the same ids."""
    from etl.warehouse import open_warehouse
    from tests.test_nightly_runs import snapshot

    tmp = tmp_path_factory.mktemp("scoped")
    url = f"duckdb:///{tmp / 'warehouse.duckdb'}"
    source = Source(bystanders=15)
    scopes = []
    for n, night in enumerate([[], *nights]):
        for op in night:
            source.apply(op)
        source.write(tmp / f"feed{n}", delta=True)
        scopes.append(_deliver(source, tmp / f"feed{n}", tmp, url, "delta").report["build_scope"])
    assert scopes[0]["mode"] == "full"  # the first delivery
    assert scopes[1]["mode"] == "persons", scopes[1]  # 5 of the 20 patients at most
    wh = open_warehouse(url)
    try:
        after_deltas = snapshot(wh, "main")
        source.write(tmp / "final", delta=False)
        full = _deliver(source, tmp / "final", tmp, url, "snapshot")
        assert full.report["build_scope"]["mode"] == "full"
        assert snapshot(wh, "main") == after_deltas
    finally:
        wh.close()
