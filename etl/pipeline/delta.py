"""Delta deliveries: tonight's new, changed and withdrawn records applied to a feed's state.

A feed configured with `delivery: delta` sends only what changed since the last delivery.
Its state is what the last *published* run landed for it (every run lands a delta feed's
whole state, so that run folder holds it). Tonight's landing is that state with, shape by
shape and set-based in DuckDB over the Parquet files:

- every delivered record replacing the state's record(s) of the same key
  (`canonical.RECORD_KEYS`), or added when the key is new;
- every withdrawn key (`deletion` records: an EHR delivery's `deleted/` rows, a cancelled
  lab result) removing the state's record(s) of that key;
- every other record of the state carried over unchanged.

Tonight's records get their source file prefixed with the run id (`RUN_ID/conditions.csv`),
so the lineage of a carried-over record still names the delivery it came in.

The patients tonight touched (the patient keys of delivered records, of the state's
records they replace or withdraw, of both sides of a merge, and of the claims whose lines
changed) go to `touched_persons.parquet` beside the state; records of no patient (care
sites, providers, payers) that changed are counted in `reference_touched`. The build
rebuilds only those patients when it can (etl/pipeline/scope.py); either way the result
equals a rebuild from a snapshot of the same state (tests/test_delta_loads.py).
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from etl import canonical
from etl.json_text import readable
from etl.pipeline.land import landing_writer
from etl.sources.ehr import FileStats
from etl.sql_text import sql_literal

log = logging.getLogger(__name__)

DELETED_RULE = "deleted_at_source"
TOUCHED_PERSONS = "touched_persons.parquet"
# shapes whose records belong to one patient, by that patient's key column(s)
PERSON_COLUMNS = {
    shape: ("person_key",)
    for shape, schema in canonical.SHAPES.items()
    if "person_key" in schema.names
}
PERSON_COLUMNS["person_merge"] = ("from_person_key", "into_person_key")
# shapes of look-up records (no patient): a change to one affects every patient's rows
REFERENCE_SHAPES = ("care_site", "provider", "payer")


@dataclass
class DeltaSummary:
    """What a delta delivery did to the state, per shape (rows)."""

    base_run: str | None
    delivered: dict[str, int] = field(default_factory=dict)
    replaced: dict[str, int] = field(default_factory=dict)
    deleted: dict[str, int] = field(default_factory=dict)
    carried: dict[str, int] = field(default_factory=dict)
    persons_touched: int = 0
    reference_touched: dict[str, int] = field(default_factory=dict)

    def as_json(self) -> dict:
        return asdict(self)


class DeletionSink:
    """Receives the extraction of a delivery's withdrawn rows (`deleted/`): each record
    becomes a `deletion` of its key; quarantined rows stay quarantined, under `prefix`."""

    def __init__(self, landing, prefix: str) -> None:
        self.landing = landing
        self.prefix = prefix

    def _prefixed(self, table: pa.Table) -> pa.Table:
        i = table.schema.get_field_index("source_file")
        return table.set_column(
            i, "source_file", pc.binary_join_element_wise(self.prefix, table["source_file"], "")
        )

    def write(self, shape: str, table: pa.Table) -> None:
        if shape == "quarantine":
            self.landing.write("quarantine", self._prefixed(table))
            return
        key = canonical.RECORD_KEYS.get(shape)
        if key is None or shape == "person_merge" or table.num_rows == 0:
            return
        n = table.num_rows
        deletions = pa.table(
            {
                "shape": pa.repeat(shape, n),
                "record_key": table[key],
                "feed": table["feed"],
                "source_file": self._prefixed(table)["source_file"],
                "source_line": table["source_line"],
            }
        )
        self.landing.write("deletion", deletions)

    def account(self, files: list[FileStats]) -> list[FileStats]:
        """The deletion files' accounting: what was not quarantined or excluded is
        filtered by the rule `deleted_at_source` (it removed, or found nothing to remove)."""
        out = []
        for st in files:
            applied = st.records_in - st.quarantined - sum(st.filtered.values())
            filtered = dict(st.filtered)
            if applied:
                filtered[DELETED_RULE] = applied
            out.append(
                FileStats(
                    record_set=st.record_set,
                    file=self.prefix + st.file,
                    records_in=st.records_in,
                    quarantined=st.quarantined,
                    extracted=st.extracted,
                    message=st.message,
                    filtered=filtered,
                )
            )
        return out


def _rewrite(src: Path, dst: Path, shape: str, prefix: str | None = None) -> None:
    """Stream `src` into `dst` batch by batch with the shape's canonical schema (DuckDB
    writes every column nullable), prefixing source_file when `prefix` is given."""
    schema = canonical.SHAPES[shape]
    with landing_writer(dst, shape) as writer:
        for batch in pq.ParquetFile(src).iter_batches(batch_size=256_000):
            table = pa.Table.from_batches([batch])
            if prefix is not None:
                i = table.schema.get_field_index("source_file")
                files = pc.binary_join_element_wise(prefix, table["source_file"], "")
                table = table.set_column(i, "source_file", files)
            writer.write_table(table.select(schema.names).cast(schema))


def prefix_source_files(delivery_dir: Path, prefix: str) -> list[FileStats]:
    """Prefix every record's source_file (and files.json) in a landed delivery in place."""
    for shape in canonical.SHAPES:
        path = delivery_dir / f"{shape}.parquet"
        tmp = path.with_suffix(".prefixed.parquet")
        _rewrite(path, tmp, shape, prefix + "/")
        tmp.replace(path)
    stats = json.loads((delivery_dir / "files.json").read_text(encoding="utf-8"))
    for st in stats:
        st["file"] = f"{prefix}/{st['file']}"
    (delivery_dir / "files.json").write_text(readable(stats, 2), encoding="utf-8")
    return [FileStats(**s) for s in stats]


def consolidate(
    base_dir: Path | None, delivery_dir: Path, out_dir: Path, base_run: str | None
) -> DeltaSummary:
    """Write the feed's new state to `out_dir`: `base_dir` (the last published state, None
    for the first delivery) with `delivery_dir` applied. Quarantine, deletions and merges
    of the delivery are landed as they are (they are tonight's records)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = DeltaSummary(base_run)
    con = duckdb.connect()
    try:
        con.execute(
            f"CREATE TEMP TABLE withdrawn AS SELECT DISTINCT shape, record_key"
            f" FROM read_parquet({sql_literal(delivery_dir / 'deletion.parquet')})"
        )
        con.execute("CREATE TEMP TABLE touched_person (person_key VARCHAR)")
        con.execute("CREATE TEMP TABLE touched_claim (claim_key VARCHAR)")
        for shape in canonical.SHAPES:
            target = out_dir / f"{shape}.parquet"
            delivered = delivery_dir / f"{shape}.parquet"
            base = base_dir / f"{shape}.parquet" if base_dir is not None else None
            key = canonical.RECORD_KEYS.get(shape)
            summary.delivered[shape] = pq.ParquetFile(delivered).metadata.num_rows
            _touch(con, shape, f"read_parquet({sql_literal(delivered)})")
            if key is None or base is None or not base.is_file():
                shutil.copyfile(delivered, target)
                if shape in REFERENCE_SHAPES and summary.delivered[shape]:
                    summary.reference_touched[shape] = summary.delivered[shape]
                continue
            # the keys tonight touches (delivery-sized): replaced, or only withdrawn
            con.execute(
                f"""
                CREATE OR REPLACE TEMP TABLE touched AS
                SELECT k, bool_or(replaced) AS replaced FROM (
                    SELECT {key} AS k, TRUE AS replaced FROM read_parquet({sql_literal(delivered)})
                    UNION ALL
                    SELECT record_key, FALSE FROM withdrawn WHERE shape = '{shape}'
                ) GROUP BY k
                """
            )
            # the state is only streamed: its key column for the counts, then every row
            # not touched straight into tonight's file (no copy of it is held)
            replaced, deleted, carried = con.execute(
                f"SELECT count(*) FILTER (WHERE t.replaced),"
                f" count(*) FILTER (WHERE NOT t.replaced), count(*) FILTER (WHERE t.k IS NULL)"
                f" FROM read_parquet({sql_literal(base)}) b LEFT JOIN touched t ON t.k = b.{key}"
            ).fetchone()
            summary.replaced[shape], summary.deleted[shape] = replaced, deleted
            summary.carried[shape] = carried
            touched_rows = summary.delivered[shape] + replaced + deleted
            if shape in REFERENCE_SHAPES and touched_rows:
                summary.reference_touched[shape] = touched_rows
            _touch(
                con,
                shape,
                f"(SELECT b.* FROM read_parquet({sql_literal(base)}) b"
                f" JOIN touched t ON t.k = b.{key})",
            )
            con.execute(
                f"""
                COPY (
                    SELECT b.* FROM read_parquet({sql_literal(base)}) b
                    WHERE NOT EXISTS (SELECT 1 FROM touched t WHERE t.k = b.{key})
                    UNION ALL BY NAME
                    SELECT * FROM read_parquet({sql_literal(delivered)})
                ) TO {sql_literal(target)} (FORMAT parquet, COMPRESSION zstd)
                """
            )
        # a changed claim line touches its claim's patient (the claim: in the state or new)
        claims = [
            f"SELECT claim_key, person_key FROM read_parquet({sql_literal(p)})"
            for p in (out_dir / "claim.parquet", base_dir and base_dir / "claim.parquet")
            if p is not None and p.is_file()
        ]
        con.execute(
            "INSERT INTO touched_person SELECT c.person_key FROM ("
            + " UNION ALL ".join(claims)
            + ") c WHERE c.claim_key IN (SELECT claim_key FROM touched_claim)"
        )
        summary.persons_touched = con.execute(
            "SELECT count(DISTINCT person_key) FROM touched_person"
        ).fetchone()[0]
        con.execute(
            "COPY (SELECT DISTINCT person_key FROM touched_person WHERE person_key IS NOT NULL"
            f" ORDER BY 1) TO {sql_literal(out_dir / TOUCHED_PERSONS)} (FORMAT parquet)"
        )
    finally:
        con.close()
    shutil.copyfile(delivery_dir / "files.json", out_dir / "files.json")
    log.info(
        "delta applied to the state of run %s: %d delivered, %d replaced, %d deleted,"
        " %d carried over; %d patient(s) touched",
        base_run or "(none: first delivery)",
        sum(summary.delivered.values()),
        sum(summary.replaced.values()),
        sum(summary.deleted.values()),
        sum(summary.carried.values()),
        summary.persons_touched,
    )
    return summary


def _touch(con: duckdb.DuckDBPyConnection, shape: str, rows_sql: str) -> None:
    """Record the patients (or, for claim lines, the claims) of `rows_sql`'s records."""
    if shape == "cost_line":
        con.execute(f"INSERT INTO touched_claim SELECT claim_key FROM {rows_sql}")
    for column in PERSON_COLUMNS.get(shape, ()):
        con.execute(f"INSERT INTO touched_person SELECT {column} FROM {rows_sql}")
