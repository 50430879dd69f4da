"""Helpers for tests that run the whole pipeline on DuckDB or PostgreSQL."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import sqlalchemy as sa
import yaml

from etl.config import load_config
from etl.pipeline.run import RunResult, run_pipeline
from etl.pipeline.schemas import Schemas
from etl.warehouse import Warehouse
from tests.conftest import DEMO_VOCAB, REPO


def write_config(
    tmp: Path,
    wh: Warehouse,
    schema: str,
    feed_dir: Path,
    *,
    vocabulary: Path = DEMO_VOCAB,
    mappings: Path | None = None,
    profile: str = "synthea",
) -> Path:
    cfg: dict[str, Any] = {
        "warehouse": wh.url,
        "cdm_schema": schema,
        "vocabulary": str(vocabulary),
        "feeds": [{"name": "ehr", "kind": "ehr_csv", "profile": profile, "path": str(feed_dir)}],
        # the bundled vocabulary is a subset: its gate settings (quality/demo/)
        "quality": str(REPO / "quality" / "demo"),
    }
    if mappings is not None:
        cfg["mappings"] = str(mappings)
    path = tmp / "site.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path


def write_feeds_config(
    out: Path,
    url: str,
    schema: str,
    *,
    ehr: Path,
    lab: Path | None = None,
    pacs: Path | None = None,
    delivery: str = "snapshot",
) -> Path:
    """A site config at `out` with the EHR feed and, when given, the lab and PACS feeds
    (the EHR feed then excludes what they deliver, as the demo does); every feed with
    `delivery`."""
    exclude = (["laboratory_from_lab_feed"] if lab else []) + (
        ["imaging_from_pacs_feed"] if pacs else []
    )
    feeds: list[dict[str, Any]] = [
        {"name": "ehr", "kind": "ehr_csv", "profile": "synthea", "path": str(ehr),
         "exclude": exclude}
    ]  # fmt: skip
    if lab is not None:
        feeds.append({"name": "lab", "kind": "hl7v2", "path": str(lab)})
    if pacs is not None:
        feeds.append({"name": "pacs", "kind": "dicom", "path": str(pacs)})
    for feed in feeds:
        feed["delivery"] = delivery
    cfg = {
        "warehouse": url,
        "cdm_schema": schema,
        "vocabulary": str(DEMO_VOCAB),
        "quality": str(REPO / "quality" / "demo"),
        "feeds": feeds,
    }
    out.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return out


def in_tonights_tables(s: Schemas, sql: str) -> str:
    """`sql` filled as the gate reads it (`Schemas.reading_built`): each `{S}.<CDM table>`
    names where the build stores it, since DuckDB's stage holds its CDM tables as views,
    which take no INSERT or UPDATE."""
    return s.reading_built().sql(sql)


def run(config: Path, workdir: Path, **kwargs: Any) -> RunResult:
    return run_pipeline(load_config(config), workdir, **kwargs)


def rows(path: Path) -> list[dict[str, str]]:
    with path.open(encoding="utf-8", newline="") as fh:
        return list(csv.DictReader(fh))


def write_rows(path: Path, header: list[str], data: list[dict[str, str]]) -> None:
    with path.open("w", encoding="utf-8", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=header)
        w.writeheader()
        for r in data:
            w.writerow({k: r.get(k, "") for k in header})


def query(wh: Warehouse, sql: str, **params: Any) -> list[tuple]:
    with wh.engine.connect() as conn:
        return [tuple(r) for r in conn.execute(sa.text(sql), params).all()]


def scalar(wh: Warehouse, sql: str, **params: Any) -> Any:
    return query(wh, sql, **params)[0][0]


def primary_keys(wh: Warehouse, schema: str) -> set[tuple[str, str]]:
    """(table, column) of every primary-key column in `schema`, from information_schema."""
    with wh.begin() as conn:
        return set(
            conn.execute(
                sa.text(
                    "SELECT tc.table_name, k.column_name"
                    " FROM information_schema.table_constraints tc"
                    " JOIN information_schema.key_column_usage k"
                    "   ON k.constraint_name = tc.constraint_name"
                    "  AND k.table_schema = tc.table_schema AND k.table_name = tc.table_name"
                    " WHERE tc.constraint_type = 'PRIMARY KEY' AND tc.table_schema = :s"
                ),
                {"s": schema},
            ).tuples()
        )


def columns(wh: Warehouse, schema: str, table: str) -> list[tuple[str, str]]:
    """(name, data_type) of a table's columns, in order (information_schema: both engines)."""
    return query(
        wh,
        "SELECT column_name, data_type FROM information_schema.columns"
        " WHERE table_schema = :s AND table_name = :t ORDER BY ordinal_position",
        s=schema,
        t=table,
    )


def table_names(wh: Warehouse, schema: str) -> list[str]:
    return [
        r[0]
        for r in query(
            wh,
            "SELECT table_name FROM information_schema.tables WHERE table_schema = :s",
            s=schema,
        )
    ]
