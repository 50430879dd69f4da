"""Whole pipeline: the demo EHR with its laboratory rows excluded, plus the demo lab feed
(HL7 v2 ORU) that delivers the same results; on DuckDB and PostgreSQL."""

from __future__ import annotations

import csv
import datetime as dt
import json
from pathlib import Path
from typing import Any

import yaml

from etl.pseudonym import pseudonym
from tests.conftest import DEMO_SYNTHEA, DEMO_VOCAB, REPO, TEST_KEY
from tests.pipeline_helpers import query, run

DEMO_LAB = REPO / "demo" / "lab"
KEY = TEST_KEY.encode()


def write_lab_config(tmp: Path, wh: Any, schema: str, *, exclude: bool = True) -> Path:
    ehr: dict[str, Any] = {
        "name": "ehr",
        "kind": "ehr_csv",
        "profile": "synthea",
        "path": str(DEMO_SYNTHEA),
    }
    feeds = [ehr]
    if exclude:
        ehr["exclude"] = ["laboratory_from_lab_feed"]
        feeds.append({"name": "lab", "kind": "hl7v2", "path": str(DEMO_LAB)})
    cfg = {
        "warehouse": wh.url,
        "cdm_schema": schema,
        "vocabulary": str(DEMO_VOCAB),
        "quality": str(REPO / "quality" / "demo"),
        "feeds": feeds,
    }
    path = tmp / "site.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path


def lab_rows() -> list[dict[str, str]]:
    with (DEMO_SYNTHEA / "observations.csv").open(encoding="utf-8", newline="") as fh:
        return [r for r in csv.DictReader(fh) if r["CATEGORY"] == "laboratory"]


def expected_results() -> list[tuple]:
    out = []
    for r in lab_rows():
        value = float(r["VALUE"]) if r["TYPE"] == "numeric" else None
        when = dt.datetime.strptime(r["DATE"], "%Y-%m-%dT%H:%M:%SZ")
        out.append((pseudonym(KEY, r["PATIENT"]), r["CODE"], when, value, r["UNITS"] or None))
    return sorted(out, key=repr)


# lab results land where their concept's domain says (LOINC 56799-0 is an Observation),
# exactly as the same rows from the EHR do
RESULTS = """
    SELECT p.person_source_value, m.measurement_source_value, m.measurement_datetime,
           m.value_as_number, m.unit_source_value, m.measurement_concept_id,
           m.unit_concept_id, m.range_low, m.range_high, m.visit_occurrence_id,
           CAST(NULL AS VARCHAR) AS value_as_string
    FROM {s}.measurement m JOIN {s}.person p ON p.person_id = m.person_id
    WHERE m.measurement_type_concept_id = {t}
    UNION ALL
    SELECT p.person_source_value, o.observation_source_value, o.observation_datetime,
           o.value_as_number, o.unit_source_value, o.observation_concept_id,
           o.unit_concept_id, NULL, NULL, o.visit_occurrence_id, o.value_as_string
    FROM {s}.observation o JOIN {s}.person p ON p.person_id = o.person_id
    WHERE o.observation_type_concept_id = {t}
"""


def _norm(rows: list[tuple]) -> list[tuple]:
    out = []
    for r in rows:
        when = r[2] if isinstance(r[2], dt.datetime) else dt.datetime.fromisoformat(str(r[2]))
        out.append((r[0], r[1], when.replace(tzinfo=None), *r[3:]))
    return sorted(out, key=repr)


def test_lab_feed_replaces_ehr_laboratory_rows(tmp_path: Path, warehouse) -> None:
    wh, schema = warehouse
    result = run(write_lab_config(tmp_path, wh, schema), tmp_path / "work")
    assert result.status == "published", result.report["errors"]
    report = json.loads((result.run_dir / "report.json").read_text(encoding="utf-8"))
    lab = report["feeds"]["lab"]
    assert lab["records_in"] == 251
    assert lab["records_in"] == lab["loaded"] + lab["quarantined"] + lab["filtered"]
    assert (lab["loaded"], lab["quarantined"], lab["filtered"]) == (251, 0, 0)
    excluded = [
        f
        for f in report["filtered"]
        if f["feed"] == "ehr" and f["rule"] == "laboratory_from_lab_feed"
    ]
    assert sum(f["rows"] for f in excluded) == 251

    got = _norm(query(wh, RESULTS.format(s=schema, t=32856)))
    # every laboratory observation arrives once, from the lab feed, on the EHR's patient
    assert [r[:5] for r in got] == expected_results()
    codes = ", ".join(sorted({f"'{r['CODE']}'" for r in lab_rows()}))
    ehr_labs = f"SELECT * FROM ({RESULTS.format(s=schema, t=32817)}) x"
    assert not query(wh, ehr_labs + f" WHERE x.measurement_source_value IN ({codes})")
    # visits: the EHR's encounter (PV1-19) through the key map
    visit_ids = {pseudonym(KEY, r["ENCOUNTER"]): r["ENCOUNTER"] for r in lab_rows()}
    key_map = dict(
        query(
            wh,
            f"SELECT natural_key, id FROM {schema}_etl.key_map"
            " WHERE cdm_table = 'visit_occurrence'",
        )
    )
    expected_visits = sorted(
        key_map[k] for r in lab_rows() for k in [pseudonym(KEY, r["ENCOUNTER"])]
    )
    assert sorted(r[9] for r in got) == expected_visits
    assert len(visit_ids) == len({r[9] for r in got})
    # concepts: the standard LOINC concept of the code, as for the EHR's rows
    standard = dict(
        query(
            wh,
            f"SELECT concept_code, concept_id FROM {schema}.concept"
            f" WHERE vocabulary_id = 'LOINC' AND standard_concept = 'S'"
            f" AND concept_code IN ({codes})",
        )
    )
    assert len(standard) > 30
    assert all(r[5] == standard[r[1]] for r in got if r[1] in standard)
    # units and ranges filled
    numeric = [r for r in got if r[3] is not None]
    assert len(numeric) == 233
    assert all(r[5] != 0 for r in numeric)
    assert all(r[4] for r in numeric)
    assert {r[6] for r in numeric if r[4] == "mg/dL"} == {8840}  # UCUM milligram per decilitre
    assert all(r[7] is not None or r[8] is not None for r in numeric)
    glucose = {(r[7], r[8]) for r in got if r[1] == "2339-0"}
    assert glucose == {(70.0, 99.0)}
    # the address answer (LOINC 56799-0) is a result without its value
    address = [r for r in got if r[1] == "56799-0"]
    assert len(address) == 18 and all(r[3] is None and r[10] is None for r in address)


def test_public_messages_alone_with_patients_created_from_pid(tmp_path: Path, duckdb_wh) -> None:
    """Only a lab feed (the public test messages), its patients derived from PID: the run
    publishes, and every OBX/SPM of every file is accounted for in report.json."""
    wh, schema = duckdb_wh
    cfg = {
        "warehouse": wh.url,
        "cdm_schema": schema,
        "vocabulary": str(DEMO_VOCAB),
        "quality": str(REPO / "quality" / "demo"),
        "feeds": [
            {
                "name": "lab",
                "kind": "hl7v2",
                "path": str(REPO / "tests" / "data" / "hl7v2"),
                "unknown_patient": "create",
            }
        ],
    }
    path = tmp_path / "site.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    result = run(path, tmp_path / "work")
    assert result.status == "published", result.report["errors"]
    lab = result.report["feeds"]["lab"]
    assert len(lab["files"]) == 21
    for name, f in lab["files"].items():
        assert f["records_in"] == f["loaded"] + f["quarantined"] + f["filtered"], name
    assert lab["loaded"] > 150 and lab["quarantined"] > 0 and lab["filtered"] > 0
    # persons from PID-8 through mappings/local/hl7v2.csv (M, F), birth dates from PID-7
    genders = dict(
        query(
            wh,
            f"SELECT gender_source_value, min(gender_concept_id) FROM {schema}.person GROUP BY 1",
        )
    )
    assert genders.get("F") == 8532 and genders.get("M") == 8507
    # specimens land in SPECIMEN with the Lab type
    specimens = query(
        wh,
        f"SELECT specimen_source_value, specimen_type_concept_id FROM {schema}.specimen",
    )
    assert ("258500001", 32856) in specimens
