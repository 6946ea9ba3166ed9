"""Lock cycles between batches that the book's lock order does not cover (PostgreSQL).

The order members -> budgets -> shared accounts holds for the row locks a batch takes
by SELECT ... FOR UPDATE and UPDATE. An account a batch creates (`SQL_ENSURE_ACCOUNTS`,
INSERT ... ON CONFLICT DO NOTHING, the first statement of the write) is locked too, in
effect: another transaction inserting the same name waits for the creator's COMMIT.
A funder's account of a new month is created by the first batches that pay cashback
from it; one of them that runs locked (a budget binds) holds the budget rows from its
read, while another (optimistic) had created the account and then waited for the budget
rows in its write. A batch that creates an account that is not a member's now locks its
budget rows before it (`pgstore.shared_new`), as the lock order has it."""

from __future__ import annotations

import threading
import time

import pytest

import ledger.book as book_module
from api.cardapp import payment_command
from api.schemas import PaymentIn
from ledger.book import Book
from ledger.db import make_engine
from tests.book_helpers import (assert_book_ok, flat_grant_program, lock_waiters, pay, put_member, put_merchant,
                                topup, wait_until)
from tests.conftest import at, make_api

pytestmark = pytest.mark.postgres


def test_a_new_months_funder_account_created_by_two_batches_is_no_lock_cycle(pg_url, monkeypatch):
    """A batch that read its budgets optimistically created a funder's new month account
    in its write and then waited for the budget rows, which a batch that had locked them
    in its read (a budget binding) held while it waited to create the same account:
    PostgreSQL broke the cycle after `deadlock_timeout` (1 s) and the book ran the loser
    again. Such a batch now takes the budgets before it creates the account: both
    payments are approved, no deadlock is detected, the book is whole."""
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
            wait_until(lambda: lock_waiters(pg_url) >= 1, "the small payment's write never waited")
            big = threading.Thread(target=lambda: outcomes.update(big=book_b.execute([command("lc-b", "lc-b", 200_000)])[0]))
            big.start()
            # Before: it waited for the account the small one had created and not
            # committed, holding the budget rows the small one's write then waited for.
            wait_until(lambda: "big" in outcomes or lock_waiters(pg_url) >= 2, "the big payment neither ended nor waited")
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


MIX_MEMBERS = [f"mx{i}" for i in range(24)]


def test_online_batches_refunds_a_replay_and_a_grant_file_at_once_keep_the_book_whole(pg_url, monkeypatch):
    """Two online writers (batches that skip held members: payments, refunds of payments
    whose members the jobs hold, disbursements of the program the grant file pays),
    a replay on two streams and a grant file in small chunks, all at once on the same
    members: every command is decided, no deadlock is detected (the lock order
    members -> own accounts -> budgets -> shared accounts -> audit holds among them), and
    the book is whole."""
    import datetime as dt
    import random

    from ledger import bulk, grant_jobs
    from ledger import replay as bulk_replay
    from ledger.commands import Disburse, Refund, request_hash
    from ledger.errors import MemberHeld
    from rules.timeutil import to_us

    transient: list[str] = []
    original = book_module._transient
    monkeypatch.setattr(book_module, "_transient",
                        lambda exc: transient.append(str(exc.orig).splitlines()[0]) or original(exc))
    kind = bulk.error_kind  # the grant writer's retries name their error by it
    monkeypatch.setattr(bulk, "error_kind", lambda exc: transient.append(str(getattr(exc, "orig", exc)).splitlines()[0])
                        or kind(exc))
    monkeypatch.setattr(bulk, "CHUNK_ROWS_MAX", 6)
    monkeypatch.setattr(grant_jobs, "CHUNK_ROWS_MAX", 6)
    chunks = bulk.chunks
    monkeypatch.setattr(grant_jobs, "chunks", lambda rows, size=6: chunks(rows, size))
    program = flat_grant_program("mx-grant")
    api = make_api(pg_url)
    with api.client:
        from tests.book_helpers import approve_program

        for shop in ("mx-shop", "mx-shop2"):
            put_merchant(api, shop)
        for member in MIX_MEMBERS:
            put_member(api, member)
            topup(api, f"mx-t-{member}", member, 500_000, at("2025-10-01"))
        assert api.post("/v1/grant-programs", program, role="policy-editor").status_code == 201
        approve_program(api, "mx-grant")
        book = api.services.book
        rng = random.Random(11)

        def payment(payment_id: str, member: str, second: int):
            return payment_command(PaymentIn(payment_id=payment_id, member_id=member,
                                             merchant_id=rng.choice(["mx-shop", "mx-shop2"]),
                                             amount=rng.choice([3_000, 9_900, 17_000]),
                                             occurred_at=f"2025-10-05T09:{second // 60:02d}:{second % 60:02d}+09:00"))

        pre = [payment(f"mx-pre-{i}", MIX_MEMBERS[i % len(MIX_MEMBERS)], i) for i in range(48)]
        decided = book.execute(pre)  # budgets, funders' accounts, refunds' targets
        assert all(o.ok and o.body["status"] == "approved" for o in decided), [(o.body["status"], o.body.get("decline_code"), o.body.get("decline")) for o in decided][:3]
        at_us = to_us(dt.datetime.fromisoformat("2025-10-06T09:00:00+09:00"))
        first = Disburse("mx-d-pre", "mx-grant", MIX_MEMBERS[0], 10_000, at_us,
                         request_hash("disbursement", {"id": "mx-d-pre"}))
        assert book.execute([first])[0].ok  # the program's fund accounts exist

        held: list[str] = []  # commands a writer found their member held for (by a job, or the other writer)

        def online(worker: Book, commands: list) -> list:
            """A service writer: batches of 4 that skip held members; held ones again later."""
            done, pending = [], list(commands)
            deadline = time.monotonic() + 60
            while pending:
                assert time.monotonic() < deadline, "held for a minute"
                batch, pending = pending[:4], pending[4:]
                for command, outcome in zip(batch, worker.execute(batch, skip_held_members=True)):
                    if isinstance(outcome.error, MemberHeld):
                        held.append(command.key)
                        pending.append(command)
                    else:
                        done.append((command, outcome))
                if pending and all(c in batch for c in pending):
                    time.sleep(0.01)
            return done

        refunds = [Refund(f"mx-r-{i}", p.payment_id, 1_000, to_us(dt.datetime.fromisoformat("2025-10-07T09:00:00+09:00")),
                          request_hash("refund", {"id": f"mx-r-{i}"})) for i, p in enumerate(pre)]
        one = [payment(f"mx-o1-{i}", rng.choice(MIX_MEMBERS), 600 + i) for i in range(40)] + refunds[:24]
        two = ([payment(f"mx-o2-{i}", rng.choice(MIX_MEMBERS), 700 + i) for i in range(40)] + refunds[24:]
               + [Disburse(f"mx-d-{i}", "mx-grant", MIX_MEMBERS[-1 - i], 5_000, at_us,
                           request_hash("disbursement", {"id": f"mx-d-{i}"})) for i in range(8)])
        rng.shuffle(one)
        rng.shuffle(two)
        replayed = [payment(f"mx-rp-{i}", MIX_MEMBERS[i % len(MIX_MEMBERS)], 800 + i % 400) for i in range(480)]
        csv_rows = "".join(f"mx-g-{i},{member}\n" for i, member in enumerate(MIX_MEMBERS * 2))
        results: dict[str, object] = {}
        failures: list[BaseException] = []

        def run(name: str, job) -> None:
            try:
                results[name] = job()
            except BaseException as exc:  # noqa: BLE001 - reported below
                failures.append(exc)

        replay_book = bulk_replay.replay_book(book.engine, book.timeline, book.programs)
        jobs = {
            "one": lambda: online(book, one),
            "two": lambda: online(Book(book.engine, book.timeline, book.programs), two),
            "replay": lambda: bulk_replay.replay_payments(replay_book, replayed, chunk=40, threads=2),
            "grants": lambda: grant_jobs.bulk_disburse(book, book.engine, "mx-grant",
                                                       ("disbursement_id,member_id\n" + csv_rows).encode(),
                                                       at_us, actor="test uploader"),
        }
        threads = [threading.Thread(target=run, args=(name, job)) for name, job in jobs.items()]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        assert not failures, failures
        assert not any(thread.is_alive() for thread in threads)
        for name in ("one", "two"):
            errors = [(c.key, o.error.code) for c, o in results[name] if o.error is not None]
            assert not errors, (name, errors)
        report, _ = results["replay"]
        assert report.recorded == len(replayed) and not report.errors, report
        grants = results["grants"]
        assert grants.disbursed == 2 * len(MIX_MEMBERS) and not grants.error_count, grants.as_dict()
        assert not [t for t in transient if "deadlock" in t], transient
        assert_book_ok(api)
        print(f"held and run again: {len(held)}; transient retries: {transient}")
