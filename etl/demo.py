"""The demo: a site config for the bundled demo data, run into a DuckDB file."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import yaml

from etl.cdm.schema import create_cdm
from etl.config import SiteConfig, load_config
from etl.paths import DEMO_VOCABULARY
from etl.vocab import VocabularyLoadResult, load_vocabulary
from etl.warehouse import open_warehouse

log = logging.getLogger(__name__)


@dataclass
class DemoResult:
    config_path: Path
    warehouse_path: Path
    tables: list[str]
    vocabulary: VocabularyLoadResult


def write_demo_config(workdir: Path) -> Path:
    """Write `workdir/site.yaml` pointing at the bundled demo assets."""
    workdir.mkdir(parents=True, exist_ok=True)
    cfg = {
        "warehouse": f"duckdb:///{(workdir / 'warehouse.duckdb').resolve()}",
        "cdm_schema": "main",
        "vocabulary": str(DEMO_VOCABULARY),
        "pseudonym_key_env": "OMOP_ETL_PSEUDONYM_KEY",
        "feeds": [],
    }
    path = workdir / "site.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
    return path


def run_demo(workdir: Path, *, show_progress: bool = False) -> DemoResult:
    """Create the CDM in `workdir/warehouse.duckdb` and load the demo vocabulary into it."""
    config_path = write_demo_config(workdir)
    cfg: SiteConfig = load_config(config_path)
    with open_warehouse(cfg.warehouse) as wh:
        created = create_cdm(wh, cfg.schema_name)
        log.info("CDM schema %s: %d table(s) created", cfg.schema_name, len(created))
        assert cfg.vocabulary is not None
        vocab = load_vocabulary(wh, cfg.vocabulary, cfg.schema_name, show_progress=show_progress)
        tables = wh.table_names(cfg.schema_name)
    return DemoResult(config_path, workdir / "warehouse.duckdb", tables, vocab)
