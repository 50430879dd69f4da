"""The report's accounting: a record is loaded once however many CDM rows it gave."""

from __future__ import annotations

import pytest

from etl.cdm.build.common import LINEAGE_DDL
from etl.cdm.build.rules import DERIVED_PERSON_RULE, DISPOSITION_DDL
from etl.pipeline import report
from etl.pipeline.schemas import Schemas
from etl.sources.ehr import FileStats
from etl.sql_text import sql_literal

# (cdm_table, feed, source_file, source_line, mapping_rule)
LINEAGE = [
    ("person", "ehr", "patients.csv", 2, None),
    ("death", "ehr", "patients.csv", 2, None),  # one line, two tables
    ("person", "ehr", "patients.csv", 3, None),
    ("observation", "ehr", "observations.csv", 2, "Maps to"),
    ("measurement", "ehr", "observations.csv", 2, "Maps to"),  # one code, two concepts
    ("measurement", "ehr", "observations.csv", 7, "Maps to"),
    ("measurement", "ehr", "observations.csv", 40_000, "unmapped"),
    ("procedure_occurrence", "ehr", "o'dd:{name}.csv", 4, "Maps to"),  # quoted, not a bind
    ("procedure_occurrence", "ehr", "o'dd:{name}.csv", 4, "Maps to"),
    ("person", "lab", "results.hl7", 9, DERIVED_PERSON_RULE),  # inferred: no record of its own
    ("measurement", "lab", "results.hl7", 9, "Maps to"),
    ("measurement", "lab", "results.hl7", 12, "Maps to"),
]
FILES = {
    "ehr": [
        FileStats("persons", "patients.csv", records_in=3, quarantined=1),
        FileStats("observations", "observations.csv", records_in=4),
        FileStats("procedures", "o'dd:{name}.csv", records_in=1),
    ],
    "lab": [FileStats("results", "results.hl7", records_in=3, filtered={"superseded": 1})],
    # a file of which nothing is loaded: no lineage row at all
    "pacs": [FileStats("images", "no_lines.dcm", records_in=1, quarantined=1)],
}


def _empty_store(s: Schemas, conn) -> None:  # type: ignore[no-untyped-def]
    """The stage's lineage and disposition tables, empty, as a build creates them."""
    s.wh.create_schema(conn, s.stage)
    s.wh.create_schema(conn, s.etl)  # DuckDB's stage lineage lies there
    s.run(conn, LINEAGE_DDL)
    s.run(conn, DISPOSITION_DDL)


@pytest.mark.parametrize(
    ("min_rows", "budget", "as_bits"),
    [
        (1, report._BITS_BUDGET, 4),  # every file as bits (DuckDB)
        (3, report._BITS_BUDGET, 2),  # patients.csv and observations.csv; the rest distinct
        (3, 1, 0),  # bitstrings over the budget: every file distinct
    ],
)
def test_loaded_records_are_distinct_lines_of_each_file(
    warehouse, monkeypatch, min_rows, budget, as_bits
) -> None:
    """Lines giving several rows count once, a derived person's line not at all, and the
    totals add up, whether DuckDB counts a file's lines as bits (files of `min_rows` rows
    or more, within `budget` bytes of bitstrings) or distinct, as PostgreSQL does."""
    from etl.pipeline.schemas import Schemas as Sql

    monkeypatch.setattr(report, "_BITS_MIN_ROWS", min_rows)
    monkeypatch.setattr(report, "_BITS_BUDGET", budget)
    texts: list[str] = []  # every SQL text filled in
    fill = Sql.sql

    def recorded(self, text: str, **extra: str) -> str:
        texts.append(fill(self, text, **extra))
        return texts[-1]

    monkeypatch.setattr(Sql, "sql", recorded)
    wh, schema = warehouse
    s = Schemas(wh, schema)
    with wh.begin() as conn:
        _empty_store(s, conn)
        s.run(
            conn,
            "INSERT INTO {SL} (cdm_table, cdm_id, feed, source_file, source_line, mapping_rule)"
            " VALUES (:t, :i, :f, :sf, :l, :r)",
            [
                {"t": t, "i": i, "f": f, "sf": sf, "l": ln, "r": r}
                for i, (t, f, sf, ln, r) in enumerate(LINEAGE)
            ],
        )
        s.run(
            conn,
            "INSERT INTO {S}.disposition VALUES"
            " ('ehr', 'observations.csv', 5, 'observations', 'filtered', 'event_before_birth')",
        )
        texts.clear()
        feeds, _, filtered, errors = report.accounting(s, conn, FILES, [])
    bits = [x for x in texts if "bitstring_agg" in x]
    names = {sf for _, _, sf, _, _ in LINEAGE}
    as_bitstrings = {n for n in names if any(sql_literal(n) in x for x in bits)}
    assert len(as_bitstrings) == (as_bits if wh.dialect == "duckdb" else 0)
    files = {f: {n: row["loaded"] for n, row in v["files"].items()} for f, v in feeds.items()}
    assert files == {
        "ehr": {"patients.csv": 2, "observations.csv": 3, "o'dd:{name}.csv": 1},
        "lab": {"results.hl7": 2},
        "pacs": {"no_lines.dcm": 0},
    }
    assert errors == []
    ehr = feeds["ehr"]
    assert (ehr["records_in"], ehr["loaded"], ehr["quarantined"], ehr["filtered"]) == (8, 6, 1, 1)
    assert {r["rule"] for r in filtered} == {"event_before_birth", "superseded"}


def test_no_lineage_counts_nothing_loaded(warehouse) -> None:
    wh, schema = warehouse
    s = Schemas(wh, schema)
    with wh.begin() as conn:
        _empty_store(s, conn)
        files = {"ehr": [FileStats("persons", "patients.csv", records_in=1, quarantined=1)]}
        feeds, _, _, errors = report.accounting(s, conn, files, [])
    assert feeds["ehr"]["files"]["patients.csv"]["loaded"] == 0
    assert errors == []
