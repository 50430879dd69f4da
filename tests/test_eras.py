"""condition_era, drug_era and dose_era from hand-made events, on DuckDB and PostgreSQL."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator

import pytest
import sqlalchemy as sa

from etl.cdm.build.common import key_map_ddl
from etl.cdm.build.eras import build_condition_era, build_dose_era, build_drug_era, build_eras
from etl.cdm.schema import create_cdm
from etl.pipeline.schemas import Schemas
from etl.pipeline.stage import create_build_tables
from etl.vocab import load_vocabulary
from tests.conftest import DEMO_VOCAB
from tests.pipeline_helpers import in_tonights_tables

D = dt.date.fromisoformat

# Real concepts from the demo vocabulary (vocab/CONCEPT.csv, CONCEPT_ANCESTOR.csv).
ACETAMINOPHEN = 1125315  # standard Ingredient, with its level-0 concept_ancestor row
APAP_160 = 1127078  # acetaminophen 160 MG Oral Tablet -> acetaminophen
APAP_325 = 1127433  # acetaminophen 325 MG Oral Tablet -> acetaminophen
SERTRALINE = 739138  # standard Ingredient with NO concept_ancestor row at all
SERTRALINE_100 = 739207  # sertraline 100 MG Oral Tablet: no ancestors in the subset
MILLIGRAM = 8576
EHR = 32817  # type concept: EHR

# (condition_occurrence_id, person_id, condition_concept_id, start, end), inserted in a
# scrambled order so the era ids cannot depend on insertion order.
CONDITIONS = [
    (17, 1, 1002, "2020-03-05", None),  # 40 days after the era below ended: new era
    (3, 2, 1001, "2019-05-02", "2019-05-02"),  # inside the next one: same era
    (12, 2, 1001, "2019-05-01", "2019-05-03"),
    (5, 1, 1002, "2020-01-21", "2020-01-25"),  # 20 days after the previous: merges
    (9, 1, 1002, "2020-01-01", None),  # no end date: ends the day it starts
    (1, 1, 0, "2020-01-01", None),  # unmapped: no era
    (8, 1, 1001, "2020-08-01", None),  # 31 days after 07-01: new era
    (6, 1, 1001, "2020-07-01", None),  # exactly 30 days after 06-01: merges
    (2, 1, 1001, "2020-06-01", "2020-06-01"),
    (4, 1, 1003, "2020-01-10", "2020-01-05"),  # end before start: taken as the start
]

# (drug_exposure_id, person_id, drug_concept_id, start, end)
EXPOSURES = [
    (110, 1, APAP_160, "2020-02-05", "2020-02-09"),  # inside 103: no extra covered days
    (101, 1, APAP_160, "2020-01-01", "2020-01-10"),
    (102, 1, APAP_325, "2020-01-05", "2020-01-14"),  # overlaps 101
    (103, 1, ACETAMINOPHEN, "2020-02-01", "2020-02-10"),  # 18 days after 01-14: merges
    (104, 1, APAP_160, "2020-03-20", "2020-03-20"),  # 39 days after 02-10: new era
    (105, 1, ACETAMINOPHEN, "2020-03-21", "2020-03-25"),  # back to back with 104
    (106, 1, SERTRALINE, "2020-01-01", "2020-01-30"),  # ingredient without a self row
    (107, 1, SERTRALINE_100, "2020-01-01", "2020-01-30"),  # no ingredient: no era
    (108, 1, 0, "2020-01-01", "2020-01-30"),  # unmapped: no era
    (109, 2, APAP_325, "2021-01-01", "2021-01-31"),
]


@pytest.fixture
def eras_env(warehouse) -> Iterator[tuple[Schemas, sa.Engine]]:
    """Demo vocabulary in `schema`; condition_occurrence and drug_exposure in the stage."""
    wh, schema = warehouse
    s = Schemas(wh, schema)
    create_cdm(wh, schema)
    create_build_tables(s)  # on DuckDB in the CDM schema, read through stage views
    load_vocabulary(wh, DEMO_VOCAB, schema)
    try:
        with wh.begin() as conn:
            wh.create_schema(conn, s.etl)
            s.run(conn, key_map_ddl(wh.dialect))
            s.run(
                conn,
                in_tonights_tables(s, "INSERT INTO {S}.condition_occurrence (")
                + "condition_occurrence_id, person_id,"
                " condition_concept_id, condition_start_date, condition_end_date,"
                " condition_type_concept_id) VALUES (:id, :p, :c, :st, :en, :t)",
                [
                    {"id": i, "p": p, "c": c, "st": D(st), "en": en and D(en), "t": EHR}
                    for i, p, c, st, en in CONDITIONS
                ],
            )
            s.run(
                conn,
                in_tonights_tables(s, "INSERT INTO {S}.drug_exposure (")
                + "drug_exposure_id, person_id, drug_concept_id,"
                " drug_exposure_start_date, drug_exposure_end_date, drug_type_concept_id)"
                " VALUES (:id, :p, :c, :st, :en, :t)",
                [
                    {"id": i, "p": p, "c": c, "st": D(st), "en": D(en), "t": EHR}
                    for i, p, c, st, en in EXPOSURES
                ],
            )
        yield s, wh
    finally:
        with wh.begin() as conn:
            wh.drop_schema(conn, s.stage)
            wh.drop_schema(conn, s.etl)


def _without_ids(rows: list[tuple]) -> list[tuple]:
    return [r[1:] for r in rows]


def _assert_ids_fresh(rows: list[tuple]) -> None:
    """On an empty key map, ids are 1..n (their order follows the natural key)."""
    assert sorted(r[0] for r in rows) == list(range(1, len(rows) + 1))


def _rows(s: Schemas, conn: sa.Connection, sql: str, **extra: str) -> list[tuple]:
    return [tuple(r) for r in s.run(conn, sql, **extra).fetchall()]


def test_condition_era(eras_env) -> None:
    s, wh = eras_env
    with wh.begin() as conn:
        build_condition_era(s, conn)
        rows = _rows(
            s,
            conn,
            "SELECT condition_era_id, person_id, condition_concept_id, condition_era_start_date,"
            " condition_era_end_date, condition_occurrence_count"
            " FROM {S}.condition_era ORDER BY person_id, condition_concept_id, 4",
        )
    _assert_ids_fresh(rows)
    assert _without_ids(rows) == _without_ids(
        [
            (1, 1, 1001, D("2020-06-01"), D("2020-07-01"), 2),
            (2, 1, 1001, D("2020-08-01"), D("2020-08-01"), 1),
            (3, 1, 1002, D("2020-01-01"), D("2020-01-25"), 2),
            (4, 1, 1002, D("2020-03-05"), D("2020-03-05"), 1),
            (5, 1, 1003, D("2020-01-10"), D("2020-01-10"), 1),
            (6, 2, 1001, D("2019-05-01"), D("2019-05-03"), 2),
        ]
    )


def test_drug_era_rolls_up_to_ingredients(eras_env) -> None:
    s, wh = eras_env
    with wh.begin() as conn:
        build_drug_era(s, conn)
        rows = _rows(
            s,
            conn,
            "SELECT drug_era_id, person_id, drug_concept_id, drug_era_start_date,"
            " drug_era_end_date, drug_exposure_count, gap_days"
            " FROM {S}.drug_era ORDER BY person_id, drug_concept_id, 4",
        )
    _assert_ids_fresh(rows)
    assert _without_ids(rows) == _without_ids(
        [
            (1, 1, SERTRALINE, D("2020-01-01"), D("2020-01-30"), 1, 0),
            # 101, 102, 103, 110: Jan 1 - Feb 10 is 41 days, 24 of them covered
            # (Jan 1-14 and Feb 1-10; 110 and the 101/102 overlap are not counted twice)
            (2, 1, ACETAMINOPHEN, D("2020-01-01"), D("2020-02-10"), 4, 17),
            # 104 and 105 are back to back: no drug-free day
            (3, 1, ACETAMINOPHEN, D("2020-03-20"), D("2020-03-25"), 2, 0),
            (4, 2, ACETAMINOPHEN, D("2021-01-01"), D("2021-01-31"), 1, 0),
        ]
    )


def test_dose_era_is_empty_without_drug_strength(eras_env) -> None:
    s, wh = eras_env
    with wh.begin() as conn:
        build_dose_era(s, conn)
        assert s.run(conn, "SELECT count(*) FROM {S}.dose_era").scalar_one() == 0


def test_dose_era_from_drug_strength(eras_env) -> None:
    s, wh = eras_env
    with wh.begin() as conn:
        s.run(
            conn,
            "INSERT INTO {C}.drug_strength (drug_concept_id, ingredient_concept_id,"
            " amount_value, amount_unit_concept_id, valid_start_date, valid_end_date)"
            " VALUES (:d, :i, :v, :u, :vs, :ve)",
            [
                {"d": d, "i": ACETAMINOPHEN, "v": v, "u": MILLIGRAM}
                | {"vs": D("1970-01-01"), "ve": D("2099-12-31")}
                for d, v in ((APAP_160, 160.0), (APAP_325, 325.0))
            ],
        )
        build_dose_era(s, conn)
        rows = _rows(
            s,
            conn,
            "SELECT dose_era_id, person_id, drug_concept_id, unit_concept_id, dose_value,"
            " dose_era_start_date, dose_era_end_date FROM {S}.dose_era"
            " ORDER BY person_id, drug_concept_id, dose_era_start_date",
        )
    _assert_ids_fresh(rows)
    assert _without_ids(rows) == _without_ids(
        [
            # 160 mg: 101 and 110 (26 days apart) merge; 104 starts 40 days later
            (1, 1, ACETAMINOPHEN, MILLIGRAM, 160.0, D("2020-01-01"), D("2020-02-09")),
            (2, 1, ACETAMINOPHEN, MILLIGRAM, 325.0, D("2020-01-05"), D("2020-01-14")),
            (3, 1, ACETAMINOPHEN, MILLIGRAM, 160.0, D("2020-03-20"), D("2020-03-20")),
            (4, 2, ACETAMINOPHEN, MILLIGRAM, 325.0, D("2021-01-01"), D("2021-01-31")),
        ]
    )


def test_build_eras_fills_all_three_and_is_repeatable(eras_env) -> None:
    s, wh = eras_env
    tables = ("condition_era", "drug_era", "dose_era")
    results = []
    for _ in range(2):
        with wh.begin() as conn:
            for t in tables:
                s.run(conn, in_tonights_tables(s, f"DELETE FROM {{S}}.{t}"))
            build_eras(s, conn)
            results.append(
                [_rows(s, conn, "SELECT * FROM {S}.{t} ORDER BY 1", t=t) for t in tables]
            )
    counts = [len(r) for r in results[0]]
    assert counts == [6, 4, 0]
    assert results[0] == results[1]
