"""The EHR's date parsing (etl/sources/dates.py) gives try_strptime's list result exactly.

`parse_any` skips a format whose literals a value lacks; these tests hold it to DuckDB's
own `try_strptime(x, [formats])` on hand-picked edge cases and on generated strings, for
the default formats and for lists that put other shapes first or use literals that LIKE
would read as wildcards.
"""

from __future__ import annotations

import datetime as dt

import duckdb
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from etl.sources.dates import parse_any
from etl.sources.profile import Profile
from etl.sql_text import sql_literal

DEFAULT = Profile.model_fields["date_formats"].default_factory()
FORMAT_LISTS = [
    DEFAULT,
    ["%Y%m%d", "%d/%m/%Y", "%Y-%m-%d"],
    ["%d.%m.%Y %H:%M", "%d.%m.%Y", "%-d/%-m/%y"],
    ["%Y_%m_%d", "%Y%%%m%%%d", "%Y\\%m\\%d", "%d-%b-%Y", "%I:%M %p %Y-%m-%d"],
]
EDGE_VALUES = [
    "2020-01-03T10:11:12Z",
    "2020-01-03T10:11:12",
    "2020-01-03 10:11:12",
    "2020-01-03  10:11:12",
    "2020-01-0310:11:12",
    "2020-01-03\t10:11:12",
    "2020-01-03t10:11:12z",
    "2020-01-03",
    "  2020-1-3",
    "2020-1-3 ",
    "20200103",
    "2020-02-30",
    "2020-13-01",
    "03/01/2020",
    "3/1/20",
    "03.01.2020 10:11",
    "03.01.2020",
    "2020_01_03",
    "2020%01%03",
    "2020\\01\\03",
    "03-Jan-2020",
    "10:11 PM 2020-01-03",
    "2020/01/03",
    "2020 01 03",
    "",
    "-",
    "T:Z",
    "not a date",
    None,
]


def _differences(values: list[str | None], formats: list[str]) -> list[tuple]:
    """Values whose parse_any result differs from try_strptime's list, with both."""
    con = duckdb.connect()
    con.register("v", pa.table({"x": pa.array(values, pa.string())}))
    listed = "[" + ", ".join(sql_literal(f) for f in formats) + "]"
    return con.execute(
        f"SELECT x, CAST(try_strptime(x, {listed}) AS VARCHAR),"
        f" CAST({parse_any('x', formats)} AS VARCHAR) FROM v"
        f" WHERE try_strptime(x, {listed}) IS DISTINCT FROM {parse_any('x', formats)}"
    ).fetchall()


@pytest.mark.parametrize("formats", FORMAT_LISTS, ids=lambda f: f[0])
def test_edge_values_parse_as_try_strptime_list(formats: list[str]) -> None:
    assert _differences(EDGE_VALUES, formats) == []


def test_each_default_format_is_guarded_and_parses_its_own_shape() -> None:
    sql = parse_any("x", DEFAULT)
    assert sql.startswith("coalesce(") and sql.count(" LIKE ") == 4  # %Y%m%d has no literal
    con = duckdb.connect()
    parsed = con.execute(
        f"SELECT CAST({sql} AS VARCHAR) FROM (VALUES ('2020-01-03T10:11:12Z'),"
        " ('2020-01-03'), ('20200103'), ('2020-02-30')) t(x)"
    ).fetchall()
    assert parsed == [
        ("2020-01-03 10:11:12",),
        ("2020-01-03 00:00:00",),
        ("2020-01-03 00:00:00",),
        (None,),
    ]


@pytest.mark.parametrize("formats", [["%Y-%m-%d %H:%M:%S%z", "%Y-%m-%d"], ["%c", "%Y"], ["%Y"]])
def test_time_zones_locale_forms_and_single_formats_keep_the_list(formats: list[str]) -> None:
    listed = "[" + ", ".join(sql_literal(f) for f in formats) + "]"
    assert parse_any("x", formats) == f"try_strptime(x, {listed})"


# dates written in many shapes, some with a character added before or after, and noise
WRITTEN = st.builds(
    lambda when, shape, before, after: before + when.strftime(shape) + after,
    st.datetimes(min_value=dt.datetime(1850, 1, 1), max_value=dt.datetime(2100, 1, 1)),
    st.sampled_from(
        ["%Y-%m-%dT%H:%M:%SZ", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%d %H:%M:%S", "%Y-%m-%d",
         "%Y%m%d", "%d/%m/%Y", "%d.%m.%Y %H:%M", "%d.%m.%Y", "%Y_%m_%d", "%d-%b-%Y",
         "%I:%M %p %Y-%m-%d", "%m/%d/%y"]
    ),
    st.sampled_from(["", " ", "x"]),
    st.sampled_from(["", " ", "Z", ":00"]),
)  # fmt: skip
NOISE = st.text(alphabet="0123456789-:TZ /._%\\aJn", max_size=22)


@settings(max_examples=150, derandomize=True, deadline=None, database=None)
@given(
    values=st.lists(st.one_of(WRITTEN, NOISE), max_size=40),
    formats=st.sampled_from(FORMAT_LISTS),
)
def test_generated_strings_parse_as_try_strptime_list(values: list[str], formats) -> None:
    assert _differences(values, formats) == []
