"""The lab feed's two readers agree: plain messages read set-based in DuckDB (bulk.py) give
exactly the rows, line numbers, quarantine and accounting that reading every message one
by one in Python (message.py) gives, on every test file, on messages varied field by
field around the edge of what counts as plain, and on fuzzed files."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pytest
from hypothesis import given

from etl.sources.hl7v2 import extract as hl7_extract
from etl.sources.hl7v2.bulk import PlainRows, read_plain
from etl.sources.hl7v2.framing import split_messages
from tests.conftest import REPO
from tests.test_fuzz import FUZZ, HL7_SEED, mutated

CORPORA = [REPO / "demo" / "lab", REPO / "tests" / "data" / "hl7v2", REPO / "tests" / "corpus"]

MSH = "MSH|^~\\&|LAB|HOSP|OMOP|DEMO|{msh7}||{msh9}|CTRL{n}|P|{version}|||NE|NE||UNICODE UTF-8"
PID = "PID|1||{pid3}||||{pid7}|{pid8}"
PV1 = "PV1|1|O|||||||||||||||||{pv1}"
OBR = "OBR|1|{obr2}|{obr3}|11502-2^Laboratory report^LN|||{obr7}"
OBX = "OBX|1|{vtype}|{obx3}|{sub}|{value}|{unit}|{range}|{flag}|||{status}|||{obx14}"
SPM = "SPM|1|||{spm4}|||||||||||||{spm17}"
BASE = {
    "msh7": "20240102030405+0100",
    "msh9": "ORU^R01^ORU_R01",
    "version": "2.5.1",
    "pid3": "P1^^^HOSP^MR",
    "pid7": "19700101",
    "pid8": "F",
    "pv1": "V1",
    "obr2": "",
    "obr3": "F1^LAB",
    "obr7": "20240102",
    "vtype": "NM",
    "obx3": "2345-7^Glucose^LN",
    "sub": "",
    "value": "5.4",
    "unit": "mmol/L^^UCUM",
    "range": "3.5-5.5",
    "flag": "N",
    "status": "F",
    "obx14": "202401020304",
    "spm4": "119297000^Blood^SCT",
    "spm17": "20240102",
}
# each field's variants: plain ones, and ones only message.py reads (a bad date, an
# escape, an unusual number...), which must leave the message to it
VARIANTS: dict[str, list[str]] = {
    "msh7": [
        "",
        "2024",
        "202401021230",
        "20240102123045.1234-0500",
        "20240230",
        "18491231",
        "21000101",
        "2024010",
        "20241301",
        "20240102246000",
        "bad",
        "20240102+9999",
    ],
    "msh9": ["ORU^R01", "oru^r01", "ADT^A01", "ORM^O01", ""],
    "version": ["2.3", "2.4", "2.6", "9.9", "", "2.5.1^x"],
    "pid3": ["", "P1", "X1^^^A^SS~P2^^^B^MR", "~ ^^^A^MR~P3", " P4 ^^^A^mr", "^^^A^MR"],
    "pid7": ["", "1970", "19700230", "18000101", "197001011200+0200", "x"],
    "pid8": ["", "m", "U"],
    "pv1": ["", "  V2  "],
    "obr2": ["P9^LAB"],
    "obr3": ["", " F2 ^LAB"],
    "obr7": ["", "20240230", "bad", "2024"],
    "vtype": ["", "ST", "TX", "CWE", "CE", "SN", "ED", "nm", "DT", "XX"],
    "obx3": [
        "",
        "2345-7",
        "2345-7^Glucose^L",
        "2345-7^Glucose^ln",
        "56799-0^Address^LN",
        "56799-0^Address^LOINC",
        "^Glucose^LN",
    ],
    "sub": ["1", " 2 "],
    "value": [
        "",
        "7",
        "-7.",
        "+.5",
        "1e3",
        "inf",
        "nan",
        " 8 ",
        "1,5",
        "0x10",
        "12345678901234567890123456789012",
        "<^5",
        ">=^10",
        "^1^-^5",
        "^1^:^128",
        "<>^3",
        "~^7",
        "!^3",
        "A^Text^LOCAL",
        "^Only text",
        "A",
        "line1~line2",
        "a^b~~c",
        " ~ x",
        "pos\\.br\\neg",
        "x\\F\\y",
    ],
    "unit": ["", "mg/dL", "^^UCUM"],
    "range": [
        "",
        "3.5 - 5.5",
        "70_105",
        "1 to 2",
        "<5",
        ">= 10",
        "> -1",
        "abc",
        "1-",
        "-1--2",
        "5^7",
        ".5-1.",
        "1 TO 2",
    ],
    "flag": ["", "H"],
    "status": ["", "C", "p", "X", "D"],
    "obx14": ["", "20240230", "bad", "2100", "20240102030405.5", "20240102+0000"],
    "spm4": ["", "119297000", "X^Blood^L"],
    "spm17": ["", "bad", "20240101120000-0100"],
}


def _message(n: int, fields: dict[str, str], extra: list[str] | None = None) -> str:
    segments = [
        MSH.format(n=n, **fields),
        PID.format(**fields),
        PV1.format(**fields),
        OBR.format(**fields),
        OBX.format(**fields),
        *(extra or []),
        SPM.format(**fields),
    ]
    return "\r".join(segments)


def _varied_messages() -> list[str]:
    """The base message, then one field varied at a time, then a few structures."""
    messages = [_message(1, BASE)]
    for name, values in VARIANTS.items():
        for value in values:
            messages.append(_message(len(messages) + 1, {**BASE, name: value}))
    second_patient = "PID|2||P2^^^HOSP^MR||||19800101|M\rOBX|1|NM|1-8^X^LN||1|||||F|||2024"
    structures = [
        ["ZXY|1|local"],  # a Z-segment
        ["NTE|1||a note"],
        [second_patient],  # a new PID: no PV1 or OBR of the first counts for it
        ["PV1|2|I|||||||||||||||||V9", "OBX|2|NM|1-8^X^LN||1|||||F"],
        ["OBR|2||F3^LAB|x|||20230101", "OBX|2|NM|1-8^X^LN||1|||||F"],
        ["XX"],  # not a segment name hl7apy knows
        ["OBX"],  # an OBX with no field at all
        ["PV1"],
    ]
    for extra in structures:
        messages.append(_message(len(messages) + 1, BASE, extra))
    messages.append("PID|1||P1")  # no MSH
    messages.append(_message(len(messages) + 1, BASE).replace("|^~\\&|", "|^~\\&#|", 1))
    messages.append(_message(len(messages) + 1, BASE).replace("|^~\\&|", "$^~\\&$", 1))
    messages.append(_message(len(messages) + 1, BASE).replace("Glucose", "Glucos\u00e9"))
    messages.append(_message(len(messages) + 1, BASE).replace("Glucose", "Glu\tcose"))
    return messages


def _both_ways(paths: list[Path], monkeypatch: pytest.MonkeyPatch) -> tuple[list, list]:
    jobs = [(i, p.name, p) for i, p in enumerate(paths)]
    bulk = hl7_extract.read_files("lab", jobs)
    with monkeypatch.context() as m:
        m.setattr(hl7_extract, "read_plain", lambda files: PlainRows({}, pa.table({})))
        one_by_one = hl7_extract.read_files("lab", jobs)
    return bulk, one_by_one


def _assert_same(bulk: list, one_by_one: list) -> None:
    assert len(bulk) == len(one_by_one)
    for (stats, table, quarantine), (stats1, table1, quarantine1) in zip(
        bulk, one_by_one, strict=True
    ):
        assert stats == stats1
        assert table.to_pylist() == table1.to_pylist(), stats.file
        assert quarantine.equals(quarantine1), stats.file


def _plain_count(paths: list[Path]) -> int:
    return len(read_plain([split_messages(p.read_bytes()) for p in paths]).counts)


def test_every_test_file_gives_the_same_extract_both_ways(monkeypatch) -> None:
    paths = sorted(
        p
        for root in CORPORA
        for p in root.rglob("*")
        if p.is_file() and p.suffix.lower() in hl7_extract.SUFFIXES
    )
    assert len(paths) > 40
    bulk, one_by_one = _both_ways(paths, monkeypatch)
    _assert_same(bulk, one_by_one)
    assert sum(t.num_rows for _, t, _ in bulk) > 300
    assert _plain_count(paths) > 50  # the bulk reader did read much of it


def test_messages_varied_field_by_field_give_the_same_extract(tmp_path, monkeypatch) -> None:
    messages = _varied_messages()
    path = tmp_path / "varied.hl7"
    path.write_bytes("\r".join(messages).encode("utf-8"))
    bulk, one_by_one = _both_ways([path], monkeypatch)
    _assert_same(bulk, one_by_one)
    _, table, quarantine = bulk[0]
    assert quarantine.num_rows > 10 and table.num_rows > 100
    plain = _plain_count([path])
    # both readers were exercised: many messages plain, many left to message.py
    assert 60 < plain < len(messages) - 40, plain


def test_the_benchmark_messages_are_all_plain(tmp_path) -> None:
    """The generated lab feed (bench/feeds.py, the demo's message builder) is read entirely
    by the bulk reader: its speed is what the benchmark measures."""
    paths = sorted((REPO / "demo" / "lab").glob("oru_*.hl7"))
    framed = [split_messages(p.read_bytes()) for p in paths]
    plain = read_plain(framed)
    assert len(plain.counts) == sum(len(m) for m in framed)


@FUZZ
@given(mutated(HL7_SEED, "hl7"))
def test_fuzzed_files_give_the_same_extract_both_ways(data: bytes) -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp, pytest.MonkeyPatch.context() as monkeypatch:
        path = Path(tmp) / "m.hl7"
        path.write_bytes(data)
        _assert_same(*_both_ways([path], monkeypatch))


def test_a_failed_bulk_read_is_read_one_by_one_and_logs_no_field(monkeypatch, caplog) -> None:
    """Should the bulk queries fail, every message is still read (by message.py), and the
    warning names the error's type only: a DuckDB error's text can quote a field value."""
    paths = sorted((REPO / "demo" / "lab").glob("oru_*.hl7"))
    jobs = [(i, p.name, p) for i, p in enumerate(paths)]
    expected = hl7_extract.read_files("lab", jobs)

    def failing(files):  # type: ignore[no-untyped-def]
        raise ValueError("Could not convert string 'P-123456' to DOUBLE")

    monkeypatch.setattr(hl7_extract, "read_plain", failing)
    with caplog.at_level("WARNING"):
        _assert_same(hl7_extract.read_files("lab", jobs), expected)
    assert "bulk reading failed (ValueError)" in caplog.text
    assert "P-123456" not in caplog.text
