"""What finance reads about budgets: `GET /v1/budgets` and the reports' budget burn
forecast by one rule (the recent burn: the last 7 days of the period, or its days so far
when fewer), a period not yet begun has no forecast, and a refund's clawback of last
month's payments counts against last month's budget in the reports as it does in the
budgets. The recent burn comes from `budget_days`, which the book keeps with each
budget row it moves, dated by the batch's clock."""

from __future__ import annotations

import datetime as dt
import time

import pytest

import api.programs as api_programs
from rules.timeutil import local_date
from settlement import report

DAYS = ("2026-12-01", "2026-12-02", "2026-12-03")


pytestmark = pytest.mark.usefixtures("no_watermark_lag")  # tests/conftest.py


def _budgets(api) -> dict[tuple[str, str], dict]:
    return {(b["source"], b["period"]): b for b in api.get("/v1/budgets", role="finance").json()["budgets"]}


def _shop_and_members(api) -> None:
    assert api.put("/v1/merchants/shop", {"name": "s", "district": "dong", "category": "restaurant",
                                          "annual_sales": 200_000_000, "registered_from": "2019-01-01"}).status_code == 201
    for i in range(1, 4):
        api.put(f"/v1/members/m{i}", {"district": "dong"})
        assert api.post("/v1/topups", {"topup_id": f"t{i}", "member_id": f"m{i}", "amount": 100_000,
                                       "occurred_at": "2026-11-20T08:00:00+09:00"}).json()["status"] == "approved"


def _pay(api, payment_id: str, member: str, when: str, amount: int = 10_000) -> dict:
    r = api.post("/v1/payments", {"payment_id": payment_id, "member_id": member, "merchant_id": "shop",
                                  "amount": amount, "occurred_at": when})
    assert r.status_code == 201, r.text
    return r.json()


def _settle(api, day: str) -> None:
    r = api.post("/v1/settlements", {"business_date": day}, role="finance")
    assert r.status_code == 201 and r.json()["status"] == "settled", r.text


def _december_burn(api):
    """DAYS settled, then December's report burn: (series, limits, summary, the report's data)."""
    for day in DAYS:
        _settle(api, day)
    with api.services.reader.connect() as conn:
        data = report.month_data(conn, "2026-12", with_abuse=False)
    return (*report.burn(data.budget_burn, list(DAYS), [d.isoformat() for d in report.month_days("2026-12")],
                         data.budgets), data)


def test_the_api_and_the_report_forecast_by_the_period_burn_so_far(api, monkeypatch):
    _shop_and_members(api)
    for source, period, limit in (("city", "2026-12", 6_000), ("city", "2027-01", 1_000), ("city", "2027", 1_000),
                                  ("seo", "2026-12", 0)):
        assert api.put(f"/v1/budgets/{source}/{period}", {"amount": limit}, role="finance").status_code == 200
    for i, day in enumerate(DAYS, start=1):  # 10% of 10,000 a day: city 600, national 400
        _clock(monkeypatch, day)  # each recorded on its day: the days' burn is what the forecast reads
        assert _pay(api, f"p{i}", f"m{i}", f"{day}T12:00:00+09:00")["cashback"]["components"][0]["funded_by"] == {
            "national": 400, "city": 600}
    monkeypatch.setattr(api_programs, "seoul_today", lambda: dt.date(2026, 12, 3))
    budgets = _budgets(api)
    # 1,800 in 3 days: 600 a day; 4,200 left take 7 more days.
    assert budgets[("city", "2026-12")]["forecast_exhausted_on"] == "2026-12-10"
    # A period not yet begun has no forecast (it had one, in the month before it).
    assert budgets[("city", "2027-01")]["forecast_exhausted_on"] is None
    assert budgets[("city", "2027")]["forecast_exhausted_on"] is None
    # A limit of 0 is all used, not "unlimited".
    assert budgets[("seo", "2026-12")]["used_bp"] == 10_000 and budgets[("seo", "2026-12")]["remaining"] == 0
    _, _, summary, _ = _december_burn(api)
    city = next(row for row in summary if row["source"] == "city")
    assert (city["spent_won"], city["per_day_won"], city["forecast_exhausted_on"]) == (1_800, 600, "2026-12-10")
    # Budget periods are in the book's span.
    assert api.put("/v1/budgets/city/1900-01", {"amount": 1}, role="finance").status_code == 422


def test_a_refund_of_last_months_payment_counts_against_last_months_budget_in_the_reports(api, monkeypatch):
    _shop_and_members(api)
    for period in ("2026-11", "2026-12"):
        assert api.put(f"/v1/budgets/city/{period}", {"amount": 10_000}, role="finance").status_code == 200
    _pay(api, "nov-1", "m1", "2026-11-30T23:59:59+09:00")
    _pay(api, "nov-2", "m2", "2026-11-30T23:59:59+09:00")
    _pay(api, "dec-1", "m3", "2026-12-01T00:00:00+09:00")
    r = api.post("/v1/payments/nov-1/refunds", {"refund_id": "r1", "amount": 10_000,
                                                 "occurred_at": "2026-12-01T09:00:00+09:00"})
    assert r.status_code == 201 and r.json()["cashback_clawback"] == 1_000, r.text
    budgets = _budgets(api)
    assert budgets[("city", "2026-11")]["committed"] == 600 and budgets[("city", "2026-12")]["committed"] == 600
    for day in ("2026-11-30", "2026-12-01"):
        _settle(api, day)
    with api.services.reader.connect() as conn:
        for month, day in (("2026-11", "2026-11-30"), ("2026-12", "2026-12-01")):
            data = report.month_data(conn, month, with_abuse=False)
            days = [d.isoformat() for d in report.month_days(month) if d.isoformat() <= day]
            _, _, summary = report.burn(data.budget_burn, days, [d.isoformat() for d in report.month_days(month)],
                                        data.budgets)
            city = next(row for row in summary if row["source"] == "city")
            assert city["spent_won"] == budgets[("city", month)]["committed"], (month, summary)
        # The day report of 2026-11-30 is as of that day: the refund came the day after.
        data = report.day_data(conn, dt.date(2026, 11, 30), with_abuse=False)
        city = data.budget_burn.filter(data.budget_burn["source"] == "city")
        assert int(city["cashback_net_won"].sum()) == 1_200


def test_a_forecast_far_past_the_period_is_none_not_an_overflow():
    """A year's 1조 with 1 won burnt on its first day: the day it would run out lies
    millions of years away; the forecast is none (it was an OverflowError: GET
    /v1/budgets and the reports answered 500 for every funder)."""
    from ledger.queries import forecast_exhausted_on

    assert forecast_exhausted_on("2026", 10**12, 1, dt.date(2026, 1, 1), recent_won=1) is None
    assert forecast_exhausted_on("2026-12", 10**12, 346, dt.date(2026, 12, 2), recent_won=346) is None
    assert forecast_exhausted_on("2026-12", 3_100, 100, dt.date(2026, 12, 1), recent_won=100) == "2026-12-31"
    assert forecast_exhausted_on("2026-12", 3_101, 100, dt.date(2026, 12, 1), recent_won=100) is None


def test_the_month_report_shows_a_year_limit_used_up(api, monkeypatch):
    """Budgets are set per year (DOMAIN.md): with only city's 2026 limit, used up in
    December, the month report's burn said city had no limit and no exhaustion, and
    "No monthly budget limit is set" (the year-end audit). Its row now gives the year's
    limit, what the year committed and the day it runs out by the budgets' rule."""
    _shop_and_members(api)
    assert api.put("/v1/budgets/city/2026", {"amount": 1_200}, role="finance").status_code == 200
    for i, day in enumerate(DAYS, start=1):  # city 600 a day: the year's 1,200 gone on the second day
        _pay(api, f"p{i}", f"m{i}", f"{day}T12:00:00+09:00")
    _, limits, summary, data = _december_burn(api)
    city = next(row for row in summary if row["source"] == "city")
    assert (city["limit_won"], city["year_limit_won"], city["year_committed_won"]) == (None, 1_200, 1_200), city
    # Nothing left: today, as GET /v1/budgets says it (none once 2026 is over).
    today = local_date(time.time_ns() // 1000)
    assert city["year_forecast_exhausted_on"] == (today.isoformat() if today.year == 2026 else None)
    assert "city" not in limits  # the chart is the month's
    assert "their year limits are in the table" in report.render(data)


def _clock(monkeypatch, day: str, time: str = "12:00:30") -> None:
    """The book's clock on `day` (Seoul): what its batches record, and so the day their
    budget moves are kept under in `budget_days`."""
    import ledger.book
    from rules.timeutil import to_us

    stamp = to_us(dt.datetime.fromisoformat(f"{day}T{time}+09:00"))
    monkeypatch.setattr(ledger.book, "now_us", lambda: stamp)


def _budget_days(api, source: str, period: str) -> dict[str, int]:
    from sqlalchemy import select

    from ledger import schema as s

    t = s.budget_days
    with api.services.reader.connect() as conn:
        return {day: int(won) for day, won in conn.execute(
            select(t.c.day, t.c.committed_won).where(t.c.source == source, t.c.period == period))}


def test_a_year_budget_forecasts_by_the_burn_of_its_last_seven_days(api, monkeypatch):
    """Policy staff's question: the city's burn rises fivefold on 20 December (a
    promotion). The year's average (32,400 over 360 days: 90 a day) put the run-out
    past the year's end, none; the last 7 days burn 3,000 a day and 9,000 are left:
    three days, the 29th. A refund on the 26th gives 3,000 back on that day: the
    week's burn is 18,000 (2,571 a day), 12,000 are left, and the run-out is five days on."""
    from tests.book_helpers import assert_book_ok

    assert api.put("/v1/merchants/shop", {"name": "s", "district": "dong", "category": "restaurant",
                                          "annual_sales": 200_000_000, "registered_from": "2019-01-01"}).status_code == 201
    _clock(monkeypatch, "2026-12-01", "08:00:30")
    spend = {day: 10_000 if day < 20 else 50_000 for day in range(1, 27)}  # city 600 a day, 3,000 from the 20th
    for day, won in spend.items():  # a member a day: no points earned before to spend first
        api.put(f"/v1/members/m{day}", {"district": "dong"})
        assert api.post("/v1/topups", {"topup_id": f"t{day}", "member_id": f"m{day}", "amount": won,
                                       "occurred_at": "2026-12-01T08:00:00+09:00"}).json()["status"] == "approved"
    assert api.put("/v1/budgets/city/2026", {"amount": 41_400}, role="finance").status_code == 200
    for day, won in spend.items():
        when = f"2026-12-{day:02d}"
        _clock(monkeypatch, when)
        _pay(api, f"p{day}", f"m{day}", f"{when}T12:00:00+09:00", won)
    monkeypatch.setattr(api_programs, "seoul_today", lambda: dt.date(2026, 12, 26))
    city = _budgets(api)[("city", "2026")]
    assert city["committed"] == 19 * 600 + 7 * 3_000 == 32_400
    assert city["forecast_exhausted_on"] == "2026-12-29", city
    days = _budget_days(api, "city", "2026")
    assert days["2026-12-19"] == 600 and days["2026-12-20"] == 3_000 and sum(days.values()) == 32_400
    _clock(monkeypatch, "2026-12-26", "18:00:00")
    r = api.post("/v1/payments/p26/refunds", {"refund_id": "r26", "amount": 50_000,
                                              "occurred_at": "2026-12-26T17:59:00+09:00"})
    assert r.status_code == 201 and r.json()["cashback_clawback"] == 5_000, r.text
    assert _budget_days(api, "city", "2026")["2026-12-26"] == 0  # its 3,000, and 3,000 given back
    assert _budget_days(api, "city", "2026-12")["2026-12-26"] == 0
    city = _budgets(api)[("city", "2026")]
    assert (city["committed"], city["forecast_exhausted_on"]) == (29_400, "2026-12-31"), city
    assert_book_ok(api)


def test_early_in_a_period_the_burn_is_divided_by_its_days_so_far():
    """On a month's second day the week's burn is the two days': 1,200 burnt is 600 a
    day (a 7-day divisor said 171, and a run-out three times as far)."""
    from ledger.queries import burn_window_days, forecast_exhausted_on

    assert burn_window_days("2026-12", dt.date(2026, 12, 2)) == 2
    assert burn_window_days("2026", dt.date(2026, 12, 2)) == 7
    assert burn_window_days("2027", dt.date(2026, 12, 2)) == 0  # not begun
    assert forecast_exhausted_on("2026-12", 6_000, 1_200, dt.date(2026, 12, 2), recent_won=1_200) == "2026-12-10"
    # The recent burn decides, not the period's average: 100 a day late in a year of 1,000 a day.
    assert forecast_exhausted_on("2026", 400_000, 300_000, dt.date(2026, 12, 2), recent_won=700) is None
    assert forecast_exhausted_on("2026", 400_000, 300_000, dt.date(2026, 12, 2), recent_won=70_000) == "2026-12-12"
    # Money given back in the window (refunds) is no burn; nothing left is today.
    assert forecast_exhausted_on("2026-12", 6_000, 1_200, dt.date(2026, 12, 9), recent_won=-300) is None
    assert forecast_exhausted_on("2026-12", 1_200, 1_200, dt.date(2026, 12, 9), recent_won=0) == "2026-12-09"


def test_migration_0021_back_fills_the_days_from_the_ledger(api, db_url, monkeypatch):
    """A book from before 0021 gets its budget days from its funder legs, by the day
    their transactions were recorded: the same rows the book writes as it goes, a
    refund's clawback on its own day included."""
    from sqlalchemy import select

    from ledger import schema as s
    from tests.book_helpers import assert_book_ok, migrate_down_and_up

    _shop_and_members(api)
    for i, day in enumerate(DAYS, start=1):
        _clock(monkeypatch, day)
        _pay(api, f"p{i}", f"m{i}", f"{day}T12:00:00+09:00", 10_000 * i)
    _clock(monkeypatch, "2026-12-04", "00:00:10")  # just past midnight: the 4th, not the 3rd
    r = api.post("/v1/payments/p1/refunds", {"refund_id": "r1", "amount": 10_000,
                                             "occurred_at": "2026-12-04T00:00:05+09:00"})
    assert r.status_code == 201 and r.json()["cashback_clawback"] == 1_000, r.text

    def days() -> list[tuple]:
        t = s.budget_days
        with api.services.reader.connect() as conn:
            return [tuple(row) for row in conn.execute(select(t).order_by(t.c.source, t.c.period, t.c.day))]

    written = days()
    assert ("city", "2026", "2026-12-04", -600) in written and ("national", "2026-12", "2026-12-02", 800) in written
    before, between, after = migrate_down_and_up(db_url, "0020")
    assert "budget_days" in before and "budget_days" not in between and "budget_days" in after
    assert days() == written
    assert_book_ok(api)


def test_the_book_check_finds_budget_days_that_do_not_sum_to_their_budget(api, monkeypatch):
    from sqlalchemy import update

    from ledger import schema as s
    from ledger.queries import check_book

    _shop_and_members(api)
    _clock(monkeypatch, DAYS[0])
    _pay(api, "p1", "m1", f"{DAYS[0]}T12:00:00+09:00")
    with api.services.engine.begin() as conn:
        conn.execute(update(s.budget_days).where(s.budget_days.c.source == "city", s.budget_days.c.period == "2026")
                     .values(committed_won=s.budget_days.c.committed_won + 1))
    with api.services.reader.connect() as conn:
        [row] = [r for r in check_book(conn) if r.name == "budget days sum to their budgets"]
    assert not row.ok and "('city', '2026', 600, 601)" in row.detail, row


def test_the_reports_month_forecast_follows_the_last_week_shown():
    """The report's chart and its run-out day project the last 7 days shown (500 a day
    from the 20th), not the month's average (207 a day), which ran out after the month."""
    import polars as pl

    days = [f"2026-11-{d:02d}" for d in range(1, 31)]
    shown = days[:26]
    burned = pl.DataFrame({"for_business_date": shown, "source": ["city"] * 26,
                           "cashback_net_won": [100] * 19 + [500] * 7})
    series, _, [city] = report.burn(burned, shown, days, [{"source": "city", "period": "2026-11", "limit_won": 7_000}])
    assert (city["spent_won"], city["per_day_won"], city["forecast_exhausted_on"]) == (5_400, 500, "2026-11-30")
    assert series["city forecast"][-1] == 5_400 + 4 * 500


def test_a_week_of_clawbacks_forecasts_no_burn_not_a_falling_month():
    """Refunds' clawbacks above the new cashback over the last 7 days shown (−50 a day net)
    were drawn and tabled as a burn of −50 a day, the month ending 200 won below what it
    had committed (finance audit: a November report after December's clawbacks of its
    payments read 526,972 at month end against 528,397 spent). Money given back is no burn,
    as `GET /v1/budgets` forecasts it: the month ends where it stands."""
    import polars as pl

    days = [f"2026-11-{d:02d}" for d in range(1, 31)]
    shown = days[:26]
    burned = pl.DataFrame({"for_business_date": shown, "source": ["city"] * 26,
                           "cashback_net_won": [100] * 19 + [-50] * 7})
    series, _, [city] = report.burn(burned, shown, days, [{"source": "city", "period": "2026-11", "limit_won": 7_000}])
    assert (city["spent_won"], city["per_day_won"], city["forecast_exhausted_on"]) == (1_550, 0, None)
    assert city["month_end_forecast_won"] == 1_550 and series["city forecast"][-5:] == [1_550] * 5


def test_a_months_payable_is_the_tighter_of_its_own_and_its_years():
    """Budgets audit: with city's 2026 limit spent, city 2026-12 still said 20,000
    remaining, running out on the 11th, though the book could pay city nothing more that
    year. Each row now says what its source can still pay in its period (`payable`) and
    when that runs out: a month's by the tighter of its limit and its year's."""
    from ledger.queries import with_payable

    def row(source, period, remaining, forecast):
        return {"source": source, "period": period, "remaining": remaining, "forecast_exhausted_on": forecast}

    rows = with_payable([
        row("city", "2026", 0, "2026-12-08"), row("city", "2026-12", 20_000, "2026-12-11"),
        row("national", "2026-12", 5_000, None),  # no year row
        row("seo", "2026", 300, "2026-12-20"), row("seo", "2026-11", None, None), row("seo", "2026-12", None, None),
        row("jung", "2026", None, None), row("jung", "2026-12", None, None),  # not limited
        row("dong", "2026", 9_000, "2026-12-30"), row("dong", "2026-12", 1_000, "2026-12-09"),
    ])
    got = {(r["source"], r["period"]): (r["payable"], r["payable_exhausted_on"]) for r in rows}
    assert got == {("city", "2026"): (0, "2026-12-08"), ("city", "2026-12"): (0, "2026-12-08"),
                   ("national", "2026-12"): (5_000, None),
                   ("seo", "2026"): (300, "2026-12-20"), ("seo", "2026-11"): (300, None),  # not in November
                   ("seo", "2026-12"): (300, "2026-12-20"),
                   ("jung", "2026"): (None, None), ("jung", "2026-12"): (None, None),
                   ("dong", "2026"): (9_000, "2026-12-30"), ("dong", "2026-12"): (1_000, "2026-12-09")}


def test_get_budgets_answers_what_a_month_can_still_pay(api):
    assert api.put("/v1/budgets/city/2026", {"amount": 1_000}, role="finance").status_code == 200
    assert api.put("/v1/budgets/city/2026-12", {"amount": 40_000}, role="finance").status_code == 200
    budgets = _budgets(api)
    assert (budgets[("city", "2026-12")]["remaining"], budgets[("city", "2026-12")]["payable"]) == (40_000, 1_000)
    assert budgets[("city", "2026")]["payable"] == 1_000
