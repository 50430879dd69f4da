"""Deterministic header-only DICOM files: the demo PACS tree and benchmark trees.

Same input, same bytes: UIDs derive from given ids, dates are given, the implementation
UID is fixed, and there is no pixel data. Identifying tags hold obviously fake values
(FAKE... / 19000101) so tests can prove they never leave the feed.
"""

from __future__ import annotations

import csv
import datetime as dt
import hashlib
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian

IMPLEMENTATION_UID = "2.25.223399512417337137745478208395540016317"  # fixed, omop-etl demo
FAKE_NAME = "FAKE^LEAKCHECK"
FAKE_BIRTH_DATE = "19000101"
FAKE_ACCESSION = "FAKEACC"
FAKE_INSTITUTION = "FAKE LEAKCHECK HOSPITAL"


def uid_from(text: str) -> str:
    """A DICOM UID for an id: '2.25.' + the UUID (as given, or derived by SHA-256)."""
    try:
        value = uuid.UUID(text).int
    except ValueError:
        value = int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:16], "big")
    return f"2.25.{value}"


@dataclass
class InstanceSpec:
    """What one generated instance file carries."""

    patient_id: str
    study_uid: str
    series_uid: str
    sop_uid: str
    sop_class_uid: str
    modality: str
    when: dt.datetime
    instance_number: int
    body_part: str | None = None
    site_code: str | None = None  # SNOMED CT, written as AnatomicRegionSequence (SCT)
    procedure_code: str | None = None  # SNOMED CT, written as ProcedureCodeSequence (SCT)
    fake_suffix: str = ""


def _code_item(code: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue = code
    item.CodingSchemeDesignator = scheme
    item.CodeMeaning = meaning
    return item


def dataset(spec: InstanceSpec) -> Dataset:
    """The header of `spec` as a dataset with file meta (no pixel data)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = spec.sop_class_uid
    meta.MediaStorageSOPInstanceUID = spec.sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = IMPLEMENTATION_UID
    meta.ImplementationVersionName = "OMOP_ETL_DEMO"
    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = spec.sop_class_uid
    ds.SOPInstanceUID = spec.sop_uid
    ds.StudyDate = ds.SeriesDate = spec.when.strftime("%Y%m%d")
    ds.StudyTime = ds.SeriesTime = spec.when.strftime("%H%M%S")
    ds.AccessionNumber = f"{FAKE_ACCESSION}{spec.fake_suffix}"
    ds.Modality = spec.modality
    ds.InstitutionName = FAKE_INSTITUTION
    ds.ReferringPhysicianName = "FAKE^REFERRER"
    if spec.procedure_code:
        ds.ProcedureCodeSequence = Sequence(
            [_code_item(spec.procedure_code, "SCT", "imaging procedure")]
        )
    if spec.site_code:
        ds.AnatomicRegionSequence = Sequence(
            [_code_item(spec.site_code, "SCT", spec.body_part or "body site")]
        )
    ds.PatientName = f"{FAKE_NAME}{spec.fake_suffix}"
    ds.PatientID = spec.patient_id
    ds.PatientBirthDate = FAKE_BIRTH_DATE
    if spec.body_part:
        ds.BodyPartExamined = spec.body_part.upper()[:16]
    ds.StudyInstanceUID = spec.study_uid
    ds.SeriesInstanceUID = spec.series_uid
    ds.SeriesNumber = 1
    ds.InstanceNumber = spec.instance_number
    return ds


def write_instance(spec: InstanceSpec, path: Path, ds: Dataset | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pydicom.dcmwrite(path, ds if ds is not None else dataset(spec), enforce_file_format=True)


def _when(text: str) -> dt.datetime:
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00")).replace(tzinfo=None)


def demo_specs(imaging_studies_csv: Path) -> list[tuple[str, InstanceSpec]]:
    """(relative path, spec) of every instance of a Synthea imaging_studies.csv."""
    with imaging_studies_csv.open(encoding="utf-8", newline="") as fh:
        rows = list(csv.DictReader(fh))
    out = []
    numbers: dict[str, int] = {}
    for n, r in enumerate(rows, start=1):
        study_uid = uid_from(r["Id"])
        series = r["SERIES_UID"]
        numbers[series] = numbers.get(series, 0) + 1
        spec = InstanceSpec(
            patient_id=r["PATIENT"],
            study_uid=study_uid,
            series_uid=series,
            sop_uid=r["INSTANCE_UID"],
            sop_class_uid=r["SOP_CODE"],
            modality=r["MODALITY_CODE"],
            when=_when(r["DATE"]),
            instance_number=numbers[series],
            body_part=r["BODYSITE_DESCRIPTION"] or r["BODYSITE_CODE"] or None,
            site_code=r["BODYSITE_CODE"] or None,
            procedure_code=r["PROCEDURE_CODE"] or None,
            fake_suffix=f"{n:04d}",
        )
        out.append((f"{study_uid}/{series}/{numbers[series]}.dcm", spec))
    return out


def write_tree(root: Path, specs: Iterable[tuple[str, InstanceSpec]]) -> int:
    """Write every (relative path, spec) under `root`; the number of files written."""
    n = 0
    for relative, spec in specs:
        write_instance(spec, root / relative)
        n += 1
    return n


def write_demo_pacs(imaging_studies_csv: Path, root: Path) -> int:
    """The demo PACS tree for a Synthea export (demo/pacs from demo/synthea27)."""
    return write_tree(root, demo_specs(imaging_studies_csv))


def bench_specs(n_files: int, *, per_series: int = 20, series_per_study: int = 3):
    """`n_files` synthetic instances: 20 per series, 3 series per study, a study a patient."""
    modalities = ("CT", "MR", "DX", "US", "MG")
    base = dt.datetime(2020, 1, 1, 8, 0, 0)
    for i in range(n_files):
        series_no, number = divmod(i, per_series)
        study_no = series_no // series_per_study
        spec = InstanceSpec(
            patient_id=f"BENCH-PATIENT-{study_no:07d}",
            study_uid=uid_from(f"bench-study-{study_no}"),
            series_uid=uid_from(f"bench-series-{series_no}"),
            sop_uid=uid_from(f"bench-instance-{i}"),
            sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
            modality=modalities[study_no % len(modalities)],
            when=base + dt.timedelta(hours=study_no),
            instance_number=number + 1,
            body_part="CHEST",
            procedure_code=None,
            fake_suffix=f"{study_no:07d}",
        )
        yield f"{study_no:07d}/{series_no % series_per_study}/{number + 1}.dcm", spec


if __name__ == "__main__":  # python -m etl.sources.dicom.synth: regenerate demo/pacs
    from etl.paths import PROJECT_ROOT

    count = write_demo_pacs(
        PROJECT_ROOT / "demo" / "synthea27" / "imaging_studies.csv", PROJECT_ROOT / "demo" / "pacs"
    )
    print(f"wrote {count} file(s) under demo/pacs")
