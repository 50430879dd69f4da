"""Lineage: every table family traced back to its exact source line, and records forward."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from etl.cli import app
from etl.lineage import trace_row, trace_source
from etl.pseudonym import pseudonym
from tests.conftest import DEMO_SYNTHEA, TEST_KEY, pseudonym_key_set
from tests.pipeline_helpers import columns, query, rows, run, scalar, table_names, write_config
from tests.test_nightly_runs import _identifiers

# table -> (source file, source column holding the row's code or date, CDM column to match)
FAMILIES = {
    "condition_occurrence": ("conditions.csv", "CODE", "condition_source_value"),
    "drug_exposure": ("medications.csv", "CODE", "drug_source_value"),
    "procedure_occurrence": ("procedures.csv", "CODE", "procedure_source_value"),
    "measurement": ("observations.csv", "CODE", "measurement_source_value"),
    "observation": ("observations.csv", "CODE", "observation_source_value"),
    "device_exposure": ("devices.csv", "CODE", "device_source_value"),
    "visit_occurrence": ("encounters.csv", "ENCOUNTERCLASS", "visit_source_value"),
    "payer_plan_period": ("payer_transitions.csv", "START_YEAR", None),
    "cost": ("claims.csv", None, None),
    "care_site": ("organizations.csv", None, None),
    "provider": ("providers.csv", "SPECIALITY", "specialty_source_value"),
    "location": ("patients.csv", None, None),
    "death": ("patients.csv", "DEATHDATE", None),
}


def _line(path: Path, number: int) -> dict[str, str]:
    """The record at physical line `number` (header = line 1) as a dict."""
    return rows(path)[number - 2]


@pytest.fixture(scope="module")
def traced(module_warehouse):
    """The demo feed plus two bad lines, published once per engine; the tests only read."""
    wh, schema, workdir = module_warehouse
    feed = workdir / "feed"
    shutil.copytree(DEMO_SYNTHEA, feed)
    with (feed / "conditions.csv").open("a", encoding="utf-8") as fh:
        patient = rows(feed / "conditions.csv")[0]["PATIENT"]
        fh.write(f"2020-13-01,,{patient},,195662009,Bad date\n")  # quarantined
        fh.write("2020-01-01,,not-a-known-patient,,195662009,Unknown\n")  # quarantined
    n_lines = len(rows(feed / "conditions.csv")) + 1
    with pseudonym_key_set():
        result = run(write_config(workdir, wh, schema, feed), workdir)
    assert result.status == "published", result.report["errors"]
    return wh, schema, feed, result, n_lines


def _some_id(wh, schema: str, table: str, where: str = "") -> int:
    key = "person_id" if table == "death" else f"{table}_id"
    return scalar(wh, f'SELECT min({key}) FROM "{schema}"."{table}" {where}')


def test_every_table_family_traces_to_its_source_line(traced) -> None:
    wh, schema, feed, result, _ = traced
    for table, (file_name, src_col, cdm_col) in FAMILIES.items():
        row_id = scalar(
            wh,
            f'SELECT min(cdm_id) FROM "{schema}_etl".lineage'
            " WHERE cdm_table = :t AND source_file = :f",
            t=table,
            f=file_name,
        )
        t = trace_row(wh, schema, table, row_id)
        assert t.row is not None and t.sources, table
        files = {s["source_file"] for s in t.sources}
        assert file_name in files, (table, files)
        src = next(s for s in t.sources if s["source_file"] == file_name)
        assert src["run_id"] == result.run_id
        record = _line(feed / file_name, src["source_line"])
        if src_col and cdm_col:
            assert record[src_col] == t.row[cdm_col], table
        if table == "death":
            assert record["DEATHDATE"] == str(t.row["death_date"])
    # persons: the traced line's patient Id is the one pseudonymised into the row
    t = trace_row(wh, schema, "person", _some_id(wh, schema, "person"))
    record = _line(feed / "patients.csv", t.sources[0]["source_line"])
    assert pseudonym(TEST_KEY.encode(), record["Id"])[:32] == t.row["person_source_value"]
    assert t.person_key == t.row["person_source_value"]


def test_derived_rows_trace_through_their_records(traced) -> None:
    wh, schema, *_ = traced
    for table, source_file in [
        ("condition_era", "conditions.csv"),
        ("drug_era", "medications.csv"),
        ("observation_period", "encounters.csv"),
    ]:
        t = trace_row(wh, schema, table, _some_id(wh, schema, table))
        assert t.derived_from and t.sources, table
        assert {s["source_file"] for s in t.sources} == {source_file}


def test_mapping_rules_are_named(traced) -> None:
    wh, schema, *_ = traced
    # a Synthea condition whose standard concept is an Observation: re-routing is named
    obs = _some_id(wh, schema, "observation", "WHERE observation_source_value = '160903007'")
    rule = trace_row(wh, schema, "observation", obs).sources[0]["mapping_rule"]
    assert "domain Observation (declared Condition)" in rule
    visit = trace_row(wh, schema, "visit_occurrence", _some_id(wh, schema, "visit_occurrence"))
    assert visit.sources[0]["mapping_rule"].startswith("local_map synthea.csv:")


def test_source_records_trace_forward(traced) -> None:
    wh, schema, feed, result, n_lines = traced
    bad_date, unknown = n_lines - 1, n_lines
    t = trace_source(wh, schema, "ehr", "conditions.csv", bad_date)
    assert t.rows == [] and t.set_aside[0]["rule"] == "START is not a recognised date"
    assert t.set_aside[0]["run_id"] == result.run_id
    t = trace_source(wh, schema, "ehr", "conditions.csv", unknown)
    assert [(a["status"], a["rule"]) for a in t.set_aside] == [("quarantined", "unknown_person")]
    t = trace_source(wh, schema, "ehr", "payers.csv", 2)
    assert [(a["status"], a["rule"]) for a in t.set_aside] == [("filtered", "reference_not_used")]
    t = trace_source(wh, schema, "ehr", "conditions.csv", 2)
    assert len(t.rows) == 1 and t.set_aside == []
    code = _line(feed / "conditions.csv", 2)["CODE"]
    assert t.rows[0]["source_code"] == code


def test_trace_output_holds_no_identifier(traced) -> None:
    wh, schema, feed, _result, n_lines = traced
    config = feed.parent / "site.yaml"
    outputs = []
    for table in [*FAMILIES, "person", "condition_era", "observation_period"]:
        row_id = _some_id(wh, schema, table)
        r = CliRunner().invoke(app, ["trace", table, str(row_id), "--config", str(config)])
        assert r.exit_code == 0, r.output
        outputs.append(r.output)
    for line in (2, 3, n_lines - 1, n_lines):
        r = CliRunner().invoke(
            app, ["trace", "--source", "ehr", f"conditions.csv:{line}", "--config", str(config)]
        )
        assert r.exit_code == 0, r.output
        outputs.append(r.output)
    text = "\n".join(outputs)
    assert "came from" in text and "unknown_person" in text
    leaked = sorted(i for i in _identifiers() if i in text)
    assert leaked == []


def test_report_links_rows_to_their_trace(traced) -> None:
    *_, result, _ = traced
    samples = result.report["trace_samples"]
    assert {"person", "measurement", "visit_occurrence"} <= set(samples)
    html = (result.run_dir / "report.html").read_text(encoding="utf-8")
    assert f"omop-etl trace measurement {samples['measurement'][0]}" in html


def test_the_store_is_the_published_runs_lineage(traced) -> None:
    """Published, the build's lineage is the store (on DuckDB renamed into it, with the run
    id added; on PostgreSQL copied): every row names the run, none stays staged."""
    wh, schema, _, result, _ = traced
    etl = f"{schema}_etl"
    runs = query(wh, f'SELECT run_id, count(*) FROM "{etl}".lineage GROUP BY run_id')
    assert len(runs) == 1 and runs[0][0] == result.run_id and runs[0][1] > 1000
    assert {name for name, _ in columns(wh, etl, "lineage")} == {
        "cdm_table", "cdm_id", "run_id", "feed", "source_file", "source_line",
        "source_vocabulary", "source_code", "mapping_rule",
    }  # fmt: skip
    assert "lineage_staged" not in table_names(wh, etl)


def test_duckdb_staged_lineage_carries_its_run_id_from_the_stage(duckdb_wh) -> None:
    """On DuckDB the staged lineage gets the run's id as a column default when the stage
    is prepared, so the publish only renames it (no column added to the full table); a
    stage prepared without the id, or with another run's, still publishes this run's."""
    import sqlalchemy as sa

    from etl.cdm.build.common import LINEAGE_DDL
    from etl.cdm.build.rules import DISPOSITION_DDL
    from etl.pipeline.publish import publish_lineage, staged_lineage_run_column
    from etl.pipeline.schemas import Schemas

    wh, cdm = duckdb_wh
    s = Schemas(wh, cdm)
    statements: list[str] = []
    sa.event.listen(wh.engine, "before_cursor_execute", lambda *a: statements.append(a[2]))
    for staged_for, publishing in (("R1", "R1"), (None, "R2"), ("R3", "R4")):
        with wh.begin() as conn:
            for schema in (s.stage, s.etl):
                wh.create_schema(conn, schema)
            s.run(conn, DISPOSITION_DDL)
            s.run(
                conn,
                "CREATE OR REPLACE TABLE {S}.src_quarantine (feed TEXT, source_file TEXT,"
                " source_line BIGINT, record_set TEXT, reason TEXT)",
            )
            s.run(conn, LINEAGE_DDL)
            if staged_for:
                s.run(conn, staged_lineage_run_column(staged_for))
            s.run(
                conn,
                "INSERT INTO {SL} (cdm_table, cdm_id, feed, source_file, source_line)"
                " VALUES ('person', 1, 'ehr', 'patients.csv', 2)",
            )
            statements.clear()
            publish_lineage(s, conn, publishing)
        added = [q for q in statements if "ADD COLUMN" in q]
        assert bool(added) == (staged_for != publishing), (staged_for, publishing)
        assert query(wh, f'SELECT run_id, cdm_table FROM "{s.etl}".lineage') == [
            (publishing, "person")
        ]
        assert "lineage_staged" not in table_names(wh, s.etl)
