"""Plain ORU messages read set-based: DuckDB queries over a group of files' messages.

A nightly lab feed is nearly all alike messages: the standard separators, no escape
sequences, ASCII text, dates and numbers in their plain forms. Those messages are read
here, a group of files' at once, in SQL (segments, fields and components split, the PID,
PV1 and OBR of each OBX and SPM found by a window, each distinct datetime parsed once);
`message.parse` reads every other message, field by field in Python. The SQL gives exactly
what `parse` gives: a message is read here only when nothing in it could make `parse`
differ, which the queries check first:

- the message starts `MSH|^~\\&|`, holds only printable ASCII (so trimming is Python's
  strip) and no escape character after MSH-2 (so nothing needs unescaping);
- its version (MSH-12) is one hl7apy supports, and its structure (MSH-2 and every segment
  name) passes hl7apy's check, once per distinct structure;
- it is an ORU with at least one OBX or SPM, and none of them would be quarantined or
  read differently: a patient identifier, a code, a start time; every timestamp it holds
  (MSH-7, PID-7, OBR-7, OBX-14, SPM-17) empty or a valid, plausible HL7 datetime; every
  number (NM, SN) in its plain decimal form.

Anything else (a bad date, an escape, another encoding, an ADT merge, a structure hl7apy
rejects) goes to `parse`, whose checks and reasons stay the only ones. The two paths are
compared on the whole test corpus, on messages varied field by field and on fuzzed files
(tests/test_hl7v2_bulk.py).
"""

from __future__ import annotations

import functools
import threading
from dataclasses import dataclass

import duckdb
import pyarrow as pa
from hl7apy import SUPPORTED_LIBRARIES
from hl7apy.parser import get_message_info

from etl.sources.hl7v2.framing import RawMessage
from etl.sources.hl7v2.message import (
    CODED_TYPES,
    IDENTIFYING_CODES,
    NUMERIC_TYPES,
    TEXT_TYPES,
    _checked_structure,
)
from etl.sources.hl7v2.values import CODING_SYSTEMS, COMPARATORS
from etl.sources.plausible import EARLIEST, latest
from etl.sql_text import sql_literal

PLAIN_MSH = "MSH|^~\\&|"
_ENC = tuple(sorted(get_message_info(PLAIN_MSH)[0].items()))

# HL7 TS/DTM (etl/sources/hl7v2/values.py's _TS) in RE2
_TS = (
    r"^([0-9]{4})([0-9]{2})?([0-9]{2})?([0-9]{2})?([0-9]{2})?([0-9]{2})?"
    r"(?:\.([0-9]{1,4}))?(?:([+-])([0-9]{2})([0-9]{2}))?$"
)
_TS_PARTS = ["y", "mo", "d", "h", "mi", "s", "fr", "sg", "oh", "om"]
# a number Python's float() and DuckDB's DOUBLE read alike (longer forms go to parse)
_PLAIN_NUMBER = r"^[+-]?([0-9]+(\.[0-9]*)?|\.[0-9]+)$"
_NUM = r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)"
_RANGE = rf"^\s*({_NUM})\s*(?:-|_|\^|to|TO)\s*({_NUM})\s*$"
_BOUND = rf"^\s*([<>]=?)\s*({_NUM})\s*$"


def _in(values: set[str] | dict[str, str]) -> str:
    return "(" + ", ".join(sql_literal(v) for v in sorted(values)) + ")"


def _identifying() -> str:
    """Whether a result's (vocabulary, code) is one whose value identifies the patient."""
    return " OR ".join(
        f"hl7_vocabulary(system) = {sql_literal(v)} AND code = {sql_literal(c)}"
        for v, c in sorted(IDENTIFYING_CODES)
    )


def _macros() -> list[str]:
    """The SQL helpers: component access, timestamps, vocabularies, numbers."""
    parts = "[" + ", ".join(sql_literal(n) for n in _TS_PARTS) + "]"
    vocab_cases = " ".join(
        f"WHEN {sql_literal(k)} THEN {sql_literal(v)}" for k, v in sorted(CODING_SYSTEMS.items())
    )

    def part(name: str, default: str = "0") -> str:
        return f"CAST(coalesce(nullif(struct_extract(p, '{name}'), ''), '{default}') AS BIGINT)"

    return [
        # field (raw text), first repetition, component c, trimmed ('' when absent)
        "CREATE OR REPLACE TEMP MACRO hl7_comp(field, c) AS"
        " trim(split_part(split_part(coalesce(field, ''), '~', 1), '^', c))",
        f"CREATE OR REPLACE TEMP MACRO hl7_ts_parts(v) AS regexp_extract(v, '{_TS}', {parts})",
        # the naive UTC timestamp of TS parts (a column: a macro's argument is substituted
        # as written, so each use would run the regex again); NULL: not a valid date
        "CREATE OR REPLACE TEMP MACRO hl7_ts_of(p) AS CASE"
        " WHEN struct_extract(p, 'y') = '' THEN NULL"
        f" WHEN {part('mo', '1')} NOT BETWEEN 1 AND 12 OR {part('d', '1')} NOT BETWEEN 1 AND 31"
        f" OR {part('h')} > 23 OR {part('mi')} > 59 OR {part('s')} > 59"
        # never plausible, and kept clear of the timestamp range's ends (an offset past
        # year 9999 would raise): message.py reads such a datetime
        f" OR {part('y')} NOT BETWEEN 1800 AND 9000 THEN NULL"
        f" ELSE try(make_timestamp({part('y')}, {part('mo', '1')}, {part('d', '1')},"
        f" {part('h')}, {part('mi')}, {part('s')}))"
        " + to_microseconds(CAST(rpad(coalesce(struct_extract(p, 'fr'), ''), 6, '0') AS BIGINT))"
        " - to_minutes(CASE struct_extract(p, 'sg') WHEN '+' THEN 1 WHEN '-' THEN -1 ELSE 0 END"
        f" * ({part('oh')} * 60 + {part('om')})) END",
        f"CREATE OR REPLACE TEMP MACRO hl7_vocabulary(s) AS CASE WHEN s = '' THEN NULL"
        f" ELSE CASE upper(s) {vocab_cases} ELSE s END END",
        f"CREATE OR REPLACE TEMP MACRO hl7_plain_number(v) AS length(v) <= 30"
        f" AND regexp_full_match(v, '{_PLAIN_NUMBER}')",
    ]


# Candidate messages (plain separators, printable ASCII, no escape after MSH-2), each with
# its segments and what its MSH says: the structure hl7apy checks (message._structure),
# the version, whether it is an ORU, MSH-7 and MSH-10.
_MESSAGES = rf"""
    CREATE OR REPLACE TEMP TABLE hl7_candidates AS
    WITH m AS (
        SELECT number, segs, string_split(segs[1], '|') AS msh
        FROM (SELECT number, string_split(text, chr(13)) AS segs FROM hl7_messages
              WHERE starts_with(text, {sql_literal(PLAIN_MSH)})
                AND NOT regexp_matches(text, '[^\x20-\x7E\r]')
                AND strpos(substr(text, {len(PLAIN_MSH) + 1}), '\') = 0)
    )
    SELECT number, segs,
           CASE WHEN len(segs) > 1 THEN 'MSH|^~\&' || chr(13) || array_to_string(
               list_transform(segs[2:], lambda s: left(s, 3)), chr(13))
               ELSE 'MSH|^~\&' END AS structure,
           split_part(trim(msh[12]), '^', 1) AS version,
           upper(hl7_comp(msh[9], 1)) = 'ORU' AS oru,
           hl7_comp(msh[7], 1) AS msh7, hl7_comp(msh[10], 1) AS control_id
    FROM m
"""

# The segments read of the candidate ORU messages, each OBX and SPM with the positions of
# its context: the last PID before it, and the last PV1 and OBR between that PID and it
# (a PID starts a new context, as in message._read).
_SEGMENTS = """
    CREATE OR REPLACE TEMP TABLE hl7_segments AS
    WITH s AS (
        SELECT number, unnest(segs) AS seg, unnest(range(1, len(segs) + 1)) AS pos
        FROM hl7_candidates WHERE oru
    )
    SELECT number, pos, left(seg, 3) AS name, seg,
           max(CASE WHEN left(seg, 3) = 'PID' THEN pos END) OVER w AS pid_pos,
           max(CASE WHEN left(seg, 3) = 'PV1' THEN pos END) OVER w AS pv1_pos,
           max(CASE WHEN left(seg, 3) = 'OBR' THEN pos END) OVER w AS obr_pos
    FROM s
    WHERE left(seg, 3) IN ('PID', 'PV1', 'OBR', 'OBX', 'SPM')
    WINDOW w AS (PARTITION BY number ORDER BY pos)
"""

# What an OBX or SPM takes from its PID, PV1 and OBR, read once per segment (field n of a
# segment other than MSH is f[n + 1]).
_PIDS = """
    WITH f AS (
        SELECT number, pos, string_split(seg, '|') AS f,
               strpos(split_part(seg, '|', 4), '~') > 0 AS many  -- PID-3 repeated
        FROM hl7_segments WHERE name = 'PID'
    ),
    ids AS (
        SELECT number, pos, f,
               list_filter(
                   list_transform(string_split(coalesce(f[4], ''), '~'),
                                  lambda r: list_transform(string_split(r, '^'),
                                                           lambda c: trim(c))),
                   lambda r: r[1] <> '') AS ids
        FROM f WHERE many
    ),
    patients AS (
        -- one identifier (nearly always): its first component, whatever its type
        SELECT number, pos, f, trim(split_part(coalesce(f[4], ''), '^', 1)) AS patient_id
        FROM f WHERE NOT many
        UNION ALL
        -- several (PID-3 repeated): the first of type MR, else the first
        SELECT number, pos, f,
               coalesce(list_filter(ids, lambda r: len(r) >= 5 AND upper(r[5]) = 'MR')[1][1],
                        ids[1][1], '') AS patient_id
        FROM ids
    )
    SELECT number, pos, patient_id,
           hl7_comp(f[8], 1) AS pid7, nullif(upper(hl7_comp(f[9], 1)), '') AS gender_code
    FROM patients
"""

_PV1S = """
    SELECT number, pos, nullif(hl7_comp(string_split(seg, '|')[20], 1), '') AS visit_id
    FROM hl7_segments WHERE name = 'PV1'
"""

_OBRS = """
    WITH f AS (
        SELECT number, pos, string_split(seg, '|') AS f FROM hl7_segments WHERE name = 'OBR'
    )
    SELECT number, pos, coalesce(nullif(hl7_comp(f[4], 1), ''), hl7_comp(f[3], 1)) AS filler,
           hl7_comp(f[8], 1) AS obr7
    FROM f
"""

# Each OBX and SPM with its fields and its context's, as text. A segment's own fields are
# read from its split before the joins, so that only text, not the list of its fields,
# goes through them (the query 12-17% faster than reading them after).
_FIELDS = f"""
    CREATE OR REPLACE TEMP TABLE hl7_fields AS
    WITH c AS (
        SELECT number, pos, name, pid_pos,
               CASE WHEN pv1_pos > coalesce(pid_pos, 0) THEN pv1_pos END AS pv1_pos,
               CASE WHEN obr_pos > coalesce(pid_pos, 0) THEN obr_pos END AS obr_pos,
               hl7_comp(CASE name WHEN 'OBX' THEN f[15] ELSE f[18] END, 1) AS own_ts,
               upper(hl7_comp(f[3], 1)) AS vtype,
               len(c5) AS c5_len,
               hl7_comp(coded, 1) AS code, hl7_comp(coded, 3) AS system,
               coalesce(c5[1], '') AS v1, coalesce(c5[2], '') AS v2,
               coalesce(c5[3], '') AS v3, coalesce(c5[4], '') AS v4,
               coalesce(f[6], '') AS obx5,
               CASE WHEN name = 'OBX' THEN nullif(upper(hl7_comp(f[12], 1)), '') END AS status,
               hl7_comp(CASE name WHEN 'OBX' THEN f[5] ELSE f[2] END, 1) AS sub_id,
               CASE WHEN name = 'OBX' THEN hl7_comp(f[7], 1) ELSE '' END AS unit,
               CASE WHEN name = 'OBX' THEN nullif(hl7_comp(f[9], 1), '') END AS qualifier,
               hl7_comp(f[8], 1) AS range_text
        FROM (
            SELECT *, CASE name WHEN 'OBX' THEN f[4] ELSE f[5] END AS coded,
                   list_transform(string_split(string_split(coalesce(f[6], ''), '~')[1], '^'),
                                  lambda x: trim(x)) AS c5
            FROM (SELECT number, pos, name, pid_pos, pv1_pos, obr_pos,
                         string_split(seg, '|') AS f
                  FROM hl7_segments WHERE name IN ('OBX', 'SPM'))
        )
    )
    SELECT c.number, c.pos, c.name, c.pid_pos, c.own_ts, m.msh7, m.control_id,
           coalesce(pid.patient_id, '') AS patient_id, coalesce(pid.pid7, '') AS pid7,
           pid.gender_code, pv1.visit_id,
           coalesce(obr.filler, '') AS filler, coalesce(obr.obr7, '') AS obr7,
           c.vtype, c.c5_len, c.code, c.system, c.v1, c.v2, c.v3, c.v4, c.obx5, c.status,
           c.sub_id, c.unit, c.qualifier, c.range_text
    FROM c
    JOIN hl7_candidates m USING (number)
    LEFT JOIN ({_PIDS}) pid ON pid.number = c.number AND pid.pos = c.pid_pos
    LEFT JOIN ({_PV1S}) pv1 ON pv1.number = c.number AND pv1.pos = c.pv1_pos
    LEFT JOIN ({_OBRS}) obr ON obr.number = c.number AND obr.pos = c.obr_pos
"""

# Every distinct datetime text of the rows, parsed once (a file's results share theirs):
# its naive UTC timestamp, and whether it is valid and plausible (etl/sources/plausible.py).
_TIMES = f"""
    CREATE OR REPLACE TEMP TABLE hl7_times AS
    WITH d AS (
        SELECT DISTINCT v FROM (
            SELECT unnest([msh7, pid7, obr7, own_ts]) AS v FROM hl7_fields
        ) WHERE v <> ''
    ),
    p AS (SELECT v, hl7_ts_parts(v) AS p FROM d),
    t AS (SELECT v, hl7_ts_of(p) AS ts FROM p)
    SELECT v, ts, coalesce(CAST(ts AS DATE) >= DATE '{EARLIEST.isoformat()}'
                           AND CAST(ts AS DATE) < CAST(getvariable('hl7_latest') AS DATE),
                           FALSE) AS ok
    FROM t
"""

# Every distinct reference range text of the rows (OBX-7), read once (message.py's
# reference_range): a range "low-high" or a bound "<high", ">low".
_RANGES = f"""
    CREATE OR REPLACE TEMP TABLE hl7_ranges AS
    SELECT v,
           CASE WHEN regexp_full_match(v, '{_RANGE}')
                    THEN TRY_CAST(regexp_extract(v, '{_RANGE}', 1) AS DOUBLE)
                WHEN regexp_full_match(v, '{_BOUND}')
                     AND NOT starts_with(regexp_extract(v, '{_BOUND}', 1), '<')
                    THEN TRY_CAST(regexp_extract(v, '{_BOUND}', 2) AS DOUBLE)
           END AS low,
           CASE WHEN regexp_full_match(v, '{_RANGE}')
                    THEN TRY_CAST(regexp_extract(v, '{_RANGE}', 2) AS DOUBLE)
                WHEN regexp_full_match(v, '{_BOUND}')
                     AND starts_with(regexp_extract(v, '{_BOUND}', 1), '<')
                    THEN TRY_CAST(regexp_extract(v, '{_BOUND}', 2) AS DOUBLE)
           END AS high
    FROM (SELECT DISTINCT range_text AS v FROM hl7_fields WHERE range_text <> '')
"""

# The OBX and SPM rows, and whether every field is plain: a datetime text that is not
# empty is valid and plausible (one that is not finds no time, or one not ok).
_ROWS = f"""
    CREATE OR REPLACE TEMP TABLE hl7_rows AS
    WITH w AS (
        SELECT x.*, tm.ts AS msg_ts, tp.ts AS birth_datetime, tb.ts AS obr_ts,
               tx.ts AS own_datetime,
               coalesce(tx.ts, tb.ts, tm.ts) AS start_datetime,
               (x.msh7 = '' OR coalesce(tm.ok, FALSE)) AND (x.pid7 = '' OR coalesce(tp.ok, FALSE))
                   AND (x.obr7 = '' OR coalesce(tb.ok, FALSE))
                   AND (x.own_ts = '' OR coalesce(tx.ok, FALSE)) AS times_ok
        FROM hl7_fields x
        LEFT JOIN hl7_times tm ON tm.v = x.msh7
        LEFT JOIN hl7_times tp ON tp.v = x.pid7
        LEFT JOIN hl7_times tb ON tb.v = x.obr7
        LEFT JOIN hl7_times tx ON tx.v = x.own_ts
    ),
    n AS (
        SELECT *,
               CASE WHEN name <> 'OBX' THEN TRUE
                    WHEN vtype IN {_in(NUMERIC_TYPES)} THEN v1 = '' OR hl7_plain_number(v1)
                    WHEN vtype = 'SN' THEN (v1 = '' OR v1 IN {_in(COMPARATORS | {"<>"})})
                         AND (v2 = '' AND v4 = '' OR v3 <> '' OR v4 <> ''
                              OR hl7_plain_number(v2))
                    ELSE TRUE END AS value_ok,
               name = 'OBX' AND vtype = 'SN' AND v2 <> '' AND v3 = '' AND v4 = ''
                   AS sn_number,
               name = 'OBX' AND vtype = 'SN' AND (v2 <> '' OR v4 <> '')
                   AND (v3 <> '' OR v4 <> '') AS sn_text
        FROM w
    ),
    o AS (
        SELECT number, pos, name,
               pid_pos IS NOT NULL AND patient_id <> '' AND code <> ''
                   AND start_datetime IS NOT NULL AND times_ok AND value_ok
                   AND length(range_text) <= 64 AS plain,
               CASE name WHEN 'OBX' THEN 'result' ELSE 'specimen' END AS kind,
               msg_ts,
               status,
               patient_id, visit_id, birth_datetime, gender_code,
               coalesce(nullif(filler, ''), control_id) AS order_id,
               code, hl7_vocabulary(system) AS vocabulary_id,
               sub_id,
               start_datetime,
               CASE WHEN name <> 'OBX' THEN NULL
                    WHEN vtype IN {_in(NUMERIC_TYPES)} AND v1 <> '' THEN TRY_CAST(v1 AS DOUBLE)
                    WHEN sn_number THEN TRY_CAST(v2 AS DOUBLE) END AS value_as_number,
               CASE WHEN name <> 'OBX' THEN NULL
                    WHEN sn_text THEN v1 || v2 || v3 || v4
                    WHEN vtype IN {_in(CODED_TYPES)} THEN
                        CASE WHEN v1 = '' AND c5_len > 1 AND v2 <> '' THEN v2 END
                    WHEN vtype IN {_in(TEXT_TYPES)} OR vtype = '' THEN nullif(array_to_string(
                        list_transform(
                            list_filter(string_split(obx5, '~'),
                                        lambda r: split_part(r, '^', 1) <> ''),
                            lambda r: trim(split_part(r, '^', 1))),
                        chr(10)), '') END AS value_as_string,
               CASE WHEN name = 'OBX' AND vtype IN {_in(CODED_TYPES)} THEN nullif(v1, '') END
                   AS value_code,
               CASE WHEN name = 'OBX' AND vtype IN {_in(CODED_TYPES)} AND c5_len > 2
                         AND v1 <> '' THEN hl7_vocabulary(v3) END AS value_vocabulary,
               CASE WHEN sn_number AND v1 IN {_in(COMPARATORS)} THEN v1 END AS operator,
               nullif(unit, '') AS unit_code, CASE WHEN unit <> '' THEN 'UCUM' END
                   AS unit_vocabulary,
               range_text,
               qualifier,
               name = 'OBX' AND coalesce(({_identifying()}), FALSE) AS identifying
        FROM n
    )
    SELECT o.* EXCLUDE (range_text, value_as_number, value_as_string, value_code,
                        value_vocabulary),
           CASE WHEN NOT identifying THEN value_as_number END AS value_as_number,
           CASE WHEN NOT identifying THEN value_as_string END AS value_as_string,
           CASE WHEN NOT identifying THEN value_code END AS value_code,
           CASE WHEN NOT identifying THEN value_vocabulary END AS value_vocabulary,
           ranges.low AS range_low, ranges.high AS range_high
    FROM o LEFT JOIN hl7_ranges ranges ON ranges.v = o.range_text
"""

_PLAIN_ROWS = """
    SELECT CAST(number >> 32 AS INTEGER) AS file,
           CAST(number & 4294967295 AS INTEGER) AS message,
           kind, msg_ts, status, patient_id, visit_id, birth_datetime, gender_code,
           order_id, code, vocabulary_id, sub_id, start_datetime, value_as_number,
           value_as_string, value_code, value_vocabulary, unit_code, unit_vocabulary,
           range_low, range_high, operator, qualifier,
           CAST(NULL AS VARCHAR) AS prior_patient_id,
           CAST(row_number() OVER (PARTITION BY number ORDER BY pos) AS BIGINT) AS ordinal
    FROM hl7_rows
    WHERE number IN (SELECT number FROM hl7_plain)
    ORDER BY number, pos
"""


@dataclass
class PlainRows:
    """The rows of the plain messages of a group of files: `counts` ((file, message
    number) -> its OBX and SPM) and `table`, one row per OBX or SPM: its `file` (position
    in the group), `message` number, `ordinal` in the message, and the columns of
    extract.RESULT that a message gives."""

    counts: dict[tuple[int, int], int]
    table: pa.Table


_local = threading.local()


def _connection() -> duckdb.DuckDBPyConnection:
    """A single-threaded connection of this thread's own, made once (a large feed's files
    are read in several processes, each on one core)."""
    con = getattr(_local, "connection", None)
    if con is None:
        con = duckdb.connect(config={"threads": "1"})
        con.execute("SET enable_progress_bar = false")
        for macro in _macros():
            con.execute(macro)
        _local.connection = con
    return con


@functools.lru_cache(maxsize=4096)
def _structure_ok(structure: str, version: str | None) -> bool:
    """Whether hl7apy accepts the structure under the version, segment for segment,
    without a note (an unsupported version is read as another by `parse`, with a note)."""
    if version not in SUPPORTED_LIBRARIES:
        return False
    try:
        return _checked_structure(structure, version, _ENC) == structure.count("\r") + 1
    except Exception:  # hl7apy's rejection: parse gives the message's reason
        return False


def read_plain(files: list[list[RawMessage]]) -> PlainRows:
    """The rows of the plain messages of `files` (each file's framed messages), read in
    one query (see the module's docstring)."""
    keys: list[int] = []
    texts: list[str] = []
    for i, messages in enumerate(files):
        for m in messages:
            if m.error is None and m.note is None:
                keys.append((i << 32) + m.number)
                texts.append(m.text)
    if not keys:
        return PlainRows({}, pa.table({}))
    con = _connection()
    con.execute("SET VARIABLE hl7_latest = ?", [latest()])
    con.register("hl7_messages", pa.table({"number": pa.array(keys, pa.int64()), "text": texts}))
    try:
        for step in (_MESSAGES, _SEGMENTS, _FIELDS, _TIMES, _RANGES, _ROWS):
            con.execute(step)
        summary = con.sql("""
            SELECT m.number, m.structure, m.version, r.n
            FROM hl7_candidates m
            JOIN (SELECT number, count(*) AS n, bool_and(plain) AS plain
                  FROM hl7_rows GROUP BY number) r USING (number)
            WHERE r.plain
        """).fetchall()
        plain = [row for row in summary if _structure_ok(row[1], row[2])]
        counts = {(key >> 32, key & 0xFFFFFFFF): n for key, _, _, n in plain}
        con.register("hl7_plain", pa.table({"number": pa.array([r[0] for r in plain], pa.int64())}))
        table = con.sql(_PLAIN_ROWS).to_arrow_table()
        con.unregister("hl7_plain")
    finally:
        con.unregister("hl7_messages")
        tables = ("hl7_candidates", "hl7_segments", "hl7_fields", "hl7_times", "hl7_ranges")
        for name in (*tables, "hl7_rows"):
            con.execute(f"DROP TABLE IF EXISTS {name}")
    return PlainRows(counts, table)
