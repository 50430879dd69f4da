"""The DuckDB pseudonym macro is RFC 2104 HMAC-SHA256, whatever the key's bytes, computed
by the compiled kernel (etl/native/_hmac.c) or by the SQL macro: the same digests."""

from __future__ import annotations

import random

import duckdb
import pyarrow as pa
import pytest

from etl.pseudonym import (
    DIGEST_CHARS,
    _arrow_pseudonyms,
    install_duckdb_macro,
    native_kernel,
    pseudonym,
    repeated_pseudonyms,
)

KEYS = [
    b"site-secret-0123456789",  # shorter than a block: zero-padded
    bytes(range(192, 256)),  # a whole block of high bytes
    bytes(range(256)) * 2,  # longer than a block: hashed first
    b"'\\x00; DROP TABLE person; --",  # quotes and escapes in the key
]
VALUES = ["1e5a3c9b-0000-4000-8000-000000000001", "", "Ünïcødé €", "x" * 200]


# the compiled kernel where setup.py could build it (a C compiler), and the SQL macro
NATIVE = [
    pytest.param(True, id="kernel", marks=pytest.mark.skipif(
        native_kernel() is None, reason="no compiled kernel: the SQL macro is used")),
    pytest.param(False, id="sql"),
]  # fmt: skip


@pytest.mark.parametrize("native", NATIVE)
@pytest.mark.parametrize("key", KEYS, ids=range(len(KEYS)))
def test_macro_equals_python_hmac(key: bytes, native: bool) -> None:
    con = duckdb.connect()
    install_duckdb_macro(con, key, native=native)
    got = con.execute(
        "SELECT v, omop_etl_pseudonym(v) FROM unnest(?::VARCHAR[]) t(v)", [[*VALUES, None]]
    ).fetchall()
    assert dict(got) == {**{v: pseudonym(key, v) for v in VALUES}, None: None}
    assert all(len(p) == DIGEST_CHARS for v, p in got if v is not None)


@pytest.mark.parametrize("native", NATIVE)
def test_macro_keeps_key_material_out_of_errors(native: bool) -> None:
    """Callers write omop_etl_pseudonym(x); the pads are only in the macro's body and the
    key only in the kernel function's closure, which a binder error does not quote."""
    con = duckdb.connect()
    install_duckdb_macro(con, KEYS[0], native=native)
    for bad in ("omop_etl_pseudonym(no_such_column)", "omop_etl_pseudonym(1, 2)"):
        with pytest.raises(duckdb.Error) as err:
            con.execute(f"SELECT {bad}")
        message = str(err.value)
        assert "BLOB" not in message and "sha256" not in message, bad
        assert KEYS[0].decode() not in message, bad


@pytest.mark.skipif(native_kernel() is None, reason="no compiled kernel: the SQL macro is used")
def test_kernel_and_macro_agree_on_many_values() -> None:
    """Over several of DuckDB's vectors, with NULLs, every length from 0 to 300 bytes (one,
    two and more SHA-256 blocks, and the padding's edge at 55/56 bytes), and multi-byte
    text; and on Arrow arrays that are slices or large strings."""
    rnd = random.Random(7)
    values = ["".join(rnd.choice("aZ9-|\x1fé€𝄞") for _ in range(rnd.randint(0, 300)))
              for _ in range(6000)]  # fmt: skip
    values += ["x" * n for n in range(50, 70)]
    values = [None if i % 97 == 0 else v for i, v in enumerate(values)]
    key = KEYS[0]
    results = {}
    for native in (True, False):
        con = duckdb.connect()
        install_duckdb_macro(con, key, native=native)
        results[native] = con.execute(
            "SELECT omop_etl_pseudonym(v) FROM unnest(?::VARCHAR[]) WITH ORDINALITY t(v, i)"
            " ORDER BY i",
            [values],
        ).fetchall()
    assert results[True] == results[False]
    assert [r[0] for r in results[True]] == [
        None if v is None else pseudonym(key, v) for v in values
    ]
    kernel = _arrow_pseudonyms(native_kernel(), key)
    array = pa.array(values)
    expected = [None if v is None else pseudonym(key, v) for v in values[100:900]]
    for variant in (array.slice(100, 800), array.cast(pa.large_string()).slice(100, 800)):
        assert kernel(variant).to_pylist() == expected
    assert kernel(pa.array([], pa.string())).to_pylist() == []
    assert kernel(pa.chunked_array([array[:10], array[10:20]])).to_pylist() == [
        None if v is None else pseudonym(key, v) for v in values[:20]
    ]


@pytest.mark.skipif(native_kernel() is None, reason="no compiled kernel: the SQL macro is used")
def test_the_kernels_portable_compression_gives_the_same_digests() -> None:
    """Without SHA extensions (another CPU, an ARM laptop) the portable C compression runs:
    forced here, it gives Python's digests too (keys shorter and longer than a block)."""
    kernel = native_kernel()
    values = pa.array(["", "a", "é" * 40, "x" * 55, "x" * 56, "y" * 300, None])
    expected = {
        key: [None if v is None else pseudonym(key, v) for v in values.to_pylist()] for key in KEYS
    }
    try:
        assert kernel.use_portable(True) == "portable"
        for key in KEYS:
            assert _arrow_pseudonyms(kernel, key)(values).to_pylist() == expected[key]
    finally:
        default = kernel.use_portable(False)
    assert default == kernel.IMPLEMENTATION
    for key in KEYS:
        assert _arrow_pseudonyms(kernel, key)(values).to_pylist() == expected[key]


def test_a_kernel_asked_for_but_not_built_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import etl.pseudonym

    monkeypatch.setattr(etl.pseudonym, "native_kernel", lambda: None)
    with pytest.raises(RuntimeError, match="not built"):
        install_duckdb_macro(duckdb.connect(), KEYS[0], native=True)
    con = duckdb.connect()
    install_duckdb_macro(con, KEYS[0])  # by default: the SQL macro
    assert con.execute("SELECT omop_etl_pseudonym('a')").fetchall() == [(pseudonym(KEYS[0], "a"),)]


@pytest.mark.parametrize("native", NATIVE)
def test_repeated_values_get_their_own_pseudonym_in_their_rows_order(native: bool) -> None:
    """Each distinct value hashed once, every row given its own value's HMAC, in order,
    NULL kept; a chunked column (several blocks) the same as a whole one."""
    key = KEYS[0]
    con = duckdb.connect()
    install_duckdb_macro(con, key, native=native)
    rng = random.Random(3)
    values = [rng.choice([*VALUES, None, "P1", "P2"]) for _ in range(500)]
    expected = [None if v is None else pseudonym(key, v) for v in values]
    whole = repeated_pseudonyms(con, pa.array(values, pa.string()))
    chunked = repeated_pseudonyms(
        con, pa.chunked_array([pa.array(values[:123], pa.string()), pa.array(values[123:])])
    )
    assert whole.to_pylist() == expected
    assert chunked.to_pylist() == expected

    class Recording:  # the connection, recording what is handed to it to hash
        def __init__(self) -> None:
            self.hashed: list[int] = []

        def register(self, name: str, table: pa.Table) -> None:
            self.hashed.append(table.num_rows)
            con.register(name, table)

        def __getattr__(self, name: str):  # type: ignore[no-untyped-def]
            return getattr(con, name)

    recording = Recording()
    assert repeated_pseudonyms(recording, pa.array(values, pa.string())).to_pylist() == expected
    assert recording.hashed == [len({v for v in values if v is not None})]  # each once
    assert repeated_pseudonyms(con, pa.array([None, None], pa.string())).to_pylist() == [None, None]
    assert repeated_pseudonyms(con, pa.array([], pa.string())).to_pylist() == []
