"""Withdrawal of unspent charged money (잔액 환불, DOMAIN.md "Limits on the member's own
money"): a member may take back the charged money left once a share of the charged money
put in since the last withdrawal has been used, the share set by the policy in force
(`withdrawal`, by default 60%, 80% for 1만 or less; docs/design.md, "Withdrawals")."""

from __future__ import annotations

import datetime as dt

import pytest
from sqlalchemy import select

from ledger import schema as s
from ledger.book import Book
from ledger.commands import Pay, TopUp, Withdraw, request_hash
from ledger.errors import EumError
from ledger.queries import check_book
from rules.compiled import PolicyTimeline, compile_policy
from rules.loader import PolicyInvalid, load_policy_file, parse_policy_text
from rules.timeutil import to_us
from tests.book_helpers import (account_balance, approve_program, assert_book_ok, assert_problem, migrate_down_and_up,
                                pay, put_member, put_merchant, refund, snapshot, topup, txn_count, txn_legs)
from tests.conftest import POLICIES, at, make_api
from tests.test_idempotency import fire

CURRENT = (POLICIES / "2025-10-cap-50man.yaml").read_text(encoding="utf-8")
RULE = "withdrawal:\n  used_min_bp: 6000\n  small_up_to_won: 10000\n  small_used_min_bp: 8000\n"


# ---------------------------------------------------------------- the policy's rule


def test_a_policy_that_says_nothing_takes_the_documented_default():
    assert RULE in CURRENT
    silent = compile_policy(load_policy_file(POLICIES / "2019-01-flat-6.yaml"))
    written = compile_policy(parse_policy_text(CURRENT, "t"))
    for policy in (silent, written):
        assert (policy.withdrawal_used_min_bp, policy.withdrawal_small_up_to_won,
                policy.withdrawal_small_used_min_bp) == (6_000, 10_000, 8_000)
        # 1만 or less put in: 80%; more: 60%
        assert policy.withdrawal_used_min_bp_for(10_000) == 8_000
        assert policy.withdrawal_used_min_bp_for(1) == 8_000
        assert policy.withdrawal_used_min_bp_for(10_001) == 6_000
        # nothing put in is no small amount: the share asked of more
        assert policy.withdrawal_used_min_bp_for(0) == 6_000
    # the file spells out the default, so it is the same document as one that is silent
    assert parse_policy_text(CURRENT.replace(RULE, ""), "t") == parse_policy_text(CURRENT, "t")


def test_a_policy_may_set_its_own_share():
    text = CURRENT.replace(RULE, "withdrawal:\n  used_min_bp: 7000\n  small_up_to_won: 0\n")
    policy = compile_policy(parse_policy_text(text, "t"))
    assert policy.withdrawal_used_min_bp_for(5_000) == 7_000  # nothing is small
    assert policy.withdrawal_used_min_bp_for(0) == 7_000  # not even nothing put in
    assert policy.withdrawal_small_used_min_bp == 8_000  # left out: the default


@pytest.mark.parametrize("setting,why", [
    ("used_min_bp: 10001", "less than or equal to 10000"),
    ("used_min_bp: -1", "greater than or equal to 0"),
    ("used_min_bp: 0.6", "valid integer"),
    ("used_min_bp: '6000'", "valid integer"),
    ("small_used_min_bp: 80%", "valid integer"),
    ("small_up_to_won: -10000", "greater than or equal to 0"),
    ("used_share: 60", "Extra inputs are not permitted"),
])
def test_a_bad_withdrawal_setting_is_refused_with_its_line(setting, why):
    text = CURRENT.replace(RULE, f"withdrawal:\n  {setting}\n")
    with pytest.raises(PolicyInvalid) as caught:
        parse_policy_text(text, "t")
    (problem,) = caught.value.problems
    assert problem.path.startswith("withdrawal.") and why in problem.reason, problem
    assert text.splitlines()[problem.line - 1].strip() == setting


def test_only_the_city_layer_sets_it():
    seo = (POLICIES / "2019-05-seo-card.yaml").read_text(encoding="utf-8")
    with pytest.raises(PolicyInvalid) as caught:
        parse_policy_text(seo + "withdrawal:\n  used_min_bp: 7000\n", "t")
    assert [p.path for p in caught.value.problems] == ["withdrawal.used_min_bp"]
    assert "city" in caught.value.problems[0].reason
    # the default written out is no setting (every stored document spells it out)
    parse_policy_text(seo + RULE, "t")


def test_the_api_refuses_a_draft_with_a_bad_share_and_keeps_a_good_one(api):
    bad = CURRENT.replace("incheon-2025-10", "w-bad").replace("used_min_bp: 6000", "used_min_bp: 60000")
    r = api.client.post("/v1/policies", content=bad, headers={**api.h("policy-editor"),
                                                             "Content-Type": "application/yaml"})
    assert r.status_code == 422 and r.json()["code"] == "policy_invalid", r.text
    (problem,) = r.json()["problems"]
    assert problem["path"] == "withdrawal.used_min_bp" and "10000" in problem["reason"]
    assert api.get("/v1/policies/w-bad", role="auditor").status_code == 404
    good = CURRENT.replace("incheon-2025-10", "w-good").replace("used_min_bp: 6000", "used_min_bp: 7500")
    r = api.client.post("/v1/policies", content=good, headers={**api.h("policy-editor"),
                                                              "Content-Type": "application/yaml"})
    assert r.status_code == 201, r.text
    stored = api.get("/v1/policies/w-good", role="auditor").json()
    assert stored["document"]["withdrawal"] == {"used_min_bp": 7_500, "small_up_to_won": 10_000,
                                                "small_used_min_bp": 8_000}


def test_the_rule_alone_declines_in_its_order_and_approves_all_that_is_left():
    from rules.evaluate import evaluate_withdrawal

    policy = compile_policy(parse_policy_text(CURRENT, "t"))

    def judge(left, put_in, shown=None, status="active", with_policy=True):
        d = evaluate_withdrawal(left, put_in, shown, policy if with_policy else None, status)
        return d.approved, d.decline_code, d.amount_won, d.used_bp, d.used_min_bp

    assert judge(40_000, 100_000) == (True, None, 40_000, 6_000, 6_000)
    assert judge(40_001, 100_000) == (False, "withdrawal_below_used_share", 0, 5_999, 6_000)
    assert judge(40_000, 100_000, shown=40_000) == (True, None, 40_000, 6_000, 6_000)
    assert judge(40_000, 100_000, shown=40_001) == (False, "withdrawal_amount_mismatch", 0, 6_000, 6_000)
    assert judge(2_000, 10_000) == (True, None, 2_000, 8_000, 8_000)
    assert judge(2_001, 10_000) == (False, "withdrawal_below_used_share", 0, 7_999, 8_000)
    assert judge(0, 0) == (False, "nothing_to_withdraw", 0, 0, 6_000)
    assert judge(0, 50_000) == (False, "nothing_to_withdraw", 0, 10_000, 6_000)
    # the order: no policy, a suspended card, nothing left, too little used, another amount
    assert judge(90_000, 100_000, shown=1, status="suspended", with_policy=False)[1] == "no_policy_in_force"
    assert judge(90_000, 100_000, shown=1, status="suspended")[1] == "member_suspended"
    assert judge(90_000, 100_000, shown=1)[1] == "withdrawal_below_used_share"
    # 30,001 put in: 60% is 18,000.6 won, so 18,001 used is enough and 18,000 is not
    assert judge(30_001 - 18_001, 30_001)[:2] == (True, None)
    assert judge(30_001 - 18_000, 30_001)[:2] == (False, "withdrawal_below_used_share")
    with pytest.raises(AssertionError):  # more left than was put in: the book is broken
        judge(10_001, 10_000)


# ---------------------------------------------------------------- the book


def setup(api, *members: str) -> None:
    put_merchant(api, "shop")  # 1억 of sales: 10% cashback as points
    put_merchant(api, "big", sales=5_000_000_000)  # above 30억: no cashback, so no points to spend first
    for member_id in members:
        put_member(api, member_id)


def us(day: str, time: str = "12:00:00") -> int:
    return to_us(dt.datetime.fromisoformat(at(day, time)))


def withdrawal(withdrawal_id: str, member_id: str = "m1", day: str = "2025-11-20", amount: int | None = None,
               time: str = "12:00:00") -> Withdraw:
    at_us = us(day, time)
    return Withdraw(withdrawal_id, member_id, amount, at_us, request_hash("withdrawal", {
        "withdrawal_id": withdrawal_id, "member_id": member_id, "amount": amount, "occurred_at_us": at_us}))


def withdraw_in_book(api, withdrawal_id: str, member_id: str = "m1", day: str = "2025-11-20",
                     amount: int | None = None, book: Book | None = None, time: str = "12:00:00") -> dict:
    """A withdrawal as the book records it (the command the API queues): its answer."""
    (outcome,) = (book or api.services.book).execute([withdrawal(withdrawal_id, member_id, day, amount, time)])
    if outcome.error is not None:
        raise outcome.error
    return outcome.body


def withdrawn_rows(api) -> dict[str, tuple]:
    w = s.withdrawals
    with api.services.reader.connect() as conn:
        return {row[0]: tuple(row[1:]) for row in conn.execute(
            select(w.c.withdrawal_id, w.c.status, w.c.decline_code, w.c.amount_won, w.c.charged_in_won))}


def charged(api, member_id: str = "m1") -> int:
    return account_balance(api, f"member/{member_id}/charged")


def test_the_share_is_reached_at_exactly_its_mark_and_not_a_won_below(api):
    setup(api, "m1", "m2", "m3")
    topup(api, "t1", "m1", 100_000, at("2025-10-25"))
    pay(api, "p1", "m1", "big", 59_999, at("2025-11-02"))
    below = withdraw_in_book(api, "w1")
    assert below["status"] == "declined" and below["decline_code"] == "withdrawal_below_used_share"
    assert (below["amount"], below["charged_in"], below["used"], below["used_share_bp"],
            below["used_share_min_bp"]) == (0, 100_000, 59_999, 5_999, 6_000)
    assert below["balances"]["charged"] == 40_001 and txn_count(api, "w1") == 0
    assert below["policy_id"] == "incheon-2025-10+winwin-2023"  # the stack in force, as a top-up's
    pay(api, "p2", "m1", "big", 1, at("2025-11-03"))
    mark = withdraw_in_book(api, "w2")
    assert mark["status"] == "approved" and "decline_code" not in mark
    assert (mark["amount"], mark["charged_in"], mark["used"], mark["used_share_bp"]) == (40_000, 100_000, 60_000,
                                                                                         6_000)
    assert mark["balances"] == {"charged": 0, "points": 0, "grants": []} and charged(api) == 0
    # right after it, nothing put in: not the 1만-or-less share of an empty window
    empty = withdraw_in_book(api, "w2-again")
    assert (empty["decline_code"], empty["charged_in"], empty["used_share_bp"], empty["used_share_min_bp"]) == (
        "nothing_to_withdraw", 0, 0, 6_000)
    assert txn_legs(api, "withdrawal", "w2") == {"member/m1/charged": 40_000, "operator/cash": -40_000}
    # 1만 or less put in: 80%
    topup(api, "t2", "m2", 10_000, at("2025-11-01"))
    pay(api, "p3", "m2", "big", 7_999, at("2025-11-02"))
    small = withdraw_in_book(api, "w3", "m2")
    assert (small["decline_code"], small["used_share_bp"], small["used_share_min_bp"]) == (
        "withdrawal_below_used_share", 7_999, 8_000)
    pay(api, "p4", "m2", "big", 1, at("2025-11-03"))
    assert withdraw_in_book(api, "w4", "m2")["amount"] == 2_000
    # more than 1만: 60%
    topup(api, "t3", "m3", 10_000, at("2025-11-01"))
    topup(api, "t4", "m3", 10_000, at("2025-11-01"))
    pay(api, "p5", "m3", "big", 12_000, at("2025-11-02"))
    assert withdraw_in_book(api, "w5", "m3")["amount"] == 8_000
    assert withdrawn_rows(api) == {"w1": ("declined", "withdrawal_below_used_share", 0, 100_000),
                                   "w2": ("approved", None, 40_000, 100_000),
                                   "w2-again": ("declined", "nothing_to_withdraw", 0, 0),
                                   "w3": ("declined", "withdrawal_below_used_share", 0, 10_000),
                                   "w4": ("approved", None, 2_000, 10_000),
                                   "w5": ("approved", None, 8_000, 20_000)}
    # the operator's cash holds what was topped up less what went back
    assert account_balance(api, "operator/cash") == 130_000 - 50_000
    history = api.get("/v1/members/m1/transactions").json()["items"]
    assert history[0]["kind"] == "withdrawal" and history[0]["ref"] == "w2"
    assert history[0]["balance_changes"] == {"charged": -40_000, "points": 0, "grants": 0, "owed": 0}
    assert_book_ok(api)


def test_nothing_left_a_suspended_card_and_another_amount_are_declines_on_the_record(api):
    setup(api, "m1", "m2", "m3")
    assert withdraw_in_book(api, "w-none", "m2")["decline_code"] == "nothing_to_withdraw"  # never topped up
    topup(api, "t1", "m3", 50_000, at("2025-11-01"))
    pay(api, "p1", "m3", "big", 50_000, at("2025-11-02"))
    spent = withdraw_in_book(api, "w-spent", "m3")
    assert (spent["decline_code"], spent["used_share_bp"]) == ("nothing_to_withdraw", 10_000)
    topup(api, "t2", "m1", 100_000, at("2025-11-01"))
    pay(api, "p2", "m1", "big", 70_000, at("2025-11-02"))
    put_member(api, "m1", status="suspended")
    assert withdraw_in_book(api, "w1")["decline_code"] == "member_suspended"
    put_member(api, "m1", status="active")
    # the decline stands for its id, whatever changed since
    (again,) = api.services.book.execute([withdrawal("w1")])
    assert again.replayed and again.body["decline_code"] == "member_suspended"
    # the amount the member was shown must be what is left
    shown = withdraw_in_book(api, "w2", amount=29_999)
    assert (shown["status"], shown["decline_code"], shown["amount"], shown["amount_requested"]) == (
        "declined", "withdrawal_amount_mismatch", 0, 29_999)
    confirmed = withdraw_in_book(api, "w3", amount=30_000)
    assert (confirmed["status"], confirmed["amount"], confirmed["amount_requested"]) == ("approved", 30_000, 30_000)
    # the same id with another request is a conflict, and changes nothing
    (conflict,) = api.services.book.execute([withdrawal("w3", amount=29_000)])
    assert conflict.error is not None and conflict.error.code == "idempotency_conflict"
    assert txn_count(api) == 5 and charged(api) == 0  # 2 top-ups, 2 payments, 1 withdrawal
    with pytest.raises(EumError) as unknown:
        withdraw_in_book(api, "w4", "nobody")
    assert unknown.value.code == "member_not_found" and "w4" not in withdrawn_rows(api)
    assert_book_ok(api)


def test_refunds_before_and_after_a_withdrawal(api):
    """Refunds of payments made since the last withdrawal give back money that was used;
    refunds of payments made before it put money in."""
    setup(api, "m1")
    topup(api, "t1", "m1", 100_000, at("2025-10-20"))
    pay(api, "p1", "m1", "big", 80_000, at("2025-10-21"))
    refund(api, "p1", "r1", 30_000, at("2025-10-22"))
    # put in 100,000, left 50,000: half used (counting the refund as money put in would
    # make it 80,000 of 130,000, past the share)
    early = withdraw_in_book(api, "w1", day="2025-11-01")
    assert (early["decline_code"], early["charged_in"], early["used"]) == ("withdrawal_below_used_share", 100_000,
                                                                          50_000)
    pay(api, "p2", "m1", "big", 10_000, at("2025-11-02"))  # months apart: one window
    assert withdraw_in_book(api, "w2", day="2025-12-01")["amount"] == 40_000
    # the rest of p1 comes back after the withdrawal: money put in, none of it used yet
    refund(api, "p1", "r2", 50_000, at("2025-12-02"))
    after = withdraw_in_book(api, "w3", day="2025-12-03")
    assert (after["decline_code"], after["charged_in"], after["used"]) == ("withdrawal_below_used_share", 50_000, 0)
    pay(api, "p3", "m1", "big", 30_000, at("2025-12-04"))
    assert withdraw_in_book(api, "w4", day="2025-12-05")["amount"] == 20_000
    # paying and refunding over and over uses nothing
    topup(api, "t2", "m1", 100_000, at("2025-12-06"))
    for n in range(3):
        pay(api, f"p-loop-{n}", "m1", "big", 100_000, at("2025-12-07"))
        refund(api, f"p-loop-{n}", f"r-loop-{n}", 100_000, at("2025-12-07"))
    looped = withdraw_in_book(api, "w5", day="2025-12-08")
    assert (looped["decline_code"], looped["charged_in"], looped["used_share_bp"]) == (
        "withdrawal_below_used_share", 100_000, 0)
    assert charged(api) == 100_000 and account_balance(api, "operator/cash") == 200_000 - 60_000
    assert_book_ok(api)


def test_points_and_grant_money_are_never_withdrawn_nor_count_as_used(api):
    setup(api, "m1")
    r = api.post("/v1/grant-programs", {"program_id": "g1", "name": "g", "valid_from": "2025-10-01",
                                        "valid_until": "2025-12-31", "funding": {"national": 10000}},
                 role="policy-editor")
    assert r.status_code == 201, r.text
    approve_program(api, "g1")
    r = api.post("/v1/grant-programs/g1/disbursements", {"disbursement_id": "d1", "member_id": "m1",
                                                         "amount": 50_000, "occurred_at": at("2025-11-01")},
                 role="policy-editor")
    assert r.status_code == 201, r.text
    topup(api, "t1", "m1", 100_000, at("2025-11-01"))
    pay(api, "p1", "m1", "big", 100_000, at("2025-11-02"))  # 50,000 of grant money first
    half = withdraw_in_book(api, "w1")
    assert (half["decline_code"], half["used"]) == ("withdrawal_below_used_share", 50_000)
    paid = pay(api, "p2", "m1", "shop", 10_000, at("2025-11-03"))  # charged money: 1,000 of points back
    assert paid["spent"]["charged"] == 10_000 and paid["cashback"]["amount"] == 1_000
    done = withdraw_in_book(api, "w2")
    assert done["amount"] == 40_000
    assert done["balances"] == {"charged": 0, "points": 1_000, "grants": []}
    assert_book_ok(api)


def test_withdrawals_in_one_batch_see_what_came_before_them(api):
    """A batch's own top-ups, payments and withdrawals count, in order."""
    setup(api, "m1")
    topup(api, "t0", "m1", 100_000, at("2025-10-20"))

    def top(topup_id: str, amount: int) -> TopUp:
        return TopUp(topup_id, "m1", amount, us("2025-11-10"), request_hash("topup", {"topup_id": topup_id}))

    def spend(payment_id: str, amount: int) -> Pay:
        return Pay(payment_id, "m1", "big", amount, us("2025-11-10"), request_hash("payment", {"p": payment_id}))

    outcomes = api.services.book.execute([spend("p1", 50_000), withdrawal("w1"), spend("p2", 10_000),
                                          withdrawal("w2"), top("t1", 50_000), withdrawal("w3"),
                                          spend("p3", 30_000), withdrawal("w4"), withdrawal("w2")])
    bodies = [o.body for o in outcomes]
    assert [b["status"] for b in bodies] == ["approved", "declined", "approved", "approved", "approved",
                                             "declined", "approved", "approved", "approved"]
    assert bodies[1]["used_share_bp"] == 5_000 and bodies[3]["amount"] == 40_000
    assert (bodies[5]["charged_in"], bodies[5]["used"]) == (50_000, 0)  # put in after w2
    assert (bodies[7]["charged_in"], bodies[7]["amount"]) == (50_000, 20_000)
    assert outcomes[8].replayed and bodies[8] == bodies[3]  # w2 again in the batch: its answer
    assert charged(api) == 0 and account_balance(api, "operator/cash") == 150_000 - 60_000
    assert_book_ok(api)


def test_the_share_is_the_policy_in_force_at_the_withdrawals_time(api):
    setup(api, "m1")
    stricter = parse_policy_text(CURRENT.replace("incheon-2025-10", "w-70").replace(
        "2025-10-01T00:00:00+09:00", "2025-11-15T00:00:00+09:00").replace("used_min_bp: 6000", "used_min_bp: 7000"),
        "t")
    book = Book(api.services.engine, PolicyTimeline([*api.services.book.timeline, compile_policy(stricter)]),
                api.services.programs)
    topup(api, "t1", "m1", 100_000, at("2025-11-01"))
    pay(api, "p1", "m1", "big", 65_000, at("2025-11-02"))
    late = withdraw_in_book(api, "w1", day="2025-11-16", book=book)
    assert (late["policy_id"], late["used_share_min_bp"], late["decline_code"]) == (
        "w-70+winwin-2023", 7_000, "withdrawal_below_used_share")
    early = withdraw_in_book(api, "w2", day="2025-11-14", book=book)  # a withdrawal dated before it
    assert (early["policy_id"], early["status"], early["amount"]) == ("incheon-2025-10+winwin-2023", "approved",
                                                                      35_000)
    assert_book_ok(api)


def test_a_withdrawal_may_not_be_dated_before_what_it_withdraws_nor_before_the_last_one(api):
    """Refused where the book decides, against the member as the batch reads it: the
    top-ups, payments and refunds since the last withdrawal, that withdrawal, and the
    batch's own commands before it. Dated before them, it would pay out money not yet
    put in (on a business date already settled), judged by the policy of then."""
    setup(api, "m1", "m2")
    topup(api, "t1", "m1", 100_000, at("2025-11-03", "09:00:00"))
    pay(api, "p1", "m1", "big", 60_000, at("2025-11-03", "10:00:00"))
    before = unchanged(api)

    def refused(command: Withdraw, what: str, earliest: str) -> None:
        (outcome,) = api.services.book.execute([command])
        assert outcome.error is not None and outcome.error.code == "withdrawal_before_activity", outcome
        assert outcome.error.status == 409 and outcome.error.extra == {"earliest": earliest}
        assert what in outcome.error.detail and earliest in outcome.error.detail, outcome.error.detail

    for day, time in (("2025-11-01", "09:00:00"), ("2019-06-01", "12:00:00"), ("2025-11-03", "09:59:59")):
        refused(withdrawal("w1", day=day, time=time), "payment 'p1'", "2025-11-03T10:00:00+09:00")
    assert unchanged(api) == before  # nothing recorded, the id is free
    done = withdraw_in_book(api, "w1", day="2025-11-03", time="10:00:00")  # the payment's instant is not before it
    assert (done["status"], done["amount"]) == ("approved", 40_000)
    # with nothing since, the last withdrawal is the mark
    refused(withdrawal("w2", day="2025-11-03", time="09:30:00"), "previous withdrawal 'w1'",
            "2025-11-03T10:00:00+09:00")
    # the approved withdrawal's resend is its answer, whatever was recorded since
    topup(api, "t2", "m1", 50_000, at("2025-11-05"))
    refund(api, "p1", "r1", 10_000, at("2025-11-06"))  # of a payment before w1: money put in
    (again,) = api.services.book.execute([withdrawal("w1", day="2025-11-03", time="10:00:00")])
    assert again.replayed and again.body == done
    refused(withdrawal("w3", day="2025-11-06", time="11:00:00"), "refund 'r1'", "2025-11-06T12:00:00+09:00")
    # in one batch: its own top-up before it, and its own withdrawal before it
    m2 = [TopUp("t3", "m2", 100_000, us("2025-11-10"), request_hash("topup", {"topup_id": "t3"})),
          withdrawal("w4", "m2", "2025-11-09"),
          Pay("p2", "m2", "big", 60_000, us("2025-11-10"), request_hash("payment", {"payment_id": "p2"})),
          withdrawal("w5", "m2", "2025-11-11"), withdrawal("w6", "m2", "2025-11-10")]
    outcomes = api.services.book.execute(m2)
    assert [o.error.code if o.error else o.body["status"] for o in outcomes] == [
        "approved", "withdrawal_before_activity", "approved", "approved", "withdrawal_before_activity"]
    assert "top-up 't3'" in outcomes[1].error.detail and "previous withdrawal 'w5'" in outcomes[4].error.detail
    assert outcomes[3].body["amount"] == 40_000 and charged(api, "m2") == 0
    assert set(withdrawn_rows(api)) == {"w1", "w5"}
    assert_book_ok(api)


def test_the_book_check_finds_a_withdrawal_off_its_ledger_transaction(api):
    setup(api, "m1")
    topup(api, "t1", "m1", 100_000, at("2025-11-01"))
    pay(api, "p1", "m1", "big", 60_000, at("2025-11-02"))
    assert withdraw_in_book(api, "w1")["amount"] == 40_000
    assert_book_ok(api)
    with api.services.engine.begin() as conn:
        conn.execute(s.withdrawals.update().values(amount_won=4_000))
    with api.services.reader.connect() as conn:
        found = {check.name: check for check in check_book(conn)}
    check = found["withdrawals equal their ledger transactions"]
    assert not check.ok and "w1" in check.detail


def test_migration_0016_adds_and_drops_the_withdrawals_table(db_url):
    before, between, after = migrate_down_and_up(db_url, "0015")
    assert "withdrawals" in before and "withdrawals" not in between and "correction_payments" in between
    assert "withdrawals" in after


def test_migration_0016_will_not_go_down_while_withdrawals_are_recorded(api, db_url):
    """Dropping the table kept the approved withdrawal's ledger transaction and lost its
    record: `db check` BAD, and a resend answered anew (declined, nothing to withdraw)."""
    from ledger.db import migrate

    setup(api, "m1")
    topup(api, "t1", "m1", 100_000, at("2025-11-01"))
    pay(api, "p1", "m1", "big", 60_000, at("2025-11-02"))
    done = withdraw(api, "w1")
    assert done.json()["amount"] == 40_000
    before = unchanged(api)
    with pytest.raises(RuntimeError, match="withdrawals holds members' withdrawals"):
        migrate_down_and_up(db_url, "0015")
    migrate(db_url)  # back at the head, wherever the refusal left it
    assert unchanged(api) == before
    again = withdraw(api, "w1")
    assert again.status_code == 200 and again.json() == done.json()
    assert_book_ok(api)


# ---------------------------------------------------------------- the API


def withdraw(api, withdrawal_id: str, member_id: str = "m1", day: str = "2025-11-20", amount: int | None = None,
             **body):
    sent = {"withdrawal_id": withdrawal_id, "occurred_at": at(day), **body}
    if amount is not None:
        sent["amount"] = amount
    return api.post(f"/v1/members/{member_id}/withdrawals", sent)


def unchanged(api) -> tuple:
    """The book's fingerprint, withdrawals included."""
    return snapshot(api), withdrawn_rows(api)


def test_the_api_records_a_withdrawal_and_replays_it(api):
    setup(api, "m1", "m2")
    topup(api, "t1", "m1", 100_000, at("2025-11-01"))
    pay(api, "p1", "m1", "big", 60_000, at("2025-11-02"))
    first = withdraw(api, "w1")
    assert first.status_code == 201 and "idempotent-replayed" not in first.headers, first.text
    body = first.json()
    assert (body["withdrawal_id"], body["member_id"], body["status"], body["amount"], body["amount_requested"],
            body["used_share_bp"], body["used_share_min_bp"]) == ("w1", "m1", "approved", 40_000, None, 6_000, 6_000)
    assert body["occurred_at"] == at("2025-11-20") and body["balances"]["charged"] == 0
    before = unchanged(api)
    for again in (withdraw(api, "w1"), withdraw(api, "w1", occurred_at="2025-11-20T03:00:00Z")):
        assert again.status_code == 200 and again.headers["idempotent-replayed"] == "true"
        assert again.json() == body
    # another body under the id: the amount, the time, another member
    assert_problem(withdraw(api, "w1", amount=40_000), 409, "idempotency_conflict")
    assert_problem(withdraw(api, "w1", day="2025-11-21"), 409, "idempotency_conflict")
    assert_problem(withdraw(api, "w1", "m2"), 409, "idempotency_conflict")
    assert unchanged(api) == before
    # a decline is an answer on the record too, and stays the answer for its id
    declined = withdraw(api, "w2", "m2")
    assert declined.status_code == 201 and declined.json()["decline_code"] == "nothing_to_withdraw"
    topup(api, "t2", "m2", 10_000, at("2025-11-21"))
    pay(api, "p2", "m2", "big", 10_000, at("2025-11-21"))
    replayed = withdraw(api, "w2", "m2")
    assert replayed.status_code == 200 and replayed.json() == declined.json()
    balance = api.get("/v1/members/m1/balance", params={"month": "2025-11"}).json()
    assert balance["balances"]["charged"] == 0 and balance["month"]["topped_up"] == 100_000  # not given back
    assert_book_ok(api)


@pytest.mark.parametrize("body,where", [
    ({"amount": 0}, "amount"), ({"amount": -1}, "amount"), ({"amount": 1.5}, "amount"),
    ({"amount": "40000"}, "amount"), ({"amount": True}, "amount"), ({"amount": 10**12 + 1}, "amount"),
    ({"withdrawal_id": "a/b"}, "withdrawal_id"), ({"withdrawal_id": ""}, "withdrawal_id"),
    ({"withdrawal_id": "w" * 65}, "withdrawal_id"), ({"occurred_at": "2025-11-20T12:00:00"}, "occurred_at"),
    ({"occurred_at": 1763607600}, "occurred_at"), ({"member_id": "m1"}, "member_id"),
])
def test_bad_input_is_a_422_and_changes_nothing(api, body, where):
    setup(api, "m1")
    topup(api, "t1", "m1", 100_000, at("2025-11-01"))
    pay(api, "p1", "m1", "big", 60_000, at("2025-11-02"))
    before = unchanged(api)
    sent = {"withdrawal_id": "w1", "occurred_at": at("2025-11-20"), **body}
    problem = assert_problem(api.post("/v1/members/m1/withdrawals", sent), 422, "validation_error")
    assert where in problem["detail"], problem
    assert unchanged(api) == before
    assert_book_ok(api)


def test_an_unknown_member_or_a_future_time_is_refused_and_records_nothing(api):
    setup(api, "m1")
    topup(api, "t1", "m1", 100_000, at("2025-11-01"))
    pay(api, "p1", "m1", "big", 60_000, at("2025-11-02"))
    before = unchanged(api)
    assert_problem(withdraw(api, "w1", "nobody"), 404, "member_not_found")
    assert_problem(withdraw(api, "w1", "bad id"), 422, "validation_error")
    ahead = (dt.datetime.now(dt.timezone.utc) + dt.timedelta(minutes=5)).isoformat()
    assert_problem(withdraw(api, "w1", occurred_at=ahead), 422, "occurred_at_in_future")
    assert unchanged(api) == before
    # refusals store nothing: the id is free
    assert withdraw(api, "w1").json()["amount"] == 40_000
    assert_book_ok(api)


def _race(workers: list, rounds: int = 3) -> None:
    """A withdrawal among payments of the same member, all at once: whichever order the
    book takes them in, no balance goes below zero and every won is accounted for."""
    first = workers[0]
    setup(first, *[f"m{n}" for n in range(rounds)])
    for n in range(rounds):
        member = f"m{n}"
        topup(first, f"t{n}", member, 100_000, at("2025-11-01"))
        pay(first, f"p{n}", member, "big", 60_000, at("2025-11-02"))
        shown = 40_000 if n % 2 else None  # with the amount shown, or whatever is left
        requests = [("/v1/payments", {"payment_id": f"p{n}-{k}", "member_id": member, "merchant_id": "big",
                                       "amount": 7_000, "occurred_at": at("2025-11-20")}) for k in range(7)]
        requests.insert(3, (f"/v1/members/{member}/withdrawals", {"withdrawal_id": f"w{n}", "occurred_at": at(
            "2025-11-20"), **({"amount": shown} if shown else {})}))
        answers = [r.json() for r in fire(workers, requests)]
        assert all(r.get("status") in ("approved", "declined") for r in answers), answers
        (taken,) = [a for a in answers if "withdrawal_id" in a]
        paid = sum(a["amount"] for a in answers if "payment_id" in a and a["status"] == "approved")
        left = charged(first, member)
        assert left >= 0 and 40_000 - paid - taken["amount"] == left, (answers, left)
        if taken["status"] == "approved":  # all that was left at its turn; nothing after it
            assert taken["amount"] == taken["charged_in"] - taken["used"] > 0 and left == 0, taken
            assert shown is None or taken["amount"] == shown
        else:
            assert taken["decline_code"] in ("withdrawal_amount_mismatch", "nothing_to_withdraw"), taken
        assert all(a["decline_code"] == "insufficient_funds" for a in answers
                   if "payment_id" in a and a["status"] == "declined")
    assert account_balance(first, "operator/cash") == 100_000 * rounds - sum(
        amount for status, _, amount, _ in withdrawn_rows(first).values() if status == "approved")
    assert_book_ok(first)


def test_a_withdrawal_racing_payments_never_overdraws(api):
    _race([api])


@pytest.mark.postgres
def test_a_withdrawal_racing_payments_on_another_worker_never_overdraws(pg_url):
    first, second = make_api(pg_url), make_api(pg_url)
    with first.client, second.client:
        _race([first, second], rounds=4)


# ---------------------------------------------------------------- finance


def test_a_days_settlement_shows_the_operator_cash_in_and_out(api, no_watermark_lag):
    setup(api, "m1", "m2")
    topup(api, "t1", "m1", 100_000, at("2025-11-03", "09:00:00"))
    pay(api, "p1", "m1", "big", 60_000, at("2025-11-03", "10:00:00"))
    topup(api, "t2", "m2", 30_000, at("2025-11-03", "09:00:00"))
    pay(api, "p2", "m2", "big", 10_000, at("2025-11-03", "10:00:00"))
    assert withdraw(api, "w1", day="2025-11-03").json()["amount"] == 40_000
    assert withdraw(api, "w2", "m2", day="2025-11-03").json()["status"] == "declined"  # a third used
    r = api.post("/v1/settlements", {"business_date": "2025-11-03"}, role="finance")
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["status"] == "settled", [c for c in body["checks"] if not c["ok"]]
    assert "operator cash in and out equals the operator cash movement" in {c["name"] for c in body["checks"]}
    assert body["totals"]["dates"]["2025-11-03"]["operator_cash"] == {"topped_up_won": 130_000,
                                                                      "withdrawn_won": 40_000, "net_won": 90_000}
    run = body["totals"]["run"]
    assert (run["topped_up_won"], run["withdrawn_won"], run["trial_balance_won"]) == (130_000, 40_000, 0)
    assert body["totals"]["operator_cash"] == [{"for_business_date": "2025-11-03", "topped_up_won": 130_000,
                                                "withdrawn_won": 40_000, "operator_cash_net_won": 90_000}]
    report = api.get("/v1/reports/daily/2025-11-03", role="finance")
    assert report.status_code == 200, report.text
    assert "top-ups<b>130,000원</b>" in report.text and "withdrawals paid out<b>40,000원</b>" in report.text
    # a withdrawal dated that day but recorded after it was settled rides on the next run
    pay(api, "p3", "m2", "big", 10_000, at("2025-11-03", "11:00:00"))  # two thirds used now
    assert withdraw(api, "w3", "m2", day="2025-11-03").json()["amount"] == 10_000
    later = api.post("/v1/settlements", {"business_date": "2025-11-04"}, role="finance").json()
    assert later["status"] == "settled", later["checks"]
    assert later["totals"]["dates"]["2025-11-03"]["operator_cash"]["withdrawn_won"] == 10_000
    month = api.get("/v1/reports/monthly/2025-11", role="finance")
    assert "withdrawals paid out<b>50,000원</b>" in month.text
    assert account_balance(api, "operator/cash") == 130_000 - 50_000
    assert_book_ok(api)


def test_a_withdrawal_dated_before_its_money_is_a_409_and_no_settlement_sees_it(api, no_watermark_lag):
    setup(api, "m1")
    assert api.post("/v1/settlements", {"business_date": "2025-11-01"}, role="finance").json()["status"] == "settled"
    topup(api, "t1", "m1", 100_000, at("2025-11-03", "09:00:00"))
    pay(api, "p1", "m1", "big", 60_000, at("2025-11-03", "10:00:00"))
    before = unchanged(api)
    problem = assert_problem(withdraw(api, "w1", occurred_at=at("2025-11-01", "09:00:00")), 409,
                             "withdrawal_before_activity")
    assert problem["earliest"] == "2025-11-03T10:00:00+09:00" and "payment 'p1'" in problem["detail"], problem
    assert problem["title"] == "A withdrawal cannot come before the money it withdraws"
    assert unchanged(api) == before
    codes = api.client.get("/openapi.json").json()["components"]["schemas"]["Problem"]["properties"]["code"]
    assert "`withdrawal_before_activity`" in codes["description"]
    assert withdraw(api, "w1", day="2025-11-03").json()["amount"] == 40_000
    later = api.post("/v1/settlements", {"business_date": "2025-11-03"}, role="finance").json()
    assert later["status"] == "settled", later["checks"]
    assert set(later["totals"]["dates"]) == {"2025-11-03"}  # no cash out on the 1st, settled empty
    assert later["totals"]["dates"]["2025-11-03"]["operator_cash"] == {"topped_up_won": 100_000,
                                                                      "withdrawn_won": 40_000, "net_won": 60_000}
    history = api.get("/v1/members/m1/transactions").json()["items"]
    assert [(item["kind"], item["ref"]) for item in history] == [("withdrawal", "w1"), ("payment", "p1"),
                                                                 ("topup", "t1")]
    assert_book_ok(api)


def test_eum_settle_prints_the_operator_cash_beside_the_payments(api, db_url, no_watermark_lag, monkeypatch):
    """A day whose only activity was 120,000 withdrawn printed `payments 0 net payable 0
    won`, as if nothing had moved."""
    from typer.testing import CliRunner

    from eum import settings as settings_module
    from eum.cli import app
    today = dt.datetime.now(dt.timezone(dt.timedelta(hours=9))).date()  # Asia/Seoul
    before, day = (today - dt.timedelta(days=n) for n in (4, 3))
    setup(api, "m1")
    topup(api, "t1", "m1", 300_000, at(before.isoformat()))
    pay(api, "p1", "m1", "big", 180_000, at(before.isoformat()))
    assert withdraw(api, "w1", day=day.isoformat()).json()["amount"] == 120_000
    monkeypatch.setenv("EUM_DATABASE_URL", db_url)
    settings_module.get_settings.cache_clear()
    try:
        out = CliRunner().invoke(app, ["settle", "--date", before.isoformat(), "--to", day.isoformat()])
    finally:
        settings_module.get_settings.cache_clear()
    assert out.exit_code == 0, (out.output, out.exception)
    lines = [" ".join(line.split()) for line in out.stdout.splitlines()]
    assert len(lines) == 2 and all(line.startswith("stl-") for line in lines), out.stdout
    # (180,000 less the merchant's fee)
    assert (" settled payments 1 net payable 177,300 won topped up 300,000 won withdrawals paid out 0 won payout "
            in lines[0])
    assert " settled payments 0 net payable 0 won topped up 0 won withdrawals paid out 120,000 won payout " in lines[1]


def test_the_operator_cash_figures_hold_every_kind_and_the_check_holds_them_to_the_ledger():
    import polars as pl

    from settlement.compute import LEGS_SCHEMA, checks, compute, movements_from_legs
    from settlement.config import SettlementConfig

    day = "2025-11-03"

    def legs(rows):
        return pl.DataFrame([(t, k, "u1", None, day, 1, a, v) for t, k, a, v in rows], schema=LEGS_SCHEMA,
                            orient="row")

    frame = legs([(1, "topup", "operator/cash", 100_000), (1, "topup", "member/u1/charged", -100_000),
                  (2, "withdrawal", "member/u1/charged", 40_000), (2, "withdrawal", "operator/cash", -40_000),
                  # a kind added later that moves the operator's cash is in the net, not lost
                  (3, "some_future_kind", "operator/cash", -5), (3, "some_future_kind", "member/u1/points", 5)])
    merchants = pl.DataFrame(schema={"merchant_id": pl.String, "district": pl.String, "category": pl.String,
                                     "annual_sales_won": pl.Int64})
    c = compute(frame, merchants, config=SettlementConfig(), payout_date=dt.date(2025, 11, 5), primary_date=day)
    assert c.totals["dates"][day]["operator_cash"] == {"topped_up_won": 100_000, "withdrawn_won": 40_000,
                                                       "net_won": 59_995}
    name = "operator cash in and out equals the operator cash movement"
    movements, counts = movements_from_legs(frame)
    assert {x.name: x for x in checks(c, movements, counts)}[name].ok
    movements[(day, "operator_cash")] -= 1  # a ledger that moved otherwise
    assert not {x.name: x for x in checks(c, movements, counts)}[name].ok
