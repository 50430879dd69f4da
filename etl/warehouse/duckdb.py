"""DuckDB warehouse: one file, zero set-up; Arrow data is inserted without conversion."""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import sqlalchemy as sa

from etl.sql_text import sql_literal
from etl.warehouse.base import Warehouse, _as_batches

MEMORY_LIMIT_ENV = "OMOP_ETL_DUCKDB_MEMORY_LIMIT"
THREADS_ENV = "OMOP_ETL_DUCKDB_THREADS"
TEMP_DIRECTORY_ENV = "OMOP_ETL_DUCKDB_TEMP_DIRECTORY"
# DuckDB settings a site may give (config `duckdb:`, carried in the URL's query string);
# each environment variable overrides its setting.
SETTINGS_ENV = {
    "threads": THREADS_ENV,
    "memory_limit": MEMORY_LIMIT_ENV,
    "temp_directory": TEMP_DIRECTORY_ENV,
}


def with_settings(url: str, settings: dict[str, object]) -> str:
    """`url` with the given DuckDB settings (None values skipped) in its query string."""
    given = {k: str(v) for k, v in settings.items() if v is not None}
    if not given:
        return url
    parsed = sa.engine.make_url(url)
    return parsed.update_query_dict(given).render_as_string(hide_password=False)


def connection_config(url: str) -> tuple[str, dict[str, str]]:
    """(url without the settings, DuckDB config): the URL's settings, then the env's."""
    parsed = sa.engine.make_url(url)
    config = {k: str(v) for k, v in parsed.query.items() if k in SETTINGS_ENV}
    for key, env in SETTINGS_ENV.items():
        if value := os.environ.get(env):
            config[key] = value  # e.g. memory_limit 4GB: DuckDB spills to disk beyond it
    bare = parsed.difference_update_query(list(SETTINGS_ENV))
    return bare.render_as_string(hide_password=False), config


class DuckDBWarehouse(Warehouse):
    dialect = "duckdb"
    default_schema = "main"

    @classmethod
    def from_url(cls, url: str) -> DuckDBWarehouse:
        """Open `url`; threads, memory_limit, temp_directory from its query or the env."""
        bare, config = connection_config(url)
        database = sa.engine.make_url(bare).database
        if database and database != ":memory:":
            Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        if temp := config.get("temp_directory"):
            Path(temp).expanduser().mkdir(parents=True, exist_ok=True)
        # One pooled connection: DuckDB is in-process, and one connection sees its own writes.
        engine = sa.create_engine(
            bare, poolclass=sa.pool.SingletonThreadPool, connect_args={"config": config}
        )
        return cls(url, engine)

    def bulk_insert(
        self,
        conn: sa.Connection,
        schema: str | None,
        table: str,
        batches: pa.Table | Iterable[pa.RecordBatch],
    ) -> int:
        raw = conn.connection.driver_connection
        target = self.qualified(schema, table)
        total = 0
        batch_iter = iter(_as_batches(batches))
        for n in itertools.count():
            chunk = list(itertools.islice(batch_iter, 8))
            if not chunk:
                break
            data = pa.Table.from_batches(chunk)
            if data.num_rows == 0:
                continue
            view = f"_omop_etl_bulk_{n}"
            raw.register(view, data)
            try:
                cols = ", ".join(self.quote(c) for c in data.column_names)
                raw.execute(f"INSERT INTO {target} ({cols}) SELECT {cols} FROM {view}")
            finally:
                raw.unregister(view)
            total += data.num_rows
        return total

    def load_parquet(
        self, conn: sa.Connection, schema: str | None, table: str, paths: list[Path]
    ) -> int:
        """DuckDB reads the Parquet files itself: parallel, streaming, no Python in between."""
        paths = [p for p in paths if pq.ParquetFile(p).metadata.num_rows]
        if not paths:
            return 0
        raw = conn.connection.driver_connection
        cols = ", ".join(self.quote(n) for n in pq.ParquetFile(paths[0]).schema_arrow.names)
        files = ", ".join(sql_literal(p) for p in paths)
        # rows may land in any order (every reader of a staged table orders what it needs):
        # DuckDB then inserts on all threads without reassembling the files' order (the
        # 10,000-patient events and cost lines: 3.1 s -> 2.5 s)
        raw.execute("SET preserve_insertion_order = false")
        try:
            raw.execute(
                f"INSERT INTO {self.qualified(schema, table)} ({cols})"
                f" SELECT {cols} FROM read_parquet([{files}])"
            )
        finally:
            raw.execute("RESET preserve_insertion_order")
        return sum(pq.ParquetFile(p).metadata.num_rows for p in paths)

    def view_parquet(
        self, conn: sa.Connection, schema: str | None, table: str, paths: list[Path]
    ) -> bool:
        """A view over the files, by absolute path: valid while they stay where they are."""
        if not paths:
            return False
        cols = ", ".join(self.quote(n) for n in pq.ParquetFile(paths[0]).schema_arrow.names)
        files = ", ".join(sql_literal(p.resolve()) for p in paths)
        conn.connection.driver_connection.execute(
            f"CREATE VIEW {self.qualified(schema, table)} AS"
            f" SELECT {cols} FROM read_parquet([{files}])"
        )
        return True

    def fetch_arrow(self, conn: sa.Connection, sql: str) -> pa.Table:
        return conn.connection.driver_connection.sql(sql).to_arrow_table()
