"""Load an Athena release into the warehouse: stage, check, then swap in one transaction.

1. Every file is streamed into a staging schema through the engine's bulk path (Arrow ->
   DuckDB, Arrow -> COPY on PostgreSQL), keeping each row's source line.
2. Keys and referential integrity are checked in SQL on the staged tables.
3. Only if nothing is wrong, the published vocabulary tables are replaced in a single
   transaction. On any problem the staging schema is dropped and the previous
   vocabulary stays exactly as it was.

A refresh (`stage_vocabulary`) stops after step 2 with the checked release in
`SCHEMA_vocab_next`; `swap_staged_vocabulary` replaces the published tables from there
inside the caller's transaction (the one that publishes the CDM rebuilt against it).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import sqlalchemy as sa

from etl.cdm.schema import build_metadata, sqlalchemy_type
from etl.cdm.spec import TableSpec, vocabulary_tables
from etl.vocab.athena import LINE_COLUMN, Problem, VocabularyError, find_file, read_table
from etl.warehouse.base import Warehouse

log = logging.getLogger(__name__)

OPTIONAL_FILES = {"concept_ancestor", "concept_synonym", "drug_strength"}
# Uniqueness of the vocabulary tables without a primary key in the CDM specification.
NATURAL_KEYS = {
    "concept_relationship": ("concept_id_1", "concept_id_2", "relationship_id"),
    "concept_ancestor": ("ancestor_concept_id", "descendant_concept_id"),
    "concept_synonym": ("concept_id", "concept_synonym_name", "language_concept_id"),
    "drug_strength": ("drug_concept_id", "ingredient_concept_id"),
}
# Key columns that still only name a metadata concept (reported, not fatal, when absent).
METADATA_REFERENCES = {"language_concept_id"}
_EXAMPLES = 5


@dataclass
class VocabularyLoadResult:
    """What a successful load did: rows per table, non-fatal findings, elapsed seconds."""

    rows: dict[str, int]
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0
    vocabulary_version: str | None = None


def key_columns(spec: TableSpec) -> tuple[str, ...]:
    return spec.primary_key or NATURAL_KEYS.get(spec.name, ())


def staging_schema_name(schema: str) -> str:
    return f"{schema}_vocab_stage"


def _staging_metadata(schema: str) -> sa.MetaData:
    md = sa.MetaData(schema=schema)
    for spec in vocabulary_tables().values():
        sa.Table(
            spec.name,
            md,
            *(sa.Column(f.name, sqlalchemy_type(f), nullable=True) for f in spec.fields),
            sa.Column(LINE_COLUMN, sa.BigInteger(), nullable=False),
        )
    return md


def _stage_files(
    wh: Warehouse,
    release_dir: Path,
    stage: str,
    problems: list[Problem],
    warnings: list[str],
    progress: Callable[[str, int], Callable[[int], None]] | None,
) -> dict[str, int]:
    rows: dict[str, int] = {}
    for name, spec in vocabulary_tables().items():
        path = find_file(release_dir, name)
        if path is None:
            if name in OPTIONAL_FILES:
                warnings.append(f"{name.upper()}.csv not in the release: loaded empty")
                rows[name] = 0
            else:
                problems.append(Problem(f"{name.upper()}.csv", None, "file missing from release"))
            continue
        on_bytes = progress(path.name, path.stat().st_size) if progress else None
        before = len(problems)
        with wh.begin() as conn:
            batches = read_table(path, spec, problems=problems, on_bytes=on_bytes)
            rows[name] = wh.bulk_insert(conn, stage, name, batches)
        log.info(
            "staged %s: %d rows (%d problem(s))", path.name, rows[name], len(problems) - before
        )
    return rows


def _check_keys(wh: Warehouse, conn: sa.Connection, stage: str, problems: list[Problem]) -> None:
    for name, spec in vocabulary_tables().items():
        keys = key_columns(spec)
        if not keys:
            continue
        cols = ", ".join(wh.quote(k) for k in keys)
        sql = (
            f"SELECT {cols}, min({LINE_COLUMN}) AS first_line, max({LINE_COLUMN}) AS last_line,"
            f" count(*) AS n FROM {wh.qualified(stage, name)} GROUP BY {cols}"
            f" HAVING count(*) > 1 ORDER BY first_line LIMIT {_EXAMPLES}"
        )
        for row in conn.execute(sa.text(sql)).mappings():
            key = ", ".join(f"{k}={row[k]!r}" for k in keys)
            problems.append(
                Problem(
                    f"{name.upper()}.csv",
                    row["last_line"],
                    f"duplicate key ({key}): {row['n']} rows, first at line {row['first_line']}",
                )
            )


def _references(spec: TableSpec) -> list[tuple[str, str, str, bool]]:
    """(column, referenced table, referenced column, fatal) for vocabulary-internal FKs.

    A dangling reference is fatal when the column is part of the row's key or points at
    another vocabulary table (concept -> domain); a metadata concept id (a unit, a
    language, vocabulary_concept_id) that is missing is reported as a warning, since
    subsets of Athena commonly lack those concepts.
    """
    vocab = vocabulary_tables()
    keys = set(key_columns(spec))
    out = []
    for f in spec.fields:
        if f.fk_table in vocab and f.fk_field and not f.is_primary_key:
            in_key = f.name in keys and f.name not in METADATA_REFERENCES
            fatal = in_key or f.fk_table != "concept"
            out.append((f.name, f.fk_table, f.fk_field, fatal))
    return out


def _check_references(
    wh: Warehouse, conn: sa.Connection, stage: str, problems: list[Problem], warnings: list[str]
) -> None:
    for name, spec in vocabulary_tables().items():
        for col, ref_table, ref_col, fatal in _references(spec):
            src, ref = wh.qualified(stage, name), wh.qualified(stage, ref_table)
            c, rc = wh.quote(col), wh.quote(ref_col)
            dangling = (
                f"FROM {src} s WHERE s.{c} IS NOT NULL AND NOT EXISTS"
                f" (SELECT 1 FROM {ref} r WHERE r.{rc} = s.{c})"
            )
            n = conn.execute(sa.text(f"SELECT count(*) {dangling}")).scalar_one()
            if not n:
                continue
            sample = conn.execute(
                sa.text(f"SELECT s.{LINE_COLUMN}, s.{c} {dangling} ORDER BY 1 LIMIT {_EXAMPLES}")
            ).all()
            message = f"{col}: {n} row(s) reference a {ref_table}.{ref_col} not in the release"
            if fatal:
                problems.extend(
                    Problem(f"{name.upper()}.csv", line, f"{col} {value!r} not in {ref_table}")
                    for line, value in sample
                )
                problems.append(Problem(f"{name.upper()}.csv", None, message))
            else:
                warnings.append(f"{name.upper()}.csv {message} (e.g. {sample[0][1]})")


def _swap(wh: Warehouse, conn: sa.Connection, stage: str, schema: str) -> None:
    """Replace the published vocabulary tables by the staged ones, inside `conn`'s transaction."""
    target_md = build_metadata(schema, tables=list(vocabulary_tables()))
    for name, spec in vocabulary_tables().items():
        cols = ", ".join(wh.quote(c) for c in spec.column_names)
        table = target_md.tables[f"{schema}.{name}"]
        # Drop and recreate rather than DELETE: no dead tuples on PostgreSQL, and DuckDB
        # does not re-check deleted keys against the new rows within one transaction.
        table.drop(conn, checkfirst=True)
        table.create(conn)
        conn.execute(
            sa.text(
                f"INSERT INTO {wh.qualified(schema, name)} ({cols})"
                f" SELECT {cols} FROM {wh.qualified(stage, name)}"
            )
        )


def load_vocabulary(
    wh: Warehouse,
    release_dir: Path,
    schema: str | None = None,
    *,
    show_progress: bool = False,
) -> VocabularyLoadResult:
    """Load the Athena release in `release_dir` into `schema`, replacing what was there.

    Raises VocabularyError (naming file, line and problem) without touching the published
    vocabulary when the release is malformed.
    """
    return _load(wh, release_dir, schema or wh.default_schema, None, show_progress)


def staged_vocabulary_schema(schema: str) -> str:
    """Where `stage_vocabulary` keeps a checked release until it is swapped in."""
    return f"{schema}_vocab_next"


def stage_vocabulary(
    wh: Warehouse, release_dir: Path, schema: str | None = None
) -> VocabularyLoadResult:
    """Load and check a release into `staged_vocabulary_schema(schema)`, leaving `schema`'s
    vocabulary untouched: a build can be tried against it (`Schemas.vocab`), and
    `swap_staged_vocabulary` publishes it inside the caller's transaction."""
    schema = schema or wh.default_schema
    return _load(wh, release_dir, schema, staged_vocabulary_schema(schema), False)


def swap_staged_vocabulary(wh: Warehouse, conn: sa.Connection, schema: str) -> None:
    """Replace `schema`'s vocabulary tables by the staged release within `conn`'s
    transaction (drop the staged schema after the commit, `drop_staged_vocabulary`)."""
    _swap(wh, conn, staged_vocabulary_schema(schema), schema)


def drop_staged_vocabulary(wh: Warehouse, schema: str) -> None:
    with wh.begin() as conn:
        wh.drop_schema(conn, staged_vocabulary_schema(schema))
    with wh.begin() as conn:
        for name in vocabulary_tables():
            wh.analyze(conn, schema, name)


def _load(
    wh: Warehouse, release_dir: Path, schema: str, target: str | None, show_progress: bool
) -> VocabularyLoadResult:
    """Stage and check the release; swap it into `target` (default: `schema`)."""
    started = time.perf_counter()
    target = target or schema
    release_dir = Path(release_dir)
    if not release_dir.is_dir():
        raise VocabularyError([Problem(str(release_dir), None, "not a directory")])
    stage = staging_schema_name(schema)
    problems: list[Problem] = []
    warnings: list[str] = []

    progress_ctx = _progress() if show_progress else nullcontext(None)
    with progress_ctx as progress:
        with wh.begin() as conn:
            wh.drop_schema(conn, stage)
            wh.create_schema(conn, stage)
            wh.create_schema(conn, target)
            _staging_metadata(stage).create_all(conn)
        try:
            rows = _stage_files(wh, release_dir, stage, problems, warnings, progress)
            if not problems:
                with wh.begin() as conn:
                    _check_keys(wh, conn, stage, problems)
                    _check_references(wh, conn, stage, problems, warnings)
            if problems:
                raise VocabularyError(problems)
            with wh.begin() as conn:
                _swap(wh, conn, stage, target)
                version = _vocabulary_version(wh, conn, target)
            with wh.begin() as conn:
                for name in vocabulary_tables():
                    wh.analyze(conn, target, name)
        finally:
            with wh.begin() as conn:
                wh.drop_schema(conn, stage)
    for w in warnings:
        log.warning("vocabulary: %s", w)
    elapsed = time.perf_counter() - started
    log.info("vocabulary loaded into %s in %.1fs: %s", target, elapsed, rows)
    return VocabularyLoadResult(rows, warnings, elapsed, version)


def _vocabulary_version(wh: Warehouse, conn: sa.Connection, schema: str) -> str | None:
    """The release's version string, from the 'None' vocabulary row as Athena writes it."""
    return conn.execute(
        sa.text(
            f"SELECT vocabulary_version FROM {wh.qualified(schema, 'vocabulary')}"
            " WHERE vocabulary_id = 'None'"
        )
    ).scalar_one_or_none()


class _progress:
    """A rich progress bar with one task per file, advanced by bytes read."""

    def __enter__(self) -> Callable[[str, int], Callable[[int], None]]:
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
        )

        self._bar = Progress(
            TextColumn("{task.description:<28}"),
            BarColumn(),
            DownloadColumn(),
            TimeRemainingColumn(),
        )
        self._bar.__enter__()

        def start(name: str, size: int) -> Callable[[int], None]:
            task = self._bar.add_task(name, total=size)
            return lambda n: self._bar.advance(task, n)

        return start

    def __exit__(self, *exc: object) -> None:
        self._bar.__exit__(*exc)


__all__ = [
    "VocabularyError",
    "VocabularyLoadResult",
    "drop_staged_vocabulary",
    "load_vocabulary",
    "stage_vocabulary",
    "staged_vocabulary_schema",
    "swap_staged_vocabulary",
]
