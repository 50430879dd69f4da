"""The run report: row accounting per feed and file, tables, unmapped codes, timings.

`report.json` is the machine contract (see the README); `report.html` renders the same
content for auditors. Both hold counts, codes, rule names and file/line coordinates only:
never a source identifier.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from etl.cdm.build.rules import DERIVED_PERSON_RULE
from etl.json_text import readable
from etl.pipeline.schemas import Schemas
from etl.sources.ehr import FileStats
from etl.sql_text import sql_literal

UNMAPPED_LIMIT = 500


def accounting(
    s: Schemas, conn: sa.Connection, files: dict[str, list[FileStats]], quarantine_reasons: list
) -> tuple[dict[str, Any], list[dict], list[dict], list[str]]:
    """Per feed and file: records_in = loaded + quarantined + filtered, checked.

    A record is loaded when the lineage store traces a CDM row to it (one record may give
    several rows). Its lines are counted distinct within each file's group rather than
    deduplicated as (feed, file, line) triples over the whole store: the same counts, but
    PostgreSQL then hashes integers per file instead of text triples (a 4.8 M-row store
    like 10,000 patients': 8 s -> 4 s; DuckDB at 100,000 patients, 43.7 M rows: 5.5 s ->
    5.1 s). DuckDB counts a big file's lines as bits (`_loaded_lines`)."""
    loaded = _loaded_lines(s, conn)
    disp = s.run(
        conn,
        "SELECT feed, source_file, status, rule, count(*) FROM {S}.disposition"
        " GROUP BY feed, source_file, status, rule ORDER BY feed, source_file, rule",
    ).all()
    quarantined_build: dict[tuple[str, str], int] = {}
    filtered: dict[tuple[str, str], int] = {}
    filtered_rows, quarantine_rows = [], list(quarantine_reasons)
    for feed, sf, status, rule, n in disp:
        target = filtered if status == "filtered" else quarantined_build
        target[(feed, sf)] = target.get((feed, sf), 0) + n
        row = {
            "feed": feed,
            "file": sf,
            "rule" if status == "filtered" else "reason": rule,
            "rows": n,
        }
        (filtered_rows if status == "filtered" else quarantine_rows).append(row)

    feeds: dict[str, Any] = {}
    errors: list[str] = []
    for feed, stats in files.items():
        totals = {"records_in": 0, "loaded": 0, "quarantined": 0, "filtered": 0}
        per_file = {}
        for st in stats:
            key = (feed, st.file)
            for rule, n in sorted(st.filtered.items()):
                filtered_rows.append({"feed": feed, "file": st.file, "rule": rule, "rows": n})
            row = {
                "record_set": st.record_set,
                "records_in": st.records_in,
                "loaded": loaded.get(key, 0),
                "quarantined": st.quarantined + quarantined_build.get(key, 0),
                "filtered": filtered.get(key, 0) + sum(st.filtered.values()),
            }
            if st.message:
                row["message"] = st.message
            per_file[st.file] = row
            for k in totals:
                totals[k] += row[k]
            if row["records_in"] != row["loaded"] + row["quarantined"] + row["filtered"]:
                errors.append(
                    f"{feed}/{st.file}: records_in {row['records_in']} != loaded {row['loaded']}"
                    f" + quarantined {row['quarantined']} + filtered {row['filtered']}"
                )
        feeds[feed] = {**totals, "files": per_file}
    return feeds, quarantine_rows, filtered_rows, errors


# Files of at least this many lineage rows have their lines counted as bits (DuckDB) ...
_BITS_MIN_ROWS = 100_000
# ... in bitstrings of at most this many bytes in all (one a file, each as wide as the
# span of line numbers of all of them)
_BITS_BUDGET = 256 << 20
_LOADED = " FROM {SL} WHERE (mapping_rule IS NULL OR mapping_rule <> {derived})"
_GROUPED = " GROUP BY feed, source_file"


def _loaded_lines(s: Schemas, conn: sa.Connection) -> dict[tuple[str, str], int]:
    """Per (feed, file): the distinct source lines the lineage store traces a row to.

    On DuckDB the files of many rows (an EHR extract's) are counted as the bits set in a
    bitstring of their line numbers (`bitstring_agg`): no hash table of every line. At a
    million patients `count(DISTINCT source_line)` over the 118 M-row store took 15 s,
    13.7 s of it for the EHR's 13 files, which their bitstrings count in 1.2 s. The other
    files (30,000 HL7 and DICOM files, 9 M rows) are counted distinct, as everything is on
    PostgreSQL: one bitstring each, as wide as the largest file's span, would not fit."""
    distinct = "SELECT feed, source_file, count(DISTINCT source_line)" + _LOADED
    if s.wh.dialect != "duckdb":
        rows = s.run(
            conn, distinct + _GROUPED, {"derived": DERIVED_PERSON_RULE}, derived=":derived"
        )
        return {(f, sf): n for f, sf, n in rows.all()}
    # the DuckDB connection itself: file names go into the SQL as literals, which
    # SQLAlchemy's text() would scan for bind parameters
    raw = conn.connection.driver_connection

    def fetch(sql: str, **extra: str) -> list:
        text = s.sql(sql, derived="$derived", **extra)
        return raw.execute(text, {"derived": DERIVED_PERSON_RULE}).fetchall()

    files = fetch(
        "SELECT feed, source_file, min(source_line), max(source_line), count(*)"
        + _LOADED
        + _GROUPED
    )
    big = sorted((f for f in files if f[4] >= _BITS_MIN_ROWS), key=lambda f: -f[4])
    if big:
        low, high = min(f[2] for f in big), max(f[3] for f in big)
        big = big[: max(0, _BITS_BUDGET * 8 // (high - low + 1))]
    if not big:
        return {(f, sf): n for f, sf, n in fetch(distinct + _GROUPED)}
    chosen = " OR ".join(
        f"(feed = {sql_literal(feed)} AND source_file IN"
        f" ({', '.join(sql_literal(f[1]) for f in big if f[0] == feed)}))"
        for feed in sorted({f[0] for f in big})
    )
    bits = f"coalesce(bit_count(bitstring_agg(source_line, {int(low)}, {int(high)})), 0)"
    counted = fetch(
        f"SELECT feed, source_file, {bits}" + _LOADED + " AND ({chosen})" + _GROUPED,
        chosen=chosen,
    )
    rest = fetch(distinct + " AND NOT coalesce({chosen}, FALSE)" + _GROUPED, chosen=chosen)
    return {(f, sf): n for f, sf, n in [*counted, *rest]}


def unmapped_codes(s: Schemas, conn: sa.Connection) -> list[dict[str, Any]]:
    """Source codes that reached no standard concept, most frequent first."""
    rows = s.run(
        conn,
        "SELECT feed, source_vocabulary, source_code, cdm_table, count(*) AS n"
        " FROM {SL} WHERE mapping_rule LIKE 'unmapped%'"
        " GROUP BY feed, source_vocabulary, source_code, cdm_table"
        " ORDER BY n DESC, feed, source_vocabulary, source_code LIMIT :limit",
        {"limit": UNMAPPED_LIMIT},
    ).all()
    return [
        {"feed": f, "vocabulary_id": v, "source_code": c, "table": t, "rows": n}
        for f, v, c, t, n in rows
    ]


def concept_gaps(s: Schemas, conn: sa.Connection, tables: list[str]) -> list[dict[str, Any]]:
    """Concept ids the built rows reference that the loaded vocabulary lacks.

    A vocabulary subset (like the demo's) lacks concepts a full Athena release has, type
    concepts among them; they are reported here, never invented. Concept 0 is not a gap.
    """
    from etl.cdm.spec import cdm_tables

    specs = cdm_tables()
    parts = [
        f"SELECT '{t}' AS cdm_table, '{f.name}' AS field, t.{f.name} AS concept_id,"
        f" count(*) AS n FROM {{S}}.{t} t"
        f" WHERE t.{f.name} <> 0 AND NOT EXISTS"
        f" (SELECT 1 FROM {{C}}.concept c WHERE c.concept_id = t.{f.name})"
        f" GROUP BY t.{f.name}"
        for t in tables
        for f in specs[t].fields
        if f.fk_table == "concept" and f.datatype == "integer"
    ]
    if not parts:
        return []
    with s.wh.without_jit(conn):  # one part per concept column (Warehouse.without_jit)
        result = s.run(conn, " UNION ALL ".join(parts) + " ORDER BY n DESC, cdm_table, field")
        rows = result.all()
    return [{"table": t, "field": f, "concept_id": c, "rows": n} for t, f, c, n in rows]


def trace_samples(s: Schemas, conn: sa.Connection, per_table: int = 3) -> dict[str, list[int]]:
    """The smallest row ids of each table, for the auditor to trace (`omop-etl trace TABLE
    ID`): `per_table` grouped minimums, each above the one before, so the lineage store is
    scanned a few times but never deduplicated or sorted whole (at 100,000 patients, 43.7 M
    rows: 1.7 s and 0.2 GiB, where a window over its distinct ids took 5.9 s and 1.8 GiB)."""
    if per_table < 1:
        return {}
    steps = ["s1 AS (SELECT cdm_table, min(cdm_id) AS cdm_id FROM {SL} GROUP BY cdm_table)"]
    steps += [
        f"s{i} AS (SELECT l.cdm_table, min(l.cdm_id) AS cdm_id FROM {{SL}} l"
        f" JOIN s{i - 1} p ON l.cdm_table = p.cdm_table AND l.cdm_id > p.cdm_id"
        " GROUP BY l.cdm_table)"
        for i in range(2, per_table + 1)
    ]
    found = " UNION ALL ".join(
        f"SELECT cdm_table, cdm_id FROM s{i}" for i in range(1, per_table + 1)
    )
    rows = s.run(
        conn,
        f"WITH {', '.join(steps)} SELECT cdm_table, cdm_id FROM ({found}) x"
        " ORDER BY cdm_table, cdm_id",
    ).all()
    out: dict[str, list[int]] = {}
    for table, row_id in rows:
        out.setdefault(table, []).append(row_id)
    return out


def _delta_parts(report: dict[str, Any]) -> list[str]:
    """The delta deliveries, the patient merges and what the build rebuilt, when any."""
    parts: list[str] = []
    deltas = report.get("deltas") or {}
    if deltas:
        parts.append("<h2>Delta deliveries</h2>")
        parts.append(
            _table(
                ["feed", "applied to run", "delivered", "replaced", "deleted", "carried over",
                 "patients touched"],
                [
                    [feed, d.get("base_run") or "(none: first delivery)",
                     *(sum(d.get(k, {}).values()) for k in
                       ("delivered", "replaced", "deleted", "carried")),
                     d.get("persons_touched", "")]
                    for feed, d in deltas.items()
                ],
            )
        )  # fmt: skip
    merges = report.get("merges") or {}
    if merges.get("in_force"):
        parts.append(
            f"<p>Patient merges in force: {merges['in_force']:,};"
            f" person records merged: {merges.get('person_records_merged', 0):,}.</p>"
        )
    scope = report.get("build_scope")
    if scope:
        if scope.get("mode") == "persons":
            text = (
                f"Build: {scope['persons_rebuilt']:,} of {scope['persons']:,} patients"
                f" rebuilt (touched by tonight's deliveries); {scope['rows_copied']:,} rows"
                " of the others copied from the warehouse."
            )
        else:
            text = f"Build: every patient rebuilt ({scope.get('reason', '')})."
        parts.append(f"<p>{html.escape(text)}</p>")
    return parts


def write_reports(report: dict[str, Any], run_dir: Path) -> tuple[Path, Path]:
    run_dir.mkdir(parents=True, exist_ok=True)
    json_path = run_dir / "report.json"
    json_path.write_text(readable(report, 2), encoding="utf-8")
    html_path = run_dir / "report.html"
    html_path.write_text(render_html(report), encoding="utf-8")
    return json_path, html_path


def _cell(value: Any) -> str:
    text = str(value)
    # long values (DICOM paths, descriptions) may wrap anywhere; numbers never do
    return (
        f"<td class='long'>{html.escape(text)}</td>"
        if len(text) > 40
        else f"<td>{html.escape(text)}</td>"
    )


def _table(headers: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(_cell(c) for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _checks_html(checks: list[dict[str, Any]], data_docs: str | None = None) -> str:
    """Checks grouped by DQD category: a summary, the failures, then every check."""
    if not checks:
        return "<h2>Quality checks</h2><p>No checks ran (the run stopped before the gate).</p>"
    engines = (
        f"<p>{sum(c.get('engine') != 'great_expectations' for c in checks)} DQD checks (SQL in"
        f" the warehouse) and {sum(c.get('engine') == 'great_expectations' for c in checks)}"
        " Great Expectations expectations generated from the CDM specification."
    )
    if data_docs:
        engines += (
            f" The run's <a href='{html.escape(data_docs)}'>Great Expectations Data Docs</a>"
            " (in this run's folder) show every expectation's result."
        )
    engines += "</p>"
    summary = []
    for category in sorted({c["category"] for c in checks}):
        group = [c for c in checks if c["category"] == category]
        failed = [c for c in group if not c["passed"]]
        summary.append([category, len(group), len(group) - len(failed),
                        sum(c["severity"] == "warning" for c in failed),
                        sum(c["severity"] == "fatal" for c in failed)])  # fmt: skip

    def rows(items: list[dict[str, Any]]) -> list[list[Any]]:
        return [
            [c["category"], c["name"], c["table"], c.get("field") or "",
             c.get("concept_id") or "", c["severity"], "pass" if c["passed"] else "FAIL",
             c["violating_rows"], c["total_rows"], f"{c.get('violating_pct', 0):.2f}",
             f"{c['threshold_pct']:g}", c.get("description", ""),
             ", ".join(map(str, c.get("examples", [])))]
            for c in items
        ]  # fmt: skip

    headers = [
        "category", "check", "table", "field", "concept", "severity", "result",
        "violating", "rows", "violating %", "threshold %", "what", "example ids",
    ]  # fmt: skip
    failed = sorted(
        (c for c in checks if not c["passed"]),
        key=lambda c: (c["severity"] != "fatal", c["category"], c["name"]),
    )
    everything = sorted(checks, key=lambda c: (c["category"], c["name"], c["table"]))
    return (
        "<h2>Quality checks</h2>"
        + engines
        + _table(["category", "checks", "passed", "failed (warning)", "failed (fatal)"], summary)
        + "<h3>Failed checks</h3>"
        + _table(headers, rows(failed))
        + f"<details><summary>All {len(checks)} checks</summary>"
        + _table(headers, rows(everything))
        + "</details>"
    )


def render_html(report: dict[str, Any]) -> str:
    """A self-contained page for auditors: the same facts as report.json."""
    status = report["status"]
    verdict = {
        "published": "Published: the gate passed and researchers see this load.",
        "refused": "Refused by the quality gate: the published warehouse is unchanged.",
        "failed": "Failed: nothing was published; the warehouse is unchanged.",
    }.get(status, status)
    banner = (
        f"<div class='banner {html.escape(status)}'>"
        f"<h1>Run {html.escape(report['run_id'])}: {html.escape(status)}</h1>"
        f"<p>{html.escape(verdict)}</p>"
    )
    if report.get("errors"):
        banner += "<ul>" + "".join(f"<li>{html.escape(e)}</li>" for e in report["errors"]) + "</ul>"
    parts = [banner + "</div>"]
    parts.append("<h2>What came in and where it went</h2>")
    rows = []
    for feed, f in report.get("feeds", {}).items():
        for name, r in f.get("files", {}).items():
            rows.append(
                [
                    feed,
                    name,
                    r["record_set"],
                    r["records_in"],
                    r["loaded"],
                    r["quarantined"],
                    r["filtered"],
                    r.get("message", ""),
                ]
            )
        rows.append(
            [
                feed,
                "(all files)",
                "",
                f["records_in"],
                f["loaded"],
                f["quarantined"],
                f["filtered"],
                "",
            ]
        )
    parts.append(
        _table(["feed", "file", "records", "in", "loaded", "quarantined", "filtered", "note"], rows)
    )
    parts.append("<h2>CDM tables</h2>")
    before = report.get("tables_before", {})
    parts.append(
        _table(
            ["table", "rows", "before this run", "change"],
            [
                [t, n, before.get(t, ""), f"{n - before[t]:+,}" if t in before else "new"]
                for t, n in report.get("tables", {}).items()
            ],
        )
    )
    parts.extend(_delta_parts(report))
    parts.append("<h2>Quarantined, by reason</h2>")
    parts.append(
        _table(
            ["feed", "file", "reason", "rows"],
            [[q["feed"], q["file"], q["reason"], q["rows"]] for q in report.get("quarantine", [])],
        )
    )
    parts.append("<h2>Filtered, by rule</h2>")
    parts.append(
        _table(
            ["feed", "file", "rule", "rows"],
            [[q["feed"], q["file"], q["rule"], q["rows"]] for q in report.get("filtered", [])],
        )
    )
    parts.append("<h2>Unmapped codes (concept 0), most frequent first</h2>")
    parts.append(
        _table(
            ["feed", "vocabulary", "code", "table", "rows"],
            [
                [u["feed"], u["vocabulary_id"], u["source_code"], u["table"], u["rows"]]
                for u in report.get("unmapped", [])
            ],
        )
    )
    parts.append("<h2>Concepts referenced but absent from the vocabulary</h2>")
    parts.append(_table(["table", "field", "concept id", "rows"],
                        [[g["table"], g["field"], g["concept_id"], g["rows"]]
                         for g in report.get("concept_gaps", [])]))  # fmt: skip
    parts.append(
        "<h2>Trace a row</h2><p>Each command prints the row, the run, feed, file"
        " and line it came from and the mapping rule (run it where the warehouse"
        " is reachable).</p>"
    )
    parts.append(_table(["table", "command"], [
        [t, f"omop-etl trace {t} {i} --config SITE.yaml"]
        for t, ids in report.get("trace_samples", {}).items() for i in ids
    ]))  # fmt: skip
    parts.append(_checks_html(report.get("checks", []), report.get("data_docs")))
    parts.append("<h2>Timings (seconds)</h2>")
    timings = [[k, f"{v:.2f}"] for k, v in report.get("timings", {}).items()]
    parts.append(_table(["step", "seconds"], timings))
    style = (
        "body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;margin:1em 0}"
        "td,th{border:1px solid #ccc;padding:4px 8px;text-align:left}"
        "th{background:#eee;white-space:nowrap}td.long{overflow-wrap:anywhere}"
        ".banner{padding:.5em 1em;border-radius:4px;border:2px solid}"
        ".published{background:#e8f5e9;border-color:#2e7d32}"
        ".refused,.failed{background:#ffebee;border-color:#c62828}"
        "@media print{details{display:block}details>*{display:block}}"
    )
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>omop-etl run "
        f"{html.escape(report['run_id'])}</title><style>{style}</style></head><body>"
        + "".join(parts)
        + "</body></html>"
    )
