"""Where the bundled, non-code assets of a source checkout live."""

from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
DEMO_VOCABULARY = PROJECT_ROOT / "vocab"
MAPPINGS_DIR = PROJECT_ROOT / "mappings"
QUALITY_DIR = PROJECT_ROOT / "quality"
