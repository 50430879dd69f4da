"""Malformed HL7 v2 input: nothing crashes, every message is accounted for."""

from __future__ import annotations

import shutil
from pathlib import Path

from etl.config import FeedConfig
from etl.sources.ehr import Extract, FileStats
from etl.sources.hl7v2 import extract_hl7
from tests.conftest import REPO, TEST_KEY

CORPUS = REPO / "tests" / "corpus" / "hl7v2"


def extract(path: Path) -> tuple[dict[str, FileStats], Extract]:
    sink = Extract()
    files = extract_hl7(FeedConfig(name="lab", kind="hl7v2", path=path), TEST_KEY.encode(), sink)
    return {f.file: f for f in files}, sink


def test_malformed_corpus_is_accounted_message_by_message() -> None:
    files, sink = extract(CORPUS)
    events = sink.table("event").to_pylist()
    reasons: dict[tuple[str, int], str] = {
        (q["source_file"], q["source_line"]): q["reason"]
        for q in sink.table("quarantine").to_pylist()
    }
    for f in files.values():
        assert f.records_in == f.extracted + f.quarantined + sum(f.filtered.values()), f
        lines = [e["source_line"] for e in events if e["source_file"] == f.file]
        lines += [line for (file, line) in reasons if file == f.file]
        assert sorted(lines) == list(range(1, f.records_in + 1)), f.file  # unique record numbers

    def got(file: str) -> tuple[int, int, int]:
        return files[file].records_in, files[file].extracted, files[file].quarantined

    assert got("empty.hl7") == (0, 0, 0) and files["empty.hl7"].message == "empty file"
    assert got("truncated.hl7") == (2, 1, 1)
    assert reasons[("truncated.hl7", 2)].startswith("message 2: InvalidEncodingChars")
    assert got("wrong_delimiters.hl7") == (2, 0, 2)  # both OBX of the rejected message
    assert "duplicate encoding chars" in reasons[("wrong_delimiters.hl7", 1)]
    assert got("missing_msh.hl7") == (2, 1, 1)
    assert reasons[("missing_msh.hl7", 1)] == "message 1: no MSH segment"
    assert got("bad_dates.hl7") == (3, 1, 2)
    assert reasons[("bad_dates.hl7", 1)] == "OBX-14 is not a valid date"
    assert reasons[("bad_dates.hl7", 2)] == "OBX-14 is not an HL7 datetime"
    assert got("nul_bytes.hl7") == (2, 1, 1)
    assert reasons[("nul_bytes.hl7", 2)] == "message 2: contains NUL bytes"
    assert got("latin1.hl7") == (2, 1, 1)
    assert files["latin1.hl7"].message == "decoded as latin-1 (MSH-18 8859/1)"
    assert reasons[("latin1.hl7", 2)] == "OBX-5 is not a number"
    assert [e["value_as_string"] for e in events if e["source_file"] == "latin1.hl7"] == [
        "jaune pâle"
    ]
    # unknown coding systems are kept as sent, so they surface as unmapped
    coded = {
        (e["code"], e["vocabulary_id"]) for e in events if e["source_file"] == "unknown_coding.hl7"
    }
    assert coded == {("2339-0", "XYZ"), ("K123", "99LAB")}
    # unsupported MSH-12, Z-segments, escapes; a missing code and a missing patient id
    assert got("odd_structure.hl7") == (3, 1, 2)
    assert "MSH-12 '2.9'" in (files["odd_structure.hl7"].message or "")
    assert reasons[("odd_structure.hl7", 2)] == "OBX-3 observation code is missing"
    assert reasons[("odd_structure.hl7", 3)] == "no patient identifier (PID-3)"
    (odd,) = [e for e in events if e["source_file"] == "odd_structure.hl7"]
    assert odd["value_as_string"] == "a|b^c&d\\e"
    # BOM, CRLF, SN comparators, ratios and offsets converted to UTC
    sn = sorted(
        (
            e["source_line"],
            e["value_as_number"],
            e["operator"],
            e["value_as_string"],
            e["range_low"],
            e["range_high"],
            e["start_datetime"].isoformat(),
        )
        for e in events
        if e["source_file"] == "bom_crlf_sn.hl7"
    )
    assert sn == [
        (1, 5.0, "<", None, None, 5.0, "2024-03-01T14:30:00"),
        (2, None, None, "1:128", 10.0, None, "2024-03-01T10:15:00"),
        (3, 10.0, ">=", None, 3.5, 5.0, "2024-03-01T08:30:00"),
    ]
    # no name from PID-5 anywhere
    assert "Doe" not in str(events)


def test_a_10_mb_message_is_read_without_trouble(tmp_path: Path) -> None:
    shutil.copy(CORPUS / "bad_dates.hl7", tmp_path / "a.hl7")
    text = "x" * (10 * 1024 * 1024)
    big = (
        "MSH|^~\\&|LAB|H|ETL|S|20240301||ORU^R01|BIG|P|2.5.1\r"
        "PID|1||M9^^^H^MR\r"
        "OBR|1||O9^LAB|11502-2^Report^LN|||20240301\r"
        f"OBX|1|TX|11502-2^Report^LN||{text}||||||F\r"
        "OBX|2|NM|2339-0^Glucose^LN||99|mg/dL|||||F\r"
    )
    (tmp_path / "b.hl7").write_text(big, encoding="utf-8")
    files, sink = extract(tmp_path)
    assert (files["b.hl7"].records_in, files["b.hl7"].extracted) == (2, 2)
    values = {e["code"]: e for e in sink.table("event").to_pylist() if e["source_file"] == "b.hl7"}
    assert len(values["11502-2"]["value_as_string"]) == len(text)
    assert values["2339-0"]["value_as_number"] == 99.0
    assert files["a.hl7"].records_in == 3  # the neighbour file is unaffected


def test_a_quarantine_reason_never_quotes_the_patient_identifier() -> None:
    from etl.sources.hl7v2.message import _reason

    text = (
        "MSH|^~\\&|LIS|LAB|EHR|HOSP|20200101||ORU^R01|1|P|2.5.1\r"
        "PID|1||MRN12345^^^H^MR~999888^^^X^PI||\r"
        "OBX|1|NM|8302-2^Height^LN||MRN12345"
    )
    reason = _reason(ValueError("cannot read OBX|1|NM|8302-2||MRN12345 (also 999888)"), text)
    assert "MRN12345" not in reason and "999888" not in reason
    assert reason == "ValueError: cannot read OBX|1|NM|8302-2||[PID-3] (also [PID-3])"
