"""Outputs finance opens directly (CSV with BOM, xlsx, Parquet, HTML) and the abuse report."""

from __future__ import annotations

import datetime as dt
import io
import re
import zipfile

import polars as pl
import pytest
from sqlalchemy import func, select

from ledger import registry
from ledger import schema as s
from ledger.db import reader
from settlement import abuse, export, report, service
from settlement.config import SettlementConfig
from settlement.reconcile import reconcile_frames, parse_clearing, LEDGER_REFUNDS_SCHEMA
from settlement.testing import generated_book, temp_database

START = dt.date(2026, 11, 2)
RISKY = pl.DataFrame({"merchant_id": ["=HYPERLINK(\"http://x\")", "+82-10", "-1", "@SUM(A1)", "가맹점", "\tcmd"],
                      "net_payable_won": [-5_000, 1, 2, 3, 4, 5], "lines": [[1, 2], [3], [4], [5], [6], [7]]})


def test_csv_has_a_bom_and_neutralises_formulas_but_not_numbers():
    data = export.csv_bytes(RISKY)
    assert data.startswith(b"\xef\xbb\xbf")
    text = data.decode("utf-8-sig")
    lines = text.splitlines()
    assert lines[0] == "merchant_id,net_payable_won,lines"
    assert lines[1].startswith("\"'=HYPERLINK") and lines[1].endswith(",-5000,1 2")
    assert lines[2].startswith("'+82-10,") and lines[3].startswith("'-1,") and lines[4].startswith("'@SUM")
    assert lines[5] == "가맹점,4,6"
    assert pl.read_csv(io.BytesIO(data))["net_payable_won"].to_list() == [-5_000, 1, 2, 3, 4, 5]


def test_xlsx_writes_text_as_text_and_money_as_numbers():
    data = export.xlsx_bytes({"payouts": RISKY})
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        sheet = z.read("xl/worksheets/sheet1.xml").decode()
        strings = z.read("xl/sharedStrings.xml").decode()
    assert "<f>" not in sheet  # no formula cell anywhere
    assert "'=HYPERLINK" in strings.replace("&quot;", "\"") and "가맹점" in strings
    assert re.search(r"<v>-5000</v>", sheet)


def test_parquet_round_trips_int64_money():
    back = pl.read_parquet(io.BytesIO(export.parquet_bytes(RISKY)))
    assert back.schema["net_payable_won"] == pl.Int64 and back.equals(RISKY)


@pytest.fixture(scope="module")
def settled():
    with temp_database("sqlite") as url:
        world = generated_book(url, start=START, days=3, farming_on=START + dt.timedelta(days=1))
        with world.engine.begin() as conn:
            registry.put_budget(conn, source="city", period="2026-11", limit_won=5_000_000, actor="policy")
        for i in range(3):
            assert service.settle(world.engine, START + dt.timedelta(days=i), actor="finance",
                                  config=SettlementConfig(watermark_lag_us=0)).status == "settled"
        yield world
        world.engine.dispose()


def _clearing_exceptions():
    clearing, _ = parse_clearing(b"approval_id,merchant_id,amount_won,transacted_at\n"
                                 b"GHOST-1,S000001,5000,2026-11-03 12:00:00\n")
    return reconcile_frames(clearing, pl.DataFrame(schema={"payment_id": pl.String, "merchant_id": pl.String,
                                                           "amount_won": pl.Int64, "occurred_at_us": pl.Int64,
                                                           "status": pl.String}),
                            pl.DataFrame(schema=LEDGER_REFUNDS_SCHEMA))


def test_month_and_day_reports_are_self_contained_with_charts(settled, tmp_path):
    with reader(settled.engine).connect() as conn:
        month = report.render(report.month_data(conn, "2026-11", reconciliation=_clearing_exceptions()))
        day = report.render(report.day_data(conn, START + dt.timedelta(days=1)))
    for html in (month, day):
        assert html.startswith("<!DOCTYPE html>") and html.count("<svg") >= 4
        assert "<script" not in html and "src=" not in html and "href=" not in html
        assert "http://" not in html.replace("http://www.w3.org/2000/svg", "")
        assert "Budget burn" in html and "limit: city" in html and "Top merchants" in html
    assert "GHOST-1" in month and "missing_in_ledger" in month
    assert "M-FARMER" in month and "S-COLLUDER" in month
    assert "stl-2026-11-03-v1" in day and "all 12 checks passed" in day
    (tmp_path / "month.html").write_text(month, encoding="utf-8")


def test_budget_forecast_reaches_the_limit_when_the_burn_would():
    days = [f"2026-11-{d:02d}" for d in range(1, 31)]
    funders = pl.DataFrame({"for_business_date": days[:10], "source": ["city"] * 10, "district": ["seo"] * 10,
                            "cashback_accrued_won": [100] * 10, "cashback_clawed_back_won": [0] * 10,
                            "cashback_net_won": [100] * 10})
    series, limits, summary = report.burn(funders, days[:10], days, [{"source": "city", "period": "2026-11",
                                                                        "limit_won": 2_500}])
    assert series["city"][9] == 1_000 and series["city forecast"][-1] == 3_000
    assert summary[0]["forecast_exhausted_on"] == "2026-11-25" and limits == {"city": 2_500}


def test_planted_cashback_farming_tops_the_abuse_report(settled):
    with reader(settled.engine).connect() as conn:
        data = report.month_data(conn, "2026-11")
    members, merchants = data.abuse.members, data.abuse.merchants
    top = members.row(0, named=True)
    assert top["member_id"] == "M-FARMER" and top["rank"] == 1
    assert "near the 300000 cap" in top["reasons"] and "refunded after earning cashback" in top["reasons"]
    assert "round amounts" in top["reasons"] and "within 30 min" in top["reasons"]
    with reader(settled.engine).connect() as conn:
        earned = conn.execute(select(func.sum(s.payments.c.cashback_won))
                              .where(s.payments.c.member_id == "M-FARMER")).scalar_one()
        clawed = conn.execute(select(func.sum(s.refunds.c.clawback_won))
                              .where(s.refunds.c.payment_id.like("P-M-FARMER-%"))).scalar_one()
    # Points earned are spent first on the next payment and earn nothing: under 30,000 − 10,000.
    assert top["money_at_stake_won"] == earned - clawed and 15_000 < earned - clawed <= 20_000
    assert merchants.row(0, named=True)["merchant_id"] == "S-COLLUDER"
    assert top["score"] > members.row(1, named=True)["score"] if members.height > 1 else True


def test_abuse_signals_on_a_worked_example():
    minute = 60_000_000
    payments = pl.DataFrame({
        "payment_id": [f"p{i}" for i in range(8)],
        "member_id": ["a"] * 5 + ["b"] * 3,
        "merchant_id": ["m1"] * 5 + ["m2", "m3", "m4"],
        "amount_won": [60_000, 60_000, 60_000, 60_000, 40_000, 12_300, 8_700, 15_100],
        "occurred_at_us": [i * 5 * minute for i in range(5)] + [0, 10 * 60 * minute, 20 * 60 * minute],
        "cashback_won": [6_000, 6_000, 6_000, 6_000, 0, 1_230, 870, 1_510]})
    refunds = pl.DataFrame({"refund_id": ["r1"], "payment_id": ["p0"], "amount_won": [60_000],
                            "occurred_at_us": [60 * minute], "clawback_won": [6_000]})
    result = abuse.report(payments, refunds, config=abuse.AbuseConfig(refunds_min=1))
    assert result.members["member_id"].to_list() == ["a"]
    assert result.members["money_at_stake_won"].to_list() == [18_000]
    assert result.merchants["merchant_id"].to_list()[0] == "m1"


def test_reconciliation_exceptions_show_readable_times_not_microseconds():
    """The report once showed `occurred_at_us` as 1,796,164,363,000,000: it shows the
    RFC 3339 Seoul time instead."""
    from rules.timeutil import rfc3339

    at_us = 1_796_164_363_000_000
    clearing, _ = parse_clearing(b"approval_id,merchant_id,amount_won,transacted_at\n"
                                 b"GHOST-1,S000001,5000,2026-11-29 12:00:00\n"
                                 b"GHOST-1,S000001,5000,2026-11-29 12:00:00\n"
                                 b"P-2,S000002,3000,2026-11-29 12:00:00\n")
    ledger = pl.DataFrame({"payment_id": ["P-1", "P-2"], "merchant_id": ["S000002", "S000002"],
                           "amount_won": [7_000, 3_000], "occurred_at_us": [at_us, at_us],
                           "status": ["approved", "approved"]})
    recon = reconcile_frames(clearing, ledger, pl.DataFrame(schema=LEDGER_REFUNDS_SCHEMA),
                             dates=["2026-11-29", rfc3339(at_us)[:10]])
    assert recon.frames["missing_in_clearing"]["occurred_at_us"].to_list() == [at_us]
    data = report.ReportData("t", "2026-11", ["2026-11-01"], [], pl.DataFrame(), pl.DataFrame(),
                             reconciliation=recon)
    html = report._reconciliation(data)
    assert "P-1" in html and "missing_in_clearing" in html and "duplicates" in html
    assert "late (1)" in html and "clearing_business_date" in html and "2026-11-29" in html  # P-2, a late line
    assert rfc3339(at_us) in html and "2026-11-29T12:00:00+09:00" in html
    assert f"{at_us:,}" not in html and "occurred_at_us" not in html and "transacted_at_us" not in html


def test_headline_figures_are_exact_to_the_won():
    """A day's net payable of 1,102,464 once showed as '110만' and sales of 99,999 as '9만':
    the totals are shown to the won."""
    payouts = pl.DataFrame({"payment_count": [3, 1], "sales_won": [99_000, 999], "refunds_won": [0, 0],
                            "net_sales_won": [99_000, 999], "fee_won": [544, 5], "merchant_share_won": [0, 0],
                            "net_payable_won": [1_000_000, 102_464]})
    funders = pl.DataFrame({"for_business_date": ["2026-11-03"], "cashback_net_won": [12_345]})
    grants = pl.DataFrame({"for_business_date": ["2026-11-03"], "program_id": ["g1"], "source": ["city"],
                           "grant_funded_won": [150_001], "grant_returned_won": [0], "grant_net_won": [150_001]})
    data = report.ReportData("t", "2026-11-03", ["2026-11-03"], [], funders, payouts, grant_funders=grants)
    kpis = report._kpis(data)
    for label, figure in (("sales", "99,999원"), ("fees", "549원"), ("net payable", "1,102,464원"),
                          ("cashback (net)", "12,345원")):
        assert f"{label}<b>{figure}</b>" in kpis, (label, kpis)
    assert "9만" not in kpis and "110만" not in kpis
    assert "city (net)<b>150,001원</b>" in report._grants_section(data)


def test_a_days_report_shows_its_exact_totals(settled):
    day = START + dt.timedelta(days=1)
    with reader(settled.engine).connect() as conn:
        html = report.render(report.day_data(conn, day, with_abuse=False))
        payouts = service.month_payouts(conn, "2026-11").filter(pl.col("for_business_date") == day.isoformat())
    for column in ("sales_won", "fee_won", "net_payable_won"):
        total = int(payouts[column].sum())
        assert total > 10_000 and f"{total:,}원" in html, column


def test_a_days_report_tables_its_funders_for_that_day(settled):
    """The e2e audit's case: a day's report headlined the day's net cashback and tabled
    the month so far by funder beneath it (2,112,817 against 2,018,040), the days before
    included, with nothing to say so. The table is the day's now, as its headline."""
    day = START + dt.timedelta(days=1)
    with reader(settled.engine).connect() as conn:
        data = report.day_data(conn, day, with_abuse=False)
    f = data.funders
    today = f.filter(pl.col("for_business_date") == day.isoformat())
    assert today.height and f.height > today.height  # the month so far holds the day before
    want = {source: values for source, *values in today.group_by("source").agg(
        pl.col("cashback_accrued_won").sum(), pl.col("cashback_clawed_back_won").sum(),
        pl.col("cashback_corrected_won").sum(), pl.col("cashback_net_won").sum()).iter_rows()}
    table = report._funder_charts(data).split("</svg>")[-1]
    got = {source: [int(v.replace(",", "")) for v in values] for source, *values in re.findall(
        r"<td>([a-z]+)</td>" + r"<td class='n'>(-?[\d,]+)</td>" * 4, table)}
    assert got == want and sum(v[3] for v in got.values()) < int(f["cashback_net_won"].sum())
    assert all(accrued - clawed + corrected == net for accrued, clawed, corrected, net in got.values())


def _ok(response):
    assert response.status_code in (200, 201), response.text
    return response.json()


def _correct_to_ceiling(api, correction_id: str, ceiling_won: int) -> None:
    """November 2026 corrected from the 2025-10 policy to one whose merchant sales
    ceiling is `ceiling_won`, approved and posted."""
    import yaml

    from tests.conftest import POLICIES, at

    right = yaml.safe_load((POLICIES / "2025-10-cap-50man.yaml").read_text())
    right["policy_id"] = f"ceiling-{ceiling_won}"
    right.pop("effective_from")
    right["cashback_eligibility"]["merchant_sales_max_won"] = ceiling_won
    _ok(api.post("/v1/policies", right, role="policy-editor"))
    _ok(api.post("/v1/corrections", {"correction_id": correction_id, "wrong_policy_id": "incheon-2025-10",
                                     "right_policy_id": right["policy_id"], "from": at("2026-11-01", "00:00:00"),
                                     "to": at("2026-12-01", "00:00:00")}, role="policy-editor"))
    assert _ok(api.post(f"/v1/corrections/{correction_id}/approve", role="policy-approver"))["status"] == "posted"


def _funders_net(conn) -> int:
    return int(conn.execute(select(func.coalesce(func.sum(s.ledger_legs.c.amount_won), 0))
                            .where(s.ledger_legs.c.account_id.like("funder/%/2026-11"))).scalar_one())


def test_money_at_stake_is_what_the_payments_hold_after_corrections(api):
    """Money at stake is the cashback the payments hold now, after refunds and
    corrections, as the funders' accounts have it (finance audit). It read the cashback
    as first paid less refunds' clawbacks, which no correction moves: after a correction
    took back all of a member's 28,100 it still said 28,100, and a payment a correction
    gave 15,000 that was then refunded read -15,000, and was not counted as refunded
    after earning cashback."""
    from tests.conftest import at

    _ok(api.put("/v1/members/m1", {"district": "namdong"}))
    _ok(api.put("/v1/members/m2", {"district": "namdong"}))
    for merchant_id, sales in (("S", 2_500_000_000), ("Big", 3_500_000_000)):
        _ok(api.put(f"/v1/merchants/{merchant_id}", {"name": merchant_id, "district": "namdong",
                                                     "category": "restaurant", "annual_sales": sales,
                                                     "registered_from": "2019-01-01"}))
    _ok(api.post("/v1/topups", {"topup_id": "t1", "member_id": "m1", "amount": 300_000, "occurred_at": at("2026-11-02")}))
    _ok(api.post("/v1/topups", {"topup_id": "t2", "member_id": "m2", "amount": 500_000, "occurred_at": at("2026-11-02")}))
    for i in range(3):  # three round 100,000s at a 25억 shop: m1 is flagged (round amounts)
        _ok(api.post("/v1/payments", {"payment_id": f"p{i}", "member_id": "m1", "merchant_id": "S",
                                      "amount": 100_000, "occurred_at": at(f"2026-11-1{i}")}))
    for i in range(3):  # m2 at a 35억 shop, beyond the 30억 ceiling: nothing earned
        assert _ok(api.post("/v1/payments", {"payment_id": f"q{i}", "member_id": "m2", "merchant_id": "Big",
                                             "amount": 50_000, "occurred_at": at(f"2026-11-1{i}")})
                   )["cashback"]["amount"] == 0
    _correct_to_ceiling(api, "c1", 2_000_000_000)  # S earns nothing: all of m1's cashback back
    with api.services.engine.connect() as conn:
        assert _funders_net(conn) == 0
        members = report._abuse_report(conn, dt.date(2026, 11, 1), dt.date(2026, 11, 30)).members
    assert members.filter(pl.col("member_id") == "m1")["money_at_stake_won"].to_list() == [0]
    _correct_to_ceiling(api, "c2", 4_000_000_000)  # both shops earn: m2's payments 5,000 each
    for i in range(2):
        _ok(api.post(f"/v1/payments/q{i}/refunds", {"refund_id": f"r{i}", "amount": 50_000,
                                                    "occurred_at": at("2026-11-20")}))
    with api.services.engine.connect() as conn:
        funders = _funders_net(conn)
        report_ = report._abuse_report(conn, dt.date(2026, 11, 1), dt.date(2026, 11, 30))
    m2 = report_.members.filter(pl.col("member_id") == "m2").to_dicts()
    assert m2 and m2[0]["money_at_stake_won"] == 5_000  # q2's, the refunded two hold none
    assert m2[0]["refunded_after_cashback"] == 2 and "2 payments refunded after earning cashback" in m2[0]["reasons"]
    m1 = report_.members.filter(pl.col("member_id") == "m1")["money_at_stake_won"].to_list()
    assert sum(m1) + m2[0]["money_at_stake_won"] == funders  # everything the funders paid, net
    big = report_.merchants.filter(pl.col("merchant_id") == "Big")["money_at_stake_won"].to_list()
    assert big in ([], [5_000])


def test_every_funder_with_a_limit_or_a_burn_is_in_the_budget_burn():
    """The burn table showed the six funders that burned most: with eight funders, a
    district's limit (spent 100 of 150) was missing and the report said no limit was set
    (settlement outputs audit). The table has every funder; the chart every one with a
    limit, filled up with the largest others."""
    from html import unescape

    from ledger.book import Book
    from ledger.db import make_engine
    from rules.compiled import PolicyTimeline, compile_policy
    from rules.loader import validate_policy_data
    from rules.timeutil import local_midnight_us
    from settlement import datagen

    day = dt.date(2026, 11, 3)
    districts = ("seo", "yeonsu", "michuhol", "bupyeong", "gyeyang")  # each funds a 2% top-up
    doc = datagen.demo_policy_data()
    doc["components"][1]["variants"][0]["when"]["merchant_districts"] = list(districts)
    timeline = PolicyTimeline([compile_policy(validate_policy_data(doc))])
    with temp_database("sqlite") as url:
        engine = make_engine(url)
        with engine.begin() as conn:
            registry.put_member(conn, member_id="m1", district="seo", status="active", actor="t")
            for i, district in enumerate(districts):
                registry.put_merchant(conn, merchant_id=f"s-{district}", name=f"가게 {i}", district=district,
                                      category="restaurant", annual_sales_won=100_000_000,
                                      registered_from=dt.date(2019, 1, 1), flags=["winwin"] if i == 0 else [],
                                      merchant_share_bp=300 if i == 0 else 0, actor="t")
            registry.put_budget(conn, source="gyeyang", period="2026-11", limit_won=150, actor="t")
            registry.put_budget(conn, source="jung", period="2026-11", limit_won=9_000, actor="t")  # nothing spent
        noon = local_midnight_us(day) + 12 * 3_600_000_000
        commands = [datagen.topup("t1", "m1", 1_000_000, noon - 3_600_000_000)]
        for i, (district, amount) in enumerate(zip(districts, (50_000, 40_000, 30_000, 20_000, 5_000))):
            commands.append(datagen.pay(f"p{i}", "m1", f"s-{district}", amount, noon + i * 60_000_000))
        assert all(o.ok for o in Book(engine, timeline).execute(commands))
        run = service.settle(engine, day, actor="finance", config=SettlementConfig(watermark_lag_us=0))
        assert run.status == "settled", run.failures
        funders = {row["source"] for row in run.totals["funders"]}
        assert len(funders) == 8 and "gyeyang" in funders  # national, city, merchant and five districts
        with reader(engine).connect() as conn:
            html = report.render(report.month_data(conn, "2026-11", with_abuse=False))
        engine.dispose()
    section = html.split("<h2>Budget burn</h2>")[1].split("<h2>")[0]
    rows = [[unescape(c) for c in re.findall(r"<t[dh][^>]*>(.*?)</t[dh]>", row)]
            for row in re.findall(r"<tr>(.*?)</tr>", section)]
    burn = {row[0]: row for row in rows[1:]}
    assert set(burn) == funders | {"jung"}
    spent = sum(f["cashback_net_won"] for f in run.totals["funders"] if f["source"] == "gyeyang")
    assert 0 < spent < 150 and (burn["gyeyang"][1], burn["gyeyang"][4]) == (str(spent), "150")
    assert (burn["jung"][1], burn["jung"][4]) == ("0", "9,000")
    assert "No monthly budget limit" not in section
    series, limits, _ = report.burn(pl.DataFrame({"for_business_date": ["2026-11-03"] * 3,
                                                  "source": ["a", "b", "c"], "cashback_net_won": [3, 2, 1]}),
                                    ["2026-11-03"], [f"2026-11-{d:02d}" for d in range(1, 31)],
                                    [{"source": "c", "period": "2026-11", "limit_won": 5}])
    assert limits == {"c": 5} and {k for k in series if not k.endswith("forecast")} == {"a", "b", "c"}


def test_near_cap_is_measured_against_the_cap_of_the_policy_in_force(api):
    """The near-cap signal reads the cap on monthly eligible spend from the city policy in
    force (from 2025-10 the shipped files cap it at 50만), not a fixed 30만: a regular who
    spent 300,000 at their usual shop in November 2026 was flagged as farming "near the
    300000 cap" (and the shop for a farming customer), 60% of the real cap."""
    from tests.conftest import at

    _ok(api.put("/v1/merchants/shop", {"name": "shop", "district": "namdong", "category": "grocery",
                                       "annual_sales": 200_000_000, "registered_from": "2019-01-01"}))
    spends = {"regular": [29_900] * 10, "farmer": [46_100] * 10}  # 299,000 and 461,000: not round
    for member, amounts in spends.items():
        _ok(api.put(f"/v1/members/{member}", {"district": "namdong"}))
        _ok(api.post("/v1/topups", {"topup_id": f"t-{member}", "member_id": member, "amount": 600_000,
                                    "occurred_at": at("2026-11-01", "08:00:00")}))
        for i, amount in enumerate(amounts):  # a day apart: no burst
            _ok(api.post("/v1/payments", {"payment_id": f"{member}-{i}", "member_id": member, "merchant_id": "shop",
                                          "amount": amount, "occurred_at": at(f"2026-11-{i + 2:02d}")}))
    with api.services.engine.connect() as conn:
        members = report._abuse_report(conn, dt.date(2026, 11, 1), dt.date(2026, 11, 30)).members
    flagged = {row["member_id"]: row["reasons"] for row in members.iter_rows(named=True)}
    assert "regular" not in flagged, flagged
    assert "near the 500000 cap" in flagged["farmer"], flagged


def test_stacked_bars_draw_a_negative_day_below_the_zero_line():
    """A day whose clawbacks exceed its cashback (refunds alone) was clipped to 0 and
    showed no bar (finance review): its parts go down from the zero line now, each with
    its signed amount, and the axis runs from the most negative stack to the highest."""
    import re

    from settlement import svg

    out = svg.stacked_bars(["11-07", "11-08"], {"city": [6_000, -3_000], "national": [4_000, -1_000]},
                           title="cashback by funder")
    rects = [(float(y), float(h), label) for y, h, label in
             re.findall(r"<rect x='[\d.]+' y='([\d.]+)' width='[\d.]+' height='([\d.]+)' fill='[^']+'>"
                        r"<title>([^<]+)</title>", out)]
    assert [label for _, _, label in rects] == ["11-07 city: 6,000 won", "11-07 national: 4,000 won",
                                               "11-08 city: -3,000 won", "11-08 national: -1,000 won"]
    zero = float(re.search(r"<line x1='\d+' y1='([\d.]+)' x2='\d+' y2='[\d.]+' stroke='#666'/>", out).group(1))
    (y_city, h_city, _), (y_nat, h_nat, _), (y_neg_city, h_neg_city, _), (y_neg_nat, h_neg_nat, _) = rects
    assert abs(y_city + h_city - zero) < 0.2 and abs(y_nat + h_nat - y_city) < 0.2  # stacked up from zero
    assert abs(y_neg_city - zero) < 0.2 and abs(y_neg_nat - (y_neg_city + h_neg_city)) < 0.2  # and down from it
    assert abs(h_city / h_neg_city - 2) < 0.01 and abs(h_nat / h_neg_nat - 4) < 0.01  # one scale
    assert ">-5,000<" in out and ">1만<" in out and ">0<" in out  # the axis: -5,000 .. 1만, zero among them

    # A chart with nothing below zero is drawn as before: no zero line, the axis from 0.
    positive = svg.stacked_bars(["11-07"], {"city": [6_000]}, title="t")
    assert "stroke='#666'" not in positive and ">-" not in positive
