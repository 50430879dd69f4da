"""The three schemas a run uses in the warehouse, and SQL formatting against them."""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

import sqlalchemy as sa

from etl.cdm.schema import stage_prefixes
from etl.warehouse.base import Warehouse

_STAGE_TABLE = re.compile(r"CREATE TABLE (IF NOT EXISTS )?\{S\}\.")


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

    def sql(self, text: str, **extra: str) -> str:
        """Fill {C}, {S}, {E} (quoted cdm, stage and etl schema names) into `text`, and
        {SN}, the stage schema's bare name (for information_schema look-ups). A build reads
        only vocabulary tables from {C}: it names `vocab` when that is set. On PostgreSQL a
        `CREATE TABLE {S}.` becomes `CREATE UNLOGGED TABLE {S}.` (see etl/pipeline/stage.py)."""
        q = self.wh.quote
        if prefix := " ".join(stage_prefixes(self.wh)):  # UNLOGGED on PostgreSQL
            text = _STAGE_TABLE.sub(rf"CREATE {prefix} TABLE \1{{S}}.", text)
        return text.format(
            C=q(self.vocab or self.cdm), S=q(self.stage), E=q(self.etl), SN=self.stage, **extra
        )

    def run(self, conn: sa.Connection, text: str, params: dict | None = None, **extra: str):
        return conn.execute(sa.text(self.sql(text, **extra)), params or {})
