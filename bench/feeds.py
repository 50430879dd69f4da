"""The lab (HL7 v2) and PACS (DICOM) feeds of a scaled Synthea population, as in the demo.

The demo derives its lab feed from the Synthea export's laboratory observations
(etl/demo_lab.py) and its PACS tree from imaging_studies.csv (etl/sources/dicom/synth.py);
the EHR feed then excludes its own copies of both. This does the same for a scaled export
(bench/synthea_scaler.py): one ORU^R01 per (patient, encounter, date) with the same
segments as the demo (`oru_message`), 1,000 messages a file, CR line ends; one header-only
DICOM file per imaging_studies row. Deterministic: the same folder gives the same bytes.
Each folder is built beside its place, renamed into it, then marked (FOLDER.feed.json).
"""

from __future__ import annotations

import csv
import itertools
import json
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import duckdb

from etl.demo_lab import OUT as DEMO_LAB
from etl.demo_lab import RANGES, oru_message
from etl.sources.dicom.synth import demo_specs, write_tree
from etl.sql_text import sql_literal

MESSAGES_PER_FILE = 1000
MARKER = ".feed.json"
VERSION = 1  # bump when the output for a given population changes
_LAB_COLUMNS = ("PATIENT", "ENCOUNTER", "DATE", "CODE", "DESCRIPTION", "VALUE", "UNITS", "TYPE")


def _cached(out: Path, wanted: dict[str, object], build: Callable[[Path], dict]) -> dict:
    """Build `out` with build(tmp) unless its marker matches `wanted`; the marker's figures."""
    marker = out.with_name(out.name + MARKER)  # beside the tree: the feeds read every file
    if marker.is_file():
        old = json.loads(marker.read_text(encoding="utf-8"))
        if {k: old.get(k) for k in wanted} == wanted:
            return old
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    figures = {**wanted, **build(tmp)}
    marker.unlink(missing_ok=True)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    marker.write_text(json.dumps(figures), encoding="utf-8")
    return figures


def _patients(con: duckdb.DuckDBPyConnection, synthea: Path) -> dict[str, dict[str, str]]:
    """Id -> the PID fields of every patient."""
    pats = f"read_csv({sql_literal(synthea / 'patients.csv')}, all_varchar = true)"
    people = con.execute(
        f"SELECT Id, coalesce(BIRTHDATE, ''), coalesce(GENDER, '') FROM {pats}"
    ).fetchall()
    return {i: {"Id": i, "BIRTHDATE": b, "GENDER": g} for i, b, g in people}


def _lab_rows(con: duckdb.DuckDBPyConnection, synthea: Path) -> Iterator[tuple[str, ...]]:
    """Laboratory rows in message order, streamed in blocks."""
    cols = ", ".join(f'o."{c}"' for c in _LAB_COLUMNS)
    obs = f"read_csv({sql_literal(synthea / 'observations.csv')}, all_varchar = true)"
    cursor = con.execute(
        f"SELECT {cols} FROM {obs} o WHERE o.CATEGORY = 'laboratory'"
        " ORDER BY o.DATE, o.PATIENT, o.ENCOUNTER, o.CODE, o.VALUE"
    )
    while block := cursor.fetchmany(50_000):
        yield from block


def write_lab(synthea: Path, out: Path) -> dict:
    """The lab feed of `synthea` in `out` (cached); {'messages': m, 'results': r, 'files': f}."""

    def build(tmp: Path) -> dict:
        with (DEMO_LAB / RANGES).open(encoding="utf-8", newline="") as fh:
            ranges = {r["loinc"]: r["range"] for r in csv.DictReader(fh)}
        with duckdb.connect() as con:
            patients = _patients(con, synthea)
            rows = _lab_rows(con, synthea)
            messages: list[str] = []
            results = files = 0

            def flush() -> None:
                nonlocal files, messages
                if messages:
                    files += 1
                    (tmp / f"oru_{files:06d}.hl7").write_text("".join(messages), encoding="utf-8")
                    messages = []

            groups = itertools.groupby(rows, key=lambda r: (r[0], r[1], r[2]))
            for n, ((patient, encounter, date), group) in enumerate(groups, start=1):
                results_ = [dict(zip(_LAB_COLUMNS, r, strict=True)) for r in group]
                segs = oru_message(
                    f"LAB{n:09d}", date, patients[patient], encounter, f"F{n:09d}", results_, ranges
                )
                messages.append("\r".join(segs) + "\r")
                results += len(results_)
                if len(messages) == MESSAGES_PER_FILE:
                    flush()
            total = (files * MESSAGES_PER_FILE) + len(messages)
            flush()
        return {"messages": total, "results": results, "files": files}

    return _cached(out, {"source": str(synthea), "version": VERSION}, build)


def write_pacs(synthea: Path, out: Path) -> dict:
    """The PACS tree of `synthea` in `out` (cached); {'files': n}."""

    def build(tmp: Path) -> dict:
        return {"files": write_tree(tmp, demo_specs(synthea / "imaging_studies.csv"))}

    return _cached(out, {"source": str(synthea), "version": VERSION}, build)
