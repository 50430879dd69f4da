"""The lab feed's framing: a usual file (no leading whitespace, envelope or NUL, valid
UTF-8) is framed by whole-file operations, any other segment by segment; both give the
same messages, on every test file, on files made to sit on the edge, and fuzzed."""

from __future__ import annotations

import pytest
from hypothesis import given

from etl.sources.hl7v2 import framing
from etl.sources.hl7v2.extract import SUFFIXES
from etl.sources.hl7v2.framing import split_messages
from tests.conftest import REPO
from tests.test_fuzz import FUZZ, HL7_SEED, mutated

CORPORA = [REPO / "demo" / "lab", REPO / "tests" / "data" / "hl7v2", REPO / "tests" / "corpus"]
MSG = (
    "MSH|^~\\&|LAB|HOSP|||20240102||ORU^R01|C{n}|P|2.5.1\rPID|1||P{n}^^^H^MR\rOBX|1|NM|X^Y^LN||{n}"
)


def _segment_by_segment(data: bytes) -> list[framing.RawMessage]:
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(framing, "_plain_file", lambda data: None)
        return split_messages(data)


def _edge_files() -> dict[str, bytes]:
    two = "\r".join(MSG.format(n=n) for n in (1, 2)).encode()
    return {
        "plain": two,
        "crlf and blank lines": two.replace(b"\r", b"\r\n\r\n") + b"\n\n",
        "lf only": two.replace(b"\r", b"\n"),
        "leading blank lines": b"\r\r\n" + two,
        "indented segment": two.replace(b"\rPID", b"\r  PID"),
        "indented MSH": two.replace(b"\rMSH", b"\r\tMSH"),
        "whitespace-only segment": two.replace(b"\rPID", b"\r \rPID"),
        "batch envelope": b"FHS|^~\\&\rBHS|^~\\&\r" + two + b"\rBTS|2\rFTS|1",
        "text before MSH": b"garbage\r" + two,
        "NUL byte": two.replace(b"P1", b"P\x001"),
        "latin-1 byte": two.replace(b"P2", b"P\xe92"),
        "utf-8 text": two.replace(b"P2", "P\u00e92".encode()),
        "MSH inside a segment name": two.replace(b"\rOBX", b"\rMSHX|1\rOBX"),
        "BOM": framing.BOM + two,
        "vertical tab before MSH": two.replace(b"\rMSH", b"\r\x0bMSH"),
        "form-feed-only segment": two.replace(b"\rPID", b"\r\x0c\rPID"),
        "form feed inside": two.replace(b"NM|", b"NM\x0c|"),
        "MLLP framing": b"\x0b" + two + b"\x1c\r",
    }


def test_every_test_file_is_framed_alike_both_ways() -> None:
    paths = sorted(
        p for root in CORPORA for p in root.rglob("*") if p.is_file() and p.suffix in SUFFIXES
    )
    assert len(paths) > 40
    whole = 0
    for path in paths:
        data = path.read_bytes()
        assert split_messages(data) == _segment_by_segment(data), path.name
        whole += framing._plain_file(data.replace(b"\r\n", b"\r").replace(b"\n", b"\r")) is not None
    assert whole > 20  # the whole-file framing did frame most files


def test_files_on_the_edge_are_framed_alike_both_ways() -> None:
    plain = []
    for name, data in _edge_files().items():
        messages = split_messages(data)
        assert messages == _segment_by_segment(data), name
        assert messages, name
        normalised = data.replace(b"\r\n", b"\r").replace(b"\n", b"\r")
        if framing._plain_file(normalised.removeprefix(framing.BOM)) is not None:
            plain.append(name)
    assert {"plain", "crlf and blank lines", "lf only", "utf-8 text", "BOM"} <= set(plain)
    assert "batch envelope" not in plain and "NUL byte" not in plain
    assert [m.text for m in split_messages(_edge_files()["crlf and blank lines"])] == [
        MSG.format(n=n) for n in (1, 2)
    ]


@FUZZ
@given(mutated(HL7_SEED, "hl7"))
def test_fuzzed_files_are_framed_alike_both_ways(data: bytes) -> None:
    assert split_messages(data) == _segment_by_segment(data)
