"""The full-size release generator (bench/athena_full.py) at a tiny size.

The generated release must pass the project's loader (keys, integrity) and, since it
holds the demo vocabulary, the demo's Synthea codes must map exactly as with it.
"""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from bench.athena_full import first_generated_id, generate
from etl.vocab import load_vocabulary
from tests.conftest import DEMO_SYNTHEA, DEMO_VOCAB
from tests.pipeline_helpers import query, run, scalar, write_config, write_rows

CONCEPTS, RELATIONSHIPS, FANOUT = 20_000, 160_000, 3
PATIENT = "0d1f3a2b-7c44-4e0a-9d52-6b1e2f3a4c5d"
ENCOUNTER = "1a2b3c4d-5e6f-4a1b-8c2d-3e4f5a6b7c8d"
# demo concepts (vocab/CONCEPT.csv): SNOMED code -> the standard concept it maps to
EXPECTED = {
    "195662009": 4112343,  # pharyngitis: standard, itself
    "275272006": 4132546,  # brain damage (non-standard) 'Maps to' traumatic brain injury
    "15777000": 4311629,  # prediabetes (deprecated) 'Maps to' impaired glucose tolerance
    "999999999999": 0,  # in neither release: unmapped
}


def _data_rows(path: Path) -> int:
    with path.open(encoding="utf-8") as fh:
        return sum(1 for _ in fh) - 1


@pytest.fixture(scope="module")
def release(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("athena_full") / "release"
    # small chunks: several per table, so the chunked writing is exercised
    generate(out, CONCEPTS, RELATIONSHIPS, FANOUT, chunk=7_000)
    return out


def test_generated_release_loads_with_the_project_loader(duckdb_wh, release: Path) -> None:
    wh, schema = duckdb_wh
    result = load_vocabulary(wh, release, schema)
    demo = {t: _data_rows(DEMO_VOCAB / f"{t.upper()}.csv") for t in result.rows}
    assert result.rows["concept"] == demo["concept"] + CONCEPTS
    assert result.rows["concept_relationship"] == demo["concept_relationship"] + RELATIONSHIPS
    assert result.rows["concept_synonym"] == CONCEPTS // 2
    # a tree of fan-out 3 over 20,000 nodes: depth 9 at most, a self row per concept
    generated = result.rows["concept_ancestor"] - demo["concept_ancestor"]
    assert 8 * CONCEPTS < generated < 10 * CONCEPTS
    base = first_generated_id()
    with (DEMO_VOCAB / "CONCEPT.csv").open(encoding="utf-8", newline="") as fh:
        demo_ids = [int(r["concept_id"]) for r in csv.DictReader(fh, delimiter="\t")]
    assert base > max(demo_ids)
    # node 13's chain: 13 -> 4 -> 1 -> 0, levels 0..3
    chain = query(
        wh,
        f"SELECT ancestor_concept_id - {base}, min_levels_of_separation"
        f" FROM {schema}.concept_ancestor WHERE descendant_concept_id = {base + 13}"
        " ORDER BY 2",
    )
    assert chain == [(13, 0), (4, 1), (1, 2), (0, 3)]
    # more relationship ids than 'Maps to' and friends, all of them real ones
    assert scalar(
        wh,
        f"SELECT count(DISTINCT relationship_id) FROM {schema}.concept_relationship"
        f" WHERE concept_id_1 >= {base}",
    ) == -(-RELATIONSHIPS // CONCEPTS)
    # generated rows never touch a demo concept
    assert (
        scalar(
            wh,
            f"SELECT count(*) FROM {schema}.concept_relationship"
            f" WHERE (concept_id_1 >= {base}) <> (concept_id_2 >= {base})",
        )
        == 0
    )


def _header(name: str) -> list[str]:
    with (DEMO_SYNTHEA / name).open(encoding="utf-8", newline="") as fh:
        return next(csv.reader(fh))


def test_demo_codes_map_as_with_the_demo_vocabulary(duckdb_wh, release: Path, tmp_path) -> None:
    wh, schema = duckdb_wh
    feed = tmp_path / "feed"
    feed.mkdir()
    write_rows(
        feed / "patients.csv",
        _header("patients.csv"),
        [
            {
                "Id": PATIENT,
                "BIRTHDATE": "1980-01-01",
                "GENDER": "F",
                "RACE": "white",
                "ETHNICITY": "nonhispanic",
            }
        ],
    )
    write_rows(
        feed / "encounters.csv",
        _header("encounters.csv"),
        [
            {
                "Id": ENCOUNTER,
                "START": "2020-05-01T10:00:00Z",
                "STOP": "2020-05-01T10:30:00Z",
                "PATIENT": PATIENT,
                "ENCOUNTERCLASS": "ambulatory",
                "CODE": "185345009",
            }
        ],
    )
    write_rows(
        feed / "conditions.csv",
        _header("conditions.csv"),
        [
            {"START": "2020-05-01", "PATIENT": PATIENT, "ENCOUNTER": ENCOUNTER, "CODE": code}
            for code in EXPECTED
        ],
    )
    result = run(write_config(tmp_path, wh, schema, feed, vocabulary=release), tmp_path)
    assert result.status == "published", result.report["errors"]
    mapped = dict(
        query(
            wh,
            "SELECT condition_source_value, condition_concept_id"
            f" FROM {schema}.condition_occurrence",
        )
    )
    observed = dict(
        query(
            wh, f"SELECT observation_source_value, observation_concept_id FROM {schema}.observation"
        )
    )
    assert {**observed, **mapped} == EXPECTED
    assert scalar(wh, f"SELECT count(*) FROM {schema}.concept") == CONCEPTS + _data_rows(
        DEMO_VOCAB / "CONCEPT.csv"
    )
    assert [u["source_code"] for u in result.report["unmapped"]] == ["999999999999"]
