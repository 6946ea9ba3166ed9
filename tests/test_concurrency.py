"""Races against the real service: `eum serve --workers 2` (two worker processes, each
with its own batcher and connection pool) on PostgreSQL + Redis, driven by a pool of
client threads that fire together.

(a) many payments of one member whose balance covers only some of them: never
    overdrawn, exactly the right number approved;
(b) many members' payments against a nearly spent city (and national) budget: the
    committed amount never passes the limit, and the cashback paid equals it;
(c) many payments of one member racing through the 2020-03 monthly bands: the month's
    cashback equals the one sequential answer, and never passes 55,000.
Afterwards the whole book passes `check_book`.

Each scenario uses its own members and month (or pays no cashback), so the three can
share one server."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import redis

from eum.settings import DEFAULT_SECRET, REPO_ROOT
from sqlalchemy import select

from ledger import schema
from ledger.db import make_engine, migrate
from ledger.keys import create_key
from rules.timeutil import local_date
from tests.book_helpers import assert_book_ok
from tests.conftest import POLICIES, REDIS_URL, at, create_pg_database, drop_pg_database

pytestmark = [pytest.mark.postgres, pytest.mark.redis]

THREADS = 24
READY_TIMEOUT_S = 60


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    def __init__(self, url: str, tokens: dict[str, str], base: str):
        self.url, self.tokens, self.base = url, tokens, base
        self.http = httpx.Client(base_url=base, timeout=30, limits=httpx.Limits(max_connections=THREADS * 2))

    def call(self, method: str, path: str, body=None, role: str = "card-app", **kw) -> httpx.Response:
        return self.http.request(method, path, json=body, headers={"Authorization": f"Bearer {self.tokens[role]}"},
                                 **kw)

    def check_book(self) -> None:
        engine = make_engine(self.url)
        try:
            assert_book_ok(engine)
        finally:
            engine.dispose()

    def budget_days(self, source: str, period: str) -> dict[str, int]:
        """A budget's days as the book kept them: day -> committed."""
        engine = make_engine(self.url)
        try:
            with engine.connect() as conn:
                t = schema.budget_days
                return {day: int(won) for day, won in conn.execute(
                    select(t.c.day, t.c.committed_won).where(t.c.source == source, t.c.period == period))}
        finally:
            engine.dispose()

    def ok(self, method: str, path: str, body=None, role: str = "admin") -> dict:
        r = self.call(method, path, body, role)
        assert r.status_code in (200, 201), r.text
        return r.json()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    name, url = create_pg_database()
    prefix = f"eum-test-{uuid.uuid4().hex[:12]}:"
    log_dir: Path = tmp_path_factory.mktemp("server")
    process = None
    try:
        migrate(url)
        engine = make_engine(url)
        tokens = {role: create_key(engine, name=f"race {role}", role=role, pepper=DEFAULT_SECRET)[1]
                  for role in ("card-app", "admin", "policy-editor")}
        engine.dispose()
        port = free_port()
        env = {**os.environ, "EUM_DATABASE_URL": url, "EUM_REDIS_URL": REDIS_URL, "EUM_REDIS_PREFIX": prefix,
               "EUM_POLICIES_DIR": str(POLICIES), "EUM_LOG_LEVEL": "WARNING", "EUM_KEY_PEPPER": DEFAULT_SECRET}
        env.pop("PROMETHEUS_MULTIPROC_DIR", None)
        with open(log_dir / "server.log", "wb") as log:
            process = subprocess.Popen([sys.executable, "-m", "eum", "serve", "--workers", "2",
                                        "--port", str(port)], env=env, cwd=REPO_ROOT, stdout=log,
                                       stderr=subprocess.STDOUT, start_new_session=True)
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            assert process.poll() is None, (log_dir / "server.log").read_text()[-3000:]
            try:
                if httpx.get(f"{base}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the server did not become ready"
            time.sleep(0.1)
        srv = Server(url, tokens, base)
        try:
            yield srv
        finally:
            srv.http.close()
    finally:
        if process is not None:
            _stop(process)
        drop_pg_database(name)
        client = redis.Redis.from_url(REDIS_URL)
        try:
            keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
            if keys:
                client.delete(*keys)
        finally:
            client.close()


def _stop(process: subprocess.Popen) -> None:
    """Stop the server and its workers (its own process group, started above)."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=5)


def race(server: Server, bodies: list[dict], path: str = "/v1/payments") -> list[httpx.Response]:
    """Fire every body at once from THREADS client threads."""
    barrier = threading.Barrier(min(THREADS, len(bodies)))

    def one(item):
        index, body = item
        if index < barrier.parties:  # the first wave starts together; the rest follow at once
            try:
                barrier.wait(timeout=30)
            except threading.BrokenBarrierError:
                pass
        return server.call("POST", path, body)

    with ThreadPoolExecutor(max_workers=THREADS) as pool:
        responses = list(pool.map(one, enumerate(bodies)))
    for r in responses:
        assert r.status_code == 201, r.text
    return responses


def merchant(server: Server, merchant_id: str, sales: int) -> None:
    server.ok("PUT", f"/v1/merchants/{merchant_id}", {"name": merchant_id, "district": "seo", "category": "cafe",
                                                      "annual_sales": sales, "registered_from": "2019-01-01"})


def member(server: Server, member_id: str, topup_won: int, when: str) -> None:
    server.ok("PUT", f"/v1/members/{member_id}", {"district": "seo"})
    body = server.ok("POST", "/v1/topups", {"topup_id": f"t-{member_id}-{when[:7]}", "member_id": member_id,
                                            "amount": topup_won, "occurred_at": when}, role="card-app")
    assert body["status"] == "approved", body


def balance(server: Server, member_id: str, month: str) -> dict:
    return server.ok("GET", f"/v1/members/{member_id}/balance?month={month}", role="card-app")


def test_one_member_never_overdrawn(server):
    merchant(server, "a-big", 9_000_000_000)  # above 30억: no cashback, so no points to spend
    member(server, "a-m", 100_000, at("2025-09-01"))
    bodies = [{"payment_id": f"a-p-{n}", "member_id": "a-m", "merchant_id": "a-big", "amount": 7_000,
               "occurred_at": at("2025-09-10")} for n in range(48)]
    responses = race(server, bodies)
    approved = [r.json() for r in responses if r.json()["status"] == "approved"]
    declined = [r.json() for r in responses if r.json()["status"] == "declined"]
    assert len(approved) == 100_000 // 7_000 == 14
    assert {d["decline_code"] for d in declined} == {"insufficient_funds"}
    assert sum(p["amount"] for p in approved) == 98_000 <= 100_000
    assert all(p["balances"]["charged"] >= 0 for p in approved)
    # every approval saw a distinct balance: they were serialised, not overlapped
    assert sorted(p["balances"]["charged"] for p in approved) == list(range(2_000, 100_000, 7_000))
    assert balance(server, "a-m", "2025-09")["balances"] == {"charged": 2_000, "points": 0, "grants": []}
    server.check_book()


def test_nearly_spent_budget_is_never_overspent(server):
    merchant(server, "b-shop", 100_000_000)
    assert server.ok("PUT", "/v1/budgets/city/2025-09", {"amount": 25_000}, role="policy-editor")["limit"] == 25_000
    assert server.ok("PUT", "/v1/budgets/national/2025-09", {"amount": 20_000}, role="policy-editor")
    # spend most of it first: 200,000 × 10% = 8,000 national + 12,000 city
    member(server, "b-first", 200_000, at("2025-09-02"))
    first = server.ok("POST", "/v1/payments", {"payment_id": "b-p-first", "member_id": "b-first",
                                               "merchant_id": "b-shop", "amount": 200_000,
                                               "occurred_at": at("2025-09-03")}, role="card-app")
    assert first["cashback"]["amount"] == 20_000
    members = [f"b-m-{n}" for n in range(32)]
    for member_id in members:
        member(server, member_id, 20_000, at("2025-09-02"))
    # each wants 800 national + 1,200 city: 32 × 2,000 far beyond the 13,000 + 12,000 left
    bodies = [{"payment_id": f"b-p-{m}", "member_id": m, "merchant_id": "b-shop", "amount": 20_000,
               "occurred_at": at("2025-09-12")} for m in members]
    responses = [r.json() for r in race(server, bodies)]
    assert all(r["status"] == "approved" for r in responses)
    paid = {"national": first["cashback"]["components"][0]["funded_by"]["national"],
            "city": first["cashback"]["components"][0]["funded_by"]["city"]}
    for r in responses:
        for line in r["cashback"]["components"]:
            for source, won in line["funded_by"].items():
                paid[source] += won
            assert line["amount"] == sum(line["funded_by"].values())
        assert r["cashback"]["amount"] <= 2_000
    budgets = {(b["source"], b["period"]): b for b in server.ok("GET", "/v1/budgets", role="policy-editor")["budgets"]}
    city, national = budgets[("city", "2025-09")], budgets[("national", "2025-09")]
    assert city["committed"] <= city["limit"] and national["committed"] <= national["limit"]
    # demand exceeds both budgets and the shipped policy pays what is left: both are spent to the won
    assert (city["committed"], national["committed"]) == (25_000, 20_000)
    assert paid == {"city": city["committed"], "national": national["committed"]}
    total = sum(balance(server, m, "2025-09")["month"]["cashback_earned"] for m in [*members, "b-first"])
    assert total == 45_000
    # Two workers' batches upserted the same day rows (`budget_days`): they add up, to the won.
    # Under the day of the batches' clock (today; the first payment's the day before in
    # a run across midnight), not the payments' September.
    city_days = server.budget_days("city", "2025-09")
    assert sum(city_days.values()) == 25_000 and max(city_days) == local_date(time.time_ns() // 1000).isoformat()
    assert sum(server.budget_days("national", "2025").values()) == 20_000
    server.check_book()


def sequential_2020_03(payments: int, amount: int, charged: int) -> tuple[int, int, int]:
    """The one answer for identical payments of one member under 2020-03 (points spent
    first): (approved, month eligible spend, month cashback)."""
    points = eligible = cashback = approved = 0
    for _ in range(payments):
        if points + charged < amount:
            continue
        from_points = min(points, amount)
        base = amount - from_points
        earned = 0
        for lower, upper, rate_bp in ((0, 500_000, 1_000), (500_000, 1_000_000, 100)):
            lo, hi = max(eligible, lower), min(eligible + base, upper)
            if hi > lo:
                earned += (hi - lo) * rate_bp // 10_000
        points += earned - from_points
        charged -= base
        eligible += base
        cashback += earned
        approved += 1
    return approved, eligible, cashback


def test_monthly_band_race_for_one_member(server):
    merchant(server, "c-shop", 100_000_000)
    member(server, "c-m", 1_500_000, at("2020-03-02"))
    bodies = [{"payment_id": f"c-p-{n}", "member_id": "c-m", "merchant_id": "c-shop", "amount": 70_001,
               "occurred_at": at("2020-03-20")} for n in range(24)]
    responses = [r.json() for r in race(server, bodies)]
    approved, eligible, cashback = sequential_2020_03(24, 70_001, 1_500_000)
    assert sum(r["status"] == "approved" for r in responses) == approved
    month = balance(server, "c-m", "2020-03")["month"]
    assert (month["cashback_eligible_spend"], month["cashback_earned"]) == (eligible, cashback)
    assert month["cashback_earned"] == sum(r["cashback"]["amount"] for r in responses) <= 55_000
    assert eligible > 1_000_000  # the race went through both bands and past the last
    # each band's won was paid once: the per-payment band bases tile the month without overlap
    spans = sorted((c["rate_bp"], c["base"]) for r in responses for c in r["cashback"]["components"])
    assert sum(base for rate, base in spans if rate == 1_000) == 500_000
    assert sum(base for rate, base in spans if rate == 100) == 500_000
    server.check_book()
