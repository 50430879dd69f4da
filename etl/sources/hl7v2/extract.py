"""The lab feed: a folder of HL7 v2 files (ORU^R01 results) -> canonical lab events.

Files are framed into messages (framing.py); the plain messages of about 8 MiB of files
are read together in DuckDB (bulk.py), any other message one by one (message.py, hl7apy);
both give the same rows, spooled to one Parquet file of the feed's results in file and
line order. Everything after is set-based over that spool: the status rules in DuckDB
over a narrow table of each result's identity, order and status (a correction replaces,
a cancellation removes, a preliminary result counts only while no final one exists), so
a correction in tomorrow's file still wins over today's; then the kept results read back
batch by batch in the spool's order, their keys pseudonymised (repeated ids once per
distinct value), as events.

Accounting per file: records_in = OBX (results) and SPM (specimens) segments + 1 for each
message with neither (or rejected with none); each ends as an event, a quarantine row
(reason, file, record number) or a named filter (FileStats.filtered).
"""

from __future__ import annotations

import logging
import multiprocessing
import tempfile
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from etl import canonical
from etl.config import FeedConfig
from etl.pseudonym import duckdb_pseudonym_sql as pseudo
from etl.pseudonym import install_duckdb_macro, repeated_pseudonyms
from etl.sources.ehr import FileStats, RecordSink
from etl.sources.hl7v2.bulk import PlainRows, read_plain
from etl.sources.hl7v2.framing import RawMessage, split_messages
from etl.sources.hl7v2.message import parse
from etl.sources.processes import MOST, worker_processes
from etl.sql_text import sql_literal

log = logging.getLogger(__name__)

RECORD_SET = "lab_results"
SPECIMEN_SET = "lab_specimens"  # record set of the SPM specimen events
LAB_TYPE_CONCEPT = 32856  # Lab
SUFFIXES = {".hl7", ".txt", ".msg", ".er7", ".oru"}  # files read as HL7
CANCELLED = ("X", "D", "W")  # cancelled, deleted, posted as wrong: the result goes
GENDER_VOCABULARY = "HL7_SEX"  # mappings/local/hl7v2.csv
WORKERS_ENV = "OMOP_ETL_HL7_WORKERS"  # processes parsing files (default: by feed size)
PARALLEL_BYTES = 8 * 2**20  # a feed this large is parsed in several processes
CHUNK_BYTES = 8 * 2**20  # files read together: one bulk read (bulk.py) per chunk

RESULT = pa.schema(
    [
        ("file_idx", pa.int32()),
        ("source_file", pa.string()),
        ("source_line", pa.int64()),
        ("message", pa.int32()),  # position of the message in its file
        ("kind", pa.string()),  # result (OBX) | specimen (SPM)
        ("msg_ts", pa.timestamp("us")),
        ("status", pa.string()),
        ("patient_id", pa.string()),  # clear identifier: only in memory, pseudonymised in SQL
        ("visit_id", pa.string()),
        ("birth_datetime", pa.timestamp("us")),
        ("gender_code", pa.string()),
        ("order_id", pa.string()),
        ("code", pa.string()),
        ("vocabulary_id", pa.string()),
        ("sub_id", pa.string()),
        ("start_datetime", pa.timestamp("us")),
        ("value_as_number", pa.float64()),
        ("value_as_string", pa.string()),
        ("value_code", pa.string()),
        ("value_vocabulary", pa.string()),
        ("unit_code", pa.string()),
        ("unit_vocabulary", pa.string()),
        ("range_low", pa.float64()),
        ("range_high", pa.float64()),
        ("operator", pa.string()),
        ("qualifier", pa.string()),
        ("prior_patient_id", pa.string()),  # ADT^A40: the id merged into patient_id
    ]
)


def input_files(root: Path) -> list[Path]:
    """The files of a feed folder read as HL7, sorted (hidden and temporary files skipped)."""
    if root.is_file():
        return [root]
    return sorted(
        p
        for p in root.rglob("*")
        if p.is_file()
        and not any(part.startswith(".") for part in p.relative_to(root).parts)
        and p.suffix.lower() in SUFFIXES
    )


class _FileReader:
    """Parses one file: result rows (Arrow), quarantine rows, and its FileStats."""

    def __init__(self, feed: str, idx: int, rel: str):
        self.feed, self.idx, self.rel = feed, idx, rel
        self.stats = FileStats(RECORD_SET, rel)
        self.rows: list[dict[str, Any]] = []
        self.bad_lines: list[int] = []
        self.bad_reasons: list[str] = []
        self.notes: set[str] = set()
        self.line = 0

    def quarantine(self, n: int, reason: str) -> None:
        for _ in range(n):
            self.line += 1
            self.bad_lines.append(self.line)
            self.bad_reasons.append(reason)
        self.stats.records_in += n
        self.stats.quarantined += n

    def filter(self, n: int, rule: str) -> None:
        self.line += n
        self.stats.records_in += n
        self.stats.filtered[rule] = self.stats.filtered.get(rule, 0) + n

    def read(self, messages: list[RawMessage], plain: dict[int, int]) -> dict[int, int]:
        """Account for every message; parse those not in `plain` (message number -> its
        rows, read by bulk.py). Returns the line before each plain message's first row."""
        before: dict[int, int] = {}
        for raw in messages:
            n = plain.get(raw.number)
            if n is not None:
                before[raw.number] = self.line
                self.line += n
                self.stats.records_in += n
                continue
            parsed = parse(raw)
            for note in (raw.note, parsed.note):
                if note:
                    self.notes.add(note)
            if parsed.error:
                self.quarantine(max(1, raw.record_count), f"message {raw.number}: {parsed.error}")
            elif parsed.filtered:
                self.filter(max(1, raw.record_count), parsed.filtered)
            elif not parsed.rows:
                self.filter(1, "message_without_results")
            for row in parsed.rows:
                reason = row.pop("reason", None)
                if reason:
                    self.quarantine(1, reason)
                    continue
                self.line += 1
                self.stats.records_in += 1
                row.update(
                    file_idx=self.idx,
                    source_file=self.rel,
                    source_line=self.line,
                    message=raw.number,
                )
                self.rows.append(row)
        if self.notes:
            self.stats.message = "; ".join(sorted(self.notes))
        return before

    def table(self, plain: pa.Table | None, before: dict[int, int]) -> pa.Table:
        """The file's result rows in file order: those parsed here and `plain`'s (the
        rows of this file's plain messages, numbered by `before`)."""
        parsed = pa.Table.from_pylist(self.rows, schema=RESULT)
        if plain is None or not before:
            return parsed
        numbers = plain["message"].to_numpy()
        offsets = np.zeros(max(before) + 1, np.int64)
        offsets[list(before)] = list(before.values())
        lines = offsets[numbers] + plain["ordinal"].to_numpy()
        n = plain.num_rows
        columns = {
            "file_idx": pa.repeat(pa.scalar(self.idx, pa.int32()), n),
            "source_file": pa.repeat(pa.scalar(self.rel, pa.string()), n),
            "source_line": pa.array(lines, pa.int64()),
        }
        bulk = pa.table(
            [columns[f.name] if f.name in columns else plain[f.name] for f in RESULT],
            schema=RESULT,
        )
        return pa.concat_tables([parsed, bulk]).sort_by("source_line")

    def fail(self, reason: str) -> None:
        """An unexpected error: the whole file is quarantined (one record per message)."""
        self.rows, self.bad_lines, self.bad_reasons, self.line = [], [], [], 0
        self.stats = FileStats(RECORD_SET, self.rel, message=reason)
        self.quarantine(1, reason)

    def quarantine_table(self) -> pa.Table:
        n = len(self.bad_lines)
        return pa.table(
            {
                "record_set": pa.repeat(RECORD_SET, n),
                "reason": pa.array(self.bad_reasons, pa.string()),
                "feed": pa.repeat(self.feed, n),
                "source_file": pa.repeat(self.rel, n),
                "source_line": pa.array(self.bad_lines, pa.int64()),
            },
            schema=canonical.QUARANTINE,
        )


def read_files(
    feed: str, jobs: Sequence[tuple[int, str, Path]]
) -> list[tuple[FileStats, pa.Table, pa.Table]]:
    """Parse files (index, relative name, path): for each, its stats, result rows (RESULT)
    and quarantine rows. Their plain messages are read together, set-based (bulk.py), the
    others one by one (message.py). Never raises."""
    readers: list[_FileReader] = []
    framed: list[list[RawMessage]] = []
    for idx, rel, path in jobs:
        reader = _FileReader(feed, idx, rel)
        messages: list[RawMessage] = []
        try:
            data = path.read_bytes()
            if data.strip():
                messages = split_messages(data)
            else:
                reader.stats.message = "empty file"
        except Exception as exc:  # one bad file never stops the run
            reader.fail(f"file cannot be read: {type(exc).__name__}: {exc}")
        readers.append(reader)
        framed.append(messages)
    plain = _read_plain(feed, framed)
    counts: list[dict[int, int]] = [{} for _ in jobs]
    for (file, number), n in plain.counts.items():
        counts[file][number] = n
    out = []
    for i, (reader, messages) in enumerate(zip(readers, framed, strict=True)):
        try:
            before = reader.read(messages, counts[i])
            mine = plain.table.filter(pc.equal(plain.table["file"], i)) if before else None
            table = reader.table(mine, before)
        except Exception as exc:  # one bad file never stops the run
            reader.fail(f"file cannot be read: {type(exc).__name__}: {exc}")
            table = RESULT.empty_table()
        out.append((reader.stats, table, reader.quarantine_table()))
    return out


def _read_plain(feed: str, framed: list[list[RawMessage]]) -> PlainRows:
    """The plain messages' rows (bulk.py); none when the bulk reader fails, so that every
    message is parsed one by one (the same rows, more slowly) rather than lost."""
    try:
        return read_plain(framed)
    except Exception as exc:  # its text may quote a field (a patient id): never logged
        log.warning(
            "%s: bulk reading failed (%s); parsing every message one by one",
            feed,
            type(exc).__name__,
        )
        return PlainRows({}, pa.table({}))


def _chunks(jobs: list[tuple[str, int, str, Path]]) -> list[list[tuple[int, str, Path]]]:
    """Consecutive files in groups of about CHUNK_BYTES: one bulk read per group."""
    chunks: list[list[tuple[int, str, Path]]] = []
    size = CHUNK_BYTES
    for _, idx, rel, path in jobs:
        if size >= CHUNK_BYTES:
            chunks.append([])
            size = 0
        chunks[-1].append((idx, rel, path))
        size += path.stat().st_size
    return chunks


def _workers(paths: list[Path], cores: int | None = None) -> int:
    """Processes to parse with (`processes.worker_processes`): OMOP_ETL_HL7_WORKERS, else
    up to 4 (and one a file) for a feed of `PARALLEL_BYTES` or more, no more than its
    `cores`. Beside another feed on 2 vCPUs, two parsing processes took 36-44% more CPU for
    the same work than alone (bench/HISTORY.md, thirty-fifth session)."""
    return worker_processes(
        WORKERS_ENV,
        large=lambda: len(paths) > 1 and sum(p.stat().st_size for p in paths) >= PARALLEL_BYTES,
        cores=cores,
        most=min(MOST, len(paths)),
    )


def _read_all(
    feed: str, root: Path, paths: list[Path], cores: int | None = None
) -> Iterator[tuple[FileStats, pa.Table, pa.Table]]:
    """Every file parsed, in file order; in worker processes when the feed is large
    (reading is the cost; the result does not depend on the number of workers or chunks)."""
    jobs = [
        (feed, idx, p.relative_to(root).as_posix() if p != root else p.name, p)
        for idx, p in enumerate(paths)
    ]
    workers = _workers(paths, cores)
    chunks = _chunks(jobs)
    if workers > 1:
        log.info("%s: parsing %d file(s) in %d processes", feed, len(jobs), workers)
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
            for results in pool.map(read_files, [feed] * len(chunks), chunks):
                yield from results
        return
    for chunk in chunks:
        yield from read_files(feed, chunk)


def extract_hl7(
    feed: FeedConfig,
    key: bytes,
    sink: RecordSink,
    duckdb_config: dict[str, str] | None = None,
    *,
    cores: int | None = None,
) -> list[FileStats]:
    """Read every HL7 file of the feed folder into `sink`; per-file accounting; parsed
    in up to `cores` processes (`_workers`).

    Parsed results are spooled to a Parquet file, not held in memory, and the status
    rules run in DuckDB over it with `duckdb_config` (the site's memory_limit, threads,
    temp_directory), so memory stays bounded whatever the feed's size.
    """
    root = Path(feed.path)
    files: list[FileStats] = []
    if not root.exists():
        log.error("%s: %s does not exist", feed.name, root)
        return files
    config = dict(duckdb_config or {})
    if config.get("temp_directory"):
        Path(config["temp_directory"]).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="hl7-", dir=config.get("temp_directory")) as tmp:
        spool = Path(tmp) / "results.parquet"
        with pq.ParquetWriter(spool, RESULT) as writer:
            for stats, table, quarantine in _read_all(feed.name, root, input_files(root), cores):
                writer.write_table(table)
                if quarantine.num_rows:
                    sink.write("quarantine", quarantine)
                files.append(stats)
        config.setdefault("temp_directory", str(Path(tmp) / "spill"))
        _resolve(feed, key, spool, files, sink, config)
    for st in files:
        log.log(
            logging.WARNING if st.message else logging.INFO,
            "%s/%s: %d record(s), %d quarantined, %d filtered%s",
            feed.name,
            st.file,
            st.records_in,
            st.quarantined,
            sum(st.filtered.values()),
            f" ({st.message})" if st.message else "",
        )
    return files


_SET = f"CASE kind WHEN 'specimen' THEN '{SPECIMEN_SET}' ELSE '{RECORD_SET}' END"
# a result's identity: its record set, order, code and sub-id (NULL without an order or a
# code: such results form one group for the status rules); its event key is its pseudonym
_RESULT_KEY = f"{_SET} || '|' || order_id || '|' || code || '|' || coalesce(sub_id, '')"
_NOT_MERGE = "kind IS DISTINCT FROM 'merge'"  # a row without a kind stays a result
# What the status rules need of every result, narrow: its row in the spool (`rid`), where
# it came from, its message's order and status, and its identity as text (two results
# share a pseudonym exactly when they share the text: the rules group the text, and only
# the few cancellations written as deletions are hashed here). The results' other
# columns stay in the spool, which the events are read from in file order
# (`_write_events`).
_KEYED = f"""
    SELECT file_row_number AS rid, file_idx, source_file, source_line, message, msg_ts,
           status, {_RESULT_KEY} AS result_key
    FROM spool WHERE {_NOT_MERGE}
"""

# The status rules, set-based over messages (results with the same key in one message
# are distinct records; a later message about the same key replaces them): a
# cancellation removes every result of its key up to and including its message; of the
# rest, the latest message with a final result (F, C corrected, U, or no status) wins,
# or the latest message at all while no final exists (a preliminary result). Order of
# messages: MSH-7, then file order.
#
# Only the results whose key repeats (corrections, cancellations, a preliminary result
# and its final; rows without a key, which form one partition) need the windows: a key
# seen once is kept unless its result is itself a cancellation. So the windows and the
# ordering of messages run over those rows alone, narrow (row id, key, status, order),
# not over every result with all its columns (at a million patients, 9.3 M results
# sorted and partitioned in full).
_REPEATED_RULES = f"""
    WITH repeated AS (SELECT result_key FROM keyed GROUP BY result_key HAVING count(*) > 1),
    r AS (
        SELECT k.rid, k.result_key, k.status,
               coalesce(k.status IN ('F', 'C', 'U'), TRUE) AS final,
               dense_rank() OVER (ORDER BY k.msg_ts NULLS FIRST, k.file_idx, k.message)
                   AS mpos
        FROM keyed k JOIN repeated ON repeated.result_key IS NOT DISTINCT FROM k.result_key
    ),
    c AS (
        SELECT *, CASE WHEN mpos <= max(CASE WHEN status IN {CANCELLED} THEN mpos END)
                       OVER (PARTITION BY result_key) THEN 'result_cancelled' END AS cancelled
        FROM r
    ),
    w AS (
        SELECT *,
               max(CASE WHEN cancelled IS NULL AND final THEN mpos END)
                   OVER (PARTITION BY result_key) AS last_final,
               max(CASE WHEN cancelled IS NULL THEN mpos END)
                   OVER (PARTITION BY result_key) AS last_any
        FROM c
    )
    SELECT rid, coalesce(cancelled, CASE
               WHEN last_final IS NOT NULL AND (NOT final OR mpos <> last_final)
                   THEN 'result_superseded'
               WHEN last_final IS NULL AND mpos <> last_any THEN 'result_superseded'
           END) AS rule
    FROM w
"""
# Every result with its rule (NULL: kept); a key seen once only by its own status.
_RESOLVED = f"""
    SELECT k.*, CASE WHEN rr.rid IS NOT NULL THEN rr.rule
                     WHEN k.status IN {CANCELLED} THEN 'result_cancelled' END AS rule
    FROM keyed k LEFT JOIN repeated_rules rr ON rr.rid = k.rid
"""

# A batch of kept results as events (a single-table SELECT: the batch's order is kept);
# `person_key` and `visit_key` are already the pseudonyms of its patient and visit ids.
_EVENTS = f"""
    SELECT {pseudo(_RESULT_KEY)} AS event_key, {_SET} AS record_set, person_key, visit_key, code,
           vocabulary_id,
           CASE kind WHEN 'specimen' THEN 'Specimen' ELSE 'Measurement' END
               AS default_domain,
           coalesce(kind = 'specimen', false) AS keep_domain,
           CAST({{type_concept}} AS INTEGER) AS type_concept_id, start_datetime,
           CAST(NULL AS TIMESTAMP) AS end_datetime, value_as_number, value_as_string,
           value_code, value_vocabulary, unit_code, unit_vocabulary, range_low, range_high,
           operator, qualifier, CAST(NULL AS DOUBLE) AS quantity,
           CAST(NULL AS VARCHAR) AS device_identifier, CAST(NULL AS VARCHAR) AS provider_key,
           '{{feed}}' AS feed, source_file, source_line
    FROM kept_batch
"""

_MERGES = f"""
    SELECT {pseudo("prior_patient_id")} AS from_person_key,
           {pseudo("patient_id")} AS into_person_key,
           '{{feed}}' AS feed, source_file, source_line
    FROM merges ORDER BY file_idx, source_line
"""

_CANCELLATIONS = f"""
    SELECT 'event' AS shape, {pseudo("result_key")} AS record_key, '{{feed}}' AS feed, source_file,
           source_line
    FROM resolved WHERE rule = 'result_cancelled' AND status IN {CANCELLED}
    ORDER BY file_idx, source_line
"""

# a patient without a valid PID-7 is not created (OMOP requires a year of birth): its
# results stay unknown_person. Grouped by the patient's id, then hashed: one HMAC a group.
_DERIVED = f"""
    SELECT {pseudo("patient_id")} AS person_key, birth_datetime,
           CAST(NULL AS TIMESTAMP) AS death_datetime, gender_code,
           CASE WHEN gender_code IS NOT NULL THEN '{{gender_vocabulary}}' END
               AS gender_vocabulary,
           NULL AS race_code, NULL AS race_vocabulary, NULL AS ethnicity_code,
           NULL AS ethnicity_vocabulary, NULL AS state, NULL AS zip3, NULL AS care_site_key,
           NULL AS provider_key, '{{feed}}' AS feed, source_file, source_line
    FROM (
        SELECT file_idx, source_file, patient_id,
               arg_min(birth_datetime, source_line) AS birth_datetime,
               arg_min(gender_code, source_line) AS gender_code,
               min(source_line) AS source_line
        FROM spool
        WHERE {_NOT_MERGE} AND birth_datetime IS NOT NULL
        GROUP BY file_idx, source_file, patient_id
    )
    ORDER BY file_idx, source_line
"""


_BATCH_ROWS = 500_000


# the spool's columns an event is made of (the rest serve the status rules)
_EVENT_SOURCE = [
    "kind", "patient_id", "visit_id", "order_id", "code", "vocabulary_id", "sub_id",
    "start_datetime", "value_as_number", "value_as_string", "value_code",
    "value_vocabulary", "unit_code", "unit_vocabulary", "range_low", "range_high",
    "operator", "qualifier", "source_file", "source_line",
]  # fmt: skip


def _write_events(
    con: duckdb.DuckDBPyConnection,
    spool: Path,
    set_aside: np.ndarray,
    events_sql: str,
    sink: RecordSink,
) -> None:
    """The spool's results that are neither merges nor `set_aside` (their row numbers,
    sorted), as events, in the spool's order, `_BATCH_ROWS` at a time: the feed's events
    are never all in memory. The spool holds the files' results in file order and each
    file's in line order (`_FileReader.table`), so the events land in (file, line) order
    without a sort. A batch's patient and visit ids are hashed once per distinct id;
    `events_sql` reads the batch (`kept_batch`) with a single-table SELECT, which keeps
    its order."""
    first = 0
    for batch in pq.ParquetFile(spool).iter_batches(_BATCH_ROWS, columns=_EVENT_SOURCE):
        rows = np.arange(first, first + batch.num_rows)
        first += batch.num_rows
        kept = pc.and_(
            pc.fill_null(pc.not_equal(batch["kind"], "merge"), True),
            pa.array(~np.isin(rows, set_aside, assume_unique=True)),
        )
        results = pa.Table.from_batches([batch])
        if not pc.all(kept).as_py():  # nearly always all kept: no copy then
            results = results.filter(kept)
        if not results.num_rows:
            continue
        results = results.append_column(
            "person_key", repeated_pseudonyms(con, results["patient_id"])
        ).append_column("visit_key", repeated_pseudonyms(con, results["visit_id"]))
        clear = ["patient_id", "visit_id"]  # hashed above: not read again
        con.register("kept_batch", results.drop_columns(clear))
        try:
            events = con.sql(events_sql).to_arrow_table()
        finally:
            con.unregister("kept_batch")
        sink.write("event", events.cast(canonical.EVENT))


def _resolve(
    feed: FeedConfig,
    key: bytes,
    spool: Path,
    files: list[FileStats],
    sink: RecordSink,
    config: dict[str, str],
) -> None:
    """Pseudonymise, apply the status rules, write events (and derived persons).

    The rules run over a narrow table of every result's key, order and status; the events
    are then read from the spool batch by batch in file order, without the results the
    rules set aside (at a million patients, keying a copy of all 9.3 M results with every
    column, 14.6 CPU s, then sorting the kept ones back into file order, about 10, were
    most of the 25-30 CPU s this took; now 18.2 CPU s)."""
    con = duckdb.connect(config=config)
    try:
        install_duckdb_macro(con, key)
        con.execute(
            f"CREATE TEMP VIEW spool AS SELECT * FROM read_parquet({sql_literal(spool)},"
            " file_row_number = true)"
        )
        con.execute("CREATE TEMP TABLE merges AS SELECT * FROM spool WHERE kind = 'merge'")
        con.execute(f"CREATE TEMP TABLE keyed AS {_KEYED}")
        con.execute(f"CREATE TEMP TABLE repeated_rules AS {_REPEATED_RULES}")
        con.execute(f"CREATE TEMP VIEW resolved AS {_RESOLVED}")
        for file_idx, n in con.execute(
            "SELECT file_idx, count(*) FROM merges GROUP BY ALL ORDER BY ALL"
        ).fetchall():
            files[file_idx].extracted += n
        for file_idx, rule, n in con.execute(
            "SELECT file_idx, rule, count(*) FROM resolved GROUP BY ALL ORDER BY ALL"
        ).fetchall():
            if rule is None:
                files[file_idx].extracted = n
            else:
                st = files[file_idx].filtered
                st[rule] = st.get(rule, 0) + n
        # the feed name is a config identifier ([a-z][a-z0-9_]*): safe as a literal
        params = {
            "feed": feed.name,
            "type_concept": LAB_TYPE_CONCEPT,
            "gender_vocabulary": GENDER_VOCABULARY,
        }
        set_aside = con.sql("SELECT rid FROM resolved WHERE rule IS NOT NULL ORDER BY rid")
        _write_events(con, spool, set_aside.fetchnumpy()["rid"], _EVENTS.format(**params), sink)
        merges = con.sql(_MERGES.format(**params)).to_arrow_table()
        sink.write("person_merge", merges.cast(canonical.PERSON_MERGE))
        # a cancellation withdraws its result: in a delta feed, from the state as well
        deletions = con.sql(_CANCELLATIONS.format(**params)).to_arrow_table()
        sink.write("deletion", deletions.cast(canonical.DELETION))
        if feed.unknown_patient == "create":
            persons = con.sql(_DERIVED.format(**params)).to_arrow_table()
            sink.write("derived_person", persons.cast(canonical.PERSON))
    finally:
        con.close()
