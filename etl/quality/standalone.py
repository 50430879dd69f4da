"""Run the gate's checks on any existing CDM v5.4 warehouse (not only this pipeline's stage).

An auditor's ad-hoc check: the same generated checks and overrides, evaluated in place on
the CDM schema (its tables and its vocabulary).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from etl.cdm.spec import ATHENA_TABLES, cdm_tables
from etl.paths import QUALITY_DIR
from etl.pipeline.schemas import Schemas
from etl.quality.checks import generate_checks
from etl.quality.gate import GateResult, run_checks
from etl.quality.overrides import apply_overrides, load_overrides
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
    wh: Warehouse, schema: str, quality_dir: Path | None = None
) -> tuple[GateResult, list[str]]:
    """Run every applicable check on the CDM tables present in `schema`.

    Returns the result and the CDM tables that were missing (reported, not checked).
    """
    tables = existing_tables(wh, schema)
    missing = [
        t for t in cdm_tables()
        if t not in tables and t not in ATHENA_TABLES and t not in RESEARCHER_TABLES
    ]  # fmt: skip
    files = sorted(QUALITY_DIR.glob("*.yaml"))
    if quality_dir is not None:
        files += sorted(quality_dir.glob("*.yaml"))
    checks = apply_overrides(generate_checks(tables), load_overrides(files))
    return run_checks(InPlace(wh, schema), checks), missing
