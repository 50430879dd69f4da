"""person and death."""

from __future__ import annotations

import sqlalchemy as sa

from etl.cdm.build.common import add_lineage, assign_ids, insert_rows
from etl.cdm.build.health_system import location_key
from etl.cdm.build.rules import DERIVED_PERSON_RULE
from etl.pipeline.schemas import Schemas

EHR_TYPE = 32817  # Type Concept "EHR"


def _coded(alias: str, field: str) -> str:
    return f"""LEFT JOIN {{S}}.code_map_single {alias}
               ON {alias}.vocabulary_id = p.{field}_vocabulary AND {alias}.code = p.{field}_code"""


PERSON_JOINS = f"""
    FROM {{S}}.person_ok p
    JOIN {{S}}.ids_person i ON i.natural_key = p.person_key
    LEFT JOIN {{S}}.ids_location l ON l.natural_key = {location_key("p")}
    LEFT JOIN {{S}}.ids_care_site cs ON cs.natural_key = p.care_site_key
    LEFT JOIN {{S}}.ids_provider pr ON pr.natural_key = p.provider_key
    {_coded("g", "gender")}
    {_coded("r", "race")}
    {_coded("eth", "ethnicity")}
"""


def build_person(s: Schemas, conn: sa.Connection) -> None:
    assign_ids(s, conn, "person", "SELECT person_key AS natural_key FROM {S}.person_ok")
    insert_rows(
        s,
        conn,
        "person",
        {
            "person_id": "i.id",
            "gender_concept_id": "coalesce(g.target_concept_id, 0)",
            "year_of_birth": "CAST(EXTRACT(YEAR FROM p.birth_datetime) AS INTEGER)",
            "month_of_birth": "CAST(EXTRACT(MONTH FROM p.birth_datetime) AS INTEGER)",
            "day_of_birth": "CAST(EXTRACT(DAY FROM p.birth_datetime) AS INTEGER)",
            "birth_datetime": "p.birth_datetime",
            "race_concept_id": "coalesce(r.target_concept_id, 0)",
            "ethnicity_concept_id": "coalesce(eth.target_concept_id, 0)",
            "location_id": "l.id",
            "provider_id": "pr.id",
            "care_site_id": "cs.id",
            "person_source_value": "p.person_key",
            "gender_source_value": "p.gender_code",
            "gender_source_concept_id": "coalesce(g.source_concept_id, 0)",
            "race_source_value": "p.race_code",
            "race_source_concept_id": "coalesce(r.source_concept_id, 0)",
            "ethnicity_source_value": "p.ethnicity_code",
            "ethnicity_source_concept_id": "coalesce(eth.source_concept_id, 0)",
        },
        PERSON_JOINS,
    )
    add_lineage(
        s,
        conn,
        "person",
        "SELECT i.id, p.feed, p.source_file, p.source_line, NULL, NULL,"
        f" CASE WHEN p.derived THEN '{DERIVED_PERSON_RULE}' END"
        " FROM {S}.person_ok p JOIN {S}.ids_person i ON i.natural_key = p.person_key",
    )


def build_death(s: Schemas, conn: sa.Connection) -> None:
    insert_rows(
        s,
        conn,
        "death",
        {
            "person_id": "i.id",
            "death_date": "CAST(p.death_datetime AS DATE)",
            "death_datetime": "p.death_datetime",
            "death_type_concept_id": str(EHR_TYPE),
        },
        "FROM {S}.person_ok p JOIN {S}.ids_person i ON i.natural_key = p.person_key"
        " WHERE p.death_datetime IS NOT NULL",
    )
    add_lineage(
        s,
        conn,
        "death",
        "SELECT i.id, p.feed, p.source_file, p.source_line, NULL, NULL, 'death date of the person'"
        " FROM {S}.person_ok p JOIN {S}.ids_person i ON i.natural_key = p.person_key"
        " WHERE p.death_datetime IS NOT NULL",
    )
