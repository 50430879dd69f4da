"""Regenerate the bad DICOM corpus beside this file (deterministic: same bytes each time).

    .venv/bin/python tests/corpus/dicom/make_corpus.py

Header-only files from etl.sources.dicom.synth, one oddity each (README.md).
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from etl.sources.dicom.synth import InstanceSpec, dataset, uid_from, write_instance

HERE = Path(__file__).resolve().parent
PATIENT = "5f8d3e13-bc80-dd66-0f1b-d24f9692a697"  # a demo patient (synthetic)


def _spec(name: str, *, patient: str = PATIENT, when: dt.datetime | None = None) -> InstanceSpec:
    return InstanceSpec(
        patient_id=patient,
        study_uid=uid_from(f"corpus-study-{name}"),
        series_uid=uid_from(f"corpus-series-{name}"),
        sop_uid=uid_from(f"corpus-instance-{name}"),
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        modality="CT",
        when=when or dt.datetime(2020, 1, 1, 10, 0),
        instance_number=1,
        body_part="CHEST",
        fake_suffix="CORPUS",
    )


def main() -> None:
    write_instance(_spec("good"), HERE / "good.dcm")
    write_instance(_spec("future", when=dt.datetime(2099, 1, 1)), HERE / "future_date.dcm")
    write_instance(_spec("old", when=dt.datetime(1800, 1, 1)), HERE / "year_1800.dcm")
    ds = dataset(_spec("nodate"))
    ds.StudyDate, ds.SeriesDate = "20210230", ""  # Feb 30, and no series date
    write_instance(_spec("nodate"), HERE / "impossible_date.dcm", ds)
    ds = dataset(_spec("nomodality"))
    del ds.Modality
    write_instance(_spec("nomodality"), HERE / "no_modality.dcm", ds)
    write_instance(_spec("stranger", patient="NO-SUCH-PATIENT-0001"), HERE / "unknown_patient.dcm")
    ds = dataset(_spec("utf8"))
    ds.SpecificCharacterSet = "ISO_IR 192"  # UTF-8: a name with non-ASCII letters
    ds.PatientName = "FAKE^M\u00dcLLER^J\u00dcRGEN"
    write_instance(_spec("utf8"), HERE / "utf8_name.dcm", ds)
    ds = dataset(_spec("giant"))
    ds.StudyDescription = "x" * 64  # LO is 64 characters at most
    ds.ImageComments = "y" * 100_000  # beyond LT's 10,240 and 64 KiB (written as UN)
    write_instance(_spec("giant"), HERE / "giant_field.dcm", ds)
    good = (HERE / "good.dcm").read_bytes()
    (HERE / "truncated.dcm").write_bytes(good[: len(good) // 2])
    (HERE / "empty.dcm").write_bytes(b"")
    (HERE / "not_dicom.dcm").write_bytes(b"START,STOP,PATIENT\n")


if __name__ == "__main__":
    main()
