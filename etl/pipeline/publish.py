"""Publish: the staged CDM tables replace the published ones in one transaction.

Researchers either see last night's warehouse or tonight's, never a mix: every published
table is replaced, and the run's new keys join the persistent key map, inside a single
transaction (PostgreSQL and DuckDB both have transactional DDL). A crash before the
commit leaves the published warehouse exactly as it was.
"""

from __future__ import annotations

import sqlalchemy as sa

from etl.cdm.schema import build_metadata
from etl.cdm.spec import ATHENA_TABLES, cdm_tables
from etl.pipeline.schemas import Schemas

# Researchers' own results: never touched by a load.
RESEARCHER_TABLES = {"cohort", "cohort_definition"}


def published_tables() -> list[str]:
    return [t for t in cdm_tables() if t not in ATHENA_TABLES and t not in RESEARCHER_TABLES]


def publish(s: Schemas, conn: sa.Connection) -> dict[str, int]:
    """Swap every staged table into the CDM schema within `conn`'s transaction."""
    wh = s.wh
    tables = published_tables()
    md = build_metadata(s.cdm, tables=tables, indexes=wh.dialect == "postgresql")
    counts: dict[str, int] = {}
    for name in tables:
        table = md.tables[f"{s.cdm}.{name}"]
        # Drop and recreate from the spec rather than DELETE: no dead rows on PostgreSQL,
        # and DuckDB would re-check deleted keys against the new rows in one transaction.
        table.drop(conn, checkfirst=True)
        table.create(conn)
        cols = ", ".join(wh.quote(c.name) for c in table.columns)
        conn.execute(
            sa.text(
                f"INSERT INTO {wh.qualified(s.cdm, name)} ({cols})"
                f" SELECT {cols} FROM {wh.qualified(s.stage, name)}"
            )
        )
        counts[name] = wh.count_rows(conn, s.cdm, name)
    ids_tables = [
        t for t in sa.inspect(conn).get_table_names(schema=s.stage) if t.startswith("ids_")
    ]
    for ids in ids_tables:
        s.run(
            conn,
            "INSERT INTO {E}.key_map (cdm_table, natural_key, id)"
            " SELECT :t, natural_key, id FROM {S}.{ids} WHERE is_new",
            {"t": ids.removeprefix("ids_")},
            ids=ids,
        )
    return counts
