"""Stream a delimited or Parquet extract as raw Arrow batches, each row with its line.

Columns come out as binary (undecoded bytes), so one row with bytes in the wrong
encoding cannot stop the file: decoding happens per value later, set-based, and only the
bad rows are quarantined. Rows with the wrong number of fields are reported with their
line number, never silently dropped.

Only the columns a query reads are converted (most of a wide extract's parsing cost is
converting columns nobody reads) when a byte scan shows that no value of the file spans
lines and no line is blank: then Arrow's row numbers are the physical line numbers
whatever the unread columns hold. Otherwise every column is read, so that line breaks in
any value and blank lines are seen and the numbering stays physical.
"""

from __future__ import annotations

import bisect
import codecs
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from etl.native import compiled

LINE = "_line"
_BLOCK_SIZE = 16 << 20
_SCAN_BLOCK = 1 << 20  # the compiled line scan's reads: a block that stays in the cache
# rows handed to one query: DuckDB spreads a table of several blocks over its threads and
# pays its per-query set-up once; one 16 MiB block alone keeps a query on one core
QUERY_ROWS = 250_000


@dataclass
class RawFile:
    """A file being streamed: its header, and the rows that could not be split."""

    path: Path
    header: list[str]
    malformed: list[tuple[int | None, str]] = field(default_factory=list)
    unreadable: str | None = None
    blank_lines: int = 0
    # why no record of the file can be read (empty, wrong encoding): all are quarantined
    problem: str | None = None


def line_numbers(first: int, n: int, skipped: list[int]) -> pa.Array:
    """Line numbers of the next `n` parsed rows, stepping over lines skipped as malformed."""
    candidates = pa.array(np.arange(first, first + n + len(skipped), dtype=np.int64))
    if skipped:
        keep = pc.invert(pc.is_in(candidates, value_set=pa.array(skipped, pa.int64())))
        candidates = pc.filter(candidates, keep)
    return candidates.slice(0, n)


def unreadable_reason(exc: Exception) -> tuple[int | None, str]:
    """(line, reason) for a block Arrow could not decode."""
    text = str(exc)
    m = re.search(r"Row #(\d+)", text)
    return (int(m.group(1)) if m else None), text


def csv_header(path: Path, delimiter: str, encoding: str) -> list[str]:
    with path.open("rb") as fh:
        first = fh.readline()
    text = first.decode(encoding, errors="replace").lstrip("\ufeff").rstrip("\r\n")
    return [c.strip().strip('"') for c in text.split(delimiter)]


def file_problem(path: Path, encoding: str) -> str | None:
    """Why a delimited file has no readable record at all, or None."""
    with path.open("rb") as fh:
        head = fh.read(4096)
    if not head:
        return "empty file"
    utf16 = "utf-16" in encoding.lower().replace("_", "-")
    if not utf16 and head[:2] in (b"\xff\xfe", b"\xfe\xff"):
        return f"the file is UTF-16 (byte-order mark), not {encoding} as the profile declares"
    if not utf16 and b"\x00" in head.split(b"\n", 1)[0]:
        return f"the header holds NUL bytes: the file is not {encoding} text (UTF-16?)"
    return None


def stream(
    path: Path,
    *,
    delimiter: str = ",",
    encoding: str = "utf-8",
    fmt: str = "csv",
    columns: Sequence[str] | None = None,
) -> tuple[RawFile, Iterator[pa.RecordBatch]]:
    """Open `path`; returns its RawFile and an iterator of binary batches with `_line`.

    `columns`: the columns the caller reads (None: all). The batches hold at least those
    of them the file has, and may hold all of its columns (see the module's docstring).
    """
    if fmt == "parquet":
        pf = pq.ParquetFile(path)
        raw = RawFile(path, pf.schema_arrow.names)
        return raw, _parquet_batches(pf, _present(columns, raw.header))
    header = csv_header(path, delimiter, encoding)
    raw = RawFile(path, header, problem=file_problem(path, encoding))
    return raw, _csv_batches(raw, delimiter, encoding, _present(columns, header))


def _present(columns: Sequence[str] | None, header: list[str]) -> list[str] | None:
    """The columns of `header` among `columns`, in the file's order (None: all)."""
    if columns is None:
        return None
    wanted = set(columns)
    return [c for c in header if c in wanted]


def lines_are_records(path: Path, encoding: str) -> bool:
    """Whether every physical line after the header of a delimited file is one record: no
    quoted value holds a line break and no line is blank. One pass over the bytes, in
    blocks (no memory that grows with the file): compiled (etl/native/_lines.c) where it
    was built, else vectorised with NumPy; False for an encoding in which quotes and line
    breaks are not their ASCII bytes (UTF-16)."""
    try:
        ascii_compatible = '"\r\n'.encode(encoding) == b'"\r\n'
    except LookupError:
        return False
    if not ascii_compatible:
        return False
    kernel = _line_kernel()
    if kernel is None:
        return _lines_are_records_numpy(path)
    with path.open("rb") as fh:
        start = len(fh.readline())
    return kernel.lines_are_records(path, start, _SCAN_BLOCK)


def _line_kernel():  # type: ignore[no-untyped-def]
    """The compiled line scan (etl/native/_lines.c), or None where it was not built."""
    return compiled("_lines")


def _lines_are_records_numpy(path: Path) -> bool:
    """lines_are_records with NumPy: several arrays the size of a block per block (at a
    million patients, observations.csv from a warm page cache: 2.95 CPU s, compiled 0.56)."""
    # buffer[:2]: the last two bytes before the block (a blank line may straddle blocks);
    # before the first block, the header's line end
    buffer = bytearray(2 + _BLOCK_SIZE)
    buffer[:2] = b"\x00\n"
    view = memoryview(buffer)
    parity = 0  # quotes before the block, mod 2
    with path.open("rb") as fh:
        fh.readline()
        while n := fh.readinto(view[2:]):
            data = np.frombuffer(buffer, np.uint8, count=2 + n)
            breaks = np.flatnonzero(data[2:] == 10) + 2
            # a blank line: a break right after a break ("\n\n") or after "\n\r"
            before = data[breaks - 1]
            if np.any(before == 10) or np.any((before == 13) & (data[breaks - 2] == 10)):
                return False
            if buffer.find(b'"', 2, 2 + n) >= 0:
                quotes = np.flatnonzero(data[2:] == 34) + 2
                # a break is inside a quoted value when an odd number of quotes precede it
                if np.any((np.searchsorted(quotes, breaks) + parity) & 1):
                    return False
                parity = (parity + len(quotes)) & 1
            elif parity and breaks.size:  # a value opened in an earlier block
                return False
            del data, before  # the buffer cannot be written while an array views it
            buffer[:2] = buffer[n : n + 2]
    return True


def grouped(batches: Iterator[pa.RecordBatch], rows: int | None = None) -> Iterator[pa.Table]:
    """Consecutive batches gathered into tables of at least `rows` (default QUERY_ROWS)
    rows, the last one smaller, in order."""
    rows = rows or QUERY_ROWS
    held: list[pa.RecordBatch] = []
    count = 0
    for batch in batches:
        held.append(batch)
        count += batch.num_rows
        if count >= rows:
            yield pa.Table.from_batches(held)
            held, count = [], 0
    if held:
        yield pa.Table.from_batches(held)


def plain_columns(table: pa.Table, columns: Sequence[str]) -> frozenset[str]:
    """The `columns` of `table` (binary) whose every value is plain text: ASCII without
    NUL, with no space at either end. Such a value is valid UTF-8 (what Arrow's reader
    makes of any declared encoding), and no trim can change it (trim's other spaces are
    not ASCII). A few vectorised passes over each column's buffers, not one per value."""
    plain = set()
    for name in columns:
        found = table.schema.get_all_field_indices(name)  # a header may repeat a name
        if found and all(_plain_chunk(c) for i in found for c in table.column(i).chunks):
            plain.add(name)
    return frozenset(plain)


def plain_as_text(table: pa.Table, plain: frozenset[str]) -> pa.Table:
    """`table` with its `plain` columns (plain_columns) as UTF-8 text: ASCII is valid
    UTF-8, so each column's buffers are taken as they are, neither copied nor validated
    again (Arrow's cast would check every byte: 2 CPU s over a million patients' EHR)."""
    for i, name in enumerate(table.column_names):
        if name in plain:
            table = table.set_column(i, name, _as_text(table.column(i)))
    return table


def _as_text(col: pa.ChunkedArray) -> pa.ChunkedArray:
    """A binary column whose values are all ASCII, as text over the same buffers."""
    text = pa.large_string() if pa.types.is_large_binary(col.type) else pa.string()
    return pa.chunked_array(
        [
            pa.Array.from_buffers(text, len(c), c.buffers(), c.null_count, c.offset)
            for c in col.chunks
        ],
        text,
    )


def _plain_chunk(col: pa.Array) -> bool:
    if not (pa.types.is_binary(col.type) or pa.types.is_large_binary(col.type)):
        return False
    n = len(col)
    _, offsets_buffer, data_buffer = col.buffers()
    if n == 0 or data_buffer is None:
        return True
    width = np.dtype(np.int64 if pa.types.is_large_binary(col.type) else np.int32)
    offsets = np.frombuffer(offsets_buffer, width, count=n + 1, offset=col.offset * width.itemsize)
    if offsets[-1] == offsets[0]:
        return True
    data = np.frombuffer(data_buffer, np.uint8, count=int(offsets[-1]))
    values = data[int(offsets[0]) :]  # this chunk's bytes (a slice shares its buffer)
    if values.max() >= 0x80 or values.min() == 0:
        return False
    starts, ends = offsets[:-1], offsets[1:]
    filled = ends > starts  # a null or empty value has no first or last byte
    return not (np.any(data[starts[filled]] == 0x20) or np.any(data[ends[filled] - 1] == 0x20))


def _parquet_batches(pf: pq.ParquetFile, columns: list[str] | None) -> Iterator[pa.RecordBatch]:
    row = 1
    for batch in pf.iter_batches(batch_size=200_000, columns=columns):
        cols = [pc.cast(pc.cast(c, pa.string()), pa.binary()) for c in batch.columns]
        lines = pa.array(range(row, row + batch.num_rows), pa.int64())
        row += batch.num_rows
        yield pa.RecordBatch.from_arrays([*cols, lines], names=[*batch.schema.names, LINE])


def _holds_newline(col: pa.Array) -> bool:
    """Whether any value of a binary column may hold a line break: one vectorised scan of
    the column's data buffer (bytes outside the array's slice can only say yes)."""
    data = col.buffers()[2]
    return data is not None and bool(np.any(np.frombuffer(data, np.uint8) == 10))


class _PhysicalLines:
    """Turns Arrow's row ordinals into physical line numbers.

    Arrow numbers rows (header = 1, blank lines included when not ignored), but a quoted
    value may span lines. Rows holding line breaks are rare, so they are kept sparsely as
    (ordinal, extra line breaks) and every line number is the ordinal plus the extra
    breaks of the rows before it.
    """

    def __init__(self) -> None:
        self.ordinals: list[int] = []  # sorted
        self.extras: list[int] = []

    def add(self, ordinal: int, extra: int) -> None:
        if extra:
            i = bisect.bisect_left(self.ordinals, ordinal)
            self.ordinals.insert(i, ordinal)
            self.extras.insert(i, extra)

    def add_batch(self, ordinals: pa.Array, columns: list[pa.Array]) -> None:
        extra = None
        for col in columns:
            if not _holds_newline(col):
                continue  # nearly every column: one scan of its bytes, no per-row count
            n = pc.fill_null(pc.count_substring(col, "\n"), 0)
            extra = n if extra is None else pc.add(extra, n)
        if extra is None or not pc.any(pc.greater(extra, 0)).as_py():
            return
        idx = pc.indices_nonzero(extra)
        for o, e in zip(
            pc.take(ordinals, idx).to_pylist(), pc.take(extra, idx).to_pylist(), strict=True
        ):
            self.add(o, e)

    def lines(self, ordinals: pa.Array) -> pa.Array:
        if not self.ordinals:
            return ordinals
        prefix = np.concatenate([[0], np.cumsum(self.extras)])
        before = np.searchsorted(np.array(self.ordinals), ordinals.to_numpy(), side="left")
        return pa.array(ordinals.to_numpy() + prefix[before], pa.int64())

    def line(self, ordinal: int) -> int:
        return self.lines(pa.array([ordinal], pa.int64()))[0].as_py()


def _csv_batches(
    raw: RawFile, delimiter: str, encoding: str, columns: list[str] | None
) -> Iterator[pa.RecordBatch]:
    subset = columns is not None and len(columns) < len(raw.header)
    if subset and not lines_are_records(raw.path, encoding):
        subset = False
    skipped: list[int] = []
    physical = _PhysicalLines()
    bad: list[tuple[int | None, str]] = []

    def on_invalid(row: pacsv.InvalidRow) -> str:
        if row.number is not None:
            skipped.append(row.number)
            physical.add(row.number, row.text.count("\n"))
        bad.append(
            (row.number, f"expected {row.expected_columns} fields, found {row.actual_columns}")
        )
        return "skip"

    try:
        reader = _open_csv(raw, delimiter, encoding, on_invalid, columns if subset else None)
    except pa.ArrowInvalid as exc:
        if count_data_lines(raw.path) > 0:  # a header alone (no line end) has no record
            raw.unreadable = "{1} (near line {0})".format(*unreadable_reason(exc))
        return
    first = 2
    pending: tuple[pa.RecordBatch, pa.Array] | None = None  # one batch held back
    try:
        while True:
            try:
                batch = reader.read_next_batch()
            except StopIteration:
                break
            except pa.ArrowInvalid as exc:
                raw.unreadable = "{1} (near line {0})".format(*unreadable_reason(exc))
                break
            ordinals = line_numbers(first, batch.num_rows, skipped)
            if batch.num_rows:
                first = ordinals[-1].as_py() + 1
            physical.add_batch(ordinals, batch.columns)
            lines = physical.lines(ordinals)
            # a blank line arrives as a row of empty values: it is not a record (a subset
            # is read only from a file without blank lines: its rows are all records)
            blank = None if subset else _blank_rows(batch)
            if blank is not None:
                raw.blank_lines += pc.sum(blank).as_py()
                keep = pc.invert(blank)
                batch, lines = batch.filter(keep), lines.filter(keep)
            if batch.num_rows == 0:
                continue
            if pending is not None:
                yield _with_lines(*pending)
            pending = (batch, lines)
        if pending is not None:
            pending = _runaway_quote(raw, *pending)
            yield _with_lines(*pending)
    finally:
        raw.malformed.extend(
            (physical.line(o) if o is not None else None, reason) for o, reason in bad
        )


def _blank_rows(batch: pa.RecordBatch) -> pa.Array | None:
    """A mask of the rows whose every value is empty, or None when there is none. Only the
    rows whose first value is empty (rare) are looked at further."""
    if batch.num_columns == 0:
        return None
    blank = pc.equal(pc.binary_length(batch.column(0)), 0)
    if not pc.any(blank).as_py():
        return None
    for col in batch.columns[1:]:
        blank = pc.and_(blank, pc.equal(pc.binary_length(col), 0))
    return blank if pc.any(blank).as_py() else None


def _with_lines(batch: pa.RecordBatch, lines: pa.Array) -> pa.RecordBatch:
    return pa.RecordBatch.from_arrays([*batch.columns, lines], names=[*batch.schema.names, LINE])


def _runaway_quote(
    raw: RawFile, batch: pa.RecordBatch, lines: pa.Array
) -> tuple[pa.RecordBatch, pa.Array]:
    """A quote never closed swallows the rest of the file into the last record: that record
    is taken out and quarantined (it spans several lines and the file's quotes are odd)."""
    last = batch.slice(batch.num_rows - 1)
    if not any(b"\n" in (col[0].as_py() or b"") for col in last.columns):
        return batch, lines
    if _quote_count(raw.path) % 2 == 0:
        return batch, lines
    line = lines[-1].as_py()
    raw.malformed.append(
        (line, f"a quote opened in the record of line {line} is never closed: it runs to the"
         " end of the file")
    )  # fmt: skip
    return batch.slice(0, batch.num_rows - 1), lines.slice(0, len(lines) - 1)


def _quote_count(path: Path) -> int:
    with path.open("rb") as fh:
        return sum(chunk.count(b'"') for chunk in iter(lambda: fh.read(1 << 20), b""))


def _open_csv(  # type: ignore[no-untyped-def]
    raw: RawFile, delimiter: str, encoding: str, on_invalid, columns: list[str] | None = None
) -> pacsv.CSVStreamingReader:
    return pacsv.open_csv(
        raw.path,
        read_options=pacsv.ReadOptions(
            column_names=raw.header,
            skip_rows=1,
            block_size=_BLOCK_SIZE,
            use_threads=False,
            encoding=encoding,
        ),
        parse_options=pacsv.ParseOptions(
            delimiter=delimiter,
            invalid_row_handler=on_invalid,
            newlines_in_values=True,
            ignore_empty_lines=False,  # keep blank lines in the numbering; dropped below
        ),
        convert_options=pacsv.ConvertOptions(
            column_types={c: pa.binary() for c in raw.header},
            strings_can_be_null=False,
            include_columns=columns,
        ),
    )


def count_data_lines(path: Path) -> int:
    """Physical lines after the header (for accounting when a file cannot be parsed)."""
    with path.open("rb") as fh:
        codec = _utf16_codec(fh.read(4096))
        if codec:
            return _count_utf16_lines(path, codec)
        fh.seek(0)
        n = sum(chunk.count(b"\n") for chunk in iter(lambda: fh.read(1 << 20), b""))
        fh.seek(-1, 2) if path.stat().st_size else None
        ends_with_newline = path.stat().st_size == 0 or fh.read(1) == b"\n"
    return max(0, n - 1 + (0 if ends_with_newline else 1))


def _utf16_codec(head: bytes) -> str | None:
    """The UTF-16 codec of a file starting with `head`: by its byte-order mark, or by the
    NUL bytes of ASCII text in UTF-16 (the high bytes of its first line)."""
    if head[:2] in (b"\xff\xfe", b"\xfe\xff"):
        return "utf-16"
    first = head.split(b"\n", 1)[0]
    if len(first) >= 2 and first.count(b"\x00") * 3 >= len(first):
        return "utf-16-le" if first[1:2] == b"\x00" else "utf-16-be"
    return None


def _count_utf16_lines(path: Path, codec: str) -> int:
    decoder = codecs.getincrementaldecoder(codec)(errors="replace")
    n, last = 0, "\n"
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            text = decoder.decode(chunk)
            n += text.count("\n")
            last = text[-1:] or last
    return max(0, n - 1 + (0 if last == "\n" else 1))
