"""The demo lab feed: HL7 v2.5.1 ORU^R01 messages written from the Synthea laboratory rows.

Deterministic (same input, same bytes): one message per patient, encounter and date, one
file per patient, line ends varied on purpose (CR, LF) and the last patients in one
FHS/BHS batch, as real interfaces deliver them. Reference ranges come from
demo/lab/reference_ranges.csv, an illustrative table (not clinical guidance).

    python -m etl.demo_lab [SYNTHEA_DIR] [OUT_DIR]
"""

from __future__ import annotations

import csv
import datetime as dt
import sys
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path

from etl.paths import PROJECT_ROOT

SYNTHEA = PROJECT_ROOT / "demo" / "synthea27"
OUT = PROJECT_ROOT / "demo" / "lab"
RANGES = "reference_ranges.csv"
BATCH_PATIENTS = 3  # the last patients go into one batch file


def escape(value: str) -> str:
    """HL7 escape sequences for the delimiters inside a value."""
    out = value.replace("\\", "\\E\\")
    for ch, seq in (("|", "\\F\\"), ("^", "\\S\\"), ("&", "\\T\\"), ("~", "\\R\\")):
        out = out.replace(ch, seq)
    return out


def hl7_ts(iso: str) -> str:
    """Synthea's '2023-10-10T04:17:47Z' as an HL7 DTM with its UTC offset."""
    t = dt.datetime.strptime(iso, "%Y-%m-%dT%H:%M:%SZ")
    return t.strftime("%Y%m%d%H%M%S") + "+0000"


def _flag(value: float, low: float | None, high: float | None) -> str:
    if low is not None and value < low:
        return "L"
    if high is not None and value > high:
        return "H"
    return "N"


def _bounds(rng: str) -> tuple[float | None, float | None]:
    if rng.startswith("<"):
        return None, float(rng[1:])
    if rng.startswith(">"):
        return float(rng[1:]), None
    low, high = rng.split("-")
    return float(low), float(high)


def oru_message(
    control_id: str,
    when: str,
    patient: dict[str, str],
    encounter: str,
    order_id: str,
    results: Iterable[dict[str, str]],
    ranges: dict[str, str],
    status: str = "F",
) -> list[str]:
    """The segments of one ORU^R01 (v2.5.1) for Synthea-shaped result rows."""
    ts = hl7_ts(when)
    birth = patient.get("BIRTHDATE", "").replace("-", "")
    segs = [
        f"MSH|^~\\&|SYNTHEA_LAB|DEMO_HOSPITAL|OMOP_ETL|DEMO|{ts}||ORU^R01^ORU_R01|{control_id}"
        "|P|2.5.1|||NE|NE||UNICODE UTF-8",
        f"PID|1||{escape(patient['Id'])}^^^SYNTHEA^MR||||{birth}|{patient.get('GENDER', '')}",
        f"PV1|1|O|||||||||||||||||{escape(encounter)}",
        f"OBR|1||{order_id}^SYNTHEA_LAB|11502-2^Laboratory report^LN|||{ts}"
        f"||||||||||||||{ts}|||{status}",
    ]
    for i, r in enumerate(results, start=1):
        code = f"{r['CODE']}^{escape(r['DESCRIPTION'])}^LN"
        if r["TYPE"] == "numeric":
            rng = ranges.get(r["CODE"], "")
            flag = _flag(float(r["VALUE"]), *_bounds(rng)) if rng else ""
            unit = f"{escape(r['UNITS'])}^^UCUM" if r["UNITS"] else ""
            segs.append(f"OBX|{i}|NM|{code}||{r['VALUE']}|{unit}|{rng}|{flag}|||{status}|||{ts}")
        else:
            segs.append(f"OBX|{i}|ST|{code}||{escape(r['VALUE'])}||||||{status}|||{ts}")
    return segs


def _read(path: Path) -> list[dict[str, str]]:
    with path.open(encoding="utf-8", newline="") as fh:
        return list(csv.DictReader(fh))


def build_files(synthea: Path, ranges_csv: Path) -> dict[str, bytes]:
    """File name -> bytes of the demo lab feed."""
    patients = {p["Id"]: p for p in _read(synthea / "patients.csv")}
    ranges = {r["loinc"]: r["range"] for r in _read(ranges_csv)}
    groups: dict[tuple[str, str, str], list[dict[str, str]]] = defaultdict(list)
    for r in _read(synthea / "observations.csv"):
        if r["CATEGORY"] == "laboratory":
            groups[(r["PATIENT"], r["ENCOUNTER"], r["DATE"])].append(r)
    first_seen: dict[str, str] = {}
    for patient, _, date in sorted(groups, key=lambda g: (g[2], g[0], g[1])):
        first_seen.setdefault(patient, date)
    order = sorted(first_seen, key=lambda p: (first_seen[p], p))
    messages: dict[str, list[list[str]]] = defaultdict(list)
    ordered = sorted(groups, key=lambda g: (order.index(g[0]), g[2], g[1]))
    for n, (patient, encounter, date) in enumerate(ordered, start=1):
        rows = sorted(groups[(patient, encounter, date)], key=lambda r: r["CODE"])
        msg = oru_message(
            f"LAB{n:05d}", date, patients[patient], encounter, f"F{n:05d}", rows, ranges
        )
        messages[patient].append(msg)
    files: dict[str, bytes] = {}
    batch = order[-BATCH_PATIENTS:]
    for i, patient in enumerate(order[:-BATCH_PATIENTS], start=1):
        eol = "\n" if i % 3 == 0 else "\r"
        text = "".join(eol.join(m) + eol for m in messages[patient])
        files[f"oru_{i:03d}.hl7"] = text.encode("utf-8")
    body = [m for p in batch for m in messages[p]]
    stamp = hl7_ts(max(first_seen[p] for p in batch))
    lines = [f"FHS|^~\\&|SYNTHEA_LAB|DEMO_HOSPITAL|OMOP_ETL|DEMO|{stamp}", "BHS|^~\\&|SYNTHEA_LAB"]
    lines += [s for m in body for s in m]
    lines += [f"BTS|{len(body)}", "FTS|1"]
    files["batch_001.hl7"] = ("\r\n".join(lines) + "\r\n").encode("utf-8")
    return files


def write_demo_lab(synthea: Path = SYNTHEA, out: Path = OUT) -> list[Path]:
    """(Re)write the demo lab files; the reference range table stays as it is."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, data in build_files(synthea, out / RANGES).items():
        path = out / name
        path.write_bytes(data)
        written.append(path)
    return written


if __name__ == "__main__":
    args = [Path(a) for a in sys.argv[1:]]
    for p in write_demo_lab(*args):
        print(p)
