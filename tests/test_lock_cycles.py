"""Lock cycles between batches that the book's lock order does not cover (PostgreSQL).

The order members -> budgets -> shared accounts holds for the row locks a batch takes
by SELECT ... FOR UPDATE and UPDATE. An account a batch creates (`SQL_ENSURE_ACCOUNTS`,
INSERT ... ON CONFLICT DO NOTHING, the first statement of the write) is locked too, in
effect: another transaction inserting the same name waits for the creator's COMMIT.
A funder's account of a new month is created by the first batches that pay cashback
from it; one of them that runs locked (a budget binds) holds the budget rows from its
read, while another (optimistic) has created the account and then waits for the budget
rows in its write."""

from __future__ import annotations

import threading
import time

import psycopg
import pytest

import ledger.book as book_module
from api.cardapp import payment_command
from api.schemas import PaymentIn
from ledger.book import Book
from ledger.db import make_engine
from tests.book_helpers import assert_book_ok, pay, put_member, put_merchant, topup
from tests.conftest import at, make_api

pytestmark = pytest.mark.postgres


def _waiting(pg_url: str) -> int:
    with psycopg.connect(pg_url, autocommit=True) as conn:
        return conn.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                            "AND wait_event_type = 'Lock'").fetchone()[0]


def _until(predicate, what: str, seconds: float = 4.0) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


@pytest.mark.xfail(strict=True, reason="known cycle, before and after the lock-order change (c4cbba1 and d6a008e): "
                   "a batch that locked its budgets in its read waits in its write for a funder's account another "
                   "batch created and has not committed, which waits for those budget rows; PostgreSQL breaks it "
                   "after deadlock_timeout (1 s) and Book.execute runs the loser again")
def test_a_new_months_funder_account_created_by_two_batches_is_no_lock_cycle(pg_url, monkeypatch):
    transient: list[str] = []
    original = book_module._transient

    def recorded(exc):
        transient.append(str(exc.orig).splitlines()[0])
        return original(exc)

    monkeypatch.setattr(book_module, "_transient", recorded)
    api = make_api(pg_url)
    with api.client:
        put_merchant(api, "lc-shop")
        for member in ("lc-a", "lc-b"):
            put_member(api, member)
            topup(api, f"t9-{member}", member, 500_000, at("2025-09-01"))
            topup(api, f"t10-{member}", member, 500_000, at("2025-10-01"))
        pay(api, "lc-sept", "lc-a", "lc-shop", 10_000, at("2025-09-10"))  # the year's budget rows exist
        # October's budget rows exist (set by finance), its funder accounts not yet; the
        # city's month is nearly spent: a big payment is cut by it, a small one is not.
        for source, limit in (("national", 10**9), ("city", 1_000), ("merchant", 10**9), ("seo", 10**9)):
            r = api.put(f"/v1/budgets/{source}/2025-10", {"amount": limit}, role="finance")
            assert r.status_code in (200, 201), r.text
        book_a = api.services.book  # two workers: two books, as two processes have
        book_b = Book(book_a.engine, book_a.timeline, book_a.programs)

        def command(payment_id: str, member: str, amount: int):
            return payment_command(PaymentIn(payment_id=payment_id, member_id=member, merchant_id="lc-shop",
                                             amount=amount, occurred_at=at("2025-10-10")))

        outcomes: dict[str, object] = {}
        holder_engine = make_engine(pg_url)
        holder = holder_engine.raw_connection()
        try:
            # Something the small payment's write waits for after its first statement
            # (its member-month row, held by a slow reader of it) and the big one does not.
            cur = holder.cursor()
            cur.execute("SELECT 1 FROM member_months WHERE member_id = 'lc-a' AND month = '2025-10' FOR UPDATE")
            small = threading.Thread(target=lambda: outcomes.update(small=book_a.execute([command("lc-s", "lc-a", 5_000)])[0]))
            small.start()
            _until(lambda: _waiting(pg_url) >= 1, "the small payment's write never waited")
            big = threading.Thread(target=lambda: outcomes.update(big=book_b.execute([command("lc-b", "lc-b", 200_000)])[0]))
            big.start()
            _until(lambda: _waiting(pg_url) >= 2, "the big payment never waited for the account the small one created")
            holder.rollback()
            small.join(30)
            big.join(30)
        finally:
            holder.close()
            holder_engine.dispose()
        assert outcomes["small"].body["status"] == "approved", outcomes["small"]
        assert outcomes["big"].body["status"] == "approved", outcomes["big"]
        assert_book_ok(api)
        assert not [t for t in transient if "deadlock" in t], transient

