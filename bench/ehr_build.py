"""Benchmark the whole nightly pipeline on scaled Synthea populations.

    python bench/ehr_build.py [--patients 1000,10000,100000] [--engine duckdb|postgresql]
                              [--runs 1] [--no-billing] [--timeout 0] [--max-rss-gib 18]
                              [--workdir bench/out]

For each N: generate N patients (bench/synthea_scaler.py, cached in WORKDIR/synthea_N;
with --no-billing, WORKDIR/synthea_N_nobilling, whose claims files are empty), then run
`run_pipeline` in a fresh subprocess (so peak memory is that run's alone) into a new
warehouse: WORKDIR/ehr_N.duckdb, or a throw-away schema on PostgreSQL
($OMOP_ETL_BENCH_PG; the server's memory is not counted). The vocabulary step of the
first run loads the demo vocabulary (vocab/) into the new warehouse; with --runs 2 the
second run is a steady-state night (vocabulary present, key map filled).

Per step the pipeline times (extract, vocabulary, stage, build.*, gate, report, publish,
whichever the code has): seconds, rows/s, the work between steps that no timer covers,
and the pipeline process's peak RSS during the step (the kernel's high-water mark is
reset at every step). A run past --timeout seconds or --max-rss-gib is killed and the
steps it reached are reported. Figures go to WORKDIR/ehr_build.json.
"""

from __future__ import annotations

import argparse
import itertools
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

import pyarrow as pa

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.measure import peak_rss_mb, print_table  # noqa: E402
from bench.synthea_scaler import scale  # noqa: E402

KEY_ENV = "OMOP_ETL_PSEUDONYM_KEY"
BENCH_KEY = "omop-etl-benchmark-key-not-a-secret-0123456789abcdef"
INPUT_STEPS = ("extract", "extract.wall", "land", "stage")  # rows/s over input records
EXTRACTION_PHASE = ("extract.wall", "land")  # timed within the probe's `extract` step
VOCAB_STEP = "vocabulary"


def _status_mb(field: str) -> float:
    """A memory field of /proc/self/status in MiB (0 where unavailable)."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def _cpu_seconds() -> float:
    """User + system CPU seconds of this process and its reaped children (e.g. HL7 workers)."""
    import resource

    own, kids = (
        resource.getrusage(resource.RUSAGE_SELF),
        resource.getrusage(resource.RUSAGE_CHILDREN),
    )
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def _reset_peak() -> bool:
    """Reset this process's VmHWM to its current RSS (Linux); False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _emit(record: dict[str, Any]) -> None:
    print(json.dumps(record), flush=True)


def _write_config(
    workdir: Path,
    url: str,
    schema: str,
    data: Path,
    lab: Path | None = None,
    pacs: Path | None = None,
    duckdb_settings: dict[str, Any] | None = None,
) -> Path:
    """The run's site.yaml: the EHR feed, and with `lab`/`pacs` the demo's three feeds."""
    import yaml

    from etl.config import SiteConfig
    from etl.paths import DEMO_VOCABULARY, PROJECT_ROOT

    ehr: dict[str, Any] = {
        "name": "ehr",
        "kind": "ehr_csv",
        "profile": "synthea",
        "path": str(data),
    }
    feeds = [ehr]
    if lab is not None or pacs is not None:  # as etl/demo.py: results and images come from them
        ehr["exclude"] = ["laboratory_from_lab_feed", "imaging_from_pacs_feed"]
        feeds.append({"name": "lab", "kind": "hl7v2", "path": str(lab)})
        feeds.append({"name": "pacs", "kind": "dicom", "path": str(pacs)})
    cfg: dict[str, Any] = {
        "warehouse": url,
        "cdm_schema": schema,
        "vocabulary": str(DEMO_VOCABULARY),
        "pseudonym_key_env": KEY_ENV,
        "site_name": f"omop-etl benchmark ({data.name})",
        "feeds": feeds,
    }
    if duckdb_settings and url.startswith("duckdb"):
        cfg["duckdb"] = duckdb_settings
    # as etl/demo.py: the demo vocabulary is a subset, and quality/demo/ relaxes the gate
    demo_quality = PROJECT_ROOT / "quality" / "demo"
    if "quality" in SiteConfig.model_fields and demo_quality.is_dir():
        cfg["quality"] = str(demo_quality)
    path = workdir / "site.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
    return path


def _count_vocabulary(url: str, schema: str) -> int:
    from etl.cdm.spec import ATHENA_TABLES
    from etl.warehouse import open_warehouse

    with open_warehouse(url) as wh, wh.begin() as conn:
        return sum(wh.count_rows(conn, schema, t) for t in ATHENA_TABLES)


def _lineage_size(url: str, schema: str) -> dict[str, int]:
    """Rows and bytes of the lineage store (<schema>_etl.lineage) after a run."""
    import sqlalchemy as sa

    engine = sa.create_engine(url)
    table = f'"{schema}_etl".lineage'
    try:
        with engine.connect() as conn:
            rows = conn.execute(sa.text(f"SELECT count(*) FROM {table}")).scalar_one()
            if url.startswith("duckdb"):
                blocks = conn.execute(
                    sa.text("SELECT count(DISTINCT block_id) FROM pragma_storage_info(:t)"),
                    {"t": f"{schema}_etl.lineage"},
                ).scalar_one()
                size = blocks * 262_144  # DuckDB's block size
            else:
                size = conn.execute(
                    sa.text(f"SELECT pg_total_relation_size('{table}')")
                ).scalar_one()
    finally:
        engine.dispose()
    return {"rows": int(rows), "bytes": int(size)}


def _untimed(
    starts: list[tuple[str, float]], timings: dict[str, float], wall: float
) -> dict[str, float]:
    """Seconds spent after each step before the next began (work no step timer covers).

    In run_pipeline that is, e.g.: after `extract`, reading the quarantine back and
    opening the warehouse; after the last build step, committing the build transaction
    (the build steps share one); after `publish`, dropping the stage schema and writing
    the reports.
    """
    ends = [t for _, t in starts[1:]] + [wall]
    return {
        name: end - t - timings.get(name, 0.0) for (name, t), end in zip(starts, ends, strict=True)
    }


class _StepProbe:
    """The pipeline's on_step callback: step start times and the peak RSS of each step.

    Each step's peak is the process's high-water mark between its start and the next
    step's start (reset at every step), so it includes the untimed work after the step.
    Also records the Arrow memory (pyarrow's pool) the process holds as each step starts.
    """

    def __init__(self, run: int) -> None:
        self.run = run
        self.started = time.perf_counter()
        self.current = "(start)"
        self.peaks: dict[str, float] = {}
        self.cpu: dict[str, float] = {}  # CPU seconds per step (self + reaped children)
        self.cpu_mark, self.t_mark = _cpu_seconds(), 0.0
        self.calls: list[list[Any]] = []  # [step, seconds, CPU seconds] per call, in order
        self.starts: list[tuple[str, float]] = []
        self.arrow_mb: dict[str, float] = {}  # Arrow memory held when each step starts
        _reset_peak()

    def _close_step(self) -> None:
        self.peaks[self.current] = max(self.peaks.get(self.current, 0.0), peak_rss_mb())
        _reset_peak()
        cpu = _cpu_seconds()
        self.cpu[self.current] = self.cpu.get(self.current, 0.0) + cpu - self.cpu_mark
        t = time.perf_counter() - self.started
        self.calls.append([self.current, t - self.t_mark, cpu - self.cpu_mark])
        self.cpu_mark, self.t_mark = cpu, t

    def __call__(self, name: str) -> None:
        self._close_step()
        self.current = name
        elapsed = time.perf_counter() - self.started
        self.starts.append((name, elapsed))
        self.arrow_mb[name] = pa.total_allocated_bytes() / 2**20
        _emit(
            {
                "event": "step",
                "run": self.run,
                "step": name,
                "t": elapsed,
                "rss_mb": _status_mb("VmRSS"),
                "arrow_mb": self.arrow_mb[name],
            }
        )

    def finish(self, timings: dict[str, float]) -> dict[str, Any]:
        """Wall time, per-step peaks and untimed gaps of the finished run."""
        self._close_step()
        wall = time.perf_counter() - self.started
        # the feeds' extractions and landings run side by side inside the one step the
        # pipeline announces, `extract` (NightlyRun.extract_all): they share its peak
        for name in EXTRACTION_PHASE:
            if name in timings and "extract" in self.peaks:
                self.peaks.setdefault(name, self.peaks["extract"])
        return {
            "wall_seconds": wall,
            "untimed": _untimed(self.starts, timings, wall),
            "step_peak_mb": self.peaks,
            "step_cpu_seconds": self.cpu,  # summed over a name's calls
            "step_calls": self.calls,
            "arrow_mb_at_start": self.arrow_mb,
            "peak_mb": max(self.peaks.values()),
        }


def _worker(
    engine: str,
    n: int,
    data: Path,
    workdir: Path,
    runs: int,
    lab: Path | None = None,
    pacs: Path | None = None,
    duckdb_settings: dict[str, Any] | None = None,
    *,
    first_run: int = 1,
    keep: bool = False,
) -> None:
    """Run the pipeline `runs` times over `data`; JSON lines on stdout (steps, then results).

    `first_run` > 1: the nights before it ran in earlier workers; this one goes on with
    their warehouse and site config instead of starting a new one. `keep`: leave the
    warehouse for a later worker (PostgreSQL's schemas are otherwise dropped at the end).
    """
    import sqlalchemy as sa

    from etl.config import load_config
    from etl.pipeline.run import run_pipeline
    from etl.warehouse.embedded import postgres_url

    os.environ[KEY_ENV] = BENCH_KEY
    run_root = workdir / f"ehr_{n}"
    if first_run > 1:
        config = run_root / "site.yaml"  # the first night's (`_write_config`)
        site = load_config(config)
        url, schema = site.warehouse, site.cdm_schema
    else:
        shutil.rmtree(run_root / "runs", ignore_errors=True)
        run_root.mkdir(parents=True, exist_ok=True)
        if engine == "duckdb":
            db = workdir / f"ehr_{n}.duckdb"
            db.unlink(missing_ok=True)
            db.with_name(db.name + ".wal").unlink(missing_ok=True)
            url, schema = f"duckdb:///{db}", "main"
        else:
            url, schema = postgres_url("OMOP_ETL_BENCH_PG"), f"bench_{uuid.uuid4().hex[:8]}"
        config = _write_config(run_root, url, schema, data, lab, pacs, duckdb_settings)
    try:
        for run in range(first_run, first_run + runs):
            probe = _StepProbe(run)
            result = run_pipeline(load_config(config), run_root, on_step=probe)
            report = result.report
            timings = report.get("timings", {})
            figures = probe.finish(timings)
            vocab_rows = _count_vocabulary(url, schema) if run == 1 else 0
            _emit(
                {
                    "event": "result",
                    "run": run,
                    "status": result.status,
                    "exit_code": result.exit_code,
                    "errors": report.get("errors", []),
                    "timings": timings,
                    **figures,
                    "feeds": {
                        name: {k: v for k, v in f.items() if k != "files"}
                        for name, f in report.get("feeds", {}).items()
                    },
                    "files": {
                        name: {file: row["records_in"] for file, row in f["files"].items()}
                        for name, f in report.get("feeds", {}).items()
                    },
                    "tables": report.get("tables", {}),
                    "vocabulary_rows": vocab_rows,
                    "lineage": _lineage_size(url, schema) if result.status == "published" else {},
                    "run_dir": str(result.run_dir),
                }
            )
    finally:
        if engine == "postgresql" and not keep:
            wh_engine = sa.create_engine(url)
            with wh_engine.begin() as conn:
                for s in (schema, f"{schema}_stage", f"{schema}_etl"):
                    conn.execute(sa.text(f'DROP SCHEMA IF EXISTS "{s}" CASCADE'))
            wh_engine.dispose()


class _Watchdog(threading.Thread):
    """Kills the worker when it runs longer than `timeout` s or grows past `max_rss_mb`."""

    def __init__(self, proc: subprocess.Popen[str], timeout: float, max_rss_mb: float) -> None:
        super().__init__(daemon=True)
        self.proc, self.timeout, self.max_rss_mb = proc, timeout, max_rss_mb
        self.reason: str | None = None
        self.killed_at = 0.0
        self.max_seen_mb = 0.0
        self.done = threading.Event()

    def _rss_mb(self) -> float:
        try:
            status = Path(f"/proc/{self.proc.pid}/status").read_text(encoding="ascii")
        except OSError:
            return 0.0
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return 0.0

    def run(self) -> None:
        started = time.monotonic()
        while not self.done.wait(0.5):
            rss = self._rss_mb()
            self.max_seen_mb = max(self.max_seen_mb, rss)
            if self.timeout > 0 and time.monotonic() - started > self.timeout:
                self.reason = f"timeout: still running after {self.timeout:.0f}s"
            elif self.max_rss_mb > 0 and rss > self.max_rss_mb:
                self.reason = f"memory: RSS {rss:,.0f} MiB > limit {self.max_rss_mb:,.0f} MiB"
            if self.reason:
                self.killed_at = time.monotonic()
                self.proc.kill()
                return


def _run_worker(
    engine: str,
    n: int,
    data: Path,
    workdir: Path,
    runs: int,
    timeout: float,
    max_rss_mb: float,
    extra: list[str] | None = None,
    *,
    first_run: int = 1,
    keep: bool = False,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], str | None]:
    """Start the worker; relay its progress; returns (step events, results, why it was killed).

    `extra`: more worker arguments (--lab DIR --pacs DIR --duckdb-settings JSON).
    `first_run`, `keep`: see `_worker` (a night of `python -m bench --nights`).
    """
    night = f"_run{first_run}" if first_run > 1 else ""
    log_path = workdir / f"ehr_{n}_{engine}{night}.log"
    cmd = [sys.executable, __file__, "--worker", engine, "--n", str(n), "--data", str(data)]
    cmd += ["--workdir", str(workdir), "--runs", str(runs), *(extra or [])]
    cmd += ["--first-run", str(first_run)] + (["--keep"] if keep else [])
    steps: list[dict[str, Any]] = []
    results: list[dict[str, Any]] = []
    with log_path.open("w", encoding="utf-8") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True)
        watchdog = _Watchdog(proc, timeout, max_rss_mb)
        watchdog.start()
        assert proc.stdout is not None
        for line in proc.stdout:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if record.get("event") == "step":
                record["arrived"] = time.monotonic()
                steps.append(record)
                print(
                    f"  [N={n:,} run {record['run']}] {record['t']:7.1f}s  {record['step']:<28}"
                    f" RSS {record['rss_mb']:,.0f} MiB (Arrow {record['arrow_mb']:,.0f})",
                    file=sys.stderr,
                    flush=True,
                )
            elif record.get("event") == "result":
                results.append(record)
        code = proc.wait()
        watchdog.done.set()
        watchdog.join()
    if code != 0 and watchdog.reason is None:
        raise RuntimeError(f"worker for N={n} exited with {code}; see {log_path}")
    if watchdog.reason:
        watchdog.reason += f" (highest RSS seen {watchdog.max_seen_mb:,.0f} MiB)"
        if steps:  # how long the unfinished step had been running
            steps[-1]["ran_for"] = watchdog.killed_at - steps[-1]["arrived"]
    return steps, results, watchdog.reason


def _partial_timings(steps: list[dict[str, Any]]) -> dict[str, float]:
    """Seconds per step from step start times (the last one was killed while running)."""
    done = {a["step"]: b["t"] - a["t"] for a, b in itertools.pairwise(steps)}
    if steps:
        done[f"{steps[-1]['step']} (unfinished)"] = steps[-1].get("ran_for", float("nan"))
    return done


def _print_run(fig: dict[str, Any]) -> None:
    records, cdm_rows = fig["input_records"], fig["cdm_rows"]
    print(
        f"\nN = {fig['patients']:,} patients, {fig['engine']}, run {fig['run']}"
        f" ({fig['status']}): {records:,} input records -> {cdm_rows:,} CDM rows"
        f" [code {fig.get('code_version', '?')}]"
    )
    print(
        "rows/s: extract, land, stage over input records (records_in); every later step"
        " (build.*, gate, report, publish) over CDM rows published; vocabulary over"
        " vocabulary rows loaded (its"
        " load happens in the first run of a new warehouse only). Step peak RSS: the"
        " pipeline process's high-water mark during the step and the untimed work after it."
    )
    wall = fig["wall_seconds"]
    rows = []
    for step, seconds in fig["timings"].items():
        label, basis = step, cdm_rows
        if step in INPUT_STEPS:
            basis = records
        elif step == VOCAB_STEP:
            basis = fig.get("vocabulary_rows", 0)
            label = "vocabulary (load vocab/)" if basis else "vocabulary (already loaded)"
        peak = fig.get("step_peak_mb", {}).get(step)
        rows.append(
            [
                label,
                f"{seconds:.2f}",
                f"{100 * seconds / wall:.1f}%",
                f"{basis / seconds:,.0f}" if basis and seconds > 0 else "-",
                f"{peak:,.0f}" if peak else "-",
            ]
        )
        gap = fig.get("untimed", {}).get(step, 0.0)
        if gap >= 0.05:
            rows.append([f"(untimed, after {step})", f"{gap:.2f}", f"{100 * gap / wall:.1f}%"])
            rows[-1] += ["", ""]
    print_table(["step", "seconds", "share", "rows/s", "step peak RSS MiB"], rows)
    print(
        f"summary N={fig['patients']:,} run {fig['run']}: {wall:.1f}s total,"
        f" {records:,} input records, {cdm_rows:,} CDM rows,"
        f" peak RSS {fig['peak_mb']:,.0f} MiB, {fig['status']}"
    )
    lineage = fig.get("lineage") or {}
    if lineage:
        write = fig["timings"].get("publish.lineage", 0.0)
        print(
            f"lineage store: {lineage['rows']:,} rows, {lineage['bytes'] / 2**20:,.0f} MiB;"
            f" written in {write:.1f}s ({100 * write / wall:.1f}% of the run)"
        )
    if fig.get("errors"):
        print("errors: " + "; ".join(fig["errors"]))


def _code_version() -> str:
    """The commit the pipeline code is at, with '+dirty' when etl/ or mappings/ differ."""
    try:
        head = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(REPO), "status", "--porcelain", "etl", "mappings"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def _save(path: Path, figures: list[dict[str, Any]]) -> None:
    """Merge `figures` into the JSON file, replacing earlier figures of the same set-up."""

    def setup(f: dict[str, Any]) -> tuple[str, int, bool]:
        return f.get("engine", ""), f.get("patients", 0), f.get("billing", True)

    old = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else []
    fresh = {setup(f) for f in figures}
    kept = [f for f in old if setup(f) not in fresh]
    merged = sorted([*kept, *figures], key=lambda f: (*setup(f), f["run"]))
    path.write_text(json.dumps(merged, indent=2), encoding="utf-8")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--patients", default="1000,10000,100000")
    ap.add_argument("--engine", choices=["duckdb", "postgresql"], default="duckdb")
    ap.add_argument("--runs", type=int, default=1, help="pipeline runs per N (same warehouse)")
    ap.add_argument("--timeout", type=float, default=0, help="seconds per N; 0: none")
    ap.add_argument(
        "--max-rss-gib", type=float, default=18, help="kill a run above this RSS; 0: no limit"
    )
    ap.add_argument(
        "--no-billing",
        dest="billing",
        action="store_false",
        help="empty claims, claims_transactions and payer_transitions (no cost data)",
    )
    ap.add_argument("--workdir", type=Path, default=REPO / "bench" / "out")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--lab", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--pacs", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--duckdb-settings", type=json.loads, help=argparse.SUPPRESS)
    ap.add_argument("--first-run", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--keep", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.workdir = args.workdir.resolve()
    args.workdir.mkdir(parents=True, exist_ok=True)
    if args.worker:
        _worker(
            args.worker,
            args.n,
            args.data,
            args.workdir,
            args.runs,
            args.lab,
            args.pacs,
            args.duckdb_settings,
            first_run=args.first_run,
            keep=args.keep,
        )
        return

    figures: list[dict[str, Any]] = []
    for n in (int(x) for x in args.patients.split(",")):
        started = time.perf_counter()
        folder = f"synthea_{n}" if args.billing else f"synthea_{n}_nobilling"
        data = scale(n, args.workdir / folder, billing=args.billing)
        generated = time.perf_counter() - started
        data_mb = sum(p.stat().st_size for p in data.glob("*.csv")) / 2**20
        print(f"\ndata: {data} ({data_mb:,.0f} MiB, ready in {generated:.1f}s)", flush=True)
        steps, results, killed = _run_worker(
            args.engine, n, data, args.workdir, args.runs, args.timeout, args.max_rss_gib * 1024
        )
        base = {
            "engine": args.engine,
            "patients": n,
            "billing": args.billing,
            "data_mb": data_mb,
            "code_version": _code_version(),
        }
        for r in results:
            fig = {
                **base,
                **{k: v for k, v in r.items() if k != "event"},
                "input_records": sum(f["records_in"] for f in r["feeds"].values()),
                "cdm_rows": sum(r["tables"].values()),
            }
            figures.append(fig)
            _print_run(fig)
        if killed:
            run = len(results) + 1
            run_steps = [s for s in steps if s["run"] == run]
            partial = _partial_timings(run_steps)
            at_start = {s["step"]: s for s in run_steps}
            figures.append(
                {
                    **base,
                    "run": run,
                    "status": "killed",
                    "reason": killed,
                    "timings": partial,
                    "steps": run_steps,
                }
            )
            print(f"\nN = {n:,}, run {run} killed: {killed}. Steps so far:")
            rows = []
            for step, seconds in partial.items():
                start = at_start[step.split(" ")[0]]
                rss, arrow = f"{start['rss_mb']:,.0f}", f"{start['arrow_mb']:,.0f}"
                rows.append([step, f"{seconds:.1f}", rss, arrow])
            print_table(["step", "seconds", "RSS at start MiB", "Arrow at start MiB"], rows)
        _save(args.workdir / "ehr_build.json", figures)
    print(f"\nfigures: {args.workdir / 'ehr_build.json'}")


if __name__ == "__main__":
    main()
