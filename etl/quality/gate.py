"""Run the generated checks on the staged tables and decide: publish or refuse.

Every check is one set-based SQL query in the warehouse (DuckDB or PostgreSQL) returning
(violating rows, denominator); nothing is pulled into Python but the two counts and, for
a failed check, a few example row ids. A failed fatal check refuses the load.

Checks run `BATCH` at a time as one UNION ALL statement (one round trip and transaction
instead of one per check: the per-query overhead was half the gate's time with its ~2,300
checks). A batch that errors, or does not return one row per check, is run again check
by check, so a check that cannot run fails alone, with its own error.

The ~280 checks whose denominator is their table's rows (`Check.over_rows`: foreign keys,
standard concepts, domains and classes, primary keys) run their violating count alone,
the tables counted once: their own queries counted the table again each, a full scan per
check on PostgreSQL.

Three kinds of check count what the warehouse's own declarations forbid, and are answered
by them where the catalogue declares them (`DECLARED`; the report says so, `answered_by`):
a primary key check (isPrimaryKey) by the table's primary key on that very column (the
engine refuses a duplicate key), a required-field check (isRequired) by the column's NOT
NULL, an integer-type check (cdmDatatype) by the column's integer type: 0 violating rows
by construction, out of the table's rows. On DuckDB the gate keys tonight's tables before
the checks (`steps.NightlyRun.gate`), so the grouping of every key that each key check ran
(18 of the DQD checks' 66 CPU seconds at a million patients) is the key's own index
build, which the publish needed anyway. Where a declaration is missing (a keying that
failed on a duplicate or a NULL leaves the tables as built), the check runs its query,
which counts and names what is wrong.

The ~400 catalogue checks (cdmTable, cdmField: does the table, the column exist?) are
answered from one read of the schema's catalogue instead of one information_schema query
each: the same (0 or 1, 1) their SQL returns (those ~400 queries were ~40% of the DQD
checks' time on the demo: DuckDB answers each by listing every column of every schema).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa

from etl.cdm.spec import cdm_tables
from etl.pipeline.schemas import Schemas
from etl.quality.checks import Check

log = logging.getLogger(__name__)
EXAMPLES = 5
BATCH = 50
# check name -> the declaration that answers it (see the module's docstring)
DECLARED = {
    "isPrimaryKey": "primary key constraint",
    "isRequired": "NOT NULL constraint",
    "cdmDatatype": "integer column type",
}
_INTEGER_TYPES = {
    "TINYINT", "SMALLINT", "INTEGER", "BIGINT", "HUGEINT",
    "UTINYINT", "USMALLINT", "UINTEGER", "UBIGINT", "UHUGEINT",
}  # fmt: skip


@dataclass
class GateResult:
    checks: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def fatal_failures(self) -> list[dict[str, Any]]:
        return [c for c in self.checks if not c["passed"] and c["severity"] == "fatal"]

    @property
    def passed(self) -> bool:
        return not self.fatal_failures


def _row_key(table: str) -> str | None:
    spec = cdm_tables().get(table)
    if spec is None:
        return None
    if spec.primary_key:
        return spec.primary_key[0]
    return "person_id" if "person_id" in spec.column_names else None


def run_checks(s: Schemas, checks: list[Check]) -> GateResult:
    """Evaluate `checks` against the stage schema, in batches (a check that errors cannot
    spoil the others: its batch is run again check by check)."""
    started = time.perf_counter()
    result = GateResult()
    in_catalog = _catalog_counts(s, [c for c in checks if c.catalog is not None])
    rest = [c for c in checks if c.catalog is None]
    holds = _declared(s, rest)
    over_rows = [c for c in rest if id(c) not in holds]
    # every table either kind needs, counted once
    rows = _table_rows(
        s,
        {c.over_rows.table for c in over_rows if c.over_rows is not None and not c.params}
        | {"{S}." + c.table for c in rest if id(c) in holds},
    )
    declared = {
        id(c): (0, rows["{S}." + c.table]) for c in rest if id(c) in holds and rows is not None
    }
    answered = {**_over_rows_counts(s, over_rows, rows), **declared}
    queried = [c for c in rest if id(c) not in answered]
    by_query: list[tuple[int, int] | str] = []
    for first in range(0, len(queried), BATCH):
        by_query.extend(_batch_counts(s, queried[first : first + BATCH]))
    answers = iter(by_query)
    counts = [
        in_catalog[id(c)] if c.catalog is not None else answered.get(id(c)) or next(answers)
        for c in checks
    ]
    for check, counted in zip(checks, counts, strict=True):
        error = counted if isinstance(counted, str) else None
        violating, total = (0, 0) if isinstance(counted, str) else counted
        pct = 100.0 * violating / total if total else 0.0
        passed = error is None and pct <= check.threshold_pct
        entry: dict[str, Any] = {
            "name": check.name, "key": check.key, "table": check.table, "field": check.field,
            "concept_id": check.concept_id, "unit_concept_id": check.unit_concept_id,
            "category": check.category, "subcategory": check.subcategory,
            "context": check.context, "severity": check.severity, "passed": passed,
            "violating_rows": violating, "total_rows": total, "violating_pct": round(pct, 4),
            "threshold_pct": check.threshold_pct, "description": check.description,
        }  # fmt: skip
        if error:
            entry["error"] = error
        if id(check) in declared:
            entry["answered_by"] = DECLARED[check.name]
        if not passed and check.examples_sql and error is None:
            with s.wh.begin_checks() as conn:
                entry["examples"] = _examples(s, conn, check)
        result.checks.append(entry)
    result.seconds = time.perf_counter() - started
    failed = [c for c in result.checks if not c["passed"]]
    log.info(
        "quality gate: %d checks, %d failed (%d fatal) in %.1fs",
        len(result.checks), len(failed), len(result.fatal_failures), result.seconds,
    )  # fmt: skip
    for c in result.fatal_failures:
        log.error(
            "fatal check failed: %s on %s.%s: %d of %d rows (%.2f%% > %.2f%%)",
            c["name"], c["table"], c["field"] or "", c["violating_rows"], c["total_rows"],
            c["violating_pct"], c["threshold_pct"],
        )  # fmt: skip
    return result


def _catalog_counts(s: Schemas, checks: list[Check]) -> dict[int, tuple[int, int] | str]:
    """(violating, total) of each catalogue check, keyed by id(check): (0, 1) when its table
    (cdmTable) or column (cdmField) is in the stage schema's catalogue, else (1, 1)."""
    if not checks:
        return {}
    try:
        with s.wh.begin_checks() as conn:
            tables = {
                r[0]
                for r in conn.execute(
                    sa.text(
                        "SELECT table_name FROM information_schema.tables"
                        " WHERE table_schema = :schema"
                    ),
                    {"schema": s.stage},
                )
            }
            columns = set(
                conn.execute(
                    sa.text(
                        "SELECT table_name, column_name FROM information_schema.columns"
                        " WHERE table_schema = :schema"
                    ),
                    {"schema": s.stage},
                ).tuples()
            )
    except sa.exc.DBAPIError:  # each check's own query then says what is wrong
        log.debug("the catalogue could not be read at once; asking check by check")
        return {id(c): _counts(s, c) for c in checks}
    out: dict[int, tuple[int, int] | str] = {}
    for c in checks:
        assert c.catalog is not None
        table, column = c.catalog
        present = table in tables if column is None else (table, column) in columns
        out[id(c)] = (0 if present else 1, 1)
    return out


def _table_rows(s: Schemas, tables: set[str]) -> dict[str, int] | None:
    """The rows of each of `tables` (SQL such as `{S}.measurement`), in one statement;
    None when one of them cannot be counted (a missing table): the checks over them then
    run their own queries, which name the one at fault."""
    ordered = sorted(tables)
    if not ordered:
        return {}
    union = " UNION ALL ".join(
        f"SELECT {i} AS _t, count(*) FROM {s.sql(t)}" for i, t in enumerate(ordered)
    )
    try:
        with s.wh.begin_checks() as conn:
            return {ordered[int(i)]: int(n) for i, n in conn.execute(sa.text(union))}
    except sa.exc.DBAPIError as exc:
        log.debug("the checked tables could not be counted at once (%s)", exc.orig)
        return None


def _over_rows_counts(
    s: Schemas, checks: list[Check], rows: dict[str, int] | None = None
) -> dict[int, tuple[int, int]]:
    """(violating, total) of the checks whose total is their table's rows, keyed by
    id(check): each table counted once (`rows`, else `_table_rows` here), the violating
    counts `BATCH` to a statement. What errors (a table that is missing, a check that
    cannot run) is left to the batches, which run each such check's own query and name
    the one at fault."""
    picked = [(c, c.over_rows) for c in checks if c.over_rows is not None and not c.params]
    if rows is None or any(over.table not in rows for _, over in picked):
        rows = _table_rows(s, {over.table for _, over in picked})
    if not picked or rows is None:
        return {}
    out: dict[int, tuple[int, int]] = {}
    for first in range(0, len(picked), BATCH):
        batch = picked[first : first + BATCH]
        union = " UNION ALL ".join(
            f"SELECT {i} AS _check, ({s.sql(over.violating)}) AS _v"
            for i, (_, over) in enumerate(batch)
        )
        try:
            with s.wh.begin_checks() as conn:
                answers = {int(i): int(v or 0) for i, v in conn.execute(sa.text(union))}
        except sa.exc.DBAPIError as exc:
            log.debug("a batch of violating counts failed (%s); left to the batches", exc.orig)
            continue
        for i, (c, over) in enumerate(batch):
            if i in answers:
                out[id(c)] = (answers[i], rows[over.table])
    return out


def _declared(s: Schemas, checks: list[Check]) -> set[int]:
    """The ids of the checks of `DECLARED` kind whose column the catalogue declares as the
    check requires (`_declarations`): each counts 0 of its table's rows. Empty when the
    catalogue cannot be read: every check then runs its query."""
    candidates = [  # a site's own check keeps its query, whatever its name
        c
        for c in checks
        if c.name in DECLARED and c.field and not c.params and c.category != "Custom"
    ]
    if not candidates:
        return set()
    declared = _declarations(s, {c.table for c in candidates})
    return {id(c) for c in candidates if (c.name, c.field) in declared.get(c.table, set())}


def _declarations(s: Schemas, tables: set[str]) -> dict[str, set[tuple[str, str]]]:
    """Per table of `tables` (CDM names), the (check name, column) pairs its catalogue
    entry answers (`DECLARED`): its primary key when that is one column, its NOT NULL
    columns, its integer-typed columns. Read for the table the checks read (`located`)
    from information_schema, the same on DuckDB and PostgreSQL; empty when it cannot be
    read."""
    where = {s.located(t): t for t in tables}
    params = {"schemas": sorted({schema for schema, _ in where})}
    try:
        with s.wh.begin_checks() as conn:
            columns = conn.execute(
                sa.text(
                    "SELECT table_schema, table_name, column_name, is_nullable, data_type"
                    " FROM information_schema.columns WHERE table_schema IN :schemas"
                ).bindparams(sa.bindparam("schemas", expanding=True)),
                params,
            ).all()
            keys = conn.execute(
                sa.text(
                    "SELECT k.table_schema, k.table_name, k.column_name"
                    " FROM information_schema.table_constraints c"
                    " JOIN information_schema.key_column_usage k"
                    "   ON k.constraint_name = c.constraint_name"
                    "  AND k.table_schema = c.table_schema AND k.table_name = c.table_name"
                    " WHERE c.constraint_type = 'PRIMARY KEY' AND c.table_schema IN :schemas"
                ).bindparams(sa.bindparam("schemas", expanding=True)),
                params,
            ).all()
    except sa.exc.DBAPIError as exc:
        log.debug("the declarations could not be read from the catalogue (%s)", exc.orig)
        return {}
    out: dict[str, set[tuple[str, str]]] = {}
    for schema, name, column, nullable, kind in columns:
        if (schema, name) in where:
            table = out.setdefault(where[(schema, name)], set())
            if str(nullable).upper() == "NO":
                table.add(("isRequired", column))
            if str(kind).upper() in _INTEGER_TYPES:
                table.add(("cdmDatatype", column))
    key_columns: dict[tuple[str, str], list[str]] = {}
    for schema, name, column in keys:
        key_columns.setdefault((schema, name), []).append(column)
    for located, columns_ in key_columns.items():
        if located in where and len(columns_) == 1:
            out.setdefault(where[located], set()).add(("isPrimaryKey", columns_[0]))
    return out


def _batch_counts(s: Schemas, batch: list[Check]) -> list[tuple[int, int] | str]:
    """(violating, total) of each check of `batch`, or the error that kept it from
    running: in one statement when it runs whole, else check by check."""
    if len(batch) > 1 and not any(c.params for c in batch):
        union = " UNION ALL ".join(
            f"SELECT {i} AS _check, _c.* FROM ({s.sql(c.sql)}) AS _c" for i, c in enumerate(batch)
        )
        try:
            with s.wh.begin_checks() as conn:
                rows = conn.execute(sa.text(union)).all()
        except sa.exc.DBAPIError as exc:
            log.debug("a batch of checks failed (%s); running them one by one", exc.orig)
        else:
            by_check = {int(i): (int(v or 0), int(t or 0)) for i, v, t in rows}
            if len(rows) == len(batch) and len(by_check) == len(batch):
                return [by_check[i] for i in range(len(batch))]
    return [_counts(s, check) for check in batch]


def _counts(s: Schemas, check: Check) -> tuple[int, int] | str:
    """(violating, total) of one check in its own transaction, or why it could not run."""
    try:
        with s.wh.begin_checks() as conn:
            violating, total = conn.execute(sa.text(s.sql(check.sql)), check.params).one()
        return int(violating or 0), int(total or 0)
    except (sa.exc.DBAPIError, sa.exc.InvalidRequestError) as exc:
        # a check that cannot run is a failed check, never a silent pass
        orig = getattr(exc, "orig", None) or exc
        error = str(orig).splitlines()[0]
        log.error("check %s could not run: %s", check.key, error)
        return error


def _examples(s: Schemas, conn: sa.Connection, check: Check) -> list[Any]:
    key = _row_key(check.table)
    if key is None:
        return []
    sql = f"SELECT {key} FROM {{S}}.{check.table} {check.examples_sql} ORDER BY 1 LIMIT {EXAMPLES}"
    try:
        return [r[0] for r in conn.execute(sa.text(s.sql(sql)), check.params)]
    except sa.exc.DBAPIError:
        return []
