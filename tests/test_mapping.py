"""The mapper's cases end to end: tiny Synthea feeds, a doctored vocabulary, local maps.

Each test builds, in its own folder, a feed of a few records, a vocabulary release (the
bundled demo release plus made-up rows where the case needs them) and a mappings folder
(the project's, plus local or Usagi maps), runs the whole pipeline on DuckDB and on
PostgreSQL and checks the published CDM rows concept by concept.
"""

from __future__ import annotations

import csv
import datetime as dt
import shutil
from pathlib import Path
from typing import Any

from etl.paths import MAPPINGS_DIR
from tests.conftest import DEMO_SYNTHEA, DEMO_VOCAB
from tests.pipeline_helpers import query, run, scalar, write_config, write_rows

PATIENT = "5b0e6c1e-6a1f-4d1e-9c53-2f0f4a7d9b11"
ENCOUNTER = "8c2d7e4a-1b3c-4e5f-8a9b-0c1d2e3f4a5b"
DAY = "2020-05-01"
STAMP = "2020-05-01T10:00:00Z"

# Made-up concepts live at 2,000,000,000 and above (OMOP's range for local concepts).
ONE_TO_MANY = 2000000001  # SNOMED, non-standard, 'Maps to' a Condition and an Observation
QUESTION = 2000000002  # LOINC, non-standard, 'Maps to' + 'Maps to value'
ANSWER = 2000000003  # Meas Value, standard: the answer of QUESTION

# Real concepts of the demo release (vocab/CONCEPT.csv).
PHARYNGITIS = 4112343  # SNOMED 195662009, Condition, standard
EMPLOYMENT = 4053118  # SNOMED 160903007, Observation, standard ("found in conditions.csv")
BRAIN_DAMAGE = 4166590  # SNOMED 275272006, non-standard (U), 'Maps to' TRAUMATIC_BRAIN_INJURY
TRAUMATIC_BRAIN_INJURY = 4132546  # SNOMED 127295002, Condition, standard
CONCUSSION = 4001336  # SNOMED 110030002, Condition, standard
PREDIABETES = 40316773  # SNOMED 15777000, deprecated (U), 'Maps to' IMPAIRED_GLUCOSE
IMPAIRED_GLUCOSE = 4311629  # SNOMED 9414007, Condition, standard
SMOKING_STATUS = 43054909  # LOINC 72166-2, Observation, standard
SMELL_TEST = 607951  # SNOMED 1156395000, a procedure code whose concept is a Measurement
LATEX_ALLERGY = 4102123  # SNOMED 300916003, Observation, standard


def _t(schema: str, table: str) -> str:
    return f'"{schema}"."{table}"'


def _conditions(wh, schema: str) -> list[tuple]:
    """(source value, concept, source concept) of every condition row, sorted."""
    return sorted(
        query(
            wh,
            "SELECT condition_source_value, condition_concept_id, condition_source_concept_id"
            f" FROM {_t(schema, 'condition_occurrence')}",
        )
    )


def _header(name: str) -> list[str]:
    """The exact Synthea header of `name`, from the demo export."""
    with (DEMO_SYNTHEA / name).open(encoding="utf-8", newline="") as fh:
        return next(csv.reader(fh))


def _feed(tmp: Path, **files: list[dict[str, str]]) -> Path:
    """A feed folder: one patient, one encounter, and the given event files (name_csv=rows)."""
    feed = tmp / "feed"
    feed.mkdir()
    patient = {
        "Id": PATIENT,
        "BIRTHDATE": "1980-01-01",
        "FIRST": "Testy123",
        "LAST": "Mapper456",
        "RACE": "white",
        "ETHNICITY": "nonhispanic",
        "GENDER": "F",
        "STATE": "Massachusetts",
        "ZIP": "02155",
    }
    encounter = {
        "Id": ENCOUNTER,
        "START": STAMP,
        "STOP": "2020-05-01T10:30:00Z",
        "PATIENT": PATIENT,
        "ENCOUNTERCLASS": "ambulatory",
        "CODE": "185345009",
        "DESCRIPTION": "Encounter for symptom",
    }
    write_rows(feed / "patients.csv", _header("patients.csv"), [patient])
    write_rows(feed / "encounters.csv", _header("encounters.csv"), [encounter])
    for stem, data in files.items():
        name = stem.removesuffix("_csv") + ".csv"
        base = {"PATIENT": PATIENT, "ENCOUNTER": ENCOUNTER, "START": DAY, "DATE": STAMP}
        write_rows(feed / name, _header(name), [{**base, **r} for r in data])
    return feed


def _append(path: Path, lines: list[list[Any]]) -> None:
    text = path.read_text(encoding="utf-8")
    if text and not text.endswith("\n"):
        text += "\n"
    text += "".join("\t".join(str(v) for v in line) + "\n" for line in lines)
    path.write_text(text, encoding="utf-8")


def _vocab(
    tmp: Path,
    concepts: tuple[tuple[Any, ...], ...] = (),
    relationships: tuple[tuple[int, int, str], ...] = (),
) -> Path:
    """A copy of the demo release with made-up concepts and relationships appended.

    concepts: (concept_id, name, domain, vocabulary, class, standard, code, invalid_reason)
    """
    release = tmp / "vocab"
    shutil.copytree(DEMO_VOCAB, release)
    rows = []
    for *head, invalid_reason in concepts:
        valid_end = "20200101" if invalid_reason else "20991231"
        rows.append([*head, "19700101", valid_end, invalid_reason])
    _append(release / "CONCEPT.csv", rows)
    _append(
        release / "CONCEPT_RELATIONSHIP.csv",
        [[a, b, rel, "19700101", "20991231", ""] for a, b, rel in relationships],
    )
    return release


def _concept(
    cid: int, name: str, domain: str, vocabulary: str, cls: str, code: str, standard: str = ""
) -> tuple[Any, ...]:
    """A valid CONCEPT row, as _vocab takes it."""
    return (cid, name, domain, vocabulary, cls, standard, code, "")


def _usagi(code: str, name: str, status: str, concept: int) -> dict[str, Any]:
    """A row of a Usagi save file."""
    return {
        "sourceCode": code,
        "sourceName": name,
        "mappingStatus": status,
        "conceptId": concept,
        "mappingType": "MAPS_TO",
    }


def _mappings(
    tmp: Path,
    local: dict[str, list[dict[str, Any]]] | None = None,
    usagi: dict[str, list[dict[str, Any]]] | None = None,
) -> Path:
    """A copy of the project's mappings/ with extra local/*.csv and usagi/*.csv files."""
    folder = tmp / "mappings"
    shutil.copytree(MAPPINGS_DIR, folder)
    (folder / "usagi").mkdir(exist_ok=True)
    stcm_header = _csv_header(MAPPINGS_DIR / "local" / "synthea.csv")
    for name, data in (local or {}).items():
        write_rows(folder / "local" / name, stcm_header, [_str(r) for r in data])
    usagi_header = ["sourceCode", "sourceName", "mappingStatus", "conceptId", "mappingType"]
    for name, data in (usagi or {}).items():
        write_rows(folder / "usagi" / name, usagi_header, [_str(r) for r in data])
    return folder


def _csv_header(path: Path) -> list[str]:
    with path.open(encoding="utf-8", newline="") as fh:
        return next(csv.reader(fh))


def _str(row: dict[str, Any]) -> dict[str, str]:
    return {k: str(v) for k, v in row.items()}


def _publish(warehouse, tmp: Path, feed: Path, **kwargs: Path):
    wh, schema = warehouse
    config = write_config(tmp, wh, schema, feed, **kwargs)
    result = run(config, tmp)
    assert result.status == "published", result.report["errors"]
    return wh, schema, result


def _stcm(code: str, vocabulary: str, target: int, description: str = "") -> dict[str, Any]:
    return {
        "source_code": code,
        "source_concept_id": 0,
        "source_vocabulary_id": vocabulary,
        "source_code_description": description,
        "target_concept_id": target,
        "target_vocabulary_id": "SNOMED",
        "valid_start_date": "1970-01-01",
        "valid_end_date": "2099-12-31",
        "invalid_reason": "",
    }


def test_local_map_overrides_the_vocabulary(warehouse, tmp_path: Path) -> None:
    feed = _feed(
        tmp_path,
        conditions_csv=[
            {"CODE": "275272006", "DESCRIPTION": "Brain damage - traumatic"},
            {"CODE": "275272006", "DESCRIPTION": "Brain damage - traumatic", "START": "2020-05-02"},
            {"CODE": "15777000", "DESCRIPTION": "Prediabetes"},
        ],
    )
    # 275272006 'Maps to' TRAUMATIC_BRAIN_INJURY in the vocabulary; the site says CONCUSSION.
    # A local row with an invalid_reason is ignored: 15777000 keeps its vocabulary mapping.
    retired = {**_stcm("15777000", "SNOMED", CONCUSSION), "invalid_reason": "D"}
    mappings = _mappings(
        tmp_path,
        local={"site.csv": [_stcm("275272006", "SNOMED", CONCUSSION, "TBI, site rule"), retired]},
    )
    wh, schema, _ = _publish(warehouse, tmp_path, feed, mappings=mappings)
    got = _conditions(wh, schema)
    assert got == [
        ("15777000", IMPAIRED_GLUCOSE, PREDIABETES),
        ("275272006", CONCUSSION, BRAIN_DAMAGE),
        ("275272006", CONCUSSION, BRAIN_DAMAGE),
    ]
    stcm = query(
        wh,
        "SELECT source_code, source_vocabulary_id, target_concept_id, target_vocabulary_id"
        f" FROM {_t(schema, 'source_to_concept_map')}"
        " WHERE source_code IN ('275272006', '15777000')",
    )
    assert stcm == [("275272006", "SNOMED", CONCUSSION, "SNOMED")]


def test_one_code_mapping_to_two_concepts_gives_two_rows(warehouse, tmp_path: Path) -> None:
    vocab = _vocab(
        tmp_path,
        concepts=(
            _concept(
                ONE_TO_MANY,
                "Sore throat at work (test)",
                "Condition",
                "SNOMED",
                "Clinical Finding",
                "9000000001",
            ),
        ),
        relationships=(
            (ONE_TO_MANY, PHARYNGITIS, "Maps to"),
            (ONE_TO_MANY, EMPLOYMENT, "Maps to"),
        ),
    )
    feed = _feed(tmp_path, conditions_csv=[{"CODE": "9000000001", "DESCRIPTION": "test"}])
    wh, schema, result = _publish(warehouse, tmp_path, feed, vocabulary=vocab)
    conditions = query(
        wh,
        "SELECT condition_concept_id, condition_source_concept_id, condition_source_value"
        f" FROM {_t(schema, 'condition_occurrence')}",
    )
    observations = query(
        wh,
        "SELECT observation_concept_id, observation_source_concept_id, observation_source_value"
        f" FROM {_t(schema, 'observation')}",
    )
    assert conditions == [(PHARYNGITIS, ONE_TO_MANY, "9000000001")]
    assert observations == [(EMPLOYMENT, ONE_TO_MANY, "9000000001")]
    # one input record, loaded once (two CDM rows)
    files = result.report["feeds"]["ehr"]["files"]
    assert files["conditions.csv"] == {
        "record_set": "conditions",
        "records_in": 1,
        "loaded": 1,
        "quarantined": 0,
        "filtered": 0,
    }
    assert result.report["unmapped"] == []


def test_maps_to_value_fills_value_as_concept_id(warehouse, tmp_path: Path) -> None:
    vocab = _vocab(
        tmp_path,
        concepts=(
            _concept(
                QUESTION,
                "Tobacco smoking status: never (test)",
                "Observation",
                "LOINC",
                "Clinical Observation",
                "99990-1",
            ),
            _concept(
                ANSWER,
                "Never smoked tobacco (test)",
                "Meas Value",
                "LOINC",
                "Answer",
                "LA99990-1",
                standard="S",
            ),
        ),
        relationships=(
            (QUESTION, SMOKING_STATUS, "Maps to"),
            (QUESTION, ANSWER, "Maps to value"),
        ),
    )
    feed = _feed(
        tmp_path,
        observations_csv=[
            {
                "CATEGORY": "survey",
                "CODE": "99990-1",
                "DESCRIPTION": "Smoking: never",
                "VALUE": "Never smoked",
                "TYPE": "text",
            },
        ],
    )
    wh, schema, _ = _publish(warehouse, tmp_path, feed, vocabulary=vocab)
    got = query(
        wh,
        "SELECT observation_concept_id, value_as_concept_id, observation_source_concept_id,"
        f" observation_source_value, value_as_string FROM {_t(schema, 'observation')}",
    )
    assert got == [(SMOKING_STATUS, ANSWER, QUESTION, "99990-1", "Never smoked")]
    # the answer is a value, not a second row; observations.csv's default table stays empty
    assert scalar(wh, f"SELECT count(*) FROM {_t(schema, 'measurement')}") == 0


def test_rows_land_in_the_table_of_their_concepts_domain(warehouse, tmp_path: Path) -> None:
    feed = _feed(
        tmp_path,
        conditions_csv=[
            {"CODE": "160903007", "DESCRIPTION": "Full-time employment (finding)"},
            {"CODE": "195662009", "DESCRIPTION": "Acute viral pharyngitis (disorder)"},
        ],
        procedures_csv=[
            {"START": STAMP, "CODE": "1156395000", "DESCRIPTION": "Pocket Smell Test"},
        ],
    )
    wh, schema, result = _publish(warehouse, tmp_path, feed)
    assert query(
        wh,
        "SELECT observation_concept_id, observation_source_value, observation_date"
        f" FROM {_t(schema, 'observation')}",
    ) == [(EMPLOYMENT, "160903007", dt.date(2020, 5, 1))]
    assert query(
        wh,
        f"SELECT condition_concept_id FROM {_t(schema, 'condition_occurrence')}",
    ) == [(PHARYNGITIS,)]
    assert query(
        wh,
        "SELECT measurement_concept_id, measurement_source_concept_id, measurement_source_value"
        f" FROM {_t(schema, 'measurement')}",
    ) == [(SMELL_TEST, SMELL_TEST, "1156395000")]
    assert scalar(wh, f"SELECT count(*) FROM {_t(schema, 'procedure_occurrence')}") == 0
    assert result.report["tables"]["observation"] == 1
    assert result.report["tables"]["measurement"] == 1


def test_deprecated_code_gets_its_replacement(warehouse, tmp_path: Path) -> None:
    feed = _feed(
        tmp_path,
        conditions_csv=[
            {"CODE": "15777000", "DESCRIPTION": "Prediabetes"},
            {"CODE": "275272006", "DESCRIPTION": "Brain damage - traumatic"},
        ],
    )
    wh, schema, result = _publish(warehouse, tmp_path, feed)
    got = _conditions(wh, schema)
    assert got == [
        ("15777000", IMPAIRED_GLUCOSE, PREDIABETES),
        ("275272006", TRAUMATIC_BRAIN_INJURY, BRAIN_DAMAGE),
    ]
    # the deprecated source concepts are what the vocabulary says they are
    deprecated = query(
        wh,
        f"SELECT concept_id, standard_concept, invalid_reason FROM {_t(schema, 'concept')}"
        " WHERE concept_id IN (:a, :b) ORDER BY concept_id",
        a=PREDIABETES,
        b=BRAIN_DAMAGE,
    )
    assert deprecated == [(BRAIN_DAMAGE, None, "U"), (PREDIABETES, None, "U")]
    assert result.report["unmapped"] == []


def test_unknown_code_is_kept_with_concept_zero_and_reported(warehouse, tmp_path: Path) -> None:
    feed = _feed(
        tmp_path,
        conditions_csv=[
            {"CODE": "999999999999", "DESCRIPTION": "Not a SNOMED code"},
            {"CODE": "999999999999", "DESCRIPTION": "Not a SNOMED code", "START": "2020-05-03"},
            {"CODE": "195662009", "DESCRIPTION": "Acute viral pharyngitis (disorder)"},
        ],
        observations_csv=[
            {
                "CODE": "XYZ-1",
                "DESCRIPTION": "Unknown lab",
                "VALUE": "4.5",
                "UNITS": "mg",
                "TYPE": "numeric",
            },
        ],
    )
    wh, schema, result = _publish(warehouse, tmp_path, feed)
    got = _conditions(wh, schema)
    assert got == [
        ("195662009", PHARYNGITIS, PHARYNGITIS),
        ("999999999999", 0, 0),
        ("999999999999", 0, 0),
    ]
    # an unknown LOINC code goes to observations.csv's declared domain, with its value
    assert query(
        wh,
        "SELECT measurement_concept_id, measurement_source_value, value_as_number"
        f" FROM {_t(schema, 'measurement')}",
    ) == [(0, "XYZ-1", 4.5)]
    unmapped = {(u["vocabulary_id"], u["source_code"]): u for u in result.report["unmapped"]}
    assert set(unmapped) == {("SNOMED", "999999999999"), ("LOINC", "XYZ-1")}
    assert unmapped[("SNOMED", "999999999999")] == {
        "feed": "ehr",
        "vocabulary_id": "SNOMED",
        "source_code": "999999999999",
        "table": "condition_occurrence",
        "rows": 2,
    }
    assert unmapped[("LOINC", "XYZ-1")]["rows"] == 1
    assert unmapped[("LOINC", "XYZ-1")]["table"] == "measurement"
    assert result.report["unmapped"][0]["source_code"] == "999999999999"  # most rows first
    files = result.report["feeds"]["ehr"]["files"]
    assert files["conditions.csv"]["loaded"] == 3


def test_usagi_map_of_a_custom_vocabulary(warehouse, tmp_path: Path) -> None:
    allergy = {"STOP": "", "TYPE": "allergy", "CATEGORY": "environment", "SYSTEM": "LOCALLAB"}
    feed = _feed(
        tmp_path,
        allergies_csv=[
            {**allergy, "CODE": "LL-001", "DESCRIPTION": "Latex gloves reaction"},
            {
                **allergy,
                "CODE": "LL-001",
                "DESCRIPTION": "Latex gloves reaction",
                "START": "2020-05-02",
            },
            {**allergy, "CODE": "LL-002", "DESCRIPTION": "Not yet reviewed"},
            {**allergy, "CODE": "LL-003", "DESCRIPTION": "Approved, no concept"},
        ],
    )
    mappings = _mappings(
        tmp_path,
        usagi={
            "LOCALLAB.csv": [
                _usagi("LL-001", "Latex gloves reaction", "APPROVED", LATEX_ALLERGY),
                _usagi("LL-002", "Not yet reviewed", "UNCHECKED", LATEX_ALLERGY),
                _usagi("LL-003", "Approved, no concept", "APPROVED", 0),
            ]
        },
    )
    wh, schema, result = _publish(warehouse, tmp_path, feed, mappings=mappings)
    got = sorted(
        query(
            wh,
            "SELECT observation_source_value, observation_concept_id,"
            f" observation_source_concept_id FROM {_t(schema, 'observation')}",
        )
    )
    assert got == [
        ("LL-001", LATEX_ALLERGY, 0),
        ("LL-001", LATEX_ALLERGY, 0),
        ("LL-002", 0, 0),
        ("LL-003", 0, 0),
    ]
    stcm = query(
        wh,
        "SELECT source_code, target_concept_id, target_vocabulary_id"
        f" FROM {_t(schema, 'source_to_concept_map')} WHERE source_vocabulary_id = 'LOCALLAB'",
    )
    assert stcm == [("LL-001", LATEX_ALLERGY, "SNOMED")]
    unmapped = {
        (u["vocabulary_id"], u["source_code"]): u["rows"] for u in result.report["unmapped"]
    }
    assert unmapped == {("LOCALLAB", "LL-002"): 1, ("LOCALLAB", "LL-003"): 1}


def test_local_map_to_a_missing_concept_publishes_no_dangling_id(warehouse, tmp_path: Path) -> None:
    feed = _feed(tmp_path, conditions_csv=[{"CODE": "195662009", "DESCRIPTION": "typo'd map"}])
    mappings = _mappings(tmp_path, local={"site.csv": [_stcm("195662009", "SNOMED", 123456789)]})
    wh, schema = warehouse
    result = run(write_config(tmp_path, wh, schema, feed, mappings=mappings), tmp_path)
    if result.status != "published":
        # refusing the map is fine, if the message names the map file and line
        assert any("site.csv:2" in e for e in result.report["errors"]), result.report["errors"]
        return
    dangling = scalar(
        wh,
        f"SELECT count(*) FROM {_t(schema, 'condition_occurrence')} o"
        f" LEFT JOIN {_t(schema, 'concept')} c ON c.concept_id = o.condition_concept_id"
        " WHERE c.concept_id IS NULL",
    )
    assert dangling == 0
