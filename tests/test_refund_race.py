"""A refund sent at the instant its payment commits on another worker (found by a
concurrency audit with two instances): the batch looks the refunded payment's member up
before it takes the member locks, and reads the payment after them. When the payment
committed in between, the refund ran against a member and a month the batch had not
read: a 500 (KeyError), or, where the member was locked for another of the batch's
commands, the payment's month counters written back as zero (the top-up limit and the
cashback cap forgotten for the month). Now the batch runs again and finds the payment."""

from __future__ import annotations

import threading
import time

import psycopg
import pytest

from ledger.book import Pay, Refund, TopUp
from rules.timeutil import to_us
from tests.book_helpers import assert_book_ok, month_of_member, pay, put_member, put_merchant, snapshot, topup
from tests.conftest import at, make_api

pytestmark = pytest.mark.postgres


def _us(day: str) -> int:
    import datetime as dt

    return to_us(dt.datetime.fromisoformat(at(day)))


@pytest.mark.parametrize("other_member", ["m1", "m2"])
def test_a_refund_racing_its_payment_keeps_the_months_counters(pg_url, other_member):
    """The refund shares its batch with a top-up of the same member (its months were
    zeroed) or of another (a 500: the payment's member was never locked nor read)."""
    api = make_api(pg_url)
    with api.client:
        put_member(api, "m1")
        put_member(api, "m2")
        put_merchant(api, "small")  # pays cashback
        put_merchant(api, "big", sales=4_000_000_000)  # over 30억: no cashback base
        topup(api, "t-oct", "m1", 500_000, at("2025-10-01"))
        pay(api, "p-small", "m1", "small", 30_000, at("2025-10-02"))
        before = month_of_member(api, "m1", "2025-10")["month"]
        assert (before["cashback_eligible_spend"], before["cashback_earned"], before["topped_up"]) == (
            30_000, 3_000, 500_000)
        book = api.services.book
        outcomes: dict[str, list] = {}
        # The refund's batch waits for `other_member`, the payment's for m1; the payment
        # commits first, then the refund's batch gets its lock and reads the payment.
        holders = {m: psycopg.connect(pg_url) for m in ("m1", "m2")}
        for member_id, holder in holders.items():
            holder.execute("SELECT 1 FROM members WHERE member_id = %s FOR UPDATE", (member_id,))
        payment = threading.Thread(target=lambda: outcomes.__setitem__("pay", book.execute(
            [Pay("p-big", "m1", "big", 20_000, _us("2025-10-03"), "h-p-big")])))
        refund_batch = [Refund("r-big", "p-big", 20_000, _us("2025-10-04"), "h-r-big"),
                        TopUp("t-nov", other_member, 100_000, _us("2025-11-01"), "h-t-nov")]
        refund = threading.Thread(target=lambda: outcomes.__setitem__("refund", book.execute(refund_batch)))
        payment.start()
        time.sleep(0.5)  # the payment's batch waits for m1
        refund.start()
        time.sleep(0.5)  # the refund's batch has looked for p-big (not yet committed) and waits too
        for member_id in ("m2", "m1") if other_member == "m1" else ("m1",):
            holders[member_id].commit()
        payment.join(30)
        for holder in holders.values():
            holder.commit()
            holder.close()
        refund.join(30)
        assert outcomes["pay"][0].error is None and outcomes["pay"][0].body["status"] == "approved"
        refunded = outcomes["refund"][0]
        assert refunded.error is None, refunded.error
        assert outcomes["refund"][1].error is None and outcomes["refund"][1].body["status"] == "approved"
        restored = refunded.body["restored"]
        assert restored["charged"] + restored["points"] + restored["grants"] == 20_000, restored
        after = month_of_member(api, "m1", "2025-10")["month"]
        assert (after["cashback_eligible_spend"], after["cashback_earned"], after["topped_up"]) == (
            30_000, 3_000, 500_000)
        assert_book_ok(api)


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_the_book_check_sees_month_counters_that_drifted_from_their_records(db_url):
    """What the race above did to a month passed every money check: the counters are
    now checked against the payments and top-ups they count."""
    from sqlalchemy import text

    from ledger.db import make_engine
    from ledger.queries import check_book
    from tests.book_helpers import refund

    api = make_api(db_url)
    with api.client:
        put_member(api, "m1")
        put_merchant(api, "small")
        topup(api, "t-oct", "m1", 500_000, at("2025-10-01"))
        pay(api, "p1", "m1", "small", 30_000, at("2025-10-02"))
        refund(api, "p1", "r1", 10_000, at("2025-10-03"))
        assert_book_ok(api)
    engine = make_engine(db_url)
    with engine.begin() as conn:
        conn.execute(text("UPDATE member_months SET eligible_spend_won = 0, topped_up_won = 0"))
    with engine.connect() as conn:
        checks = {c.name: c for c in check_book(conn)}
    drifted = checks["month counters equal their payments and top-ups"]
    assert not drifted.ok and "('m1', '2025-10', (0, 0), (20000, 500000))" in drifted.detail


@pytest.mark.parametrize("db_url", ["sqlite", "postgres"], indirect=True)
def test_the_book_check_sees_cashback_posted_twice_and_a_cashback_counter_that_drifted(db_url):
    """A payment's cashback transaction posted a second time moves points, funder
    accounts and budgets alike, so every other money check passed (the load-run audit:
    268,000 won of points against a 50,000 cap went unseen); and a month's cashback
    counter, which the monthly cap reads, was compared with nothing."""
    from sqlalchemy import func, select, text

    from ledger import schema as s
    from ledger.db import make_engine
    from ledger.queries import check_book

    api = make_api(db_url)
    with api.client:
        put_member(api, "m1")
        put_merchant(api, "small")
        topup(api, "t-oct", "m1", 500_000, at("2025-10-01"))
        assert pay(api, "p1", "m1", "small", 30_000, at("2025-10-02"))["cashback"]["amount"] == 3_000
        assert_book_ok(api)
    engine = make_engine(db_url)
    names = ("cashback posted once per payment, as recorded", "month cashback counters equal their funder legs")
    with engine.begin() as conn:
        conn.execute(text("UPDATE member_months SET cashback_won = 10000000"))
    with engine.connect() as conn:
        checks = {c.name: c for c in check_book(conn)}
    assert checks[names[0]].ok and not checks[names[1]].ok
    assert "('m1', '2025-10', 10000000, 3000)" in checks[names[1]].detail
    with engine.begin() as conn:  # the counter as it was, then the cashback transaction posted again
        conn.execute(text("UPDATE member_months SET cashback_won = 3000"))
        t, legs = s.ledger_txns, s.ledger_legs
        txn = conn.execute(select(t).where(t.c.kind == "cashback", t.c.ref == "p1")).one()._asdict()
        copied = [row._asdict() for row in conn.execute(select(legs).where(legs.c.txn_id == txn["txn_id"]))]
        new_id = conn.execute(select(func.max(t.c.txn_id))).scalar_one() + 1
        conn.execute(legs.insert(), [{**leg, "txn_id": new_id} for leg in copied])
        conn.execute(t.insert().values(**{**txn, "txn_id": new_id}))
    with engine.connect() as conn:
        checks = {c.name: c for c in check_book(conn)}
    assert not checks[names[0]].ok and "('p1', 3000, 2, 6000)" in checks[names[0]].detail
    assert not checks[names[1]].ok and "('m1', '2025-10', 3000, 6000)" in checks[names[1]].detail
    engine.dispose()



def test_a_refund_waiting_for_the_member_settles_what_the_refund_before_it_left_owed(pg_url):
    """Two workers refund two payments of one member while a third holds the member's
    lock: the first the grant payment of an ended program (10,000 clawed back, none of it
    held: owed), the second the payment the cashback points paid (10,000 points back).
    The second batch reads what is owed after the lock (the pipelined read's one
    statement), so its points settle the 10,000 the first left owed. Read before the
    lock it would see nothing owed and leave the member 10,000 points while owing 10,000
    (no floor refuses that); whichever runs first, the member ends with neither."""
    from tests.test_refund_owed import _earning_grant_spent

    first, second = make_api(pg_url), make_api(pg_url)
    with first.client, second.client:
        api = first
        before = _earning_grant_spent(api, "m-c")
        assert pay(api, "p-pts", "m-c", "big", 10_000, at("2025-09-10"))["spent"]["points"] == 10_000
        holder = psycopg.connect(pg_url)
        holder.execute("SELECT 1 FROM members WHERE member_id = 'm-c' FOR UPDATE")
        out: dict[str, list] = {}
        threads = [threading.Thread(target=lambda a=a, p=p, won=won: out.__setitem__(p, a.services.book.execute(
            [Refund(f"r-{p}", p, won, _us("2025-09-26"), f"h-{p}")])))
            for a, p, won in ((first, "p-grant", 100_000), (second, "p-pts", 10_000))]
        for thread in threads:  # the grant payment's refund queues for the lock first
            thread.start()
            time.sleep(0.5)
        holder.rollback()
        holder.close()
        for thread in threads:
            thread.join(30)
        assert all(o.ok for outcomes in out.values() for o in outcomes), out
        grant_back, points_back = out["p-grant"][0].body, out["p-pts"][0].body
        assert grant_back["clawback_detail"]["owed"] + grant_back["clawback_detail"]["from_points"] == 10_000
        assert points_back["owed_settled"] == grant_back["clawback_detail"]["owed"]
        month = month_of_member(api, "m-c", "2025-09")
        assert (month["owed"], month["balances"]["points"]) == (0, 0)
        assert snapshot(api)["budgets"] == before
        assert_book_ok(api)
