"""Shared building blocks: stable ids from the key map, spec-typed inserts, lineage."""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa

from etl.cdm.spec import cdm_tables
from etl.pipeline.schemas import Schemas

KEY_MAP_DDL = """
CREATE TABLE IF NOT EXISTS {E}.key_map (
    cdm_table VARCHAR(64) NOT NULL,
    natural_key VARCHAR(200) NOT NULL{natural_key_storage},
    id INTEGER NOT NULL
)
"""
# No primary key: new keys are inserted only when absent (by construction), and a key
# constraint would cost 4x the insert time and memory on DuckDB. PostgreSQL gets an index
# for the look-ups.
KEY_MAP_INDEX = "CREATE INDEX IF NOT EXISTS {n} ON {E}.key_map (cdm_table, natural_key)"

# The stage lineage's own columns (DuckDB's main stage adds run_id after them)
LINEAGE_COLUMNS = [
    "cdm_table", "cdm_id", "feed", "source_file", "source_line",
    "source_vocabulary", "source_code", "mapping_rule",
]  # fmt: skip

LINEAGE_DDL = """
CREATE TABLE {SL} (
    cdm_table VARCHAR(64) NOT NULL,
    cdm_id INTEGER NOT NULL,
    feed TEXT NOT NULL,
    source_file TEXT NOT NULL,
    source_line BIGINT NOT NULL,
    source_vocabulary TEXT,
    source_code TEXT,
    mapping_rule TEXT
)
"""


# DuckDB: a column of random digests (a pseudonym, a natural key made of one) is stored
# uncompressed. Hex digits of a 128-bit HMAC barely compress, and DuckDB's string
# compression (dict_fsst) spent three times the write of the raw column on them: the
# 9.4 M event keys of 100,000 patients took 3.1 s to write compressed, 0.9 s not.
UNCOMPRESSED = "USING COMPRESSION uncompressed"


def key_map_ddl(dialect: str) -> str:
    """The key map's DDL (`{E}` unfilled). On DuckDB its natural keys, digests, are stored
    uncompressed (`UNCOMPRESSED`): the first night's insert of 20 M keys took 15.0 s
    compressed (dict_fsst), 7.5 s not, for a half again larger column. A warehouse keeps
    the storage its key map was created with."""
    storage = f" {UNCOMPRESSED}" if dialect == "duckdb" else ""
    return KEY_MAP_DDL.replace("{natural_key_storage}", storage)


def create_table_as(
    s: Schemas,
    conn: sa.Connection,
    table: str,
    select_sql: str,
    params: dict | None = None,
    *,
    uncompressed: tuple[str, ...] = (),
    **extra: str,
) -> None:
    """CREATE TABLE {S}.<table> AS <select_sql>, with the columns named in
    `uncompressed` (random digests) stored uncompressed on DuckDB (`UNCOMPRESSED`).

    On DuckDB the table is declared from the query's own column types (DESCRIBE, which
    runs nothing) and then filled; on PostgreSQL it is a plain CREATE TABLE AS."""
    if s.wh.dialect != "duckdb" or not uncompressed:
        s.run(conn, f"CREATE TABLE {{S}}.{table} AS {select_sql}", params, **extra)
        return
    select = s.sql(select_sql, **extra)
    described = conn.execute(sa.text(f"DESCRIBE {select}"), params or {}).all()
    q = s.wh.quote
    columns = ", ".join(
        f"{q(name)} {kind}" + (f" {UNCOMPRESSED}" if name in uncompressed else "")
        for name, kind, *_ in described
    )
    s.run(conn, f"CREATE TABLE {{S}}.{table} ({columns})")
    conn.execute(sa.text(s.sql(f"INSERT INTO {{S}}.{table} ") + select), params or {})


def assign_ids(
    s: Schemas,
    conn: sa.Connection,
    cdm_table: str,
    natural_keys_sql: str,
    *,
    source_row: bool = False,
    carry: Sequence[str] = (),
) -> str:
    """Map every natural key `natural_keys_sql` yields to a stable integer id.

    Known keys keep their id from the persistent key map; new keys get the next ids in
    natural-key order (deterministic, so two engines given the same input agree).
    Creates and returns the stage table `ids_<cdm_table>` (natural_key, id, is_new, by
    name: DuckDB's has id last); the new keys join the key map only when the run
    publishes.

    `source_row`: the query also yields `source_row`, the DuckDB rowid of the row each key
    comes from (one key per row), and the ids table keeps it after `is_new`, so the
    caller joins its rows back on an integer instead of rebuilding and hashing the key
    text. A rowid holds only within the transaction that read it: join back in the same
    transaction, then `forget_source_rows`.

    `carry`: more columns the query yields, one value per key, kept after `is_new` for the
    steps that look the ids up (a visit's provider, which its events take when they name
    none, saves them a join of the visits).
    """
    target = f"ids_{cdm_table}"
    s.run(conn, "DROP TABLE IF EXISTS {S}.{target}", target=target)
    row = "".join(f", {c}" for c in [*carry, *(["source_row"] if source_row else [])])
    keys = dict(
        keys=s.sql(natural_keys_sql),
        row=row,
        distinct="" if source_row else "DISTINCT",  # a row gives one key
    )
    if s.wh.dialect == "duckdb":
        _assign_ids_in_order(s, conn, cdm_table, target, keys)
        return target
    create_table_as(
        s,
        conn,
        target,
        f"""
        WITH {_KEYS},
        known AS (
            SELECT n.natural_key, k.id{{row}} FROM n
            JOIN {{E}}.key_map k ON k.cdm_table = :t AND k.natural_key = n.natural_key
        ),
        fresh AS ({_FRESH}),
        base AS (SELECT coalesce(max(id), 0) AS top FROM {{E}}.key_map WHERE cdm_table = :t)
        SELECT natural_key, id, FALSE AS is_new{{row}} FROM known
        UNION ALL
        SELECT f.natural_key,
               CAST(b.top + row_number() OVER (ORDER BY f.natural_key) AS INTEGER), TRUE{{row}}
        FROM fresh f CROSS JOIN base b
        """,
        {"t": cdm_table},
        uncompressed=("natural_key",),
        **keys,
    )
    return target


# the keys of `assign_ids`' query, one row each, and those the key map does not know
_KEYS = """n AS (
    SELECT {distinct} natural_key{row} FROM ({keys}) q WHERE natural_key IS NOT NULL
)"""
_FRESH = """
    SELECT n.natural_key{row} FROM n
    WHERE NOT EXISTS (
        SELECT 1 FROM {E}.key_map k WHERE k.cdm_table = :t AND k.natural_key = n.natural_key
    )"""


def _assign_ids_in_order(
    s: Schemas, conn: sa.Connection, cdm_table: str, target: str, keys: dict[str, str]
) -> None:
    """DuckDB: `assign_ids`' table, the new keys numbered in natural-key order.

    A first night (the key map knows no key of the table): the keys are written in
    natural-key order (ORDER BY) and numbered after, in that order, by an added column
    whose default draws from a sequence. The same ids as a row_number() window over the
    keys, which DuckDB computes over one partition, mostly on one core: for observation's
    29.3 M keys at a million patients the window took 26 s and 31-35 CPU s, the sorted
    write 11-13 s and the numbering 2 s.

    A later night: `_look_up_then_number`."""
    params = {"t": cdm_table}
    top = s.run(
        conn, "SELECT coalesce(max(id), 0) FROM {E}.key_map WHERE cdm_table = :t", params
    ).scalar_one()
    if top:
        _look_up_then_number(s, conn, target, keys, params, int(top))
        return
    create_table_as(
        s,
        conn,
        target,
        f"WITH {_KEYS} SELECT n.natural_key, TRUE AS is_new{{row}} FROM n ORDER BY n.natural_key",
        params,
        uncompressed=("natural_key",),
        **keys,
    )
    sequence = f"{target}_next"
    s.run(conn, "DROP SEQUENCE IF EXISTS {S}.{q}", q=sequence)
    s.run(conn, f"CREATE SEQUENCE {{S}}.{sequence} START 1")
    # the column is filled row by row in the table's order: the keys' order
    s.run(
        conn,
        f"ALTER TABLE {{S}}.{target} ADD COLUMN id INTEGER"
        f" DEFAULT nextval('{s.sql('{S}')}.{sequence}')",
    )
    s.run(conn, f"ALTER TABLE {{S}}.{target} ALTER COLUMN id DROP DEFAULT")
    s.run(conn, "DROP SEQUENCE {S}.{q}", q=sequence)


def _look_up_then_number(
    s: Schemas,
    conn: sa.Connection,
    target: str,
    keys: dict[str, str],
    params: dict[str, str],
    top: int,
) -> None:
    """DuckDB, a night after the first: every key looked up in the key map once (a LEFT
    JOIN) and written with its id, or none when it is new; then the new keys, usually
    few, numbered after `top` (the key map's highest id for the table) in natural-key
    order, by an UPDATE from a row_number() window over them alone. The same ids as
    numbering the new keys found by NOT EXISTS and joining the known ones apart, which
    read the keys and the key map twice."""
    create_table_as(
        s,
        conn,
        target,
        f"WITH {_KEYS} SELECT n.natural_key, k.id IS NULL AS is_new{{row}}, k.id FROM n"
        " LEFT JOIN {E}.key_map k ON k.cdm_table = :t AND k.natural_key = n.natural_key",
        params,
        uncompressed=("natural_key",),
        **keys,
    )
    s.run(
        conn,
        f"""
        UPDATE {{S}}.{target} AS i SET id = x.id FROM (
            SELECT rowid AS r,
                   CAST({top} + row_number() OVER (ORDER BY natural_key) AS INTEGER) AS id
            FROM {{S}}.{target} WHERE is_new
        ) x
        WHERE i.rowid = x.r
        """,
    )


def forget_source_rows(s: Schemas, conn: sa.Connection, ids_table: str) -> None:
    """Drop the `source_row` column `assign_ids(..., source_row=True)` gave `ids_table`:
    rowids mean nothing outside the transaction that read them."""
    s.run(conn, "ALTER TABLE {S}.{ids} DROP COLUMN source_row", ids=ids_table)


def insert_rows(
    s: Schemas, conn: sa.Connection, table: str, columns: dict[str, str], from_sql: str
) -> int:
    """INSERT INTO the build's `table` (`Schemas.built`) the `columns` (CDM column -> SQL
    expression) of `from_sql`.

    Text is cut to the specification's varchar length so a long source value cannot
    fail the load on PostgreSQL; columns not given are NULL.
    """
    spec = cdm_tables()[table]
    exprs = []
    for name, expr in columns.items():
        length = spec.field(name).varchar_length
        exprs.append(f"substr(CAST({expr} AS VARCHAR), 1, {length})" if length else expr)
    cols = ", ".join(columns)
    result = s.run(
        conn,
        "INSERT INTO {table} ({cols}) SELECT {exprs} {from_sql}",
        table=s.built(table),
        cols=cols,
        exprs=", ".join(exprs),
        from_sql=s.sql(from_sql),
    )
    return result.rowcount


def add_lineage(s: Schemas, conn: sa.Connection, cdm_table: str, select_sql: str) -> None:
    """Record where rows of `cdm_table` came from.

    `select_sql` yields `LINEAGE_COLUMNS` after cdm_table: (cdm_id, feed, source_file,
    source_line, source_vocabulary, source_code, mapping_rule).
    """
    s.run(
        conn,
        "INSERT INTO {SL} ({columns}) SELECT :t, q.* FROM ({q}) q",
        {"t": cdm_table},
        columns=", ".join(LINEAGE_COLUMNS),
        q=s.sql(select_sql),
    )
