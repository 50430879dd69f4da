"""observation_period: per person, from the first to the last day any record covers.

One period per person spanning every visit and event that was kept (start to the latest
end, or start when there is no end), so every event lies inside an observation period, as
OHDSI tools assume. Synthea-style extracts have no enrolment data to do better with.
"""

from __future__ import annotations

import sqlalchemy as sa

from etl.cdm.build.common import assign_ids, insert_rows
from etl.pipeline.schemas import Schemas

ALGORITHM_FROM_EHR = 32882  # Type Concept "Standard algorithm from EHR"

# (table, start date column, end date column or None)
DATED_TABLES = [
    ("visit_occurrence", "visit_start_date", "visit_end_date"),
    ("condition_occurrence", "condition_start_date", "condition_end_date"),
    ("drug_exposure", "drug_exposure_start_date", "drug_exposure_end_date"),
    ("procedure_occurrence", "procedure_date", "procedure_end_date"),
    ("measurement", "measurement_date", None),
    ("observation", "observation_date", None),
    ("device_exposure", "device_exposure_start_date", "device_exposure_end_date"),
    ("specimen", "specimen_date", None),
]


def build_observation_period(s: Schemas, conn: sa.Connection) -> None:
    spans = " UNION ALL ".join(
        f"SELECT person_id, {start} AS d1, "
        f"{f'greatest({start}, coalesce({end}, {start}))' if end else start} AS d2 "
        f"FROM {{S}}.{table}"
        for table, start, end in DATED_TABLES
    )
    s.run(
        conn,
        "CREATE TABLE {S}.person_span AS SELECT person_id, min(d1) AS d1, max(d2) AS d2"
        " FROM ({spans}) x GROUP BY person_id",
        spans=s.sql(spans),
    )
    assign_ids(
        s,
        conn,
        "observation_period",
        "SELECT CAST(person_id AS VARCHAR) AS natural_key FROM {S}.person_span",
    )
    insert_rows(
        s,
        conn,
        "observation_period",
        {
            "observation_period_id": "i.id",
            "person_id": "x.person_id",
            "observation_period_start_date": "x.d1",
            "observation_period_end_date": "x.d2",
            "period_type_concept_id": str(ALGORITHM_FROM_EHR),
        },
        "FROM {S}.person_span x"
        " JOIN {S}.ids_observation_period i ON i.natural_key = CAST(x.person_id AS VARCHAR)",
    )
