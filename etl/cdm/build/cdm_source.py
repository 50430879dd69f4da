"""cdm_source: one row describing this warehouse, its release and vocabulary version."""

from __future__ import annotations

import datetime as dt

import sqlalchemy as sa

from etl import __version__
from etl.pipeline.schemas import Schemas

CDM_V54_CONCEPT = 756265  # "OMOP CDM Version 5.4.0"


def build_cdm_source(
    s: Schemas,
    conn: sa.Connection,
    *,
    name: str,
    abbreviation: str,
    holder: str,
    description: str,
    release_date: dt.date,
) -> None:
    version = s.run(
        conn, "SELECT vocabulary_version FROM {C}.vocabulary WHERE vocabulary_id = 'None'"
    ).scalar_one_or_none()
    s.run(
        conn,
        """
        INSERT INTO {b} (cdm_source_name, cdm_source_abbreviation, cdm_holder,
            source_description, cdm_etl_reference, source_release_date, cdm_release_date,
            cdm_version, cdm_version_concept_id, vocabulary_version)
        VALUES (:name, :abbr, :holder, :description, :etl, :released, :released,
                'v5.4', :cdm_concept, :vocab)
        """,
        {
            "name": name[:255],
            "abbr": abbreviation[:25],
            "holder": holder[:255],
            "description": description,
            "etl": f"omop-etl {__version__}",
            "released": release_date,
            "cdm_concept": CDM_V54_CONCEPT,
            "vocab": (version or "unknown")[:20],
        },
        b=s.built("cdm_source"),
    )
