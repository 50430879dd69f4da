"""The lab feed's extraction: real public messages, field by field, and the status rules."""

from __future__ import annotations

import datetime as dt
import random
from pathlib import Path

import duckdb
import pyarrow as pa
import pytest

from etl.config import FeedConfig
from etl.pseudonym import pseudonym
from etl.sources.ehr import Extract, FileStats
from etl.sources.hl7v2 import extract_hl7, input_files
from etl.sources.hl7v2.extract import _REPEATED_RULES, _RESOLVED
from etl.sources.hl7v2.values import (
    FieldError,
    reference_range,
    structured_numeric,
    timestamp,
    unescape,
)
from tests.conftest import REPO, TEST_KEY

DATA = REPO / "tests" / "data" / "hl7v2"
KEY = TEST_KEY.encode()


def extract(path: Path, **kw: str) -> tuple[list[FileStats], Extract]:
    sink = Extract()
    files = extract_hl7(FeedConfig(name="lab", kind="hl7v2", path=path, **kw), KEY, sink)
    return files, sink


def rows(sink: Extract, shape: str = "event") -> list[dict]:
    return sink.table(shape).to_pylist()


@pytest.fixture(scope="module")
def public() -> tuple[list[FileStats], Extract]:
    return extract(DATA)


def test_every_public_file_is_read_or_quarantined_with_a_reason(public) -> None:
    files, sink = public
    assert [f.file for f in files] == [p.relative_to(DATA).as_posix() for p in input_files(DATA)]
    assert len(files) == 21
    events, quarantine = rows(sink), rows(sink, "quarantine")
    for f in files:
        assert f.records_in == f.extracted + f.quarantined + sum(f.filtered.values()), f
        assert f.extracted == sum(e["source_file"] == f.file for e in events)
        assert f.quarantined == sum(q["source_file"] == f.file for q in quarantine)
    assert all(q["reason"] for q in quarantine)
    by_file = {f.file: f for f in files}
    # the SCT segment of this file is not a segment name: the message (one OBX, one SPM)
    # is rejected whole
    eht = by_file["reportstream_cc0/EHT-20210316-0001.hl7"]
    assert (eht.records_in, eht.quarantined) == (2, 2)
    assert any("InvalidName" in q["reason"] for q in quarantine)
    # orders and ADT messages are not results
    assert by_file["reportstream_cc0/sample_orm_20230809-001.hl7"].filtered == {
        "not_a_result_message": 12
    }
    assert by_file["python_hl7_bsd/sample_batch1_ADT_A04_v2.5.hl7"].filtered == {
        "not_a_result_message": 2
    }
    # a cancelled order: its X results go, the F result and the 3 specimens stay
    canceled = by_file["reportstream_cc0/elims_29_5065302_35227_NoPII_CANCELED-expected.hl7"]
    assert canceled.filtered == {"result_cancelled": 16} and canceled.extracted == 1 + 3
    # sequences in the keys of primary key columns never hold clear identifiers
    assert not any("Deidentified" in str(v) for e in events for v in e.values())
    assert {e["type_concept_id"] for e in events} == {32856}
    assert {e["record_set"] for e in events} == {"lab_results", "lab_specimens"}


def _event(sink: Extract, file: str, line: int) -> dict:
    (hit,) = [e for e in rows(sink) if e["source_file"] == file and e["source_line"] == line]
    return hit


def test_python_hl7_oru_sn_result_field_by_field(public) -> None:
    # OBX|1|SN|1554-5^GLUCOSE^POST 12H CFST:MCNC:PT:SER/PLAS:QN||^182|mg/dl|70_105|H|||F
    # (no OBX-14: OBR-7 200202150730 is the time), PID-3 555-44-4444 without a type
    _, sink = public
    e = _event(sink, "python_hl7_bsd/sample_hl7_ORU_R01_v2.4.hl7", 1)
    assert (e["code"], e["vocabulary_id"]) == ("1554-5", "POST 12H CFST:MCNC:PT:SER/PLAS:QN")
    assert (e["value_as_number"], e["operator"]) == (182.0, None)
    assert (e["unit_code"], e["unit_vocabulary"]) == ("mg/dl", "UCUM")
    assert (e["range_low"], e["range_high"], e["qualifier"]) == (70.0, 105.0, "H")
    assert e["start_datetime"] == dt.datetime(2002, 2, 15, 7, 30)
    assert e["person_key"] == pseudonym(KEY, "555-44-4444")
    assert e["default_domain"] == "Measurement" and e["keep_domain"] is False


def test_newborn_screen_nm_result_field_by_field(public) -> None:
    # OBX|1|NM|38473-5^17-Hydroxyprogesterone^LN|1|0065.88|nmol/L|<85|N|||F|||20241021055726
    _, sink = public
    e = _event(sink, "reportstream_cc0/sample_oru_CDPH_NBS_20241021-001.hl7", 1)
    assert (e["code"], e["vocabulary_id"], e["value_as_number"]) == ("38473-5", "LOINC", 65.88)
    assert (e["unit_code"], e["range_low"], e["range_high"], e["qualifier"]) == (
        "nmol/L",
        None,
        85.0,
        "N",
    )
    assert e["start_datetime"] == dt.datetime(2024, 10, 21, 5, 57, 26)


def test_coded_and_structured_numeric_results_field_by_field(public) -> None:
    _, sink = public
    # OBX|1|CWE|57718-9^Sample quality of Dried blood spot^LN||LA12432-3^Acceptable^LN|...
    e = _event(sink, "reportstream_cc0/etor_ORU_20240220-expected.hl7", 1)
    assert (e["code"], e["vocabulary_id"]) == ("57718-9", "LOINC")
    assert (e["value_code"], e["value_vocabulary"], e["value_as_number"]) == (
        "LA12432-3",
        "LOINC",
        None,
    )
    assert e["start_datetime"] == dt.datetime(2023, 6, 3, 4, 50)
    # OBX|1|SN|21612-7^Reported Patient Age^LN^^^^2.61||^50|a^Year^UCUM^^^^2.1|...|F|||20230411
    f = "reportstream_cc0/elims_29_5065302_35227_NoPII_CANCELED-expected.hl7"
    e = _event(sink, f, 1)
    assert (e["code"], e["value_as_number"], e["unit_code"]) == ("21612-7", 50.0, "a")
    assert e["start_datetime"] == dt.datetime(2023, 4, 11)


def test_specimen_field_by_field(public) -> None:
    # SPM|1|^ff98...||697989009^Anterior nares swab^SCT^^^^20200901|||...|20240412230603-0500
    _, sink = public
    e = _event(sink, "reportstream_cc0/ORU_deidentified-expected.hl7", 5)
    assert (e["record_set"], e["code"], e["vocabulary_id"]) == (
        "lab_specimens",
        "697989009",
        "SNOMED",
    )
    assert (e["default_domain"], e["keep_domain"]) == ("Specimen", True)
    assert e["start_datetime"] == dt.datetime(2024, 4, 13, 4, 6, 3)  # -0500 -> UTC


def test_values() -> None:
    assert timestamp("20240301093000-0500", "X") == dt.datetime(2024, 3, 1, 14, 30)
    assert timestamp("20240301093000.25+0100", "X") == dt.datetime(2024, 3, 1, 8, 30, 0, 250000)
    assert timestamp("202403", "X") == dt.datetime(2024, 3, 1)
    assert timestamp("", "X") is None
    with pytest.raises(ValueError, match="not a valid date"):
        timestamp("20240230", "OBX-14")
    assert reference_range("3.5-5.0") == (3.5, 5.0)
    assert reference_range("-5 - 5") == (-5.0, 5.0)
    assert reference_range("<5") == (None, 5.0)
    assert reference_range(">=10") == (10.0, None)
    assert reference_range("negative") == (None, None)
    assert structured_numeric(["<", "5"], "X") == (5.0, "<", None)
    assert structured_numeric(["", "1", "-", "5"], "X") == (None, None, "1-5")
    assert structured_numeric(["", "1", ":", "128"], "X") == (None, None, "1:128")
    enc = {"FIELD": "|", "COMPONENT": "^", "SUBCOMPONENT": "&", "REPETITION": "~", "ESCAPE": "\\"}
    assert unescape(r"a\F\b\S\c\T\d\R\e\E\f\X41\g\.br\h\H\i\N\j", enc) == "a|b^c&d~e\\fAg\nhij"


ORU = (
    "MSH|^~\\&|LAB|H|ETL|S|{ts}||ORU^R01|{cid}|P|2.5.1\r"
    "PID|1||OTHER1^^^H^PI~MRN-{p}^^^H^MR||Doe^Jane||19800102|F\r"
    "PV1|1|O|||||||||||||||||ENC-{p}\r"
    "OBR|1||{order}^LAB|24323-8^Panel^LN|||20240301080000\r"
    "{obx}"
)


def obx(code: str, value: str, status: str, sub: str = "") -> str:
    return f"OBX|1|NM|{code}^Test^LN|{sub}|{value}|mg/dL|||||{status}|||20240301081500\r"


def message(cid: str, ts: str, *results: str, order: str = "A1", p: str = "1") -> str:
    return ORU.format(ts=ts, cid=cid, order=order, p=p, obx="".join(results))


def in_file_and_line_order(files: list[FileStats], sink: Extract) -> bool:
    """Whether the landed events follow the input files' order, and each file's lines."""
    place = {f.file: i for i, f in enumerate(files)}
    events = sink.table("event")
    keys = list(zip([place[f] for f in events["source_file"].to_pylist()],
                    events["source_line"].to_pylist(), strict=True))  # fmt: skip
    return keys == sorted(keys)


def test_events_land_in_file_and_line_order(public) -> None:
    files, sink = public
    assert sink.table("event").num_rows > 100
    assert len({f.file for f in files}) > 1
    assert in_file_and_line_order(files, sink)


@pytest.mark.parametrize("batch_rows", [None, 2])
def test_corrections_cancellations_and_preliminaries(
    tmp_path: Path, monkeypatch, batch_rows: int | None
) -> None:
    """Also with the events read back from the spool two rows at a time: the rows the
    rules set aside are found by their row number whatever the batch."""
    if batch_rows is not None:
        from etl.sources.hl7v2 import extract as hl7_extract

        monkeypatch.setattr(hl7_extract, "_BATCH_ROWS", batch_rows)
    # day 1: a final glucose, a preliminary potassium, a final sodium, a preliminary
    # calcium; day 2 (a later file): glucose corrected, sodium cancelled, calcium final;
    # day 3 (an earlier file name, later MSH-7): a preliminary glucose after the correction
    (tmp_path / "b_day1.hl7").write_text(
        message(
            "M1",
            "20240301090000",
            obx("2339-0", "95", "F"),
            obx("2823-3", "4.1", "P"),
            obx("2951-2", "140", "F"),
            obx("17861-6", "9.0", "P"),
        ),
        encoding="utf-8",
    )
    (tmp_path / "c_day2.hl7").write_text(
        message("M2", "20240302090000", obx("2339-0", "105", "C"), obx("2951-2", "", "X"))
        + message("M3", "20240302100000", obx("17861-6", "9.4", "F")),
        encoding="utf-8",
    )
    (tmp_path / "a_day3.hl7").write_text(
        message("M4", "20240303090000", obx("2339-0", "111", "P")), encoding="utf-8"
    )
    files, sink = extract(tmp_path)
    assert in_file_and_line_order(files, sink)
    events = {e["code"]: e for e in rows(sink)}
    assert {c: e["value_as_number"] for c, e in events.items()} == {
        "2339-0": 105.0,  # the correction, not the later preliminary
        "2823-3": 4.1,  # preliminary, no final yet
        "17861-6": 9.4,  # the final replaces the preliminary
    }
    assert len(rows(sink)) == 3
    stats = {f.file: f for f in files}
    assert stats["b_day1.hl7"].filtered == {
        "result_superseded": 2,
        "result_cancelled": 1,
    }
    assert stats["c_day2.hl7"].filtered == {"result_cancelled": 1}
    assert stats["a_day3.hl7"].filtered == {"result_superseded": 1}
    for f in files:
        assert f.records_in == f.extracted + f.quarantined + sum(f.filtered.values())
    e = events["2339-0"]
    assert e["person_key"] == pseudonym(KEY, "MRN-1")  # the MR repetition of PID-3
    assert e["visit_key"] == pseudonym(KEY, "ENC-1")
    assert e["event_key"] == pseudonym(KEY, "lab_results|A1|2339-0|")
    assert e["start_datetime"] == dt.datetime(2024, 3, 1, 8, 15)
    # the cancelled sodium is withdrawn by its event key (a delta feed's state loses it)
    assert [
        (d["record_key"], d["source_file"], d["source_line"]) for d in rows(sink, "deletion")
    ] == [(pseudonym(KEY, "lab_results|A1|2951-2|"), "c_day2.hl7", 2)]


def test_same_code_twice_in_one_message_is_two_results(tmp_path: Path) -> None:
    (tmp_path / "m.hl7").write_text(
        message("M1", "20240301090000", obx("2339-0", "95", "F"), obx("2339-0", "97", "F")),
        encoding="utf-8",
    )
    files, sink = extract(tmp_path)
    assert sorted(e["value_as_number"] for e in rows(sink)) == [95.0, 97.0]
    assert files[0].filtered == {}


def test_unknown_patients_are_derived_from_pid_when_the_site_says_so(tmp_path: Path) -> None:
    (tmp_path / "m.hl7").write_text(
        message("M1", "20240301090000", obx("2339-0", "95", "F"), obx("2823-3", "4", "F"))
        + message("M2", "20240301090000", obx("2339-0", "90", "F"), order="B", p="2"),
        encoding="utf-8",
    )
    _, default = extract(tmp_path)
    assert default.table("derived_person").num_rows == 0
    _, sink = extract(tmp_path, unknown_patient="create")
    persons = rows(sink, "derived_person")
    assert [(p["person_key"], p["source_line"]) for p in persons] == [
        (pseudonym(KEY, "MRN-1"), 1),
        (pseudonym(KEY, "MRN-2"), 3),
    ]
    assert {p["gender_code"] for p in persons} == {"F"}
    assert {p["gender_vocabulary"] for p in persons} == {"HL7_SEX"}
    assert {p["birth_datetime"] for p in persons} == {dt.datetime(1980, 1, 2)}
    table = sink.table("derived_person")
    assert "Doe" not in str(table.to_pylist()) and "MRN-1" not in str(table.to_pylist())
    assert isinstance(table, pa.Table)


def test_parsing_in_worker_processes_gives_the_same_extract(public, monkeypatch) -> None:
    monkeypatch.setenv("OMOP_ETL_HL7_WORKERS", "2")
    files, sink = extract(DATA)
    assert files == public[0]
    for shape in ("event", "quarantine"):
        assert sink.table(shape).equals(public[1].table(shape))


def test_a_parsed_row_without_a_kind_stays_a_result(monkeypatch) -> None:
    """Only rows marked `merge` are patient merges: a row whose kind is missing is still
    extracted as a result, never dropped from both results and merges."""
    import pyarrow.compute as pc

    from etl.sources.hl7v2 import extract as hl7_extract

    real = hl7_extract.read_files

    def without_kind(feed, jobs):  # type: ignore[no-untyped-def]
        out = []
        for stats, table, quarantine in real(feed, jobs):
            is_result = pc.equal(table["kind"], "result")
            kind = pc.if_else(is_result, pa.scalar(None, pa.string()), table["kind"])
            table = table.set_column(table.schema.get_field_index("kind"), "kind", kind)
            out.append((stats, table, quarantine))
        return out

    before_files, before = extract(DATA)
    monkeypatch.setattr(hl7_extract, "read_files", without_kind)
    after_files, after = extract(DATA)
    assert len(rows(after)) == len(rows(before)) > 0
    assert [(f.extracted, f.filtered) for f in after_files] == [
        (f.extracted, f.filtered) for f in before_files
    ]
    measurements = [e for e in rows(after) if e["record_set"] == "lab_results"]
    assert measurements, "results without a kind are extracted as results"


def _rules_by_hand(rows: list[dict]) -> list[tuple[int, str | None]]:
    """The status rules read straight off the README, row by row (the test's oracle):
    messages ordered by MSH-7 (none first), file, position; per key (results without one
    form one group) a cancellation removes every result up to its message, then the
    latest final message wins, else the latest message at all."""
    order = sorted({(r["msg_ts"] is not None, r["msg_ts"] or dt.datetime.min, r["file_idx"],
                     r["message"]) for r in rows})  # fmt: skip
    pos = {m: i for i, m in enumerate(order)}

    def mpos(r: dict) -> int:
        return pos[(r["msg_ts"] is not None, r["msg_ts"] or dt.datetime.min, r["file_idx"],
                    r["message"])]  # fmt: skip

    groups: dict[str | None, list[dict]] = {}
    for r in rows:
        groups.setdefault(r["result_key"], []).append(r)
    rules = {}
    for group in groups.values():
        cancels = [mpos(r) for r in group if r["status"] in ("X", "D", "W")]
        live = [r for r in group if not cancels or mpos(r) > max(cancels)]
        finals = [mpos(r) for r in live if r["status"] in ("F", "C", "U", None)]
        last = max(finals) if finals else max((mpos(r) for r in live), default=None)
        for r in group:
            if r not in live:
                rules[r["source_line"]] = "result_cancelled"
            elif mpos(r) != last or (finals and r["status"] not in ("F", "C", "U", None)):
                rules[r["source_line"]] = "result_superseded"
            else:
                rules[r["source_line"]] = None
    return sorted(rules.items())


def test_status_rules_over_repeated_keys_only_match_the_rules_over_all() -> None:
    rng = random.Random(7)
    n = 4000
    statuses = ["F", "F", "F", "C", "P", "X", "D", "W", "U", None]
    messages = [(rng.randrange(3), m) for m in range(600)]
    stamps = {m: dt.datetime(2024, 1, 1) + dt.timedelta(hours=rng.randrange(200)) for m in messages}
    stamps.update({m: None for m in rng.sample(messages, 40)})  # no MSH-7
    chosen = [rng.choice(messages) for _ in range(n)]
    keyed = pa.table(
        {
            "rid": list(range(n)),
            "source_line": list(range(n)),
            "file_idx": [f for f, _ in chosen],
            "message": [m for _, m in chosen],
            "msg_ts": [stamps[c] for c in chosen],
            "status": [rng.choice(statuses) for _ in range(n)],
            # most keys repeat, about one row in seven has a key of its own, and some
            # results have none (no order or code)
            "result_key": [
                None if rng.random() < 0.02 else f"k{rng.randrange(n // 2)}" for _ in range(n)
            ],
        }
    )
    con = duckdb.connect()
    con.register("arrow_keyed", keyed)
    con.execute("CREATE TEMP TABLE keyed AS SELECT * FROM arrow_keyed")
    con.execute(f"CREATE TEMP TABLE repeated_rules AS {_REPEATED_RULES}")
    narrow = con.sql(f"SELECT source_line, rule FROM ({_RESOLVED}) ORDER BY source_line")
    got = narrow.fetchall()
    assert got == _rules_by_hand(keyed.to_pylist())
    outcomes = (None, "result_cancelled", "result_superseded")
    counts = {rule: sum(1 for _, r in got if r == rule) for rule in outcomes}
    assert all(counts.values()), counts  # every outcome occurs
    assert con.execute("SELECT count(*) FROM repeated_rules").fetchone()[0] < n  # not every row


def test_timestamps_read_once_keep_each_fields_own_errors() -> None:
    """The parsed-timestamp cache answers a repeated value as a first reading would: the
    same datetime, and each field's own error for a bad or implausible value."""
    for _ in range(2):
        assert timestamp("20240102030405+0100", "OBX-14") == dt.datetime(2024, 1, 2, 2, 4, 5)
        for value, field, reason in [
            ("2024013", "OBX-14", "OBX-14 is not an HL7 datetime"),
            ("2024013", "PID-7", "PID-7 is not an HL7 datetime"),
            ("20240231", "OBR-7", "OBR-7 is not a valid date"),
            ("18490101", "SPM-17", "SPM-17 is before 1850"),
            ("29990101", "OBX-14", "OBX-14 is in the future"),
        ]:
            with pytest.raises(FieldError) as err:
                timestamp(value, field)
            assert str(err.value) == reason


def test_future_dates_are_judged_against_todays_clock(monkeypatch) -> None:
    """date_problem skips the clock for days before the last latest() it saw; a stale one
    (a process started days ago) is refreshed before any day is called future."""
    from etl.sources import plausible

    today = dt.date.today()
    monkeypatch.setattr(plausible, "_latest_seen", dt.date(2000, 1, 1))
    assert plausible.date_problem("X", today) is None
    assert plausible._latest_seen == plausible.latest()
    assert plausible.date_problem("X", today + dt.timedelta(days=5)) == "X is in the future"
    assert plausible.date_problem("X", today + dt.timedelta(days=5), end=True) is None


def test_a_large_feed_parses_in_no_more_processes_than_its_cores(
    tmp_path: Path, monkeypatch
) -> None:
    from etl.sources import processes
    from etl.sources.hl7v2 import extract as hl7_extract

    monkeypatch.delenv(hl7_extract.WORKERS_ENV, raising=False)
    monkeypatch.setattr(hl7_extract, "PARALLEL_BYTES", 1)
    monkeypatch.setattr(processes.os, "cpu_count", lambda: 8)
    paths = []
    for i in range(6):
        paths.append(tmp_path / f"{i}.hl7")
        paths[-1].write_text(message(f"M{i}", "20240301090000", obx("2339-0", "95", "F")))
    assert hl7_extract._workers(paths) == 4  # at most 4
    assert hl7_extract._workers(paths, cores=2) == 2
    assert hl7_extract._workers(paths, cores=1) == 1  # in this process
    assert hl7_extract._workers(paths[:1], cores=8) == 1  # one file
    monkeypatch.setenv(hl7_extract.WORKERS_ENV, "3")
    assert hl7_extract._workers(paths, cores=1) == 3  # the site's setting wins
