"""A refund's clawback the member does not hold is what they owe (`receivable/{member}`),
and a later refund of any of their payments settles it first from what it restores
(docs/design.md, "Refunds"). Before, the shortfall stayed with the member
(`not_recovered`): the funders, their budgets and the month's cashback kept it, and only
a later refund of the same payment could take it (the money audit of 2026-12-06i)."""

from __future__ import annotations

import datetime as dt

import orjson
import pytest

from ledger import schema as s
from ledger.book import RefundPlan
from ledger.commands import Refund
from ledger.queries import check_book
from rules.timeutil import to_us
from tests.book_helpers import (account_balance, assert_book_ok, month_of_member, pay, put_member, put_merchant,
                                refund, snapshot, topup, txn_legs)
from tests.conftest import at
from tests.test_worked_examples import create_program, disburse


# Settle what a test just wrote (the default lag leaves the last 2 s to the next run).
pytestmark = pytest.mark.usefixtures("no_watermark_lag")


@pytest.fixture
def book(api):
    yield api
    assert_book_ok(api)


def _earning_grant_spent(api, member_id: str, charged: int = 0) -> dict:
    """A program that earns cashback on its spending and ends on 2025-09-20: its 100,000
    pays a shop on the 10th (10,000 points), before which `charged` was topped up. What
    the budgets hold just before that payment."""
    put_member(api, member_id)
    put_merchant(api, "shop")
    put_merchant(api, "big", sales=9_000_000_000)  # above 30억: earns nothing
    create_program(api, "prog-ends", "2025-09-20", {}, {"city": 10000}, cashback_on_spend=True)
    disburse(api, "prog-ends", f"d-{member_id}", member_id, 100_000)
    if charged:
        topup(api, f"t-{member_id}", member_id, charged, at("2025-09-10"))
    before = snapshot(api)["budgets"]
    paid = pay(api, "p-grant", member_id, "shop", 100_000, at("2025-09-10"))
    assert paid["spent"] == {"grants": 100_000, "points": 0, "charged": 0}, paid
    assert paid["cashback"]["amount"] == 10_000
    return before


def _history(api, member_id: str, kind: str, ref: str) -> dict:
    items = api.get(f"/v1/members/{member_id}/transactions").json()["items"]
    return next(i["balance_changes"] for i in items if (i["kind"], i["ref"]) == (kind, ref))


def test_a_refunds_shortfall_is_owed_and_a_later_refund_of_another_payment_settles_it(book):
    """The audit's case: the grant payment earned 10,000 points, spent where nothing is
    earned; the program ended, the grant payment is refunded whole (its money to the
    program's funders, nothing to withhold from), then the points payment. The funders,
    budgets and month get the whole 10,000 back at the first refund, the member owes it,
    and the 10,000 points the second restores settle it: the member ends with nothing."""
    api = book
    before = _earning_grant_spent(api, "m-o")
    assert pay(api, "p-pts", "m-o", "big", 10_000, at("2025-09-10"))["spent"]["points"] == 10_000
    first = refund(api, "p-grant", "r-grant", 100_000, at("2025-09-25"))
    assert first["returned_to_funders"] == 100_000 and first["restored"] == {"grants": 0, "points": 0, "charged": 0}
    assert first["cashback_clawback"] == 10_000
    assert first["clawback_detail"] == {"from_points": 0, "withheld_from_charged": 0, "withheld_from_grants": 0,
                                        "not_recovered": 0, "owed": 10_000}
    assert first["owed_settled"] == 0
    assert txn_legs(api, "clawback", "r-grant") == {"funder/national/2025-09": -4_000,
                                                    "funder/city/2025-09": -6_000, "receivable/m-o": 10_000}
    month = month_of_member(api, "m-o", "2025-09")
    assert (month["owed"], month["month"]["cashback_earned"]) == (10_000, 0)
    assert snapshot(api)["budgets"] == before  # the funders have it all back
    assert _history(api, "m-o", "clawback", "r-grant") == {"charged": 0, "points": 0, "grants": 0, "owed": 10_000}
    read = api.get("/v1/payments/p-grant").json()
    assert read["refunded"]["clawback_detail"]["not_recovered"] == 0
    assert read["refunded"]["clawback_detail"]["owed"] == 10_000 and read["cashback_now"]["amount"] == 0

    second = refund(api, "p-pts", "r-pts", 10_000, at("2025-09-26"))
    assert second["restored"] == {"grants": 0, "points": 10_000, "charged": 0}
    assert second["cashback_clawback"] == 0 and second["owed_settled"] == 10_000
    assert second["clawback_detail"]["owed"] == 0
    assert second["balances"]["points"] == 0 and second["balances"]["charged"] == 0
    assert txn_legs(api, "clawback", "r-pts") == {"member/m-o/points": 10_000, "receivable/m-o": -10_000}
    assert _history(api, "m-o", "clawback", "r-pts") == {"charged": 0, "points": -10_000, "grants": 0,
                                                         "owed": -10_000}
    month = month_of_member(api, "m-o", "2025-09")
    assert (month["owed"], month["balances"]["points"], month["month"]["cashback_earned"]) == (0, 0, 0)
    assert snapshot(api)["budgets"] == before
    for account in ("funder/national/2025-09", "funder/city/2025-09", "receivable/m-o"):
        assert account_balance(api, account) == 0, account


@pytest.mark.usefixtures("no_watermark_lag")
def test_a_later_refund_settles_from_its_points_then_its_charged_money_never_more_than_owed(book):
    """Owing 10,000: a refund restoring 5,000 charged money settles 5,000 of it, one
    restoring 4,000 points 4,000, and one restoring 5,000 charged money and 6,000 points
    the 1,000 left, from the points; the member keeps the rest. Settlement's
    `receivable_net_won` is +10,000 the day the member came to owe, −10,000 the next."""
    api = book
    _earning_grant_spent(api, "m-s", charged=10_000)
    assert pay(api, "p-y", "m-s", "big", 4_000, at("2025-09-10"))["spent"]["points"] == 4_000
    assert pay(api, "p-x", "m-s", "big", 16_000, at("2025-09-10"))["spent"] == {"grants": 0, "points": 6_000,
                                                                                 "charged": 10_000}
    assert refund(api, "p-grant", "r-grant", 100_000, at("2025-09-25"))["clawback_detail"]["owed"] == 10_000

    charged_back = refund(api, "p-x", "r-x1", 5_000, at("2025-09-26"))
    assert charged_back["restored"] == {"grants": 0, "points": 0, "charged": 5_000}
    assert charged_back["owed_settled"] == 5_000 and charged_back["cashback_clawback"] == 0
    assert charged_back["balances"]["charged"] == 0
    assert txn_legs(api, "clawback", "r-x1") == {"member/m-s/charged": 5_000, "receivable/m-s": -5_000}
    points_back = refund(api, "p-y", "r-y", 4_000, at("2025-09-26"))
    assert points_back["owed_settled"] == 4_000 and points_back["balances"]["points"] == 0
    assert month_of_member(api, "m-s", "2025-09")["owed"] == 1_000
    rest = refund(api, "p-x", "r-x2", 11_000, at("2025-09-26"))
    assert rest["restored"] == {"grants": 0, "points": 6_000, "charged": 5_000}
    assert rest["owed_settled"] == 1_000  # never more than is owed
    assert (rest["balances"]["points"], rest["balances"]["charged"]) == (5_000, 5_000)
    assert txn_legs(api, "clawback", "r-x2") == {"member/m-s/points": 1_000, "receivable/m-s": -1_000}
    assert month_of_member(api, "m-s", "2025-09")["owed"] == 0
    assert api.get("/v1/payments/p-x").json()["refunded"]["owed_settled"] == 6_000

    owed_on = {}
    for day in ("2025-09-25", "2025-09-26"):
        body = api.post("/v1/settlements", {"business_date": day}, role="finance").json()
        assert body["status"] == "settled", [(c["name"], c["detail"]) for c in body["checks"] if not c["ok"]]
        owed_on[day] = body["totals"]["dates"][day]["receivable_net_won"]
    assert owed_on == {"2025-09-25": 10_000, "2025-09-26": -10_000}


def test_refunds_in_one_batch_keep_what_is_owed_current(api):
    """The shortfall of one refund and its settlement by the next in the same batch."""
    _earning_grant_spent(api, "m-b")
    assert pay(api, "p-pts", "m-b", "big", 10_000, at("2025-09-10"))["spent"]["points"] == 10_000
    outcomes = api.services.book.execute([
        Refund("r-grant", "p-grant", 100_000, to_us(dt.datetime.fromisoformat(at("2025-09-25"))), "h1"),
        Refund("r-pts", "p-pts", 10_000, to_us(dt.datetime.fromisoformat(at("2025-09-25"))), "h2")])
    assert [o.ok for o in outcomes] == [True, True], outcomes
    assert outcomes[0].body["clawback_detail"]["owed"] == 10_000
    assert outcomes[1].body["owed_settled"] == 10_000
    assert month_of_member(api, "m-b", "2025-09")["owed"] == 0
    assert account_balance(api, "member/m-b/points") == 0
    assert_book_ok(api)


def test_a_shortfall_an_earlier_release_left_on_the_payment_is_taken_whole_once(book, monkeypatch):
    """A refund recorded before this change that could not take its clawback left it on
    the payment (`clawed` below its target; the funders keep it). Here half of the grant
    payment is refunded so (its funders cut as the old rule cut a member holding nothing),
    then the rest now: the whole 10,000 comes back to the funders once, the member owing
    it, and the payment's read shows nothing outstanding."""
    api = book
    before = _earning_grant_spent(api, "m-old")
    assert pay(api, "p-pts", "m-old", "big", 10_000, at("2025-09-10"))["spent"]["points"] == 10_000
    limit = RefundPlan.limit_by_funders
    monkeypatch.setattr(RefundPlan, "limit_by_funders", lambda plan, held: limit(plan, {k: 0 for k in held}))
    old = refund(api, "p-grant", "r-old", 50_000, at("2025-09-25"))
    monkeypatch.undo()
    assert old["cashback_clawback"] == 0
    assert api.get("/v1/payments/p-grant").json()["refunded"]["clawback_detail"]["not_recovered"] == 5_000
    assert month_of_member(api, "m-old", "2025-09")["month"]["cashback_earned"] == 10_000
    rest = refund(api, "p-grant", "r-rest", 50_000, at("2025-09-26"))
    assert rest["cashback_clawback"] == 10_000 and rest["clawback_detail"]["owed"] == 10_000
    read = api.get("/v1/payments/p-grant").json()
    assert read["refunded"]["clawback_detail"]["not_recovered"] == 0
    assert read["refunded"]["cashback_clawback"] == 10_000
    month = month_of_member(api, "m-old", "2025-09")
    assert (month["owed"], month["month"]["cashback_earned"]) == (10_000, 0)
    assert snapshot(api)["budgets"] == before
    assert account_balance(api, "funder/city/2025-09") == account_balance(api, "funder/national/2025-09") == 0



def test_a_clawback_of_exactly_what_is_held_owes_nothing(book):
    """Holding exactly the clawback (10,000 charged money, the points spent), the member
    owes nothing (0, not negative) and is left with nothing."""
    api = book
    before = _earning_grant_spent(api, "m-x", charged=10_000)
    assert pay(api, "p-pts", "m-x", "big", 10_000, at("2025-09-10"))["spent"]["points"] == 10_000
    exact = refund(api, "p-grant", "r-grant", 100_000, at("2025-09-25"))
    assert exact["clawback_detail"] == {"from_points": 0, "withheld_from_charged": 10_000, "withheld_from_grants": 0,
                                        "not_recovered": 0, "owed": 0}
    assert exact["owed_settled"] == 0 and exact["balances"]["charged"] == 0
    assert month_of_member(api, "m-x", "2025-09")["owed"] == 0 and account_balance(api, "receivable/m-x") == 0
    assert snapshot(api)["budgets"] == before


def test_refunds_in_one_batch_the_points_back_first_owe_nothing(book):
    """The batch of `test_refunds_in_one_batch_keep_what_is_owed_current` the other way
    round: the points payment's refund restores 10,000 points, which the grant payment's
    clawback then takes; nothing is owed or settled."""
    api = book
    before = _earning_grant_spent(api, "m-r")
    assert pay(api, "p-pts", "m-r", "big", 10_000, at("2025-09-10"))["spent"]["points"] == 10_000
    day = to_us(dt.datetime.fromisoformat(at("2025-09-25")))
    points_back, grant_back = api.services.book.execute([Refund("r-pts", "p-pts", 10_000, day, "h2"),
                                                         Refund("r-grant", "p-grant", 100_000, day, "h1")])
    assert points_back.ok and grant_back.ok, (points_back, grant_back)
    assert points_back.body["owed_settled"] == 0 and points_back.body["balances"]["points"] == 10_000
    assert grant_back.body["clawback_detail"]["from_points"] == 10_000
    assert grant_back.body["clawback_detail"]["owed"] == 0 and grant_back.body["owed_settled"] == 0
    assert month_of_member(api, "m-r", "2025-09")["owed"] == 0 and account_balance(api, "member/m-r/points") == 0
    assert snapshot(api)["budgets"] == before


def _withdraw(api, withdrawal_id: str, member_id: str, day: str) -> dict:
    r = api.post(f"/v1/members/{member_id}/withdrawals", {"withdrawal_id": withdrawal_id, "occurred_at": at(day)})
    assert r.status_code == 201, r.text
    return r.json()


def _owing_10_000_with_20_000_left(api, member_id: str) -> None:
    """The audit's case up to the grant payment's refund (10,000 owed), then a top-up of
    100,000 of which 80% is used where nothing is earned: 20,000 left to withdraw."""
    _earning_grant_spent(api, member_id)
    assert pay(api, "p-pts", member_id, "big", 10_000, at("2025-09-10"))["spent"]["points"] == 10_000
    assert refund(api, "p-grant", "r-grant", 100_000, at("2025-09-25"))["clawback_detail"]["owed"] == 10_000
    topup(api, f"t-{member_id}", member_id, 100_000, at("2025-09-26"))
    pay(api, "p-use", member_id, "big", 80_000, at("2025-09-26"))


def test_a_withdrawal_settles_what_is_owed_before_it_pays_out(book):
    """A member who owes 10,000 (the audit's case, before the points payment is refunded)
    and then tops up and uses 80% withdraws the 20,000 left: 10,000 settles what they owe
    and 10,000 is paid out (before, all 20,000 was paid out and the 10,000 stayed owed on
    a card that could be abandoned). A second member owes more than is left: all of it
    settles, nothing is paid out, the rest stays owed. The operator's cash and the day's
    settlement show what was paid out; the book check holds the record to its legs."""
    api = book
    _owing_10_000_with_20_000_left(api, "m-w")
    cash_before = account_balance(api, "operator/cash")
    got = _withdraw(api, "w-1", "m-w", "2025-09-27")
    assert (got["status"], got["amount"], got["owed_settled"], got["paid_out"]) == ("approved", 20_000, 10_000,
                                                                                   10_000), got
    assert got["balances"]["charged"] == 0
    assert month_of_member(api, "m-w", "2025-09")["owed"] == 0
    assert txn_legs(api, "withdrawal", "w-1") == {"member/m-w/charged": 20_000, "operator/cash": -10_000,
                                                  "receivable/m-w": -10_000}
    assert account_balance(api, "operator/cash") == cash_before - 10_000
    assert _history(api, "m-w", "withdrawal", "w-1") == {"charged": -20_000, "points": 0, "grants": 0,
                                                         "owed": -10_000}
    again = api.post("/v1/members/m-w/withdrawals", {"withdrawal_id": "w-1", "occurred_at": at("2025-09-27")})
    assert again.status_code == 200 and again.json() == got  # replayed, nothing settled twice
    assert month_of_member(api, "m-w", "2025-09")["owed"] == 0

    # Owing more than is left: all of it settles, nothing is paid out.
    put_member(api, "m-v")
    create_program(api, "prog-v", "2025-09-20", {}, {"city": 10000}, cashback_on_spend=True)
    disburse(api, "prog-v", "d-v", "m-v", 100_000)
    pay(api, "p-v", "m-v", "shop", 100_000, at("2025-09-10"))
    pay(api, "p-vpts", "m-v", "big", 10_000, at("2025-09-10"))
    assert refund(api, "p-v", "r-v", 100_000, at("2025-09-25"))["clawback_detail"]["owed"] == 10_000
    topup(api, "t-v", "m-v", 20_000, at("2025-09-26"))
    pay(api, "p-vuse", "m-v", "big", 16_000, at("2025-09-26"))
    short = _withdraw(api, "w-2", "m-v", "2025-09-27")
    assert (short["amount"], short["owed_settled"], short["paid_out"]) == (4_000, 4_000, 0), short
    assert month_of_member(api, "m-v", "2025-09")["owed"] == 6_000
    assert txn_legs(api, "withdrawal", "w-2") == {"member/m-v/charged": 4_000, "receivable/m-v": -4_000}

    for day in ("2025-09-25", "2025-09-26", "2025-09-27"):  # settled in order, as finance runs them
        body = api.post("/v1/settlements", {"business_date": day}, role="finance").json()
        assert body["status"] == "settled", [(c["name"], c["detail"]) for c in body["checks"] if not c["ok"]]
    day = body["totals"]["dates"]["2025-09-27"]
    assert day["receivable_net_won"] == -14_000
    assert day["operator_cash"]["withdrawn_won"] == 10_000, day["operator_cash"]


@pytest.mark.parametrize("field,value", [("owed_settled", 0), ("paid_out", 20_000), ("amount", 10_000)])
def test_the_book_check_holds_a_withdrawals_answer_to_its_legs(book, field, value):
    """The stored answer of a withdrawal that settled 10,000 of the 20,000 it took says
    what the operator transfers (`paid_out`), and a replay sends it again: the book check
    holds its `owed_settled`, `paid_out` and `amount` to the row and the legs (before,
    only `owed_settled` was read: an answer telling the card app 20,000 was paid out, or
    that 10,000 was withdrawn, while the book paid out 10,000 of 20,000, passed)."""
    api = book
    _owing_10_000_with_20_000_left(api, "m-t")
    got = _withdraw(api, "w-t", "m-t", "2025-09-27")
    assert (got["amount"], got["owed_settled"], got["paid_out"]) == (20_000, 10_000, 10_000), got
    with api.services.reader.connect() as conn:
        assert all(check.ok for check in check_book(conn))
    with api.services.engine.begin() as conn:
        conn.execute(s.withdrawals.update().where(s.withdrawals.c.withdrawal_id == "w-t")
                     .values(response=orjson.dumps({**got, field: value}).decode()))
    with api.services.reader.connect() as conn:
        found = {check.name: check for check in check_book(conn)}
    check = found["withdrawals equal their ledger transactions"]
    assert not check.ok and "w-t" in check.detail, check
    with api.services.engine.begin() as conn:  # as it was, for the fixture's own check
        conn.execute(s.withdrawals.update().where(s.withdrawals.c.withdrawal_id == "w-t")
                     .values(response=orjson.dumps(got).decode()))


def test_the_document_says_withdrawals_settle_what_is_owed(api):
    """/openapi.json's balance `owed` and a history entry's `owed` name withdrawals among
    what settles it (they said corrections and refunds only)."""
    schemas = api.client.get("/openapi.json").json()["components"]["schemas"]
    assert "withdrawals settled" in schemas["BalanceOut"]["properties"]["owed"]["description"]
    assert "withdrawal" in schemas["BalanceChanges"]["properties"]["owed"]["description"]


def _withdrawal(withdrawal_id: str, member_id: str, day: str):
    from ledger.commands import Withdraw, request_hash
    when = to_us(dt.datetime.fromisoformat(at(day)))
    return Withdraw(withdrawal_id, member_id, None, when, request_hash("withdrawal", {
        "withdrawal_id": withdrawal_id, "member_id": member_id, "amount": None, "occurred_at_us": when}))


@pytest.mark.parametrize("refund_first", [True, False])
def test_a_withdrawal_in_a_batch_settles_what_a_refund_before_it_left_owed(book, refund_first):
    """In one batch: the refund that leaves 10,000 owed, a top-up, a payment, then the
    withdrawal settles it from the 20,000 it takes; the other way round the withdrawal
    pays out all 20,000 (nothing owed yet) and the refund, finding nothing, leaves it owed."""
    from ledger.commands import Pay, TopUp
    api = book
    _earning_grant_spent(api, "m-q")
    assert pay(api, "p-pts", "m-q", "big", 10_000, at("2025-09-10"))["spent"]["points"] == 10_000
    day = to_us(dt.datetime.fromisoformat(at("2025-09-26")))
    money = [TopUp("t-q", "m-q", 100_000, day, "h2"), Pay("p-use", "m-q", "big", 80_000, day, "h3")]
    claw = Refund("r-grant", "p-grant", 100_000, day, "h1")
    commands = ([claw, *money, _withdrawal("w-q", "m-q", "2025-09-27")] if refund_first else
                [*money, _withdrawal("w-q", "m-q", "2025-09-27"), claw])
    outcomes = api.services.book.execute(commands)
    assert all(o.ok for o in outcomes), outcomes
    (out,) = [o.body for o in outcomes if "withdrawal_id" in o.body]
    assert (out["amount"], out["owed_settled"], out["paid_out"]) == ((20_000, 10_000, 10_000) if refund_first else
                                                                    (20_000, 0, 20_000)), out
    assert month_of_member(api, "m-q", "2025-09")["owed"] == (0 if refund_first else 10_000)
    assert account_balance(api, "operator/cash") == 100_000 - out["paid_out"]
