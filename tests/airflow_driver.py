"""Run a DAG of dags/ once with `dag.test()`, in a process of its own (tests/test_dags.py).

    python -m tests.airflow_driver init
    python -m tests.airflow_driver run DAG_ID OUT.json [--conf JSON] [--inject-sql SQL]

The environment (set by the test) names a temporary AIRFLOW_HOME with a SQLite metadata
database, the DAGs folder, and the Variables and Connection (AIRFLOW_VAR_*,
AIRFLOW_CONN_*). `--inject-sql` runs SQL ({S}.<table>: the build's table) just before the
quality gate, the way tests/test_quality_gate.py injects defects. OUT.json gets the run's
state, every task's state, XComs `report` and the CDM Asset's events.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def _init() -> None:
    from airflow.utils import db

    db.initdb()


def _inject(sql: str) -> None:
    import sqlalchemy as sa

    from etl.pipeline.steps import NightlyRun
    from tests.pipeline_helpers import in_tonights_tables

    real_gate = NightlyRun.gate

    def gate(self, on_step=None):  # type: ignore[no-untyped-def]
        with self.warehouse() as s, s.wh.begin() as conn:
            conn.execute(sa.text(in_tonights_tables(s, sql)))
        return real_gate(self, on_step)

    NightlyRun.gate = gate  # type: ignore[method-assign]


def _run(dag_id: str, out: Path, conf: dict, inject: str | None) -> None:
    from airflow.dag_processing.dagbag import DagBag
    from airflow.models.asset import AssetEvent, AssetModel
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session

    bag = DagBag(os.environ["AIRFLOW__CORE__DAGS_FOLDER"])
    if bag.import_errors:
        raise SystemExit(f"import errors: {bag.import_errors}")
    if inject:
        _inject(inject)
    dr = bag.dags[dag_id].test(run_conf=conf or None)
    with create_session() as session:
        tis = {
            ti.task_id + (f"[{ti.map_index}]" if ti.map_index >= 0 else ""): str(ti.state)
            for ti in dr.get_task_instances(session=session)
        }
        xcoms = {
            x.task_id: x.value
            for x in session.query(XComModel).filter(
                XComModel.dag_id == dag_id, XComModel.run_id == dr.run_id, XComModel.key == "report"
            )
        }
        events = [
            {"uri": a.uri, "name": a.name, "extra": e.extra, "dag_id": e.source_dag_id}
            for e, a in session.query(AssetEvent, AssetModel).join(
                AssetModel, AssetModel.id == AssetEvent.asset_id
            )
        ]
    out.write_text(
        json.dumps(
            {"state": str(dr.state), "tasks": tis, "report_xcom": xcoms, "asset_events": events},
            indent=1,
            default=str,
        ),
        encoding="utf-8",
    )


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("init")
    r = sub.add_parser("run")
    r.add_argument("dag_id")
    r.add_argument("out", type=Path)
    r.add_argument("--conf", default="{}")
    r.add_argument("--inject-sql")
    args = parser.parse_args(argv)
    if args.command == "init":
        _init()
    else:
        _run(args.dag_id, args.out, json.loads(args.conf), args.inject_sql)


if __name__ == "__main__":
    main(sys.argv[1:])
    sys.stdout.flush()
    os._exit(0)  # skip DuckDB's noisy nanobind teardown
