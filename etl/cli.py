"""The `omop-etl` command line."""

from __future__ import annotations

import logging
import os
import sys
from enum import StrEnum
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from etl import __version__
from etl.json_text import readable
from etl.logs import configure

app = typer.Typer(
    help="OMOP CDM v5.4 ETL for hospitals: EHR, HL7 v2 lab and DICOM feeds into a gated warehouse.",
    no_args_is_help=True,
    add_completion=False,
)
cdm_app = typer.Typer(help="The CDM v5.4 (+ imaging extension) schema.", no_args_is_help=True)
vocab_app = typer.Typer(help="Athena vocabulary releases.", no_args_is_help=True)
app.add_typer(cdm_app, name="cdm")
app.add_typer(vocab_app, name="vocab")
quality_app = typer.Typer(help="The quality checks, on any CDM warehouse.", no_args_is_help=True)
app.add_typer(quality_app, name="quality")
lab_app = typer.Typer(help="The lab feed (HL7 v2): the MLLP listener.", no_args_is_help=True)
app.add_typer(lab_app, name="lab")

console = Console(stderr=True)
log = logging.getLogger("etl")

WAREHOUSE_OPT = typer.Option(
    None,
    "--warehouse",
    "-w",
    envvar="OMOP_ETL_WAREHOUSE",
    help="duckdb:///file.duckdb or postgresql+psycopg://user@host/db",
)
SCHEMA_OPT = typer.Option(None, "--schema", "-s", help="Default: main (DuckDB), cdm (PostgreSQL).")


class DialectName(StrEnum):
    duckdb = "duckdb"
    postgresql = "postgresql"


def _default_schema(url: str, schema: str | None) -> str:
    return schema or ("main" if url.startswith("duckdb") else "cdm")


@app.callback()
def main(
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging."),
    version: bool = typer.Option(False, "--version", help="Print the version and exit."),
) -> None:
    configure(verbose)
    if version:
        typer.echo(__version__)
        raise typer.Exit(0)


@cdm_app.command("ddl")
def cdm_ddl(
    dialect: DialectName = typer.Option(..., "--dialect", "-d"),
    schema: str | None = SCHEMA_OPT,
    foreign_keys: bool = typer.Option(False, "--foreign-keys", help="Add FK constraints."),
    indexes: bool = typer.Option(False, "--indexes", help="Add OHDSI-style indexes."),
) -> None:
    """Print the CDM DDL for a dialect, generated from the specification."""
    from etl.cdm.schema import build_metadata, ddl_statements, dialect_for

    md = build_metadata(schema, foreign_keys=foreign_keys, indexes=indexes)
    for stmt in ddl_statements(md, dialect_for(dialect.value)):
        typer.echo(stmt + ";\n")


@cdm_app.command("create")
def cdm_create(
    warehouse: str = WAREHOUSE_OPT,
    schema: str | None = SCHEMA_OPT,
    foreign_keys: bool = typer.Option(False, "--foreign-keys", help="PostgreSQL only."),
    indexes: bool | None = typer.Option(
        None, "--indexes/--no-indexes", help="Default: on for PostgreSQL, off for DuckDB."
    ),
) -> None:
    """Create the 41 CDM tables (39 CDM v5.4 + 2 imaging) that are missing in a warehouse."""
    from etl.cdm.schema import create_cdm
    from etl.warehouse import open_warehouse

    _require(warehouse, "--warehouse")
    schema = _default_schema(warehouse, schema)
    with open_warehouse(warehouse) as wh:
        try:
            created = create_cdm(wh, schema, foreign_keys=foreign_keys, indexes=indexes)
        except ValueError as exc:
            _fail(str(exc))
        total = len(wh.table_names(schema))
    console.print(f"schema [bold]{schema}[/]: {len(created)} table(s) created, {total} in all")


@vocab_app.command("load")
def vocab_load(
    path: Path = typer.Argument(..., help="Folder of an Athena download (tab-separated files)."),
    warehouse: str = WAREHOUSE_OPT,
    schema: str | None = SCHEMA_OPT,
) -> None:
    """Load an Athena vocabulary release, replacing the previous one atomically."""
    from etl.vocab import VocabularyError, load_vocabulary
    from etl.warehouse import open_warehouse

    _require(warehouse, "--warehouse")
    schema = _default_schema(warehouse, schema)
    with open_warehouse(warehouse) as wh:
        try:
            result = load_vocabulary(wh, path, schema, show_progress=sys.stderr.isatty())
        except VocabularyError as exc:
            _fail(str(exc))
    table = Table(title=f"vocabulary loaded into {schema} in {result.seconds:.1f}s")
    table.add_column("table")
    table.add_column("rows", justify="right")
    for name, n in result.rows.items():
        table.add_row(name, f"{n:,}")
    console.print(table)
    if result.vocabulary_version:
        console.print(f"release: {result.vocabulary_version}")


@vocab_app.command("refresh")
def vocab_refresh(
    path: Path = typer.Argument(..., help="Folder of the new Athena release."),
    config: Path = typer.Option(..., "--config", "-c", help="The site config (YAML)."),
    workdir: Path = typer.Option(Path("."), "--workdir", help="Where runs/RUN_ID/ is written."),
    replay: str | None = typer.Option(
        None, "--replay", help="The run to re-map (default: the last landed run)."
    ),
) -> None:
    """Re-map the last landed run against a new release; swap vocabulary and CDM together,
    or refuse (exit 1) with a report of what changed. Exit 2 if it failed."""
    from etl.config import ConfigError, load_config
    from etl.pipeline.refresh import refresh_vocabulary

    try:
        cfg = load_config(config)
    except ConfigError as exc:
        _fail(str(exc))
    result = refresh_vocabulary(cfg, workdir, path, replay=replay)
    _print_run(result)
    changes = result.report.get("vocabulary_changes")
    if changes:
        moving = sum(m["rows"] for m in changes["rows_moving"])
        console.print(
            f"vocabulary changes: {changes['concepts_deprecated']} concept(s) deprecated,"
            f" {changes['mappings_changed']} mapping(s) changed, {changes['domains_changed']}"
            f" domain change(s), {moving} record(s) moving table"
        )
    raise typer.Exit(result.exit_code)


@app.command()
def run(
    config: Path = typer.Option(..., "--config", "-c", help="The site config (YAML)."),
    workdir: Path = typer.Option(Path("."), "--workdir", help="Where runs/RUN_ID/ is written."),
    replay: str | None = typer.Option(
        None, "--replay", help="Rebuild from the landing area of run RUN_ID, without the feeds."
    ),
    shards: int = typer.Option(
        1, "--shards", min=1, help="Build in N shards of persons, merged before the gate."
    ),
    shard_workers: int = typer.Option(
        1,
        "--shard-workers",
        min=1,
        help="Shards built at the same time, in worker processes (PostgreSQL only).",
    ),
) -> None:
    """Run the nightly job once. Exit 0 published, 1 refused by the gate, 2 failed."""
    from etl.config import ConfigError, load_config
    from etl.pipeline.run import run_pipeline

    try:
        cfg = load_config(config)
    except ConfigError as exc:
        _fail(str(exc))
    result = run_pipeline(cfg, workdir, replay=replay, shards=shards, shard_workers=shard_workers)
    _print_run(result)
    raise typer.Exit(result.exit_code)


@app.command()
def demo(
    workdir: Path = typer.Option(Path("demo-output"), "--workdir", help="Where to write."),
) -> None:
    """Run the nightly job over the bundled demo feeds into WORKDIR/warehouse.duckdb."""
    from etl.demo import run_demo

    result = run_demo(workdir)
    _print_run(result)
    raise typer.Exit(result.exit_code)


@app.command()
def trace(
    table: str | None = typer.Argument(None, help="CDM table of the row to trace."),
    row_id: int | None = typer.Argument(None, help="Its id (person_id for death)."),
    source: tuple[str, str] | None = typer.Option(
        None, "--source", help="FEED FILE:LINE - trace a source record forward instead."
    ),
    config: Path | None = typer.Option(None, "--config", "-c", help="Site config (YAML)."),
    warehouse: str | None = WAREHOUSE_OPT,
    schema: str | None = SCHEMA_OPT,
) -> None:
    """Where a warehouse row came from, or where a source record went (no SQL needed)."""
    from etl.lineage import trace_row, trace_source
    from etl.warehouse import open_warehouse

    if config is not None:
        from etl.config import ConfigError, load_config

        try:
            cfg = load_config(config)
        except ConfigError as exc:
            _fail(str(exc))
        warehouse, schema = cfg.warehouse, schema or cfg.schema_name
    _require(warehouse, "--warehouse (or --config)")
    schema = _default_schema(warehouse, schema)
    with open_warehouse(warehouse) as wh:
        if source:
            feed, position = source
            file_name, _, line = position.rpartition(":")
            if not file_name or not line.isdigit():
                _fail("--source takes FEED FILE:LINE, e.g. --source ehr conditions.csv:418")
            _print_source_trace(trace_source(wh, schema, feed, file_name, int(line)))
            return
        if table is None or row_id is None:
            _fail("give TABLE ID, or --source FEED FILE:LINE")
        try:
            result = trace_row(wh, schema, table, row_id)
        except ValueError as exc:
            _fail(str(exc))
    _print_row_trace(result)


def _print_row_trace(t) -> None:  # type: ignore[no-untyped-def]
    out = Console(highlight=False)
    if t.row is None:
        _fail(f"no {t.table} row with id {t.row_id} in the published warehouse", code=1)
    out.print(f"[bold]{t.table} {t.row_id}[/]")
    for k, v in t.row.items():
        if v is not None:
            out.print(f"  {k}: {escape(str(v))}")
    if t.person_key:
        out.print(f"person key (pseudonym): {t.person_key}")
    if t.derived_from:
        out.print(t.derived_from)
    out.print("[bold]came from[/]")
    for src in t.sources:
        code = f"{src['source_vocabulary'] or ''} {src['source_code'] or ''}".strip()
        out.print(
            f"  {escape(src['source_file'])}:{src['source_line']} (feed {src['feed']}, run "
            f"{src['run_id']})"
            + (f": {escape(code)}" if code else "")
            + (f" -> {escape(src['mapping_rule'])}" if src["mapping_rule"] else "")
            + (f" [{src['cdm_table']} {src['cdm_id']}]" if src["cdm_table"] != t.table else "")
        )


def _print_source_trace(t) -> None:  # type: ignore[no-untyped-def]
    out = Console(highlight=False)
    where = f"{t.feed} {t.source_file}:{t.source_line}"
    if not t.rows and not t.set_aside:
        _fail(f"{where}: not in the published run's lineage (no such record?)", code=1)
    for r in t.rows:
        code = f"{r['source_vocabulary'] or ''} {r['source_code'] or ''}".strip()
        out.print(
            f"{escape(where)} -> [bold]{r['cdm_table']} {r['cdm_id']}[/] (run {r['run_id']})"
            + (f": {escape(code)}" if code else "")
            + (f" -> {escape(r['mapping_rule'])}" if r["mapping_rule"] else "")
        )
    for a in t.set_aside:
        out.print(
            f"{escape(where)}: {a['status']} by rule [bold]{escape(a['rule'])}[/] in run "
            f"{a['run_id']} ({a['record_set']})"
        )


@quality_app.command("run")
def quality_run(
    warehouse: str = WAREHOUSE_OPT,
    schema: str | None = SCHEMA_OPT,
    quality: Path | None = typer.Option(None, "--quality", help="Folder of override YAMLs."),
    out: Path = typer.Option(Path("quality-results"), "--out", help="Where to write results."),
) -> None:
    """Run the gate's checks on an existing CDM v5.4 warehouse. Exit 1 if a fatal one fails."""
    import datetime as dt

    from etl.quality.dqd_json import dqd_results
    from etl.quality.standalone import check_warehouse
    from etl.warehouse import open_warehouse

    _require(warehouse, "--warehouse")
    schema = _default_schema(warehouse, schema)
    started = dt.datetime.now(dt.UTC)
    out.mkdir(parents=True, exist_ok=True)
    with open_warehouse(warehouse) as wh:
        result, missing, docs = check_warehouse(wh, schema, quality, out)
    (out / "checks.json").write_text(readable(result.checks))
    dqd_checks = [c for c in result.checks if c.get("engine") != "great_expectations"]
    dqd = dqd_results(dqd_checks, started, dt.datetime.now(dt.UTC), None)
    (out / "dqd_results.json").write_text(readable(dqd))
    failed = [c for c in result.checks if not c["passed"]]
    table = Table(title=f"{len(result.checks)} checks on {schema}: {len(failed)} failed")
    for col in ("severity", "check", "table.field", "violating", "rows", "%", "threshold %"):
        table.add_column(col)
    for c in sorted(failed, key=lambda c: (c["severity"] != "fatal", c["name"])):
        table.add_row(c["severity"], c["name"], f"{c['table']}.{c['field'] or ''}",
                      str(c["violating_rows"]), str(c["total_rows"]),
                      f"{c['violating_pct']:.2f}", f"{c['threshold_pct']:g}")  # fmt: skip
    Console(width=160).print(table)
    if missing:
        console.print(f"tables absent, not checked: {', '.join(missing)}")
    console.print(f"results: {out / 'checks.json'}, {out / 'dqd_results.json'}")
    if docs is not None:
        console.print(f"Great Expectations Data Docs: {docs}")
    raise typer.Exit(0 if result.passed else 1)


@app.command()
def report(
    run_id: str = typer.Argument(..., help="The run to summarise."),
    workdir: Path = typer.Option(Path("."), "--workdir", help="Where runs/ is."),
) -> None:
    """Reprint a run's summary from its report.json."""
    import json
    from types import SimpleNamespace

    path = workdir / "runs" / run_id / "report.json"
    if not path.is_file():
        _fail(f"no report at {path}")
    data = json.loads(path.read_text(encoding="utf-8"))
    exit_code = {"published": 0, "refused": 1}.get(data["status"], 2)
    _print_run(SimpleNamespace(run_id=run_id, status=data["status"], report=data,
                               run_dir=path.parent, exit_code=exit_code))  # fmt: skip
    checks = data.get("checks", [])
    if checks:
        failed = [c for c in checks if not c["passed"]]
        fatal = [c for c in failed if c["severity"] == "fatal"]
        console.print(f"checks: {len(checks)}, failed {len(failed)} ({len(fatal)} fatal)")
    console.print(f"auditor's page: {path.parent / 'report.html'}")


def _print_run(result) -> None:  # type: ignore[no-untyped-def]
    report = result.report
    table = Table(title=f"run {result.run_id}: {result.status}")
    for col in ("feed", "records in", "loaded", "quarantined", "filtered"):
        table.add_column(col, justify="right" if col != "feed" else "left")
    for feed, f in report.get("feeds", {}).items():
        table.add_row(
            feed, *(f"{f[k]:,}" for k in ("records_in", "loaded", "quarantined", "filtered"))
        )
    console.print(table)
    if report.get("tables"):
        loaded = {t: n for t, n in report["tables"].items() if n}
        console.print("tables: " + ", ".join(f"{t} {n:,}" for t, n in loaded.items()))
    for err in report.get("errors", []):
        console.print(f"[red]error:[/] {escape(err)}", highlight=False)
    console.print(f"report: {result.run_dir / 'report.json'}")


def _require(value: str | None, flag: str) -> None:
    if not value:
        _fail(f"{flag} is required (or set OMOP_ETL_WAREHOUSE)")


def _fail(message: str, code: int = 2) -> None:
    console.print(f"[red]error:[/] {escape(message)}", highlight=False)
    raise typer.Exit(code)


def entry_point() -> None:
    """The `omop-etl` entry point.

    Exits without the interpreter's teardown: once Great Expectations has been imported
    beside DuckDB, DuckDB's nanobind bindings print a wall of benign "leaked" warnings
    at teardown. Output and logs are flushed first; the exit code is the command's.
    """
    code: int | str | None = 0
    try:
        app()
    except SystemExit as exc:
        code = exc.code
    finally:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(code if isinstance(code, int) else (0 if code is None else 1))


@lab_app.command("listen")
def lab_listen(
    spool: Path = typer.Option(..., "--spool", help="Folder the messages are written to."),
    port: int = typer.Option(2575, "--port", help="TCP port (0: any free port)."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on."),
) -> None:
    """Receive HL7 v2 messages over MLLP into a spool folder (ACK after a durable write).

    The nightly run reads the spool as an hl7v2 feed folder. SIGTERM stops cleanly.
    """
    import asyncio

    from etl.sources.mllp import run as run_listener

    asyncio.run(run_listener(spool, host, port))


if __name__ == "__main__":  # pragma: no cover
    entry_point()
