"""A correction's 상생 (win-win) merchant share is settled with the merchant whose
payments it corrected (the s22 settlement audit).

A correction line is one member-month; it was posted as one transaction with no merchant,
so settlement reported its `funder/merchant` legs apart (`merchant_share_unattributed_won`)
and withheld them from no merchant's payout, while a later refund of the payment clawed the
corrected share back with the merchant on it, through the merchant's payout. W (35억,
sharing 3%) earned nothing on 100,000 above the 30억 ceiling; a correction to a 50억 ceiling
posted 15,000 (merchant 3,000); the whole refund clawed back 15,000: W was paid 98,500 and
then −95,500, 3,000 in all for a fully refunded sale. Lowering the share, W paid it twice.

Now the merchant-funded part of a line is posted in a transaction of its own per merchant
whose payments it corrected, so settlement withholds it from (or pays it back to) that
merchant: over all its payouts a merchant nets exactly its sales − refunds − fees − the
cashback it funded, net (docs/settlement.md, docs/design.md "Corrections")."""

from __future__ import annotations

import datetime as dt
import time

import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy import select

from ledger import schema as s
from rules.timeutil import local_date, rfc3339
from settlement import schema as ss
from settlement import service
from tests.book_helpers import assert_book_ok, assert_months_hold_their_payments
from tests.conftest import POLICIES, at

FROM, TO = at("2026-11-01", "00:00:00"), at("2026-12-01", "00:00:00")


def _ok(r):
    assert r.status_code in (200, 201), r.text
    return r.json()


def _world(api, merchants: dict[str, tuple[int, int]]) -> None:
    """Member m1 of Seo-gu with 500,000 charged, and the 상생 merchants {id: (annual sales, share bp)}."""
    _ok(api.put("/v1/members/m1", {"district": "seo"}))
    for merchant_id, (sales, share_bp) in merchants.items():
        _ok(api.put(f"/v1/merchants/{merchant_id}", {
            "name": merchant_id, "district": "seo", "category": "restaurant", "annual_sales": sales,
            "registered_from": "2019-01-01", "merchant_share_bp": share_bp}))
    _ok(api.post("/v1/topups", {"topup_id": "t1", "member_id": "m1", "amount": 500_000,
                                "occurred_at": at("2026-11-02")}))


def _pay(api, payment_id: str, merchant_id: str, day: str) -> int:
    return _ok(api.post("/v1/payments", {"payment_id": payment_id, "member_id": "m1", "merchant_id": merchant_id,
                                         "amount": 100_000, "occurred_at": at(day)}))["cashback"]["amount"]


def _correct_ceiling(api, ceiling_won: int) -> dict:
    """A correction of November's city layer to a sales ceiling of `ceiling_won`."""
    right = yaml.safe_load((POLICIES / "2025-10-cap-50man.yaml").read_text())
    right["policy_id"] = f"ceiling-{ceiling_won}"
    right.pop("effective_from")
    right["cashback_eligibility"]["merchant_sales_max_won"] = ceiling_won
    _ok(api.post("/v1/policies", right, role="policy-editor"))
    _ok(api.post("/v1/corrections", {"correction_id": "c-ceiling", "wrong_policy_id": "incheon-2025-10",
                                     "right_policy_id": right["policy_id"], "from": FROM, "to": TO},
                 role="policy-editor"))
    posted = _ok(api.post("/v1/corrections/c-ceiling/approve", role="policy-approver"))
    assert posted["status"] == "posted", posted
    return posted


def _refund_now(api, refund_id: str, payment_id: str) -> int:
    now_us = time.time_ns() // 1000
    return _ok(api.post(f"/v1/payments/{payment_id}/refunds", {
        "refund_id": refund_id, "amount": 100_000, "occurred_at": rfc3339(now_us - 1_000_000)}))["cashback_clawback"]


def _settle_everything(api) -> list:
    """Settle every business date of the book not yet settled, today's included (with a
    clock a day on): the runs, each settled with every check green."""
    engine = api.services.engine
    later_us = time.time_ns() // 1000 + 86_400_000_000
    with engine.connect() as conn:
        dates = sorted(set(conn.execute(select(s.ledger_txns.c.business_date)).scalars()))
    runs = []
    for day in dates:
        run = service.settle(engine, dt.date.fromisoformat(day), actor="finance",
                             clock=lambda: later_us)
        assert run.status == "settled", (day, run.failures)
        runs.append(run)
    return runs


def _paid(api) -> dict[str, dict[str, int]]:
    """Per merchant, Σ over every successful settlement's payout rows."""
    p, t = ss.settlement_payouts, ss.settlements
    out: dict[str, dict[str, int]] = {}
    with api.services.engine.connect() as conn:
        rows = conn.execute(select(p.c.merchant_id, p.c.net_sales_won, p.c.fee_won, p.c.merchant_share_won,
                                   p.c.net_payable_won).join(t, t.c.settlement_id == p.c.settlement_id)
                            .where(t.c.status == "settled")).all()
    for merchant_id, *figures in rows:
        sums = out.setdefault(merchant_id, dict.fromkeys(("net_sales", "fee", "share", "net_payable"), 0))
        for key, value in zip(sums, figures):
            sums[key] += value
    return out


def _unattributed(runs) -> int:
    return sum(run.totals["run"]["merchant_share_unattributed_won"] for run in runs)


def _share_on(api, day: str) -> dict[str, int]:
    """The merchant shares in the payout rows for business date `day`."""
    p, t = ss.settlement_payouts, ss.settlements
    with api.services.engine.connect() as conn:
        rows = conn.execute(select(p.c.merchant_id, p.c.merchant_share_won).join(t, t.c.settlement_id == p.c.settlement_id)
                            .where(t.c.status == "settled", p.c.for_business_date == day)).all()
    out: dict[str, int] = {}
    for merchant_id, share in rows:
        out[merchant_id] = out.get(merchant_id, 0) + share
    return {k: v for k, v in out.items() if v}


def _correction_txns(api) -> list[tuple[str | None, dict[str, int]]]:
    """Each correction transaction's merchant and its `funder/*` legs."""
    t, l = s.ledger_txns, s.ledger_legs
    out: dict[int, tuple] = {}
    with api.services.engine.connect() as conn:
        for txn_id, merchant_id, account_id, amount in conn.execute(
                select(t.c.txn_id, t.c.merchant_id, l.c.account_id, l.c.amount_won)
                .join(l, l.c.txn_id == t.c.txn_id).where(t.c.kind == "correction").order_by(t.c.txn_id, l.c.leg_no)):
            legs = out.setdefault(txn_id, (merchant_id, {}))[1]
            if account_id.startswith("funder/"):
                legs[account_id.split("/")[1]] = amount
    return list(out.values())


def test_a_correction_raising_a_winwin_share_is_withheld_from_the_merchant(api, no_watermark_lag):
    """The audit's case: W's 3,000 of the correction is withheld on the correction's
    date, and the refund's clawback of it paid back: W nets 0 for a sale refunded whole."""
    _world(api, {"W": (3_500_000_000, 300)})
    assert _pay(api, "p1", "W", "2026-11-20") == 0  # above the 30억 ceiling
    first = _settle_everything(api)
    posted = _correct_ceiling(api, 5_000_000_000)
    assert [(l["member_id"], l["delta"], l["by_funder"]) for l in posted["lines"]] == [
        ("m1", 15_000, {"city": 6_000, "merchant": 3_000, "national": 4_000, "seo": 2_000})]
    assert _refund_now(api, "r1", "p1") == 15_000
    runs = first + _settle_everything(api)
    paid = _paid(api)["W"]
    assert paid["net_sales"] == 0 and paid["fee"] == 0 and paid["share"] == 0, paid
    assert paid["net_payable"] == 0, paid  # was 3,000: 98,500 then −95,500
    assert _unattributed(runs) == 0
    assert sorted((m or "", legs.get("merchant", 0)) for m, legs in _correction_txns(api)) == [("", 0), ("W", 3_000)]
    assert_book_ok(api)
    assert_months_hold_their_payments(api)


def test_the_correction_is_withheld_on_its_own_date(api, no_watermark_lag):
    """Settled before the refund: the correction's date withholds W's 3,000."""
    _world(api, {"W": (3_500_000_000, 300)})
    _pay(api, "p1", "W", "2026-11-20")
    _correct_ceiling(api, 5_000_000_000)
    runs = _settle_everything(api)
    posted_on = local_date(time.time_ns() // 1000).isoformat()
    assert _share_on(api, posted_on) == {"W": 3_000}
    assert _unattributed(runs) == 0
    paid = _paid(api)["W"]
    assert paid["net_payable"] == paid["net_sales"] - paid["fee"] - 3_000, paid


def test_a_correction_lowering_a_winwin_share_is_paid_back_to_the_merchant(api, no_watermark_lag):
    """The reverse: W (25억) funded 3,000 of 15,000 under the 30억 ceiling; corrected to a
    20억 ceiling, the correction takes the 15,000 back and W's 3,000 goes back to W (it
    paid it twice before: withheld on the payment's day, and never returned); the whole
    refund then claws back nothing. W nets 0."""
    _world(api, {"W": (2_500_000_000, 300)})
    assert _pay(api, "p1", "W", "2026-11-20") == 15_000
    first = _settle_everything(api)
    assert _paid(api)["W"]["share"] == 3_000
    posted = _correct_ceiling(api, 2_000_000_000)
    assert [(l["delta"], l["by_funder"].get("merchant")) for l in posted["lines"]] == [(-15_000, -3_000)]
    assert _refund_now(api, "r1", "p1") == 0
    runs = first + _settle_everything(api)
    paid = _paid(api)["W"]
    assert paid["net_sales"] == 0 and paid["fee"] == 0 and paid["share"] == 0, paid
    assert paid["net_payable"] == 0, paid  # was −3,000
    assert _unattributed(runs) == 0
    assert_book_ok(api)
    assert_months_hold_their_payments(api)


def test_a_line_spanning_two_winwin_merchants_is_split_between_them(api, no_watermark_lag):
    """One member-month with payments at two 상생 merchants (W1 sharing 3%, W2 2%): the
    line's 5,000 merchant share is 3,000 withheld from W1 and 2,000 from W2. W1's payment
    refunded whole, W1 nets 0; W2 nets its sale less its fee and the 2,000 it funded."""
    _world(api, {"W1": (3_500_000_000, 300), "W2": (4_000_000_000, 200)})
    assert _pay(api, "p1", "W1", "2026-11-20") == 0
    assert _pay(api, "p2", "W2", "2026-11-21") == 0
    first = _settle_everything(api)
    posted = _correct_ceiling(api, 5_000_000_000)
    assert len(posted["lines"]) == 1 and posted["lines"][0]["by_funder"]["merchant"] == 5_000, posted
    by_merchant = {m: legs.get("merchant", 0) for m, legs in _correction_txns(api) if m is not None}
    assert by_merchant == {"W1": 3_000, "W2": 2_000}  # Dr funder/merchant, each with its merchant
    assert _refund_now(api, "r1", "p1") > 0
    runs = first + _settle_everything(api)
    paid = _paid(api)
    assert paid["W1"] == {"net_sales": 0, "fee": 0, "share": 0, "net_payable": 0}, paid
    assert paid["W2"]["net_sales"] == 100_000 and paid["W2"]["share"] == 2_000, paid
    assert paid["W2"]["net_payable"] == 100_000 - paid["W2"]["fee"] - 2_000, paid
    posted_on = local_date(time.time_ns() // 1000).isoformat()  # the correction's Seoul date of posting
    assert _share_on(api, posted_on) == {"W2": 2_000}  # W1's 3,000, and its refund's −3,000
    assert _unattributed(runs) == 0
    assert_book_ok(api)
    assert_months_hold_their_payments(api)


def test_a_lines_transactions_move_each_account_as_the_line_as_one_would():
    """Parts of both signs (the merchant's share raised at W1, lowered at W2, the city's
    cut), the member short of points: each transaction balances, each account's legs
    sum to what one transaction of the line's total moves (points, then charged money,
    then the receivable), and the merchant part goes to the transactions of W1 and W2."""
    from ledger.book import CorrectedPayment, MemberState, _correction_txns

    def part(source, won):
        return CorrectedPayment([("base", source, won)], "{}", 0, True, 0)

    rebased = [({"merchant_id": "W1"}, part("merchant", 3_000)), ({"merchant_id": "W2"}, part("merchant", -1_000)),
               ({"merchant_id": "W2"}, part("city", -6_000)), ({"merchant_id": "W1"}, part("merchant", 500))]
    by_funder = (("city", -6_000), ("merchant", 2_500))
    for points, charged in ((10_000, 0), (1_000, 2_000), (0, 0), (4_000, 100)):
        member = MemberState("m1", "seo", "active", charged=charged, points=points)
        txns = _correction_txns(member, "2026-11", by_funder, rebased)
        assert (member.points, member.charged) == (points, charged)  # read, not moved
        sums: dict[str, int] = {}
        for _, legs in txns:
            assert sum(amount for _, amount in legs) == 0, legs
            for account, amount in legs:
                sums[account] = sums.get(account, 0) + amount
        due = 6_000 - 2_500
        from_points = min(due, points)
        from_charged = min(due - from_points, charged)
        expected = {"funder/city/2026-11": -6_000, "funder/merchant/2026-11": 2_500, "member/m1/points": from_points,
                    "member/m1/charged": from_charged, "receivable/m1": due - from_points - from_charged}
        assert {k: v for k, v in sums.items() if v} == {k: v for k, v in expected.items() if v}, (points, charged)
        merchant_legs = {m: dict(legs).get("funder/merchant/2026-11", 0) for m, legs in txns}
        assert merchant_legs == {None: 0, "W1": 3_500, "W2": -1_000}


def _one_transaction(points: int, charged: int, owed: int, net: int) -> dict[str, int]:
    """The member's side of a correction line as one transaction of `net`: a line that
    gives settles what is owed first, then credits points; one that takes comes from
    points, then charged money, then the receivable."""
    if net >= 0:
        settled = min(net, owed)
        return {"receivable/m1": -settled, "member/m1/points": -(net - settled)}
    from_points = min(-net, points)
    from_charged = min(-net - from_points, charged)
    return {"member/m1/points": from_points, "member/m1/charged": from_charged,
            "receivable/m1": -net - from_points - from_charged}


@settings(max_examples=120, deadline=None)
@given(parts=st.lists(st.tuples(st.sampled_from(["W1", "W2", "W3"]), st.sampled_from(["merchant", "city", "national"]),
                                st.integers(-20_000, 20_000)), min_size=1, max_size=6),
       points=st.integers(0, 30_000), charged=st.integers(0, 30_000), owed=st.integers(0, 30_000))
def test_a_lines_transactions_settle_what_is_owed_as_the_line_as_one_would(parts, points, charged, owed):
    """Any mix of parts, any balances and any amount owed: each transaction balances,
    and each account's legs sum to what one transaction of the line's total moves: a line
    that gives settles what the member owes before it credits points (a correction to 7%
    left 15,000 owed; one back to 10% gave 15,000 points and left the 15,000 owed)."""
    from ledger.book import CorrectedPayment, MemberState, _correction_txns

    rebased = [({"merchant_id": m}, CorrectedPayment([("base", source, won)], "{}", 0, True, 0))
               for m, source, won in parts]
    funders: dict[str, int] = {}
    for _, source, won in parts:
        funders[source] = funders.get(source, 0) + won
    member = MemberState("m1", "seo", "active", charged=charged, points=points)
    txns = _correction_txns(member, "2026-11", tuple(sorted(funders.items())), rebased, owed)
    sums: dict[str, int] = {}
    for _, legs in txns:
        assert sum(amount for _, amount in legs) == 0, legs
        for account, amount in legs:
            sums[account] = sums.get(account, 0) + amount
    want = {f"funder/{source}/2026-11": won for source, won in funders.items()}
    want.update(_one_transaction(points, charged, owed, sum(funders.values())))
    assert {k: v for k, v in sums.items() if v} == {k: v for k, v in want.items() if v}
    merchant_legs = {m: dict(legs).get("funder/merchant/2026-11", 0) for m, legs in txns if m is not None}
    by_merchant: dict[str, int] = {}
    for m, source, won in parts:
        if source == "merchant":
            by_merchant[m] = by_merchant.get(m, 0) + won
    assert merchant_legs == {m: won for m, won in by_merchant.items() if won}
