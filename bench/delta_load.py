"""Benchmark a delta night against a full rebuild on a scaled Synthea population.

    python bench/delta_load.py [--patients 10000] [--percent 1] [--workdir /work/benchdata]

Night 1 delivers the whole population to a `delivery: delta` EHR feed (the first
delivery: no state yet). Night 2 delivers a delta: every row of `--percent` of the
patients, re-sent as changed (what a change-data-capture extract sends for the patients
touched that day), set-based in DuckDB; its build rebuilds only those patients
(etl/pipeline/scope.py). Night 3 delivers a full snapshot of the same
final state to the same warehouse with `delivery: snapshot` (a steady-state full
rebuild). Prints per-step seconds of nights 2 and 3 and their ratio; figures also go to
WORKDIR/delta_load.json. DuckDB only (the warehouse file lives in WORKDIR).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import duckdb
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.measure import peak_rss_mb, print_table  # noqa: E402
from bench.synthea_scaler import scale  # noqa: E402
from etl.sql_text import sql_literal  # noqa: E402

KEY_ENV = "OMOP_ETL_PSEUDONYM_KEY"
BENCH_KEY = "omop-etl-benchmark-key-not-a-secret-0123456789abcdef"
PATIENT_COLUMNS = ("PATIENT", "PATIENTID")


def make_delta(full: Path, out: Path, percent: float) -> dict[str, int]:
    """Every row of `percent`% of the patients (chosen by a hash of the id), re-sent."""
    out.mkdir(parents=True, exist_ok=True)
    con = duckdb.connect()
    modulo = max(1, round(100 / percent))
    counts = {}
    for path in sorted(full.glob("*.csv")):
        header = path.open(encoding="utf-8").readline().strip().split(",")
        column = (
            "Id"
            if path.name == "patients.csv"
            else next((c for c in PATIENT_COLUMNS if c in header), None)
        )
        if column is None:
            continue
        src, dst = sql_literal(path), sql_literal(out / path.name)
        con.execute(
            f"COPY (SELECT * FROM read_csv({src}, header=true, all_varchar=true)"
            f" WHERE hash(\"{column}\") % {modulo} = 0) TO {dst} (HEADER, DELIMITER ',')"
        )
        counts[path.name] = con.execute(f"SELECT count(*) FROM read_csv({dst})").fetchone()[0]
    con.close()
    return counts


def _config(workdir: Path, feed: Path, delivery: str) -> Path:
    cfg = {
        "warehouse": f"duckdb:///{workdir / 'delta.duckdb'}",
        "vocabulary": str(REPO / "vocab"),
        "quality": str(REPO / "quality" / "demo"),
        "feeds": [{"name": "ehr", "kind": "ehr_csv", "path": str(feed), "delivery": delivery}],
    }
    path = workdir / f"site_{delivery}.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path


def _night(config: Path, workdir: Path) -> dict:
    from etl.config import load_config
    from etl.pipeline.run import run_pipeline

    started = time.perf_counter()
    result = run_pipeline(load_config(config), workdir / "runs")
    if result.status != "published":
        raise SystemExit(f"night not published: {result.report['errors'][:3]}")
    timings = result.report["timings"]
    coarse = {
        "extract": sum(v for k, v in timings.items() if k.startswith("extract")),
        "build": sum(v for k, v in timings.items() if k.startswith("build.")),
        "gate": sum(v for k, v in timings.items() if k.startswith("gate")),
        "publish": sum(v for k, v in timings.items() if k.startswith("publish")),
    }
    return {
        "seconds": round(time.perf_counter() - started, 1),
        **{k: round(v, 1) for k, v in coarse.items()},
        "records_in": result.report["feeds"]["ehr"]["records_in"],
        "deltas": result.report.get("deltas", {}),
        "build_scope": result.report.get("build_scope"),
        "timings": {k: round(v, 2) for k, v in timings.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--patients", type=int, default=10_000)
    parser.add_argument("--percent", type=float, default=1.0)
    parser.add_argument("--workdir", type=Path, default=Path("/work/benchdata"))
    args = parser.parse_args()
    os.environ.setdefault(KEY_ENV, BENCH_KEY)
    work = args.workdir / f"delta_{args.patients}"
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    full = scale(args.patients, args.workdir / f"synthea_{args.patients}")
    delta = work / "delta"
    sent = make_delta(full, delta, args.percent)
    print(f"delta: {sum(sent.values()):,} rows of {args.percent}% of {args.patients:,} patients")

    nights = {
        "1 first delivery (delta feed, no state)": _night(_config(work, full, "delta"), work),
        f"2 delta ({args.percent}%)": _night(_config(work, delta, "delta"), work),
        "3 full rebuild (snapshot)": _night(_config(work, full, "snapshot"), work),
    }
    headers = ["night", "records in", "seconds", "extract", "build", "gate", "publish"]
    print_table(
        headers,
        [
            [name, f"{n['records_in']:,}", n["seconds"], n["extract"], n["build"], n["gate"],
             n["publish"]]
            for name, n in nights.items()
        ],
    )  # fmt: skip
    for name, n in nights.items():
        print(f"night {name}: build {n['build_scope']}")
    two, three = list(nights.values())[1:]
    slowest = sorted(
        ((k, v) for k, v in two["timings"].items() if k.startswith("build.")), key=lambda kv: -kv[1]
    )
    print("delta night's slowest build steps:", ", ".join(f"{k} {v:.1f} s" for k, v in slowest[:8]))
    print(f"delta night / full rebuild: {two['seconds'] / three['seconds']:.2f}")
    print(f"peak RSS of this process: {peak_rss_mb():,.0f} MiB")
    out = {"patients": args.patients, "percent": args.percent, "nights": nights}
    (args.workdir / "delta_load.json").write_text(json.dumps(out, indent=1), encoding="utf-8")


if __name__ == "__main__":
    main()
