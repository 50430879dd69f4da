"""location, care_site and provider: where care happens and who gives it.

Location keeps what HIPAA safe harbour allows and nothing finer: state and a 3-digit ZIP
(restricted areas as 000). Street, city, county and coordinates are never read.
"""

from __future__ import annotations

import sqlalchemy as sa

from etl.cdm.build.common import add_lineage, assign_ids, insert_rows
from etl.pipeline.schemas import Schemas

LOCATION_KEY = "coalesce({a}.state, '') || '|' || coalesce({a}.zip3, '')"


def location_key(alias: str) -> str:
    return LOCATION_KEY.format(a=alias)


def build_location(s: Schemas, conn: sa.Connection) -> None:
    s.run(
        conn,
        """
        CREATE TABLE {S}.location_src AS
        SELECT DISTINCT state, zip3 FROM (
            SELECT state, zip3 FROM {S}.person_ok
            UNION ALL SELECT state, zip3 FROM {S}.care_site_ok
        ) x WHERE state IS NOT NULL OR zip3 IS NOT NULL
        """,
    )
    assign_ids(
        s, conn, "location", f"SELECT {location_key('l')} AS natural_key FROM {{S}}.location_src l"
    )
    insert_rows(
        s,
        conn,
        "location",
        {
            "location_id": "i.id",
            "state": "l.state",
            "zip": "l.zip3",
            "location_source_value": location_key("l"),
        },
        "FROM {S}.location_src l"
        f" JOIN {{S}}.ids_location i ON i.natural_key = {location_key('l')}",
    )
    for source in ("person_ok", "care_site_ok"):
        add_lineage(
            s,
            conn,
            "location",
            f"SELECT i.id, x.feed, x.source_file, x.source_line, NULL, NULL,"
            f" 'state and 3-digit ZIP of the record' FROM {{S}}.{source} x"
            f" JOIN {{S}}.ids_location i ON i.natural_key = {location_key('x')}",
        )


def build_care_site(s: Schemas, conn: sa.Connection) -> None:
    assign_ids(s, conn, "care_site", "SELECT care_site_key AS natural_key FROM {S}.care_site_ok")
    joins = f"""
        FROM {{S}}.care_site_ok c
        JOIN {{S}}.ids_care_site i ON i.natural_key = c.care_site_key
        LEFT JOIN {{S}}.ids_location l ON l.natural_key = {location_key("c")}
    """
    insert_rows(
        s,
        conn,
        "care_site",
        {
            "care_site_id": "i.id",
            "care_site_name": "c.name",
            "location_id": "l.id",
            "care_site_source_value": "c.care_site_key",
        },
        joins,
    )
    add_lineage(
        s,
        conn,
        "care_site",
        f"SELECT i.id, c.feed, c.source_file, c.source_line, NULL, NULL, NULL {joins}",
    )


def build_provider(s: Schemas, conn: sa.Connection) -> None:
    assign_ids(s, conn, "provider", "SELECT provider_key AS natural_key FROM {S}.provider_ok")
    joins = """
        FROM {S}.provider_ok p
        JOIN {S}.ids_provider i ON i.natural_key = p.provider_key
        LEFT JOIN {S}.ids_care_site c ON c.natural_key = p.care_site_key
        LEFT JOIN {S}.code_map_single sp
               ON sp.vocabulary_id = p.specialty_vocabulary AND sp.code = p.specialty_code
        LEFT JOIN {S}.code_map_single g
               ON g.vocabulary_id = p.gender_vocabulary AND g.code = p.gender_code
    """
    insert_rows(
        s,
        conn,
        "provider",
        {
            "provider_id": "i.id",
            "specialty_concept_id": "coalesce(sp.target_concept_id, 0)",
            "care_site_id": "c.id",
            "gender_concept_id": "coalesce(g.target_concept_id, 0)",
            "provider_source_value": "p.provider_key",
            "specialty_source_value": "p.specialty_code",
            "specialty_source_concept_id": "coalesce(sp.source_concept_id, 0)",
            "gender_source_value": "p.gender_code",
            "gender_source_concept_id": "coalesce(g.source_concept_id, 0)",
        },
        joins,
    )
    add_lineage(
        s,
        conn,
        "provider",
        f"SELECT i.id, p.feed, p.source_file, p.source_line, NULL, NULL, NULL {joins}",
    )
