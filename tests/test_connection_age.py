"""A writer's kept connection is replaced after its maximum age.

PostgreSQL keeps the plan of a foreign-key check per connection until the table's
statistics change. The check of leg 0's key to its seal, planned while the statistics
say `ledger_txns` is a page (it was analyzed or vacuumed when nearly empty), is a
sequential scan; with nothing analyzing the table again (autovacuum off, as on this
project's CI machines) a connection kept for good would read the whole of `ledger_txns`
for every transaction it seals, however large the book grew. The
writers' kept connection (`PinnedConnection`) is closed for good after `max_age_s`, so
the plan lasts at most that long (docs/design.md, "Database-side guarantees")."""

from __future__ import annotations

import time

import psycopg
import pytest
from sqlalchemy import text

from ledger import pgstore
from ledger.book import PinnedConnection
from ledger.db import make_engine
from tests.book_helpers import put_member, put_merchant, topup
from tests.conftest import at, make_api

GROWN = 20_000  # transactions written behind the kept connection's back


def _backend_pid(pinned: PinnedConnection) -> int:
    with pinned.begin() as conn:
        return conn.exec_driver_sql("SELECT pg_backend_pid()").scalar_one()


@pytest.mark.postgres
def test_a_kept_connection_is_used_until_its_max_age_then_replaced(pg_url):
    engine = make_engine(pg_url)
    pinned = PinnedConnection(engine, idle_ping_s=3600, max_age_s=0.5)
    try:
        first = _backend_pid(pinned)
        assert _backend_pid(pinned) == first  # kept between batches
        time.sleep(0.6)
        replaced = _backend_pid(pinned)
        assert replaced != first
        assert _backend_pid(pinned) == replaced
        with psycopg.connect(pg_url.replace("postgresql+psycopg://", "postgresql://"), autocommit=True) as admin:
            # the old backend is gone, not parked in the pool
            alive = admin.execute("SELECT count(*) FROM pg_stat_activity WHERE pid = %s", (first,)).fetchone()[0]
        assert alive == 0
    finally:
        pinned.close()
        engine.dispose()


def _payment(payment_id: str):
    import datetime as dt

    from ledger.commands import Pay
    from rules.timeutil import to_us

    return Pay(payment_id, "m1", "s1", 1_000, to_us(dt.datetime.fromisoformat(at("2025-09-05"))), f"h-{payment_id}")


def _ledger_txns_scanned(admin: psycopg.Connection) -> int:
    admin.execute("SELECT pg_stat_clear_snapshot()")
    return admin.execute("SELECT seq_tup_read FROM pg_stat_user_tables WHERE relname = 'ledger_txns'").fetchone()[0]


def _grow_ledger(admin: psycopg.Connection, count: int) -> None:
    """`count` sealed transactions, each moving 1 won between two accounts and back
    with the next one, so every balance still equals its legs."""
    first = 10 ** 12
    a, b = (row[0] for row in admin.execute("SELECT account_id FROM accounts ORDER BY account_id LIMIT 2"))
    with admin.transaction():
        admin.execute(
            "INSERT INTO ledger_legs (txn_id, leg_no, account_id, amount_won) "
            "SELECT %(first)s + i, k, CASE WHEN (k + i) %% 2 = 0 THEN %(a)s ELSE %(b)s END, "
            "CASE k WHEN 0 THEN 1 ELSE -1 END FROM generate_series(0, %(n)s - 1) i, generate_series(0, 1) k",
            {"first": first, "a": a, "b": b, "n": count})
        admin.execute(
            "INSERT INTO ledger_txns (txn_id, kind, ref, member_id, merchant_id, occurred_at_us, business_date, "
            "recorded_at_us, leg_count) SELECT %(first)s + i, 'correction', 'grow-' || i, NULL, NULL, 0, "
            "'2025-09-01', 0, 2 FROM generate_series(0, %(n)s - 1) i", {"first": first, "n": count})


@pytest.mark.postgres
@pytest.mark.parametrize("max_age_s", [0.5])
def test_a_seal_check_planned_on_a_tiny_ledger_does_not_outlive_the_connection(pg_url, max_age_s):
    api = make_api(pg_url)
    with api.client, psycopg.connect(pg_url.replace("postgresql+psycopg://", "postgresql://"),
                                     autocommit=True) as admin:
        # Nothing analyzes the table during the test, whatever the server's autovacuum.
        admin.execute("ALTER TABLE ledger_txns SET (autovacuum_enabled = off)")
        # Statistics of an empty table, as a VACUUM right after the migrations leaves
        # them: a plan made while the table is a page reads it in order.
        admin.execute("VACUUM ANALYZE ledger_txns")
        put_member(api, "m1")
        put_merchant(api, "s1")
        topup(api, "t1", "m1", 500_000, at("2025-09-01"))
        book = api.client.app.state.services.book
        pinned = PinnedConnection(book.engine, idle_ping_s=3600, max_age_s=max_age_s)
        try:
            # The kept connection's first seal checks, while the ledger is a page: after
            # five plans made for their values PostgreSQL keeps a generic one.
            assert all(o.ok for o in book.execute([_payment(f"p-0{n}") for n in range(4)], pinned=pinned))
            _grow_ledger(admin, GROWN)
            time.sleep(max_age_s + 0.1)
            before = _ledger_txns_scanned(admin)
            outcomes = book.execute([_payment(f"p-{n}") for n in range(1, 21)], pinned=pinned)
            assert all(o.ok and not o.replayed for o in outcomes)
            with pinned.begin() as conn:  # report this backend's table statistics now
                conn.exec_driver_sql("SELECT pg_stat_force_next_flush()")
            time.sleep(0.2)
            scanned = _ledger_txns_scanned(admin) - before
        finally:
            pinned.close()
    # 20 payments seal 40 transactions; one sequential scan would read all GROWN + rows.
    assert scanned < GROWN, f"ledger_txns read sequentially: {scanned} rows"


def test_sqlite_keeps_its_connection(sqlite_url):
    """SQLite keeps no plan past a statement cache, and its writer connection is kept:
    no age applies."""
    engine = make_engine(sqlite_url)
    pinned = PinnedConnection(engine, idle_ping_s=3600, max_age_s=0.05)
    try:
        with pinned.begin() as conn:
            first = conn.connection.dbapi_connection
        time.sleep(0.1)
        with pinned.begin() as conn:
            assert conn.connection.dbapi_connection is first
    finally:
        pinned.close()
        engine.dispose()


def test_a_writer_that_cannot_get_a_connection_is_unavailable_not_a_fault(pg_url):
    """The pool exhausted when the writer takes a new connection (after a broken one, or
    its idle one handed back): SQLAlchemy's pool TimeoutError is database trouble, 503
    retry with the same id, for one command and for a batch alike. It fell through to
    the batch's "one command's fault": 500 "nothing of this request was recorded", where
    the attempt before may have committed (the connection-loss audit)."""
    from sqlalchemy.exc import TimeoutError as PoolTimeout

    from ledger.errors import Unavailable

    api = make_api(pg_url, db_pool_size=1, db_pool_timeout_s=0.2)
    with api.client:
        put_member(api, "m1")
        put_merchant(api, "s1")
        topup(api, "t1", "m1", 500_000, at("2025-09-01"))
        book = api.client.app.state.services.book
        pinned = PinnedConnection(book.engine, idle_ping_s=3600)
        held = []
        try:
            while True:  # pool_size 1 and as many overflow, less what the service holds
                held.append(book.engine.connect())
        except PoolTimeout:
            pass
        try:
            for batch in ([_payment("p-1")], [_payment("p-2"), _payment("p-3")]):
                with pytest.raises(Unavailable, match="retry with the same id"):
                    book.execute(batch, pinned=pinned)
        finally:
            for conn in held:
                conn.close()
            pinned.close()
        outcomes = book.execute([_payment("p-1"), _payment("p-2")], pinned=PinnedConnection(book.engine))
        assert all(o.ok and not o.replayed for o in outcomes)


def test_a_writer_connection_that_stops_answering_is_dropped_and_the_batch_written_again(pg_url, monkeypatch):
    """A peer that keeps the writer's connection up and answers nothing (a hung backend
    or pooler): the pipeline waited in poll() without end, past every bound, and each
    payment of the worker was a 503 for as long as it lasted (the connection-loss audit).
    It now waits the pipeline's statements' timeouts and a margin (`reply_wait_s`, here
    3 s), drops the connection and writes the batch again on a new one; the stalled
    copy, delivered late on the old connection, finds its ids taken. One payment each,
    the book whole."""
    from loadtests.faultkit import DelayProxy
    from tests.book_helpers import assert_book_ok

    port = int(pg_url.rsplit(":", 1)[1].split("/", 1)[0])
    proxy = DelayProxy(port)
    url = pg_url.replace(f":{port}/", f":{proxy.port}/")
    bound_s = 3.0
    monkeypatch.setattr(pgstore.Pipeline, "reply_wait_s", lambda self: bound_s)
    stall_s = bound_s + 6
    api = make_api(url, db_statement_timeout_ms=1_000, request_timeout_ms=1_000, batch_writers=1)
    try:
        with api.client:
            put_member(api, "m1")
            put_merchant(api, "s1")
            topup(api, "t1", "m1", 500_000, at("2025-09-01"))

            def pay(payment_id: str):
                return api.post("/v1/payments", {"payment_id": payment_id, "member_id": "m1", "merchant_id": "s1",
                                                 "amount": 1_000, "occurred_at": at("2025-09-15")})

            proxy.delay_s = stall_s  # the writer's next chunk is held this long; then no more delay
            started = time.monotonic()
            first = pay("p0")
            proxy.delay_s = 0.0
            assert first.status_code == 503, first.text
            time.sleep(max(0.0, bound_s + 1.5 - (time.monotonic() - started)))
            second = pay("p1")
            assert time.monotonic() - started < stall_s, "the test's stall ended before the second payment"
            assert second.status_code == 201, second.text
            again = pay("p0")  # the card app's retry: written by the writer's own retry, or now
            assert again.status_code in (200, 201), again.text
            time.sleep(max(0.0, stall_s + 1 - (time.monotonic() - started)))  # the stalled copy arrives
            assert pay("p0").status_code == 200
            assert_book_ok(api)
            payments = api.get("/v1/members/m1/transactions", role="card-app").json()["items"]
            assert sorted(i["ref"] for i in payments if i["kind"] == "payment") == ["p0", "p1"], payments
    finally:
        proxy.close()


def test_a_pipeline_whose_statements_each_end_in_time_is_not_a_stall(pg_url):
    """The server sends a pipeline's results at its sync, so the writer's wait spans all
    its statements: bounded by one statement timeout and the margin, 7 statements of
    0.9 s under a 1 s timeout were taken for a stalled connection and dropped (the review
    of that change). The bound is the statements' timeouts together and the margin."""
    engine = make_engine(pg_url, statement_timeout_ms=1_000)
    try:
        with engine.connect() as conn:
            assert conn.execute(text("SHOW statement_timeout")).scalar_one() == "1s"
            conn.rollback()
            raw = pgstore.driver(conn)
            pipe = pgstore.Pipeline(raw)
            pipe.begin()
            for _ in range(7):  # each 0.9 s: inside the 1 s statement timeout; 6.3 s in all
                pipe.command(b"SELECT pg_sleep(0.9)")
            pipe.command(b"COMMIT")
            started = time.monotonic()
            try:
                results = pipe.run()
            except pgstore.NoReply as error:
                pytest.fail(f"NoReply after {time.monotonic() - started:.1f} s though the server answered "
                            f"every statement within its statement timeout: {error}")
            assert len(results) >= 8  # the sleeps and COMMIT (and a BEGIN, if none was open)
    finally:
        engine.dispose()
