"""The command line and the demo, as a user runs them."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import sqlalchemy as sa
from typer.testing import CliRunner

from etl.cli import app
from etl.config import ConfigError, load_config
from tests.conftest import DEMO_SYNTHEA, DEMO_VOCAB, REPO
from tests.pipeline_helpers import rows


def test_help_lists_the_commands() -> None:
    result = CliRunner().invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("demo", "cdm", "vocab"):
        assert command in result.output


def test_console_script_is_installed() -> None:
    exe = REPO / ".venv" / "bin" / "omop-etl"
    if not exe.exists():
        pytest.skip("not installed through `make` (no .venv/bin/omop-etl)")
    out = subprocess.run([exe, "--help"], capture_output=True, text=True, check=True)
    assert "vocab" in out.stdout


def test_demo_builds_warehouse_with_41_tables_and_vocabulary(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["demo", "--workdir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    engine = sa.create_engine(f"duckdb:///{tmp_path / 'warehouse.duckdb'}")
    with engine.connect() as conn:
        tables = conn.execute(
            sa.text("SELECT count(*) FROM information_schema.tables WHERE table_schema='main'")
        ).scalar_one()
        concepts = conn.execute(sa.text("SELECT count(*) FROM concept")).scalar_one()
    engine.dispose()
    expected = sum(1 for _ in (DEMO_VOCAB / "CONCEPT.csv").open(encoding="utf-8")) - 1
    assert tables == 41
    assert concepts == expected
    cfg = load_config(tmp_path / "site.yaml")
    assert cfg.vocabulary == DEMO_VOCAB
    # the hospital's three feeds, each accounted for; labs and imaging come from their
    # own feeds, and the EHR extract's copies are counted as filtered by the exclusion
    (run_dir,) = (tmp_path / "runs").iterdir()
    report = json.loads((run_dir / "report.json").read_text(encoding="utf-8"))
    assert report["status"] == "published"
    assert set(report["feeds"]) == {"ehr", "lab", "pacs"}
    for feed in report["feeds"].values():
        assert feed["records_in"] == feed["loaded"] + feed["quarantined"] + feed["filtered"]
    lab_rows = [r for r in rows(DEMO_SYNTHEA / "observations.csv") if r["CATEGORY"] == "laboratory"]
    assert report["feeds"]["lab"]["loaded"] == len(lab_rows) == 251
    assert {(f["rule"], f["rows"]) for f in report["filtered"] if f["feed"] == "ehr"} >= {
        ("laboratory_from_lab_feed", 251),
        ("imaging_from_pacs_feed", 1),
    }
    assert report["feeds"]["pacs"]["loaded"] == report["feeds"]["pacs"]["records_in"] > 0
    assert report["tables"]["image_occurrence"] == 1
    # running it again is safe: same warehouse, vocabulary replaced, not doubled
    again = CliRunner().invoke(app, ["demo", "--workdir", str(tmp_path)])
    assert again.exit_code == 0, again.output


def test_cdm_create_cli_on_postgres(pg_wh) -> None:
    wh, schema = pg_wh
    args = ["cdm", "create", "--warehouse", wh.url, "--schema", schema, "--foreign-keys"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "41 table(s) created" in result.output
    assert len(wh.table_names(schema)) == 41


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "site.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_config_resolves_relative_paths(tmp_path: Path) -> None:
    cfg = load_config(
        _write(
            tmp_path,
            "warehouse: duckdb:///w.duckdb\nvocabulary: athena\n"
            "feeds:\n  - {name: ehr, kind: ehr_csv, profile: synthea, path: csv}\n",
        )
    )
    assert cfg.vocabulary == tmp_path.resolve() / "athena"
    assert cfg.feeds[0].path == tmp_path.resolve() / "csv"
    assert cfg.schema_name == "main"
    assert cfg.pseudonym_key_env == "OMOP_ETL_PSEUDONYM_KEY"


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("warehouse: duckdb:///w.duckdb\nwarehose_typo: 1\n", "warehose_typo"),
        (
            "warehouse: duckdb:///w.duckdb\nfeeds:\n  - {name: lab, kind: hl7, path: x}\n",
            "feeds.0.kind",
        ),
        ("warehouse: mysql://x\n", "warehouse"),
        ("cdm_schema: cdm\n", "warehouse: Field required"),
        (
            "warehouse: duckdb:///w\nfeeds:\n  - {name: a, kind: dicom, path: x}\n"
            "  - {name: a, kind: dicom, path: y}\n",
            "unique",
        ),
    ],
)
def test_config_errors_name_the_bad_key(tmp_path: Path, text: str, named: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(_write(tmp_path, text))
    assert named in str(err.value)
    assert "site.yaml" in str(err.value)


def test_run_command_exit_codes(tmp_path: Path) -> None:
    from tests.conftest import DEMO_SYNTHEA

    config = tmp_path / "site.yaml"
    config.write_text(
        f"warehouse: duckdb:///{tmp_path / 'w.duckdb'}\nvocabulary: {DEMO_VOCAB}\n"
        f"quality: {REPO / 'quality' / 'demo'}\n"
        f"feeds:\n  - {{name: ehr, kind: ehr_csv, profile: synthea, path: {DEMO_SYNTHEA}}}\n",
        encoding="utf-8",
    )
    ok = CliRunner().invoke(app, ["run", "--config", str(config), "--workdir", str(tmp_path)])
    assert ok.exit_code == 0, ok.output
    assert "published" in ok.output
    runs = sorted((tmp_path / "runs").iterdir())
    assert len(runs) == 1 and (runs[0] / "report.json").is_file()
    summary = CliRunner().invoke(app, ["report", runs[0].name, "--workdir", str(tmp_path)])
    assert summary.exit_code == 0 and "published" in summary.output
    assert "checks:" in summary.output
    # replay of that run, without touching the feed
    again = CliRunner().invoke(
        app,
        ["run", "--config", str(config), "--workdir", str(tmp_path), "--replay", runs[0].name],
    )
    assert again.exit_code == 0, again.output
    # a feed whose folder is missing: failed (2), warehouse unchanged, report written
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        config.read_text() + f"  - {{name: lab, kind: hl7v2, path: {tmp_path / 'absent'}}}\n",
        encoding="utf-8",
    )
    failed = CliRunner().invoke(app, ["run", "--config", str(bad), "--workdir", str(tmp_path)])
    assert failed.exit_code == 2
    assert "is not a folder" in failed.output
    # a config error names the key and exits 2 before any run
    typo = tmp_path / "typo.yaml"
    typo.write_text(config.read_text().replace("feeds:", "fedes:"), encoding="utf-8")
    result = CliRunner().invoke(app, ["run", "--config", str(typo)])
    assert result.exit_code == 2 and "fedes" in result.output
