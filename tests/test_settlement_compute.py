"""Settlement arithmetic as worked examples, in accounting terms: fees, tiers, merchant
share, payout dates, the trial balance, and checks that catch a wrong book."""

from __future__ import annotations

import datetime as dt

import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from settlement.calendar import add_business_days, is_business_day
from settlement.compute import LEGS_SCHEMA, checks, compute, movements_from_legs
from settlement.config import FeeTier, SettlementConfig

DAY = "2026-11-20"
MERCHANTS = pl.DataFrame({
    "merchant_id": ["small", "mid", "big"], "district": ["seo", "jung", "ganghwa"],
    "category": ["cafe", "grocery", "retail"],
    "annual_sales_won": [300_000_000, 700_000_000, 5_000_000_000]})


def legs(rows: list[tuple]) -> pl.DataFrame:
    """(txn_id, kind, member, merchant, date, account, amount)"""
    return pl.DataFrame([(t, k, m, s, d, 1, a, v) for t, k, m, s, d, a, v in rows], schema=LEGS_SCHEMA, orient="row")


def day_book() -> pl.DataFrame:
    return legs([
        # a 50,000 payment at "mid" (0.55% tier), cashback 10% + merchant share 5% + 2% district
        (1, "payment", "u1", "mid", DAY, "merchant/mid/payable", -50_000),
        (1, "payment", "u1", "mid", DAY, "member/u1/charged", 50_000),
        (2, "cashback", "u1", "mid", DAY, "funder/national/2026-11", 2_000),
        (2, "cashback", "u1", "mid", DAY, "funder/city/2026-11", 3_000),
        (2, "cashback", "u1", "mid", DAY, "funder/jung/2026-11", 1_000),
        (2, "cashback", "u1", "mid", DAY, "funder/merchant/2026-11", 2_500),
        (2, "cashback", "u1", "mid", DAY, "member/u1/points", -8_500),
        # 12,345 at "small", paid from a grant lot (no cashback)
        (3, "payment", "u2", "small", DAY, "merchant/small/payable", -12_345),
        (3, "payment", "u2", "small", DAY, "member/u2/grant/relief", 12_345),
        # 1,000,001 at "big" (1.50%), then 1 won refunded
        (4, "payment", "u3", "big", DAY, "merchant/big/payable", -1_000_001),
        (4, "payment", "u3", "big", DAY, "member/u3/charged", 1_000_001),
        (5, "refund", "u3", "big", DAY, "merchant/big/payable", 1),
        (5, "refund", "u3", "big", DAY, "member/u3/charged", -1),
        # half the "mid" payment refunded: half of each cashback line clawed back
        (6, "refund", "u1", "mid", DAY, "merchant/mid/payable", 25_000),
        (6, "refund", "u1", "mid", DAY, "member/u1/charged", -25_000),
        (7, "clawback", "u1", "mid", DAY, "funder/national/2026-11", -1_000),
        (7, "clawback", "u1", "mid", DAY, "funder/city/2026-11", -1_500),
        (7, "clawback", "u1", "mid", DAY, "funder/jung/2026-11", -500),
        (7, "clawback", "u1", "mid", DAY, "funder/merchant/2026-11", -1_250),
        (7, "clawback", "u1", "mid", DAY, "member/u1/points", 4_250),
        # a top-up and a grant disbursement touch no merchant
        (8, "topup", "u4", None, DAY, "operator/cash", 100_000),
        (8, "topup", "u4", None, DAY, "member/u4/charged", -100_000),
        (9, "grant", "u2", None, DAY, "member/u2/grant/relief", -100_000),
        (9, "grant", "u2", None, DAY, "grantfund/relief/national", 80_000),
        (9, "grant", "u2", None, DAY, "grantfund/relief/city", 20_000),
    ])


def settle(frame: pl.DataFrame, config: SettlementConfig = SettlementConfig()):
    return compute(frame, MERCHANTS, config=config, payout_date=dt.date(2026, 11, 24), primary_date=DAY,
                   member_districts=pl.DataFrame({"member_id": ["u2"], "district": ["dong"]}))


def test_merchant_payouts_worked_example():
    c = settle(day_book())
    rows = {r["merchant_id"]: r for r in c.payouts.iter_rows(named=True)}
    mid = rows["mid"]
    assert (mid["sales_won"], mid["refunds_won"], mid["net_sales_won"]) == (50_000, 25_000, 25_000)
    assert mid["fee_bp"] == 55 and mid["fee_won"] == 137  # floor(25,000 × 0.55%) = floor(137.5)
    assert mid["merchant_share_won"] == 1_250  # 2,500 paid, 1,250 clawed back
    assert mid["net_payable_won"] == 25_000 - 137 - 1_250
    assert rows["small"]["fee_won"] == 0 and rows["small"]["net_payable_won"] == 12_345
    big = rows["big"]
    assert big["fee_bp"] == 150 and big["net_sales_won"] == 1_000_000 and big["fee_won"] == 15_000
    assert {r["payout_date"] for r in rows.values()} == {"2026-11-24"} and {r["kind"] for r in rows.values()} == {"day"}


def test_funders_districts_and_grants():
    c = settle(day_book())
    f = {(r["source"], r["district"]): r for r in c.funders.iter_rows(named=True)}
    assert f[("national", "jung")]["cashback_accrued_won"] == 2_000
    assert f[("national", "jung")]["cashback_clawed_back_won"] == 1_000
    assert f[("merchant", "jung")]["cashback_net_won"] == 1_250
    assert sum(r["cashback_net_won"] for r in f.values()) == 8_500 - 4_250
    g = {(r["program_id"], r["district"]): r for r in c.grants.iter_rows(named=True)}
    assert g[("relief", "seo")]["spent_won"] == 12_345  # spent at a Seo-gu merchant
    assert g[("relief", "dong")]["disbursed_won"] == 100_000  # paid to a Dong-gu member


def test_the_day_totals_by_funder_add_up_with_corrections():
    """A day's cashback by funder in the run's totals names what corrections moved, so
    accrued − clawed back + corrected is the net (finance audit: on a correction's date
    the first two did not add up to the third, and nothing said why)."""
    frame = pl.concat([day_book(), legs([
        # a correction line taking 1,200 back from u1: national 480, city 720
        (10, "correction", "u1", None, DAY, "funder/national/2026-11", -480),
        (10, "correction", "u1", None, DAY, "funder/city/2026-11", -720),
        (10, "correction", "u1", None, DAY, "member/u1/points", 1_200),
        # and one giving u2 300 from the city
        (11, "correction", "u2", None, DAY, "funder/city/2026-11", 300),
        (11, "correction", "u2", None, DAY, "member/u2/points", -300),
    ])])
    by_source = settle(frame).totals["dates"][DAY]["cashback_by_source"]
    assert by_source["national"] == {"accrued_won": 2_000, "clawed_back_won": 1_000, "corrected_won": -480,
                                     "net_won": 520}
    assert by_source["city"]["corrected_won"] == -420 and by_source["jung"]["corrected_won"] == 0
    for source, row in by_source.items():
        assert row["accrued_won"] - row["clawed_back_won"] + row["corrected_won"] == row["net_won"], source


def test_what_members_came_to_owe_is_in_the_totals():
    """A correction taking back 1,200 that u1 held only 200 of (points) leaves 1,000 owed,
    a later one giving u2 300 settles 300 of what u2 owed: the day's and the run's
    totals show the receivable's net movement, 700 (finance audit: only the trial
    balance by account class had it)."""
    frame = pl.concat([day_book(), legs([
        (10, "correction", "u1", None, DAY, "funder/national/2026-11", -1_200),
        (10, "correction", "u1", None, DAY, "member/u1/points", 200),
        (10, "correction", "u1", None, DAY, "receivable/u1", 1_000),
        (11, "correction", "u2", None, DAY, "funder/city/2026-11", 300),
        (11, "correction", "u2", None, DAY, "receivable/u2", -300),
    ])])
    totals = settle(frame).totals
    assert totals["dates"][DAY]["receivable_net_won"] == 700 and totals["run"]["receivable_net_won"] == 700
    assert settle(day_book()).totals["run"]["receivable_net_won"] == 0


def test_trial_balance_and_every_check_pass_on_a_balanced_book():
    frame = day_book()
    c = settle(frame)
    assert c.totals["run"]["trial_balance_won"] == 0
    found = checks(c, *movements_from_legs(frame))
    assert all(x.ok for x in found), [x for x in found if not x.ok]


def test_checks_catch_an_unbalanced_transaction_and_a_ledger_that_disagrees():
    frame = day_book()
    broken = pl.concat([frame, legs([(10, "payment", "u9", "small", DAY, "merchant/small/payable", -7)])])
    found = {x.name: x for x in checks(settle(broken), *movements_from_legs(frame))}
    assert not found["every transaction balances"].ok and "10" in found["every transaction balances"].detail
    assert not found["trial balance is zero"].ok
    assert not found["merchant net sales equal the merchant payable movement"].ok
    # A grant fund leg the movements do not hold (a computation reading more than the book).
    extra = pl.concat([frame, legs([(11, "grant", "u2", None, DAY, "grantfund/relief/city", 5)])])
    found = {x.name: x for x in checks(settle(extra), *movements_from_legs(frame))}
    assert not found["grant money by funder equals the grant fund movement"].ok
    assert found["grant flows equal the member grant movement"].ok


def test_a_net_refund_day_gives_the_fee_back_rounded_in_the_merchants_favour():
    """The fee is floored (toward −∞): a sales day's down, a net-refund day's credit up.
    Floored toward zero, a sale of 50,000 at 0.55% refunded 30,001 then 19,999 on later
    days charged 275 − 165 − 109 = 1 won on no sales (the refund audit)."""
    frame = legs([(1, "refund", "u1", "mid", DAY, "merchant/mid/payable", 10_001),
                  (1, "refund", "u1", "mid", DAY, "member/u1/charged", -10_001)])
    row = settle(frame).payouts.row(0, named=True)
    assert row["net_sales_won"] == -10_001 and row["fee_won"] == -56  # floor(−55.0055)
    assert row["net_payable_won"] == -10_001 + 56


@settings(max_examples=120, deadline=None)
@given(st.lists(st.integers(-3_000_000, 3_000_000), min_size=1, max_size=8),
       st.sampled_from([0, 25, 55, 85, 100, 110, 150]))
def test_a_merchants_fees_over_days_never_exceed_the_fee_on_their_net_sales(nets, bp):
    """Whatever a merchant's days net (sales, refunds of earlier days), the fees charged
    day by day add up to no more than the fee on the days' net sales together: rounding
    is never in the operator's favour, and a sale refunded in whole over any days costs
    no fee."""
    from settlement.compute import fee_won_expr

    days = pl.DataFrame({"net": nets, "bp": [bp] * len(nets)}, schema={"net": pl.Int64, "bp": pl.Int64})
    fees = days.select(fee_won_expr(pl.col("net"), pl.col("bp")).alias("fee"))["fee"].to_list()
    assert all(fee * 10_000 <= net * bp for fee, net in zip(fees, nets))  # each day floored
    assert all(net * bp - fee * 10_000 < 10_000 for fee, net in zip(fees, nets))  # by less than a won
    assert sum(fees) <= sum(nets) * bp // 10_000


def test_fee_tiers_come_from_configuration():
    config = SettlementConfig(fee_tiers=(FeeTier(sales_max_won=500_000_000, fee_bp=25),
                                         FeeTier(sales_max_won=None, fee_bp=100)))
    rows = {r["merchant_id"]: r["fee_bp"] for r in settle(day_book(), config).payouts.iter_rows(named=True)}
    assert rows == {"small": 25, "mid": 100, "big": 100}
    with pytest.raises(ValueError):
        SettlementConfig(fee_tiers=(FeeTier(sales_max_won=5, fee_bp=1),))  # last tier must be open-ended


def _sales(rows: list[tuple[int, str, str, int]]) -> pl.DataFrame:
    """(txn_id, merchant, business date, amount): one payment each."""
    return legs([leg for t, m, d, v in rows for leg in
                 ((t, "payment", "u1", m, d, f"merchant/{m}/payable", -v), (t, "payment", "u1", m, d, "member/u1/charged", v))])


FEE_MERCHANTS = pl.DataFrame({
    "merchant_id": ["s2", "s4", "s8", "s20", "s50"], "district": ["seo"] * 5, "category": ["cafe"] * 5,
    "annual_sales_won": [200_000_000, 400_000_000, 800_000_000, 2_000_000_000, 5_000_000_000]})


def _fees(frame: pl.DataFrame, primary_date: str, config: SettlementConfig = SettlementConfig()) -> dict:
    c = compute(frame, FEE_MERCHANTS, config=config, payout_date=dt.date(2023, 1, 4), primary_date=primary_date)
    return {(r["for_business_date"], r["merchant_id"]): (r["fee_bp"], r["fee_won"]) for r in c.payouts.iter_rows(named=True)}


def test_fees_are_the_schedule_of_the_business_date():
    """DOMAIN.md: fees 2023–: 0% up to 5억, 0.55% for 5–10억; earlier 0.25% (≤ 3억), 0.85%
    (3–5억), 1% (5–10억). A 2022 date was settled at the 2023 rates (0 / 0 / 55 bp); above
    10억 both schedules charge the same (1.10% to 30억, 1.50% beyond: docs/settlement.md)."""
    merchants = ("s2", "s4", "s8", "s20", "s50")
    before = _fees(_sales([(n, m, "2022-10-05", 100_000) for n, m in enumerate(merchants, 1)]), "2022-10-05")
    assert before == {("2022-10-05", "s2"): (25, 250), ("2022-10-05", "s4"): (85, 850),
                      ("2022-10-05", "s8"): (100, 1_000), ("2022-10-05", "s20"): (110, 1_100),
                      ("2022-10-05", "s50"): (150, 1_500)}
    after = _fees(_sales([(n, m, "2023-01-01", 100_000) for n, m in enumerate(merchants, 1)]), "2023-01-01")
    assert after == {("2023-01-01", "s2"): (0, 0), ("2023-01-01", "s4"): (0, 0), ("2023-01-01", "s8"): (55, 550),
                     ("2023-01-01", "s20"): (110, 1_100), ("2023-01-01", "s50"): (150, 1_500)}
    # One run covering both (a late payment of 2022-12-31 settled with 2023-01-02): each row by its own date.
    both = _fees(_sales([(1, "s2", "2022-12-31", 100_000), (2, "s8", "2022-12-31", 100_000),
                         (3, "s2", "2023-01-02", 100_000), (4, "s8", "2023-01-02", 100_000)]), "2023-01-02")
    assert both == {("2022-12-31", "s2"): (25, 250), ("2022-12-31", "s8"): (100, 1_000),
                    ("2023-01-02", "s2"): (0, 0), ("2023-01-02", "s8"): (55, 550)}


def test_fee_schedules_come_from_configuration(monkeypatch):
    """`EUM_SETTLEMENT_FEE_SCHEDULES` dates the tables; `EUM_SETTLEMENT_FEE_TIERS` (the one
    table of the settings before) replaces the latest schedule's tiers only."""
    monkeypatch.setenv("EUM_SETTLEMENT_FEE_SCHEDULES", '[{"from_date": "2000-01-01", "tiers": [{"fee_bp": 7}]}, '
                       '{"from_date": "2022-12-31", "tiers": [{"sales_max_won": 300000000, "fee_bp": 1}, '
                       '{"fee_bp": 2}]}]')
    frame = _sales([(1, "s2", "2022-12-30", 10_000), (2, "s8", "2022-12-30", 10_000),
                    (3, "s2", "2022-12-31", 10_000), (4, "s8", "2022-12-31", 10_000)])
    assert _fees(frame, "2022-12-31", SettlementConfig()) == {
        ("2022-12-30", "s2"): (7, 7), ("2022-12-30", "s8"): (7, 7),
        ("2022-12-31", "s2"): (1, 1), ("2022-12-31", "s8"): (2, 2)}
    monkeypatch.setenv("EUM_SETTLEMENT_FEE_TIERS", '[{"fee_bp": 3}]')
    assert _fees(frame, "2022-12-31", SettlementConfig()) == {
        ("2022-12-30", "s2"): (7, 7), ("2022-12-30", "s8"): (7, 7),
        ("2022-12-31", "s2"): (3, 3), ("2022-12-31", "s8"): (3, 3)}
    tiers = ({"fee_bp": 1},)
    with pytest.raises(ValueError, match="must start by 2000-01-01"):  # a date with no fees
        SettlementConfig(fee_schedules=({"from_date": "2019-01-01", "tiers": tiers},))
    with pytest.raises(ValueError, match="in order of from_date"):
        SettlementConfig(fee_schedules=({"from_date": "2000-01-01", "tiers": tiers},
                                        {"from_date": "2023-01-01", "tiers": tiers},
                                        {"from_date": "2023-01-01", "tiers": tiers}))
    with pytest.raises(ValueError, match="open-ended"):
        SettlementConfig(fee_schedules=({"from_date": "2000-01-01", "tiers": ({"sales_max_won": 5, "fee_bp": 1},)},))


def test_late_events_of_other_dates_are_adjustments():
    late = legs([(20, "payment", "u1", "small", "2026-11-19", "merchant/small/payable", -5_000),
                 (20, "payment", "u1", "small", "2026-11-19", "member/u1/charged", 5_000)])
    c = settle(pl.concat([day_book(), late]))
    adj = c.payouts.filter(pl.col("kind") == "adjustment").row(0, named=True)
    assert (adj["for_business_date"], adj["merchant_id"], adj["net_sales_won"]) == ("2026-11-19", "small", 5_000)
    assert set(c.totals["dates"]) == {"2026-11-19", DAY}


@pytest.mark.parametrize("day, lag, expected", [
    ("2026-11-20", 2, "2026-11-24"),  # Friday: Monday is D+1, Tuesday D+2
    ("2026-09-23", 2, "2026-09-29"),  # Chuseok (24–26) and a Sunday skipped
    ("2026-10-02", 1, "2026-10-06"),  # National Foundation Day on Saturday, substitute Monday
    ("2026-12-24", 1, "2026-12-28"),  # Christmas
    ("2026-11-21", 0, "2026-11-23"),  # D+0 on a Saturday: the next business day
])
def test_payout_dates_skip_weekends_and_korean_holidays(day, lag, expected):
    assert add_business_days(dt.date.fromisoformat(day), lag).isoformat() == expected
    assert is_business_day(dt.date.fromisoformat(expected))


def test_corrections_expiry_and_kinds_added_later_settle_and_check():
    frame = pl.concat([day_book(), legs([
        # a correction claws 700 of past cashback: points 300, then a receivable of 400
        (30, "correction", "u1", None, DAY, "funder/city/2026-10", -500),
        (30, "correction", "u1", None, DAY, "funder/merchant/2026-10", -200),
        (30, "correction", "u1", None, DAY, "member/u1/points", 300),
        (30, "correction", "u1", None, DAY, "receivable/u1", 400),
        # an expired lot goes back to its funders
        (31, "grant_expiry", "u2", None, DAY, "member/u2/grant/relief", 5_000),
        (31, "grant_expiry", "u2", None, DAY, "grantfund/relief/national", -4_000),
        (31, "grant_expiry", "u2", None, DAY, "grantfund/relief/city", -1_000),
        # a kind this code has never heard of still has to balance
        (32, "some_future_kind", "u4", None, DAY, "operator/cash", 10),
        (32, "some_future_kind", "u4", None, DAY, "member/u4/charged", -10),
    ])])
    c = settle(frame)
    assert all(x.ok for x in checks(c, *movements_from_legs(frame))), checks(c, *movements_from_legs(frame))
    assert c.totals["run"]["merchant_share_unattributed_won"] == -200
    assert c.totals["dates"][DAY]["grants"]["expired_won"] == 5_000
    assert c.totals["dates"][DAY]["grants"]["returned_to_funders_won"] == 5_000
    # The day's 100,000 disbursement put in 80/20; the expiry sent 5,000 back the same way.
    assert c.totals["dates"][DAY]["grants_by_source"] == {
        "city": {"funded_won": 20_000, "returned_won": 1_000, "net_won": 19_000},
        "national": {"funded_won": 80_000, "returned_won": 4_000, "net_won": 76_000}}
    assert c.totals["run"]["grants_funded_net_won"] == 95_000
    assert c.funders.filter(pl.col("source") == "city")["cashback_corrected_won"].sum() == -500
    assert "receivable" in c.classes["class"].cast(pl.String).to_list()


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 40), st.integers(-10**12, 10**12), st.sampled_from(["2026-11-20", "2026-11-21"])),
                max_size=120),
       st.booleans())
def test_transaction_sums_by_runs_equal_the_group_by(rows, in_order):
    """The one-pass sums over txn_id runs (legs in id order) equal a group-by, whatever
    the amounts: balanced or not, one leg or many, the first and the last transaction."""
    from settlement.compute import transaction_sums

    # a transaction's legs all carry its business date (the first leg's, as the book writes them)
    first_date: dict[int, str] = {}
    rows = [(t, a, first_date.setdefault(t, d)) for t, a, d in rows]
    if in_order:
        rows = sorted(rows, key=lambda r: r[0])
    legs = pl.DataFrame(rows, schema={"txn_id": pl.Int64, "amount_won": pl.Int64, "business_date": pl.String},
                        orient="row")
    got = transaction_sums(legs).collect().sort("txn_id")
    want = (legs.group_by("txn_id").agg(pl.col("amount_won").sum().alias("s"), pl.col("business_date").first())
            .sort("txn_id"))
    assert got.rows() == want.rows()
    if rows and in_order:  # the run path was the one taken
        assert legs["txn_id"].is_sorted()


@pytest.mark.parametrize(("day", "run_day", "expected"), [
    ("2026-11-02", "2026-11-03", "2026-11-04"),  # on schedule: D + 2 business days
    ("2026-11-06", "2026-11-07", "2026-11-10"),  # Friday, run on Saturday: Tuesday, as scheduled
    ("2026-11-02", "2026-11-20", "2026-11-23"),  # weeks late: the next business day after the run, not the past
    ("2026-11-02", "2026-12-05", "2026-12-07"),  # run on a Saturday: Monday
])
def test_a_late_run_pays_no_earlier_than_a_business_day_after_it(day, run_day, expected):
    from settlement.service import payout_date_for

    got = payout_date_for(dt.date.fromisoformat(day), dt.date.fromisoformat(run_day), SettlementConfig())
    assert got.isoformat() == expected
