"""Stable ids (`assign_ids`), on both engines: a key the key map knows keeps its id, new
keys are numbered after the table's highest id in natural-key order, whatever order they
come in, and the carried columns and source rows stay with their keys. DuckDB numbers the
new keys by writing them sorted and drawing from a sequence, PostgreSQL by a window: the
same ids."""

from __future__ import annotations

import sqlalchemy as sa

from etl.cdm.build.common import assign_ids, key_map_ddl
from etl.pipeline.schemas import Schemas

# (key, carried value), out of natural-key order; 'k07' and 'k02' are known
KEYS = [("k09", 9), ("k02", 2), ("k11", None), ("k01", 1), ("k07", 7), ("k10", 10), (None, 0)]
KNOWN = {"k07": 3, "k02": 40}  # the table's highest id is 40: new ids start at 41


def _stage(s: Schemas, conn: sa.Connection) -> None:
    s.wh.create_schema(conn, s.stage)
    s.wh.create_schema(conn, s.etl)
    s.run(conn, key_map_ddl(s.wh.dialect))
    s.run(conn, "CREATE TABLE {S}.thing (thing_key TEXT, extra INTEGER)")
    conn.execute(
        sa.text(s.sql("INSERT INTO {S}.thing VALUES (:k, :x)")),
        [{"k": k, "x": x} for k, x in KEYS],
    )
    conn.execute(
        sa.text(s.sql("INSERT INTO {E}.key_map VALUES ('thing', :k, :i)")),
        [{"k": k, "i": i} for k, i in KNOWN.items()],
    )
    # another table's ids never count
    s.run(conn, "INSERT INTO {E}.key_map VALUES ('other', 'k01', 900)")


def test_new_keys_numbered_in_key_order_after_the_known(warehouse) -> None:
    wh, cdm = warehouse
    s = Schemas(wh, cdm)
    by_row = wh.dialect == "duckdb"
    with wh.begin() as conn:
        _stage(s, conn)
        ids = assign_ids(
            s,
            conn,
            "thing",
            "SELECT thing_key AS natural_key, extra"
            + (", rowid AS source_row" if by_row else "")
            + " FROM {S}.thing",
            source_row=by_row,
            carry=("extra",),
        )
        rows = conn.execute(
            sa.text(s.sql(f"SELECT natural_key, id, is_new, extra FROM {{S}}.{ids}"))
        ).all()
        if by_row:  # each key's source row is the row it came from
            linked = conn.execute(
                sa.text(
                    s.sql(
                        f"SELECT count(*) FROM {{S}}.{ids} i"
                        " JOIN {S}.thing t ON t.rowid = i.source_row"
                        " WHERE t.thing_key = i.natural_key"
                    )
                )
            ).scalar_one()
            assert linked == 6
    assert sorted(rows) == [
        ("k01", 41, True, 1),
        ("k02", 40, False, 2),
        ("k07", 3, False, 7),
        ("k09", 42, True, 9),
        ("k10", 43, True, 10),
        ("k11", 44, True, None),
    ]


def test_first_ids_start_at_one_without_a_window_on_duckdb(warehouse) -> None:
    """Nothing known for the table: the new keys get 1, 2, ... in key order; DuckDB's
    statements hold no window (the numbering is the sorted write's)."""
    wh, cdm = warehouse
    s = Schemas(wh, cdm)
    statements: list[str] = []
    sa.event.listen(wh.engine, "before_cursor_execute", lambda *a: statements.append(a[2]))
    with wh.begin() as conn:
        _stage(s, conn)
        s.run(conn, "DELETE FROM {E}.key_map WHERE cdm_table = 'thing'")
        keys = "SELECT DISTINCT thing_key AS natural_key FROM {S}.thing"
        ids = assign_ids(s, conn, "thing", keys)
        rows = conn.execute(sa.text(s.sql(f"SELECT natural_key, id, is_new FROM {{S}}.{ids}")))
        got = sorted(rows.all())
    assert got == [
        ("k01", 1, True), ("k02", 2, True), ("k07", 3, True),
        ("k09", 4, True), ("k10", 5, True), ("k11", 6, True),
    ]  # fmt: skip
    windows = [q for q in statements if "row_number()" in q]
    assert bool(windows) == (wh.dialect != "duckdb")


def test_a_later_night_keeps_every_key_of_a_million(duckdb_wh) -> None:
    """A night after the first, every key already known, at the size of a million
    patients' persons: each key keeps its id and its text. The DuckDB 2.0 statements of
    an earlier version (an empty write of the new keys, a column added, then the known
    keys inserted) kept the rows but lost the text of every key here, so nothing joined
    and the million-patient benchmark's second night built no rows."""
    wh, cdm = duckdb_wh
    s = Schemas(wh, cdm)
    n = 1_000_000
    with wh.begin() as conn:
        s.wh.create_schema(conn, s.stage)
        s.wh.create_schema(conn, s.etl)
        s.run(conn, key_map_ddl(s.wh.dialect))
        s.run(
            conn,
            "CREATE TABLE {S}.thing AS SELECT md5(CAST(i AS VARCHAR)) AS thing_key"
            f" FROM range({n}) r(i)",
        )
        s.run(
            conn,
            "INSERT INTO {E}.key_map SELECT 'thing', md5(CAST(i AS VARCHAR)),"
            f" CAST(i + 1 AS INTEGER) FROM range({n}) r(i)",
        )
    with wh.begin() as conn:
        ids = assign_ids(
            s,
            conn,
            "thing",
            "SELECT thing_key AS natural_key, rowid AS source_row FROM {S}.thing",
            source_row=True,
        )
        kept, known, joined = s.run(
            conn,
            f"SELECT count(i.natural_key), count(*) FILTER (WHERE NOT i.is_new),"
            f" count(*) FILTER (WHERE k.id = i.id) FROM {{S}}.{ids} i"
            " JOIN {S}.thing t ON t.rowid = i.source_row AND t.thing_key = i.natural_key"
            " LEFT JOIN {E}.key_map k ON k.cdm_table = 'thing' AND k.natural_key = i.natural_key",
        ).one()
    assert (kept, known, joined) == (n, n, n)
