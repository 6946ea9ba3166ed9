"""Rate limits per API key (api/ratelimit.py): a token bucket per key sized by role,
429 `rate_limited` problem documents with Retry-After, shared across workers through
Redis (a real server, a key prefix of its own), and never a refusal because Redis is
down."""

from __future__ import annotations

import asyncio
import time

import pytest
import redis

from api.ratelimit import Bucket, RateLimited, RateLimiter, Rate
from ledger.keys import Principal, create_key
from ledger.db import make_engine
from tests.book_helpers import assert_book_ok, assert_problem, put_member, put_merchant, snapshot, topup
from tests.conftest import REDIS_URL, at, make_api

SLOW = (0.05, 3)  # three at once, then one every 20 s: the test never waits for a refill
CARD = Principal("k-card-1", "card backend", "card-app")


def payment(n: int) -> dict:
    return {"payment_id": f"p-rl-{n}", "member_id": "m1", "merchant_id": "shop", "amount": 1_000,
            "occurred_at": at("2025-09-15")}


def run(coro):
    return asyncio.run(coro)


# ---------------------------------------------------------------- the bucket itself


def test_bucket_spends_its_burst_then_refills_at_the_rate():
    rate = Rate(2.0, 3)
    bucket = Bucket(rate, now=100.0)
    assert [bucket.take(rate, 100.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert bucket.take(rate, 100.0) == pytest.approx(0.5)  # one token back in half a second
    assert bucket.take(rate, 100.25) == pytest.approx(0.25)
    assert bucket.take(rate, 100.5) == 0.0
    assert bucket.take(rate, 1000.0) == 0.0  # a long pause refills to the burst, not beyond
    assert [bucket.take(rate, 1000.0) for _ in range(3)] == [0.0, 0.0, pytest.approx(0.5)]


def test_local_limiter_refuses_with_retry_after_and_keeps_keys_apart():
    clock = [0.0]
    limiter = RateLimiter({"card-app": Rate(*SLOW)}, clock=lambda: clock[0])
    other = Principal("k-card-2", "second backend", "card-app")
    for _ in range(3):
        run(limiter.check(CARD))
    with pytest.raises(RateLimited) as refused:
        run(limiter.check(CARD))
    assert refused.value.status == 429 and refused.value.retry_after_s == 20
    run(limiter.check(other))  # another key has its own bucket
    run(limiter.check(Principal("k-aud", "auditor", "auditor")))  # a role with no limit set
    clock[0] += 20.0
    run(limiter.check(CARD))


# ---------------------------------------------------------------- shared through Redis


def _redis_limiter(prefix: str, rates: dict[str, Rate], url: str = REDIS_URL) -> RateLimiter:
    import redis.asyncio as aioredis

    client = aioredis.from_url(url, socket_timeout=0.05, socket_connect_timeout=0.05)
    return RateLimiter(rates, redis_client=client, prefix=prefix)


@pytest.mark.redis
def test_two_workers_share_one_bucket_in_redis(redis_prefix):
    rates = {"card-app": Rate(0.05, 10)}

    async def scenario():
        workers = [_redis_limiter(redis_prefix, rates), _redis_limiter(redis_prefix, rates)]
        admitted = refused = 0
        for i in range(30):
            try:
                await workers[i % 2].check(CARD)
                admitted += 1
            except RateLimited as error:
                refused += 1
                assert error.retry_after_s >= 1
        for worker in workers:
            await worker.close()
        return admitted, refused

    # Alternating between two workers, the key still gets its burst of 10 and no more.
    assert run(scenario()) == (10, 20)
    client = redis.Redis.from_url(REDIS_URL)
    try:
        keys = [k.decode() for k in client.scan_iter(match=f"{redis_prefix}*")]
    finally:
        client.close()
    assert keys == [f"{redis_prefix}rl:{CARD.key_id}"]


@pytest.mark.redis
def test_leases_keep_redis_off_most_calls_and_never_pass_the_limit(redis_prefix):
    rate = Rate(6_400.0, 256)
    assert rate.lease_tokens == 64

    async def scenario():
        workers = [_redis_limiter(redis_prefix, {"card-app": rate}) for _ in range(2)]
        calls = [0, 0]
        for n, worker in enumerate(workers):
            script = worker._script

            async def counted(*args, _script=script, _n=n, **kwargs):
                calls[_n] += 1
                return await _script(*args, **kwargs)

            worker._script = counted
        started = time.monotonic()
        for i in range(200):  # within the burst: one Redis call per lease of 64, per worker
            await workers[i % 2].check(CARD)
        calls_in_burst = sum(calls)
        admitted = 200
        for i in range(2_000):
            try:
                await workers[i % 2].check(CARD)
                admitted += 1
            except RateLimited:
                pass
        elapsed = time.monotonic() - started
        for worker in workers:
            await worker.close()
        return admitted, elapsed, calls_in_burst

    admitted, elapsed, calls_in_burst = run(scenario())
    # Every admitted request was a token of the shared bucket: the burst plus the refill.
    assert admitted <= rate.burst + rate.per_s * elapsed + 1
    assert admitted >= rate.burst - 2 * rate.lease_tokens
    # ... and within the burst most of them cost no Redis call.
    assert calls_in_burst <= 2 * (200 // 2 // rate.lease_tokens + 1), calls_in_burst


@pytest.mark.redis
def test_concurrent_requests_share_one_lease_draw(redis_prefix):
    """Many requests of one worker in flight when its lease runs out: one Redis call
    draws the next lease and the others spend from it (they used to draw one each and
    overwrite each other's, emptying the shared bucket ~30 times too fast)."""
    rate = Rate(10_000.0, 20_000)

    async def scenario():
        worker = _redis_limiter(redis_prefix, {"card-app": rate})
        calls = 0
        script = worker._script

        async def counted(*args, **kwargs):
            nonlocal calls
            calls += 1
            return await script(*args, **kwargs)

        worker._script = counted
        results = await asyncio.gather(*(worker.check(CARD) for _ in range(640)), return_exceptions=True)
        await worker.close()
        return calls, results

    calls, results = run(scenario())
    assert not [r for r in results if r is not None]  # all admitted: far below the limit
    assert calls <= 640 // rate.lease_tokens + 1, calls


def test_redis_down_never_refuses_a_request_for_it():
    # Nothing listens on port 1: every Redis call fails at once. The worker's own bucket
    # takes over with the same rate, and Redis is left alone for a while.
    async def scenario():
        limiter = _redis_limiter("eum-test-down:", {"card-app": Rate(*SLOW)}, url="redis://127.0.0.1:1/0")
        started = time.monotonic()
        results = []
        for _ in range(5):
            try:
                await limiter.check(CARD)
                results.append("ok")
            except RateLimited:
                results.append("429")
        await limiter.close()
        return results, time.monotonic() - started

    results, elapsed = run(scenario())
    assert results == ["ok", "ok", "ok", "429", "429"]
    assert elapsed < 1.0


# ---------------------------------------------------------------- through the API


def _seed(api) -> None:
    put_member(api, "m1")
    put_merchant(api, "shop")
    topup(api, "t-seed", "m1", 100_000, at("2025-09-10"))


@pytest.mark.parametrize("fast_path", [True, False], ids=["asgi-fast-path", "fastapi-routes"])
def test_card_app_key_over_its_limit_gets_429_and_changes_nothing(sqlite_url, fast_path):
    api = make_api(sqlite_url, rate_limits={"card-app": SLOW, "admin": (1_000, 1_000)}, api_fast_path=fast_path)
    with api.client:
        _seed(api)  # the top-up spends one of the card-app key's three tokens
        for n in range(2):
            assert api.post("/v1/payments", payment(n)).status_code == 201
        before = snapshot(api)
        r = api.post("/v1/payments", payment(9))
        assert_problem(r, 429, "rate_limited")
        assert r.headers["content-type"].startswith("application/problem+json")
        assert 1 <= int(r.headers["retry-after"]) <= 20
        assert r.json()["limit_per_s"] == 0.05 and r.json()["burst"] == 3
        # reads count too, and a wrong-role call on the same key is still counted first
        assert_problem(api.get("/v1/members/m1/balance"), 429, "rate_limited")
        assert_problem(api.put("/v1/members/m2", {"district": "seo"}, role="card-app"), 429, "rate_limited")
        assert snapshot(api) == before
        # another card-app key has a bucket of its own
        engine = make_engine(sqlite_url)
        _, token = create_key(engine, name="second backend", role="card-app",
                              pepper=api.settings.key_pepper.get_secret_value())
        engine.dispose()
        r = api.client.post("/v1/payments", json=payment(10), headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == 201, r.text
        assert_book_ok(api)


def test_staff_roles_have_lower_limits_than_the_card_app():
    from eum.settings import Settings

    limits = Settings().rate_limits
    card_rate = limits["card-app"][0]
    assert all(rate < card_rate for role, (rate, _) in limits.items() if role != "card-app")
    assert set(limits) == {"card-app", "policy-editor", "policy-approver", "finance", "auditor", "admin"}


@pytest.mark.redis
def test_limits_hold_across_two_apps_sharing_redis(sqlite_url, redis_prefix):
    # Two app instances (two workers) on one database and one Redis prefix.
    first = make_api(sqlite_url, REDIS_URL, redis_prefix, rate_limits={"finance": SLOW})
    second = make_api(sqlite_url, REDIS_URL, redis_prefix, rate_limits={"finance": SLOW})
    second.tokens = first.tokens  # the same finance key on both workers
    with first.client, second.client:
        statuses = [(first if n % 2 else second).get("/v1/settlements", role="finance").status_code
                    for n in range(5)]
        assert statuses == [200, 200, 200, 429, 429]
        client = redis.Redis.from_url(REDIS_URL)
        try:
            assert list(client.scan_iter(match=f"{redis_prefix}rl:*"))
        finally:
            client.close()


def test_the_limiter_bounds_its_redis_calls_by_the_setting():
    """README: EUM_REDIS_TIMEOUT_MS bounds every Redis call; the limiter had its own 50 ms,
    so raising the setting for a distant Redis left it failing over to per-worker buckets."""
    from types import SimpleNamespace

    settings = SimpleNamespace(rate_limits={"card-app": (100, 10)}, redis_url=REDIS_URL, redis_prefix="x:",
                               redis_timeout_ms=750)
    limiter = RateLimiter.from_settings(settings)
    kwargs = limiter._redis.connection_pool.connection_kwargs
    assert kwargs["socket_timeout"] == kwargs["socket_connect_timeout"] == 0.75
