"""Medical Imaging CDM extension: image_occurrence and image_feature, from the PACS feed.

Two steps. `match_study_visits` (before events) gives each imaging study that arrived
without a visit the person's visit whose dates contain the study date, so the study's
procedure_occurrence and its findings carry the visit. `build_imaging` (after events)
makes one image_occurrence per series whose study became a procedure_occurrence (the
extension requires the link), one image_feature per coded finding built as an event, and
traces every instance file to its image_occurrence. A series whose study procedure was not
built is set aside with the study's rule (e.g. unknown_person) or 'image_without_procedure'.
"""

from __future__ import annotations

import sqlalchemy as sa

from etl import canonical
from etl.cdm.build.common import add_lineage, assign_ids, insert_rows
from etl.cdm.build.events import DOMAIN_TABLES
from etl.cdm.build.rules import FILTER_RULES
from etl.pipeline.schemas import Schemas

RECORD_SET = "dicom_instances"
NO_PROCEDURE = "image_without_procedure"

_VISIT_OF_STUDY = """
CREATE TABLE {S}.study_visit AS
SELECT event_key, visit_key FROM (
    SELECT e.event_key, v.visit_key,
           row_number() OVER (
               PARTITION BY e.event_key
               ORDER BY CAST(coalesce(v.end_datetime, v.start_datetime) AS DATE)
                        - CAST(v.start_datetime AS DATE),
                        v.start_datetime DESC, v.visit_key) AS pick
    FROM (SELECT DISTINCT procedure_event_key FROM {S}.src_image) k
    JOIN {S}.event_ok e ON e.event_key = k.procedure_event_key AND e.visit_key IS NULL
     AND e.record_set = '{study_set}'
    JOIN {S}.visit_ok v ON v.person_key = e.person_key
     AND CAST(e.start_datetime AS DATE) >= CAST(v.start_datetime AS DATE)
     AND CAST(e.start_datetime AS DATE)
         <= CAST(coalesce(v.end_datetime, v.start_datetime) AS DATE)
) x WHERE pick = 1
"""


def match_study_visits(s: Schemas, conn: sa.Connection) -> None:
    """Visit of each imaging study (and of its findings): person + study date in the visit.

    DICOM has no standard tag for the encounter; a study date within two visits of the
    person takes the shortest visit (then the latest start).
    """
    s.run(conn, _VISIT_OF_STUDY, study_set=canonical.IMAGING_STUDY_SET)
    # event_ok is a view (etl/cdm/build/rules.py): these visits go to its `event_visit`,
    # which it shows for events without a visit of their own; a study's visit first, then
    # its findings' (one visit a finding: the least key, should its series span studies)
    s.run(conn, "INSERT INTO {S}.event_visit SELECT event_key, visit_key FROM {S}.study_visit")
    s.run(
        conn,
        """
        INSERT INTO {S}.event_visit
        SELECT f.feature_key, min(sv.visit_key)
        FROM {S}.src_image_feature f
        JOIN {S}.src_image i ON i.image_key = f.image_key AND i.instance_number = 1
        JOIN {S}.study_visit sv ON sv.event_key = i.procedure_event_key
        WHERE f.feature_key NOT IN (SELECT event_key FROM {S}.study_visit)
        GROUP BY f.feature_key
        """,
    )


# (vocabulary_id, code) of image attributes -> concept: a local map row first, else the
# code's own standard concept or its 'Maps to' target, else 0 ('unmapped').
_IMAGE_CONCEPTS = """
CREATE TABLE {S}.image_concept AS
WITH codes AS (
    SELECT DISTINCT modality_vocabulary AS vocabulary_id, modality_code AS code
    FROM {S}.src_image WHERE modality_code IS NOT NULL
    UNION
    SELECT DISTINCT anatomic_site_vocabulary, anatomic_site_code
    FROM {S}.src_image WHERE anatomic_site_code IS NOT NULL
    UNION
    SELECT DISTINCT anatomic_site_vocabulary, anatomic_site_code
    FROM {S}.src_image_feature WHERE anatomic_site_code IS NOT NULL
),
local_target AS (
    SELECT m.source_vocabulary_id AS vocabulary_id, m.source_code AS code,
           min(m.target_concept_id) AS concept_id,
           min(m.map_file || ':' || CAST(m.map_line AS VARCHAR)) AS map_row
    FROM {S}.local_map m JOIN {C}.concept k ON k.concept_id = m.target_concept_id
    WHERE m.mapping_type = 'MAPS_TO'
    GROUP BY m.source_vocabulary_id, m.source_code
),
vocab_target AS (
    SELECT c.vocabulary_id, c.code, min(CASE WHEN k.standard_concept = 'S'
           THEN k.concept_id ELSE r.concept_id_2 END) AS concept_id
    FROM codes c
    JOIN {C}.concept k ON k.vocabulary_id = c.vocabulary_id AND k.concept_code = c.code
         AND k.invalid_reason IS NULL
    LEFT JOIN {C}.concept_relationship r ON r.concept_id_1 = k.concept_id
         AND r.relationship_id = 'Maps to' AND r.invalid_reason IS NULL
    GROUP BY c.vocabulary_id, c.code
)
SELECT c.vocabulary_id, c.code,
       coalesce(l.concept_id, v.concept_id, 0) AS concept_id,
       CASE WHEN l.concept_id IS NOT NULL THEN 'local_map ' || l.map_row
            WHEN v.concept_id IS NOT NULL THEN 'vocabulary'
            ELSE 'unmapped' END AS mapping_rule
FROM codes c
LEFT JOIN local_target l ON l.vocabulary_id = c.vocabulary_id AND l.code = c.code
LEFT JOIN vocab_target v ON v.vocabulary_id = c.vocabulary_id AND v.code = c.code
"""

_IMAGE_CHECKED = """
CREATE TABLE {S}.image_checked AS
SELECT i.*, po.procedure_occurrence_id, po.person_id, po.visit_occurrence_id,
       CASE WHEN i.key_rank > 1 THEN 'duplicate_key'
            WHEN po.procedure_occurrence_id IS NULL
                THEN coalesce(ec.rule, '{no_procedure}') END AS rule
FROM (
    SELECT t.*, row_number() OVER (PARTITION BY t.image_key ORDER BY t.feed, t.source_file)
           AS key_rank
    FROM {S}.src_image t WHERE t.instance_number = 1
) i
LEFT JOIN (
    SELECT e.record_key, min(d.id) AS procedure_occurrence_id
    FROM {S}.event_mapped e
    JOIN {S}.ids_procedure_occurrence d
      ON d.natural_key = e.record_key || '>' || CAST(e.concept_id AS VARCHAR)
    WHERE e.cdm_table = 'procedure_occurrence' AND e.record_set = '{study_set}'
    GROUP BY e.record_key
) pr ON pr.record_key = i.procedure_event_key || '#1'
LEFT JOIN {S}.procedure_occurrence po ON po.procedure_occurrence_id = pr.procedure_occurrence_id
LEFT JOIN (SELECT record_key, min(rule) AS rule FROM {S}.event_set_aside GROUP BY record_key) ec
       ON ec.record_key = i.procedure_event_key
"""

IMAGE_COLUMNS = {
    "image_occurrence_id": "d.id",
    "person_id": "c.person_id",
    "procedure_occurrence_id": "c.procedure_occurrence_id",
    "visit_occurrence_id": "c.visit_occurrence_id",
    "anatomic_site_concept_id": "CASE WHEN c.anatomic_site_code IS NOT NULL"
    " THEN coalesce(sc.concept_id, 0) END",
    "wadors_uri": "c.wadors_uri",
    "local_path": "c.local_path",
    "image_occurrence_date": "CAST(c.start_datetime AS DATE)",
    "image_study_uid": "c.study_uid",
    "image_series_uid": "c.series_uid",
    "modality_concept_id": "coalesce(mc.concept_id, 0)",
}
_IMAGE_FROM = (
    "FROM {S}.image_checked c JOIN {S}.ids_image_occurrence d ON d.natural_key = c.image_key"
    " LEFT JOIN {S}.image_concept mc ON mc.vocabulary_id = c.modality_vocabulary"
    " AND mc.code = c.modality_code"
    " LEFT JOIN {S}.image_concept sc ON sc.vocabulary_id = c.anatomic_site_vocabulary"
    " AND sc.code = c.anatomic_site_code"
    " WHERE c.rule IS NULL"
)


def _feature_events_sql() -> str:
    """Each finding event as built: the CDM table, row id and concept it became."""
    parts = [
        f"SELECT '{t}' AS event_table, '{t.split('_')[0]}' AS prefix, e.record_key,"
        f" e.concept_id, e.type_concept_id, e.person_id, d.id AS event_id,"
        f" e.record_key || '>' || CAST(e.concept_id AS VARCHAR) AS natural_key"
        f" FROM {{S}}.event_mapped e JOIN {{S}}.ids_{t} d"
        f" ON d.natural_key = e.record_key || '>' || CAST(e.concept_id AS VARCHAR)"
        f" WHERE e.cdm_table = '{t}' AND e.record_set = 'image_features'"
        for t in sorted(set(DOMAIN_TABLES.values()))
    ]
    return " UNION ALL ".join(parts)


_FEATURES = """
CREATE TABLE {S}.image_feature_built AS
SELECT f.feature_key, f.anatomic_site_code, f.anatomic_site_vocabulary, f.alg_system,
       f.alg_datetime, f.feed, f.source_file, f.source_line,
       ev.event_table, ev.concept_id, ev.type_concept_id, ev.person_id, ev.event_id,
       ev.natural_key, io.id AS image_occurrence_id, fc.concept_id AS field_concept_id
FROM {S}.src_image_feature f
JOIN ({events}) ev ON ev.record_key = f.feature_key || '#1'
JOIN {S}.image_checked c ON c.image_key = f.image_key AND c.feed = f.feed AND c.rule IS NULL
JOIN {S}.ids_image_occurrence io ON io.natural_key = f.image_key
LEFT JOIN (
    SELECT concept_code, min(concept_id) AS concept_id FROM {C}.concept
    WHERE vocabulary_id = 'CDM' GROUP BY concept_code
) fc ON fc.concept_code = ev.event_table || '.' || ev.event_table || '_id'
"""

FEATURE_COLUMNS = {
    "image_feature_id": "d.id",
    "person_id": "b.person_id",
    "image_occurrence_id": "b.image_occurrence_id",
    # the CDM field concept of <table>.<table>_id; 0 where the vocabulary lacks it
    "image_feature_event_field_concept_id": "coalesce(b.field_concept_id, 0)",
    "image_feature_event_id": "b.event_id",
    "image_feature_concept_id": "b.concept_id",
    "image_feature_type_concept_id": "b.type_concept_id",
    "anatomic_site_concept_id": "CASE WHEN b.anatomic_site_code IS NOT NULL"
    " THEN coalesce(sc.concept_id, 0) END",
    "alg_system": "b.alg_system",
    "alg_datetime": "b.alg_datetime",
}
_FEATURE_FROM = (
    "FROM {S}.image_feature_built b JOIN {S}.ids_image_feature d"
    " ON d.natural_key = b.natural_key"
    " LEFT JOIN {S}.image_concept sc ON sc.vocabulary_id = b.anatomic_site_vocabulary"
    " AND sc.code = b.anatomic_site_code"
)


def build_imaging(s: Schemas, conn: sa.Connection) -> None:
    """image_occurrence, image_feature, their lineage, and the series set aside."""
    s.run(conn, _IMAGE_CONCEPTS)
    s.run(conn, _IMAGE_CHECKED, no_procedure=NO_PROCEDURE, study_set=canonical.IMAGING_STUDY_SET)
    assign_ids(
        s,
        conn,
        "image_occurrence",
        "SELECT image_key AS natural_key FROM {S}.image_checked WHERE rule IS NULL",
    )
    insert_rows(s, conn, "image_occurrence", IMAGE_COLUMNS, _IMAGE_FROM)
    # every instance file of a built series is traced to its image_occurrence (modality)
    add_lineage(
        s,
        conn,
        "image_occurrence",
        "SELECT d.id, i.feed, i.source_file, i.source_line, i.modality_vocabulary,"
        " i.modality_code, coalesce(mc.mapping_rule, 'unmapped')"
        " FROM {S}.src_image i"
        " JOIN {S}.image_checked c ON c.image_key = i.image_key AND c.feed = i.feed"
        " AND c.rule IS NULL"
        " JOIN {S}.ids_image_occurrence d ON d.natural_key = i.image_key"
        " LEFT JOIN {S}.image_concept mc ON mc.vocabulary_id = i.modality_vocabulary"
        " AND mc.code = i.modality_code",
    )
    # and the series' first file, for its anatomic site
    add_lineage(
        s,
        conn,
        "image_occurrence",
        "SELECT d.id, c.feed, c.source_file, c.source_line, c.anatomic_site_vocabulary,"
        " c.anatomic_site_code, coalesce(sc.mapping_rule, 'unmapped') || ' (anatomic site)'"
        " FROM {S}.image_checked c"
        " JOIN {S}.ids_image_occurrence d ON d.natural_key = c.image_key"
        " LEFT JOIN {S}.image_concept sc ON sc.vocabulary_id = c.anatomic_site_vocabulary"
        " AND sc.code = c.anatomic_site_code"
        " WHERE c.rule IS NULL AND c.anatomic_site_code IS NOT NULL",
    )
    _set_aside_series(s, conn)
    s.run(conn, _FEATURES, events=s.sql(_feature_events_sql()))
    assign_ids(s, conn, "image_feature", "SELECT natural_key FROM {S}.image_feature_built")
    insert_rows(s, conn, "image_feature", FEATURE_COLUMNS, _FEATURE_FROM)
    add_lineage(
        s,
        conn,
        "image_feature",
        "SELECT d.id, b.feed, b.source_file, b.source_line, NULL, NULL, b.event_table"
        " || ' ' || CAST(b.event_id AS VARCHAR) FROM {S}.image_feature_built b"
        " JOIN {S}.ids_image_feature d ON d.natural_key = b.natural_key",
    )


def _set_aside_series(s: Schemas, conn: sa.Connection) -> None:
    """Instance files of series not built: one disposition each, unless already accounted.

    A study's first file may already be loaded (its procedure became another table's
    row) or set aside (its study event's rule): it is not counted twice. The lineage and
    dispositions are joined to the files not built, not searched for each of them: a NOT
    EXISTS built a hash table of the whole lineage (118 M rows at a million patients,
    16 s) to look up a handful of files."""
    statuses = " ".join(f"WHEN '{r}' THEN 'filtered'" for r in FILTER_RULES)
    s.run(
        conn,
        """
        INSERT INTO {S}.disposition
        WITH unbuilt AS (
            SELECT i.feed, i.source_file, i.source_line, c.rule
            FROM {S}.src_image i
            JOIN {S}.image_checked c ON c.image_key = i.image_key AND c.feed = i.feed
            WHERE c.rule IS NOT NULL
        ),
        accounted AS (
            SELECT l.feed, l.source_file, l.source_line FROM {SL} l
            JOIN unbuilt u ON u.feed = l.feed AND u.source_file = l.source_file
             AND u.source_line = l.source_line
            UNION
            SELECT x.feed, x.source_file, x.source_line FROM {S}.disposition x
            JOIN unbuilt u ON u.feed = x.feed AND u.source_file = x.source_file
             AND u.source_line = x.source_line
        )
        SELECT u.feed, u.source_file, u.source_line, :rs,
               CASE u.rule {statuses} ELSE 'quarantined' END, u.rule
        FROM unbuilt u
        LEFT JOIN accounted a ON a.feed = u.feed AND a.source_file = u.source_file
         AND a.source_line = u.source_line
        WHERE a.feed IS NULL
        """,
        {"rs": RECORD_SET},
        statuses=statuses,
    )
