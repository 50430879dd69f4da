"""Read a site's local maps: SOURCE_TO_CONCEPT_MAP-layout CSVs and Usagi save files.

- `local/*.csv`: the CDM's SOURCE_TO_CONCEPT_MAP columns (source_code, source_vocabulary_id,
  target_concept_id, ..., invalid_reason). Rows with an invalid_reason are ignored.
- `usagi/<SOURCE_VOCABULARY_ID>.csv`: files saved by OHDSI Usagi (sourceCode, conceptId,
  mappingStatus, and mappingType when present); only APPROVED rows are used, and the file
  name gives the source vocabulary. mappingType MAPS_TO_VALUE gives a value concept.
"""

from __future__ import annotations

import csv
from pathlib import Path

import pyarrow as pa

LOCAL_MAP = pa.schema(
    [
        pa.field("source_vocabulary_id", pa.string(), nullable=False),
        pa.field("source_code", pa.string(), nullable=False),
        pa.field("target_concept_id", pa.int32(), nullable=False),
        pa.field("mapping_type", pa.string(), nullable=False),  # MAPS_TO | MAPS_TO_VALUE
        pa.field("map_file", pa.string(), nullable=False),
        pa.field("map_line", pa.int64(), nullable=False),
    ]
)
STCM_COLUMNS = {"source_code", "source_vocabulary_id", "target_concept_id"}


class LocalMapError(ValueError):
    """A local map file that cannot be used (file and line named)."""


def _int(value: str, where: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise LocalMapError(f"{where}: target concept id {value!r} is not an integer") from None


def read_local_maps(mappings_dir: Path) -> pa.Table:
    """Every local map row under `mappings_dir` (local/ and usagi/), as one Arrow table.

    Map files are small, hand-curated tables; they are read with the csv module.
    """
    rows: dict[str, list] = {name: [] for name in LOCAL_MAP.names}

    def add(vocab: str, code: str, target: int, mtype: str, file: str, line: int) -> None:
        for k, v in zip(LOCAL_MAP.names, (vocab, code, target, mtype, file, line), strict=True):
            rows[k].append(v)

    for path in sorted((mappings_dir / "local").glob("*.csv")):
        with path.open(encoding="utf-8-sig", newline="") as fh:
            reader = csv.DictReader(fh)
            missing = STCM_COLUMNS - set(reader.fieldnames or [])
            if missing:
                raise LocalMapError(f"{path}: missing column(s) {', '.join(sorted(missing))}")
            for line, r in enumerate(reader, start=2):
                if (r.get("invalid_reason") or "").strip():
                    continue
                where = f"{path.name}:{line}"
                target = _int(r["target_concept_id"].strip(), where)
                vocab, code = r["source_vocabulary_id"].strip(), r["source_code"].strip()
                add(vocab, code, target, "MAPS_TO", path.name, line)
    for path in sorted((mappings_dir / "usagi").glob("*.csv")):
        with path.open(encoding="utf-8-sig", newline="") as fh:
            reader = csv.DictReader(fh)
            missing = {"sourceCode", "conceptId", "mappingStatus"} - set(reader.fieldnames or [])
            if missing:
                raise LocalMapError(
                    f"{path}: not a Usagi file, missing {', '.join(sorted(missing))}"
                )
            for line, r in enumerate(reader, start=2):
                if r["mappingStatus"].strip().upper() != "APPROVED":
                    continue
                target = _int(r["conceptId"].strip(), f"{path.name}:{line}")
                if target == 0:
                    continue
                mtype = (r.get("mappingType") or "MAPS_TO").strip().upper()
                if mtype not in ("MAPS_TO", "MAPS_TO_VALUE"):
                    continue  # unit and operator mappings are not source-code maps
                add(path.stem, r["sourceCode"].strip(), target, mtype, path.name, line)
    return pa.table(rows, schema=LOCAL_MAP)
