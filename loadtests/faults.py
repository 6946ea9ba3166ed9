"""Reliability runs: each fault injected into the real service under a constant payment
load, with the figures for docs/reliability.md.

    flock /tmp/eum-bench.lock .venv/bin/python loadtests/faults.py [FAULT ...]
        [--rate 120] [--before 10] [--during 10] [--after 15] [--members 10000] [--merchants 2000]

FAULT (default: all, in this order): kill-worker, kill-service, redis-flush,
redis-restart, pg-restart (a clean fast shutdown), pg-crash (immediate shutdown: no
checkpoint, recovery from the WAL at the next start), pg-slow, redis-slow.

Everything runs on PRIVATE servers started here (a throwaway PostgreSQL cluster and a
redis-server on free ports, see loadtests/faultkit.py), never the shared ones, and
they are deleted at the end. For each fault: a fresh database seeded with members
(topped up), merchants and a city budget that runs out during the run; `eum serve
--workers 2`; payments at --rate for before + during + after seconds with the fault
in the middle; then every id the client was not acknowledged is resent with the same
id until it is, and the book is read back (loadtests/checks.py, exactly once per id,
money lost). Prints one block per fault and a Markdown table, and writes
reports/reliability-<time>.json. Exit 1 when any check fails."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx  # noqa: E402

from loadtests import faultkit as fk  # noqa: E402
from loadtests import harness as h  # noqa: E402

FAULTS = ("kill-worker", "kill-service", "redis-flush", "redis-restart", "pg-restart", "pg-crash", "pg-slow",
          "redis-slow")
REQUEST_TIMEOUT_MS = 2_000
PG_DELAY_S = 1.5  # each way, each chunk, while "pg-slow"
REDIS_DELAY_S = 0.5  # ten times the Redis call timeout, while "redis-slow"


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def ms(value: float | None) -> float | None:
    return None if value is None else round(value * 1000, 1)


def run_fault(fault: str, args, pg: fk.PrivatePostgres, redis: fk.PrivateRedis) -> dict:
    if not pg.running():
        pg.start()
    if redis.process is None:
        redis.start()
    world = fk.seed(pg.create_database(), members=args.members, merchants=args.merchants,
                    city_budget_won=args.city_budget)
    env = {"EUM_REQUEST_TIMEOUT_MS": REQUEST_TIMEOUT_MS}
    database_url, redis_url, proxy = world.url, redis.url, None
    if fault.startswith("redis-"):
        env["EUM_IDEMPOTENCY_LOOKUP"] = "redis"  # Redis on the request path too: the harder case
    if fault == "pg-slow":
        proxy = fk.DelayProxy(pg.port)
        database_url = pg.url(world.url.rsplit("/", 1)[1], port=proxy.port)
    if fault == "redis-slow":
        proxy = fk.DelayProxy(redis.port)
        redis_url = f"redis://127.0.0.1:{proxy.port}/0"
    h.REPORTS.mkdir(exist_ok=True)
    service = fk.ServiceProcess(fk.service_env(database_url, redis_url, **env),
                                h.REPORTS / f"fault-{fault}-{time.strftime('%H%M%S')}.log")
    out: dict = {"fault": fault}
    try:
        service.start()
        load = fk.Load(service.base_url, world, rate_per_s=args.rate, client_timeout_s=10).start()
        time.sleep(args.before)
        fault_at = load.now()
        notes = inject(fault, service, pg, redis, proxy, load, args)
        healed_at = load.now()
        time.sleep(args.after)
        load.stop()
        ended_at = load.now()
        out.update(notes)
        out.update(figures(load, fault_at, healed_at, ended_at))
        retried = fk.resend(service.base_url, world.token, load.bodies, load.unacknowledged(), deadline_s=120)
        told = {**load.acknowledged(), **retried}
        out["resent"] = len(retried)
        out["resent_outcomes"] = dict(sorted(_count(t.kind for t in retried.values()).items()))
        verdict = fk.verify(world.url, told, load.bodies)
        out.update({"book_ok": verdict.ok, "checks": verdict.checks, "money_lost_won": verdict.money_lost_won,
                    "posted_twice": verdict.posted_twice, "recorded": verdict.recorded,
                    "all_acknowledged_after_resend": all(t.status in (200, 201) for t in retried.values())})
        if fault.startswith("redis-"):
            client = redis.client()
            try:
                compared, differ = fk.redis_matches_book(client, service.env["EUM_REDIS_PREFIX"], world.url)
            finally:
                client.close()
            out["redis_entries_checked_against_book"] = compared
            out["redis_entries_differing"] = len(differ)
        limit, committed = _budget(world)
        out["city_budget"] = {"limit": limit, "committed": committed}
    finally:
        service.stop()
        if proxy is not None:
            proxy.close()
    out.update(server_side(service.log_path))
    return out


def server_side(log_path: Path) -> dict:
    """What the service itself took for its 5xx answers (its log: api/app.py's Edge logs
    every answer >= 500 with its milliseconds, as a `request` line or, for a call the
    access log names, its `access` line). The client's figures also hold the load
    generator's own delays, which on a busy 2-core machine are the larger part."""
    times: dict[int, list[float]] = {}
    for line in log_path.read_text(errors="replace").splitlines():
        if line.startswith("{") and ('"event": "request"' in line or '"event": "access"' in line):
            with contextlib.suppress(ValueError, KeyError):
                row = json.loads(line)
                if int(row["status"]) >= 500:
                    times.setdefault(int(row["status"]), []).append(float(row["ms"]))
    return {"server_5xx": {str(status): {"count": len(v), "p50_ms": percentile(v, 0.5), "max_ms": max(v)}
                           for status, v in sorted(times.items())}}


def inject(fault: str, service, pg, redis, proxy, load: fk.Load, args) -> dict:
    """The fault itself, lasting about --during seconds; returns what was measured on the way."""
    notes: dict = {}
    if fault == "kill-worker":
        before = set(service.worker_pids())
        started = time.monotonic()
        notes["killed_pid"] = service.kill9_worker()
        notes["worker_replaced_s"] = round(fk._wait(
            lambda: len(set(service.worker_pids()) - before) == 1 and len(service.worker_pids()) == 2, 60,
            "replacement worker"), 2)
        time.sleep(max(0.0, args.during - (time.monotonic() - started)))
    elif fault == "kill-service":
        service.kill9_all()
        time.sleep(min(2.0, args.during))  # down, as an orchestrator would take to notice
        notes["restart_s"] = round(service.start(), 2)
    elif fault == "redis-flush":
        for _ in range(3):  # flushed three times during the fault window
            redis.flush()
            time.sleep(args.during / 3)
    elif fault == "redis-restart":
        redis.stop()
        time.sleep(args.during / 2)
        ready = httpx.get(service.base_url + "/readyz", timeout=5)
        notes["readyz_while_redis_down"] = ready.status_code
        redis.start()
        time.sleep(args.during / 2)
    elif fault in ("pg-restart", "pg-crash"):
        pg.stop("fast" if fault == "pg-restart" else "immediate")
        time.sleep(args.during / 2)
        ready = httpx.get(service.base_url + "/readyz", timeout=5)
        notes["readyz_while_pg_down"] = ready.status_code
        time.sleep(args.during / 2)
        notes["pg_start_s"] = round(pg.start(), 2)
    elif fault == "pg-slow":
        proxy.delay_s = PG_DELAY_S
        notes["injected_delay_ms_each_way"] = PG_DELAY_S * 1000
        time.sleep(args.during)
        proxy.delay_s = 0.0
    elif fault == "redis-slow":
        proxy.delay_s = REDIS_DELAY_S
        notes["injected_delay_ms_each_way"] = REDIS_DELAY_S * 1000
        time.sleep(args.during)
        proxy.delay_s = 0.0
    else:
        raise ValueError(fault)
    return notes


def figures(load: fk.Load, fault_at: float, healed_at: float, ended_at: float) -> dict:
    told = list(load.first.values())
    acked = [t for t in told if t.status is not None and 200 <= t.status < 300]
    failed = [t for t in told if not (t.status is not None and 200 <= t.status < 300)]
    first_ack = load.first_ack_after(healed_at)
    last_failure = load.last_failure_after(fault_at)
    unavailable = [t for t in failed if t.status == 503]
    return {
        "offered_per_s": load.rate_per_s,
        "seconds": round(ended_at, 1),
        "fault_window_s": [round(fault_at, 1), round(healed_at, 1)],
        "tried": len(told),
        "acknowledged": len(acked),
        "held_per_s": round(len(acked) / ended_at, 1),
        "errors": dict(sorted(_count(t.kind for t in failed).items())),
        "errors_500": sum(1 for t in failed if t.status is not None and t.status >= 500 and t.status != 503),
        "client_timeouts": sum(1 for t in failed if t.kind == "client timeout"),
        "503_all_problem_with_retry_after": all(t.problem and t.retry_after for t in unavailable),
        # what the service took to say 503 (from the request leaving the client)
        "503_latency_max_ms": ms(max((t.service_s for t in unavailable), default=None)),
        "ack_latency_ms": {"p50": ms(percentile([t.latency_s for t in acked], 0.5)),
                           "p99": ms(percentile([t.latency_s for t in acked], 0.99)),
                           "max": ms(max((t.latency_s for t in acked), default=None))},
        "ack_p99_ms_during_fault": ms(percentile([t.latency_s for t in acked if fault_at <= t.at_s < healed_at], 0.99)),
        # from the end of the fault (dependency back) to the first payment acknowledged after it
        "recovered_after_heal_s": None if first_ack is None else round(max(0.0, first_ack - healed_at), 2),
        # from the fault to the last request that failed (the whole visible disruption)
        "disruption_s": None if last_failure is None else round(last_failure - fault_at, 2),
    }


def _count(items) -> dict:
    out: dict = {}
    for item in items:
        out[item] = out.get(item, 0) + 1
    return out


def _budget(world: fk.World) -> tuple[int, int]:
    import psycopg

    with psycopg.connect(world.url) as conn:
        return conn.execute("SELECT limit_won, committed_won FROM budgets WHERE source = 'city' AND period = %s",
                            (fk.PEAK_DAY.strftime("%Y-%m"),)).fetchone()


def good(result: dict) -> bool:
    return (result["book_ok"] and result["money_lost_won"] == 0 and result["posted_twice"] == 0
            and result["all_acknowledged_after_resend"] and result["errors_500"] == 0
            and result["client_timeouts"] == 0 and result["503_all_problem_with_retry_after"]
            and result.get("redis_entries_differing", 0) == 0)


def table(results: list[dict]) -> str:
    rows = ["| fault | offered/s | held/s | tried | acked first time | errors by kind | 503 max ms (client / server) | "
            "resent → outcome | recovery | money lost | book |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in results:
        errors = ", ".join(f"{k}: {v}" for k, v in r["errors"].items()) or "none"
        resent = ", ".join(f"{k}: {v}" for k, v in r["resent_outcomes"].items()) or "—"
        recovery = (f"{r['recovered_after_heal_s']} s after heal; disruption {r['disruption_s']} s"
                    if r["disruption_s"] is not None else "no disruption")
        rows.append(f"| {r['fault']} | {r['offered_per_s']:.0f} | {r['held_per_s']} | {r['tried']} | "
                    f"{r['acknowledged']} | {errors} | {r['503_latency_max_ms'] or '—'} / "
                    f"{r['server_5xx'].get('503', {}).get('max_ms', '—')} | {r['resent']} → {resent} | "
                    f"{recovery} | {r['money_lost_won']} | {'ok' if good(r) else 'FAILED'} |")
    return "\n".join(rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("faults", nargs="*", metavar="FAULT", help=f"any of {', '.join(FAULTS)} (default: all)")
    parser.add_argument("--rate", type=float, default=120.0, help="offered payments/s")
    parser.add_argument("--before", type=float, default=10.0)
    parser.add_argument("--during", type=float, default=10.0)
    parser.add_argument("--after", type=float, default=15.0)
    parser.add_argument("--members", type=int, default=10_000)
    parser.add_argument("--merchants", type=int, default=2_000)
    parser.add_argument("--city-budget", type=int, default=3_000_000, help="won; runs out during the run")
    args = parser.parse_args()
    faults = args.faults or list(FAULTS)
    unknown = [f for f in faults if f not in FAULTS]
    if unknown:
        parser.error(f"unknown fault(s) {unknown}; choose from {', '.join(FAULTS)}")
    assert 0 < args.rate <= 2_000 and 0 < args.before + args.during + args.after <= 600
    why_not = fk.available()
    if why_not:
        print(f"cannot run: {why_not}")
        return 2
    h.print_machine({"faults": ",".join(faults), "offered payments/s": args.rate, "before/during/after s":
                     f"{args.before}/{args.during}/{args.after}", "workers": 2, "members": args.members,
                     "merchants": args.merchants, "request timeout ms": REQUEST_TIMEOUT_MS})
    pg, redis = fk.PrivatePostgres(), fk.PrivateRedis()
    results = []
    try:
        pg.start()
        redis.start()
        print(f"private PostgreSQL on :{pg.port} (fsync on), private Redis on :{redis.port}")
        for fault in faults:
            print(f"\n== {fault} ({fk.seoul_now()})", flush=True)
            result = run_fault(fault, args, pg, redis)
            results.append(result)
            shown = {k: v for k, v in result.items() if k != "checks"}
            print(json.dumps(shown, indent=1, default=str))
            for name, ok, detail in result["checks"]:
                if not ok:
                    print(f"  BAD {name}: {detail[:2000]}")
            print(f"RESULT {fault}: {'ok' if good(result) else 'FAILED'}", flush=True)
    finally:
        pg.destroy()
        redis.destroy()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = h.REPORTS / f"reliability-{stamp}.json"
    path.write_text(json.dumps({"machine": h.machine_info(), "args": vars(args), "results": results}, indent=1,
                               default=str))
    print("\n" + table(results))
    print(f"\nwritten {path}")
    return 0 if all(good(r) for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
