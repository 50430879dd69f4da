"""Great Expectations suites generated from the CDM specification, run on the stage.

One suite per CDM table (`cdm.<table>`): the table's columns are exactly the spec's,
required fields are not null, the primary key is unique, text fits its declared length.
They run in Great Expectations 1.x and gate the load next to the DQD checks (the SQL
checks in `checks.py`); every run keeps GE's own validation results and Data Docs in
`RUN_DIR/gx/`.

How they run, per engine:
- PostgreSQL: GE's SQL datasource over the stage schema, one whole-table batch per
  table; GE computes every metric in the database (set-based).
- DuckDB: GE's SQL datasource does not work over duckdb_engine (every metric fails with
  MetricResolutionError), so each table is read as Arrow in partitions, each validated as
  a pandas batch. A table of more than `chunk_rows` rows is streamed from one scan in
  partitions of `chunk_rows` rows for its null and length expectations, and its primary
  key alone is split by a hash of its value into partitions of about as many rows
  (all copies of a key fall in the same partition, so uniqueness holds per partition
  exactly when it holds for the table). The counts of the partitions add up to the
  table's; no table is ever held in memory whole.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# No usage statistics ever leave the hospital (GE 1.x reads this before any context; the
# pinned release sends none, this keeps an upgrade from starting to)
os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")

import great_expectations as gx
import great_expectations.execution_engine.pandas_execution_engine as gx_pandas_engine
import great_expectations.expectations as gxe
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from great_expectations.data_context.types.base import ProgressBarsConfig

from etl.cdm.spec import TableSpec, cdm_tables
from etl.pipeline.schemas import Schemas
from etl.quality.checks import Check
from etl.sql_text import sql_literal

log = logging.getLogger(__name__)
logging.getLogger("great_expectations").setLevel(logging.WARNING)
# GE fingerprints every pandas batch under 1 GB (an MD5 over pandas' hash of every value,
# kept as a batch marker): a quarter of the gate's GE time, for a marker nobody reads.
# Each stored result still names its suite (cdm.<table>) and its validation time.
gx_pandas_engine.HASH_THRESHOLD = 0

ENGINE = "great_expectations"
# rows per validated partition: each validation costs GE about 0.2 s whatever its size
# (2.1 M rows: 13.5 s in 50,000-row partitions, 7.8 s in 250,000, 6.9 s in 1 M). A
# partition is a pandas frame of Arrow-backed columns (`_validated`): no Python object per
# text value, so a million rows take about what 500,000 took as NumPy and object columns
# (GE on a million patients' visit_occurrence and person, 23.4 M rows: 12.5 s and 942 MiB
# in 500,000-row NumPy partitions; 10.4 s and 883 MiB in Arrow-backed ones; 8.7 s and
# 959 MiB in Arrow-backed partitions of 1 M rows)
CHUNK_ROWS = 1_000_000
STAGE_URL_ENV = "OMOP_ETL_GX_STAGE_URL"  # the stage's URL, for GE, in this process only
_PART = "_ge_partition"  # the hash partition's column in the spilled Parquet
_FLUSH_ROWS = 10_000  # rows DuckDB buffers per partitioned write before flushing
DOCS_INDEX = Path("gx") / "uncommitted" / "data_docs" / "local_site" / "index.html"


@dataclass
class Expectation:
    """One generated expectation and the gate settings it carries (as a Check)."""

    check: Check
    kind: type[gxe.Expectation]
    kwargs: dict[str, Any] = field(default_factory=dict)

    def build(self) -> gxe.Expectation:
        return self.kind(**self.kwargs)


@dataclass
class SuiteResult:
    checks: list[dict[str, Any]] = field(default_factory=list)
    docs: Path | None = None
    seconds: float = 0.0


def _check(name: str, table: str, column: str | None, category: str, sub: str, desc: str) -> Check:
    return Check(
        name=f"ge.{name}",
        table=table,
        field=column,
        sql="",
        threshold_pct=0.0,
        severity="fatal",
        category=category,
        subcategory=sub,
        context="Verification",
        description=desc,
    )


def table_expectations(spec: TableSpec) -> list[Expectation]:
    """The expectations the CDM specification implies for one table."""
    t = spec.name
    out = [
        Expectation(
            _check(
                "expect_table_columns_to_match_set", t, None, "Conformance", "Relational",
                f"{t} has exactly the columns of the CDM v5.4 specification",
            ),
            gxe.ExpectTableColumnsToMatchSet,
            {"column_set": list(spec.column_names), "exact_match": True},
        )
    ]  # fmt: skip
    for f in spec.fields:
        if f.required:
            out.append(
                Expectation(
                    _check(
                        "expect_column_values_to_not_be_null", t, f.name, "Completeness", "",
                        f"{t}.{f.name} is required by the specification",
                    ),
                    gxe.ExpectColumnValuesToNotBeNull,
                    {"column": f.name},
                )
            )  # fmt: skip
        length = f.varchar_length
        if length:
            e = _check(
                "expect_column_value_lengths_to_be_between", t, f.name, "Conformance", "Value",
                f"{t}.{f.name} fits varchar({length})",
            )  # fmt: skip
            e.severity = "warning"  # the build truncates; a longer value is reported
            out.append(
                Expectation(
                    e,
                    gxe.ExpectColumnValueLengthsToBeBetween,
                    {"column": f.name, "max_value": length},
                )
            )
    if len(spec.primary_key) == 1:
        pk = spec.primary_key[0]
        out.append(
            Expectation(
                _check(
                    "expect_column_values_to_be_unique", t, pk, "Conformance", "Relational",
                    f"{t}.{pk} is the primary key",
                ),
                gxe.ExpectColumnValuesToBeUnique,
                {"column": pk},
            )
        )  # fmt: skip
    return out


def generate_expectations(tables: list[str] | set[str]) -> list[Expectation]:
    """Every spec expectation for `tables` (CDM table names)."""
    specs = cdm_tables()
    return [e for t in sorted(tables) if t in specs for e in table_expectations(specs[t])]


def _context(run_dir: Path) -> Any:
    ctx = gx.get_context(mode="file", project_root_dir=str(run_dir))
    ctx.variables.progress_bars = ProgressBarsConfig(globally=False)
    return ctx


def run_expectations(
    s: Schemas,
    expectations: list[Expectation],
    row_counts: dict[str, int],
    run_dir: Path,
    *,
    chunk_rows: int = CHUNK_ROWS,
) -> SuiteResult:
    """Validate the stage tables that have rows; results as gate check entries."""
    started = time.perf_counter()
    ctx = _context(run_dir)
    by_table: dict[str, list[Expectation]] = {}
    for e in expectations:
        if e.check.severity != "off" and row_counts.get(e.check.table, 0) > 0:
            by_table.setdefault(e.check.table, []).append(e)
    if s.wh.dialect == "postgresql":
        # GE saves its datasources in RUN_DIR/gx/great_expectations.yml: give it a
        # reference to the environment, never the URL (it may hold a password)
        os.environ[STAGE_URL_ENV] = s.wh.url
        source = ctx.data_sources.add_or_update_postgres(
            "stage", connection_string="${" + STAGE_URL_ENV + "}"
        )
    else:
        # one dataframe asset for every table: GE rewrites its whole YAML config at every
        # asset and batch definition added (two per table cost 2 s a run); the
        # validation definition and the suite name the table (cdm.<table>)
        asset = ctx.data_sources.add_or_update_pandas("stage").add_dataframe_asset(s.stage)
        source = asset.add_batch_definition_whole_dataframe("partition")
    result = SuiteResult()
    for table, table_exps in by_table.items():
        totals: dict[tuple[str, str | None], list[int]] = {}
        runs = _runs(s, ctx, source, table, table_exps, row_counts[table], chunk_rows, run_dir)
        for index, (run, rows) in enumerate(runs):
            for r in run.results:
                unexpected = int(r.result.get("unexpected_count") or 0)
                if r.exception_info and r.exception_info.get("raised_exception"):
                    unexpected = -1
                elif not r.success and "unexpected_count" not in r.result:
                    unexpected = max(unexpected, 1)  # a table-level expectation that failed
                cfg = r.expectation_config
                acc = totals.setdefault((cfg.type, cfg.kwargs.get("column")), [0, 0])
                acc[0] = -1 if acc[0] < 0 or unexpected < 0 else acc[0] + unexpected
                acc[1] += int(r.result.get("element_count") or rows or 0)
            log.debug("GE %s partition %d: success=%s", table, index, run.success)
        for e in table_exps:
            expectation_type = e.check.name.removeprefix("ge.")
            found = totals.get((expectation_type, e.kwargs.get("column")))
            if found is None:
                result.checks.append(_entry(e.check, -1, row_counts[table]))
                continue
            violating, total = found
            result.checks.append(_entry(e.check, violating, total or row_counts[table]))
    ctx.build_data_docs()
    result.docs = run_dir / DOCS_INDEX
    result.seconds = time.perf_counter() - started
    failed = [c for c in result.checks if not c["passed"]]
    log.info(
        "Great Expectations: %d expectations on %d tables, %d failed in %.1fs",
        len(result.checks), len(by_table), len(failed), result.seconds,
    )  # fmt: skip
    for c in failed:
        (log.error if c["severity"] == "fatal" else log.warning)(
            "expectation %s failed on %s.%s: %d of %d rows",
            c["name"], c["table"], c["field"] or "", c["violating_rows"], c["total_rows"],
        )  # fmt: skip
    return result


def _suite(ctx, name: str, expectations: list[Expectation]):  # type: ignore[no-untyped-def]
    """The suite `name` holding `expectations`, saved once (adding expectations one by one
    to a saved suite rewrites it, and rereads the context's config, at every one)."""
    built = [e.build() for e in expectations]
    return ctx.suites.add_or_update(gx.ExpectationSuite(name=name, expectations=built))


def _runs(
    s: Schemas,
    ctx,  # type: ignore[no-untyped-def]
    source,  # type: ignore[no-untyped-def]
    table: str,
    expectations: list[Expectation],
    rows: int,
    chunk_rows: int,
    spill_dir: Path,
) -> Iterator:  # type: ignore[no-untyped-def]
    """(validation result, rows validated) of `table`'s expectations: one per partition
    (DuckDB), or one (PostgreSQL; rows None: GE counts them in the database).

    `source` is the stage's SQL datasource (PostgreSQL: one suite, `cdm.<table>`, on the
    whole table) or the dataframe batch definition every partition is validated through
    (DuckDB). On DuckDB a table's expectations are two suites: `cdm.<table>.schema` (its
    column set) on an empty frame of all its columns, and `cdm.<table>` (the column
    expectations: not null, length, unique) on partitions of only the columns they name.
    GE filters the whole frame for every column expectation, and the unread columns were
    half of what each partition copied (GE on a million-patient stage: 133.7 s -> 79.0 s).
    A table of more than `chunk_rows` rows has its key's uniqueness in a third suite,
    `cdm.<table>.key`, on hash partitions of its key alone, and the rest of `cdm.<table>`
    on partitions streamed from one scan: only the key is spilled to disk
    (`_key_partitions`), not every column read. A partition is validated for success
    alone (GE's BOOLEAN_ONLY), and again with counts (BASIC) only if it fails: BASIC also
    lists a few unexpected values, which costs pandas a filter of the whole partition per
    expectation (GE on the 100,000-patient tables: 25.7-26.9 s -> 22.9-24.2 s)."""
    if s.wh.dialect == "postgresql":
        asset = source.add_table_asset(table, table_name=table, schema_name=s.stage)
        batch = asset.add_batch_definition_whole_table("stage")
        vd = ctx.validation_definitions.add_or_update(
            gx.ValidationDefinition(
                name=f"cdm.{table}", data=batch, suite=_suite(ctx, f"cdm.{table}", expectations)
            )
        )
        yield vd.run(result_format="BASIC"), None
        return
    of_columns = [e for e in expectations if "column" in e.kwargs]
    of_table = [e for e in expectations if "column" not in e.kwargs]
    if of_table:
        vd = _definition(ctx, source, _suite(ctx, f"cdm.{table}.schema", of_table))
        with s.wh.begin() as conn:
            empty = s.wh.fetch_arrow(conn, s.sql(f"SELECT * FROM {{S}}.{table} LIMIT 0"))
        yield _validated(vd, empty), 0
    if not of_columns:
        return
    if rows <= chunk_rows:  # one partition: every column expectation in one run
        vd = _definition(ctx, source, _suite(ctx, f"cdm.{table}", of_columns))
        with s.wh.begin() as conn:  # read, then given back: no connection held meanwhile
            frame = s.wh.fetch_arrow(
                conn, s.sql(f"SELECT {_columns(s, of_columns)} FROM {{S}}.{table}")
            )
        yield _validated(vd, frame), frame.num_rows
        return
    unique = [e for e in of_columns if e.kind is gxe.ExpectColumnValuesToBeUnique]
    rest = [e for e in of_columns if e not in unique]
    if rest:
        vd = _definition(ctx, source, _suite(ctx, f"cdm.{table}", rest))
        for frame in _streamed(s, table, _columns(s, rest), chunk_rows):
            yield _validated(vd, frame), frame.num_rows
    for e in unique:
        vd = _definition(ctx, source, _suite(ctx, f"cdm.{table}.key", [e]))
        key = e.kwargs["column"]
        for frame in _key_partitions(s, table, key, rows, chunk_rows, spill_dir):
            yield _validated(vd, frame), frame.num_rows


def _definition(ctx, source, suite):  # type: ignore[no-untyped-def]
    """The validation definition of `suite` over the dataframe batch `source` (DuckDB)."""
    return ctx.validation_definitions.add_or_update(
        gx.ValidationDefinition(name=suite.name, data=source, suite=suite)
    )


def _validated(vd, frame: pa.Table):  # type: ignore[no-untyped-def]
    """`vd` run on `frame` as one pandas batch: for success alone, and again with counts
    only if it fails. The frame's columns are Arrow-backed (`pd.ArrowDtype`): converting
    text to Python objects was a share of every partition's cost, and GE's null, length and
    uniqueness metrics count the same on them (tests/test_quality_gate.py)."""
    batch = {"dataframe": frame.to_pandas(types_mapper=pd.ArrowDtype)}
    run = vd.run(batch_parameters=batch, result_format="BOOLEAN_ONLY")
    if not run.success:  # the counts of what failed, for the report
        run = vd.run(batch_parameters=batch, result_format="BASIC")
    return run


def _columns(s: Schemas, expectations: list[Expectation]) -> str:
    """The select list of the columns `expectations` name, each once."""
    names = dict.fromkeys(e.kwargs["column"] for e in expectations)
    return ", ".join(s.wh.quote(c) for c in names)


def _streamed(s: Schemas, table: str, selected: str, chunk_rows: int) -> Iterator[pa.Table]:
    """`selected` of `table` (DuckDB) in partitions of at most `chunk_rows` rows, from
    one scan streamed as Arrow: a partition or two in memory at a time.

    DuckDB streams a table in batches of at most about 120,000 rows (a row group) whatever
    size is asked; they are gathered into partitions, since a GE run costs about the same
    whatever its size (on the million-patient observation table's 29 M rows, 240 runs of
    a batch each took GE 13.8 s, 27 runs of a partition each 7.6 s)."""
    with s.wh.begin() as conn:
        raw = conn.connection.driver_connection
        scan = raw.sql(s.sql(f"SELECT {selected} FROM {{S}}.{table}"))
        reader = scan.to_arrow_reader(chunk_rows)
        try:
            held: list[pa.RecordBatch] = []
            for batch in reader:
                if held and sum(b.num_rows for b in held) + batch.num_rows > chunk_rows:
                    yield pa.Table.from_batches(held)
                    held = []
                held.append(batch)
            if held:
                yield pa.Table.from_batches(held)
        finally:  # a consumer that stopped early: the result closed before the transaction
            reader.close()


def _key_partitions(
    s: Schemas, table: str, key: str, rows: int, chunk_rows: int, spill_dir: Path
) -> Iterator[pa.Table]:
    """`key` of `table` (DuckDB) in partitions of about `chunk_rows` rows, by a hash of
    its value: every copy of a value lands in the same partition.

    One scan writes the key to Parquet partitioned by the hash (DuckDB, set-based, in
    bounded memory); each partition is then read back alone. Selecting each partition from
    the table instead would scan the whole table once per partition: quadratic in size.
    Only the key is written: spilling every column GE reads took a million-patient gate
    23 s, and the other expectations hold on any partition (`_streamed`).
    """
    parts = max(1, math.ceil(rows / chunk_rows))
    column = s.wh.quote(key)
    with tempfile.TemporaryDirectory(prefix=f"ge-{table}-", dir=spill_dir) as tmp:
        copy = s.sql(
            f"COPY (SELECT {column}, hash({column}) % {parts} AS {_PART} FROM {{S}}.{table})"
            " TO {target} (FORMAT parquet, PARTITION_BY (" + _PART + "))",
            target=sql_literal(Path(tmp) / "parts"),
        )
        with s.wh.begin() as conn:
            raw = conn.connection.driver_connection  # not sa.text: a path may hold ':'
            # DuckDB buffers rows per partition up to this threshold: its default (524,288)
            # filled the whole memory_limit at 160 partitions; 10,000 kept 40 M rows at 1.3
            # GiB, and wrote faster
            raw.execute(f"SET partitioned_write_flush_threshold = {_FLUSH_ROWS}")
            try:
                raw.execute(copy)
            finally:
                raw.execute("RESET partitioned_write_flush_threshold")
        for folder in sorted(Path(tmp, "parts").iterdir()):
            files = sorted(folder.glob("*.parquet"))
            yield pa.concat_tables(pq.read_table(f) for f in files)


def _entry(check: Check, violating: int, total: int) -> dict[str, Any]:
    error = violating < 0
    violating = max(violating, 0)
    pct = 100.0 * violating / total if total else 0.0
    entry: dict[str, Any] = {
        "name": check.name, "key": check.key, "table": check.table, "field": check.field,
        "concept_id": None, "unit_concept_id": None, "category": check.category,
        "subcategory": check.subcategory, "context": check.context,
        "severity": check.severity, "passed": not error and pct <= check.threshold_pct,
        "violating_rows": violating, "total_rows": total, "violating_pct": round(pct, 4),
        "threshold_pct": check.threshold_pct, "description": check.description,
        "engine": ENGINE,
    }  # fmt: skip
    if error:
        entry["error"] = "Great Expectations could not evaluate the expectation"
    return entry
