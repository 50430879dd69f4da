"""Clinical event tables, routed by the standard concept's domain, whatever the feed.

condition_occurrence, drug_exposure, procedure_occurrence, measurement, observation,
device_exposure and specimen are all built from `event_mapped`: one row per source record
and target concept (a code that maps to two standard concepts gives two rows). The target
concept's domain picks the table; an unmapped code (concept 0) goes where its record set's
declared domain says, with its source value kept, and so does every row of a record set
the profile marks `keep_domain` (allergies: an allergy to a drug is no drug exposure).
"""

from __future__ import annotations

import sqlalchemy as sa

from etl.cdm.build.common import (
    add_lineage,
    assign_ids,
    create_table_as,
    forget_source_rows,
    insert_rows,
)
from etl.pipeline.schemas import Schemas

# Standard concept domain -> CDM table. Any other domain is recorded in observation,
# the CDM's general-purpose table (OHDSI convention).
DOMAIN_TABLES = {
    "Condition": "condition_occurrence",
    "Drug": "drug_exposure",
    "Procedure": "procedure_occurrence",
    "Measurement": "measurement",
    "Observation": "observation",
    "Device": "device_exposure",
    "Specimen": "specimen",
}
FALLBACK_TABLE = "observation"

# Comparators of numeric results -> standard 'Meas Value Operator' concepts.
OPERATOR_CONCEPTS = {"<": 4171756, "<=": 4171754, "=": 4172703, ">=": 4171755, ">": 4172704}
_OPERATOR = (
    "CASE e.operator "
    + " ".join(f"WHEN '{op}' THEN {cid}" for op, cid in OPERATOR_CONCEPTS.items())
    + " END"
)

_D = "CAST(e.start_datetime AS DATE)"
_ED = "CAST(e.end_datetime AS DATE)"
_COMMON = {
    "person_id": "e.person_id",
    "provider_id": "e.provider_id",
    "visit_occurrence_id": "e.visit_occurrence_id",
}

# CDM column -> expression over event_mapped `e` (and `i.id`, the row's stable id).
TABLE_COLUMNS: dict[str, dict[str, str]] = {
    "condition_occurrence": {
        "condition_occurrence_id": "i.id",
        "condition_concept_id": "e.concept_id",
        "condition_start_date": _D,
        "condition_start_datetime": "e.start_datetime",
        "condition_end_date": _ED,
        "condition_end_datetime": "e.end_datetime",
        "condition_type_concept_id": "e.type_concept_id",
        "condition_source_value": "e.code",
        "condition_source_concept_id": "e.source_concept_id",
        **_COMMON,
    },
    "drug_exposure": {
        "drug_exposure_id": "i.id",
        "drug_concept_id": "e.concept_id",
        "drug_exposure_start_date": _D,
        "drug_exposure_start_datetime": "e.start_datetime",
        # required by the CDM; a record without a stop date ends the day it starts
        "drug_exposure_end_date": f"coalesce({_ED}, {_D})",
        "drug_exposure_end_datetime": "coalesce(e.end_datetime, e.start_datetime)",
        "verbatim_end_date": _ED,
        "drug_type_concept_id": "e.type_concept_id",
        "quantity": "e.quantity",
        "days_supply": f"CASE WHEN {_ED} >= {_D} THEN CAST({_ED} - {_D} AS INTEGER) + 1 END",
        "drug_source_value": "e.code",
        "drug_source_concept_id": "e.source_concept_id",
        **_COMMON,
    },
    "procedure_occurrence": {
        "procedure_occurrence_id": "i.id",
        "procedure_concept_id": "e.concept_id",
        "procedure_date": _D,
        "procedure_datetime": "e.start_datetime",
        "procedure_end_date": _ED,
        "procedure_end_datetime": "e.end_datetime",
        "procedure_type_concept_id": "e.type_concept_id",
        "quantity": "CAST(e.quantity AS INTEGER)",
        "procedure_source_value": "e.code",
        "procedure_source_concept_id": "e.source_concept_id",
        **_COMMON,
    },
    "measurement": {
        "measurement_id": "i.id",
        "measurement_concept_id": "e.concept_id",
        "measurement_date": _D,
        "measurement_datetime": "e.start_datetime",
        "measurement_type_concept_id": "e.type_concept_id",
        "value_as_number": "e.value_as_number",
        "value_as_concept_id": "e.value_as_concept_id",
        "unit_concept_id": "e.unit_concept_id",
        "range_low": "e.range_low",
        "range_high": "e.range_high",
        "operator_concept_id": _OPERATOR,
        "measurement_source_value": "e.code",
        "measurement_source_concept_id": "e.source_concept_id",
        "unit_source_value": "e.unit_code",
        "unit_source_concept_id": "e.unit_source_concept_id",
        "value_source_value": "coalesce(e.value_as_string, e.value_code,"
        " CAST(e.value_as_number AS VARCHAR))",
        **_COMMON,
    },
    "observation": {
        "observation_id": "i.id",
        "observation_concept_id": "e.concept_id",
        "observation_date": _D,
        "observation_datetime": "e.start_datetime",
        "observation_type_concept_id": "e.type_concept_id",
        "value_as_number": "e.value_as_number",
        "value_as_string": "e.value_as_string",
        "value_as_concept_id": "e.value_as_concept_id",
        "unit_concept_id": "e.unit_concept_id",
        "qualifier_source_value": "e.qualifier",
        "observation_source_value": "e.code",
        "observation_source_concept_id": "e.source_concept_id",
        "unit_source_value": "e.unit_code",
        "value_source_value": "coalesce(e.value_as_string, e.value_code,"
        " CAST(e.value_as_number AS VARCHAR))",
        **_COMMON,
    },
    "device_exposure": {
        "device_exposure_id": "i.id",
        "device_concept_id": "e.concept_id",
        "device_exposure_start_date": _D,
        "device_exposure_start_datetime": "e.start_datetime",
        "device_exposure_end_date": _ED,
        "device_exposure_end_datetime": "e.end_datetime",
        "device_type_concept_id": "e.type_concept_id",
        "unique_device_id": "e.device_identifier",
        "quantity": "CAST(e.quantity AS INTEGER)",
        "device_source_value": "e.code",
        "device_source_concept_id": "e.source_concept_id",
        "unit_concept_id": "e.unit_concept_id",
        "unit_source_value": "e.unit_code",
        "unit_source_concept_id": "e.unit_source_concept_id",
        **_COMMON,
    },
    "specimen": {
        "specimen_id": "i.id",
        "person_id": "e.person_id",
        "specimen_concept_id": "e.concept_id",
        "specimen_type_concept_id": "e.type_concept_id",
        "specimen_date": _D,
        "specimen_datetime": "e.start_datetime",
        "quantity": "e.quantity",
        "unit_concept_id": "e.unit_concept_id",
        "specimen_source_value": "e.code",
        "unit_source_value": "e.unit_code",
    },
}


def _routing_case() -> str:
    whens = " ".join(f"WHEN '{d}' THEN '{t}'" for d, t in DOMAIN_TABLES.items())
    domain = (
        "CASE WHEN e.keep_domain THEN e.default_domain"
        " ELSE coalesce(m.target_domain_id, e.default_domain) END"
    )
    return f"CASE {domain} {whens} ELSE '{FALLBACK_TABLE}' END"


# The rows of `event_mapped` (its record_key, a digest, is stored uncompressed on DuckDB)
EVENT_MAPPED = f"""
SELECT e.record_key, e.record_set, e.code, e.vocabulary_id, e.type_concept_id,
       e.start_datetime, e.end_datetime, e.value_as_number, e.value_as_string, e.value_code,
       e.unit_code, e.range_low, e.range_high, e.operator, e.qualifier, e.quantity,
       e.device_identifier,
       e.feed, e.source_file, e.source_line,
       coalesce(m.source_concept_id, 0) AS source_concept_id,
       coalesce(m.target_concept_id, 0) AS concept_id,
       coalesce(m.mapping_rule, 'unmapped')
         || CASE WHEN NOT e.keep_domain AND m.target_domain_id <> e.default_domain
                 THEN '; domain ' || m.target_domain_id || ' (declared ' || e.default_domain || ')'
                 ELSE '' END
         || CASE WHEN e.value_code IS NULL AND vm.value_concept_id IS NOT NULL
                 THEN '; value by Maps to value' ELSE '' END AS mapping_rule,
       {_routing_case()} AS cdm_table,
       CASE WHEN e.value_code IS NOT NULL THEN coalesce(vc.target_concept_id, 0)
            ELSE vm.value_concept_id END AS value_as_concept_id,
       CASE WHEN e.unit_code IS NOT NULL THEN coalesce(u.target_concept_id, 0) END
            AS unit_concept_id,
       CASE WHEN e.unit_code IS NOT NULL THEN coalesce(u.source_concept_id, 0) END
            AS unit_source_concept_id,
       p.id AS person_id,
       v.id AS visit_occurrence_id,
       coalesce(pr.id, v.provider_id) AS provider_id
FROM {{S}}.event_ok e
JOIN {{S}}.ids_person p ON p.natural_key = e.person_key
LEFT JOIN {{S}}.code_map m ON m.vocabulary_id = e.vocabulary_id AND m.code = e.code
LEFT JOIN {{S}}.value_map vm ON vm.vocabulary_id = e.vocabulary_id AND vm.code = e.code
LEFT JOIN {{S}}.code_map_single vc
       ON vc.vocabulary_id = e.value_vocabulary AND vc.code = e.value_code
LEFT JOIN {{S}}.code_map_single u ON u.vocabulary_id = e.unit_vocabulary AND u.code = e.unit_code
LEFT JOIN {{S}}.ids_visit_occurrence v ON v.natural_key = e.visit_key
LEFT JOIN {{S}}.ids_provider pr ON pr.natural_key = e.provider_key
"""


def _natural_key(alias: str) -> str:
    return f"{alias}.record_key || '>' || CAST({alias}.concept_id AS VARCHAR)"


def build_events(s: Schemas, conn: sa.Connection) -> None:
    """Map every kept event and write it to the table its concept's domain names.

    On DuckDB each table's ids keep the rowid of their `event_mapped` row, and the rows
    and their lineage join back on it: an integer join where rebuilding and hashing each
    row's natural key (about 40 characters) took three times as long. PostgreSQL joins on
    the natural key."""
    create_table_as(s, conn, "event_mapped", EVENT_MAPPED, uncompressed=("record_key",))
    by_row = s.wh.dialect == "duckdb"
    for table, columns in TABLE_COLUMNS.items():
        ids = assign_ids(
            s,
            conn,
            table,
            f"SELECT {_natural_key('e')} AS natural_key"
            + (", e.rowid AS source_row" if by_row else "")
            + f" FROM {{S}}.event_mapped e WHERE e.cdm_table = '{table}'",
            source_row=by_row,
        )
        link = "i.source_row = e.rowid" if by_row else f"i.natural_key = {_natural_key('e')}"
        joins = (
            f"FROM {{S}}.event_mapped e JOIN {{S}}.{ids} i ON {link} WHERE e.cdm_table = '{table}'"
        )
        insert_rows(s, conn, table, columns, joins)
        add_lineage(
            s,
            conn,
            table,
            "SELECT i.id, e.feed, e.source_file, e.source_line, e.vocabulary_id, e.code,"
            f" e.mapping_rule {joins}",
        )
        if by_row:
            forget_source_rows(s, conn, ids)
