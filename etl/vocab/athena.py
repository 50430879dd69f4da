"""Read Athena vocabulary files into typed Arrow batches, with errors naming file and line.

An Athena download is tab separated, one header row (lower- or upper-case names), dates as
YYYYMMDD, empty string for null, and no quoting: a double quote inside a concept name is
just a character. Files are streamed in blocks, so memory stays bounded whatever the size;
every check is vectorised over a block (Arrow compute), never a Python loop over rows.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from etl.cdm.spec import FieldSpec, TableSpec
from etl.sources.delimited import line_numbers, unreadable_reason

LINE_COLUMN = "_line"  # 1-based line number in the source file, kept through staging
_BLOCK_SIZE = 8 << 20
_MAX_EXAMPLES = 5
_INT_RE = r"^[+-]?[0-9]+$"
_FLOAT_RE = r"^[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?$"
_INT32 = (-(2**31), 2**31 - 1)


@dataclass
class Problem:
    """One problem found in a vocabulary file."""

    file: str
    line: int | None
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        return f"{where}: {self.message}"


@dataclass
class VocabularyError(Exception):
    """A vocabulary release that cannot be loaded; nothing was changed in the warehouse."""

    problems: list[Problem] = field(default_factory=list)

    def __str__(self) -> str:
        head = f"vocabulary not loaded ({len(self.problems)} problem(s)); previous one kept"
        return "\n".join([head, *(f"  {p}" for p in self.problems[:20])])


def find_file(release_dir: Path, table: str) -> Path | None:
    """The file for `table` in an Athena folder (CONCEPT.csv, concept.csv, CONCEPT.tsv...)."""
    for candidate in sorted(release_dir.iterdir()):
        if (
            candidate.is_file()
            and candidate.stem.lower() == table
            and candidate.suffix.lower()
            in (
                ".csv",
                ".tsv",
                ".txt",
            )
        ):
            return candidate
    return None


def _arrow_type(f: FieldSpec) -> pa.DataType:
    return {
        "integer": pa.int32(),
        "float": pa.float64(),
        "date": pa.date32(),
        "datetime": pa.timestamp("us"),
    }.get(f.datatype, pa.string())


def arrow_schema(spec: TableSpec) -> pa.Schema:
    """The typed Arrow schema of a vocabulary table, plus the source line column."""
    return pa.schema(
        [pa.field(f.name, _arrow_type(f), nullable=not f.required) for f in spec.fields]
        + [pa.field(LINE_COLUMN, pa.int64(), nullable=False)]
    )


class _CountingReader(io.RawIOBase):
    """A file wrapper that reports bytes read, for progress bars."""

    def __init__(self, path: Path, on_read: Callable[[int], None] | None) -> None:
        self._fh = path.open("rb")
        self._on_read = on_read

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:  # type: ignore[no-untyped-def]
        n = self._fh.readinto(buffer)
        if self._on_read and n:
            self._on_read(n)
        return n

    def close(self) -> None:
        self._fh.close()
        super().close()


def read_header(path: Path) -> list[str]:
    with path.open("rb") as fh:
        first = fh.readline()
    text = first.decode("utf-8-sig", errors="replace").rstrip("\r\n")
    # Some exporters quote header names even when the data are unquoted.
    return [c.strip().strip('"').lower() for c in text.split("\t")]


def _examples(mask: pa.Array, lines: pa.Array, values: pa.Array | None = None) -> list[tuple]:
    idx = pc.indices_nonzero(mask).slice(0, _MAX_EXAMPLES)
    picked_lines = pc.take(lines, idx).to_pylist()
    if values is None:
        return [(ln, None) for ln in picked_lines]
    return list(zip(picked_lines, pc.take(values, idx).to_pylist(), strict=True))


def _parse_dates(col: pa.Array) -> pa.Array:
    compact = pc.strptime(col, format="%Y%m%d", unit="s", error_is_null=True)
    iso = pc.strptime(col, format="%Y-%m-%d", unit="s", error_is_null=True)
    return pc.cast(pc.coalesce(compact, iso), pa.date32())


def _convert_column(
    f: FieldSpec, col: pa.Array, lines: pa.Array, problems: list[Problem], fname: str
) -> pa.Array:
    """Type one string column per the spec; record problems for the values that fail."""
    present = pc.is_valid(col)
    if f.required:
        missing = pc.invert(present)
        if pc.any(missing).as_py():
            for ln, _ in _examples(missing, lines):
                problems.append(Problem(fname, ln, f"{f.name} is required but empty"))
    if f.datatype == "integer":
        ok = pc.match_substring_regex(col, _INT_RE)
        bad = pc.and_(present, pc.invert(ok))
        if pc.any(bad).as_py():
            for ln, v in _examples(bad, lines, col):
                problems.append(Problem(fname, ln, f"{f.name}: {v!r} is not an integer"))
            col = pc.if_else(bad, pa.scalar(None, pa.string()), col)
        as64 = pc.cast(col, pa.int64())
        out_of_range = pc.or_(pc.less(as64, _INT32[0]), pc.greater(as64, _INT32[1]))
        if pc.any(out_of_range).as_py():
            for ln, v in _examples(pc.fill_null(out_of_range, False), lines, col):
                problems.append(Problem(fname, ln, f"{f.name}: {v} is outside the integer range"))
            as64 = pc.if_else(out_of_range, pa.scalar(None, pa.int64()), as64)
        return pc.cast(as64, pa.int32())
    if f.datatype == "float":
        ok = pc.match_substring_regex(col, _FLOAT_RE)
        bad = pc.and_(present, pc.invert(ok))
        if pc.any(bad).as_py():
            for ln, v in _examples(bad, lines, col):
                problems.append(Problem(fname, ln, f"{f.name}: {v!r} is not a number"))
            col = pc.if_else(bad, pa.scalar(None, pa.string()), col)
        return pc.cast(col, pa.float64())
    if f.datatype == "date":
        parsed = _parse_dates(col)
        bad = pc.and_(present, pc.is_null(parsed))
        if pc.any(bad).as_py():
            for ln, v in _examples(bad, lines, col):
                problems.append(
                    Problem(fname, ln, f"{f.name}: {v!r} is not a date (expected YYYYMMDD)")
                )
        return parsed
    length = f.varchar_length
    if length is not None:
        too_long = pc.fill_null(pc.greater(pc.utf8_length(col), length), False)
        if pc.any(too_long).as_py():
            for ln, v in _examples(too_long, lines, col):
                problems.append(
                    Problem(fname, ln, f"{f.name}: {len(v)} characters, longer than {length}")
                )
    return col


def read_table(
    path: Path,
    spec: TableSpec,
    *,
    problems: list[Problem],
    on_bytes: Callable[[int], None] | None = None,
) -> Iterator[pa.RecordBatch]:
    """Stream `path` as typed record batches matching `arrow_schema(spec)`.

    Problems (missing columns, malformed rows, bad values) are appended to `problems`;
    the caller decides to refuse the load once reading has finished, so one pass reports
    every problem in the file rather than only the first.
    """
    fname = path.name
    header = read_header(path)
    missing = [c for c in spec.column_names if c not in header]
    if missing:
        problems.append(Problem(fname, 1, f"missing column(s): {', '.join(missing)}"))
        return
    dupes = sorted({c for c in header if header.count(c) > 1})
    if dupes:
        problems.append(Problem(fname, 1, f"duplicate column(s): {', '.join(dupes)}"))
        return

    bad_rows: list[Problem] = []
    skipped_lines: list[int] = []

    def on_invalid(row: pacsv.InvalidRow) -> str:
        line = row.number
        if line is not None:
            skipped_lines.append(line)
        if len(bad_rows) < _MAX_EXAMPLES:
            bad_rows.append(
                Problem(
                    fname,
                    line,
                    f"expected {row.expected_columns} tab-separated fields, "
                    f"found {row.actual_columns}",
                )
            )
        elif len(bad_rows) == _MAX_EXAMPLES:
            bad_rows.append(Problem(fname, None, "more malformed rows not listed"))
        return "skip"

    read_opts = pacsv.ReadOptions(
        column_names=header, skip_rows=1, block_size=_BLOCK_SIZE, use_threads=False
    )
    parse_opts = pacsv.ParseOptions(
        delimiter="\t", quote_char=False, escape_char=False, invalid_row_handler=on_invalid
    )
    convert_opts = pacsv.ConvertOptions(
        column_types={c: pa.string() for c in header},
        include_columns=list(spec.column_names),
        null_values=[""],
        strings_can_be_null=True,
    )
    target = arrow_schema(spec)
    source = io.BufferedReader(_CountingReader(path, on_bytes), buffer_size=1 << 20)
    try:
        reader = pacsv.open_csv(
            source, read_options=read_opts, parse_options=parse_opts, convert_options=convert_opts
        )
        first_line = 2
        while True:
            try:
                batch = reader.read_next_batch()
            except StopIteration:
                break
            except pa.ArrowInvalid as exc:
                problems.append(_unreadable(fname, exc))
                return
            n = batch.num_rows
            lines = line_numbers(first_line, n, skipped_lines)
            if n:
                first_line = lines[-1].as_py() + 1
            columns = [
                _convert_column(f, batch.column(f.name), lines, problems, fname)
                for f in spec.fields
            ]
            yield pa.RecordBatch.from_arrays([*columns, lines], schema=_nullable(target))
    except pa.ArrowInvalid as exc:
        problems.append(_unreadable(fname, exc))
    finally:
        source.close()
        problems.extend(bad_rows)


def _unreadable(fname: str, exc: Exception) -> Problem:
    """A problem for a block Arrow could not decode, naming the line where it knows it."""
    line, text = unreadable_reason(exc)
    if "invalid UTF8" in text:
        return Problem(fname, line, "unreadable: not valid UTF-8 (Athena files are UTF-8)")
    return Problem(fname, line, f"unreadable: {text}")


def _nullable(schema: pa.Schema) -> pa.Schema:
    """Same schema with every field nullable (problems are reported, not raised by Arrow)."""
    return pa.schema([f.with_nullable(True) for f in schema])
