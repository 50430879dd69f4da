"""The demo lab feed is generated deterministically from the Synthea demo."""

from __future__ import annotations

from etl.demo_lab import OUT, RANGES, SYNTHEA, build_files
from etl.sources.hl7v2 import input_files


def test_regenerating_the_demo_lab_feed_gives_identical_bytes() -> None:
    files = build_files(SYNTHEA, OUT / RANGES)
    committed = {p.name: p.read_bytes() for p in input_files(OUT)}
    assert files == committed
    assert len(files) == 17
    # line-end variety and one batch
    assert b"\n" not in files["oru_001.hl7"] and b"\r" in files["oru_001.hl7"]
    assert b"\r" not in files["oru_003.hl7"]
    assert files["batch_001.hl7"].startswith(b"FHS|") and b"\r\nBTS|" in files["batch_001.hl7"]
    assert sum(f.count(b"\nOBX|") + f.count(b"\rOBX|") for f in files.values()) == 251
