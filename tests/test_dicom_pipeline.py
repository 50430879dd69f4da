"""The PACS feed through the whole pipeline, with the demo EHR, on DuckDB and PostgreSQL."""

from __future__ import annotations

import datetime as dt
import re
import shutil
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pydicom

from etl.pseudonym import pseudonym
from etl.sources.dicom.synth import (
    FAKE_ACCESSION,
    FAKE_BIRTH_DATE,
    FAKE_INSTITUTION,
    FAKE_NAME,
    InstanceSpec,
    uid_from,
    write_instance,
)
from tests.conftest import DEMO_SYNTHEA, TEST_KEY
from tests.dicom_helpers import BAD_FILES, DEMO_PACS, headers, write_report, write_test_tree
from tests.pipeline_helpers import query, run, scalar, write_feeds_config

KEY = TEST_KEY.encode()
PATIENT = "280ee8b5-6ebb-11cf-e4db-8cf101827ec7"
ENCOUNTER = "55d800bc-7613-49be-f417-a808325415ab"
STUDY_UID = uid_from("82702944-686c-a8fa-9463-6b72152c58a5")
DX_SERIES = "1.2.840.99999999.1.98060115.1686052808412"


def _pacs_tree(root: Path) -> None:
    """The demo study (its DX instance, a second instance, an SR), test files, bad files."""
    shutil.copytree(DEMO_PACS, root / "demo")
    first = next((root / "demo").rglob("1.dcm"))
    ds = pydicom.dcmread(first)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = uid_from("second-instance")
    ds.InstanceNumber = 2
    ds.save_as(first.parent / "2.dcm", enforce_file_format=True)
    # a third instance cut short in transfer: quarantined, the rest of its series loads
    (first.parent / "3.dcm").write_bytes((first.parent / "2.dcm").read_bytes()[:700])
    write_report(
        root / "demo-sr" / "1.dcm",
        patient_id=PATIENT,
        study_uid=STUDY_UID,
        when=dt.datetime(2023, 6, 6, 12, 30),
    )
    # a study whose code is a Measurement concept (Screening mammography): no procedure
    for n in (1, 2):
        spec = InstanceSpec(
            patient_id=PATIENT,
            study_uid=uid_from("mammography-study"),
            series_uid=uid_from("mammography-series"),
            sop_uid=uid_from(f"mammography-{n}"),
            sop_class_uid="1.2.840.10008.5.1.4.1.1.1.2",
            modality="MG",
            when=dt.datetime(2023, 6, 6, 12, 40),
            instance_number=n,
            procedure_code="24623002",
        )
        write_instance(spec, root / "mammography" / f"{n}.dcm")
    write_test_tree(root)


def _config(tmp: Path, wh: Any, schema: str, pacs: Path) -> Path:
    return write_feeds_config(tmp / "site.yaml", wh.url, schema, ehr=DEMO_SYNTHEA, pacs=pacs)


def _identifying_values() -> set[str]:
    values = {FAKE_NAME, FAKE_ACCESSION, FAKE_INSTITUTION, "FAKE^REFERRER", "FAKE^OBSERVER"}
    for h in headers().values():
        for tag in ("PatientName", "PatientBirthDate", "AccessionNumber", "InstitutionName"):
            if h[tag]:
                values.add(h[tag])
    values.add(FAKE_BIRTH_DATE)
    values.add(PATIENT)
    return values


def _found(text: str, values: set[str]) -> list[str]:
    """Values in `text`; a short one only as a word of its own."""
    return sorted(
        v for v in values if (v in text if len(v) >= 6 else re.search(rf"\b{re.escape(v)}\b", text))
    )


def _text_columns(wh: Any, schemas: list[str]) -> list[tuple[str, str, str]]:
    marks = ", ".join(f"'{s}'" for s in schemas)
    return query(
        wh,
        "SELECT table_schema, table_name, column_name FROM information_schema.columns"
        f" WHERE table_schema IN ({marks}) AND lower(data_type) IN"
        " ('text', 'varchar', 'character varying')",
    )


def _leaks_in_warehouse(wh: Any, schema: str, values: set[str]) -> list[str]:
    by_table: dict[tuple[str, str], list[str]] = {}
    for s, t, c in _text_columns(wh, [schema, f"{schema}_stage", f"{schema}_etl"]):
        by_table.setdefault((s, t), []).append(c)
    assert by_table, "no text column found"
    found = []
    for (s, t), cols in sorted(by_table.items()):
        ordered = sorted(values)
        # a short value (a 3-letter name) is looked for as a whole value, not inside words
        conds = " OR ".join(
            f'strpos("{c}", :v{i}) > 0' if len(v) >= 6 else f'"{c}" = :v{i}'
            for c in cols
            for i, v in enumerate(ordered)
        )
        params = {f"v{i}": v for i, v in enumerate(ordered)}
        if scalar(wh, f'SELECT count(*) FROM "{s}"."{t}" WHERE {conds}', **params):
            found.append(f"{s}.{t}")
    return found


def test_pacs_feed_with_the_demo_ehr(tmp_path: Path, warehouse) -> None:
    wh, schema = warehouse
    pacs = tmp_path / "pacs"
    _pacs_tree(pacs)
    result = run(_config(tmp_path, wh, schema, pacs), tmp_path / "work")
    assert result.status == "published", result.report["errors"]
    report = result.report

    # accounting: 17 files; the findings (2 of the SR, 1 of the SEG) are records too
    feed = report["feeds"]["pacs"]
    assert feed["records_in"] == 20
    assert feed["records_in"] == feed["loaded"] + feed["quarantined"] + feed["filtered"]
    assert (feed["loaded"], feed["quarantined"], feed["filtered"]) == (6, 14, 0)
    files = feed["files"]
    for name, reason in BAD_FILES.items():
        assert (files[name]["quarantined"], files[name]["message"]) == (1, reason)
    cut = f"demo/{STUDY_UID}/{DX_SERIES}/3.dcm"
    assert (files[cut]["quarantined"], files[cut]["message"]) == (1, "truncated DICOM file")
    reasons = {(q["file"], q["reason"]) for q in report["quarantine"] if q["feed"] == "pacs"}
    for name in ("CT_small.dcm", "MR_small.dcm", "liver_1frame.dcm", "examples_ybr_color.dcm"):
        assert (f"pydicom/{name}", "unknown_person") in reasons  # not a patient of the EHR
    # the mammography study became a measurement (its concept's domain): its first file is
    # loaded there, the series has no procedure to hang on and its other file is set aside
    assert files["mammography/1.dcm"]["loaded"] == 1
    assert ("mammography/2.dcm", "image_without_procedure") in reasons
    # the EHR's own imaging record set is excluded: imaging is not loaded twice
    assert report["feeds"]["ehr"]["files"]["imaging_studies.csv"]["filtered"] == 1

    person_id = scalar(
        wh,
        f"SELECT person_id FROM {schema}.person WHERE person_source_value = :k",
        k=pseudonym(KEY, PATIENT),
    )
    visit_id = scalar(
        wh,
        f"SELECT id FROM {schema}_etl.key_map WHERE cdm_table = 'visit_occurrence'"
        " AND natural_key = :k",
        k=pseudonym(KEY, ENCOUNTER),
    )
    # the study: one procedure_occurrence from the PACS feed, on the EHR's person and visit
    procedures = query(
        wh,
        f"SELECT p.procedure_occurrence_id, p.person_id, p.visit_occurrence_id,"
        f" p.procedure_concept_id, p.procedure_date, p.procedure_type_concept_id"
        f" FROM {schema}.procedure_occurrence p WHERE p.procedure_occurrence_id IN"
        f" (SELECT cdm_id FROM {schema}_etl.lineage WHERE feed = 'pacs'"
        f" AND cdm_table = 'procedure_occurrence')",
    )
    assert len(procedures) == 1
    proc_id, proc_person, proc_visit, concept, day, type_concept = procedures[0]
    assert (proc_person, proc_visit, concept) == (person_id, visit_id, 4163872)
    assert (str(day), type_concept) == ("2023-06-06", 32817)

    images = query(
        wh,
        f"SELECT image_series_uid, person_id, procedure_occurrence_id, visit_occurrence_id,"
        f" image_study_uid, image_occurrence_date, modality_concept_id,"
        f" anatomic_site_concept_id, local_path, wadors_uri"
        f" FROM {schema}.image_occurrence ORDER BY image_series_uid",
    )
    sr_series = uid_from("test-sr-series")
    assert [(r[0], r[1], r[2], r[3], r[4], str(r[5])) for r in images] == [
        (DX_SERIES, person_id, proc_id, visit_id, STUDY_UID, "2023-06-06"),
        (sr_series, person_id, proc_id, visit_id, STUDY_UID, "2023-06-06"),
    ]
    # no DICOM modality or body structure concept in the demo vocabulary: 0, reported
    assert [(r[6], r[7], r[8], r[9]) for r in images] == [
        (0, 0, f"demo/{STUDY_UID}/{DX_SERIES}", None),
        (0, None, "demo-sr", None),
    ]
    unmapped = {(u["vocabulary_id"], u["source_code"]): u["rows"] for u in report["unmapped"]
                if u["feed"] == "pacs"}  # fmt: skip
    assert unmapped[("DCM", "DX")] == 2  # both instance files of the series
    assert unmapped[("SNOMED", "51185008")] == 1  # the anatomic site (Chest)
    # both DX instance files are traced to the one image_occurrence
    dx_id = scalar(
        wh, f"SELECT image_occurrence_id FROM {schema}.image_occurrence"
        " WHERE image_series_uid = :u", u=DX_SERIES,
    )  # fmt: skip
    traced = query(
        wh,
        f"SELECT DISTINCT source_file FROM {schema}_etl.lineage"
        " WHERE cdm_table = 'image_occurrence' AND cdm_id = :i ORDER BY source_file",
        i=dx_id,
    )
    assert [r[0] for r in traced] == [
        f"demo/{STUDY_UID}/{DX_SERIES}/1.dcm",
        f"demo/{STUDY_UID}/{DX_SERIES}/2.dcm",
    ]

    # the report's findings: image_feature rows pointing at the rows the findings became
    features = query(
        wh,
        f"SELECT f.person_id, o.image_series_uid, f.image_feature_concept_id,"
        f" f.image_feature_event_id, f.image_feature_type_concept_id"
        f" FROM {schema}.image_feature f JOIN {schema}.image_occurrence o"
        f" ON o.image_occurrence_id = f.image_occurrence_id"
        f" ORDER BY f.image_feature_concept_id",
    )
    assert [(r[0], r[1], r[2], r[4]) for r in features] == [
        (person_id, sr_series, 443441, 32817),  # Imaging finding (observation)
        (person_id, sr_series, 1001995, 32817),  # LA ESV/BSA (measurement)
    ]
    obs = query(
        wh,
        f"SELECT observation_concept_id, value_as_concept_id, visit_occurrence_id"
        f" FROM {schema}.observation WHERE observation_id = :i",
        i=features[0][3],
    )
    assert obs == [(443441, 255848, visit_id)]  # value: Pneumonia
    meas = query(
        wh,
        f"SELECT measurement_concept_id, value_as_number, unit_source_value"
        f" FROM {schema}.measurement WHERE measurement_id = :i",
        i=features[1][3],
    )
    assert meas == [(1001995, 30.5, "mL/m2")]

    # no name, birth date, accession number or institution of any input leaves the feed
    # the scan finds what is there (the study UID, in clear by default)
    assert f"{schema}.image_occurrence" in _leaks_in_warehouse(wh, schema, {STUDY_UID})
    values = _identifying_values()
    assert _leaks_in_warehouse(wh, schema, values) == []
    for parquet in sorted((result.run_dir / "landing").rglob("*.parquet")):
        table = pq.read_table(parquet)
        text = " ".join(
            str(v) for col in table.columns if str(col.type) == "string" for v in col.to_pylist()
        )
        assert _found(text, values) == [], parquet.name
    for name in ("run.log", "report.json", "report.html"):
        text = (result.run_dir / name).read_text(encoding="utf-8")
        assert _found(text, values) == [], name
