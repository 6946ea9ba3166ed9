"""Shared fixtures.

Every PostgreSQL test gets a database of its own (`eum_test_<hex>`; another prefix with
`EUM_TEST_DB_PREFIX`), created and dropped here; every Redis test a key prefix of its
own, whose keys are deleted after.
So two runs (or two xdist workers) never see each other's data."""

from __future__ import annotations

import datetime as dt
import os
import queue
import re
import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
import pytest
from fastapi.testclient import TestClient

from eum.settings import REPO_ROOT, Settings
from ledger.db import make_engine, migrate
from ledger.keys import ROLES, create_key

# The service's default is one writer thread per worker; the tests run two, so that two
# batches of one worker meeting in the database (the harder case) stay covered. Set
# before api.batcher is imported; services the tests start inherit it.
os.environ.setdefault("EUM_BATCH_WRITERS", "2")
PG_ADMIN_URL = os.environ.get("EUM_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("EUM_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
DB_PREFIX = os.environ.get("EUM_TEST_DB_PREFIX", "eum_test_")
SEOUL = dt.timezone(dt.timedelta(hours=9))
POLICIES = REPO_ROOT / "policies"


def _pg_url(database: str) -> str:
    base = PG_ADMIN_URL.rsplit("/", 1)[0]
    return f"{base}/{database}"


def create_pg_database(template: str | None = None, prefix: str = DB_PREFIX) -> tuple[str, str]:
    """A database of a fresh name: empty, or a copy of `template` (CREATE DATABASE ...
    TEMPLATE copies a migrated one in tens of milliseconds, where running every
    migration takes ~0.2-0.7 s; no one may be connected to the template meanwhile)."""
    name = f"{prefix}{uuid.uuid4().hex[:16]}"
    copy = f' TEMPLATE "{template}"' if template else ""
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"{copy}')
    return name, _pg_url(name)


def create_migrated_pg_template(prefix: str = DB_PREFIX) -> str:
    """A database migrated to the head, to copy with `create_pg_database(template)`;
    the caller drops it."""
    name, url = create_pg_database(prefix=f"{prefix}tpl_")
    try:
        migrate(url)
    except BaseException:
        drop_pg_database(name)
        raise
    return name


def drop_pg_database(name: str) -> None:
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def _migrated_sqlite_file(tmp_path_factory) -> Path:
    """One SQLite file migrated to the head per test process, checkpointed whole into the
    main file: each test's database is a copy of it (a file copy instead of running
    every migration again, ~0.3 s a test; the suite is CI-bound)."""
    import sqlite3

    path = tmp_path_factory.mktemp("migrated") / "eum.db"
    migrate(f"sqlite:///{path}")
    with sqlite3.connect(path) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    return path


@pytest.fixture
def sqlite_url(tmp_path: Path, _migrated_sqlite_file: Path) -> str:
    import shutil

    path = tmp_path / "eum.db"
    shutil.copyfile(_migrated_sqlite_file, path)
    return f"sqlite:///{path}"


@pytest.fixture(scope="session")
def _migrated_pg_template():
    """One PostgreSQL database migrated to the head per test process, made when its
    first PostgreSQL test starts: each test's database is a copy of it."""
    name = create_migrated_pg_template()
    try:
        yield name
    finally:
        drop_pg_database(name)


class _DatabasePool:
    """Copies of the template made ahead, and dropped after, on a thread of their own.
    A copy took 0.3-0.6 s and a drop ~0.1 s of waiting on the disk (CREATE DATABASE
    writes and syncs each of a database's ~420 files), on every PostgreSQL test. Made
    while the previous test runs, the wait overlaps its work. Every copy is still a
    database of its own, used by one test."""

    READY = 2

    def __init__(self, template: str):
        self.template = template
        self._ready: queue.Queue = queue.Queue(maxsize=self.READY)
        self._to_drop: queue.Queue = queue.Queue()
        self._stop = threading.Event()
        self.not_dropped: list[str] = []
        self._thread = threading.Thread(target=self._run, name="test-db-pool", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        made: str | BaseException | None = None
        while not self._stop.is_set():
            try:  # drops first: they give the disk back
                name = self._to_drop.get_nowait()
            except queue.Empty:
                pass
            else:
                self._drop(name)
                continue
            if made is None:
                try:
                    made = create_pg_database(template=self.template)[0]
                except Exception as error:  # noqa: BLE001 - raised in the test that takes it
                    made = error
            try:
                self._ready.put(made, timeout=0.05)
                made = None
            except queue.Full:
                pass
        if isinstance(made, str):
            self._drop(made)

    def _drop(self, name: str) -> None:
        try:
            drop_pg_database(name)
        except Exception as error:  # noqa: BLE001 - told at the end of the session
            self.not_dropped.append(f"{name}: {error}")

    def take(self) -> tuple[str, str]:
        made = self._ready.get(timeout=120)
        if isinstance(made, BaseException):
            raise made
        return made, _pg_url(made)

    def give_back(self, name: str) -> None:
        self._to_drop.put(name)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=120)
        while True:
            try:
                made = self._ready.get_nowait()
            except queue.Empty:
                break
            if isinstance(made, str):
                self._drop(made)
        while True:
            try:
                self._drop(self._to_drop.get_nowait())
            except queue.Empty:
                break
        assert not self.not_dropped, f"test databases left behind: {self.not_dropped}"


@pytest.fixture(scope="session")
def _pg_pool(_migrated_pg_template):
    pool = _DatabasePool(_migrated_pg_template)
    try:
        yield pool
    finally:
        pool.close()


@pytest.fixture
def pg_url(_pg_pool):
    name, url = _pg_pool.take()
    try:
        yield url
    finally:
        _pg_pool.give_back(name)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(request) -> str:
    """Runs the test once on SQLite and once on PostgreSQL."""
    return request.getfixturevalue("sqlite_url" if request.param == "sqlite" else "pg_url")


@pytest.fixture
def redis_prefix():
    import redis

    prefix = f"eum-test-{uuid.uuid4().hex[:12]}:"
    yield prefix
    client = redis.Redis.from_url(REDIS_URL)
    try:
        keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


@dataclass
class Api:
    """A test client of the whole app, with one key per role."""

    client: TestClient
    settings: Settings
    tokens: dict[str, str] = field(default_factory=dict)

    def h(self, role: str = "card-app") -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens[role]}"}

    def post(self, path: str, json=None, role: str = "card-app", **kw):
        return self.client.post(path, json=json, headers=self.h(role), **kw)

    def put(self, path: str, json=None, role: str = "admin", **kw):
        return self.client.put(path, json=json, headers=self.h(role), **kw)

    def get(self, path: str, role: str = "card-app", **kw):
        return self.client.get(path, headers=self.h(role), **kw)

    @property
    def services(self):
        return self.client.app.state.services


def make_api(database_url: str, redis_url: str | None = None, redis_prefix: str = "eum:", **overrides) -> Api:
    from api.app import create_app

    settings = Settings(database_url=database_url, redis_url=redis_url, redis_prefix=redis_prefix,
                        environment="test", log_json=True, log_level="WARNING", **{"policies_dir": POLICIES, **overrides})
    engine = make_engine(database_url)
    tokens = {}
    for role in ROLES:
        _, tokens[role] = create_key(engine, name=f"test {role}", role=role,
                                     pepper=settings.key_pepper.get_secret_value())
    tokens["policy-approver-2"] = create_key(engine, name="test approver two", role="policy-approver",
                                             pepper=settings.key_pepper.get_secret_value())[1]
    engine.dispose()
    client = TestClient(create_app(settings), raise_server_exceptions=False)
    client.event_hooks["response"].append(check_answer)
    return Api(client, settings, tokens)


def _answer_routes() -> list[tuple[str, re.Pattern, type | None]]:
    """(method, path pattern, documented answer model) of every route; literal paths
    first, so /v1/policies/schema is not taken for /v1/policies/{policy_id}."""
    from api import cardapp, finance, policies, programs, registry

    routes = []
    for module in (cardapp, registry, programs, policies, finance):
        for route in module.router.routes:
            models = [spec["model"] for status, spec in (route.responses or {}).items()
                      if isinstance(status, int) and 200 <= status < 300 and "model" in spec]
            pattern = re.compile("^" + re.sub(r"\{[^}]+\}", "[^/]+", route.path) + "$")
            for method in route.methods:
                routes.append((route.path.count("{"), method, pattern, models[0] if models else None))
    return [(method, pattern, model) for _, method, pattern, model in sorted(routes, key=lambda r: r[0])]


_ANSWERS: list = []


def check_answer(response) -> None:
    """Every 2xx JSON answer the tests receive fits the answer its route documents in
    /openapi.json (api/answers.py), in pydantic's strict mode: a field renamed, dropped or
    retyped in the code and not in the document fails the test that saw it."""
    if not 200 <= response.status_code < 300 or "json" not in response.headers.get("content-type", ""):
        return
    if not _ANSWERS:
        _ANSWERS.extend(_answer_routes())
    request = response.request
    for method, pattern, model in _ANSWERS:
        if method == request.method and pattern.match(request.url.path):
            if model is not None:
                response.read()
                try:
                    model.model_validate(response.json(), strict=True)
                except Exception as error:
                    raise AssertionError(f"{request.method} {request.url.path} answered outside its documented "
                                         f"schema ({model.__name__}): {error}") from None
            return


@pytest.fixture
def api(db_url):
    """The app on SQLite and on PostgreSQL (no Redis)."""
    app = make_api(db_url)
    with app.client:
        yield app


@pytest.fixture
def api_redis(pg_url, redis_prefix):
    """The production shape: PostgreSQL + Redis."""
    app = make_api(pg_url, REDIS_URL, redis_prefix)
    with app.client:
        yield app


@pytest.fixture
def no_watermark_lag(monkeypatch):
    """Settle what the test just wrote (the default lag leaves the last 2 s to the next run)."""
    from settlement.config import get_config

    monkeypatch.setenv("EUM_SETTLEMENT_WATERMARK_LAG_US", "0")
    get_config.cache_clear()
    yield
    monkeypatch.delenv("EUM_SETTLEMENT_WATERMARK_LAG_US", raising=False)  # (a test may have undone it)
    get_config.cache_clear()


def at(day: str, time: str = "12:00:00") -> str:
    """An RFC 3339 time in Seoul: at("2025-09-15") -> "2025-09-15T12:00:00+09:00"."""
    return f"{day}T{time}+09:00"


@pytest.fixture(autouse=True)
def _audit_keys_of_this_test_only(monkeypatch):
    """The audit log's keys are the process's (`ledger.audit.configure`, set when an app is
    built): each test starts from none configured, whatever an earlier one set."""
    from ledger import audit

    monkeypatch.setattr(audit, "_configured", audit._UNSET)
