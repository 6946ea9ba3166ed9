"""`cashback.why` in a payment's answer: why the cashback is less than the headline rate
× the amount, where no cashback line says so (docs/design.md, "Rules", "Why less").

Worked examples under the shipped policies (2025-10: 10% on the first 50만 of the month's
eligible spend at merchants ≤ 30억; 2024-01: categories excluded from cashback), through
the API on SQLite and PostgreSQL, each with the book checked after; the pure evaluator
for what the API examples cannot reach cheaply (a layer's own last band, every condition
of the eligibility); and a stored answer from before the field replayed as it was."""

from __future__ import annotations

import datetime as dt
import random

import orjson
import pytest
from sqlalchemy import select, update

from ledger import schema as s
from rules.compiled import CompiledConditions
from rules.document import Conditions
from rules.evaluate import evaluate_payment
from rules.facts import (BudgetView, GrantLot, GrantProgramFacts, GrantRestrictions, MemberFacts, MerchantFacts,
                         MonthSoFar, PaymentEvent, Wallet)
from rules.loader import timeline_from_dir
from rules.timeutil import local_midnight_us
from tests.book_helpers import assert_book_ok, put_member, put_merchant, topup
from tests.conftest import POLICIES, at, make_api
from tests.test_worked_examples import create_program, disburse

OCT = "2025-10"


@pytest.fixture
def book(api):
    yield api
    assert_book_ok(api)


def pay(api, payment_id: str, member_id: str, merchant_id: str, amount: int, occurred_at: str) -> dict:
    r = api.post("/v1/payments", {"payment_id": payment_id, "member_id": member_id, "merchant_id": merchant_id,
                                  "amount": amount, "occurred_at": occurred_at})
    assert r.status_code == 201, r.text
    return r.json()


def lines(answer: dict) -> list[tuple]:
    return [(c["component"], c["rate_bp"], c["base"], c["amount"]) for c in answer["cashback"]["components"]]


# ---------------------------------------------------------------- through the API


def test_2025_10_past_50man_says_beyond_the_last_band_and_points_say_not_earning(book):
    api = book
    put_member(api, "m-past")
    put_merchant(api, "shop-past", district="namdong")
    topup(api, "t-past", "m-past", 1_000_000, at(f"{OCT}-01"))

    full = pay(api, "p-past-1", "m-past", "shop-past", 500_000, at(f"{OCT}-02"))
    assert full["cashback"]["amount"] == 50_000 and full["cashback"]["why"] == []  # 10% × 500,000 in full

    # The 50,000 points earned are spent first (spend order grants, points, charged):
    # nothing of it is cashback base, and the answer says which money that was.
    points = pay(api, "p-past-2", "m-past", "shop-past", 50_000, at(f"{OCT}-03"))
    assert points["spent"] == {"grants": 0, "points": 50_000, "charged": 0}
    assert points["cashback"]["base"] == 0 and points["cashback"]["components"] == []
    assert points["cashback"]["why"] == [{"code": "not_earning_money", "balance": "points", "amount": 50_000}]

    # The month's eligible spend is at 50만: all 28,000 of this base lies past the cap.
    past = pay(api, "p-past-3", "m-past", "shop-past", 28_000, at(f"{OCT}-04"))
    assert past["spent"] == {"grants": 0, "points": 0, "charged": 28_000}
    assert past["cashback"]["amount"] == 0 and past["cashback"]["base"] == 28_000
    assert past["cashback"]["components"] == []
    assert past["cashback"]["why"] == [{"code": "beyond_last_band", "component": "city", "base": 28_000,
                                        "spend_up_to": 500_000}]

    # The next month starts again.
    november = pay(api, "p-past-4", "m-past", "shop-past", 10_000, at("2025-11-01"))
    assert november["cashback"]["amount"] == 1_000 and november["cashback"]["why"] == []


def test_2025_10_a_payment_straddling_50man_says_the_part_beyond(book):
    api = book
    put_member(api, "m-str")
    put_merchant(api, "shop-str", district="namdong")
    topup(api, "t-str", "m-str", 1_000_000, at(f"{OCT}-01"))
    pay(api, "p-str-1", "m-str", "shop-str", 480_000, at(f"{OCT}-02"))  # 48,000 points
    pay(api, "p-str-2", "m-str", "shop-str", 48_000, at(f"{OCT}-03"))  # the points spent

    straddle = pay(api, "p-str-3", "m-str", "shop-str", 50_000, at(f"{OCT}-04"))
    assert straddle["cashback"]["base"] == 50_000
    # 20,000 up to 50만 at 10%; 30,000 beyond it earns nothing
    assert lines(straddle) == [("city", 1000, 20_000, 2_000)]
    assert straddle["cashback"]["why"] == [{"code": "beyond_last_band", "component": "city", "base": 30_000,
                                            "spend_up_to": 500_000}]


def test_points_and_charged_in_one_payment_past_the_cap(book):
    """Both reasons in one answer: the points part outside the base, the base's part past
    the cap; what they name adds up to the amount less what earned."""
    api = book
    put_member(api, "m-mix")
    put_merchant(api, "shop-mix", district="namdong")
    topup(api, "t-mix", "m-mix", 1_000_000, at(f"{OCT}-01"))
    pay(api, "p-mix-1", "m-mix", "shop-mix", 480_000, at(f"{OCT}-02"))  # 48,000 points

    mixed = pay(api, "p-mix-2", "m-mix", "shop-mix", 98_000, at(f"{OCT}-03"))
    assert mixed["spent"] == {"grants": 0, "points": 48_000, "charged": 50_000}
    assert lines(mixed) == [("city", 1000, 20_000, 2_000)]
    assert mixed["cashback"]["why"] == [
        {"code": "not_earning_money", "balance": "points", "amount": 48_000},
        {"code": "beyond_last_band", "component": "city", "base": 30_000, "spend_up_to": 500_000}]


def test_a_merchant_above_30eok_is_not_eligible_and_says_which_condition(book):
    api = book
    put_member(api, "m-big")
    put_merchant(api, "shop-big", district="namdong", sales=3_500_000_000)  # 35억
    put_merchant(api, "shop-small", district="namdong")
    topup(api, "t-big", "m-big", 100_000, at(f"{OCT}-01"))

    big = pay(api, "p-big-1", "m-big", "shop-big", 30_000, at(f"{OCT}-02"))
    assert big["status"] == "approved" and big["spent"]["charged"] == 30_000
    assert big["cashback"] == {"amount": 0, "base": 0, "components": [],
                               "why": [{"code": "not_eligible", "condition": "merchant_sales_max_won"}]}
    # It does not count toward the month: the next payment elsewhere earns from 0.
    small = pay(api, "p-big-2", "m-big", "shop-small", 10_000, at(f"{OCT}-03"))
    assert small["cashback"]["amount"] == 1_000 and small["cashback"]["why"] == []


def test_an_excluded_category_under_2024_names_categories_exclude(book):
    api = book
    put_member(api, "m-car")
    put_merchant(api, "car-shop", district="namdong", category="car_dealer")
    topup(api, "t-car", "m-car", 100_000, at("2024-03-01"))
    car = pay(api, "p-car", "m-car", "car-shop", 40_000, at("2024-03-02"))
    assert car["policy_id"].startswith("incheon-2024-01")
    assert car["cashback"]["why"] == [{"code": "not_eligible", "condition": "categories_exclude"}]


def test_grant_money_of_a_program_earning_none_is_named_by_program(book):
    api = book
    put_member(api, "m-gr")
    put_merchant(api, "shop-gr", district="namdong")
    create_program(api, "why-none", "2025-11-30", {"merchant_sales_max_won": 3_000_000_000}, {"national": 10000})
    create_program(api, "why-earns", "2025-12-31", {}, {"city": 10000}, cashback_on_spend=True)
    disburse(api, "why-none", "d-why-none", "m-gr", 20_000)
    disburse(api, "why-earns", "d-why-earns", "m-gr", 10_000)
    topup(api, "t-gr", "m-gr", 100_000, at(f"{OCT}-01"))

    mixed = pay(api, "p-gr", "m-gr", "shop-gr", 50_000, at(f"{OCT}-02"))
    assert mixed["spent_grants"] == [{"program_id": "why-none", "amount": 20_000},
                                     {"program_id": "why-earns", "amount": 10_000}]
    assert mixed["spent"] == {"grants": 30_000, "points": 0, "charged": 20_000}
    assert mixed["cashback"]["base"] == 30_000  # why-earns' 10,000 and the charged 20,000
    assert mixed["cashback"]["amount"] == 3_000
    assert mixed["cashback"]["why"] == [
        {"code": "not_earning_money", "balance": "grants", "program_id": "why-none", "amount": 20_000}]


def test_declined_payments_answer_an_empty_why(book):
    api = book
    put_member(api, "m-dec")
    put_merchant(api, "shop-dec", district="namdong")
    put_merchant(api, "mart", district="namdong", category="large_mart")
    topup(api, "t-dec", "m-dec", 10_000, at(f"{OCT}-01"))
    short = pay(api, "p-dec-1", "m-dec", "shop-dec", 20_000, at(f"{OCT}-02"))
    assert short["decline_code"] == "insufficient_funds" and short["cashback"]["why"] == []
    refused = pay(api, "p-dec-2", "m-dec", "mart", 5_000, at(f"{OCT}-02"))
    assert refused["decline_code"] == "merchant_category_excluded" and refused["cashback"]["why"] == []


def test_a_stored_answer_from_before_the_field_replays_byte_for_byte(db_url):
    """An answer recorded by a release before `why` replays as it was stored, without the
    field, and fits the documented answer (the field is not required)."""
    body = {"payment_id": "p-old", "member_id": "m-old", "merchant_id": "shop-old", "amount": 17_000,
            "occurred_at": at(f"{OCT}-02")}
    first_worker = make_api(db_url)
    with first_worker.client:
        put_member(first_worker, "m-old")
        put_merchant(first_worker, "shop-old", district="namdong")
        topup(first_worker, "t-old", "m-old", 100_000, at(f"{OCT}-01"))
        assert first_worker.post("/v1/payments", body).status_code == 201
        engine = first_worker.services.engine
        with engine.begin() as conn:
            stored = orjson.loads(conn.execute(select(s.payments.c.response)
                                               .where(s.payments.c.payment_id == "p-old")).scalar_one())
            assert stored["cashback"]["why"] == []
            del stored["cashback"]["why"]  # as an earlier release wrote it
            old = orjson.dumps(stored)
            conn.execute(update(s.payments).where(s.payments.c.payment_id == "p-old").values(response=old.decode()))
    second_worker = make_api(db_url)  # another worker: its replay comes from the book
    with second_worker.client:
        again = second_worker.post("/v1/payments", body)  # checked against PaymentOut (tests/conftest.py)
        assert again.status_code == 200 and again.headers.get("idempotent-replayed") == "true"
        assert again.content == old
        assert "why" not in again.json()["cashback"]


# ---------------------------------------------------------------- the pure evaluator

TIMELINE = timeline_from_dir(POLICIES)
NOV = dt.date(2025, 11, 10)


def _event(amount: int, merchant: MerchantFacts, day: dt.date = NOV, district: str = "namdong") -> PaymentEvent:
    return PaymentEvent(amount, local_midnight_us(day) + 12 * 3_600_000_000, day,
                        MemberFacts("m-1", district, "active"), merchant)


def _merchant(district: str = "namdong", sales: int = 100_000_000, category: str = "restaurant",
              flags: tuple[str, ...] = (), share_bp: int = 0) -> MerchantFacts:
    return MerchantFacts(f"shop-{district}", district, category, sales, dt.date(2018, 1, 1), frozenset(flags),
                         share_bp)


def test_each_layer_says_its_own_last_band():
    """2025-10 + win-win at a Seo-gu 상생 merchant: the district top-up's band ends at 30만,
    the city's at 50만, the merchant's share has none. At 45만 spent, a 10만 payment is
    past the district's end in full and past the city's by 5만."""
    policy = TIMELINE.in_force(local_midnight_us(NOV))
    winwin = _merchant("seo", flags=("winwin",), share_bp=500)
    d = evaluate_payment(_event(100_000, winwin), policy, MonthSoFar(eligible_spend_won=450_000),
                         Wallet(charged_won=100_000, points_won=0), BudgetView())
    assert [(l.component_id, l.base_won, l.amount_won) for l in d.lines] == [
        ("city", 50_000, 5_000), ("winwin-merchant", 100_000, 5_000)]
    assert [dict(w) for w in d.why] == [
        {"code": "beyond_last_band", "component": "city", "base": 50_000, "spend_up_to": 500_000},
        {"code": "beyond_last_band", "component": "winwin-district", "base": 100_000, "spend_up_to": 300_000}]


def test_a_payment_within_every_band_and_in_charged_money_has_no_why():
    policy = TIMELINE.in_force(local_midnight_us(NOV))
    d = evaluate_payment(_event(17_000, _merchant()), policy, MonthSoFar(), Wallet(100_000, 0), BudgetView())
    assert d.cashback_won == 1_700 and d.why == ()
    declined = evaluate_payment(_event(17_000, _merchant()), policy, MonthSoFar(), Wallet(1_000, 0), BudgetView())
    assert not declined.approved and declined.why == ()


def test_the_explanation_adds_up_over_many_payments():
    """Per component that applies, its lines' bases and what is beyond its last band make
    the payment's base; what `not_earning_money` names makes the amount less the base;
    an ineligible payment names one condition and nothing else."""
    rng = random.Random(7)
    coupon = GrantProgramFacts("coupon", 0, 2 ** 62, False, GrantRestrictions(), (("national", 10_000),), "national")
    for _ in range(3_000):
        day = dt.date(rng.choice((2019, 2020, 2022, 2023, 2024, 2025)), rng.randrange(1, 13), rng.randrange(1, 28))
        policy = TIMELINE.in_force(local_midnight_us(day) + 1)
        if policy is None:
            continue
        merchant = _merchant(rng.choice(("seo", "namdong", "ganghwa", "bupyeong")),
                             rng.choice((100_000_000, 1_000_000_000, 5_000_000_000)),
                             rng.choice(("restaurant", "car_dealer", "pharmacy")),
                             rng.choice(((), ("winwin",), ("good_price",))), rng.choice((0, 300)))
        amount = rng.choice((5_000, 28_000, 120_000, 400_000))
        wallet = Wallet(rng.choice((0, amount, 2 * amount)), rng.choice((0, 3_000, amount)),
                        rng.choice(((), (GrantLot(coupon, 10_000),))))
        month = MonthSoFar(eligible_spend_won=rng.choice((0, 250_000, 480_000, 990_000, 2_000_000)))
        d = evaluate_payment(_event(amount, merchant, day, rng.choice(("seo", "namdong"))), policy, month, wallet,
                             BudgetView())
        why = [dict(w) for w in d.why]
        if not d.approved:
            assert why == []
            continue
        if not d.counts_toward_month:
            assert len(why) == 1 and why[0]["code"] == "not_eligible" and d.base_won == 0, why
            conditions = policy.eligibility
            assert getattr(conditions, _COMPILED[why[0]["condition"]]) is not None
            continue
        outside = sum(w["amount"] for w in why if w["code"] == "not_earning_money")
        assert outside == amount - d.base_won, (why, d)
        beyond = {w["component"]: w["base"] for w in why if w["code"] == "beyond_last_band"}
        in_lines: dict[str, int] = {}
        for line in d.lines:
            in_lines[line.component_id] = in_lines.get(line.component_id, 0) + line.base_won
        for component, won in beyond.items():
            assert 0 < won <= d.base_won
            # a zero-rate band writes no line, so the lines may name less than the rest
            assert in_lines.get(component, 0) + won <= d.base_won
        for component, won in in_lines.items():
            if all(line.rate_bp for line in d.lines if line.component_id == component):
                assert won + beyond.get(component, 0) == d.base_won, (component, d, why)


# the document's field under `cashback_eligibility` -> the compiled condition's attribute
_COMPILED = {"merchant_sales_min_won": "sales_min_won", "merchant_sales_max_won": "sales_max_won",
             "categories_include": "categories_include", "categories_exclude": "categories_exclude",
             "merchant_districts": "merchant_districts", "merchant_districts_exclude": "merchant_districts_exclude",
             "member_districts": "member_districts", "same_district": "same_district",
             "merchant_flags_all": "flags_all", "merchant_flags_none": "flags_none", "date_from": "date_from",
             "date_until": "date_until", "weekdays": "weekdays"}


@pytest.mark.parametrize("field, value, merchant, member_district, day", [
    ("merchant_sales_min_won", 300_000_000, _merchant(sales=100_000_000), "namdong", NOV),
    ("merchant_sales_max_won", 3_000_000_000, _merchant(sales=3_000_000_001), "namdong", NOV),
    ("categories_include", ["pharmacy"], _merchant(), "namdong", NOV),
    ("categories_exclude", ["restaurant"], _merchant(), "namdong", NOV),
    ("merchant_districts", ["seo"], _merchant(), "namdong", NOV),
    ("merchant_districts_exclude", ["namdong"], _merchant(), "namdong", NOV),
    ("member_districts", ["seo"], _merchant(), "namdong", NOV),
    ("same_district", True, _merchant("seo"), "namdong", NOV),
    ("merchant_flags_all", ["good_price"], _merchant(), "namdong", NOV),
    ("merchant_flags_none", ["good_price"], _merchant(flags=("good_price",)), "namdong", NOV),
    ("date_from", dt.date(2025, 12, 1), _merchant(), "namdong", NOV),
    ("date_until", dt.date(2025, 11, 1), _merchant(), "namdong", NOV),
    ("weekdays", ["sat", "sun"], _merchant(), "namdong", NOV),  # 2025-11-10 is a Monday
])
def test_the_first_condition_that_fails_is_the_one_named(field, value, merchant, member_district, day):
    """`CompiledConditions.first_failing` names the document's field, and holds exactly
    when `holds` does not (checked for each condition alone and for the condition beside
    one that holds)."""
    assert set(_COMPILED) == set(Conditions.model_fields)
    member = MemberFacts("m-1", member_district, "active")
    weekday = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")[day.weekday()]
    failing = CompiledConditions.of(Conditions(**{field: value}))
    assert not failing.holds(merchant, member, day, weekday)
    assert failing.first_failing(merchant, member, day, weekday) == field
    holding = CompiledConditions.of(Conditions(merchant_sales_max_won=10 ** 12))
    assert holding.holds(merchant, member, day, weekday) and holding.first_failing(merchant, member, day,
                                                                                     weekday) is None
