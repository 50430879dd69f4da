"""`python -m bench` at the smallest scale: every step measured, rows that add up, a floor."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from etl.cdm.spec import cdm_tables

REPO = Path(__file__).resolve().parents[1]
PATIENTS = 60


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One benchmark run (DuckDB, 60 patients, three feeds, two nights); the JSON it wrote."""
    work = tmp_path_factory.mktemp("bench")
    out = work / "out"
    env = {k: v for k, v in os.environ.items() if not k.startswith("OMOP_ETL_DUCKDB_")}
    args = ["--patients", str(PATIENTS), "--engines", "duckdb", "--memory-limit", "1GB"]
    args += ["--threads", "2", "--nights", "2", "--workdir", str(work), "--out", str(out)]
    done = subprocess.run(
        [sys.executable, "-m", "bench", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "ratio" in done.stdout  # the summary table was printed
    figures = json.loads((out / "bench.json").read_text())
    return {"json": figures, "out": out, "work": work, "stdout": done.stdout}


def _run(bench_run: dict) -> dict:
    runs = bench_run["json"]["runs"]
    assert [(r["engine"], r["patients"]) for r in runs] == [("duckdb", PATIENTS)]
    return runs[0]


def test_every_step_is_measured(bench_run: dict) -> None:
    run = _run(bench_run)
    assert run["status"] == "published"
    timings = run["timings"]
    for step in ("extract", "land", "vocabulary", "stage", "gate", "report", "publish"):
        assert step in timings
    assert any(s.startswith("build.") for s in timings)
    assert set(timings) <= set(run["step_peak_mb"])  # a peak RSS for every timed step
    assert set(run["extract_seconds"]) == {"ehr", "lab", "pacs"}
    assert run["peak_mb"] > 0
    # the feeds run side by side in one step, `extract`, which holds their CPU (a CPU
    # figure of their own would count it twice in the run's total)
    assert set(timings) - {"extract.wall", "land"} <= set(run["step_cpu_seconds"])
    assert [c[0] for c in run["step_calls"]].count("extract") == 1
    assert run["timings"]["extract.wall"] <= run["timings"]["extract"] + 1e-6
    assert run["duckdb_settings"] == {"threads": 2, "memory_limit": "1GB"}
    # the host's contention during the run and during the floor (bench/host.py)
    for host in (run["host"], run["floor"]["host"]):
        assert set(host) == {"steal_pct", "iowait_pct", "steal_seconds"}
        assert 0 <= host["steal_pct"] <= 100 and 0 <= host["iowait_pct"] <= 100
    assert bench_run["json"]["machine"]["cores"] >= 1
    assert run["machine"] == bench_run["json"]["machine"]  # each run names its host
    assert (bench_run["out"] / "bench.png").stat().st_size > 0


def test_rows_add_up_with_the_run_report(bench_run: dict) -> None:
    run = _run(bench_run)
    report = json.loads((Path(run["run_dir"]) / "report.json").read_text())
    assert report["status"] == "published"
    assert run["tables"] == report["tables"]
    assert run["cdm_rows"] == sum(report["tables"].values()) > 0
    feeds = report["feeds"]
    assert set(feeds) == {"ehr", "lab", "pacs"}
    assert run["input_records"] == sum(f["records_in"] for f in feeds.values())
    for f in feeds.values():
        assert f["records_in"] == f["loaded"] + f["quarantined"] + f["filtered"]
    inputs = run["inputs"]
    assert feeds["lab"]["records_in"] == inputs["lab_results"] > 0  # one record per OBX
    assert feeds["pacs"]["records_in"] == inputs["dicom_files"] > 0
    person = report["tables"]["person"]
    assert person == PATIENTS


def test_the_floor_reads_the_same_input_and_writes_as_many_rows(bench_run: dict) -> None:
    run = _run(bench_run)
    floor = run["floor"]
    assert floor["seconds"] > 0 and floor["peak_mb"] > 0 and floor["cpu_seconds"] > 0
    spec = cdm_tables()
    assert floor["output_rows"] == sum(n for t, n in run["tables"].items() if t in spec)
    assert floor["csv_rows"] == run["feeds"]["ehr"]["records_in"]
    assert floor["dicom_files"] == run["inputs"]["dicom_files"]
    assert floor["hl7_segments"] > run["inputs"]["lab_messages"]


def test_a_second_night_rebuilds_the_same_rows_with_the_same_ids(bench_run: dict) -> None:
    import duckdb

    run = _run(bench_run)
    [night] = run["later_nights"]
    assert night["run"] == 2 and night["status"] == "published"
    assert night["run_dir"] != run["run_dir"] and "files" not in night
    assert night["tables"] == run["tables"]  # the same input: the same rows
    report = json.loads((Path(night["run_dir"]) / "report.json").read_text())
    assert report["status"] == "published" and report["tables"] == run["tables"]
    assert night["wall_seconds"] > 0 and night["peak_mb"] > 0
    assert "build.events" in night["timings"]
    assert "later nights" in bench_run["stdout"]
    # each night ran in its own worker process, as a site's nightly job does
    workers = bench_run["work"] / "runs_duckdb"
    assert (workers / f"ehr_{PATIENTS}_duckdb.log").is_file()
    assert (workers / f"ehr_{PATIENTS}_duckdb_run2.log").is_file()
    # every key of the second night was already known: the key map holds one id per row
    # of each keyed table, numbered 1..rows, not a second set minted on the second night
    db = bench_run["work"] / "runs_duckdb" / f"ehr_{PATIENTS}.duckdb"
    with duckdb.connect(str(db), read_only=True) as con:
        counted = con.sql("SELECT cdm_table, count(*), max(id) FROM main_etl.key_map GROUP BY 1")
        keys = {t: (n, top) for t, n, top in counted.fetchall()}
    for table in ("person", "visit_occurrence", "drug_exposure", "measurement"):
        assert keys[table] == (run["tables"][table], run["tables"][table]), table


def test_the_generated_feeds_are_deterministic(bench_run: dict, tmp_path: Path) -> None:
    from bench.feeds import write_lab

    work = bench_run["work"]
    again = write_lab(work / f"synthea_{PATIENTS}", tmp_path / "lab")
    assert again["messages"] == _run(bench_run)["inputs"]["lab_messages"]
    first = sorted((work / f"lab_{PATIENTS}").glob("*.hl7"))
    second = sorted((tmp_path / "lab").glob("*.hl7"))
    assert [p.read_bytes() for p in first] == [p.read_bytes() for p in second]


def test_above_the_billing_limit_the_export_has_no_billing_rows(tmp_path: Path) -> None:
    """--billing-max-patients: a larger N is scaled without claims, claim lines and payer
    transitions (their headers only), in its own folder, and its figures say so."""
    from bench.__main__ import _inputs
    from bench.synthea_scaler import count_rows

    data = _inputs(30, False, tmp_path)
    assert data["billing"] is False
    assert data["synthea"] == tmp_path / "synthea_30_nobilling"
    counts = count_rows(data["synthea"])
    for name in ("claims.csv", "claims_transactions.csv", "payer_transitions.csv"):
        assert counts[name] == 0
    assert counts["patients.csv"] == 30 and counts["encounters.csv"] > 0
    assert data["lab_messages"] > 0 and data["dicom_files"] > 0


def test_the_delta_benchmark_resends_every_row_of_the_chosen_patients(tmp_path: Path) -> None:
    """bench/delta_load.py's night 2: every row of about 1 in `100 / percent` patients,
    chosen by a hash of the id, in every file that names a patient, and nothing else."""
    import csv

    from bench.delta_load import make_delta
    from tests.conftest import DEMO_SYNTHEA

    counts = make_delta(DEMO_SYNTHEA, tmp_path / "delta", percent=25)

    with (tmp_path / "delta" / "patients.csv").open(encoding="utf-8", newline="") as fh:
        chosen = {r["Id"] for r in csv.DictReader(fh)}
    with (DEMO_SYNTHEA / "patients.csv").open(encoding="utf-8", newline="") as fh:
        everyone = {r["Id"] for r in csv.DictReader(fh)}
    assert chosen and chosen < everyone
    assert counts["patients.csv"] == len(chosen)
    assert "organizations.csv" not in counts  # no patient column: not re-sent
    with (DEMO_SYNTHEA / "conditions.csv").open(encoding="utf-8", newline="") as fh:
        expected = [r for r in csv.DictReader(fh) if r["PATIENT"] in chosen]
    with (tmp_path / "delta" / "conditions.csv").open(encoding="utf-8", newline="") as fh:
        assert list(csv.DictReader(fh)) == expected
    assert counts["conditions.csv"] == len(expected) > 0


def test_contention_is_the_share_of_cpu_time_stolen_and_waiting() -> None:
    """bench/host.py over two readings of /proc/stat's aggregate line: of 1,000 ticks
    spent, 100 stolen and 50 waiting for I/O; an older kernel's shorter line reads as
    zeros, and without two readings there are no figures."""
    from bench.host import contention, parse_proc_stat

    before = parse_proc_stat("cpu  100 0 50 800 10 0 0 40 0 0\ncpu0 50 0 25 400 5 0 0 20 0 0\n")
    after = parse_proc_stat("cpu  600 0 150 1050 60 0 0 140 0 0\n")
    figures = contention(before, after)
    assert figures is not None
    assert figures["steal_pct"] == 10.0 and figures["iowait_pct"] == 5.0
    assert figures["steal_seconds"] == round(100 / os.sysconf("SC_CLK_TCK"), 1)
    old_kernel = parse_proc_stat("cpu 1 2 3 4\n")
    assert old_kernel.ticks["steal"] == 0 and old_kernel.total == 10
    assert contention(None, after) is None and contention(before, before) is None
    with pytest.raises(ValueError):
        parse_proc_stat("intr 0\n")
