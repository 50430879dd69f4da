"""Instance headers -> canonical records, set-based in DuckDB.

Studies and series are groups of instances (by UID); their attributes come from the
first instance in path order that carries them. Every key and the patient id is
pseudonymised by the session's macro inside these queries.
"""

from __future__ import annotations

import duckdb
import pyarrow as pa

from etl import canonical
from etl.pseudonym import duckdb_pseudonym_sql as pseudo
from etl.sql_text import sql_literal

INSTANCE_COLUMNS = {
    "file": pa.string(),
    "patient_id": pa.string(),
    "study_uid": pa.string(),
    "series_uid": pa.string(),
    "sop_uid": pa.string(),
    "modality": pa.string(),
    "study_datetime": pa.timestamp("us"),
    "series_datetime": pa.timestamp("us"),
    "body_part": pa.string(),
    "site_code": pa.string(),
    "site_scheme": pa.string(),
    "procedure_code": pa.string(),
    "procedure_scheme": pa.string(),
}
FEATURE_COLUMNS = {
    "file": pa.string(),
    "line": pa.int64(),
    "kind": pa.string(),
    "code": pa.string(),
    "scheme": pa.string(),
    "value_code": pa.string(),
    "value_scheme": pa.string(),
    "value_number": pa.float64(),
    "unit_code": pa.string(),
    "site_code": pa.string(),
    "site_scheme": pa.string(),
    "alg_system": pa.string(),
}
# DICOM coding scheme designators -> OMOP vocabulary ids; others are kept as given.
SCHEMES = {"SCT": "SNOMED", "SRT": "SNOMED", "SNM3": "SNOMED", "LN": "LOINC", "UCUM": "UCUM"}
# Modalities that are no image acquisition: a study's procedure is named after another.
NON_IMAGE_MODALITIES = ("SR", "SEG", "KO", "PR", "DOC", "REG", "RWV", "PLAN")
TYPE_CONCEPT_EHR = 32817
MODALITY_VOCABULARY = "DCM"  # DICOM modality defined terms (local map: modality concept)
PROCEDURE_BY_MODALITY = "DICOM_MODALITY"  # local map: modality -> imaging procedure
BODY_PART_VOCABULARY = "DICOM_BODY_PART"  # BodyPartExamined defined terms


def _vocab(scheme: str) -> str:
    cases = " ".join(f"WHEN {sql_literal(k)} THEN {sql_literal(v)}" for k, v in SCHEMES.items())
    return f"CASE upper({scheme}) {cases} ELSE {scheme} END"


def _study_key(uid: str) -> str:
    return pseudo(f"'dicom_study|' || {uid}")


def _series_key(uid: str) -> str:
    return pseudo(f"'dicom_series|' || {uid}")


_GROUPS = f"""
CREATE TEMP TABLE study AS
SELECT study_uid,
       min(file) AS first_file,
       arg_min(patient_id, file) AS patient_id,
       arg_min(study_datetime, file) AS study_datetime,
       arg_min(procedure_code, file) FILTER (WHERE procedure_code IS NOT NULL) AS procedure_code,
       arg_min(procedure_scheme, file) FILTER (WHERE procedure_code IS NOT NULL)
           AS procedure_scheme,
       coalesce(
           arg_min(modality, file) FILTER (
               WHERE modality NOT IN ({", ".join(sql_literal(m) for m in NON_IMAGE_MODALITIES)})),
           arg_min(modality, file)) AS modality
FROM inst GROUP BY study_uid;

CREATE TEMP TABLE series AS
SELECT series_uid,
       min(file) AS first_file,
       arg_min(study_uid, file) AS study_uid,
       arg_min(patient_id, file) AS patient_id,
       arg_min(modality, file) AS modality,
       arg_min(body_part, file) FILTER (WHERE body_part IS NOT NULL) AS body_part,
       arg_min(site_code, file) FILTER (WHERE site_code IS NOT NULL) AS site_code,
       arg_min(site_scheme, file) FILTER (WHERE site_code IS NOT NULL) AS site_scheme,
       coalesce(arg_min(series_datetime, file) FILTER (WHERE series_datetime IS NOT NULL),
                arg_min(study_datetime, file)) AS start_datetime
FROM inst GROUP BY series_uid;
"""


def _study_events(feed: str) -> str:
    return f"""
SELECT {_study_key("s.study_uid")} AS event_key,
       {sql_literal(canonical.IMAGING_STUDY_SET)} AS record_set,
       {pseudo("s.patient_id")} AS person_key,
       CAST(NULL AS VARCHAR) AS visit_key,
       coalesce(s.procedure_code, s.modality) AS code,
       CASE WHEN s.procedure_code IS NOT NULL THEN {_vocab("s.procedure_scheme")}
            ELSE {sql_literal(PROCEDURE_BY_MODALITY)} END AS vocabulary_id,
       'Procedure' AS default_domain,
       FALSE AS keep_domain,
       CAST({TYPE_CONCEPT_EHR} AS INTEGER) AS type_concept_id,
       s.study_datetime AS start_datetime,
       {sql_literal(feed)} AS feed, s.first_file AS source_file, CAST(1 AS BIGINT) AS source_line
FROM study s ORDER BY s.first_file
"""


def _images(feed: str, hash_uids: bool) -> str:
    study_uid = pseudo("s.study_uid") if hash_uids else "s.study_uid"
    series_uid = pseudo("s.series_uid") if hash_uids else "s.series_uid"
    # folder names often carry UIDs: no local path when UIDs are to be hidden
    folder = (
        "CAST(NULL AS VARCHAR)"
        if hash_uids
        else "CASE WHEN strpos(s.first_file, '/') > 0"
        " THEN regexp_replace(s.first_file, '/[^/]*$', '') ELSE '.' END"
    )
    return f"""
SELECT {_series_key("s.series_uid")} AS image_key,
       {pseudo("s.patient_id")} AS person_key,
       CAST(NULL AS VARCHAR) AS visit_key,
       {_study_key("s.study_uid")} AS procedure_event_key,
       {study_uid} AS study_uid,
       {series_uid} AS series_uid,
       s.modality AS modality_code,
       {sql_literal(MODALITY_VOCABULARY)} AS modality_vocabulary,
       CASE WHEN s.site_code IS NOT NULL THEN s.site_code ELSE upper(s.body_part) END
           AS anatomic_site_code,
       CASE WHEN s.site_code IS NOT NULL THEN {_vocab("s.site_scheme")}
            WHEN s.body_part IS NOT NULL THEN {sql_literal(BODY_PART_VOCABULARY)} END
           AS anatomic_site_vocabulary,
       s.start_datetime,
       {folder} AS local_path,
       CAST(NULL AS VARCHAR) AS wadors_uri,
       row_number() OVER (PARTITION BY i.series_uid ORDER BY i.file) AS instance_number,
       {sql_literal(feed)} AS feed, i.file AS source_file, CAST(1 AS BIGINT) AS source_line
FROM inst i JOIN series s ON s.series_uid = i.series_uid
ORDER BY i.file
"""


_FEATURE_BASE = f"""
SELECT f.*, {pseudo("'dicom_feature|' || coalesce(i.sop_uid, i.file) || '|' || f.line")}
           AS feature_key,
       {_series_key("s.series_uid")} AS image_key,
       {pseudo("s.patient_id")} AS person_key,
       s.start_datetime
FROM feat f JOIN inst i ON i.file = f.file JOIN series s ON s.series_uid = i.series_uid
"""


def _feature_events(feed: str) -> str:
    return f"""
SELECT feature_key AS event_key, 'image_features' AS record_set, person_key,
       CAST(NULL AS VARCHAR) AS visit_key,
       code, {_vocab("scheme")} AS vocabulary_id,
       CASE WHEN kind = 'NUM' THEN 'Measurement' ELSE 'Observation' END AS default_domain,
       FALSE AS keep_domain, CAST({TYPE_CONCEPT_EHR} AS INTEGER) AS type_concept_id,
       start_datetime, value_number AS value_as_number,
       value_code, CASE WHEN value_code IS NOT NULL THEN {_vocab("value_scheme")} END
           AS value_vocabulary,
       unit_code, CASE WHEN unit_code IS NOT NULL THEN 'UCUM' END AS unit_vocabulary,
       {sql_literal(feed)} AS feed, file AS source_file, line AS source_line
FROM feature_base ORDER BY file, line
"""


def _image_features(feed: str) -> str:
    return f"""
SELECT feature_key, image_key, person_key,
       site_code AS anatomic_site_code,
       CASE WHEN site_code IS NOT NULL THEN {_vocab("site_scheme")} END
           AS anatomic_site_vocabulary,
       alg_system, CAST(NULL AS TIMESTAMP) AS alg_datetime,
       {sql_literal(feed)} AS feed, file AS source_file, line AS source_line
FROM feature_base ORDER BY file, line
"""


def _shaped(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """`table` with every column of `schema` (absent ones NULL), cast to it."""
    columns = [
        table[f.name] if f.name in table.column_names else pa.nulls(table.num_rows, f.type)
        for f in schema
    ]
    return pa.Table.from_arrays(columns, schema=schema.remove_metadata()).cast(schema)


def canonical_tables(
    con: duckdb.DuckDBPyConnection,
    instances: pa.Table,
    features: pa.Table,
    *,
    feed: str,
    hash_uids: bool,
) -> dict[str, pa.Table]:
    """event, image and image_feature tables of one run's instances (macro installed)."""
    con.register("inst_arrow", instances)
    con.register("feat_arrow", features)
    con.execute("CREATE TEMP TABLE inst AS SELECT * FROM inst_arrow")
    con.execute("CREATE TEMP TABLE feat AS SELECT * FROM feat_arrow")
    con.execute(_GROUPS)
    con.execute(f"CREATE TEMP TABLE feature_base AS {_FEATURE_BASE}")
    studies = con.sql(_study_events(feed)).to_arrow_table()
    findings = con.sql(_feature_events(feed)).to_arrow_table()
    events = pa.concat_tables(
        [_shaped(studies, canonical.EVENT), _shaped(findings, canonical.EVENT)]
    )
    return {
        "event": events,
        "image": _shaped(con.sql(_images(feed, hash_uids)).to_arrow_table(), canonical.IMAGE),
        "image_feature": _shaped(
            con.sql(_image_features(feed)).to_arrow_table(), canonical.IMAGE_FEATURE
        ),
    }
