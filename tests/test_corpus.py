"""The bad-input corpus (tests/corpus/): every case read, nothing lost, every reason named.

Each EHR case is a folder holding one file named like the demo file it stands in for
(tests/corpus/ehr/README.md). Extraction alone is run on every case; the cases marked
`append` or `replace` also go through one whole pipeline run on DuckDB, their rows
appended to (or their file replacing) the demo export's file, and each record must end
where the table says: loaded (a published row comes from its line), quarantined with the
reason, or filtered by the rule, with report.json's accounting adding up for every file.
The lab (HL7) and PACS (DICOM) corpora have the same shape of test.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
import yaml

from etl.config import FeedConfig
from etl.sources.dicom import extract_dicom
from etl.sources.ehr import Extract, extract_ehr
from etl.sources.hl7v2 import extract_hl7
from etl.sources.profile import load_profile
from tests.conftest import DEMO_SYNTHEA, REPO, TEST_KEY
from tests.pipeline_helpers import query, run, write_config

CORPUS = REPO / "tests" / "corpus"
KEY = TEST_KEY.encode()
LOADED = ("loaded", "")
# rules applied while building (after extraction, which passes these records on)
BUILD_RULES = {"unknown_person", "duplicate_key", "event_before_birth", "event_after_death"}
UTF16 = "the file is UTF-16 (byte-order mark), not utf-8 as the profile declares"
RUNAWAY = "a quote opened in the record of line 3 is never closed: it runs to the end of the file"


def q(reason: str) -> tuple[str, str]:
    return ("quarantined", reason)


def f(rule: str) -> tuple[str, str]:
    return ("filtered", rule)


@dataclass(frozen=True)
class Case:
    """One corpus folder: its file, how the pipeline run uses it, and each record's fate
    by the physical line where the record starts."""

    file: str
    expect: dict[int, tuple[str, str]]
    mode: str | None = None  # append | replace: in the pipeline run; None: extraction only
    message: str | None = None
    unmapped: set[tuple[str, str]] = field(default_factory=set)  # (vocabulary, code)


EHR_CASES = {
    "bad_dates": Case(
        "conditions.csv",
        {
            2: q("START is not a recognised date"),  # month 13
            3: q("START is not a recognised date"),  # 31/12/2020
            4: q("START is not a recognised date"),  # yesterday
            5: q("START is empty"),
            6: q("STOP is not a recognised date"),  # Feb 30
            7: LOADED,
        },
        "append",
    ),
    "impossible_dates": Case(
        "medications.csv",
        {
            2: q("START is not a recognised date"),  # Feb 30
            3: q("START is before 1850"),
            4: q("START is in the future"),
            5: q("START is before 1850"),  # year 0
            6: LOADED,  # an end date may lie ahead
        },
        "append",
    ),
    "latin1": Case(
        "procedures.csv",
        {2: q("CODE is not valid text in the declared encoding"), 3: LOADED},
        "append",
    ),
    "utf16": Case("immunizations.csv", {2: q(UTF16), 3: q(UTF16)}, "replace", UTF16),
    "bom_crlf": Case("careplans.csv", {2: LOADED, 3: LOADED}, "replace"),
    "empty": Case("supplies.csv", {}, "replace", "empty file"),
    "header_only": Case("devices.csv", {}, "replace"),
    "missing_column": Case(
        "imaging_studies.csv",
        {n: q("column(s) missing from the file: PROCEDURE_CODE") for n in (2, 3)},
        "replace",
        "column(s) missing from the file: PROCEDURE_CODE",
    ),
    "extra_columns": Case("conditions.csv", {2: LOADED, 3: q("expected 7 fields, found 6")}),
    "field_count": Case(
        "observations.csv",
        {2: q("expected 9 fields, found 10"), 3: q("expected 9 fields, found 4"), 4: LOADED},
        "append",
    ),
    "quotes": Case("conditions.csv", {2: LOADED, 3: LOADED, 4: LOADED, 6: LOADED}, "append"),
    "unterminated_quote": Case("conditions.csv", {2: LOADED, 3: q(RUNAWAY)}),
    "duplicate_keys": Case(
        "encounters.csv",
        {2: LOADED, 3: q("duplicate_key"), 4: q("duplicate_key")},  # 4: a demo encounter's Id
        "append",
    ),
    "unknown_patient": Case("conditions.csv", {2: q("unknown_person")}, "append"),
    "birth_death": Case(
        "conditions.csv",
        {2: f("event_before_birth"), 3: f("event_after_death"), 4: LOADED},
        "append",
    ),
    "values": Case(
        "observations.csv",
        {
            2: LOADED,  # -5 cm: loaded; plausibility is the gate's (DQD) business
            3: LOADED,  # 1e308
            4: q("VALUE is not a finite number"),  # NaN
            5: q("VALUE is not a finite number"),  # Infinity
            6: q("VALUE is not a number"),
            7: q("VALUE is not a finite number"),  # -inf
            8: LOADED,  # a text result (TYPE text)
        },
        "append",
    ),
    "unknown_vocabulary": Case(
        "allergies.csv",
        {2: LOADED, 3: LOADED},
        "append",
        unmapped={("HOSPITAL-LOCAL", "LOC-77"), ("SNOMED", "999999999")},
    ),
    "patients": Case(
        "patients.csv",
        {
            2: q("BIRTHDATE is before 1850"),
            3: q("BIRTHDATE is in the future"),
            4: q("BIRTHDATE is empty"),
            5: q("BIRTHDATE is not a recognised date"),  # Feb 30
            6: q("DEATHDATE is before 1850"),
            7: LOADED,
            8: q("duplicate_key"),  # a demo patient's Id again
        },
        "append",
    ),
}


def _extract_ehr(folder: Path) -> tuple[dict[str, Any], Extract]:
    sink = Extract()
    files = extract_ehr("ehr", folder, load_profile("synthea"), KEY, sink)
    return {s.file: s for s in files}, sink


def _extracted_lines(sink: Extract, file: str) -> list[int]:
    lines = []
    for shape in ("person", "visit", "event"):
        lines += [
            r["source_line"] for r in sink.table(shape).to_pylist() if r["source_file"] == file
        ]
    return sorted(lines)


def test_the_corpus_readme_lists_every_case() -> None:
    readme = (CORPUS / "ehr" / "README.md").read_text(encoding="utf-8")
    folders = {p.name for p in (CORPUS / "ehr").iterdir() if p.is_dir()}
    assert folders == set(EHR_CASES)
    for name, case in EHR_CASES.items():
        assert f"`{name}/{case.file}`" in readme, name
        assert [p.name for p in (CORPUS / "ehr" / name).iterdir()] == [case.file]


@pytest.mark.parametrize("name", sorted(EHR_CASES))
def test_ehr_case_extraction(name: str) -> None:
    case = EHR_CASES[name]
    files, sink = _extract_ehr(CORPUS / "ehr" / name)
    st = files[case.file]
    assert st.message == case.message
    assert st.records_in == st.extracted + st.quarantined + sum(st.filtered.values())
    assert st.records_in == len(case.expect)
    reasons = {
        r["source_line"]: r["reason"]
        for r in sink.table("quarantine").to_pylist()
        if r["source_file"] == case.file
    }
    at_extraction = {
        line: why for line, (status, why) in case.expect.items() if why and why not in BUILD_RULES
    }
    assert reasons == at_extraction
    assert _extracted_lines(sink, case.file) == sorted(set(case.expect) - set(at_extraction))


def test_a_field_larger_than_a_read_block_is_read(tmp_path: Path) -> None:
    """20 MB in one field (the reader's block is 16 MB): the record and its neighbour load."""
    src = (CORPUS / "ehr" / "quotes" / "conditions.csv").read_text(encoding="utf-8")
    header, first = src.splitlines()[:2]
    giant = first.replace('"Chronic sinusitis, recurrent"', "x" * (20 << 20))
    (tmp_path / "conditions.csv").write_text(f"{header}\n{giant}\n{first}\n", encoding="utf-8")
    files, sink = _extract_ehr(tmp_path)
    st = files["conditions.csv"]
    assert (st.records_in, st.extracted, st.quarantined) == (2, 2, 0)
    assert _extracted_lines(sink, "conditions.csv") == [2, 3]


@pytest.mark.parametrize(
    ("data", "records", "reason"),
    [
        # UTF-16 without a byte-order mark: NULs in the header
        ("utf-16-le", 2, "the header holds NUL bytes: the file is not utf-8 text (UTF-16?)"),
        ("utf-16-be", 2, "the header holds NUL bytes: the file is not utf-8 text (UTF-16?)"),
        ("header+newline", 0, None),
    ],
)
def test_more_whole_file_cases(data: str, records: int, reason: str | None, tmp_path) -> None:
    text = (CORPUS / "ehr" / "quotes" / "conditions.csv").read_text(encoding="utf-8")
    lines = text.splitlines(keepends=True)
    if data == "header+newline":
        raw = lines[0].encode()
    else:
        raw = (lines[0] + lines[1] + lines[2]).encode(data)
    (tmp_path / "conditions.csv").write_bytes(raw)
    files, sink = _extract_ehr(tmp_path)
    st = files["conditions.csv"]
    assert (st.records_in, st.quarantined, st.message) == (records, records, reason)
    assert {r["reason"] for r in sink.table("quarantine").to_pylist()} == (
        {reason} if records else set()
    )


# --- the whole pipeline: the demo export with the corpus cases mixed in -------------------


def _data_lines(path: Path) -> int:
    return path.read_bytes().count(b"\n") - 1


def _mix_into_demo(feed: Path) -> dict[tuple[str, int], tuple[str, str, str]]:
    """Copy the demo export into `feed` with the pipeline cases in; (file, line) -> fate."""
    shutil.copytree(DEMO_SYNTHEA, feed)
    where: dict[tuple[str, int], tuple[str, str, str]] = {}
    for name, case in EHR_CASES.items():
        source = CORPUS / "ehr" / name / case.file
        target = feed / case.file
        if case.mode == "replace":
            shutil.copyfile(source, target)
            offset = 0
        elif case.mode == "append":
            offset = _data_lines(target)  # the case's line 2 follows the file's last line
            rows = source.read_bytes().split(b"\n", 1)[1]
            with target.open("ab") as fh:
                fh.write(rows)
        else:
            continue
        for line, (status, why) in case.expect.items():
            where[(case.file, line + offset)] = (status, why, name)
    return where


@pytest.fixture(scope="module")
def mixed(tmp_path_factory: pytest.TempPathFactory, duckdb_module_wh):
    tmp = tmp_path_factory.mktemp("corpus-run")
    wh, schema = duckdb_module_wh(tmp)
    where = _mix_into_demo(tmp / "feed")
    config = write_config(tmp, wh, schema, tmp / "feed")
    # the lab and PACS corpora ride along in the same run, as feeds of their own
    cfg = yaml.safe_load(config.read_text(encoding="utf-8"))
    for feed, kind, corpus, suffix in (
        ("lab", "hl7v2", "hl7v2", ".hl7"),
        ("pacs", "dicom", "dicom", ".dcm"),
    ):
        folder = tmp / feed
        folder.mkdir()
        for path in sorted((CORPUS / corpus).glob(f"*{suffix}")):
            shutil.copyfile(path, folder / path.name)
        cfg["feeds"].append({"name": feed, "kind": kind, "path": str(folder)})
    config.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMOP_ETL_PSEUDONYM_KEY", TEST_KEY)
        result = run(config, tmp)
    return wh, schema, tmp / "feed", where, result


@pytest.fixture(scope="module")
def duckdb_module_wh():
    from etl.warehouse import open_warehouse

    opened = []

    def make(tmp: Path):
        wh = open_warehouse(f"duckdb:///{tmp / 'warehouse.duckdb'}")
        opened.append(wh)
        return wh, "main"

    yield make
    for wh in opened:
        wh.close()


def test_corpus_cases_through_the_pipeline(mixed) -> None:
    wh, schema, feed, where, result = mixed
    assert result.status == "published", result.report["errors"]
    report = result.report
    # accounting: every file adds up, and counts every record of the mixed files
    for name, st in report["feeds"]["ehr"]["files"].items():
        assert st["records_in"] == st["loaded"] + st["quarantined"] + st["filtered"], name
    touched = {file for file, _ in where} | {
        c.file for c in EHR_CASES.values() if c.mode == "replace"
    }
    files = report["feeds"]["ehr"]["files"]
    for name in touched:
        demo_only = _data_lines(DEMO_SYNTHEA / name) if (feed / name).stat().st_size else 0
        mine = [k for k in where if k[0] == name]
        appended = any(EHR_CASES[where[k][2]].mode == "append" for k in mine)
        expected = (demo_only if appended else 0) + len(mine)
        assert files[name]["records_in"] == expected, name
    feed_totals = report["feeds"]["ehr"]
    assert feed_totals["records_in"] == (
        feed_totals["loaded"] + feed_totals["quarantined"] + feed_totals["filtered"]
    )
    assert files["supplies.csv"]["message"] == "empty file"
    assert files["immunizations.csv"]["message"] == UTF16

    # each record where the corpus table says
    run_dir = result.run_dir
    fates: dict[tuple[str, int], tuple[str, str]] = {}
    for r in pq.read_table(run_dir / "quarantine" / "extraction.parquet").to_pylist():
        fates[(r["source_file"], r["source_line"])] = ("quarantined", r["reason"])
    for r in pq.read_table(run_dir / "quarantine" / "build.parquet").to_pylist():
        fates[(r["source_file"], r["source_line"])] = (r["status"], r["rule"])
    lineage = {
        (file, line)
        for file, line in query(
            wh,
            f'SELECT DISTINCT source_file, source_line FROM "{schema}_etl".lineage'
            " WHERE feed = 'ehr'",
        )
    }
    for key, (status, why, case) in sorted(where.items()):
        if status == "loaded":
            assert key in lineage and key not in fates, (case, key)
        else:
            assert fates.get(key) == (status, why), (case, key)

    # codes of unknown vocabularies load with concept 0 and are listed as unmapped
    unmapped = {(u["vocabulary_id"], u["source_code"]) for u in report["unmapped"]}
    for case in EHR_CASES.values():
        assert case.unmapped <= unmapped
    # the corpus' reasons reach the report, counted per file
    reasons = {(r["file"], r["reason"]) for r in report["quarantine"]}
    assert ("medications.csv", "START is in the future") in reasons
    assert ("immunizations.csv", UTF16) in reasons


# --- the lab feed (HL7 v2): the cases added to tests/corpus/hl7v2 -------------------------


def _extract_hl7(path: Path) -> tuple[dict[str, Any], Extract]:
    sink = Extract()
    files = extract_hl7(FeedConfig(name="lab", kind="hl7v2", path=path), KEY, sink)
    return {s.file: s for s in files}, sink


def test_hl7_dates_encodings_and_giant_fields(tmp_path: Path) -> None:
    corpus = CORPUS / "hl7v2"
    names = ("implausible_dates.hl7", "utf16.hl7", "unknown_patient.hl7")
    for name in names:
        shutil.copyfile(corpus / name, tmp_path / name)
    files, sink = _extract_hl7(tmp_path)
    for st in files.values():
        assert st.records_in == st.extracted + st.quarantined + sum(st.filtered.values())
    reasons = {
        (r["source_file"], r["source_line"]): r["reason"]
        for r in sink.table("quarantine").to_pylist()
    }
    dates = files["implausible_dates.hl7"]
    assert (dates.records_in, dates.extracted, dates.quarantined) == (3, 1, 2)
    assert reasons[("implausible_dates.hl7", 1)] == "OBX-14 is in the future"
    assert reasons[("implausible_dates.hl7", 2)] == "OBX-14 is before 1850"
    utf16 = files["utf16.hl7"]
    assert (utf16.records_in, utf16.extracted, utf16.quarantined) == (1, 1, 0)
    assert "UTF-16" in (utf16.message or "")
    # an unknown patient's result is extracted; the build quarantines it (unknown_person)
    assert files["unknown_patient.hl7"].extracted == 1


# --- the PACS feed (DICOM): tests/corpus/dicom, made by make_corpus.py ------------------

DICOM_CASES = {
    "good.dcm": None,
    "future_date.dcm": "StudyDate is in the future",
    "year_1800.dcm": "StudyDate is before 1850",
    "impossible_date.dcm": "no valid StudyDate or SeriesDate",
    "no_modality.dcm": "required tag(s) missing or empty: Modality",
    "unknown_patient.dcm": None,
    "utf8_name.dcm": None,
    "giant_field.dcm": None,
    "truncated.dcm": "truncated DICOM file",
    "empty.dcm": "empty file",
    "not_dicom.dcm": "not a DICOM file",
}


def test_dicom_corpus_is_regenerated_byte_for_byte(tmp_path: Path) -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "make_corpus", CORPUS / "dicom" / "make_corpus.py"
    )
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.HERE = tmp_path
    with pytest.warns(UserWarning):  # the giant value is written as UN, as pydicom says
        module.main()
    for name in DICOM_CASES:
        assert (tmp_path / name).read_bytes() == (CORPUS / "dicom" / name).read_bytes(), name


def test_dicom_cases_extraction(tmp_path: Path) -> None:
    for name in DICOM_CASES:
        shutil.copyfile(CORPUS / "dicom" / name, tmp_path / name)
    sink = Extract()
    stats = extract_dicom(FeedConfig(name="pacs", kind="dicom", path=tmp_path), KEY, sink)
    files = {s.file: s for s in stats}
    assert set(files) == set(DICOM_CASES)
    reasons = {r["source_file"]: r["reason"] for r in sink.table("quarantine").to_pylist()}
    for name, reason in DICOM_CASES.items():
        st = files[name]
        assert st.records_in == st.extracted + st.quarantined == 1, name
        assert st.message == reason and reasons.get(name) == reason, name
    images = {r["source_file"] for r in sink.table("image").to_pylist()}
    assert images == {n for n, r in DICOM_CASES.items() if r is None}


def test_lab_and_pacs_corpora_through_the_pipeline(mixed) -> None:
    wh, schema, _, _, result = mixed
    assert result.status == "published", result.report["errors"]
    report = result.report
    for feed in ("lab", "pacs"):
        files = report["feeds"][feed]["files"]
        for name, st in files.items():
            assert st["records_in"] == st["loaded"] + st["quarantined"] + st["filtered"], name
    assert set(report["feeds"]["pacs"]["files"]) == set(DICOM_CASES)
    run_dir = result.run_dir
    fates = {
        (r["feed"], r["source_file"], r["source_line"]): r["reason"]
        for r in pq.read_table(run_dir / "quarantine" / "extraction.parquet").to_pylist()
    }
    fates.update(
        {
            (r["feed"], r["source_file"], r["source_line"]): r["rule"]
            for r in pq.read_table(run_dir / "quarantine" / "build.parquet").to_pylist()
        }
    )
    assert fates[("lab", "implausible_dates.hl7", 1)] == "OBX-14 is in the future"
    assert fates[("lab", "implausible_dates.hl7", 2)] == "OBX-14 is before 1850"
    assert fates[("lab", "unknown_patient.hl7", 1)] == "unknown_person"
    assert fates[("pacs", "unknown_patient.dcm", 1)] == "unknown_person"
    for name, reason in DICOM_CASES.items():
        if reason is not None:
            assert fates[("pacs", name, 1)] == reason, name
    loaded = {
        file
        for (file,) in query(
            wh, f"SELECT DISTINCT source_file FROM \"{schema}_etl\".lineage WHERE feed = 'pacs'"
        )
    }
    assert {"good.dcm", "utf8_name.dcm", "giant_field.dcm"} <= loaded


def test_hl7_reasons_never_quote_a_value(tmp_path: Path) -> None:
    """A bad value may be anything a person typed (a name, a number): reasons name the field."""
    message = "\r".join(
        [
            "MSH|^~\\&|LAB|HOSP|ETL|SITE|20240301101500||ORU^R01^ORU_R01|V1|P|2.5.1",
            "PID|1||MRNV1^^^HOSP^MR||Doe^Jane||19800101|F",
            "OBR|1||ORDCORPUSV1^LAB|24323-8^Panel^LN|||20240301101500",
            "OBX|1|NM|2339-0^Glucose^LN||called Dr Quackenbush|mg/dL|||||F|||20240301",
            "OBX|2|NM|2339-0^Glucose^LN||95|mg/dL|||||F|||MRNV1",
            "OBX|3|SN|2339-0^Glucose^LN||Quackenbush^5|mg/dL|||||F|||20240301",
        ]
    )
    (tmp_path / "v.hl7").write_text(message + "\r", encoding="utf-8")
    _, sink = _extract_hl7(tmp_path)
    reasons = [r["reason"] for r in sink.table("quarantine").to_pylist()]
    assert reasons == [
        "OBX-5 is not a number",
        "OBX-14 is not an HL7 datetime",
        "OBX-5 comparator is not one of < > <= >= = <>",
    ]
