"""Fuzzing the three extractions: mutated HL7, DICOM and EHR CSV never crash, never lose.

Hypothesis mutates valid inputs (byte flips, truncation, deleted or doubled fields and
lines, another encoding) deterministically (derandomize, bounded examples), runs the
feed's extraction (not the pipeline: fast), and checks that no exception escapes and that
every file's records are accounted for: records_in = extracted + quarantined + filtered,
with one event, quarantine row or filter per record.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from etl.config import FeedConfig
from etl.sources.dicom import extract_dicom
from etl.sources.ehr import Extract, extract_ehr
from etl.sources.hl7v2 import extract_hl7
from etl.sources.profile import load_profile
from tests.conftest import REPO, TEST_KEY

KEY = TEST_KEY.encode()
EXAMPLES = 60  # per feed: 180 fuzzed inputs in all
FUZZ = settings(
    max_examples=EXAMPLES,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
HL7_SEED = (REPO / "demo" / "lab" / "oru_001.hl7").read_bytes()
DICOM_SEED = next(iter(sorted((REPO / "demo" / "pacs").rglob("*.dcm")))).read_bytes()
CSV_SEED = (
    b"".join(
        (REPO / "tests" / "corpus" / "ehr" / "bad_dates" / "conditions.csv")
        .read_bytes()
        .split(b"\n", 1)[0:1]
    )
    + b"\n"
    + b"".join(
        line + b"\n"
        for line in (REPO / "tests" / "corpus" / "ehr" / "quotes" / "conditions.csv")
        .read_bytes()
        .split(b"\n")[1:]
        if line
    )
)
SEPARATORS = {"hl7": b"|", "csv": b",", "dicom": b"\x00"}


@st.composite
def mutated(draw: st.DrawFn, seed: bytes, kind: str) -> bytes:
    """`seed` after 1-4 mutations."""
    data = seed
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "truncate", "delete", "duplicate", "insert", "encode"]))
        n = len(data)
        if n == 0:
            break
        if op == "flip":
            i = draw(st.integers(0, n - 1))
            data = data[:i] + bytes([data[i] ^ draw(st.integers(1, 255))]) + data[i + 1 :]
        elif op == "truncate":
            data = data[: draw(st.integers(0, n))]
        elif op in ("delete", "duplicate"):
            sep = draw(st.sampled_from([SEPARATORS[kind], b"\n", b"\r"]))
            parts = data.split(sep)
            i = draw(st.integers(0, len(parts) - 1))
            parts = parts[:i] + parts[i + 1 :] if op == "delete" else parts[: i + 1] + parts[i:]
            data = sep.join(parts)
        elif op == "insert":
            i = draw(st.integers(0, n))
            junk = draw(
                st.sampled_from([b'"', b"\x00", b"\xff\xfe", b"\r\n", b"|^~\\&", b",,,", b"\xe9"])
            )
            data = data[:i] + junk + data[i:]
        elif op == "encode" and kind != "dicom":
            codec = draw(st.sampled_from(["utf-16", "latin-1", "utf-8-sig"]))
            data = data.decode("utf-8", "replace").encode(codec, "replace")
    return data


def _accounted(files, sink: Extract, shapes: tuple[str, ...]) -> None:
    quarantine = sink.table("quarantine").to_pylist()
    for f in files:
        filtered = sum(f.filtered.values())
        assert f.records_in == f.extracted + f.quarantined + filtered, f
        q = sum(1 for r in quarantine if r["source_file"] == f.file)
        assert q == f.quarantined, f
        out = sum(
            1 for s in shapes for r in sink.table(s).to_pylist() if r["source_file"] == f.file
        )
        assert out == f.extracted, f


def _folder() -> Path:
    return Path(tempfile.mkdtemp(prefix="fuzz-"))


@FUZZ
@given(mutated(HL7_SEED, "hl7"))
def test_fuzzed_hl7(data: bytes) -> None:
    root = _folder()
    try:
        (root / "m.hl7").write_bytes(data)
        sink = Extract()
        files = extract_hl7(FeedConfig(name="lab", kind="hl7v2", path=root), KEY, sink)
        assert [f.file for f in files] == ["m.hl7"]
        _accounted(files, sink, ("event",))
    finally:
        shutil.rmtree(root)


@FUZZ
@given(mutated(DICOM_SEED, "dicom"))
def test_fuzzed_dicom(data: bytes) -> None:
    root = _folder()
    try:
        (root / "i.dcm").write_bytes(data)
        sink = Extract()
        files = extract_dicom(FeedConfig(name="pacs", kind="dicom", path=root), KEY, sink)
        (f,) = files
        assert f.records_in == f.extracted + f.quarantined
        if f.quarantined:
            assert f.message  # a reason
        assert sink.table("image").num_rows == (1 if f.extracted else 0)
    finally:
        shutil.rmtree(root)


@FUZZ
@given(mutated(CSV_SEED, "csv"))
def test_fuzzed_ehr_csv(data: bytes) -> None:
    root = _folder()
    try:
        (root / "conditions.csv").write_bytes(data)
        sink = Extract()
        files = extract_ehr("ehr", root, load_profile("synthea"), KEY, sink)
        _accounted(files, sink, ("event",))
        (st_,) = [f for f in files if f.file == "conditions.csv"]
        if st_.quarantined:
            reasons = {r["reason"] for r in sink.table("quarantine").to_pylist()}
            assert all(reasons)
    finally:
        shutil.rmtree(root)
