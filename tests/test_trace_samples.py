"""The report's trace samples: the smallest row ids of each table in the lineage store."""

from __future__ import annotations

from etl.pipeline.report import trace_samples
from etl.pipeline.schemas import Schemas

# (cdm_table, cdm_id): a row traced to several sources appears once per source
LINEAGE = [
    ("measurement", 40),
    ("measurement", 7),
    ("measurement", 7),
    ("measurement", 12),
    ("measurement", 12),
    ("measurement", 3),
    ("measurement", 99),
    ("person", 5),
    ("person", 5),
    ("person", 2),
    ("death", 8),
]


def test_trace_samples_are_each_tables_smallest_distinct_ids(warehouse) -> None:
    wh, schema = warehouse
    s = Schemas(wh, schema)
    with wh.begin() as conn:
        wh.create_schema(conn, s.stage)
        wh.create_schema(conn, s.etl)  # DuckDB's stage lineage lies there
        s.run(conn, "CREATE TABLE {SL} (cdm_table VARCHAR(50), cdm_id BIGINT)")
        s.run(
            conn,
            "INSERT INTO {SL} VALUES (:t, :i)",
            [{"t": t, "i": i} for t, i in LINEAGE],
        )
        assert trace_samples(s, conn) == {
            "death": [8],
            "measurement": [3, 7, 12],
            "person": [2, 5],
        }
        assert trace_samples(s, conn, per_table=0) == {}
        assert trace_samples(s, conn, per_table=1) == {
            "death": [8],
            "measurement": [3],
            "person": [2],
        }
