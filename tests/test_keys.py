"""API keys: verification, revocation and expiry through the cache, the start-up warm-up,
and one database read per key at a time however many requests miss together."""

from __future__ import annotations

import asyncio
import threading
import time
from types import SimpleNamespace

import pytest

from api import auth
from ledger import keys as k
from ledger.db import make_engine, migrate
from ledger.errors import Unavailable

PEPPER = "test-pepper"


@pytest.fixture
def engine(sqlite_url):
    migrate(sqlite_url)
    engine = make_engine(sqlite_url)
    yield engine
    engine.dispose()


def _expired_key(engine) -> str:
    return k.create_key(engine, name="old", role="finance", pepper=PEPPER,
                        expires_at_us=time.time_ns() // 1000 - 1)[1]


def test_a_key_verifies_to_its_role_and_a_wrong_one_does_not(engine):
    key_id, token = k.create_key(engine, name="app", role="card-app", pepper=PEPPER)
    verifier = k.KeyVerifier(engine, PEPPER)
    assert verifier.verify(token) == k.Principal(key_id, "app", "card-app")
    assert verifier.verify(token[:-1] + ("x" if token[-1] != "x" else "y")) is None
    assert verifier.verify("not-a-key") is None
    assert k.KeyVerifier(engine, "another pepper").verify(token) is None


def test_revoked_and_expired_keys_stop_working_once_the_cache_entry_ends(engine, monkeypatch):
    key_id, token = k.create_key(engine, name="app", role="card-app", pepper=PEPPER)
    expired = _expired_key(engine)
    verifier = k.KeyVerifier(engine, PEPPER)
    assert verifier.verify(token) is not None
    assert verifier.verify(expired) is None
    assert k.revoke_key(engine, key_id)
    assert not k.revoke_key(engine, key_id)  # once
    assert verifier.cached(token) == (True, verifier.verify(token))  # still cached: at most CACHE_TTL_S
    later = time.monotonic() + k.CACHE_TTL_S + 0.1
    monkeypatch.setattr(k.time, "monotonic", lambda: later)
    assert verifier.cached(token) == (False, None)
    assert verifier.verify(token) is None


@pytest.mark.parametrize("read_by", ["verify", "warm"])
def test_a_key_stops_working_at_its_expiry_not_a_cache_entry_later(engine, monkeypatch, read_by):
    """Its expiry is known when the key is read: the cache entry ends there, not up to
    CACHE_TTL_S after (a key expiring at 12:00:00 was honoured at 12:00:04)."""
    expires_at_us = time.time_ns() // 1000 + 1_000_000
    _, token = k.create_key(engine, name="temp", role="finance", pepper=PEPPER, expires_at_us=expires_at_us)
    verifier = k.KeyVerifier(engine, PEPPER)
    if read_by == "warm":
        assert verifier.warm() == 1
    else:
        assert verifier.verify(token) is not None
    known, principal = verifier.cached(token)
    assert known and principal is not None
    later_s = (expires_at_us - time.time_ns() // 1000) / 1e6 + 0.1  # past its expiry, within CACHE_TTL_S
    assert later_s < k.CACHE_TTL_S
    mono, wall_ns = time.monotonic() + later_s, time.time_ns() + int(later_s * 1e9)
    monkeypatch.setattr(k.time, "monotonic", lambda: mono)
    monkeypatch.setattr(k.time, "time_ns", lambda: wall_ns)
    assert verifier.cached(token) == (False, None)
    assert verifier.verify(token) is None


def test_warm_caches_the_keys_in_use_and_only_those(engine, monkeypatch):
    _, live = k.create_key(engine, name="app", role="card-app", pepper=PEPPER)
    revoked_id, revoked = k.create_key(engine, name="gone", role="admin", pepper=PEPPER)
    k.revoke_key(engine, revoked_id)
    expired = _expired_key(engine)
    verifier = k.KeyVerifier(engine, PEPPER)
    assert verifier.cached(live) == (False, None)
    assert verifier.warm() == 1
    known, principal = verifier.cached(live)
    assert known and principal is not None and principal.role == "card-app"
    # the others are not cached as valid: they go to the database, which refuses them
    assert verifier.cached(revoked) == (False, None) and verifier.cached(expired) == (False, None)
    assert verifier.verify(revoked) is None and verifier.verify(expired) is None


def test_start_up_warms_the_key_cache(api):
    known, principal = api.services.keys.cached(api.tokens["card-app"])
    assert known and principal is not None and principal.role == "card-app"


class SlowKeys:
    """A key store whose read takes `read_s` and counts its calls."""

    def __init__(self, read_s: float):
        self.read_s = read_s
        self.calls = 0
        self._lock = threading.Lock()

    def verify(self, token: str):
        with self._lock:
            self.calls += 1
        time.sleep(self.read_s)
        return k.Principal("key-1", "app", "card-app") if token.startswith(k.KEY_PREFIX) else None


def _request(timeout_ms: int, key_reads: dict | None = None):
    """What `_verify` reads of a request: its worker's settings and reads in flight."""
    state = SimpleNamespace(services=SimpleNamespace(settings=SimpleNamespace(request_timeout_ms=timeout_ms)))
    if key_reads is not None:
        state.key_reads = key_reads
    return SimpleNamespace(app=SimpleNamespace(state=state))


def test_requests_that_miss_together_share_one_read():
    keys = SlowKeys(read_s=0.2)
    request = _request(timeout_ms=5_000)

    async def burst():
        return await asyncio.gather(*(auth._verify(request, keys, "eum_same") for _ in range(30)),
                                    *(auth._verify(request, keys, "eum_other") for _ in range(5)))

    principals = asyncio.run(burst())
    assert keys.calls == 2  # one read per key, not one per request
    assert all(p is not None and p.key_id == "key-1" for p in principals)
    assert request.app.state.key_reads == {}  # nothing left in flight


def test_a_caller_that_gives_up_does_not_cancel_the_read_for_the_others():
    keys = SlowKeys(read_s=0.3)
    in_flight: dict = {}
    impatient, patient = _request(50, in_flight), _request(5_000, in_flight)

    async def run():
        first = asyncio.ensure_future(auth._verify(impatient, keys, "eum_k"))
        await asyncio.sleep(0.01)
        second = asyncio.ensure_future(auth._verify(patient, keys, "eum_k"))
        with pytest.raises(Unavailable) as refused:
            await first
        assert refused.value.status == 503 and refused.value.retry_after_s == 1
        return await second

    principal = asyncio.run(run())
    assert principal is not None and keys.calls == 1
    assert in_flight == {}


def test_a_flood_of_unknown_keys_does_not_push_out_the_keys_in_use(engine, monkeypatch):
    monkeypatch.setattr(k, "CACHE_ENTRIES_MAX", 50)
    _, token = k.create_key(engine, name="app", role="card-app", pepper=PEPPER)
    verifier = k.KeyVerifier(engine, PEPPER)
    assert verifier.verify(token) is not None
    for n in range(120):  # anyone can send these, no key needed
        assert verifier.verify(f"{k.KEY_PREFIX}{n:012x}_unknown") is None
    known, principal = verifier.cached(token)
    assert known and principal is not None and principal.role == "card-app"


def _service(tmp_path, **overrides):
    from tests.conftest import make_api

    url = f"sqlite:///{tmp_path / 'eum.db'}"
    migrate(url)
    return make_api(url, **overrides)


def test_keys_in_use_are_read_again_before_their_cache_entry_lapses(tmp_path, monkeypatch):
    """The card app's key never waits for a read on a request: the service re-reads the
    keys in use every half TTL. A revoked key is not re-read and lapses."""
    monkeypatch.setattr(k, "CACHE_TTL_S", 0.3)
    monkeypatch.setattr(auth, "CACHE_TTL_S", 0.3)
    api = _service(tmp_path)
    with api.client:
        keys = api.services.keys
        card = api.tokens["card-app"]
        assert keys.cached(card)[0]  # warmed at start-up
        time.sleep(1.0)  # > 3 TTLs with no request
        known, principal = keys.cached(card)
        assert known and principal is not None
        assert k.revoke_key(api.services.engine, card.split("_")[1])
        time.sleep(1.0)
        assert keys.cached(card) == (False, None)  # lapsed: the next request reads it and is refused
        assert api.get("/v1/members/nobody/balance").status_code == 401


def test_a_key_read_does_not_queue_behind_finance_jobs(tmp_path):
    """Reconciliations, reports and uploads run on the event loop's default executor; a
    key read waiting behind them timed out into a 503 for the card app's payments."""
    api = _service(tmp_path, request_timeout_ms=1_000)
    with api.client:
        from ledger.keys import create_key

        _, fresh = create_key(api.services.engine, name="second app", role="card-app",
                              pepper=api.services.settings.key_pepper.get_secret_value())

        finance_jobs_done = threading.Event()

        async def occupy_default_executor():
            loop = asyncio.get_running_loop()
            for _ in range(40):  # more than the default executor's threads (at most 32)
                loop.run_in_executor(None, finance_jobs_done.wait, 10)

        api.client.portal.call(occupy_default_executor)
        try:
            r = api.client.get("/v1/members/nobody/balance", headers={"Authorization": f"Bearer {fresh}"})
        finally:
            finance_jobs_done.set()
        assert r.status_code == 404, r.text  # the key was read (not a 503 from a key read that timed out)


class _Clock:
    """`time.monotonic` as the test moves it."""

    def __init__(self):
        self.now = time.monotonic()

    def __call__(self) -> float:
        return self.now


def _database_down(verifier, monkeypatch):
    """The verifier's engine refuses every connection, as a stopped PostgreSQL does."""
    from sqlalchemy.exc import OperationalError

    def refused():
        raise OperationalError("connect", {}, ConnectionRefusedError("connection refused"))

    monkeypatch.setattr(verifier, "_engine", SimpleNamespace(connect=refused))


@pytest.mark.parametrize("read_by", ["verify", "warm"])
def test_a_key_in_use_outlives_a_database_outage_for_a_bounded_time(engine, monkeypatch, read_by):
    """A key's cache entry lapsed 5 s into a database outage, and from then on every
    request with it was a 503, even a resend the worker's replay table answers with no
    database. A key last read valid is now honoured for STALE_MAX_S while the database
    cannot be read, and not past its own expiry; a key never read valid here cannot be
    judged and the read's error stands (503)."""
    from sqlalchemy.exc import OperationalError

    _, token = k.create_key(engine, name="app", role="card-app", pepper=PEPPER)
    _, soon = k.create_key(engine, name="short", role="finance", pepper=PEPPER,
                           expires_at_us=time.time_ns() // 1000 + 60_000_000)
    _, new = k.create_key(engine, name="new", role="finance", pepper=PEPPER)
    clock = _Clock()
    monkeypatch.setattr(k.time, "monotonic", clock)
    verifier = k.KeyVerifier(engine, PEPPER)
    if read_by == "warm":
        assert verifier.warm() == 3
        verifier._good.pop(hash_key(new))  # as if `new` were made after the last read
        verifier._cache.pop(hash_key(new))
    else:
        app, short = verifier.verify(token), verifier.verify(soon)
        assert app is not None and short is not None
    _database_down(verifier, monkeypatch)
    clock.now += k.CACHE_TTL_S + 1
    assert verifier.cached(token) == (False, None)  # lapsed: a request reads it again
    assert verifier.verify(token).role == "card-app"  # the read failed: the last read stands
    assert verifier.cached(token)[1].role == "card-app"  # and requests are not held by reads for CACHE_TTL_S
    with pytest.raises(OperationalError):
        verifier.verify(new)  # never read valid here: it cannot be judged
    real_time_ns = time.time_ns
    monkeypatch.setattr(k.time, "time_ns", lambda: real_time_ns() + 61 * 1_000_000_000)
    clock.now += k.CACHE_TTL_S + 1
    with pytest.raises(OperationalError):
        verifier.verify(soon)  # its own expiry passed during the outage
    monkeypatch.setattr(k.time, "time_ns", real_time_ns)
    clock.now += k.STALE_MAX_S
    with pytest.raises(OperationalError):
        verifier.verify(token)  # the outage outlasted STALE_MAX_S: no longer honoured
    monkeypatch.setattr(verifier, "_engine", engine)  # back: read as ever
    assert verifier.verify(token).role == "card-app"
    assert verifier.verify(new).role == "finance"


def _read_valid(engine, monkeypatch):
    """A card-app key read valid once by a new verifier on the test's clock: (key id,
    token, clock, verifier)."""
    key_id, token = k.create_key(engine, name="app", role="card-app", pepper=PEPPER)
    clock = _Clock()
    monkeypatch.setattr(k.time, "monotonic", clock)
    verifier = k.KeyVerifier(engine, PEPPER)
    assert verifier.verify(token) is not None
    return key_id, token, clock, verifier


def test_a_revoked_key_is_not_honoured_through_an_outage(engine, monkeypatch):
    key_id, token, clock, verifier = _read_valid(engine, monkeypatch)
    k.revoke_key(engine, key_id)
    clock.now += k.CACHE_TTL_S + 1
    assert verifier.verify(token) is None  # read revoked: forgotten as valid
    _database_down(verifier, monkeypatch)
    clock.now += k.CACHE_TTL_S + 1
    with pytest.raises(Exception, match="connection refused"):
        verifier.verify(token)


def test_an_error_that_is_not_an_outage_is_not_answered_from_the_last_read(engine, monkeypatch):
    _, token, clock, verifier = _read_valid(engine, monkeypatch)

    def broken():
        raise RuntimeError("a bug")

    monkeypatch.setattr(verifier, "_engine", SimpleNamespace(connect=broken))
    clock.now += k.CACHE_TTL_S + 1
    with pytest.raises(RuntimeError):
        verifier.verify(token)


def hash_key(token: str) -> str:
    return k.hash_key(token, PEPPER)


@pytest.mark.parametrize("error", ["pool_timeout", "statement_timeout"])
def test_a_revoked_key_is_not_honoured_while_the_database_is_up_but_busy(engine, monkeypatch, error):
    """A key read failed because this worker's pool had no connection free in time, or
    the server cancelled the read (statement timeout), was answered from the key's last
    read, for up to 5 minutes: the database was up, a revocation recorded meanwhile
    was ignored, and the revoked key's requests went on reaching the book (under load,
    the very condition a flood with the key makes). Only a database that cannot be
    reached is an outage the last read answers for."""
    import psycopg
    from sqlalchemy.exc import OperationalError, TimeoutError as PoolTimeout

    key_id, token, clock, verifier = _read_valid(engine, monkeypatch)
    k.revoke_key(engine, key_id)  # recorded: the database is up

    def busy():
        if error == "pool_timeout":
            raise PoolTimeout("QueuePool limit of size 4 overflow 4 reached, connection timed out, timeout 5.00")
        raise OperationalError("SELECT", {}, psycopg.errors.QueryCanceled("canceling statement due to statement "
                                                                          "timeout"))

    monkeypatch.setattr(verifier, "_engine", SimpleNamespace(connect=busy))
    clock.now += k.CACHE_TTL_S + 1
    with pytest.raises(Exception):
        verifier.verify(token)
    assert verifier.cached(token) == (False, None)


def test_a_refresh_read_before_a_revocation_does_not_bring_the_key_back(engine, monkeypatch):
    """The refresher (`warm`) read every key in use, the key was revoked and a request's
    read found it so, then the refresher's older read was applied: the key was again
    "last read valid", and honoured for STALE_MAX_S if the database went down then (the
    review of 2026-12-07g). A read applies only if it began after the one on record."""
    import threading as th

    key_id, token, clock, verifier = _read_valid(engine, monkeypatch)
    read, release = th.Event(), th.Event()

    class SlowConnect:  # the refresher's read ends (its transaction too), then waits before `warm` applies it
        def __init__(self, real):
            self.real = real

        def __enter__(self):
            return self.real.__enter__()

        def __exit__(self, *exc):
            done = self.real.__exit__(*exc)
            read.set()
            assert release.wait(10)
            return done

    refresher_engine = SimpleNamespace(connect=lambda: SlowConnect(engine.connect()))
    monkeypatch.setattr(verifier, "_engine", refresher_engine)
    refresh = th.Thread(target=verifier.warm)
    refresh.start()
    assert read.wait(10)
    monkeypatch.setattr(verifier, "_engine", engine)
    k.revoke_key(engine, key_id)
    clock.now += k.CACHE_TTL_S + 1
    assert verifier.verify(token) is None  # a request's read, begun after the refresher's, finds it revoked
    release.set()
    refresh.join(10)
    _database_down(verifier, monkeypatch)
    clock.now += k.CACHE_TTL_S + 1
    with pytest.raises(Exception, match="connection refused"):
        verifier.verify(token)
