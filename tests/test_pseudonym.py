"""The DuckDB pseudonym macro is RFC 2104 HMAC-SHA256, whatever the key's bytes."""

from __future__ import annotations

import duckdb
import pytest

from etl.pseudonym import DIGEST_CHARS, install_duckdb_macro, pseudonym

KEYS = [
    b"site-secret-0123456789",  # shorter than a block: zero-padded
    bytes(range(192, 256)),  # a whole block of high bytes
    bytes(range(256)) * 2,  # longer than a block: hashed first
    b"'\\x00; DROP TABLE person; --",  # quotes and escapes in the key
]
VALUES = ["1e5a3c9b-0000-4000-8000-000000000001", "", "Ünïcødé €", "x" * 200]


@pytest.mark.parametrize("key", KEYS, ids=range(len(KEYS)))
def test_macro_equals_python_hmac(key: bytes) -> None:
    con = duckdb.connect()
    install_duckdb_macro(con, key)
    got = con.execute(
        "SELECT v, omop_etl_pseudonym(v) FROM unnest(?::VARCHAR[]) t(v)", [[*VALUES, None]]
    ).fetchall()
    assert dict(got) == {**{v: pseudonym(key, v) for v in VALUES}, None: None}
    assert all(len(p) == DIGEST_CHARS for v, p in got if v is not None)


def test_macro_keeps_key_material_out_of_errors() -> None:
    """Callers write omop_etl_pseudonym(x); the pads are only in the macro's body, which
    a binder error does not quote."""
    con = duckdb.connect()
    install_duckdb_macro(con, KEYS[0])
    for bad in ("omop_etl_pseudonym(no_such_column)", "omop_etl_pseudonym(1, 2)"):
        with pytest.raises(duckdb.Error) as err:
            con.execute(f"SELECT {bad}")
        assert "BLOB" not in str(err.value) and "sha256" not in str(err.value), bad
