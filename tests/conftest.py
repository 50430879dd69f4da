"""Shared fixtures: real DuckDB files and a real PostgreSQL (local server or embedded)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from etl.warehouse import Warehouse, open_warehouse
from etl.warehouse.embedded import postgres_url

REPO = Path(__file__).resolve().parents[1]
DEMO_VOCAB = REPO / "vocab"
DEMO_SYNTHEA = REPO / "demo" / "synthea27"
TEST_KEY = "test-pseudonym-key-0123456789abcdef"


@pytest.fixture(autouse=True)
def _pseudonym_key(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test runs with a fixed pseudonymisation key from the environment."""
    monkeypatch.setenv("OMOP_ETL_PSEUDONYM_KEY", TEST_KEY)


@contextmanager
def pseudonym_key_set() -> Iterator[None]:
    """The test key in the environment, for fixtures wider than a test (the autouse
    fixture above only covers each test's own body and function-scoped fixtures)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMOP_ETL_PSEUDONYM_KEY", TEST_KEY)
        yield


@pytest.fixture(scope="session")
def pg_url() -> str:
    return postgres_url()


@pytest.fixture
def duckdb_wh(tmp_path: Path) -> Iterator[tuple[Warehouse, str]]:
    wh = open_warehouse(f"duckdb:///{tmp_path / 'warehouse.duckdb'}")
    yield wh, "main"
    wh.close()


@pytest.fixture
def pg_wh(pg_url: str) -> Iterator[tuple[Warehouse, str]]:
    """A PostgreSQL warehouse with a private schema, dropped afterwards."""
    schema = f"t_{uuid.uuid4().hex[:10]}"
    wh = open_warehouse(pg_url)
    yield wh, schema
    drop_test_schemas(wh, schema)
    wh.close()


@pytest.fixture(params=["duckdb", pytest.param("postgresql", marks=pytest.mark.postgres)])
def warehouse(request: pytest.FixtureRequest) -> tuple[Warehouse, str]:
    """Each test using this runs once on DuckDB and once on PostgreSQL."""
    fixture = "duckdb_wh" if request.param == "duckdb" else "pg_wh"
    return request.getfixturevalue(fixture)


@pytest.fixture(
    scope="module", params=["duckdb", pytest.param("postgresql", marks=pytest.mark.postgres)]
)
def module_warehouse(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Warehouse, str, Path]]:
    """Like `warehouse`, shared by one module's tests: (warehouse, schema, work folder).

    For a fixture that publishes once per engine and tests that only read what it
    published (none of them may change the warehouse).
    """
    workdir = tmp_path_factory.mktemp(f"module_{request.param}")
    if request.param == "duckdb":
        wh = open_warehouse(f"duckdb:///{workdir / 'warehouse.duckdb'}")
        yield wh, "main", workdir
        wh.close()
        return
    schema = f"t_{uuid.uuid4().hex[:10]}"
    wh = open_warehouse(request.getfixturevalue("pg_url"))
    yield wh, schema, workdir
    drop_test_schemas(wh, schema)
    wh.close()


def drop_test_schemas(wh: Warehouse, schema: str) -> None:
    """Drop a PostgreSQL test's CDM schema and the stage, vocabulary and ETL schemas
    named after it."""
    with wh.begin() as conn:
        for suffix in ("", "_vocab_stage", "_stage", "_etl"):
            wh.drop_schema(conn, f"{schema}{suffix}")
