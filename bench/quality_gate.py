"""The quality gate's cost beside the build's, at scale, on DuckDB and PostgreSQL.

    python bench/quality_gate.py [--patients 10000,100000] [--engines duckdb,postgresql]
                                 [--workdir bench/out]

Runs bench/ehr_build.py (the whole nightly pipeline on N scaled Synthea patients, each
run in its own process) for every engine and N, then prints from its figures: the
build's time (the build.* steps), the DQD checks' time (`gate`), the Great Expectations
suites' time (`gate.great_expectations`), the number of checks, and each gate part as a
ratio to the build. Figures go to WORKDIR/quality_gate.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.measure import print_table  # noqa: E402


def gate_figures(run: dict[str, Any]) -> dict[str, Any]:
    """The gate's part of one ehr_build figure."""
    timings = run.get("timings", {})
    build = sum(v for k, v in timings.items() if k.startswith("build."))
    dqd = timings.get("gate", 0.0)
    ge = timings.get("gate.great_expectations", 0.0)
    return {
        "engine": run["engine"],
        "patients": run["patients"],
        "status": run.get("status"),
        "cdm_rows": run.get("cdm_rows", 0),
        "build_s": round(build, 2),
        "dqd_s": round(dqd, 2),
        "ge_s": round(ge, 2),
        "dqd_to_build": round(dqd / build, 3) if build else None,
        "ge_to_build": round(ge / build, 3) if build else None,
        "gate_to_build": round((dqd + ge) / build, 3) if build else None,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--patients", default="10000,100000")
    ap.add_argument("--engines", default="duckdb,postgresql")
    ap.add_argument("--workdir", type=Path, default=REPO / "bench" / "out")
    args = ap.parse_args()
    workdir = args.workdir.resolve()
    figures = []
    for engine in args.engines.split(","):
        subprocess.run(
            [sys.executable, str(REPO / "bench" / "ehr_build.py"), "--patients", args.patients,
             "--engine", engine, "--workdir", str(workdir)],
            check=True,
        )  # fmt: skip
        wanted = {int(n) for n in args.patients.split(",")}
        runs = json.loads((workdir / "ehr_build.json").read_text(encoding="utf-8"))
        figures += [
            gate_figures(r)
            for r in runs
            if r.get("engine") == engine and r.get("patients") in wanted and r.get("run") == 1
        ]
    print("\nquality gate vs build")
    print_table(
        ["engine", "patients", "CDM rows", "build s", "DQD s", "GE s", "DQD/build", "GE/build",
         "gate/build"],
        [[f["engine"], f"{f['patients']:,}", f"{f['cdm_rows']:,}", f["build_s"], f["dqd_s"],
          f["ge_s"], f["dqd_to_build"], f["ge_to_build"], f["gate_to_build"]] for f in figures],
    )  # fmt: skip
    out = workdir / "quality_gate.json"
    out.write_text(json.dumps(figures, indent=2), encoding="utf-8")
    print(f"figures: {out}")


if __name__ == "__main__":
    main()
