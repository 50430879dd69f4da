"""How long Airflow takes to parse each DAG file of dags/ (the DAG processor does it often).

    python bench/dag_import.py [--repeat 5]

Each measurement runs in a fresh interpreter with a throw-away AIRFLOW_HOME: Airflow's own
import (`airflow.sdk`) is timed first, then the DAG file through a DagBag, so the second
figure is what the file itself costs (our imports and the DAG definition). Prints seconds
(median of the repeats) and the heavy modules, if any, the parse pulled in.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.measure import print_table  # noqa: E402

HEAVY = ("duckdb", "pyarrow", "great_expectations", "psycopg", "pandas", "etl.pipeline.steps")

_WORKER = """
import json, sys, time
t0 = time.perf_counter()
import airflow.sdk  # noqa: F401
from airflow.dag_processing.dagbag import DagBag
t1 = time.perf_counter()
bag = DagBag(sys.argv[1])
t2 = time.perf_counter()
heavy = [m for m in {heavy!r} if m in sys.modules]
print(json.dumps({{"airflow": t1 - t0, "dag_file": t2 - t1, "dags": sorted(bag.dags),
                  "errors": len(bag.import_errors), "heavy": heavy}}))
"""


def measure(path: Path, home: Path) -> dict:
    env = {
        **os.environ,
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home / 'airflow.db'}",
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__DAGS_FOLDER": str(path.parent),
        "PYTHONPATH": str(REPO),
    }
    out = subprocess.run(
        [sys.executable, "-c", _WORKER.format(heavy=HEAVY), str(path)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as home:
        for path in sorted((REPO / "dags").glob("*.py")):
            runs = [measure(path, Path(home)) for _ in range(args.repeat)]
            rows.append(
                [
                    path.name,
                    ", ".join(runs[0]["dags"]) or "-",
                    f"{statistics.median(r['airflow'] for r in runs):.3f}",
                    f"{statistics.median(r['dag_file'] for r in runs):.3f}",
                    str(runs[0]["errors"]),
                    ", ".join(runs[0]["heavy"]) or "none",
                ]
            )
    print_table(
        ["file", "dags", "airflow import s", "dag file parse s", "import errors", "heavy"],
        rows,
    )


if __name__ == "__main__":
    main()
