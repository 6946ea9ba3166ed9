"""(c) Bulk replay: payments evaluated and durably recorded in-process, through the book
itself, on PostgreSQL and on SQLite. Two modes (`--modes`):

- `execute`: `Book.execute` with large batches (the same rules, the same writes, the same
  database guards as the HTTP path), batches on `--threads` threads taken from one queue,
  each thread on one kept connection as the service's writer threads are;
- `replay`: the bulk payment writer as `eum payments replay` runs it
  (`ledger.replay.replay_windows`: windows of 8 chunks per stream, each through
  `replay_payments`: chunks of `--batch`, legs, sealing transactions and payment rows by
  binary COPY on PostgreSQL, payments split into `--threads` member streams so each
  member's payments keep their order), then the same payments again (all must come back
  replayed, nothing recorded twice).

Besides payments/s it prints the CPU time per payment of this process (Python: rules,
bodies, driver) and of the PostgreSQL backends (SQL, triggers, WAL), which are steady
when the machine is shared and wall-clock figures are not. Median of --repeats runs.
On PostgreSQL it also prints what each pass wrote to the server's WAL per payment
(bytes, records, full-page images, from `pg_stat_wal`) and the checkpoints during it.

    .venv/bin/python benchmarks/bulk_replay.py [--payments 100000] [--batch 2000] [--threads 2]
        [--repeats 3] [--backends postgresql,sqlite] [--modes execute,replay]

Target: >= 50,000 payments/s on each backend. Exit 1 when a book check fails (a target
missed is a figure: exit 0)."""

from __future__ import annotations

import argparse
import datetime as dt
import random
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psycopg  # noqa: E402

from loadtests import harness as h  # noqa: E402

TARGET_PER_S = 50_000


def payments(pop: h.Population, count: int, seed: int, tag: str) -> list:
    from rules.timeutil import to_us
    from settlement import datagen

    rng = random.Random(seed)
    start = to_us(dt.datetime.combine(h.PEAK_DAY, dt.time(7, 0), h.SEOUL))
    members = [m["member_id"] for m in pop.members]
    merchants = rng.choices([m["merchant_id"] for m in pop.merchants], weights=pop.merchant_weights, k=count)
    step_us = 16 * 3_600_000_000 // max(count, 1)
    return [datagen.pay(f"{tag}-{i}", rng.choice(members), merchants[i], h.amount_won(rng), start + i * step_us)
            for i in range(count)]


def backend_pids(url: str) -> list[int]:
    database = url.rsplit("/", 1)[1]
    with psycopg.connect(h.PG_ADMIN_URL, autocommit=True) as conn:
        return [r[0] for r in conn.execute("SELECT pid FROM pg_stat_activity WHERE datname = %s", (database,))]


def wal_counters() -> dict[str, float]:
    """The whole server's WAL so far and its checkpoints: bytes from its insert position
    (current at once), records and full-page images from `pg_stat_wal` (each connection
    publishes them up to ~1 s late, so a run of a second or two reads them low; bytes
    read from `pg_stat_wal` came out 0 for such a run). Server-wide, so a run's
    difference is its own only when nothing else writes (as these runs are meant to be
    run)."""
    with psycopg.connect(h.PG_ADMIN_URL, autocommit=True) as conn:
        records, fpi, size = conn.execute(
            "SELECT wal_records, wal_fpi, pg_wal_lsn_diff(pg_current_wal_insert_lsn(), '0/0') FROM pg_stat_wal"
        ).fetchone()
        checkpoints = conn.execute("SELECT checkpoints_timed + checkpoints_req FROM pg_stat_bgwriter").fetchone()[0]
    return {"records": float(records), "fpi": float(fpi), "bytes": float(size), "checkpoints": float(checkpoints)}


def replay(book, commands: list, batch: int, threads: int) -> float:
    """Run the batches on `threads` threads (as `threads` writers would); returns seconds."""
    from ledger.book import PinnedConnection

    batches = [commands[i:i + batch] for i in range(0, len(commands), batch)]
    lock = threading.Lock()
    failures: list[str] = []

    def worker():
        # One connection kept per thread, as each of the service's writer threads keeps
        # one (`PinnedConnection`: no pool checkout and pre-ping per batch).
        pinned = PinnedConnection(book.engine)
        try:
            while True:
                with lock:
                    if not batches:
                        return
                    chunk = batches.pop(0)
                outcomes = book.execute(chunk, pinned=pinned)
                bad = [o for o in outcomes if not o.ok]
                if bad:
                    failures.append(str(bad[0].error))
        finally:
            pinned.close()

    from ledger import collector

    started = time.perf_counter()
    with collector.paused():  # as the bulk writers run (ledger/collector.py)
        pool = [threading.Thread(target=worker) for _ in range(threads)]
        for t in pool:
            t.start()
        for t in pool:
            t.join(600)
    elapsed = time.perf_counter() - started
    assert not failures, failures[:3]
    return elapsed


def run_mode(mode: str, engine, timeline, commands: list, args, threads: int) -> dict:
    """Times one pass. For `replay`, "again" runs the same payments a second time (to be
    called after the CPU figures are taken): every one must come back replayed."""
    from ledger.replay import replay_book, replay_windows

    if mode == "execute":
        from ledger.book import Book

        book = Book(engine, timeline)
        book.execute(commands[:10])  # connect and prepare
        return {"elapsed": replay(book, commands[10:], args.batch, threads), "n": len(commands) - 10}
    book = replay_book(engine, timeline)
    book.execute(commands[:10])
    # As `eum payments replay` runs it: a window at a time, each window's answers let go
    # (the command writes them to a file; here nobody reads them).
    report = replay_windows(book, commands[10:], args.batch, threads)
    assert not report.errors and report.recorded == len(commands) - 10, report
    out = {"elapsed": report.seconds, "n": len(commands) - 10, "steps": dict(getattr(book, "step_seconds", {}))}

    def again() -> None:
        second = replay_windows(book, list(commands), args.batch, threads)
        assert second.replayed == len(commands) and second.recorded == 0 and not second.errors, second
        out["again_s"] = second.seconds

    out["again"] = again
    return out


def run_postgresql(args, pop: h.Population, seed: int, mode: str = "execute") -> dict:
    from ledger.db import make_engine
    from loadtests.checks import check_book_after_run
    from rules.loader import timeline_from_dir

    with h.fresh_database() as url:
        h.seed_registry(url, pop)
        h.seed_topups(url, [m["member_id"] for m in pop.members], 1_500_000)
        commands = payments(pop, args.payments, seed, f"bulk{seed}")
        engine = make_engine(url, pool_size=max(2, args.threads))
        timeline = timeline_from_dir(h.REPO_ROOT / "policies")
        with engine.connect():  # the pool's connections exist before the CPU count starts
            pass
        pids = backend_pids(url)
        wal0 = wal_counters()
        pg_cpu0 = sum(h.cpu_seconds(p) for p in pids)
        py_cpu0 = time.process_time()
        run = run_mode(mode, engine, timeline, commands, args, args.threads)
        py_cpu = time.process_time() - py_cpu0
        pg_cpu = sum(h.cpu_seconds(p) for p in backend_pids(url)) - pg_cpu0
        wal = {k: v - wal0[k] for k, v in wal_counters().items()}
        if "again" in run:
            run.pop("again")()
        engine.dispose()
        ok = check_book_after_run(url)
    n = run["n"]
    return {**run, "per_s": n / run["elapsed"], "python_us": py_cpu / n * 1e6, "postgres_us": pg_cpu / n * 1e6,
            "ok": ok, "wal": {"bytes": wal["bytes"] / n, "records": wal["records"] / n, "fpi": wal["fpi"] / n,
                              "checkpoints": wal["checkpoints"]}}


def seed_sqlite_registry(engine, pop: h.Population) -> None:
    """Members, merchants and their accounts on SQLite, as `harness.seed_registry` writes
    them on PostgreSQL (by COPY there)."""
    from sqlalchemy import insert

    from ledger import accounts as acct
    from ledger import schema as s

    now = time.time_ns() // 1000
    with engine.begin() as conn:
        conn.execute(insert(s.members), [{"member_id": m["member_id"], "district": m["district"], "status": "active",
                                          "created_at_us": now, "updated_at_us": now} for m in pop.members])
        conn.execute(insert(s.merchants), [{**{k: r[k] for k in ("merchant_id", "name", "district", "category",
                                                                 "annual_sales_won", "merchant_share_bp")},
                                            # as seed_registry stores them on PostgreSQL (migration 0012's
                                            # rule: a sharing merchant carries `winwin`), so the win-win
                                            # layer's components are earned on both backends
                                            "registered_from": r["registered_from"].isoformat(),
                                            "flags": ",".join(r["flags"]),
                                            "updated_at_us": now} for r in pop.merchants])
        # and their fact versions, as the registry writes them (migration 0022)
        conn.execute(insert(s.member_facts), [{"member_id": m["member_id"], "valid_from_us": now,
                                               "district": m["district"], "status": "active"} for m in pop.members])
        conn.execute(insert(s.merchant_facts), [{
            "merchant_id": r["merchant_id"], "valid_from_us": now, "district": r["district"],
            "category": r["category"], "annual_sales_won": r["annual_sales_won"],
            "registered_from": r["registered_from"].isoformat(), "flags": ",".join(r["flags"]),
            "merchant_share_bp": r["merchant_share_bp"]} for r in pop.merchants])
        rows = [{"account_id": a, "type": "liability", "owner_id": m["member_id"], "balance_won": 0, "floor_zero": True}
                for m in pop.members for a in (acct.member_charged(m["member_id"]), acct.member_points(m["member_id"]))]
        rows += [{"account_id": acct.merchant_payable(r["merchant_id"]), "type": "liability", "owner_id": None,
                  "balance_won": 0, "floor_zero": False} for r in pop.merchants]
        conn.execute(insert(s.accounts), rows)


def run_sqlite(args, pop: h.Population, seed: int, mode: str = "execute") -> dict:
    from ledger.book import Book
    from ledger.db import make_engine, migrate, reader
    from ledger.queries import check_book
    from rules.loader import timeline_from_dir

    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite:///{tmp}/bulk.db"
        migrate(url)
        engine = make_engine(url)
        seed_sqlite_registry(engine, pop)
        book = Book(engine, timeline_from_dir(h.REPO_ROOT / "policies"))
        from ledger.commands import TopUp, request_hash
        from rules.timeutil import to_us

        at = to_us(dt.datetime.combine(h.SEED_DAY, dt.time(9, 0), h.SEOUL))
        topups = [TopUp(f"seed-{m['member_id']}", m["member_id"], 1_500_000, at,
                        request_hash("topup", {"m": m["member_id"]})) for m in pop.members]
        for i in range(0, len(topups), 2000):
            book.execute(topups[i:i + 2000])
        commands = payments(pop, args.payments, seed, f"bulk{seed}")
        py_cpu0 = time.process_time()
        run = run_mode(mode, engine, book.timeline, commands, args, 1)  # SQLite: one writer
        py_cpu = time.process_time() - py_cpu0
        if "again" in run:
            run.pop("again")()
        with reader(engine).connect() as conn:
            results = check_book(conn)
        engine.dispose()
    for r in results:
        print(f"  {'ok ' if r.ok else 'BAD'} {r.name} {r.detail if not r.ok else ''}")
    n = run["n"]
    return {**run, "per_s": n / run["elapsed"], "python_us": py_cpu / n * 1e6, "postgres_us": 0.0,
            "ok": all(r.ok for r in results)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--payments", type=int, default=100_000)
    parser.add_argument("--batch", type=int, default=2_000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--members", type=int, default=50_000)
    parser.add_argument("--merchants", type=int, default=5_000)
    parser.add_argument("--backends", default="postgresql,sqlite")
    parser.add_argument("--modes", default="execute,replay")
    args = parser.parse_args()
    assert 1 <= args.repeats <= 10 and 1_000 <= args.payments <= 2_000_000 and 1 <= args.threads <= 8
    h.print_machine({"payments per run": args.payments, "batch": args.batch, "threads (PostgreSQL)": args.threads,
                     "repeats": args.repeats, "sqlite": "WAL, synchronous=FULL",
                     "cyclic GC": "paused while payments are written (ledger.collector)"})
    pop = h.population(21, args.members, args.merchants)
    modes = args.modes.split(",")
    failed = []
    for backend in args.backends.split(","):
        runs: dict[str, list] = {mode: [] for mode in modes}
        for repeat in range(args.repeats):
            for mode in modes:  # alternating, so the shared machine's load hits both alike
                run = (run_postgresql if backend == "postgresql" else run_sqlite)(args, pop, repeat, mode)
                runs[mode].append(run)
                extra = f"; again (all replayed) {run['again_s']:.1f} s" if mode == "replay" else ""
                print(f"{backend} {mode} run {repeat + 1}: {run['per_s']:8.0f} payments/s; CPU per payment "
                      f"(first pass): python {run['python_us']:.0f} µs, postgres {run['postgres_us']:.0f} µs"
                      f"{extra}; book {'ok' if run['ok'] else 'BAD'}", flush=True)
                if "wal" in run:  # PostgreSQL: what the first pass wrote to the server's WAL
                    w = run["wal"]
                    print(f"  WAL per payment: {w['bytes']:.0f} bytes, {w['records']:.1f} records, "
                          f"{w['fpi']:.2f} full-page images; checkpoints during the pass: {w['checkpoints']:.0f}",
                          flush=True)
                steps = run.get("steps") or {}
                if steps:  # PostgreSQL replay: seconds per step, summed over chunks and threads
                    chunk = steps.pop("chunk", 0.0)
                    rest = chunk - sum(steps.values())
                    print("  steps (s, summed over threads): " + ", ".join(
                        f"{k} {v:.2f}" for k, v in sorted(steps.items())) + f", evaluate+bodies {rest:.2f}, "
                        f"whole chunks {chunk:.2f}", flush=True)
        for mode in modes:
            if not report(backend, mode, runs[mode]):
                failed.append(f"{backend} {mode}")
    if failed:
        print(f"FAILED: the book checks of {', '.join(failed)} (lines marked BAD above)")
    return 1 if failed else 0  # a target missed is a figure (exit 0); a book check that fails is a failure


def report(backend: str, mode: str, runs: list) -> bool:
    """Prints the RESULT line of one backend and mode; whether every run's book checks passed."""
    best = h.median([r["per_s"] for r in runs])
    good = all(r["ok"] for r in runs)
    print(f"RESULT bulk_replay {backend} {mode} median {best:.0f} payments/s, python "
          f"{h.median([r['python_us'] for r in runs]):.0f} µs + postgres "
          f"{h.median([r['postgres_us'] for r in runs]):.0f} µs CPU per payment"
          + (f", WAL {h.median([r['wal']['bytes'] for r in runs]):.0f} bytes per payment" if "wal" in runs[0] else "")
          + f" (target >= {TARGET_PER_S}): "
          f"{'PASS' if best >= TARGET_PER_S and good else 'MISS'}; book {'ok' if good else 'FAILED'}")
    return good


if __name__ == "__main__":
    sys.exit(main())
