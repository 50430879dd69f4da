"""The PACS feed's extraction: DICOM headers into canonical records, bad files quarantined."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pyarrow as pa
import pydicom
import pytest
from pydicom.dataset import Dataset

from etl.config import FeedConfig
from etl.pseudonym import pseudonym
from etl.sources.dicom import extract_dicom
from etl.sources.dicom.synth import FAKE_ACCESSION, FAKE_NAME, uid_from, write_demo_pacs
from etl.sources.ehr import Extract
from tests.conftest import DEMO_SYNTHEA, TEST_KEY
from tests.dicom_helpers import (
    BAD_FILES,
    DEMO_PACS,
    DICOM_DATA,
    headers,
    write_report,
    write_test_tree,
)

KEY = TEST_KEY.encode()


def _extract(root: Path, **options) -> tuple[list, Extract]:
    sink = Extract()
    feed = FeedConfig(name="pacs", kind="dicom", path=root, **options)
    return extract_dicom(feed, KEY, sink), sink


def _by_file(table: pa.Table) -> dict[str, dict]:
    return {r["source_file"]: r for r in table.to_pylist()}


def test_every_file_is_loaded_or_quarantined_with_a_reason(tmp_path: Path) -> None:
    write_test_tree(tmp_path)
    stats, sink = _extract(tmp_path)
    files = {s.file: s for s in stats}
    assert len(files) == 11  # 7 pydicom test files + 4 bad ones
    for name, reason in BAD_FILES.items():
        assert (files[name].quarantined, files[name].message) == (1, reason), name
    quarantine = {r["source_file"]: r["reason"] for r in sink.table("quarantine").to_pylist()}
    assert quarantine == BAD_FILES
    loaded = {f for f, s in files.items() if s.extracted}
    assert loaded == {f"pydicom/{n}" for n in headers()} - set(BAD_FILES)
    for s in stats:  # every record is accounted for
        assert s.records_in == s.extracted + s.quarantined
    # the segmentation carries one coded finding: a second record of its file
    assert files["pydicom/liver_1frame.dcm"].records_in == 2


def test_reading_in_worker_processes_gives_the_same_extract(
    tmp_path: Path, monkeypatch, caplog
) -> None:
    """A large feed's headers are read in worker processes, a chunk of files each: the
    same records, quarantine and accounting, in the same order, as in one process."""
    import etl.sources.dicom as dicom

    write_test_tree(tmp_path)
    one_stats, one = _extract(tmp_path)
    monkeypatch.setenv(dicom.WORKERS_ENV, "2")
    monkeypatch.setattr(dicom, "CHUNK_FILES", 3)  # 11 files: four chunks
    with caplog.at_level("INFO", logger="etl.sources.dicom"):
        stats, sink = _extract(tmp_path)
    assert "reading 11 file(s) in 2 processes" in caplog.text  # the workers did read
    assert stats == one_stats
    assert sorted(sink.tables) == sorted(one.tables)
    for shape in one.tables:
        assert sink.table(shape).equals(one.table(shape)), shape
    assert sum(s.extracted for s in stats) > 0 and sum(s.quarantined for s in stats) > 0


def test_a_large_feed_reads_in_no_more_processes_than_its_cores(
    tmp_path: Path, monkeypatch, caplog
) -> None:
    """Given one core (beside other feeds on 2 vCPUs), a large feed reads its headers in
    this process; given more, in as many processes (up to 4); the site's setting wins."""
    import etl.sources.dicom as dicom
    from etl.sources import processes

    monkeypatch.delenv(dicom.WORKERS_ENV, raising=False)
    monkeypatch.setattr(processes.os, "cpu_count", lambda: 8)
    assert dicom._workers(dicom.PARALLEL_FILES - 1) == 1  # a small feed
    assert dicom._workers(dicom.PARALLEL_FILES) == 4  # at most 4
    assert dicom._workers(dicom.PARALLEL_FILES, cores=2) == 2
    assert dicom._workers(dicom.PARALLEL_FILES, cores=1) == 1  # in this process
    monkeypatch.setenv(dicom.WORKERS_ENV, "3")
    assert dicom._workers(dicom.PARALLEL_FILES, cores=1) == 3

    monkeypatch.delenv(dicom.WORKERS_ENV)
    monkeypatch.setattr(dicom, "PARALLEL_FILES", 2)  # the 11 test files count as large
    monkeypatch.setattr(dicom, "CHUNK_FILES", 3)
    write_test_tree(tmp_path)
    feed = FeedConfig(name="pacs", kind="dicom", path=tmp_path)
    with caplog.at_level("INFO", logger="etl.sources.dicom"):
        one = Extract()
        extract_dicom(feed, KEY, one, cores=1)
        assert "processes" not in caplog.text  # read here
        two = Extract()
        extract_dicom(feed, KEY, two, cores=2)
        assert "reading 11 file(s) in 2 processes" in caplog.text
    assert sorted(two.tables) == sorted(one.tables)
    for shape in one.tables:
        assert two.table(shape).equals(one.table(shape)), shape


def test_study_series_modality_date_and_body_part_match_the_headers(tmp_path: Path) -> None:
    write_test_tree(tmp_path)
    _, sink = _extract(tmp_path)
    images = _by_file(sink.table("image"))
    studies = _by_file(
        sink.table("event").filter(pa.compute.field("record_set") == "imaging_studies")
    )
    checked = ["CT_small.dcm", "JPGExtended.dcm", "examples_overlay.dcm", "MR_small.dcm"]
    for name in checked:
        h, img = headers()[name], images[f"pydicom/{name}"]
        assert img["study_uid"] == h["StudyInstanceUID"]
        assert img["series_uid"] == h["SeriesInstanceUID"]
        assert (img["modality_code"], img["modality_vocabulary"]) == (h["Modality"], "DCM")
        series_date = h["SeriesDate"] or h["StudyDate"]
        assert img["start_datetime"].strftime("%Y%m%d") == series_date
        if h["BodyPartExamined"]:
            assert img["anatomic_site_code"] == h["BodyPartExamined"]
            assert img["anatomic_site_vocabulary"] == "DICOM_BODY_PART"
        else:
            assert img["anatomic_site_code"] is None
        assert img["person_key"] == pseudonym(KEY, h["PatientID"])
        assert img["image_key"] == pseudonym(KEY, "dicom_series|" + h["SeriesInstanceUID"])
        assert img["local_path"] == "pydicom"
        study = studies[f"pydicom/{name}"]
        assert study["start_datetime"].strftime("%Y%m%d") == h["StudyDate"]
        assert study["event_key"] == img["procedure_event_key"]
        # no procedure code in these headers: the modality names the procedure
        assert (study["code"], study["vocabulary_id"]) == (h["Modality"], "DICOM_MODALITY")
        assert (study["default_domain"], study["keep_domain"]) == ("Procedure", False)
        assert study["type_concept_id"] == 32817
    ct = images["pydicom/CT_small.dcm"]
    assert ct["start_datetime"] == dt.datetime(1997, 4, 30, 11, 27, 49)  # SeriesDate+SeriesTime


def test_segmentation_and_report_findings(tmp_path: Path) -> None:
    write_test_tree(tmp_path)
    write_report(
        tmp_path / "sr" / "1.dcm", patient_id="P1", study_uid="1.2.3", when=dt.datetime(2020, 1, 2)
    )
    _, sink = _extract(tmp_path)
    events = sink.table("event")
    findings = [r for r in events.to_pylist() if r["record_set"] == "image_features"]
    got = {(r["source_file"], r["source_line"]): r for r in findings}
    assert set(got) == {("pydicom/liver_1frame.dcm", 2), ("sr/1.dcm", 2), ("sr/1.dcm", 3)}
    seg = got[("pydicom/liver_1frame.dcm", 2)]
    assert (seg["code"], seg["vocabulary_id"], seg["default_domain"]) == (
        "T-62000",
        "SNOMED",
        "Observation",
    )
    code = got[("sr/1.dcm", 2)]
    assert (code["code"], code["vocabulary_id"], code["value_code"]) == (
        "365853002",
        "SNOMED",
        "233604007",
    )
    num = got[("sr/1.dcm", 3)]
    assert (num["code"], num["vocabulary_id"], num["default_domain"]) == (
        "93639-3",
        "LOINC",
        "Measurement",
    )
    assert (num["value_as_number"], num["unit_code"], num["unit_vocabulary"]) == (
        30.5,
        "mL/m2",
        "UCUM",
    )
    features = {
        (r["source_file"], r["source_line"]): r for r in sink.table("image_feature").to_pylist()
    }
    images = _by_file(sink.table("image"))
    assert features[("sr/1.dcm", 3)]["image_key"] == images["sr/1.dcm"]["image_key"]
    assert features[("sr/1.dcm", 3)]["feature_key"] == num["event_key"]
    seg_feature = features[("pydicom/liver_1frame.dcm", 2)]
    assert seg_feature["alg_system"] == "SlicerEditor"
    assert seg_feature["image_key"] == images["pydicom/liver_1frame.dcm"]["image_key"]


def test_hash_uids_stores_pseudonyms_and_no_folder(tmp_path: Path) -> None:
    write_test_tree(tmp_path)
    _, sink = _extract(tmp_path, hash_uids=True)
    h = headers()["MR_small.dcm"]
    img = _by_file(sink.table("image"))["pydicom/MR_small.dcm"]
    assert img["study_uid"] == pseudonym(KEY, h["StudyInstanceUID"])
    assert img["series_uid"] == pseudonym(KEY, h["SeriesInstanceUID"])
    assert img["local_path"] is None  # folder names often carry UIDs
    # the same identity whatever the option: ids stay stable if a site turns it on
    assert img["image_key"] == pseudonym(KEY, "dicom_series|" + h["SeriesInstanceUID"])


def test_demo_study_and_no_identifier_in_the_records(tmp_path: Path) -> None:
    stats, sink = _extract(DEMO_PACS)
    assert [(s.records_in, s.extracted) for s in stats] == [(1, 1)]
    event = sink.table("event").to_pylist()[0]
    assert event["person_key"] == pseudonym(KEY, "280ee8b5-6ebb-11cf-e4db-8cf101827ec7")
    assert (event["code"], event["vocabulary_id"]) == ("399208008", "SNOMED")
    assert event["start_datetime"] == dt.datetime(2023, 6, 6, 12, 0, 8)
    image = sink.table("image").to_pylist()[0]
    assert image["study_uid"] == uid_from("82702944-686c-a8fa-9463-6b72152c58a5")
    assert image["series_uid"] == "1.2.840.99999999.1.98060115.1686052808412"
    assert (image["anatomic_site_code"], image["anatomic_site_vocabulary"]) == (
        "51185008",
        "SNOMED",
    )
    text = " ".join(
        str(v) for shape in ("event", "image", "image_feature", "quarantine")
        for row in sink.table(shape).to_pylist() for v in row.values()
    )  # fmt: skip
    for secret in (FAKE_NAME, FAKE_ACCESSION, "19000101", "280ee8b5-6ebb", "LEAKCHECK"):
        assert secret not in text


def test_demo_tree_regenerates_byte_for_byte(tmp_path: Path) -> None:
    count = write_demo_pacs(DEMO_SYNTHEA / "imaging_studies.csv", tmp_path)
    committed = sorted(p.relative_to(DEMO_PACS) for p in DEMO_PACS.rglob("*.dcm"))
    generated = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*.dcm"))
    assert count == len(committed) == 1
    assert generated == committed
    for rel in committed:
        assert (tmp_path / rel).read_bytes() == (DEMO_PACS / rel).read_bytes()


def test_dicomdir_is_skipped_as_an_index(tmp_path: Path) -> None:
    write_test_tree(tmp_path)
    (tmp_path / "DICOMDIR").write_bytes(b"an index")
    stats, _ = _extract(tmp_path)
    assert "DICOMDIR" not in {s.file for s in stats}


def test_a_bare_dataset_without_preamble_loads(tmp_path: Path) -> None:
    """An ACR-NEMA style file (no preamble, no file meta) is read with force."""
    source = pydicom.dcmread(DICOM_DATA / "MR_small.dcm", stop_before_pixels=True)
    bare = Dataset()
    for element in source:
        bare.add(element)
    pydicom.dcmwrite(tmp_path / "bare", bare, implicit_vr=True, little_endian=True)
    assert (tmp_path / "bare").read_bytes()[128:132] != b"DICM"
    stats, sink = _extract(tmp_path)
    assert [(s.file, s.extracted, s.quarantined) for s in stats] == [("bare", 1, 0)]
    image = sink.table("image").to_pylist()[0]
    assert (image["modality_code"], image["study_uid"]) == (
        "MR",
        headers()["MR_small.dcm"]["StudyInstanceUID"],
    )


def _compare_plain_values(converted: Dataset, raw: Dataset) -> int:
    """Assert `headers._text` on `raw` (values not yet converted) gives, for every
    plain-VR tag, pydicom's converted value as text (trimmed), in `converted` (a second
    read of the same file); items of sequences too. Returns the values compared."""
    from etl.sources.dicom.headers import PLAIN_TEXT_VRS, _text

    compared = 0
    for tag in converted.keys():  # noqa: SIM118 (iterating a Dataset yields elements)
        elem = converted[tag]  # converts it
        if elem.VR == "SQ":
            for c_item, r_item in zip(elem.value, raw[tag].value, strict=True):
                compared += _compare_plain_values(c_item, r_item)
        elif elem.VR in PLAIN_TEXT_VRS and elem.keyword:
            text = "" if elem.value is None else str(elem.value).strip().strip("\0").strip()
            assert _text(raw, elem.keyword) == (text or None), elem.keyword
            compared += 1
    return compared


@pytest.mark.filterwarnings("ignore:Invalid value for VR")
def test_plain_values_read_from_their_bytes_equal_pydicoms_conversion(tmp_path: Path) -> None:
    """`_text` decodes a plain value's bytes itself; pydicom's conversion of the same
    file gives the same text, for every plain-VR tag of every test file and of values
    made to differ: padding, NUL, multiple values, non-ASCII, ISO 2022 escapes."""
    from etl.sources.dicom.headers import _text

    made = Dataset()
    made.SpecificCharacterSet = ["", "ISO 2022 IR 87"]
    made.PatientID = " PAD ID  "
    made.StudyInstanceUID = "1.2.3\0"
    made.Modality = "CT\\MR"  # two values: pydicom's text is the list's
    made.BodyPartExamined = "\u00d6SOPHAGUS"
    made.InstitutionName = "\x1b$B;3ED\x1b(B"
    made.StudyDate = "20200101"
    made.StudyTime = "120000.5 "
    made.AccessionNumber = ""
    made.file_meta = pydicom.dataset.FileMetaDataset()
    made.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    made.file_meta.MediaStorageSOPClassUID = made.file_meta.MediaStorageSOPInstanceUID = "1.2"
    made_path = tmp_path / "made.dcm"
    made.save_as(made_path, enforce_file_format=True)
    corpus = Path(__file__).parent / "corpus" / "dicom"
    files = [*sorted(DICOM_DATA.glob("*.dcm")), *sorted(corpus.glob("*.dcm")), made_path]
    compared = 0
    for path in files:
        try:
            converted = pydicom.dcmread(path, force=True)
            converted.keys()
        except Exception:  # a file pydicom cannot read at all: no values to compare
            continue
        compared += _compare_plain_values(converted, pydicom.dcmread(path, force=True))
    assert compared > 100
    ds = pydicom.dcmread(made_path)
    assert _text(ds, "PatientID") == "PAD ID"
    assert _text(ds, "StudyInstanceUID") == "1.2.3"
    assert _text(ds, "Modality") == "['CT', 'MR']"
    assert _text(ds, "AccessionNumber") is None


def test_the_walk_finds_what_rglob_finds_in_the_same_order(tmp_path: Path) -> None:
    """`_walk` walks with os.scandir; it lists what `Path.rglob` and `is_file` list (and
    skips media indexes), in the same order: nested folders, hidden files, a symbolic link
    to a file taken, one to a folder not descended into."""
    from etl.sources.dicom import INDEX_FILES, _walk

    root = tmp_path / "pacs"
    for relative in ["b/2.dcm", "a/x/1.dcm", "a/10.dcm", "a/9.dcm", ".hidden", "a/DICOMDIR", "z"]:
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        (root / relative).write_bytes(b"x")
    (root / "c").mkdir()
    (root / "link.dcm").symlink_to(root / "z")
    (root / "c" / "linked_folder").symlink_to(root / "a", target_is_directory=True)
    expected = sorted(
        (
            (p, p.relative_to(root).as_posix())
            for p in root.rglob("*")
            if p.is_file() and p.name.upper() not in INDEX_FILES
        ),
        key=lambda item: item[1],
    )
    found, _ = _walk(root)
    assert found == expected
    assert [r for _, r in found] == [
        ".hidden", "a/10.dcm", "a/9.dcm", "a/x/1.dcm", "b/2.dcm", "link.dcm", "z",
    ]  # fmt: skip


def test_a_folder_that_cannot_be_listed_is_logged_and_the_rest_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A subfolder the walk cannot list (permissions) stops nothing: its name is logged
    and every other file is listed."""
    import os

    from etl.sources import dicom

    for relative in ["a/1.dcm", "locked/2.dcm", "b/3.dcm"]:
        (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / relative).write_bytes(b"x")
    scandir = os.scandir

    def refusing(path):  # type: ignore[no-untyped-def]
        if Path(path).name == "locked":
            raise PermissionError(13, "Permission denied")
        return scandir(path)

    monkeypatch.setattr(dicom.os, "scandir", refusing)
    with caplog.at_level("ERROR"):
        found, _ = dicom._walk(tmp_path)
    assert [r for _, r in found] == ["a/1.dcm", "b/3.dcm"]
    assert "locked/: folder cannot be listed" in caplog.text
    # and the feed counts the folder as a quarantined record, with the reason
    stats, sink = _extract(tmp_path)
    locked = next(st for st in stats if st.file == "locked/")
    assert (locked.records_in, locked.quarantined) == (1, 1)
    assert "cannot be listed (PermissionError)" in (locked.message or "")
    quarantine = sink.table("quarantine").to_pylist()
    assert [
        (q["source_file"], q["reason"]) for q in quarantine if q["source_file"] == "locked/"
    ] == [("locked/", locked.message)]
    assert sum(st.records_in for st in stats) == 3  # 2 unreadable files + the folder
