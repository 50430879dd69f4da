"""The window of plausible dates, shared by every feed's extraction.

A date before 1850 (DQD's lowest plausible year of birth) or after tomorrow (a record
cannot describe what has not happened yet; one day of slack for time zones) is a typing
or system error, not a fact: the record is quarantined with the column named. End dates
are only held to the lower bound (a planned end, e.g. of coverage, may lie ahead).
"""

from __future__ import annotations

import datetime as dt

EARLIEST = dt.date(1850, 1, 1)


def latest() -> dt.date:
    """The first day counted as future: the day after tomorrow (one day of slack)."""
    return dt.date.today() + dt.timedelta(days=2)


# latest() as last computed: the date only moves forward (short of a clock set back), so
# a day before it is before today's latest() too, without asking the clock (the lab feed
# checks every timestamp it reads, and latest() costs about 3 us a call)
_latest_seen = latest()


def date_problem(
    name: str, value: dt.date | dt.datetime | None, *, end: bool = False
) -> str | None:
    """Why `value` (of field `name`) is implausible, or None."""
    if value is None:
        return None
    day = value.date() if isinstance(value, dt.datetime) else value
    if day < EARLIEST:
        return f"{name} is before {EARLIEST.year}"
    if not end and day >= _latest_seen and day >= _refreshed_latest():
        return f"{name} is in the future"
    return None


def _refreshed_latest() -> dt.date:
    global _latest_seen
    _latest_seen = latest()
    return _latest_seen
