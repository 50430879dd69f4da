"""Read the packaged CDM v5.4 (+ imaging extension) specification CSVs.

The specification is data: every table, column, type, key and constraint the rest of the
package needs is derived from these files, never written table by table.
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from functools import cache
from importlib import resources

_SPEC_DIR = "spec_data"
IMAGING_TABLES = ("image_occurrence", "image_feature")


@dataclass(frozen=True)
class FieldSpec:
    """One column of a CDM table, as the specification describes it."""

    table: str
    name: str
    required: bool
    datatype: str  # normalised: integer, float, date, datetime, varchar(n), varchar(max)
    is_primary_key: bool
    fk_table: str | None
    fk_field: str | None
    fk_domain: str | None

    @property
    def varchar_length(self) -> int | None:
        """Declared length of a bounded varchar, else None."""
        m = re.fullmatch(r"varchar\((\d+)\)", self.datatype)
        return int(m.group(1)) if m else None


@dataclass(frozen=True)
class TableSpec:
    """One CDM table: its schema group (CDM, VOCAB, RESULTS) and ordered fields."""

    name: str
    group: str
    required: bool
    concept_prefix: str | None
    fields: tuple[FieldSpec, ...]

    @property
    def primary_key(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.fields if f.is_primary_key)

    @property
    def column_names(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.fields)

    def field(self, name: str) -> FieldSpec:
        for f in self.fields:
            if f.name == name:
                return f
        raise KeyError(f"{self.name} has no field {name!r}")


def _na(value: str) -> str | None:
    value = value.strip()
    return None if value in ("", "NA") else value


def _normalise_type(raw: str) -> str:
    t = raw.strip().lower().replace(" ", "")
    if t in ("integer", "int"):
        return "integer"
    if t in ("float", "double", "numeric"):
        return "float"
    if t in ("date", "datetime"):
        return t
    if re.fullmatch(r"varchar\((\d+|max)\)", t):
        return t
    raise ValueError(f"unknown CDM datatype {raw!r} in the specification")


def _read(name: str) -> list[dict[str, str]]:
    with (
        resources.files("etl.cdm")
        .joinpath(_SPEC_DIR, name)
        .open(encoding="utf-8", newline="") as fh
    ):
        return list(csv.DictReader(fh))


def _field_from_row(row: dict[str, str]) -> FieldSpec:
    fk_table = _na(row["fkTableName"]) if row["isForeignKey"] == "Yes" else None
    fk_field = _na(row["fkFieldName"]) if row["isForeignKey"] == "Yes" else None
    return FieldSpec(
        table=row["cdmTableName"].lower(),
        name=row["cdmFieldName"].strip().strip('"').lower(),  # the spec quotes "offset"
        required=row["isRequired"] == "Yes",
        datatype=_normalise_type(row["cdmDatatype"]),
        is_primary_key=row["isPrimaryKey"] == "Yes",
        fk_table=fk_table.lower() if fk_table else None,
        fk_field=fk_field.lower() if fk_field else None,
        fk_domain=_na(row["fkDomain"]),
    )


@cache
def cdm_tables() -> dict[str, TableSpec]:
    """All 39 CDM v5.4 tables plus the imaging extension's two, keyed by lower-case name."""
    fields: dict[str, list[FieldSpec]] = {}
    for row in _read("cdm54_fields.csv") + _read("micdm_fields.csv"):
        f = _field_from_row(row)
        fields.setdefault(f.table, []).append(f)
    tables: dict[str, TableSpec] = {}
    for row in _read("cdm54_tables.csv"):
        name = row["cdmTableName"].lower()
        tables[name] = TableSpec(
            name=name,
            group=row["schema"],
            required=row["isRequired"] == "Yes",
            concept_prefix=(_na(row["conceptPrefix"]) or "").lower() or None,
            fields=tuple(fields.pop(name)),
        )
    for name in IMAGING_TABLES:
        tables[name] = TableSpec(
            name=name,
            group="IMAGING",
            required=False,
            concept_prefix=None,
            fields=tuple(fields.pop(name)),
        )
    if fields:
        raise ValueError(f"fields for tables missing from the table list: {sorted(fields)}")
    return tables


# The files of an Athena download, in load order (referenced tables first).
ATHENA_TABLES = (
    "vocabulary",
    "domain",
    "concept_class",
    "relationship",
    "concept",
    "concept_relationship",
    "concept_ancestor",
    "concept_synonym",
    "drug_strength",
)


def vocabulary_tables() -> dict[str, TableSpec]:
    """The standardized vocabulary tables an Athena download fills, in load order."""
    tables = cdm_tables()
    return {n: tables[n] for n in ATHENA_TABLES}
