"""Helpers for the PACS feed tests: the test files, bad files and a structured report."""

from __future__ import annotations

import csv
import datetime as dt
import shutil
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from etl.sources.dicom.synth import InstanceSpec, dataset, uid_from
from tests.conftest import REPO

DICOM_DATA = REPO / "tests" / "data" / "dicom"
DEMO_PACS = REPO / "demo" / "pacs"
# bad files the feed must quarantine: relative path -> reason
BAD_FILES = {
    "bad/truncated.dcm": "truncated DICOM file",
    "bad/not_dicom.dcm": "not a DICOM file",
    "bad/empty.dcm": "empty file",
    "bad/no_patient_id.dcm": "required tag(s) missing or empty: PatientID",
    "pydicom/reportsi.dcm": "required tag(s) missing or empty: PatientID",
}


def headers() -> dict[str, dict[str, str]]:
    with (DICOM_DATA / "headers.csv").open(encoding="utf-8", newline="") as fh:
        return {r["file"]: r for r in csv.DictReader(fh)}


def write_test_tree(root: Path) -> None:
    """The pydicom test files under pydicom/, and the bad files under bad/."""
    (root / "pydicom").mkdir(parents=True, exist_ok=True)
    for path in sorted(DICOM_DATA.glob("*.dcm")):
        shutil.copyfile(path, root / "pydicom" / path.name)
    bad = root / "bad"
    bad.mkdir(exist_ok=True)
    ct = (DICOM_DATA / "CT_small.dcm").read_bytes()
    (bad / "truncated.dcm").write_bytes(ct[:10000])  # cut inside the pixel data
    (bad / "not_dicom.dcm").write_text("MSH|^~\\&|not an image\r", encoding="utf-8")
    (bad / "empty.dcm").write_bytes(b"")
    ds = pydicom.dcmread(DICOM_DATA / "MR_small.dcm")
    del ds.PatientID
    ds.save_as(bad / "no_patient_id.dcm")


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return item


def write_report(path: Path, *, patient_id: str, study_uid: str, when: dt.datetime) -> None:
    """A structured report (SR) with one coded and one numeric finding, and context."""
    spec = InstanceSpec(
        patient_id=patient_id,
        study_uid=study_uid,
        series_uid=uid_from("test-sr-series"),
        sop_uid=uid_from("test-sr-instance"),
        sop_class_uid="1.2.840.10008.5.1.4.1.1.88.22",
        modality="SR",
        when=when,
        instance_number=1,
        fake_suffix="SR",
    )
    ds = dataset(spec)
    context = Dataset()
    context.RelationshipType, context.ValueType = "HAS OBS CONTEXT", "PNAME"
    context.ConceptNameCodeSequence = Sequence([_code("121008", "DCM", "Person Observer")])
    context.PersonName = "FAKE^OBSERVER"
    finding = Dataset()
    finding.RelationshipType, finding.ValueType = "CONTAINS", "CODE"
    finding.ConceptNameCodeSequence = Sequence([_code("365853002", "SCT", "Imaging finding")])
    finding.ConceptCodeSequence = Sequence([_code("233604007", "SCT", "Pneumonia")])
    measured = Dataset()
    measured.NumericValue = "30.5"
    measured.MeasurementUnitsCodeSequence = Sequence([_code("mL/m2", "UCUM", "mL/m2")])
    number = Dataset()
    number.RelationshipType, number.ValueType = "CONTAINS", "NUM"
    number.ConceptNameCodeSequence = Sequence([_code("93639-3", "LN", "LA ESV/BSA")])
    number.MeasuredValueSequence = Sequence([measured])
    container = Dataset()
    container.RelationshipType, container.ValueType = "CONTAINS", "CONTAINER"
    container.ConceptNameCodeSequence = Sequence([_code("121070", "DCM", "Findings")])
    container.ContentSequence = Sequence([finding, number])
    ds.ValueType = "CONTAINER"
    ds.ConceptNameCodeSequence = Sequence([_code("18748-4", "LN", "Diagnostic imaging study")])
    ds.ContentSequence = Sequence([context, container])
    path.parent.mkdir(parents=True, exist_ok=True)
    pydicom.dcmwrite(path, ds, enforce_file_format=True)
