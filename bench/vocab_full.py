"""Full-size vocabulary benchmark: load a real-release-sized Athena vocabulary and map against it.

    python bench/vocab_full.py [--concepts 6000000] [--relationships 50000000] [--fanout 3]
                               [--engines duckdb,postgresql] [--data DIR]
                               [--workdir /work/benchdata] [--memory-limit 6GB] [--keep]

1. Generates the release once (bench/athena_full.py: the demo vocabulary plus generated
   concepts, relationships, ancestors and synonyms; cached in WORKDIR/athena_full_C_R_F).
2. Loads it with the project's loader (etl.vocab.load_vocabulary) into DuckDB and into a
   throw-away PostgreSQL schema ($OMOP_ETL_BENCH_PG, default the test server), each in a
   fresh process: seconds, rows/s, the process's peak RSS (PostgreSQL's server not counted).
3. Runs the whole nightly job (run_pipeline) on the EHR feed DIR (default: the scaled
   10,000-patient population in WORKDIR/synthea_10000 when present, else demo/synthea27)
   on DuckDB twice, each in a fresh process: into a new warehouse with the demo vocabulary
   (the reference), and into the warehouse that already holds the full-size vocabulary
   (so the run measures mapping, build and gate against it). Prints per-step seconds
   (report.json timings) and peak RSS, and checks that row counts, unmapped codes and the
   mapped concept ids equal the reference's.

DuckDB runs get OMOP_ETL_DUCKDB_MEMORY_LIMIT (--memory-limit). Figures go to
WORKDIR/vocab_full.json. Generated warehouses are deleted at the end unless --keep.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.measure import peak_rss_mb, print_table  # noqa: E402

KEY_ENV = "OMOP_ETL_PSEUDONYM_KEY"
BENCH_KEY = "omop-etl-benchmark-key-not-a-secret-0123456789abcdef"
# (table, concept column) whose mapped ids must be identical with either vocabulary
FINGERPRINT = {
    "person": "gender_concept_id",
    "visit_occurrence": "visit_concept_id",
    "condition_occurrence": "condition_concept_id",
    "drug_exposure": "drug_concept_id",
    "procedure_occurrence": "procedure_concept_id",
    "measurement": "measurement_concept_id",
    "observation": "observation_concept_id",
    "device_exposure": "device_concept_id",
}


def _emit(record: dict[str, Any]) -> None:
    print(json.dumps(record), flush=True)


# ---------------------------------------------------------------- workers (fresh processes)


def _work_generate(args: argparse.Namespace) -> None:
    from bench.athena_full import generate

    started = time.perf_counter()
    rows = generate(args.release, args.concepts, args.relationships, args.fanout)
    size = sum(p.stat().st_size for p in args.release.iterdir())
    fig = {"seconds": time.perf_counter() - started, "rows": rows, "bytes": size}
    fig["peak_mb"] = peak_rss_mb()
    (args.release / ".complete").write_text(json.dumps(fig))
    _emit(fig)


def _work_load(args: argparse.Namespace) -> None:
    import sqlalchemy as sa

    from etl.vocab import load_vocabulary
    from etl.warehouse import open_warehouse
    from etl.warehouse.embedded import postgres_url

    if args.worker == "load-duckdb":
        args.db.unlink(missing_ok=True)
        url, schema = f"duckdb:///{args.db}", "main"
    else:
        url, schema = postgres_url("OMOP_ETL_BENCH_PG"), f"bench_{uuid.uuid4().hex[:8]}"
    wh = open_warehouse(url)
    started = time.perf_counter()
    try:
        result = load_vocabulary(wh, args.release, schema)
        seconds = time.perf_counter() - started
    finally:
        if args.worker == "load-postgresql":
            with wh.engine.begin() as conn:
                conn.execute(sa.text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
                conn.execute(sa.text(f'DROP SCHEMA IF EXISTS "{schema}_vocab_stage" CASCADE'))
        wh.close()
    _emit(
        {
            "seconds": seconds,
            "rows": sum(result.rows.values()),
            "tables": result.rows,
            "warnings": result.warnings,
            "peak_mb": peak_rss_mb(),
        }
    )


def _fingerprint(url: str) -> dict[str, list[int]]:
    """Per table: rows, distinct mapped concept ids, their sum, rows on concept 0."""
    import sqlalchemy as sa

    engine = sa.create_engine(url)
    out: dict[str, list[int]] = {}
    try:
        with engine.connect() as conn:
            for table, col in FINGERPRINT.items():
                row = conn.execute(
                    sa.text(
                        f"SELECT count(*), count(DISTINCT {col}), coalesce(sum({col}), 0),"
                        f" count(*) FILTER (WHERE {col} = 0) FROM main.{table}"
                    )
                ).one()
                out[table] = [int(v) for v in row]
    finally:
        engine.dispose()
    return out


def _work_pipeline(args: argparse.Namespace) -> None:
    """The nightly job on DuckDB: a new warehouse (demo vocabulary) or the loaded one."""
    import yaml

    from etl.config import load_config
    from etl.paths import DEMO_VOCABULARY
    from etl.pipeline.run import run_pipeline

    os.environ[KEY_ENV] = BENCH_KEY
    demo = args.worker == "pipeline-demo"
    db = args.workdir / "vocab_full_demo.duckdb" if demo else args.db
    if demo:
        db.unlink(missing_ok=True)
    run_root = args.workdir / f"vocab_full_runs_{'demo' if demo else 'full'}"
    shutil.rmtree(run_root, ignore_errors=True)
    run_root.mkdir(parents=True)
    url = f"duckdb:///{db}"
    cfg = {
        "warehouse": url,
        "cdm_schema": "main",
        "vocabulary": str(DEMO_VOCABULARY if demo else args.release),
        "pseudonym_key_env": KEY_ENV,
        "site_name": f"omop-etl full-vocabulary benchmark ({args.data.name})",
        "feeds": [{"name": "ehr", "kind": "ehr_csv", "profile": "synthea", "path": str(args.data)}],
        # as etl/demo.py: the demo vocabulary is a subset and quality/demo/ relaxes the gate
        "quality": str(REPO / "quality" / "demo"),
    }
    config = run_root / "site.yaml"
    config.write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
    started = time.perf_counter()
    result = run_pipeline(load_config(config), run_root)
    wall = time.perf_counter() - started
    report = result.report
    _emit(
        {
            "status": result.status,
            "errors": report.get("errors", []),
            "wall_seconds": wall,
            "timings": report.get("timings", {}),
            "tables": report.get("tables", {}),
            "unmapped": report.get("unmapped", []),
            "fingerprint": _fingerprint(url) if result.status == "published" else {},
            "peak_mb": peak_rss_mb(),
        }
    )
    if demo:
        db.unlink(missing_ok=True)
    shutil.rmtree(run_root, ignore_errors=True)


# ---------------------------------------------------------------- driver


def _rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text(encoding="ascii").splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def _run(worker: str, args: argparse.Namespace) -> dict[str, Any]:
    """One worker in a fresh process; its last JSON line, plus the highest RSS seen."""
    cmd = [sys.executable, __file__, "--worker", worker]
    for flag in ("concepts", "relationships", "fanout", "workdir", "data", "release", "db"):
        cmd += [f"--{flag}", str(getattr(args, flag))]
    env = dict(os.environ, OMOP_ETL_DUCKDB_MEMORY_LIMIT=args.memory_limit)
    log = args.workdir / f"vocab_full_{worker}.log"
    print(f"[{time.strftime('%H:%M:%S')}] {worker} ...", file=sys.stderr, flush=True)
    with log.open("w") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, env=env)
        seen = [0.0]
        done = threading.Event()

        def poll() -> None:
            while not done.wait(0.5):
                seen[0] = max(seen[0], _rss_mb(proc.pid))

        t = threading.Thread(target=poll, daemon=True)
        t.start()
        out, _ = proc.communicate()
        done.set()
        t.join()
    if proc.returncode != 0:
        raise RuntimeError(f"{worker} exited with {proc.returncode}; see {log}")
    fig = json.loads(out.strip().splitlines()[-1])
    fig["max_rss_seen_mb"] = seen[0]
    return fig


def _compare(ref: dict[str, Any], full: dict[str, Any]) -> dict[str, Any]:
    same = {
        "status": ref["status"] == full["status"] == "published",
        "tables": ref["tables"] == full["tables"],
        "unmapped": ref["unmapped"] == full["unmapped"],
        "mapped_concepts": ref["fingerprint"] == full["fingerprint"],
    }
    return {**same, "all_equal": all(same.values()), "unmapped_codes": len(ref["unmapped"])}


def _report(results: dict[str, Any]) -> None:
    loads = [
        [
            engine,
            f"{fig['rows']:,}",
            f"{fig['seconds']:.1f}",
            f"{fig['rows'] / fig['seconds']:,.0f}",
            f"{max(fig['peak_mb'], fig['max_rss_seen_mb']):,.0f}",
        ]
        for engine, fig in results.get("load", {}).items()
    ]
    if loads:
        print_table(["engine", "rows", "seconds", "rows/s", "peak RSS MiB"], loads)
    runs = results.get("pipeline", {})
    if runs:
        steps = list(dict.fromkeys(s for r in runs.values() for s in r["timings"]))
        rows = [[s, *(f"{r['timings'].get(s, 0):.2f}" for r in runs.values())] for s in steps]
        rows.append(["total (wall)", *(f"{r['wall_seconds']:.1f}" for r in runs.values())])
        rows.append(["peak RSS MiB", *(f"{r['peak_mb']:,.0f}" for r in runs.values())])
        print_table(["step", *(f"{k} vocabulary" for k in runs)], rows)
    if "mapping_equal" in results:
        print("same mapping as with the demo vocabulary:", json.dumps(results["mapping_equal"]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--concepts", type=int, default=6_000_000)
    ap.add_argument("--relationships", type=int, default=50_000_000)
    ap.add_argument("--fanout", type=int, default=3)
    ap.add_argument("--engines", default="duckdb,postgresql")
    ap.add_argument("--workdir", type=Path, default=Path("/work/benchdata"))
    ap.add_argument("--data", type=Path, default=None)
    ap.add_argument("--memory-limit", default="6GB")
    ap.add_argument("--no-pipeline", action="store_true", help="only generate and load")
    ap.add_argument("--keep", action="store_true", help="keep the release and the warehouse")
    ap.add_argument("--out", type=Path, default=None, help="JSON (default WORKDIR/vocab_full.json)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--release", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--db", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        {"generate": _work_generate}.get(
            args.worker, _work_load if args.worker.startswith("load") else _work_pipeline
        )(args)
        return

    args.workdir.mkdir(parents=True, exist_ok=True)
    if args.data is None:
        scaled = args.workdir / "synthea_10000"
        args.data = scaled if (scaled / "patients.csv").exists() else REPO / "demo" / "synthea27"
    args.data = args.data.resolve()
    tag = f"{args.concepts}_{args.relationships}_{args.fanout}"
    args.release = args.workdir / f"athena_full_{tag}"
    args.db = args.workdir / f"athena_full_{tag}.duckdb"
    out = args.out or args.workdir / "vocab_full.json"
    free = shutil.disk_usage(args.workdir).free / 2**30
    results: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "load_average": os.getloadavg()},
        "size": {"concepts": args.concepts, "relationships": args.relationships},
        "fanout": args.fanout,
        "data": str(args.data),
        "duckdb_memory_limit": args.memory_limit,
        "disk_free_gib_at_start": round(free, 1),
    }

    def save() -> None:
        out.write_text(json.dumps(results, indent=2))

    try:
        if not (args.release / ".complete").exists():
            shutil.rmtree(args.release, ignore_errors=True)
            results["generate"] = _run("generate", args)
        else:
            cached = json.loads((args.release / ".complete").read_text())
            results["generate"] = {"cached": True, **cached}
        results["release_mib"] = round(
            sum(p.stat().st_size for p in args.release.iterdir()) / 2**20
        )
        save()
        results["load"] = {}
        engines = args.engines.split(",")
        # DuckDB first: the pipeline runs on the warehouse it loads
        for engine in sorted(engines, key=lambda e: e != "duckdb"):
            if engine == "postgresql" and not args.no_pipeline and "duckdb" in engines:
                _pipelines(args, results, save)
            results["load"][engine] = _run(f"load-{engine}", args)
            save()
        if not args.no_pipeline and "postgresql" not in engines and "duckdb" in engines:
            _pipelines(args, results, save)
    finally:
        results["machine"]["load_average_at_end"] = os.getloadavg()
        save()
        if not args.keep:
            args.db.unlink(missing_ok=True)
            args.db.with_name(args.db.name + ".wal").unlink(missing_ok=True)
    _report(results)
    print(f"figures: {out}")


def _pipelines(args: argparse.Namespace, results: dict[str, Any], save: Any) -> None:
    results["pipeline"] = {}
    results["pipeline"]["demo"] = _run("pipeline-demo", args)
    save()
    results["pipeline"]["full"] = _run("pipeline-full", args)
    results["mapping_equal"] = _compare(results["pipeline"]["demo"], results["pipeline"]["full"])
    save()


if __name__ == "__main__":
    main()
