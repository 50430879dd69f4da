"""Build: the CDM tables in the staging schema, from the staged canonical records."""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable

import sqlalchemy as sa

from etl.cdm.build import (
    events,
    health_system,
    imaging,
    merges,
    observation_period,
    payer_cost,
    person,
    rules,
    visit,
)
from etl.cdm.build.cdm_source import build_cdm_source
from etl.cdm.build.eras import build_eras
from etl.mapping.mapper import build_code_map
from etl.pipeline.schemas import Schemas

log = logging.getLogger(__name__)


def _source_to_concept_map(s: Schemas, conn: sa.Connection) -> None:
    """Publish the site's local maps in SOURCE_TO_CONCEPT_MAP, where OHDSI tools look."""
    s.run(
        conn,
        """
        INSERT INTO {b} (source_code, source_concept_id,
            source_vocabulary_id, target_concept_id, target_vocabulary_id,
            valid_start_date, valid_end_date)
        SELECT DISTINCT substr(m.source_code, 1, 50), 0, substr(m.source_vocabulary_id, 1, 20),
               m.target_concept_id, coalesce(c.vocabulary_id, 'None'),
               DATE '1970-01-01', DATE '2099-12-31'
        FROM {S}.local_map m LEFT JOIN {C}.concept c ON c.concept_id = m.target_concept_id
        WHERE m.mapping_type = 'MAPS_TO'
        """,
        b=s.built("source_to_concept_map"),
    )


def build_steps(site_name: str, run_date: dt.date) -> list[tuple[str, Callable]]:
    """The ordered build steps; each takes (Schemas, Connection)."""
    steps: list[tuple[str, Callable]] = [
        # merged patients' records move to the survivor before any rule looks at persons
        ("merges", merges.apply_merges),
        ("rules", rules.apply_rules),
        ("mapping", build_code_map),
        ("location", health_system.build_location),
        ("care_site", health_system.build_care_site),
        ("provider", health_system.build_provider),
        ("person", person.build_person),
        ("merge_records", merges.record_merges),
        ("death", person.build_death),
        ("visit_occurrence", visit.build_visit),
        # a PACS study has no encounter id: its visit is matched before events are built
        ("imaging_visits", imaging.match_study_visits),
        ("events", events.build_events),
        ("imaging", imaging.build_imaging),
        ("financial_rules", rules.apply_financial_rules),
        ("payer_plan_period", payer_cost.build_payer_plan_period),
        ("cost", payer_cost.build_cost),
        ("observation_period", observation_period.build_observation_period),
        ("source_to_concept_map", _source_to_concept_map),
    ]
    steps.append(("eras", build_eras))
    steps.append(
        (
            "cdm_source",
            lambda s, conn: build_cdm_source(
                s,
                conn,
                name=site_name,
                abbreviation=site_name[:25],
                holder=site_name,
                description="Built by omop-etl from the site's configured feeds",
                release_date=run_date,
            ),
        )
    )
    return steps
