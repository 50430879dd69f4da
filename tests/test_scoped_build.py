"""Person-scoped builds: a delta night rebuilds only the patients it touched, and the
warehouse it publishes equals a full build's of the same night, row for row and id for id,
with the same lineage, records set aside, key map and report.

The demo's three feeds (EHR, lab, PACS), all `delivery: delta`, go to two schemas: night 1
delivers everything to both; night 2 delivers the same delta to both (a changed patient,
a changed, a new and a deleted condition, a patient merge, a lab cancellation and
correction, an ADT^A40, no new images), built person-scoped in one and in full
(OMOP_ETL_BUILD_SCOPE=full) in the other.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from etl.config import load_config
from etl.pipeline.run import RunResult, run_pipeline
from etl.pipeline.scope import SCOPE_ENV
from tests.conftest import DEMO_SYNTHEA, REPO
from tests.pipeline_helpers import rows, write_feeds_config, write_rows
from tests.test_delta_loads import LAB_DELTA, Night2
from tests.test_dicom_pipeline import _pacs_tree
from tests.test_shards import REPORT_KEYS, state

DEMO_LAB = REPO / "demo" / "lab"
LAB_PATIENT = "6cf3d1b9-4d5e-8bb3-51f4-e047a6386c38"  # demo/lab oru_001's second message


def _config(tmp: Path, url: str, schema: str, ehr: Path, lab: Path, pacs: Path) -> Path:
    return write_feeds_config(tmp / f"{schema}_{ehr.name}.yaml", url, schema, ehr=ehr, lab=lab,
                              pacs=pacs, delivery="delta")  # fmt: skip


def _run(config: Path, workdir: Path) -> RunResult:
    result = run_pipeline(load_config(config), workdir)
    assert result.status == "published", result.report["errors"]
    return result


def _normalised(value: Any, runs: dict[str, str]) -> Any:
    """`value` with run ids (in delivered files' names) replaced by their night's label."""
    text = json.dumps(value, default=str, sort_keys=True)
    for run_id, label in runs.items():
        text = text.replace(run_id, label)
    return json.loads(text)


@pytest.fixture
def two_schemas(warehouse):
    wh, schema = warehouse
    full = f"{schema}_full"
    yield wh, schema, full
    if wh.dialect == "postgresql":
        with wh.begin() as conn:
            for suffix in ("", "_etl", "_stage", "_stage_0"):
                wh.drop_schema(conn, f"{full}{suffix}")


def test_scoped_delta_night_equals_a_full_build(
    two_schemas, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    wh, scoped, full = two_schemas
    _pacs_tree(tmp_path / "pacs1")
    night2 = Night2(tmp_path)
    # inconsistent source data: a condition of tonight's changed patient recorded in
    # another, untouched patient's encounter (a full build links it to that visit)
    ehr1 = tmp_path / "ehr1"
    shutil.copytree(DEMO_SYNTHEA, ehr1)
    changed = rows(night2.delta / "patients.csv")[0]["Id"]
    touched = {changed, night2.survivor, night2.merged, LAB_PATIENT}
    for path in (night2.delta / "conditions.csv", night2.delta / "deleted" / "conditions.csv"):
        touched |= {r["PATIENT"] for r in rows(path)}
    conditions = rows(ehr1 / "conditions.csv")
    elsewhere = next(c["ENCOUNTER"] for c in conditions if c["PATIENT"] not in touched)
    i = next(i for i, c in enumerate(conditions) if c["PATIENT"] == changed)
    conditions[i] = dict(conditions[i], ENCOUNTER=elsewhere)
    write_rows(ehr1 / "conditions.csv", list(conditions[0]), conditions)
    lab2 = tmp_path / "lab2"
    lab2.mkdir()
    message = LAB_DELTA.format(patient=LAB_PATIENT, survivor=night2.survivor, merged=night2.merged)
    (lab2 / "delta_001.hl7").write_text(message, encoding="utf-8")
    (tmp_path / "pacs2").mkdir()  # no new images tonight

    def night(n: int, schema: str) -> RunResult:
        ehr = ehr1 if n == 1 else night2.delta
        lab, pacs = (DEMO_LAB, tmp_path / "pacs1") if n == 1 else (lab2, tmp_path / "pacs2")
        config = _config(tmp_path, wh.url, schema, ehr, lab, pacs)
        return _run(config, tmp_path / f"work_{schema}")

    first = {schema: night(1, schema) for schema in (scoped, full)}
    assert first[scoped].report["build_scope"]["mode"] == "full"  # no state yet
    two = night(2, scoped)
    monkeypatch.setenv(SCOPE_ENV, "full")
    two_full = night(2, full)
    monkeypatch.delenv(SCOPE_ENV)

    scope = two.report["build_scope"]
    assert scope["mode"] == "persons", scope
    persons = scope["persons"]
    # the changed patient, the two conditions' patients, the merged pair, the lab patient
    assert 3 <= scope["persons_rebuilt"] <= 7 < persons
    assert scope["rows_copied"] > 0
    assert two_full.report["build_scope"] == {"mode": "full", "reason": f"{SCOPE_ENV}=full"}
    assert "build.copy_untouched" in two.report["timings"]
    page = (two.run_dir / "report.html").read_text(encoding="utf-8")
    assert f"{scope['persons_rebuilt']} of {persons} patients rebuilt" in page
    assert "<h2>Delta deliveries</h2>" in page and "Patient merges in force: 1" in page

    labels = {scoped: {}, full: {}}
    for schema, a, b in ((scoped, first[scoped], two), (full, first[full], two_full)):
        labels[schema] = {a.run_id: "NIGHT1", b.run_id: "NIGHT2"}
    got = _normalised(state(wh, scoped), labels[scoped])
    want = _normalised(state(wh, full), labels[full])
    assert got.keys() == want.keys()
    for table in want:
        assert got[table] == want[table], table
    for key in (*REPORT_KEYS, "merges", "deltas"):
        assert _normalised(two.report[key], labels[scoped]) == _normalised(
            two_full.report[key], labels[full]
        ), key
    # the comparison is not vacuous: images, lab results and costs of untouched patients
    # were copied, not rebuilt
    for table in ("image_occurrence", "image_feature", "measurement", "cost", "drug_era"):
        assert want[table], table
    assert any(r[3] == "dicom_instances" for r in want["set_aside"])


def test_changed_look_up_records_take_a_full_build(duckdb_wh, tmp_path: Path) -> None:
    wh, schema = duckdb_wh
    _pacs_tree(tmp_path / "pacs1")
    (tmp_path / "pacs2").mkdir()
    (tmp_path / "lab2").mkdir()
    _run(_config(tmp_path, wh.url, schema, DEMO_SYNTHEA, DEMO_LAB, tmp_path / "pacs1"),
         tmp_path / "work")  # fmt: skip
    delta = tmp_path / "delta"
    delta.mkdir()
    providers = rows(DEMO_SYNTHEA / "providers.csv")
    write_rows(delta / "providers.csv", list(providers[0]), [dict(providers[0], NAME="Renamed")])
    config = _config(tmp_path, wh.url, schema, delta, tmp_path / "lab2", tmp_path / "pacs2")
    two = _run(config, tmp_path / "work")
    assert two.report["build_scope"]["mode"] == "full"
    assert "look-up records (provider)" in two.report["build_scope"]["reason"]

    # the same delivery again, with nothing of a patient: no patient to rebuild
    shutil.rmtree(delta)
    delta.mkdir()
    three = _run(config, tmp_path / "work")
    assert three.report["build_scope"]["mode"] == "persons"
    assert three.report["build_scope"]["persons_rebuilt"] == 0
    assert three.report["tables"] == two.report["tables"]
    before = state(wh, schema)

    # every patient re-sent unchanged: more than half touched, a full build is cheaper
    shutil.copyfile(DEMO_SYNTHEA / "patients.csv", delta / "patients.csv")
    four = _run(config, tmp_path / "work")
    assert four.report["build_scope"]["mode"] == "full"
    assert "more than half" in four.report["build_scope"]["reason"]
    after = state(wh, schema)
    for table in after:
        if table not in ("lineage", "set_aside"):  # tonight's file names the patients now
            assert after[table] == before[table], table
