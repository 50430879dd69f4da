"""Read one DICOM file's header: the few tags the PACS feed uses, or why it cannot be used.

Pixel data are never read (defer_size keeps large values on disk). Only the tags named
here are ever accessed; identifying tags (PatientName, PatientBirthDate, AccessionNumber,
InstitutionName, ReferringPhysicianName, OtherPatientIDs, PatientAddress, ...) are never
touched, and reasons never quote a value. PatientID is returned in clear for the caller
to pseudonymise before anything is written.
"""

from __future__ import annotations

import datetime as dt
import functools
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom
from pydicom.datadict import tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.errors import InvalidDicomError

from etl.sources.plausible import date_problem

UNDEFINED_LENGTH = 0xFFFFFFFF
REQUIRED = ("PatientID", "StudyInstanceUID", "SeriesInstanceUID", "Modality")
# Relationships of SR content items that qualify others (context, modifiers): not findings.
CONTEXT_RELATIONSHIPS = {"HAS OBS CONTEXT", "HAS ACQ CONTEXT", "HAS CONCEPT MOD"}
MAX_SR_DEPTH = 20


@dataclass(slots=True)
class Instance:
    """The header values of one instance file (clear values: memory only)."""

    file: str
    patient_id: str
    study_uid: str
    series_uid: str
    sop_uid: str | None
    modality: str
    study_datetime: dt.datetime
    series_datetime: dt.datetime | None
    body_part: str | None
    site_code: str | None
    site_scheme: str | None
    procedure_code: str | None
    procedure_scheme: str | None
    features: list[dict[str, Any]] = field(default_factory=list)


class Unusable(Exception):
    """A file that is quarantined; the message is the reason (never a tag value)."""


# Value representations pydicom reads as the text itself, its trailing padding removed
# (values.py: convert_text, convert_string, convert_UI; DA and TM stay text by default).
PLAIN_TEXT_VRS = frozenset({"AE", "CS", "DA", "LO", "SH", "TM", "UI"})
# printable ASCII without the value delimiter, then padding: decoded alike by every
# DICOM character set (escape sequences start with ESC, outside this)
_PLAIN_VALUE = re.compile(rb"[ -\[\]-~]*\0?")
_tag = functools.cache(tag_for_keyword)


def _text(ds: pydicom.Dataset, keyword: str) -> str | None:
    """A tag's value as trimmed text (None when absent or empty).

    A value still raw in a plain form is decoded here from its bytes: pydicom's own
    conversion (character sets, validation, a value object) gives the same text at
    several times the cost (a third of the feed's CPU); any other value takes pydicom's
    way."""
    raw = ds.get_item(_tag(keyword))
    if raw is None:
        return None
    if (
        type(raw) is RawDataElement
        and raw.VR in PLAIN_TEXT_VRS
        and raw.value is not None
        and _PLAIN_VALUE.fullmatch(raw.value)
    ):
        text = raw.value.decode("ascii")
    else:
        value = ds.get(keyword)
        if value is None:
            return None
        text = str(value)
    text = text.strip().strip("\0").strip()
    return text or None


def _date(value: str | None) -> dt.date | None:
    if not value:
        return None
    digits = value.replace(".", "").replace("-", "").strip()
    try:
        return dt.datetime.strptime(digits[:8], "%Y%m%d").date()
    except ValueError:
        return None


def _time(value: str | None) -> dt.time:
    if not value:
        return dt.time()
    text = value.replace(":", "").strip()
    main, _, frac = text.partition(".")
    try:
        hh = int(main[0:2]) if len(main) >= 2 else 0
        mm = int(main[2:4]) if len(main) >= 4 else 0
        ss = min(int(main[4:6]), 59) if len(main) >= 6 else 0
        us = int((frac + "000000")[:6]) if frac.isdigit() else 0
        return dt.time(hh, mm, ss, us)
    except ValueError:
        return dt.time()


def _datetime(ds: pydicom.Dataset, date_kw: str, time_kw: str) -> dt.datetime | None:
    day = _date(_text(ds, date_kw))
    if day is None:
        return None
    return dt.datetime.combine(day, _time(_text(ds, time_kw)))


def _first_code(ds: pydicom.Dataset, keyword: str) -> tuple[str | None, str | None]:
    seq = ds.get(keyword)
    if not seq:
        return None, None
    item = seq[0]
    return _text(item, "CodeValue"), _text(item, "CodingSchemeDesignator")


def _truncated(ds: pydicom.Dataset, size: int) -> bool:
    """A top-level value that ends past the end of the file (cut during transfer)."""
    # keys, not the dataset itself: iterating a Dataset converts (reads) every value
    for tag in sorted(ds.keys()):
        el = ds.get_item(tag, keep_deferred=True)
        defined = isinstance(el, RawDataElement) and el.length != UNDEFINED_LENGTH
        if defined and el.value_tell + el.length > size:
            return True
    return False


def _read(path: Path) -> pydicom.Dataset:
    size = path.stat().st_size
    if size == 0:
        raise Unusable("empty file")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            try:
                ds = pydicom.dcmread(path, stop_before_pixels=False, defer_size="1 KB")
                forced = False
            except InvalidDicomError:
                # no 'DICM' preamble: an old ACR-NEMA style file may still be a dataset
                ds = pydicom.dcmread(path, defer_size="1 KB", force=True)
                forced = True
        except Exception as exc:  # pydicom raises many types on damaged input
            raise Unusable(f"not DICOM or unreadable ({type(exc).__name__})") from None
    if forced and not any(k in ds for k in REQUIRED):
        raise Unusable("not a DICOM file")
    if any("End of file" in str(w.message) for w in caught) or _truncated(ds, size):
        raise Unusable("truncated DICOM file")
    return ds


def _features(ds: pydicom.Dataset, modality: str) -> list[dict[str, Any]]:
    """Coded findings: SR CODE/NUM content items, SEG segment property types."""
    out: list[dict[str, Any]] = []
    if modality == "SEG":
        for segment in ds.get("SegmentSequence") or []:
            code, scheme = _first_code(segment, "SegmentedPropertyTypeCodeSequence")
            if code is None:
                continue
            site, site_scheme = _first_code(segment, "AnatomicRegionSequence")
            algorithm = _text(segment, "SegmentAlgorithmName")
            automatic = _text(segment, "SegmentAlgorithmType") in ("AUTOMATIC", "SEMIAUTOMATIC")
            out.append(
                {
                    "kind": "SEG",
                    "code": code,
                    "scheme": scheme,
                    "value_code": None,
                    "value_scheme": None,
                    "value_number": None,
                    "unit_code": None,
                    "site_code": site,
                    "site_scheme": site_scheme,
                    "alg_system": algorithm if automatic else None,
                }
            )
    if modality == "SR":
        _walk_sr(ds.get("ContentSequence") or [], out, 0)
    return out


def _walk_sr(items: Any, out: list[dict[str, Any]], depth: int) -> None:
    if depth > MAX_SR_DEPTH:
        return
    for item in items:
        relationship = _text(item, "RelationshipType")
        value_type = _text(item, "ValueType")
        if relationship not in CONTEXT_RELATIONSHIPS and value_type in ("CODE", "NUM"):
            code, scheme = _first_code(item, "ConceptNameCodeSequence")
            if code is not None:
                value_code = value_scheme = unit = None
                number = None
                if value_type == "CODE":
                    value_code, value_scheme = _first_code(item, "ConceptCodeSequence")
                else:
                    measured = item.get("MeasuredValueSequence")
                    if measured:
                        try:
                            number = float(measured[0].get("NumericValue"))
                        except (TypeError, ValueError):
                            number = None
                        unit, _ = _first_code(measured[0], "MeasurementUnitsCodeSequence")
                out.append(
                    {
                        "kind": value_type,
                        "code": code,
                        "scheme": scheme,
                        "value_code": value_code,
                        "value_scheme": value_scheme,
                        "value_number": number,
                        "unit_code": unit,
                        "site_code": None,
                        "site_scheme": None,
                        "alg_system": None,
                    }
                )
        if "ContentSequence" in item:
            _walk_sr(item.ContentSequence, out, depth + 1)


def read_instance(path: Path, relative: str) -> Instance:
    """The header of `path` (named `relative` in records); raises Unusable with a reason."""
    ds = _read(path)
    values = {k: _text(ds, k) for k in REQUIRED}
    missing = [k for k, v in values.items() if v is None]
    if missing:
        raise Unusable(f"required tag(s) missing or empty: {', '.join(missing)}")
    study_dt = _datetime(ds, "StudyDate", "StudyTime")
    series_dt = _datetime(ds, "SeriesDate", "SeriesTime")
    if study_dt is None and series_dt is None:
        raise Unusable("no valid StudyDate or SeriesDate")
    for name, value in (("StudyDate", study_dt), ("SeriesDate", series_dt)):
        problem = date_problem(name, value)  # before 1850, or in the future
        if problem:
            raise Unusable(problem)
    site_code, site_scheme = _first_code(ds, "AnatomicRegionSequence")
    procedure_code, procedure_scheme = _first_code(ds, "ProcedureCodeSequence")
    modality = str(values["Modality"]).upper()
    try:
        features = _features(ds, modality)
    except Exception:  # a malformed report body: the instance still loads, without findings
        features = []
    return Instance(
        file=relative,
        patient_id=str(values["PatientID"]),
        study_uid=str(values["StudyInstanceUID"]),
        series_uid=str(values["SeriesInstanceUID"]),
        sop_uid=_text(ds, "SOPInstanceUID"),
        modality=modality,
        study_datetime=study_dt or series_dt,  # type: ignore[arg-type]
        series_datetime=series_dt,
        body_part=_text(ds, "BodyPartExamined"),
        site_code=site_code,
        site_scheme=site_scheme,
        procedure_code=procedure_code,
        procedure_scheme=procedure_scheme,
        features=features,
    )
