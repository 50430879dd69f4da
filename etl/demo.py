"""The demo: a site config for the bundled demo feeds, run into a DuckDB file."""

from __future__ import annotations

import logging
import os
import secrets
from pathlib import Path

import yaml

from etl.config import load_config
from etl.paths import DEMO_VOCABULARY, PROJECT_ROOT, QUALITY_DIR
from etl.pipeline.run import RunResult, run_pipeline

log = logging.getLogger(__name__)

DEMO_FEEDS = PROJECT_ROOT / "demo"
KEY_ENV = "OMOP_ETL_PSEUDONYM_KEY"


def write_demo_config(workdir: Path) -> Path:
    """Write `workdir/site.yaml` pointing at the bundled demo feeds and vocabulary."""
    workdir.mkdir(parents=True, exist_ok=True)
    cfg = {
        "warehouse": f"duckdb:///{(workdir / 'warehouse.duckdb').resolve()}",
        "cdm_schema": "main",
        "vocabulary": str(DEMO_VOCABULARY),
        "pseudonym_key_env": KEY_ENV,
        "site_name": "omop-etl demo (Synthea 27)",
        # the demo vocabulary is a subset: see the file for what it relaxes
        "quality": str(QUALITY_DIR / "demo"),
        # the hospital's three feeds; lab results and imaging studies come from the lab
        # and PACS feeds, so the EHR extract's copies of them are excluded (and counted)
        "feeds": [
            {
                "name": "ehr",
                "kind": "ehr_csv",
                "profile": "synthea",
                "path": str(DEMO_FEEDS / "synthea27"),
                "exclude": ["laboratory_from_lab_feed", "imaging_from_pacs_feed"],
            },
            {"name": "lab", "kind": "hl7v2", "path": str(DEMO_FEEDS / "lab")},
            {"name": "pacs", "kind": "dicom", "path": str(DEMO_FEEDS / "pacs")},
        ],
    }
    path = workdir / "site.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
    return path


def ensure_demo_key(workdir: Path) -> None:
    """Use $OMOP_ETL_PSEUDONYM_KEY if set; else a demo key kept in WORKDIR (with a warning).

    A real site sets its own secret in the environment; the demo keeps one beside its
    warehouse so ids stay stable from one demo run to the next.
    """
    if os.environ.get(KEY_ENV):
        return
    key_file = workdir / "pseudonym.key"
    if not key_file.exists():
        key_file.write_text(secrets.token_hex(32), encoding="ascii")
        key_file.chmod(0o600)
    os.environ[KEY_ENV] = key_file.read_text(encoding="ascii").strip()
    log.warning(
        "$%s is not set: using the demo key in %s. A site must set its own secret.",
        KEY_ENV,
        key_file,
    )


def run_demo(workdir: Path) -> RunResult:
    """Run the nightly pipeline over the bundled demo feeds into WORKDIR/warehouse.duckdb."""
    workdir = Path(workdir)
    config_path = write_demo_config(workdir)
    ensure_demo_key(workdir)
    return run_pipeline(load_config(config_path), workdir)
