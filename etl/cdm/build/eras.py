"""Derived era tables: condition_era, drug_era and dose_era, from the built events.

All three follow OHDSI's era logic with a 30-day persistence window, written with window
functions (no self-joins) so it stays linear on large builds and runs unchanged on DuckDB
and PostgreSQL:

1. Each record becomes (person, key, start_date, end_date); an end before the start is
   raised to the start.
2. Per (person, key), ordered by start, end and record id (a total order, so both engines
   agree), a record opens a new era when it starts more than 30 days after the latest end
   date of all earlier records (the running max; a first record always opens one). A
   running sum of that flag numbers the eras.
3. An era runs from its first start to its latest end: OHDSI's reference pads ends by 30
   days and takes the pad off again, which comes to the same date.

condition_era: key = condition_concept_id; end = coalesce(condition_end_date,
condition_start_date); concept 0 is left out; condition_occurrence_count = occurrences.

drug_era: key = ingredient. A drug concept rolls up to every standard (``S``) concept of
class ``Ingredient`` among its concept_ancestor ancestors; a drug concept that is itself a
standard Ingredient is its own ingredient even when concept_ancestor lacks its level-0 row
(vocabulary subsets often do). A multi-ingredient drug counts towards each ingredient.
Exposures of concept 0 or with no ingredient are left out. End = coalesce(
drug_exposure_end_date, start + days_supply - 1, start). drug_exposure_count = exposures.
gap_days = the drug-free days inside the era: (era_end - era_start + 1) minus the days
covered by at least one exposure, counted inclusively after overlapping exposures are
merged (so overlaps are not counted twice, and back-to-back exposures leave no gap).
OHDSI's reference computes sum(datediff(start, end)) over the merged runs instead, which
is larger than ours by one day for every break between runs.

dose_era: as drug_era, but only for exposures whose (drug, ingredient) pair has a
drug_strength row with amount_value and amount_unit_concept_id (dose_value and
unit_concept_id); records merge per (person, ingredient, unit, dose). With an empty
drug_strength, dose_era stays empty.

Era ids come from the persistent key map, keyed by (person, concept, start date[, unit,
dose]): stable from night to night, and the same on both engines for the same input.
"""

from __future__ import annotations

import logging

import sqlalchemy as sa

from etl.cdm.build.common import assign_ids, insert_rows
from etl.pipeline.schemas import Schemas

log = logging.getLogger(__name__)

PERSISTENCE_DAYS = 30


def _numbered(keys: str) -> str:
    """CTEs `flagged` and `numbered` over `rec(record_id, <keys>, start_date, end_date)`.

    `numbered` adds `era_num` (eras with the persistence window) and `span_num` (runs of
    overlapping records, used to count covered days), both numbered within (`keys`).
    """
    order = f"PARTITION BY {keys} ORDER BY start_date, end_date, record_id"
    prev_end = f"max(end_date) OVER ({order} ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING)"
    return f"""
    flagged AS (
        SELECT rec.*,
               CASE WHEN start_date - {prev_end} <= {PERSISTENCE_DAYS} THEN 0 ELSE 1 END
                   AS new_era,
               CASE WHEN start_date - {prev_end} <= 0 THEN 0 ELSE 1 END AS new_span
        FROM rec
    ),
    numbered AS (
        SELECT flagged.*,
               sum(new_era) OVER ({order} ROWS UNBOUNDED PRECEDING) AS era_num,
               sum(new_span) OVER ({order} ROWS UNBOUNDED PRECEDING) AS span_num
        FROM flagged
    )"""


_INGREDIENT = "c.concept_class_id = 'Ingredient' AND c.standard_concept = 'S'"

# Drug exposures with their end date, and each drug concept's ingredients.
_EXPOSURE_CTES = f"""
    exposure AS (
        SELECT drug_exposure_id, person_id, drug_concept_id,
               drug_exposure_start_date AS start_date,
               greatest(drug_exposure_start_date,
                        coalesce(drug_exposure_end_date,
                                 drug_exposure_start_date + days_supply - 1,
                                 drug_exposure_start_date)) AS end_date
        FROM {{S}}.drug_exposure
        WHERE drug_concept_id <> 0
    ),
    drug AS (SELECT DISTINCT drug_concept_id FROM exposure),
    ingredient AS (
        SELECT d.drug_concept_id, ca.ancestor_concept_id AS ingredient_concept_id
        FROM drug d
        JOIN {{C}}.concept_ancestor ca ON ca.descendant_concept_id = d.drug_concept_id
        JOIN {{C}}.concept c ON c.concept_id = ca.ancestor_concept_id
        WHERE {_INGREDIENT}
        UNION
        SELECT d.drug_concept_id, c.concept_id
        FROM drug d
        JOIN {{C}}.concept c ON c.concept_id = d.drug_concept_id
        WHERE {_INGREDIENT}
    )"""

_CONDITION_ERAS = f"""
FROM (
    WITH rec AS (
        SELECT condition_occurrence_id AS record_id, person_id,
               condition_concept_id AS concept_id,
               condition_start_date AS start_date,
               greatest(condition_start_date,
                        coalesce(condition_end_date, condition_start_date)) AS end_date
        FROM {{S}}.condition_occurrence
        WHERE condition_concept_id <> 0
    ),
    {_numbered("person_id, concept_id")}
    SELECT person_id, concept_id, min(start_date) AS era_start, max(end_date) AS era_end,
           count(*) AS n
    FROM numbered
    GROUP BY person_id, concept_id, era_num
) e
"""

_DRUG_ERAS = f"""
FROM (
    WITH {_EXPOSURE_CTES},
    rec AS (
        SELECT x.drug_exposure_id AS record_id, x.person_id,
               i.ingredient_concept_id AS concept_id, x.start_date, x.end_date
        FROM exposure x
        JOIN ingredient i ON i.drug_concept_id = x.drug_concept_id
    ),
    {_numbered("person_id, concept_id")},
    span AS (
        SELECT person_id, concept_id, era_num, min(start_date) AS span_start,
               max(end_date) AS span_end, count(*) AS n
        FROM numbered
        GROUP BY person_id, concept_id, era_num, span_num
    )
    SELECT person_id, concept_id, min(span_start) AS era_start, max(span_end) AS era_end,
           sum(n) AS n,
           (max(span_end) - min(span_start) + 1) - sum(span_end - span_start + 1) AS gap_days
    FROM span
    GROUP BY person_id, concept_id, era_num
) e
"""

_DOSE_ERAS = f"""
FROM (
    WITH {_EXPOSURE_CTES},
    rec AS (
        SELECT x.drug_exposure_id AS record_id, x.person_id,
               i.ingredient_concept_id AS concept_id,
               ds.amount_unit_concept_id AS unit_concept_id, ds.amount_value AS dose_value,
               x.start_date, x.end_date
        FROM exposure x
        JOIN ingredient i ON i.drug_concept_id = x.drug_concept_id
        JOIN {{C}}.drug_strength ds
          ON ds.drug_concept_id = x.drug_concept_id
         AND ds.ingredient_concept_id = i.ingredient_concept_id
        WHERE ds.amount_value IS NOT NULL AND ds.amount_unit_concept_id IS NOT NULL
    ),
    {_numbered("person_id, concept_id, unit_concept_id, dose_value")}
    SELECT person_id, concept_id, unit_concept_id, dose_value,
           min(start_date) AS era_start, max(end_date) AS era_end
    FROM numbered
    GROUP BY person_id, concept_id, unit_concept_id, dose_value, era_num
) e
"""


def _build(
    s: Schemas,
    conn: sa.Connection,
    table: str,
    eras_sql: str,
    key_parts: list[str],
    columns: dict[str, str],
) -> int:
    """Materialise the eras, give each a stable id from the key map, insert them.

    An era's natural key is (person, concept, start date[, unit, dose]): an era keeps its
    id from one night to the next unless that person's records move it, so a change to
    one patient never renumbers another patient's eras.
    """
    s.run(conn, "DROP TABLE IF EXISTS {S}.{t}_rows", t=table)
    s.run(conn, "CREATE TABLE {S}.{t}_rows AS SELECT e.* " + eras_sql, t=table)
    key = " || '|' || ".join(f"CAST(e.{p} AS VARCHAR)" for p in key_parts)
    assign_ids(s, conn, table, f"SELECT {key} AS natural_key FROM {{S}}.{table}_rows e")
    return insert_rows(
        s,
        conn,
        table,
        {f"{table}_id": "i.id", **columns},
        f"FROM {{S}}.{table}_rows e JOIN {{S}}.ids_{table} i ON i.natural_key = {key}",
    )


def build_condition_era(s: Schemas, conn: sa.Connection) -> None:
    """Fill stage condition_era from stage condition_occurrence (30-day persistence)."""
    n = _build(
        s,
        conn,
        "condition_era",
        _CONDITION_ERAS,
        ["person_id", "concept_id", "era_start"],
        {
            "person_id": "e.person_id",
            "condition_concept_id": "e.concept_id",
            "condition_era_start_date": "e.era_start",
            "condition_era_end_date": "e.era_end",
            "condition_occurrence_count": "CAST(e.n AS INTEGER)",
        },
    )
    log.info("condition_era: %s rows", n)


def build_drug_era(s: Schemas, conn: sa.Connection) -> None:
    """Fill stage drug_era: drug exposures rolled up to ingredients, 30-day persistence."""
    n = _build(
        s,
        conn,
        "drug_era",
        _DRUG_ERAS,
        ["person_id", "concept_id", "era_start"],
        {
            "person_id": "e.person_id",
            "drug_concept_id": "e.concept_id",
            "drug_era_start_date": "e.era_start",
            "drug_era_end_date": "e.era_end",
            "drug_exposure_count": "CAST(e.n AS INTEGER)",
            "gap_days": "CAST(greatest(e.gap_days, 0) AS INTEGER)",
        },
    )
    log.info("drug_era: %s rows", n)


def build_dose_era(s: Schemas, conn: sa.Connection) -> None:
    """Fill stage dose_era: ingredient eras at a constant drug_strength amount and unit."""
    n = _build(
        s,
        conn,
        "dose_era",
        _DOSE_ERAS,
        ["person_id", "concept_id", "era_start", "unit_concept_id", "dose_value"],
        {
            "person_id": "e.person_id",
            "drug_concept_id": "e.concept_id",
            "unit_concept_id": "e.unit_concept_id",
            "dose_value": "e.dose_value",
            "dose_era_start_date": "e.era_start",
            "dose_era_end_date": "e.era_end",
        },
    )
    log.info("dose_era: %s rows", n)


def build_eras(s: Schemas, conn: sa.Connection) -> None:
    """Build condition_era, drug_era and dose_era in the staging schema."""
    build_condition_era(s, conn)
    build_drug_era(s, conn)
    build_dose_era(s, conn)
