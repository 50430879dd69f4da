"""Site overrides of the generated checks: YAML files in `quality/`, validated.

```yaml
checks:
  - match: {name: isForeignKey, table: measurement, field: measurement_type_concept_id}
    severity: warning          # or fatal
    threshold_pct: 5           # percent of violating rows allowed
  - match: {name: plausibleGender}
    enabled: false
custom:
  - name: no_future_visits
    table: visit_occurrence
    severity: fatal
    threshold_pct: 0
    sql: >-
      SELECT count(*) FILTER (WHERE visit_start_date > CURRENT_DATE), count(*)
      FROM {S}.visit_occurrence
```

A `match` selects checks by any of name, table, field (and `fk_table: concept` for the
foreign keys into CONCEPT); every selected check takes the given settings. A custom check
is SQL returning (violating rows, denominator) over the staged tables (`{S}`; the
vocabulary is in `{C}`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from etl.quality.checks import Check
from etl.yaml_models import load_yaml_model


class OverrideError(ValueError):
    """An override file that cannot be used; the message names the file and the key."""


class Match(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str | None = None
    table: str | None = None
    field: str | None = None
    fk_table: str | None = None


class CheckOverride(BaseModel):
    model_config = ConfigDict(extra="forbid")
    match: Match
    enabled: bool = True
    severity: Literal["fatal", "warning"] | None = None
    threshold_pct: float | None = Field(default=None, ge=0, le=100)
    reason: str = ""


class CustomCheck(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=r"^[A-Za-z][A-Za-z0-9_]*$")
    table: str
    field: str | None = None
    severity: Literal["fatal", "warning"] = "fatal"
    threshold_pct: float = Field(default=0, ge=0, le=100)
    sql: str
    description: str = ""


class Overrides(BaseModel):
    model_config = ConfigDict(extra="forbid")
    checks: list[CheckOverride] = Field(default_factory=list)
    custom: list[CustomCheck] = Field(default_factory=list)


def load_overrides(paths: list[Path]) -> Overrides:
    merged = Overrides()
    for path in paths:
        one = load_yaml_model(path, Overrides, OverrideError)
        merged.checks += one.checks
        merged.custom += one.custom
    return merged


def _matches(m: Match, check: Check, fk_tables: dict[str, str]) -> bool:
    if m.name and m.name != check.name:
        return False
    if m.table and m.table != check.table:
        return False
    if m.field and m.field != check.field:
        return False
    return not (m.fk_table and fk_tables.get(check.key) != m.fk_table)


def apply_overrides(checks: list[Check], overrides: Overrides) -> list[Check]:
    """The checks with the site's settings applied, disabled ones removed, custom ones added."""
    from etl.cdm.spec import cdm_tables

    specs = cdm_tables()
    fk_tables = {}
    for c in checks:
        if c.name == "isForeignKey" and c.field:
            fk_tables[c.key] = specs[c.table].field(c.field).fk_table or ""
    out: list[Check] = []
    for check in checks:
        enabled = True
        for o in overrides.checks:
            if _matches(o.match, check, fk_tables):
                enabled = o.enabled
                if o.severity:
                    check.severity = o.severity
                if o.threshold_pct is not None:
                    check.threshold_pct = o.threshold_pct
        if enabled:
            out.append(check)
    for c in overrides.custom:
        out.append(
            Check(name=c.name, table=c.table, field=c.field, sql=c.sql,
                  threshold_pct=c.threshold_pct, severity=c.severity, category="Custom",
                  description=c.description or f"site check {c.name}")
        )  # fmt: skip
    return out
