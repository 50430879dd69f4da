"""Person-sharded builds: the demo's three feeds (EHR, lab, PACS) built in 3 shards of
persons equal the same build in one, table by table with every id, lineage, records set
aside, key map and report; two nights running (known ids kept, new persons numbered)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from etl.config import load_config
from etl.pipeline.build import build_steps
from etl.pipeline.run import RunResult, run_pipeline
from etl.pipeline.shards import ShardError, shard_count, split_steps
from tests.conftest import DEMO_SYNTHEA, REPO
from tests.pipeline_helpers import rows, write_feeds_config, write_rows
from tests.test_dicom_pipeline import _pacs_tree
from tests.test_nightly_runs import snapshot

DEMO_LAB = REPO / "demo" / "lab"
# night 1 lacks these patients (their records are quarantined, their lab results make
# derived persons); night 2 delivers them: new persons, new ids
LATE_PATIENTS = 3
REPORT_KEYS = (
    "feeds", "quarantine", "filtered", "unmapped", "concept_gaps", "trace_samples", "tables",
)  # fmt: skip


def _config(tmp: Path, url: str, schema: str, ehr: Path, pacs: Path) -> Path:
    return write_feeds_config(tmp / f"{schema}.yaml", url, schema, ehr=ehr, lab=DEMO_LAB,
                              pacs=pacs)  # fmt: skip


def state(wh: Any, schema: str) -> dict[str, list[tuple]]:
    """Every published table (ids included), the lineage store, the records set aside and
    the key map, sorted; run ids and cdm_source's date left out."""
    out = snapshot(wh, schema)
    etl = f'"{schema}_etl"'
    queries = {
        "lineage": "SELECT cdm_table, cdm_id, feed, source_file, source_line,"
        f" source_vocabulary, source_code, mapping_rule FROM {etl}.lineage",
        "set_aside": "SELECT feed, source_file, source_line, record_set, status, rule"
        f" FROM {etl}.set_aside",
        "key_map": f"SELECT cdm_table, natural_key, id FROM {etl}.key_map",
    }
    with wh.engine.connect() as conn:
        for name, sql in queries.items():
            out[name] = sorted(tuple(r) for r in conn.execute(sa.text(sql)).all())
    return out


def _run(config: Path, workdir: Path, shards: int, workers: int = 1) -> RunResult:
    result = run_pipeline(load_config(config), workdir, shards=shards, shard_workers=workers)
    assert result.status == "published", result.report["errors"]
    return result


@pytest.fixture
def sharded_schemas(warehouse):
    """The warehouse, a schema for the one-shard build and one for the 3-shard build."""
    wh, schema = warehouse
    three = f"{schema}_n3"
    yield wh, schema, three
    if wh.dialect == "postgresql":
        with wh.begin() as conn:
            for suffix in ("", "_etl", "_stage", "_stage_0", "_stage_1", "_stage_2"):
                wh.drop_schema(conn, f"{three}{suffix}")


def test_three_shards_build_what_one_builds_night_after_night(
    sharded_schemas, tmp_path: Path
) -> None:
    wh, one, three = sharded_schemas
    ehr = tmp_path / "ehr"
    shutil.copytree(DEMO_SYNTHEA, ehr)
    _pacs_tree(tmp_path / "pacs")
    patients = rows(ehr / "patients.csv")
    header = list(patients[0])
    write_rows(ehr / "patients.csv", header, patients[:-LATE_PATIENTS])
    configs = {n: _config(tmp_path, wh.url, s, ehr, tmp_path / "pacs") for n, s in
               ((1, one), (3, three))}  # fmt: skip
    workers = 3 if wh.dialect == "postgresql" else 1  # parallel shard processes on PostgreSQL

    reports = {n: _run(configs[n], tmp_path / f"w{n}", n, workers if n > 1 else 1).report
               for n in (1, 3)}  # fmt: skip
    first = state(wh, one)
    assert state(wh, three) == first
    for key in REPORT_KEYS:
        assert reports[3][key] == reports[1][key], key
    # every feed and shard-built table has rows: the comparison is not vacuous
    assert {f: reports[1]["feeds"][f]["loaded"] > 0 for f in ("ehr", "lab", "pacs")} == {
        "ehr": True, "lab": True, "pacs": True,
    }  # fmt: skip
    built = ("visit_occurrence", "measurement", "cost", "payer_plan_period", "image_occurrence",
             "image_feature", "observation_period", "drug_era")  # fmt: skip
    assert [t for t in built if not first[t]] == []
    assert any(r[4] == "quarantined" and r[5] == "unknown_person" for r in first["set_aside"])
    steps = sorted(p.name for p in (tmp_path / "w3" / "runs").glob("*/steps/build*.json"))
    assert steps == [
        "build.json", "build.merge.json", "build.shard0.json", "build.shard1.json",
        "build.shard2.json",
    ]  # fmt: skip
    assert {"build.merge", "build.shard_stage", "build.events"} <= set(reports[3]["timings"])
    # the shard schemas are gone once merged
    assert not [s for s in sa.inspect(wh.engine).get_schema_names() if f"{three}_stage_" in s]

    if wh.dialect == "postgresql":
        return  # the second night's merge is the same SQL: once (on DuckDB) keeps it short
    # night 2: the late patients arrive, and two known patients are merged; known ids
    # stay, new ones are numbered alike
    write_rows(ehr / "patients.csv", header, patients)
    alive = sorted((p for p in patients[:-LATE_PATIENTS] if not p["DEATHDATE"]),
                   key=lambda p: p["BIRTHDATE"])  # fmt: skip
    merges = f"merged,surviving\n{alive[1]['Id']},{alive[0]['Id']}\n"
    (ehr / "person_merges.csv").write_text(merges, encoding="utf-8")
    night2 = {n: _run(configs[n], tmp_path / f"w{n}", n).report for n in (1, 3)}
    second = state(wh, one)
    assert state(wh, three) == second
    for key in (*REPORT_KEYS, "merges"):
        assert night2[3][key] == night2[1][key], key
    assert night2[1]["merges"]["person_records_merged"] == 1
    assert len(second["person"]) > len(first["person"])
    assert set(first["key_map"]) <= set(second["key_map"])


def test_steps_split_into_global_and_shard_steps() -> None:
    import datetime as dt

    steps = build_steps("site", dt.date(2024, 1, 1))
    global_steps, shard_steps = split_steps(steps)
    assert [n for n, _ in global_steps][:7] == [
        "merges", "rules", "mapping", "location", "care_site", "provider", "person",
    ]  # fmt: skip
    assert [n for n, _ in shard_steps] == [
        "visit_occurrence", "events", "imaging", "payer_plan_period", "cost",
        "observation_period", "eras",
    ]  # fmt: skip
    assert len(global_steps) + len(shard_steps) == len(steps)
    with pytest.raises(ShardError):
        split_steps([*steps, ("new_step", lambda s, c: None)])
    assert (shard_count(None), shard_count("3"), shard_count(2)) == (1, 3, 2)
    for bad in ("0", "three", -1):
        with pytest.raises(ShardError):
            shard_count(bad)


def test_cli_run_with_shards(duckdb_wh, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from etl.cli import app
    from tests.pipeline_helpers import scalar, write_config

    wh, schema = duckdb_wh
    config = write_config(tmp_path, wh, schema, DEMO_SYNTHEA)
    args = ["run", "--config", str(config), "--workdir", str(tmp_path), "--shards", "2"]
    result = CliRunner().invoke(app, [*args, "--shard-workers", "2"])  # DuckDB: one by one
    assert result.exit_code == 0, result.output
    [report] = [json.loads(p.read_text()) for p in tmp_path.glob("runs/*/report.json")]
    assert report["status"] == "published" and "build.merge" in report["timings"]
    assert scalar(wh, f"SELECT count(*) FROM {schema}.person") == report["tables"]["person"] == 27
    assert CliRunner().invoke(app, [*args[:-1], "0"]).exit_code == 2  # at least 1
