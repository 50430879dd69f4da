"""Re-cut the bundled demo vocabulary from its source release.

    python vocab/recut.py [SOURCE_DIR]      # default: ../shared/data/vocab_demo

The source (an Athena-format subset, see PROVENANCE.md) is 0.8 MB and the demo feeds
(Synthea, the HL7 v2 samples, the DICOM samples) use codes from across it, so it is kept
whole: this script copies the nine Athena files, checks each one reads cleanly with the
project's own reader, refuses to bundle more than 10 MB, and prints rows and a SHA-256
per file to compare with SHA256SUMS.
"""

from __future__ import annotations

import hashlib
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from etl.cdm.spec import vocabulary_tables  # noqa: E402
from etl.vocab.athena import Problem, find_file, read_table  # noqa: E402

MAX_BYTES = 10 * 2**20


def main(source: Path) -> int:
    total = 0
    sums = []
    for name, spec in vocabulary_tables().items():
        src = find_file(source, name)
        if src is None:
            print(f"missing {name.upper()}.csv in {source}", file=sys.stderr)
            return 1
        problems: list[Problem] = []
        rows = sum(b.num_rows for b in read_table(src, spec, problems=problems))
        if problems:
            print("\n".join(map(str, problems)), file=sys.stderr)
            return 1
        dest = HERE / f"{name.upper()}.csv"
        shutil.copyfile(src, dest)
        total += dest.stat().st_size
        digest = hashlib.sha256(dest.read_bytes()).hexdigest()
        sums.append(f"{digest}  {dest.name}")
        print(f"{dest.name:<28} {rows:>8,} rows")
    if total > MAX_BYTES:
        print(f"{total:,} bytes is over the 10 MB cap for bundled data", file=sys.stderr)
        return 1
    (HERE / "SHA256SUMS").write_text("\n".join(sums) + "\n", encoding="ascii")
    print(f"{total:,} bytes in all; SHA256SUMS written")
    return 0


if __name__ == "__main__":
    default = HERE.parent.parent / "shared" / "data" / "vocab_demo"
    sys.exit(main(Path(sys.argv[1]) if len(sys.argv) > 1 else default))
