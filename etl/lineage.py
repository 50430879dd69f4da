"""Lineage: where a warehouse row came from, and where a source record went.

The store lives in the ETL schema (`<cdm>_etl.lineage` and `<cdm>_etl.set_aside`),
replaced at every publish in the same transaction as the CDM, so it always describes the
published warehouse. Derived rows (observation_period, eras) are traced through the
records they were derived from. Nothing here returns a clear identifier: persons appear
by person_id and their pseudonymised key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa

from etl.cdm.spec import cdm_tables
from etl.pipeline.schemas import Schemas
from etl.warehouse.base import Warehouse

# Derived tables: how to find the rows each one was built from.
_DERIVED = {
    "observation_period": (
        "every record of the person between its start and end dates",
        "visit_occurrence",
        "SELECT v.visit_occurrence_id FROM {C}.visit_occurrence v"
        " WHERE v.person_id = :person AND v.visit_start_date BETWEEN :d1 AND :d2",
    ),
    "condition_era": (
        "the person's conditions of this concept within the era",
        "condition_occurrence",
        "SELECT c.condition_occurrence_id FROM {C}.condition_occurrence c"
        " WHERE c.person_id = :person AND c.condition_concept_id = :concept"
        " AND c.condition_start_date BETWEEN :d1 AND :d2",
    ),
    "drug_era": (
        "the person's exposures to drugs containing this ingredient within the era",
        "drug_exposure",
        "SELECT d.drug_exposure_id FROM {C}.drug_exposure d"
        " WHERE d.person_id = :person AND d.drug_exposure_start_date BETWEEN :d1 AND :d2"
        " AND (d.drug_concept_id = :concept OR EXISTS (SELECT 1 FROM {C}.concept_ancestor a"
        " WHERE a.descendant_concept_id = d.drug_concept_id"
        " AND a.ancestor_concept_id = :concept))",
    ),
}
_ERA_DATES = {
    "observation_period": ("observation_period_start_date", "observation_period_end_date", None),
    "condition_era": ("condition_era_start_date", "condition_era_end_date", "condition_concept_id"),
    "drug_era": ("drug_era_start_date", "drug_era_end_date", "drug_concept_id"),
}


@dataclass
class RowTrace:
    """A warehouse row and its sources."""

    table: str
    row_id: int
    row: dict[str, Any] | None
    person_key: str | None = None
    sources: list[dict[str, Any]] = field(default_factory=list)
    derived_from: str | None = None  # for observation_period and eras


@dataclass
class SourceTrace:
    """A source record and what became of it."""

    feed: str
    source_file: str
    source_line: int
    rows: list[dict[str, Any]] = field(default_factory=list)
    set_aside: list[dict[str, Any]] = field(default_factory=list)


def _key_column(table: str) -> str:
    spec = cdm_tables()[table]
    if spec.primary_key:
        return spec.primary_key[0]
    if "person_id" in spec.column_names:  # death
        return "person_id"
    raise ValueError(f"{table} has no row id to trace")


def _dicts(result: sa.CursorResult) -> list[dict[str, Any]]:
    return [dict(r._mapping) for r in result]


def trace_row(wh: Warehouse, cdm_schema: str, table: str, row_id: int) -> RowTrace:
    """The row `table`.`row_id` of the published CDM, with the source lines it came from."""
    if table not in cdm_tables():
        raise ValueError(f"{table!r} is not a CDM table")
    s = Schemas(wh, cdm_schema)
    key = _key_column(table)
    with wh.engine.connect() as conn:
        rows = _dicts(s.run(conn, "SELECT * FROM {C}.{t} WHERE {k} = :id", {"id": row_id},
                            t=table, k=key))  # fmt: skip
        trace = RowTrace(table, row_id, rows[0] if rows else None)
        if trace.row is None:
            return trace
        person_id = trace.row.get("person_id")
        if person_id is not None:
            trace.person_key = s.run(
                conn, "SELECT person_source_value FROM {C}.person WHERE person_id = :p",
                {"p": person_id},
            ).scalar_one_or_none()  # fmt: skip
        if table in _DERIVED:
            how, source_table, sql = _DERIVED[table]
            d1, d2, concept = _ERA_DATES[table]
            params = {"person": person_id, "d1": trace.row[d1], "d2": trace.row[d2]}
            if concept:
                params["concept"] = trace.row[concept]
            ids = [r[0] for r in s.run(conn, sql, params)]
            trace.derived_from = f"derived from {how}: {len(ids)} {source_table} row(s)"
            trace.sources = _lineage(s, conn, source_table, ids)
        else:
            trace.sources = _lineage(s, conn, table, [row_id])
    return trace


def _lineage(s: Schemas, conn: sa.Connection, table: str, ids: list[int]) -> list[dict]:
    if not ids:
        return []
    out: list[dict] = []
    for start in range(0, len(ids), 500):
        chunk = ids[start : start + 500]
        marks = ", ".join(f":i{n}" for n in range(len(chunk)))
        out += _dicts(
            s.run(
                conn,
                "SELECT cdm_table, cdm_id, run_id, feed, source_file, source_line,"
                " source_vocabulary, source_code, mapping_rule FROM {E}.lineage"
                " WHERE cdm_table = :t AND cdm_id IN ({marks})"
                " ORDER BY cdm_id, feed, source_file, source_line",
                {"t": table, **{f"i{n}": v for n, v in enumerate(chunk)}},
                marks=marks,
            )
        )
    return out


def trace_source(
    wh: Warehouse, cdm_schema: str, feed: str, source_file: str, source_line: int
) -> SourceTrace:
    """Where the record at `source_file`:`source_line` of `feed` went in the published run."""
    s = Schemas(wh, cdm_schema)
    params = {"f": feed, "sf": source_file, "l": source_line}
    where = "WHERE feed = :f AND source_file = :sf AND source_line = :l"
    with wh.engine.connect() as conn:
        rows = _dicts(
            s.run(conn, "SELECT cdm_table, cdm_id, run_id, source_vocabulary, source_code,"
                  " mapping_rule FROM {E}.lineage " + where + " ORDER BY cdm_table, cdm_id",
                  params)
        )  # fmt: skip
        aside = _dicts(
            s.run(conn, "SELECT run_id, record_set, status, rule FROM {E}.set_aside " + where,
                  params)
        )  # fmt: skip
    return SourceTrace(feed, source_file, source_line, rows, aside)
