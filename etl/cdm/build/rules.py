"""Which source records are kept, quarantined or filtered, by named rules, set-based.

Every record that reaches the warehouse stage ends in exactly one place: kept for the
CDM, quarantined (a problem with the record: unknown patient, duplicate key), or filtered
by a named plausibility rule. `disposition` holds one row per record not kept, with the
rule's name, so the report and the auditor can account for every input line.
"""

from __future__ import annotations

import sqlalchemy as sa

from etl.pipeline.schemas import Schemas

# Named filter rules (status 'filtered'); the README lists them for sites and auditors.
FILTER_RULES = {
    "event_before_birth": "starts before the person's date of birth",
    "event_after_death": "starts more than 60 days after the person's death "
    "(the allowance of DQD's plausibleBeforeDeath check)",
}
# Reasons a record is quarantined after extraction (status 'quarantined').
QUARANTINE_RULES = {
    "unknown_person": "its patient key matches no person of the feed",
    "duplicate_key": "another record of the same file has the same key (the first is kept)",
}
DEATH_ALLOWANCE_DAYS = 60

DISPOSITION_DDL = """
CREATE TABLE {S}.disposition (
    feed VARCHAR(64) NOT NULL,
    source_file VARCHAR(255) NOT NULL,
    source_line BIGINT NOT NULL,
    record_set VARCHAR(64) NOT NULL,
    status VARCHAR(16) NOT NULL,
    rule VARCHAR(64) NOT NULL
)
"""


def _first_per_key(s: Schemas, conn: sa.Connection, src: str, key: str, ok: str, rs: str) -> None:
    s.run(
        conn,
        """
        CREATE TABLE {S}.{ok} AS
        SELECT * FROM (
            SELECT t.*, row_number() OVER (PARTITION BY {key} ORDER BY source_file, source_line)
                   AS key_rank
            FROM {S}.{src} t
        ) x WHERE key_rank = 1
        """,
        ok=ok,
        key=key,
        src=src,
    )
    s.run(
        conn,
        """
        INSERT INTO {S}.disposition
        SELECT feed, source_file, source_line, record_set, 'quarantined', 'duplicate_key'
        FROM (
            SELECT t.*, {rs} AS record_set,
                   row_number() OVER (PARTITION BY {key} ORDER BY source_file, source_line)
                   AS key_rank
            FROM {S}.{src} t
        ) x WHERE key_rank > 1
        """,
        rs=rs,
        key=key,
        src=src,
    )


def _checked(s: Schemas, conn: sa.Connection, src: str, out: str, record_set: str) -> None:
    """Apply the person-level rules to a table with person_key and start_datetime."""
    s.run(
        conn,
        """
        CREATE TABLE {S}.{out} AS
        SELECT t.*,
               CASE
                   WHEN p.person_key IS NULL THEN 'unknown_person'
                   WHEN CAST(t.start_datetime AS DATE) < CAST(p.birth_datetime AS DATE)
                       THEN 'event_before_birth'
                   WHEN p.death_datetime IS NOT NULL
                        AND CAST(t.start_datetime AS DATE)
                            > CAST(p.death_datetime AS DATE) + {days}
                       THEN 'event_after_death'
               END AS rule
        FROM {S}.{src} t
        LEFT JOIN {S}.person_ok p ON p.person_key = t.person_key
        """,
        out=out,
        src=src,
        days=str(DEATH_ALLOWANCE_DAYS),
    )
    s.run(
        conn,
        """
        INSERT INTO {S}.disposition
        SELECT feed, source_file, source_line, {rs},
               CASE WHEN rule = 'unknown_person' THEN 'quarantined' ELSE 'filtered' END, rule
        FROM {S}.{out} WHERE rule IS NOT NULL
        """,
        out=out,
        rs=record_set,
    )


def apply_rules(s: Schemas, conn: sa.Connection) -> None:
    """Create person_ok, visit_ok, event_ok, care_site_ok, provider_ok and disposition."""
    s.run(conn, DISPOSITION_DDL)
    _first_per_key(s, conn, "src_person", "person_key", "person_ok", "'persons'")
    _first_per_key(s, conn, "src_care_site", "care_site_key", "care_site_ok", "'care_sites'")
    _first_per_key(s, conn, "src_provider", "provider_key", "provider_ok", "'providers'")
    _first_per_key(s, conn, "src_visit", "visit_key", "visit_unique", "'visits'")
    _checked(s, conn, "visit_unique", "visit_checked", "'visits'")
    s.run(conn, "CREATE TABLE {S}.visit_ok AS SELECT * FROM {S}.visit_checked WHERE rule IS NULL")
    _checked(s, conn, "src_event", "event_checked", "record_set")
    # Records with the same natural key in one file are distinct records: number them in
    # file order so each keeps its own stable key.
    s.run(
        conn,
        """
        CREATE TABLE {S}.event_ok AS
        SELECT e.*, e.event_key || '#' || CAST(row_number() OVER (
                   PARTITION BY e.event_key ORDER BY e.source_file, e.source_line) AS VARCHAR)
               AS record_key
        FROM {S}.event_checked e WHERE e.rule IS NULL
        """,
    )
