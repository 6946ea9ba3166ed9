"""The hot path's performance changes keep the contract and the book's guarantees:
the ASGI fast path answers exactly as the FastAPI route does and hands every unusual
request to it; the legs' guard still refuses a leg on a sealed transaction, a leg that
names no account and a leg that no seal would cover (migration 0008's per-statement and
per-transaction checks in place of two per-leg keys); a budget that binds is decided on
locked rows and never overspent; the fast path's fingerprints are the route's, and its
request ids unique."""

from __future__ import annotations

import datetime as dt

import orjson
import psycopg
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.conftest import at, make_api


def _setup(api, budget: int | None = None):
    body = {"name": "Shop", "district": "seo", "category": "restaurant", "annual_sales": 100_000_000,
            "registered_from": "2019-01-01"}
    assert api.put("/v1/merchants/s1", body).status_code == 201
    for member in ("m1", "m2"):
        assert api.put(f"/v1/members/{member}", {"district": "seo"}).status_code == 201
        r = api.post("/v1/topups", {"topup_id": f"t-{member}", "member_id": member, "amount": 1_000_000,
                                    "occurred_at": at("2025-11-03")})
        assert r.status_code == 201, r.text
    if budget is not None:
        for source in ("city", "national"):
            r = api.put(f"/v1/budgets/{source}/2025-11", {"amount": budget}, role="policy-editor")
            assert r.status_code == 200, r.text


def _pay(api, payment_id: str, amount: int = 17_000, **extra):
    body = {"payment_id": payment_id, "member_id": "m1", "merchant_id": "s1", "amount": amount,
            "occurred_at": at("2025-11-14")}
    body.update(extra)
    return api.post("/v1/payments", body)


@pytest.mark.postgres
def test_fast_path_answers_as_the_route_does(pg_url):
    fast = make_api(pg_url)
    slow = make_api(pg_url, api_fast_path=False)
    with fast.client, slow.client:
        _setup(fast)
        a = _pay(fast, "p-fast")
        b = _pay(slow, "p-slow", member_id="m2")
        assert a.status_code == b.status_code == 201
        assert a.headers["content-type"] == b.headers["content-type"]
        body_a, body_b = a.json(), b.json()
        for body in (body_a, body_b):
            body.pop("payment_id"), body.pop("member_id")
        assert body_a == body_b
        # Replays and conflicts, whichever path first saw the id.
        for api in (fast, slow):
            again = _pay(api, "p-fast")
            assert again.status_code == 200 and again.headers["idempotent-replayed"] == "true"
            assert again.json()["payment_id"] == "p-fast"
            conflict = _pay(api, "p-slow", amount=1, member_id="m2")
            assert conflict.status_code == 409 and conflict.json()["code"] == "idempotency_conflict"


@pytest.mark.postgres
def test_fast_path_hands_unusual_requests_to_the_route(pg_url):
    api = make_api(pg_url)
    with api.client:
        _setup(api)
        bad = _pay(api, "p-bad", amount=1.5)
        assert bad.status_code == 422 and bad.json()["code"] == "validation_error"
        assert "amount" in bad.json()["detail"]
        extra = _pay(api, "p-extra", tip=1)
        assert extra.status_code == 422
        body = {"payment_id": "p-noauth", "member_id": "m1", "merchant_id": "s1", "amount": 1000,
                "occurred_at": at("2025-11-14")}
        assert api.client.post("/v1/payments", json=body).status_code == 401
        assert api.post("/v1/payments", body, role="finance").status_code == 403
        assert api.client.post("/v1/payments", content=b"{not json", headers={
            **api.h(), "content-type": "application/json"}).status_code == 422
        assert api.client.post("/v1/payments", data={"a": "b"}, headers=api.h()).status_code == 422
        ok = api.post("/v1/payments", body)
        assert ok.status_code == 201 and ok.headers.get("x-request-id")


@pytest.mark.postgres
def test_a_content_type_that_only_starts_like_json_is_the_routes_422_on_either_path(pg_url):
    """`application/jsonx` or `application/json-seq` was paid on the fast path (a prefix
    test), where the route reads no JSON from such a body and answers 422: over HTTP the
    same request was a 201 or a 422 by whether the worker had the key cached yet."""
    fast = make_api(pg_url)
    slow = make_api(pg_url, api_fast_path=False)
    with fast.client, slow.client:
        _setup(fast)  # the key is cached: what follows is the fast path's to take or hand on
        def pay(api, payment_id: str, content_type: str):
            body = {"payment_id": payment_id, "member_id": "m1", "merchant_id": "s1", "amount": 1000,
                    "occurred_at": at("2025-11-14")}
            return api.client.post("/v1/payments", content=orjson.dumps(body),
                                   headers={**api.h(), "content-type": content_type})

        for n, api in enumerate((fast, slow)):
            for content_type in ("application/jsonx", "application/json-seq", "application/json5; charset=utf-8"):
                r = pay(api, f"p-ct-{n}", content_type)
                assert r.status_code == 422, (n, content_type, r.text)
                assert f"the Content-Type sent: {content_type.split(';')[0]}" in r.json()["detail"], r.text
            assert api.get(f"/v1/payments/p-ct-{n}").status_code == 404  # nothing recorded
        for n, content_type in enumerate(("application/json", "application/json; charset=utf-8",
                                          "Application/JSON", "application/problem+json")):
            r = pay(fast, f"p-json-{n}", content_type)
            assert r.status_code == 201, (content_type, r.text)


@pytest.mark.postgres
def test_two_authorization_headers_are_judged_by_the_route_on_either_path(pg_url):
    """The fast path read a request's last Authorization header (a dict of the ASGI
    header list), the route its first (Starlette's `headers.get`): a bad key then a
    card-app key was paid on the fast path and 401 on the route, and an unrecognised
    key after a good one was a 201 only where the fast path was off (card-app audit).
    Such a request now goes the route's way on both paths, as any other unusual one."""
    fast = make_api(pg_url)
    slow = make_api(pg_url, api_fast_path=False)
    with fast.client, slow.client:
        _setup(fast)
        for n, api in enumerate((fast, slow)):
            body = {"payment_id": f"p-two-keys-{n}", "member_id": "m1", "merchant_id": "s1", "amount": 1000,
                    "occurred_at": at("2025-11-14")}
            good = api.h()["Authorization"]
            first_bad = api.client.post("/v1/payments", json=body, headers=[
                ("authorization", "Bearer eum_not_a_key"), ("authorization", good)])
            assert first_bad.status_code == 401, (n, first_bad.text)
            first_good = api.client.post("/v1/payments", json=body, headers=[
                ("authorization", good), ("authorization", "Bearer eum_not_a_key")])
            assert first_good.status_code == 201, (n, first_good.text)


def _accounts(conn) -> None:
    conn.execute("INSERT INTO accounts VALUES ('operator/cash', 'asset', NULL, 0, false), "
                 "('member/x/charged', 'liability', 'x', 0, true)")
    conn.commit()


@pytest.mark.postgres
def test_sealed_guard_still_refuses_a_leg_on_a_sealed_transaction(pg_url):
    with psycopg.connect(pg_url) as conn:
        _accounts(conn)
        conn.execute("INSERT INTO ledger_legs VALUES (1, 0, 'operator/cash', 5), (1, 1, 'member/x/charged', -5)")
        conn.execute("INSERT INTO ledger_txns (txn_id, kind, ref, occurred_at_us, business_date, recorded_at_us, "
                     "leg_count) VALUES (1, 'topup', 't', 0, '2025-11-14', 0, 2)")
        conn.commit()
        with pytest.raises(psycopg.errors.CheckViolation, match="already sealed"):
            conn.execute("INSERT INTO ledger_legs VALUES (1, 2, 'operator/cash', 1)")
        conn.rollback()
        with pytest.raises(psycopg.errors.CheckViolation, match="unbalanced"):
            conn.execute("INSERT INTO ledger_legs VALUES (2, 0, 'operator/cash', 5), (2, 1, 'member/x/charged', -4)")
            conn.execute("INSERT INTO ledger_txns (txn_id, kind, ref, occurred_at_us, business_date, recorded_at_us, "
                         "leg_count) VALUES (2, 'topup', 't2', 0, '2025-11-14', 0, 2)")


def _seal(conn, first: int, count: int) -> None:
    """`count` balanced two-leg transactions from id `first` over 20 business days, in
    one statement each."""
    conn.execute("INSERT INTO ledger_legs SELECT i, l, CASE l WHEN 0 THEN 'operator/cash' ELSE 'member/x/charged' END, "
                 "CASE l WHEN 0 THEN 5 ELSE -5 END FROM generate_series(%s::int8, %s::int8) i, "
                 "generate_series(0, 1) l", (first, first + count - 1))
    conn.execute("INSERT INTO ledger_txns (txn_id, kind, ref, occurred_at_us, business_date, recorded_at_us, "
                 "leg_count) SELECT i, 'topup', 't' || i, 0, '2025-11-' || (10 + i %% 20), 0, 2 "
                 "FROM generate_series(%s::int8, %s::int8) i", (first, first + count - 1))


@pytest.mark.postgres
def test_sealed_guard_plans_for_the_ledger_as_it_is_not_as_it_was(pg_url):
    """A plpgsql plan is made at the guard's first call on a connection and kept until
    the table's statistics change. Made while the ledger was tiny (analysed empty), the
    guards of migrations 0004 (ids as an array) and of a LATERAL probe read the whole
    (business_date, txn_id) index on every later batch of legs; planned per call
    (migration 0007), the guard probes the primary key. Since migration 0024 only that
    probe is planned per call, and only legs whose leg 0 came in an earlier statement
    need it; the accounts' anti-join is planned once, with nested loops only."""
    with psycopg.connect(pg_url) as conn:
        _accounts(conn)
        conn.execute("ANALYZE ledger_txns")  # as autovacuum may, on a new book
        conn.execute("ANALYZE accounts")
        for first in range(1, 8):  # the guards' plans are made here (a kept plan after five calls)
            _seal(conn, first, 1)
            conn.commit()
            # and the plans of the path that probes the seals: leg 0, then the others
            conn.execute("INSERT INTO ledger_legs VALUES (%s, 0, 'operator/cash', 5)", (20_000 + first,))
            conn.execute("INSERT INTO ledger_legs VALUES (%s, 1, 'member/x/charged', -5)", (20_000 + first,))
            conn.execute(TXN, (20_000 + first, 20_000 + first, 2))
            conn.commit()
        # The ledger grows under the cached plans (5,000 transactions: each is checked
        # at ~0.6 ms, and 20,000 took 13 s of CI's 15 minutes for the same verdict)
        _seal(conn, 8, 5_000)
        conn.execute("INSERT INTO accounts SELECT 'member/m' || i || '/charged', 'liability', 'm' || i, 0, true "
                     "FROM generate_series(1, 5000) i")  # and the accounts
        conn.commit()
        fetched = "SELECT pg_stat_get_xact_blocks_fetched(%s::regclass)"  # this backend's counts not yet reported
        indexes = ("ix_ledger_txns_date_txn", "ix_accounts_owner")
        before = [conn.execute(fetched, (index,)).fetchone()[0] for index in indexes]
        conn.execute("INSERT INTO ledger_legs VALUES (10001, 0, 'operator/cash', 5), "
                     "(10001, 1, 'member/x/charged', -5)")
        # legs after their leg 0, in a statement of their own: the one path that probes
        # `ledger_txns` (migration 0024)
        conn.execute("INSERT INTO ledger_legs VALUES (10002, 0, 'operator/cash', 5)")
        conn.execute("INSERT INTO ledger_legs VALUES (10002, 1, 'member/x/charged', -5)")
        read = [conn.execute(fetched, (index,)).fetchone()[0] - b for index, b in zip(indexes, before)]
        # At most the metapage, which the planner reads for the tree's height when the
        # table's cached description was reset (autovacuum's analyse after the growth);
        # a scan of either index reads every block of it, and each has far more than one.
        sizes = [conn.execute("SELECT pg_relation_size(%s::regclass) / 8192", (index,)).fetchone()[0]
                 for index in indexes]
        assert all(size >= 10 for size in sizes), sizes
        assert all(blocks <= 1 for blocks in read), f"the legs' guard read {read} blocks of {indexes} ({sizes})"
        with pytest.raises(psycopg.errors.CheckViolation, match="already sealed"):
            conn.execute("INSERT INTO ledger_legs VALUES (10001, 2, 'operator/cash', 1), (17, 2, 'operator/cash', 1)")
        conn.rollback()
        # a second leg 0 for a sealed transaction: the primary key refuses it
        with pytest.raises(psycopg.errors.UniqueViolation, match="ledger_legs"):
            conn.execute("INSERT INTO ledger_legs VALUES (17, 0, 'operator/cash', 1), (17, 2, 'operator/cash', -1)")
        conn.rollback()
        # planned once (migration 0024), nested loops only: the probe alone is planned per call
        setting = conn.execute("SELECT proconfig FROM pg_proc WHERE proname = 'ledger_legs_check'").fetchone()
        assert sorted(setting[0]) == ["enable_hashjoin=off", "enable_mergejoin=off", "enable_seqscan=off"]
        setting = conn.execute("SELECT proconfig FROM pg_proc WHERE proname = 'ledger_txns_any_sealed'").fetchone()
        assert sorted(setting[0]) == ["enable_seqscan=off", "plan_cache_mode=force_custom_plan"]
        setting = conn.execute("SELECT proconfig FROM pg_proc WHERE proname = 'ledger_accounts_missing'").fetchone()
        assert setting[0] == ["enable_seqscan=off"]


TXN = ("INSERT INTO ledger_txns (txn_id, kind, ref, occurred_at_us, business_date, recorded_at_us, leg_count) "
       "VALUES (%s, 'topup', 't' || %s::text, 0, '2025-11-14', 0, %s)")



def _one_sealed(pg_url: str) -> None:
    """The two accounts and one sealed two-leg transaction (id 1), committed."""
    with psycopg.connect(pg_url) as conn:
        _accounts(conn)
        conn.execute("INSERT INTO ledger_legs VALUES (1, 0, 'operator/cash', 5), (1, 1, 'member/x/charged', -5)")
        conn.execute(TXN, (1, 1, 2))
        conn.commit()

def _legs_count(conn) -> int:
    return conn.execute("SELECT count(*) FROM ledger_legs").fetchone()[0]


@pytest.mark.postgres
def test_legs_name_existing_accounts_checked_per_statement(pg_url):
    """Migration 0008: the accounts a statement's legs name are looked up together, at the
    statement (no per-leg key at COMMIT); the error names the guard and the account."""
    with psycopg.connect(pg_url) as conn:
        _accounts(conn)
        with pytest.raises(psycopg.errors.ForeignKeyViolation,
                           match=r"ledger_legs_account_exists.*merchant/nobody/payable") as caught:
            conn.execute("INSERT INTO ledger_legs VALUES (1, 0, 'operator/cash', 5), "
                         "(1, 1, 'merchant/nobody/payable', -5)")
        assert caught.value.diag.constraint_name == "ledger_legs_account_exists"
        conn.rollback()
        # inserted before the legs in the same transaction: found
        conn.execute("INSERT INTO accounts VALUES ('merchant/s1/payable', 'liability', NULL, 0, false)")
        conn.execute("INSERT INTO ledger_legs VALUES (1, 0, 'operator/cash', 5), (1, 1, 'merchant/s1/payable', -5)")
        conn.execute(TXN, (1, 1, 2))
        conn.commit()
        assert _legs_count(conn) == 2


@pytest.mark.postgres
def test_accounts_are_never_deleted_nor_renamed(pg_url):
    """What the legs' foreign key to accounts guarded, now a guard of its own (0008)."""
    with psycopg.connect(pg_url) as conn:
        _accounts(conn)
        for statement in ("DELETE FROM accounts WHERE account_id = 'member/x/charged'", "TRUNCATE accounts CASCADE",
                          "UPDATE accounts SET account_id = 'member/y/charged' WHERE account_id = 'member/x/charged'"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege, match="never deleted nor renamed"):
                conn.execute(statement)
            conn.rollback()
        conn.execute("UPDATE accounts SET balance_won = 3 WHERE account_id = 'operator/cash'")  # balances move
        conn.commit()
        assert conn.execute("SELECT count(*) FROM accounts").fetchone()[0] == 2


@pytest.mark.postgres
def test_every_leg_is_sealed_by_commit_through_its_leg_0(pg_url):
    """Migration 0008: one deferred key per transaction (leg 0 to its seal) instead of one
    per leg, and no leg without a leg 0 beside it, so no leg can stay unsealed."""
    with psycopg.connect(pg_url) as conn:
        _accounts(conn)
        # legs with no seal: refused at COMMIT, by leg 0's key
        conn.execute("INSERT INTO ledger_legs VALUES (1, 0, 'operator/cash', 5), (1, 1, 'member/x/charged', -5)")
        with pytest.raises(psycopg.errors.ForeignKeyViolation, match="fk_ledger_legs_seal_txn_id_ledger_txns"):
            conn.commit()
        # legs without a leg 0 (which would carry no key to a seal): refused at once
        with pytest.raises(psycopg.errors.CheckViolation, match="start with leg 0"):
            conn.execute("INSERT INTO ledger_legs VALUES (2, 1, 'operator/cash', 5), (2, 2, 'member/x/charged', -5)")
        conn.rollback()
        # a statement holding leg 0 of one transaction but not of another: refused
        with pytest.raises(psycopg.errors.CheckViolation, match="start with leg 0"):
            conn.execute("INSERT INTO ledger_legs VALUES (3, 0, 'operator/cash', 5), (3, 1, 'member/x/charged', -5), "
                         "(4, 1, 'operator/cash', 5), (4, 2, 'member/x/charged', -5)")
        conn.rollback()
        # leg by leg, leg 0 first, then sealed: accepted (leg 0 found in the table)
        conn.execute("INSERT INTO ledger_legs VALUES (5, 0, 'operator/cash', 5)")
        conn.execute("INSERT INTO ledger_legs VALUES (5, 1, 'member/x/charged', -5)")
        conn.execute(TXN, (5, 5, 2))
        conn.commit()
        # leg 0 of another session's open transaction is not visible: refused
        with psycopg.connect(pg_url) as other:
            other.execute("INSERT INTO ledger_legs VALUES (6, 0, 'operator/cash', 5)")
            with pytest.raises(psycopg.errors.CheckViolation, match="start with leg 0"):
                conn.execute("INSERT INTO ledger_legs VALUES (6, 1, 'member/x/charged', -5)")
            conn.rollback()
            other.rollback()
        assert _legs_count(conn) == 2
        assert conn.execute("SELECT seal_txn_id FROM ledger_legs ORDER BY leg_no").fetchall() == [(5,), (None,)]


@pytest.mark.postgres
def test_migration_0008_goes_down_to_the_per_leg_keys_and_up_again(pg_url):
    """Downgrade to 0007 restores both per-leg keys over the legs already written (they
    validate), and the upgrade brings the per-statement guard back."""
    from alembic import command

    from ledger.db import alembic_config, migrate

    _one_sealed(pg_url)
    command.downgrade(alembic_config(pg_url), "0007")
    keys = "SELECT conname FROM pg_constraint WHERE conrelid = 'ledger_legs'::regclass AND contype = 'f' ORDER BY 1"
    with psycopg.connect(pg_url) as conn:
        assert [r[0] for r in conn.execute(keys)] == ["fk_ledger_legs_account_id_accounts",
                                                     "fk_ledger_legs_txn_id_ledger_txns"]
        conn.execute("INSERT INTO ledger_legs VALUES (2, 1, 'operator/cash', 5), (2, 2, 'member/x/charged', -5)")
        with pytest.raises(psycopg.errors.ForeignKeyViolation, match="fk_ledger_legs_txn_id_ledger_txns"):
            conn.commit()
    migrate(pg_url)
    with psycopg.connect(pg_url) as conn:
        assert [r[0] for r in conn.execute(keys)] == ["fk_ledger_legs_seal_txn_id_ledger_txns"]
        assert conn.execute("SELECT seal_txn_id FROM ledger_legs ORDER BY leg_no").fetchall() == [(1,), (None,)]
        with pytest.raises(psycopg.errors.ForeignKeyViolation, match="ledger_legs_account_exists"):
            conn.execute("INSERT INTO ledger_legs VALUES (2, 0, 'operator/cash', 5), (2, 1, 'member/z/charged', -5)")


@pytest.mark.postgres
def test_migration_0024_goes_down_and_up_and_refuses_a_transaction_without_leg_0(pg_url):
    """0024 drops the sealed probe where every transaction has its leg 0 in the
    statement, relying on each sealed transaction having one: its upgrade counts them,
    and refuses a book where one has none (written with the guards off, as no writer of
    the book does). Down to 0023 the guard is 0008's again, with its settings."""
    from alembic import command

    from ledger.db import alembic_config, migrate

    _one_sealed(pg_url)
    command.downgrade(alembic_config(pg_url), "0023")
    settings = "SELECT proconfig FROM pg_proc WHERE proname = 'ledger_legs_check'"
    with psycopg.connect(pg_url) as conn:
        assert sorted(conn.execute(settings).fetchone()[0]) == ["enable_seqscan=off",
                                                                "plan_cache_mode=force_custom_plan"]
        assert conn.execute("SELECT count(*) FROM pg_proc WHERE proname = 'ledger_txns_any_sealed'").fetchone()[0] == 0
        with pytest.raises(psycopg.errors.CheckViolation, match="already sealed"):
            conn.execute("INSERT INTO ledger_legs VALUES (1, 2, 'operator/cash', 1)")
        conn.rollback()
        # a transaction sealed with legs 1 and 2 and no leg 0, past the guards
        conn.execute("SET session_replication_role = replica")  # triggers and keys off, this session
        conn.execute("INSERT INTO ledger_legs VALUES (2, 1, 'operator/cash', 5), (2, 2, 'member/x/charged', -5)")
        conn.execute(TXN, (2, 2, 2))
        conn.commit()
    with pytest.raises(Exception, match="2 transactions but 1 legs 0"):
        migrate(pg_url)
    with psycopg.connect(pg_url) as conn:
        assert sorted(conn.execute(settings).fetchone()[0]) == ["enable_seqscan=off",
                                                                "plan_cache_mode=force_custom_plan"]
        conn.execute("SET session_replication_role = replica")
        conn.execute("DELETE FROM ledger_legs WHERE txn_id = 2")
        conn.execute("DELETE FROM ledger_txns WHERE txn_id = 2")
        conn.commit()
    migrate(pg_url)
    with psycopg.connect(pg_url) as conn:
        assert sorted(conn.execute(settings).fetchone()[0]) == ["enable_hashjoin=off", "enable_mergejoin=off",
                                                                "enable_seqscan=off"]
        with pytest.raises(psycopg.errors.CheckViolation, match="already sealed"):
            conn.execute("INSERT INTO ledger_legs VALUES (1, 2, 'operator/cash', 1)")
        conn.rollback()
        with pytest.raises(psycopg.errors.ForeignKeyViolation, match="ledger_legs_account_exists.*member/z/charged"):
            conn.execute("INSERT INTO ledger_legs VALUES (3, 0, 'operator/cash', 5), (3, 1, 'member/z/charged', -5)")


@pytest.mark.postgres
def test_the_leg_0_check_is_no_loop_per_transaction_on_an_empty_books_statistics(pg_url):
    """The tables analyzed empty (a fresh book, autovacuum off), then 20,000 sealed
    transactions: the check's plan has no nested loop, and it names what is missing.
    Written as NOT EXISTS it was a nested loop over a scan of the legs, and a lunch-peak
    run's check (27,582 transactions) ran past the 5-s statement timeout."""
    from sqlalchemy.dialects import postgresql

    from ledger.db import make_engine
    from ledger.queries import txns_without_leg_0

    with psycopg.connect(pg_url) as conn:
        _accounts(conn)
        conn.execute("ANALYZE ledger_txns, ledger_legs")
        conn.execute("SET session_replication_role = replica")  # triggers and keys off, this session
        conn.execute("INSERT INTO ledger_legs SELECT g, n, CASE n WHEN 0 THEN 'operator/cash' ELSE 'member/x/charged' "
                     "END, CASE n WHEN 0 THEN 5 ELSE -5 END FROM generate_series(1, 20000) g, generate_series(0, 1) n "
                     "WHERE NOT (g = 777 AND n = 0)")
        conn.execute("INSERT INTO ledger_txns (txn_id, kind, ref, occurred_at_us, business_date, recorded_at_us, "
                     "leg_count) SELECT g, 'topup', 't' || g, 0, '2025-11-14', 0, 2 FROM generate_series(1, 20000) g")
        conn.commit()
        query = txns_without_leg_0()
        sql = str(query.compile(dialect=postgresql.dialect(), compile_kwargs={"literal_binds": True}))
        plan = "\n".join(row[0] for row in conn.execute("EXPLAIN " + sql))
    assert "Nested Loop" not in plan, plan
    engine = make_engine(pg_url)
    try:
        with engine.connect() as conn:
            assert conn.execute(query).scalars().all() == [777]
    finally:
        engine.dispose()


@pytest.mark.postgres
def test_the_book_check_names_a_transaction_without_leg_0(pg_url):
    """What migration 0024's guard relies on is one of the book's checks: a transaction
    written past the guards with legs 1 and 2 only is named; the book is otherwise whole."""
    from ledger.db import make_engine
    from ledger.queries import check_book

    _one_sealed(pg_url)
    with psycopg.connect(pg_url) as conn:
        conn.execute("UPDATE accounts SET balance_won = 5")
        conn.commit()
    engine = make_engine(pg_url)
    try:
        with engine.connect() as conn:
            checks = {c.name: c for c in check_book(conn)}
        assert checks["every transaction has its leg 0"].ok
        with psycopg.connect(pg_url) as conn:
            conn.execute("SET session_replication_role = replica")  # triggers and keys off, this session
            conn.execute("INSERT INTO ledger_legs VALUES (2, 1, 'operator/cash', 5), (2, 2, 'member/x/charged', -5)")
            conn.execute(TXN, (2, 2, 2))
            conn.execute("UPDATE accounts SET balance_won = 10")
            conn.commit()
        with engine.connect() as conn:
            checks = {c.name: c for c in check_book(conn)}
        assert not checks["every transaction has its leg 0"].ok
        assert checks["every transaction has its leg 0"].detail == "without: [2]"
        assert checks["transactions balance"].ok and checks["balances equal their legs"].ok
    finally:
        engine.dispose()


@pytest.mark.postgres
def test_a_binding_budget_is_decided_on_locked_rows(pg_url):
    """Budgets are read without a lock; a batch in which one binds runs again locked,
    so it pays exactly what is left (partial) and the budget ends at its limit."""
    api = make_api(pg_url)
    with api.client:
        _setup(api, budget=2_500)
        paid = [_pay(api, f"p{i}", amount=10_000).json() for i in range(4)]
        cashback = [p["cashback"]["amount"] for p in paid]
        assert all(p["status"] == "approved" for p in paid)
        budgets = {(b["source"], b["period"]): b for b in api.get("/v1/budgets", role="finance").json()["budgets"]}
        assert budgets[("city", "2025-11")]["committed"] <= 2_500
        assert budgets[("national", "2025-11")]["committed"] <= 2_500
        assert sum(cashback) < 4 * 1_000  # the budget bound: less than 10% of 40,000
    from ledger.db import make_engine
    from ledger.queries import check_book

    engine = make_engine(pg_url)
    with engine.connect() as conn:
        assert all(r.ok for r in check_book(conn)), check_book(conn)
    engine.dispose()


def _allocator_conf(env: dict) -> str:
    import subprocess
    import sys

    code = "import eum, os, polars; print(os.environ['_RJEM_MALLOC_CONF'])"
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          check=True).stdout.strip()


def test_eum_gives_polars_allocator_a_decay_before_polars_loads_and_keeps_a_users_own():
    import os

    import eum

    # polars puts its own defaults (a 0.5 s decay) first and what it found after them;
    # jemalloc takes the last value of each option.
    env = {k: v for k, v in os.environ.items() if k != "_RJEM_MALLOC_CONF"}
    assert eum.ALLOCATOR_CONF == "dirty_decay_ms:30000,muzzy_decay_ms:30000"
    assert _allocator_conf(env).endswith("," + eum.ALLOCATOR_CONF)
    own = _allocator_conf({**env, "_RJEM_MALLOC_CONF": "dirty_decay_ms:0"})
    assert own.endswith(",dirty_decay_ms:0") and "30000" not in own


_ids = st.text(alphabet="ABCxyz019._:-", min_size=1, max_size=64)
_times = st.builds(lambda moment, minutes: (moment.replace(tzinfo=dt.timezone(dt.timedelta(minutes=minutes)))
                                            .isoformat(timespec="microseconds")),
                   # a day inside the book's span at each end: any offset keeps the Seoul time in it
                   st.datetimes(min_value=dt.datetime(2000, 1, 2), max_value=dt.datetime(2099, 12, 30)),
                   st.integers(min_value=-12 * 60, max_value=14 * 60))


@settings(max_examples=120, deadline=None)
@given(payment_id=_ids, member_id=_ids, merchant_id=_ids, amount=st.integers(1, 10**12), occurred_at=_times)
def test_fast_path_fingerprints_are_the_routes(payment_id, member_id, merchant_id, amount, occurred_at):
    """The route, the fast path and `eum payments replay` build payments' and top-ups'
    fingerprints from the fields (`cardapp.payment_command`, `topup_command`); they must
    equal the generic `_fingerprint` (from `model_dump`, as refunds' still are and as
    every stored request hash was made), or a resend would be an `idempotency_conflict`."""
    from api.cardapp import _fingerprint
    from api.cardfast import _command
    from api.schemas import PaymentIn, TopupIn
    from ledger.commands import Pay, TopUp
    from rules.timeutil import to_us

    payment = {"payment_id": payment_id, "member_id": member_id, "merchant_id": merchant_id, "amount": amount,
               "occurred_at": occurred_at}
    body = PaymentIn.model_validate(payment)
    assert _command("payment", orjson.dumps(payment)) == Pay(payment_id, member_id, merchant_id, amount,
                                                            to_us(body.occurred_at), _fingerprint("payment", body))
    topup = {"topup_id": payment_id, "member_id": member_id, "amount": amount, "occurred_at": occurred_at}
    body = TopupIn.model_validate(topup)
    assert _command("topup", orjson.dumps(topup)) == TopUp(payment_id, member_id, amount, to_us(body.occurred_at),
                                                           _fingerprint("topup", body))


def test_request_ids_are_unique_per_process_and_drawn_again_after_a_fork(monkeypatch):
    from api import requestids

    first = [requestids.new_request_id() for _ in range(1_000)]
    assert len(set(first)) == 1_000 and all(len(i) == 32 and int(i, 16) >= 0 for i in first)
    assert len({i[:20] for i in first}) == 1  # one prefix per process, then the counter
    monkeypatch.setattr(requestids.os, "getpid", lambda: -42)  # as in a forked child
    child = requestids.new_request_id()
    assert child[:20] != first[0][:20] and child not in first


def test_benchmark_cpu_sample_divides_each_partys_cpu_and_wal_by_the_requests_served():
    from loadtests.harness import CpuSample

    before = CpuSample(workers=10.0, postgres=5.0, children=1.0, busy=100.0, idle=50.0, commands=300.0, batches=10.0,
                       wal_bytes=1e6, wal_records=100.0, wal_fpi=3.0)
    after = CpuSample(workers=10.5, postgres=5.2, children=1.05, busy=101.0, idle=50.25, commands=1300.0, batches=35.0,
                      wal_bytes=4.3e6, wal_records=25_100.0, wal_fpi=503.0)
    cpu = before.per_request(after, 1000)
    assert cpu["workers"] == pytest.approx(500.0)
    assert cpu["postgres"] == pytest.approx(200.0)
    assert cpu["children"] == pytest.approx(50.0)
    assert cpu["machine"] == pytest.approx(1000.0)
    assert cpu["idle"] == pytest.approx(0.2)
    assert cpu["batch_mean"] == pytest.approx(40.0)
    assert (cpu["wal_bytes"], cpu["wal_records"], cpu["wal_fpi"]) == pytest.approx((3300.0, 25.0, 0.5))
    # The floor app counts no batches; nothing served divides by one, not zero.
    assert before.per_request(CpuSample(10.0, 5.0, 1.0, 100.0, 50.0, 300.0, 10.0), 0)["batch_mean"] is None
