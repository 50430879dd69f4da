"""Land: what a run extracted, written as Parquet under its run folder, and read back.

`WORKDIR/runs/RUN_ID/landing/FEED/{person,visit,event,...}.parquet` plus `files.json`
(per input file: records in, quarantined). Extraction streams into these files block by
block. Landed data hold pseudonyms, never clear identifiers, and are enough to rebuild
the run without the feeds (`--replay`).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from etl import canonical
from etl.json_text import readable
from etl.sources.ehr import FileStats


class Landing:
    """A feed's landing folder, written shape by shape as records arrive."""

    def __init__(self, feed_dir: Path) -> None:
        self.dir = feed_dir
        self.dir.mkdir(parents=True, exist_ok=True)
        self._writers: dict[str, pq.ParquetWriter] = {}

    def path(self, shape: str) -> Path:
        return self.dir / f"{shape}.parquet"

    def write(self, shape: str, table: pa.Table) -> None:
        schema = canonical.SHAPES[shape]
        writer = self._writers.get(shape)
        if writer is None:
            writer = pq.ParquetWriter(self.path(shape), schema, compression="zstd")
            self._writers[shape] = writer
        writer.write_table(table.select(schema.names).cast(schema))

    def close(self, files: list[FileStats]) -> None:
        """Finish every file (an empty one for shapes nothing was written to)."""
        for writer in self._writers.values():
            writer.close()
        for shape, schema in canonical.SHAPES.items():
            if shape not in self._writers:
                pq.write_table(schema.empty_table(), self.path(shape))
        stats = [asdict(f) for f in files]
        (self.dir / "files.json").write_text(readable(stats, 2), encoding="utf-8")


def replay_into(source_dir: Path, target_dir: Path) -> list[FileStats]:
    """Copy a previous run's landed feed into this run's landing area; its file stats."""
    if not (source_dir / "files.json").is_file():
        raise FileNotFoundError(f"nothing landed in {source_dir}")
    target_dir.mkdir(parents=True, exist_ok=True)
    for shape in canonical.SHAPES:
        src = source_dir / f"{shape}.parquet"
        if src.is_file():
            shutil.copyfile(src, target_dir / src.name)
        else:
            pq.write_table(canonical.SHAPES[shape].empty_table(), target_dir / src.name)
    shutil.copyfile(source_dir / "files.json", target_dir / "files.json")
    return read_file_stats(target_dir)


def read_file_stats(feed_dir: Path) -> list[FileStats]:
    stats = json.loads((feed_dir / "files.json").read_text(encoding="utf-8"))
    return [FileStats(**s) for s in stats]
