"""Declarative EHR source profiles (YAML in mappings/profiles/), validated.

A profile says which file holds persons, visits and each kind of clinical event, which
columns carry the patient key, dates, code, code system, value and unit, and which OMOP
vocabulary each code system means. A new hospital writes a profile, not Python.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from etl.paths import MAPPINGS_DIR
from etl.yaml_models import load_yaml_model


class ProfileError(ValueError):
    """A profile that cannot be used; the message names the file and the key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Coded(_Strict):
    """A coded column: its code system is fixed (`vocabulary`) or read from another column."""

    column: str
    vocabulary: str | None = None
    vocabulary_column: str | None = None

    @model_validator(mode="after")
    def _one_system(self) -> Coded:
        if (self.vocabulary is None) == (self.vocabulary_column is None):
            raise ValueError("give exactly one of vocabulary or vocabulary_column")
        return self


class NumericWhen(_Strict):
    column: str
    equals: str


class ValueSpec(_Strict):
    """A result value: numeric when it parses (or when `numeric_when` says it must)."""

    column: str
    numeric_when: NumericWhen | None = None
    coded: Coded | None = None  # a coded answer (value_as_concept_id)


class PersonsSpec(_Strict):
    file: str
    key: str
    birth_date: str
    death_date: str | None = None
    gender: Coded
    race: Coded | None = None
    ethnicity: Coded | None = None
    state: str | None = None
    zip: str | None = None
    care_site: str | None = None
    provider: str | None = None
    # Direct identifiers in this file: never read, listed so reviews and tests can check.
    identifiers: list[str] = Field(default_factory=list)


class VisitsSpec(_Strict):
    file: str
    key: str
    person: str
    start: str
    end: str | None = None
    visit_class: Coded
    provider: str | None = None
    care_site: str | None = None


Domain = Literal[
    "Condition", "Drug", "Procedure", "Measurement", "Observation", "Device", "Specimen"
]


class EventSpec(_Strict):
    """One kind of clinical event (a file, or a filtered part of one)."""

    name: str = Field(pattern=r"^[a-z][a-z0-9_]*$")
    file: str
    key: list[str] | None = None  # natural key; default: every column the profile reads
    person: str
    visit: str | None = None
    start: str
    end: str | None = None
    code: Coded
    domain: Domain  # where the row goes when its code maps to nothing
    # Keep every row in `domain`'s table whatever its concept's domain: an allergy coded
    # with a drug's RxNorm concept is an observation, not a drug exposure.
    keep_domain: bool = False
    type_concept_id: int
    value: ValueSpec | None = None
    unit: str | None = None
    unit_vocabulary: str = "UCUM"
    range_low: str | None = None
    range_high: str | None = None
    quantity: str | None = None
    device_identifier: str | None = None
    provider: str | None = None
    # Codes whose answers identify the patient (e.g. LOINC 56799-0 "What address do you
    # live at?"): the record is kept, its value is never read into the pipeline.
    identifying_value_codes: list[str] = Field(default_factory=list)


class CareSitesSpec(_Strict):
    file: str
    key: str
    name: str | None = None
    state: str | None = None
    zip: str | None = None


class ProvidersSpec(_Strict):
    file: str
    key: str
    care_site: str | None = None
    specialty: Coded | None = None
    gender: Coded | None = None
    identifiers: list[str] = Field(default_factory=list)


class PayersSpec(_Strict):
    """A look-up of payers (insurers): their names become payer_source_value."""

    file: str
    key: str
    name: str | None = None


class PayerPlansSpec(_Strict):
    """Coverage periods of a person with a payer -> payer_plan_period."""

    file: str
    key: list[str]
    person: str
    payer: str
    start: str
    end: str | None = None
    identifiers: list[str] = Field(default_factory=list)


class ClaimsSpec(_Strict):
    """Claim headers: one cost row per claim, attached to its visit."""

    file: str
    key: str
    person: str
    visit: str
    start: str | None = None


class CostLinesSpec(_Strict):
    """Claim lines: amounts summed into their claim's cost row."""

    file: str
    key: str
    claim: str
    kind: str  # column telling a charge from a payment
    amount: str  # amount column of charges
    payment: str  # amount column of payments
    charge_kinds: list[str] = Field(default_factory=lambda: ["CHARGE"])
    payment_kinds: list[str] = Field(default_factory=lambda: ["PAYMENT"])


class Exclusion(_Strict):
    """Rows of one record set a site may turn off in its feed config (`exclude: [NAME]`).

    Excluded rows are counted as filtered under the exclusion's name, never silently
    dropped: e.g. laboratory results that the site's lab feed delivers instead.
    """

    record_set: str
    column: str | None = None  # with `equals`: only matching rows; without: every row
    equals: list[str] = Field(default_factory=list)
    description: str = ""

    @model_validator(mode="after")
    def _column_with_values(self) -> Exclusion:
        if (self.column is None) != (not self.equals):
            raise ValueError("give column and equals together, or neither (every row)")
        return self


class Profile(_Strict):
    """How to read one kind of EHR extract."""

    name: str
    description: str = ""
    format: Literal["csv", "parquet"] = "csv"
    delimiter: str = ","
    encoding: str = "utf-8"
    # Formats tried in order for every date/datetime column (DuckDB strptime syntax).
    date_formats: list[str] = Field(
        default_factory=lambda: [
            "%Y-%m-%dT%H:%M:%SZ",
            "%Y-%m-%dT%H:%M:%S",
            "%Y-%m-%d %H:%M:%S",
            "%Y-%m-%d",
            "%Y%m%d",
        ]
    )
    code_systems: dict[str, str] = Field(default_factory=dict)  # source system -> vocabulary_id
    persons: PersonsSpec
    visits: VisitsSpec | None = None
    events: list[EventSpec] = Field(default_factory=list)
    care_sites: CareSitesSpec | None = None
    providers: ProvidersSpec | None = None
    payers: PayersSpec | None = None
    payer_plans: PayerPlansSpec | None = None
    claims: ClaimsSpec | None = None
    cost_lines: CostLinesSpec | None = None
    currency_concept_id: int | None = None  # of the amounts in cost_lines
    exclusions: dict[str, Exclusion] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _unique_event_names(self) -> Profile:
        names = [e.name for e in self.events]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"event names must be unique: {', '.join(dupes)}")
        unknown = sorted(
            f"{n} ({x.record_set})" for n, x in self.exclusions.items() if x.record_set not in names
        )
        if unknown:
            raise ValueError(f"exclusions name unknown event record sets: {', '.join(unknown)}")
        files = [self.persons.file, *(e.file for e in self.events)]
        others = (
            self.visits,
            self.care_sites,
            self.providers,
            self.payers,
            self.payer_plans,
            self.claims,
            self.cost_lines,
        )
        files += [x.file for x in others if x]
        shared = sorted({f for f in files if files.count(f) > 1})
        if shared:
            # accounting is per input file: each file feeds exactly one record set
            raise ValueError(f"a file can feed only one record set: {', '.join(shared)}")
        return self


def load_profile(name_or_path: str | Path) -> Profile:
    """A profile by name (mappings/profiles/NAME.yaml) or by path."""
    path = Path(name_or_path)
    if not path.suffix:
        path = MAPPINGS_DIR / "profiles" / f"{name_or_path}.yaml"
    return load_yaml_model(path, Profile, ProfileError, "profile")
