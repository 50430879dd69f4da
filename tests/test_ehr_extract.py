"""Extraction alone, into the in-memory sink: typing, quarantine lines, pseudonyms."""

from __future__ import annotations

import shutil
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.compute as pc

from etl.pseudonym import pseudonym
from etl.sources.ehr import Extract, extract_ehr, trimmed
from etl.sources.profile import load_profile
from tests.conftest import DEMO_SYNTHEA
from tests.pipeline_helpers import rows

KEY = b"unit-test-key-0123456789"


def test_extract_types_pseudonymises_and_quarantines(tmp_path: Path) -> None:
    feed = tmp_path / "feed"
    shutil.copytree(DEMO_SYNTHEA, feed)
    patients = rows(feed / "patients.csv")
    with (feed / "conditions.csv").open("a", encoding="utf-8") as fh:
        fh.write(f"2020-02-30,,{patients[0]['Id']},,195662009,Impossible date\n")
    bad_line = len(rows(feed / "conditions.csv")) + 1

    sink = Extract()
    files = extract_ehr("ehr", feed, load_profile("synthea"), KEY, sink)

    stats = {f.file: f for f in files}
    assert stats["conditions.csv"].quarantined == 1
    assert stats["patients.csv"].extracted == len(patients)
    quarantine = sink.table("quarantine").to_pylist()
    assert quarantine == [
        {
            "record_set": "conditions",
            "reason": "START is not a recognised date",
            "feed": "ehr",
            "source_file": "conditions.csv",
            "source_line": bad_line,
        }
    ]
    persons = sink.table("person")
    expected = {pseudonym(KEY, p["Id"])[:32] for p in patients}
    assert set(persons.column("person_key").to_pylist()) == expected
    # the clear Id, names and SSNs are nowhere in what was extracted
    identifiers = {p[c] for p in patients for c in ("Id", "SSN", "FIRST", "LAST") if p[c]}
    for shape in ("person", "visit", "event", "quarantine"):
        table = sink.table(shape)
        for name in table.column_names:
            values = {str(v) for v in table.column(name).to_pylist() if v is not None}
            assert not values & identifiers, (shape, name)


def test_repeated_keys_get_each_rows_own_pseudonym() -> None:
    """Foreign keys are hashed once per distinct value of a block and taken back by value:
    every row still carries the HMAC of its own value (NULL stays NULL), in source-line
    order."""
    sink = Extract()
    extract_ehr("ehr", DEMO_SYNTHEA, load_profile("synthea"), KEY, sink)
    checks = [  # shape, file, pseudonymised column, clear column
        ("visit", "encounters.csv", "person_key", "PATIENT"),
        ("visit", "encounters.csv", "provider_key", "PROVIDER"),
        ("visit", "encounters.csv", "care_site_key", "ORGANIZATION"),
        ("event", "conditions.csv", "person_key", "PATIENT"),
        ("event", "medications.csv", "visit_key", "ENCOUNTER"),
        ("event", "observations.csv", "visit_key", "ENCOUNTER"),
        ("claim", "claims.csv", "person_key", "PATIENTID"),
        ("cost_line", "claims_transactions.csv", "claim_key", "CLAIMID"),
        ("payer_plan", "payer_transitions.csv", "payer_key", "PAYER"),
    ]
    for shape, file, column, clear in checks:
        table = sink.table(shape).filter(pc.equal(sink.table(shape)["source_file"], file))
        lines = table["source_line"].to_pylist()
        assert len(lines) > 100 and lines == sorted(lines), (shape, file)
        source = rows(DEMO_SYNTHEA / file)
        expected = [
            pseudonym(KEY, source[line - 2][clear]) if source[line - 2][clear] else None
            for line in lines
        ]
        assert table[column].to_pylist() == expected, (shape, file, column)
    visit_keys = sink.table("event").filter(
        pc.equal(sink.table("event")["source_file"], "observations.csv")
    )["visit_key"]
    assert visit_keys.null_count > 0  # observations outside an encounter: NULL stays NULL


def test_many_small_blocks_give_the_same_records_as_one(monkeypatch) -> None:
    """Blocks are parsed ahead in a thread, gathered into queries of QUERY_ROWS rows and
    written behind in another: with tiny blocks and queries the records, their order and
    their line numbers are the same as with the defaults."""
    from etl.sources import delimited

    whole = Extract()
    whole_files = extract_ehr("ehr", DEMO_SYNTHEA, load_profile("synthea"), KEY, whole)
    monkeypatch.setattr(delimited, "_BLOCK_SIZE", 4096)
    monkeypatch.setattr(delimited, "QUERY_ROWS", 50)
    small = Extract()
    small_files = extract_ehr("ehr", DEMO_SYNTHEA, load_profile("synthea"), KEY, small)

    assert len(small.tables["event"]) > 20  # many queries, each written on its own
    assert [vars(f) for f in small_files] == [vars(f) for f in whole_files]
    for shape in ("person", "visit", "event", "claim", "cost_line", "quarantine"):
        assert small.table(shape).equals(whole.table(shape)), shape


def test_reading_only_the_queried_columns_gives_the_same_records(monkeypatch) -> None:
    """Files whose lines are all records are parsed for the queried columns only; the
    records, their line numbers and the accounting are those of parsing every column."""
    from etl.sources import delimited

    calls: list[Path] = []
    real = delimited.lines_are_records

    def spy(path: Path, encoding: str) -> bool:
        calls.append(path)
        return real(path, encoding)

    monkeypatch.setattr(delimited, "lines_are_records", spy)
    subset = Extract()
    subset_files = extract_ehr("ehr", DEMO_SYNTHEA, load_profile("synthea"), KEY, subset)
    assert {p.name for p in calls} >= {"conditions.csv", "claims_transactions.csv"}
    monkeypatch.setattr(delimited, "lines_are_records", lambda path, encoding: False)
    every = Extract()
    every_files = extract_ehr("ehr", DEMO_SYNTHEA, load_profile("synthea"), KEY, every)

    assert [vars(f) for f in subset_files] == [vars(f) for f in every_files]
    for shape in ("person", "visit", "event", "claim", "cost_line", "quarantine"):
        assert subset.table(shape).equals(every.table(shape)), shape


def test_trimmed_is_exactly_duckdbs_trim() -> None:
    """The pre-checked trim gives trim()'s result for every kind of edge a value can have."""
    values = [
        "", " ", "   ", "a", " a", "a ", " a ", "a b", "\ta\t", "\na\r", "\u00a0a", "a\u00a0",
        "\u3000\u65e5\u672c\u3000", "\u65e5\u672c", "\u2003x", "x\u202f", "\u200bx\u200b",
        "\u1680x", "x\u205f", "caf\u00e9", "\u00e9", " \u00e9 ", "\x1fa", "a%", "%a",
        "_", "12345678901234567890 ", " 12345678901234567890",
    ]  # fmt: skip
    con = duckdb.connect()
    con.register("v", pa.table({"x": values}))
    rows = con.sql(f"SELECT x, trim(x), {trimmed('x')} FROM v").fetchall()
    assert len(rows) == len(values)
    assert [r[2] for r in rows] == [r[1] for r in rows]
    assert any(r[1] != r[0] for r in rows)  # the cases do exercise trimming


def test_plain_columns_skip_checks_without_changing_a_record(tmp_path: Path, monkeypatch) -> None:
    """A block's plain columns (ASCII, no NUL, no edge space) are taken as text without
    the encoding check and the trim; the records, quarantine and accounting are those of
    checking every column, also for a file whose values need the trim or are bad text."""
    from etl.sources import ehr

    feed = tmp_path / "feed"
    shutil.copytree(DEMO_SYNTHEA, feed)
    patient = rows(feed / "patients.csv")[0]["Id"]
    last = len(rows(feed / "conditions.csv")) + 1 + 4  # the line of the last one appended
    with (feed / "conditions.csv").open("ab") as fh:
        fh.write(f"2020-01-01,, {patient} ,,195662009 ,Padded\n".encode())
        fh.write(f"2020-01-02,,\u00a0{patient},,195662009,No-break space\n".encode())
        fh.write(f"2020-01-03,,{patient},,1956\x0062009,NUL\n".encode())
        fh.write(f"2020-01-04,,{patient},,19566\xe92009,Latin-1\n".encode("latin-1"))

    seen: list[frozenset[str]] = []
    real = ehr.plain_columns

    def spy(table: pa.Table, columns: list[str]) -> frozenset[str]:
        seen.append(real(table, columns))
        return seen[-1]

    monkeypatch.setattr(ehr, "plain_columns", spy)
    fast = Extract()
    fast_files = extract_ehr("ehr", feed, load_profile("synthea"), KEY, fast)
    assert any("PATIENT" in s for s in seen) and any("CODE" not in s for s in seen)
    monkeypatch.setattr(ehr, "plain_columns", lambda table, columns: frozenset())
    checked = Extract()
    checked_files = extract_ehr("ehr", feed, load_profile("synthea"), KEY, checked)

    assert [vars(f) for f in fast_files] == [vars(f) for f in checked_files]
    for shape in ("person", "visit", "event", "claim", "cost_line", "quarantine"):
        assert fast.table(shape).equals(checked.table(shape)), shape
    events = {
        r["source_line"]: r
        for r in fast.table("event").to_pylist()
        if r["source_file"] == "conditions.csv" and r["source_line"] > last - 4
    }
    person = pseudonym(KEY, patient)[:32]
    assert sorted(events) == [last - 3, last - 2]  # padded and no-break space: trimmed
    assert {(e["code"], e["person_key"]) for e in events.values()} == {("195662009", person)}
    quarantined = {
        r["source_line"]: r["reason"]
        for r in fast.table("quarantine").to_pylist()
        if r["source_file"] == "conditions.csv"
    }
    assert quarantined == {
        last - 1: "CODE is not valid text in the declared encoding",
        last: "CODE is not valid text in the declared encoding",
    }
