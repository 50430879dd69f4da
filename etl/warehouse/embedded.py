"""Find a PostgreSQL to use: the configured server, or an embedded one when none answers.

Tests and benchmarks call this so they run against a real PostgreSQL everywhere: the
hospital's server, the CI machine's local one, or, on a laptop with nothing installed, a
private server started from the `pgserver` package.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

import sqlalchemy as sa

log = logging.getLogger(__name__)

TEST_PG_ENV = "OMOP_ETL_TEST_PG"
DEFAULT_TEST_PG = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
_embedded = None  # keeps the embedded server alive for the life of the process


def reachable(url: str, timeout: int = 3) -> bool:
    """True when a PostgreSQL server answers at `url`."""
    engine = sa.create_engine(
        url, connect_args={"connect_timeout": timeout}, poolclass=sa.pool.NullPool
    )
    try:
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
        return True
    except sa.exc.OperationalError:
        return False
    finally:
        engine.dispose()


def postgres_url(env: str = TEST_PG_ENV, data_dir: Path | None = None) -> str:
    """The URL in `$env` (default 127.0.0.1:5432/test) or, if unreachable, an embedded server's."""
    global _embedded
    url = os.environ.get(env, DEFAULT_TEST_PG)
    if reachable(url):
        return url
    log.warning("no PostgreSQL at %s; starting an embedded one (pgserver)", url)
    import pgserver

    if _embedded is None:
        data_dir = data_dir or Path(tempfile.mkdtemp(prefix="omop-etl-pg-"))
        _embedded = pgserver.get_server(data_dir, cleanup_mode="stop")
    uri = sa.engine.make_url(_embedded.get_uri())
    return str(uri.set(drivername="postgresql+psycopg", password=None).render_as_string(False))
