"""Person-sharded builds: the per-person build steps split into N independent shards.

    global steps (stage schema)  ->  shard k of N (schema <stage>_<k>, k = 0..N-1)  ->  merge

1. The global steps run once in `<cdm>_stage`: patient merges, the rules (kept,
   quarantined and filtered records, deduplicated care sites, providers and payers), the
   code map, location, care_site, provider, person, the merges' lineage, death, the
   visits of imaging studies, the financial rules, source_to_concept_map and
   cdm_source. Person ids are final after them.
2. Shard k builds the per-person steps (visits, events, imaging, coverage, cost,
   observation periods, eras) for the persons with `mod(person_id, N) = k` in a stage
   schema of its own: its person-keyed inputs are filtered copies of the global stage's
   (claims go with their visit's person; records of unknown persons with shard 0), the
   look-up tables views of the global stage's. The build modules are the same as for an
   unsharded build; only their stage schema differs. Shards touch nothing but their own
   schema, so they can run at the same time (in processes or Airflow workers) on
   PostgreSQL.
3. The merge numbers each table's new natural keys over all shards exactly as one build
   would (`assign_ids`: the key map's maximum + row_number() over the natural key), and
   rewrites every shard's provisional ids through `(shard, table, provisional id) -> id`:
   primary keys, foreign keys into per-shard tables (the CDM specification's, plus
   cost.payer_plan_period_id), the polymorphic cost.cost_event_id (by cost_domain_id)
   and image_feature.image_feature_event_id (by the event table it was built from), and
   lineage.cdm_id (by cdm_table). Renumbering keeps the order of ids within a shard,
   so ties broken by id fall the same way. The result equals an unsharded build's.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from contextlib import AbstractContextManager

import sqlalchemy as sa

from etl.cdm.build.common import LINEAGE_COLUMNS, LINEAGE_DDL
from etl.cdm.build.events import DOMAIN_TABLES
from etl.cdm.build.rules import DISPOSITION_DDL
from etl.cdm.schema import create_cdm
from etl.cdm.spec import ATHENA_TABLES, cdm_tables
from etl.pipeline.schemas import Schemas

log = logging.getLogger(__name__)

# build_steps() names run once, before the shards; every other step runs per shard.
GLOBAL_STEPS = (
    "merges",  # patient merges re-key the staged records before the rules
    "rules",
    "mapping",
    "location",
    "care_site",
    "provider",
    "person",
    "merge_records",
    "death",
    "imaging_visits",  # gives studies their visits in event_ok: before the shards copy it
    "financial_rules",  # deduplicates payers across persons
    "source_to_concept_map",
    "cdm_source",
)
SHARD_STEPS = (
    "visit_occurrence",
    "events",
    "imaging",
    "payer_plan_period",
    "cost",
    "observation_period",
    "eras",
)
# Stage tables the shard steps only read: views of the global stage's.
LOOKUPS = (
    "ids_person",
    "ids_provider",
    "ids_care_site",
    "code_map",
    "code_map_single",
    "value_map",
    "local_map",
    "payer_ok",
)
# Person-keyed inputs: each shard gets its persons' rows (unknown persons: shard 0).
PERSON_KEYED = ("visit_ok", "event_ok", "payer_plan_ok", "src_image", "src_image_feature")
# Foreign keys the specification does not declare.
EXTRA_FKS = {("cost", "payer_plan_period_id"): "payer_plan_period"}
# Polymorphic references: (table, column) -> SQL naming the referenced table per row.
COST_DOMAINS = {"Visit": "visit_occurrence", **DOMAIN_TABLES}
# Event references the build never fills: a shard that does is refused by the merge.
UNSUPPORTED = {
    ("measurement", "measurement_event_id"),
    ("observation", "observation_event_id"),
    ("note", "note_event_id"),
    ("note_nlp", "note_id"),
    ("episode", "episode_parent_id"),
    ("episode_event", "event_id"),
    ("image_feature", "image_finding_id"),
}
# How many shards a run under Airflow builds: read when the build task runs, never when
# the DAG file is parsed (the environment variable for runs outside Airflow's Variables).
SHARDS_VARIABLE = "omop_etl_shards"
SHARDS_ENV = "OMOP_ETL_SHARDS"
STAMP = "etl_run"  # as steps.py's: the run that owns a stage
MERGED = "etl_shards_merged"  # in the global stage once the shards are merged


class ShardError(RuntimeError):
    """A shard or the merge cannot go on; the message says why."""


def shard_count(value: object) -> int:
    """A shard count from configuration: a whole number, at least 1 (None: 1)."""
    if value is None or value == "":
        return 1
    try:
        n = int(str(value).strip())
    except ValueError:
        raise ShardError(f"shard count {value!r} is not a whole number") from None
    if n < 1:
        raise ShardError(f"shard count {n}: at least 1")
    return n


def shards_from_airflow() -> int:
    """The Airflow Variable `omop_etl_shards` (else $OMOP_ETL_SHARDS, else 1); call it
    inside a task."""
    from airflow.sdk import Variable

    return shard_count(Variable.get(SHARDS_VARIABLE, default=None) or os.environ.get(SHARDS_ENV))


def split_steps(
    steps: list[tuple[str, Callable]],
) -> tuple[list[tuple[str, Callable]], list[tuple[str, Callable]]]:
    """build_steps() as (global steps, per-shard steps), each in build order."""
    unknown = [n for n, _ in steps if n not in GLOBAL_STEPS and n not in SHARD_STEPS]
    if unknown:
        raise ShardError(f"build step(s) {unknown} are neither global nor per shard")
    return (
        [(n, f) for n, f in steps if n in GLOBAL_STEPS],
        [(n, f) for n, f in steps if n in SHARD_STEPS],
    )


def shard_stage(s: Schemas, k: int) -> Schemas:
    """The schemas of shard k: the global stage's name + `_<k>`."""
    return s.with_stage(f"{s.stage}_{k}")


def _clinical_tables() -> list[str]:
    return [t for t in cdm_tables() if t not in ATHENA_TABLES]


def prepare_shard(g: Schemas, k: int, n: int, run_id: str, *, scoped: bool = False) -> Schemas:
    """Create shard k's stage: empty CDM tables, its persons' inputs, look-up views.

    `scoped`: the shard's persons are the global stage's `build_scope` (a person-scoped
    build, etl/pipeline/scope.py) instead of `mod(person_id, n) = k`."""
    if not 0 <= k < n:
        raise ShardError(f"shard {k} of {n}: out of range")
    sh = shard_stage(g, k)
    wh = g.wh
    with wh.begin() as conn:
        wh.drop_schema(conn, sh.stage)
        wh.create_schema(conn, sh.stage)
    create_cdm(
        wh, sh.stage, indexes=False, tables=_clinical_tables(), constraints=False, unlogged=True
    )
    mine = "coalesce(mod(p.id, {n}), 0) = {k}"
    if scoped:  # records of unknown persons too, as shard 0 takes them
        mine = "(p.id IS NULL OR p.id IN (SELECT person_id FROM {G}.build_scope))"
    with wh.begin() as conn:
        sh.run(conn, LINEAGE_DDL)
        sh.run(conn, DISPOSITION_DDL)
        for name in LOOKUPS:
            sh.run(conn, "CREATE VIEW {S}.{t} AS SELECT * FROM {G}.{t}", t=name, G=_q(g))
        for name in PERSON_KEYED:
            sh.run(
                conn,
                "CREATE TABLE {S}.{t} AS SELECT t.* FROM {G}.{t} t"
                " LEFT JOIN {G}.ids_person p ON p.natural_key = t.person_key"
                f" WHERE {mine}",
                t=name,
                G=_q(g),
                n=str(n),
                k=str(k),
            )
        # a claim's cost row hangs on its visit: the claim goes with the visit's person
        sh.run(
            conn,
            "CREATE TABLE {S}.claim_ok AS SELECT t.* FROM {G}.claim_ok t"
            " LEFT JOIN {G}.visit_ok v ON v.visit_key = t.visit_key"
            " LEFT JOIN {G}.ids_person p ON p.natural_key = v.person_key"
            f" WHERE {mine}",
            G=_q(g),
            n=str(n),
            k=str(k),
        )
        sh.run(
            conn,
            "CREATE TABLE {S}.cost_line_ok AS SELECT t.* FROM {G}.cost_line_ok t"
            " WHERE t.claim_key IN (SELECT claim_key FROM {S}.claim_ok)",
            G=_q(g),
        )
        # the imaging step reads the rule of its studies' events, and what of its
        # instance files the global steps already loaded or set aside
        sh.run(
            conn,
            "CREATE TABLE {S}.event_set_aside AS SELECT t.* FROM {G}.event_set_aside t"
            " WHERE t.record_key IN (SELECT procedure_event_key FROM {S}.src_image)",
            G=_q(g),
        )
        # the lineage's columns by name: DuckDB's global stage lineage also has run_id
        for table, source, columns in (
            ("lineage", g.stage_lineage, LINEAGE_COLUMNS),
            ("disposition", f"{_q(g)}.disposition", None),
        ):
            sh.run(
                conn,
                "INSERT INTO {S}.{t} {into} SELECT {cols} FROM {G} x WHERE EXISTS (SELECT 1"
                " FROM {S}.src_image i WHERE i.feed = x.feed AND i.source_file = x.source_file"
                " AND i.source_line = x.source_line)",
                t=table,
                G=source,
                into=f"({', '.join(columns)})" if columns else "",
                cols=", ".join(f"x.{c}" for c in columns) if columns else "x.*",
            )
        for name in (*PERSON_KEYED, "claim_ok", "cost_line_ok", "event_set_aside"):
            wh.analyze(conn, sh.stage, name)
    return sh


def build_shard(
    g: Schemas,
    k: int,
    n: int,
    run_id: str,
    steps: list[tuple[str, Callable]],
    timed: Callable[[str], AbstractContextManager[None]] | None = None,
    *,
    scoped: bool = False,
) -> dict[str, int]:
    """Prepare shard k of n and run the per-shard `steps` in it; rows per CDM table.

    The shard's stage is stamped with the run id only once it is complete, so the merge
    never takes a half-built shard."""
    if timed is None:
        sh = prepare_shard(g, k, n, run_id, scoped=scoped)
    else:
        with timed("build.shard_stage"):
            sh = prepare_shard(g, k, n, run_id, scoped=scoped)
    with g.wh.begin() as conn:
        for name, fn in steps:
            if timed is None:
                fn(sh, conn)
            else:
                with timed(f"build.{name}"):
                    fn(sh, conn)
        sh.run(conn, "CREATE TABLE {S}.{t} (run_id VARCHAR(64))", t=STAMP)
        sh.run(conn, "INSERT INTO {S}.{t} VALUES (:r)", {"r": run_id}, t=STAMP)
        present = set(sa.inspect(conn).get_table_names(schema=sh.stage))
        counts = {t: g.wh.count_rows(conn, sh.stage, t) for t in _clinical_tables() if t in present}
    log.info("shard %d of %d built: %d rows", k, n, sum(counts.values()))
    return {t: c for t, c in counts.items() if c}


def _q(s: Schemas) -> str:
    return s.wh.quote(s.stage)


def _ids_tables(conn: sa.Connection, shards: list[Schemas]) -> list[str]:
    """The CDM tables whose ids the shards assigned (the same in every shard)."""
    names = None
    for sh in shards:
        found = {
            t.removeprefix("ids_")
            for t in sa.inspect(conn).get_table_names(schema=sh.stage)
            if t.startswith("ids_")
        }
        if names is not None and found != names:
            raise ShardError(f"{sh.stage} assigned ids for other tables than the first shard")
        names = found
    return sorted(names or ())


def _check_shards(conn: sa.Connection, g: Schemas, n: int, run_id: str) -> list[Schemas]:
    shards = [shard_stage(g, k) for k in range(n)]
    for sh in shards:
        owner = None
        if STAMP in sa.inspect(conn).get_table_names(schema=sh.stage):
            owner = sh.run(conn, "SELECT max(run_id) FROM {S}.{t}", t=STAMP).scalar()
        if owner != run_id:
            raise ShardError(
                f"shard schema {sh.stage} holds "
                + (f"run {owner}'s shard" if owner else "no complete shard")
                + f", not run {run_id}'s: build the shard again"
            )
    return shards


def merged(conn: sa.Connection, g: Schemas) -> bool:
    return MERGED in sa.inspect(conn).get_table_names(schema=g.stage)


def merge_shards(g: Schemas, conn: sa.Connection, n: int, run_id: str) -> dict[str, int]:
    """Merge the n shards' builds into the global stage within `conn`'s transaction, ids
    renumbered as one build would have numbered them; drop the shard schemas. Rows
    merged per CDM table."""
    shards = _check_shards(conn, g, n, run_id)
    tables = _ids_tables(conn, shards)
    G = _q(g)
    # every id a shard assigned, then each table's final ids (assign_ids over the union)
    g.run(conn, "DROP TABLE IF EXISTS {S}.shard_ids")
    g.run(
        conn,
        "CREATE TABLE {S}.shard_ids AS "
        + " UNION ALL ".join(
            f"SELECT {k} AS shard, CAST('{t}' AS VARCHAR(64)) AS cdm_table, natural_key, id,"
            f" is_new FROM {_q(sh)}.{g.wh.quote('ids_' + t)}"
            for k, sh in enumerate(shards)
            for t in tables
        ),
    )
    for t in tables:
        g.run(conn, "DROP TABLE IF EXISTS {S}.{ids}", ids=f"ids_{t}")
        g.run(
            conn,
            """
            CREATE TABLE {S}.{ids} AS
            WITH u AS (SELECT natural_key, id, is_new FROM {S}.shard_ids WHERE cdm_table = :t),
            fresh AS (SELECT DISTINCT natural_key FROM u WHERE is_new),
            base AS (SELECT coalesce(max(id), 0) AS top FROM {E}.key_map WHERE cdm_table = :t)
            SELECT DISTINCT natural_key, id, FALSE AS is_new FROM u WHERE NOT is_new
            UNION ALL
            SELECT f.natural_key,
                   CAST(b.top + row_number() OVER (ORDER BY f.natural_key) AS INTEGER), TRUE
            FROM fresh f CROSS JOIN base b
            """,
            {"t": t},
            ids=f"ids_{t}",
        )
    g.run(conn, "DROP TABLE IF EXISTS {S}.shard_remap")
    g.run(
        conn,
        "CREATE TABLE {S}.shard_remap AS "
        + " UNION ALL ".join(
            f"SELECT u.shard, u.cdm_table, u.id AS old_id, i.id AS new_id"
            f" FROM {G}.shard_ids u JOIN {G}.{g.wh.quote('ids_' + t)} i"
            f" ON i.natural_key = u.natural_key WHERE u.cdm_table = '{t}'"
            for t in tables
        ),
    )
    if g.wh.dialect == "postgresql":
        g.run(conn, "CREATE INDEX ON {S}.shard_remap (shard, cdm_table, old_id)")
        g.wh.analyze(conn, g.stage, "shard_remap")
    remapped = set(tables)
    counts: dict[str, int] = {}
    specs = cdm_tables()
    for table in _clinical_tables():
        for k, sh in enumerate(shards):
            if not sh.run(conn, "SELECT count(*) FROM {S}.{t}", t=table).scalar():
                continue
            counts[table] = counts.get(table, 0) + _merge_table(
                g, conn, sh, k, table, [f.name for f in specs[table].fields], remapped
            )
    for k, sh in enumerate(shards):
        _merge_lineage(g, conn, sh, k)
    # what the shards set aside (not the global stage's rows they were given to consult)
    g.run(
        conn,
        "INSERT INTO {S}.disposition SELECT d.* FROM ("
        + " UNION ALL ".join(f"SELECT * FROM {_q(sh)}.disposition" for sh in shards)
        + ") d WHERE NOT EXISTS (SELECT 1 FROM {S}.disposition x WHERE x.feed = d.feed"
        " AND x.source_file = d.source_file AND x.source_line = d.source_line"
        " AND x.record_set = d.record_set AND x.status = d.status AND x.rule = d.rule)",
    )
    for name in ("shard_ids", "shard_remap"):
        g.run(conn, "DROP TABLE {S}.{t}", t=name)
    g.run(conn, "CREATE TABLE {S}.{t} (shards INTEGER)", t=MERGED)
    g.run(conn, "INSERT INTO {S}.{t} VALUES (:n)", {"n": n}, t=MERGED)
    for sh in shards:
        g.wh.drop_schema(conn, sh.stage)
    log.info("%d shards merged: %d rows", n, sum(counts.values()))
    return counts


def _merge_table(
    g: Schemas,
    conn: sa.Connection,
    sh: Schemas,
    k: int,
    table: str,
    columns: list[str],
    remapped: set[str],
) -> int:
    """INSERT shard k's rows of `table` into the global stage, ids rewritten."""
    spec = cdm_tables()[table]
    joins: list[str] = []
    exprs: list[str] = []

    def remap(column: str, target_sql: str) -> str:
        alias = f"r{len(joins)}"
        joins.append(
            f"LEFT JOIN {_q(g)}.shard_remap {alias} ON {alias}.shard = {k}"
            f" AND {alias}.cdm_table = {target_sql} AND {alias}.old_id = t.{column}"
        )
        return f"{alias}.new_id"

    for column in columns:
        fk = EXTRA_FKS.get((table, column)) or spec.field(column).fk_table
        if (table, column) in UNSUPPORTED:
            found = sh.run(
                conn, "SELECT count(*) FROM {S}.{t} WHERE {c} IS NOT NULL", t=table, c=column
            ).scalar()
            if found:
                raise ShardError(f"{table}.{column} is filled: the merge cannot rewrite it")
            exprs.append(f"t.{column}")
        elif column == f"{table}_id" and table in remapped:
            exprs.append(remap(column, f"'{table}'"))
        elif fk in remapped:
            exprs.append(remap(column, f"'{fk}'"))
        elif (table, column) == ("cost", "cost_event_id"):
            case = " ".join(f"WHEN '{d}' THEN '{t}'" for d, t in COST_DOMAINS.items())
            exprs.append(remap(column, f"CASE t.cost_domain_id {case} END"))
        elif (table, column) == ("image_feature", "image_feature_event_id"):
            joins.append(
                f"LEFT JOIN {_q(sh)}.ids_image_feature fd ON fd.id = t.image_feature_id"
                f" LEFT JOIN (SELECT DISTINCT natural_key, event_table"
                f" FROM {_q(sh)}.image_feature_built) fb ON fb.natural_key = fd.natural_key"
            )
            exprs.append(remap(column, "fb.event_table"))
        else:
            exprs.append(f"t.{column}")
    return g.run(
        conn,
        "INSERT INTO {b} ({cols}) SELECT {exprs} FROM {T}.{t} t {joins}",
        b=g.built(table),
        t=table,
        cols=", ".join(columns),
        exprs=", ".join(exprs),
        T=_q(sh),
        joins=" ".join(joins),
    ).rowcount


def _merge_lineage(g: Schemas, conn: sa.Connection, sh: Schemas, k: int) -> None:
    """Shard k's lineage with cdm_id rewritten; an image feature's rule names its event
    ('<table> <id>'), rewritten too. Rows of global tables (given to the shard to
    consult) are left out: the global stage has them."""
    g.run(
        conn,
        """
        INSERT INTO {SL} ({cols})
        SELECT l.cdm_table, r.new_id, l.feed, l.source_file, l.source_line,
               l.source_vocabulary, l.source_code,
               CASE WHEN l.cdm_table = 'image_feature'
                    THEN split_part(l.mapping_rule, ' ', 1) || ' '
                         || CAST(f.image_feature_event_id AS VARCHAR)
                    ELSE l.mapping_rule END
        FROM {T}.lineage l
        JOIN {S}.shard_remap r ON r.shard = {k} AND r.cdm_table = l.cdm_table
         AND r.old_id = l.cdm_id
        LEFT JOIN {S}.image_feature f
               ON l.cdm_table = 'image_feature' AND f.image_feature_id = r.new_id
        """,
        T=_q(sh),
        k=str(k),
        cols=", ".join(LINEAGE_COLUMNS),
    )
