"""The warehouse interface: a SQLAlchemy engine plus each engine's native bulk path."""

from __future__ import annotations

import logging
import os
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import sqlalchemy as sa

log = logging.getLogger(__name__)

WAREHOUSE_ENV = "OMOP_ETL_WAREHOUSE"


class Warehouse(ABC):
    """A CDM warehouse: connections, schema management and bulk Arrow loading."""

    dialect: str
    default_schema: str

    def __init__(self, url: str, engine: sa.Engine) -> None:
        self.url = url
        self.engine = engine

    # -- connections -------------------------------------------------------------------
    @contextmanager
    def begin(self) -> Iterator[sa.Connection]:
        """A connection inside one transaction: committed on success, rolled back on error."""
        with self.engine.begin() as conn:
            yield conn

    @contextmanager
    def begin_checks(self) -> Iterator[sa.Connection]:
        """`begin` for the quality checks' statements (many small aggregates, batched into
        large UNION ALL statements), with `without_jit` for the whole transaction."""
        with self.begin() as conn, self.without_jit(conn):
            yield conn

    @contextmanager
    def without_jit(self, conn: sa.Connection) -> Iterator[None]:
        """The statements run inside, in `conn`'s transaction, without just-in-time
        compilation where the engine has it (PostgreSQL); a no-op elsewhere."""
        yield

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> Warehouse:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- names -------------------------------------------------------------------------
    def quote(self, ident: str) -> str:
        return self.engine.dialect.identifier_preparer.quote(ident)

    def qualified(self, schema: str | None, table: str) -> str:
        schema = schema or self.default_schema
        return f"{self.quote(schema)}.{self.quote(table)}"

    # -- schemas -----------------------------------------------------------------------
    def create_schema(self, conn: sa.Connection, schema: str) -> None:
        conn.execute(sa.text(f"CREATE SCHEMA IF NOT EXISTS {self.quote(schema)}"))

    def drop_schema(self, conn: sa.Connection, schema: str) -> None:
        conn.execute(sa.text(f"DROP SCHEMA IF EXISTS {self.quote(schema)} CASCADE"))

    def table_names(self, schema: str | None = None) -> list[str]:
        return sorted(sa.inspect(self.engine).get_table_names(schema=schema or self.default_schema))

    def count_rows(self, conn: sa.Connection, schema: str | None, table: str) -> int:
        return int(
            conn.execute(
                sa.text(f"SELECT count(*) FROM {self.qualified(schema, table)}")
            ).scalar_one()
        )

    # -- bulk --------------------------------------------------------------------------
    @abstractmethod
    def bulk_insert(
        self,
        conn: sa.Connection,
        schema: str | None,
        table: str,
        batches: pa.Table | Iterable[pa.RecordBatch],
    ) -> int:
        """Append Arrow data to an existing table through the engine's native bulk path.

        Columns are matched by name. Returns the number of rows written. Runs inside the
        caller's transaction.
        """

    def load_parquet(
        self, conn: sa.Connection, schema: str | None, table: str, paths: list[Path]
    ) -> int:
        """Append Parquet files to a table, streamed in batches (columns matched by name)."""
        total = 0
        for path in paths:
            batches = pq.ParquetFile(path).iter_batches(batch_size=100_000)
            total += self.bulk_insert(conn, schema, table, batches)
        return total

    def view_parquet(
        self, conn: sa.Connection, schema: str | None, table: str, paths: list[Path]
    ) -> bool:
        """Create `table` as a view reading the Parquet files in place, where the engine
        can (True); False where it cannot, and the caller loads a table instead."""
        return False

    @abstractmethod
    def fetch_arrow(self, conn: sa.Connection, sql: str) -> pa.Table:
        """The result of a SELECT as an Arrow table, through the engine's bulk path."""

    def analyze(self, conn: sa.Connection, schema: str | None, table: str) -> None:
        """Refresh planner statistics after a bulk load (no-op where not needed)."""
        return None


def _as_batches(data: pa.Table | Iterable[pa.RecordBatch]) -> Iterable[pa.RecordBatch]:
    if isinstance(data, pa.Table):
        return data.to_batches(max_chunksize=256_000)
    return data


def open_warehouse(url: str | None = None) -> Warehouse:
    """Open the warehouse at `url` (or $OMOP_ETL_WAREHOUSE).

    `duckdb:///path/file.duckdb` or `postgresql+psycopg://user@host:port/db`.
    """
    url = url or os.environ.get(WAREHOUSE_ENV)
    if not url:
        raise ValueError(f"no warehouse URL: pass --warehouse or set {WAREHOUSE_ENV}")
    backend = sa.engine.make_url(url).get_backend_name()
    if backend == "duckdb":
        from etl.warehouse.duckdb import DuckDBWarehouse

        return DuckDBWarehouse.from_url(url)
    if backend in ("postgresql", "postgres"):
        from etl.warehouse.postgres import PostgresWarehouse

        return PostgresWarehouse.from_url(url)
    raise ValueError(f"unsupported warehouse {url!r}: use duckdb:/// or postgresql+psycopg://")
