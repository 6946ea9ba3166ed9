"""Headless load test: a clean database, the service, Locust for a set time, the figures,
Locust's HTML report, and the book checked afterwards.

    .venv/bin/python loadtests/run.py SCENARIO [--users 40] [--rate 800] [--duration 60]
        [--workers 2] [--members 20000] [--merchants 3000] [--kill worker|service [--kill-at S]]

SCENARIO: lunch-peak | topup-storm | refund-wave | grant-day. `--rate` is the offered
requests/s in total (each user paced at rate/users). Prints throughput and
p50/p95/p99/p99.9 and max, writes reports/<scenario>-<time>.html and .json (Locust's
final figures, written at its shutdown; the printed ones are read from the .json), then
runs loadtests/checks.py: ledger.queries.check_book, no budget or monthly cap exceeded,
and every acknowledged (2xx) write recorded exactly once. Exit 1 when a check fails, a
request failed (any answer but 200 or 201: a scenario sends only what must succeed) or
Locust exited 1 for a user's task that raised.
Traffic goes to 127.0.0.1 only; the run stops by itself after --duration seconds.

--kill worker|service: kill -9 in the middle of the Locust run, at --kill-at seconds
after Locust started (default: half the duration). `worker`: SIGKILL to one uvicorn
worker (its supervisor starts a replacement); `service`: SIGKILL to the service's whole
process group, 2 s down, then the same command started again on the same port with the
same database, Redis prefix and settings; the Locust users keep running throughout.
The users then also record every write they send (id, body) and what they were told.
After Locust ends, every write that was not acknowledged is resent with its id and
body until it is (loadtests/faultkit.py `resend`, honouring Retry-After), and the book
is read back (`faultkit.verify`: loadtests/checks.py, every acknowledged id exactly
once with the status told, nothing posted twice, nothing the client never sent, money
lost 0). Failed requests are expected there (Locust's exit 1 too): the run is judged by
those checks. Prints `RESULT loadtest SCENARIO kill=KIND: ...`; exit 1 on any failure."""

from __future__ import annotations

import argparse
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
# What each member tops up in November, before the run: (other scenarios, the top-up
# storm). The storm's is 100,000 short of the 2023-09 policy's 1,500,000 a month.
NOVEMBER_TOPUP_WON = (1_000_000, 1_400_000)
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


PERCENTILES = {"p50": 0.5, "p95": 0.95, "p99": 0.99, "p999": 0.999}


def percentile_ms(response_times: dict[int, int], count: int, q: float) -> int:
    """Locust's own percentile (locust/stats.py `calculate_response_time_percentile`) over
    its rounded response-time buckets {ms: requests}, so the figures are the HTML report's."""
    within = int(count * q)
    seen = 0
    for ms in sorted(response_times, reverse=True):
        seen += response_times[ms]
        if count - seen <= within:
            return ms
    return 0


def read_stats(json_path: Path) -> dict:
    """Locust's final figures per request name and "Aggregated", from the JSON it writes
    at shutdown (`--json-file`), after every user has stopped: the same as its HTML report.

    Not `<prefix>_stats.csv`: Locust rewrites that file once a second while it runs and
    not again at shutdown, so it lacks the requests of the run's last fraction of a
    second and of the users' stop (a run whose service died at 19.6 s of 20 read 0
    failures there, against 20 in the report; a normal run ~3% fewer payments)."""
    entries = json.loads(json_path.read_text())
    assert isinstance(entries, list), f"{json_path}: not Locust's --json-file output"
    if not entries:
        return {}
    started = min(e["start_time"] for e in entries)
    last = max((e["last_request_timestamp"] or started) for e in entries)
    span_s = max(last - started, 1e-9)
    total = {"num_requests": 0, "num_none_requests": 0, "num_failures": 0, "max_response_time": 0.0,
             "response_times": {}}
    rows = []
    for e in sorted(entries, key=lambda e: (e["name"], e["method"] or "")):
        times = {int(float(k)): v for k, v in e["response_times"].items()}
        rows.append((e["name"], e, times))
        total["num_requests"] += e["num_requests"]
        total["num_none_requests"] += e.get("num_none_requests", 0)
        total["num_failures"] += e["num_failures"]
        total["max_response_time"] = max(total["max_response_time"], e["max_response_time"] or 0)
        for ms, n in times.items():
            total["response_times"][ms] = total["response_times"].get(ms, 0) + n
    rows.append(("Aggregated", total, total["response_times"]))
    out = {}
    for name, e, times in rows:
        timed = e["num_requests"] - e.get("num_none_requests", 0)
        out[name] = {"requests": e["num_requests"], "failures": e["num_failures"], "rps": e["num_requests"] / span_s,
                     **{k: percentile_ms(times, timed, q) for k, q in PERCENTILES.items()},
                     "max": round(e["max_response_time"] or 0)}
    return out


def locust_verdict(stats: dict, returncode: int) -> list[str]:
    """Why a run without a kill failed, from Locust's final figures and its exit code;
    empty when it did not. Such a run sends only what must succeed: any answer but 200
    or 201 is a failed request. Locust exits 1 when a request failed or a user's task
    raised (an exception is not a request, so it can exit 1 with 0 failures)."""
    problems = []
    failures = stats.get("Aggregated", {}).get("failures", 0)
    if failures:
        problems.append(f"{failures} requests were not answered 200 or 201 (Locust's report lists why)")
    if returncode == 1 and not failures:
        problems.append("Locust exited 1 with no failed request: a user's task raised (Locust's output above)")
    elif returncode not in (0, 1):
        problems.append(f"Locust exited {returncode}")
    if not stats.get("Aggregated", {}).get("requests"):
        problems.append("Locust recorded no request")
    return problems


def locust_command(locustfile: Path, user_class: str, host: str, users: int, duration_s: int, prefix: Path) -> list[str]:
    """Locust headless for `duration_s`, its HTML report to `prefix`.html and its final
    figures to `prefix`.json (read by `read_stats`)."""
    return [str(Path(h.PYTHON).parent / "locust"), "-f", str(locustfile), user_class, "--headless", "--host", host,
            "-u", str(users), "-r", str(max(1, users // 2)), "--run-time", f"{duration_s}s", "--stop-timeout", "10",
            "--html", f"{prefix}.html", "--json-file", str(prefix), "--only-summary", "--loglevel", "WARNING"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("scenario", choices=sorted(SCENARIOS))
    parser.add_argument("--users", type=int, default=40)
    parser.add_argument("--rate", type=float, default=800.0, help="offered requests/s, all users together")
    parser.add_argument("--duration", type=int, default=60, help="seconds of load")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--members", type=int, default=20_000)
    parser.add_argument("--merchants", type=int, default=3_000)
    parser.add_argument("--kill", choices=KILLS, help="kill -9 of one worker or the whole service mid-run")
    parser.add_argument("--kill-at", type=float, help="seconds after Locust started (default: half the duration)")
    args = parser.parse_args()
    assert 1 <= args.users <= 2_000 and 1 <= args.duration <= DURATION_S_MAX and 0 < args.rate <= 50_000
    if args.kill_at is None:
        args.kill_at = args.duration / 2
    if args.kill and not 0 < args.kill_at < args.duration:
        parser.error("--kill-at must fall inside the run (0 < S < --duration)")

    stamp = time.strftime("%Y%m%d-%H%M%S")
    h.REPORTS.mkdir(exist_ok=True)
    prefix = h.REPORTS / f"{args.scenario}-{stamp}"
    h.print_machine({"scenario": args.scenario, "users": args.users, "offered rate/s": args.rate,
                     "duration s": args.duration, "workers": args.workers, "members": args.members,
                     "merchants": args.merchants, **h.service_settings(),
                     **({"kill": args.kill, "kill at s": args.kill_at} if args.kill else {})})
    pop = h.population(7, args.members, args.merchants)
    with h.fresh_database("eum_loadtest") as url, tempfile.TemporaryDirectory() as tmp:
        h.seed_registry(url, pop)
        h.seed_budgets(url, {("city", "2025"): 125_400_000_000, ("national", "2025"): 80_000_000_000,
                             ("city", "2025-11"): 12_000_000_000, ("national", "2025-11"): 8_000_000_000})
        members = [m["member_id"] for m in pop.members]
        # November's top-ups (SEED_DAY). The top-up storm's members are near November's
        # limit, so that its December top-ups pass only because the limit is monthly.
        h.seed_topups(url, members, NOVEMBER_TOPUP_WON[args.scenario == "topup-storm"])
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
        sent_dir = Path(tmp) / "sent"
        kill_notes: dict = {}
        with h.running_service(url, workers=args.workers, name=f"loadtest-{args.scenario}") as svc:
            env = dict(os.environ, EUM_LT_DATA=str(data_path), EUM_LT_ACK_DIR=str(ack_dir),
                       EUM_LT_RATE_PER_USER=str(args.rate / args.users))
            if args.kill:
                env["EUM_LT_SENT_DIR"] = str(sent_dir)
            command = locust_command(LOCUST_FILE, SCENARIOS[args.scenario], svc.base_url, args.users, args.duration,
                                     prefix)
            started, kill_notes["locust_started_at"] = time.monotonic(), time.time()
            with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
                locust = subprocess.Popen(command, env=env, stdout=out, stderr=err, text=True)
                try:
                    if args.kill:
                        kill_notes.update(kill_mid_run(svc, args.kill, started + args.kill_at))
                    returncode = locust.wait(max(1.0, started + args.duration + 120 - time.monotonic()))
                finally:
                    if locust.poll() is None:  # only on an error above: our own Locust, by its pid
                        locust.kill()
                        locust.wait(10)
                elapsed = time.monotonic() - started
                json_path = Path(f"{prefix}.json")  # Locust adds the .json to --json-file's name
                # 1: a request failed or a task raised (judged below, by the mode's rule)
                if returncode not in (0, 1) or not json_path.exists() or (returncode == 1 and not args.kill):
                    out.seek(0)
                    err.seek(0)
                    print(out.read()[-3000:], err.read()[-3000:])
                if returncode not in (0, 1) or not json_path.exists():
                    return 2
            if args.kill:
                sent = read_sent(sent_dir)
                retried = resend_unacknowledged(svc.base_url, keys, sent)
        stats = read_stats(json_path)
        print(f"\nscenario {args.scenario}: {elapsed:.0f} s of Locust, report {prefix}.html (final figures: "
              f"{json_path})")
        for name, s in stats.items():
            print(f"  {name:45s} {s['requests']:7d} req {s['failures']:5d} failed {s['rps']:8.1f}/s  p50 {s['p50']} ms"
                  f"  p95 {s['p95']} ms  p99 {s['p99']} ms  p99.9 {s['p999']} ms  max {s['max']} ms")
        scenario_checks = scenario_figures(url, args.scenario)
        if args.kill:  # failed requests are expected here: judged by the resends and the book
            return after_kill(args, url, ack_dir, sent, retried, kill_notes, scenario_checks)
        good = h_checks(url, ack_dir)
        for name, ok, detail in scenario_checks:
            print(f"  {'ok ' if ok else 'BAD'} {name}{'  ' + detail if detail and not ok else ''}")
        good = good and all(ok for _, ok, _ in scenario_checks)
    total = stats.get("Aggregated", {})
    problems = locust_verdict(stats, returncode)
    print(f"RESULT loadtest {args.scenario}: {total.get('rps', 0):.0f} req/s, p50 {total.get('p50')} ms, "
          f"p95 {total.get('p95')} ms, p99 {total.get('p99')} ms, p99.9 {total.get('p999')} ms, "
          f"failures {total.get('failures')}; Locust exit {returncode}; book {'ok' if good else 'FAILED'}")
    for problem in problems:
        print(f"FAILED: {problem}")
    return 0 if good and not problems else 1


def scenario_figures(url: str, scenario: str) -> list[tuple[str, bool, str]]:
    """What the run's own writes did in the book (the seeded ones left out), printed;
    and, for the top-up storm and the grant day, checks that the scenario did what it
    is for: (name, ok, detail)."""
    import psycopg
    from collections import Counter

    with psycopg.connect(url) as conn:
        payments = Counter({(status, code or ""): n for status, code, n in conn.execute(
            "SELECT status, decline_code, count(*) FROM payments WHERE payment_id NOT LIKE 'seed-%' "
            "GROUP BY 1, 2").fetchall()})
        grant_spent = conn.execute(
            "SELECT count(*) FROM payments WHERE payment_id NOT LIKE 'seed-%' AND status = 'approved' "
            "AND (response::jsonb -> 'spent' ->> 'grants')::bigint > 0").fetchone()[0]
        topups = Counter({(month, status, code or ""): n for month, status, code, n in conn.execute(
            "SELECT to_char(to_timestamp(occurred_at_us / 1e6) AT TIME ZONE 'Asia/Seoul', 'YYYY-MM'), status, "
            "decline_code, count(*) FROM topups WHERE topup_id NOT LIKE 'seed-%' GROUP BY 1, 2, 3").fetchall()})
        # approved top-ups above what was left of November's limit: each passed only because
        # the new month's limit counts the new month alone
        past_november = conn.execute(
            "SELECT count(*) FROM topups WHERE topup_id NOT LIKE 'seed-%%' AND status = 'approved' "
            "AND amount_won > %s", (1_500_000 - NOVEMBER_TOPUP_WON[1],)).fetchone()[0]
        disbursed = conn.execute("SELECT count(*) FROM grant_disbursements").fetchone()[0]
    total = sum(payments.values())
    if total:
        print(f"payments of the run: {total}; " + ", ".join(
            f"{status}{' ' + code if code else ''} {n} ({100 * n / total:.0f}%)"
            for (status, code), n in payments.most_common()))
    approved = sum(n for (status, _), n in payments.items() if status == "approved")
    checks = []
    if scenario == "grant-day":
        print(f"grant day: {disbursed} disbursements; {grant_spent} of {approved} approved payments spent grant money")
        checks.append(("grant money was spent (payments by recipients after the disbursements)", grant_spent > 0,
                       f"{grant_spent} payments spent grant money, {disbursed} disbursements"))
    if sum(topups.values()):
        print("top-ups of the run: " + ", ".join(f"{month} {status}{' ' + code if code else ''} {n}"
                                                 for (month, status, code), n in sorted(topups.items())))
    if scenario == "topup-storm":
        declined = sum(n for (_, status, code), n in topups.items() if code == "topup_monthly_limit_exceeded")
        checks.append(("the monthly top-up limit reset: approved top-ups above what November left "
                       f"({1_500_000 - NOVEMBER_TOPUP_WON[1]:,} won)", past_november > 0, f"{past_november}"))
        checks.append(("the new month's limit binds: top-ups declined topup_monthly_limit_exceeded", declined > 0,
                       f"{declined}"))
    return checks


# ---------------------------------------------------------------- kill -9 mid-run

KILLS = ("worker", "service")
SERVICE_DOWN_S = 2.0  # as an orchestrator would take to notice and start it again


def kill_mid_run(svc: h.Service, kind: str, at: float) -> dict:
    """Wait until `at` (time.monotonic()), then the kill; returns what was measured."""
    time.sleep(max(0.0, at - time.monotonic()))
    notes: dict = {"killed_at": time.time()}
    if kind == "worker":
        before = set(h.worker_pids_of(svc.process.pid))
        killed_at = time.monotonic()
        notes["killed_pid"] = svc.kill9_worker()
        deadline = killed_at + 60
        while True:  # uvicorn's supervisor starts a new worker in the dead one's place
            now = h.worker_pids_of(svc.process.pid)
            if len(now) == len(before) and notes["killed_pid"] not in now and set(now) - before:
                notes["replaced_s"] = round(time.monotonic() - killed_at, 2)
                notes["back_at"] = time.time()
                break
            if time.monotonic() > deadline:
                notes["replaced_s"] = None
                break
            time.sleep(0.05)
        print(f"kill: SIGKILL to worker {notes['killed_pid']}; replaced in {notes['replaced_s']} s", flush=True)
    else:
        svc.kill9_all()
        time.sleep(SERVICE_DOWN_S)
        notes["restart_s"] = round(svc.start_again(), 2)
        notes["back_at"] = time.time()
        print(f"kill: SIGKILL to the whole service; down {SERVICE_DOWN_S} s, started again on :{svc.port} "
              f"in {notes['restart_s']} s", flush=True)
    return notes


def read_sent(sent_dir: Path) -> dict[str, dict]:
    """id -> {kind, path, role, body, told (HTTP status, 0 for no answer; None when the
    outcome was never recorded), status (the answer's), error}, from the users' files."""
    sent: dict[str, dict] = {}
    told: dict[str, dict] = {}
    for path in sorted(sent_dir.glob("*.jsonl")):
        for line in path.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                if "body" in row:
                    assert row["id"] not in sent, f"id {row['id']} sent twice by Locust"
                    sent[row["id"]] = {**row, "told": None, "status": "", "error": ""}
                else:
                    told[row["id"]] = row
    for id_, row in told.items():
        sent[id_].update(told=row["told"], status=row.get("status", ""), error=row.get("error", ""),
                         at=row.get("at", 0))
    return sent


def acknowledged(row: dict) -> bool:
    return row["told"] is not None and 200 <= row["told"] < 300


def resend_unacknowledged(base_url: str, keys: dict[str, str], sent: dict[str, dict]) -> dict:
    """Every write not acknowledged, resent with its id and body until acknowledged."""
    from loadtests import faultkit as fk

    retried = {}
    for role in sorted({row["role"] for row in sent.values()}):
        ids = [i for i, row in sent.items() if row["role"] == role and not acknowledged(row)]
        if ids:
            retried.update(fk.resend(base_url, keys[role], {i: sent[i]["body"] for i in ids}, ids, deadline_s=120,
                                     paths={i: sent[i]["path"] for i in ids}))
    return retried


def after_kill(args, url: str, ack_dir: Path, sent: dict[str, dict], retried: dict, notes: dict,
               scenario_checks: list) -> int:
    from collections import Counter

    from loadtests import faultkit as fk

    first = {i: fk.Told(0.0, 0.0, row["told"], str(row["told"]), {"status": row["status"]})
             for i, row in sent.items() if acknowledged(row)}
    told = {**first, **retried}
    verdict = fk.verify(url, told, {i: row["body"] for i, row in sent.items()},
                        {i: row["kind"] for i, row in sent.items()})
    errors = Counter("no answer recorded" if row["told"] is None else
                     f"{row['told']} {row['error'][:60]}" if row["told"] == 0 else str(row["told"])
                     for row in sent.values() if not acknowledged(row))
    outcomes = Counter(t.kind for t in retried.values())
    print(f"writes sent {len(sent)}, acknowledged first time {len(first)}; not acknowledged, by what the client "
          f"was told: {dict(errors.most_common())}")
    print(f"resent {len(retried)}: {dict(outcomes)}")
    t0 = notes.get("locust_started_at", 0)
    silent = sorted(round(row.get("sent_at", t0) - t0, 1) for row in sent.values() if row["told"] is None)
    if silent:  # sent, but the user never recorded an answer: stopped mid-request at the end, or cut off by the kill
        print(f"no answer recorded for {len(silent)}, sent at these seconds of the run: {silent[:20]}")
    back_at = notes.get("back_at")
    again = sum(1 for row in sent.values() if acknowledged(row) and back_at and row.get("at", 0) > back_at)
    print(f"acknowledged first time after the {'replacement worker' if args.kill == 'worker' else 'restart'} "
          f"was up: {again}")
    good_acks = ack_files_agree(ack_dir, first)
    if "killed_at" in notes:
        print(f"kill at {notes['killed_at'] - t0:.1f} s of the run, served again from {notes['back_at'] - t0:.1f} s"
              if notes.get("back_at") else "")
    checks = [("the kill happened", bool(notes.get("replaced_s") is not None or notes.get("restart_s") is not None),
               str(notes)),
              ("Locust's users acknowledged again after the kill", again > 0, f"{again}"),
              ("every unacknowledged write resent", set(retried) == set(sent) - set(first),
               f"{len(retried)} resent of {len(sent) - len(first)}"),
              ("every resend acknowledged: 201 (first real run) or 200 replayed",
               set(outcomes) <= {"201", "200 replayed"}, str(dict(outcomes))),
              ("every sent id in the book", verdict.recorded == verdict.sent == len(sent),
               f"{verdict.recorded} of {len(sent)}"),
              ("Locust's ack files agree with what it recorded as told", good_acks, ""),
              *verdict.checks, *scenario_checks]
    for name, ok, detail in checks:
        print(f"  {'ok ' if ok else 'BAD'} {name}{'  ' + detail[:3000] if detail and not ok else ''}")
    good = all(ok for _, ok, _ in checks)
    print(f"RESULT loadtest {args.scenario} kill={args.kill}: tried {len(sent)}, acked first time {len(first)}, "
          f"resent {len(retried)} (201: {outcomes.get('201', 0)}, 200 replayed: {outcomes.get('200 replayed', 0)}), "
          f"money lost {verdict.money_lost_won}, book {'ok' if good else 'FAILED'}")
    return 0 if good else 1


def ack_files_agree(ack_dir: Path, first: dict) -> bool:
    from loadtests.checks import read_acks

    acked = {i for ids in read_acks(ack_dir).values() for i in ids} if ack_dir.exists() else set()
    return acked == set(first)


def h_checks(url: str, ack_dir: Path) -> bool:
    from loadtests.checks import check_book_after_run

    return check_book_after_run(url, ack_dir=ack_dir)


if __name__ == "__main__":
    sys.exit(main())
