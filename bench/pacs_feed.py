"""Benchmark the PACS feed's extraction on a tree of header-only DICOM files.

    python bench/pacs_feed.py [N ...] [--workdir bench/out]

For each N (default 10000): write N deterministic header-only files (etl/sources/dicom/
synth.py `bench_specs`: 20 instances a series, 3 series a study, a study a patient;
cached in WORKDIR/pacs_N), then run `extract_dicom` into a Landing in a temporary folder,
in a fresh subprocess so the peak RSS printed is the extraction's alone. Prints files/s,
seconds and peak RSS; figures also go to WORKDIR/pacs_feed.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.measure import peak_rss_mb, print_table  # noqa: E402

KEY_ENV = "OMOP_ETL_PSEUDONYM_KEY"
BENCH_KEY = "omop-etl-benchmark-key-not-a-secret-0123456789abcdef"


def generate(n: int, workdir: Path) -> tuple[Path, float]:
    """The cached tree of `n` files (written when absent) and the seconds spent writing."""
    from etl.sources.dicom.synth import bench_specs, write_tree

    root = workdir / f"pacs_{n}"
    done = workdir / f"pacs_{n}.complete"  # outside the tree: it is no instance
    if done.is_file():
        return root, 0.0
    started = time.perf_counter()
    write_tree(root, bench_specs(n))
    done.write_text(str(n), encoding="utf-8")
    return root, time.perf_counter() - started


def extract(root: Path) -> dict:
    """Run the feed's extraction over `root` into a throw-away Landing (this process)."""
    from etl.config import FeedConfig
    from etl.pipeline.land import Landing
    from etl.sources.dicom import extract_dicom

    feed = FeedConfig(name="pacs", kind="dicom", path=root)
    with tempfile.TemporaryDirectory() as tmp:
        landing = Landing(Path(tmp) / "pacs")
        started = time.perf_counter()
        stats = extract_dicom(feed, BENCH_KEY.encode(), landing)
        landing.close(stats)
        seconds = time.perf_counter() - started
        landed_mb = sum(p.stat().st_size for p in landing.dir.glob("*.parquet")) / 2**20
    return {
        "files": len(stats),
        "records": sum(s.records_in for s in stats),
        "quarantined": sum(s.quarantined for s in stats),
        "seconds": round(seconds, 2),
        "files_per_s": round(len(stats) / seconds, 1) if seconds else None,
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "landed_mb": round(landed_mb, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sizes", nargs="*", type=int, default=[10000])
    parser.add_argument("--workdir", type=Path, default=REPO / "bench" / "out")
    parser.add_argument("--extract-only", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.extract_only:
        print(json.dumps(extract(args.extract_only)))
        return
    args.workdir.mkdir(parents=True, exist_ok=True)
    results = []
    for n in args.sizes:
        root, generated_s = generate(n, args.workdir)
        env = {**os.environ, KEY_ENV: BENCH_KEY}
        out = subprocess.run(
            [sys.executable, __file__, "--extract-only", str(root)],
            check=True,
            capture_output=True,
            text=True,
            env=env,
        )
        result = {"n": n, "generate_s": round(generated_s, 1), **json.loads(out.stdout)}
        results.append(result)
    print_table(
        ["files", "records", "seconds", "files/s", "peak RSS MiB", "landed MiB", "generate s"],
        [
            [r["files"], r["records"], r["seconds"], r["files_per_s"], r["peak_rss_mb"],
             r["landed_mb"], r["generate_s"] or "cached"]
            for r in results
        ],
    )  # fmt: skip
    (args.workdir / "pacs_feed.json").write_text(json.dumps(results, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
