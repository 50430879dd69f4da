"""PostgreSQL warehouse: the production engine; bulk loads go through COPY (psycopg 3)."""

from __future__ import annotations

import io
import itertools
from collections.abc import Iterable

import pyarrow as pa
import pyarrow.csv as pacsv
import sqlalchemy as sa

from etl.warehouse.base import Warehouse, _as_batches

_CSV_OPTIONS = pacsv.WriteOptions(include_header=False, delimiter=",", quoting_style="needed")


class PostgresWarehouse(Warehouse):
    dialect = "postgresql"
    default_schema = "public"

    @classmethod
    def from_url(cls, url: str) -> PostgresWarehouse:
        u = sa.engine.make_url(url)
        if u.drivername in ("postgresql", "postgres"):
            u = u.set(drivername="postgresql+psycopg")  # psycopg 3, never psycopg2
        engine = sa.create_engine(u, pool_pre_ping=True)
        return cls(url, engine)

    def bulk_insert(
        self,
        conn: sa.Connection,
        schema: str | None,
        table: str,
        batches: pa.Table | Iterable[pa.RecordBatch],
    ) -> int:
        """COPY ... FROM STDIN in CSV: Arrow writes the CSV in C++, one buffer per batch.

        Arrow quotes every string and leaves nulls unquoted and empty, which is exactly how
        PostgreSQL's CSV format tells an empty string from NULL.
        """
        raw = conn.connection.driver_connection
        batch_iter = (b for b in _as_batches(batches) if b.num_rows)
        first = next(batch_iter, None)
        if first is None:
            return 0
        cols = ", ".join(self.quote(c) for c in first.schema.names)
        sql = f"COPY {self.qualified(schema, table)} ({cols}) FROM STDIN (FORMAT csv)"
        total = 0
        with raw.cursor() as cur, cur.copy(sql) as copy:
            for batch in itertools.chain([first], batch_iter):
                sink = pa.BufferOutputStream()
                pacsv.write_csv(batch, sink, write_options=_CSV_OPTIONS)
                copy.write(memoryview(sink.getvalue()))
                total += batch.num_rows
        return total

    def analyze(self, conn: sa.Connection, schema: str | None, table: str) -> None:
        conn.execute(sa.text(f"ANALYZE {self.qualified(schema, table)}"))

    def fetch_arrow(self, conn: sa.Connection, sql: str) -> pa.Table:
        """COPY (query) TO STDOUT as CSV, parsed by Arrow; column types are inferred, so
        callers cast to the schema they expect."""
        raw = conn.connection.driver_connection
        sink = io.BytesIO()
        with raw.cursor() as cur, cur.copy(f"COPY ({sql}) TO STDOUT (FORMAT csv, HEADER)") as cp:
            for chunk in cp:
                sink.write(chunk)
        if sink.tell() == 0:
            return pa.table({})
        sink.seek(0)
        return pacsv.read_csv(sink)
