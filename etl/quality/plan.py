"""What the gate runs: the generated DQD checks and GE expectations, with overrides applied.

The project's policy (quality/*.yaml) is applied first, then a site's own folder of
overrides; a disabled check or expectation is dropped, custom SQL checks are added.
"""

from __future__ import annotations

from pathlib import Path

from etl.paths import QUALITY_DIR
from etl.quality.checks import Check, generate_checks
from etl.quality.expectations import Expectation, generate_expectations
from etl.quality.overrides import apply_overrides, load_overrides


def gate_plan(
    tables: list[str] | set[str], site_quality: Path | None = None
) -> tuple[list[Check], list[Expectation]]:
    """The checks and expectations for `tables`, with policy and site overrides applied."""
    files = sorted(QUALITY_DIR.glob("*.yaml"))
    if site_quality is not None and site_quality.resolve() != QUALITY_DIR.resolve():
        files += sorted(site_quality.glob("*.yaml"))
    overrides = load_overrides(files)
    checks = apply_overrides(generate_checks(tables), overrides)
    expectations = generate_expectations(tables)
    kept = apply_overrides(
        [e.check for e in expectations], overrides.model_copy(update={"custom": []})
    )
    kept_ids = {id(c) for c in kept}
    return checks, [e for e in expectations if id(e.check) in kept_ids]
