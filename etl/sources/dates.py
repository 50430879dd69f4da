"""Dates of an extract parsed with a profile's list of formats, in DuckDB, cheaply.

DuckDB's `try_strptime(x, [f1, f2, ...])` returns the first format's parse that
succeeds. Each format that fails costs it about 1.2 us (it builds an error message),
forty times a successful parse: a date-only column read with the default list (three
datetime formats first) spent 3.5 us a value, most of the EHR query's time on Synthea's
conditions.

`parse_any` gives the same result while skipping, per value, every format that cannot
succeed: strptime matches each literal character of a format (case-sensitively; only
whitespace is lenient), so a value that lacks the format's non-space literals in order
fails it, and a `LIKE` test of those literals (tens of nanoseconds) comes first.
"""

from __future__ import annotations

import re

from etl.sql_text import sql_literal

# DuckDB's strptime specifiers that read one field (`-` is the no-padding flag, as in
# %-d); %z and %Z (a time zone changes the result's type) and %c, %x, %X (formats of
# their own) are left to try_strptime's list
_PLAIN_SPECIFIERS = set("aAwdbBmyYHIpMSgfnjUW")
_SPECIFIER = re.compile(r"%(-?)(.)")


def _literals(fmt: str) -> list[str] | None:
    """The non-whitespace literal characters of `fmt` in order, or None when the format
    holds a specifier this module does not reason about (time zones, locale forms)."""
    out: list[str] = []
    i = 0
    while i < len(fmt):
        if fmt[i] != "%":
            if not fmt[i].isspace():
                out.append(fmt[i])
            i += 1
            continue
        m = _SPECIFIER.match(fmt, i)
        if m is None:
            return None
        flag, spec = m.groups()
        if spec == "%" and not flag:
            out.append("%")
        elif spec not in _PLAIN_SPECIFIERS:
            return None
        i = m.end()
    return out


def _like_pattern(literals: list[str]) -> str:
    escaped = ["\\" + c if c in "%_\\" else c for c in literals]
    return "%" + "%".join(escaped) + "%"


def parse_any(expr: str, formats: list[str]) -> str:
    """A DuckDB expression equal to `try_strptime(expr, [formats])`: the first format
    that parses the VARCHAR `expr`, NULL when none does."""
    listed = "[" + ", ".join(sql_literal(f) for f in formats) + "]"
    guards = [_literals(f) for f in formats]
    if len(formats) < 2 or any(g is None for g in guards):
        return f"try_strptime({expr}, {listed})"
    branches = []
    for fmt, literals in zip(formats, guards, strict=True):
        parse = f"try_strptime({expr}, {sql_literal(fmt)})"
        if literals:
            like = sql_literal(_like_pattern(literals))
            parse = f"CASE WHEN {expr} LIKE {like} ESCAPE '\\' THEN {parse} END"
        branches.append(parse)
    # coalesce evaluates an argument only for the rows still NULL: each value stops at
    # the first format that parses it, as try_strptime's list does
    return f"coalesce({', '.join(branches)})"
