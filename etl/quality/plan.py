"""What the gate runs: the generated DQD checks and GE expectations, with overrides applied.

The project's policy (quality/*.yaml) is applied first, then a site's own folder of
overrides; a disabled check or expectation is dropped, custom SQL checks are added.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from etl.paths import QUALITY_DIR
from etl.quality.checks import Check, generate_checks
from etl.quality.overrides import Overrides, apply_overrides, load_overrides

if TYPE_CHECKING:
    from etl.quality.expectations import Expectation


def gate_plan(
    tables: list[str] | set[str], site_quality: Path | None = None
) -> tuple[list[Check], list[Expectation]]:
    """The checks and expectations for `tables`, with policy and site overrides applied."""
    return sql_plan(tables, site_quality), expectation_plan(tables, site_quality)


def sql_plan(tables: list[str] | set[str], site_quality: Path | None = None) -> list[Check]:
    """The DQD and custom SQL checks for `tables`, with the overrides applied."""
    return apply_overrides(generate_checks(tables), _overrides(site_quality))


def expectation_plan(
    tables: list[str] | set[str], site_quality: Path | None = None
) -> list[Expectation]:
    """The Great Expectations expectations for `tables` that the overrides keep.

    Imports Great Expectations (seconds): the gate calls it in GE's own thread, beside
    the SQL checks, so that the import costs the run no time of its own."""
    from etl.quality.expectations import generate_expectations

    overrides = _overrides(site_quality)
    expectations = generate_expectations(tables)
    kept = apply_overrides(
        [e.check for e in expectations], overrides.model_copy(update={"custom": []})
    )
    kept_ids = {id(c) for c in kept}
    return [e for e in expectations if id(e.check) in kept_ids]


def _overrides(site_quality: Path | None) -> Overrides:
    """The project's policy (quality/*.yaml), then the site's own folder of overrides."""
    files = sorted(QUALITY_DIR.glob("*.yaml"))
    if site_quality is not None and site_quality.resolve() != QUALITY_DIR.resolve():
        files += sorted(site_quality.glob("*.yaml"))
    return load_overrides(files)
