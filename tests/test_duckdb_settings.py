"""DuckDB's threads, memory_limit and temp_directory from the site config, env overriding."""

from __future__ import annotations

from pathlib import Path

import pytest
import sqlalchemy as sa
import yaml

from etl.config import ConfigError, load_config
from etl.warehouse import open_warehouse


def _config(tmp_path: Path, **extra: object) -> Path:
    cfg = {"warehouse": f"duckdb:///{tmp_path / 'w.duckdb'}", **extra}
    path = tmp_path / "site.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path


def _settings(url: str) -> tuple[str, int, str]:
    wh = open_warehouse(url)
    try:
        with wh.begin() as conn:
            row = conn.execute(
                sa.text(
                    "SELECT current_setting('memory_limit'), current_setting('threads'),"
                    " current_setting('temp_directory')"
                )
            ).one()
    finally:
        wh.close()
    return row[0], int(row[1]), row[2]


def test_site_config_settings_reach_duckdb(tmp_path: Path, monkeypatch) -> None:
    for env in ("MEMORY_LIMIT", "THREADS", "TEMP_DIRECTORY"):
        monkeypatch.delenv(f"OMOP_ETL_DUCKDB_{env}", raising=False)
    settings = {"threads": 1, "memory_limit": "512 MB", "temp_directory": "spill"}
    cfg = load_config(_config(tmp_path, duckdb=settings))
    memory, threads, temp = _settings(cfg.warehouse)
    assert memory in ("488.2 MiB", "512.0 MB", "488.2MiB")  # DuckDB reports it in MiB
    assert threads == 1
    assert Path(temp) == tmp_path / "spill"  # relative to the config file
    assert (tmp_path / "spill").is_dir()
    # the lock and the reports still see the same database file
    assert sa.engine.make_url(cfg.warehouse).database == str(tmp_path / "w.duckdb")


def test_environment_overrides_the_site_config(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("OMOP_ETL_DUCKDB_MEMORY_LIMIT", "256MB")
    monkeypatch.setenv("OMOP_ETL_DUCKDB_THREADS", "2")
    monkeypatch.delenv("OMOP_ETL_DUCKDB_TEMP_DIRECTORY", raising=False)
    cfg = load_config(_config(tmp_path, duckdb={"threads": 1, "memory_limit": "1GB"}))
    memory, threads, _ = _settings(cfg.warehouse)
    assert memory.startswith("244.1") and threads == 2


@pytest.mark.parametrize(
    ("extra", "key"),
    [
        ({"duckdb": {"memory_limit": "lots"}}, "duckdb.memory_limit"),
        ({"duckdb": {"threads": 0}}, "duckdb.threads"),
        ({"duckdb": {"thread": 2}}, "duckdb.thread"),
        ({"warehouse": "postgresql+psycopg://root@127.0.0.1/test", "duckdb": {"threads": 1}}, ""),
    ],
)
def test_bad_settings_are_named(tmp_path: Path, extra: dict, key: str) -> None:
    with pytest.raises(ConfigError, match=key or "duckdb:/// warehouse only"):
        load_config(_config(tmp_path, **extra))
