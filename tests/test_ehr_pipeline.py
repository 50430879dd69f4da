"""The EHR feed end to end on the Synthea demo: counts from the input files, not constants."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.conftest import DEMO_SYNTHEA, REPO, pseudonym_key_set
from tests.pipeline_helpers import primary_keys, query, rows, run, scalar, write_config

ALL_FILES = sorted(p.name for p in DEMO_SYNTHEA.glob("*.csv"))
CLINICAL_FILES = [
    "conditions.csv",
    "medications.csv",
    "immunizations.csv",
    "procedures.csv",
    "observations.csv",
    "allergies.csv",
    "devices.csv",
    "supplies.csv",
    "careplans.csv",
    "imaging_studies.csv",
]
EVENT_TABLES = {
    "condition_occurrence": "condition_start_date",
    "drug_exposure": "drug_exposure_start_date",
    "procedure_occurrence": "procedure_date",
    "measurement": "measurement_date",
    "observation": "observation_date",
    "device_exposure": "device_exposure_start_date",
}


@pytest.fixture(scope="module")
def demo_run(module_warehouse):
    """The demo published once per engine; the tests using it only read."""
    wh, schema, workdir = module_warehouse
    with pseudonym_key_set():
        result = run(write_config(workdir, wh, schema, DEMO_SYNTHEA), workdir)
    assert result.status == "published", result.report["errors"]
    return wh, schema, result


def _built(cfg, workdir: Path):  # type: ignore[no-untyped-def]
    """A night that has extracted, landed and built every feed, not yet gated."""
    from etl.pipeline.steps import NightlyRun

    night = NightlyRun.start(cfg, workdir)
    for feed in night.feeds:
        night.extract(feed)
        night.land(feed)
    night.build()
    return night


def _t(schema: str, table: str) -> str:
    return f'"{schema}"."{table}"'


def test_demo_publishes_faithful_counts(demo_run) -> None:
    wh, schema, result = demo_run
    patients = rows(DEMO_SYNTHEA / "patients.csv")
    encounters = rows(DEMO_SYNTHEA / "encounters.csv")
    assert scalar(wh, f"SELECT count(*) FROM {_t(schema, 'person')}") == len(patients)
    assert scalar(wh, f"SELECT count(*) FROM {_t(schema, 'death')}") == sum(
        1 for p in patients if p["DEATHDATE"]
    )
    assert scalar(wh, f"SELECT count(*) FROM {_t(schema, 'visit_occurrence')}") == len(encounters)
    assert scalar(wh, f"SELECT count(*) FROM {_t(schema, 'observation_period')}") == len(patients)
    assert scalar(wh, f"SELECT count(*) FROM {_t(schema, 'condition_era')}") > 0
    assert scalar(wh, f"SELECT count(*) FROM {_t(schema, 'drug_era')}") > 0
    source = query(wh, f"SELECT cdm_version, vocabulary_version FROM {_t(schema, 'cdm_source')}")
    assert source == [("v5.4", "v5.0 30-AUG-24")]
    assert result.report["tables"]["person"] == len(patients)
    # coverage and claims, where the profile names payer and claims files
    transitions = rows(DEMO_SYNTHEA / "payer_transitions.csv")
    assert scalar(wh, f"SELECT count(*) FROM {_t(schema, 'payer_plan_period')}") == len(transitions)
    claims = rows(DEMO_SYNTHEA / "claims.csv")
    encounter_ids = {e["Id"] for e in encounters}
    with_visit = [c for c in claims if c["APPOINTMENTID"] in encounter_ids]
    assert scalar(wh, f"SELECT count(*) FROM {_t(schema, 'cost')}") == len(with_visit)
    charges = sum(
        float(t["AMOUNT"])
        for t in rows(DEMO_SYNTHEA / "claims_transactions.csv")
        if t["TYPE"] == "CHARGE"
    )
    total = scalar(wh, f"SELECT sum(total_charge) FROM {_t(schema, 'cost')}")
    assert abs(float(total) - charges) < 0.01


def test_every_input_record_is_accounted_for(demo_run) -> None:
    _, _, result = demo_run
    report = json.loads((result.run_dir / "report.json").read_text())
    files = report["feeds"]["ehr"]["files"]
    assert sorted(files) == ALL_FILES  # all 18 Synthea files are read
    for name in ALL_FILES:
        f = files[name]
        assert f["records_in"] == len(rows(DEMO_SYNTHEA / name)), name
        assert f["records_in"] == f["loaded"] + f["quarantined"] + f["filtered"], name
    feed = report["feeds"]["ehr"]
    assert feed["records_in"] == feed["loaded"] + feed["quarantined"] + feed["filtered"]
    assert report["status"] == "published"
    assert set(report["timings"]) >= {"extract", "stage", "publish"}
    assert (result.run_dir / "report.html").read_text().count("<table>") >= 5
    landed = pq.read_table(result.run_dir / "landing" / "ehr" / "event.parquet")
    assert landed.num_rows == sum(len(rows(DEMO_SYNTHEA / n)) for n in CLINICAL_FILES)


def test_events_land_in_the_table_of_their_domain(demo_run) -> None:
    wh, schema, _ = demo_run
    # every row's concept belongs to its table's domain (or is 0, unmapped)
    for table, domain in [
        ("condition_occurrence", "Condition"),
        ("drug_exposure", "Drug"),
        ("procedure_occurrence", "Procedure"),
        ("measurement", "Measurement"),
    ]:
        concept_col = f"{table.split('_')[0]}_concept_id"
        wrong = scalar(
            wh,
            f"SELECT count(*) FROM {_t(schema, table)} t JOIN {_t(schema, 'concept')} c"
            f" ON c.concept_id = t.{concept_col} WHERE t.{concept_col} <> 0"
            f" AND c.domain_id <> '{domain}'",
        )
        assert wrong == 0, table
    # Synthea's conditions.csv holds findings whose standard concept is an Observation
    # (e.g. 160903007 Full-time employment): they are in observation, not lost
    finding = scalar(
        wh,
        f"SELECT count(*) FROM {_t(schema, 'observation')}"
        " WHERE observation_source_value = '160903007'",
    )
    expected = sum(1 for r in rows(DEMO_SYNTHEA / "conditions.csv") if r["CODE"] == "160903007")
    assert finding == expected > 0
    # all 29 immunizations are drug exposures with their CVX concept (standard, no Maps to)
    imm = rows(DEMO_SYNTHEA / "immunizations.csv")
    mapped = scalar(
        wh,
        f"SELECT count(*) FROM {_t(schema, 'drug_exposure')}"
        " WHERE drug_type_concept_id = 32818 AND drug_concept_id <> 0",
    )
    assert mapped == len(imm)


def test_observation_periods_cover_every_event(demo_run) -> None:
    wh, schema, _ = demo_run
    for table, date_col in EVENT_TABLES.items():
        outside = scalar(
            wh,
            f"SELECT count(*) FROM {_t(schema, table)} e"
            f" LEFT JOIN {_t(schema, 'observation_period')} op ON op.person_id = e.person_id"
            f" AND e.{date_col} BETWEEN op.observation_period_start_date"
            " AND op.observation_period_end_date WHERE op.person_id IS NULL",
        )
        assert outside == 0, table


def test_demographics_and_visits_map_through_local_maps(demo_run) -> None:
    wh, schema, _ = demo_run
    patients = rows(DEMO_SYNTHEA / "patients.csv")
    genders = Counter(
        r[0] for r in query(wh, f"SELECT gender_concept_id FROM {_t(schema, 'person')}")
    )
    assert genders == Counter({"M": 8507, "F": 8532}[p["GENDER"]] for p in patients)
    unmapped_visits = scalar(
        wh, f"SELECT count(*) FROM {_t(schema, 'visit_occurrence')} WHERE visit_concept_id = 0"
    )
    assert unmapped_visits == 0
    # the CDM's source_to_concept_map documents the site's local maps
    assert scalar(wh, f"SELECT count(*) FROM {_t(schema, 'source_to_concept_map')}") > 0


def test_location_keeps_only_state_and_zip3(demo_run) -> None:
    wh, schema, _ = demo_run
    locations = query(wh, f"SELECT state, zip, address_1, city FROM {_t(schema, 'location')}")
    assert locations
    for state, zip3, address, city in locations:
        assert state is None or len(state) == 2
        assert zip3 is None or len(zip3) == 3
        assert address is None and city is None


def test_unmapped_codes_are_kept_and_ranked(demo_run) -> None:
    wh, schema, result = demo_run
    unmapped = result.report["unmapped"]
    counts = [u["rows"] for u in unmapped]
    assert counts == sorted(counts, reverse=True)
    top = {(u["vocabulary_id"], u["source_code"]): u["rows"] for u in unmapped}
    dalys = sum(1 for r in rows(DEMO_SYNTHEA / "observations.csv") if r["CODE"] == "DALY")
    assert top[("LOINC", "DALY")] == dalys
    kept = scalar(
        wh,
        f"SELECT count(*) FROM {_t(schema, 'measurement')}"
        " WHERE measurement_source_value = 'DALY' AND measurement_concept_id = 0",
    )
    assert kept == dalys


@pytest.mark.postgres
def test_postgres_and_duckdb_give_identical_results(duckdb_wh, pg_wh, tmp_path: Path) -> None:
    results = {}
    for name, (wh, schema) in {"duckdb": duckdb_wh, "postgresql": pg_wh}.items():
        workdir = tmp_path / name
        workdir.mkdir()
        result = run(write_config(workdir, wh, schema, DEMO_SYNTHEA), workdir)
        assert result.status == "published", result.report["errors"]
        concepts = {}
        for table, date_col in EVENT_TABLES.items():
            concept_col = f"{table.split('_')[0]}_concept_id"
            id_col = f"{table}_id" if table != "measurement" else "measurement_id"
            concepts[table] = sorted(
                query(
                    wh,
                    f"SELECT {id_col}, person_id, {concept_col}, {date_col}"
                    f" FROM {_t(schema, table)}",
                )
            )
        # each event row traced to its own source line (DuckDB joins ids back by rowid)
        tables = ", ".join(f"'{t}'" for t in EVENT_TABLES)
        lineage = sorted(
            query(
                wh,
                "SELECT cdm_table, cdm_id, source_file, source_line, source_code, mapping_rule"
                f" FROM {_t(schema + '_etl', 'lineage')} WHERE cdm_table IN ({tables})",
            )
        )
        results[name] = (result.report["tables"], concepts, lineage)
    assert results["duckdb"][0] == results["postgresql"][0]
    assert results["duckdb"][1] == results["postgresql"][1]
    assert len(results["duckdb"][2]) >= sum(len(rows) for rows in results["duckdb"][1].values())
    assert results["duckdb"][2] == results["postgresql"][2]


def test_parquet_extracts_read_like_csv(duckdb_wh, tmp_path: Path) -> None:
    """The same extract as Parquet files, through a profile that says format: parquet."""
    import shutil

    import pyarrow as pa
    import pyarrow.csv as pacsv

    wh, schema = duckdb_wh
    feed = tmp_path / "parquet_feed"
    feed.mkdir()
    for path in DEMO_SYNTHEA.glob("*.csv"):
        header = path.read_text(encoding="utf-8").splitlines()[0].split(",")
        table = pacsv.read_csv(
            path,
            convert_options=pacsv.ConvertOptions(column_types=dict.fromkeys(header, pa.string())),
        )
        pq.write_table(table, feed / path.name)  # same names, Parquet content
    mappings = tmp_path / "mappings"
    shutil.copytree(REPO / "mappings", mappings)
    profile = (mappings / "profiles" / "synthea.yaml").read_text(encoding="utf-8")
    (mappings / "profiles" / "synthea_parquet.yaml").write_text(
        profile.replace("format: csv", "format: parquet"), encoding="utf-8"
    )
    config = write_config(tmp_path, wh, schema, feed, mappings=mappings, profile="synthea_parquet")
    result = run(config, tmp_path)
    assert result.status == "published", result.report["errors"]
    files = result.report["feeds"]["ehr"]["files"]
    for name in ALL_FILES:
        assert files[name]["records_in"] == len(rows(DEMO_SYNTHEA / name)), name
    assert result.report["tables"]["person"] == len(rows(DEMO_SYNTHEA / "patients.csv"))


def test_published_tables_keep_the_specifications_keys_and_indexes(demo_run) -> None:
    """Publish fills each table before building its primary key (and, on PostgreSQL, its
    indexes): the published CDM still has every key and index of the specification's DDL,
    and the keys are enforced."""
    import sqlalchemy as sa

    from etl.cdm.schema import build_metadata
    from etl.pipeline.publish import published_tables

    wh, schema, _ = demo_run
    tables = published_tables()
    md = build_metadata(schema, tables=tables, indexes=wh.dialect == "postgresql")
    expected_keys = {(t.name, c.name) for t in md.tables.values() for c in t.primary_key.columns}
    assert len(expected_keys) >= 20
    keys = primary_keys(wh, schema)
    assert {k for k in keys if k[0] in tables} == expected_keys
    if wh.dialect == "postgresql":
        listed = query(wh, "SELECT indexname FROM pg_indexes WHERE schemaname = :s", s=schema)
        indexes = {r[0] for r in listed}
        expected = {i.name for t in md.tables.values() for i in t.indexes}
        assert len(expected) >= 50 and expected <= indexes
    with pytest.raises(sa.exc.IntegrityError), wh.begin() as conn:
        conn.execute(
            sa.text(f"INSERT INTO {_t(schema, 'person')} SELECT * FROM {_t(schema, 'person')}")
        )


def test_duckdb_builds_tonights_tables_in_the_cdm_schema_and_renames_them(
    duckdb_wh, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On DuckDB the build writes tonight's tables in the CDM schema under other names,
    read through views of the stage schema; the gate gives them the specification's
    NOT NULL and keys there before its checks, and the publish renames them: a published
    run leaves none of them (a stale one from a run that stopped is dropped by the next
    stage). After the gate no duplicate gets in. A duplicate in tables the gate did not
    key stops the publish before anything is swapped, last night's tables and keys
    untouched, tonight's kept; the run's end moves them into its stage, and once mended
    there a publish of the same build goes through."""
    import sqlalchemy as sa

    import etl.pipeline.steps as steps_module
    from etl.cdm.schema import build_metadata
    from etl.config import load_config
    from etl.pipeline.publish import published_tables
    from etl.pipeline.schemas import NEXT_PREFIX, Schemas
    from tests.pipeline_helpers import in_tonights_tables

    wh, schema = duckdb_wh
    cfg = load_config(write_config(tmp_path, wh, schema, DEMO_SYNTHEA))
    patients = len(rows(DEMO_SYNTHEA / "patients.csv"))
    tonight = {NEXT_PREFIX + t for t in published_tables()}

    def tables(schema_name: str, kind: str = "BASE TABLE") -> set[str]:
        found = query(
            wh,
            "SELECT table_name FROM information_schema.tables"
            " WHERE table_schema = :s AND table_type = :k",
            s=schema_name,
            k=kind,
        )
        return {t for (t,) in found}

    def next_tables() -> set[str]:
        return {t for t in tables(schema) if t.startswith(NEXT_PREFIX)}

    def nullable(schema_name: str) -> set[tuple[str, str]]:
        found = query(
            wh,
            "SELECT table_name, column_name FROM information_schema.columns"
            " WHERE table_schema = :s AND is_nullable = 'YES'",
            s=schema_name,
        )
        return set(found)

    with wh.begin() as conn:  # a leftover of a run that stopped before its swap
        conn.execute(sa.text(f'CREATE SCHEMA IF NOT EXISTS "{schema}"'))
        conn.execute(sa.text(f"CREATE TABLE {_t(schema, NEXT_PREFIX + 'person')} (x INTEGER)"))
    first = _built(cfg, tmp_path / "first")
    assert next_tables() == tonight
    assert set(published_tables()) <= tables(f"{schema}_stage", "VIEW")
    assert not set(published_tables()) & tables(f"{schema}_stage")
    built_persons = f"SELECT count(*) FROM {_t(schema, NEXT_PREFIX + 'person')}"
    assert scalar(wh, built_persons) == patients
    assert first.gate() and first.publish()
    assert next_tables() == set()
    assert scalar(wh, f"SELECT count(*) FROM {_t(schema, 'person')}") == patients
    keys = primary_keys(wh, schema)
    md = build_metadata(schema, tables=published_tables(), indexes=False)
    assert {k for k in keys if k[0] in published_tables()} == {
        (t.name, c.name) for t in md.tables.values() for c in t.primary_key.columns
    }
    assert {c for c in nullable(schema) if c[0] in published_tables()} == {
        (t.name, c.name) for t in md.tables.values() for c in t.columns if c.nullable
    }
    timings = json.loads(first.fragment_path("publish").read_text(encoding="utf-8"))
    assert "publish.prepare" in json.dumps(timings)

    second = _built(cfg, tmp_path / "second")
    assert second.gate()
    s = Schemas(wh, schema)
    twice = "INSERT INTO {S}.person SELECT * FROM {S}.person ORDER BY person_id LIMIT 1"
    with pytest.raises(Exception, match=r"(?i)duplicate|constraint"), wh.begin() as conn:
        conn.execute(sa.text(in_tonights_tables(s, twice)))  # keyed by the gate
    second = _built(cfg, tmp_path / "third")  # gated without keying its tables
    with monkeypatch.context() as m:
        m.setattr(steps_module, "_key_before_checks", lambda s: None)
        assert second.gate()
    with wh.begin() as conn:  # a duplicate person the gate did not see
        conn.execute(sa.text(in_tonights_tables(s, twice)))
    with pytest.raises(Exception, match=r"(?i)duplicate|constraint"):
        second.publish()
    assert next_tables() == tonight
    assert scalar(wh, f"SELECT count(*) FROM {_t(schema, 'person')}") == patients
    assert primary_keys(wh, schema) == keys
    assert second.status() != "published"
    # the run ends unpublished: its tables leave the CDM schema for its stage
    assert second.finish().status == "failed"
    assert next_tables() == set()
    assert set(published_tables()) <= tables(f"{schema}_stage")
    staged_persons = f"SELECT count(*) FROM {_t(schema + '_stage', 'person')}"
    assert scalar(wh, staged_persons) == patients + 1
    # a gate run again reads the tables set aside in the stage: it finds the duplicate
    assert not second.gate()
    refused = json.loads(second.fragment_path("gate").read_text(encoding="utf-8"))
    assert any("person.person_id" in e for e in refused["errors"]), refused["errors"]
    with wh.begin() as conn:  # mended there: one of the two copies goes
        conn.execute(
            sa.text(
                f"DELETE FROM {_t(schema + '_stage', 'person')} WHERE rowid = (SELECT max(rowid)"
                f" FROM {_t(schema + '_stage', 'person')} WHERE person_id = (SELECT"
                f" min(person_id) FROM {_t(schema + '_stage', 'person')}))"
            )
        )
    assert second.gate()
    assert second.publish()  # copied back into the CDM schema, keyed, swapped in
    assert second.status() == "published"
    assert scalar(wh, f"SELECT count(*) FROM {_t(schema, 'person')}") == patients
    assert primary_keys(wh, schema) == keys
    assert next_tables() == set()


def test_gate_reads_tonights_tables_not_their_views(duckdb_wh, pg_wh) -> None:
    """The quality gate's SQL names DuckDB's built tables themselves (in the CDM schema),
    not their views in the stage, which DuckDB reads whole under a correlated subquery;
    the stage's own tables, the researchers' and the vocabulary keep their schemas, and
    a shard's stage and PostgreSQL's hold their tables themselves."""
    from etl.pipeline.schemas import NEXT_PREFIX, Schemas

    sql = (
        "SELECT count(*) FROM {S}.measurement WHERE NOT EXISTS (SELECT 1 FROM {S}.person p"
        " WHERE p.person_id = {S}.measurement.person_id) AND EXISTS (SELECT 1 FROM"
        " {S}.cohort, {S}.scope_row, {C}.concept, {S}.measurement_extra)"
    )
    wh, schema = duckdb_wh
    gate = Schemas(wh, schema).reading_built().sql(sql)
    m, p = (wh.qualified(schema, NEXT_PREFIX + t) for t in ("measurement", "person"))
    stage, cdm = wh.quote(f"{schema}_stage"), wh.quote(schema)
    assert gate == (
        f"SELECT count(*) FROM {m} WHERE NOT EXISTS (SELECT 1 FROM {p} p"
        f" WHERE p.person_id = {m}.person_id) AND EXISTS (SELECT 1 FROM"
        f" {stage}.cohort, {stage}.scope_row, {cdm}.concept, {stage}.measurement_extra)"
    )
    build = Schemas(wh, schema).sql(sql)  # everything else reads the views
    assert f"FROM {stage}.measurement WHERE" in build and NEXT_PREFIX not in build
    shard = Schemas(wh, schema, stage_name=f"{schema}_stage_1")
    assert shard.reading_built().sql(sql) == shard.sql(sql)
    assert NEXT_PREFIX not in shard.reading_built().sql(sql)
    pg, pg_schema = pg_wh
    assert Schemas(pg, pg_schema).reading_built().sql(sql) == Schemas(pg, pg_schema).sql(sql)


def test_postgres_stage_is_unlogged_and_published_tables_are_not(pg_wh, tmp_path: Path) -> None:
    """On PostgreSQL the stage (rebuilt by every run) is written without WAL: every table
    the stage step and the build create is UNLOGGED, and a crash that empties them makes
    the run build again. What is published, the key map and the lineage store stay
    logged."""
    import sqlalchemy as sa

    from etl.config import load_config
    from etl.pipeline.steps import RunFailed

    wh, schema = pg_wh
    cfg = load_config(write_config(tmp_path, wh, schema, DEMO_SYNTHEA))
    night = _built(cfg, tmp_path)

    def persistence(schema_name: str) -> dict[str, str]:
        with wh.begin() as conn:
            return dict(
                conn.execute(
                    sa.text(
                        "SELECT c.relname, c.relpersistence FROM pg_class c"
                        " JOIN pg_namespace n ON n.oid = c.relnamespace"
                        " WHERE n.nspname = :s AND c.relkind = 'r'"
                    ),
                    {"s": schema_name},
                ).all()
            )

    staged = persistence(f"{schema}_stage")
    # the source tables, the CDM tables, the build's own tables (rules, mapping, ids...)
    assert {"src_event", "person", "measurement", "event_mapped", "lineage", "etl_run"} <= set(
        staged
    )
    # the kept events: written (unlogged) on PostgreSQL, read through the event_ok view
    assert "event_kept" in staged and "event_ok" not in staged
    # the visits' first record per key: a view the person rule reads, not a copy
    assert "visit_ok" in staged and "visit_unique" not in staged
    assert len(staged) > 60
    assert {t for t, p in staged.items() if p != "u"} == set()
    # after a server crash, recovery empties every unlogged table: the run's stamp too, so
    # the gate refuses to judge what is left and the run must build again
    with wh.begin() as conn:
        for table in staged:
            conn.execute(sa.text(f"TRUNCATE {_t(f'{schema}_stage', table)}"))
    with pytest.raises(RunFailed, match="holds no build"):
        night.gate()
    night.build()
    assert night.gate() and night.publish()
    published = persistence(schema)
    assert published["person"] == published["measurement"] == "p"
    assert set(persistence(f"{schema}_etl").values()) == {"p"}  # key map, lineage store
    assert scalar(wh, f"SELECT count(*) FROM {_t(schema, 'person')}") == len(
        rows(DEMO_SYNTHEA / "patients.csv")
    )


def test_duckdb_stage_reads_claim_lines_events_and_visits_where_they_landed(
    duckdb_wh, tmp_path: Path
) -> None:
    """DuckDB reads the landed claim lines, events and visits through views, not copies:
    the rules see every record (a duplicated line is still quarantined), and publishing
    drops the views with the stage."""
    import shutil

    from etl.config import load_config

    feed = tmp_path / "feed"
    shutil.copytree(DEMO_SYNTHEA, feed)
    lines = (feed / "claims_transactions.csv").read_text(encoding="utf-8").splitlines()
    with (feed / "claims_transactions.csv").open("a", encoding="utf-8") as fh:
        fh.write(lines[1] + "\n")  # the first line again: a duplicate key
    wh, schema = duckdb_wh
    cfg = load_config(write_config(tmp_path, wh, schema, feed))
    night = _built(cfg, tmp_path)
    stage = f"{schema}_stage"
    views = query(wh, f"SELECT view_name FROM duckdb_views() WHERE schema_name = '{stage}'")
    assert {"src_cost_line", "src_event", "src_visit"} <= {r[0] for r in views}
    for table, shape in (("src_event", "event"), ("src_visit", "visit")):
        rows = pq.read_table(night.landing_dir("ehr") / f"{shape}.parquet").num_rows
        assert rows > 0
        assert scalar(wh, f"SELECT count(*) FROM {_t(stage, table)}") == rows
    assert "visit_unique" in {r[0] for r in views}  # the visits' first per key, not a copy
    landed = pq.read_table(night.landing_dir("ehr") / "cost_line.parquet").num_rows
    assert landed == len(lines)  # the header less, the repeated line more
    assert scalar(wh, f"SELECT count(*) FROM {_t(stage, 'src_cost_line')}") == landed
    kept = scalar(wh, f"SELECT count(*) FROM {_t(stage, 'cost_line_ok')}")
    disposed = query(
        wh,
        f"SELECT rule, count(*) FROM {_t(stage, 'disposition')}"
        " WHERE record_set = 'cost_lines' GROUP BY rule",
    )
    assert dict(disposed).get("duplicate_key") == 1
    assert kept + sum(n for _, n in disposed) == landed
    assert night.gate() and night.publish()
    assert scalar(wh, f"SELECT count(*) FROM duckdb_views() WHERE schema_name = '{stage}'") == 0
