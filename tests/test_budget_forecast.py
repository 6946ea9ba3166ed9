"""What finance reads about budgets: `GET /v1/budgets` and the reports' budget burn
forecast by one rule (the period's average daily burn so far), a period not yet begun has
no forecast, and a refund's clawback of last month's payments counts against last month's
budget in the reports as it does in the budgets."""

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

    assert forecast_exhausted_on("2026", 10**12, 1, dt.date(2026, 1, 1)) is None
    assert forecast_exhausted_on("2026-12", 10**12, 346, dt.date(2026, 12, 2)) is None
    assert forecast_exhausted_on("2026-12", 3_100, 100, dt.date(2026, 12, 1)) == "2026-12-31"
    assert forecast_exhausted_on("2026-12", 3_101, 100, dt.date(2026, 12, 1)) is None


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
