"""The one mapper every feed goes through, as set-based SQL in the warehouse.

For every distinct (vocabulary_id, code) a run brings:
1. local maps first (mappings/local, mappings/usagi): a site's decision wins;
2. else the source concept, CONCEPT by (vocabulary_id, concept_code); its targets are
   every valid 'Maps to' (one code may map to several standard concepts), and the concept
   itself when it is a valid standard concept (full Athena releases say so with a
   'Maps to' to itself; subsets often do not, and a valid standard concept maps to itself);
3. 'Maps to value' (and local MAPS_TO_VALUE rows) give value_as_concept_id;
4. no target: concept 0, kept and counted, never dropped by a join.

The result is `code_map(vocabulary_id, code, source_concept_id, target_concept_id,
target_domain_id, mapping_rule)` with one row per target, and `value_map`. mapping_rule
is `local_map FILE:LINE` (the map row that decided), `maps_to`, `standard` (a valid
standard concept, itself) or `unmapped`.
"""

from __future__ import annotations

import logging

import sqlalchemy as sa

from etl.pipeline.schemas import Schemas

log = logging.getLogger(__name__)

# (vocabulary column, code column) pairs of each staged source table that need mapping.
CODED_COLUMNS = {
    "src_event": [
        ("vocabulary_id", "code"),
        ("value_vocabulary", "value_code"),
        ("unit_vocabulary", "unit_code"),
    ],
    "src_person": [
        ("gender_vocabulary", "gender_code"),
        ("race_vocabulary", "race_code"),
        ("ethnicity_vocabulary", "ethnicity_code"),
    ],
    # persons a feed inferred (a lab result's PID): their sex codes need the map too
    "src_derived_person": [("gender_vocabulary", "gender_code")],
    "src_visit": [("class_vocabulary", "class_code")],
    "src_provider": [
        ("specialty_vocabulary", "specialty_code"),
        ("gender_vocabulary", "gender_code"),
    ],
}

_SOURCE_CONCEPT = """
CREATE TABLE {S}.source_concept AS
SELECT vocabulary_id, code, concept_id AS source_concept_id, standard_concept, invalid_reason
FROM (
    SELECT c.vocabulary_id, c.code, k.concept_id, k.standard_concept, k.invalid_reason,
           row_number() OVER (
               PARTITION BY c.vocabulary_id, c.code
               ORDER BY CASE WHEN k.invalid_reason IS NULL THEN 0 ELSE 1 END, k.concept_id
           ) AS rn
    FROM {S}.source_codes c
    JOIN {C}.concept k ON k.vocabulary_id = c.vocabulary_id AND k.concept_code = c.code
) x
WHERE rn = 1
"""

_CODE_TARGET = """
CREATE TABLE {S}.code_target AS
WITH local_targets AS (
    SELECT m.source_vocabulary_id AS vocabulary_id, m.source_code AS code,
           m.target_concept_id,
           min(m.map_file || ':' || CAST(m.map_line AS VARCHAR)) AS map_row
    FROM {S}.local_map m
    JOIN {S}.source_codes c ON c.vocabulary_id = m.source_vocabulary_id AND c.code = m.source_code
    JOIN {C}.concept k ON k.concept_id = m.target_concept_id  -- a target must exist
    WHERE m.mapping_type = 'MAPS_TO'
    GROUP BY m.source_vocabulary_id, m.source_code, m.target_concept_id
),
vocab_targets AS (
    SELECT s.vocabulary_id, s.code, r.concept_id_2 AS target_concept_id
    FROM {S}.source_concept s
    JOIN {C}.concept_relationship r ON r.concept_id_1 = s.source_concept_id
    WHERE r.relationship_id = 'Maps to' AND r.invalid_reason IS NULL
    UNION
    SELECT s.vocabulary_id, s.code, s.source_concept_id
    FROM {S}.source_concept s
    WHERE s.standard_concept = 'S' AND s.invalid_reason IS NULL
)
SELECT vocabulary_id, code, target_concept_id, 'local_map ' || map_row AS mapping_rule
FROM local_targets
UNION ALL
SELECT v.vocabulary_id, v.code, v.target_concept_id,
       CASE WHEN v.target_concept_id = s.source_concept_id THEN 'standard' ELSE 'maps_to' END
FROM vocab_targets v
JOIN {S}.source_concept s ON s.vocabulary_id = v.vocabulary_id AND s.code = v.code
WHERE NOT EXISTS (
    SELECT 1 FROM local_targets l WHERE l.vocabulary_id = v.vocabulary_id AND l.code = v.code
)
"""

_CODE_MAP = """
CREATE TABLE {S}.code_map AS
SELECT c.vocabulary_id, c.code,
       coalesce(s.source_concept_id, 0) AS source_concept_id,
       coalesce(t.target_concept_id, 0) AS target_concept_id,
       tc.domain_id AS target_domain_id,
       coalesce(t.mapping_rule, 'unmapped') AS mapping_rule
FROM {S}.source_codes c
LEFT JOIN {S}.source_concept s ON s.vocabulary_id = c.vocabulary_id AND s.code = c.code
LEFT JOIN {S}.code_target t ON t.vocabulary_id = c.vocabulary_id AND t.code = c.code
LEFT JOIN {C}.concept tc ON tc.concept_id = t.target_concept_id
"""

_VALUE_MAP = """
CREATE TABLE {S}.value_map AS
SELECT vocabulary_id, code, min(value_concept_id) AS value_concept_id
FROM (
    SELECT m.source_vocabulary_id AS vocabulary_id, m.source_code AS code,
           m.target_concept_id AS value_concept_id
    FROM {S}.local_map m WHERE m.mapping_type = 'MAPS_TO_VALUE'
    UNION ALL
    SELECT s.vocabulary_id, s.code, r.concept_id_2
    FROM {S}.source_concept s
    JOIN {C}.concept_relationship r ON r.concept_id_1 = s.source_concept_id
    WHERE r.relationship_id = 'Maps to value' AND r.invalid_reason IS NULL
) x
GROUP BY vocabulary_id, code
"""

# One concept per code for single-valued fields (gender, unit, visit class): the lowest id.
_SINGLE_MAP = """
CREATE TABLE {S}.code_map_single AS
SELECT vocabulary_id, code, min(source_concept_id) AS source_concept_id,
       min(target_concept_id) AS target_concept_id, min(mapping_rule) AS mapping_rule
FROM {S}.code_map GROUP BY vocabulary_id, code
"""


def build_code_map(s: Schemas, conn: sa.Connection) -> None:
    """Create source_codes, source_concept, code_target, code_map, value_map in stage.

    A local map whose target concept is not in the vocabulary is not used (the code is
    then mapped by the vocabulary, or counted as unmapped) and is logged with its file
    and line.
    """
    dangling = s.run(
        conn,
        "SELECT m.map_file, m.map_line, m.target_concept_id FROM {S}.local_map m"
        " WHERE NOT EXISTS (SELECT 1 FROM {C}.concept k WHERE k.concept_id = m.target_concept_id)"
        " ORDER BY m.map_file, m.map_line LIMIT 20",
    ).all()
    for file, line, target in dangling:
        log.warning(
            "local map %s:%s: target concept %s is not in the vocabulary", file, line, target
        )
    parts = [
        f"SELECT {vocab} AS vocabulary_id, {code} AS code FROM {{S}}.{table}"
        f" WHERE {code} IS NOT NULL AND {vocab} IS NOT NULL"
        for table, pairs in CODED_COLUMNS.items()
        for vocab, code in pairs
    ]
    s.run(
        conn,
        "CREATE TABLE {S}.source_codes AS SELECT DISTINCT vocabulary_id, code FROM ("
        + " UNION ALL ".join(parts)
        + ") x",
    )
    for statement in (_SOURCE_CONCEPT, _CODE_TARGET, _CODE_MAP, _VALUE_MAP, _SINGLE_MAP):
        s.run(conn, statement)
