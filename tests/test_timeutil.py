"""Seoul calendar arithmetic on integer microseconds (rules/timeutil.py) against the
standard library's own conversion through the tz database, for any moment from 1989 (Korea
last kept summer time in 1988, at +10:00) to 2100: the local date, its month, the RFC 3339
text and the datetime. The fast forms (fixed +09:00 offset, cached days and months) must
agree everywhere, midnight included."""

from __future__ import annotations

import datetime as dt
from zoneinfo import ZoneInfo

from hypothesis import example, given
from hypothesis import strategies as st

from rules.timeutil import SEOUL, from_us, local_date, local_midnight_us, month_of, rfc3339, to_us

TZDB = ZoneInfo("Asia/Seoul")
MIDNIGHT_2025_10_01 = 1_759_244_400_000_000  # 2025-10-01T00:00:00+09:00
FROM_1989 = 599_583_600_000_000  # 1989-01-01T00:00:00+09:00: no summer time since


def _reference(us: int) -> dt.datetime:
    return dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc) + dt.timedelta(microseconds=us)


@given(st.integers(min_value=FROM_1989, max_value=4_102_444_800_000_000))  # 1989 .. 2100
@example(FROM_1989)
@example(MIDNIGHT_2025_10_01)
@example(MIDNIGHT_2025_10_01 - 1)
@example(MIDNIGHT_2025_10_01 + 123_000)
def test_seoul_calendar_equals_the_tz_database(us):
    seoul = _reference(us).astimezone(TZDB)
    assert local_date(us) == seoul.date()
    assert month_of(local_date(us)) == seoul.strftime("%Y-%m")
    assert rfc3339(us) == seoul.isoformat() == _reference(us).astimezone(SEOUL).isoformat()
    assert from_us(us) == seoul and from_us(us).utcoffset() == dt.timedelta(hours=9)
    assert from_us(us, dt.timezone.utc) == _reference(us) and from_us(us, dt.timezone.utc).tzinfo is dt.timezone.utc
    assert to_us(from_us(us)) == us
    assert local_midnight_us(local_date(us)) <= us < local_midnight_us(local_date(us)) + 86_400_000_000


def test_the_tz_database_had_summer_time_before_1989():
    """Why the property starts in 1989: the fixed offset is the engine's choice for the
    dates it handles, not the tz database's history."""
    assert dt.datetime(1988, 7, 1, tzinfo=TZDB).utcoffset() == dt.timedelta(hours=10)
    assert local_date(FROM_1989 - 1) == dt.date(1988, 12, 31) and local_date(FROM_1989) == dt.date(1989, 1, 1)


def test_the_day_before_midnight_is_the_previous_month():
    assert month_of(local_date(MIDNIGHT_2025_10_01 - 1)) == "2025-09"
    assert month_of(local_date(MIDNIGHT_2025_10_01)) == "2025-10"
    assert rfc3339(MIDNIGHT_2025_10_01) == "2025-10-01T00:00:00+09:00"
    assert rfc3339(MIDNIGHT_2025_10_01 + 5) == "2025-10-01T00:00:00.000005+09:00"


def test_an_offset_of_minus_zero_is_utc_as_rfc3339_defines_it():
    """RFC 3339 §4.3: `-00:00` is a time in UTC whose place's offset is unknown. It is
    taken as UTC (docs/design.md, "Choices where the domain notes are silent"): the same
    instant as `Z` and `+00:00`, not refused and not read as Seoul."""
    from api.schemas import PaymentIn

    def at(text: str) -> int:
        return to_us(PaymentIn.model_validate({"payment_id": "p", "member_id": "m", "merchant_id": "s",
                                               "amount": 1_000, "occurred_at": text}).occurred_at)

    utc = at("2025-10-01T03:00:00Z")
    assert at("2025-10-01T03:00:00-00:00") == at("2025-10-01T03:00:00+00:00") == utc
    assert at("2025-10-01T12:00:00+09:00") == utc
