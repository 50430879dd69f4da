"""JSON text of the run's files (report.json, the step files, dqd_results.json).

`json.dumps(..., indent=N)` runs the pure-Python encoder (CPython's C encoder serves only
unindented output): about 0.45 s of every run went to writing the ~2,300 quality checks
three times over. `readable` indents the structure but writes each flat record (an
object or list holding no object or list of objects) on one line with the C encoder: one
check a line, which is also easier to read and to grep than one field a line.
"""

from __future__ import annotations

import json
from typing import Any

_compact = json.JSONEncoder(default=str)


def _flat(value: Any) -> bool:
    """True for a scalar, a list of scalars, or an object of scalars and such lists."""
    if isinstance(value, dict):
        return all(_flat_member(v) for v in value.values())
    return _flat_member(value)


def _flat_member(value: Any) -> bool:
    if isinstance(value, dict):
        return False
    if isinstance(value, list | tuple):
        return not any(isinstance(v, dict | list | tuple) for v in value)
    return True


def _key(key: Any) -> str:
    """An object key as json.dumps writes it (a number, true, null: as text)."""
    return _compact.encode({key: 0})[1:-4]


def readable(value: Any, indent: int = 1) -> str:
    """`value` as JSON: containers indented by `indent`, flat records on one line each.

    Parses to what `json.dumps(value, default=str)` parses to."""
    parts: list[str] = []
    _write(value, 0, indent, parts)
    return "".join(parts)


def _write(value: Any, depth: int, indent: int, parts: list[str]) -> None:
    if not _flat(value):  # an object or list holding objects or lists
        pad, inner = "\n" + " " * (indent * depth), "\n" + " " * (indent * (depth + 1))
        if isinstance(value, dict):
            parts.append("{")
            for i, (key, member) in enumerate(value.items()):
                parts.append(("," if i else "") + inner + _key(key) + ": ")
                _write(member, depth + 1, indent, parts)
            parts.append(pad + "}")
        else:
            parts.append("[")
            for i, member in enumerate(value):
                parts.append(("," if i else "") + inner)
                _write(member, depth + 1, indent, parts)
            parts.append(pad + "]")
        return
    parts.append(_compact.encode(value))
