"""Corrections at a month's scale: a generated November 2026 (`settlement.datagen.
command_plan`: members over the districts by population, merchants by sales, lunch and
dinner peaks, points, grant money, refunds) recorded through the book on PostgreSQL,
then five corrections proposed and approved one after the other, each over a range the
ones before had corrected (the whole month, the 10th–20th, the 5th–30th) and to one of
three right policies; then each payment's holding against the timeline as corrected.

    .venv/bin/python benchmarks/correction_plan.py [--payments-per-day 1700] [--members 4000]

Timed: each proposal (`ledger.corrections.propose`: the plan's reads, the re-evaluation
of each member-month under the timeline its corrections left, the lines' rows) with the
peak memory it added, and each approval's posting through the book. Not timed: building
the book."""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import os
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from loadtests import harness as h  # noqa: E402

RIGHTS = {"std-12": {"standard": 1_200}, "pharm-7": {"pharmacy": 700},
          "std-12-pharm-7": {"standard": 1_200, "pharmacy": 700}}
STEPS = [("c1", "std-12", "2026-11-01", "2026-12-01"), ("c2", "pharm-7", "2026-11-01", "2026-12-01"),
         ("c3", "std-12", "2026-11-10", "2026-11-20"), ("c4", "std-12-pharm-7", "2026-11-05", "2026-12-01"),
         ("c5", "std-12", "2026-11-01", "2026-12-01")]


def right_policy(policy_id: str, rates: dict[str, int]):
    import yaml

    from rules.document import PolicyDocument

    doc = copy.deepcopy(yaml.safe_load((h.REPO_ROOT / "policies" / "2025-10-cap-50man.yaml").read_text()))
    doc["policy_id"] = policy_id
    doc.pop("effective_from")
    variants = doc["components"][0]["variants"]
    for variant in variants:
        if variant["id"] == "standard" and "standard" in rates:
            variant["bands"][0]["rate_bp"] = rates["standard"]
    if "pharmacy" in rates:
        variants.insert(1, {"id": "pharmacy", "when": {"categories_include": ["pharmacy"]},
                            "bands": [{"up_to_won": variants[-1]["bands"][0]["up_to_won"],
                                       "rate_bp": rates["pharmacy"]}]})
    return PolicyDocument.model_validate(doc)


def peak_rss_while(fn) -> tuple[object, float, float]:
    """fn's result, its seconds, and the peak resident memory it added (MiB)."""
    pid, stop = os.getpid(), threading.Event()
    base = h.rss_mib(pid) or 0.0
    peak = [base]

    def watch() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], h.rss_mib(pid) or 0.0)
            time.sleep(0.02)

    watcher = threading.Thread(target=watch)
    watcher.start()
    started = time.perf_counter()
    try:
        result = fn()
    finally:
        stop.set()
        watcher.join()
    return result, time.perf_counter() - started, peak[0] - base


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--payments-per-day", type=int, default=1_700)
    parser.add_argument("--members", type=int, default=4_000)
    parser.add_argument("--merchants", type=int, default=400)
    parser.add_argument("--seed", type=int, default=11)
    args = parser.parse_args()
    from sqlalchemy import select

    from ledger import corrections
    from ledger import schema as s
    from ledger.book import Book, cashback_held
    from ledger.db import make_engine, migrate
    from ledger.keys import Principal
    from ledger.policies import create_draft, sync_file_policies
    from ledger.queries import check_book
    from rules.loader import load_policy_dir, timeline_from_dir
    from rules.simulate import evaluate_frame
    from rules.timeutil import SEOUL
    from settlement import datagen
    from settlement.simulate import approved_corrections, load_range

    import orjson

    h.print_machine({"month": "2026-11", "payments per day": args.payments_per_day, "members": args.members,
                     "merchants": args.merchants, "corrections": len(STEPS)})
    with h.fresh_database() as url:
        migrate(url)
        engine = make_engine(url)
        timeline = timeline_from_dir(h.REPO_ROOT / "policies")
        with engine.begin() as conn:
            sync_file_policies(conn, load_policy_dir(h.REPO_ROOT / "policies"))
        plan = datagen.command_plan(args.seed, dt.date(2026, 11, 1), 30, members=args.members,
                                    merchants=args.merchants, payments_per_day=args.payments_per_day,
                                    topup_won=1_000_000, grant_share=0.05)
        with engine.begin() as conn:
            datagen.register(conn, plan)
        book = Book(engine, timeline)
        started = time.perf_counter()
        for batch in plan.batches(256):
            book.execute(batch)
        print(f"book: {len(plan.commands):,} commands in {time.perf_counter() - started:.0f} s (untimed below)")
        editor = Principal("bench-editor", "bench editor", "policy-editor")
        approver = Principal("bench-approver", "bench approver", "policy-approver")
        with engine.begin() as conn:
            for policy_id, rates in RIGHTS.items():
                create_draft(conn, right_policy(policy_id, rates), editor)
        for correction_id, right, start, end in STEPS:
            span = [int(dt.datetime.fromisoformat(day).replace(tzinfo=SEOUL).timestamp() * 1_000_000)
                    for day in (start, end)]
            proposal, seconds, added = peak_rss_while(lambda: corrections.propose(
                engine, timeline, correction_id=correction_id, wrong_policy_id="incheon-2025-10",
                right_policy_id=right, from_us_=span[0], to_us_=span[1], author=editor))
            summary = proposal["summary"]
            posted, post_s, _ = peak_rss_while(lambda: corrections.approve_and_post(engine, book, correction_id,
                                                                                   approver))
            print(f"RESULT correction_plan {correction_id} ({right} {start}..{end}): payments {summary['payments']:,}, "
                  f"already corrected {summary['payments_already_corrected']:,}, lines {summary['lines']:,}; "
                  f"propose {seconds:.1f} s (+{added:.0f} MiB peak); approve and post {post_s:.1f} s, "
                  f"{posted['status']}")
        month = [int(dt.datetime(2026, m, 1, tzinfo=SEOUL).timestamp() * 1_000_000) for m in (11, 12)]
        with engine.connect() as conn:
            history = tuple(a.prior for a in approved_corrections(conn, *month))
            loaded = load_range(conn, *month)
            held = {payment_id: sum(cashback_held(orjson.loads(detail), orjson.loads(state or "{}")).values())
                    for payment_id, detail, state in conn.execute(
                        select(s.payments.c.payment_id, s.payments.c.detail, s.payments.c.refund_state)
                        .where(s.payments.c.status == "approved"))}
            bad = [check.name for check in check_book(conn) if not check.ok]
        corrected = corrections._timelines(engine, timeline, "std-12", *month)(history)[0]
        evaluation = evaluate_frame(corrected, loaded.payments, loaded.start, as_given=True)
        ids = loaded.payments["payment_id"].to_list()
        gives = dict(zip((ids[row] for row in evaluation.payments["row"].to_list()),
                         evaluation.payments["cashback_won"].to_list()))
        differ = [abs(held.get(p, 0) - won) for p, won in gives.items() if held.get(p, 0) != won]
        print(f"RESULT correction_plan holdings: {len(differ)} of {len(gives):,} payments differ from the timeline as "
              f"corrected (at most {max(differ, default=0)} won: partial refunds' floored clawbacks); book checks "
              f"{'ok' if not bad else 'BAD ' + ', '.join(bad)}")
        engine.dispose()
    return 0 if not bad else 1


if __name__ == "__main__":
    sys.exit(main())
