"""How many worker processes a feed's file parsing uses (the lab and PACS feeds)."""

from __future__ import annotations

import os
from collections.abc import Callable

MOST = 4  # processes a feed parses in at most, whatever the machine


def worker_processes(
    env_var: str, *, large: Callable[[], bool], cores: int | None = None, most: int = MOST
) -> int:
    """The site's `env_var` when it is set; else 1 for a feed that is not `large()`;
    else up to `most`, and no more than the `cores` the feed may use (default: the
    machine's). One process means in the caller's own."""
    configured = os.environ.get(env_var)
    if configured:
        return max(1, int(configured))
    if not large():
        return 1
    return max(1, min(most, cores or os.cpu_count() or 1))
