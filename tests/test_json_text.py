"""The run's JSON files: readable() is json.dumps's JSON, laid out one record a line."""

from __future__ import annotations

import datetime as dt
import json

from hypothesis import given, settings
from hypothesis import strategies as st

from etl.json_text import readable

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=8)
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.one_of(st.text(max_size=5), st.integers(), st.none()), inner,
                        max_size=4),
    ),
    max_leaves=30,
)  # fmt: skip


@settings(max_examples=300, derandomize=True)
@given(values, st.integers(1, 3))
def test_readable_is_the_same_json(value, indent) -> None:
    assert json.loads(readable(value, indent)) == json.loads(json.dumps(value))


def test_checks_are_one_a_line_and_odd_values_are_written_as_json_dumps_writes_them() -> None:
    checks = [
        {"name": "isRequired", "passed": True, "examples": [1, 2], "pct": 0.5},
        {"name": "plausibleValueLow", "passed": False, "examples": [], "error": "é \udcff"},
    ]
    report = {"run_id": "r", "checks": checks, "timings": {"gate": 1.5}, "at": dt.date(2026, 1, 2)}
    text = readable(report, 2)
    lines = text.splitlines()
    assert lines[0] == "{" and lines[-1] == "}"
    assert '    {"name": "isRequired", "passed": true, "examples": [1, 2], "pct": 0.5},' in lines
    assert '"error": "\\u00e9 \\udcff"}' in lines[lines.index('  "checks": [') + 2]
    assert '  "timings": {"gate": 1.5},' in lines
    assert json.loads(text) == json.loads(json.dumps(report, default=str))
    assert readable({True: 1, None: 2, 3: 4}) == '{"true": 1, "null": 2, "3": 4}'
