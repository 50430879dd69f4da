"""The three schemas a run uses in the warehouse, and SQL formatting against them."""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

import sqlalchemy as sa

from etl.cdm.schema import stage_prefixes
from etl.cdm.spec import ATHENA_TABLES, cdm_tables
from etl.warehouse.base import Warehouse

_STAGE_TABLE = re.compile(r"CREATE TABLE (IF NOT EXISTS )?\{(S\}\.|SL\})")
_STAGE_NAME = re.compile(r"\{S\}\.(\w+)\b")
# DuckDB's main stage keeps its lineage here, in the ETL schema (see Schemas.stage_lineage)
STAGED_LINEAGE = "lineage_staged"
# Researchers' own results: never touched by a load.
RESEARCHER_TABLES = {"cohort", "cohort_definition"}
# DuckDB's main stage builds tonight's CDM tables in the CDM schema under these names
# (see Schemas.built); publishing renames them into place.
NEXT_PREFIX = "omop_etl_next_"


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
    reads_built: bool = False

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

    @property
    def tables_in_cdm(self) -> bool:
        """True when this stage's CDM tables are built in the CDM schema (see `built`)."""
        return self.lineage_renamed

    def built(self, table: str) -> str:
        """Where the build writes the CDM table `table`, quoted (INSERTs go here; reads go
        through `{S}.<table>`).

        On DuckDB the main stage's published tables lie in the CDM schema, as
        `NEXT_PREFIX<table>`, with a view of each in the stage schema under the table's
        own name: publishing keys them and renames them into place instead of copying
        them (DuckDB moves no table from one schema to another; the copy of 127 M rows at
        a million patients took 30 s). A shard's, PostgreSQL's and the researchers'
        tables (cohort) are the stage schema's own."""
        schema, name = self._built_at(table)
        return f"{self.wh.quote(schema)}.{self.wh.quote(name)}"

    def _built_at(self, table: str) -> tuple[str, str]:
        """The schema and table name `built` quotes."""
        if self.tables_in_cdm and table not in RESEARCHER_TABLES and table not in ATHENA_TABLES:
            return self.cdm, NEXT_PREFIX + table
        return self.stage, table

    def located(self, table: str) -> tuple[str, str]:
        """The schema and table name that `{S}.<table>` names in `sql` (unquoted): the
        built table itself when reading built tables (`reading_built`), else the stage's."""
        return self._built_at(table) if self._names_built(table) else (self.stage, table)

    def _names_built(self, table: str) -> bool:
        """Whether `sql` turns `{S}.<table>` into the built table (`located`)."""
        return self.reads_built and self.tables_in_cdm and table in cdm_tables()

    def reading_built(self) -> Schemas:
        """The same schemas, but `sql` names each built CDM table itself where the text
        says `{S}.<table>` (`built`), not its view in the stage. For the quality gate on
        DuckDB: under a correlated subquery (the NOT EXISTS of the foreign-key and
        standard-concept checks) DuckDB 2.0 reads every column of a view's table, where
        over the table it reads the one column (the gate at a million patients took 235 s
        over the views, 98 s over tables)."""
        return replace(self, reads_built=True)

    def sql(self, text: str, **extra: str) -> str:
        """Fill {C}, {S}, {E} (quoted cdm, stage and etl schema names), {SL} (the stage's
        lineage table) into `text`, and {SN}, the stage schema's bare name (for
        information_schema look-ups). A build reads only vocabulary tables from {C}: it
        names `vocab` when that is set. On PostgreSQL a `CREATE TABLE {S}.` becomes
        `CREATE UNLOGGED TABLE {S}.` (see etl/pipeline/stage.py)."""
        q = self.wh.quote
        if prefix := " ".join(stage_prefixes(self.wh)):  # UNLOGGED on PostgreSQL
            text = _STAGE_TABLE.sub(rf"CREATE {prefix} TABLE \1{{\2", text)
        if self.reads_built and self.tables_in_cdm:
            text = _STAGE_NAME.sub(self._built_name, text)
        return text.format(
            C=q(self.vocab or self.cdm),
            S=q(self.stage),
            E=q(self.etl),
            SN=self.stage,
            SL=self.stage_lineage,
            **extra,
        )

    def _built_name(self, match: re.Match[str]) -> str:
        """`built` for a CDM table (which keeps the researchers' and the vocabulary's in
        their schemas); any other `{S}.<name>` as it is."""
        table = match.group(1)
        return self.built(table) if self._names_built(table) else match.group(0)

    def run(self, conn: sa.Connection, text: str, params: dict | None = None, **extra: str):
        return conn.execute(sa.text(self.sql(text, **extra)), params or {})
