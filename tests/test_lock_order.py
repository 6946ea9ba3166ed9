"""A batch's hold on the rows others share (PostgreSQL).

Budget rows, funders' and merchants' accounts are shared by every batch that pays at
those merchants with that money; a member's own accounts are guarded by the member's
row, which the batch holds from its first statement. `pgstore.write_batch` writes the
members' accounts before it takes the budgets, so a batch holds the shared rows only
for their own statements and the COMMIT: a replay chunk's ~2,000 member accounts, when
written after the budgets, held the budget rows every online payment needs ~60 ms
longer per chunk (benchmarks/service_runs.py beside: online p99 93 -> 42 ms during a
replay of other members' payments)."""

from __future__ import annotations

import threading

import psycopg
import pytest
from psycopg import errors
from sqlalchemy import text

from tests.book_helpers import (assert_book_ok, flat_grant_program, lock_waiters, put_member, put_merchant,
                                rows_held, topup, wait_until)
from tests.conftest import at, make_api

pytestmark = pytest.mark.postgres


def _nowait(pg_url: str, account_id: str, table: str = "accounts", key: str = "account_id") -> bool:
    """Whether another session can lock the row at once (then lets it go)."""
    with psycopg.connect(pg_url, autocommit=False) as conn:
        try:
            conn.execute(f"SELECT 1 FROM {table} WHERE {key} = %s FOR UPDATE NOWAIT", (account_id,))
            return True
        except errors.LockNotAvailable:
            return False
        finally:
            conn.rollback()


def test_a_batch_writes_its_members_accounts_before_it_waits_for_the_budgets(pg_url):
    """While a budget row is held elsewhere, a payment's batch waits for it having
    written its member's accounts already (their rows locked by it), and not yet having
    taken the merchant's or the funders' accounts (free to others). Once the budget row
    is let go, the payment is approved and the book is whole."""
    from api.cardapp import payment_command
    from api.schemas import PaymentIn

    api = make_api(pg_url)
    with api.client:
        put_merchant(api, "lo-shop")
        put_member(api, "lo-m")
        topup(api, "lo-t", "lo-m", 100_000, at("2025-09-01"))
        book = api.services.book

        def payment(payment_id: str):
            return payment_command(PaymentIn(payment_id=payment_id, member_id="lo-m", merchant_id="lo-shop",
                                             amount=10_000, occurred_at=at("2025-09-10")))

        first = book.execute([payment("lo-p1")])[0]
        assert first.body["status"] == "approved" and first.body["cashback"]["amount"] > 0
        funders = [a for a, in book.engine.connect().execute(
            text("SELECT account_id FROM accounts WHERE account_id LIKE 'funder/%'")).all()]
        assert funders

        outcome: list = []
        thread = threading.Thread(target=lambda: outcome.append(book.execute([payment("lo-p2")])[0]))
        try:
            with rows_held(pg_url, "SELECT 1 FROM budgets FOR UPDATE"):
                thread.start()
                wait_until(lambda: lock_waiters(pg_url), "the batch never waited for the budget rows")
                assert not _nowait(pg_url, "member/lo-m/charged"), \
                    "the member's account was not written before the budgets"
                assert _nowait(pg_url, "merchant/lo-shop/payable"), "the merchant's account was taken before the budgets"
                for funder in funders:
                    assert _nowait(pg_url, funder), f"{funder} was taken before the budgets"
        finally:
            thread.join(30)
        assert outcome and outcome[0].body["status"] == "approved"
        assert_book_ok(api)


def test_split_member_accounts_keeps_each_side_in_account_order():
    from ledger.pgstore import split_member_accounts

    moved = sorted([("funder/city/2025-09", 5), ("member/a/charged", -10), ("member/a/points", 5),
                    ("merchant/s/payable", 10), ("member/b/grant/p", -3), ("operator/cash", 3),
                    ("receivable/a", 1)])
    own, shared = split_member_accounts(moved)
    assert own == [("member/a/charged", -10), ("member/a/points", 5), ("member/b/grant/p", -3)]
    assert shared == [("funder/city/2025-09", 5), ("merchant/s/payable", 10), ("operator/cash", 3),
                      ("receivable/a", 1)]
    assert split_member_accounts([("funder/x/2025-09", 1)]) == ([], [("funder/x/2025-09", 1)])


def test_a_grant_chunk_writes_its_members_lots_before_it_takes_the_programs_fund_accounts(pg_url):
    """The bulk grant writer took the program's fund accounts (which every online
    disbursement of the program moves) first, in account order, and held them while it
    wrote the chunk's lots, legs and rows. Now, while a fund account is held elsewhere,
    the chunk waits for it having written its recipients' lots already; once it is let
    go the chunk is recorded and the book is whole."""
    import datetime as dt

    from ledger import grant_jobs
    from rules.timeutil import to_us
    from tests.book_helpers import approve_program

    api = make_api(pg_url)
    with api.client:
        put_member(api, "lo-g")
        assert api.post("/v1/grant-programs", flat_grant_program("lo-grant"), role="policy-editor").status_code == 201
        approve_program(api, "lo-grant")
        at_us = to_us(dt.datetime.fromisoformat("2025-08-01T09:00:00+09:00"))

        def disburse(disbursement_id: str):
            return grant_jobs.bulk_disburse(api.services.book, api.services.reader, "lo-grant",
                                            f"disbursement_id,member_id\n{disbursement_id},lo-g\n".encode(),
                                            at_us, actor="test uploader")

        assert disburse("lo-d1").disbursed == 1  # the lot and the fund accounts exist from here
        report: list = []
        thread = threading.Thread(target=lambda: report.append(disburse("lo-d2")))
        try:
            with rows_held(pg_url, "SELECT 1 FROM accounts WHERE account_id LIKE 'grantfund/lo-grant/%' FOR UPDATE"):
                thread.start()
                wait_until(lambda: lock_waiters(pg_url), "the chunk never waited for the fund accounts")
                assert not _nowait(pg_url, "member/lo-g/grant/lo-grant"), "the lot was not written before the funds"
        finally:
            thread.join(30)
        assert report and report[0].disbursed == 1, report
        assert_book_ok(api)


def _in_thread(pg_url: str, sql: str, params: tuple, out: list) -> threading.Thread:
    """`sql` run in a transaction of its own on a thread, committed; its rows in `out`."""
    def run() -> None:
        with psycopg.connect(pg_url, autocommit=False) as conn:
            out.append(conn.execute(sql, params).fetchall() if "RETURNING" in sql else conn.execute(sql, params))
            conn.commit()
    return threading.Thread(target=run)


def test_the_shared_accounts_lock_and_move_takes_the_rows_in_account_order(pg_url):
    """`SQL_LOCK_MOVE_ACCOUNTS` (the lock and the move in one statement): while another
    session holds the middle account, the statement holds the first and not the last,
    as the lock statement before it did; once that session commits its own move, both
    moves are in the row."""
    from ledger import pgstore

    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("INSERT INTO accounts VALUES ('merchant/a/payable', 'liability', NULL, 0, false), "
                     "('merchant/b/payable', 'liability', NULL, 0, false), "
                     "('merchant/c/payable', 'liability', NULL, 0, false)")
    ids = pgstore._text_array(["merchant/a/payable", "merchant/b/payable", "merchant/c/payable"])
    out: list = []
    thread = _in_thread(pg_url, pgstore.SQL_LOCK_MOVE_ACCOUNTS, (ids, ids, pgstore._int_array([1, 2, 3])), out)
    with psycopg.connect(pg_url, autocommit=False) as other:
        other.execute("UPDATE accounts SET balance_won = balance_won + 7 WHERE account_id = 'merchant/b/payable'")
        try:
            thread.start()
            wait_until(lambda: lock_waiters(pg_url), "the statement never waited for the held account")
            assert not _nowait(pg_url, "merchant/a/payable"), "the first account was not locked before the second"
            assert _nowait(pg_url, "merchant/c/payable"), "the last account was locked before the one held"
            other.commit()
        finally:
            thread.join(30)
    assert out
    with psycopg.connect(pg_url) as conn:
        assert conn.execute("SELECT account_id, balance_won FROM accounts WHERE account_id LIKE 'merchant/%' "
                            "ORDER BY 1").fetchall() == [("merchant/a/payable", 1), ("merchant/b/payable", 9),
                                                         ("merchant/c/payable", 3)]


def test_the_budgets_update_locks_every_row_in_order_before_it_moves_one(pg_url):
    """`SQL_UPDATE_BUDGETS` takes the budgets' locks itself: while another session holds
    the middle budget, the first is held and the last free, and no day row is written
    yet (each is written under its budget's lock); once the other commits (a move of its
    own), each row and each day holds both moves, within the limits."""
    from ledger import pgstore

    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("INSERT INTO budgets VALUES ('city', '2025-09', 100, 0, 0), ('district', '2025-09', 100, 0, 0), "
                     "('national', '2025-09', 100, 0, 0)")
    sources = pgstore._text_array(["city", "district", "national"])
    periods = pgstore._text_array(["2025-09"] * 3)
    out: list = []
    thread = _in_thread(pg_url, pgstore.SQL_UPDATE_BUDGETS,
                        (sources, periods, sources, periods, pgstore._int_array([10, 20, 30]), "2025-09-10", 1), out)

    def budget_free(source: str) -> bool:
        return _nowait(pg_url, source, "budgets", "source")

    with psycopg.connect(pg_url, autocommit=False) as other:
        other.execute("UPDATE budgets SET committed_won = committed_won + 5 WHERE source = 'district'")
        other.execute("INSERT INTO budget_days VALUES ('district', '2025-09', '2025-09-10', 5)")
        try:
            thread.start()
            wait_until(lambda: lock_waiters(pg_url), "the statement never waited for the held budget")
            assert not budget_free("city"), "the first budget was not locked before the second"
            assert budget_free("national"), "the last budget was locked before the one held"
            with psycopg.connect(pg_url, autocommit=False) as third:  # a day row written would make it wait
                third.execute("SET lock_timeout = '100ms'")
                third.execute("INSERT INTO budget_days VALUES ('city', '2025-09', '2025-09-10', 0)")
                third.rollback()
            other.commit()
        finally:
            thread.join(30)
    assert out and sorted(out[0]) == [("city", "2025-09", 10), ("district", "2025-09", 25),
                                      ("national", "2025-09", 30)]
    with psycopg.connect(pg_url) as conn:
        assert conn.execute("SELECT source, committed_won FROM budget_days ORDER BY 1").fetchall() == [
            ("city", 10), ("district", 25), ("national", 30)]
