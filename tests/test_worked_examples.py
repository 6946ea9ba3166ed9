"""Worked examples from DOMAIN.md and API.md's "Semantics", in accounting terms.

Each example checks the service's answer and the book of record behind it: the legs
of the transactions it wrote and the balances of the accounts they touched
(funder/<source>/<month> = cashback a funder paid that month, merchant/<id>/payable,
member/<id>/{charged,points,grant/<program>}, grantfund/<program>/<source>,
operator/cash). After every example the whole book must pass `check_book`.

Dates are inside 2020-03..2020-10 (policy incheon-2020-03: 10% on the first 50만 of
monthly eligible spend, 1% from 50만 to 100만) and inside 2025-09 (incheon-2025-09: 10%
at merchants ≤ 30억, 15% at merchants in Ganghwa/Ongjin, on the first 30만), so new
policy files for other periods do not change what is expected here.

Runs on SQLite and on PostgreSQL (the `api` fixture)."""

from __future__ import annotations

import pytest

from rules.compiled import PolicyTimeline, compile_policy
from rules.loader import load_policy_file
from tests.book_helpers import (
    account_balance,
    approve_program,
    assert_book_ok,
    assert_problem,
    budget_rows,
    month_of_member,
    pay,
    put_member,
    put_merchant,
    refund,
    snapshot,
    topup,
    txn_count,
    txn_legs,
)
from tests.conftest import POLICIES, at

NO_GRANTS = []


@pytest.fixture
def book(api):
    """The app, with the whole book checked after the example."""
    yield api
    assert_book_ok(api)


def balances(api, member_id: str, month: str) -> dict:
    return month_of_member(api, member_id, month)["balances"]


# ---------------------------------------------------------------- 2020-03 bands


def test_2020_03_payment_straddling_50man_earns_both_bands(book):
    api = book
    put_member(api, "m-band")
    put_merchant(api, "shop-band", district="namdong")
    topup(api, "t-band", "m-band", 1_000_000, at("2020-03-02"))

    first = pay(api, "p-band-1", "m-band", "shop-band", 450_000, at("2020-03-03"))
    assert first["cashback"]["amount"] == 45_000  # 450,000 × 10%
    assert first["spent"] == {"grants": 0, "points": 0, "charged": 450_000}
    # Spending the points earns nothing (cashback base is charged money only) but takes
    # them out, so the next payment is all charged money.
    points_only = pay(api, "p-band-2", "m-band", "shop-band", 45_000, at("2020-03-04"))
    assert points_only["spent"] == {"grants": 0, "points": 45_000, "charged": 0}
    assert points_only["cashback"]["amount"] == 0

    straddle = pay(api, "p-band-3", "m-band", "shop-band", 100_000, at("2020-03-05"))
    assert straddle["status"] == "approved"
    assert straddle["spent"] == {"grants": 0, "points": 0, "charged": 100_000}
    # 50,000 up to 50만 at 10% + 50,000 beyond at 1% = 5,000 + 500
    assert straddle["cashback"]["amount"] == 5_500
    lines = [(c["rate_bp"], c["base"], c["amount"], c["funded_by"]) for c in straddle["cashback"]["components"]]
    assert lines == [(1000, 50_000, 5_000, {"national": 2_000, "city": 3_000}),
                     (100, 50_000, 500, {"national": 200, "city": 300})]

    # The ledger: the payment moves charged money to the merchant; the cashback moves
    # the funders' expense into the member's points.
    assert txn_legs(api, "payment", "p-band-3") == {"merchant/shop-band/payable": -100_000,
                                                    "member/m-band/charged": 100_000}
    assert txn_legs(api, "cashback", "p-band-3") == {"funder/national/2020-03": 2_200,
                                                     "funder/city/2020-03": 3_300,
                                                     "member/m-band/points": -5_500}
    assert account_balance(api, "funder/national/2020-03") == 18_000 + 2_200
    assert account_balance(api, "funder/city/2020-03") == 27_000 + 3_300
    assert account_balance(api, "merchant/shop-band/payable") == 450_000 + 45_000 + 100_000
    assert account_balance(api, "operator/cash") == 1_000_000
    assert account_balance(api, "member/m-band/charged") == 1_000_000 - 450_000 - 100_000
    assert account_balance(api, "member/m-band/points") == 5_500

    month = month_of_member(api, "m-band", "2020-03")["month"]
    assert month["cashback_eligible_spend"] == 550_000
    assert month["cashback_earned"] == 50_500
    assert month["topped_up"] == 1_000_000


def test_2020_03_month_past_100man_earns_nothing_beyond(book):
    api = book
    put_member(api, "m-100")
    put_merchant(api, "shop-100")
    topup(api, "t-100", "m-100", 2_000_000, at("2020-04-01"))

    big = pay(api, "p-100-1", "m-100", "shop-100", 900_000, at("2020-04-02"))
    assert big["cashback"]["amount"] == 50_000 + 4_000  # 50만 × 10% + 40만 × 1%
    pay(api, "p-100-2", "m-100", "shop-100", 54_000, at("2020-04-02"))  # spends the points
    crossing = pay(api, "p-100-3", "m-100", "shop-100", 200_000, at("2020-04-03"))
    # only 900,000..1,000,000 earns (1%); 1,000,000..1,100,000 earns nothing
    assert crossing["cashback"]["amount"] == 1_000
    assert [(c["rate_bp"], c["base"], c["amount"]) for c in crossing["cashback"]["components"]] == [(100, 100_000, 1_000)]
    assert crossing["cashback"]["why"] == [{"code": "beyond_last_band", "component": "city", "base": 100_000,
                                            "spend_up_to": 1_000_000}]
    beyond = pay(api, "p-100-4", "m-100", "shop-100", 100_000, at("2020-04-04"))
    assert beyond["status"] == "approved"
    assert beyond["spent"] == {"grants": 0, "points": 1_000, "charged": 99_000}
    # nothing earned, and the answer says why: the points are no base, the base is past 100만
    assert beyond["cashback"] == {"amount": 0, "base": 99_000, "components": [], "why": [
        {"code": "not_earning_money", "balance": "points", "amount": 1_000},
        {"code": "beyond_last_band", "component": "city", "base": 99_000, "spend_up_to": 1_000_000}]}
    assert txn_legs(api, "cashback", "p-100-4") == {}

    month = month_of_member(api, "m-100", "2020-04")["month"]
    assert month["cashback_eligible_spend"] == 900_000 + 200_000 + 99_000
    assert month["cashback_earned"] == 55_000  # the policy's most in a month
    assert account_balance(api, "funder/national/2020-04") + account_balance(api, "funder/city/2020-04") == 55_000
    assert account_balance(api, "funder/national/2020-04") == 22_000
    # A new month starts over at 10%.
    may = pay(api, "p-100-5", "m-100", "shop-100", 10_000, at("2020-05-01", "00:00:00"))
    assert may["cashback"]["amount"] == 1_000


def test_2020_03_excluded_categories(book):
    api = book
    put_member(api, "m-x")
    put_merchant(api, "mart", category="large_mart")
    put_merchant(api, "cars", category="car_dealer")
    topup(api, "t-x", "m-x", 100_000, at("2020-06-01"))
    before = snapshot(api)

    declined = pay(api, "p-mart", "m-x", "mart", 30_000, at("2020-06-02"))
    assert declined["status"] == "declined"
    assert declined["decline_code"] == "merchant_category_excluded"
    assert declined["spent"] == {"grants": 0, "points": 0, "charged": 0}
    assert declined["balances"] == {"charged": 100_000, "points": 0, "grants": NO_GRANTS}
    after = snapshot(api)
    assert after["payments"] == before["payments"] + 1  # the refusal is recorded ...
    for name in ("ledger_txns", "ledger_legs", "accounts", "budgets", "months"):
        assert after[name] == before[name], name  # ... and nothing moves
    assert txn_count(api, "p-mart") == 0

    # car dealers take the card but earn no cashback (and do not count toward the month)
    cars = pay(api, "p-cars", "m-x", "cars", 30_000, at("2020-06-02"))
    assert cars["status"] == "approved"
    assert cars["cashback"]["amount"] == 0
    assert month_of_member(api, "m-x", "2020-06")["month"]["cashback_eligible_spend"] == 0
    assert account_balance(api, "merchant/cars/payable") == 30_000


# ---------------------------------------------------------------- 2025-09 tiers


def test_2025_09_tiers_and_ganghwa_ongjin(book):
    api = book
    put_merchant(api, "small", district="bupyeong", sales=100_000_000)
    put_merchant(api, "edge-30eok", district="yeonsu", sales=3_000_000_000)
    put_merchant(api, "over-30eok", district="yeonsu", sales=3_000_000_001)
    put_merchant(api, "ganghwa-shop", district="ganghwa", sales=500_000_000)
    put_merchant(api, "ongjin-shop", district="ongjin", sales=2_000_000_000)
    put_merchant(api, "ganghwa-big", district="ganghwa", sales=4_000_000_000)
    expected = {"small": (1000, 1_000), "edge-30eok": (1000, 1_000), "over-30eok": None,
                "ganghwa-shop": (1500, 1_500), "ongjin-shop": (1500, 1_500), "ganghwa-big": None}
    for index, (merchant, want) in enumerate(expected.items()):
        member = f"m-tier-{index}"
        put_member(api, member, district="seo")  # the member lives elsewhere: the merchant's county counts
        topup(api, f"t-tier-{index}", member, 10_000, at("2025-09-10"))
        body = pay(api, f"p-tier-{index}", member, merchant, 10_000, at("2025-09-11"))
        assert body["status"] == "approved", merchant
        month = month_of_member(api, member, "2025-09")["month"]
        if want is None:  # above 30억: no cashback, and it does not count toward the month
            assert body["cashback"]["amount"] == 0, merchant
            assert month["cashback_eligible_spend"] == 0
            assert txn_legs(api, "cashback", f"p-tier-{index}") == {}
            continue
        rate_bp, amount = want
        assert body["cashback"]["amount"] == amount, merchant
        assert [(c["rate_bp"], c["base"]) for c in body["cashback"]["components"]] == [(rate_bp, 10_000)]
        national = amount * 4000 // 10000
        assert txn_legs(api, "cashback", f"p-tier-{index}") == {
            "funder/national/2025-09": national, "funder/city/2025-09": amount - national,
            f"member/{member}/points": -amount}
        assert month["cashback_eligible_spend"] == 10_000
    assert account_balance(api, "funder/national/2025-09") == 400 + 400 + 600 + 600
    assert account_balance(api, "funder/city/2025-09") == 600 + 600 + 900 + 900


def test_2025_09_cap_at_30man_of_spend(book):
    api = book
    put_member(api, "m-cap")
    put_merchant(api, "small", sales=100_000_000)
    put_merchant(api, "big", sales=5_000_000_000)
    put_merchant(api, "ganghwa-shop", district="ganghwa")
    topup(api, "t-cap", "m-cap", 1_000_000, at("2025-09-02"))

    assert pay(api, "p-cap-1", "m-cap", "small", 250_000, at("2025-09-03"))["cashback"]["amount"] == 25_000
    spend_points = pay(api, "p-cap-2", "m-cap", "big", 25_000, at("2025-09-03"))
    assert spend_points["spent"]["points"] == 25_000
    # 250,000..300,000 earns 15% at the Ganghwa merchant; the other 50,000 nothing
    crossing = pay(api, "p-cap-3", "m-cap", "ganghwa-shop", 100_000, at("2025-09-04"))
    assert crossing["cashback"]["amount"] == 7_500
    assert [(c["rate_bp"], c["base"], c["amount"]) for c in crossing["cashback"]["components"]] == [(1500, 50_000, 7_500)]
    after_cap = pay(api, "p-cap-4", "m-cap", "small", 7_500, at("2025-09-05"))  # points
    assert after_cap["cashback"]["amount"] == 0
    nothing = pay(api, "p-cap-5", "m-cap", "small", 50_000, at("2025-09-05"))
    assert nothing["cashback"]["amount"] == 0 and nothing["spent"]["charged"] == 50_000

    month = month_of_member(api, "m-cap", "2025-09")["month"]
    assert after_cap["spent"]["points"] == 7_500  # base 0: counts nothing
    assert month["cashback_eligible_spend"] == 250_000 + 100_000 + 50_000
    assert month["cashback_earned"] == 32_500
    assert account_balance(api, "funder/national/2025-09") == 10_000 + 3_000
    assert account_balance(api, "funder/city/2025-09") == 15_000 + 4_500


# ---------------------------------------------------------------- refusals


def test_unregistered_merchant_and_registration_next_day(book):
    api = book
    put_member(api, "m-reg")
    topup(api, "t-reg", "m-reg", 50_000, at("2025-09-15", "09:00:00"))
    before = snapshot(api)
    unknown = pay(api, "p-unknown", "m-reg", "no-such-shop", 10_000, at("2025-09-15"))
    assert (unknown["status"], unknown["decline_code"]) == ("declined", "merchant_not_registered")

    # registered today, takes effect tomorrow (Asia/Seoul)
    put_merchant(api, "new-shop", registered_from="2025-09-16")
    today = pay(api, "p-new-today", "m-reg", "new-shop", 10_000, "2025-09-15T23:59:59+09:00")
    assert (today["status"], today["decline_code"]) == ("declined", "merchant_not_registered")
    after = snapshot(api)
    assert after["ledger_txns"] == before["ledger_txns"] and after["months"] == before["months"]
    assert after["accounts"]["member/m-reg/charged"] == 50_000
    assert after["payments"] == before["payments"] + 2

    # 15:00 UTC on the 15th is already the 16th in Seoul
    tomorrow = pay(api, "p-new-tomorrow", "m-reg", "new-shop", 10_000, "2025-09-15T15:00:00+00:00")
    assert tomorrow["status"] == "approved"
    assert tomorrow["cashback"]["amount"] == 1_000
    assert account_balance(api, "merchant/new-shop/payable") == 10_000


def test_suspended_member_is_declined(book):
    api = book
    put_member(api, "m-susp")
    put_merchant(api, "shop")
    topup(api, "t-susp-1", "m-susp", 50_000, at("2025-09-10"))
    put_member(api, "m-susp", status="suspended")
    before = snapshot(api)
    body = pay(api, "p-susp", "m-susp", "shop", 10_000, at("2025-09-11"))
    assert (body["status"], body["decline_code"]) == ("declined", "member_suspended")
    top = topup(api, "t-susp-2", "m-susp", 10_000, at("2025-09-11"))
    assert (top["status"], top["decline_code"]) == ("declined", "member_suspended")
    after = snapshot(api)
    for name in ("ledger_txns", "ledger_legs", "accounts", "budgets", "months"):
        assert after[name] == before[name], name
    put_member(api, "m-susp", status="active")
    assert pay(api, "p-susp-2", "m-susp", "shop", 10_000, at("2025-09-12"))["status"] == "approved"


def test_insufficient_funds_no_partial_approval(book):
    api = book
    put_member(api, "m-poor")
    put_merchant(api, "shop")
    put_merchant(api, "big", sales=9_000_000_000)
    topup(api, "t-poor", "m-poor", 10_000, at("2025-09-10"))
    before = snapshot(api)
    short = pay(api, "p-poor-1", "m-poor", "shop", 10_001, at("2025-09-10"))
    assert (short["status"], short["decline_code"]) == ("declined", "insufficient_funds")
    assert short["spent"] == {"grants": 0, "points": 0, "charged": 0}
    assert short["cashback"]["amount"] == 0
    assert snapshot(api)["accounts"] == before["accounts"]
    assert txn_count(api, "p-poor-1") == 0

    # all usable balances together: 9,000 charged + 1,000 points pays 10,000 ...
    first = pay(api, "p-poor-2", "m-poor", "big", 1_000, at("2025-09-10"))
    assert first["balances"]["charged"] == 9_000
    earn = pay(api, "p-poor-3", "m-poor", "shop", 9_000, at("2025-09-10"))
    assert earn["balances"] == {"charged": 0, "points": 900, "grants": NO_GRANTS}
    topup(api, "t-poor-2", "m-poor", 10_000, at("2025-09-11"))
    both = pay(api, "p-poor-4", "m-poor", "big", 10_900, at("2025-09-11"))
    assert both["spent"] == {"grants": 0, "points": 900, "charged": 10_000}
    # ... and one won more than all of it is refused
    none = pay(api, "p-poor-5", "m-poor", "big", 1, at("2025-09-11"))
    assert none["decline_code"] == "insufficient_funds"
    assert account_balance(api, "member/m-poor/charged") == 0
    assert account_balance(api, "member/m-poor/points") == 0


# ---------------------------------------------------------------- refunds


def test_refund_in_three_parts_ends_where_the_member_started(book):
    api = book
    put_member(api, "m-ref")
    put_merchant(api, "shop-ref")
    topup(api, "t-ref", "m-ref", 100_000, at("2025-09-10"))
    start = month_of_member(api, "m-ref", "2025-09")
    start_budgets = {k: v["committed"] for k, v in budget_rows(api).items()}

    paid = pay(api, "p-ref", "m-ref", "shop-ref", 77_777, at("2025-09-11"))
    assert paid["cashback"]["amount"] == 7_777  # floor(77,777 × 10%)
    assert paid["cashback"]["components"][0]["funded_by"] == {"national": 3_110, "city": 4_667}

    # Cumulative, floored clawback per funder: floor(funded × refunded base / base).
    parts = [("r-ref-1", 10_000, 999, {"national": 399, "city": 600}),
             ("r-ref-2", 30_000, 3_000, {"national": 1_200, "city": 1_800}),
             ("r-ref-3", 37_777, 3_778, {"national": 1_511, "city": 2_267})]
    for refund_id, amount, clawback, by_funder in parts:
        body = refund(api, "p-ref", refund_id, amount, at("2025-09-12"))
        assert body["restored"] == {"grants": 0, "points": 0, "charged": amount}
        assert body["cashback_clawback"] == clawback
        assert txn_legs(api, "refund", refund_id) == {"merchant/shop-ref/payable": amount,
                                                      "member/m-ref/charged": -amount}
        assert txn_legs(api, "clawback", refund_id) == {"funder/national/2025-09": -by_funder["national"],
                                                        "funder/city/2025-09": -by_funder["city"],
                                                        "member/m-ref/points": clawback}
    assert sum(c for _, _, c, _ in parts) == 7_777

    end = month_of_member(api, "m-ref", "2025-09")
    assert end["balances"] == start["balances"] == {"charged": 100_000, "points": 0, "grants": NO_GRANTS}
    assert end["month"]["cashback_eligible_spend"] == start["month"]["cashback_eligible_spend"] == 0
    assert end["month"]["cashback_earned"] == start["month"]["cashback_earned"] == 0
    assert end["month"]["topped_up"] == 100_000
    for key, row in budget_rows(api).items():
        assert row["committed"] == start_budgets.get(key, 0), key
    for account in ("funder/national/2025-09", "funder/city/2025-09", "merchant/shop-ref/payable",
                    "member/m-ref/points"):
        assert account_balance(api, account) == 0, account
    # nothing is left to refund
    r = api.post("/v1/payments/p-ref/refunds", {"refund_id": "r-ref-4", "amount": 1, "occurred_at": at("2025-09-12")})
    assert_problem(r, 409, "refund_exceeds_payment")
    # the freed band earns again
    assert pay(api, "p-ref-2", "m-ref", "shop-ref", 10_000, at("2025-09-13"))["cashback"]["amount"] == 1_000


def _paid_then_points_spent(api, member_id: str, payment_id: str) -> None:
    """200,000 topped up; `payment_id` pays 100,000 at a shop (10,000 points back), then
    the 10,000 points are spent at a merchant above 30억 (no cashback)."""
    put_member(api, member_id)
    put_merchant(api, "shop")
    put_merchant(api, "big", sales=9_000_000_000)
    topup(api, f"t-{member_id}", member_id, 200_000, at("2025-09-10"))
    assert pay(api, payment_id, member_id, "shop", 100_000, at("2025-09-10"))["cashback"]["amount"] == 10_000
    pay(api, f"{payment_id}-points", member_id, "big", 10_000, at("2025-09-10"))


def test_clawback_beyond_points_is_withheld_from_charged(book):
    api = book
    _paid_then_points_spent(api, "m-wh", "p-wh")
    body = refund(api, "p-wh", "r-wh", 100_000, at("2025-09-11"))
    assert body["cashback_clawback"] == 10_000
    assert body["restored"] == {"grants": 0, "points": 0, "charged": 90_000}
    assert body["balances"] == {"charged": 190_000, "points": 0, "grants": NO_GRANTS}
    assert txn_legs(api, "clawback", "r-wh") == {"funder/national/2025-09": -4_000, "funder/city/2025-09": -6_000,
                                                 "member/m-wh/charged": 10_000}


def test_a_refund_goes_through_when_the_member_holds_less_than_its_clawback(book):
    """The last won of a refunded payment claws back the won its floors left (one per
    funder): with the points and the money all spent, the member holds less than that.
    The refund still goes through and claws back both won; the one the member does not
    hold they owe (`receivable/{member}`). (Before, it was not recovered: the city bore it.)"""
    api = book
    _paid_then_points_spent(api, "m-nr", "p-nr")
    first = refund(api, "p-nr", "r-nr-1", 99_999, at("2025-09-11"))
    # floor(4,000 × 99,999 / 100,000) + floor(6,000 × 99,999 / 100,000) = 3,999 + 5,999
    assert first["cashback_clawback"] == 9_998
    assert first["clawback_detail"] == {"from_points": 0, "withheld_from_charged": 9_998,
                                         "withheld_from_grants": 0, "not_recovered": 0, "owed": 0}
    assert first["balances"]["charged"] == 190_001
    pay(api, "p-nr-all", "m-nr", "big", 190_001, at("2025-09-12"))  # and the money is spent
    last = refund(api, "p-nr", "r-nr-2", 1, at("2025-09-13"))
    # The targets are now the whole 4,000 and 6,000: 2 won to claw back, 1 won held.
    assert last["cashback_clawback"] == 2
    assert last["clawback_detail"] == {"from_points": 0, "withheld_from_charged": 1, "withheld_from_grants": 0,
                                        "not_recovered": 0, "owed": 1}
    assert last["restored"] == {"grants": 0, "points": 0, "charged": 0}
    assert last["balances"] == {"charged": 0, "points": 0, "grants": NO_GRANTS}
    assert txn_legs(api, "clawback", "r-nr-2") == {"funder/national/2025-09": -1, "funder/city/2025-09": -1,
                                                   "member/m-nr/charged": 1, "receivable/m-nr": 1}
    assert account_balance(api, "funder/national/2025-09") == 0
    assert account_balance(api, "funder/city/2025-09") == 0  # the city no longer bears the won
    assert account_balance(api, "receivable/m-nr") == 1 == month_of_member(api, "m-nr", "2025-09")["owed"]
    assert month_of_member(api, "m-nr", "2025-09")["month"]["cashback_earned"] == 0
    r = api.post("/v1/payments/p-nr/refunds", {"refund_id": "r-nr-3", "amount": 1, "occurred_at": at("2025-09-13")})
    assert r.status_code == 409 and r.json()["code"] == "refund_exceeds_payment"


# ---------------------------------------------------------------- grants


def create_program(api, program_id: str, valid_until: str, restrictions: dict, funding: dict,
                   once_per_member: bool = True, cashback_on_spend: bool = False) -> None:
    body = {"program_id": program_id, "name": f"program {program_id}", "valid_from": "2025-09-01",
            "valid_until": valid_until, "restrictions": restrictions, "funding": funding,
            "cashback_on_spend": cashback_on_spend, "once_per_member": once_per_member}
    r = api.post("/v1/grant-programs", body, role="policy-editor")
    assert r.status_code == 201, r.text
    approve_program(api, program_id)


def disburse(api, program_id: str, disbursement_id: str, member_id: str, amount: int) -> dict:
    r = api.post(f"/v1/grant-programs/{program_id}/disbursements",
                 {"disbursement_id": disbursement_id, "member_id": member_id, "amount": amount,
                  "occurred_at": at("2025-09-01")}, role="policy-editor")
    assert r.status_code == 201, r.text
    return r.json()


def test_spend_order_with_grants_and_refund_after_expiry(book):
    api = book
    put_member(api, "m-g")
    put_merchant(api, "tiny", sales=100_000_000)  # ≤ 3억: both programs
    put_merchant(api, "mid", sales=1_000_000_000)  # 10억: only the later program
    put_merchant(api, "huge", sales=9_000_000_000)  # 90억: neither
    # A expires first but only at merchants ≤ 3억; B later, merchants ≤ 30억.
    create_program(api, "prog-a", "2025-09-20", {"merchant_sales_max_won": 300_000_000},
                   {"national": 8000, "city": 2000})
    create_program(api, "prog-b", "2025-11-30", {"merchant_sales_max_won": 3_000_000_000}, {"national": 10000},
                   once_per_member=False)  # given twice below
    disburse(api, "prog-a", "d-a", "m-g", 30_000)
    granted = disburse(api, "prog-b", "d-b", "m-g", 50_000)
    assert [(g["program_id"], g["amount"]) for g in granted["balances"]["grants"]] == [("prog-a", 30_000),
                                                                                      ("prog-b", 50_000)]
    assert txn_legs(api, "grant", "d-a") == {"grantfund/prog-a/national": 24_000, "grantfund/prog-a/city": 6_000,
                                             "member/m-g/grant/prog-a": -30_000}
    topup(api, "t-g", "m-g", 100_000, at("2025-09-02"))

    # at a 10억 merchant program A is not usable: B pays, no cashback on grant money
    at_mid = pay(api, "p-g-1", "m-g", "mid", 20_000, at("2025-09-05"))
    assert at_mid["spent"] == {"grants": 20_000, "points": 0, "charged": 0}
    assert at_mid["spent_grants"] == [{"program_id": "prog-b", "amount": 20_000}]
    assert at_mid["cashback"]["amount"] == 0
    # at a 1억 merchant: A first (soonest expiring), then B
    at_tiny = pay(api, "p-g-2", "m-g", "tiny", 40_000, at("2025-09-06"))
    assert at_tiny["spent_grants"] == [{"program_id": "prog-a", "amount": 30_000},
                                       {"program_id": "prog-b", "amount": 10_000}]
    assert at_tiny["cashback"]["amount"] == 0
    # grants, then charged money; only the charged part earns
    mixed = pay(api, "p-g-3", "m-g", "tiny", 30_000, at("2025-09-07"))
    assert mixed["spent"] == {"grants": 20_000, "points": 0, "charged": 10_000}
    assert mixed["cashback"]["amount"] == 1_000
    assert [(c["base"], c["amount"]) for c in mixed["cashback"]["components"]] == [(10_000, 1_000)]
    # at a merchant no program allows, the member's own money pays
    topup(api, "t-g-2", "m-g", 20_000, at("2025-09-07"))
    disburse(api, "prog-b", "d-b-2", "m-g", 5_000)
    at_huge = pay(api, "p-g-4", "m-g", "huge", 10_000, at("2025-09-08"))
    assert at_huge["spent"] == {"grants": 0, "points": 1_000, "charged": 9_000}
    month = month_of_member(api, "m-g", "2025-09")["month"]
    assert month["cashback_eligible_spend"] == 10_000  # grant spending does not count

    # After program A expired: its money goes back to its funders, B's to the member.
    back = refund(api, "p-g-2", "r-g-2", 40_000, at("2025-09-25"))
    assert back["restored"] == {"grants": 10_000, "points": 0, "charged": 0}
    assert back["returned_to_funders"] == 30_000
    assert back["cashback_clawback"] == 0
    assert txn_legs(api, "refund", "r-g-2") == {"merchant/tiny/payable": 40_000,
                                                "member/m-g/grant/prog-b": -10_000,
                                                "grantfund/prog-a/national": -24_000,
                                                "grantfund/prog-a/city": -6_000}
    assert [(g["program_id"], g["amount"]) for g in back["balances"]["grants"]] == [("prog-b", 15_000)]
    assert account_balance(api, "grantfund/prog-a/national") == 0
    assert account_balance(api, "grantfund/prog-a/city") == 0
    assert account_balance(api, "member/m-g/grant/prog-a") == 0
    assert account_balance(api, "grantfund/prog-b/national") == 55_000

    # A refund of a mixed payment restores charged money first, then grants; the
    # member's points were spent, so the clawback is withheld from the charged money.
    partial = refund(api, "p-g-3", "r-g-3", 15_000, at("2025-09-26"))
    assert partial["cashback_clawback"] == 1_000
    assert partial["clawback_detail"] == {"from_points": 0, "withheld_from_charged": 1_000,
                                           "withheld_from_grants": 0, "not_recovered": 0, "owed": 0}
    assert partial["restored"] == {"grants": 5_000, "points": 0, "charged": 10_000 - 1_000}
    assert txn_legs(api, "refund", "r-g-3") == {"merchant/tiny/payable": 15_000, "member/m-g/charged": -10_000,
                                                "member/m-g/grant/prog-b": -5_000}


# ---------------------------------------------------------------- budgets


def test_a_whole_refund_of_grant_money_that_earned_claws_back_from_the_grant_restored(book):
    """A program whose spending earns cashback: 100,000 of it paid at a shop (10,000
    points), the points spent where nothing is earned, the payment refunded whole. What
    the points cannot cover is kept back from the grant money restored: the member ends
    with 90,000 of the grant, as if the 10,000 spent on points had been paid from it. It
    was all restored and nothing clawed back, so the round could be done again and again,
    each earning 10,000 more (the oracle audit)."""
    api = book
    put_member(api, "m-gc")
    put_merchant(api, "shop")
    put_merchant(api, "big", sales=9_000_000_000)
    create_program(api, "prog-earns", "2025-11-30", {}, {"city": 10000}, cashback_on_spend=True)
    disburse(api, "prog-earns", "d-gc", "m-gc", 100_000)
    paid = pay(api, "p-gc", "m-gc", "shop", 100_000, at("2025-09-10"))
    assert paid["spent"] == {"grants": 100_000, "points": 0, "charged": 0}
    assert paid["cashback"]["amount"] == 10_000
    assert pay(api, "p-gc-points", "m-gc", "big", 10_000, at("2025-09-10"))["spent"]["points"] == 10_000
    body = refund(api, "p-gc", "r-gc", 100_000, at("2025-09-11"))
    assert body["cashback_clawback"] == 10_000
    assert body["clawback_detail"] == {"from_points": 0, "withheld_from_charged": 0,
                                       "withheld_from_grants": 10_000, "not_recovered": 0, "owed": 0}
    assert body["restored"] == {"grants": 90_000, "points": 0, "charged": 0}
    # Program by program: 100,000 back to the lot, 10,000 of it kept for the clawback.
    assert body["grants"] == [{"program_id": "prog-earns", "amount": 100_000, "to": "member", "withheld": 10_000}]
    assert [(g["program_id"], g["amount"]) for g in body["balances"]["grants"]] == [("prog-earns", 90_000)]
    assert txn_legs(api, "clawback", "r-gc") == {"funder/national/2025-09": -4_000, "funder/city/2025-09": -6_000,
                                                 "member/m-gc/grant/prog-earns": 10_000}
    month = month_of_member(api, "m-gc", "2025-09")["month"]
    assert (month["cashback_eligible_spend"], month["cashback_earned"]) == (0, 0)
    money = api.get("/v1/grant-programs/prog-earns", role="policy-editor").json()["money"]
    assert (money["disbursed"], money["held_by_members"], money["spent_net_of_refunds"],
            money["returned_to_funders"]) == (100_000, 90_000, 10_000, 0)


def test_budgets_partial_limits_and_listing(book):
    api = book
    put_merchant(api, "shop")
    for member in ("m-b1", "m-b2", "m-b3"):
        put_member(api, member)
        topup(api, f"t-{member}", member, 200_000, at("2025-09-10"))

    r = api.put("/v1/budgets/city/2025-09", {"amount": 9_000}, role="policy-editor")
    assert r.status_code == 200, r.text
    assert r.json()["limit"] == 9_000 and r.json()["remaining"] == 9_000
    assert api.put("/v1/budgets/national/2025-09", {"amount": 100_000}, role="policy-editor").status_code == 200

    full = pay(api, "p-b1", "m-b1", "shop", 100_000, at("2025-09-11"))
    assert full["cashback"]["amount"] == 10_000  # national 4,000 + city 6,000
    # city has 3,000 left: the shipped policies pay what is left (partial)
    short = pay(api, "p-b2", "m-b2", "shop", 100_000, at("2025-09-11"))
    assert short["cashback"]["amount"] == 4_000 + 3_000
    (line,) = short["cashback"]["components"]
    assert line["funded_by"] == {"national": 4_000, "city": 3_000}
    assert line["reason"] == "budget_partial"
    assert line["short_of"] == [{"source": "city", "period": "2025-09"}]  # which budget, not only that one was
    empty = pay(api, "p-b3", "m-b3", "shop", 100_000, at("2025-09-11"))
    assert empty["cashback"]["amount"] == 4_000
    assert empty["cashback"]["components"][0]["funded_by"] == {"national": 4_000}
    assert empty["cashback"]["components"][0]["short_of"] == [{"source": "city", "period": "2025-09"}]
    assert "short_of" not in full["cashback"]["components"][0]
    assert account_balance(api, "funder/city/2025-09") == 9_000
    assert account_balance(api, "funder/national/2025-09") == 12_000

    rows = budget_rows(api)
    city = rows[("city", "2025-09")]
    assert (city["limit"], city["committed"], city["remaining"]) == (9_000, 9_000, 0)
    national = rows[("national", "2025-09")]
    assert (national["limit"], national["committed"], national["remaining"]) == (100_000, 12_000, 88_000)
    # a source with no limit set is not limited, and says so
    assert rows[("city", "2025")]["limit"] is None and rows[("city", "2025")]["committed"] == 9_000
    assert rows[("city", "2025")]["remaining"] is None

    below = api.put("/v1/budgets/city/2025-09", {"amount": 8_999}, role="policy-editor")
    assert_problem(below, 409, "budget_below_committed")
    assert budget_rows(api)[("city", "2025-09")]["limit"] == 9_000
    # a refund gives the budget back
    back = refund(api, "p-b2", "r-b2", 100_000, at("2025-09-12"))
    assert back["cashback_clawback"] == 7_000
    city = budget_rows(api)[("city", "2025-09")]
    assert (city["committed"], city["remaining"]) == (6_000, 3_000)
    # the limit binds at the year level too, whichever is tighter
    # national 2025 has 12,000 − 4,000 clawed back = 8,000 committed; 500 more allowed
    assert budget_rows(api)[("national", "2025")]["committed"] == 8_000
    assert api.put("/v1/budgets/national/2025", {"amount": 8_500}, role="policy-editor").status_code == 200
    topup(api, "t-m-b2-2", "m-b2", 100_000, at("2025-09-12"))
    again = pay(api, "p-b2-again", "m-b2", "shop", 100_000, at("2025-09-12"))
    assert again["cashback"]["components"][0]["funded_by"] == {"national": 500, "city": 3_000}
    assert budget_rows(api)[("national", "2025")]["remaining"] == 0


def test_budget_skip_pays_nothing_when_short(book):
    """A component with `on_budget_short: skip` pays nothing when any of its funders is
    short (a fixed timeline: the 2025-09 policy with skip instead of partial)."""
    api = book
    document = load_policy_file(POLICIES / "2025-09-all-under-30eok.yaml")
    component = document.components[0].model_copy(update={"on_budget_short": "skip"})
    skip = document.model_copy(update={"policy_id": "test-skip", "components": (component,)})
    api.services.book.timeline = PolicyTimeline([compile_policy(skip)])

    put_merchant(api, "shop")
    for member in ("m-s1", "m-s2", "m-s3"):
        put_member(api, member)
        topup(api, f"t-{member}", member, 100_000, at("2025-09-10"))
    assert api.put("/v1/budgets/city/2025-09", {"amount": 7_000}, role="policy-editor").status_code == 200
    assert pay(api, "p-s1", "m-s1", "shop", 50_000, at("2025-09-11"))["cashback"]["amount"] == 5_000
    # city 3,000 of 7,000 committed: 4,000 left covers the next city share of 3,000
    assert pay(api, "p-s2", "m-s2", "shop", 50_000, at("2025-09-11"))["cashback"]["amount"] == 5_000
    third = pay(api, "p-s3", "m-s3", "shop", 50_000, at("2025-09-12"))  # city wants 3,000, has 1,000
    assert third["status"] == "approved"
    assert third["cashback"]["amount"] == 0
    assert [c["reason"] for c in third["cashback"]["components"]] == ["budget_skip"]
    assert txn_legs(api, "cashback", "p-s3") == {}
    # the spend still counts toward the month (the band is used up, not the budget)
    assert month_of_member(api, "m-s3", "2025-09")["month"]["cashback_eligible_spend"] == 50_000
    assert month_of_member(api, "m-s3", "2025-09")["month"]["cashback_earned"] == 0
    rows = budget_rows(api)
    assert (rows[("city", "2025-09")]["committed"], rows[("national", "2025-09")]["committed"]) == (6_000, 4_000)
