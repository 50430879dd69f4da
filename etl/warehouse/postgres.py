"""PostgreSQL warehouse: the production engine; bulk loads go through COPY (psycopg 3)."""

from __future__ import annotations

import io
import itertools
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

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

    @contextmanager
    def without_jit(self, conn: sa.Connection) -> Iterator[None]:
        """Just-in-time compilation off for the statements inside (`SET LOCAL`), then as it
        was. For the statements that are many small expressions in one large UNION ALL: the
        planner's cost of such a statement passes `jit_above_cost` once its tables reach a
        few hundred thousand rows, and PostgreSQL then compiles every expression of every
        part before running any. At 100,000 patients one batch of 50 foreign-key checks ran
        7.4 s without JIT and 47.7 s with it (17,928 functions, 78 s of compilation over
        the parallel workers): the quality checks took 367.6 s, 106.6 s without; the
        report's concept gaps 17.3 s, 4.7 s without. Not for every statement: the
        report's trace samples ran 15.3 s with JIT and 20.2 s without."""
        was = conn.execute(sa.text("SELECT current_setting('jit')")).scalar_one()
        conn.execute(sa.text("SET LOCAL jit = off"))
        # not restored on an error: the transaction is aborted, and rolling it back undoes
        # the SET LOCAL (a statement here would replace the error with "transaction aborted")
        yield
        conn.execute(sa.text("SELECT set_config('jit', :was, true)"), {"was": was})

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
