"""Benchmark the Athena vocabulary loader on DuckDB and PostgreSQL.

    python bench/vocab_load.py [--concepts 1000000] [--relationships 5000000]
                               [--engines duckdb,postgresql] [--workdir bench/out]

Generates a release (bench/athena_generator.py), then loads it once per engine, each in a
fresh subprocess so peak memory is that load's alone, and prints load time, rows/s and
the loader process's peak RSS. PostgreSQL comes from $OMOP_ETL_BENCH_PG (default: the
test server, or an embedded one when none answers); its server memory is not included.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.athena_generator import generate  # noqa: E402
from bench.measure import peak_rss_mb, print_table  # noqa: E402


def _worker(engine: str, release: Path, workdir: Path) -> None:
    """Load `release` into one engine; print one JSON line of figures."""
    import sqlalchemy as sa

    from etl.vocab import load_vocabulary
    from etl.warehouse import open_warehouse
    from etl.warehouse.embedded import postgres_url

    if engine == "duckdb":
        db = workdir / "vocab_bench.duckdb"
        db.unlink(missing_ok=True)
        url, schema = f"duckdb:///{db}", "main"
    else:
        url, schema = postgres_url("OMOP_ETL_BENCH_PG"), f"bench_{uuid.uuid4().hex[:8]}"
    wh = open_warehouse(url)
    started = time.perf_counter()
    try:
        result = load_vocabulary(wh, release, schema)
        seconds = time.perf_counter() - started
    finally:
        if engine == "postgresql":
            with wh.engine.begin() as conn:
                conn.execute(sa.text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        wh.close()
    rows = sum(result.rows.values())
    print(
        json.dumps({"engine": engine, "seconds": seconds, "rows": rows, "peak_mb": peak_rss_mb()})
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--concepts", type=int, default=1_000_000)
    ap.add_argument("--relationships", type=int, default=5_000_000)
    ap.add_argument("--engines", default="duckdb,postgresql")
    ap.add_argument("--workdir", type=Path, default=REPO / "bench" / "out")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--release", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    if args.worker:
        _worker(args.worker, args.release, args.workdir)
        return

    release = args.workdir / f"athena_{args.concepts}_{args.relationships}"
    started = time.perf_counter()
    generate(release, args.concepts, args.relationships)
    size_mb = sum(p.stat().st_size for p in release.iterdir()) / 2**20
    print(
        f"generated {release} ({size_mb:.0f} MiB) in {time.perf_counter() - started:.1f}s: "
        f"{args.concepts:,} concepts, {args.relationships:,} relationships"
    )
    rows = []
    figures = []
    for engine in args.engines.split(","):
        out = subprocess.run(
            [
                sys.executable,
                __file__,
                "--worker",
                engine,
                "--release",
                str(release),
                "--workdir",
                str(args.workdir),
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        fig = json.loads(out.stdout.strip().splitlines()[-1])
        figures.append(fig)
        rows.append(
            [
                engine,
                f"{fig['rows']:,}",
                f"{fig['seconds']:.1f}",
                f"{fig['rows'] / fig['seconds']:,.0f}",
                f"{fig['peak_mb']:.0f}",
            ]
        )
    print_table(["engine", "rows", "seconds", "rows/s", "peak RSS MiB"], rows)
    (args.workdir / "vocab_load.json").write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
