"""Generate an Athena-format vocabulary release of any size, deterministically.

The small reference tables (VOCABULARY, DOMAIN, CONCEPT_CLASS, RELATIONSHIP) are copied
from the bundled demo release so every generated row references real ids; CONCEPT,
CONCEPT_RELATIONSHIP, CONCEPT_ANCESTOR and CONCEPT_SYNONYM are built with Arrow compute
(no Python loop per row) and pass the loader's key and integrity checks.
"""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "vocab"
_WRITE = pacsv.WriteOptions(
    delimiter="\t", quoting_style="none", batch_size=200_000, include_header=False
)
_RELATIONSHIPS = ["Maps to", "Mapped from", "Is a", "Subsumes", "Has asso finding"]


def _column(path: Path, name: str) -> list[str]:
    with path.open(encoding="utf-8", newline="") as fh:
        return [r[name] for r in csv.DictReader(fh, delimiter="\t", quoting=csv.QUOTE_NONE)]


def _pick(values: list[str], idx: np.ndarray) -> pa.Array:
    return pc.take(pa.array(values, pa.string()), pa.array(idx % len(values)))


def _write(table: pa.Table, path: Path) -> None:
    """Tab separated, unquoted, with a plain header line, as Athena writes its files."""
    with pa.OSFile(str(path), "wb") as sink:
        sink.write(("\t".join(table.column_names) + "\n").encode())
        pacsv.write_csv(table, sink, write_options=_WRITE)


def generate(out: Path, concepts: int = 1_000_000, relationships: int = 5_000_000) -> Path:
    """Write a release with `concepts` concepts and `relationships` relationships to `out`."""
    out.mkdir(parents=True, exist_ok=True)
    for name in ("VOCABULARY", "DOMAIN", "CONCEPT_CLASS", "RELATIONSHIP", "DRUG_STRENGTH"):
        shutil.copy(DEMO / f"{name}.csv", out / f"{name}.csv")
    vocabularies = _column(DEMO / "VOCABULARY.csv", "vocabulary_id")
    domains = _column(DEMO / "DOMAIN.csv", "domain_id")
    classes = _column(DEMO / "CONCEPT_CLASS.csv", "concept_class_id")

    ids = np.arange(1, concepts + 1, dtype=np.int64)
    id_str = pc.cast(pa.array(ids), pa.string())
    standard = pc.take(pa.array(["S", "C", None]), pa.array(ids % 3))
    concept = pa.table(
        {
            "concept_id": pa.array(ids, pa.int32()),
            "concept_name": pc.binary_join_element_wise("Generated concept ", id_str, ""),
            "domain_id": _pick(domains, ids * 7),
            "vocabulary_id": _pick(vocabularies, ids * 13),
            "concept_class_id": _pick(classes, ids * 17),
            "standard_concept": standard,
            "concept_code": pc.binary_join_element_wise("G", id_str, ""),
            "valid_start_date": pa.array(np.full(concepts, "19700101")),
            "valid_end_date": pa.array(np.full(concepts, "20991231")),
            "invalid_reason": pa.nulls(concepts, pa.string()),
        }
    )
    _write(concept, out / "CONCEPT.csv")

    # (concept_id_1, k) is unique and k picks the relationship, so the triple is unique.
    i = np.arange(relationships, dtype=np.int64)
    fanout = max(1, -(-relationships // concepts))
    c1 = i // fanout % concepts + 1
    k = i % fanout
    c2 = (c1 * 7919 + k * 104729) % concepts + 1
    rel_ids = np.array(_RELATIONSHIPS)[k % len(_RELATIONSHIPS)]
    if fanout > len(_RELATIONSHIPS):
        raise ValueError("at most 5 relationships per concept")
    relationship = pa.table(
        {
            "concept_id_1": pa.array(c1, pa.int32()),
            "concept_id_2": pa.array(c2, pa.int32()),
            "relationship_id": pa.array(rel_ids),
            "valid_start_date": pa.array(np.full(relationships, "19700101")),
            "valid_end_date": pa.array(np.full(relationships, "20991231")),
            "invalid_reason": pa.nulls(relationships, pa.string()),
        }
    )
    _write(relationship, out / "CONCEPT_RELATIONSHIP.csv")

    # every concept is its own ancestor, plus one parent level
    parent = (ids // 10) + 1
    ancestor = pa.table(
        {
            "ancestor_concept_id": pa.array(np.concatenate([ids, parent]), pa.int32()),
            "descendant_concept_id": pa.array(np.concatenate([ids, ids]), pa.int32()),
            "min_levels_of_separation": pa.array(np.repeat([0, 1], concepts), pa.int32()),
            "max_levels_of_separation": pa.array(np.repeat([0, 1], concepts), pa.int32()),
        }
    )
    ancestor = ancestor.filter(
        pc.or_(
            pc.equal(ancestor["min_levels_of_separation"], 0),
            pc.not_equal(ancestor["ancestor_concept_id"], ancestor["descendant_concept_id"]),
        )
    )
    _write(ancestor, out / "CONCEPT_ANCESTOR.csv")

    syn_ids = ids[ids % 2 == 0]
    synonym = pa.table(
        {
            "concept_id": pa.array(syn_ids, pa.int32()),
            "concept_synonym_name": pc.binary_join_element_wise(
                "Synonym of ", pc.cast(pa.array(syn_ids), pa.string()), ""
            ),
            "language_concept_id": pa.array(np.full(len(syn_ids), 4180186), pa.int32()),
        }
    )
    _write(synonym, out / "CONCEPT_SYNONYM.csv")
    return out
