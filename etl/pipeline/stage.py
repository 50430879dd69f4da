"""Stage: a fresh staging schema holding this run's canonical records and empty CDM tables.

On PostgreSQL every stage table is UNLOGGED (here and in the build's CREATE TABLE {S}.x,
etl/pipeline/schemas.py): the stage is rebuilt by every run, so its rows need no
write-ahead log. A server crash empties unlogged tables, the run's stamp with them, so the
gate or publish of such a run stops ("holds no build") and the run must build again; the
published tables, the key map and the lineage store stay logged.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import sqlalchemy as sa

from etl import canonical
from etl.cdm.build.common import KEY_MAP_INDEX, LINEAGE_DDL, UNCOMPRESSED, key_map_ddl
from etl.cdm.schema import create_cdm, stage_prefixes
from etl.cdm.spec import ATHENA_TABLES
from etl.mapping.local_maps import LOCAL_MAP
from etl.pipeline.publish import create_next_tables, staged_lineage_run_column
from etl.pipeline.schemas import RESEARCHER_TABLES, Schemas

_ARROW_SQL = {
    pa.string(): sa.Text(),
    pa.int64(): sa.BigInteger(),
    pa.int32(): sa.Integer(),
    pa.float64(): sa.Double(),
    pa.timestamp("us"): sa.DateTime(),
    pa.int32(): sa.Integer(),
    pa.bool_(): sa.Boolean(),
}
SOURCE_TABLES = {
    "src_person": "person",
    "src_derived_person": "derived_person",
    "src_visit": "visit",
    "src_event": "event",
    "src_care_site": "care_site",
    "src_provider": "provider",
    "src_payer": "payer",
    "src_payer_plan": "payer_plan",
    "src_claim": "claim",
    "src_cost_line": "cost_line",
    "src_quarantine": "quarantine",  # what extraction rejected: kept for tracing
    "src_image": "image",
    "src_image_feature": "image_feature",
    "src_person_merge": "person_merge",
}
# The biggest source tables, which the build reads a few times and no step changes
# (except a patient merge, which copies them first: merges.apply_merges): where the
# engine can (DuckDB), views over the landed Parquet files, not copies. Claim lines are
# the biggest table of an EHR feed and are read only by the financial rules: at 100,000
# patients (19.4 M lines) loading them took 5.8 s, and the rules read the files 1.3 s
# more slowly than the table. The events of a million patients (93.9 M rows) took 68.5 s
# to load; a scan of eight of their columns takes 4.6 s from the files, 1.6 s from the
# table, and grouping their keys' hashes 11 s from either.
READ_IN_PLACE = {"src_cost_line", "src_event", "src_visit"}


class _UncompressedText(sa.types.UserDefinedType):
    """DuckDB text stored uncompressed: a record's own key, a digest (`UNCOMPRESSED`)."""

    cache_ok = True

    def get_col_spec(self, **kw: object) -> str:
        return f"VARCHAR {UNCOMPRESSED}"


def _table_for(
    md: sa.MetaData, name: str, schema: pa.Schema, prefixes: list[str], own_key: str | None = None
) -> sa.Table:
    """The stage table of a shape; on DuckDB (`own_key` given) its record key uncompressed."""
    columns = (
        sa.Column(f.name, _UncompressedText() if f.name == own_key else _ARROW_SQL[f.type])
        for f in schema
    )
    return sa.Table(name, md, *columns, prefixes=prefixes)


def prepare(
    s: Schemas, landing_dirs: list[Path], local_map: pa.Table, run_id: str | None = None
) -> None:
    """Drop and recreate the stage schema, create the CDM tables, load the landed records.

    `run_id`: the run that builds (and may publish) this stage; on DuckDB its staged
    lineage carries it from the start (`publish.staged_lineage_run_column`)."""
    wh = s.wh
    with wh.begin() as conn:
        wh.drop_schema(conn, s.stage)
        wh.create_schema(conn, s.stage)
        wh.create_schema(conn, s.etl)
        s.run(conn, key_map_ddl(wh.dialect))
        if wh.dialect == "postgresql":
            s.run(conn, KEY_MAP_INDEX, n=f"{s.etl}_key_map_key"[:63])
    create_build_tables(s)
    md = sa.MetaData(schema=s.stage)
    prefixes = stage_prefixes(wh)
    landed = {
        name: [p for d in landing_dirs if (p := d / f"{shape}.parquet").is_file()]
        for name, shape in SOURCE_TABLES.items()
    }
    with wh.begin() as conn:
        views = {
            name for name in READ_IN_PLACE if wh.view_parquet(conn, s.stage, name, landed[name])
        }
        for name, shape in SOURCE_TABLES.items():
            if name not in views:
                own_key = canonical.RECORD_KEYS.get(shape) if wh.dialect == "duckdb" else None
                _table_for(md, name, canonical.SHAPES[shape], prefixes, own_key)
        _table_for(md, "local_map", LOCAL_MAP, prefixes)
        md.create_all(conn)
        s.run(conn, "DROP TABLE IF EXISTS {SL}")  # DuckDB's lies outside the stage schema
        s.run(conn, LINEAGE_DDL)
        if s.lineage_renamed and run_id is not None:
            s.run(conn, staged_lineage_run_column(run_id))
        for name in SOURCE_TABLES:
            if name not in views:
                wh.load_parquet(conn, s.stage, name, landed[name])
        wh.bulk_insert(conn, s.stage, "local_map", local_map)
        for name in [*SOURCE_TABLES, "local_map"]:
            if name not in views:
                wh.analyze(conn, s.stage, name)


def create_build_tables(s: Schemas) -> None:
    """The empty CDM tables the build fills: in the stage schema, or on DuckDB's main
    stage in the CDM schema under other names with views in the stage (`Schemas.built`).

    No NOT NULL or key constraints: the quality gate checks them and names what is wrong;
    the published tables get the specification's constraints."""
    wh = s.wh
    clinical = [t for t in _cdm_table_names() if t not in ATHENA_TABLES]
    if s.tables_in_cdm:
        with wh.begin() as conn:
            wh.create_schema(conn, s.cdm)
            wh.create_schema(conn, s.stage)
            create_next_tables(s, conn)
        clinical = [t for t in clinical if t in RESEARCHER_TABLES]
    create_cdm(wh, s.stage, indexes=False, tables=clinical, constraints=False, unlogged=True)


def _cdm_table_names() -> list[str]:
    from etl.cdm.spec import cdm_tables

    return list(cdm_tables())
