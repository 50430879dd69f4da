"""Land: what a run extracted, written as Parquet under its run folder, and read back.

`WORKDIR/runs/RUN_ID/landing/FEED/{person,visit,event,...}.parquet` plus `files.json`
(per input file: records in, quarantined). Landed data hold pseudonyms, never clear
identifiers, and are enough to rebuild the run without the feeds (`--replay`).
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from etl import canonical
from etl.sources.ehr import Extract, FileStats


def land(extract: Extract, feed_dir: Path) -> None:
    feed_dir.mkdir(parents=True, exist_ok=True)
    for shape in canonical.SHAPES:
        pq.write_table(extract.table(shape), feed_dir / f"{shape}.parquet", compression="zstd")
    stats = [asdict(f) for f in extract.files]
    (feed_dir / "files.json").write_text(json.dumps(stats, indent=2), encoding="utf-8")


def read_landed(feed_dir: Path) -> Extract:
    """The Extract a previous run landed in `feed_dir`."""
    if not (feed_dir / "files.json").is_file():
        raise FileNotFoundError(f"nothing landed in {feed_dir}")
    out = Extract()
    for shape, schema in canonical.SHAPES.items():
        path = feed_dir / f"{shape}.parquet"
        if path.is_file():
            out.add(shape, pq.read_table(path).cast(schema))
        else:
            out.add(shape, pa.Table.from_batches([], schema=schema))
    stats = json.loads((feed_dir / "files.json").read_text(encoding="utf-8"))
    out.files = [FileStats(**s) for s in stats]
    return out
