"""visit_occurrence: one visit per source encounter (no roll-up; see the README)."""

from __future__ import annotations

import sqlalchemy as sa

from etl.cdm.build.common import add_lineage, assign_ids, forget_source_rows, insert_rows
from etl.pipeline.schemas import Schemas

EHR_ENCOUNTER_RECORD = 32827  # Type Concept "EHR encounter record"


def _joins(by_row: bool) -> str:
    """The visits, their ids (joined on `visit_ok`'s rowid with `by_row`, else on the
    visit key) and the look-ups their columns need."""
    link = "i.source_row = v.rowid" if by_row else "i.natural_key = v.visit_key"
    return f"""
    FROM {{S}}.visit_ok v
    JOIN {{S}}.ids_visit_occurrence i ON {link}
    JOIN {{S}}.ids_person p ON p.natural_key = v.person_key
    LEFT JOIN {{S}}.ids_care_site cs ON cs.natural_key = v.care_site_key
    LEFT JOIN {{S}}.code_map_single m
           ON m.vocabulary_id = v.class_vocabulary AND m.code = v.class_code
"""


def build_visit(s: Schemas, conn: sa.Connection) -> None:
    """One visit_occurrence row per kept visit, and its lineage.

    On DuckDB the ids keep the rowid of their `visit_ok` row (one row per visit key) and
    the rows and lineage join back on it, as the events step does: an integer join where
    the visit key is a 32-character digest (a million patients: 22 M visits). The ids
    carry each visit's provider, for the visit's row and for its events that name none."""
    by_row = s.wh.dialect == "duckdb"
    ids = assign_ids(
        s,
        conn,
        "visit_occurrence",
        "SELECT v.visit_key AS natural_key, pr.id AS provider_id"
        + (", v.rowid AS source_row" if by_row else "")
        + " FROM {S}.visit_ok v"
        " LEFT JOIN {S}.ids_provider pr ON pr.natural_key = v.provider_key",
        source_row=by_row,
        carry=("provider_id",),
    )
    joins = _joins(by_row)
    start, end = "v.start_datetime", "coalesce(v.end_datetime, v.start_datetime)"
    insert_rows(
        s,
        conn,
        "visit_occurrence",
        {
            "visit_occurrence_id": "i.id",
            "person_id": "p.id",
            "visit_concept_id": "coalesce(m.target_concept_id, 0)",
            "visit_start_date": f"CAST({start} AS DATE)",
            "visit_start_datetime": start,
            "visit_end_date": f"CAST({end} AS DATE)",
            "visit_end_datetime": end,
            "visit_type_concept_id": str(EHR_ENCOUNTER_RECORD),
            "provider_id": "i.provider_id",
            "care_site_id": "cs.id",
            "visit_source_value": "v.class_code",
            "visit_source_concept_id": "coalesce(m.source_concept_id, 0)",
            "preceding_visit_occurrence_id": (
                "lag(i.id) OVER (PARTITION BY p.id ORDER BY v.start_datetime, i.id)"
            ),
        },
        joins,
    )
    add_lineage(
        s,
        conn,
        "visit_occurrence",
        "SELECT i.id, v.feed, v.source_file, v.source_line, v.class_vocabulary, v.class_code,"
        " coalesce(m.mapping_rule, 'unmapped') " + joins,
    )
    if by_row:
        forget_source_rows(s, conn, ids)
