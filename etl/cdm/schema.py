"""Generate SQLAlchemy tables and dialect DDL from the CDM specification."""

from __future__ import annotations

from collections.abc import Iterable

import sqlalchemy as sa
from sqlalchemy.engine import Dialect

from etl.cdm.spec import FieldSpec, TableSpec, cdm_tables
from etl.warehouse.base import Warehouse

# Tables whose foreign keys are indexed by the generated DDL: the patient-level join paths.
_INDEXED_FK_TABLES = {"person", "visit_occurrence", "visit_detail"}
# Vocabulary look-up columns that OHDSI's index DDL covers beyond the foreign keys.
_EXTRA_INDEXES = {"concept": ("concept_code",)}


def sqlalchemy_type(field: FieldSpec) -> sa.types.TypeEngine:
    """The SQLAlchemy type for a specification datatype."""
    t = field.datatype
    if t == "integer":
        return sa.Integer()
    if t == "float":
        return sa.Double()
    if t == "date":
        return sa.Date()
    if t == "datetime":
        return sa.DateTime()
    if t == "varchar(max)":
        return sa.Text()
    length = field.varchar_length
    if length is None:
        raise ValueError(f"{field.table}.{field.name}: no type for {t!r}")
    return sa.String(length)


def _indexed_columns(spec: TableSpec) -> list[str]:
    cols: list[str] = []
    for f in spec.fields:
        if f.is_primary_key:
            continue
        main_concept = spec.concept_prefix and f.name == f"{spec.concept_prefix}concept_id"
        vocab_fk = spec.group == "VOCAB" or spec.name == "concept"
        if (f.fk_table in _INDEXED_FK_TABLES) or main_concept or (vocab_fk and f.fk_table):
            cols.append(f.name)
    cols.extend(_EXTRA_INDEXES.get(spec.name, ()))
    return cols


def build_metadata(
    schema: str | None = None,
    *,
    tables: Iterable[str] | None = None,
    foreign_keys: bool = False,
    indexes: bool = False,
    constraints: bool = True,
    prefixes: list[str] | None = None,
) -> sa.MetaData:
    """SQLAlchemy metadata for the CDM (all 41 tables unless `tables` names some).

    Types, NOT NULL and primary keys always follow the specification; foreign keys and
    indexes are optional, as in OHDSI's own DDL scripts. `prefixes` go between CREATE and
    TABLE (UNLOGGED, for a PostgreSQL stage).
    """
    specs = cdm_tables()
    wanted = list(specs) if tables is None else list(tables)
    md = sa.MetaData(schema=schema)
    for name in wanted:
        spec = specs[name]
        cols = []
        for f in spec.fields:
            args: list[sa.SchemaItem] = []
            if foreign_keys and f.fk_table and f.fk_field and f.fk_table in specs:
                target = f"{schema}.{f.fk_table}.{f.fk_field}" if schema else None
                target = target or f"{f.fk_table}.{f.fk_field}"
                args.append(sa.ForeignKey(target, name=f"fpk_{name}_{f.name}"[:63], use_alter=True))
            cols.append(
                sa.Column(
                    f.name,
                    sqlalchemy_type(f),
                    *args,
                    nullable=not (constraints and f.required),
                    primary_key=constraints and f.is_primary_key,
                    autoincrement=False,
                )
            )
        table = sa.Table(name, md, *cols, prefixes=prefixes or [])
        if spec.primary_key and constraints:
            table.primary_key.name = f"xpk_{name}"
        if indexes:
            for col in _indexed_columns(spec):
                sa.Index(f"idx_{name}_{col}"[:63], table.c[col])
    return md


def dialect_for(name: str) -> Dialect:
    """A SQLAlchemy dialect object for 'duckdb' or 'postgresql'."""
    if name == "postgresql":
        from sqlalchemy.dialects.postgresql import psycopg

        return psycopg.dialect()
    if name == "duckdb":
        from duckdb_engine import Dialect as DuckDBDialect

        return DuckDBDialect()
    raise ValueError(f"unknown dialect {name!r}: use duckdb or postgresql")


def ddl_statements(md: sa.MetaData, dialect: Dialect) -> list[str]:
    """CREATE TABLE / INDEX (and ALTER TABLE ... ADD CONSTRAINT for FKs) as SQL strings."""
    out: list[str] = []
    fks: list[sa.ForeignKeyConstraint] = []
    for table in md.sorted_tables:
        out.append(str(sa.schema.CreateTable(table).compile(dialect=dialect)).strip())
        fks.extend(c for c in table.constraints if isinstance(c, sa.ForeignKeyConstraint))
        out.extend(
            str(sa.schema.CreateIndex(ix).compile(dialect=dialect)).strip()
            for ix in sorted(table.indexes, key=lambda i: i.name or "")
        )
    out.extend(str(sa.schema.AddConstraint(fk).compile(dialect=dialect)).strip() for fk in fks)
    return out


def stage_prefixes(wh: Warehouse) -> list[str]:
    """What goes between CREATE and TABLE for a stage table: UNLOGGED on PostgreSQL (a
    stage is rebuilt by every run, so it needs no write-ahead log), nothing on DuckDB."""
    return ["UNLOGGED"] if wh.dialect == "postgresql" else []


def create_cdm(
    wh: Warehouse,
    schema: str | None = None,
    *,
    foreign_keys: bool = False,
    indexes: bool | None = None,
    tables: Iterable[str] | None = None,
    constraints: bool = True,
    unlogged: bool = False,
) -> list[str]:
    """Create the CDM tables missing from `schema` (all 41 by default), in one transaction.

    `unlogged` (a stage schema): on PostgreSQL the tables are UNLOGGED, written without
    write-ahead log; ignored on DuckDB.

    Indexes default to on for PostgreSQL and off for DuckDB (whose zone maps serve scans,
    and whose ART indexes would slow every bulk load). Foreign keys are PostgreSQL-only:
    DuckDB can neither add them after creation nor express the CDM's circular references;
    the quality gate checks them on both engines. Returns the names of created tables.
    """
    schema = schema or wh.default_schema
    if foreign_keys and wh.dialect != "postgresql":
        raise ValueError("foreign keys can only be applied on PostgreSQL (see --help)")
    if indexes is None:
        indexes = wh.dialect == "postgresql"
    md = build_metadata(
        schema,
        tables=tables,
        foreign_keys=foreign_keys,
        indexes=indexes,
        constraints=constraints,
        prefixes=stage_prefixes(wh) if unlogged else None,
    )
    with wh.begin() as conn:
        wh.create_schema(conn, schema)
        existing = set(sa.inspect(conn).get_table_names(schema=schema))
        missing = [t for t in md.sorted_tables if t.name not in existing]
        md.create_all(conn, tables=missing)
    return [t.name for t in missing]
