"""Shared machinery of the load tests and benchmarks: a clean PostgreSQL database per
run, Incheon-shaped seed data, the service started as `eum serve`, and the book checks
read back after a run.

Everything here talks only to 127.0.0.1 and every wait is bounded."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import platform
import random
import resource
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import psycopg  # noqa: E402

PG_ADMIN_URL = os.environ.get("EUM_BENCH_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("EUM_BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
# Put before the name of every database a run creates (`fresh_database`), so that people
# sharing one PostgreSQL server can tell their runs' databases apart (e.g. `alice_`).
DB_NAME_PREFIX = os.environ.get("EUM_BENCH_DB_PREFIX", "")
PYTHON = str(REPO_ROOT / ".venv" / "bin" / "python") if (REPO_ROOT / ".venv").exists() else sys.executable
REPORTS = REPO_ROOT / "reports"
PEPPER = "bench-pepper-not-a-secret"
AUDIT_KEYS = "bench:bench-audit-key-not-a-secret"


def _sign_as_the_services() -> None:
    """Audit entries this process writes (keys, budgets, programs) are signed with the
    services' key: an unkeyed entry after one of theirs would be refused."""
    from ledger import audit

    audit.configure(audit.Keyring.parse(AUDIT_KEYS))
SEOUL = dt.timezone(dt.timedelta(hours=9))
LOOPBACK = "127.0.0.1"
SERVICE_START_S_MAX = 60.0

# The simulated days the scenarios run on (November and December 2025: the 2025-10
# policy stack is in force, with the 2023 win-win layer).
SEED_DAY = dt.date(2025, 11, 3)  # top-ups before the peaks
PEAK_DAY = dt.date(2025, 11, 14)  # a Friday: the lunch peak
NEXT_MONTH_DAY = dt.date(2025, 12, 1)  # start-of-month top-up storm
GRANT_DAY = dt.date(2025, 11, 10)  # grant-disbursement day (coupon-2025-r2 is valid until 11-30)
GRANT_PROGRAM = "coupon-2025-r2"


# ---------------------------------------------------------------- machine


def machine_info() -> dict:
    """Cores, memory and the versions that shape every figure."""
    import importlib.metadata as md

    mem_kib = 0
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_kib = int(line.split()[1])
    versions = {}
    for name in ("fastapi", "starlette", "uvicorn", "pydantic", "sqlalchemy", "psycopg", "redis", "orjson",
                 "uvloop", "httptools", "locust"):
        with contextlib.suppress(md.PackageNotFoundError):
            versions[name] = md.version(name)
    pg = {}
    with contextlib.suppress(Exception), psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        pg["version"] = conn.execute("SHOW server_version").fetchone()[0]
        for setting in ("fsync", "synchronous_commit", "wal_sync_method", "shared_buffers", "commit_delay",
                        "full_page_writes", "min_wal_size", "max_wal_size", "autovacuum"):
            pg[setting] = conn.execute(f"SHOW {setting}").fetchone()[0]
    cpu = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    writeback = {}  # the kernel's write-back of dirty pages: when the database's data files reach the disk
    for name in ("dirty_expire_centisecs", "dirty_background_bytes", "dirty_background_ratio"):
        with contextlib.suppress(OSError, ValueError):
            writeback[name] = int(Path(f"/proc/sys/vm/{name}").read_text())
    return {"cores": os.cpu_count(), "cpu": cpu, "memory_gib": round(mem_kib / 1024 / 1024, 1),
            "python": platform.python_version(), "kernel": platform.release(), "versions": versions,
            "postgresql": pg, "writeback": writeback}


def service_settings() -> dict:
    """The batch settings a service started from this process resolves (`eum.settings`,
    from the same EUM_* environment and defaults), for a benchmark's settings line."""
    from eum.settings import Settings

    s = Settings()
    return {"batch_size_max": s.batch_size_max, "writers": s.batch_writers, "linger_us": s.batch_linger_us}


def print_machine(settings: dict | None = None) -> dict:
    info = machine_info()
    print(f"machine: {info['cores']} cores ({info['cpu']}), {info['memory_gib']} GiB, Python {info['python']}")
    print("versions: " + ", ".join(f"{k} {v}" for k, v in info["versions"].items()))
    pg = info["postgresql"]
    print("postgresql: " + ", ".join(f"{k}={v}" for k, v in pg.items()))
    size = str(pg.get("min_wal_size", ""))
    units = {"kB": 1 / 1024, "MB": 1, "GB": 1024, "TB": 1024 * 1024}
    if size[:-2].isdigit() and size[-2:] in units and int(size[:-2]) * units[size[-2:]] < 1024:
        print("note: min_wal_size is small: new WAL segments will stall every commit now and then "
              "(README, Services: ALTER SYSTEM SET min_wal_size = '1GB')")
    writeback = info["writeback"]
    if writeback:
        print("kernel write-back: " + ", ".join(f"vm.{k}={v}" for k, v in writeback.items()))
    if writeback.get("dirty_expire_centisecs", 0) > 1000 and not writeback.get("dirty_background_bytes"):
        print("note: the kernel writes dirty data back in bursts every ~30 s, and commits wait behind them "
              "(README, Services: sysctl vm.dirty_expire_centisecs=500)")
    if settings:
        print("settings: " + ", ".join(f"{k}={v}" for k, v in settings.items()))
    return info


# ---------------------------------------------------------------- databases


def pg_url(database: str) -> str:
    return PG_ADMIN_URL.rsplit("/", 1)[0] + "/" + database


@contextlib.contextmanager
def fresh_database(prefix: str = "eum_bench"):
    """A new, migrated PostgreSQL database (`EUM_BENCH_DB_PREFIX` + `prefix` + `_<hex>`),
    dropped afterwards."""
    from ledger.db import migrate

    name = f"{DB_NAME_PREFIX}{prefix}_{uuid.uuid4().hex[:12]}"
    assert name.replace("_", "").isalnum() and len(name) <= 63, f"not a plain database name: {name!r}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        url = pg_url(name)
        migrate(url)
        yield url
    finally:
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def clear_redis_prefix(prefix: str) -> None:
    import redis

    client = redis.Redis.from_url(REDIS_URL)
    try:
        # One pass of SCAN, unlinking as it goes (SCAN still returns every key that was
        # there from start to end). Collecting a whole SCAN per batch of 1,000 made the
        # clean-up quadratic: ~20 minutes after a 10-minute run's 480,000 replay keys.
        batch: list[bytes] = []
        for key in client.scan_iter(match=f"{prefix}*", count=5000):
            batch.append(key)
            if len(batch) >= 5000:
                client.unlink(*batch)
                batch.clear()
        if batch:
            client.unlink(*batch)
    finally:
        client.close()


# ---------------------------------------------------------------- seed data


@dataclass
class Population:
    members: list[dict]
    merchants: list[dict]
    merchant_weights: list[float] = field(default_factory=list)


def population(seed: int, members: int, merchants: int) -> Population:
    """Members across the ten districts by population, merchants with a lognormal sales
    distribution (settlement.datagen's shapes), payment traffic weighted by sales."""
    from settlement import datagen

    rng = random.Random(seed)
    member_rows = [{"member_id": f"M{i:07d}", "district": datagen._pick(rng, datagen.DISTRICT_WEIGHTS),
                    "status": "active"} for i in range(members)]
    merchant_rows = datagen._merchant_rows(rng, merchants, dt.date(2019, 1, 1))
    # A few large marts: their payments are declined (category excluded), as in life.
    for row in merchant_rows[: max(1, merchants // 500)]:
        row.update(category="large_mart", annual_sales_won=90_000_000_000)
    weights = [max(row["annual_sales_won"], 10_000_000) ** 0.8 for row in merchant_rows]
    return Population(member_rows, merchant_rows, weights)


def amount_won(rng: random.Random) -> int:
    from settlement import datagen

    return datagen._amount(rng)


def seed_registry(url: str, pop: Population) -> None:
    """Members and merchants with their fact versions and accounts, written in bulk
    (COPY): the shape a migration from the previous system would load. No audit entries:
    nothing is edited."""
    from ledger import accounts as acct

    now = time.time_ns() // 1000
    with psycopg.connect(url) as conn, conn.cursor() as cur:
        with cur.copy("COPY members (member_id, district, status, created_at_us, updated_at_us) FROM STDIN") as cp:
            for m in pop.members:
                cp.write_row((m["member_id"], m["district"], m["status"], now, now))
        with cur.copy("COPY merchants (merchant_id, name, district, category, annual_sales_won, registered_from, "
                      "flags, merchant_share_bp, updated_at_us) FROM STDIN") as cp:
            for r in pop.merchants:
                cp.write_row((r["merchant_id"], r["name"], r["district"], r["category"], r["annual_sales_won"],
                              r["registered_from"].isoformat(), ",".join(r["flags"]), r["merchant_share_bp"], now))
        # and their fact versions, as the registry writes them (migration 0022): else the
        # book check after a run reports every row ("registry rows equal their latest
        # fact versions")
        with cur.copy("COPY member_facts (member_id, valid_from_us, district, status) FROM STDIN") as cp:
            for m in pop.members:
                cp.write_row((m["member_id"], now, m["district"], m["status"]))
        with cur.copy("COPY merchant_facts (merchant_id, valid_from_us, district, category, annual_sales_won, "
                      "registered_from, flags, merchant_share_bp) FROM STDIN") as cp:
            for r in pop.merchants:
                cp.write_row((r["merchant_id"], now, r["district"], r["category"], r["annual_sales_won"],
                              r["registered_from"].isoformat(), ",".join(r["flags"]), r["merchant_share_bp"]))
        with cur.copy("COPY accounts (account_id, type, owner_id, balance_won, floor_zero) FROM STDIN") as cp:
            for m in pop.members:
                for account_id in (acct.member_charged(m["member_id"]), acct.member_points(m["member_id"])):
                    cp.write_row((account_id, "liability", m["member_id"], 0, True))
            for r in pop.merchants:
                cp.write_row((acct.merchant_payable(r["merchant_id"]), "liability", None, 0, False))
        conn.commit()
        cur.execute("ANALYZE")


def seed_budgets(url: str, limits: dict[tuple[str, str], int]) -> None:
    _sign_as_the_services()
    from ledger import registry
    from ledger.db import make_engine

    engine = make_engine(url)
    try:
        with engine.begin() as conn:
            for (source, period), limit in sorted(limits.items()):
                registry.put_budget(conn, source=source, period=period, limit_won=limit, actor="loadtest-seed")
    finally:
        engine.dispose()


def seed_grant_program(url: str, program_file: str = "2025-09-livelihood-coupon-round2.yaml") -> None:
    _sign_as_the_services()
    import yaml

    from ledger import registry
    from ledger.db import make_engine
    from rules.grants import GrantProgramDocument

    document = GrantProgramDocument.model_validate(yaml.safe_load(
        (REPO_ROOT / "policies" / "grants" / program_file).read_text(encoding="utf-8")))
    engine = make_engine(url)
    try:
        with engine.begin() as conn:
            registry.create_grant_program(conn, document, "loadtest-seed", approved_by="loadtest-seed")
    finally:
        engine.dispose()


def seed_topups(url: str, member_ids: list[str], amount_won: int, day: dt.date = SEED_DAY,
                batch_size: int = 1000) -> int:
    """Top every member up through the book itself (so the ledger holds the money)."""
    from ledger.book import Book
    from ledger.commands import TopUp, request_hash
    from ledger.db import make_engine
    from rules.loader import timeline_from_dir
    from rules.timeutil import to_us

    engine = make_engine(url)
    at_us = to_us(dt.datetime.combine(day, dt.time(9, 0), SEOUL))
    book = Book(engine, timeline_from_dir(REPO_ROOT / "policies"))
    done = 0
    try:
        for start in range(0, len(member_ids), batch_size):
            commands = []
            for member_id in member_ids[start:start + batch_size]:
                body = {"topup_id": f"seed-{member_id}", "member_id": member_id, "amount": amount_won,
                        "occurred_at_us": at_us}
                commands.append(TopUp(f"seed-{member_id}", member_id, amount_won, at_us, request_hash("topup", body)))
            outcomes = book.execute(commands)
            done += sum(1 for o in outcomes if o.ok and o.body["status"] == "approved")
    finally:
        engine.dispose()
    return done


def make_keys(url: str, roles: tuple[str, ...] = ("card-app", "admin", "policy-editor")) -> dict[str, str]:
    _sign_as_the_services()
    from ledger.db import make_engine
    from ledger.keys import create_key

    engine = make_engine(url)
    try:
        return {role: create_key(engine, name=f"loadtest {role}", role=role, pepper=PEPPER)[1] for role in roles}
    finally:
        engine.dispose()


# ---------------------------------------------------------------- the service


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def worker_pids_of(supervisor_pid: int) -> list[int]:
    """uvicorn's worker processes: the multiprocessing children of `eum serve`."""
    workers = []
    children = Path(f"/proc/{supervisor_pid}/task/{supervisor_pid}/children")
    with contextlib.suppress(OSError):
        for pid in children.read_text().split():
            with contextlib.suppress(OSError):
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
                if b"multiprocessing" in cmd and b"resource_tracker" not in cmd:
                    workers.append(int(pid))
    return workers


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


def kill9_worker(supervisor_pid: int) -> int:
    """SIGKILL to one uvicorn worker (its supervisor starts a replacement); its pid."""
    pids = worker_pids_of(supervisor_pid)
    assert pids, "no worker processes found"
    os.kill(pids[0], signal.SIGKILL)
    return pids[0]


def kill9_group(process: subprocess.Popen, timeout_s: float = 10.0) -> None:
    """SIGKILL to a service's whole process group (supervisor and workers: no shutdown),
    and wait until every process of it is gone (so its port is free again)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout_s)
    deadline = time.monotonic() + timeout_s
    while group_alive(process.pid):
        if time.monotonic() > deadline:
            raise TimeoutError(f"process group {process.pid} still alive {timeout_s} s after SIGKILL")
        time.sleep(0.05)


@dataclass
class Service:
    process: subprocess.Popen
    port: int
    redis_prefix: str
    log_path: Path
    command: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)

    @property
    def base_url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def worker_pids(self) -> list[int]:
        """The uvicorn worker processes (children of the `eum serve` process); the
        service's own pid when it runs without workers."""
        return worker_pids_of(self.process.pid) or [self.process.pid]

    def kill9_worker(self) -> int:
        return kill9_worker(self.process.pid)

    def kill9_all(self) -> None:
        kill9_group(self.process)

    def start_again(self) -> float:
        """The same command, port, database, Redis prefix and settings, started again
        (after `kill9_all`); seconds until it answers /healthz."""
        assert self.process.poll() is not None, "still running"
        started = time.monotonic()
        self.process = spawn_service(self.command, self.env, self.log_path, "ab")
        wait_ready(self)
        return time.monotonic() - started


def spawn_service(command: list[str], env: dict[str, str], log_path: Path, mode: str) -> subprocess.Popen:
    """The service in a process group of its own (so a kill reaches its workers), its
    output to `log_path` (`mode` "wb" for a new log, "ab" to go on with it)."""
    with open(log_path, mode) as log:
        return subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)


def service_env(url: str, redis_prefix: str, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"EUM_DATABASE_URL": url, "EUM_REDIS_URL": REDIS_URL, "EUM_REDIS_PREFIX": redis_prefix,
                "EUM_KEY_PEPPER": PEPPER, "EUM_AUDIT_KEYS": AUDIT_KEYS, "EUM_LOG_LEVEL": "WARNING",
                "EUM_ENVIRONMENT": "production", "EUM_POLICIES_DIR": str(REPO_ROOT / "policies")})
    env.update({k: str(v) for k, v in extra.items()})
    return env


@contextlib.contextmanager
def running_service(url: str, *, workers: int, env_extra: dict | None = None, argv: list[str] | None = None,
                    name: str = "eum"):
    """`eum serve --workers N` (or `argv`) on a free loopback port until the block ends.

    The data just seeded is written to disk first (`os.sync`): left to the kernel, it is
    written back ~30 s after it was dirtied (`vm.dirty_expire_centisecs`), tens of MB of
    newly allocated blocks at once, and every commit's WAL flush waited behind it: the
    one stall of 50-80 ms that the first round of a run at 1,000/s had, ~30 s after the
    seeding (docs/performance.md, item 21). A service is not measured on writing back
    its benchmark's own set-up."""
    os.sync()
    port = free_port()
    prefix = f"eum-bench-{uuid.uuid4().hex[:10]}:"
    REPORTS.mkdir(exist_ok=True)
    log_path = REPORTS / f"{name}-{port}.log"
    command = argv or [PYTHON, "-c", "from eum.cli import app; app()", "serve", "--host", LOOPBACK,
                       "--port", str(port), "--workers", str(workers)]
    command = [part.replace("{port}", str(port)) for part in command]
    env = service_env(url, prefix, **(env_extra or {}))
    service = Service(spawn_service(command, env, log_path, "wb"), port, prefix, log_path, command, env)
    try:
        wait_ready(service)
        yield service
    finally:
        stop(service)
        clear_redis_prefix(prefix)


def wait_ready(service: Service, path: str = "/healthz") -> None:
    deadline = time.monotonic() + SERVICE_START_S_MAX
    while time.monotonic() < deadline:
        if service.process.poll() is not None:
            raise RuntimeError(f"service exited: see {service.log_path}\n" + service.log_path.read_text()[-3000:])
        with contextlib.suppress(OSError):
            with urllib.request.urlopen(service.base_url + path, timeout=1) as response:
                if response.status == 200:
                    return
        time.sleep(0.2)
    raise RuntimeError(f"service did not become ready in {SERVICE_START_S_MAX} s")


def stop(service: Service, timeout_s: float = 20.0) -> None:
    if service.process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(service.process.pid, signal.SIGINT)  # our own process group (start_new_session)
    try:
        service.process.wait(timeout_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(service.process.pid, signal.SIGKILL)
        service.process.wait(5)


def http_json(method: str, url: str, body: dict | None, token: str, timeout_s: float = 10.0) -> tuple[int, dict]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method,
                                     headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return response.status, json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"{}")


# ---------------------------------------------------------------- resident memory


def rss_mib(pid: int) -> float | None:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return None


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of one process (from /proc)."""
    with contextlib.suppress(OSError, IndexError, ValueError):
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return 0.0


def batch_counts(svc: "Service") -> tuple[float, float]:
    """(commands, batches) written so far, from the service's metrics (all workers)."""
    with urllib.request.urlopen(svc.base_url + "/metrics", timeout=10) as response:
        text = response.read().decode()
    values = {}
    for metric_line in text.splitlines():
        for name in ("eum_batch_commands_sum", "eum_batch_commands_count"):
            if metric_line.startswith(name + " "):
                values[name] = float(metric_line.split()[1])
    return values.get("eum_batch_commands_sum", 0.0), values.get("eum_batch_commands_count", 0.0)


def postgres_cpu_seconds() -> float:
    """CPU of every PostgreSQL process on the machine (backends, WAL writer, checkpointer)."""
    total = 0.0
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "comm").read_text().startswith("postgres"):
                    total += cpu_seconds(int(entry.name))
            except OSError:
                pass
    return total


def machine_cpu_seconds() -> tuple[float, float]:
    """(busy, idle) CPU seconds of the whole machine since boot, all cores (/proc/stat;
    iowait counts as idle, steal as neither)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    tick = os.sysconf("SC_CLK_TCK")
    user, nice, system, idle, iowait, irq, softirq = fields[:7]
    return (user + nice + system + irq + softirq) / tick, (idle + iowait) / tick


@dataclass(frozen=True)
class CpuSample:
    """Cumulative CPU seconds of each party of a service run, and its batch counters:
    take one before and one after a load, and `per_request` divides the difference."""

    workers: float
    postgres: float
    children: float  # processes this one started and waited for (wrk)
    busy: float
    idle: float
    commands: float
    batches: float
    wal_bytes: float = 0.0  # the whole server's WAL: bytes from its insert position, records and
    # full-page images from pg_stat_wal (which each connection publishes up to ~1 s late)
    wal_records: float = 0.0
    wal_fpi: float = 0.0

    @classmethod
    def take(cls, svc: "Service", pids: list[int], *, counted: bool = True) -> "CpuSample":
        """`counted`: read the batch counters (the payments service has them, the floor
        app has not)."""
        commands, batches = batch_counts(svc) if counted else (0.0, 0.0)
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        busy, idle = machine_cpu_seconds()
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
            wal = conn.execute("SELECT pg_wal_lsn_diff(pg_current_wal_insert_lsn(), '0/0'), wal_records, wal_fpi "
                               "FROM pg_stat_wal").fetchone()
        return cls(sum(cpu_seconds(p) for p in pids), postgres_cpu_seconds(), usage.ru_utime + usage.ru_stime,
                   busy, idle, commands, batches, *(float(v) for v in wal))

    def per_request(self, after: "CpuSample", served: int) -> dict:
        """µs of CPU per request served between this sample and `after`, for the workers,
        every PostgreSQL process, the children and the whole machine; the machine's idle
        share; the mean commands per batch (None when no batch was counted); and the
        server's WAL bytes, records and full-page images per request."""
        n = max(served, 1)
        busy, idle = after.busy - self.busy, after.idle - self.idle
        batches = after.batches - self.batches
        return {
            "workers": 1e6 * (after.workers - self.workers) / n,
            "postgres": 1e6 * (after.postgres - self.postgres) / n,
            "children": 1e6 * (after.children - self.children) / n,
            "machine": 1e6 * busy / n,
            "idle": idle / max(busy + idle, 1e-9),
            "batch_mean": (after.commands - self.commands) / batches if batches > 0 else None,
            "wal_bytes": (after.wal_bytes - self.wal_bytes) / n,
            "wal_records": (after.wal_records - self.wal_records) / n,
            "wal_fpi": (after.wal_fpi - self.wal_fpi) / n,
        }


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    index = min(len(sorted_values) - 1, max(0, int(round(q * (len(sorted_values) - 1)))))
    return sorted_values[index]


def median(values: list[float]) -> float:
    ordered = sorted(values)
    n = len(ordered)
    if n == 0:
        return float("nan")
    return ordered[n // 2] if n % 2 else (ordered[n // 2 - 1] + ordered[n // 2]) / 2
