"""The site configuration (YAML), validated: a bad key is named in the error."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from etl.yaml_models import load_yaml_model


class ConfigError(ValueError):
    """The site configuration cannot be used; the message names the file and the key."""


class FeedConfig(BaseModel):
    """One source feed of the nightly run."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[a-z][a-z0-9_]*$")
    kind: Literal["ehr_csv", "hl7v2", "dicom"]
    path: Path
    profile: str | None = None  # ehr_csv: the profile in mappings/profiles/
    # ehr_csv: exclusions the profile defines that this site turns on (e.g. laboratory
    # results that a lab feed delivers instead); excluded rows count as filtered
    exclude: list[str] = Field(default_factory=list)
    # hl7v2: a result whose patient no other feed knows is quarantined ('unknown_person'),
    # or its person is created from PID (sex, birth date)
    unknown_patient: Literal["quarantine", "create"] = "quarantine"
    # dicom: store study/series UIDs as keyed pseudonyms instead of in clear
    hash_uids: bool = False
    # snapshot: every delivery is the feed's whole current state. delta: a delivery holds
    # only new and changed records (and, for ehr_csv, deleted ones under deleted/); it is
    # applied by key to the state the last published run landed
    delivery: Literal["snapshot", "delta"] = "snapshot"


class DuckDBSettings(BaseModel):
    """DuckDB's resources for a DuckDB warehouse; each env var overrides its setting."""

    model_config = ConfigDict(extra="forbid")

    # worker threads (OMOP_ETL_DUCKDB_THREADS); default: one per core
    threads: int | None = Field(default=None, ge=1, le=1024)
    # buffer pool cap, e.g. 6GB (OMOP_ETL_DUCKDB_MEMORY_LIMIT); DuckDB spills to disk
    # beyond it; default: 80% of RAM
    memory_limit: str | None = Field(
        default=None, pattern=r"(?i)^\s*\d+(\.\d+)?\s*(b|kb|mb|gb|tb|kib|mib|gib|tib)\s*$"
    )
    # where it spills (OMOP_ETL_DUCKDB_TEMP_DIRECTORY); default: <database>.tmp beside
    # the file; relative to the config file
    temp_directory: Path | None = None


class SiteConfig(BaseModel):
    """What a site configures: the warehouse, its vocabulary and its feeds."""

    model_config = ConfigDict(extra="forbid")

    warehouse: str
    cdm_schema: str | None = None  # default: main on DuckDB, cdm on PostgreSQL
    vocabulary: Path | None = None
    pseudonym_key_env: str = "OMOP_ETL_PSEUDONYM_KEY"
    feeds: list[FeedConfig] = Field(default_factory=list)
    # Folder of local maps (local/, usagi/) and profiles; default: the project's mappings/.
    mappings: Path | None = None
    # cdm_source.cdm_source_name and cdm_holder.
    site_name: str = "omop-etl warehouse"
    # Folder of quality-gate overrides (*.yaml); default: the project's quality/.
    quality: Path | None = None
    # DuckDB warehouse only: threads, memory_limit, temp_directory (carried in the URL)
    duckdb: DuckDBSettings | None = None

    @field_validator("warehouse")
    @classmethod
    def _known_engine(cls, v: str) -> str:
        if not v.startswith(("duckdb://", "postgresql")):
            raise ValueError("must be duckdb:///path or postgresql+psycopg://user@host/db")
        return v

    @field_validator("feeds")
    @classmethod
    def _unique_names(cls, v: list[FeedConfig]) -> list[FeedConfig]:
        names = [f.name for f in v]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"feed names must be unique: {', '.join(dupes)}")
        return v

    @model_validator(mode="after")
    def _duckdb_settings(self) -> SiteConfig:
        if self.duckdb is None:
            return self
        if not self.warehouse.startswith("duckdb"):
            raise ValueError("duckdb: settings apply to a duckdb:/// warehouse only")
        self.warehouse = _with_duckdb_settings(self.warehouse, self.duckdb)
        return self

    @property
    def schema_name(self) -> str:
        if self.cdm_schema:
            return self.cdm_schema
        return "main" if self.warehouse.startswith("duckdb") else "cdm"


def load_config(path: Path) -> SiteConfig:
    """Read and validate a site config; relative paths are relative to the config file."""
    path = Path(path)
    cfg = load_yaml_model(path, SiteConfig, ConfigError)
    base = path.parent.resolve()
    if cfg.vocabulary is not None and not cfg.vocabulary.is_absolute():
        cfg.vocabulary = base / cfg.vocabulary
    if cfg.mappings is not None and not cfg.mappings.is_absolute():
        cfg.mappings = base / cfg.mappings
    if cfg.quality is not None and not cfg.quality.is_absolute():
        cfg.quality = base / cfg.quality
    for feed in cfg.feeds:
        if not feed.path.is_absolute():
            feed.path = base / feed.path
    temp = cfg.duckdb.temp_directory if cfg.duckdb else None
    if cfg.duckdb and temp is not None and not temp.is_absolute():
        cfg.duckdb.temp_directory = base / temp
        cfg.warehouse = _with_duckdb_settings(cfg.warehouse, cfg.duckdb)
    return cfg


def _with_duckdb_settings(url: str, settings: DuckDBSettings) -> str:
    from etl.warehouse.duckdb import with_settings

    values = settings.model_dump()
    values["memory_limit"] = (values["memory_limit"] or "").replace(" ", "") or None
    return with_settings(url, values)
