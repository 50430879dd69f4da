"""The generated schema matches the CDM v5.4 specification CSVs, on both engines."""

from __future__ import annotations

import csv
import re

import pytest
import sqlalchemy as sa
from typer.testing import CliRunner

from etl.cdm.schema import create_cdm
from etl.cli import app
from tests.conftest import REPO
from tests.pipeline_helpers import primary_keys

SPEC_DIR = REPO / "etl" / "cdm" / "spec_data"


def _spec_rows() -> list[dict[str, str]]:
    rows = []
    for name in ("cdm54_fields.csv", "micdm_fields.csv"):
        with (SPEC_DIR / name).open(newline="", encoding="utf-8") as fh:
            rows.extend(csv.DictReader(fh))
    return rows


def _expected_type(datatype: str, dialect: str) -> tuple[str, int | None]:
    """What information_schema should report for a spec datatype (written independently)."""
    t = datatype.lower()
    m = re.fullmatch(r"varchar\((\d+)\)", t)
    if dialect == "postgresql":
        if m:
            return "character varying", int(m.group(1))
        names = {
            "integer": "integer",
            "float": "double precision",
            "date": "date",
            "datetime": "timestamp without time zone",
            "varchar(max)": "text",
        }
        return names[t], None
    # DuckDB keeps no varchar length and reports upper-case type names.
    if m or t == "varchar(max)":
        return "VARCHAR", None
    names = {"integer": "INTEGER", "float": "DOUBLE", "date": "DATE", "datetime": "TIMESTAMP"}
    return names[t], None


def test_spec_has_39_cdm_tables_and_2_imaging_tables() -> None:
    tables = {r["cdmTableName"].lower() for r in _spec_rows()}
    assert len(tables) == 41
    assert {"image_occurrence", "image_feature", "person", "concept"} <= tables


def test_created_schema_matches_specification(warehouse) -> None:
    wh, schema = warehouse
    created = create_cdm(wh, schema)
    spec = _spec_rows()
    assert len(created) == 41
    with wh.begin() as conn:
        actual = {
            (r.table_name, r.column_name): r
            for r in conn.execute(
                sa.text(
                    "SELECT table_name, column_name, data_type, is_nullable,"
                    " character_maximum_length, ordinal_position"
                    " FROM information_schema.columns WHERE table_schema = :s"
                ),
                {"s": schema},
            )
        }
    assert len(actual) == len(spec) == 432 + 23
    for row in spec:
        key = (row["cdmTableName"].lower(), row["cdmFieldName"].strip('"').lower())
        col = actual[key]
        exp_type, exp_len = _expected_type(row["cdmDatatype"], wh.dialect)
        assert col.data_type == exp_type, key
        if wh.dialect == "postgresql":
            assert col.character_maximum_length == exp_len, key
        assert (col.is_nullable == "NO") == (row["isRequired"] == "Yes"), key


def test_primary_keys_follow_specification(warehouse) -> None:
    wh, schema = warehouse
    create_cdm(wh, schema)
    actual = primary_keys(wh, schema)
    expected = {
        (r["cdmTableName"].lower(), r["cdmFieldName"].lower())
        for r in _spec_rows()
        if r["isPrimaryKey"] == "Yes"
    }
    assert actual == expected
    assert len(expected) == 30


def test_create_is_idempotent(warehouse) -> None:
    wh, schema = warehouse
    assert len(create_cdm(wh, schema)) == 41
    assert create_cdm(wh, schema) == []
    assert len(wh.table_names(schema)) == 41


@pytest.mark.postgres
def test_postgres_foreign_keys_and_indexes(pg_wh) -> None:
    wh, schema = pg_wh
    create_cdm(wh, schema, foreign_keys=True, indexes=True)
    insp = sa.inspect(wh.engine)
    fks = insp.get_foreign_keys("condition_occurrence", schema=schema)
    targets = {(fk["constrained_columns"][0], fk["referred_table"]) for fk in fks}
    assert ("person_id", "person") in targets
    assert ("condition_concept_id", "concept") in targets
    index_cols = {tuple(ix["column_names"]) for ix in insp.get_indexes("measurement", schema)}
    assert ("person_id",) in index_cols and ("measurement_concept_id",) in index_cols


def test_duckdb_refuses_foreign_keys_clearly(duckdb_wh) -> None:
    wh, schema = duckdb_wh
    with pytest.raises(ValueError, match="PostgreSQL"):
        create_cdm(wh, schema, foreign_keys=True)


@pytest.mark.parametrize("dialect", ["duckdb", "postgresql"])
def test_cli_prints_ddl_for_every_table(dialect: str) -> None:
    result = CliRunner().invoke(app, ["cdm", "ddl", "--dialect", dialect, "--schema", "cdm"])
    assert result.exit_code == 0, result.output
    created = re.findall(r"CREATE TABLE cdm\.(\w+)", result.output)
    assert len(created) == 41
    assert "image_occurrence" in created


def test_cli_ddl_with_foreign_keys_and_indexes() -> None:
    args = ["cdm", "ddl", "-d", "postgresql", "--foreign-keys", "--indexes"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0
    assert "ADD CONSTRAINT fpk_person_gender_concept_id FOREIGN KEY" in result.output
    assert "CREATE INDEX idx_condition_occurrence_person_id" in result.output
