"""Business days: weekends and public holidays (the `holidays` library) are not."""

from __future__ import annotations

import datetime as dt
from functools import lru_cache

import holidays

BUSINESS_DAYS_MAX = 60  # a payout lag longer than this is a configuration error


@lru_cache(maxsize=64)
def _holidays(country: str, year: int) -> frozenset[dt.date]:
    return frozenset(holidays.country_holidays(country, years=[year]).keys())


def is_business_day(day: dt.date, country: str = "KR") -> bool:
    return day.weekday() < 5 and day not in _holidays(country, day.year)


def add_business_days(day: dt.date, n: int, country: str = "KR") -> dt.date:
    """The n-th business day after `day` (day itself does not count; n = 0 gives the
    first business day on or after `day`)."""
    assert 0 <= n <= BUSINESS_DAYS_MAX, f"business-day lag {n} out of range"
    current = day
    if n == 0:
        while not is_business_day(current, country):
            current += dt.timedelta(days=1)
        return current
    left = n
    while left:
        current += dt.timedelta(days=1)
        if is_business_day(current, country):
            left -= 1
    return current


def month_days(month: str) -> list[dt.date]:
    year, mon = int(month[:4]), int(month[5:7])
    first = dt.date(year, mon, 1)
    nxt = dt.date(year + (mon == 12), mon % 12 + 1, 1)
    return [first + dt.timedelta(days=i) for i in range((nxt - first).days)]
