"""Vocabulary refresh without Airflow: stage a release, re-map the last landed run against
it, report what changed, and swap vocabulary and CDM together or refuse."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import sqlalchemy as sa

from etl.config import load_config
from etl.pipeline.refresh import last_landed_run, refresh_vocabulary
from etl.pipeline.schemas import Schemas
from etl.pipeline.steps import NightlyRun
from tests.conftest import DEMO_SYNTHEA, DEMO_VOCAB
from tests.pipeline_helpers import in_tonights_tables, run, scalar, write_config
from tests.test_nightly_runs import snapshot

DEPRECATED = 4112343  # SNOMED 195662009 Acute viral pharyngitis: 2 demo conditions
REMAPPED = 40481087  # SNOMED 444814009 Viral sinusitis: 4 demo conditions
NEW_TARGET = 433644  # an Observation-domain standard concept


def _rewrite(path: Path, change) -> None:  # type: ignore[no-untyped-def]
    with path.open(encoding="utf-8", newline="") as fh:
        reader = csv.reader(fh, delimiter="\t", quoting=csv.QUOTE_NONE)
        rows = list(reader)
    out = [rows[0]] + [r for r in (change(r) for r in rows[1:]) if r is not None]
    with path.open("w", encoding="utf-8", newline="") as fh:
        csv.writer(fh, delimiter="\t", quoting=csv.QUOTE_NONE, lineterminator="\n").writerows(out)


def modified_vocabulary(tmp: Path) -> Path:
    """The demo vocabulary with one concept deprecated and one 'Maps to' changed."""
    dest = tmp / "vocab-next"
    shutil.copytree(DEMO_VOCAB, dest)

    def concept(r: list[str]) -> list[str]:
        if r[0] == str(DEPRECATED):  # standard_concept, valid_end_date, invalid_reason
            return [*r[:5], "", r[6], r[7], "20250101", "D"]
        if r[0] == str(REMAPPED):  # no longer standard: mapped to another concept
            return [*r[:5], "", *r[6:]]
        return r

    def relationship(r: list[str]) -> list[str] | None:
        if r[0] == r[1] == str(DEPRECATED):
            return None  # a deprecated concept maps to nothing
        if r[0] == r[1] == str(REMAPPED) and r[2] == "Maps to":
            return [r[0], str(NEW_TARGET), *r[2:]]
        if r[0] == r[1] == str(REMAPPED) and r[2] == "Mapped from":
            return [str(NEW_TARGET), r[1], *r[2:]]
        return r

    _rewrite(dest / "CONCEPT.csv", concept)
    _rewrite(dest / "CONCEPT_RELATIONSHIP.csv", relationship)
    _rewrite(dest / "VOCABULARY.csv", lambda r: r if r[0] != "None" else [*r[:3], "v-next", *r[4:]])
    return dest


def test_refused_refresh_reports_changes_and_swaps_nothing(duckdb_wh, tmp_path) -> None:
    """(The swap itself: tests/test_dags.py, through the omop_vocabulary_refresh DAG.)"""
    wh, schema = duckdb_wh
    config = write_config(tmp_path, wh, schema, DEMO_SYNTHEA)
    cfg = load_config(config)
    first = run(config, tmp_path)
    assert first.status == "published", first.report["errors"]
    assert last_landed_run(tmp_path) == first.run_id
    before = snapshot(wh, schema)
    key_map = f'SELECT count(*) FROM "{schema}_etl".key_map'
    keys = scalar(wh, key_map)
    # a publish retried after its commit (an orchestrator's retry) does not publish twice
    again = NightlyRun.resume(cfg, tmp_path, first.run_id).publish()
    assert again["person"] == 27 and scalar(wh, key_map) == keys
    assert snapshot(wh, schema) == before
    release = modified_vocabulary(tmp_path)

    # a defect in the re-mapped build: refused, nothing swapped, the changes reported
    injected: list[str] = []

    def inject(step: str) -> None:  # as the gate starts (on DuckDB: before it keys the tables)
        if step.startswith("gate") and not injected:
            injected.append(step)
            with wh.begin() as conn:
                conn.execute(
                    sa.text(
                        in_tonights_tables(
                            Schemas(wh, schema),
                            "UPDATE {S}.condition_occurrence SET person_id = NULL"
                            " WHERE condition_occurrence_id = (SELECT"
                            " min(condition_occurrence_id) FROM {S}.condition_occurrence)",
                        )
                    )
                )

    refused = refresh_vocabulary(cfg, tmp_path, release, on_step=inject)
    assert (refused.status, refused.exit_code) == ("refused", 1)
    assert refused.report["replay_of"] == first.run_id
    changes = refused.report["vocabulary_changes"]
    assert changes["concepts_deprecated"] == 1 and changes["mappings_changed"] == 2
    assert [c["concept_id"] for c in changes["deprecated"]] == [DEPRECATED]
    assert changes["deprecated"][0]["new_invalid_reason"] == "D"
    assert {
        (m["concept_id"], tuple(m["old_targets"]), tuple(m["new_targets"]))
        for m in changes["mapping_changes"]
    } == {(DEPRECATED, (DEPRECATED,), ()), (REMAPPED, (REMAPPED,), (NEW_TARGET,))}
    moving = {(m["from_table"], m["to_table"]): m["rows"] for m in changes["rows_moving"]}
    assert moving == {("condition_occurrence", "observation"): 4}
    assert json.loads((refused.run_dir / "vocabulary_changes.json").read_text()) == changes
    assert snapshot(wh, schema) == before
    assert (
        scalar(wh, f'SELECT invalid_reason FROM "{schema}".concept WHERE concept_id = 4112343')
        is None
    )
    assert f"{schema}_vocab_next" not in sa.inspect(wh.engine).get_schema_names()
