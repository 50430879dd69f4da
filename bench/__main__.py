"""The benchmark: the whole nightly job on a scaled population, beside DuckDB's floor.

    python -m bench [--patients 1000,10000,100000,1000000] [--engines duckdb,postgresql]
                    [--pg-max-patients 100000] [--billing-max-patients 100000]
                    [--memory-limit 6GB|none] [--threads 2] [--nights 1]
                    [--workdir bench/out] [--out bench/out] [--no-plot]

For each N (patients): the demo population (demo/synthea27) scaled to N patients
(bench/synthea_scaler.py), and from it, as the demo does, the lab feed (HL7 ORU^R01) and
the PACS feed (header-only DICOM) (bench/feeds.py); all cached in WORKDIR. Then, per
engine, the nightly job over the three feeds (extract, land, build, gate, publish,
report) in a fresh process into a new warehouse (bench/ehr_build.py's worker; the
vocabulary step loads the demo vocabulary), and once per N the floor (bench/floor.py):
DuckDB alone reading the same input files and writing as many rows to Parquet as the
run published. Prints per step seconds, rows/s and peak RSS, then a summary with the
ratio pipeline / floor and the share of the machine's CPU stolen by its hypervisor
during the run and during the floor (bench/host.py; a contended run is not a slow one).
Figures go to OUT/bench.json (merged with earlier sizes) and a plot of time and memory
against N to OUT/bench.png.

--nights 2 (or more) runs the nightly job again on the same warehouse over the same
input, each night in a fresh process, as a site's every night after its first: every key
is in the key map, tonight's build replaces last night's. Each later night is printed
and kept in bench.json (`later_nights` of the first night's entry) with its ratio to the
same floor; the first night's `host` figures then cover every night.

Above --billing-max-patients the EHR export is scaled without Synthea's billing files
(claims, claims_transactions, payer_transitions: ~70% of the rows, ~80% of the bytes;
~100 GB of CSV at a million patients), so that run has no payer_plan_period and no cost;
its figures say `"billing": false`.

--memory-limit (default 6GB) and --threads go into the run's site config (`duckdb:`
section) and to the floor; OMOP_ETL_DUCKDB_* variables still override them in the
pipeline.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.ehr_build import _code_version, _print_run, _run_worker
from bench.feeds import write_lab, write_pacs
from bench.host import contention, cpu_times
from bench.measure import print_table
from bench.synthea_scaler import scale

REPO = Path(__file__).resolve().parents[1]
DEFAULT_PATIENTS = "1000,10000,100000,1000000"
# the figures' DuckDB buffer pool: the goal is a peak under 8 GiB, and without a limit
# DuckDB takes up to 80% of RAM before it spills (a 100,000-patient run peaked at 8.3 GiB
# on 24 GiB without one, 6.5 GiB with this)
DEFAULT_MEMORY_LIMIT = "6GB"
# disk a patient needs in WORKDIR: ~131 KB of Synthea CSV, its landed Parquet, the
# warehouse file and DuckDB's spill (measured: 12.5 GB of CSV at 100,000 patients);
# without the billing files ~26 KB of CSV, and ~75 GB in all at a million patients
# (CSV 23 GiB, landed Parquet 4 GiB, warehouse 40 GiB at its largest, spill)
DISK_PER_PATIENT = 250_000
DISK_PER_PATIENT_NO_BILLING = 80_000


def _machine() -> dict[str, Any]:
    """What the figures were measured on."""
    cpu = platform.processor()
    ram_gib = 0.0
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="ascii").splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text(encoding="ascii").splitlines():
            if line.startswith("MemTotal:"):
                ram_gib = int(line.split()[1]) / 2**20
    except OSError:
        pass
    import duckdb

    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "ram_gib": round(ram_gib, 1),
        "os": platform.platform(),
        "python": platform.python_version(),
        "duckdb": duckdb.__version__,
    }


def _synthea_dir(n: int, billing: bool, workdir: Path) -> Path:
    return workdir / (f"synthea_{n}" if billing else f"synthea_{n}_nobilling")


def _inputs(n: int, billing: bool, workdir: Path) -> dict[str, Any]:
    """The three feeds for N patients (cached), with their sizes and generation time."""
    started = time.perf_counter()
    synthea = scale(n, _synthea_dir(n, billing, workdir), billing=billing)
    lab_dir, pacs_dir = workdir / f"lab_{n}", workdir / f"pacs_{n}"
    lab = write_lab(synthea, lab_dir)
    pacs = write_pacs(synthea, pacs_dir)

    def mib(folder: Path, pattern: str) -> float:
        return sum(p.stat().st_size for p in folder.glob(pattern)) / 2**20

    return {
        "synthea": synthea,
        "lab": lab_dir,
        "pacs": pacs_dir,
        "billing": billing,
        "generate_seconds": time.perf_counter() - started,
        "ehr_mb": mib(synthea, "*.csv"),
        "lab_messages": lab["messages"],
        "lab_results": lab["results"],
        "lab_mb": mib(lab_dir, "*.hl7"),
        "dicom_files": pacs["files"],
        "dicom_mb": mib(pacs_dir, "**/*.dcm"),
    }


def _extract_seconds(run_dir: Path) -> dict[str, float]:
    """Seconds each feed's extraction took (the report's `extract` is their sum)."""
    out = {}
    for path in sorted((run_dir / "steps").glob("extract.*.json")):
        timings = json.loads(path.read_text(encoding="utf-8")).get("timings", {})
        out[path.stem.removeprefix("extract.")] = timings.get("extract", 0.0)
    return out


def _duckdb_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The DuckDB settings the run's site config gets (`duckdb:`), those given only."""
    settings = {"threads": args.threads, "memory_limit": args.memory_limit}
    return {k: v for k, v in settings.items() if v}


def _pipeline(
    engine: str, n: int, data: dict[str, Any], args: argparse.Namespace
) -> dict[str, Any]:
    """The nightly job over the three feeds, `args.nights` times on one new warehouse, each
    night in a fresh process, as a site runs it (a night in the process of the night
    before started 480 MiB higher and peaked 500-900 MiB higher in every step); the
    first night's figures, the later nights' in `later_nights`."""
    workdir = args.workdir / f"runs_{engine}"
    workdir.mkdir(parents=True, exist_ok=True)
    extra = ["--duckdb-settings", json.dumps(_duckdb_settings(args))]
    if args.feeds == "all":
        extra += ["--lab", str(data["lab"]), "--pacs", str(data["pacs"])]
    results: list[dict[str, Any]] = []
    killed = None
    for night in range(1, args.nights + 1):
        _, ran, killed = _run_worker(
            engine, n, data["synthea"], workdir, 1, args.timeout, args.max_rss_gib * 1024,
            extra, first_run=night, keep=night < args.nights,
        )  # fmt: skip
        results += ran
        if killed or not ran:
            break
    if not results:
        return {"engine": engine, "patients": n, "status": "killed", "reason": killed}
    first, *later = (_night_figures(engine, n, data, args, r) for r in results)
    first["later_nights"] = [{k: v for k, v in f.items() if k != "files"} for f in later]
    if killed and len(results) < args.nights:  # a later night was killed: those before stand
        first["later_nights"].append({"run": len(results) + 1, "status": "killed",
                                      "reason": killed})  # fmt: skip
    return first


def _night_figures(
    engine: str, n: int, data: dict[str, Any], args: argparse.Namespace, r: dict[str, Any]
) -> dict[str, Any]:
    """One night's figures from the worker's result `r`, printed."""
    fig = {
        "engine": engine,
        "patients": n,
        **{k: v for k, v in r.items() if k != "event"},
        "input_records": sum(f["records_in"] for f in r["feeds"].values()),
        "cdm_rows": sum(r["tables"].values()),
        "duckdb_settings": _duckdb_settings(args) if engine == "duckdb" else {},
        "feed_set": args.feeds,
        "billing": data["billing"],
        "extract_seconds": _extract_seconds(Path(r["run_dir"])),
    }
    fig["code_version"] = _code_version()
    _print_run(fig)
    return fig


def _floor(n: int, data: dict[str, Any], tables: dict[str, int], args: argparse.Namespace):
    """The floor for N in a fresh process (bench/floor.py); its figures."""
    out = args.workdir / f"floor_{n}"
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "bench.floor", "--synthea", str(data["synthea"])]
    cmd += ["--out", str(out)]
    if args.feeds == "all":
        cmd += ["--lab", str(data["lab"]), "--pacs", str(data["pacs"])]
    cmd += ["--tables", json.dumps(tables)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    if args.memory_limit:
        cmd += ["--memory-limit", args.memory_limit]
    done = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=REPO)
    shutil.rmtree(out, ignore_errors=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def _cpu(run: dict[str, Any]) -> float:
    """CPU seconds of the pipeline process and its workers over the run (0 if unknown)."""
    return sum(run.get("step_cpu_seconds", {}).values())


def _summary(runs: list[dict[str, Any]]) -> None:
    rows = []
    for r in runs:
        floor = r.get("floor") or {}
        wall = r.get("wall_seconds")
        rows.append(
            [
                f"{r['patients']:,}",
                r["engine"],
                r.get("status", "?") + ("" if r.get("billing", True) else ", no billing"),
                f"{r.get('input_records', 0):,}",
                f"{r.get('lab_messages', 0):,}" if r.get("feed_set") == "all" else "-",
                f"{r.get('extract_seconds', {}).get('lab', 0):,.1f}",
                f"{r.get('cdm_rows', 0):,}",
                f"{wall:,.1f}" if wall else "-",
                f"{r.get('peak_mb', 0):,.0f}",
                f"{floor.get('seconds', 0):,.1f}",
                f"{floor.get('peak_mb', 0):,.0f}",
                f"{wall / floor['seconds']:.1f}x" if wall and floor.get("seconds") else "-",
                f"{cpu:,.0f}" if (cpu := _cpu(r)) else "-",
                f"{floor.get('cpu_seconds', 0):,.0f}",
                f"{cpu / floor['cpu_seconds']:.1f}x" if cpu and floor.get("cpu_seconds") else "-",
                _steal(r.get("host")) + " / " + _steal(floor.get("host")),
            ]
        )
    print_table(
        [
            "patients",
            "engine",
            "status",
            "input records",
            "HL7 msgs",
            "lab extract s",
            "CDM rows",
            "pipeline s",
            "peak MiB",
            "floor s",
            "floor MiB",
            "ratio",
            "CPU s",
            "floor CPU s",
            "CPU ratio",
            "CPU stolen",
        ],
        rows,
    )
    _later_nights_summary(runs)


def _later_nights_summary(runs: list[dict[str, Any]]) -> None:
    """The later nights (`--nights`), each beside its first night and the same floor."""
    rows = []
    for r in runs:
        first, floor = r.get("wall_seconds"), r.get("floor") or {}
        for night in r.get("later_nights", []):
            wall = night.get("wall_seconds")
            steps = {k: v for k, v in night.get("timings", {}).items() if k != "extract"}
            top = sorted(steps.items(), key=lambda kv: -kv[1])[:3]  # extract: the feeds summed
            rows.append(
                [
                    f"{r['patients']:,}",
                    r["engine"],
                    str(night.get("run", "?")),
                    night.get("status", "?"),
                    f"{wall:,.1f}" if wall else "-",
                    f"{night.get('peak_mb', 0):,.0f}",
                    f"{wall / first:.2f}x" if wall and first else "-",
                    f"{wall / floor['seconds']:.1f}x" if wall and floor.get("seconds") else "-",
                    f"{cpu:,.0f}" if (cpu := _cpu(night)) else "-",
                    ", ".join(f"{k} {v:,.0f}s" for k, v in top),
                ]
            )
    if rows:
        print("\nlater nights (same warehouse, same input):")
        print_table(
            ["patients", "engine", "night", "status", "pipeline s", "peak MiB",
             "vs night 1", "ratio", "CPU s", "longest steps"],
            rows,
        )  # fmt: skip


def _steal(host: dict[str, float] | None) -> str:
    """The share of the machine's CPU stolen during a run (bench/host.py), or '-'."""
    return f"{host['steal_pct']:.1f}%" if host else "-"


def _per_feed(files: dict[str, Any]) -> dict[str, Any]:
    """Records per input file folded to files and records per feed (37,037 DICOM files at
    a million patients would otherwise make the JSON megabytes long)."""
    return {
        feed: rows
        if "records_in" in rows
        else {"files": len(rows), "records_in": sum(rows.values())}
        for feed, rows in files.items()
    }


def _save(path: Path, machine: dict[str, Any], runs: list[dict[str, Any]]) -> list[dict]:
    """Merge `runs` into the JSON file (replacing the same engine and N); all runs."""
    old = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    runs = [{**r, "files": _per_feed(r["files"])} if "files" in r else r for r in runs]
    for r in old.get("runs", []):
        if "files" in r:
            r["files"] = _per_feed(r["files"])

    def key(r: dict[str, Any]) -> tuple[str, str, int]:
        return r["engine"], r.get("feed_set", "all"), r["patients"]

    fresh = {key(r) for r in runs}
    kept = [r for r in old.get("runs", []) if key(r) not in fresh]
    merged = sorted([*kept, *runs], key=key)
    path.write_text(
        json.dumps({"machine": machine, "runs": merged}, indent=2, default=str), encoding="utf-8"
    )
    return merged


def plot(runs: list[dict[str, Any]], path: Path) -> None:
    """Wall time and peak RSS against N, per engine and for the floor (log-log)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(10, 4))
    done = [r for r in runs if r.get("status") == "published"]
    for engine, feeds in sorted({(r["engine"], r.get("feed_set", "all")) for r in done}):
        mine = [r for r in done if (r["engine"], r.get("feed_set", "all")) == (engine, feeds)]
        mine.sort(key=lambda r: r["patients"])
        ns = [r["patients"] for r in mine]
        label = f"{engine}" + (" (3 feeds)" if feeds == "all" else " (EHR feed only)")
        ax_t.plot(ns, [r["wall_seconds"] for r in mine], "o-", label=label)
        ax_m.plot(ns, [r["peak_mb"] / 1024 for r in mine], "o-", label=label)
        for r in mine:
            if not r.get("billing", True):
                for ax, y in ((ax_t, r["wall_seconds"]), (ax_m, r["peak_mb"] / 1024)):
                    ax.annotate(
                        "no billing",
                        (r["patients"], y),
                        fontsize=7,
                        textcoords="offset points",
                        xytext=(-40, 6),
                    )
    for feeds in sorted({r.get("feed_set", "all") for r in done}):
        # one floor per N: the DuckDB run's where there is one (runs of other sessions,
        # merged into the same JSON, may carry a floor measured on another day)
        floors = {
            r["patients"]: r["floor"]
            for r in sorted(done, key=lambda r: r["engine"] == "duckdb")
            if r.get("floor") and r.get("feed_set", "all") == feeds
        }
        ns = sorted(floors)
        label = "floor" + (" (3 feeds)" if feeds == "all" else " (EHR only)")
        ax_t.plot(ns, [floors[n]["seconds"] for n in ns], "s--", label=label)
        ax_m.plot(ns, [floors[n]["peak_mb"] / 1024 for n in ns], "s--", label=label)
        goal = [3 * floors[n]["seconds"] for n in ns]
        ax_t.plot(ns, goal, ":", color="grey", label="goal: 3 x floor" if feeds == "all" else None)
    ax_m.axhline(8, ls=":", color="grey", label="goal: 8 GiB")
    for ax, label in ((ax_t, "wall time, s"), (ax_m, "peak RSS, GiB")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("patients")
        plain = matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}")
        sparse = matplotlib.ticker.FuncFormatter(
            lambda v, _: f"{v:g}" if f"{v:.0e}"[0] in "25" else ""
        )
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(sparse)
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    ax_t.set_title("nightly run, first night (wall time)")
    ax_m.set_title("peak RSS (pipeline process; PostgreSQL server not counted)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        prog="python -m bench", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    ap.add_argument("--patients", default=DEFAULT_PATIENTS, help="comma-separated sizes")
    ap.add_argument("--engines", default="duckdb,postgresql", help="duckdb,postgresql")
    ap.add_argument(
        "--pg-max-patients", type=int, default=100_000, help="skip larger N on PostgreSQL"
    )
    ap.add_argument(
        "--billing-max-patients",
        type=int,
        default=100_000,
        help="above it the EHR export has no billing files (no payer_plan_period, no cost)",
    )
    ap.add_argument(
        "--feeds",
        choices=["all", "ehr"],
        default="all",
        help="all: EHR, lab and PACS as in the demo; ehr: the EHR feed alone (no exclusions)",
    )
    ap.add_argument(
        "--memory-limit",
        default=DEFAULT_MEMORY_LIMIT,
        help=f"DuckDB memory_limit (site config; default {DEFAULT_MEMORY_LIMIT}; 'none': DuckDB's"
        " own default, 80%% of RAM)",
    )
    ap.add_argument("--threads", type=int, help="DuckDB threads (site config)")
    ap.add_argument(
        "--nights", type=int, default=1,
        help="nightly runs per N on the same warehouse (2: also a night whose keys are known)",
    )  # fmt: skip
    ap.add_argument("--workdir", type=Path, default=REPO / "bench" / "out", help="data, runs")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "out", help="JSON and PNG")
    ap.add_argument("--timeout", type=float, default=0, help="seconds per run; 0: none")
    ap.add_argument("--max-rss-gib", type=float, default=18, help="kill a run above it")
    ap.add_argument("--no-plot", dest="plot", action="store_false")
    args = ap.parse_args(argv)
    if args.memory_limit and args.memory_limit.lower() == "none":
        args.memory_limit = None
    args.workdir, args.out = args.workdir.resolve(), args.out.resolve()
    args.workdir.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.nights < 1:
        ap.error("--nights must be 1 or more")
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    unknown = set(engines) - {"duckdb", "postgresql"}
    if unknown:
        ap.error(f"unknown engine(s): {', '.join(sorted(unknown))}")
    machine = _machine()
    runs: list[dict[str, Any]] = []
    for n in (int(x) for x in args.patients.split(",")):
        billing = n <= args.billing_max_patients
        free = shutil.disk_usage(args.workdir).free
        cached = (_synthea_dir(n, billing, args.workdir) / ".scaled.json").is_file()
        need = n * (DISK_PER_PATIENT if billing else DISK_PER_PATIENT_NO_BILLING)
        if not cached and need > free:
            print(
                f"\nN = {n:,} skipped: needs ~{need / 2**30:,.0f} GiB free in"
                f" {args.workdir}, {free / 2**30:,.0f} GiB are (--workdir elsewhere?)"
            )
            continue
        data = _inputs(n, billing, args.workdir)
        print(
            f"\nN = {n:,}: EHR {data['ehr_mb']:,.0f} MiB, lab {data['lab_messages']:,}"
            f" messages ({data['lab_mb']:,.0f} MiB), PACS {data['dicom_files']:,} files;"
            f" ready in {data['generate_seconds']:.1f}s"
            + ("" if billing else "; no billing files (no payer_plan_period, no cost)"),
            flush=True,
        )
        inputs = {k: (str(v) if isinstance(v, Path) else v) for k, v in data.items()}
        floor: dict[str, Any] | None = None
        for engine in engines:
            if engine == "postgresql" and n > args.pg_max_patients:
                print(f"PostgreSQL skipped at N = {n:,} (--pg-max-patients)")
                continue
            before = cpu_times()
            # each run names its machine: bench.json merges runs of several hosts, and its
            # top-level `machine` is only the latest run's
            fig = {**_pipeline(engine, n, data, args), "inputs": inputs, "machine": machine}
            fig["host"] = contention(before, cpu_times())
            fig["lab_messages"] = data["lab_messages"]
            if floor is None and fig.get("status") == "published":
                before = cpu_times()
                floor = _floor(n, data, fig["tables"], args)
                floor["host"] = contention(before, cpu_times())
            fig["floor"] = floor
            runs.append(fig)
        _summary(runs)
    merged = _save(args.out / "bench.json", machine, runs)
    print(f"\nfigures: {args.out / 'bench.json'}")
    if args.plot:
        plot(merged, args.out / "bench.png")
        print(f"plot: {args.out / 'bench.png'}")


if __name__ == "__main__":
    main()
