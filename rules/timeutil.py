"""Time as integer microseconds since the epoch (UTC); calendars in Asia/Seoul.

Korea has no daylight saving time since 1988, so Seoul local time is UTC+9 for every
date this engine handles; a fixed offset is exact and far cheaper than zoneinfo.
"""

from __future__ import annotations

import datetime as dt
import re
from functools import lru_cache

SEOUL = dt.timezone(dt.timedelta(hours=9), "Asia/Seoul")
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)
_US_PER_DAY = 86_400_000_000
_SEOUL_OFFSET_US = 9 * 3_600_000_000
_EPOCH_ORDINAL = dt.date(1970, 1, 1).toordinal()
_EPOCH_SEOUL = _EPOCH.astimezone(SEOUL)
# A payment's day and month are asked for several times on its way through the book;
# the days and months are few (a chunk of payments spans a day or a month).
_DAYS_CACHED = 4_096


# The times the engine accepts from outside (requests, policy and program documents):
# years 2000 to 2099, Seoul. Far around any card payment, and far from the calendar's
# ends, where a Seoul date or a UTC instant of year 9999 or 0001 would leave years
# 1–9999 and fail deep in the book instead of at the door.
SPAN_FIRST = dt.datetime(2000, 1, 1, tzinfo=SEOUL)
SPAN_END = dt.datetime(2100, 1, 1, tzinfo=SEOUL)
SPAN_TEXT = "between 2000-01-01 and 2099-12-31, Seoul time"


def in_span(value):
    """`value` (an aware datetime or a date) when it lies in the accepted span; else a
    ValueError that says the span (a pydantic validator turns it into a 422)."""
    if isinstance(value, dt.datetime):
        if value.utcoffset() is not None and not SPAN_FIRST <= value < SPAN_END:
            raise ValueError(f"a time must be {SPAN_TEXT}")
    elif isinstance(value, dt.date) and not SPAN_FIRST.date() <= value < SPAN_END.date():
        raise ValueError(f"a date must be {SPAN_TEXT}")
    return value


# RFC 3339 text as the engine takes it from outside (api.schemas.Rfc3339Time; the
# clearing file's times, settlement.reconcile.parse_times): a date, `T`, `t` or a space, a
# time to the second, a fraction of 1-9 digits (to the microsecond: past the 6th digit
# only zeros, `to_the_microsecond`; the clearing file's are cut, see its reading), and
# `Z`, `z` or an offset `+HH:MM`/`-HH:MM`. The pattern gives the shape; the ranges
# (a real date, hours 00-23, minutes 00-59, seconds 00-59 — no leap second — and offsets
# up to 23:59) are checked after it. Matched whole (fullmatch, or within ^...$).
RFC3339_PATTERN = r"[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt ][0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]{1,9})?([Zz]|[+-][0-9]{2}:[0-9]{2})"

_DATE_FIRST = re.compile(r"\s*[0-9]{4}-[0-9]{2}-[0-9]{2}")
# The fields of time text of RFC 3339's shape (a date, a separator, hh:mm:ss, a fraction,
# an offset), for `in_range_text`: matched at the start, whatever follows.
_TIME_FIELDS = re.compile(r"\s*([0-9]{4})-([0-9]{2})-([0-9]{2})[Tt ]([0-9]{2}):([0-9]{2}):([0-9]{2})"
                          r"(?:[.,][0-9]+)?(?:[Zz]|[+-]([0-9]{2}):?([0-9]{2}))?\s*$")


def in_range_text(value):
    """`value`, unless it is time text of RFC 3339's shape with a field out of range: then
    a ValueError that says which. pydantic answered a leap second (23:59:60), an offset
    of +24:00 or an hour 25 with "unexpected extra characters at the end of the input",
    which sent a caller looking for stray characters (the contract audit). Not text, or
    text of another shape: passed on, for the parse after it to judge."""
    if not isinstance(value, str) or not (m := _TIME_FIELDS.match(value)):
        return value
    year, month, day, hour, minute, second, off_h, off_m = (None if f is None else int(f) for f in m.groups())
    if second == 60:
        raise ValueError(f"{value.strip()} is a leap second (second 60), which the book does not take: "
                         "write 59 or the next minute's 00")
    try:
        dt.date(year, month, day)
    except ValueError:
        raise ValueError(f"{value.strip()}: {year:04d}-{month:02d}-{day:02d} is no date") from None
    if hour > 23 or minute > 59 or second > 59:
        raise ValueError(f"{value.strip()}: {hour:02d}:{minute:02d}:{second:02d} is no time of day (00:00:00 "
                         "to 23:59:59)")
    if off_h is not None and (off_h > 23 or off_m > 59):
        raise ValueError(f"{value.strip()}: an offset runs from -23:59 to +23:59 (Seoul is +09:00)")
    return value


def not_a_number(value):
    """`value` when it is a date, a time, or text that begins with a date; else refused:
    pydantic reads 1764547200 (or "1764547200", "20260101", YAML's !!binary bytes of
    them) as Unix seconds, so a date given so ended a program at an hour nobody wrote.
    For documents' dates and times, before pydantic's own parse; None passes."""
    if value is None or isinstance(value, (dt.date, dt.datetime)) or (
            isinstance(value, str) and _DATE_FIRST.match(value)):
        return value
    numeric = isinstance(value, (int, float, bytes)) or (isinstance(value, str) and value.strip().isdigit())
    raise ValueError("a date is YYYY-MM-DD and a time RFC 3339 with an offset" + (", not a number" if numeric else ""))


# The book keeps a time as integer microseconds (`to_us`). Every parse of time text here
# (pydantic's, YAML's, datetime.fromisoformat) cuts a fraction of a second past its 6th
# digit, so `...00.1234567` and `...00.1234568` were one instant in the book, and a
# payment sent again under its id with another 7th digit was answered as a replay of the
# first, where it is another request. Such digits are refused where a time comes in;
# zeros past the 6th (a nanosecond clock's `...123456000`) say the same instant and pass.
FINEST_TEXT = "microseconds are the finest the book keeps"
_LONG_FRACTION = re.compile(r"[.,]([0-9]{7,})")  # in a date or time, digits after `.` or `,` are a fraction


def to_the_microsecond(value):
    """`value`, unless it is text whose fraction of a second has a digit other than 0
    past the 6th: then a ValueError that says microseconds are the finest the book keeps
    (a pydantic validator turns it into a 422 naming the field). Not text: passed on."""
    if isinstance(value, str):
        for digits in _LONG_FRACTION.findall(value):
            if digits[6:].strip("0"):
                shown = digits if len(digits) <= 12 else digits[:12] + "…"
                raise ValueError(f"a time's fraction of a second .{shown} ({len(digits)} digits): {FINEST_TEXT}, "
                                 "so digits past the 6th must be 0")
    return value


def time_text(value):
    """A date or time as it comes in from outside, before pydantic's own parse: no bare
    number (`not_a_number`) and nothing finer than a microsecond (`to_the_microsecond`).
    For documents' dates and times and the API's times in any ISO form; None passes.
    A field out of range is named (`in_range_text`)."""
    return in_range_text(to_the_microsecond(not_a_number(value)))


def to_us(moment: dt.datetime) -> int:
    if moment.utcoffset() is None:
        raise ValueError("a time needs a UTC offset")
    delta = moment - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def from_us(us: int, tz: dt.tzinfo = SEOUL) -> dt.datetime:
    if tz is SEOUL:
        return _EPOCH_SEOUL + dt.timedelta(microseconds=us)
    return (_EPOCH + dt.timedelta(microseconds=us)).astimezone(tz)


def local_date(us: int) -> dt.date:
    return _day(_EPOCH_ORDINAL + (us + _SEOUL_OFFSET_US) // _US_PER_DAY)


_day = lru_cache(maxsize=_DAYS_CACHED)(dt.date.fromordinal)


@lru_cache(maxsize=_DAYS_CACHED)
def month_of(day: dt.date) -> str:
    return f"{day.year:04d}-{day.month:02d}"


@lru_cache(maxsize=_DAYS_CACHED)
def year_of(day: dt.date) -> str:
    return f"{day.year:04d}"


def local_midnight_us(day: dt.date) -> int:
    return (day.toordinal() - _EPOCH_ORDINAL) * _US_PER_DAY - _SEOUL_OFFSET_US


def rfc3339(us: int) -> str:
    """`from_us(us).isoformat()`, without building a datetime: the day's text is cached,
    the time of day is integer arithmetic (tests/test_timeutil.py holds them equal)."""
    days, rest = divmod(us + _SEOUL_OFFSET_US, _US_PER_DAY)
    seconds, micros = divmod(rest, 1_000_000)
    hours, seconds = divmod(seconds, 3_600)
    minutes, seconds = divmod(seconds, 60)
    if micros:
        return f"{_day_text(_EPOCH_ORDINAL + days)}T{hours:02d}:{minutes:02d}:{seconds:02d}.{micros:06d}+09:00"
    return f"{_day_text(_EPOCH_ORDINAL + days)}T{hours:02d}:{minutes:02d}:{seconds:02d}+09:00"


@lru_cache(maxsize=_DAYS_CACHED)
def _day_text(ordinal: int) -> str:
    return _day(ordinal).isoformat()

