"""Optional compiled kernels (built by setup.py when a C compiler is available).

`_hmac.pseudonyms`: the pseudonyms of an Arrow string column's values, as
etl/pseudonym.py defines them. Code using it falls back to SQL when it is missing.
`_lines.lines_are_records`: whether every line of a delimited file is one record
(etl/sources/delimited.py, which falls back to NumPy when it is missing).
"""

from __future__ import annotations

import importlib
from types import ModuleType


def compiled(name: str) -> ModuleType | None:
    """The compiled kernel `etl.native.<name>`, or None where it was not built."""
    try:
        return importlib.import_module(f"{__name__}.{name}")
    except ImportError:
        return None
