"""Quoting for SQL text built in code (DuckDB and PostgreSQL): literals and identifiers."""

from __future__ import annotations

import os


def sql_literal(value: str | os.PathLike[str]) -> str:
    """`value` (text or a path) as a SQL string literal: quotes doubled, never interpreted."""
    return "'" + str(value).replace("'", "''") + "'"


def sql_identifier(name: str) -> str:
    """`name` as a double-quoted SQL identifier."""
    return '"' + name.replace('"', '""') + '"'
