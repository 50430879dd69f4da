"""Generate a full-size Athena release in bounded memory, deterministically.

    python bench/athena_full.py OUT [--concepts 6000000] [--relationships 50000000]
                                    [--fanout 3] [--chunk 2000000]

The release is the bundled demo vocabulary (vocab/: its real concepts, relationships and
ancestors, so the demo's Synthea codes map exactly as with the demo vocabulary) plus
`concepts` generated concepts with ids above the demo's largest, `relationships`
generated relationships among them (relationship ids picked from vocab/RELATIONSHIP.csv),
a concept hierarchy (a tree of fan-out `fanout`: every concept's whole chain of
ancestors, plus its self row; fan-out 3 over 6 M concepts gives about 86 M rows) and one
synonym for every other concept. Generated rows never touch a demo concept, so no demo
mapping changes. Every table is written in chunks of `chunk` rows (Arrow/numpy, no Python
loop per row), so memory stays bounded (a few hundred MiB) whatever the size.
"""

from __future__ import annotations

import argparse
import csv
import logging
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "vocab"
log = logging.getLogger(__name__)

_WRITE = pacsv.WriteOptions(
    delimiter="\t", quoting_style="none", batch_size=500_000, include_header=False
)
# 'Maps to'-like ids first; the rest are real ids of vocab/RELATIONSHIP.csv (see _relationships)
_CORE = ["Maps to", "Mapped from", "Is a", "Subsumes"]
_N_RELATIONSHIP_IDS = 24


def _column(path: Path, name: str) -> list[str]:
    with path.open(encoding="utf-8", newline="") as fh:
        return [r[name] for r in csv.DictReader(fh, delimiter="\t", quoting=csv.QUOTE_NONE)]


def _relationships() -> list[str]:
    """The relationship ids generated rows use: the core four and 20 more real ones."""
    ids = _column(DEMO / "RELATIONSHIP.csv", "relationship_id")
    rest = [r for r in ids if r not in _CORE]
    step = max(1, len(rest) // (_N_RELATIONSHIP_IDS - len(_CORE)))
    return _CORE + rest[::step][: _N_RELATIONSHIP_IDS - len(_CORE)]


def demo_max_concept_id() -> int:
    return max(int(v) for v in _column(DEMO / "CONCEPT.csv", "concept_id"))


def first_generated_id() -> int:
    """Generated concept ids start at the next round 10 M above the demo's largest id."""
    return (demo_max_concept_id() // 10_000_000 + 1) * 10_000_000


def _pick(values: list[str], idx: np.ndarray) -> pa.Array:
    return pc.take(pa.array(values, pa.string()), pa.array(idx % len(values)))


def _chunks(total: int, size: int) -> Iterator[tuple[int, int]]:
    for start in range(0, total, size):
        yield start, min(total, start + size)


class _TableFile:
    """One release file: the demo file's header and rows, then generated chunks."""

    def __init__(self, out: Path, name: str) -> None:
        self.path = out / f"{name}.csv"
        demo = (DEMO / f"{name}.csv").read_bytes()
        header, _, body = demo.partition(b"\n")
        self.columns = header.decode().rstrip("\r").split("\t")
        self.sink = pa.OSFile(str(self.path), "wb")
        self.sink.write(header + b"\n")
        self.sink.write(body if not body or body.endswith(b"\n") else body + b"\n")
        self.rows = body.count(b"\n") + (1 if body and not body.endswith(b"\n") else 0)

    def write(self, table: pa.Table) -> None:
        if table.column_names != self.columns:
            raise ValueError(f"{self.path.name}: columns {table.column_names} != {self.columns}")
        pacsv.write_csv(table, self.sink, write_options=_WRITE)
        self.rows += table.num_rows

    def close(self) -> int:
        self.sink.close()
        return self.rows


def _write_concepts(f: _TableFile, base: int, concepts: int, chunk: int) -> None:
    vocabularies = _column(DEMO / "VOCABULARY.csv", "vocabulary_id")
    domains = _column(DEMO / "DOMAIN.csv", "domain_id")
    classes = _column(DEMO / "CONCEPT_CLASS.csv", "concept_class_id")
    for lo, hi in _chunks(concepts, chunk):
        j = np.arange(lo, hi, dtype=np.int64)
        ids = j + base
        id_str = pc.cast(pa.array(ids), pa.string())
        n = hi - lo
        f.write(
            pa.table(
                {
                    "concept_id": pa.array(ids, pa.int32()),
                    "concept_name": pc.binary_join_element_wise("Generated concept ", id_str, ""),
                    "domain_id": _pick(domains, j * 7),
                    "vocabulary_id": _pick(vocabularies, j * 13),
                    "concept_class_id": _pick(classes, j * 17),
                    "standard_concept": pc.take(pa.array(["S", "C", None]), pa.array(j % 3)),
                    # 'G' prefix: never equal to a real code of the same vocabulary
                    "concept_code": pc.binary_join_element_wise("G", id_str, ""),
                    "valid_start_date": pa.array(np.full(n, "19700101")),
                    "valid_end_date": pa.array(np.full(n, "20991231")),
                    "invalid_reason": pa.nulls(n, pa.string()),
                }
            )
        )


def _write_relationships(
    f: _TableFile, base: int, concepts: int, relationships: int, chunk: int
) -> None:
    """Row i: concept (i // fanout), slot k = i % fanout, relationship id k: the triple
    (concept_id_1, concept_id_2, relationship_id) is unique because (concept_id_1, k) is."""
    rel_ids = np.array(_relationships())
    fanout = max(1, -(-relationships // concepts))
    if fanout > len(rel_ids):
        raise ValueError(f"at most {len(rel_ids)} relationships per concept")
    for lo, hi in _chunks(relationships, chunk):
        i = np.arange(lo, hi, dtype=np.int64)
        c1 = i // fanout % concepts
        k = i % fanout
        c2 = (c1 * 7919 + k * 104729 + 1) % concepts
        n = hi - lo
        f.write(
            pa.table(
                {
                    "concept_id_1": pa.array(c1 + base, pa.int32()),
                    "concept_id_2": pa.array(c2 + base, pa.int32()),
                    "relationship_id": pa.array(rel_ids[k]),
                    "valid_start_date": pa.array(np.full(n, "19700101")),
                    "valid_end_date": pa.array(np.full(n, "20991231")),
                    "invalid_reason": pa.nulls(n, pa.string()),
                }
            )
        )


def _write_ancestors(f: _TableFile, base: int, concepts: int, fanout: int, chunk: int) -> None:
    """A tree (heap order: the parent of node j > 0 is (j - 1) // fanout): each node's
    self row and one row per ancestor up to the root, min levels = the distance; max
    levels is one more for every fifth descendant at distance >= 2 (a second, longer
    path, as poly-hierarchies have). One numpy pass per tree level, not per row."""
    per_chunk = max(1, chunk // 16)  # ~15 ancestor rows per descendant at fan-out 3
    for lo, hi in _chunks(concepts, per_chunk):
        desc = np.arange(lo, hi, dtype=np.int64)
        node, dist = desc.copy(), 0
        parts_a, parts_d, parts_l = [], [], []
        while desc.size:
            parts_a.append(node)
            parts_d.append(desc)
            parts_l.append(np.full(desc.size, dist, dtype=np.int32))
            up = node > 0
            node, desc = (node[up] - 1) // fanout, desc[up]
            dist += 1
        a = np.concatenate(parts_a)
        d = np.concatenate(parts_d)
        lv = np.concatenate(parts_l)
        longer = (lv >= 2) & (d % 5 == 0)
        f.write(
            pa.table(
                {
                    "ancestor_concept_id": pa.array(a + base, pa.int32()),
                    "descendant_concept_id": pa.array(d + base, pa.int32()),
                    "min_levels_of_separation": pa.array(lv),
                    "max_levels_of_separation": pa.array(lv + longer.astype(np.int32)),
                }
            )
        )


def _write_synonyms(f: _TableFile, base: int, concepts: int, chunk: int) -> None:
    for lo, hi in _chunks(concepts, chunk):
        ids = np.arange(lo + lo % 2, hi, 2, dtype=np.int64) + base
        f.write(
            pa.table(
                {
                    "concept_id": pa.array(ids, pa.int32()),
                    "concept_synonym_name": pc.binary_join_element_wise(
                        "Synonym of ", pc.cast(pa.array(ids), pa.string()), ""
                    ),
                    "language_concept_id": pa.array(np.full(ids.size, 4180186), pa.int32()),
                }
            )
        )


def generate(
    out: Path,
    concepts: int = 6_000_000,
    relationships: int = 50_000_000,
    fanout: int = 3,
    chunk: int = 2_000_000,
) -> dict[str, int]:
    """Write the release to `out`; returns rows per file (demo rows included)."""
    out.mkdir(parents=True, exist_ok=True)
    for name in ("VOCABULARY", "DOMAIN", "CONCEPT_CLASS", "RELATIONSHIP", "DRUG_STRENGTH"):
        shutil.copy(DEMO / f"{name}.csv", out / f"{name}.csv")
    base = first_generated_id()
    if base + concepts >= 2**31:
        raise ValueError("concept ids would overflow int32")
    writers = {
        "CONCEPT": lambda f: _write_concepts(f, base, concepts, chunk),
        "CONCEPT_RELATIONSHIP": lambda f: _write_relationships(
            f, base, concepts, relationships, chunk
        ),
        "CONCEPT_ANCESTOR": lambda f: _write_ancestors(f, base, concepts, fanout, chunk),
        "CONCEPT_SYNONYM": lambda f: _write_synonyms(f, base, concepts, chunk),
    }
    rows: dict[str, int] = {}
    for name, write in writers.items():
        started = time.perf_counter()
        f = _TableFile(out, name)
        try:
            write(f)
        finally:
            rows[name] = f.close()
        log.info("%s: %d rows in %.1fs", name, rows[name], time.perf_counter() - started)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("--concepts", type=int, default=6_000_000)
    ap.add_argument("--relationships", type=int, default=50_000_000)
    ap.add_argument("--fanout", type=int, default=3)
    ap.add_argument("--chunk", type=int, default=2_000_000)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    rows = generate(args.out, args.concepts, args.relationships, args.fanout, args.chunk)
    for name, n in rows.items():
        print(f"{name}: {n:,} rows")


if __name__ == "__main__":
    main()
