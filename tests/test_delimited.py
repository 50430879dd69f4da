"""Streaming a delimited extract: which columns are parsed, and physical line numbers."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from etl.sources import delimited
from etl.sources.delimited import LINE, lines_are_records, stream

HEADER = b"ID,CODE,DESCRIPTION,START\n"
# the line scan compiled (etl/native/_lines.c) and with NumPy: every test runs both
SCANS = [
    pytest.param(
        "compiled",
        marks=pytest.mark.skipif(
            delimited._line_kernel() is None, reason="no compiled line scan: NumPy is used"
        ),
    ),
    "numpy",
]


@pytest.fixture(params=SCANS)
def scan(request, monkeypatch) -> str:
    if request.param == "numpy":
        monkeypatch.setattr(delimited, "_line_kernel", lambda: None)
    else:  # the compiled scan answers alone: the NumPy one must not be reached

        def not_numpy(path: Path) -> bool:
            raise AssertionError("the NumPy scan ran where the compiled one is built")

        monkeypatch.setattr(delimited, "_lines_are_records_numpy", not_numpy)
    return request.param


def _write(tmp_path: Path, body: bytes, name: str = "f.csv") -> Path:
    path = tmp_path / name
    path.write_bytes(HEADER + body)
    return path


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b'1,A,"plain, quoted",2020-01-01\n2,B,x,2020-01-02\n', True),
        (b"1,A,x,2020-01-01\n2,B,x,2020-01-02", True),  # no line end at the end
        (b'1,A,"with ""escaped"" quotes",2020-01-01\n', True),
        (b'1,A,"spans\ntwo lines",2020-01-01\n2,B,x,2020-01-02\n', False),
        (b"1,A,x,2020-01-01\n\n2,B,x,2020-01-02\n", False),  # a blank line
        (b"1,A,x,2020-01-01\r\n\r\n2,B,x,2020-01-02\r\n", False),  # a blank CRLF line
        (b"\n1,A,x,2020-01-01\n", False),  # a blank line right after the header
        (b'1,A,"never closed,2020-01-01\n2,B,x,2020-01-02\n', False),
    ],
)
def test_lines_are_records(tmp_path: Path, body: bytes, expected: bool, scan: str) -> None:
    assert lines_are_records(_write(tmp_path, body), "utf-8") is expected


def test_lines_are_records_across_chunk_boundaries(tmp_path: Path, monkeypatch, scan) -> None:
    """The scan reads in chunks: a quote opened in one chunk and a blank line split
    between two are still seen."""
    monkeypatch.setattr(delimited, "_BLOCK_SIZE", 8)
    monkeypatch.setattr(delimited, "_SCAN_BLOCK", 8)
    quoted = _write(tmp_path, b'1,A,"a long value\nacross chunks",2020-01-01\n', "q.csv")
    assert lines_are_records(quoted, "utf-8") is False
    for split in range(1, 12):  # the blank line at every offset of a chunk
        body = b"1,A,x" + b"y" * split + b",2020-01-01\n\n2,B,x,2020-01-02\n"
        assert lines_are_records(_write(tmp_path, body, f"b{split}.csv"), "utf-8") is False
    clean = _write(tmp_path, b'1,A,"x, y",2020-01-01\n2,"B",z,2020-01-02\n' * 5, "c.csv")
    assert lines_are_records(clean, "utf-8") is True


@pytest.mark.skipif(delimited._line_kernel() is None, reason="no compiled line scan")
@settings(max_examples=300, deadline=None)
@given(
    body=st.lists(st.sampled_from([b"a", b",", b'"', b"\n", b"\r", b"\r\n", b"xyz"]), max_size=40),
    block=st.integers(1, 9),
)
def test_the_compiled_line_scan_agrees_with_numpy(tmp_path_factory, body, block) -> None:
    """Bodies of quotes, line ends and text, in blocks of every size: the same answer."""
    path = tmp_path_factory.mktemp("scan") / "f.csv"
    path.write_bytes(HEADER + b"".join(body))
    compiled = delimited._line_kernel().lines_are_records(path, len(HEADER), block)
    with pytest.MonkeyPatch.context() as m:
        m.setattr(delimited, "_BLOCK_SIZE", block)
        assert compiled is delimited._lines_are_records_numpy(path)


def test_the_compiled_line_scan_reports_a_missing_file(tmp_path: Path) -> None:
    kernel = delimited._line_kernel()
    if kernel is None:
        pytest.skip("no compiled line scan")
    with pytest.raises(FileNotFoundError):
        kernel.lines_are_records(tmp_path / "missing.csv", 0, 1024)


def test_lines_are_records_is_false_for_utf16(tmp_path: Path) -> None:
    path = tmp_path / "u.csv"
    path.write_bytes("ID,CODE\n1,A\n".encode("utf-16"))
    assert lines_are_records(path, "utf-16") is False


def _rows(path: Path, columns: list[str] | None) -> tuple[list[str], list[dict]]:
    _raw, batches = stream(path, columns=columns)
    out: list[dict] = []
    names: list[str] = []
    for batch in batches:
        names = batch.schema.names
        out.extend(batch.to_pylist())
    return names, out


def test_only_the_asked_columns_are_parsed_when_lines_are_records(tmp_path: Path) -> None:
    path = _write(tmp_path, b'1,A,"x, y",2020-01-01\n,,only the description,\n2,B,z,\n')
    names, rows = _rows(path, ["START", "ID"])
    assert names == ["ID", "START", LINE]  # the file's order
    # a row whose asked columns are all empty is still a record, on its own line
    assert [(r["ID"], r["START"], r[LINE]) for r in rows] == [
        (b"1", b"2020-01-01", 2),
        (b"", b"", 3),
        (b"2", b"", 4),
    ]


def test_every_column_is_parsed_when_an_unread_value_spans_lines(tmp_path: Path) -> None:
    """A line break inside a column nobody reads still moves the following records down
    a line: the whole file is parsed so that their line numbers stay physical."""
    path = _write(tmp_path, b'1,A,"two\nlines",2020-01-01\n2,B,x,2020-01-02\n\n3,C,y,\n')
    names, rows = _rows(path, ["ID"])
    assert names == ["ID", "CODE", "DESCRIPTION", "START", LINE]
    assert [(r["ID"], r[LINE]) for r in rows] == [(b"1", 2), (b"2", 4), (b"3", 6)]


def test_plain_columns_are_ascii_without_nul_or_edge_spaces() -> None:
    """A column is plain when every value of every chunk is ASCII without NUL and starts
    and ends with something other than a space; nulls and empty values are plain."""
    import pyarrow as pa

    binary = pa.binary()
    columns = {
        "plain": [b"a", b"", None, b"b c", b"x-1"],
        "leading": [b"a", b" b", b"c", b"d", b"e"],
        "trailing": [b"a ", b"b", b"c", b"d", b"e"],
        "inner_space": [b"a b", b"c  d", b"e", b"f", b"g"],
        "latin1": [b"caf\xe9", b"a", b"b", b"c", b"d"],
        "utf8": ["café".encode(), b"a", b"b", b"c", b"d"],
        "nul": [b"a\x00b", b"a", b"b", b"c", b"d"],
        "tab": [b"\ta", b"b", b"c", b"d", b"e"],
        "only_null": [None, None, None, None, None],
    }
    table = pa.table({k: pa.array(v, binary) for k, v in columns.items()})
    large = pa.array([b"a", b"b", b"c", b"d", b"e"], pa.large_binary())
    table = table.append_column("large", large)
    table = table.append_column("text", pa.array(["a", "b", "c", "d", "e"]))  # not binary
    names = [*table.column_names, "absent"]
    assert delimited.plain_columns(table, names) == {
        "plain", "inner_space", "tab", "only_null", "large"
    }  # fmt: skip
    # a slice sees only its own values; a column is plain only if every chunk is
    assert "leading" in delimited.plain_columns(table.slice(2), ["leading"])
    two = pa.concat_tables([table.slice(2), table.slice(0, 2)])
    assert two["leading"].num_chunks == 2
    assert delimited.plain_columns(two, ["leading", "plain"]) == {"plain"}
    empty = pa.table({"e": pa.array([], binary), "n": pa.array([None, None], binary)[:0]})
    assert delimited.plain_columns(empty, ["e", "n"]) == {"e", "n"}
    # a header that repeats a name: plain only if every column of that name is
    repeated = pa.table([table["plain"], table["leading"]], names=["x", "x"])
    assert delimited.plain_columns(repeated, ["x"]) == set()
    assert delimited.plain_columns(repeated.slice(2), ["x"]) == {"x"}


def test_plain_columns_are_given_as_text_without_a_copy() -> None:
    """The plain columns become UTF-8 text over the same bytes; the others stay binary."""
    import pyarrow as pa

    table = pa.table(
        {"a": pa.array([b"x", None, b"yz"]), "b": pa.array([b"x", b" y", b"z"])}
    ).slice(1)
    text = delimited.plain_as_text(table, delimited.plain_columns(table, ["a", "b"]))
    assert text.schema.types == [pa.string(), pa.binary()]
    assert text["a"].to_pylist() == [None, "yz"]
    assert text["b"].equals(table["b"])
    data = text["a"].chunk(0).buffers()[2]
    assert data.address == table["a"].chunk(0).buffers()[2].address
    wide = pa.table({"w": pa.array([b"a", None, b"bc"], pa.large_binary())}).slice(1)
    as_text = delimited.plain_as_text(wide, frozenset({"w"}))
    assert as_text.schema.types == [pa.large_string()]
    assert as_text["w"].to_pylist() == [None, "bc"]
    as_text.validate(full=True)
    text.validate(full=True)
