"""A broken copy of the demo feed: nothing lost, every problem named, no crash, no identifier.

The demo export is copied and broken in the ways real extracts break (bad dates, empty
keys, short rows, bytes that are not UTF-8, unknown patients, implausible dates,
duplicate keys, non-numeric numbers, a missing file, a missing column). The run must
still publish, account for every physical line of every file, put each broken record
under the right reason or rule with its file and line, and never write a patient's
clear identifier into the quarantine files, the reports or the log.
"""

from __future__ import annotations

import datetime as dt
import json
import shutil
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from etl.pipeline.run import RunResult
from etl.warehouse import open_warehouse
from tests.conftest import DEMO_SYNTHEA, TEST_KEY
from tests.pipeline_helpers import query, run, scalar, write_config

# The patient whose records are broken (demo patients.csv line 28), with what identifies him.
PATIENT = "5f8d3e13-bc80-dd66-0f1b-d24f9692a697"
# A dead patient (died 1976-07-25) who gets records after his death.
DEAD = "261ad2a4-7c6f-da54-6a5b-3441beab9a6a"
DEATH = dt.date(1976, 7, 25)
# A patient key found in no patients.csv row.
STRANGER = "0badc0de-1234-4abc-9def-00000000f00d"
IDENTIFIERS = [
    PATIENT,
    "Caleb651",
    "Pagac496",
    "999-18-1298",  # SSN
    "S99967963",  # driver's licence
    DEAD,
    "Gene733",
    "Mann644",
    STRANGER,
]
EXTRACTION, BUILD = "extraction", "build"
MISSING_CODE = "column(s) missing from the file: CODE"
BROKEN_FILES = {
    "conditions.csv",
    "medications.csv",
    "observations.csv",
    "immunizations.csv",
    "encounters.csv",
    "devices.csv",
    "procedures.csv",
}


@dataclass(frozen=True)
class Break:
    """One broken record: where it is, and where the run must put it."""

    file: str
    line: int  # 1-based physical line, header = 1
    status: str  # quarantined | filtered
    why: str  # the quarantine reason or the filter rule
    stage: str  # extraction (extraction.parquet) | build (build.parquet)


@dataclass
class Broken:
    feed: Path
    breaks: list[Break]
    loaded_anyway: list[tuple[str, int]]  # damaged lines that must still load


class _File:
    """A demo CSV as physical lines of bytes (no quoting in the files edited here)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.lines = path.read_bytes().split(b"\n")
        if self.lines[-1] == b"":
            self.lines.pop()
        self.header = self.lines[0].decode().split(",")

    def fields(self, line: int) -> list[bytes]:
        return self.lines[line - 1].split(b",")

    def set(self, line: int, column: str, value: bytes) -> None:
        f = self.fields(line)
        f[self.header.index(column)] = value
        self.lines[line - 1] = b",".join(f)

    def first_line(self, *needles: bytes) -> int:
        return next(i + 1 for i, ln in enumerate(self.lines) if i and all(n in ln for n in needles))

    def append(self, line: bytes) -> int:
        self.lines.append(line)
        return len(self.lines)

    def save(self) -> None:
        self.path.write_bytes(b"\n".join(self.lines) + b"\n")


def _break_feed(tmp: Path) -> Broken:
    feed = tmp / "feed"
    shutil.copytree(DEMO_SYNTHEA, feed)
    pid = PATIENT.encode()
    breaks: list[Break] = []
    loaded_anyway: list[tuple[str, int]] = []

    def q(file: str, line: int, reason: str, stage: str = EXTRACTION) -> None:
        breaks.append(Break(file, line, "quarantined", reason, stage))

    # conditions.csv: bad date, empty PATIENT, bytes that are not UTF-8, unknown patient
    c = _File(feed / "conditions.csv")
    first = c.first_line(pid)
    c.set(first, "START", b"2023-13-01")
    q("conditions.csv", first, "START is not a recognised date")
    c.set(first + 1, "PATIENT", b"")
    q("conditions.csv", first + 1, "PATIENT is empty")
    c.set(first + 2, "CODE", b"\xff\xfe" + c.fields(first + 2)[c.header.index("CODE")])
    q("conditions.csv", first + 2, "CODE is not valid text in the declared encoding")
    # a column the profile never reads may hold anything: the record loads
    c.set(first + 3, "DESCRIPTION", b"Fever \xff\xfe")
    loaded_anyway.append(("conditions.csv", first + 3))
    stranger = c.fields(first + 4)
    stranger[c.header.index("PATIENT")] = STRANGER.encode()
    q("conditions.csv", c.append(b",".join(stranger)), "unknown_person", BUILD)
    c.save()

    # medications.csv: a row with too few fields, then a bad date further down (line
    # numbers after a skipped row must still be physical lines)
    m = _File(feed / "medications.csv")
    first = m.first_line(pid)
    m.lines[first - 1] = b",".join(m.fields(first)[:5])
    q("medications.csv", first, f"expected {len(m.header)} fields, found 5")
    m.set(first + 3, "START", b"yesterday")
    q("medications.csv", first + 3, "START is not a recognised date")
    m.save()

    # observations.csv: a non-numeric numeric value, an event before the patient's birth
    o = _File(feed / "observations.csv")
    numeric = o.first_line(pid, b",numeric")
    o.set(numeric, "VALUE", b"abc")
    q("observations.csv", numeric, "VALUE is not a number")
    before = o.fields(numeric + 1)
    before[o.header.index("DATE")] = b"1970-01-01T00:00:00Z"
    line = o.append(b",".join(before))
    breaks.append(Break("observations.csv", line, "filtered", "event_before_birth", BUILD))
    o.save()

    # immunizations.csv: 61 days after death is filtered, 60 days (the allowance) is kept
    im = _File(feed / "immunizations.csv")
    template = im.fields(im.first_line(pid))
    encounters = _File(feed / "encounters.csv")
    dead_enc = encounters.fields(encounters.first_line(DEAD.encode()))[0]
    for days in (61, 60):
        row = list(template)
        row[im.header.index("PATIENT")] = DEAD.encode()
        row[im.header.index("ENCOUNTER")] = dead_enc
        day = DEATH + dt.timedelta(days=days)
        row[im.header.index("DATE")] = f"{day.isoformat()}T10:00:00Z".encode()
        line = im.append(b",".join(row))
        if days > 60:
            breaks.append(Break("immunizations.csv", line, "filtered", "event_after_death", BUILD))
        else:
            loaded_anyway.append(("immunizations.csv", line))
    im.save()

    # encounters.csv: the same encounter Id twice (the first is kept)
    e = _File(feed / "encounters.csv")
    q("encounters.csv", e.append(e.lines[e.first_line(pid) - 1]), "duplicate_key", BUILD)
    e.save()

    # a missing file, and a file without a column the profile needs
    (feed / "devices.csv").unlink()
    p = _File(feed / "procedures.csv")
    code = p.header.index("CODE")
    p.lines = [b",".join(f for i, f in enumerate(ln.split(b",")) if i != code) for ln in p.lines]
    for line in range(2, len(p.lines) + 1):
        q("procedures.csv", line, MISSING_CODE)
    p.save()
    return Broken(feed, breaks, loaded_anyway)


def _data_rows(path: Path) -> int:
    if not path.is_file():
        return 0
    lines = path.read_bytes().split(b"\n")
    return len([ln for ln in lines[1:] if ln])


def _run_broken(tmp: Path, wh, schema: str) -> tuple[Broken, RunResult]:
    broken = _break_feed(tmp)
    result = run(write_config(tmp, wh, schema, broken.feed), tmp)
    assert result.status == "published", result.report["errors"]
    return broken, result


@pytest.fixture(scope="module")
def duck(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, Broken, RunResult]]:
    """One DuckDB run of the broken feed, shared by the tests that only read its results."""
    tmp = tmp_path_factory.mktemp("broken")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMOP_ETL_PSEUDONYM_KEY", TEST_KEY)
        wh = open_warehouse(f"duckdb:///{tmp / 'warehouse.duckdb'}")
        try:
            broken, result = _run_broken(tmp, wh, "main")
            yield wh, broken, result
        finally:
            wh.close()


def _mine(rows: list[dict[str, Any]], file_key: str) -> list[dict[str, Any]]:
    """The rows about the files this test broke (other record sets may set records aside
    for their own reasons, e.g. payers no plan refers to)."""
    return [r for r in rows if r[file_key] in BROKEN_FILES]


def _check_accounting(broken: Broken, report: dict[str, Any]) -> None:
    files = report["feeds"]["ehr"]["files"]
    assert set(files) >= BROKEN_FILES
    for name, f in files.items():
        assert f["records_in"] == _data_rows(broken.feed / name), name
        assert f["records_in"] == f["loaded"] + f["quarantined"] + f["filtered"], name
        if name in BROKEN_FILES:
            mine = [b for b in broken.breaks if b.file == name]
            assert f["quarantined"] == sum(b.status == "quarantined" for b in mine), name
            assert f["filtered"] == sum(b.status == "filtered" for b in mine), name
    assert files["devices.csv"]["records_in"] == 0
    assert "not found" in files["devices.csv"]["message"]
    assert files["procedures.csv"]["loaded"] == 0
    assert files["procedures.csv"]["message"] == MISSING_CODE
    feed = report["feeds"]["ehr"]
    assert feed["records_in"] == feed["loaded"] + feed["quarantined"] + feed["filtered"]
    assert feed["records_in"] == sum(_data_rows(broken.feed / n) for n in files)

    quarantine: Counter = Counter()
    for r in _mine(report["quarantine"], "file"):
        assert r["feed"] == "ehr"
        quarantine[(r["file"], r["reason"])] += r["rows"]
    assert quarantine == Counter(
        (b.file, b.why) for b in broken.breaks if b.status == "quarantined"
    )
    filtered: Counter = Counter()
    for r in _mine(report["filtered"], "file"):
        assert r["feed"] == "ehr"
        filtered[(r["file"], r["rule"])] += r["rows"]
    assert filtered == Counter((b.file, b.why) for b in broken.breaks if b.status == "filtered")
    assert filtered == {
        ("observations.csv", "event_before_birth"): 1,
        ("immunizations.csv", "event_after_death"): 1,
    }


def test_broken_feed_publishes_and_accounts_for_every_line(warehouse, tmp_path: Path) -> None:
    wh, schema = warehouse
    broken, result = _run_broken(tmp_path, wh, schema)
    _check_accounting(broken, result.report)
    # the report on disk says the same
    on_disk = json.loads((result.run_dir / "report.json").read_text(encoding="utf-8"))
    _check_accounting(broken, on_disk)
    persons = scalar(wh, f'SELECT count(*) FROM "{schema}"."person"')
    assert persons == _data_rows(DEMO_SYNTHEA / "patients.csv")
    visits = scalar(wh, f'SELECT count(*) FROM "{schema}"."visit_occurrence"')
    assert visits == _data_rows(DEMO_SYNTHEA / "encounters.csv")


def test_quarantine_files_name_file_and_line(duck) -> None:
    _, broken, result = duck
    folder = result.run_dir / "quarantine"
    extraction = pq.read_table(folder / "extraction.parquet").to_pylist()
    assert Counter((r["source_file"], r["source_line"], r["reason"]) for r in extraction) == (
        Counter((b.file, b.line, b.why) for b in broken.breaks if b.stage == EXTRACTION)
    )
    assert {r["feed"] for r in extraction} == {"ehr"}
    build = _mine(pq.read_table(folder / "build.parquet").to_pylist(), "source_file")
    assert Counter(
        (r["source_file"], r["source_line"], r["status"], r["rule"]) for r in build
    ) == Counter((b.file, b.line, b.status, b.why) for b in broken.breaks if b.stage == BUILD)
    set_aside = {(r["source_file"], r["source_line"]) for r in [*extraction, *build]}
    assert not set_aside & set(broken.loaded_anyway)


def test_damaged_but_usable_records_load(duck) -> None:
    wh, broken, result = duck
    files = result.report["feeds"]["ehr"]["files"]
    # the condition whose unread DESCRIPTION is not UTF-8 loads: 4 of the file's broken
    # records are set aside, every other line is loaded
    conditions = files["conditions.csv"]
    assert conditions["loaded"] == _data_rows(broken.feed / "conditions.csv") - 4
    # 60 days after death is within DQD's allowance: kept, as a drug exposure of the dead
    kept = query(
        wh,
        'SELECT d.drug_exposure_start_date FROM "main"."drug_exposure" d'
        ' JOIN "main"."death" x ON x.person_id = d.person_id'
        " WHERE d.drug_exposure_start_date > x.death_date",
    )
    assert kept == [(DEATH + dt.timedelta(days=60),)]
    # before birth: nothing of the patient's predates his birth
    early = scalar(
        wh,
        'SELECT count(*) FROM "main"."measurement" m JOIN "main"."person" p'
        " ON p.person_id = m.person_id WHERE m.measurement_date < p.birth_datetime",
    )
    assert early == 0
    # the other files of the feed are untouched by the broken ones
    for name in ("patients.csv", "allergies.csv", "imaging_studies.csv", "supplies.csv"):
        assert files[name]["loaded"] == _data_rows(DEMO_SYNTHEA / name), name


def test_no_identifier_in_quarantine_reports_or_log(duck) -> None:
    _, _, result = duck
    texts = {
        "report.json": (result.run_dir / "report.json").read_text(encoding="utf-8"),
        "report.html": (result.run_dir / "report.html").read_text(encoding="utf-8"),
        "run.log": (result.run_dir / "run.log").read_text(encoding="utf-8"),
    }
    for path in sorted((result.run_dir / "quarantine").glob("*.parquet")):
        texts[path.name] = json.dumps(pq.read_table(path).to_pylist(), default=str)
    for path in sorted((result.run_dir / "landing").rglob("*.parquet")):
        texts[str(path)] = json.dumps(pq.read_table(path).to_pylist(), default=str)
    for name, text in texts.items():
        for ident in IDENTIFIERS:
            assert ident not in text, (name, ident)


# --- oddities beyond the demo's breaks: each documents a bug found in etl/ --------------


def _demo_copy(tmp: Path) -> Path:
    feed = tmp / "feed"
    shutil.copytree(DEMO_SYNTHEA, feed)
    return feed


@pytest.mark.parametrize(
    "oddity",
    [
        "blank_line",
        "quoted_newline",
    ],
)
def test_source_lines_stay_physical_lines(oddity: str, duckdb_wh, tmp_path: Path) -> None:
    wh, schema = duckdb_wh
    feed = _demo_copy(tmp_path)
    c = _File(feed / "conditions.csv")
    if oddity == "blank_line":
        c.lines.insert(4, b"")  # physical line 5 is empty
    else:  # the DESCRIPTION of line 3 spans lines 3 and 4
        c.set(3, "DESCRIPTION", b'"Acute viral\npharyngitis (disorder)"')
    c.save()
    c = _File(feed / "conditions.csv")  # physical lines again
    c.set(11, "START", b"2023-13-01")
    c.save()
    result = run(write_config(tmp_path, wh, schema, feed), tmp_path)
    assert result.status == "published", result.report["errors"]
    extraction = pq.read_table(result.run_dir / "quarantine" / "extraction.parquet").to_pylist()
    assert [(r["source_file"], r["source_line"], r["reason"]) for r in extraction] == [
        ("conditions.csv", 11, "START is not a recognised date")
    ]
    f = result.report["feeds"]["ehr"]["files"]["conditions.csv"]
    assert f["records_in"] == f["loaded"] + f["quarantined"] + f["filtered"]


def test_nul_byte_in_a_code_neither_fails_the_run_nor_reaches_the_cdm(
    warehouse, tmp_path: Path
) -> None:
    wh, schema = warehouse
    feed = _demo_copy(tmp_path)
    c = _File(feed / "conditions.csv")
    c.set(3, "CODE", b"1956\x0062009")
    c.save()
    result = run(write_config(tmp_path, wh, schema, feed), tmp_path)
    assert result.status == "published", result.report["errors"]
    f = result.report["feeds"]["ehr"]["files"]["conditions.csv"]
    assert f["records_in"] == f["loaded"] + f["quarantined"] + f["filtered"] == 438
    values = query(wh, f'SELECT condition_source_value FROM "{schema}"."condition_occurrence"')
    assert not [v for (v,) in values if v and "\x00" in v]


def test_overlong_code_is_kept_and_cut_to_the_cdm_length(warehouse, tmp_path: Path) -> None:
    wh, schema = warehouse
    code = "9" * 300
    feed = _demo_copy(tmp_path)
    c = _File(feed / "conditions.csv")
    c.set(3, "CODE", code.encode())
    c.save()
    result = run(write_config(tmp_path, wh, schema, feed), tmp_path)
    assert result.status == "published", result.report["errors"]
    f = result.report["feeds"]["ehr"]["files"]["conditions.csv"]
    assert f["loaded"] == f["records_in"] == 438
    got = query(
        wh,
        "SELECT condition_concept_id, condition_source_value"
        f' FROM "{schema}"."condition_occurrence" WHERE condition_source_value LIKE :p',
        p="9999%",
    )
    assert got == [(0, code[:50])]
