"""One HL7 v2 message -> result rows (one per OBX), its structure checked by hl7apy.

hl7apy checks each message's structure (MSH-1/2 and every segment name; tolerant
validation, no group detection, so Z-segments and unexpected structures are kept); the
fields read are then split on the message's own separators and checked as they are read.
Segments are read in order: an OBX belongs to the last PID, PV1 and OBR before it. A
message hl7apy rejects is rejected as a whole with hl7apy's reason; a bad OBX rejects
that OBX only.
"""

from __future__ import annotations

import datetime as dt
import functools
from dataclasses import dataclass, field
from typing import Any

from hl7apy import SUPPORTED_LIBRARIES
from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.parser import get_message_info, parse_segments

from etl.sources.hl7v2.framing import RawMessage
from etl.sources.hl7v2.values import (
    FieldError,
    number,
    reference_range,
    structured_numeric,
    timestamp,
    unescape,
    vocabulary,
)

FALLBACK_VERSION = "2.5.1"
RESULT_MESSAGES = {"ORU"}  # message types whose OBX are results (others: filtered)
# ADT events that merge a prior patient id (MRG-1) into the PID-3 patient
MERGE_EVENTS = {"A40", "A34", "A36"}
NUMERIC_TYPES = {"NM"}
TEXT_TYPES = {"ST", "TX", "FT", "DT", "TM", "DTM", "TS", "ID", "IS"}
CODED_TYPES = {"CWE", "CE", "CNE", "CF"}
# result codes whose value identifies the patient: the result is kept, its value never
# (PRAPARE "What address do you live at?")
IDENTIFYING_CODES = {("LOINC", "56799-0")}
# the fields read, per segment: a segment is handed to hl7apy cut after its last field
# read, and other segments as their name only (hl7apy still checks every segment name
# and the MSH). Fields never read (names, addresses, ...) are never parsed at all.
FIELDS_READ = {"MSH": 12, "PID": 8, "PV1": 19, "OBR": 7, "OBX": 14, "SPM": 17, "MRG": 1}


@dataclass
class Parsed:
    """What one message gave: result rows, or why it was rejected as a whole."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None  # the whole message is rejected
    filtered: str | None = None  # the whole message is set aside by this rule
    note: str | None = None


class _Segment:
    """Field access on one segment of the reduced message text: repetitions and
    components by number, split on the message's own separators (hl7apy has validated
    the message's structure; building its element tree for every field cost ~20 ms a
    message, nine tenths of the lab feed's time)."""

    def __init__(self, text: str, enc: dict[str, str]):
        self.enc, self.name = enc, text[:3]
        fields = text.split(enc["FIELD"])
        # MSH-1 is the field separator itself: MSH-n is the (n-1)th piece after the name
        self._fields = ["", enc["FIELD"], *fields[1:]] if self.name == "MSH" else fields
        self._split: dict[int, list[list[str]]] = {}  # fields split once (OBX-3 is read twice)

    def reps(self, n: int) -> list[list[str]]:
        """Field n's repetitions, each a list of its components (raw, still escaped)."""
        split = self._split.get(n)
        if split is not None:
            return split
        if n >= len(self._fields) or not self._fields[n]:
            split = []
        elif self.name == "MSH" and n == 2:  # the encoding characters are one value
            split = [[self._fields[n]]]
        else:
            split = [
                rep.split(self.enc["COMPONENT"])
                for rep in self._fields[n].split(self.enc["REPETITION"])
            ]
        self._split[n] = split
        return split

    def comp(self, n: int, c: int = 1) -> str:
        """Field n, first repetition, component c, unescaped ('' when absent)."""
        reps = self.reps(n)
        if not reps or len(reps[0]) < c:
            return ""
        return unescape(reps[0][c - 1], self.enc).strip()

    def text(self, n: int) -> str:
        return self.comp(n, 1)


def _patient_id(pid: _Segment, field: int = 3) -> str:
    """The MR repetition's id of a CX list (PID-3, MRG-1), else the first id."""
    reps = [[unescape(c, pid.enc).strip() for c in r] for r in pid.reps(field)]
    reps = [r for r in reps if r and r[0]]
    for r in reps:
        if len(r) >= 5 and r[4].upper() == "MR":
            return r[0]
    return reps[0][0] if reps else ""


def _version(version: str | None) -> tuple[str, str | None]:
    if version in SUPPORTED_LIBRARIES:
        return version, None
    return FALLBACK_VERSION, f"MSH-12 {version!r} not supported: read as {FALLBACK_VERSION}"


def _without_truncation_char(text: str) -> tuple[str, str | None]:
    """MSH-2 with a fifth encoding character (v2.7's truncation '#') in an older message:
    hl7apy refuses it, and the character means nothing before 2.7, so it is dropped."""
    if len(text) < 9 or not text.startswith("MSH"):
        return text, None
    sep = text[3]
    end = text.find(sep, 4)
    enc = text[4:end] if end > 0 else ""
    if len(enc) != 5:
        return text, None
    fields = text.split("\r", 1)[0].split(sep)
    version = fields[11].split(enc[0])[0] if len(fields) > 11 else ""
    if version >= "2.7":
        return text, None
    return text[:8] + text[9:], f"MSH-2 {enc!r}: truncation character ignored before v2.7"


def _reduced(text: str) -> str:
    """The message with only the fields read (see FIELDS_READ); PID-4/5/6 emptied."""
    sep = text[3] if len(text) > 3 and text.startswith("MSH") else "|"
    out = []
    for seg in text.split("\r"):
        keep = FIELDS_READ.get(seg[:3])
        if keep is None:
            out.append(seg[:3])
            continue
        fields = seg.split(sep, keep + 1)[: keep + 1]
        if seg[:3] == "MSH":  # MSH-1 is the separator itself: one field less in the split
            fields = seg.split(sep, keep)[:keep]
        elif seg[:3] == "PID":
            fields[4:7] = [""] * len(fields[4:7])
        out.append(sep.join(fields))
    return "\r".join(out)


def _structure(text: str) -> str:
    """The message as hl7apy checks it: MSH-1 and MSH-2, and every other segment's name
    (the fields read are checked as they are read, with the field's name in the error)."""
    lines = text.split("\r")
    head = lines[0]
    end = head.find(head[3], 4) if len(head) > 3 else -1
    msh = head[:end] if head.startswith("MSH") and end > 0 else head[:3]
    return "\r".join([msh, *(seg[:3] for seg in lines[1:])])


@functools.lru_cache(maxsize=4096)
def _checked_structure(structure: str, version: str, enc: tuple[tuple[str, str], ...]) -> int:
    """hl7apy's parse of a message structure (cached: nightly messages share a few
    shapes); the number of segments. Raises hl7apy's error."""
    segments = parse_segments(
        structure,
        version=version,
        encoding_chars=dict(enc),
        validation_level=VALIDATION_LEVEL.TOLERANT,
    )
    return len(segments)


def _identifiers(text: str) -> list[str]:
    """The patient identifiers of PID-3 (every repetition's ID), longest first."""
    sep = text[3] if len(text) > 3 and text.startswith("MSH") else "|"
    ids: set[str] = set()
    for seg in text.split("\r"):
        if seg.startswith("PID"):
            fields = seg.split(sep)
            if len(fields) > 3:
                for rep in fields[3].split("~"):
                    value = rep.split("^")[0].strip()
                    if len(value) >= 3:
                        ids.add(value)
    return sorted(ids, key=len, reverse=True)


def _reason(exc: Exception, text: str) -> str:
    """hl7apy's reason, with any patient identifier of the message blanked out (the reason
    lands in the quarantine files and the report), at most 300 characters."""
    reason = f"{type(exc).__name__}: {exc}".strip()
    for value in _identifiers(text):
        reason = reason.replace(value, "[PID-3]")
    return reason[:300]


def parse(raw: RawMessage) -> Parsed:
    """Read one message; never raises for bad content."""
    if raw.error:
        return Parsed(error=raw.error)
    text, note = _without_truncation_char(raw.text)
    text = _reduced(text)
    try:
        enc, _, version = get_message_info(text)
        version, version_note = _version(version)
        note = note or version_note
        # hl7apy checks the structure: the MSH's separators and every segment's name
        segments = _checked_structure(_structure(text), version, tuple(sorted(enc.items())))
    except Exception as exc:  # hl7apy's reason is the message's quarantine reason
        return Parsed(error=_reason(exc, text))
    out = Parsed(note=note)
    try:
        lines = [seg for seg in text.split("\r") if seg]
        if len(lines) != segments:
            raise ValueError(f"{len(lines)} segments, {segments} parsed")
        _read([_Segment(seg, enc) for seg in lines], enc, out)
    except Exception as exc:  # a structure hl7apy accepted but fields cannot be read
        return Parsed(error=_reason(exc, text))
    return out


def _read(segs: list[_Segment], enc: dict[str, str], out: Parsed) -> None:
    msh = segs[0]
    if msh.name != "MSH":
        out.error = "no MSH segment"
        return
    if msh.comp(9, 1).upper() == "ADT" and msh.comp(9, 2).upper() in MERGE_EVENTS:
        _merges(segs, out)
        return
    if msh.comp(9, 1).upper() not in RESULT_MESSAGES:
        out.filtered = "not_a_result_message"
        return
    try:
        msg_ts = timestamp(msh.text(7), "MSH-7")
    except FieldError:
        msg_ts = None
    control_id = msh.text(10)
    pid = pv1 = obr = None
    context = _Contexts(control_id)
    for s in segs[1:]:
        if s.name == "PID":
            pid, pv1, obr = s, None, None
        elif s.name == "PV1":
            pv1 = s
        elif s.name == "OBR":
            obr = s
        elif s.name == "OBX":
            out.rows.append(_result(s, context.of(pid, pv1, obr), obr, msg_ts))
        elif s.name == "SPM":
            out.rows.append(_specimen(s, context.of(pid, pv1, obr), obr, msg_ts))


def _merges(segs: list[_Segment], out: Parsed) -> None:
    """ADT^A40 (A34, A36): each PID + MRG pair merges MRG-1's patient into PID-3's."""
    pid = None
    for s in segs[1:]:
        if s.name == "PID":
            pid = s
        elif s.name == "MRG":
            row: dict[str, Any] = {"kind": "merge", "msg_ts": None, "status": None}
            surviving = _patient_id(pid) if pid else ""
            prior = _patient_id(s, 1)
            if not surviving:
                row["reason"] = "no surviving patient identifier (PID-3)"
            elif not prior:
                row["reason"] = "no prior patient identifier (MRG-1)"
            elif prior == surviving:
                row["reason"] = "a patient merged into itself"
            row["patient_id"], row["prior_patient_id"] = surviving, prior
            out.rows.append(row)


def _context(
    pid: _Segment | None, pv1: _Segment | None, obr: _Segment | None, control_id: str
) -> dict[str, Any]:
    """Patient, visit and order of a result or specimen (from the segments before it)."""
    patient = _patient_id(pid) if pid else ""
    if not patient:
        raise FieldError("no patient identifier (PID-3)")
    row: dict[str, Any] = {"patient_id": patient}
    row["visit_id"] = (pv1.text(19) if pv1 else "") or None
    try:
        row["birth_datetime"] = timestamp(pid.text(7), "PID-7") if pid else None
    except FieldError:
        row["birth_datetime"] = None
    row["gender_code"] = (pid.text(8).upper() if pid else "") or None
    filler = (obr.comp(3, 1) or obr.comp(2, 1)) if obr is not None else ""
    row["order_id"] = filler or control_id
    return row


class _Contexts:
    """The context of each PID, PV1 and OBR of one message, read once for all the OBX and
    SPM under it (every result had re-read its patient's identifiers and birth date)."""

    def __init__(self, control_id: str) -> None:
        self.control_id = control_id
        self._read: dict[tuple[int, int, int], dict[str, Any] | FieldError] = {}

    def of(
        self, pid: _Segment | None, pv1: _Segment | None, obr: _Segment | None
    ) -> dict[str, Any] | FieldError:
        """The context's fields, or the FieldError that reading them raised."""
        key = (id(pid), id(pv1), id(obr))  # the segments live as long as the message
        if key not in self._read:
            try:
                self._read[key] = _context(pid, pv1, obr, self.control_id)
            except FieldError as exc:
                self._read[key] = exc
        return self._read[key]


def _add_context(row: dict[str, Any], context: dict[str, Any] | FieldError) -> None:
    """Fill `row` with its context, or raise the context's error (a fresh one: raising
    the stored exception again would keep growing its traceback)."""
    if isinstance(context, FieldError):
        raise FieldError(str(context))
    row.update(context)


def _specimen(
    spm: _Segment,
    context: dict[str, Any] | FieldError,
    obr: _Segment | None,
    msg_ts: dt.datetime | None,
) -> dict[str, Any]:
    """SPM -> a specimen event: SPM-4 type, SPM-17 collection time (else OBR-7, MSH-7)."""
    row: dict[str, Any] = {"msg_ts": msg_ts, "status": None, "kind": "specimen"}
    try:
        _add_context(row, context)
        code, system = spm.comp(4, 1), spm.comp(4, 3)
        if not code:
            raise FieldError("SPM-4 specimen type is missing")
        row["code"], row["vocabulary_id"] = code, vocabulary(system)
        row["sub_id"] = spm.text(1)
        row["start_datetime"] = _start(spm, 17, "SPM-17", obr, msg_ts, "collection")
    except FieldError as exc:
        row["reason"] = str(exc)
    return row


def _start(
    seg: _Segment,
    field: int,
    label: str,
    obr: _Segment | None,
    msg_ts: dt.datetime | None,
    what: str,
) -> dt.datetime:
    """The segment's own datetime, else OBR-7, else MSH-7."""
    start = timestamp(seg.text(field), label)
    if start is None and obr is not None:
        start = timestamp(obr.text(7), "OBR-7")
    start = start or msg_ts
    if start is None:
        raise FieldError(f"no {what} datetime ({label}, OBR-7, MSH-7)")
    return start


def _result(
    obx: _Segment,
    context: dict[str, Any] | FieldError,
    obr: _Segment | None,
    msg_ts: dt.datetime | None,
) -> dict[str, Any]:
    row: dict[str, Any] = {
        "msg_ts": msg_ts,
        "status": obx.text(11).upper() or None,
        "kind": "result",
    }
    try:
        _add_context(row, context)
        _fill(row, obx, obr, msg_ts)
    except FieldError as exc:
        row["reason"] = str(exc)
    return row


def _fill(
    row: dict[str, Any], obx: _Segment, obr: _Segment | None, msg_ts: dt.datetime | None
) -> None:
    code, system = obx.comp(3, 1), obx.comp(3, 3)
    if not code:
        raise FieldError("OBX-3 observation code is missing")
    row["code"], row["vocabulary_id"] = code, vocabulary(system)
    row["sub_id"] = obx.text(4)
    row["start_datetime"] = _start(obx, 14, "OBX-14", obr, msg_ts, "observation")
    _value(row, obx)
    if (row["vocabulary_id"], code) in IDENTIFYING_CODES:
        for k in ("value_as_number", "value_as_string", "value_code", "value_vocabulary"):
            row[k] = None
    unit = obx.comp(6, 1)
    row["unit_code"] = unit or None
    row["unit_vocabulary"] = "UCUM" if unit else None
    row["range_low"], row["range_high"] = reference_range(obx.text(7))
    row["qualifier"] = obx.text(8) or None


def _value(row: dict[str, Any], obx: _Segment) -> None:
    vtype = obx.text(2).upper()
    reps = obx.reps(5)
    comps = [unescape(c, obx.enc).strip() for c in reps[0]] if reps else []
    first = comps[0] if comps else ""
    number_, text, code, vocab, op = None, None, None, None, None
    if vtype in NUMERIC_TYPES:
        if first:
            number_ = number(first, "OBX-5")
    elif vtype == "SN":
        number_, op, text = structured_numeric(comps, "OBX-5")
    elif vtype in CODED_TYPES:
        code = first or None
        vocab = vocabulary(comps[2]) if len(comps) > 2 and code else None
        if not code and len(comps) > 1 and comps[1]:
            text = comps[1]
    elif vtype in TEXT_TYPES or not vtype:
        lines = [unescape(r[0], obx.enc).strip() for r in reps if r and r[0]]
        text = "\n".join(lines) or None
    # other types (ED, RP, CP, ...) carry no value the CDM can hold
    row.update(
        value_as_number=number_,
        value_as_string=text,
        value_code=code,
        value_vocabulary=vocab,
        operator=op,
    )
