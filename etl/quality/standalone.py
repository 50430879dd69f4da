"""Run the gate's checks on any existing CDM v5.4 warehouse (not only this pipeline's stage).

An auditor's ad-hoc check: the same generated checks and overrides, evaluated in place on
the CDM schema (its tables and its vocabulary).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from etl.cdm.spec import ATHENA_TABLES, cdm_tables
from etl.pipeline.schemas import Schemas
from etl.quality.expectations import run_expectations
from etl.quality.gate import GateResult, run_checks
from etl.quality.plan import gate_plan
from etl.warehouse.base import Warehouse

RESEARCHER_TABLES = {"cohort", "cohort_definition"}


@dataclass(frozen=True)
class InPlace(Schemas):
    """Schemas whose 'stage' is the CDM schema itself: checks read the published tables."""

    @property
    def stage(self) -> str:
        return self.cdm


def existing_tables(wh: Warehouse, schema: str) -> list[str]:
    present = set(wh.table_names(schema))
    return [
        t for t in cdm_tables()
        if t in present and t not in ATHENA_TABLES and t not in RESEARCHER_TABLES
    ]  # fmt: skip


def check_warehouse(
    wh: Warehouse, schema: str, quality_dir: Path | None = None, out: Path | None = None
) -> tuple[GateResult, list[str], Path | None]:
    """Run every applicable check and expectation on the CDM tables present in `schema`.

    Returns the result, the CDM tables that were missing (reported, not checked) and the
    Great Expectations Data Docs index (written under `out`, when given).
    """
    tables = existing_tables(wh, schema)
    missing = [
        t for t in cdm_tables()
        if t not in tables and t not in ATHENA_TABLES and t not in RESEARCHER_TABLES
    ]  # fmt: skip
    checks, expectations = gate_plan(tables, quality_dir)
    where = InPlace(wh, schema)
    result = run_checks(where, checks)
    docs = None
    if out is not None:
        with wh.begin() as conn:
            counts = {t: wh.count_rows(conn, schema, t) for t in tables}
        suites = run_expectations(where, expectations, counts, out)
        result.checks.extend(suites.checks)
        docs = suites.docs
    return result, missing, docs
