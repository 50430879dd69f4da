"""Scale the bundled Synthea demo population (27 patients) to any number of patients.

    python bench/synthea_scaler.py N [--out bench/out/synthea_N] [--no-billing]

The 27 patients are replicated ceil(N/27) times and the first N (replica, patient) pairs
are kept, in a fixed order (replica, then patient Id). Everything is set-based DuckDB SQL
(no Python loop per row) and deterministic: the same N gives byte-identical files.

Per replica r:

- every key of the patient's records (patient, encounter, care plan, imaging study,
  claim, transaction and member ids) becomes md5(old id || '/' || r) formatted as a
  UUID, and every foreign key to them is rewritten with the same function, so
  references stay consistent across files;
- the patient is made a distinct person: r is appended to FIRST, LAST and MAIDEN, and
  SSN, DRIVERS and PASSPORT are derived from the patient's global index (unique up to
  one million patients);
- BIRTHDATE, DEATHDATE and every event date of the patient move back by r % 365 days
  (never into the future; intervals and the order of events are unchanged);
- DICOM series and instance UIDs get ".r" appended.

organizations.csv, providers.csv and payers.csv are reference data, copied unchanged.
The billing files (claims.csv, claims_transactions.csv, payer_transitions.csv) hold
~70% of the rows and ~80% of the bytes; `billing=False` writes them with their header
and no rows (a population without payer_plan_period and cost).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import duckdb

from etl.sql_text import sql_identifier, sql_literal

REPO = Path(__file__).resolve().parents[1]
SOURCE = REPO / "demo" / "synthea27"
MARKER = ".scaled.json"
VERSION = 1  # bump when the output for a given N changes
REFERENCE_FILES = ("organizations.csv", "providers.csv", "payers.csv")


@dataclass(frozen=True)
class FileSpec:
    """How to replicate one per-patient file."""

    patient: str  # the column holding the patient's Id
    ids: tuple[str, ...]  # columns rewritten to the replica's key (the patient column included)
    dates: tuple[str, ...] = ()  # columns shifted by the replica's offset
    dicom_uids: tuple[str, ...] = ()  # columns that get ".r" appended
    billing: bool = False


PATIENT_FILES: dict[str, FileSpec] = {
    "patients.csv": FileSpec("Id", ("Id",), ("BIRTHDATE", "DEATHDATE")),
    "encounters.csv": FileSpec("PATIENT", ("Id", "PATIENT"), ("START", "STOP")),
    "conditions.csv": FileSpec("PATIENT", ("PATIENT", "ENCOUNTER"), ("START", "STOP")),
    "medications.csv": FileSpec("PATIENT", ("PATIENT", "ENCOUNTER"), ("START", "STOP")),
    "immunizations.csv": FileSpec("PATIENT", ("PATIENT", "ENCOUNTER"), ("DATE",)),
    "procedures.csv": FileSpec("PATIENT", ("PATIENT", "ENCOUNTER"), ("START", "STOP")),
    "observations.csv": FileSpec("PATIENT", ("PATIENT", "ENCOUNTER"), ("DATE",)),
    "allergies.csv": FileSpec("PATIENT", ("PATIENT", "ENCOUNTER"), ("START", "STOP")),
    "devices.csv": FileSpec("PATIENT", ("PATIENT", "ENCOUNTER"), ("START", "STOP")),
    "supplies.csv": FileSpec("PATIENT", ("PATIENT", "ENCOUNTER"), ("DATE",)),
    "careplans.csv": FileSpec("PATIENT", ("Id", "PATIENT", "ENCOUNTER"), ("START", "STOP")),
    "imaging_studies.csv": FileSpec(
        "PATIENT",
        ("Id", "PATIENT", "ENCOUNTER"),
        ("DATE",),
        dicom_uids=("SERIES_UID", "INSTANCE_UID"),
    ),
    "claims.csv": FileSpec(
        "PATIENTID",
        ("Id", "PATIENTID", "APPOINTMENTID"),
        (
            "CURRENTILLNESSDATE",
            "SERVICEDATE",
            "LASTBILLEDDATE1",
            "LASTBILLEDDATE2",
            "LASTBILLEDDATEP",
        ),
        billing=True,
    ),
    "claims_transactions.csv": FileSpec(
        "PATIENTID",
        ("ID", "CLAIMID", "PATIENTID", "APPOINTMENTID", "PATIENTINSURANCEID"),
        ("FROMDATE", "TODATE"),
        billing=True,
    ),
    "payer_transitions.csv": FileSpec(
        "PATIENT", ("PATIENT", "MEMBERID"), ("START_YEAR", "END_YEAR"), billing=True
    ),
}


def _new_id(expr: str) -> str:
    """SQL: the replica's UUID-shaped key for the id `expr` (NULL stays NULL)."""
    h = f"md5({expr} || '/' || CAST(rep.r AS VARCHAR))"
    parts = [(1, 8), (9, 4), (13, 4), (17, 4), (21, 12)]
    uuid = "concat_ws('-', " + ", ".join(f"substr({h}, {a}, {n})" for a, n in parts) + ")"
    return f"CASE WHEN {expr} IS NOT NULL THEN {uuid} END"


def _shifted(expr: str) -> str:
    """SQL: a Synthea date or timestamp text moved back by the replica's offset."""
    day = f"try_cast(left({expr}, 10) AS DATE)"
    moved = f"strftime({day} - rep.shift_days, '%Y-%m-%d') || substr({expr}, 11)"
    return f"coalesce({moved}, {expr})"


def _patient_field(name: str) -> str | None:
    """SQL for a patient-identifying column of patients.csv, or None to keep it."""
    col = f"t.{sql_identifier(name)}"
    g = "rep.g"
    if name in ("FIRST", "LAST", "MAIDEN"):
        return f"{col} || CAST(rep.r AS VARCHAR)"
    if name == "SSN":
        return (
            f"'999-' || lpad(CAST({g} // 10000 % 100 AS VARCHAR), 2, '0')"
            f" || '-' || lpad(CAST({g} % 10000 AS VARCHAR), 4, '0')"
        )
    if name == "DRIVERS":
        return f"CASE WHEN {col} IS NOT NULL THEN 'S9' || lpad(CAST({g} AS VARCHAR), 7, '0') END"
    if name == "PASSPORT":
        return (
            f"CASE WHEN {col} IS NOT NULL THEN 'X' || lpad(CAST({g} AS VARCHAR), 8, '0') || 'X' END"
        )
    return None


def _select(name: str, spec: FileSpec, columns: list[str]) -> str:
    missing = [
        c for c in (spec.patient, *spec.ids, *spec.dates, *spec.dicom_uids) if c not in columns
    ]
    if missing:
        raise ValueError(f"{name}: column(s) not in the header: {', '.join(missing)}")
    exprs = []
    for c in columns:
        col = f"t.{sql_identifier(c)}"
        if c in spec.ids:
            expr = _new_id(col)
        elif c in spec.dates:
            expr = _shifted(col)
        elif c in spec.dicom_uids:
            expr = f"{col} || '.' || CAST(rep.r AS VARCHAR)"
        elif name == "patients.csv":
            expr = _patient_field(c) or col
        else:
            expr = col
        exprs.append(f"{expr} AS {sql_identifier(c)}")
    return (
        f"SELECT {', '.join(exprs)} FROM src t"
        f" JOIN replicas rep ON rep.patient = t.{sql_identifier(spec.patient)}"
        " ORDER BY rep.r, t._row"
    )


def _marker(n_patients: int, billing: bool) -> dict[str, object]:
    return {"n_patients": n_patients, "billing": billing, "version": VERSION}


def _copy_csv(con: duckdb.DuckDBPyConnection, sql: str, path: Path) -> None:
    con.execute(f"COPY ({sql}) TO {sql_literal(path)} (FORMAT csv, HEADER, DELIMITER ',')")


def _load_source(con: duckdb.DuckDBPyConnection, path: Path) -> list[str]:
    """Load one demo file as table `src` (all text) with `_row`, its line order."""
    con.execute("SET threads = 1")  # one reader thread: row_number() follows the file
    con.execute(
        "CREATE OR REPLACE TEMP TABLE src AS SELECT row_number() OVER () AS _row, *"
        f" FROM read_csv({sql_literal(path)}, header = true, delim = ',', quote = '\"',"
        " all_varchar = true)"
    )
    con.execute("RESET threads")
    return [r[0] for r in con.execute("DESCRIBE src").fetchall() if r[0] != "_row"]


def scale(n_patients: int, out_dir: Path, *, billing: bool = True) -> Path:
    """Write a Synthea CSV folder of `n_patients` patients to `out_dir`; returns it.

    Idempotent: a folder whose marker says it was made for the same arguments is kept.
    The folder is built beside `out_dir` and renamed into place, so an interrupted run
    never leaves a folder that looks complete.
    """
    if n_patients < 1:
        raise ValueError("n_patients must be at least 1")
    out_dir = Path(out_dir)
    wanted = _marker(n_patients, billing)
    marker = out_dir / MARKER
    if marker.is_file() and json.loads(marker.read_text(encoding="utf-8")) == wanted:
        return out_dir
    tmp = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    spill = out_dir.parent / ".duckdb_tmp"
    con = duckdb.connect(config={"temp_directory": str(spill)})
    try:
        _load_source(con, SOURCE / "patients.csv")
        n_source = con.execute("SELECT count(*) FROM src").fetchone()[0]
        replicas = math.ceil(n_patients / n_source)
        # (source patient, replica r, global index g, date shift): the first N pairs.
        con.execute(
            f"""
            CREATE TEMP TABLE replicas AS
            WITH p AS (SELECT "Id" AS patient, row_number() OVER (ORDER BY "Id") - 1 AS i
                       FROM src)
            SELECT p.patient, CAST(r.range AS BIGINT) AS r, r.range * {n_source} + p.i AS g,
                   CAST(r.range % 365 AS INTEGER) AS shift_days
            FROM p CROSS JOIN range({replicas}) r
            WHERE r.range * {n_source} + p.i < {n_patients}
            """
        )
        for name, spec in PATIENT_FILES.items():
            columns = _load_source(con, SOURCE / name)
            sql = _select(name, spec, columns)
            if spec.billing and not billing:
                sql += " LIMIT 0"
            _copy_csv(con, sql, tmp / name)
        for name in REFERENCE_FILES:
            shutil.copyfile(SOURCE / name, tmp / name)
    finally:
        con.close()
        shutil.rmtree(spill, ignore_errors=True)
    (tmp / MARKER).write_text(json.dumps(wanted), encoding="utf-8")
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    return out_dir


def count_rows(folder: Path) -> dict[str, int]:
    """Data rows per CSV file of `folder` (DuckDB count, quoting-aware)."""
    con = duckdb.connect()
    try:
        return {
            p.name: con.execute(
                f"SELECT count(*) FROM read_csv({sql_literal(p)}, header=true, all_varchar=true)"
            ).fetchone()[0]
            for p in sorted(folder.glob("*.csv"))
        }
    finally:
        con.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("n_patients", type=int)
    ap.add_argument("--out", type=Path, help="default: bench/out/synthea_<N>")
    ap.add_argument(
        "--no-billing",
        dest="billing",
        action="store_false",
        help="leave claims, claims_transactions and payer_transitions empty",
    )
    args = ap.parse_args()
    out = args.out or REPO / "bench" / "out" / f"synthea_{args.n_patients}"
    started = time.perf_counter()
    scale(args.n_patients, out, billing=args.billing)
    seconds = time.perf_counter() - started
    rows = count_rows(out)
    size_mb = sum(p.stat().st_size for p in out.glob("*.csv")) / 2**20
    print(f"{out}: {sum(rows.values()):,} rows, {size_mb:.0f} MiB, {seconds:.1f}s")
    for name, n in rows.items():
        print(f"  {name:28} {n:>12,}")


if __name__ == "__main__":
    main()
