"""Fault injection for the reliability tests (`tests/test_faults.py`, fast, in CI) and
the reliability runs (`loadtests/faults.py`, slow, figures for docs/reliability.md).

Everything a fault needs, on private servers only — a throwaway PostgreSQL cluster and
a Redis server on free ports, started here and deleted afterwards — so restarting,
flushing or slowing them never touches the shared servers on 5432/6379:

- `PrivatePostgres`, `PrivateRedis`: start, stop, restart, flush, destroy;
- `DelayProxy`: an asyncio TCP proxy on its own thread that delays every chunk by a
  settable amount (injected latency in front of PostgreSQL or Redis);
- `ServiceProcess`: `eum serve --workers N` as a real process group, with kill -9 of
  one worker or of everything;
- `Load`: an open-loop payment load (constant offered rate, bounded concurrency) that
  records what the client was told for every id, so that the unacknowledged can be
  resent with their ids afterwards (`resend`);
- `verify`: the book read back (loadtests/checks.py) plus exactly-once per id and the
  money lost, which must be 0;
- `served_slower_than`: how long the service itself took, from its own request-latency
  histogram (a client's clock also counts the client's delays).

Every wait here is bounded; every process started here is stopped by its own pid or
process group."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import math
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psycopg

from loadtests import harness as h

PG_BIN = Path(os.environ.get("EUM_FAULT_PG_BIN", "/usr/lib/postgresql/15/bin"))
REDIS_SERVER = os.environ.get("EUM_FAULT_REDIS_SERVER", "redis-server")
# The checkout's own, else the one installed beside this Python (as harness.PYTHON falls
# back to it), else whatever `eum` is on PATH.
EUM = next((str(p) for p in (h.REPO_ROOT / ".venv" / "bin" / "eum", Path(sys.executable).parent / "eum")
            if p.exists()), "eum")
START_S_MAX = 60.0
LOOPBACK = "127.0.0.1"
PEAK_DAY = h.PEAK_DAY


def available() -> str | None:
    """Why the fault tests cannot run here (None: they can)."""
    if not (PG_BIN / "initdb").exists():
        return f"no PostgreSQL server binaries at {PG_BIN} (set EUM_FAULT_PG_BIN)"
    if shutil.which(REDIS_SERVER) is None:
        return "no redis-server on PATH"
    return None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


def _wait(predicate, timeout_s: float, what: str, interval_s: float = 0.05) -> float:
    """Poll until `predicate()` is true; returns the seconds it took."""
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        with contextlib.suppress(Exception):
            if predicate():
                return time.monotonic() - started
        time.sleep(interval_s)
    raise TimeoutError(f"{what}: not within {timeout_s} s")


# ---------------------------------------------------------------- PostgreSQL


class PrivatePostgres:
    """A throwaway cluster (initdb, trust auth, fsync on) on a free loopback port.
    As root it runs as the `postgres` system user, which initdb requires."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="eum-fault-pg-"))
        self.data = self.root / "data"
        self.port = free_port()
        self._as_postgres = os.geteuid() == 0
        if self._as_postgres:
            shutil.chown(self.root, user="postgres")
        self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres", "-E", "UTF8",
                  "--no-locale", "--no-sync")
        with open(self.data / "postgresql.conf", "a") as conf:
            conf.write(f"\nport = {self.port}\nlisten_addresses = '{LOOPBACK}'\n"
                       f"unix_socket_directories = '{self.root}'\nfsync = on\nsynchronous_commit = on\n"
                       "max_connections = 100\nshared_buffers = 64MB\n")

    def _run(self, tool: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        command = [str(PG_BIN / tool), *args]
        if self._as_postgres:
            command = ["runuser", "-u", "postgres", "--", *command]
        return subprocess.run(command, capture_output=True, text=True, timeout=120, check=check)

    @property
    def admin_url(self) -> str:
        return f"postgresql://postgres@{LOOPBACK}:{self.port}/postgres"

    def url(self, database: str, port: int | None = None) -> str:
        return f"postgresql://postgres@{LOOPBACK}:{port or self.port}/{database}"

    def start(self) -> float:
        started = time.monotonic()
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.root / "server.log"), "-w", "-t", "60", "start")
        return time.monotonic() - started

    def stop(self, mode: str = "fast") -> None:
        """fast: roll back open transactions and disconnect (a restart); immediate: no
        shutdown checkpoint (a crash, recovered from the WAL at the next start)."""
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop", check=False)

    def running(self) -> bool:
        return self._run("pg_ctl", "-D", str(self.data), "status", check=False).returncode == 0

    def create_database(self) -> str:
        """A new database, migrated; returns its URL."""
        from ledger.db import migrate

        name = f"eum_fault_{uuid.uuid4().hex[:10]}"
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        url = self.url(name)
        migrate(url)
        return url

    def destroy(self) -> None:
        if self.running():
            self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)


# ---------------------------------------------------------------- Redis


class PrivateRedis:
    """redis-server on a free loopback port, nothing saved to disk."""

    def __init__(self) -> None:
        self.port = free_port()
        self.root = Path(tempfile.mkdtemp(prefix="eum-fault-redis-"))
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://{LOOPBACK}:{self.port}/0"

    def client(self):
        import redis

        return redis.Redis.from_url(self.url, socket_timeout=2, socket_connect_timeout=2)

    def start(self) -> float:
        started = time.monotonic()
        log = open(self.root / "redis.log", "ab")
        self.process = subprocess.Popen(
            [REDIS_SERVER, "--port", str(self.port), "--bind", LOOPBACK, "--save", "", "--appendonly", "no",
             "--dir", str(self.root)], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()

        def pong() -> bool:
            client = self.client()
            try:
                return bool(client.ping())
            finally:
                client.close()

        _wait(pong, 20, "redis-server start")
        return time.monotonic() - started

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        self.process = None

    def flush(self) -> None:
        """FLUSHALL on this private server only."""
        client = self.client()
        try:
            client.flushall()
        finally:
            client.close()

    def destroy(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)


# ---------------------------------------------------------------- injected latency


class DelayProxy:
    """TCP proxy 127.0.0.1:port -> 127.0.0.1:target that holds every chunk, in each
    direction, for `delay_s` before passing it on (order kept). `delay_s` may be
    changed at any time; 0 passes bytes straight through."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self.delay_s = 0.0
        self._loop = asyncio.new_event_loop()
        self._server = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._main, name="delay-proxy", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("proxy did not start")

    def _main(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._server = self._loop.run_until_complete(asyncio.start_server(self._accept, LOOPBACK, self.port))
        self._ready.set()
        self._loop.run_forever()

    async def _accept(self, client_reader, client_writer) -> None:
        try:
            upstream_reader, upstream_writer = await asyncio.wait_for(
                asyncio.open_connection(LOOPBACK, self.target_port), 10)
        except (OSError, asyncio.TimeoutError):
            client_writer.close()
            return
        await asyncio.gather(self._pipe(client_reader, upstream_writer), self._pipe(upstream_reader, client_writer),
                             return_exceptions=True)

    async def _pipe(self, reader, writer) -> None:
        try:
            while data := await reader.read(65536):
                if self.delay_s > 0:
                    await asyncio.sleep(self.delay_s)
                writer.write(data)
                await writer.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            with contextlib.suppress(Exception):
                writer.close()

    def close(self) -> None:
        async def shutdown() -> None:
            if self._server is not None:
                self._server.close()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.wait(tasks, timeout=5) if tasks else None
            self._loop.stop()

        if self._thread.is_alive():
            asyncio.run_coroutine_threadsafe(shutdown(), self._loop)
            self._thread.join(10)


# ---------------------------------------------------------------- the service


@dataclass
class ServiceProcess:
    """`eum serve --workers N` in its own process group, on a fixed port (so a restart
    after kill -9 is found at the same address)."""

    env: dict[str, str]
    log_path: Path
    workers: int = 2
    port: int = field(default_factory=free_port)
    process: subprocess.Popen | None = None

    @property
    def base_url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def start(self) -> float:
        started = time.monotonic()
        self.process = h.spawn_service(
            [EUM, "serve", "--host", LOOPBACK, "--port", str(self.port), "--workers", str(self.workers)],
            self.env, self.log_path, "ab")
        self.wait_ready()
        return time.monotonic() - started

    def wait_ready(self, timeout_s: float = START_S_MAX) -> float:
        def ready() -> bool:
            assert self.process is not None
            if self.process.poll() is not None:
                raise RuntimeError("service exited:\n" + self.log_path.read_text()[-3000:])
            return httpx.get(self.base_url + "/readyz", timeout=2).status_code == 200

        return _wait(ready, timeout_s, "service ready", 0.1)

    def worker_pids(self) -> list[int]:
        """uvicorn's worker processes (multiprocessing children of the supervisor)."""
        assert self.process is not None
        return h.worker_pids_of(self.process.pid)

    def kill9_worker(self) -> int:
        assert self.process is not None
        return h.kill9_worker(self.process.pid)

    def kill9_all(self) -> None:
        """SIGKILL to the whole process group: supervisor and workers, no shutdown."""
        assert self.process is not None
        h.kill9_group(self.process)

    def served_slower_than(self, seconds: float, route: str = "/v1/payments") -> tuple[int, float, int]:
        """`served_slower_than` over this service's /metrics (every worker's, live or
        dead: `eum serve --workers N` sets PROMETHEUS_MULTIPROC_DIR)."""
        response = httpx.get(self.base_url + "/metrics", timeout=10)
        response.raise_for_status()
        return served_slower_than(response.text, route, seconds)

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            if self.process is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGKILL)
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(5)


def service_env(database_url: str, redis_url: str | None, **extra) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EUM_") and k != "PROMETHEUS_MULTIPROC_DIR"}
    env.update({"EUM_DATABASE_URL": database_url, "EUM_REDIS_PREFIX": f"eum-fault-{uuid.uuid4().hex[:8]}:",
                "EUM_KEY_PEPPER": h.PEPPER, "EUM_AUDIT_KEYS": h.AUDIT_KEYS, "EUM_ENVIRONMENT": "production", "EUM_LOG_LEVEL": "WARNING",
                "EUM_POLICIES_DIR": str(h.REPO_ROOT / "policies")})
    if redis_url:
        env["EUM_REDIS_URL"] = redis_url
    env.update({k: str(v) for k, v in extra.items()})
    return env


def histogram_buckets(metrics_text: str, name: str, **labels: str) -> dict[float, float]:
    """A histogram of the service's /metrics text, every worker's summed: the cumulative
    count per bucket bound (`inf` the total), over the samples with these labels."""
    from prometheus_client.parser import text_string_to_metric_families

    counts: dict[float, float] = {}
    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            if sample.name == f"{name}_bucket" and all(sample.labels.get(k) == v for k, v in labels.items()):
                bound = float(sample.labels["le"])
                counts[bound] = counts.get(bound, 0.0) + sample.value
    return counts


def served_slower_than(metrics_text: str, route: str, seconds: float) -> tuple[int, float, int]:
    """From the service's request-latency histogram (`eum_request_seconds`,
    api/metrics.py: from the handler's start to the answer's end, on the service's own
    clock): (how many requests to `route` took the service longer than `seconds`, rounded
    up to the histogram's next bucket bound, the finest it tells; that bound; how many
    requests to `route` it timed in all).

    A bound on what the service takes is checked here, not on the client's clock: the
    load generator runs on the same machine, and on a loaded one it fell behind its
    schedule (its thread runnable but waiting for a core most of the time, requests in
    flight piling up to its cap), so the client measured seconds for answers the service
    had given in milliseconds (docs/reliability.md)."""
    counts = histogram_buckets(metrics_text, "eum_request_seconds", route=route)
    if not counts:
        return 0, math.inf, 0
    bound = min(b for b in counts if b >= seconds)
    total = counts[math.inf]
    return int(total - counts[bound]), bound, int(total)


# ---------------------------------------------------------------- seed data


@dataclass
class World:
    url: str
    token: str
    members: list[str]
    merchants: list[str]
    city_budget_won: int


def seed(url: str, *, members: int, merchants: int, city_budget_won: int, topup_won: int = 1_000_000) -> World:
    """Members topped up through the book, sales-weighted merchants, and a city budget
    for the month small enough to run out during the run (so the fault meets a budget
    at its limit)."""
    pop = h.population(11, members, merchants)
    h.seed_registry(url, pop)
    h.seed_budgets(url, {("city", PEAK_DAY.strftime("%Y-%m")): city_budget_won})
    member_ids = [m["member_id"] for m in pop.members]
    h.seed_topups(url, member_ids, topup_won)
    token = h.make_keys(url, ("card-app",))["card-app"]
    rng = random.Random(5)
    merchant_ids = rng.choices([m["merchant_id"] for m in pop.merchants], weights=pop.merchant_weights, k=5_000)
    return World(url, token, member_ids, merchant_ids, city_budget_won)


# ---------------------------------------------------------------- load


@dataclass
class Told:
    """What the client was told for one request."""

    at_s: float  # seconds since the load started (the scheduled send time, in a Load)
    latency_s: float  # in a Load: from the scheduled send time (waiting for a free connection counts)
    status: int | None  # None: no HTTP answer (refused, reset, client timeout)
    kind: str  # "201", "200 replayed", "503 service_unavailable", "connection", "client timeout", ...
    answer: dict | None = None
    retry_after: str | None = None
    problem: bool = False
    # from the client's post to its answer: the service's time plus the client's own delays,
    # seconds when the load generator is starved of CPU (`served_slower_than` is the service's)
    service_s: float = 0.0


class Load:
    """Payments at a constant offered rate (open loop: a stall does not slow the
    sender down) on a thread of its own, at most `in_flight_max` at a time. Each id is
    sent once here; `first[id]` is what the client was told."""

    def __init__(self, base_url: str, world: World, *, rate_per_s: float, client_timeout_s: float = 10.0,
                 in_flight_max: int = 256, seed_: int = 1) -> None:
        assert 0 < rate_per_s <= 5_000 and 1 <= in_flight_max <= 1_000
        self.base_url = base_url
        self.world = world
        self.rate_per_s = rate_per_s
        self.client_timeout_s = client_timeout_s
        self.in_flight_max = in_flight_max
        self.tag = uuid.uuid4().hex[:8]
        self.rng = random.Random(seed_)
        self.bodies: dict[str, dict] = {}
        self.first: dict[str, Told] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.started_at = 0.0
        self.error: BaseException | None = None

    def body(self, serial: int) -> dict:
        second = serial % 3600
        return {"payment_id": f"f-{self.tag}-{serial}", "member_id": self.rng.choice(self.world.members),
                "merchant_id": self.rng.choice(self.world.merchants), "amount": h.amount_won(self.rng),
                "occurred_at": f"{PEAK_DAY.isoformat()}T12:{second // 60:02d}:{second % 60:02d}+09:00"}

    def start(self) -> "Load":
        self.started_at = time.monotonic()
        self._thread = threading.Thread(target=self._main, name="fault-load", daemon=True)
        self._thread.start()
        return self

    def now(self) -> float:
        return time.monotonic() - self.started_at

    def stop(self) -> None:
        """Stop sending and wait for the requests in flight (each bounded by the client timeout)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(self.client_timeout_s + 30)
        if self.error is not None:
            raise self.error

    def _main(self) -> None:
        try:
            try:
                import uvloop  # the load generator's own CPU shows in every latency: keep it small

                runner = uvloop.run
            except ImportError:
                runner = asyncio.run
            runner(self._run())
        except BaseException as error:  # surfaced by stop()
            self.error = error

    async def _run(self) -> None:
        # Idle connections are dropped before the server's keep-alive timeout (uvicorn's 5 s;
        # httpx's default expiry is also 5 s): reusing one the server is closing that instant
        # fails as a ReadError that no fault caused (one of 561 in a CI run of the Redis test).
        limits = httpx.Limits(max_connections=self.in_flight_max, max_keepalive_connections=self.in_flight_max,
                              keepalive_expiry=2.0)
        headers = {"Authorization": f"Bearer {self.world.token}"}
        slots = asyncio.Semaphore(self.in_flight_max)
        async with httpx.AsyncClient(base_url=self.base_url, limits=limits, headers=headers,
                                     timeout=self.client_timeout_s) as client:
            tasks: set[asyncio.Task] = set()
            interval = 1.0 / self.rate_per_s
            serial = 0
            while not self._stop.is_set():
                scheduled = serial * interval
                delay = scheduled - self.now()
                if delay > 0:
                    await asyncio.sleep(min(delay, 0.05))
                    continue
                body = self.body(serial)
                self.bodies[body["payment_id"]] = body
                task = asyncio.create_task(self._one(client, slots, body, scheduled))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                serial += 1
            if tasks:
                await asyncio.wait(tasks, timeout=self.client_timeout_s + 20)

    async def _one(self, client: httpx.AsyncClient, slots: asyncio.Semaphore, body: dict, scheduled: float) -> None:
        async with slots:
            told = await post(client, body, self.started_at)
        # latency from the scheduled send time: waiting for a free slot counts
        told.service_s = told.latency_s
        told.latency_s = told.at_s + told.latency_s - scheduled
        told.at_s = scheduled
        self.first[body["payment_id"]] = told

    # -- what happened

    def acknowledged(self) -> dict[str, Told]:
        return {i: t for i, t in self.first.items() if t.status is not None and 200 <= t.status < 300}

    def unacknowledged(self) -> list[str]:
        return [i for i in self.bodies if i not in self.acknowledged()]

    def kinds(self, since_s: float = 0.0, until_s: float = float("inf")) -> Counter:
        return Counter(t.kind for t in self.first.values() if since_s <= t.at_s < until_s)

    def first_ack_after(self, at_s: float) -> float | None:
        """Send time of the first acknowledged request sent at or after `at_s`."""
        times = [t.at_s for t in self.acknowledged().values() if t.at_s >= at_s]
        return min(times) if times else None

    def last_failure_after(self, at_s: float) -> float | None:
        times = [t.at_s for t in self.first.values() if t.at_s >= at_s and not (t.status and t.status < 300)]
        return max(times) if times else None


async def post(client: httpx.AsyncClient, body: dict, t0: float, path: str = "/v1/payments") -> Told:
    sent = time.monotonic()
    try:
        response = await client.post(path, json=body)
    except httpx.TimeoutException:
        return Told(sent - t0, time.monotonic() - sent, None, "client timeout")
    except httpx.TransportError as error:
        return Told(sent - t0, time.monotonic() - sent, None, f"connection ({type(error).__name__})")
    latency = time.monotonic() - sent
    problem = response.headers.get("content-type", "").startswith("application/problem+json")
    try:
        answer = response.json()
    except ValueError:
        answer = None
    if response.status_code == 201:
        kind = "201"
    elif response.status_code == 200:
        kind = "200 replayed" if response.headers.get("idempotent-replayed") == "true" else "200"
    else:
        code = answer.get("code") if isinstance(answer, dict) else None
        kind = f"{response.status_code} {code}"
    return Told(sent - t0, latency, response.status_code, kind, answer, response.headers.get("retry-after"), problem)


def resend(base_url: str, token: str, bodies: dict[str, dict], ids: list[str], *, deadline_s: float = 60.0,
           concurrency: int = 16, paths: dict[str, str] | None = None) -> dict[str, Told]:
    """The client's retry: send each id again with its body (to `paths[id]`, default
    /v1/payments) until it gets an answer below 500 (a 503 waits its Retry-After; a
    broken connection 0.2 s). Returns the final answer per id."""

    async def run() -> dict[str, Told]:
        out: dict[str, Told] = {}
        slots = asyncio.Semaphore(concurrency)
        stop_at = time.monotonic() + deadline_s
        async with httpx.AsyncClient(base_url=base_url, headers={"Authorization": f"Bearer {token}"},
                                     timeout=10.0) as client:
            async def one(payment_id: str) -> None:
                async with slots:
                    while True:
                        told = await post(client, bodies[payment_id], 0.0,
                                          (paths or {}).get(payment_id, "/v1/payments"))
                        out[payment_id] = told
                        if told.status is not None and told.status < 500 or time.monotonic() > stop_at:
                            return
                        await asyncio.sleep(float(told.retry_after or 0.2))

            await asyncio.gather(*(one(i) for i in ids))
        return out

    return asyncio.run(run())


# ---------------------------------------------------------------- the book afterwards


@dataclass
class Verdict:
    ok: bool
    checks: list[tuple[str, bool, str]]
    sent: int
    recorded: int
    money_lost_won: int
    posted_twice: int


def verify(url: str, told: dict[str, Told], bodies: dict[str, dict],
           kinds: dict[str, str] | None = None) -> Verdict:
    """The whole book (loadtests/checks.py: balanced, sealed, balances = legs, floors,
    budgets within limits and equal to their funder accounts, monthly caps), and for
    the ids of this run (`kinds[id]`: payment, topup, refund or disbursement; default
    payment): each acknowledged one recorded exactly once with the status the client
    was told; none recorded twice; none recorded that the client never sent; money
    lost = amounts of acknowledged writes that moved money (approved payments and
    top-ups, refunds, disbursements) the book does not hold (must be 0)."""
    from loadtests import checks

    kinds = kinds or {}
    kind_of = {i: kinds.get(i, "payment") for i in bodies}

    def acked(t: Told) -> bool:
        return t.status is not None and 200 <= t.status < 300 and bool(t.answer)

    with tempfile.TemporaryDirectory() as tmp:
        acks = Path(tmp) / "acks.jsonl"
        with open(acks, "w") as f:
            for id_, t in told.items():
                if acked(t):
                    f.write(json.dumps({"kind": kind_of[id_], "id": id_, "status": t.answer.get("status")}) + "\n")
        from io import StringIO
        from contextlib import redirect_stdout

        printed = StringIO()
        with redirect_stdout(printed):
            book_ok = checks.check_book_after_run(url, ack_dir=Path(tmp))
    results = [("book checks (loadtests/checks.py)", book_ok, printed.getvalue().strip())]
    recorded: dict[str, str] = {}
    twice = strays = 0
    with psycopg.connect(url) as conn:
        for kind in sorted(set(kind_of.values())):
            table, column = checks.TABLES[kind]
            ids = [i for i, k in kind_of.items() if k == kind]
            status_col = "status" if kind in ("payment", "topup") else "'recorded'"
            recorded.update(conn.execute(f"SELECT {column}, {status_col} FROM {table} WHERE {column} = ANY(%s)",
                                         (ids,)).fetchall())
            twice += conn.execute("SELECT count(*) FROM (SELECT ref FROM ledger_txns WHERE kind = %s "
                                  "AND ref = ANY(%s) GROUP BY ref HAVING count(*) > 1) x",
                                  (checks.LEDGER_KIND[kind], ids)).fetchone()[0]
            # ids that share a sender's prefix (everything before the serial) but were never sent
            patterns = sorted({i.rsplit("-", 1)[0] + "-%" for i in ids})
            strays += conn.execute(f"SELECT count(*) FROM {table} WHERE {column} LIKE ANY(%s) "
                                   f"AND NOT {column} = ANY(%s)", (patterns, ids)).fetchone()[0]

    def moved_money(kind: str, status: str | None) -> bool:  # refunds and disbursements always do
        return status == "approved" if kind in ("payment", "topup") else status is not None

    lost = sum(bodies[i]["amount"] for i, t in told.items()
               if acked(t) and moved_money(kind_of[i], t.answer.get("status", "recorded"))
               and not moved_money(kind_of[i], recorded.get(i)))
    results.append(("money lost (acknowledged, moved money, not in the book)", lost == 0, f"{lost} won"))
    results.append(("nothing posted twice", twice == 0, f"{twice} ids"))
    results.append(("nothing recorded the client never sent", strays == 0, f"{strays}"))
    return Verdict(all(ok for _, ok, _ in results), results, len(bodies), len(recorded), lost, twice)


def redis_matches_book(redis_client, prefix: str, url: str) -> tuple[int, list[str]]:
    """Every payment answer cached in Redis equals the answer the book stored.
    Returns (entries compared, ids that differ)."""
    cached = {}
    head = f"{prefix}idem:"  # then the book's tag (ledger.db.book_tag), the kind and the id
    for key in redis_client.scan_iter(match=f"{head}*:payment:*", count=1000):
        raw = redis_client.get(key)
        if raw is not None:
            _tag, kind, payment_id = key.decode()[len(head):].split(":", 2)
            if kind == "payment":
                cached[payment_id] = json.loads(raw)
    if not cached:
        return 0, []
    with psycopg.connect(url) as conn:
        rows = dict(conn.execute("SELECT payment_id, response FROM payments WHERE payment_id = ANY(%s)",
                                 (list(cached),)).fetchall())
    differ = [i for i, stored in cached.items() if i not in rows or json.loads(rows[i]) != stored["b"]]
    return len(cached), differ


def seoul_now() -> str:
    return dt.datetime.now(h.SEOUL).isoformat(timespec="seconds")
