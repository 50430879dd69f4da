"""Columns of random digests (pseudonyms, natural keys made of them) are stored
uncompressed on DuckDB, where its string compression costs three times their write; the
tables hold the same rows either way, and PostgreSQL's stage tables stay UNLOGGED."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal
from pathlib import Path

import pytest
import sqlalchemy as sa

from etl.cdm.build import events
from etl.cdm.build.common import create_table_as
from etl.pipeline.schemas import Schemas
from etl.pseudonym import pseudonym
from etl.warehouse import open_warehouse
from tests.conftest import DEMO_SYNTHEA
from tests.pipeline_helpers import run, write_config

KEYS = [pseudonym(b"a test key of 32 characters long", str(i)) for i in range(50)]


def _ddl(conn: sa.Connection, schema: str, table: str) -> str:
    return conn.execute(
        sa.text("SELECT sql FROM duckdb_tables() WHERE schema_name = :s AND table_name = :t"),
        {"s": schema, "t": table},
    ).scalar_one()


def test_create_table_as_keeps_rows_and_types_and_stores_digests_uncompressed(
    warehouse,
) -> None:
    wh, cdm = warehouse
    s = Schemas(wh, cdm)
    with wh.begin() as conn:
        wh.create_schema(conn, s.stage)
        s.run(
            conn,
            "CREATE TABLE {S}.src (k TEXT, kind TEXT, n INTEGER, started TIMESTAMP,"
            " amount DECIMAL(18, 3))",
        )
        start = dt.datetime(2020, 1, 1)
        rows_in = [
            {"k": k, "kind": "ab"[i % 2], "n": i, "started": start + dt.timedelta(hours=i),
             "amount": Decimal(i) / 8}
            for i, k in enumerate(KEYS)
        ]  # fmt: skip
        conn.execute(
            sa.text(s.sql("INSERT INTO {S}.src VALUES (:k, :kind, :n, :started, :amount)")), rows_in
        )
        select = "SELECT k, kind, n, started, amount FROM {S}.src WHERE kind = :kind"
        create_table_as(s, conn, "plain", select, {"kind": "a"})
        create_table_as(s, conn, "digests", select, {"kind": "a"}, uncompressed=("k",))
        rows = {
            t: conn.execute(sa.text(s.sql(f"SELECT * FROM {{S}}.{t} ORDER BY n"))).all()
            for t in ("plain", "digests")
        }
        if wh.dialect == "duckdb":
            plain, digests = (_ddl(conn, s.stage, t) for t in ("plain", "digests"))
            kinds = conn.execute(
                sa.text(
                    "SELECT column_name, data_type FROM duckdb_columns()"
                    " WHERE schema_name = :s AND table_name = 'digests' ORDER BY column_index"
                ),
                {"s": s.stage},
            ).all()
        else:
            persistence = conn.execute(
                sa.text(
                    "SELECT c.relname, c.relpersistence FROM pg_class c"
                    " JOIN pg_namespace n ON n.oid = c.relnamespace"
                    " WHERE n.nspname = :s AND c.relname IN ('plain', 'digests')"
                ),
                {"s": s.stage},
            ).all()
    assert rows["digests"] == rows["plain"]
    assert [r[0] for r in rows["digests"]] == KEYS[::2]
    assert rows["digests"][1][1:] == ("a", 2, dt.datetime(2020, 1, 1, 2), Decimal("0.250"))
    if wh.dialect == "duckdb":
        assert "USING COMPRESSION" not in plain
        assert "k VARCHAR USING COMPRESSION Uncompressed" in digests
        assert digests.count("USING COMPRESSION") == 1  # the digest column only
        assert kinds == [("k", "VARCHAR"), ("kind", "VARCHAR"), ("n", "INTEGER"),
                         ("started", "TIMESTAMP"), ("amount", "DECIMAL(18,3)")]  # fmt: skip
    else:  # a plain CREATE TABLE AS, unlogged like every stage table
        assert sorted(persistence) == [("digests", "u"), ("plain", "u")]


def test_duckdb_build_stores_its_digest_columns_uncompressed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The demo's DuckDB stage, as the gate finds it: the records' own keys, the events'
    record keys and every natural key are stored uncompressed, other text is not. Each
    event table's ids carried their rows' rowids while the events step joined them back."""
    wh = open_warehouse(f"duckdb:///{tmp_path / 'warehouse.duckdb'}")
    found: dict[str, str] = {}
    storage: set[tuple[str, str]] = set()
    linked: dict[str, str] = {}  # ids table -> its DDL just before the rowids are dropped
    forget = events.forget_source_rows

    def spy(s: Schemas, conn: sa.Connection, ids_table: str) -> None:
        linked[ids_table] = _ddl(conn, s.stage, ids_table)
        forget(s, conn, ids_table)

    monkeypatch.setattr(events, "forget_source_rows", spy)

    def inspect(step: str) -> None:
        if step != "gate":
            return
        with wh.begin() as conn:
            for table in ("src_person", "src_claim", "event_mapped", "ids_condition_occurrence",
                          "visit_ok", "claim_ok", "cost_line_ok", "claim_totals"):  # fmt: skip
                found[table] = _ddl(conn, "main_stage", table)
        with wh.engine.connect() as conn:
            conn.execute(sa.text("CHECKPOINT"))
            storage.update(
                conn.execute(
                    sa.text(
                        "SELECT DISTINCT column_name, compression FROM"
                        " pragma_storage_info('main_stage.event_mapped')"
                        " WHERE column_name IN ('record_key', 'code') AND segment_type = 'VARCHAR'"
                    )
                ).all()
            )

    result = run(write_config(tmp_path, wh, "main", DEMO_SYNTHEA), tmp_path, on_step=inspect)
    with wh.engine.connect() as conn:  # the key map, once the run's new keys joined it
        key_map = _ddl(conn, "main_etl", "key_map")
        conn.execute(sa.text("CHECKPOINT"))
        key_storage = conn.execute(
            sa.text(
                "SELECT DISTINCT column_name, compression FROM pragma_storage_info("
                "'main_etl.key_map') WHERE segment_type = 'VARCHAR'"
            )
        ).all()
        keys, events_keyed = conn.execute(
            sa.text(
                "SELECT count(*), count(*) FILTER (WHERE cdm_table = 'condition_occurrence')"
                " FROM main_etl.key_map"
            )
        ).one()
        conditions = conn.execute(sa.text("SELECT count(*) FROM main.condition_occurrence"))
        conditions = conditions.scalar_one()
    wh.close()
    assert result.status == "published", result.report["errors"]
    uncompressed = {
        "src_person": "person_key",
        "src_claim": "claim_key",
        "event_mapped": "record_key",
        "ids_condition_occurrence": "natural_key",
        "visit_ok": "visit_key",
        "claim_ok": "claim_key",
        "claim_totals": "claim_key",
    }
    for table, column in uncompressed.items():
        assert f"{column} VARCHAR USING COMPRESSION Uncompressed" in found[table], table
        assert found[table].count("USING COMPRESSION") == 1, table
    # the rowids an event table's ids were joined back on are gone once its rows are in
    assert "source_row" not in found["ids_condition_occurrence"]
    assert set(linked) == {f"ids_{t}" for t in events.TABLE_COLUMNS}
    assert all("source_row BIGINT" in ddl for ddl in linked.values()), linked
    # a claim line's own key is not kept past the rules: that table is written as before
    assert "USING COMPRESSION" not in found["cost_line_ok"]
    assert ("record_key", "Uncompressed") in storage
    assert ("code", "Uncompressed") not in storage
    # the key map's natural keys too; its table names compress as before
    assert "natural_key VARCHAR USING COMPRESSION Uncompressed NOT NULL" in key_map, key_map
    assert key_map.count("USING COMPRESSION") == 1
    assert ("natural_key", "Uncompressed") in key_storage
    assert ("cdm_table", "Uncompressed") not in key_storage
    assert events_keyed == conditions > 0 and keys > conditions
