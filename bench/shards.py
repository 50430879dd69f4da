"""Benchmark the person-sharded build: N shards in parallel processes vs one build.

    python bench/shards.py [--patients 10000] [--configs postgresql:1:1,postgresql:2:2,...]
                           [--workdir bench/out]

Generates the population once (bench/synthea_scaler.py, cached in WORKDIR/synthea_N), then
runs the whole nightly job (`run_pipeline`) once per configuration ENGINE:SHARDS:WORKERS,
each in a fresh process into a new warehouse (a DuckDB file, or a throw-away schema on
PostgreSQL, $OMOP_ETL_BENCH_PG; the server's memory is not counted). Default: PostgreSQL
with 1 shard, 2 and 3 shards in as many worker processes, and DuckDB with 1 and 3 shards
one after another (its single writer), for reference.

Printed per configuration: the build's wall time (from staging to the end of the merge:
the part sharding splits), the whole run's wall time, the peak RSS of the run's process
(not its shard workers': getrusage's figure for children carries the parent's peak
across the spawn, so it is not reported), and the CDM rows published (equal for every
configuration: the shards build what one build does). Figures go to WORKDIR/shards.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.measure import peak_rss_mb, print_table  # noqa: E402
from bench.synthea_scaler import scale  # noqa: E402

KEY_ENV = "OMOP_ETL_PSEUDONYM_KEY"
BENCH_KEY = "omop-etl-benchmark-key-not-a-secret-0123456789abcdef"
DEFAULT_CONFIGS = "postgresql:1:1,postgresql:2:2,postgresql:3:3,duckdb:1:1,duckdb:3:1"


def _write_config(workdir: Path, url: str, schema: str, data: Path) -> Path:
    import yaml

    from etl.paths import DEMO_VOCABULARY, PROJECT_ROOT

    cfg = {
        "warehouse": url,
        "cdm_schema": schema,
        "vocabulary": str(DEMO_VOCABULARY),
        "pseudonym_key_env": KEY_ENV,
        "site_name": f"omop-etl shard benchmark ({data.name})",
        "feeds": [{"name": "ehr", "kind": "ehr_csv", "profile": "synthea", "path": str(data)}],
        "quality": str(PROJECT_ROOT / "quality" / "demo"),  # the demo vocabulary's gate
    }
    path = workdir / "site.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
    return path


def _worker(engine: str, shards: int, workers: int, data: Path, workdir: Path) -> None:
    """One run; prints one JSON line with its figures."""
    import sqlalchemy as sa

    from etl.config import load_config
    from etl.pipeline.run import run_pipeline
    from etl.warehouse.embedded import postgres_url

    os.environ[KEY_ENV] = BENCH_KEY
    name = f"{engine}_{shards}x{workers}"
    root = workdir / f"shards_{name}"
    root.mkdir(parents=True, exist_ok=True)
    if engine == "duckdb":
        db = root / "warehouse.duckdb"
        db.unlink(missing_ok=True)
        url, schema = f"duckdb:///{db}", "main"
    else:
        url, schema = postgres_url("OMOP_ETL_BENCH_PG"), f"bench_{uuid.uuid4().hex[:8]}"
    starts: dict[str, float] = {}
    began = time.perf_counter()

    def on_step(step: str) -> None:
        starts.setdefault(step, time.perf_counter() - began)

    try:
        result = run_pipeline(
            load_config(_write_config(root, url, schema, data)),
            root,
            on_step=on_step,
            shards=shards,
            shard_workers=workers,
        )
        wall = time.perf_counter() - began
        report = result.report
        print(
            json.dumps(
                {
                    "engine": engine,
                    "shards": shards,
                    "workers": workers,
                    "status": result.status,
                    "errors": report.get("errors", []),
                    "wall_seconds": wall,
                    # staging to the merge's end: the merged build's report starts then
                    "build_seconds": starts.get("report", wall) - starts.get("stage", 0.0),
                    "peak_mb": peak_rss_mb(),
                    "cdm_rows": sum(report.get("tables", {}).values()),
                    "timings": report.get("timings", {}),
                }
            ),
            flush=True,
        )
    finally:
        if engine == "postgresql":
            engine_ = sa.create_engine(url)
            with engine_.begin() as conn:
                for suffix in ("", "_stage", "_etl", *(f"_stage_{k}" for k in range(shards))):
                    conn.execute(sa.text(f'DROP SCHEMA IF EXISTS "{schema}{suffix}" CASCADE'))
            engine_.dispose()


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--patients", type=int, default=10_000)
    parser.add_argument("--configs", default=DEFAULT_CONFIGS)
    parser.add_argument("--workdir", type=Path, default=REPO / "bench" / "out")
    parser.add_argument("--worker", nargs=3, metavar=("ENGINE", "SHARDS", "WORKERS"))
    parser.add_argument("--data", type=Path)
    args = parser.parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    if args.worker:
        engine, shards, workers = args.worker
        _worker(engine, int(shards), int(workers), args.data, args.workdir)
        sys.stdout.flush()
        os._exit(0)  # skip DuckDB's noisy teardown
    data = scale(args.patients, args.workdir / f"synthea_{args.patients}")
    figures: list[dict[str, Any]] = []
    for config in args.configs.split(","):
        engine, shards, workers = config.split(":")
        print(f"running {engine}, {shards} shard(s), {workers} worker(s)...", file=sys.stderr)
        cmd = [sys.executable, __file__, "--worker", engine, shards, workers]
        cmd += ["--data", str(data), "--workdir", str(args.workdir)]
        log = args.workdir / f"shards_{engine}_{shards}x{workers}.log"
        with log.open("w", encoding="utf-8") as err:
            out = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=err, text=True, check=True)
        lines = [json.loads(x) for x in out.stdout.splitlines() if x.startswith("{")]
        figures.append({"patients": args.patients, **lines[-1]})
    (args.workdir / "shards.json").write_text(json.dumps(figures, indent=1), encoding="utf-8")
    print(f"\n{args.patients:,} patients, {os.cpu_count()} cores; one run per configuration")
    base = {f["engine"]: f["build_seconds"] for f in figures if f["shards"] == 1}
    rows = [
        [
            f["engine"],
            f["shards"],
            f["workers"],
            f"{f['build_seconds']:.1f}",
            f"{base[f['engine']] / f['build_seconds']:.2f}" if f["engine"] in base else "-",
            f"{f['wall_seconds']:.1f}",
            f"{f['peak_mb']:,.0f}",
            f"{f['cdm_rows']:,}",
            f["status"],
        ]
        for f in figures
    ]
    print_table(
        ["engine", "shards", "workers", "build s", "speed-up", "run s", "peak RSS MiB",
         "CDM rows", "status"],
        rows,
    )  # fmt: skip


if __name__ == "__main__":
    main(sys.argv[1:])
