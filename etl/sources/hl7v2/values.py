"""HL7 v2 value types read into canonical values: timestamps, coding systems, numbers,
structured numerics (SN), reference ranges, and escape sequences."""

from __future__ import annotations

import datetime as dt
import re

from etl.sources.plausible import date_problem

# OBX-3 / CWE coding system (HL7 table 0396) -> OMOP vocabulary_id; anything else is kept
# as sent (local codes 'L', '99zzz' ...) so a local map in mappings/local can match it and
# the report lists it as unmapped until one does.
CODING_SYSTEMS = {
    "LN": "LOINC",
    "LOINC": "LOINC",
    "SCT": "SNOMED",
    "SNM": "SNOMED",
    "SNOMED": "SNOMED",
    "SNOMED-CT": "SNOMED",
    "SNOMEDCT": "SNOMED",
    "UCUM": "UCUM",
    "I10": "ICD10",
    "I10C": "ICD10CM",
    "I9C": "ICD9CM",
    "CVX": "CVX",
    "RXNORM": "RxNorm",
}
COMPARATORS = {"<", ">", "<=", ">=", "="}

_TS = re.compile(
    r"^(\d{4})(\d{2})?(\d{2})?(\d{2})?(\d{2})?(\d{2})?(?:\.(\d{1,4}))?(?:([+-])(\d{2})(\d{2}))?$"
)
_NUM = r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)"
_RANGE = re.compile(rf"^\s*({_NUM})\s*(?:-|_|\^|to|TO)\s*({_NUM})\s*$")
_BOUND = re.compile(rf"^\s*([<>]=?)\s*({_NUM})\s*$")


class FieldError(ValueError):
    """A field that is present but cannot be read (the message names the field)."""


def vocabulary(system: str | None) -> str | None:
    """The OMOP vocabulary_id of an HL7 coding system name; unknown ones as sent."""
    if not system:
        return None
    return CODING_SYSTEMS.get(system.strip().upper(), system.strip())


def timestamp(value: str | None, field: str) -> dt.datetime | None:
    """An HL7 TS/DTM as a naive UTC datetime (an offset is applied; none means as sent).

    Missing precision is filled with the start of the period (2024 -> 2024-01-01 00:00).
    """
    if value is None or not value.strip():
        return None
    out = _parsed.get(value)
    if out is None:
        out = _parse_timestamp(value.strip())
        if len(_parsed) >= _PARSED_MAX:
            _parsed.clear()
        _parsed[value] = out
    if isinstance(out, str):
        raise FieldError(f"{field} {out}")
    problem = date_problem(field, out)  # before 1850, or in the future
    if problem:
        raise FieldError(problem)
    return out


# parsed timestamps by their text: the results of one order share theirs, and every
# result of a patient repeats the birth date (bounded; the parse depends on nothing else)
_parsed: dict[str, dt.datetime | str] = {}
_PARSED_MAX = 100_000


def _parse_timestamp(value: str) -> dt.datetime | str:
    """The naive UTC datetime of a stripped TS/DTM, or what is wrong with it."""
    m = _TS.match(value)
    if not m:
        return "is not an HL7 datetime"
    y, mo, d, h, mi, s, frac, sign, oh, om = m.groups()
    try:
        out = dt.datetime(
            int(y),
            int(mo or 1),
            int(d or 1),
            int(h or 0),
            int(mi or 0),
            int(s or 0),
            int((frac or "0").ljust(6, "0")[:6]),
        )
    except ValueError:
        return "is not a valid date"
    if sign:
        offset = dt.timedelta(hours=int(oh), minutes=int(om))
        out = out - offset if sign == "+" else out + offset
    return out


def number(value: str, field: str) -> float:
    try:
        out = float(value.strip())
    except ValueError:
        raise FieldError(f"{field} is not a number") from None
    if out != out or out in (float("inf"), float("-inf")):
        raise FieldError(f"{field} is not a finite number")
    return out


def structured_numeric(comps: list[str], field: str) -> tuple[float | None, str | None, str | None]:
    """SN = comparator ^ num1 ^ separator/suffix ^ num2 -> (number, operator, text).

    '<^5' is 5 with operator '<'; '^1^-^5' and '^1^:^128' (ranges, ratios) are kept as text.
    """
    comp, num1, sep, num2 = [*comps, "", "", "", ""][:4]
    comp, num1, sep, num2 = comp.strip(), num1.strip(), sep.strip(), num2.strip()
    if comp and comp not in COMPARATORS and comp != "<>":
        raise FieldError(f"{field} comparator is not one of < > <= >= = <>")
    if not num1 and not num2:
        return None, None, None
    if sep or num2:
        text = f"{comp}{num1}{sep}{num2}"
        return None, None, text
    value = number(num1, field)
    return value, (comp if comp in COMPARATORS else None), None


def reference_range(value: str | None) -> tuple[float | None, float | None]:
    """OBX-7: '3.5-5.0', '70_105', '<5', '>=10' -> (low, high); anything else unread."""
    if not value:
        return None, None
    m = _RANGE.match(value)
    if m:
        return float(m.group(1)), float(m.group(2))
    m = _BOUND.match(value)
    if m:
        bound = float(m.group(2))
        return (None, bound) if m.group(1).startswith("<") else (bound, None)
    return None, None


def unescape(value: str, enc: dict[str, str]) -> str:
    r"""Replace HL7 escape sequences (\F\ \S\ \T\ \R\ \E\ \.br\ \Xhh\); drop \H\ \N\ etc."""
    esc = enc.get("ESCAPE", "\\")
    if not esc or esc not in value:
        return value
    table = {
        "F": enc["FIELD"],
        "S": enc["COMPONENT"],
        "T": enc["SUBCOMPONENT"],
        "R": enc["REPETITION"],
        "E": esc,
        ".br": "\n",
    }
    out, i = [], 0
    while i < len(value):
        ch = value[i]
        end = value.find(esc, i + 1) if ch == esc else -1
        if end == -1:
            out.append(ch)
            i += 1
            continue
        seq = value[i + 1 : end]
        if seq in table:
            out.append(table[seq])
        elif seq[:1] == "X" and re.fullmatch(r"(?:[0-9A-Fa-f]{2})+", seq[1:] or "-"):
            out.append(bytes.fromhex(seq[1:]).decode("latin-1"))
        # other sequences (highlighting \H\ \N\, character sets) carry no text
        i = end + 1
    return "".join(out)
