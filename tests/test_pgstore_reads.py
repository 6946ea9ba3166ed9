"""The batch's reads on PostgreSQL come back as one statement of JSON columns
(`ledger.pgstore.SQL_BATCH_READS`, `SQL_BATCH_READS_OWED` with refunds); each part must equal what its own SELECT returns,
value for value and type for type (text with quotes and Hangul, 64-bit amounts,
booleans, NULLs), and absent parts must come back empty."""

from __future__ import annotations

import pytest

from ledger import pgstore
from ledger.db import make_engine
from tests.book_helpers import assert_book_ok, pay, put_member, put_merchant, refund, topup
from tests.conftest import at, make_api

pytestmark = pytest.mark.postgres


def _alone(conn, sql: str, *params) -> list[tuple]:
    with pgstore.driver(conn).cursor() as cur:
        cur.execute(sql, params)
        return [tuple(row) for row in cur.fetchall()]


def test_each_part_of_the_one_read_equals_its_own_select(pg_url):
    api = make_api(pg_url)
    with api.client:
        put_member(api, "m1")
        put_member(api, "m2")
        put_merchant(api, "s1")
        topup(api, "t1", "m1", 500_000, at("2025-09-01"))
        topup(api, "t2", "m2", 50_000, at("2025-09-01"))
        pay(api, "p1", "m1", "s1", 12_345, at("2025-09-02"))
        refund(api, "p1", "r1", 2_345, at("2025-09-03"))
    engine = make_engine(pg_url)
    with engine.begin() as conn:  # values the API would not take, for the JSON round trip alone
        conn.exec_driver_sql("INSERT INTO budgets (source, period, limit_won, committed_won, updated_at_us) "
                             "VALUES ('district:seo', '2025', 9000000000, 0, 0)")  # beyond 32 bits
        conn.exec_driver_sql("UPDATE merchants SET category = %s WHERE merchant_id = 's1'",
                             ('한식 "고기" \\ 집',))  # quotes, a backslash, Hangul
        conn.exec_driver_sql("INSERT INTO accounts VALUES ('receivable/m1', 'asset', NULL, 7777, true)")
    members = sorted(["m1", "m2", "m-absent"])
    text = pgstore._text_array
    try:
        with engine.begin() as conn:
            reads = pgstore.read_batch(
                conn, member_ids=members, keys_by_kind={"payment": ["p1", "p-absent"], "topup": ["t1", "t2"],
                                                        "refund": ["r1"]},
                refund_payment_ids=["p1"], months=["2025-09"], merchant_ids=["s1", "s-absent"],
                txn_ids_max=5, budget_periods=["2025-09", "2025"],
                owed_accounts=["receivable/m1", "receivable/m-absent"])
            assert sorted(map(tuple, reads.members)) == _alone(conn, pgstore.SQL_LOCK_MEMBERS, text(members))
            expected_existing = sorted((kind, row) for kind, ids in (("payment", ["p1", "p-absent"]),
                                                                      ("topup", ["t1", "t2"]), ("refund", ["r1"]))
                                       for row in _alone(conn, pgstore.SQL_EXISTING[kind], text(ids)))
            assert sorted((kind, tuple(row)) for kind, row in reads.existing) == expected_existing
            assert len(expected_existing) == 4
            for got, sql, params in (
                    (reads.balances, pgstore.SQL_BALANCES, (text(members),)),
                    (reads.payments, pgstore.SQL_PAYMENTS, (text(["p1"]),)),
                    (reads.months, pgstore.SQL_MONTHS, (text(members), text(["2025-09"]))),
                    (reads.merchants, pgstore.SQL_MERCHANTS, (text(["s1", "s-absent"]),)),
                    (reads.budgets, pgstore.SQL_BUDGETS_SNAPSHOT, (text(["2025-09", "2025"]),)),
                    (reads.owed, pgstore.SQL_OWED, (text(["receivable/m1", "receivable/m-absent"]),))):
                expected = sorted(_alone(conn, sql, *params), key=repr)
                assert expected, sql
                assert sorted(map(tuple, got), key=repr) == expected, sql
            assert 9_000_000_000 in {row[2] for row in reads.budgets}
            assert reads.merchants[0][2] == '한식 "고기" \\ 집'
            payment = dict(zip(pgstore.PAYMENT_COLUMNS, reads.payments[0]))
            assert payment["refunded_won"] == 2_345 and payment["counts_toward_month"] is True
            assert len(set(reads.txn_ids)) == 5 and all(isinstance(i, int) for i in reads.txn_ids)

            # The read's own planner settings end with it: the writes plan as the session does.
            assert conn.exec_driver_sql("SELECT current_setting('plan_cache_mode'), "
                                        "current_setting('enable_seqscan')").one() == ("auto", "on")

            nothing = pgstore.read_batch(conn, member_ids=["m1"], keys_by_kind={}, refund_payment_ids=[], months=[],
                                         merchant_ids=[], txn_ids_max=0, budget_periods=[])
            assert [tuple(m) for m in nothing.members] == _alone(conn, pgstore.SQL_LOCK_MEMBERS, text(["m1"]))
            assert nothing.existing == nothing.payments == nothing.months == nothing.merchants == []
            assert nothing.txn_ids == [] and nothing.budgets == [] and nothing.owed == []
    finally:
        engine.dispose()


# -- the statements on libpq's pipeline (ledger.pgstore.Pipeline)

def _payment_command(payment_id: str, amount: int = 10_000):
    from ledger.commands import Pay
    from rules.timeutil import to_us
    import datetime as dt

    when = to_us(dt.datetime.fromisoformat(at("2025-09-05")))
    return Pay(payment_id, "m1", "s1", amount, when, f"hash-{payment_id}-{amount}")


def test_a_failing_statement_raises_its_own_error_and_leaves_the_connection_usable(pg_url):
    """A unique violation in the middle of a pipeline comes back as psycopg's class
    (so the book's IntegrityError rules see it), the statements after it do not run,
    and the connection leaves pipeline mode, rolls back and runs the next pipeline."""
    import psycopg
    from psycopg import pq
    from sqlalchemy.exc import IntegrityError

    api = make_api(pg_url)
    with api.client:
        put_member(api, "m1")
    insert = pgstore.Statement("INSERT INTO budgets (source, period, limit_won, committed_won, updated_at_us) "
                               "SELECT s, '2030', NULL, 0, 0 FROM unnest(%s::text[]) AS s")
    engine = make_engine(pg_url)
    try:
        with engine.connect() as conn:
            raw = pgstore.driver(conn)
            with pytest.raises(IntegrityError) as caught:
                with pgstore.translated_errors():
                    pipe = pgstore.Pipeline(raw)
                    pipe.begin()
                    pipe.send(insert, ("{city}",))
                    pipe.send(insert, ("{city}",))  # the same key again: unique violation
                    pipe.send(insert, ("{national}",))  # aborted with the rest
                    pipe.run()
            assert isinstance(caught.value.orig, psycopg.errors.UniqueViolation)
            assert "statement: INSERT INTO budgets" in "".join(getattr(caught.value.orig, "__notes__", []))
            assert raw.pgconn.pipeline_status == pq.PipelineStatus.OFF
            raw.rollback()  # as the book's `engine.begin()` does on the way out
            pipe = pgstore.Pipeline(raw)
            pipe.begin()
            at_ = pipe.send(insert, ("{district:seo}",))
            pipe.command(b"COMMIT")
            results = pipe.run()
            assert results[at_].status == pq.ExecStatus.COMMAND_OK
            rows = raw.execute("SELECT source FROM budgets WHERE period = '2030' ORDER BY 1").fetchall()
            assert [r[0] for r in rows] == ["district:seo"]  # nothing of the failed pipeline stayed
    finally:
        engine.dispose()


def test_statements_deallocated_behind_the_books_back_are_prepared_again(pg_url):
    """`DEALLOCATE ALL` on the writer's connection (as psycopg sends on a rollback when it
    prepared statements of its own): the next batch finds its statements gone, and the
    book runs it again with them prepared anew; nothing is lost or written twice."""
    from ledger.book import PinnedConnection

    api = make_api(pg_url)
    with api.client:
        put_member(api, "m1")
        put_merchant(api, "s1")
        topup(api, "t1", "m1", 500_000, at("2025-09-01"))
        book = api.client.app.state.services.book
        pinned = PinnedConnection(book.engine, idle_ping_s=3600)
        try:
            first = book.execute([_payment_command("p-dealloc-1")], pinned=pinned)
            assert first[0].ok
            with pinned.begin() as conn:
                raw = pgstore.driver(conn)
                assert pgstore._SESSIONS[raw].prepared  # the batch's statements are prepared on it
                conn.exec_driver_sql("DEALLOCATE ALL")
            second = book.execute([_payment_command("p-dealloc-2")], pinned=pinned)
            assert second[0].ok and not second[0].replayed
            again = book.execute([_payment_command("p-dealloc-1")], pinned=pinned)
            assert again[0].replayed
        finally:
            pinned.close()
        history = api.get("/v1/members/m1/balance", params={"month": "2025-09"}).json()
        assert history["balances"]["charged"] + history["balances"]["points"] == (
            500_000 - 2 * 10_000 + history["month"]["cashback_earned"])


def test_the_pipeline_waits_on_a_descriptor_past_1024(pg_url):
    """A worker serving many clients holds sockets numbered past 1,024, where select()
    cannot wait; the pipeline waits with poll()."""
    import os
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 2_048:
        pytest.skip(f"the descriptor limit ({hard}) is too low for this test")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 2_048), hard))
    fillers = [os.open(os.devnull, os.O_RDONLY) for _ in range(1_100)]
    engine = make_engine(pg_url)
    try:
        with engine.begin() as conn:
            assert pgstore.driver(conn).pgconn.socket > 1_024
            reads = pgstore.read_batch(conn, member_ids=["m-none"], keys_by_kind={"payment": ["p-none"]},
                                       refund_payment_ids=[], months=["2025-09"], merchant_ids=[], txn_ids_max=2,
                                       budget_periods=[])
            assert reads.members == [] and reads.existing == [] and len(reads.txn_ids) == 2
    finally:
        engine.dispose()
        for fd in fillers:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_a_rollback_on_a_connection_that_served_reads_keeps_the_books_statements(pg_url):
    """A pooled connection that served the same query five times (a read route's) and
    then runs the book's pipeline: the batch's rollback (a lock timeout, a retried race)
    must not take the book's statements with it. psycopg prepared such a query itself,
    and on the next ROLLBACK sent DEALLOCATE ALL: the attempt after it failed as a lost
    statement, one of the batch's three attempts spent (a member lock held 10 s: the
    batch 503 at its third attempt, seen in tests/test_member_held.py's scenario)."""
    from sqlalchemy import text

    engine = make_engine(pg_url)
    try:
        with engine.connect() as conn:
            for _ in range(8):  # psycopg's threshold is 5
                conn.execute(text("SELECT count(*) FROM members WHERE member_id = :m"), {"m": "x"})
            conn.commit()
            raw = pgstore.driver(conn)
            statement = pgstore.Statement("SELECT 40 + %s::int")
            pipe = pgstore.Pipeline(raw)
            pipe.begin()
            at_ = pipe.send(statement, (1,))
            assert pipe.run()[at_].get_value(0, 0) == b"41"
            raw.rollback()  # as a batch's failed attempt ends
            pipe = pgstore.Pipeline(raw)
            pipe.begin()
            at_ = pipe.send(statement, (2,))
            assert pipe.run()[at_].get_value(0, 0) == b"42"  # not "prepared statement lost"
            raw.rollback()
    finally:
        engine.dispose()


def test_after_a_lost_statement_those_prepared_meanwhile_are_not_prepared_twice(pg_url):
    """Statement A prepared, then DEALLOCATE ALL; a pipeline that prepares a new B and
    then uses A fails as a lost statement (retryable), and the next one re-prepares A
    only: preparing B again would fail as a duplicate."""
    import psycopg
    from psycopg import pq

    a = pgstore.Statement("SELECT 1 + %s::int")
    b = pgstore.Statement("SELECT 2 + %s::int")
    engine = make_engine(pg_url)
    try:
        with engine.connect() as conn:
            raw = pgstore.driver(conn)
            pipe = pgstore.Pipeline(raw)
            pipe.send(a, (1,))
            assert pipe.run()[0].get_value(0, 0) == b"2"
            raw.rollback()
            raw.execute("DEALLOCATE ALL")
            raw.rollback()
            pipe = pgstore.Pipeline(raw)
            pipe.send(b, (1,))
            pipe.send(a, (1,))
            with pytest.raises(psycopg.OperationalError, match=pgstore.PREPARED_LOST):
                pipe.run()
            raw.rollback()
            pipe = pgstore.Pipeline(raw)
            at_b, at_a = pipe.send(b, (5,)), pipe.send(a, (5,))
            results = pipe.run()
            assert results[at_b].get_value(0, 0) == b"7" and results[at_a].get_value(0, 0) == b"6"
            assert raw.pgconn.pipeline_status == pq.PipelineStatus.OFF
    finally:
        engine.dispose()


def test_after_a_lost_statement_those_prepared_in_earlier_pipelines_are_not_forgotten(pg_url):
    """A prepared, then DEALLOCATE ALL (psycopg's last clear on a rollback); B prepared by
    a pipeline after it; then a pipeline that uses A fails as a lost statement. B still
    exists on the server: a later pipeline that uses B must not prepare it again (it
    failed as a duplicate, which is not retried, and kept failing on that connection:
    503s; the money audit of 2026-12-06i), nor run it unprepared."""
    import psycopg

    a = pgstore.Statement("SELECT 1 + %s::int")
    b = pgstore.Statement("SELECT 2 + %s::int")
    engine = make_engine(pg_url)
    try:
        with engine.connect() as conn:
            raw = pgstore.driver(conn)

            def run(statement, value):
                pipe = pgstore.Pipeline(raw)
                at = pipe.send(statement, (value,))
                try:
                    return pipe.run()[at].get_value(0, 0)
                finally:
                    raw.rollback()

            assert run(a, 1) == b"2"
            raw.execute("DEALLOCATE ALL")
            raw.rollback()
            assert run(b, 1) == b"3"
            with pytest.raises(psycopg.OperationalError, match=pgstore.PREPARED_LOST):
                run(a, 1)
            assert run(a, 2) == b"3"  # the retry
            assert run(b, 2) == b"4"
            assert run(b, 3) == b"5"
    finally:
        engine.dispose()


def test_accounts_seen_committed_are_not_inserted_again_and_a_wrong_memory_heals(pg_url, monkeypatch):
    """The book knows the non-member accounts that exist (read at its first batch, then
    those its batches commit), so a batch sends no INSERT ... ON CONFLICT for them. Were one remembered that does not exist
    (an account removed behind the service), the legs' guard refuses the batch
    (`ledger_legs_account_exists`, migration 0008), the book forgets what it remembered,
    and the retry creates the account: nothing is lost."""
    sent: list[bytes] = []
    real_send = pgstore.Pipeline.send

    def send(self, statement, params):
        sent.append(statement.name)
        return real_send(self, statement, params)

    monkeypatch.setattr(pgstore.Pipeline, "send", send)
    api = make_api(pg_url)
    with api.client:
        put_member(api, "m1")
        put_merchant(api, "s1")
        put_merchant(api, "s2")
        topup(api, "t1", "m1", 500_000, at("2025-09-01"))
        book = api.client.app.state.services.book
        sent.clear()
        assert book.execute([_payment_command("p-known-1")])[0].ok
        ensured = sent.count(pgstore.ST_ENSURE_ACCOUNTS.name)
        assert ensured == 1  # the merchant's and funders' accounts, first time
        assert "merchant/s1/payable" in book._accounts_known
        assert "merchant/s2/payable" in book._accounts_known  # registered, read with the rest
        assert not any(a.startswith("member/") for a in book._accounts_known)
        sent.clear()
        assert book.execute([_payment_command("p-known-2")])[0].ok
        assert pgstore.ST_ENSURE_ACCOUNTS.name not in sent

        with book.engine.begin() as conn:  # registered with the merchant, no legs yet: gone behind the book
            # (accounts are never deleted: the guard refuses it, so only a session that
            # skips triggers, as a restore does, can make the book's memory wrong)
            conn.exec_driver_sql("SET LOCAL session_replication_role = replica")
            conn.exec_driver_sql("DELETE FROM accounts WHERE account_id = 'merchant/s2/payable'")
        other = _payment_command("p-known-3")
        other = type(other)(other.payment_id, "m1", "s2", other.amount_won, other.occurred_at_us, "hash-p-known-3")
        sent.clear()
        outcome = book.execute([other])[0]
        assert outcome.ok and not outcome.replayed
        assert sent.count(pgstore.ST_INSERT_LEGS.name) == 2  # refused once, then written
        assert sent.count(pgstore.ST_ENSURE_ACCOUNTS.name) == 1
        assert "merchant/s2/payable" in book._accounts_known
        assert_book_ok(api)
    with make_engine(pg_url).connect() as conn:
        assert _alone(conn, "SELECT count(*) FROM payments WHERE payment_id = 'p-known-3'") == [(1,)]
        assert _alone(conn, "SELECT count(*) FROM accounts WHERE account_id = 'merchant/s2/payable'") == [(1,)]


def test_a_merchants_changed_facts_reach_the_next_batch(pg_url):
    """The book keeps merchants' facts by their row as read (`Book._merchant`): a row
    that changed (here the category, to one the policy declines) is new facts at once."""
    api = make_api(pg_url)
    with api.client:
        put_member(api, "m1")
        put_merchant(api, "s1")
        topup(api, "t1", "m1", 500_000, at("2025-09-01"))
        assert pay(api, "p1", "m1", "s1", 10_000, at("2025-09-02"))["status"] == "approved"
        put_merchant(api, "s1", category="department_store")
        second = pay(api, "p2", "m1", "s1", 10_000, at("2025-09-02"))
        assert second["status"] == "declined" and second["decline_code"] == "merchant_category_excluded"
        put_merchant(api, "s1")
        assert pay(api, "p3", "m1", "s1", 10_000, at("2025-09-02"))["status"] == "approved"
        assert len(api.services.book._merchant_facts) == 2  # the two rows s1 has had
        assert_book_ok(api)
