"""Patient merges: the records of a merged source key move to the surviving person.

Merges come from the feeds (`person_merge` records: an EHR merge file, an HL7 ADT^A40)
and are kept in the ETL schema (`<cdm>_etl.person_merge`) once published, so a merge
declared one night still holds on every later night, whatever the feeds send then.

Before the rules run, every person-keyed staged record of a merged key is re-keyed to the
surviving key (chains A -> B -> C resolved to C; of two declarations for one key the later
wins; a cycle merges nobody and is quarantined). The merged key's own person record is
filtered by the rule `person_merged` when the survivor has one, else it becomes the
survivor's. Event ids do not change (their natural keys hold no person); the person's
derived rows (observation_period, eras) are rebuilt for the survivor. Each merge record
tonight is traced to the survivor's person row in the lineage store.
"""

from __future__ import annotations

import logging
import re
from typing import Any

import sqlalchemy as sa

from etl import canonical
from etl.cdm.build.common import add_lineage, create_table_as
from etl.cdm.build.rules import DISPOSITION_DDL
from etl.pipeline.schemas import Schemas

log = logging.getLogger(__name__)

MERGE_RULE = "person merge"  # lineage mapping_rule of a merge record
PERSON_KEYED = (
    "src_person",
    "src_derived_person",
    "src_visit",
    "src_event",
    "src_payer_plan",
    "src_claim",
    "src_image",
    "src_image_feature",
)
STORE_DDL = """
CREATE TABLE IF NOT EXISTS {E}.person_merge (
    from_person_key VARCHAR(64) NOT NULL,
    into_person_key VARCHAR(64) NOT NULL,
    run_id VARCHAR(64) NOT NULL,
    feed TEXT NOT NULL,
    source_file TEXT NOT NULL,
    source_line BIGINT NOT NULL
)
"""
_MAX_CHAIN = 8  # rounds of chain resolution; a longer chain is resolved over later nights


def apply_merges(s: Schemas, conn: sa.Connection) -> None:
    """Resolve the merges in force and re-key the staged records (before the rules)."""
    s.run(conn, STORE_DDL)
    s.run(conn, DISPOSITION_DDL)
    # every declaration, stored (older) first; the latest per merged key wins
    s.run(
        conn,
        """
        CREATE TABLE {S}.merge_declared AS
        SELECT m.*, row_number() OVER (
                   PARTITION BY from_person_key ORDER BY night DESC, run_id DESC,
                   source_file DESC, source_line DESC) AS latest
        FROM (
            SELECT from_person_key, into_person_key, 0 AS night, run_id, feed, source_file,
                   source_line
            FROM {E}.person_merge
            UNION ALL
            SELECT from_person_key, into_person_key, 1, '', feed, source_file, source_line
            FROM {S}.src_person_merge
        ) m
        """,
    )
    s.run(
        conn,
        "CREATE TABLE {S}.merge_map AS SELECT from_person_key, into_person_key"
        " FROM {S}.merge_declared WHERE latest = 1",
    )
    for _ in range(_MAX_CHAIN):
        moved = s.run(
            conn,
            """
            UPDATE {S}.merge_map SET into_person_key = n.into_person_key
            FROM {S}.merge_map n
            WHERE {S}.merge_map.into_person_key = n.from_person_key
              AND n.from_person_key <> {S}.merge_map.from_person_key
              AND n.into_person_key <> {S}.merge_map.into_person_key
            """,
        ).rowcount
        if not moved:
            break
    # a cycle collapses onto itself (A -> A): nobody is merged; a chain still open after
    # the rounds is left for the next night
    before = s.run(conn, "SELECT count(*) FROM {S}.merge_map").scalar()
    s.run(
        conn,
        "DELETE FROM {S}.merge_map WHERE from_person_key = into_person_key OR into_person_key"
        " IN (SELECT from_person_key FROM {S}.merge_map)",
    )
    dropped = before - s.run(conn, "SELECT count(*) FROM {S}.merge_map").scalar()
    if dropped:
        log.warning("%d patient merge(s) form a cycle or an open chain: not applied", dropped)
    # the merged key's person record: filtered when the survivor has one, else re-keyed
    s.run(
        conn,
        """
        CREATE TABLE {S}.merged_person AS
        SELECT p.feed, p.source_file, p.source_line FROM {S}.src_person p
        JOIN {S}.merge_map m ON m.from_person_key = p.person_key
        WHERE EXISTS (SELECT 1 FROM {S}.src_person q WHERE q.person_key = m.into_person_key)
        """,
    )
    s.run(
        conn,
        "INSERT INTO {S}.disposition SELECT feed, source_file, source_line, 'persons',"
        " 'filtered', 'person_merged' FROM {S}.merged_person",
    )
    s.run(
        conn,
        "DELETE FROM {S}.src_person WHERE EXISTS (SELECT 1 FROM {S}.merged_person m"
        " WHERE m.feed = {S}.src_person.feed AND m.source_file = {S}.src_person.source_file"
        " AND m.source_line = {S}.src_person.source_line)",
    )
    if not s.run(conn, "SELECT count(*) FROM {S}.merge_map").scalar():
        return  # no merge in force (most nights): nothing to re-key
    views = _stage_views(s, conn)
    for table in PERSON_KEYED:
        if table in views:
            _copied_from_view(s, conn, table)
        s.run(
            conn,
            "UPDATE {S}.{t} SET person_key = m.into_person_key FROM {S}.merge_map m"
            " WHERE {S}.{t}.person_key = m.from_person_key",
            t=table,
        )


def _stage_views(s: Schemas, conn: sa.Connection) -> set[str]:
    """The stage's views (on DuckDB, the source tables read where they landed)."""
    rows = conn.execute(
        sa.text(
            "SELECT table_name FROM information_schema.tables"
            " WHERE table_schema = :schema AND table_type = 'VIEW'"
        ),
        {"schema": s.stage},
    )
    return {r[0] for r in rows}


def _copied_from_view(s: Schemas, conn: sa.Connection, table: str) -> None:
    """Replace the stage view `table` (landed Parquet read in place) by a table of its
    rows, which a merge can re-key; its record key stays uncompressed as in a loaded one."""
    own_key = canonical.RECORD_KEYS.get(table.removeprefix("src_"))
    copy = f"{table}_copied"
    create_table_as(
        s, conn, copy, f"SELECT * FROM {{S}}.{table}", uncompressed=(own_key,) if own_key else ()
    )
    s.run(conn, "DROP VIEW {S}.{t}", t=table)
    s.run(conn, "ALTER TABLE {S}.{copy} RENAME TO {t}", copy=copy, t=table)


def record_merges(s: Schemas, conn: sa.Connection) -> None:
    """Trace tonight's merge records (after person): to the survivor's person row, or set
    aside (`merge_superseded`, `merge_cycle`, `unknown_person`)."""
    s.run(
        conn,
        """
        CREATE TABLE {S}.merge_outcome AS
        SELECT d.feed, d.source_file, d.source_line, i.id AS person_id,
               CASE WHEN d.latest > 1 THEN 'merge_superseded'
                    WHEN m.from_person_key IS NULL THEN 'merge_cycle'
                    WHEN i.id IS NULL THEN 'unknown_person' END AS rule
        FROM {S}.merge_declared d
        LEFT JOIN {S}.merge_map m ON m.from_person_key = d.from_person_key
        LEFT JOIN {S}.ids_person i ON i.natural_key = m.into_person_key
        WHERE d.night = 1
        """,
    )
    s.run(
        conn,
        "INSERT INTO {S}.disposition SELECT feed, source_file, source_line, 'person_merges',"
        " CASE WHEN rule = 'merge_superseded' THEN 'filtered' ELSE 'quarantined' END, rule"
        " FROM {S}.merge_outcome WHERE rule IS NOT NULL",
    )
    add_lineage(
        s,
        conn,
        "person",
        f"SELECT person_id, feed, source_file, source_line, NULL, NULL, '{MERGE_RULE}'"
        " FROM {S}.merge_outcome WHERE rule IS NULL",
    )


def publish_merges(s: Schemas, conn: sa.Connection, run_id: str) -> int:
    """Keep tonight's new declarations in the ETL schema (inside the publish transaction)."""
    if not re.fullmatch(r"[0-9A-Za-z_-]+", run_id):
        raise ValueError(f"unexpected run id {run_id!r}")
    s.run(conn, STORE_DDL)
    return s.run(
        conn,
        """
        INSERT INTO {E}.person_merge
        SELECT DISTINCT n.from_person_key, n.into_person_key, :run, n.feed, n.source_file,
               n.source_line
        FROM {S}.src_person_merge n
        WHERE NOT EXISTS (
            SELECT 1 FROM {E}.person_merge o
            WHERE o.from_person_key = n.from_person_key
              AND o.into_person_key = n.into_person_key)
        """,
        {"run": run_id},
    ).rowcount


def merge_summary(s: Schemas, conn: sa.Connection) -> dict[str, Any]:
    """For the report: merges declared tonight, merges in force, person records merged."""
    (tonight, in_force, persons), *_ = s.run(
        conn,
        "SELECT (SELECT count(*) FROM {S}.src_person_merge),"
        " (SELECT count(*) FROM {S}.merge_map), (SELECT count(*) FROM {S}.merged_person)",
    ).all()  # fetched to the end: DuckDB keeps a half-read result open otherwise
    return {"declared_tonight": tonight, "in_force": in_force, "person_records_merged": persons}
