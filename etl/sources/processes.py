"""How many worker processes a feed's file parsing uses (the lab and PACS feeds)."""

from __future__ import annotations

import os
from collections.abc import Callable

from etl.config import ConfigError

MOST = 4  # processes a feed parses in at most, whatever the machine


def worker_processes(
    env_var: str, *, large: Callable[[], bool], cores: int | None = None, most: int = MOST
) -> int:
    """The site's `env_var` when it is set; else 1 for a feed that is not `large()`;
    else up to `most`, and no more than the `cores` the feed may use (default: the
    machine's). One process means in the caller's own. A setting that is not a whole
    number is refused (`ConfigError`, naming the variable) before any file is read."""
    configured = os.environ.get(env_var, "").strip()
    if configured:
        try:
            return max(1, int(configured))
        except ValueError:
            raise ConfigError(f"{env_var}={configured!r}: not a whole number") from None
    if not large():
        return 1
    return max(1, min(most, cores or os.cpu_count() or 1))
