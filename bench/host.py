"""What the host's CPUs did while a benchmark step ran: its share stolen and waiting.

A virtual machine's hypervisor may hand its CPUs to other guests ("steal" in
/proc/stat); the same code on the same data then runs slower, and the wall time of a run
and its floor drift apart. The benchmark records, for the pipeline and for the floor,
the share of the machine's CPU time that was stolen and that waited for I/O, so a
reader can tell a contended run from a slow one. Linux only: elsewhere no figures.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

PROC_STAT = Path("/proc/stat")
# the aggregate "cpu" line's fields, in /proc/stat's order (proc(5))
FIELDS = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")


@dataclass(frozen=True)
class CpuTimes:
    """The machine's CPU time so far, all CPUs together, by kind (clock ticks)."""

    ticks: dict[str, int]

    @property
    def total(self) -> int:
        return sum(self.ticks.values())


def parse_proc_stat(text: str) -> CpuTimes:
    """The aggregate `cpu` line of /proc/stat's text (fields missing on old kernels: 0)."""
    for line in text.splitlines():
        parts = line.split()
        if parts and parts[0] == "cpu":
            values = [int(v) for v in parts[1 : 1 + len(FIELDS)]]
            values += [0] * (len(FIELDS) - len(values))
            return CpuTimes(dict(zip(FIELDS, values, strict=True)))
    raise ValueError("no aggregate 'cpu' line in /proc/stat")


def cpu_times() -> CpuTimes | None:
    """The machine's CPU times now; None where /proc/stat cannot be read."""
    try:
        return parse_proc_stat(PROC_STAT.read_text(encoding="ascii"))
    except (OSError, ValueError):
        return None


def contention(before: CpuTimes | None, after: CpuTimes | None) -> dict[str, float] | None:
    """Between two readings: the percentages of all CPU time stolen by the hypervisor
    and spent idle waiting for I/O, and the seconds stolen; None without both readings."""
    if before is None or after is None:
        return None
    total = after.total - before.total
    if total <= 0:
        return None
    steal = after.ticks["steal"] - before.ticks["steal"]
    iowait = after.ticks["iowait"] - before.ticks["iowait"]
    return {
        "steal_pct": round(100 * steal / total, 2),
        "iowait_pct": round(100 * iowait / total, 2),
        "steal_seconds": round(steal / os.sysconf("SC_CLK_TCK"), 1),  # readings: Linux
    }
