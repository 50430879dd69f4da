"""Benchmark of the lab feed's extraction: N ORU^R01 messages -> landed Parquet.

The messages are Synthea-shaped and deterministic: the demo's 38 laboratory orders
(demo/synthea27, 251 results) repeated with fresh patient, encounter and order ids, 1,000
messages per file, CR line ends. Prints messages/s, results/s and peak RSS (this process,
and the largest worker process when the feed is parsed in several; OMOP_ETL_HL7_WORKERS
sets their number).

    .venv/bin/python -m bench.lab_feed [N]        # default 10000
"""

from __future__ import annotations

import csv
import logging
import resource
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from bench.measure import peak_rss_mb, print_table
from etl.config import FeedConfig
from etl.demo_lab import OUT, RANGES, SYNTHEA, oru_message
from etl.pipeline.land import Landing
from etl.sources.hl7v2 import extract_hl7

PER_FILE = 1000
KEY = b"bench-pseudonym-key-0123456789abcdef"


def _orders() -> list[tuple[str, list[dict[str, str]]]]:
    with (SYNTHEA / "observations.csv").open(encoding="utf-8", newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r["CATEGORY"] == "laboratory"]
    groups: dict[tuple[str, str, str], list[dict[str, str]]] = defaultdict(list)
    for r in rows:
        groups[(r["DATE"], r["PATIENT"], r["ENCOUNTER"])].append(r)
    return [(k[0], v) for k, v in sorted(groups.items())]


def generate(n: int, folder: Path) -> int:
    """Write n messages into folder; the number of OBX written."""
    with (OUT / RANGES).open(encoding="utf-8", newline="") as fh:
        ranges = {r["loinc"]: r["range"] for r in csv.DictReader(fh)}
    orders = _orders()
    results = 0
    for start in range(0, n, PER_FILE):
        segments: list[str] = []
        for i in range(start, min(n, start + PER_FILE)):
            date, rows = orders[i % len(orders)]
            patient = {"Id": f"P{i // 3:08d}", "BIRTHDATE": "1970-01-01", "GENDER": "FM"[i % 2]}
            segments += oru_message(
                f"B{i:08d}", date, patient, f"E{i:08d}", f"O{i:08d}", rows, ranges
            )
            results += len(rows)
        (folder / f"oru_{start // PER_FILE:05d}.hl7").write_text("\r".join(segments) + "\r")
    return results


def main(n: int) -> None:
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        feed_dir, land_dir = Path(tmp) / "feed", Path(tmp) / "landing"
        feed_dir.mkdir()
        t0 = time.perf_counter()
        obx = generate(n, feed_dir)
        t1 = time.perf_counter()
        landing = Landing(land_dir)
        feed = FeedConfig(name="lab", kind="hl7v2", path=feed_dir)
        files = extract_hl7(feed, KEY, landing)
        landing.close(files)
        t2 = time.perf_counter()
        extracted = sum(f.extracted for f in files)
        size = sum(p.stat().st_size for p in feed_dir.iterdir()) / 2**20
    secs = t2 - t1
    print_table(
        [
            "messages",
            "results",
            "MiB",
            "generate s",
            "extract s",
            "msg/s",
            "results/s",
            "peak MiB",
            "worker peak MiB",
        ],
        [
            [
                n,
                extracted,
                f"{size:.1f}",
                f"{t1 - t0:.1f}",
                f"{secs:.1f}",
                f"{n / secs:,.0f}",
                f"{extracted / secs:,.0f}",
                f"{peak_rss_mb():.0f}",
                f"{resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024:.0f}",
            ]
        ],
    )
    assert extracted == obx, (extracted, obx)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 10_000)
