"""Idempotency of every caller id (API.md "Conventions"): the same id with the same body
returns the original result (200, `Idempotent-Replayed: true`); the same id with a
different body is 409 `idempotency_conflict`; concurrent duplicates of one id make one
ledger transaction — in one process, across two app instances ("workers") on one
PostgreSQL database, and with Redis in front (or flushed)."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import redis

from tests.book_helpers import (
    approve_program,
    assert_book_ok,
    assert_problem,
    put_member,
    put_merchant,
    snapshot,
    topup,
    txn_count,
)
from tests.conftest import REDIS_URL, at, make_api


def payment(payment_id: str, amount: int = 17_000, member_id: str = "m1", merchant_id: str = "shop",
            occurred_at: str | None = None) -> dict:
    return {"payment_id": payment_id, "member_id": member_id, "merchant_id": merchant_id, "amount": amount,
            "occurred_at": occurred_at or at("2025-09-15")}


def setup(api, charged: int = 1_000_000) -> None:
    put_member(api, "m1")
    put_merchant(api, "shop")
    put_merchant(api, "shop-2")
    topup(api, "t-setup", "m1", charged, at("2025-09-01"))


def answer_key(api, redis_prefix: str, kind: str, key: str) -> str:
    """The Redis key of an answer the service `api` stores: under its book's tag."""
    from ledger.db import book_tag

    return f"{redis_prefix}idem:{book_tag(api.services.engine)}:{kind}:{key}"


def assert_replayed(first, again) -> None:
    assert again.status_code == 200, again.text
    assert again.headers.get("idempotent-replayed") == "true"
    assert again.json() == first.json()


def test_replay_returns_the_original_for_every_kind(api):
    setup(api)
    before_topup = api.post("/v1/topups", {"topup_id": "t1", "member_id": "m1", "amount": 50_000,
                                           "occurred_at": at("2025-09-10")})
    assert before_topup.status_code == 201 and "idempotent-replayed" not in before_topup.headers
    first_pay = api.post("/v1/payments", payment("p1"))
    assert first_pay.status_code == 201 and "idempotent-replayed" not in first_pay.headers
    first_refund = api.post("/v1/payments/p1/refunds", {"refund_id": "r1", "amount": 17_000,
                                                        "occurred_at": at("2025-09-16")})
    assert first_refund.status_code == 201
    r = api.post("/v1/grant-programs", {"program_id": "g1", "name": "g", "valid_from": "2025-09-01",
                                        "valid_until": "2025-12-31", "funding": {"national": 10000}},
                 role="policy-editor")
    assert r.status_code == 201, r.text
    approve_program(api, "g1")
    disbursement = {"disbursement_id": "d1", "member_id": "m1", "amount": 10_000, "occurred_at": at("2025-09-02")}
    first_grant = api.post("/v1/grant-programs/g1/disbursements", disbursement, role="policy-editor")
    assert first_grant.status_code == 201, first_grant.text
    before = snapshot(api)

    for _ in range(2):
        assert_replayed(before_topup, api.post("/v1/topups", {"topup_id": "t1", "member_id": "m1", "amount": 50_000,
                                                              "occurred_at": at("2025-09-10")}))
        assert_replayed(first_pay, api.post("/v1/payments", payment("p1")))
        # fully refunded already, yet the same refund again is a replay, not a 409
        assert_replayed(first_refund, api.post("/v1/payments/p1/refunds", {
            "refund_id": "r1", "amount": 17_000, "occurred_at": at("2025-09-16")}))
        assert_replayed(first_grant, api.post("/v1/grant-programs/g1/disbursements", disbursement,
                                              role="policy-editor"))
    # the same instant written with another offset is the same request
    assert_replayed(first_pay, api.post("/v1/payments", payment("p1", occurred_at="2025-09-15T03:00:00Z")))
    assert snapshot(api) == before
    assert txn_count(api, "p1") == 2  # the payment and its cashback, once
    assert_book_ok(api)


def test_replay_of_a_declined_payment_is_the_stored_refusal(api):
    setup(api, charged=10_000)
    first = api.post("/v1/payments", payment("p-big", amount=20_000))
    assert first.json()["decline_code"] == "insufficient_funds"
    topup(api, "t-more", "m1", 50_000, at("2025-09-15"))
    again = api.post("/v1/payments", payment("p-big", amount=20_000))
    assert_replayed(first, again)
    assert again.json()["status"] == "declined"
    assert txn_count(api, "p-big") == 0
    assert_book_ok(api)


def test_same_id_different_body_is_a_conflict(api):
    setup(api)
    assert api.post("/v1/payments", payment("p1")).status_code == 201
    assert api.post("/v1/topups", {"topup_id": "t1", "member_id": "m1", "amount": 50_000,
                                   "occurred_at": at("2025-09-10")}).status_code == 201
    assert api.post("/v1/payments/p1/refunds", {"refund_id": "r1", "amount": 1_000,
                                                "occurred_at": at("2025-09-16")}).status_code == 201
    assert api.post("/v1/payments", payment("p2")).status_code == 201
    before = snapshot(api)
    conflicts = [
        ("/v1/payments", payment("p1", amount=17_001)),
        ("/v1/payments", payment("p1", merchant_id="shop-2")),
        ("/v1/payments", payment("p1", occurred_at=at("2025-09-15", "12:00:01"))),
        ("/v1/topups", {"topup_id": "t1", "member_id": "m1", "amount": 50_001, "occurred_at": at("2025-09-10")}),
        ("/v1/payments/p1/refunds", {"refund_id": "r1", "amount": 1_001, "occurred_at": at("2025-09-16")}),
        # the same refund id on another payment
        ("/v1/payments/p2/refunds", {"refund_id": "r1", "amount": 1_000, "occurred_at": at("2025-09-16")}),
    ]
    for path, body in conflicts:
        assert_problem(api.post(path, body), 409, "idempotency_conflict")
    assert snapshot(api) == before
    # ids are per kind: a top-up may reuse a payment's id
    assert api.post("/v1/topups", {"topup_id": "p1", "member_id": "m1", "amount": 10_000,
                                   "occurred_at": at("2025-09-10")}).status_code == 201
    assert_book_ok(api)


def test_a_failed_request_leaves_its_id_free(api):
    """An error (not a recorded refusal) stores nothing: the id can be used afterwards."""
    setup(api)
    assert_problem(api.post("/v1/payments", payment("p-x", member_id="nobody")), 404, "member_not_found")
    assert api.post("/v1/payments", payment("p-x")).status_code == 201
    assert_problem(api.post("/v1/payments/p-x/refunds", {"refund_id": "r-x", "amount": 17_001,
                                                         "occurred_at": at("2025-09-16")}), 409,
                   "refund_exceeds_payment")
    assert api.post("/v1/payments/p-x/refunds", {"refund_id": "r-x", "amount": 17_000,
                                                 "occurred_at": at("2025-09-16")}).status_code == 201
    assert_book_ok(api)


# Each kind's write under an owner that may not exist: the member of a top-up, payment or
# withdrawal, the payment a refund is of. (path, body) for (key, owner).
WRITES = {
    "topup": lambda key, owner: ("/v1/topups", {"topup_id": key, "member_id": owner, "amount": 50_000,
                                                "occurred_at": at("2025-09-10")}),
    "payment": lambda key, owner: ("/v1/payments", payment(key, member_id=owner)),
    "refund": lambda key, owner: (f"/v1/payments/{owner}/refunds", {"refund_id": key, "amount": 1_000,
                                                                     "occurred_at": at("2025-09-16")}),
    "withdrawal": lambda key, owner: (f"/v1/members/{owner}/withdrawals", {"withdrawal_id": key,
                                                                           "occurred_at": at("2025-09-20")}),
}
OWNERS = {"topup": "m1", "payment": "m1", "refund": "p-owner", "withdrawal": "m1"}
NOT_FOUND = {"topup": "member_not_found", "payment": "member_not_found", "refund": "payment_not_found",
             "withdrawal": "member_not_found"}


def withdrawals(api) -> int:
    from sqlalchemy import func, select

    from ledger import schema as s

    with api.services.reader.connect() as conn:
        return conn.execute(select(func.count()).select_from(s.withdrawals)).scalar_one()


def used_ids_sent_under_nobody(first, second) -> None:
    """Every kind the same way: an id already used, sent again under an owner that does
    not exist, is 409 `idempotency_conflict` (the id is looked up first, and names
    another request whatever else this one says); a new id under that owner is its 404;
    neither records anything, and the 404's id stays free. `first` records the ids; the
    resends go to `second`, another worker, whose table of replays does not hold them
    (so the book answers), and to `first`, whose table does."""
    setup(first)
    assert first.post("/v1/payments", payment("p-owner")).status_code == 201
    for kind, write in WRITES.items():
        response = first.post(*write(f"{kind}-1", OWNERS[kind]))
        assert response.status_code == 201, (kind, response.text)
    before, withdrawn = snapshot(first), withdrawals(first)
    for kind, write in WRITES.items():
        for api in (second, second, first):
            assert_problem(api.post(*write(f"{kind}-1", "nobody")), 409, "idempotency_conflict")
        assert_problem(second.post(*write(f"{kind}-2", "nobody")), 404, NOT_FOUND[kind])
    assert snapshot(first) == before and withdrawals(first) == withdrawn
    for kind, write in WRITES.items():
        assert second.post(*write(f"{kind}-2", OWNERS[kind])).status_code == 201, kind
    assert_book_ok(first)


def test_a_used_id_under_an_unknown_owner_is_a_conflict_for_every_kind(api, db_url):
    second = make_api(db_url)
    with second.client:
        used_ids_sent_under_nobody(api, second)


@pytest.mark.postgres
@pytest.mark.redis
def test_a_used_id_under_an_unknown_owner_is_a_conflict_for_every_kind_with_redis(pg_url, redis_prefix):
    first, second = (make_api(pg_url, REDIS_URL, redis_prefix, idempotency_lookup="redis") for _ in range(2))
    with first.client, second.client:
        used_ids_sent_under_nobody(first, second)


def fire(clients, requests, threads: int = 16):
    """Send every (client, path, body) at once from a thread pool; return the responses."""
    barrier = threading.Barrier(min(threads, len(requests)))

    def one(item):
        index, (path, body) = item
        api = clients[index % len(clients)]
        if index < barrier.parties:  # the first wave starts together; the rest follow at once
            try:
                barrier.wait(timeout=10)
            except threading.BrokenBarrierError:
                pass
        return api.post(path, body)

    with ThreadPoolExecutor(max_workers=threads) as pool:
        return list(pool.map(one, enumerate(requests)))


def assert_one_winner(responses) -> None:
    statuses = sorted(r.status_code for r in responses)
    assert statuses.count(201) == 1, statuses
    assert set(statuses) == {200, 201}, statuses
    bodies = {r.text if r.status_code == 201 else None for r in responses} - {None}
    (winner,) = bodies
    for r in responses:
        assert r.json() == json.loads(winner)
        if r.status_code == 200:
            assert r.headers["idempotent-replayed"] == "true"


def test_concurrent_duplicates_in_one_process(api):
    setup(api)
    for round_no in range(3):
        pid = f"p-dup-{round_no}"
        responses = fire([api], [("/v1/payments", payment(pid, amount=10_000))] * 16)
        assert_one_winner(responses)
        assert txn_count(api, pid) == 2  # one payment and one cashback transaction
    rid_responses = fire([api], [("/v1/payments/p-dup-0/refunds",
                                  {"refund_id": "r-dup", "amount": 4_000, "occurred_at": at("2025-09-16")})] * 12)
    assert_one_winner(rid_responses)
    assert txn_count(api, "r-dup") == 2  # refund and clawback
    balance = api.get("/v1/members/m1/balance", params={"month": "2025-09"}).json()
    # money in − money out, each once: top-up − 3 payments + 1 refund + net cashback
    assert balance["balances"]["charged"] + balance["balances"]["points"] == (
        1_000_000 - 3 * 10_000 + 4_000 + balance["month"]["cashback_earned"])
    assert_book_ok(api)


@pytest.mark.postgres
def test_concurrent_duplicates_across_two_workers(pg_url):
    """Two app instances (each with its own batcher and engine) on one database: the
    database decides the winner; the loser replays it."""
    first, second = make_api(pg_url), make_api(pg_url)
    with first.client, second.client:
        setup(first)
        put_member(first, "m2")
        topup(first, "t-m2", "m2", 1_000_000, at("2025-09-01"))
        for round_no in range(4):
            pid = f"p-2w-{round_no}"
            member = "m1" if round_no % 2 else "m2"
            responses = fire([first, second], [("/v1/payments", payment(pid, amount=5_000, member_id=member))] * 16)
            assert_one_winner(responses)
            assert txn_count(first, pid) == 2
        # duplicates mixed with other work of the same member in flight
        requests = []
        for n in range(8):
            requests.append(("/v1/payments", payment("p-2w-mixed", amount=7_000)))
            requests.append(("/v1/payments", payment(f"p-2w-other-{n}", amount=1_000)))
        responses = fire([first, second], requests)
        assert_one_winner([r for r, (_, body) in zip(responses, requests) if body["payment_id"] == "p-2w-mixed"])
        assert all(r.status_code == 201 for r, (_, body) in zip(responses, requests)
                   if body["payment_id"] != "p-2w-mixed")
        assert txn_count(first, "p-2w-mixed") == 2
        balance = first.get("/v1/members/m1/balance", params={"month": "2025-09"}).json()
        assert balance["balances"]["charged"] + balance["balances"]["points"] == (
            1_000_000 - 2 * 5_000 - 7_000 - 8 * 1_000 + balance["month"]["cashback_earned"])
        assert_book_ok(first)


@pytest.mark.postgres
@pytest.mark.redis
def test_local_lookup_stores_no_answers_in_redis(api_redis, redis_prefix):
    """The default lookup ("local") never reads answers from Redis, so it stores none."""
    api = api_redis
    assert api.settings.idempotency_lookup == "local"
    setup(api)
    first = api.post("/v1/payments", payment("p-l"))
    assert first.status_code == 201
    assert_replayed(first, api.post("/v1/payments", payment("p-l")))
    api.client.app.state.services.batcher.close()  # every batch (and its after-answer step) done
    client = redis.Redis.from_url(REDIS_URL)
    try:
        assert not [k for k in client.scan_iter(match=f"{redis_prefix}idem:*")]
    finally:
        client.close()


@pytest.mark.postgres
@pytest.mark.redis
def test_redis_lookup_answers_another_workers_replay(pg_url, redis_prefix):
    """With lookup "redis", an answer one worker gave is replayed by another from Redis,
    before the book is asked: shown by an answer found only in Redis."""
    first_worker = make_api(pg_url, REDIS_URL, redis_prefix, idempotency_lookup="redis")
    second_worker = make_api(pg_url, REDIS_URL, redis_prefix, idempotency_lookup="redis")
    client = redis.Redis.from_url(REDIS_URL)
    with first_worker.client, second_worker.client:
        try:
            setup(first_worker)
            first = first_worker.post("/v1/payments", payment("p-x"))
            assert first.status_code == 201
            key = answer_key(second_worker, redis_prefix, "payment", "p-x")  # the same book: the same key
            deadline = time.monotonic() + 5
            while not client.exists(key) and time.monotonic() < deadline:
                time.sleep(0.01)
            stored = json.loads(client.get(key))
            assert stored["b"] == first.json()
            # A marker only Redis holds: the second worker's replay must come from there.
            stored["b"]["marker"] = "from-redis"
            client.set(key, json.dumps(stored))
            again = second_worker.post("/v1/payments", payment("p-x"))
            assert again.status_code == 200 and again.headers.get("idempotent-replayed") == "true"
            assert again.json() == {**first.json(), "marker": "from-redis"}
            # A different body under the same id is refused from Redis too, and nothing moved.
            assert_problem(second_worker.post("/v1/payments", payment("p-x", amount=1)), 409, "idempotency_conflict")
            assert txn_count(first_worker, "p-x") == 2
        finally:
            for k in client.scan_iter(match=f"{redis_prefix}*"):
                client.delete(k)
            client.close()
    assert_book_ok(first_worker)


@pytest.mark.postgres
@pytest.mark.redis
def test_two_books_on_one_redis_prefix_do_not_answer_each_others_ids(pg_url, redis_prefix, _migrated_pg_template):
    """The faults audit: a second service on another book, with the same Redis database
    and prefix (the default `eum:` of a staging and a live service), answered an id of
    the first book's from Redis, 200 "approved", for a payment its own book never held.
    The answers' keys name their book (`ledger.db.book_tag`): the second book records its
    own payment, and each book's resend is answered from its own."""
    from tests.conftest import create_pg_database, drop_pg_database

    name, other_url = create_pg_database(template=_migrated_pg_template)
    live = make_api(pg_url, REDIS_URL, redis_prefix, idempotency_lookup="redis")
    staging = make_api(other_url, REDIS_URL, redis_prefix, idempotency_lookup="redis")
    client = redis.Redis.from_url(REDIS_URL)
    try:
        with live.client, staging.client:
            setup(live)
            setup(staging)
            first = live.post("/v1/payments", payment("p-shared"))
            assert first.status_code == 201
            deadline = time.monotonic() + 5
            while not client.exists(answer_key(live, redis_prefix, "payment", "p-shared")) \
                    and time.monotonic() < deadline:
                time.sleep(0.01)
            assert answer_key(live, redis_prefix, "payment", "p-shared") != \
                answer_key(staging, redis_prefix, "payment", "p-shared")
            other = staging.post("/v1/payments", payment("p-shared", amount=9_000))
            assert other.status_code == 201 and other.headers.get("idempotent-replayed") is None, other.text
            assert txn_count(staging, "p-shared") == 2 and txn_count(live, "p-shared") == 2
            assert_replayed(first, live.post("/v1/payments", payment("p-shared")))
            assert_replayed(other, staging.post("/v1/payments", payment("p-shared", amount=9_000)))
        assert_book_ok(live)
        assert_book_ok(staging)
    finally:
        for k in client.scan_iter(match=f"{redis_prefix}*"):
            client.delete(k)
        client.close()
        drop_pg_database(name)


@pytest.mark.postgres
@pytest.mark.redis
def test_replay_with_redis_and_after_a_flush(pg_url, redis_prefix):
    api = make_api(pg_url, REDIS_URL, redis_prefix, idempotency_lookup="redis")
    with api.client:
        _replay_with_redis_and_after_a_flush(api, redis_prefix)


def _replay_with_redis_and_after_a_flush(api, redis_prefix):
    setup(api)
    first = api.post("/v1/payments", payment("p-r"))
    assert first.status_code == 201
    client = redis.Redis.from_url(REDIS_URL)
    try:
        # The writer thread stores the answer in Redis just after the caller is answered
        # (api/fastpath.py), so it lands a moment after the 201: wait for it, bounded.
        deadline = time.monotonic() + 5
        key = answer_key(api, redis_prefix, "payment", "p-r")
        while not client.exists(key) and time.monotonic() < deadline:
            time.sleep(0.01)
        keys = [k.decode() for k in client.scan_iter(match=f"{redis_prefix}*")]
        assert key in keys, keys
        assert_replayed(first, api.post("/v1/payments", payment("p-r")))
        assert_problem(api.post("/v1/payments", payment("p-r", amount=1)), 409, "idempotency_conflict")

        for key in client.scan_iter(match=f"{redis_prefix}*"):
            client.delete(key)
        assert not list(client.scan_iter(match=f"{redis_prefix}*"))
        assert_replayed(first, api.post("/v1/payments", payment("p-r")))  # from the database
        assert_problem(api.post("/v1/payments", payment("p-r", amount=1)), 409, "idempotency_conflict")
        assert txn_count(api, "p-r") == 2

        responses = fire([api], [("/v1/payments", payment("p-r-dup", amount=3_000))] * 12)
        assert_one_winner(responses)
        assert txn_count(api, "p-r-dup") == 2
    finally:
        client.close()
    assert_book_ok(api)


@pytest.mark.postgres
@pytest.mark.redis
def test_a_replay_the_book_answered_is_cached_again(pg_url, redis_prefix):
    """After Redis lost its keys (a flush, a restart) a replay on a worker that does not
    hold the answer is answered by the book, and is cached again: in Redis (lookup
    "redis") and in that worker's table. Only new answers were cached, so every later
    replay of the id went to the book again."""
    first_worker = make_api(pg_url, REDIS_URL, redis_prefix, idempotency_lookup="redis")
    second_worker = make_api(pg_url, REDIS_URL, redis_prefix, idempotency_lookup="redis")
    client = redis.Redis.from_url(REDIS_URL)
    def cached(timeout_s: float = 5.0) -> dict | None:
        key = answer_key(first_worker, redis_prefix, "payment", "p-c")  # once the service has started
        deadline = time.monotonic() + timeout_s
        while not client.exists(key) and time.monotonic() < deadline:
            time.sleep(0.01)
        raw = client.get(key)
        return json.loads(raw) if raw is not None else None

    with first_worker.client, second_worker.client:
        try:
            setup(first_worker)
            first = first_worker.post("/v1/payments", payment("p-c"))
            assert first.status_code == 201 and cached()["b"] == first.json()
            for k in client.scan_iter(match=f"{redis_prefix}*"):  # the flush
                client.delete(k)
            assert_replayed(first, second_worker.post("/v1/payments", payment("p-c")))  # from the book
            stored = cached()
            assert stored is not None and stored["b"] == first.json(), stored
            # ... and in the second worker's own table: a marker only Redis holds is not seen.
            client.set(answer_key(first_worker, redis_prefix, "payment", "p-c"),
                       json.dumps({**stored, "b": {**stored["b"], "marker": "from-redis"}}))
            assert_replayed(first, second_worker.post("/v1/payments", payment("p-c")))
        finally:
            for k in client.scan_iter(match=f"{redis_prefix}*"):
                client.delete(k)
            client.close()


@pytest.mark.postgres
def test_a_replay_the_book_answered_is_kept_in_the_workers_table(pg_url, monkeypatch):
    """With the default lookup ("local"), a worker that did not give the first answer (a
    restart, another worker) asks the book once, then answers the id's replays itself."""
    first_worker, second_worker = make_api(pg_url), make_api(pg_url)
    with first_worker.client, second_worker.client:
        setup(first_worker)
        first = first_worker.post("/v1/payments", payment("p-k"))
        assert first.status_code == 201
        assert_replayed(first, second_worker.post("/v1/payments", payment("p-k")))  # from the book
        batcher = second_worker.services.batcher

        def nobody_writes(*args, **kwargs):
            raise AssertionError("the replay went to the book again")

        monkeypatch.setattr(batcher, "submit", nobody_writes)
        assert_replayed(first, second_worker.post("/v1/payments", payment("p-k")))


def test_a_redis_outage_is_one_warning_per_breaker_trip_not_one_per_request(monkeypatch):
    """With the Redis look-up on, every request in flight when Redis went away (or timed
    out on a loaded machine) logged its own `redis.unavailable`: 164 lines in one second
    of a 200/s run, burying the lines around them (operations audit, 2026-12-07). The
    breaker now warns when it opens; the failures it meets while open only keep it open."""
    import asyncio

    from api import fastpath

    warned = []

    class Spy:
        def warning(self, event, **fields):
            warned.append((event, fields))

    monkeypatch.setattr(fastpath, "log", Spy())
    cache = fastpath.IdempotencyCache.connect("redis://127.0.0.1:1/10", "eum-test-breaker:", 60, lookup="redis")

    async def burst(n: int) -> list:
        cache._open_until = 0.0  # as if every request had passed the breaker before the first failed
        return await asyncio.gather(*(cache.get("payment", f"p{i}") for i in range(n)))

    async def run() -> None:
        try:
            real_available = cache._available
            monkeypatch.setattr(cache, "_available", lambda: True)  # all of them in flight at once
            assert await burst(50) == [None] * 50  # each falls back to the book
            assert [event for event, _ in warned] == ["redis.unavailable"], warned
            monkeypatch.setattr(cache, "_available", real_available)
            assert not cache._available()  # open: the next requests skip Redis
            cache.publish([("eum-test-breaker:idem:payment:p1", "h", b"{}")])  # the writer skips it too
            assert len(warned) == 1
            await burst(3)  # the breaker closed and Redis is still away: a new trip, a new line
            assert len(warned) == 2 and warned[1][1]["breaker_open_s"] == fastpath.BREAKER_OPEN_S
        finally:
            await cache.close()

    asyncio.run(run())
