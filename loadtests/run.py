"""Headless load test: a clean database, the service, Locust for a set time, the figures,
Locust's HTML report, and the book checked afterwards.

    .venv/bin/python loadtests/run.py SCENARIO [--users 40] [--rate 800] [--duration 60]
        [--workers 2] [--members 20000] [--merchants 3000]

SCENARIO: lunch-peak | topup-storm | refund-wave | grant-day. `--rate` is the offered
requests/s in total (each user paced at rate/users). Prints throughput and
p50/p95/p99/p99.9, writes reports/<scenario>-<time>.html (and Locust's CSVs), then runs
loadtests/checks.py: ledger.queries.check_book, no budget or monthly cap exceeded, and
every acknowledged (2xx) write recorded exactly once. Exit 1 when a check fails.
Traffic goes to 127.0.0.1 only; the run stops by itself after --duration seconds."""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from loadtests import harness as h  # noqa: E402

SCENARIOS = {"lunch-peak": "LunchPeak", "topup-storm": "TopupStorm", "refund-wave": "RefundWave",
             "grant-day": "GrantDay"}
DURATION_S_MAX = 1_800
LOCUST_FILE = Path(__file__).resolve().parent / "locustfile.py"


def seed_refundable(url: str, pop: h.Population, count: int) -> list[tuple[str, int]]:
    """Payments made earlier in the day, through the book, for the refund wave."""
    from ledger.book import Book
    from ledger.db import make_engine
    from rules.loader import timeline_from_dir
    from rules.timeutil import to_us
    from settlement import datagen

    rng = random.Random(3)
    engine = make_engine(url)
    book = Book(engine, timeline_from_dir(h.REPO_ROOT / "policies"))
    start = to_us(dt.datetime.combine(h.PEAK_DAY, dt.time(11, 0), h.SEOUL))
    merchants = rng.choices([m["merchant_id"] for m in pop.merchants], weights=pop.merchant_weights, k=count)
    commands = [datagen.pay(f"seed-pay-{i}", rng.choice(pop.members)["member_id"], merchants[i], h.amount_won(rng),
                            start + i * 1_000_000) for i in range(count)]
    out = []
    try:
        for i in range(0, count, 1000):
            for command, outcome in zip(commands[i:i + 1000], book.execute(commands[i:i + 1000])):
                if outcome.ok and outcome.body["status"] == "approved":
                    out.append((command.payment_id, command.amount_won))
    finally:
        engine.dispose()
    return out


def read_stats(prefix: Path) -> dict:
    with open(f"{prefix}_stats.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    out = {}
    for row in rows:
        name = row["Name"] if row["Type"] else "Aggregated"
        out[name] = {"requests": int(row["Request Count"]), "failures": int(row["Failure Count"]),
                     "rps": float(row["Requests/s"]), "p50": row["50%"], "p95": row["95%"], "p99": row["99%"],
                     "p999": row["99.9%"], "max": row["Max Response Time"]}
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("scenario", choices=sorted(SCENARIOS))
    parser.add_argument("--users", type=int, default=40)
    parser.add_argument("--rate", type=float, default=800.0, help="offered requests/s, all users together")
    parser.add_argument("--duration", type=int, default=60, help="seconds of load")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--members", type=int, default=20_000)
    parser.add_argument("--merchants", type=int, default=3_000)
    args = parser.parse_args()
    assert 1 <= args.users <= 2_000 and 1 <= args.duration <= DURATION_S_MAX and 0 < args.rate <= 50_000

    stamp = time.strftime("%Y%m%d-%H%M%S")
    h.REPORTS.mkdir(exist_ok=True)
    prefix = h.REPORTS / f"{args.scenario}-{stamp}"
    h.print_machine({"scenario": args.scenario, "users": args.users, "offered rate/s": args.rate,
                     "duration s": args.duration, "workers": args.workers, "members": args.members,
                     "merchants": args.merchants})
    pop = h.population(7, args.members, args.merchants)
    with h.fresh_database("eum_loadtest") as url, tempfile.TemporaryDirectory() as tmp:
        h.seed_registry(url, pop)
        h.seed_budgets(url, {("city", "2025"): 125_400_000_000, ("national", "2025"): 80_000_000_000,
                             ("city", "2025-11"): 12_000_000_000, ("national", "2025-11"): 8_000_000_000})
        members = [m["member_id"] for m in pop.members]
        if args.scenario != "topup-storm":
            h.seed_topups(url, members, 1_000_000)
        if args.scenario == "grant-day":
            h.seed_grant_program(url)
        refundable = seed_refundable(url, pop, 20_000) if args.scenario == "refund-wave" else []
        keys = h.make_keys(url)
        rng = random.Random(9)
        data = {"keys": keys, "members": members,
                "merchants": rng.choices([m["merchant_id"] for m in pop.merchants], weights=pop.merchant_weights,
                                         k=20_000),
                "refundable": refundable, "peak_day": h.PEAK_DAY.isoformat(),
                "next_month_day": h.NEXT_MONTH_DAY.isoformat(), "grant_day": h.GRANT_DAY.isoformat(),
                "grant_program": h.GRANT_PROGRAM}
        data_path = Path(tmp) / "data.json"
        data_path.write_text(json.dumps(data))
        ack_dir = Path(tmp) / "acks"
        with h.running_service(url, workers=args.workers, name=f"loadtest-{args.scenario}") as svc:
            env = dict(os.environ, EUM_LT_DATA=str(data_path), EUM_LT_ACK_DIR=str(ack_dir),
                       EUM_LT_RATE_PER_USER=str(args.rate / args.users))
            command = [str(Path(h.PYTHON).parent / "locust"), "-f", str(LOCUST_FILE), SCENARIOS[args.scenario],
                       "--headless", "--host", svc.base_url, "-u", str(args.users),
                       "-r", str(max(1, args.users // 2)), "--run-time", f"{args.duration}s", "--stop-timeout", "10",
                       "--html", f"{prefix}.html", "--csv", str(prefix), "--only-summary", "--loglevel", "WARNING"]
            started = time.monotonic()
            done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=args.duration + 120)
            elapsed = time.monotonic() - started
            if done.returncode not in (0, 1):  # 1: some requests failed (reported below)
                print(done.stdout[-3000:], done.stderr[-3000:])
                return 2
        stats = read_stats(prefix)
        print(f"\nscenario {args.scenario}: {elapsed:.0f} s of Locust, report {prefix}.html")
        for name, s in stats.items():
            print(f"  {name:45s} {s['requests']:7d} req {s['failures']:5d} failed {s['rps']:8.1f}/s  p50 {s['p50']} ms"
                  f"  p95 {s['p95']} ms  p99 {s['p99']} ms  p99.9 {s['p999']} ms  max {s['max']} ms")
        good = h_checks(url, ack_dir)
    total = stats.get("Aggregated", {})
    print(f"RESULT loadtest {args.scenario}: {total.get('rps', 0):.0f} req/s, p50 {total.get('p50')} ms, "
          f"p95 {total.get('p95')} ms, p99 {total.get('p99')} ms, p99.9 {total.get('p999')} ms, "
          f"failures {total.get('failures')}; book {'ok' if good else 'FAILED'}")
    return 0 if good else 1


def h_checks(url: str, ack_dir: Path) -> bool:
    from loadtests.checks import check_book_after_run

    return check_book_after_run(url, ack_dir=ack_dir)


if __name__ == "__main__":
    sys.exit(main())
