"""What changes between the published vocabulary and a staged release, and what it moves.

Set-based SQL over the two schemas: concepts deprecated (valid now, invalid or gone in the
release), standard mappings changed ('Maps to' targets of a concept differ), concepts
whose domain changes, and, from the lineage of a build against the release, the source
records whose rows would move to another CDM table.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa

from etl.pipeline.schemas import Schemas
from etl.warehouse.base import Warehouse

EXAMPLES = 50


def _rows(conn: sa.Connection, sql: str) -> list[dict[str, Any]]:
    return [dict(r) for r in conn.execute(sa.text(sql)).mappings().all()]


def _count(conn: sa.Connection, sql: str) -> int:
    return int(conn.execute(sa.text(f"SELECT count(*) FROM ({sql}) x")).scalar_one())


def vocabulary_diff(
    wh: Warehouse, published: str, staged: str, *, limit: int = EXAMPLES
) -> dict[str, Any]:
    """Counts and (up to `limit`) examples of what the staged release changes."""
    old, new = wh.qualified(published, "concept"), wh.qualified(staged, "concept")
    old_rel = wh.qualified(published, "concept_relationship")
    new_rel = wh.qualified(staged, "concept_relationship")
    deprecated = (
        "SELECT o.concept_id, o.vocabulary_id, o.concept_code, o.concept_name, o.domain_id,"
        " coalesce(n.invalid_reason, 'removed') AS new_invalid_reason"
        f" FROM {old} o LEFT JOIN {new} n ON n.concept_id = o.concept_id"
        " WHERE o.invalid_reason IS NULL AND (n.concept_id IS NULL OR n.invalid_reason IS NOT NULL)"
    )
    domains = (
        "SELECT o.concept_id, o.vocabulary_id, o.concept_code, o.domain_id AS old_domain_id,"
        f" n.domain_id AS new_domain_id FROM {old} o JOIN {new} n ON n.concept_id = o.concept_id"
        " WHERE o.domain_id <> n.domain_id"
    )

    def maps_to(rel: str) -> str:
        return (
            f"SELECT concept_id_1, concept_id_2 FROM {rel}"
            " WHERE relationship_id = 'Maps to' AND invalid_reason IS NULL"
        )

    changed_sources = (
        f"SELECT concept_id_1 FROM (({maps_to(old_rel)} EXCEPT {maps_to(new_rel)})"
        f" UNION ({maps_to(new_rel)} EXCEPT {maps_to(old_rel)})) d GROUP BY concept_id_1"
    )
    with wh.begin() as conn:
        out: dict[str, Any] = {
            "concepts_deprecated": _count(conn, deprecated),
            "mappings_changed": _count(conn, changed_sources),
            "domains_changed": _count(conn, domains),
        }
        out["deprecated"] = _rows(conn, f"{deprecated} ORDER BY o.concept_id LIMIT {limit}")
        out["domain_changes"] = _rows(conn, f"{domains} ORDER BY o.concept_id LIMIT {limit}")
        sources = [
            r["concept_id_1"]
            for r in _rows(conn, f"{changed_sources} ORDER BY concept_id_1 LIMIT {limit}")
        ]
        out["mapping_changes"] = _mapping_changes(conn, sources, old_rel, new_rel, old, new)
    return out


def _mapping_changes(
    conn: sa.Connection,
    sources: list[int],
    old_rel: str,
    new_rel: str,
    old: str,
    new: str,
) -> list[dict[str, Any]]:
    if not sources:
        return []
    ids = ", ".join(str(int(i)) for i in sources)

    def targets(rel: str) -> dict[int, list[int]]:
        found: dict[int, list[int]] = {}
        for r in _rows(
            conn,
            f"SELECT concept_id_1, concept_id_2 FROM {rel} WHERE relationship_id = 'Maps to'"
            f" AND invalid_reason IS NULL AND concept_id_1 IN ({ids})"
            " ORDER BY concept_id_1, concept_id_2",
        ):
            found.setdefault(r["concept_id_1"], []).append(r["concept_id_2"])
        return found

    before, after = targets(old_rel), targets(new_rel)
    names = {
        r["concept_id"]: r
        for r in _rows(
            conn,
            f"SELECT concept_id, vocabulary_id, concept_code FROM {new} WHERE concept_id IN ({ids})"
            f" UNION SELECT concept_id, vocabulary_id, concept_code FROM {old}"
            f" WHERE concept_id IN ({ids})",
        )
    }
    return [
        {
            "concept_id": i,
            "vocabulary_id": names.get(i, {}).get("vocabulary_id"),
            "concept_code": names.get(i, {}).get("concept_code"),
            "old_targets": before.get(i, []),
            "new_targets": after.get(i, []),
        }
        for i in sources
    ]


def rows_moving(s: Schemas, *, limit: int = EXAMPLES) -> list[dict[str, Any]]:
    """Source records that the published lineage puts in one CDM table and the staged
    build in another, per (from, to) pair: how many, and a few file:line examples."""
    with s.wh.begin() as conn:
        present = sa.inspect(conn).get_table_names(schema=s.etl)
        if "lineage" not in present:
            return []
        pairs = s.sql(
            "WITH o AS (SELECT DISTINCT feed, source_file, source_line, cdm_table"
            " FROM {E}.lineage WHERE source_code IS NOT NULL),"
            " n AS (SELECT DISTINCT feed, source_file, source_line, cdm_table"
            " FROM {SL} WHERE source_code IS NOT NULL),"
            " gone AS (SELECT * FROM o EXCEPT SELECT * FROM n),"
            " came AS (SELECT * FROM n EXCEPT SELECT * FROM o)"
            " SELECT g.cdm_table AS from_table, c.cdm_table AS to_table, g.feed,"
            " g.source_file, g.source_line FROM gone g JOIN came c ON c.feed = g.feed"
            " AND c.source_file = g.source_file AND c.source_line = g.source_line"
        )
        totals = _rows(
            conn,
            f"SELECT from_table, to_table, count(*) AS n FROM ({pairs}) p"
            " GROUP BY from_table, to_table ORDER BY from_table, to_table",
        )
        out = []
        for t in totals:
            examples = conn.execute(
                sa.text(
                    f"SELECT feed, source_file, source_line FROM ({pairs}) p"
                    " WHERE from_table = :f AND to_table = :t"
                    f" ORDER BY feed, source_file, source_line LIMIT {limit}"
                ),
                {"f": t["from_table"], "t": t["to_table"]},
            ).all()
            out.append(
                {
                    "from_table": t["from_table"],
                    "to_table": t["to_table"],
                    "rows": int(t["n"]),
                    "examples": [f"{feed} {f}:{line}" for feed, f, line in examples],
                }
            )
    return out
