"""Night after night: stable ids, changes confined to the changed patient, replay, privacy."""

from __future__ import annotations

import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import sqlalchemy as sa

from etl.pipeline.publish import published_tables
from tests.conftest import DEMO_SYNTHEA
from tests.pipeline_helpers import columns, rows, run, table_names, write_config, write_rows

IDENTIFIER_COLUMNS = ["Id", "SSN", "DRIVERS", "PASSPORT", "FIRST", "LAST", "MAIDEN", "ADDRESS"]


def snapshot(wh, schema: str) -> dict[str, list[tuple]]:
    """Every published table's rows, sorted; cdm_source's run date left out."""
    out = {}
    with wh.engine.connect() as conn:
        for table in published_tables():
            if table == "cdm_source":
                continue
            result = conn.execute(sa.text(f'SELECT * FROM "{schema}"."{table}"'))
            out[table] = sorted(tuple(r) for r in result.all())
    return out


def person_rows(snap: dict[str, list[tuple]], wh, schema: str, table: str) -> dict:
    """Rows of `table` grouped by person_id (None when the table has no person_id)."""
    cols = [name for name, _ in columns(wh, schema, table)]
    if "person_id" not in cols:
        return {None: snap[table]}
    i = cols.index("person_id")
    grouped: dict = {}
    for r in snap[table]:
        grouped.setdefault(r[i], []).append(r)
    return grouped


@pytest.fixture
def feed(tmp_path: Path) -> Path:
    dest = tmp_path / "feed"
    shutil.copytree(DEMO_SYNTHEA, dest)
    return dest


def test_same_input_gives_same_ids(duckdb_wh, feed: Path, tmp_path: Path) -> None:
    wh, schema = duckdb_wh
    config = write_config(tmp_path, wh, schema, feed)
    assert run(config, tmp_path).status == "published"
    first = snapshot(wh, schema)
    assert run(config, tmp_path).status == "published"
    assert snapshot(wh, schema) == first


def test_a_changed_patient_changes_only_their_rows(warehouse, feed: Path, tmp_path) -> None:
    wh, schema = warehouse
    config = write_config(tmp_path, wh, schema, feed)
    assert run(config, tmp_path).status == "published"
    before = snapshot(wh, schema)

    # one patient's record changes: a condition gets a stop date, a new condition appears
    conditions = rows(feed / "conditions.csv")
    open_one = next(c for c in conditions if not c["STOP"])
    open_one["STOP"] = "2024-01-01"
    new = dict(open_one, START="2024-01-15", STOP="", CODE="195662009")
    header = list(conditions[0].keys())
    write_rows(feed / "conditions.csv", header, [*conditions, new])

    assert run(config, tmp_path).status == "published"
    after = snapshot(wh, schema)
    with wh.engine.connect() as conn:
        changed_id = conn.execute(
            sa.text(
                f'SELECT person_id FROM "{schema}".condition_occurrence'
                " WHERE condition_start_date = DATE '2024-01-15'"
                " AND condition_source_value = '195662009'"
            )
        ).scalar_one()
    changed_tables = set()
    for table in before:
        b = person_rows(before, wh, schema, table)
        a = person_rows(after, wh, schema, table)
        for pid in set(a) | set(b):
            if pid != changed_id:
                assert a.get(pid) == b.get(pid), (table, pid)
        if a.get(changed_id) != b.get(changed_id):
            changed_tables.add(table)
    assert "condition_occurrence" in changed_tables
    # the patient's untouched rows keep their ids: visits are identical
    assert "visit_occurrence" not in changed_tables


def test_replay_rebuilds_from_landing_without_feeds(duckdb_wh, feed: Path, tmp_path) -> None:
    wh, schema = duckdb_wh
    config = write_config(tmp_path, wh, schema, feed)
    first = run(config, tmp_path)
    assert first.status == "published"
    before = snapshot(wh, schema)
    shutil.rmtree(feed)  # the feeds are gone; the landing area is enough
    replay = run(config, tmp_path, replay=first.run_id)
    assert replay.status == "published", replay.report["errors"]
    assert replay.report["replay_of"] == first.run_id
    assert replay.report["feeds"]["ehr"]["records_in"] == first.report["feeds"]["ehr"]["records_in"]
    assert snapshot(wh, schema) == before


def _identifiers() -> set[str]:
    found = set()
    for p in rows(DEMO_SYNTHEA / "patients.csv"):
        for col in IDENTIFIER_COLUMNS:
            value = p[col].strip()
            if len(value) >= 4:
                found.add(value)
    # names carry a numeric suffix in Synthea (Maynard46); search the bare name too
    for p in rows(DEMO_SYNTHEA / "patients.csv"):
        for col in ("FIRST", "LAST"):
            bare = p[col].rstrip("0123456789")
            if len(bare) >= 5:
                found.add(bare)
    return found


def _texts_in_warehouse(wh, schemas: list[str]) -> list[str]:
    targets = [
        (schema, table, name)
        for schema in schemas
        for table in table_names(wh, schema)
        for name, data_type in columns(wh, schema, table)
        if data_type.lower() in ("text", "varchar", "character varying")
    ]
    texts = []
    with wh.engine.connect() as conn:
        for schema, table, name in targets:
            q = f'SELECT DISTINCT "{name}" FROM "{schema}"."{table}"'
            texts.extend(str(v) for (v,) in conn.execute(sa.text(q)) if v)
    return texts


def _texts_in_parquet(folder: Path) -> list[str]:
    texts = []
    for path in folder.rglob("*.parquet"):
        table = pq.read_table(path)
        for name in table.column_names:
            if pa.types.is_string(table.schema.field(name).type):
                texts.extend(v for v in table.column(name).to_pylist() if v)
    return texts


def test_no_identifier_reaches_warehouse_logs_or_reports(warehouse, tmp_path: Path) -> None:
    wh, schema = warehouse
    config = write_config(tmp_path, wh, schema, DEMO_SYNTHEA)
    result = run(config, tmp_path)
    assert result.status == "published"
    identifiers = _identifiers()
    assert len(identifiers) > 100  # ids, SSNs, names, addresses of 27 patients
    haystacks = {
        "warehouse": "\n".join(_texts_in_warehouse(wh, [schema, f"{schema}_etl"])),
        "landing+quarantine": "\n".join(_texts_in_parquet(result.run_dir)),
        "run.log": (result.run_dir / "run.log").read_text(encoding="utf-8"),
        "report.json": (result.run_dir / "report.json").read_text(encoding="utf-8"),
        "report.html": (result.run_dir / "report.html").read_text(encoding="utf-8"),
    }
    assert len(haystacks["warehouse"]) > 10_000
    for where, text in haystacks.items():
        leaked = sorted(i for i in identifiers if i in text)
        assert leaked == [], f"{where} contains {leaked[:5]}"
    # and the person_source_value is the keyed pseudonym, not the source Id
    with wh.engine.connect() as conn:
        values = conn.execute(sa.text(f'SELECT person_source_value FROM "{schema}".person'))
        assert all(len(v) == 32 for (v,) in values)


def test_a_run_without_the_key_fails_cleanly(duckdb_wh, tmp_path, monkeypatch) -> None:
    wh, schema = duckdb_wh
    monkeypatch.delenv("OMOP_ETL_PSEUDONYM_KEY")
    result = run(write_config(tmp_path, wh, schema, DEMO_SYNTHEA), tmp_path)
    assert result.status == "failed" and result.exit_code == 2
    assert "OMOP_ETL_PSEUDONYM_KEY" in result.report["errors"][0]
    with open(result.run_dir / "report.json", encoding="utf-8") as fh:
        assert '"status": "failed"' in fh.read()
