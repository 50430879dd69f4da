"""Run the generated checks on the staged tables and decide: publish or refuse.

Every check is one set-based SQL query in the warehouse (DuckDB or PostgreSQL) returning
(violating rows, denominator); nothing is pulled into Python but the two counts and, for
a failed check, a few example row ids. A failed fatal check refuses the load.
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
    """Evaluate `checks` against the stage schema, each in its own read-only transaction
    (a check that errors cannot spoil the others)."""
    started = time.perf_counter()
    result = GateResult()
    for check in checks:
        error = None
        try:
            with s.wh.begin() as conn:
                violating, total = conn.execute(sa.text(s.sql(check.sql)), check.params).one()
            violating, total = int(violating or 0), int(total or 0)
        except sa.exc.DBAPIError as exc:
            # a check that cannot run is a failed check, never a silent pass
            error = str(exc.orig).splitlines()[0]
            violating, total = 0, 0
            log.error("check %s could not run: %s", check.key, error)
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
        if not passed and check.examples_sql and error is None:
            with s.wh.begin() as conn:
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


def _examples(s: Schemas, conn: sa.Connection, check: Check) -> list[Any]:
    key = _row_key(check.table)
    if key is None:
        return []
    sql = f"SELECT {key} FROM {{S}}.{check.table} {check.examples_sql} ORDER BY 1 LIMIT {EXAMPLES}"
    try:
        return [r[0] for r in conn.execute(sa.text(s.sql(sql)), check.params)]
    except sa.exc.DBAPIError:
        return []
