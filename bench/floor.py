"""The floor: what DuckDB alone needs to read a run's input and write its output rows.

    python -m bench.floor --synthea DIR [--lab DIR] [--pacs DIR] --tables JSON --out DIR
                          [--threads T] [--memory-limit 6GB]

One DuckDB connection (same threads and memory limit as the pipeline) does the I/O no
pipeline can avoid, and nothing else:

- read: every EHR CSV parsed into typed columns and every column of every row hashed
  (streamed, nothing kept); every HL7 file read and split into segments and fields; every
  DICOM file read whole (read_blob);
- write: for each CDM table the run published, as many rows to Parquet as it published,
  with the table's columns and types (values derived from the row number; ids hashed, so
  they compress as little as real keys do).

Prints one JSON object: seconds per part, CPU seconds, rows, and the process's peak RSS.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import duckdb

from bench.measure import peak_rss_mb
from etl.sql_text import sql_literal


def _value(datatype: str, k: int) -> str:
    """SQL for a column of CDM type `datatype` on row `i` (k: the column's position)."""
    if datatype == "integer":
        return f"CAST(hash(i, {k}) % 2147483647 AS INTEGER)"
    if datatype == "float":
        return f"i * 0.25 + {k}"
    if datatype == "date":
        return "DATE '2000-01-01' + CAST(i % 9000 AS INTEGER)"
    if datatype == "datetime":
        return "TIMESTAMP '2000-01-01' + to_seconds(i * 37)"
    return f"left(md5(CAST(i + {k} AS VARCHAR)), 12)"


def read_input(
    con: duckdb.DuckDBPyConnection, synthea: Path, lab: Path | None, pacs: Path | None
) -> dict:
    """Parse every input file once; records and bytes seen."""
    csv_rows = 0
    for path in sorted(synthea.glob("*.csv")):
        csv_rows += con.execute(
            f"SELECT count(*), sum(hash(t)) FROM read_csv({sql_literal(path)}, header = true) t"
        ).fetchone()[0]
    seen = {"csv_rows": int(csv_rows)}
    if lab is not None:
        seen.update(_read_hl7(con, lab))
    if pacs is not None:
        seen.update(_read_dicom(con, pacs))
    return seen


def _read_hl7(con: duckdb.DuckDBPyConnection, lab: Path) -> dict[str, int]:
    hl7 = sql_literal(lab / "*.hl7")
    segments, fields = con.execute(
        "SELECT count(*), sum(len(string_split(seg, '|'))) FROM ("
        f" SELECT unnest(string_split(replace(content, chr(10), chr(13)), chr(13))) AS seg"
        f" FROM read_text({hl7})) WHERE seg <> ''"
    ).fetchone()
    return {"hl7_segments": int(segments or 0), "hl7_fields": int(fields or 0)}


def _read_dicom(con: duckdb.DuckDBPyConnection, pacs: Path) -> dict[str, int]:
    dicom = sql_literal(pacs / "**" / "*.dcm")
    files, dicom_bytes = con.execute(
        f"SELECT count(*), coalesce(sum(octet_length(content)), 0) FROM read_blob({dicom})"
    ).fetchone()
    return {"dicom_files": int(files), "dicom_bytes": int(dicom_bytes)}


def write_output(con: duckdb.DuckDBPyConnection, tables: dict[str, int], out: Path) -> int:
    """Write tables[T] rows of CDM table T's shape to out/T.parquet; rows written."""
    from etl.cdm.spec import cdm_tables

    spec = cdm_tables()
    out.mkdir(parents=True, exist_ok=True)
    written = 0
    for name, rows in sorted(tables.items()):
        if not rows or name not in spec:
            continue
        cols = ", ".join(
            f'{_value(f.datatype, k)} AS "{f.name}"' for k, f in enumerate(spec[name].fields)
        )
        target = sql_literal(out / f"{name}.parquet")
        con.execute(
            f"COPY (SELECT {cols} FROM range({int(rows)}) r(i)) TO {target} (FORMAT parquet)"
        )
        written += rows
    return written


def measure(
    synthea: Path,
    lab: Path | None,
    pacs: Path | None,
    tables: dict[str, int],
    out: Path,
    threads: int | None = None,
    memory_limit: str | None = None,
) -> dict[str, Any]:
    """Run the floor in this process; seconds, rows and peak RSS."""
    config: dict[str, str] = {"temp_directory": str(out / ".spill")}
    if threads:
        config["threads"] = str(threads)
    if memory_limit:
        config["memory_limit"] = memory_limit
    con = duckdb.connect(config=config)
    cpu_started = time.process_time()
    try:
        started = time.perf_counter()
        seen = read_input(con, synthea, lab, pacs)
        read_s = time.perf_counter() - started
        rows = write_output(con, tables, out)
        write_s = time.perf_counter() - started - read_s
    finally:
        con.close()
    output_mb = sum(p.stat().st_size for p in out.glob("*.parquet")) / 2**20
    return {
        "read_seconds": read_s,
        "write_seconds": write_s,
        "seconds": read_s + write_s,
        "cpu_seconds": time.process_time() - cpu_started,  # all of DuckDB's threads
        "output_rows": rows,
        "output_mb": output_mb,
        "peak_mb": peak_rss_mb(),
        **seen,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--synthea", type=Path, required=True)
    ap.add_argument("--lab", type=Path)
    ap.add_argument("--pacs", type=Path)
    ap.add_argument("--tables", type=json.loads, required=True, help="JSON {table: rows}")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--threads", type=int)
    ap.add_argument("--memory-limit")
    args = ap.parse_args()
    result = measure(
        args.synthea, args.lab, args.pacs, args.tables, args.out, args.threads, args.memory_limit
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
