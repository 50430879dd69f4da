"""One run at a time per warehouse: a lock held for the whole run, released by death.

- PostgreSQL: a session-level advisory lock keyed by the CDM schema, held on a connection
  of its own. The server releases it when that session ends, so a run killed with
  SIGKILL (or a machine that died) never leaves it behind.
- DuckDB: an exclusive `flock` on `<database>.omop-etl.lock` beside the database file.
  The kernel releases it when the process dies. The file keeps who holds it (run id,
  pid, host, start time) so a refused run can say who is in the way, and a run that
  takes over after a dead one says which run did not finish.

A second run started while one holds the lock is refused at once with that message
(`LockBusy`); it never waits and never touches the warehouse.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import json
import logging
import os
import socket
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import sqlalchemy as sa

log = logging.getLogger(__name__)


class LockBusy(RuntimeError):
    """Another run holds the warehouse; the message names it."""


def _holder(run_id: str) -> dict[str, object]:
    return {
        "run_id": run_id,
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }


def lock_key(schema: str) -> int:
    """The advisory lock key of a CDM schema (a stable signed 63-bit integer)."""
    return zlib.crc32(f"omop-etl:{schema}".encode()) | (0x5EED << 32)


def duckdb_lock_path(url: str) -> Path | None:
    """`<database>.omop-etl.lock` for a DuckDB file URL; None for an in-memory database."""
    database = sa.engine.make_url(url).database
    if not database or database == ":memory:":
        return None
    return Path(database).with_name(Path(database).name + ".omop-etl.lock")


_HELD: dict[str, int] = {}  # locks this process holds -> nesting depth (re-entrant)


@contextmanager
def warehouse_lock(url: str, schema: str, run_id: str) -> Iterator[None]:
    """Hold the warehouse's run lock for the duration of the block, or raise LockBusy.

    Re-entrant within a process: a step that takes the lock inside a whole run that holds
    it (run_pipeline) just proceeds; an Airflow task holds it for its own step.
    """
    if url.startswith("duckdb"):
        path = duckdb_lock_path(url)
        ident = str(path.resolve()) if path else ""
    else:
        path, ident = None, f"{sa.engine.make_url(url).render_as_string()}#{schema}"
    if not ident or ident in _HELD:
        _HELD[ident] = _HELD.get(ident, 0) + 1
        try:
            yield
        finally:
            _HELD[ident] -= 1
            if not _HELD[ident]:
                del _HELD[ident]
        return
    held = _file_lock(path, run_id) if path is not None else _advisory_lock(url, schema, run_id)
    with held:
        _HELD[ident] = 1
        try:
            yield
        finally:
            del _HELD[ident]


@contextmanager
def _file_lock(path: Path, run_id: str) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise LockBusy(
                f"another run holds the warehouse lock {path}: {_describe(path)}; "
                "one run at a time per warehouse"
            ) from None
        previous = _read(path)
        if previous.get("run_id"):
            log.warning(
                "run %s (pid %s on %s, started %s) did not finish; taking over its lock",
                previous.get("run_id"), previous.get("pid"), previous.get("host"),
                previous.get("started_at"),
            )  # fmt: skip
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(_holder(run_id)).encode(), 0)
        os.fsync(fd)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)  # a clean end: nobody to take over from
    finally:
        os.close(fd)  # closing the descriptor releases the flock


def _read(path: Path) -> dict[str, object]:
    try:
        return json.loads(path.read_text(encoding="utf-8") or "{}")
    except (OSError, ValueError):
        return {}


def _describe(path: Path) -> str:
    h = _read(path)
    if not h:
        return "holder unknown"
    return (
        f"run {h.get('run_id')} (pid {h.get('pid')} on {h.get('host')},"
        f" started {h.get('started_at')})"
    )


@contextmanager
def _advisory_lock(url: str, schema: str, run_id: str) -> Iterator[None]:
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as conn:
            key = lock_key(schema)
            got = conn.execute(sa.text("SELECT pg_try_advisory_lock(:k)"), {"k": key}).scalar()
            conn.commit()
            if not got:
                holder = conn.execute(
                    sa.text(
                        "SELECT a.pid, a.application_name, a.backend_start FROM pg_locks l"
                        " JOIN pg_stat_activity a ON a.pid = l.pid"
                        " WHERE l.locktype = 'advisory' AND l.granted"
                        " AND l.classid = :hi AND l.objid = :lo LIMIT 1"
                    ),
                    {"hi": key >> 32, "lo": key & 0xFFFFFFFF},
                ).first()
                who = (
                    f"server session {holder.pid} ({holder.application_name or 'omop-etl'},"
                    f" since {holder.backend_start:%Y-%m-%d %H:%M:%S})"
                    if holder
                    else "another session"
                )
                raise LockBusy(
                    f"another run holds the lock of schema {schema}: {who};"
                    " one run at a time per warehouse"
                )
            conn.execute(
                sa.text("SELECT set_config('application_name', :n, false)"),
                {"n": f"omop-etl run {run_id}"[:63]},
            )
            conn.commit()
            try:
                yield
            finally:
                conn.execute(sa.text("SELECT pg_advisory_unlock(:k)"), {"k": key})
                conn.commit()
    finally:
        engine.dispose()
