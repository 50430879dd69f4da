"""The EHR feed: a folder of CSV or Parquet extracts read through a declarative profile.

Each file is streamed in blocks; every block is typed, checked and pseudonymised by one
DuckDB query (set-based), and split into canonical records and quarantine records (file,
line, reason). Only the columns a profile names are ever read into a query, and every
source key (patient, encounter, provider, record) is replaced by its keyed HMAC before
anything is written: direct identifiers never reach the landing area.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Sequence
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.compute as pc

from etl import canonical
from etl.pseudonym import duckdb_pseudonym_sql, install_duckdb_macro, repeated_pseudonyms
from etl.sources.background import RecordSink, prefetched
from etl.sources.dates import parse_any
from etl.sources.delimited import (
    LINE,
    count_data_lines,
    grouped,
    plain_as_text,
    plain_columns,
    stream,
)
from etl.sources.lanes import DEFAULT_LANES, lanes_by_shape, run_lanes
from etl.sources.plausible import EARLIEST, latest
from etl.sources.profile import Coded, EventSpec, Profile, ProfileError
from etl.sql_text import sql_identifier, sql_literal

log = logging.getLogger(__name__)

# ZIP3 areas with 20,000 people or fewer (HIPAA safe harbour, 2000 census): reported as 000.
RESTRICTED_ZIP3 = {
    "036",
    "059",
    "063",
    "102",
    "203",
    "556",
    "692",
    "790",
    "821",
    "823",
    "830",
    "831",
    "878",
    "879",
    "884",
    "890",
    "893",
}
KEY_SEPARATOR = "\x1f"
# marks a select of a repeated key, hashed after the query (_Query.pseudonym)
_REPEATED = "repeated key #"


@dataclass
class FileStats:
    """Accounting for one input file of one record set."""

    record_set: str
    file: str
    records_in: int = 0
    quarantined: int = 0
    extracted: int = 0
    message: str | None = None
    # records set aside at extraction by a named rule (rule -> count), e.g. a lab result
    # superseded by its correction; they count as filtered in the report
    filtered: dict[str, int] = field(default_factory=dict)


@dataclass
class Extract:
    """An in-memory sink: canonical tables per shape (small feeds and tests)."""

    tables: dict[str, list[pa.Table]] = field(default_factory=dict)

    def write(self, shape: str, table: pa.Table) -> None:
        self.tables.setdefault(shape, []).append(table)

    def table(self, shape: str) -> pa.Table:
        parts = self.tables.get(shape) or []
        schema = canonical.SHAPES[shape]
        if not parts:
            return schema.empty_table()
        return pa.concat_tables([p.cast(schema) for p in parts])


class _Query:
    """Builds the typed-and-checked SELECT for one record set over a decoded block."""

    def __init__(self, profile: Profile, feed: str, file: str, record_set: str):
        self.profile = profile
        self.columns: list[str] = []  # source columns the query reads
        self.select: dict[str, str] = {}
        self.checks: list[tuple[str, str]] = []  # (condition that is bad, reason)
        self.exclusions: list[tuple[str, str]] = []  # (condition, exclusion rule name)
        self.repeated: list[str] = []  # key expressions hashed once per distinct value
        # a look-up joined in (a state's name): DuckDB's join may reorder the rows
        self.looks_up = False
        self.feed, self.file, self.record_set = feed, file, record_set

    def col(self, name: str) -> str:
        if name not in self.columns:
            self.columns.append(name)
        return sql_identifier(name)

    def required(self, name: str) -> str:
        expr = self.col(name)
        self.checks.append((f"{expr} IS NULL", f"{name} is empty"))
        return expr

    def timestamp(self, name: str, *, required: bool, end: bool = False) -> str:
        """A date column, parsed; unparsable or implausible dates are quarantined
        (etl/sources/plausible.py: before 1850, or in the future unless an end date)."""
        expr = self.col(name)
        parsed = parse_any(expr, self.profile.date_formats)
        if required:
            self.checks.append((f"{expr} IS NULL", f"{name} is empty"))
        self.checks.append(
            (f"{expr} IS NOT NULL AND {parsed} IS NULL", f"{name} is not a recognised date")
        )
        day = f"CAST({parsed} AS DATE)"
        self.checks.append(
            (f"{day} < DATE '{EARLIEST.isoformat()}'", f"{name} is before {EARLIEST.year}")
        )
        if not end:
            self.checks.append(
                (f"{day} >= DATE '{latest().isoformat()}'", f"{name} is in the future")
            )
        return f"CAST({parsed} AS TIMESTAMP)"

    def number(self, name: str, *, must_parse: str | None = None) -> str:
        expr = self.col(name)
        parsed = f"try_cast({expr} AS DOUBLE)"
        condition = f"{expr} IS NOT NULL AND {parsed} IS NULL"
        infinite = f"NOT isfinite({parsed})"  # NaN, Infinity: parsed, but no measurement
        when = f"({must_parse}) AND " if must_parse is not None else ""
        self.checks.append((f"{when}{condition}", f"{name} is not a number"))
        self.checks.append((f"{when}{infinite}", f"{name} is not a finite number"))
        return parsed

    def pseudonym(self, expr: str, *, repeats: bool = False) -> str:
        """The pseudonym of `expr`. A key that `repeats` in the file (a foreign key: the
        patient of every event, the claim of every line) is hashed once per distinct value
        of the block, after the query (`hash_repeated`), not once per row: the HMAC is most
        of extraction's CPU. A record's own key is unique and hashed in place."""
        if not repeats:
            return duckdb_pseudonym_sql(expr)
        if expr not in self.repeated:
            self.repeated.append(expr)
        return f"{_REPEATED}{self.repeated.index(expr)}"

    def repeated_columns(self) -> dict[int, list[str]]:
        """The output columns holding each repeated key's text until `hash_repeated`."""
        out: dict[int, list[str]] = {}
        for name, expr in self.select.items():
            if expr.startswith(_REPEATED):
                out.setdefault(int(expr[len(_REPEATED) :]), []).append(name)
        return out

    def coded(self, spec: Coded) -> tuple[str, str]:
        code = self.col(spec.column)
        if spec.vocabulary is not None:
            return code, sql_literal(spec.vocabulary)
        system = self.col(spec.vocabulary_column or "")
        cases = " ".join(
            f"WHEN {sql_literal(src)} THEN {sql_literal(vocab)}"
            for src, vocab in self.profile.code_systems.items()
        )
        return code, f"CASE {system} {cases} ELSE {system} END" if cases else system

    def sql(self, source: str, plain: Collection[str] = ()) -> str:
        """The query over the block `source`, its columns binary but the `plain` ones:
        those (delimited.plain_columns: ASCII without NUL, no space at either end of any
        value) arrive as text (delimited.plain_as_text) and are taken as they are, with
        no encoding check and no trim, which could reject or change none of them (a third
        of the query's CPU on Synthea's files)."""

        # Text is valid when it decodes and holds no NUL (PostgreSQL cannot store U+0000).
        def text(c: str) -> str:
            return f"try(decode({sql_identifier(c)}))"

        def invalid(c: str) -> str:
            return f"({text(c)} IS NULL OR strpos({text(c)}, chr(0)) > 0)"

        def value(c: str) -> str:
            if c in plain:
                return f"nullif({sql_identifier(c)}, '')"
            return f"CASE WHEN {invalid(c)} THEN NULL ELSE nullif({trimmed(text(c))}, '') END"

        decoded = ", ".join(f"{value(c)} AS {sql_identifier(c)}" for c in self.columns)
        checked = [c for c in self.columns if c not in plain]
        enc = ", ".join(
            f"CASE WHEN {sql_identifier(c)} IS NOT NULL AND {invalid(c)} "
            f"THEN {sql_literal(c + ' is not valid text in the declared encoding')} END"
            for c in checked
        )
        enc_reason = f"nullif(concat_ws('; ', {enc}), '')" if checked else "CAST(NULL AS VARCHAR)"
        reason_cases = " ".join(f"WHEN {cond} THEN {sql_literal(r)}" for cond, r in self.checks)
        reason = f"CASE {reason_cases} END" if reason_cases else "NULL"
        excluded_cases = " ".join(f"WHEN {c} THEN {sql_literal(r)}" for c, r in self.exclusions)
        excluded = f"CASE {excluded_cases} END" if excluded_cases else "NULL"
        body = ", ".join(
            f"{self._text_of(expr)} AS {sql_identifier(name)}" for name, expr in self.select.items()
        )
        return f"""
            WITH d AS (
                SELECT {LINE}, {decoded}, {enc_reason} AS _enc
                FROM {source}
            )
            SELECT {body},
                   {sql_literal(self.feed)} AS feed, {sql_literal(self.file)} AS source_file,
                   {LINE} AS source_line,
                   coalesce(_enc, {reason}) AS _reason,
                   CAST({excluded} AS VARCHAR) AS _excluded
            FROM d
            {"ORDER BY source_line" if self.looks_up else ""}
        """

    def _text_of(self, expr: str) -> str:
        """A repeated key's own text (hashed after the query); any other expression as is."""
        if expr.startswith(_REPEATED):
            return self.repeated[int(expr[len(_REPEATED) :])]
        return expr


def hash_repeated(con: duckdb.DuckDBPyConnection, q: _Query, result: pa.Table) -> pa.Table:
    """`result` with each repeated key's text replaced by its pseudonym, hashed once per
    distinct value of the block (`repeated_pseudonyms`: the rows keep their order, no join,
    no sort). The table returned holds no repeated key's text."""
    for names in q.repeated_columns().values():
        pseudonyms = repeated_pseudonyms(con, result[names[0]])
        for name in names:
            result = result.set_column(result.schema.get_field_index(name), name, pseudonyms)
    return result


def trimmed(expr: str) -> str:
    """DuckDB's trim(`expr`), computed only for values that can change.

    trim() removes Unicode space separators (U+0020, U+00A0, U+3000...) and copies every
    value it is given: a third of a block's query CPU on Synthea's files, where nearly no
    value has any. A value whose first and last characters are not a space and that is
    all ASCII (bytes = characters) cannot change, so it is kept as it is; every other value
    goes through trim() itself, so the result is trim()'s exactly.
    """
    return (
        f"CASE WHEN {expr} LIKE ' %' OR {expr} LIKE '% ' OR strlen({expr}) <> length({expr})"
        f" THEN trim({expr}) ELSE {expr} END"
    )


def _zip3(expr: str) -> str:
    digits = f"regexp_replace({expr}, '[^0-9]', '', 'g')"
    restricted = ", ".join(sql_literal(z) for z in sorted(RESTRICTED_ZIP3))
    return (
        f"CASE WHEN length({digits}) >= 5 THEN CASE WHEN left({digits}, 3) IN ({restricted}) "
        f"THEN '000' ELSE left({digits}, 3) END END"
    )


def _state(q: _Query, expr: str) -> str:
    q.looks_up = True
    by_name = f"(SELECT s.code FROM us_states s WHERE upper(s.name) = upper({expr}))"
    return f"coalesce({by_name}, CASE WHEN length({expr}) = 2 THEN upper({expr}) END)"


def _persons(q: _Query) -> str:
    p = q.profile.persons
    q.select["person_key"] = q.pseudonym(q.required(p.key))
    q.select["birth_datetime"] = q.timestamp(p.birth_date, required=True)
    q.select["death_datetime"] = (
        q.timestamp(p.death_date, required=False) if p.death_date else "NULL"
    )
    for name in ("gender", "race", "ethnicity"):
        spec = getattr(p, name)
        code, vocab = q.coded(spec) if spec else ("NULL", "NULL")
        q.select[f"{name}_code"], q.select[f"{name}_vocabulary"] = code, vocab
    q.select["state"] = _state(q, q.col(p.state)) if p.state else "NULL"
    q.select["zip3"] = _zip3(q.col(p.zip)) if p.zip else "NULL"
    q.select["care_site_key"] = (
        q.pseudonym(q.col(p.care_site), repeats=True) if p.care_site else "NULL"
    )
    q.select["provider_key"] = (
        q.pseudonym(q.col(p.provider), repeats=True) if p.provider else "NULL"
    )
    return "person"


def _visits(q: _Query) -> str:
    v = q.profile.visits
    assert v is not None
    q.select["visit_key"] = q.pseudonym(q.required(v.key))
    q.select["person_key"] = q.pseudonym(q.required(v.person), repeats=True)
    q.select["class_code"], q.select["class_vocabulary"] = q.coded(v.visit_class)
    q.select["start_datetime"] = q.timestamp(v.start, required=True)
    q.select["end_datetime"] = q.timestamp(v.end, required=False, end=True) if v.end else "NULL"
    q.select["provider_key"] = (
        q.pseudonym(q.col(v.provider), repeats=True) if v.provider else "NULL"
    )
    q.select["care_site_key"] = (
        q.pseudonym(q.col(v.care_site), repeats=True) if v.care_site else "NULL"
    )
    return "visit"


def _care_sites(q: _Query) -> str:
    c = q.profile.care_sites
    assert c is not None
    q.select["care_site_key"] = q.pseudonym(q.required(c.key))
    q.select["name"] = q.col(c.name) if c.name else "NULL"
    q.select["state"] = _state(q, q.col(c.state)) if c.state else "NULL"
    q.select["zip3"] = _zip3(q.col(c.zip)) if c.zip else "NULL"
    return "care_site"


def _providers(q: _Query) -> str:
    p = q.profile.providers
    assert p is not None
    q.select["provider_key"] = q.pseudonym(q.required(p.key))
    q.select["care_site_key"] = (
        q.pseudonym(q.col(p.care_site), repeats=True) if p.care_site else "NULL"
    )
    for name in ("specialty", "gender"):
        spec = getattr(p, name)
        code, vocab = q.coded(spec) if spec else ("NULL", "NULL")
        q.select[f"{name}_code"], q.select[f"{name}_vocabulary"] = code, vocab
    return "provider"


def _payers(q: _Query) -> str:
    p = q.profile.payers
    assert p is not None
    q.select["payer_key"] = q.pseudonym(q.required(p.key))
    q.select["name"] = q.col(p.name) if p.name else "NULL"
    return "payer"


def _record_key(q: _Query, name: str, columns: list[str]) -> str:
    parts = ", ".join(f"coalesce({q.col(c)}, '')" for c in columns)
    return q.pseudonym(
        f"{sql_literal(name)} || '|' || concat_ws({sql_literal(KEY_SEPARATOR)}, {parts})"
    )


def _payer_plans(q: _Query) -> str:
    p = q.profile.payer_plans
    assert p is not None
    q.select["plan_key"] = _record_key(q, "payer_plans", p.key)
    q.select["person_key"] = q.pseudonym(q.required(p.person), repeats=True)
    q.select["payer_key"] = q.pseudonym(q.col(p.payer), repeats=True)
    q.select["start_datetime"] = q.timestamp(p.start, required=True)
    q.select["end_datetime"] = q.timestamp(p.end, required=False, end=True) if p.end else "NULL"
    return "payer_plan"


def _claims(q: _Query) -> str:
    c = q.profile.claims
    assert c is not None
    q.select["claim_key"] = q.pseudonym(q.required(c.key))
    q.select["person_key"] = q.pseudonym(q.required(c.person), repeats=True)
    q.select["visit_key"] = q.pseudonym(q.col(c.visit), repeats=True)
    q.select["start_datetime"] = q.timestamp(c.start, required=False) if c.start else "NULL"
    return "claim"


def _cost_lines(q: _Query) -> str:
    c = q.profile.cost_lines
    assert c is not None
    kind = q.col(c.kind)
    charges = ", ".join(sql_literal(k) for k in c.charge_kinds)
    payments = ", ".join(sql_literal(k) for k in c.payment_kinds)
    q.select["line_key"] = q.pseudonym(q.required(c.key))
    q.select["claim_key"] = q.pseudonym(q.required(c.claim), repeats=True)
    q.select["kind"] = (
        f"CASE WHEN {kind} IN ({charges}) THEN 'charge'"
        f" WHEN {kind} IN ({payments}) THEN 'payment' ELSE 'other' END"
    )
    amount, payment = q.number(c.amount), q.number(c.payment)
    q.select["amount"] = (
        f"CASE WHEN {kind} IN ({charges}) THEN {amount}"
        f" WHEN {kind} IN ({payments}) THEN {payment} END"
    )
    currency = q.profile.currency_concept_id
    q.select["currency_concept_id"] = f"CAST({currency} AS INTEGER)" if currency else "NULL"
    return "cost_line"


def _event(spec: EventSpec) -> Callable[[_Query], str]:
    def build(q: _Query) -> str:
        person = q.required(spec.person)
        q.select["person_key"] = q.pseudonym(person, repeats=True)
        q.select["record_set"] = sql_literal(spec.name)
        q.select["visit_key"] = (
            q.pseudonym(q.col(spec.visit), repeats=True) if spec.visit else "NULL"
        )
        code, vocab = q.coded(spec.code)
        q.required(spec.code.column)
        q.select["code"], q.select["vocabulary_id"] = code, vocab
        q.select["default_domain"] = sql_literal(spec.domain)
        q.select["keep_domain"] = "TRUE" if spec.keep_domain else "FALSE"
        q.select["type_concept_id"] = f"CAST({spec.type_concept_id} AS INTEGER)"
        q.select["start_datetime"] = q.timestamp(spec.start, required=True)
        q.select["end_datetime"] = (
            q.timestamp(spec.end, required=False, end=True) if spec.end else "NULL"
        )
        value_number = value_string = value_code = value_vocab = "NULL"
        if spec.value is not None:
            v = spec.value
            raw_value = q.col(v.column)
            must = None
            if v.numeric_when is not None:
                must = f"{q.col(v.numeric_when.column)} = {sql_literal(v.numeric_when.equals)}"
                value_number = f"CASE WHEN {must} THEN {q.number(v.column, must_parse=must)} END"
            elif v.coded is None:
                value_number = f"try_cast({raw_value} AS DOUBLE)"
            value_string = f"CASE WHEN ({value_number}) IS NULL THEN {raw_value} END"
            if v.coded is not None:
                value_code, value_vocab = q.coded(v.coded)
        if spec.identifying_value_codes:
            listed = ", ".join(sql_literal(c) for c in spec.identifying_value_codes)
            hide = f"{q.col(spec.code.column)} IN ({listed})"
            value_number, value_string, value_code = (
                f"CASE WHEN {hide} THEN NULL ELSE {v} END"
                for v in (value_number, value_string, value_code)
            )
        q.select["value_as_number"] = value_number
        q.select["value_as_string"] = value_string
        q.select["value_code"], q.select["value_vocabulary"] = value_code, value_vocab
        q.select["unit_code"] = q.col(spec.unit) if spec.unit else "NULL"
        q.select["unit_vocabulary"] = sql_literal(spec.unit_vocabulary) if spec.unit else "NULL"
        q.select["range_low"] = q.number(spec.range_low) if spec.range_low else "NULL"
        q.select["range_high"] = q.number(spec.range_high) if spec.range_high else "NULL"
        q.select["operator"] = q.select["qualifier"] = "NULL"
        q.select["quantity"] = q.number(spec.quantity) if spec.quantity else "NULL"
        # A UDI's device identifier, (01)..., names the product; serials identify a patient.
        q.select["device_identifier"] = (
            f"nullif(regexp_extract({q.col(spec.device_identifier)}, '\\(01\\)[0-9]+'), '')"
            if spec.device_identifier
            else "NULL"
        )
        q.select["provider_key"] = (
            q.pseudonym(q.col(spec.provider), repeats=True) if spec.provider else "NULL"
        )
        key = _record_key(q, spec.name, spec.key or list(q.columns))
        q.select = {"event_key": key, **q.select}
        return "event"

    return build


def _record_sets(profile: Profile) -> list[tuple[str, str, Callable[[_Query], str]]]:
    sets: list[tuple[str, str, Callable[[_Query], str]]] = [
        ("persons", profile.persons.file, _persons)
    ]
    if profile.visits:
        sets.append(("visits", profile.visits.file, _visits))
    if profile.care_sites:
        sets.append(("care_sites", profile.care_sites.file, _care_sites))
    if profile.providers:
        sets.append(("providers", profile.providers.file, _providers))
    sets.extend((e.name, e.file, _event(e)) for e in profile.events)
    for name, builder in (
        ("payers", _payers),
        ("payer_plans", _payer_plans),
        ("claims", _claims),
        ("cost_lines", _cost_lines),
    ):
        spec = getattr(profile, name)
        if spec is not None:
            sets.append((name, spec.file, builder))
    return sets


def _states_table() -> pa.Table:
    import pyarrow.csv as pacsv

    from etl.paths import MAPPINGS_DIR

    return pacsv.read_csv(MAPPINGS_DIR / "us_states.csv")


def extract_ehr(
    feed: str,
    folder: Path,
    profile: Profile,
    key: bytes,
    out: RecordSink,
    *,
    exclude: Sequence[str] = (),
    lanes: int = DEFAULT_LANES,
) -> list[FileStats]:
    """Read every file the profile names from `folder`, writing canonical records to `out`.

    Files are streamed block by block straight into the sink, so memory stays bounded by a
    block whatever the extract's size. `exclude` turns on exclusions the profile defines;
    their rows are counted as filtered. Up to `lanes` files are read at once
    (etl/sources/lanes.py); what lands is the same for any number. Returns the accounting
    of every file, in the profile's order.
    """
    unknown = sorted(set(exclude) - set(profile.exclusions))
    if unknown:
        raise ProfileError(
            f"profile {profile.name} defines no exclusion {', '.join(unknown)}"
            f" (it has: {', '.join(sorted(profile.exclusions)) or 'none'})"
        )
    plans = [
        _plan(feed, folder, profile, exclude, record_set, file_name, build)
        for record_set, file_name, build in _record_sets(profile)
    ]
    readable = [i for i, p in enumerate(plans) if p.query is not None]
    groups = lanes_by_shape([(plans[i].shape, plans[i].path.stat().st_size) for i in readable])

    def lane(indexes: list[int], sink_of: Callable[[int], RecordSink]) -> None:
        con = duckdb.connect()
        try:
            install_duckdb_macro(con, key)
            con.register("us_states", _states_table())
            for i in indexes:
                _extract_file(plans[readable[i]], sink_of(i), con)
        finally:
            con.close()

    run_lanes(groups, lane, out, workers=lanes)
    return [p.stats for p in plans]


@dataclass
class _Plan:
    """One record set's file and query, or why it is not read (`query` None)."""

    feed: str
    stats: FileStats
    path: Path
    profile: Profile
    query: _Query | None = None
    shape: str = ""


def _plan(
    feed: str,
    folder: Path,
    profile: Profile,
    exclude: Sequence[str],
    record_set: str,
    file_name: str,
    build: Callable[[_Query], str],
) -> _Plan:
    path = folder / file_name
    plan = _Plan(feed, FileStats(record_set, file_name), path, profile)
    if not path.is_file():
        plan.stats.message = f"{file_name} not found in {folder.name}/: no {record_set} records"
        log.warning("%s: %s", feed, plan.stats.message)
        return plan
    q = _Query(profile, feed, file_name, record_set)
    plan.shape = build(q)
    for name in exclude:
        rule = profile.exclusions[name]
        if rule.record_set == record_set:
            if rule.column is None:
                q.exclusions.append(("TRUE", name))
            else:
                values = ", ".join(sql_literal(v) for v in rule.equals)
                q.exclusions.append((f"{q.col(rule.column)} IN ({values})", name))
    plan.query = q
    return plan


def _extract_file(plan: _Plan, out: RecordSink, con: duckdb.DuckDBPyConnection) -> None:
    """Stream one file through its query into `out`, accounting in `plan.stats`."""
    q, stats, profile, path = plan.query, plan.stats, plan.profile, plan.path
    assert q is not None
    feed, record_set, file_name, shape = plan.feed, stats.record_set, stats.file, plan.shape
    raw, batches = stream(
        path,
        delimiter=profile.delimiter,
        encoding=profile.encoding,
        fmt=profile.format,
        columns=q.columns,
    )
    missing = [c for c in q.columns if c not in raw.header]
    if raw.problem or missing:
        n = count_data_lines(path) if profile.format == "csv" else 0
        reason = raw.problem or f"column(s) missing from the file: {', '.join(missing)}"
        stats.records_in = stats.quarantined = n
        stats.message = reason
        out.write("quarantine", _whole_file_quarantine(record_set, reason, feed, file_name, n))
        log.error("%s/%s: %s; %d record(s) quarantined", feed, file_name, reason, n)
        return
    queries: dict[frozenset[str], str] = {}  # by a block's plain columns (nearly always one)
    # parsed ahead in a thread; closed on the way out, so an error here stops it at once
    with closing(prefetched(batches)) as ahead:
        for batch in grouped(ahead):
            plain = plain_columns(batch, q.columns)
            if plain not in queries:
                queries[plain] = q.sql("batch", plain)
            con.register("batch", plain_as_text(batch, plain))
            result = hash_repeated(con, q, con.sql(queries[plain]).to_arrow_table())
            con.unregister("batch")
            stats.records_in += result.num_rows
            if q.exclusions:
                _count_excluded(stats, result["_excluded"])
                result = _rows_where_null(result, "_excluded")
            result = result.drop_columns(["_excluded"])
            bad = result.filter(result["_reason"].is_valid())
            good = _rows_where_null(result, "_reason").drop_columns(["_reason"])
            stats.quarantined += bad.num_rows
            stats.extracted += good.num_rows
            out.write(shape, good.select(canonical.SHAPES[shape].names))
            if bad.num_rows:
                out.write(
                    "quarantine",
                    pa.table(
                        {
                            "record_set": _repeat(record_set, bad.num_rows),
                            "reason": bad["_reason"],
                            "feed": bad["feed"],
                            "source_file": bad["source_file"],
                            "source_line": bad["source_line"],
                        }
                    ),
                )
    _account_unparsed_rows(out, stats, raw, record_set, feed, file_name)
    log.info(
        "%s/%s: %d record(s), %d quarantined",
        feed,
        file_name,
        stats.records_in,
        stats.quarantined,
    )


def _rows_where_null(table: pa.Table, column: str) -> pa.Table:
    """The rows of `table` whose `column` is null; `table` itself when all are (nearly
    every block: a filter would copy every value of it, about 2 s of CPU at 100,000
    patients)."""
    values = table[column]
    if values.null_count == len(values):
        return table
    return table.filter(values.is_null())


def _count_excluded(stats: FileStats, excluded: pa.ChunkedArray) -> None:
    counts = pc.value_counts(excluded.drop_null()) if excluded.null_count < len(excluded) else []
    for item in counts:
        rule, n = item["values"].as_py(), item["counts"].as_py()
        stats.filtered[rule] = stats.filtered.get(rule, 0) + n


def _account_unparsed_rows(out: RecordSink, stats: FileStats, raw, record_set, feed, file_name):
    lines = [ln for ln, _ in raw.malformed]
    reasons = [r for _, r in raw.malformed]
    if raw.unreadable:
        # the rest of the file after an undecodable block: count its lines, quarantine them
        total = count_data_lines(raw.path)
        rest = max(0, total - stats.records_in - len(lines))
        stats.message = f"unreadable after record {stats.records_in}: {raw.unreadable}"
        log.error("%s/%s: %s", feed, file_name, stats.message)
        lines += [None] * rest
        reasons += [f"file unreadable from here: {raw.unreadable}"] * rest
    if not lines:
        return
    n = len(lines)
    stats.records_in += n
    stats.quarantined += n
    out.write(
        "quarantine",
        pa.table(
            {
                "record_set": _repeat(record_set, n),
                "reason": pa.array(reasons),
                "feed": _repeat(feed, n),
                "source_file": _repeat(file_name, n),
                "source_line": pa.array([ln if ln is not None else -1 for ln in lines], pa.int64()),
            }
        ),
    )


def _repeat(value: str, n: int) -> pa.Array:
    return pa.repeat(pa.scalar(value, pa.string()), n)


def _whole_file_quarantine(record_set: str, reason: str, feed: str, file: str, n: int) -> pa.Table:
    return pa.table(
        {
            "record_set": _repeat(record_set, n),
            "reason": _repeat(reason, n),
            "feed": _repeat(feed, n),
            "source_file": _repeat(file, n),
            "source_line": pa.array(range(2, n + 2), pa.int64()),
        }
    )
