"""The three schemas a run uses in the warehouse, and SQL formatting against them."""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

import sqlalchemy as sa

from etl.cdm.schema import stage_prefixes
from etl.warehouse.base import Warehouse

_STAGE_TABLE = re.compile(r"CREATE TABLE (IF NOT EXISTS )?\{(S\}\.|SL\})")
# DuckDB's main stage keeps its lineage here, in the ETL schema (see Schemas.stage_lineage)
STAGED_LINEAGE = "lineage_staged"


@dataclass(frozen=True)
class Schemas:
    """`cdm`: what researchers see. `stage`: this run's build, dropped and recreated each
    run. `etl`: the ETL's own persistent state (key map), never seen by OHDSI tools.
    `vocab`: where a build reads the vocabulary; the cdm schema unless a staged release
    is being tried (the vocabulary refresh). `stage_name`: another stage schema than
    `<cdm>_stage` (a shard of a person-sharded build, `<cdm>_stage_<k>`)."""

    wh: Warehouse
    cdm: str
    vocab: str | None = None
    stage_name: str | None = None

    @property
    def stage(self) -> str:
        return self.stage_name or f"{self.cdm}_stage"

    def with_stage(self, name: str) -> Schemas:
        """The same warehouse and schemas, building in the stage schema `name`."""
        return replace(self, stage_name=name)

    @property
    def etl(self) -> str:
        return f"{self.cdm}_etl"

    @property
    def lineage_renamed(self) -> bool:
        """True when this stage's lineage is published by renaming it (see stage_lineage)."""
        return self.wh.dialect == "duckdb" and self.stage_name is None

    @property
    def stage_lineage(self) -> str:
        """The build's lineage table, quoted (`{SL}` in SQL).

        On DuckDB the main stage's lies in the ETL schema, as `lineage_staged`, so that
        publishing renames it into the lineage store instead of copying it (DuckDB moves
        no table from one schema to another; the copy of 43.7 M rows at 100,000 patients
        took 6.4 s, and their write again at the commit). A shard's stays in its stage
        schema (shards are merged into the main stage), and so does PostgreSQL's: its
        stage is unlogged, the store must not be."""
        if self.lineage_renamed:
            return f"{self.wh.quote(self.etl)}.{self.wh.quote(STAGED_LINEAGE)}"
        return f"{self.wh.quote(self.stage)}.lineage"

    def sql(self, text: str, **extra: str) -> str:
        """Fill {C}, {S}, {E} (quoted cdm, stage and etl schema names), {SL} (the stage's
        lineage table) into `text`, and {SN}, the stage schema's bare name (for
        information_schema look-ups). A build reads only vocabulary tables from {C}: it
        names `vocab` when that is set. On PostgreSQL a `CREATE TABLE {S}.` becomes
        `CREATE UNLOGGED TABLE {S}.` (see etl/pipeline/stage.py)."""
        q = self.wh.quote
        if prefix := " ".join(stage_prefixes(self.wh)):  # UNLOGGED on PostgreSQL
            text = _STAGE_TABLE.sub(rf"CREATE {prefix} TABLE \1{{\2", text)
        return text.format(
            C=q(self.vocab or self.cdm),
            S=q(self.stage),
            E=q(self.etl),
            SN=self.stage,
            SL=self.stage_lineage,
            **extra,
        )

    def run(self, conn: sa.Connection, text: str, params: dict | None = None, **extra: str):
        return conn.execute(sa.text(self.sql(text, **extra)), params or {})
