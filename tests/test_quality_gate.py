"""The quality gate: generated checks pass on the demo, and each fatal failure refuses."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import sqlalchemy as sa
import yaml

from etl.cdm.spec import cdm_tables
from etl.config import load_config
from etl.pipeline.publish import published_tables
from etl.pipeline.run import RunResult, run_pipeline
from etl.pipeline.schemas import Schemas
from etl.quality import expectations as expectations_module
from etl.quality.checks import Check, OverRows, check_types, generate_checks
from etl.quality.gate import DECLARED
from etl.warehouse import Warehouse
from tests.conftest import DEMO_SYNTHEA, REPO, TEST_KEY
from tests.pipeline_helpers import in_tonights_tables, run, table_names, write_config
from tests.test_nightly_runs import snapshot

S = "{S}"
# (kind, SQL run in the stage just before the gate, the check that must refuse it)
INJECTIONS = [
    (
        "null_person_id",
        [
            f"UPDATE {S}.condition_occurrence SET person_id = NULL"
            f" WHERE condition_occurrence_id = (SELECT min(condition_occurrence_id)"
            f" FROM {S}.condition_occurrence)"
        ],
        ("isRequired", "condition_occurrence", "person_id"),
    ),
    (
        "duplicate_primary_key",
        [
            f"INSERT INTO {S}.person SELECT * FROM {S}.person"
            f" WHERE person_id = (SELECT min(person_id) FROM {S}.person)"
        ],
        ("isPrimaryKey", "person", "person_id"),
    ),
    (
        "orphan_visit",
        [
            f"UPDATE {S}.drug_exposure SET visit_occurrence_id = 999999999"
            f" WHERE drug_exposure_id = (SELECT min(drug_exposure_id) FROM {S}.drug_exposure)"
        ],
        ("isForeignKey", "drug_exposure", "visit_occurrence_id"),
    ),
    (
        "events_before_birth",
        [
            f"UPDATE {S}.condition_occurrence SET condition_start_date = DATE '1901-01-01'"
            f" WHERE condition_occurrence_id % 10 = 0"
        ],
        ("plausibleAfterBirth", "condition_occurrence", "condition_start_date"),
    ),
    (
        "implausible_lab_value",
        [
            f"UPDATE {S}.observation SET observation_concept_id = 37393449,"
            f" unit_concept_id = 8840, value_as_number = 5000"
            f" WHERE observation_id IN (SELECT observation_id FROM {S}.observation"
            f" ORDER BY observation_id LIMIT 3)"
        ],
        ("plausibleValueHigh", "observation", "value_as_number"),
    ),
]


def _checks_run_alone(monkeypatch: pytest.MonkeyPatch) -> tuple[list[Check], Callable]:
    """Record every check the gate runs on its own (`gate._counts`), not in a batch or a
    shared statement; returns the record and the unpatched `_counts`."""
    from etl.quality import gate

    alone: list[Check] = []
    one_by_one = gate._counts

    def spy(s_, c):  # type: ignore[no-untyped-def]
        alone.append(c)
        return one_by_one(s_, c)

    monkeypatch.setattr(gate, "_counts", spy)
    return alone, one_by_one


def _over_rows_check(name: str, table: str, field: str, violating: str) -> Check:
    """A check over `table`'s rows whose violating count is `violating` (SQL)."""
    over = OverRows("{S}." + table, violating)
    return Check(name, table, field, over.sql(), 0, "fatal", "c", over_rows=over)


def test_every_dqd_check_type_is_generated() -> None:
    names = {c.name for c in generate_checks(published_tables())}
    assert names == set(check_types()) and len(names) == 27


@dataclass
class Published:
    """The demo, published once per engine for this module's tests (they refuse loads,
    which leaves it unchanged, so it can be shared)."""

    wh: Warehouse
    schema: str
    config: Path
    workdir: Path
    result: RunResult
    tables: dict[str, list[tuple]]
    key_map: int
    ge_threads: list[str]  # the threads Great Expectations validated in


@pytest.fixture(scope="module")
def published(module_warehouse) -> Published:
    wh, schema, workdir = module_warehouse
    ge_threads: list[str] = []
    validate = expectations_module.run_expectations

    def spy(*args, **kwargs):  # type: ignore[no-untyped-def]
        ge_threads.append(threading.current_thread().name)
        return validate(*args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMOP_ETL_PSEUDONYM_KEY", TEST_KEY)
        mp.setattr(expectations_module, "run_expectations", spy)
        config = write_config(workdir, wh, schema, DEMO_SYNTHEA)
        result = run(config, workdir)
    assert result.status == "published", result.report["errors"]
    with wh.engine.connect() as conn:
        key_map = conn.execute(sa.text(f'SELECT count(*) FROM "{schema}_etl".key_map')).scalar()
    return Published(wh, schema, config, workdir, result, snapshot(wh, schema), key_map, ge_threads)


def test_demo_passes_its_gate_with_every_check_type(published: Published) -> None:
    result = published.result
    checks = result.report["checks"]
    dqd_checks = [c for c in checks if c.get("engine") != "great_expectations"]
    assert {c["name"] for c in dqd_checks} == set(check_types())
    # a column declared NOT NULL, integer or a one-column primary key answers its check
    declared = {c["name"]: c["answered_by"] for c in dqd_checks if "answered_by" in c}
    assert declared["cdmDatatype"] == "integer column type"
    assert all(c.get("answered_by") for c in dqd_checks if c["name"] == "cdmDatatype")
    assert not any(c.get("answered_by") for c in dqd_checks if c["name"] not in DECLARED)
    if published.wh.dialect == "duckdb":  # keyed before the checks: keys answered by them
        assert "gate.keys" in result.report["timings"]
        assert declared["isRequired"] == "NOT NULL constraint"
        assert all(c.get("answered_by") for c in dqd_checks if c["name"] == "isRequired")
        keys = [c for c in dqd_checks if c["name"] == "isPrimaryKey"]
        assert len(keys) == 23 and all(
            c["answered_by"] == "primary key constraint" and c["violating_rows"] == 0 for c in keys
        )
        person_key = next(c for c in keys if c["table"] == "person")
        assert person_key["total_rows"] == 27
    expectations = [c for c in checks if c.get("engine") == "great_expectations"]
    assert {c["name"] for c in expectations} == {
        "ge.expect_table_columns_to_match_set",
        "ge.expect_column_values_to_not_be_null",
        "ge.expect_column_values_to_be_unique",
        "ge.expect_column_value_lengths_to_be_between",
    }
    assert all(c["passed"] for c in expectations)
    person_pk = next(
        c
        for c in expectations
        if c["key"] == "ge.expect_column_values_to_be_unique.person.person_id"
    )
    assert person_pk["total_rows"] == 27
    # GE's own results and Data Docs are kept with the run
    assert result.report["data_docs"] == "gx/uncommitted/data_docs/local_site/index.html"
    docs = result.run_dir / result.report["data_docs"]
    assert docs.is_file() and "cdm.person" in docs.read_text(encoding="utf-8")
    assert "Great Expectations Data Docs" in (result.run_dir / "report.html").read_text()
    # GE's stored validation results: one per validated table, under its suite, without the
    # per-batch data fingerprint GE would compute by hashing every value (turned off)
    stored = [
        json.loads(p.read_text(encoding="utf-8"))
        for p in (result.run_dir / "gx" / "uncommitted" / "validations").rglob("*.json")
    ]
    suites = {r["suite_name"] for r in stored}
    validated = {c["table"] for c in expectations}
    if published.wh.dialect == "duckdb":  # the column set apart, on an empty frame
        assert suites == {f"cdm.{t}" for t in validated} | {f"cdm.{t}.schema" for t in validated}
    else:
        assert suites == {f"cdm.{t}" for t in validated}
    assert all("pandas_data_fingerprint" not in r["meta"]["batch_markers"] for r in stored)
    # GE validated in its own thread, beside the DQD checks, not after them
    assert len(published.ge_threads) == 1
    assert published.ge_threads[0].startswith("great-expectations")
    if published.wh.dialect == "duckdb":  # every partition through one dataframe asset
        gx_config = yaml.safe_load((result.run_dir / "gx" / "great_expectations.yml").read_text())
        assert list(gx_config["fluent_datasources"]["stage"]["assets"]) == [
            published.schema + "_stage"
        ]
    for c in checks:
        assert set(c) >= {"name", "table", "field", "passed", "violating_rows", "total_rows",
                          "threshold_pct", "severity", "category"}  # fmt: skip
        assert "error" not in c, c
    assert not [c for c in checks if c["severity"] == "fatal" and not c["passed"]]
    dqd = json.loads((result.run_dir / "dqd_results.json").read_text())
    assert dqd["Overview"]["countTotal"] == [len(dqd_checks)]
    assert dqd["Metadata"][0]["cdmVersion"] == "v5.4"
    # real findings on the demo are reported as warnings, with their numbers
    days = next(c for c in checks if c["key"] == "plausibleValueHigh.drug_exposure.days_supply")
    assert not days["passed"] and days["severity"] == "warning" and days["violating_rows"] > 0


GE_EXPECTED = {
    "null_person_id": (
        "ge.expect_column_values_to_not_be_null",
        "condition_occurrence",
        "person_id",
    ),
    "duplicate_primary_key": ("ge.expect_column_values_to_be_unique", "person", "person_id"),
}


@pytest.mark.parametrize(("kind", "sql", "expected"), INJECTIONS, ids=[i[0] for i in INJECTIONS])
def test_a_fatal_failure_refuses_the_load(published: Published, kind, sql, expected) -> None:
    wh, schema = published.wh, published.schema
    store = f'SELECT count(*), min(run_id), max(run_id) FROM "{schema}_etl".lineage'
    with wh.engine.connect() as conn:
        lineage_before = tuple(conn.execute(sa.text(store)).one())

    injected: list[str] = []

    def inject(step: str) -> None:  # as the gate starts (on DuckDB: before it keys the tables)
        if step.startswith("gate") and not injected:
            injected.append(step)
            with wh.begin() as conn:
                for statement in sql:
                    conn.execute(sa.text(in_tonights_tables(Schemas(wh, schema), statement)))

    result = run_pipeline(load_config(published.config), published.workdir, on_step=inject)
    assert (result.status, result.exit_code) == ("refused", 1), kind
    name, table, field = expected
    failed = [c for c in result.report["checks"] if not c["passed"] and c["severity"] == "fatal"]
    assert (name, table, field) in {(c["name"], c["table"], c["field"]) for c in failed}
    assert any(f"refused by {name} on {table}.{field}" in e for e in result.report["errors"])
    primary_key_checks = [c for c in result.report["checks"] if c["name"] == "isPrimaryKey"]
    if wh.dialect == "duckdb":  # keyed before the checks, unless a duplicate or NULL stops it
        keyed = kind not in ("duplicate_primary_key", "null_person_id")
        assert primary_key_checks and all(
            (c.get("answered_by") == "primary key constraint") == keyed for c in primary_key_checks
        ), kind
    if kind in GE_EXPECTED:  # the spec's GE suite finds it too, independently
        assert GE_EXPECTED[kind] in {(c["name"], c["table"], c["field"]) for c in failed}
    report = json.loads((result.run_dir / "report.json").read_text())
    assert report["status"] == "refused"
    # the published warehouse and the key map are exactly as they were
    assert snapshot(wh, schema) == published.tables
    with wh.engine.connect() as conn:
        assert conn.execute(sa.text(f'SELECT count(*) FROM "{schema}_etl".key_map')).scalar() == (
            published.key_map
        )
        # the lineage store still describes the published run (DuckDB's refused build keeps
        # its lineage beside it, as lineage_staged, until the next build)
        assert tuple(conn.execute(sa.text(store)).one()) == lineage_before
    if wh.dialect == "duckdb":  # kept for the auditor until the next build (the next case's)
        assert "lineage_staged" in table_names(wh, f"{schema}_etl")
        staged = f'SELECT DISTINCT run_id FROM "{schema}_etl".lineage_staged'
        with wh.engine.connect() as conn:  # stamped with the refused run's id at the stage
            assert conn.execute(sa.text(staged)).scalars().all() == [result.run_id]


def test_site_overrides_change_severity_disable_and_add_checks(duckdb_wh, tmp_path) -> None:
    wh, schema = duckdb_wh
    site = tmp_path / "site_quality"
    site.mkdir()
    (site / "site.yaml").write_text(
        "checks:\n"
        "  - match: {name: isForeignKey, fk_table: concept}\n"
        "    severity: warning\n"
        "  - match: {name: plausibleGender}\n"
        "    enabled: false\n"
        "  - match: {name: ge.expect_column_value_lengths_to_be_between, table: person}\n"
        "    enabled: false\n"
        "custom:\n"
        "  - name: no_visits_in_1900\n"
        "    table: visit_occurrence\n"
        "    severity: fatal\n"
        "    sql: SELECT count(*) FILTER (WHERE visit_start_date < DATE '1901-01-01'),"
        " count(*) FROM {S}.visit_occurrence\n",
        encoding="utf-8",
    )
    config = write_config(tmp_path, wh, schema, DEMO_SYNTHEA)
    cfg = load_config(config)
    cfg.quality = site
    result = run_pipeline(cfg, tmp_path)
    assert result.status == "published", result.report["errors"]
    names = {c["name"] for c in result.report["checks"]}
    assert "plausibleGender" not in names and "no_visits_in_1900" in names
    # the expectations are planned in GE's own thread, with the same overrides
    lengths = {
        c["table"]
        for c in result.report["checks"]
        if c["name"] == "ge.expect_column_value_lengths_to_be_between"
    }
    assert lengths and "person" not in lengths and "visit_occurrence" in lengths


def test_the_sql_checks_are_planned_without_importing_great_expectations() -> None:
    """The gate starts its SQL checks at once and imports GE in GE's own thread beside
    them: neither the run's modules nor the SQL plan may import it."""
    code = (
        "import sys\n"
        "import etl.cli, etl.pipeline.run, etl.pipeline.steps\n"
        "from etl.pipeline.publish import published_tables\n"
        "from etl.quality.plan import sql_plan\n"
        "checks = sql_plan(published_tables())\n"
        "assert len(checks) > 2000, len(checks)\n"
        "print(sorted(m for m in sys.modules if m.startswith('great_expectations'))[:3])\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO
    )
    assert done.stdout.strip() == "[]", done.stdout + done.stderr


def test_the_orm_is_imported_before_great_expectations_thread_starts() -> None:
    """SQLAlchemy's ORM is imported with the run's modules, in the main thread: the gate's
    SQL calls load parts of it lazily while GE's thread imports it, and two threads
    importing it at once failed the gate now and then on PostgreSQL ("partially
    initialized module 'sqlalchemy.orm.exc'")."""
    code = "import sys, etl.pipeline.steps\nprint('sqlalchemy.orm' in sys.modules)\n"
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO
    )
    assert done.stdout.strip() == "True", done.stdout + done.stderr


def test_a_bad_override_file_names_the_key(tmp_path: Path) -> None:
    from etl.quality.overrides import OverrideError, load_overrides

    bad = tmp_path / "bad.yaml"
    bad.write_text("checks:\n  - match: {name: x}\n    severity: deadly\n", encoding="utf-8")
    with pytest.raises(OverrideError, match=r"bad.yaml: checks.0.severity"):
        load_overrides([bad])


def test_quality_run_on_a_warehouse_built_elsewhere(warehouse, tmp_path: Path) -> None:
    """Plain SQL inserts with known defects into a CDM this project did not build."""
    from typer.testing import CliRunner

    from etl.cdm.schema import create_cdm
    from etl.cli import app
    from etl.vocab import load_vocabulary
    from tests.conftest import DEMO_VOCAB

    wh, schema = warehouse
    create_cdm(wh, schema, constraints=False)  # a sloppy warehouse: no keys, no NOT NULL
    load_vocabulary(wh, DEMO_VOCAB, schema)
    t = f'"{schema}"'
    statements = [
        f"INSERT INTO {t}.person (person_id, gender_concept_id, year_of_birth, birth_datetime,"
        " race_concept_id, ethnicity_concept_id) VALUES"
        " (1, 8507, 1980, TIMESTAMP '1980-05-01 00:00:00', 8527, 38003564),"
        " (2, 8532, 1990, TIMESTAMP '1990-01-01 00:00:00', 8527, 38003564)",
        f"INSERT INTO {t}.visit_occurrence (visit_occurrence_id, person_id, visit_concept_id,"
        " visit_start_date, visit_end_date, visit_type_concept_id) VALUES"
        " (10, 1, 9202, DATE '2020-01-01', DATE '2020-01-01', 32827)",
        f"INSERT INTO {t}.condition_occurrence (condition_occurrence_id, person_id,"
        " condition_concept_id, condition_start_date, condition_type_concept_id,"
        " visit_occurrence_id) VALUES"
        " (100, 1, 4112343, DATE '2020-01-01', 32817, 10),"
        " (100, 1, 4112343, DATE '2020-01-02', 32817, 10),"  # duplicate primary key
        " (101, NULL, 4112343, DATE '2020-01-03', 32817, 10),"  # no person
        " (102, 2, 4112343, DATE '2020-01-04', 32817, 999),"  # orphan visit
        " (103, 2, 4112343, DATE '1950-01-01', 32817, NULL)",  # before birth
        f"ALTER TABLE {t}.note DROP COLUMN note_title",  # a column of the spec missing
    ]
    with wh.begin() as conn:
        for sql in statements:
            conn.execute(sa.text(sql))
    out = tmp_path / "results"
    result = CliRunner().invoke(
        app, ["quality", "run", "--warehouse", wh.url, "--schema", schema, "--out", str(out)]
    )
    assert result.exit_code == 1, result.output
    checks = json.loads((out / "checks.json").read_text())
    failed = {(c["name"], c["table"], c["field"]) for c in checks if not c["passed"]}
    assert {
        ("isPrimaryKey", "condition_occurrence", "condition_occurrence_id"),
        ("isRequired", "condition_occurrence", "person_id"),
        ("isForeignKey", "condition_occurrence", "visit_occurrence_id"),
        ("plausibleAfterBirth", "condition_occurrence", "condition_start_date"),
        ("cdmField", "note", "note_title"),
    } <= failed
    assert ("cdmField", "note", "note_text") not in failed
    # the specification's Great Expectations suites find the key defects too
    assert {
        ("ge.expect_column_values_to_be_unique", "condition_occurrence", "condition_occurrence_id"),
        ("ge.expect_column_values_to_not_be_null", "condition_occurrence", "person_id"),
    } <= failed
    assert (out / "gx" / "uncommitted" / "data_docs" / "local_site" / "index.html").is_file()
    # GE keeps its datasource config there: never the warehouse URL (it may hold a password)
    gx_config = (out / "gx" / "great_expectations.yml").read_text(encoding="utf-8")
    assert wh.url not in gx_config
    dqd_checks = [c for c in checks if c.get("engine") != "great_expectations"]
    dqd = json.loads((out / "dqd_results.json").read_text())
    assert dqd["Overview"]["countOverallFailed"][0] == len(
        [c for c in dqd_checks if not c["passed"]]
    )
    assert {"CheckResults", "Metadata", "Overview", "startTimestamp"} <= set(dqd)


def _persons_validated(
    warehouse: tuple[Warehouse, str],
    tmp_path: Path,
    rows: list[str],
    *,
    chunk_rows: int,
    extra: str | None = None,
):  # type: ignore[no-untyped-def]
    """The GE suites' result on a person table of `rows` ('person_id, gender_concept_id,
    person_source_value' each; born 1970, race and ethnicity 0), in partitions of
    `chunk_rows`; with `extra`, the table has that text column the spec does not name."""
    from etl.cdm.schema import create_cdm
    from etl.quality.expectations import generate_expectations, run_expectations
    from etl.quality.standalone import InPlace

    wh, schema = warehouse
    create_cdm(wh, schema, tables=["person"], constraints=False)
    with wh.begin() as conn:
        if extra:
            conn.execute(sa.text(f'ALTER TABLE "{schema}".person ADD COLUMN {extra} TEXT'))
        for row in rows:
            conn.execute(sa.text(
                f'INSERT INTO "{schema}".person (person_id, gender_concept_id,'
                " person_source_value, year_of_birth, race_concept_id, ethnicity_concept_id)"
                f" VALUES ({row}, 1970, 0, 0)"
            ))  # fmt: skip
    return run_expectations(
        InPlace(wh, schema), generate_expectations(["person"]), {"person": len(rows)}, tmp_path,
        chunk_rows=chunk_rows,
    )  # fmt: skip


def test_great_expectations_suites_count_every_row_across_partitions(
    warehouse, tmp_path, monkeypatch
) -> None:
    """On DuckDB a table of more than one partition is validated in partitions streamed
    from one scan, and its primary key alone in hash partitions of the key: a duplicate
    key still lands in one partition and counts match the whole table's. A partition is
    validated for success alone, and with counts only when it fails."""
    import great_expectations as gx
    import pandas as pd

    formats: list[str] = []
    frames: list[tuple[str, str, int, list[str]]] = []  # (suite, format, rows, columns)
    arrow_backed: list[bool] = []  # per validated frame: every column an Arrow dtype
    validate = gx.ValidationDefinition.run

    def spy(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        formats.append(kwargs["result_format"])
        frame = (kwargs.get("batch_parameters") or {}).get("dataframe")
        if frame is not None:
            frames.append((self.suite.name, formats[-1], len(frame), list(frame.columns)))
            arrow_backed.append(all(isinstance(t, pd.ArrowDtype) for t in frame.dtypes))
        return validate(self, *args, **kwargs)

    monkeypatch.setattr(gx.ValidationDefinition, "run", spy)

    wh = warehouse[0]
    long = wh.dialect == "duckdb"  # PostgreSQL itself refuses text longer than varchar(n)
    rows = [
        f"{i}, {'NULL' if i == 4 else 8507}, '{'x' * (60 if i == 9 and long else 5)}'"
        for i in [1, 2, 3, 4, 5, 6, 6, 7, 8, 9]
    ]
    result = _persons_validated(warehouse, tmp_path, rows, chunk_rows=3)
    by_key = {c["key"]: c for c in result.checks}
    unique = by_key["ge.expect_column_values_to_be_unique.person.person_id"]
    assert (unique["passed"], unique["violating_rows"], unique["total_rows"]) == (False, 2, 10)
    gender = by_key["ge.expect_column_values_to_not_be_null.person.gender_concept_id"]
    assert (gender["passed"], gender["violating_rows"], gender["total_rows"]) == (False, 1, 10)
    length = by_key["ge.expect_column_value_lengths_to_be_between.person.person_source_value"]
    assert (length["passed"], length["violating_rows"]) == ((False, 1) if long else (True, 0))
    assert length["severity"] == "warning"
    columns = by_key["ge.expect_table_columns_to_match_set.person"]
    assert columns["passed"]
    assert by_key["ge.expect_column_values_to_not_be_null.person.year_of_birth"]["passed"]
    assert result.docs is not None and result.docs.is_file()
    if wh.dialect == "duckdb":  # passing partitions once; failing ones again, with counts
        assert formats.count("BOOLEAN_ONLY") >= 2
        assert 1 <= formats.count("BASIC") < formats.count("BOOLEAN_ONLY")
        # the column set on an empty frame of every column; the partitions hold only the
        # columns the column expectations read, and every row once
        spec = cdm_tables()["person"]
        empty = [(n, cols == list(spec.column_names)) for n, _, rows, cols in frames if not rows]
        assert empty == [("cdm.person.schema", True)]
        read = {f.name for f in spec.fields if f.required or f.varchar_length} | {"person_id"}
        parts = [(f, rows, cols) for n, f, rows, cols in frames if n == "cdm.person"]
        assert "birth_datetime" not in read and all(set(cols) == read for *_, cols in parts)
        assert sum(rows for f, rows, _ in parts if f == "BOOLEAN_ONLY") == 10
        assert [rows for f, rows, _ in parts if f == "BOOLEAN_ONLY"] == [3, 3, 3, 1]
        # the key's uniqueness: the key alone, in hash partitions of about 3 rows
        keys = [(f, rows, cols) for n, f, rows, cols in frames if n == "cdm.person.key"]
        assert all(cols == ["person_id"] for *_, cols in keys)
        assert len([k for k in keys if k[0] == "BOOLEAN_ONLY"]) > 1
        assert sum(rows for f, rows, _ in keys if f == "BOOLEAN_ONLY") == 10
        assert [f for f, _, _ in keys].count("BASIC") == 1  # the partition of both 6s
        # text is never turned into Python objects: the counts above come from Arrow data
        assert arrow_backed and all(arrow_backed)
    else:
        assert formats == ["BASIC"]
    # the partitions' Parquet spill (DuckDB) is gone once the suite has run
    assert not list(tmp_path.glob("ge-*"))


def test_a_partition_stream_stopped_early_leaves_the_warehouse_usable(duckdb_wh) -> None:
    """A consumer that stops reading the streamed partitions (GE failed on one) closes the
    scan before its transaction ends: the next statement on the warehouse runs."""
    from etl.quality.expectations import _streamed
    from etl.quality.standalone import InPlace

    wh, schema = duckdb_wh
    with wh.begin() as conn:
        conn.execute(sa.text(f'CREATE TABLE "{schema}".t AS SELECT range AS x FROM range(10)'))
    stream = _streamed(InPlace(wh, schema), "t", "x", 3)
    assert next(stream).num_rows == 3
    stream.close()
    with wh.begin() as conn:
        assert conn.execute(sa.text(f'SELECT count(*) FROM "{schema}".t')).scalar_one() == 10
    assert [f.num_rows for f in _streamed(InPlace(wh, schema), "t", "x", 4)] == [4, 4, 2]


def test_a_column_the_specification_lacks_fails_the_column_set(warehouse, tmp_path) -> None:
    """A table with a column the CDM specification does not name fails GE's column-set
    expectation once, over the table's rows, while its column expectations still pass."""
    rows = [f"{i}, 8507, NULL" for i in (1, 2, 3)]
    result = _persons_validated(warehouse, tmp_path, rows, chunk_rows=2, extra="patient_name")
    by_key = {c["key"]: c for c in result.checks}
    columns = by_key["ge.expect_table_columns_to_match_set.person"]
    assert (columns["passed"], columns["violating_rows"], columns["total_rows"]) == (False, 1, 3)
    unique = by_key["ge.expect_column_values_to_be_unique.person.person_id"]
    assert (unique["passed"], unique["total_rows"]) == (True, 3)


def test_checks_run_in_batches_and_a_broken_check_fails_alone(warehouse, monkeypatch) -> None:
    """Checks run as UNION ALL batches; a batch holding a check that errors, or that
    returns no row, is run again check by check: the others keep their own counts and
    only the broken ones fail, with their error."""
    from etl.pipeline.schemas import Schemas
    from etl.quality import gate

    wh, schema = warehouse
    s = Schemas(wh, schema)
    with wh.begin() as conn:
        conn.execute(sa.text(f'CREATE SCHEMA IF NOT EXISTS "{s.stage}"'))
        conn.execute(sa.text(s.sql("CREATE TABLE {S}.t AS SELECT 1 AS x UNION ALL SELECT 2")))

    def check(name: str, sql: str) -> Check:
        return Check(name, "t", "x", sql, threshold_pct=0, severity="fatal", category="c")

    good = [
        check(f"over_{k}", f"SELECT count(*) FILTER (WHERE x > {k}), count(*) FROM {{S}}.t")
        for k in range(3)
    ]
    broken = check("broken", "SELECT count(*), count(*) FROM {S}.no_such_table")
    empty = check("empty", "SELECT 1, 2 FROM {S}.t WHERE false")
    monkeypatch.setattr(gate, "BATCH", 2)
    alone, _ = _checks_run_alone(monkeypatch)  # on their own, not as part of a batch
    result = gate.run_checks(s, [good[0], broken, good[1], good[2], empty])
    # the batch of over_1 and over_2 ran whole; the others were re-run (or ran) alone
    assert [c.name for c in alone] == ["over_0", "broken", "empty"]
    counted = {c["name"]: (c["violating_rows"], c["total_rows"]) for c in result.checks}
    assert [c["name"] for c in result.checks] == ["over_0", "broken", "over_1", "over_2", "empty"]
    assert counted["over_0"] == (2, 2) and counted["over_1"] == (1, 2)
    assert counted["over_2"] == (0, 2)
    errors = {c["name"]: c.get("error") for c in result.checks if not c["passed"]}
    assert set(errors) == {"over_0", "over_1", "broken", "empty"}
    assert "no_such_table" in errors["broken"] and errors["empty"]
    assert errors["over_0"] is None and errors["over_1"] is None
    with wh.begin() as conn:
        conn.execute(sa.text(s.sql("DROP TABLE {S}.t")))


def test_checks_a_declaration_answers_count_nothing_and_the_others_run(
    warehouse, monkeypatch
) -> None:
    """A key, NOT NULL or integer check whose column the catalogue declares so is answered
    by the declaration, (0, the table's rows), without its query; the same checks on
    columns declared otherwise run their queries and count what they find."""
    from etl.quality import gate

    wh, schema = warehouse
    s = Schemas(wh, schema, stage_name=schema + "_declared")
    with wh.begin() as conn:
        conn.execute(sa.text(f'CREATE SCHEMA IF NOT EXISTS "{s.stage}"'))
        conn.execute(sa.text(s.sql(
            "CREATE TABLE {S}.t (k INTEGER PRIMARY KEY, n BIGINT NOT NULL, v VARCHAR(10),"
            " dup INTEGER)"
        )))  # fmt: skip
        conn.execute(sa.text(s.sql("INSERT INTO {S}.t VALUES (1, 1, '1.5', 7), (2, 2, NULL, 7)")))
    t = "{S}.t"

    def check(name: str, field: str, sql: str) -> Check:
        return Check(name, "t", field, sql, 0, "fatal", "c")

    checks = [
        check("isPrimaryKey", "k", f"SELECT 99, count(*) FROM {t}"),
        check("isPrimaryKey", "dup", f"SELECT coalesce(sum(n), 0), (SELECT count(*) FROM {t})"
              f" FROM (SELECT count(*) AS n FROM {t} GROUP BY dup HAVING count(*) > 1) d"),
        check("isRequired", "n", f"SELECT 99, count(*) FROM {t}"),
        check("isRequired", "v", f"SELECT count(*) FILTER (WHERE v IS NULL), count(*) FROM {t}"),
        check("cdmDatatype", "n", f"SELECT 99, count(*) FROM {t}"),
        # a site's own check named like one keeps its query
        Check("isRequired", "t", "k", f"SELECT 1, count(*) FROM {t}", 0, "fatal", "Custom"),
        check("cdmDatatype", "v", f"SELECT count(*) FILTER (WHERE v IS NOT NULL AND"
              f" CAST(v AS DOUBLE PRECISION) <> CAST(CAST(CAST(v AS DOUBLE PRECISION) AS BIGINT)"
              f" AS DOUBLE PRECISION)), count(*) FROM {t}"),
    ]  # fmt: skip
    try:
        alone, _ = _checks_run_alone(monkeypatch)
        monkeypatch.setattr(gate, "BATCH", 1)  # every queried check goes through the spy
        result = gate.run_checks(s, checks)
        got = {
            (c["name"], c["field"]): (c["violating_rows"], c["total_rows"]) for c in result.checks
        }
        assert got == {
            ("isPrimaryKey", "k"): (0, 2), ("isPrimaryKey", "dup"): (2, 2),
            ("isRequired", "n"): (0, 2), ("isRequired", "v"): (1, 2),
            ("cdmDatatype", "n"): (0, 2), ("cdmDatatype", "v"): (1, 2),
            ("isRequired", "k"): (1, 2),
        }  # fmt: skip
        answered = {(c["name"], c["field"]): c.get("answered_by") for c in result.checks}
        assert answered[("isPrimaryKey", "k")] == "primary key constraint"
        assert answered[("isRequired", "n")] == "NOT NULL constraint"
        assert answered[("cdmDatatype", "n")] == "integer column type"
        assert {(c.name, c.field) for c in alone} == {
            ("isPrimaryKey", "dup"), ("isRequired", "v"), ("cdmDatatype", "v"),
            ("isRequired", "k"),
        }  # fmt: skip
    finally:
        with wh.begin() as conn:
            conn.execute(sa.text(f'DROP SCHEMA "{s.stage}" CASCADE'))


def test_catalogue_checks_answer_as_their_sql_does(warehouse, monkeypatch) -> None:
    """cdmTable and cdmField checks are answered from one read of the catalogue, not one
    information_schema query each: every answer equals the one the check's own SQL gives,
    present or missing, and the results keep the checks' order."""
    from etl.pipeline.schemas import Schemas
    from etl.quality import gate

    wh, schema = warehouse
    s = Schemas(wh, schema)
    tables = ["person", "note", "specimen"]
    with wh.begin() as conn:
        conn.execute(sa.text(f'CREATE SCHEMA IF NOT EXISTS "{s.stage}"'))
        conn.execute(sa.text(s.sql("CREATE TABLE {S}.person (person_id BIGINT)")))
        conn.execute(sa.text(s.sql("CREATE TABLE {S}.note (note_id BIGINT, note_text TEXT)")))
    try:
        checks = [
            c for c in generate_checks(tables) if c.name in ("cdmTable", "cdmField", "isRequired")
        ]
        checks = [c for c in checks if c.name != "isRequired" or c.table != "specimen"]
        catalogued = [c for c in checks if c.catalog is not None]
        assert {c.name for c in catalogued} == {"cdmTable", "cdmField"}
        assert len(catalogued) == len([c for c in checks if c.name.startswith("cdm")])
        alone, one_by_one = _checks_run_alone(monkeypatch)
        monkeypatch.setattr(gate, "BATCH", 1)  # every SQL-answered check goes through spy
        result = gate.run_checks(s, checks)
        queried = [c.name for c in alone]
        assert "cdmField" not in queried and "cdmTable" not in queried
        assert [c["key"] for c in result.checks] == [c.key for c in checks]
        for check, entry in zip(checks, result.checks, strict=True):
            if check.catalog is not None:
                expected = one_by_one(s, check)  # the check's own information_schema query
                assert (entry["violating_rows"], entry["total_rows"]) == expected, check.key
        failed = {c["key"] for c in result.checks if not c["passed"]}
        assert "cdmTable.specimen" in failed and "cdmTable.note" not in failed
        assert "cdmField.note.note_title" in failed and "cdmField.note.note_text" not in failed
        assert "cdmField.person.person_id" not in failed
        assert "cdmField.person.gender_concept_id" in failed
    finally:
        with wh.begin() as conn:
            conn.execute(sa.text(s.sql("DROP TABLE {S}.person")))
            conn.execute(sa.text(s.sql("DROP TABLE {S}.note")))


def test_checks_over_a_tables_rows_count_as_their_own_sql_does(
    published: Published, monkeypatch
) -> None:
    """Foreign-key, concept and primary-key checks count their violations alone, each
    table's rows counted once: every answer equals the check's own query's (findings
    among them, from an orphan visit and a duplicate key added here), and none of them
    runs alone."""
    from etl.pipeline.schemas import Schemas
    from etl.quality import gate

    s = Schemas(published.wh, published.schema, stage_name=published.schema)
    checks = [c for c in generate_checks(published_tables()) if c.over_rows is not None]
    assert {c.name for c in checks} == {
        "isForeignKey", "isStandardValidConcept", "fkDomain", "fkClass", "isPrimaryKey",
    }  # fmt: skip
    with published.wh.begin() as conn:  # a scratch table beside the published ones
        conn.execute(sa.text(s.sql("CREATE TABLE {S}.scratch (k BIGINT, ref BIGINT)")))
        conn.execute(sa.text(s.sql("INSERT INTO {S}.scratch VALUES (1, 1), (1, -5), (2, NULL)")))
    try:
        scratch = [
            _over_rows_check("dup", "scratch", "k", "SELECT coalesce(sum(n), 0) FROM (SELECT"
                " count(*) AS n FROM {S}.scratch GROUP BY k HAVING count(*) > 1) d"),
            _over_rows_check("orphan", "scratch", "ref", "SELECT count(*) FROM {S}.scratch"
                " WHERE ref IS NOT NULL AND NOT EXISTS (SELECT 1 FROM {S}.person p"
                " WHERE p.person_id = ref)"),
        ]  # fmt: skip
        alone, one_by_one = _checks_run_alone(monkeypatch)
        answered = gate._over_rows_counts(s, [*checks, *scratch])
        assert set(answered) == {id(c) for c in [*checks, *scratch]} and not alone
        for c in [*checks, *scratch]:
            assert answered[id(c)] == one_by_one(s, c), c.key
        assert answered[id(scratch[0])] == (2, 3) and answered[id(scratch[1])] == (1, 3)
        # and the gate takes this path: none of them reaches the batches of own queries
        batched: list = []
        batch_counts = gate._batch_counts

        def batches(s_: Schemas, batch: list) -> list:
            batched.extend(batch)
            return batch_counts(s_, batch)

        monkeypatch.setattr(gate, "_batch_counts", batches)
        result = gate.run_checks(s, [*checks, *scratch])
        assert not batched and not alone and len(result.checks) == len(checks) + 2
    finally:
        with published.wh.begin() as conn:
            conn.execute(sa.text(s.sql("DROP TABLE {S}.scratch")))


def test_foreign_key_and_standard_concept_counts_equal_dqds_not_exists(
    published: Published,
) -> None:
    """The foreign-key and standard-concept checks count their orphans with a LEFT JOIN
    (`checks._missing`); DQD writes NOT EXISTS. Every such check on the demo counts what
    NOT EXISTS counts, and so do orphans in a scratch table whose referenced keys repeat
    and whose own key refers to itself."""
    from etl.pipeline.schemas import Schemas
    from etl.quality.checks import _missing

    s = Schemas(published.wh, published.schema, stage_name=published.schema)
    checks = [
        c for c in generate_checks(published_tables())
        if c.name in {"isForeignKey", "isStandardValidConcept"}
    ]  # fmt: skip
    assert len(checks) > 100 and all(c.over_rows and c.examples_sql for c in checks)
    # counted by the uncorrelated join, DQD's NOT EXISTS kept for the examples
    assert all(
        " LEFT JOIN " in c.over_rows.violating and "EXISTS" not in c.over_rows.violating
        and "NOT EXISTS" in (c.examples_sql or "")
        for c in checks if c.over_rows
    )  # fmt: skip
    scratch = [
        ("{S}.scratch", '"ref"', "{S}.scratch_ref", "k"),  # refs 3, 3 and 9 missing
        ("{S}.scratch", '"up"', "{S}.scratch", "id"),  # up 8 missing
    ]
    try:
        with published.wh.begin() as conn:
            conn.execute(sa.text(s.sql("CREATE TABLE {S}.scratch_ref (k BIGINT)")))
            conn.execute(sa.text(s.sql("INSERT INTO {S}.scratch_ref VALUES (1), (1), (2)")))
            conn.execute(
                sa.text(s.sql("CREATE TABLE {S}.scratch (id BIGINT, ref BIGINT, up BIGINT)"))
            )
            conn.execute(sa.text(s.sql(
                "INSERT INTO {S}.scratch VALUES (1, 1, NULL), (2, 2, 1), (3, 3, 8), (4, NULL, 2),"
                " (5, 3, 5), (6, 9, NULL), (7, 1, 1)"
            )))  # fmt: skip
            found: dict[str, tuple[int, int]] = {}
            for c in checks:
                assert c.over_rows is not None and c.examples_sql
                joined = conn.execute(sa.text(s.sql(c.over_rows.violating))).scalar_one()
                dqd = f"SELECT count(*) FROM {{S}}.{c.table} {c.examples_sql}"
                found[c.key] = (joined, conn.execute(sa.text(s.sql(dqd))).scalar_one())
            assert all(a == b for a, b in found.values()), {
                k: v for k, v in found.items() if v[0] != v[1]
            }
            counted = []
            for table, fld, ref, ref_field in scratch:
                joined = conn.execute(
                    sa.text(s.sql(_missing(table, fld, ref, ref_field).violating))
                ).scalar_one()
                dqd = conn.execute(sa.text(s.sql(
                    f"SELECT count(*) FROM {table} WHERE {fld} IS NOT NULL AND NOT EXISTS"
                    f" (SELECT 1 FROM {ref} x WHERE x.{ref_field} = {table}.{fld})"
                ))).scalar_one()  # fmt: skip
                counted.append((joined, dqd))
            assert counted == [(3, 3), (1, 1)]
    finally:
        with published.wh.begin() as conn:
            conn.execute(sa.text(s.sql("DROP TABLE IF EXISTS {S}.scratch")))
            conn.execute(sa.text(s.sql("DROP TABLE IF EXISTS {S}.scratch_ref")))


def test_a_violating_count_that_fails_leaves_its_checks_to_the_batches(
    duckdb_wh, monkeypatch
) -> None:
    """A batch of violating counts that errors answers none of its checks: they run their
    own queries in the batches (and then alone), so the good one keeps its counts and the
    broken one fails with its own error."""
    from etl.pipeline.schemas import Schemas
    from etl.quality import gate

    wh, schema = duckdb_wh
    s = Schemas(wh, schema)
    with wh.begin() as conn:
        conn.execute(sa.text(f'CREATE SCHEMA IF NOT EXISTS "{s.stage}"'))
        conn.execute(sa.text(s.sql("CREATE TABLE {S}.t AS SELECT 1 AS x UNION ALL SELECT 2")))

    good = _over_rows_check("over_1", "t", "x", "SELECT count(*) FROM {S}.t WHERE x > 1")
    broken = _over_rows_check(
        "orphan", "t", "x", "SELECT count(*) FROM {S}.t WHERE x NOT IN (SELECT k FROM {S}.gone)"
    )
    alone, _ = _checks_run_alone(monkeypatch)
    result = gate.run_checks(s, [good, broken])
    assert [c.name for c in alone] == [
        "over_1",
        "orphan",
    ]  # the batch of their own queries failed too
    entries = {c["name"]: c for c in result.checks}
    assert (entries["over_1"]["violating_rows"], entries["over_1"]["total_rows"]) == (1, 2)
    assert entries["over_1"]["passed"] is False and "error" not in entries["over_1"]
    assert not entries["orphan"]["passed"] and "gone" in entries["orphan"]["error"]
    assert gate._over_rows_counts(s, [good]) == {id(good): (1, 2)}


def test_checks_run_without_jit_on_postgresql(warehouse: tuple[Warehouse, str]) -> None:
    """The checks' statements are many small aggregates in one UNION ALL, which
    PostgreSQL's JIT compiled for longer than they ran (Warehouse.without_jit): in the
    gate's transactions it is off, even where the planner would compile everything, and
    a transaction that turns it off for a statement has it back afterwards."""
    wh, schema = warehouse
    union = " UNION ALL ".join(
        f"SELECT {i} AS n, (SELECT count(*) FROM generate_series(1, 1000) g WHERE g % 7 = {i})"
        for i in range(5)
    )
    if wh.dialect != "postgresql":
        with wh.begin_checks() as conn:  # elsewhere: a plain transaction
            assert sorted(conn.execute(sa.text(union)).all())[0][1] == 142
        return

    def jit_compiled(conn: sa.Connection) -> bool:
        plan = [r[0] for r in conn.execute(sa.text(f"EXPLAIN (ANALYZE) {union}"))]
        return any(line.startswith("JIT:") for line in plan)

    force = "SET LOCAL jit = on; SET LOCAL jit_above_cost = 0"
    with wh.begin() as conn:
        conn.execute(sa.text(force))
        available = jit_compiled(conn)  # a server built without LLVM never compiles
    with wh.begin_checks() as conn:
        conn.execute(sa.text("SET LOCAL jit_above_cost = 0"))
        assert conn.execute(sa.text("SELECT current_setting('jit')")).scalar_one() == "off"
        assert not jit_compiled(conn)
    with wh.begin() as conn:
        conn.execute(sa.text(force))
        with wh.without_jit(conn):
            assert not jit_compiled(conn)
        assert conn.execute(sa.text("SELECT current_setting('jit')")).scalar_one() == "on"
        assert jit_compiled(conn) == available
    # the gate itself: checks that count 1 where JIT is on, batched and alone (with
    # parameters), count 0 through `run_checks`, where a plain transaction counts 1
    from etl.quality import gate

    jit_on = "CASE WHEN current_setting('jit') = 'on' THEN 1 ELSE 0 END"
    with wh.begin() as conn:
        assert conn.execute(sa.text(f"SELECT {jit_on}")).scalar_one() == 1  # server default
    checks = [
        Check(f"jit_{k}", "t", None, f"SELECT {jit_on} + :zero, 1" if k == 2 else
              f"SELECT {jit_on}, 1", threshold_pct=0, severity="fatal", category="c",
              params={"zero": 0} if k == 2 else {})
        for k in range(3)
    ]  # fmt: skip
    result = gate.run_checks(Schemas(wh, schema), checks)
    assert [(c["name"], c["violating_rows"]) for c in result.checks] == [
        ("jit_0", 0), ("jit_1", 0), ("jit_2", 0),
    ]  # fmt: skip
