"""The Athena loader: demo release, malformed releases, atomic replacement, on both engines."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import pytest
import sqlalchemy as sa
from typer.testing import CliRunner

from etl.cli import app
from etl.vocab import VocabularyError, load_vocabulary
from tests.conftest import DEMO_VOCAB

ATHENA_FILES = [
    "VOCABULARY",
    "DOMAIN",
    "CONCEPT_CLASS",
    "RELATIONSHIP",
    "CONCEPT",
    "CONCEPT_RELATIONSHIP",
    "CONCEPT_ANCESTOR",
    "CONCEPT_SYNONYM",
    "DRUG_STRENGTH",
]


def _data_lines(path: Path) -> list[list[str]]:
    with path.open(encoding="utf-8", newline="") as fh:
        return list(csv.reader(fh, delimiter="\t", quoting=csv.QUOTE_NONE))


@pytest.fixture
def release(tmp_path: Path) -> Path:
    """A writable copy of the bundled demo release."""
    dest = tmp_path / "release"
    dest.mkdir()
    for name in ATHENA_FILES:
        shutil.copy(DEMO_VOCAB / f"{name}.csv", dest / f"{name}.csv")
    return dest


def _append(path: Path, *rows: str) -> int:
    """Append raw lines; returns the line number of the first appended line."""
    first = len(path.read_text(encoding="utf-8").splitlines()) + 1
    with path.open("a", encoding="utf-8") as fh:
        for row in rows:
            fh.write(row + "\n")
    return first


def _fingerprint(wh, schema: str) -> dict[str, tuple]:
    out = {}
    with wh.begin() as conn:
        for table, col in [
            ("concept", "concept_id"),
            ("concept_relationship", "concept_id_1"),
            ("concept_ancestor", "descendant_concept_id"),
            ("vocabulary", "vocabulary_concept_id"),
        ]:
            q = f"SELECT count(*), sum({col}) FROM {wh.qualified(schema, table)}"
            out[table] = tuple(conn.execute(sa.text(q)).one())
    return out


def test_demo_release_loads_every_row(warehouse) -> None:
    wh, schema = warehouse
    result = load_vocabulary(wh, DEMO_VOCAB, schema)
    with wh.begin() as conn:
        for name in ATHENA_FILES:
            expected = len(_data_lines(DEMO_VOCAB / f"{name}.csv")) - 1
            assert result.rows[name.lower()] == expected, name
            assert wh.count_rows(conn, schema, name.lower()) == expected, name
        # values survive typing: a date, a null and a name as in the file
        row = conn.execute(
            sa.text(
                "SELECT concept_name, standard_concept, valid_start_date, invalid_reason"
                f" FROM {wh.qualified(schema, 'concept')} WHERE concept_id = 8507"
            )
        ).one()
    src = next(r for r in _data_lines(DEMO_VOCAB / "CONCEPT.csv") if r[0] == "8507")
    assert row.concept_name == src[1]
    assert (row.standard_concept or "") == src[5]
    assert row.valid_start_date.strftime("%Y%m%d") == src[7]
    assert row.invalid_reason is None
    assert result.vocabulary_version and "v5.0" in result.vocabulary_version
    # the demo subset lacks metadata concepts: reported, not fatal, not invented
    assert any("vocabulary_concept_id" in w for w in result.warnings)


def test_embedded_quotes_are_data_not_syntax(warehouse, release: Path) -> None:
    wh, schema = warehouse
    name = 'Patient said "not today" and left\'s'
    _append(
        release / "CONCEPT.csv",
        f"2000000001\t{name}\tObservation\tSNOMED\tClinical Finding\t\tX1\t20200101\t20991231\t",
        '2000000002\t"\tObservation\tSNOMED\tClinical Finding\t\tX2\t20200101\t20991231\t',
    )
    load_vocabulary(wh, release, schema)
    with wh.begin() as conn:
        got = dict(
            conn.execute(
                sa.text(
                    f"SELECT concept_id, concept_name FROM {wh.qualified(schema, 'concept')}"
                    " WHERE concept_id >= 2000000001"
                )
            ).all()
        )
    assert got == {2000000001: name, 2000000002: '"'}


CONCEPT_ROW = "2000000001\tX\tObservation\tSNOMED\tClinical Finding\t\tX1\t{start}\t20991231\t"


def _missing_column(release: Path) -> tuple[str, int | None]:
    path = release / "CONCEPT.csv"
    rows = _data_lines(path)
    idx = rows[0].index("concept_code")
    path.write_text(
        "\n".join("\t".join(r[:idx] + r[idx + 1 :]) for r in rows) + "\n", encoding="utf-8"
    )
    return "CONCEPT.csv:1: missing column(s): concept_code", None


def _bad_date(release: Path) -> tuple[str, int | None]:
    line = _append(release / "CONCEPT.csv", CONCEPT_ROW.format(start="20201345"))
    return f"CONCEPT.csv:{line}: valid_start_date: '20201345' is not a date", line


def _duplicate_key(release: Path) -> tuple[str, int | None]:
    first = _data_lines(release / "CONCEPT.csv")[1]
    line = _append(release / "CONCEPT.csv", "\t".join(first))
    return f"CONCEPT.csv:{line}: duplicate key (concept_id={int(first[0])})", line


def _short_row(release: Path) -> tuple[str, int | None]:
    line = _append(release / "CONCEPT_RELATIONSHIP.csv", "8507\t8507\tMaps to")
    return f"CONCEPT_RELATIONSHIP.csv:{line}: expected 6 tab-separated fields, found 3", line


def _not_an_integer(release: Path) -> tuple[str, int | None]:
    line = _append(release / "CONCEPT_ANCESTOR.csv", "8507\tabc\t0\t0")
    return f"CONCEPT_ANCESTOR.csv:{line}: descendant_concept_id: 'abc' is not an integer", line


def _dangling_relationship(release: Path) -> tuple[str, int | None]:
    line = _append(
        release / "CONCEPT_RELATIONSHIP.csv", "8507\t999999999\tMaps to\t19700101\t20991231\t"
    )
    return f"CONCEPT_RELATIONSHIP.csv:{line}: concept_id_2 999999999 not in concept", line


def _missing_required_value(release: Path) -> tuple[str, int | None]:
    line = _append(release / "DOMAIN.csv", "Nothing\t\t0")
    return f"DOMAIN.csv:{line}: domain_name is required but empty", line


def _missing_file(release: Path) -> tuple[str, int | None]:
    (release / "RELATIONSHIP.csv").unlink()
    return "RELATIONSHIP.csv: file missing from release", None


def _bad_encoding(release: Path) -> tuple[str, int | None]:
    row = CONCEPT_ROW.format(start="20200101").replace("\tX\t", "\tCaf\xe9\t")
    with (release / "CONCEPT.csv").open("ab") as fh:
        fh.write(row.encode("latin-1") + b"\n")  # Latin-1 bytes in a UTF-8 release
    line = len((release / "CONCEPT.csv").read_bytes().splitlines())
    return f"CONCEPT.csv:{line}: unreadable: not valid UTF-8", None


MALFORMED = [
    _missing_column,
    _bad_date,
    _duplicate_key,
    _short_row,
    _not_an_integer,
    _dangling_relationship,
    _missing_required_value,
    _missing_file,
    _bad_encoding,
]


@pytest.mark.parametrize("breakage", MALFORMED, ids=lambda f: f.__name__.strip("_"))
def test_malformed_release_is_refused_and_previous_kept(warehouse, release: Path, breakage) -> None:
    wh, schema = warehouse
    load_vocabulary(wh, DEMO_VOCAB, schema)
    before = _fingerprint(wh, schema)
    expected_message, _line = breakage(release)
    with pytest.raises(VocabularyError) as err:
        load_vocabulary(wh, release, schema)
    assert expected_message in str(err.value)
    assert _fingerprint(wh, schema) == before
    # the staging area is gone too
    assert f"{schema}_vocab_stage" not in sa.inspect(wh.engine).get_schema_names()


def test_new_release_replaces_previous(warehouse, release: Path) -> None:
    wh, schema = warehouse
    load_vocabulary(wh, DEMO_VOCAB, schema)
    # drop the ancestor table's rows and add one concept: the new release is what remains
    anc = release / "CONCEPT_ANCESTOR.csv"
    anc.write_text(anc.read_text(encoding="utf-8").splitlines()[0] + "\n", encoding="utf-8")
    _append(release / "CONCEPT.csv", CONCEPT_ROW.format(start="20200101"))
    result = load_vocabulary(wh, release, schema)
    with wh.begin() as conn:
        assert wh.count_rows(conn, schema, "concept_ancestor") == 0
        assert wh.count_rows(conn, schema, "concept") == result.rows["concept"]
    assert result.rows["concept"] == len(_data_lines(DEMO_VOCAB / "CONCEPT.csv"))


def test_optional_file_missing_loads_empty_with_warning(duckdb_wh, release: Path) -> None:
    wh, schema = duckdb_wh
    (release / "DRUG_STRENGTH.csv").unlink()
    result = load_vocabulary(wh, release, schema)
    assert result.rows["drug_strength"] == 0
    assert any("DRUG_STRENGTH" in w for w in result.warnings)


def test_upper_case_header_is_accepted(duckdb_wh, release: Path) -> None:
    wh, schema = duckdb_wh
    path = release / "DOMAIN.csv"
    lines = path.read_text(encoding="utf-8").splitlines()
    path.write_text("\n".join([lines[0].upper(), *lines[1:]]) + "\n", encoding="utf-8")
    assert load_vocabulary(wh, release, schema).rows["domain"] == len(lines) - 1


def test_cli_reports_file_line_and_exit_code(tmp_path: Path, release: Path) -> None:
    _bad_date(release)
    url = f"duckdb:///{tmp_path / 'w.duckdb'}"
    result = CliRunner().invoke(app, ["vocab", "load", str(release), "--warehouse", url])
    assert result.exit_code == 2
    assert "CONCEPT.csv:" in result.output and "is not a date" in result.output
    ok = CliRunner().invoke(app, ["vocab", "load", str(DEMO_VOCAB), "--warehouse", url])
    assert ok.exit_code == 0, ok.output
    assert "4,222" in ok.output
