"""Person-scoped builds: a delta night rebuilds only the patients its deliveries touched.

A patient that none of tonight's records touched would get, from a full rebuild, exactly
the rows, ids, lineage and dispositions the published warehouse already holds, provided
the published build was made from the same state by the same code, local maps, feed
settings and vocabulary (the build *fingerprint*). So when

- every feed of the run is a `delivery: delta` feed applied to the published run's state,
- no look-up record (care site, provider, payer) changed,
- the published run's fingerprint is tonight's, and
- fewer than half the patients were touched,

the build is:

1. the global steps over every staged record, as in any build (the rules, the code map,
   person, death, the health system, the financial rules: some look across patients);
2. the per-person steps (visits, events, imaging, coverage, cost, observation periods,
   eras) for the touched patients only (and the patients whose encounters their records
   name, or whose records name theirs): one shard of a person-sharded build
   (etl/pipeline/shards.py) whose persons are `build_scope`, merged into the stage with
   new ids numbered as a full build numbers them;
3. every other patient's rows of those tables copied from the published warehouse into
   the stage, with their lineage and the dispositions the imaging step gave their
   records (`splice_published`).

The gate and the publish then see complete tables, as after a full build, and the
result is the same (tests/test_scoped_build.py compares the two builds of one night,
tests/test_delta_property.py random nights with a full build of the final snapshot).
Otherwise the build is a full one; report.json's `build_scope` says which and why.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import sqlalchemy as sa

import etl
from etl.cdm.build.common import LINEAGE_COLUMNS
from etl.cdm.build.imaging import RECORD_SET as IMAGING_RECORD_SET
from etl.cdm.spec import ATHENA_TABLES, cdm_tables
from etl.config import SiteConfig
from etl.pipeline.schemas import RESEARCHER_TABLES, Schemas
from etl.pipeline.shards import COST_DOMAINS

log = logging.getLogger(__name__)

# Tables the global steps build in full every night (never copied from the warehouse).
GLOBAL_TABLES = frozenset(
    {"person", "death", "location", "care_site", "provider", "source_to_concept_map",
     "cdm_source"}
)  # fmt: skip
# Above this share of patients touched, a full build is cheaper than scope + copy.
MAX_SCOPE_SHARE = 0.5
SCOPE_ENV = "OMOP_ETL_BUILD_SCOPE"  # "full": never scope (benchmarks, comparisons)


def person_tables() -> list[str]:
    """The per-person tables a scoped build copies by person_id."""
    specs = cdm_tables()
    return [
        t
        for t, spec in specs.items()
        if t not in ATHENA_TABLES
        and t not in GLOBAL_TABLES
        and "person_id" in {f.name for f in spec.fields}
        and f"{t}_id" in {f.name for f in spec.fields}
    ]


def spliced_tables() -> list[str]:
    """Every table a scoped build copies: the per-person ones and cost (by its event)."""
    return [*person_tables(), "cost"]


def fingerprint(s: Schemas, cfg: SiteConfig, mappings: Path) -> str:
    """What a build's rows depend on besides the records: the ETL's code and bundled
    specifications, the local maps and profiles, the feeds' settings, the vocabulary."""
    h = hashlib.sha256()
    code = Path(etl.__file__).parent
    for root in (code, mappings):
        for path in sorted(p for p in root.rglob("*") if p.is_file()):
            if "__pycache__" in path.parts:
                continue
            h.update(str(path.relative_to(root)).encode())
            h.update(path.read_bytes())
    # where a feed is read from and how it is delivered do not change what is built
    feeds = [f.model_dump(mode="json", exclude={"path", "delivery"}) for f in cfg.feeds]
    h.update(json.dumps(feeds, sort_keys=True).encode())
    with s.wh.begin() as conn:
        rows = s.run(
            conn, "SELECT vocabulary_id, vocabulary_version FROM {C}.vocabulary ORDER BY 1"
        ).all()
        concepts = s.run(conn, "SELECT count(*) FROM {C}.concept").scalar()
    h.update(json.dumps([list(r) for r in rows] + [concepts], default=str).encode())
    return h.hexdigest()


def unsplittable_tables(s: Schemas, conn: sa.Connection) -> list[str]:
    """Published tables with rows that a scoped build could neither rebuild nor copy."""
    present = set(sa.inspect(conn).get_table_names(schema=s.cdm))
    known = GLOBAL_TABLES | set(spliced_tables()) | set(ATHENA_TABLES) | RESEARCHER_TABLES
    return [
        t
        for t in sorted(present)
        if t in cdm_tables() and t not in known and s.wh.count_rows(conn, s.cdm, t)
    ]


def create_scope(s: Schemas, conn: sa.Connection, touched: list[Path]) -> tuple[int, int]:
    """`build_scope` (person_id): the persons of the touched patient keys, by their
    published id (a merged-away patient too) or tonight's, and the survivors their
    records move to. Run after the global steps; (persons in scope, persons built)."""
    s.run(conn, "DROP TABLE IF EXISTS {S}.scope_key")
    s.run(conn, "CREATE TABLE {S}.scope_key (person_key TEXT)")
    s.wh.load_parquet(conn, s.stage, "scope_key", [p for p in touched if p.is_file()])
    s.run(conn, "DROP TABLE IF EXISTS {S}.build_scope")
    s.run(
        conn,
        """
        CREATE TABLE {S}.build_scope AS
        SELECT DISTINCT person_id FROM (
            SELECT k.id AS person_id FROM {E}.key_map k
            JOIN {S}.scope_key a ON a.person_key = k.natural_key WHERE k.cdm_table = 'person'
            UNION ALL
            SELECT p.id FROM {S}.ids_person p JOIN {S}.scope_key a ON a.person_key = p.natural_key
            UNION ALL
            SELECT p.id FROM {S}.merge_map m
            JOIN {S}.scope_key a ON a.person_key = m.from_person_key
            JOIN {S}.ids_person p ON p.natural_key = m.into_person_key
        ) x
        """,
    )
    _close_over_shared_visits(s, conn)
    s.wh.analyze(conn, s.stage, "build_scope")
    scoped = s.run(conn, "SELECT count(*) FROM {S}.build_scope").scalar()
    persons = s.run(conn, "SELECT count(*) FROM {S}.ids_person").scalar()
    return int(scoped), int(persons)


def _close_over_shared_visits(s: Schemas, conn: sa.Connection) -> None:
    """Add to `build_scope` the persons linked to it through a record of one patient
    that names another patient's encounter (inconsistent source data, which a full build
    links all the same): both sides are rebuilt, so the link is the same."""
    s.run(conn, "DROP TABLE IF EXISTS {S}.scope_link")
    s.run(
        conn,
        """
        CREATE TABLE {S}.scope_link AS
        SELECT DISTINCT pr.id AS a, pv.id AS b FROM (
            SELECT person_key, visit_key FROM {S}.event_ok WHERE visit_key IS NOT NULL
            UNION ALL
            SELECT person_key, visit_key FROM {S}.claim_ok WHERE visit_key IS NOT NULL
        ) r
        JOIN {S}.visit_ok v ON v.visit_key = r.visit_key AND v.person_key <> r.person_key
        JOIN {S}.ids_person pr ON pr.natural_key = r.person_key
        JOIN {S}.ids_person pv ON pv.natural_key = v.person_key
        """,
    )
    for _ in range(10):  # chains of such links are rare and short
        added = s.run(
            conn,
            """
            INSERT INTO {S}.build_scope
            SELECT DISTINCT x.id FROM (
                SELECT b AS id FROM {S}.scope_link
                WHERE a IN (SELECT person_id FROM {S}.build_scope)
                UNION
                SELECT a FROM {S}.scope_link WHERE b IN (SELECT person_id FROM {S}.build_scope)
            ) x WHERE x.id NOT IN (SELECT person_id FROM {S}.build_scope)
            """,
        ).rowcount
        if not added:
            break
    s.run(conn, "DROP TABLE {S}.scope_link")


def splice_published(s: Schemas, conn: sa.Connection) -> dict[str, int]:
    """Copy the published rows of every person outside `build_scope` into the stage's
    per-person tables and cost, with their lineage and imaging dispositions; rows
    copied per table. Run after the scope's shard is merged."""
    wh = s.wh
    P = wh.quote(s.cdm)
    specs = cdm_tables()
    # the published rows of the persons in scope: rebuilt tonight, not copied
    s.run(conn, "DROP TABLE IF EXISTS {S}.scope_row")
    s.run(conn, "CREATE TABLE {S}.scope_row (cdm_table VARCHAR(64), id BIGINT)")
    for t in person_tables():
        s.run(
            conn,
            "INSERT INTO {S}.scope_row SELECT '{t}', x.{t}_id FROM {P}.{t} x"
            " WHERE x.person_id IN (SELECT person_id FROM {S}.build_scope)",
            t=t,
            P=P,
        )
    case = " ".join(f"WHEN '{d}' THEN '{t}'" for d, t in COST_DOMAINS.items())
    s.run(
        conn,
        "INSERT INTO {S}.scope_row SELECT 'cost', c.cost_id FROM {P}.cost c"
        " JOIN {S}.scope_row r ON r.cdm_table = CASE c.cost_domain_id {case} END"
        " AND r.id = c.cost_event_id",
        P=P,
        case=case,
    )
    wh.analyze(conn, s.stage, "scope_row")
    copied: dict[str, int] = {}
    for t in spliced_tables():
        cols = ", ".join(wh.quote(f.name) for f in specs[t].fields)
        copied[t] = s.run(
            conn,
            "INSERT INTO {b} ({cols}) SELECT {cols} FROM {P}.{t} x WHERE NOT EXISTS"
            " (SELECT 1 FROM {S}.scope_row r WHERE r.cdm_table = '{t}' AND r.id = x.{t}_id)",
            b=s.built(t),
            t=t,
            cols=cols,
            P=P,
        ).rowcount
    tables = ", ".join(f"'{t}'" for t in spliced_tables())
    s.run(
        conn,
        """
        INSERT INTO {SL} ({cols}) SELECT {picked}
        FROM {E}.lineage l
        WHERE l.cdm_table IN ({tables})
          AND NOT EXISTS (SELECT 1 FROM {S}.scope_row r
                          WHERE r.cdm_table = l.cdm_table AND r.id = l.cdm_id)
        """,
        tables=tables,
        cols=", ".join(LINEAGE_COLUMNS),
        picked=", ".join(f"l.{c}" for c in LINEAGE_COLUMNS),
    )
    # the imaging step's dispositions (series not built) of the other persons' files
    s.run(
        conn,
        """
        INSERT INTO {S}.disposition
        SELECT a.feed, a.source_file, a.source_line, a.record_set, a.status, a.rule
        FROM {E}.set_aside a
        JOIN (SELECT DISTINCT i.feed, i.source_file, i.source_line FROM {S}.src_image i
              JOIN {S}.ids_person p ON p.natural_key = i.person_key
              WHERE p.id NOT IN (SELECT person_id FROM {S}.build_scope)) i
          ON i.feed = a.feed AND i.source_file = a.source_file
         AND i.source_line = a.source_line
        WHERE a.record_set = :rs
          AND NOT EXISTS (SELECT 1 FROM {S}.disposition x WHERE x.feed = a.feed
                          AND x.source_file = a.source_file AND x.source_line = a.source_line
                          AND x.record_set = a.record_set AND x.status = a.status
                          AND x.rule = a.rule)
        """,
        {"rs": IMAGING_RECORD_SET},
    )
    s.run(conn, "DROP TABLE {S}.scope_row")
    log.info("scoped build: %d rows of untouched patients copied", sum(copied.values()))
    return {t: n for t, n in copied.items() if n}
