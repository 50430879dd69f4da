"""Generate the gate's checks from the CDM specification and the OHDSI DQD catalogue.

Nothing is written per table: every check comes from a row of DQD v2.8.4's catalogue
(`etl/quality/dqd/`: field, table and concept level, with DQD's thresholds) or of the CDM
specification, turned into one SQL query over the staged tables that returns
(violating rows, denominator). A check fails when violating / denominator, in percent,
exceeds its threshold; a failed *fatal* check refuses the load.

Severity: DQD's `fatal` checks are fatal; `convention` and `characterization` checks are
warnings. Sites change this per check in `quality/` (see `etl/quality/overrides.py`).
"""

from __future__ import annotations

import csv
import datetime as dt
from dataclasses import dataclass, field
from functools import cache
from importlib import resources

from etl.cdm.spec import cdm_tables

DEATH_ALLOWANCE_DAYS = 60  # DQD's plausibleBeforeDeath / plausibleDuringLife allowance
VISIT_ALLOWANCE_DAYS = 7  # DQD's withinVisitDates window


@dataclass(frozen=True)
class CheckType:
    name: str
    level: str  # TABLE | FIELD | CONCEPT
    context: str  # Verification | Validation
    category: str  # Conformance | Completeness | Plausibility
    subcategory: str
    severity: str  # fatal | convention | characterization (DQD's)


@dataclass(frozen=True)
class OverRows:
    """A check whose denominator is every row of `table`: the gate counts each table's
    rows once and runs only `violating` (a SELECT of one count) per check, where the
    check's own query counts the table again (a full scan each on PostgreSQL)."""

    table: str  # e.g. '{S}.measurement'
    violating: str  # SELECT <one count> ...

    def sql(self) -> str:
        return f"SELECT ({self.violating}), (SELECT count(*) FROM {self.table})"


@dataclass
class Check:
    """One generated check: a SQL query and how to judge its result."""

    name: str  # DQD check type, e.g. isRequired
    table: str
    field: str | None
    sql: str  # SELECT <violating>, <denominator> ... ({S} stage, {C} cdm schema)
    threshold_pct: float
    severity: str  # fatal | warning
    category: str
    subcategory: str = ""
    context: str = ""
    concept_id: int | None = None
    unit_concept_id: int | None = None
    description: str = ""
    examples_sql: str | None = None  # SELECT of a few violating rows' ids
    params: dict[str, object] = field(default_factory=dict)
    # cdmTable / cdmField: the (table, column or None) the check looks up in the catalogue;
    # the gate answers these from one read of the catalogue (etl/quality/gate.py)
    catalog: tuple[str, str | None] | None = None
    # the violating count alone, the denominator being the table's rows (the gate counts
    # each table once)
    over_rows: OverRows | None = None

    @property
    def key(self) -> str:
        parts = [self.name, self.table, self.field or ""]
        if self.concept_id is not None:
            parts.append(str(self.concept_id))
        if self.unit_concept_id is not None:
            parts.append(str(self.unit_concept_id))
        return ".".join(p for p in parts if p)


def _exists(catalog: str, condition: str) -> str:
    """(0, 1) when information_schema.<catalog> has the object in the checked schema, else
    (1, 1)."""
    return (
        f"SELECT CASE WHEN EXISTS (SELECT 1 FROM information_schema.{catalog}"
        f" WHERE table_schema = '{{SN}}' AND {condition}) THEN 0 ELSE 1 END, 1"
    )


def _anti_join(table: str, bad: str) -> OverRows:
    """(violating, rows of `table`) with the violation in a plain WHERE: PostgreSQL plans
    [NOT] EXISTS there as a (anti-)join, where inside count(*) FILTER it would run the
    subquery once per row."""
    return OverRows(table, f"SELECT count(*) FROM {table} WHERE {bad}")


def _missing(table: str, fld: str, ref: str, ref_field: str, also: str = "") -> OverRows:
    """(rows of `table` whose `fld` is set but not found in `ref`.`ref_field`, rows of
    `table`), as a LEFT JOIN kept where nothing matched: uncorrelated, where NOT EXISTS
    was a correlated subquery that DuckDB 2.0 decorrelates into a slower plan (a
    million patients' foreign keys into visit_occurrence: 13.7 s as NOT EXISTS, 2.9 s as
    anti-joins). A repeated `ref_field` value cannot change the count: only rows that
    matched nothing are counted. PostgreSQL plans both forms as the same anti-join.
    `also`: a further condition on the checked row."""
    col = f"{table}.{fld}"
    where = f"{col} IS NOT NULL AND x.{ref_field} IS NULL" + (f" AND {also}" if also else "")
    return OverRows(
        table,
        f"SELECT count(*) FROM {table} LEFT JOIN {ref} x ON x.{ref_field} = {col} WHERE {where}",
    )


def _read(name: str) -> list[dict[str, str]]:
    path = resources.files("etl.quality").joinpath("dqd", name)
    with path.open(encoding="utf-8", newline="") as fh:
        return list(csv.DictReader(fh))


@cache
def check_types() -> dict[str, CheckType]:
    """DQD's 27 check types."""
    return {
        r["checkName"]: CheckType(
            r["checkName"], r["checkLevel"], r["kahnContext"], r["kahnCategory"],
            r["kahnSubcategory"], r["severity"],
        )
        for r in _read("check_types.csv")
    }  # fmt: skip


def _severity(check_name: str) -> str:
    return "fatal" if check_types()[check_name].severity == "fatal" else "warning"


def _threshold(value: str | None) -> float:
    try:
        return float(value) if value not in (None, "") else 0.0
    except ValueError:
        return 0.0


def _new(name: str, table: str, fld: str | None, sql: str | OverRows, threshold: str | None,
         description: str, **extra: object) -> Check:  # fmt: skip
    t = check_types()[name]
    if isinstance(sql, OverRows):
        extra["over_rows"], sql = sql, sql.sql()
    return Check(
        name=name, table=table, field=fld, sql=sql, threshold_pct=_threshold(threshold),
        severity=_severity(name), category=t.category, subcategory=t.subcategory,
        context=t.context, description=description, **extra,
    )  # fmt: skip


def _date_literal(value: str) -> str:
    """DQD writes plausible dates as '19500101' or DATEADD(dd,1,GETDATE()) (tomorrow)."""
    v = value.strip().strip("'")
    if v.upper().startswith("DATEADD"):
        d = dt.date.today() + dt.timedelta(days=1)
    else:
        d = dt.datetime.strptime(v, "%Y%m%d").date()
    return f"DATE '{d.isoformat()}'"


def _field_checks(tables: set[str]) -> list[Check]:
    specs = cdm_tables()
    out: list[Check] = []
    for r in _read("field_checks.csv"):
        table, fld = r["cdmTableName"].lower(), r["cdmFieldName"].strip('"').lower()
        if table not in tables or fld not in specs[table].column_names:
            continue
        t, f = "{S}." + table, f'"{fld}"'  # quoted: the CDM has a column named "offset"
        spec = specs[table].field(fld)
        out.append(
            _new(
                "cdmField",
                table,
                fld,
                _exists("columns", f"table_name = '{table}' AND column_name = '{fld}'"),
                "0",
                f"{table}.{fld} exists",
                catalog=(table, fld),
            )
        )
        if r["isRequired"] == "Yes":
            out.append(_new(
                "isRequired", table, fld,
                f"SELECT count(*) FILTER (WHERE {f} IS NULL), count(*) FROM {t}",
                r["isRequiredThreshold"], f"{table}.{fld} is never null",
                examples_sql=f"WHERE {f} IS NULL",
            ))  # fmt: skip
        if r["cdmDatatype"] == "integer":
            out.append(_new(
                "cdmDatatype", table, fld,
                f"SELECT count(*) FILTER (WHERE {f} IS NOT NULL"
                f" AND CAST({f} AS DOUBLE PRECISION) <> CAST(CAST({f} AS BIGINT) AS DOUBLE"
                f" PRECISION)), count(*) FROM {t}",
                r["cdmDatatypeThreshold"], f"{table}.{fld} holds integers",
            ))  # fmt: skip
        if r["isPrimaryKey"] == "Yes":
            out.append(_new(
                "isPrimaryKey", table, fld,
                OverRows(
                    t,
                    f"SELECT coalesce(sum(n), 0) FROM"
                    f" (SELECT count(*) AS n FROM {t} GROUP BY {f} HAVING count(*) > 1) d",
                ),
                r["isPrimaryKeyThreshold"], f"{table}.{fld} is unique",
                examples_sql=f"WHERE {f} IN (SELECT {f} FROM {t} GROUP BY {f}"
                f" HAVING count(*) > 1)",
            ))  # fmt: skip
        fk_table = r["fkTableName"].lower()
        if r["isForeignKey"] == "Yes" and fk_table:
            ref = ("{C}." if fk_table in _VOCAB else "{S}.") + fk_table
            ref_field = r["fkFieldName"].lower()
            missing = f"{f} IS NOT NULL AND NOT EXISTS (SELECT 1 FROM {ref} x WHERE x.{ref_field} = {t}.{f})"  # noqa: E501
            out.append(_new(
                "isForeignKey", table, fld,
                _missing(t, f, ref, ref_field),
                r["isForeignKeyThreshold"], f"{table}.{fld} is in {fk_table}.{ref_field}",
                examples_sql=f"WHERE {missing}",
            ))  # fmt: skip
        if r["fkDomain"] and fk_table == "concept":
            out.append(_concept_attr(
                "fkDomain", table, fld, "domain_id", r["fkDomain"], r["fkDomainThreshold"],
            ))  # fmt: skip
        if r["fkClass"] and fk_table == "concept":
            out.append(_concept_attr(
                "fkClass", table, fld, "concept_class_id", r["fkClass"], r["fkClassThreshold"],
            ))  # fmt: skip
        if r["isStandardValidConcept"] == "Yes":
            bad = (
                f"{f} <> 0 AND NOT EXISTS (SELECT 1 FROM {{C}}.concept c WHERE c.concept_id"
                f" = {t}.{f} AND c.standard_concept = 'S' AND c.invalid_reason IS NULL)"
            )
            standard = (
                "(SELECT concept_id FROM {C}.concept WHERE standard_concept = 'S'"
                " AND invalid_reason IS NULL)"
            )
            out.append(_new(
                "isStandardValidConcept", table, fld,
                _missing(t, f, standard, "concept_id", also=f"{t}.{f} <> 0"),
                r["isStandardValidConceptThreshold"],
                f"{table}.{fld} is a standard, valid concept", examples_sql=f"WHERE {bad}",
            ))  # fmt: skip
        if r["measureValueCompleteness"] == "Yes":
            out.append(_new(
                "measureValueCompleteness", table, fld,
                f"SELECT count(*) FILTER (WHERE {f} IS NULL), count(*) FROM {t}",
                r["measureValueCompletenessThreshold"], f"{table}.{fld} is filled",
            ))  # fmt: skip
        if r["standardConceptRecordCompleteness"] == "Yes":
            out.append(_new(
                "standardConceptRecordCompleteness", table, fld,
                f"SELECT count(*) FILTER (WHERE {f} = 0), count(*) FROM {t}",
                r["standardConceptRecordCompletenessThreshold"],
                f"{table}.{fld} is mapped (not 0)",
            ))  # fmt: skip
        if r["sourceConceptRecordCompleteness"] == "Yes":
            out.append(_new(
                "sourceConceptRecordCompleteness", table, fld,
                f"SELECT count(*) FILTER (WHERE {f} = 0), count(*) FROM {t}",
                r["sourceConceptRecordCompletenessThreshold"],
                f"{table}.{fld} names a source concept (not 0)",
            ))  # fmt: skip
        std = r["standardConceptFieldName"].lower()
        if r["sourceValueCompleteness"] == "Yes" and std in specs[table].column_names:
            out.append(_new(
                "sourceValueCompleteness", table, fld,
                f"SELECT count(DISTINCT {f}) FILTER (WHERE {std} = 0), count(DISTINCT {f})"
                f" FROM {t}",
                r["sourceValueCompletenessThreshold"],
                f"distinct {table}.{fld} values mapped to a standard concept",
            ))  # fmt: skip
        out.extend(_plausibility(r, table, fld, spec.datatype))
    return out


_VOCAB = {
    "concept", "vocabulary", "domain", "concept_class", "relationship", "concept_relationship",
    "concept_ancestor", "concept_synonym", "drug_strength",
}  # fmt: skip


def _concept_attr(name: str, table: str, fld: str, attr: str, allowed: str, thr: str) -> Check:
    values = ", ".join(f"'{v.strip()}'" for v in allowed.split(","))
    bad = (
        f'"{fld}" <> 0 AND EXISTS (SELECT 1 FROM {{C}}.concept c WHERE c.concept_id ='
        f' {{S}}.{table}."{fld}" AND c.{attr} NOT IN ({values}))'
    )
    return _new(
        name, table, fld,
        _anti_join(f"{{S}}.{table}", bad), thr,
        f"{table}.{fld} concepts have {attr} in ({allowed})", examples_sql=f"WHERE {bad}",
    )  # fmt: skip


def _plausibility(r: dict[str, str], table: str, fld: str, datatype: str) -> list[Check]:
    out: list[Check] = []
    t, f = "{S}." + table, f'"{fld}"'
    is_date = datatype in ("date", "datetime")

    def value(v: str) -> str:
        if is_date:
            return _date_literal(v)
        if v.replace(" ", "").upper() == "YEAR(GETDATE())+1":  # DQD's "next year"
            return str(dt.date.today().year + 1)
        return str(float(v.strip("'")))

    column = f"CAST({f} AS DATE)" if is_date else f
    for name, op in (("plausibleValueLow", "<"), ("plausibleValueHigh", ">")):
        if r[name]:
            bad = f"{column} {op} {value(r[name])}"
            out.append(_new(
                name, table, fld,
                f"SELECT count(*) FILTER (WHERE {bad}), count({f}) FROM {t}",
                r[f"{name}Threshold"], f"{table}.{fld} {'>=' if op == '<' else '<='} {r[name]}",
                examples_sql=f"WHERE {bad}",
            ))  # fmt: skip
    has_person = "person_id" in cdm_tables()[table].column_names and table != "person"
    if not (is_date and has_person):
        return out
    person = f"JOIN {{S}}.person p ON p.person_id = {t}.person_id"
    birth = ("coalesce(CAST(p.birth_datetime AS DATE), CAST(CAST(p.year_of_birth AS VARCHAR)"
             " || '-01-01' AS DATE))")  # fmt: skip
    if r["plausibleAfterBirth"] == "Yes":
        bad = f"CAST({t}.{f} AS DATE) < {birth}"
        out.append(_new(
            "plausibleAfterBirth", table, fld,
            f"SELECT count(*) FILTER (WHERE {bad}), count({t}.{f}) FROM {t} {person}",
            r["plausibleAfterBirthThreshold"], f"{table}.{fld} is on or after birth",
            examples_sql=f"WHERE EXISTS (SELECT 1 FROM {{S}}.person p WHERE p.person_id ="
            f" {t}.person_id AND {bad})",
        ))  # fmt: skip
    death = f"LEFT JOIN {{S}}.death d ON d.person_id = {t}.person_id"
    late = f"CAST({t}.{f} AS DATE) > d.death_date + {DEATH_ALLOWANCE_DAYS}"
    for name in ("plausibleBeforeDeath", "plausibleDuringLife"):
        if r[name] == "Yes" and table != "death":
            out.append(_new(
                name, table, fld,
                f"SELECT count(*) FILTER (WHERE {late}), count({t}.{f}) FILTER (WHERE"
                f" d.person_id IS NOT NULL) FROM {t} {death}",
                r[f"{name}Threshold"],
                f"{table}.{fld} is no later than {DEATH_ALLOWANCE_DAYS} days after death",
            ))  # fmt: skip
    end = r["plausibleStartBeforeEndFieldName"].lower()
    if r["plausibleStartBeforeEnd"] == "Yes" and end in cdm_tables()[table].column_names:
        bad = f"{f} > {end}"
        out.append(_new(
            "plausibleStartBeforeEnd", table, fld,
            f"SELECT count(*) FILTER (WHERE {bad}), count(*) FILTER (WHERE {f} IS NOT NULL"
            f" AND {end} IS NOT NULL) FROM {t}",
            r["plausibleStartBeforeEndThreshold"], f"{table}.{fld} <= {end}",
            examples_sql=f"WHERE {bad}",
        ))  # fmt: skip
    after_table = r["plausibleTemporalAfterTableName"].lower()
    after_field = r["plausibleTemporalAfterFieldName"].lower()
    if r["plausibleTemporalAfter"] == "Yes" and after_table == "person":
        bad = f"CAST({t}.{f} AS DATE) < CAST(p.{after_field} AS DATE)"
        out.append(_new(
            "plausibleTemporalAfter", table, fld,
            f"SELECT count(*) FILTER (WHERE {bad}), count({t}.{f}) FROM {t} {person}",
            r["plausibleTemporalAfterThreshold"], f"{table}.{fld} >= person.{after_field}",
        ))  # fmt: skip
    visit_col = "visit_occurrence_id"
    if r["withinVisitDates"] == "Yes" and visit_col in cdm_tables()[table].column_names:
        visit = f"JOIN {{S}}.visit_occurrence v ON v.visit_occurrence_id = {t}.{visit_col}"
        bad = (f"CAST({t}.{f} AS DATE) < v.visit_start_date - {VISIT_ALLOWANCE_DAYS} OR"
               f" CAST({t}.{f} AS DATE) > v.visit_end_date + {VISIT_ALLOWANCE_DAYS}")  # fmt: skip
        out.append(_new(
            "withinVisitDates", table, fld,
            f"SELECT count(*) FILTER (WHERE {bad}), count({t}.{f}) FROM {t} {visit}",
            r["withinVisitDatesThreshold"],
            f"{table}.{fld} within its visit (+/- {VISIT_ALLOWANCE_DAYS} days)",
        ))  # fmt: skip
    return out


def _table_checks(tables: set[str]) -> list[Check]:
    out: list[Check] = []
    for r in _read("table_checks.csv"):
        table = r["cdmTableName"].lower()
        if table not in tables:
            continue
        out.append(_new(
            "cdmTable", table, None, _exists("tables", f"table_name = '{table}'"), "0",
            f"{table} exists", catalog=(table, None),
        ))  # fmt: skip
        if r["measurePersonCompleteness"] == "Yes":
            out.append(_new(
                "measurePersonCompleteness", table, None,
                f"SELECT (SELECT count(*) FROM {{S}}.person p WHERE NOT EXISTS (SELECT 1 FROM"
                f" {{S}}.{table} x WHERE x.person_id = p.person_id)),"
                " (SELECT count(*) FROM {S}.person)",
                r["measurePersonCompletenessThreshold"], f"persons with a {table} record",
            ))  # fmt: skip
        if r["measureConditionEraCompleteness"] == "Yes":
            out.append(_new(
                "measureConditionEraCompleteness", table, None,
                "SELECT (SELECT count(DISTINCT c.person_id) FROM {S}.condition_occurrence c"
                " WHERE NOT EXISTS (SELECT 1 FROM {S}.condition_era e"
                " WHERE e.person_id = c.person_id)),"
                " (SELECT count(DISTINCT person_id) FROM {S}.condition_occurrence)",
                r["measureConditionEraCompletenessThreshold"],
                "persons with conditions have condition eras",
            ))  # fmt: skip
        if r["measureObservationPeriodOverlap"] == "Yes":
            out.append(_new(
                "measureObservationPeriodOverlap", table, None,
                "SELECT (SELECT count(*) FROM {S}.observation_period a WHERE EXISTS (SELECT 1"
                " FROM {S}.observation_period b WHERE b.person_id = a.person_id"
                " AND b.observation_period_id <> a.observation_period_id"
                " AND b.observation_period_start_date <= a.observation_period_end_date"
                " AND b.observation_period_end_date >= a.observation_period_start_date)),"
                " (SELECT count(*) FROM {S}.observation_period)",
                r["measureObservationPeriodOverlapThreshold"],
                "a person's observation periods do not overlap",
            ))  # fmt: skip
    return out


def _concept_checks(tables: set[str]) -> list[Check]:
    out: list[Check] = []
    genders = {"Male": 8507, "Female": 8532}
    for r in _read("concept_checks.csv"):
        table, fld = r["cdmTableName"].lower(), r["cdmFieldName"].lower()
        if table not in tables:
            continue
        ids = [int(x) for x in r["conceptId"].split(",") if x.strip()]
        concept, in_ids = ids[0], ", ".join(map(str, ids))
        t = "{S}." + table
        if r["plausibleGender"] in genders:
            gender = genders[r["plausibleGender"]]
            out.append(_new(
                "plausibleGender", table, fld,
                f"SELECT count(*) FILTER (WHERE p.gender_concept_id <> {gender}), count(*)"
                f" FROM {t} JOIN {{S}}.person p ON p.person_id = {t}.person_id"
                f" WHERE {t}.{fld} IN ({in_ids})",
                r["plausibleGenderThreshold"],
                f"{r['conceptName']} only in {r['plausibleGender'].lower()} persons",
                concept_id=concept,
            ))  # fmt: skip
        if r["plausibleGenderUseDescendants"] in genders:
            gender = genders[r["plausibleGenderUseDescendants"]]
            out.append(_new(
                "plausibleGenderUseDescendants", table, fld,
                f"SELECT count(*) FILTER (WHERE p.gender_concept_id <> {gender}), count(*)"
                f" FROM {t} JOIN {{S}}.person p ON p.person_id = {t}.person_id"
                f" JOIN {{C}}.concept_ancestor a ON a.descendant_concept_id = {t}.{fld}"
                f" WHERE a.ancestor_concept_id IN ({in_ids})",
                r["plausibleGenderUseDescendantsThreshold"],
                f"{r['conceptName']} and descendants only in {r['plausibleGenderUseDescendants'].lower()} persons",  # noqa: E501
                concept_id=concept,
            ))  # fmt: skip
        unit = r["unitConceptId"]
        if table in ("measurement", "observation") and unit:
            where = f"WHERE {t}.{fld} IN ({in_ids}) AND {t}.unit_concept_id = {int(unit)}"
            for name, op in (("plausibleValueLow", "<"), ("plausibleValueHigh", ">")):
                if r[name]:
                    out.append(_new(
                        name, table, "value_as_number",
                        f"SELECT count(*) FILTER (WHERE value_as_number {op} {float(r[name])}),"
                        f" count(value_as_number) FROM {t} {where}",
                        r[f"{name}Threshold"],
                        f"{r['conceptName']} ({r['unitConceptName']}) value"
                        f" {'>=' if op == '<' else '<='} {r[name]}",
                        concept_id=concept, unit_concept_id=int(unit),
                    ))  # fmt: skip
        if table == "measurement" and r["plausibleUnitConceptIds"]:
            units = ", ".join(u.strip() for u in r["plausibleUnitConceptIds"].split(",") if u)
            out.append(_new(
                "plausibleUnitConceptIds", table, "unit_concept_id",
                f"SELECT count(*) FILTER (WHERE coalesce(unit_concept_id, -1) NOT IN ({units})),"
                f" count(*) FROM {t} WHERE {fld} IN ({in_ids})",
                r["plausibleUnitConceptIdsThreshold"],
                f"{r['conceptName']} in a plausible unit", concept_id=concept,
            ))  # fmt: skip
    return out


def generate_checks(tables: list[str] | set[str]) -> list[Check]:
    """Every check of the catalogue that applies to `tables` (CDM table names)."""
    wanted = set(tables)
    return [*_table_checks(wanted), *_field_checks(wanted), *_concept_checks(wanted)]
