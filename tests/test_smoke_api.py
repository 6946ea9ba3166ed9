"""The contract's basic round trip, on SQLite and PostgreSQL."""

import pytest

from tests.book_helpers import assert_problem
from tests.conftest import at


def setup_shop(api, merchant_id="shop-1", district="seo", sales=100_000_000, category="restaurant", **extra):
    body = {"name": "Shop", "district": district, "category": category, "annual_sales": sales,
            "registered_from": "2019-01-01", **extra}
    assert api.put(f"/v1/merchants/{merchant_id}", body).status_code in (200, 201)


def test_topup_pay_refund_balance(api):
    assert api.put("/v1/members/m1", {"district": "seo"}).status_code == 201
    setup_shop(api)
    r = api.post("/v1/topups", {"topup_id": "t1", "member_id": "m1", "amount": 100_000, "occurred_at": at("2025-09-15")})
    assert r.status_code == 201, r.text
    assert r.json()["balances"] == {"charged": 100_000, "points": 0, "grants": []}
    r = api.post("/v1/payments", {"payment_id": "p1", "member_id": "m1", "merchant_id": "shop-1", "amount": 17_000,
                                  "occurred_at": at("2025-09-15")})
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["status"] == "approved"
    assert body["cashback"]["amount"] == 1_700
    assert body["balances"] == {"charged": 83_000, "points": 1_700, "grants": []}
    r = api.post("/v1/payments/p1/refunds", {"refund_id": "r1", "amount": 17_000, "occurred_at": at("2025-09-16")})
    assert r.status_code == 201, r.text
    assert r.json()["cashback_clawback"] == 1_700
    r = api.get("/v1/members/m1/balance", params={"month": "2025-09"})
    assert r.json()["balances"] == {"charged": 100_000, "points": 0, "grants": []}
    assert r.json()["month"]["cashback_eligible_spend"] == 0
    assert r.json()["month"]["topped_up"] == 100_000
    items = api.get("/v1/members/m1/transactions", params={"limit": 2}).json()
    assert [i["kind"] for i in items["items"]] == ["clawback", "refund"]
    assert items["next_cursor"]


def test_the_embedded_database_folder_is_made_on_a_fresh_clone(tmp_path):
    """`var/` is not in the repository: the first `eum serve` migrates a database in a
    folder that does not exist yet (the migrations run on an engine of their own)."""
    from ledger.db import make_engine, migrate

    url = f"sqlite:///{tmp_path / 'var' / 'nested' / 'eum.db'}"
    migrate(url)
    with make_engine(url).connect() as conn:
        assert conn.exec_driver_sql("SELECT count(*) FROM alembic_version").scalar() == 1


def test_answers_are_not_cached_nor_sniffed_and_production_serves_no_interactive_docs(api):
    """Balances and histories must not sit in a shared cache or a browser's; the docs
    pages (scripts from a CDN, a box for pasting keys) are for development only."""
    assert api.put("/v1/members/m1", {"district": "seo"}).status_code == 201
    setup_shop(api)
    answers = [api.post("/v1/topups", {"topup_id": "t1", "member_id": "m1", "amount": 10_000,
                                       "occurred_at": at("2025-09-15")}),  # the fast path
               api.get("/v1/members/m1/balance"), api.get("/v1/members/nobody/balance"),
               api.client.get("/v1/audit-log")]
    for r in answers:
        assert r.headers["cache-control"] == "no-store" and r.headers["x-content-type-options"] == "nosniff", r
    assert api.client.get("/docs").status_code == 200
    from fastapi.testclient import TestClient

    from api.app import create_app
    from eum.settings import Settings

    production = Settings(environment="production", database_url="postgresql://nobody@127.0.0.1:1/none",
                          key_pepper="p" * 32, audit_keys="k1:" + "s" * 32, log_level="WARNING")
    client = TestClient(create_app(production))  # no lifespan: nothing reaches the (absent) database
    assert client.get("/docs").status_code == 404 and client.get("/redoc").status_code == 404
    assert client.get("/openapi.json").status_code == 200


def test_a_worker_that_cannot_reach_the_book_answers_503_until_it_can(tmp_path, monkeypatch):
    """Start-up while the database is down: the worker serves at once, /healthz 200 and
    every route that needs the book 503 not_ready with Retry-After, then serves when the
    database answers (before, it waited inside start-up and accepted no connection)."""
    import time

    from api import app as app_module
    from ledger.db import migrate
    from tests.conftest import make_api

    url = f"sqlite:///{tmp_path / 'eum.db'}"
    migrate(url)
    real = app_module._try_start
    reachable = {"now": False, "failed_once": False}

    def try_start(settings):
        if not reachable["now"]:
            return None
        if not reachable["failed_once"]:  # a start failing for another reason: logged, tried again
            reachable["failed_once"] = True
            raise RuntimeError("the book came back unmigrated")
        return real(settings)

    monkeypatch.setattr(app_module, "_try_start", try_start)
    monkeypatch.setattr(app_module, "STARTUP_RETRY_S_MAX", 0.1)
    api = make_api(url)
    with api.client:
        assert api.client.get("/healthz").status_code == 200
        for r in (api.client.get("/readyz"), api.get("/v1/members/m1/balance"),
                  api.post("/v1/payments", {"payment_id": "p1"})):
            assert_problem(r, 503, "not_ready")
            assert r.headers["retry-after"] == "1"
        reachable["now"] = True
        deadline = time.monotonic() + 10
        while api.client.get("/readyz").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert api.client.get("/readyz").status_code == 200 and reachable["failed_once"]
        assert api.put("/v1/members/m1", {"district": "seo"}).status_code == 201


def test_a_worker_waiting_for_the_book_logs_why(capsys):
    """`service.waiting_for_database` said "OperationalError" alone, so a worker refused
    at every connect for a setting (a statement timeout past PostgreSQL's int) waited
    for ever with nothing to tell the operator why (operations audit)."""
    from api import app as app_module
    from eum.settings import Settings

    capsys.readouterr()
    assert app_module._try_start(Settings(database_url="postgresql://eum@127.0.0.1:9/eum")) is None
    [line] = [line for line in capsys.readouterr().out.splitlines() if "service.waiting_for_database" in line]
    assert "OperationalError: " in line and "127.0.0.1" in line and "port 9" in line, line


@pytest.mark.postgres
def test_readyz_is_not_ready_while_the_book_takes_no_writes(pg_url):
    """A fail-over onto a standby, or a database set read-only, answers `SELECT 1` and
    refuses every write: /readyz said ready (database true) while each payment was a 503
    `service_unavailable` (ReadOnlySqlTransaction), so a balancer kept the card app's
    traffic on it. It is 503 `not_ready` now, naming `database_writable`, as `eum serve`
    refuses to start on such a book; back to ready once the book takes writes again."""
    import psycopg

    from tests.conftest import PG_ADMIN_URL, make_api

    name = pg_url.rsplit("/", 1)[1]
    api = make_api(pg_url)
    with api.client:
        assert api.client.get("/readyz").status_code == 200
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
            admin.execute(f'ALTER DATABASE "{name}" SET default_transaction_read_only = on')
            try:
                api.client.app.state.services.engine.dispose()  # new sessions take the database's default
                ready = api.client.get("/readyz")
                assert_problem(ready, 503, "not_ready")
                assert ready.headers["retry-after"] == "1"
                assert ready.json()["checks"] == {"database": True, "database_writable": False, "redis": None}
            finally:
                admin.execute(f'ALTER DATABASE "{name}" RESET default_transaction_read_only')
        api.client.app.state.services.engine.dispose()
        ready = api.client.get("/readyz")
        assert ready.status_code == 200 and ready.json()["checks"]["database_writable"] is True, ready.text
