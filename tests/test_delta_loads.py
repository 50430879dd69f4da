"""Delta deliveries and patient merges: night after night equal to a full rebuild.

A feed configured with `delivery: delta` sends only what changed. Night 1 delivers the
whole demo export (the first delivery, no state yet); night 2 a delta with a changed row,
a new row, a deleted row (`deleted/`), a changed patient and a patient merge. The warehouse
must then hold exactly what a full rebuild from a snapshot of the final state gives (same
rows, same ids): night 3 delivers that snapshot to the same warehouse and changes nothing.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from tests.conftest import DEMO_SYNTHEA
from tests.pipeline_helpers import rows, run, scalar, write_config, write_rows
from tests.test_nightly_runs import snapshot


def _config(tmp: Path, wh, schema: str, feed: Path, delivery: str) -> Path:
    path = write_config(tmp, wh, schema, feed)
    cfg = yaml.safe_load(path.read_text(encoding="utf-8"))
    cfg["feeds"][0]["delivery"] = delivery
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path


class Night2:
    """The night-2 delta and the final snapshot it implies, built from the demo export."""

    def __init__(self, tmp: Path) -> None:
        self.delta = tmp / "delta2"
        self.final = tmp / "final"
        (self.delta / "deleted").mkdir(parents=True)
        shutil.copytree(DEMO_SYNTHEA, self.final)
        patients = rows(DEMO_SYNTHEA / "patients.csv")
        # two living patients; the survivor born first, so none of the merged patient's
        # records falls before the survivor's birth
        alive = sorted((p for p in patients if not p["DEATHDATE"]), key=lambda p: p["BIRTHDATE"])
        self.survivor, self.merged = alive[0]["Id"], alive[1]["Id"]
        changed_patient = dict(alive[2], ZIP="02139")
        p_header = list(patients[0])
        write_rows(self.delta / "patients.csv", p_header, [changed_patient])
        write_rows(
            self.final / "patients.csv",
            p_header,
            [changed_patient if p["Id"] == changed_patient["Id"] else p for p in patients],
        )

        conditions = rows(DEMO_SYNTHEA / "conditions.csv")
        c_header = list(conditions[0])
        merging = {self.survivor, self.merged}
        i_open = next(
            i for i, c in enumerate(conditions) if not c["STOP"] and c["PATIENT"] not in merging
        )
        changed = dict(conditions[i_open], STOP="2024-01-01")
        new = dict(conditions[i_open], START="2024-01-15", STOP="", CODE="195662009")
        i_gone = next(
            i for i, c in enumerate(conditions) if i != i_open and c["PATIENT"] != self.merged
        )
        self.gone = conditions[i_gone]
        write_rows(self.delta / "conditions.csv", c_header, [changed, new])
        write_rows(self.delta / "deleted" / "conditions.csv", c_header, [self.gone])
        final = [changed if i == i_open else c for i, c in enumerate(conditions) if i != i_gone]
        write_rows(self.final / "conditions.csv", c_header, [*final, new])

        merges = "merged,surviving\n" + f"{self.merged},{self.survivor}\n"
        (self.delta / "person_merges.csv").write_text(merges, encoding="utf-8")
        (self.final / "person_merges.csv").write_text(merges, encoding="utf-8")


@pytest.fixture
def night2(tmp_path: Path) -> Night2:
    return Night2(tmp_path)


def _person_id(wh, schema: str, source_id: str) -> int:
    from etl.pseudonym import load_key, pseudonym

    key = pseudonym(load_key("OMOP_ETL_PSEUDONYM_KEY"), source_id)
    return scalar(
        wh, f'SELECT id FROM "{schema}_etl".key_map WHERE cdm_table = \'person\''
        " AND natural_key = :k", k=key,
    )  # fmt: skip


def test_delta_nights_equal_a_full_rebuild(warehouse, night2: Night2, tmp_path: Path) -> None:
    wh, schema = warehouse
    work = tmp_path / "work"
    first = tmp_path / "delta1"
    shutil.copytree(DEMO_SYNTHEA, first)

    one = run(_config(tmp_path, wh, schema, first, "delta"), work)
    assert one.status == "published", one.report["errors"]
    assert one.report["deltas"]["ehr"]["base_run"] is None
    before = snapshot(wh, schema)
    persons_before = len(before["person"])

    two = run(_config(tmp_path, wh, schema, night2.delta, "delta"), work)
    assert two.status == "published", two.report["errors"]
    delta = two.report["deltas"]["ehr"]
    assert delta["base_run"] == one.run_id
    assert delta["replaced"]["event"] == 1  # the condition that got a stop date
    assert delta["deleted"]["event"] == 1
    assert delta["replaced"]["person"] == 1
    landed = pq.ParquetFile(work / "runs" / one.run_id / "landing/ehr/event.parquet")
    assert delta["carried"]["event"] == landed.metadata.num_rows - 2
    assert delta["delivered"]["event"] == 2 and delta["delivered"]["person_merge"] == 1
    files = two.report["feeds"]["ehr"]["files"]
    deleted = files[f"{two.run_id}/deleted/conditions.csv"]
    assert deleted == {
        "record_set": "conditions", "records_in": 1, "loaded": 0, "quarantined": 0,
        "filtered": 1,
    }  # fmt: skip
    assert files[f"{two.run_id}/person_merges.csv"]["loaded"] == 1
    assert files[f"{two.run_id}/conditions.csv"]["loaded"] == 2
    assert two.report["merges"] == {
        "declared_tonight": 1, "in_force": 1, "person_records_merged": 1,
    }  # fmt: skip

    survivor = _person_id(wh, schema, night2.survivor)
    merged = _person_id(wh, schema, night2.merged)
    after = snapshot(wh, schema)
    assert len(after["person"]) == persons_before - 1
    assert scalar(wh, f'SELECT count(*) FROM "{schema}".person WHERE person_id = {merged}') == 0
    for table in ("visit_occurrence", "condition_occurrence", "observation_period"):
        assert (
            scalar(wh, f'SELECT count(*) FROM "{schema}".{table} WHERE person_id = {merged}') == 0
        )
    # the merged patient's visits moved to the survivor with their ids
    moved = [r for r in before["visit_occurrence"] if r[1] == merged]
    assert moved
    after_visits = {r[0]: r for r in after["visit_occurrence"]}
    assert all(after_visits[r[0]][1] == survivor for r in moved)
    assert (
        scalar(
            wh,
            f'SELECT count(*) FROM "{schema}".condition_occurrence'
            " WHERE condition_start_date = DATE '2024-01-15'",
        )
        == 1
    )

    # a full rebuild from a snapshot of the final state changes nothing
    three = run(_config(tmp_path, wh, schema, night2.final, "snapshot"), work)
    assert three.status == "published", three.report["errors"]
    assert snapshot(wh, schema) == after


# --- the lab feed: new messages only, with a cancellation, a correction and an A40 ----

LAB_DELTA = (
    "MSH|^~\\&|SYNTHEA_LAB|DEMO_HOSPITAL|OMOP_ETL|DEMO|20250101120000+0000||ORU^R01^ORU_R01"
    "|DELTA001|P|2.5.1\r"
    "PID|1||{patient}^^^SYNTHEA^MR||||20240103|F\r"
    "OBR|1||F00036^SYNTHEA_LAB|11502-2^Laboratory report^LN|||20240103232416+0000\r"
    "OBX|1|NM|21000-5^Erythrocyte distribution width^LN||40.5|fL^^UCUM|39-46|N|||X\r"
    "OBX|2|NM|32207-3^Platelet distribution width^LN||19.8|fL^^UCUM|9.0-17.0|H|||C"
    "|||20240103232416+0000\r"
    "MSH|^~\\&|MPI|DEMO_HOSPITAL|OMOP_ETL|DEMO|20250101130000+0000||ADT^A40^ADT_A39"
    "|DELTA002|P|2.5.1\r"
    "EVN|A40|20250101130000\r"
    "PID|1||{survivor}^^^SYNTHEA^MR\r"
    "MRG|{merged}^^^SYNTHEA^MR\r"
)


def _lab_config(tmp: Path, wh, schema: str, lab: Path, delivery: str) -> Path:
    from tests.test_hl7v2_pipeline import write_lab_config

    path = write_lab_config(tmp, wh, schema)
    cfg = yaml.safe_load(path.read_text(encoding="utf-8"))
    cfg["feeds"][1].update(path=str(lab), delivery=delivery)
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path


def test_lab_delta_cancels_corrects_and_merges(duckdb_wh, night2: Night2, tmp_path) -> None:
    from tests.test_hl7v2_pipeline import DEMO_LAB

    wh, schema = duckdb_wh
    work = tmp_path / "work"
    patient = "6cf3d1b9-4d5e-8bb3-51f4-e047a6386c38"  # demo/lab oru_001's second message
    message = LAB_DELTA.format(patient=patient, survivor=night2.survivor, merged=night2.merged)
    delta = tmp_path / "lab_delta"
    delta.mkdir()
    (delta / "delta_001.hl7").write_text(message, encoding="utf-8")
    final = tmp_path / "lab_final"
    shutil.copytree(DEMO_LAB, final)
    (final / "zz_delta_001.hl7").write_text(message, encoding="utf-8")

    one = run(_lab_config(tmp_path, wh, schema, DEMO_LAB, "delta"), work)
    assert one.status == "published", one.report["errors"]
    width = (
        f'SELECT count(*) FROM "{schema}".measurement m JOIN "{schema}".person p'
        " ON p.person_id = m.person_id WHERE m.measurement_source_value = :code"
        f" AND m.person_id = {_person_id(wh, schema, patient)}"
    )
    assert scalar(wh, width, code="21000-5") == 1

    two = run(_lab_config(tmp_path, wh, schema, delta, "delta"), work)
    assert two.status == "published", two.report["errors"]
    lab = two.report["deltas"]["lab"]
    assert lab["deleted"]["event"] == 1 and lab["replaced"]["event"] == 1
    assert two.report["feeds"]["lab"]["files"][f"{two.run_id}/delta_001.hl7"] == {
        "record_set": "lab_results", "records_in": 3, "loaded": 2, "quarantined": 0,
        "filtered": 1,
    }  # fmt: skip
    assert scalar(wh, width, code="21000-5") == 0
    assert (
        scalar(
            wh,
            f'SELECT value_as_number FROM "{schema}".measurement'
            " WHERE measurement_source_value = '32207-3'"
            f" AND person_id = {_person_id(wh, schema, patient)}",
        )
        == 19.8
    )
    assert two.report["merges"]["in_force"] == 1
    merged = _person_id(wh, schema, night2.merged)
    assert scalar(wh, f'SELECT count(*) FROM "{schema}".person WHERE person_id = {merged}') == 0
    after = snapshot(wh, schema)

    three = run(_lab_config(tmp_path, wh, schema, final, "snapshot"), work)
    assert three.status == "published", three.report["errors"]
    assert snapshot(wh, schema) == after
