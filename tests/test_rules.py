"""The record rules' duplicate-key ranking, on both engines: the first record of a key in
file order is kept, every later one is quarantined as duplicate_key; only repeated keys
are ranked, and rows without a key rank among themselves."""

from __future__ import annotations

import sqlalchemy as sa

from etl.cdm.build.rules import DISPOSITION_DDL, _first_per_key
from etl.pipeline.schemas import Schemas

# (key, source_file, source_line): 'a' repeats across two files, out of line order
ROWS = [
    ("a", "f2.csv", 1),
    ("b", "f1.csv", 7),
    ("a", "f1.csv", 9),
    ("c", "f1.csv", 2),
    ("a", "f1.csv", 3),
    (None, "f1.csv", 5),
    (None, "f1.csv", 4),
]


def _stage_things(s: Schemas, conn: sa.Connection, rows: list[tuple]) -> None:
    """A stage with an empty disposition table and `src_thing` holding `rows`."""
    s.wh.create_schema(conn, s.stage)
    s.run(conn, DISPOSITION_DDL)
    s.run(
        conn,
        "CREATE TABLE {S}.src_thing (thing_key TEXT, feed TEXT, source_file TEXT,"
        " source_line BIGINT)",
    )
    conn.execute(
        sa.text(s.sql("INSERT INTO {S}.src_thing VALUES (:k, 'ehr', :f, :l)")),
        [{"k": key, "f": file, "l": line} for key, file, line in rows],
    )


def test_first_record_of_a_key_in_file_order_is_kept(warehouse) -> None:
    wh, cdm = warehouse
    s = Schemas(wh, cdm)
    with wh.begin() as conn:
        _stage_things(s, conn, ROWS)
        _first_per_key(s, conn, "src_thing", "thing_key", "thing_ok", "'things'")
        kept = conn.execute(
            sa.text(s.sql("SELECT thing_key, source_file, source_line, key_rank FROM {S}.thing_ok"))
        ).all()
        set_aside = conn.execute(
            sa.text(s.sql("SELECT source_file, source_line, record_set, status, rule"
                          " FROM {S}.disposition"))
        ).all()  # fmt: skip
        repeated = conn.execute(sa.text(s.sql("SELECT repeated_key FROM {S}.thing_ok_repeated")))
        repeated_keys = sorted(repeated, key=str)
    assert sorted(kept, key=str) == sorted(
        [("a", "f1.csv", 3, 1), ("b", "f1.csv", 7, 1), ("c", "f1.csv", 2, 1),
         (None, "f1.csv", 4, 1)],
        key=str,
    )  # fmt: skip
    assert sorted(set_aside) == [
        ("f1.csv", 5, "things", "quarantined", "duplicate_key"),
        ("f1.csv", 9, "things", "quarantined", "duplicate_key"),
        ("f2.csv", 1, "things", "quarantined", "duplicate_key"),
    ]
    # only the repeated key was ranked by the window; the rows without a key show as
    # one NULL row (equality joins never match it)
    assert [tuple(r) for r in repeated_keys] == [("a",), (None,)]


def test_unique_keys_rank_one_without_a_window(warehouse) -> None:
    """No key repeats and every row has one: every rank is 1, nothing is set aside, and
    the ranked SQL reads the table once, without a window."""
    from etl.cdm.build.rules import _key_ranked

    wh, cdm = warehouse
    s = Schemas(wh, cdm)
    unique = [("b", "f1.csv", 7), ("c", "f1.csv", 2), ("a", "f1.csv", 3)]
    with wh.begin() as conn:
        _stage_things(s, conn, unique)
        ranked = _key_ranked(s, conn, "{S}.src_thing", "thing_key", "thing_ok")
        assert "row_number" not in ranked
        ranks = conn.execute(sa.text(f"SELECT thing_key, key_rank FROM {ranked} x")).all()
        _first_per_key(s, conn, "src_thing", "thing_key", "thing_ok", "'things'")
        kept = conn.execute(sa.text(s.sql("SELECT count(*) FROM {S}.thing_ok"))).scalar_one()
        set_aside = conn.execute(
            sa.text(s.sql("SELECT count(*) FROM {S}.disposition"))
        ).scalar_one()
    assert sorted(ranks) == [("a", 1), ("b", 1), ("c", 1)]
    assert (kept, set_aside) == (3, 0)


def test_repeated_keys_by_hash_first_are_the_text_grouped_ones() -> None:
    """DuckDB finds the keys' repeated hashes before their text (over a table): the same
    repeated keys, and one NULL for keyless rows, one or many, as grouping the text
    gives, whether some hash repeats or none does."""
    import random
    from collections import Counter

    import duckdb
    import pyarrow as pa

    from etl.cdm.build.rules import _REPEATED_KEYS, find_repeated_by_hash, repeated_hashes

    rng = random.Random(7)
    pool = [None, *map(str, range(3000))]
    cases = {
        "one keyless row": [None, "a", "b", "a"],
        "no keyless row": ["x", "y", "z", "y", "y"],
        "none repeats": ["p", "q"],
        "none repeats, keyless rows": [None, "p", None, "q"],
        "keyless only": [None, None],
        "empty": [],
        "many": [rng.choice(pool) for _ in range(20_000)],
    }
    con = duckdb.connect()
    for name, keys in cases.items():
        con.register("given", pa.table({"k": pa.array(keys, pa.string())}))
        con.execute("CREATE OR REPLACE TABLE src AS SELECT k FROM given")
        found = []
        con.execute("DROP TABLE IF EXISTS r")
        con.execute(_REPEATED_KEYS.format(S="main", t="r", key="k", src="main.src"))
        found.append(sorted(con.execute("SELECT repeated_key FROM r").fetchall(), key=str))
        con.execute("DROP TABLE r")
        find_repeated_by_hash(con, "r", "main.src", "k", "main")
        found.append(sorted(con.execute("SELECT repeated_key FROM r").fetchall(), key=str))
        counts = Counter(keys)
        expected = sorted(
            [(k,) for k, n in counts.items() if k is not None and n > 1]
            + ([(None,)] if None in keys else []),
            key=str,
        )
        assert found == [expected, expected], name
        hashes = repeated_hashes(con, "main.src", "k").column("h").to_pylist()
        repeats = {k for k, n in counts.items() if k is not None and n > 1}
        assert len(hashes) == len(set(hashes)) >= len(repeats), name
        if repeats:
            looked_up = con.execute(
                "SELECT DISTINCT hash(k) FROM src WHERE k IN (SELECT unnest($1))", [sorted(repeats)]
            ).fetchall()
            assert {h for (h,) in looked_up} <= set(hashes), name


def _spy_on_hash_first(monkeypatch) -> list[str]:
    """The tables `find_repeated_by_hash` creates from now on (it runs on DuckDB's own
    connection, unseen by SQLAlchemy's events)."""
    from etl.cdm.build import rules

    created: list[str] = []
    original = rules.find_repeated_by_hash

    def spy(con, table, *args, **kwargs):  # type: ignore[no-untyped-def]
        created.append(table)
        return original(con, table, *args, **kwargs)

    monkeypatch.setattr(rules, "find_repeated_by_hash", spy)
    return created


def test_duckdb_finds_a_tables_repeated_keys_by_hash_first(warehouse, monkeypatch) -> None:
    """The record rules take the hash-first form on DuckDB over a table, the text-grouped
    one on PostgreSQL, with the same ranks either way."""
    from etl.cdm.build.rules import _key_ranked

    wh, cdm = warehouse
    s = Schemas(wh, cdm)
    by_hash = _spy_on_hash_first(monkeypatch)
    with wh.begin() as conn:
        _stage_things(s, conn, ROWS)
        ranked = _key_ranked(s, conn, "{S}.src_thing", "thing_key", "thing_ok")
        ranks = conn.execute(sa.text(f"SELECT source_line, key_rank FROM {ranked} x")).all()
    assert by_hash == (["thing_ok_repeated"] if wh.dialect == "duckdb" else [])
    assert sorted(ranks) == [(1, 3), (2, 1), (3, 1), (4, 1), (5, 2), (7, 1), (9, 2)]


def test_repeated_keys_looked_for_in_a_superset_give_the_same_ranks(warehouse, monkeypatch) -> None:
    """The kept events are ranked with their repeated keys found in the whole src_event
    table (`repeats_in`): a key repeated only among rows the subquery leaves out ('a' of
    f2.csv against f1.csv's) still ranks its one kept row 1, and the ranks equal those of
    looking in the subquery itself. The repeated keys are found by hash first on DuckDB."""
    from etl.cdm.build.rules import _key_ranked

    wh, cdm = warehouse
    s = Schemas(wh, cdm)
    rows = [*ROWS, ("b", "f2.csv", 2), ("d", "f1.csv", 11), ("d", "f1.csv", 10)]
    kept = "(SELECT t.* FROM {S}.src_thing t WHERE t.source_file = 'f1.csv')"
    by_hash = _spy_on_hash_first(monkeypatch)
    statements: list[str] = []
    sa.event.listen(wh.engine, "before_cursor_execute", lambda *a: statements.append(a[2]))
    with wh.begin() as conn:
        _stage_things(s, conn, rows)
        ranks = {}
        for label, superset in (("itself", None), ("superset", "{S}.src_thing")):
            ranked = _key_ranked(s, conn, s.sql(kept), "thing_key", f"t_{label}",
                                 repeats_in=superset)  # fmt: skip
            ranks[label] = sorted(
                conn.execute(sa.text(f"SELECT source_line, key_rank FROM {ranked} x")).all()
            )
        repeated = conn.execute(sa.text(s.sql("SELECT repeated_key FROM {S}.t_superset_repeated")))
        repeated_keys = sorted((r[0] for r in repeated), key=str)
    # f1.csv: a at 3 and 9, b at 7 (its twin is in f2.csv), c at 2, d at 10 and 11, and
    # two keyless rows at 4 and 5
    expected = [(2, 1), (3, 1), (4, 1), (5, 2), (7, 1), (9, 2), (10, 1), (11, 2)]
    assert ranks == {"itself": expected, "superset": expected}
    assert repeated_keys == [None, "a", "b", "d"]  # b repeats only across the files
    # the superset, a table, is looked in by hash first on DuckDB; the subquery as text
    assert by_hash == (["t_superset_repeated"] if wh.dialect == "duckdb" else [])
    grouped = [q for q in statements if "_repeated AS" in q]
    assert len(grouped) == (1 if wh.dialect == "duckdb" else 2)
