"""Patient merges declared by an EHR feed: `person_merges.csv` in the feed's folder.

The hospital's master patient index sometimes finds that two patient ids are one person.
The EHR extract then carries a merge file, one line per merge, with the two source ids
(the same ids as the patient key column of the profile):

    merged,surviving
    <id that goes away>,<id that stays>

Each line becomes a `person_merge` record of the two keyed pseudonyms (never the ids);
the build moves every record of the merged id to the surviving person, tonight and on
every later night (etl/cdm/build/merges.py). A line without both ids, or merging an id
into itself, is quarantined with the reason.
"""

from __future__ import annotations

import logging
from pathlib import Path

import duckdb

from etl.pseudonym import duckdb_pseudonym_sql, install_duckdb_macro
from etl.sources.ehr import FileStats, RecordSink

log = logging.getLogger(__name__)

MERGE_FILE = "person_merges.csv"
RECORD_SET = "person_merges"
COLUMNS = ("merged", "surviving")


def extract_merges(feed: str, folder: Path, key: bytes, out: RecordSink) -> list[FileStats]:
    """Land the merges of `folder/person_merges.csv`, if the feed has one."""
    path = folder / MERGE_FILE
    if not path.is_file():
        return []
    stats = FileStats(RECORD_SET, MERGE_FILE)
    con = duckdb.connect()
    try:
        install_duckdb_macro(con, key)
        try:
            raw = con.read_csv(
                str(path), header=True, all_varchar=True, encoding="utf-8", strict_mode=False
            )
        except (duckdb.Error, UnicodeDecodeError) as exc:
            stats.message = f"{MERGE_FILE} cannot be read: {str(exc).splitlines()[0]}"
            log.error("%s/%s", feed, stats.message)
            return [stats]
        raw.create_view("raw")
        missing = [c for c in COLUMNS if c not in raw.columns]
        if missing:
            n = con.sql("SELECT count(*) FROM raw").fetchone()[0]
            stats.records_in = stats.quarantined = n
            stats.message = f"column(s) missing from the file: {', '.join(missing)}"
            out.write(
                "quarantine",
                con.sql(
                    f"SELECT '{RECORD_SET}' AS record_set, ? AS reason, ? AS feed,"
                    f" '{MERGE_FILE}' AS source_file,"
                    " CAST(row_number() OVER () + 1 AS BIGINT) AS source_line FROM raw",
                    params=[stats.message, feed],
                ).to_arrow_table(),
            )
            return [stats]
        checked = con.sql(
            """
            SELECT nullif(trim(merged), '') AS merged, nullif(trim(surviving), '') AS surviving,
                   CAST(row_number() OVER () + 1 AS BIGINT) AS source_line
            FROM raw
            """
        ).to_arrow_table()
        con.register("checked", checked)
        reasons = """
            CASE WHEN merged IS NULL THEN 'merged is empty'
                 WHEN surviving IS NULL THEN 'surviving is empty'
                 WHEN merged = surviving THEN 'a patient merged into itself' END
        """
        good = con.sql(
            f"SELECT {duckdb_pseudonym_sql('merged')} AS from_person_key,"
            f" {duckdb_pseudonym_sql('surviving')} AS into_person_key, ? AS feed,"
            f" '{MERGE_FILE}' AS source_file, source_line FROM checked WHERE {reasons} IS NULL"
            " ORDER BY source_line",
            params=[feed],
        ).to_arrow_table()
        bad = con.sql(
            f"SELECT '{RECORD_SET}' AS record_set, {reasons} AS reason, ? AS feed,"
            f" '{MERGE_FILE}' AS source_file, source_line FROM checked"
            f" WHERE {reasons} IS NOT NULL ORDER BY source_line",
            params=[feed],
        ).to_arrow_table()
    finally:
        con.close()
    out.write("person_merge", good)
    if bad.num_rows:
        out.write("quarantine", bad)
    stats.records_in = good.num_rows + bad.num_rows
    stats.extracted = good.num_rows
    stats.quarantined = bad.num_rows
    log.info("%s/%s: %d merge(s), %d quarantined", feed, MERGE_FILE, good.num_rows, bad.num_rows)
    return [stats]
