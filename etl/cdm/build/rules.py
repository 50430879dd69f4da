"""Which source records are kept, quarantined or filtered, by named rules, set-based.

Every record that reaches the warehouse stage ends in exactly one place: kept for the
CDM, quarantined (a problem with the record: unknown patient, duplicate key), or filtered
by a named plausibility rule. `disposition` holds one row per record not kept, with the
rule's name, so the report and the auditor can account for every input line.
"""

from __future__ import annotations

import duckdb
import numpy as np
import pyarrow as pa
import sqlalchemy as sa

from etl import canonical
from etl.cdm.build.common import create_table_as
from etl.pipeline.schemas import Schemas

# Named filter rules (status 'filtered'); the README lists them for sites and auditors.
FILTER_RULES = {
    "reference_not_used": "a look-up record (a payer) that no loaded record refers to",
    "event_before_birth": "starts before the person's date of birth",
    "event_after_death": "starts more than 60 days after the person's death "
    "(the allowance of DQD's plausibleBeforeDeath check)",
    "person_merged": "the person record of a patient key merged into another (a merge file,"
    " an HL7 ADT^A40): the survivor's record is kept and every record moves to it",
    "merge_superseded": "a patient merge of a key that a later merge declaration sends elsewhere",
    "deleted_at_source": "a delta delivery's record of a deletion: it removes the record of"
    " that key from the feed's state",
}
# Reasons a record is quarantined after extraction (status 'quarantined').
QUARANTINE_RULES = {
    "unknown_person": "its patient key matches no person of the feed",
    "unknown_visit": "a claim whose visit is not among the feed's visits",
    "unknown_claim": "a claim line whose claim is not in the feed (or was set aside)",
    "duplicate_key": "another record of the same file has the same key (the first is kept)",
    "merge_cycle": "a patient merge that, with the others in force, forms a cycle"
    " (A into B, B into A): nobody is merged",
    "image_without_procedure": "an image series whose study did not become a"
    " procedure_occurrence (its code names a concept of another domain), which the imaging"
    " extension requires",
}
DEATH_ALLOWANCE_DAYS = 60

DISPOSITION_DDL = """
CREATE TABLE IF NOT EXISTS {S}.disposition (
    feed TEXT NOT NULL,
    source_file TEXT NOT NULL,
    source_line BIGINT NOT NULL,
    record_set TEXT NOT NULL,
    status VARCHAR(16) NOT NULL,
    rule VARCHAR(64) NOT NULL
)
"""


# The keys of `src` that repeat, and one NULL when a row has none, grouped as text
# (PostgreSQL, or a subquery). Over a DuckDB table see `find_repeated_by_hash`.
_REPEATED_KEYS = """
    CREATE TABLE {S}.{t} AS SELECT {key} AS repeated_key FROM {src} x
    GROUP BY {key} HAVING count(*) > 1 OR {key} IS NULL
"""
# ... and over a DuckDB table: only the keys whose hash repeats (`{hashes}`, a registered
# Arrow table; on most nights none) are grouped as text
_REPEATED_BY_HASH = """
    CREATE TABLE {S}.{t} AS
    SELECT {key} AS repeated_key FROM {src} x
    WHERE {key} IS NOT NULL AND hash({key}) IN (SELECT h FROM {hashes})
    GROUP BY {key} HAVING count(*) > 1
    UNION ALL
    SELECT NULL FROM (SELECT 1 FROM {src} x WHERE {key} IS NULL LIMIT 1) n
"""
_KEYLESS_ONLY = """
    CREATE TABLE {S}.{t} AS SELECT {key} AS repeated_key FROM {src} x WHERE {key} IS NULL LIMIT 1
"""


def repeated_hashes(con: duckdb.DuckDBPyConnection, src: str, key: str) -> pa.Table:
    """The 64-bit DuckDB hashes (column `h`) that more than one non-NULL `key` of `src`
    has, each once: every key's hash fetched as Arrow and sorted by numpy, neighbours
    compared. At a million patients (93.9 M event keys) 5.9 s and 8.6 CPU s, where
    DuckDB's grouping of the hashes took 13.6 s and 25.7 CPU s: a hash table of 94 M
    groups against one radix sort of 750 MB. Each key is only hashed, never sorted."""
    fetched = con.sql(f"SELECT hash({key}) AS h FROM {src} x WHERE {key} IS NOT NULL")
    table = fetched.to_arrow_table()
    hashes = table.column("h").to_numpy()  # one array: the chunks joined
    if not hashes.flags.writeable:  # one chunk: Arrow's own buffer
        hashes = hashes.copy()
    del table
    hashes.sort()
    repeats = np.unique(hashes[1:][hashes[1:] == hashes[:-1]])
    return pa.table({"h": pa.array(repeats, pa.uint64())})


def find_repeated_by_hash(
    con: duckdb.DuckDBPyConnection, table: str, src: str, key: str, schema: str
) -> None:
    """Create `schema`.`table` (repeated_key): the keys of `src` (a DuckDB table or view)
    that repeat, and one NULL when a row has none, as `_REPEATED_KEYS` gives them. The
    hashes that repeat are found first (`repeated_hashes`); only the keys with one of
    them (on most nights none: then the keys are not read again) are grouped as text."""
    hashes = repeated_hashes(con, src, key)
    fill = {"S": schema, "t": table, "key": key, "src": src}
    if not hashes.num_rows:
        con.execute(_KEYLESS_ONLY.format(**fill))
        return
    name = f"_omop_etl_repeated_{table}"
    con.register(name, hashes)
    try:
        con.execute(_REPEATED_BY_HASH.format(hashes=name, **fill))
    finally:
        con.unregister(name)


def _key_ranked(
    s: Schemas, conn: sa.Connection, src: str, key: str, name: str, *, repeats_in: str | None = None
) -> str:
    """SQL of every row of `src` (a table or a subquery) with `key_rank`: its place among
    the rows of its `key` in file order (source_file, source_line), 1 for a key that does
    not repeat.

    `repeats_in`: a table holding every row of `src` and maybe more (the subquery's own
    table), where the repeated keys are looked for instead: a key that repeats in `src`
    repeats there, and one that repeats only there is ranked by the window all the same,
    which gives its only row rank 1. The same ranks, with the keys found over a table by
    their hashes first and without evaluating the subquery (the kept events at a million
    patients: 94 M keys grouped as text after the person rule's join, 29 s).

    Only the keys that repeat (stage table `<name>_repeated`, usually few) are ranked by a
    window: ranking every row would sort the whole, wide table, which at a million
    patients spilled over 100 M event rows to disk; a unique key is only hashed. Rows
    without a key rank among themselves, as one partition, as a window over all would.
    Those rows are ranked once, here, into stage table `<name>_repeats`, which the SQL
    returned reads: each reader of the SQL then scans `src` once instead of once more
    for them (the kept events, read by the imaging visits and the events steps: at a
    million patients 74,074 rows, whose second scan of the landed events took 8.4 and
    5.9 CPU seconds in those steps).

    The table also gets one row with a NULL key when some row has no key (equality
    joins never match it). When it is empty, as on most nights, every rank is 1 and the
    SQL reads `src` once without its key: the claim lines' 32-character keys are then
    read only by the GROUP BY."""
    repeated = f"{name}_repeated"
    s.run(conn, "DROP TABLE IF EXISTS {S}.{t}", t=repeated)
    looked_in = repeats_in or src
    # a subquery would be evaluated twice: grouped as text once
    if s.wh.dialect == "duckdb" and not looked_in.lstrip().startswith("("):
        raw = conn.connection.driver_connection
        find_repeated_by_hash(raw, repeated, s.sql(looked_in), key, s.sql("{S}"))
    else:
        s.run(conn, _REPEATED_KEYS, t=repeated, key=key, src=s.sql(looked_in))
    found, has_keyless = s.run(
        conn,
        "SELECT count(*), count(*) FILTER (WHERE repeated_key IS NULL) FROM {S}.{t}",
        t=repeated,
    ).one()
    if not found:
        return s.sql("(SELECT t.*, CAST(1 AS BIGINT) AS key_rank FROM {src} t)", src=s.sql(src))
    # the feed last: a total order, so the ranks are the same whoever computes them
    order = "ORDER BY t.source_file, t.source_line, t.feed"
    keyless = f"""
        UNION ALL
        SELECT t.*, row_number() OVER ({order}) AS key_rank
        FROM {{src}} t WHERE t.{key} IS NULL"""
    ranked_rows = f"{name}_repeats"
    s.run(conn, "DROP TABLE IF EXISTS {S}.{t}", t=ranked_rows)
    s.run(
        conn,
        f"""
        CREATE TABLE {{S}}.{ranked_rows} AS
        SELECT t.*, row_number() OVER (PARTITION BY t.{key} {order}) AS key_rank
        FROM {{src}} t JOIN {{S}}.{repeated} r ON r.repeated_key = t.{key}
        {keyless if has_keyless else ""}
        """,
        src=s.sql(src),
    )
    return s.sql(
        f"""(
        SELECT t.*, CAST(1 AS BIGINT) AS key_rank FROM {{src}} t
        LEFT JOIN {{S}}.{repeated} r ON r.repeated_key = t.{key}
        WHERE r.repeated_key IS NULL AND t.{key} IS NOT NULL
        UNION ALL
        SELECT * FROM {{S}}.{ranked_rows}
    )""",
        src=s.sql(src),
    )


def _first_per_key(
    s: Schemas, conn: sa.Connection, src: str, key: str, ok: str, rs: str, *, view: bool = False
) -> None:
    """`ok`: the first record of each `key` of `src` in file order; the others go to
    disposition as duplicate_key. With `view`, `ok` is a view, not a copy: for a table
    that only the next rule reads (visits: 22 M rows at a million patients, copied in 12 s
    before the person rule copied them again)."""
    ranked = _key_ranked(s, conn, "{S}." + src, key, ok)
    kind = "VIEW" if view else "TABLE"  # in the text: PostgreSQL's stage tables are UNLOGGED
    s.run(conn, f"CREATE {kind} {{S}}.{{ok}} AS SELECT * FROM {{ranked}} x WHERE key_rank = 1",
          ok=ok, ranked=ranked)  # fmt: skip
    s.run(
        conn,
        """
        INSERT INTO {S}.disposition
        SELECT feed, source_file, source_line, {rs}, 'quarantined', 'duplicate_key'
        FROM {ranked} x WHERE key_rank > 1
        """,
        rs=rs,
        ranked=ranked,
    )


# The person-level rule a record `t` breaks (NULL: none), its person `p` joined.
_PERSON_RULE = f"""CASE
        WHEN p.person_key IS NULL THEN 'unknown_person'
        WHEN CAST(t.start_datetime AS DATE) < CAST(p.birth_datetime AS DATE)
            THEN 'event_before_birth'
        WHEN p.death_datetime IS NOT NULL
             AND CAST(t.start_datetime AS DATE)
                 > CAST(p.death_datetime AS DATE) + {DEATH_ALLOWANCE_DAYS}
            THEN 'event_after_death'
    END"""


def _checked(
    s: Schemas, conn: sa.Connection, src: str, set_aside: str, record_set: str, key: str
) -> str:
    """Apply the person-level rules to `src` (a table with person_key, start_datetime).

    Only the records a rule sets aside are written: to `set_aside` (file, line, record
    set, rule, and as `record_key` their source `key`, e.g. event_key, which the imaging
    step looks its studies up by) and to disposition. Returns the SQL of the kept records, with
    the same join, for the caller to read: copying the whole table with a rule column
    that is nearly always NULL cost more than evaluating the join again (at a million
    patients, 100 M event rows written once more)."""
    joined = "{S}.{src} t LEFT JOIN {S}.person_ok p ON p.person_key = t.person_key"
    s.run(
        conn,
        f"""
        CREATE TABLE {{S}}.{{out}} AS
        SELECT * FROM (
            SELECT t.feed, t.source_file, t.source_line, {{rs}} AS record_set,
                   t.{{key}} AS record_key, {_PERSON_RULE} AS rule
            FROM {joined}
        ) x WHERE rule IS NOT NULL
        """,
        out=set_aside,
        src=src,
        rs=record_set,
        key=key,
    )
    s.run(
        conn,
        """
        INSERT INTO {S}.disposition
        SELECT feed, source_file, source_line, record_set,
               CASE WHEN rule = 'unknown_person' THEN 'quarantined' ELSE 'filtered' END, rule
        FROM {S}.{out}
        """,
        out=set_aside,
    )
    return s.sql(f"(SELECT t.* FROM {joined} WHERE ({_PERSON_RULE}) IS NULL)", src=src)


def apply_rules(s: Schemas, conn: sa.Connection) -> None:
    """Create person_ok, visit_ok, event_ok, care_site_ok, provider_ok and disposition."""
    s.run(conn, DISPOSITION_DDL)
    _first_per_key(s, conn, "src_person", "person_key", "person_ok", "'persons'")
    _add_derived_persons(s, conn)
    _first_per_key(s, conn, "src_care_site", "care_site_key", "care_site_ok", "'care_sites'")
    _first_per_key(s, conn, "src_provider", "provider_key", "provider_ok", "'providers'")
    _first_per_key(s, conn, "src_visit", "visit_key", "visit_unique", "'visits'", view=True)
    kept = _checked(s, conn, "visit_unique", "visit_set_aside", "'visits'", "visit_key")
    create_table_as(s, conn, "visit_ok", "SELECT * FROM {kept} x", kept=kept,
                    uncompressed=("visit_key",))  # fmt: skip
    kept = _checked(s, conn, "src_event", "event_set_aside", "t.record_set", "event_key")
    # Records with the same natural key in one file are distinct records: number them in
    # file order so each keeps its own stable key.
    ranked = _key_ranked(s, conn, kept, "event_key", "event_ok", repeats_in="{S}.src_event")
    _event_view(s, conn, ranked)


EVENT_VISIT_DDL = "CREATE TABLE {S}.event_visit (event_key TEXT NOT NULL, visit_key TEXT NOT NULL)"


def _event_view(s: Schemas, conn: sa.Connection, ranked: str) -> None:
    """`event_ok`: the kept events, each with its `key_rank` and `record_key`, as a view.

    On DuckDB the ranked rows are not written at all: writing the 9.4 M rows of 100,000
    patients took it 12.5 s where computing them takes 1-1.6 s, so its readers (the events
    step, once, and the imaging step's look-up of its studies; a shard's or a scoped
    build's copy) compute them; every table they come from is final once the rules have
    run. PostgreSQL writes them (`event_kept`, unlogged): computing them twice cost it more
    than the write (10,000 patients: record rules 2.1 s shorter, events and imaging 4.4 s
    longer). `event_visit` (event_key -> visit_key, at most one row a key) gives a visit to
    events that have none (the imaging step's studies and findings): the view shows it, as
    an UPDATE of a table would."""
    s.run(conn, EVENT_VISIT_DDL)
    if s.wh.dialect == "postgresql":
        s.run(conn, "CREATE TABLE {S}.event_kept AS SELECT * FROM {ranked} e", ranked=ranked)
        ranked = s.sql("{S}.event_kept")
    columns = [
        "coalesce(e.visit_key, v.visit_key) AS visit_key" if c == "visit_key" else f"e.{c}"
        for c in canonical.EVENT.names
    ]
    s.run(
        conn,
        "CREATE VIEW {S}.event_ok AS SELECT {columns}, e.key_rank,"
        " e.event_key || '#' || CAST(e.key_rank AS VARCHAR) AS record_key"
        " FROM {ranked} e LEFT JOIN {S}.event_visit v ON v.event_key = e.event_key",
        columns=", ".join(columns),
        ranked=ranked,
    )


DERIVED_PERSON_RULE = "derived person"  # lineage mapping_rule of a person a feed inferred


def _add_derived_persons(s: Schemas, conn: sa.Connection) -> None:
    """Persons a feed inferred (e.g. from a lab result's PID) that no feed delivered.

    They are not input records of their own (the results they come from are), so no
    disposition is written for the copies that are not needed.
    """
    s.run(conn, "ALTER TABLE {S}.person_ok ADD COLUMN derived BOOLEAN DEFAULT FALSE")
    s.run(conn, "UPDATE {S}.person_ok SET derived = FALSE")
    columns = ", ".join(f"d.{c}" for c in canonical.PERSON.names)
    s.run(
        conn,
        """
        INSERT INTO {S}.person_ok
        SELECT {columns}, 0, TRUE FROM (
            SELECT t.*, row_number() OVER (
                       PARTITION BY t.person_key ORDER BY t.feed, t.source_file, t.source_line)
                   AS pick
            FROM {S}.src_derived_person t
            LEFT JOIN {S}.person_ok p ON p.person_key = t.person_key
            WHERE p.person_key IS NULL
        ) d WHERE d.pick = 1
        """,
        columns=columns,
    )


def apply_financial_rules(s: Schemas, conn: sa.Connection) -> None:
    """payer_plan_ok, claim_ok, cost_line_ok: coverage and claims of known people and visits.

    Look-ups are LEFT JOINs on unique keys, never correlated subqueries, so PostgreSQL
    plans them as hash joins (a correlated NOT EXISTS per row would be quadratic).
    """
    _set_aside(
        s,
        conn,
        "src_payer_plan",
        "payer_plan_ok",
        "payer_plans",
        "LEFT JOIN {S}.person_ok p ON p.person_key = t.person_key",
        "CASE WHEN p.person_key IS NULL THEN 'unknown_person' END",
        key="plan_key",
    )
    _set_aside(
        s,
        conn,
        "src_claim",
        "claim_ok",
        "claims",
        "LEFT JOIN {S}.person_ok p ON p.person_key = t.person_key"
        " LEFT JOIN {S}.visit_ok v ON v.visit_key = t.visit_key",
        "CASE WHEN p.person_key IS NULL THEN 'unknown_person'"
        " WHEN v.visit_key IS NULL THEN 'unknown_visit' END",
        key="claim_key",
    )
    _set_aside(
        s,
        conn,
        "src_cost_line",
        "cost_line_ok",
        "cost_lines",
        "LEFT JOIN {S}.claim_ok c ON c.claim_key = t.claim_key",
        "CASE WHEN c.claim_key IS NULL THEN 'unknown_claim' END",
        key="line_key",
        # a line's own key is read only to find duplicates: every later step reads its
        # claim, kind and amount; without the 32-character key the biggest table of an
        # EHR feed is written in half the time (19.4 M lines at 100,000 patients: 7.3-8.2
        # s -> 3.6-4.0 s)
        kept=[c for c in canonical.COST_LINE.names if c != "line_key"],
    )
    _set_aside(
        s, conn, "src_payer", "payer_ok", "payers",
        "LEFT JOIN (SELECT DISTINCT payer_key FROM {S}.payer_plan_ok) u"
        " ON u.payer_key = t.payer_key",
        "CASE WHEN u.payer_key IS NULL THEN 'reference_not_used' END",
        key="payer_key",
    )  # fmt: skip


def _set_aside(
    s: Schemas, conn: sa.Connection, src: str, ok: str, record_set: str, joins: str,
    rule_sql: str, *, key: str | None = None, kept: list[str] | None = None,
) -> None:  # fmt: skip
    """Split `src` into `ok` (rule is NULL) and disposition rows (quarantined or filtered).

    With `key`, a record whose key an earlier record (in file order) already has is
    quarantined as `duplicate_key` before any other rule, and only repeated keys are
    ranked (`_key_ranked`). The rule is evaluated twice, once for the kept records and
    once for those set aside, rather than written with a copy of the whole table: claim
    lines are the biggest table of an EHR feed, and writing it costs more than the join.
    `kept`: the columns `ok` keeps (default: all of `src`'s, and `key_rank` with `key`)."""
    source = s.sql("{S}.{src}", src=src)
    if key is not None:
        source = _key_ranked(s, conn, "{S}." + src, key, ok)
        rule_sql = f"CASE WHEN t.key_rank > 1 THEN 'duplicate_key' ELSE {rule_sql} END"
    rule, joins = s.sql(rule_sql), s.sql(joins)
    create_table_as(
        s,
        conn,
        ok,
        "SELECT {columns} FROM {source} t {joins} WHERE ({rule}) IS NULL",
        uncompressed=(key,) if key and (kept is None or key in kept) else (),
        columns=", ".join(f"t.{c}" for c in kept) if kept else "t.*",
        source=source,
        rule=rule,
        joins=joins,
    )
    statuses = " ".join(f"WHEN '{r}' THEN 'filtered'" for r in FILTER_RULES)
    s.run(
        conn,
        "INSERT INTO {S}.disposition SELECT feed, source_file, source_line, :rs,"
        " CASE rule {statuses} ELSE 'quarantined' END, rule"
        " FROM (SELECT t.feed, t.source_file, t.source_line, {rule} AS rule"
        " FROM {source} t {joins}) x WHERE rule IS NOT NULL",
        {"rs": record_set},
        statuses=statuses,
        source=source,
        rule=rule,
        joins=joins,
    )
