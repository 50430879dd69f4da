"""No identifier anywhere: the three-feed demo searched for every identifier of its input.

Identifiers are collected from the demo inputs themselves (EHR patients.csv: Id, SSN,
driver's licence, passport, names, maiden name, address; the lab feed's PID-3 and PID-5;
the PACS files' PatientID, PatientName, PatientBirthDate, AccessionNumber). The demo runs
on DuckDB, then every text column of every table of the CDM, stage and ETL schemas, the
landed Parquet and quarantine files, report.json, report.html, run.log, the step files
and Great Expectations' Data Docs are searched: zero hits. Birth dates of the EHR are not
searched: OMOP keeps a person's date of birth by design (person.birth_datetime); the
DICOM birth date, which the feed never reads, is. Synthea has no phone numbers.
"""

from __future__ import annotations

import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pydicom
import pytest
import sqlalchemy as sa

from etl.demo import DEMO_FEEDS, run_demo
from tests.pipeline_helpers import rows

VOCABULARY_TABLES = {
    "concept", "concept_ancestor", "concept_class", "concept_relationship",
    "concept_synonym", "domain", "drug_strength", "relationship", "vocabulary",
}  # fmt: skip
TEXT_SUFFIXES = {".json", ".html", ".log", ".yml", ".yaml", ".txt", ".csv", ".md"}


def _ehr_identifiers() -> tuple[set[str], set[str]]:
    """(exact identifiers, bare names): names carry a numeric suffix in Synthea."""
    exact, names = set(), set()
    for p in rows(DEMO_FEEDS / "synthea27" / "patients.csv"):
        for col in ("Id", "SSN", "DRIVERS", "PASSPORT", "FIRST", "LAST", "MAIDEN", "ADDRESS"):
            if len(p[col].strip()) >= 4:
                exact.add(p[col].strip())
        for col in ("FIRST", "LAST", "MAIDEN"):
            bare = p[col].rstrip("0123456789")
            if len(bare) >= 5:
                names.add(bare)
    return exact, names


def _lab_identifiers() -> set[str]:
    found = set()
    for path in sorted((DEMO_FEEDS / "lab").glob("*.hl7")):
        for seg in re.split(r"[\r\n]+", path.read_text(encoding="utf-8")):
            if seg.startswith("PID|"):
                fields = seg.split("|")
                for rep in fields[3].split("~"):
                    found.add(rep.split("^")[0])
                if len(fields) > 5 and fields[5]:
                    found.add(fields[5])  # the whole name, family^given
                    found.update(p for p in fields[5].split("^") if len(p) >= 4)
    return {v for v in found if len(v) >= 4}


def _pacs_identifiers() -> set[str]:
    found = set()
    for path in sorted((DEMO_FEEDS / "pacs").rglob("*.dcm")):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        for tag in ("PatientID", "PatientName", "PatientBirthDate", "AccessionNumber"):
            value = str(ds.get(tag, "") or "").strip()
            if value:
                found.add(value)
    return found


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory):
    workdir = tmp_path_factory.mktemp("privacy")
    result = run_demo(workdir)
    assert result.status == "published", result.report["errors"]
    return workdir, result


def _warehouse_texts(db: Path) -> dict[str, str]:
    """'schema.table' -> every distinct text value of the table, joined."""
    engine = sa.create_engine(f"duckdb:///{db}")
    out: dict[str, str] = {}
    try:
        with engine.connect() as conn:
            cols = conn.execute(
                sa.text(
                    "SELECT table_schema, table_name, column_name FROM information_schema.columns"
                    " WHERE lower(data_type) IN ('varchar', 'text')"
                    " AND table_schema NOT IN ('information_schema', 'pg_catalog')"
                )
            ).all()
            for schema, table, column in cols:
                q = f'SELECT DISTINCT "{column}" FROM "{schema}"."{table}"'
                values = [str(v) for (v,) in conn.execute(sa.text(q)) if v]
                key = f"{schema}.{table}"
                out[key] = out.get(key, "") + "\n" + "\n".join(values)
    finally:
        engine.dispose()
    return out


def _parquet_text(path: Path) -> str:
    table = pq.read_table(path)
    parts = []
    for name in table.column_names:
        if pa.types.is_string(table.schema.field(name).type):
            parts.extend(v for v in table.column(name).to_pylist() if v)
    return "\n".join(parts)


def test_identifiers_are_collected_from_all_three_feeds() -> None:
    exact, names = _ehr_identifiers()
    assert len(exact) > 150 and len(names) > 20  # 27 patients
    lab, pacs = _lab_identifiers(), _pacs_identifiers()
    assert lab and pacs
    assert {"FAKEACC0001", "19000101"} <= pacs  # accession, birth date of the PACS demo


def test_no_identifier_in_warehouse_files_reports_or_logs(demo) -> None:
    workdir, result = demo
    exact, names = _ehr_identifiers()
    exact |= _lab_identifiers() | _pacs_identifiers()
    haystacks: dict[str, str] = {}
    for key, text in _warehouse_texts(workdir / "warehouse.duckdb").items():
        haystacks[f"warehouse {key}"] = text
    run_dir = result.run_dir
    parquet = sorted(run_dir.rglob("*.parquet"))
    assert any("landing" in p.parts for p in parquet)
    assert any("quarantine" in p.parts for p in parquet)
    for path in parquet:
        haystacks[str(path.relative_to(run_dir))] = _parquet_text(path)
    texts = [p for p in sorted(run_dir.rglob("*")) if p.is_file() and p.suffix in TEXT_SUFFIXES]
    assert {"report.json", "report.html", "run.log"} <= {p.name for p in texts}
    assert any("data_docs" in p.parts for p in texts)  # Great Expectations' Data Docs
    for path in texts:
        haystacks[str(path.relative_to(run_dir))] = path.read_text(
            encoding="utf-8", errors="replace"
        )
    assert len(haystacks) > 100
    leaks = {}
    for where, text in haystacks.items():
        # bare names also occur in the vocabulary's concept names (Addison's disease): the
        # vocabulary tables are searched for the exact identifiers only
        searched = exact if where.split(".")[-1] in VOCABULARY_TABLES else exact | names
        found = sorted(i for i in searched if i in text)
        if found:
            leaks[where] = found[:5]
    assert leaks == {}


def test_landed_and_quarantined_records_hold_pseudonymised_keys_only(demo) -> None:
    """The landing area keeps keys as keyed pseudonyms (32 hex digits), never in clear."""
    _, result = demo
    hexkey = re.compile(r"^[0-9a-f]{32}$")
    key_columns = 0
    for path in sorted((result.run_dir / "landing").rglob("*.parquet")):
        table = pq.read_table(path)
        for name in table.column_names:
            if name.endswith("_key"):
                values = [v for v in table.column(name).to_pylist() if v is not None]
                assert all(hexkey.match(v) for v in values), (path.name, name)
                key_columns += bool(values)
    assert key_columns > 10
    # quarantine files hold coordinates and reasons: no key, no value of the record
    for path in sorted((result.run_dir / "quarantine").glob("*.parquet")):
        names = set(pq.read_table(path).column_names)
        assert not {n for n in names if n.endswith("_key")}, path.name
