"""The book, read back after a load run.

1. `ledger.queries.check_book`: every transaction balances, the trial balance is zero,
   every leg is sealed, balances equal their legs, no floor-zero account below zero, no
   budget over its limit, budgets equal their funder accounts.
2. No member month past the policy's monthly cashback cap or top-up limit.
3. Every acknowledged (2xx) write is recorded exactly once, with the status the client
   was told, and an approved payment has exactly one payment transaction in the ledger.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import psycopg

TABLES = {"payment": ("payments", "payment_id"), "topup": ("topups", "topup_id"),
          "refund": ("refunds", "refund_id"), "disbursement": ("grant_disbursements", "disbursement_id")}
LEDGER_KIND = {"payment": "payment", "topup": "topup", "refund": "refund", "disbursement": "grant"}


def month_caps(timeline, month: str) -> tuple[int | None, int | None]:
    """(cashback cap, top-up cap) in won for a month: the largest any policy in force
    during that month allows. None: unbounded."""
    from rules.compiled import CompiledPolicy
    from rules.timeutil import local_midnight_us
    import datetime as dt

    year, mon = int(month[:4]), int(month[5:7])
    start = local_midnight_us(dt.date(year, mon, 1))
    end = local_midnight_us(dt.date(year + (mon == 12), mon % 12 + 1, 1)) - 1
    policies: list[CompiledPolicy] = [p for p in (timeline.in_force(start), timeline.in_force(end)) if p]
    cashback_cap: int | None = 0
    topup_cap = 0
    for policy in policies:
        topup_cap = max(topup_cap, policy.topup_monthly_max_won)
        total = 0
        for component in policy.components:
            best = 0
            for variant in component.variants:
                earned = 0
                for band in variant.bands:
                    if band.upper_won is None or band.rate_from_merchant_share:
                        earned = None
                        break
                    earned += (band.upper_won - band.lower_won) * band.rate_bp // 10_000
                if earned is None:
                    best = None
                    break
                best = max(best, earned)
            if component.monthly_cashback_cap_won is not None:
                best = component.monthly_cashback_cap_won if best is None else min(best, component.monthly_cashback_cap_won)
            total = None if (best is None or total is None) else total + best
        if policy.monthly_cashback_cap_won is not None:
            total = policy.monthly_cashback_cap_won if total is None else min(total, policy.monthly_cashback_cap_won)
        cashback_cap = None if (total is None or cashback_cap is None) else max(cashback_cap, total)
    return cashback_cap, (topup_cap or None)


def read_acks(ack_dir: Path) -> dict[str, dict[str, str]]:
    """kind -> {id: status told to the client}, from the JSON lines Locust wrote."""
    acks: dict[str, dict[str, str]] = defaultdict(dict)
    for path in sorted(ack_dir.glob("*.jsonl")):
        for line in path.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                acks[row["kind"]][row["id"]] = row.get("status") or ""
    return acks


def check_acks(conn: psycopg.Connection, acks: dict[str, dict[str, str]]) -> list[tuple[str, bool, str]]:
    out = []
    for kind, told in sorted(acks.items()):
        table, column = TABLES[kind]
        ids = list(told)
        status_col = "status" if kind in ("payment", "topup") else "'recorded'"
        rows = conn.execute(f"SELECT {column}, {status_col} FROM {table} WHERE {column} = ANY(%s)", (ids,)).fetchall()
        recorded = {r[0]: r[1] for r in rows}
        missing = [i for i in ids if i not in recorded]
        wrong = [i for i in ids if i in recorded and told[i] and kind in ("payment", "topup") and told[i] != recorded[i]]
        ledger_kind = LEDGER_KIND[kind]
        counts = dict(conn.execute("SELECT ref, count(*) FROM ledger_txns WHERE kind = %s AND ref = ANY(%s) GROUP BY ref",
                                   (ledger_kind, ids)).fetchall())
        twice = [i for i, n in counts.items() if n != 1]
        unposted = [i for i in ids if recorded.get(i) == "approved" and i not in counts]
        ok = not (missing or wrong or twice or unposted)
        detail = (f"{len(ids)} acknowledged; missing {len(missing)} {missing[:3]}, status differs {len(wrong)}, "
                  f"posted twice {len(twice)}, approved but not posted {len(unposted)}")
        out.append((f"every acknowledged {kind} recorded exactly once", ok, detail))
    return out


def check_book_after_run(url: str, *, ack_dir: Path | None = None, acknowledged_count_min: int | None = None,
                         policies_dir: Path | None = None) -> bool:
    from ledger.db import make_engine, reader
    from ledger.queries import check_book
    from rules.loader import timeline_from_dir
    from loadtests.harness import REPO_ROOT

    engine = make_engine(url)
    try:
        with reader(engine).connect() as conn:
            results = [(r.name, r.ok, r.detail) for r in check_book(conn)]
    finally:
        engine.dispose()
    timeline = timeline_from_dir(policies_dir or REPO_ROOT / "policies")
    with psycopg.connect(url) as conn:
        over_cap, over_topup = [], []
        for month, in conn.execute("SELECT DISTINCT month FROM member_months").fetchall():
            cashback_cap, topup_cap = month_caps(timeline, month)
            if cashback_cap is not None:
                over_cap += conn.execute("SELECT member_id, month, cashback_won FROM member_months "
                                         "WHERE month = %s AND cashback_won > %s LIMIT 5", (month, cashback_cap)).fetchall()
            if topup_cap is not None:
                over_topup += conn.execute("SELECT member_id, month, topped_up_won FROM member_months "
                                           "WHERE month = %s AND topped_up_won > %s LIMIT 5", (month, topup_cap)).fetchall()
        results.append(("no member month over the monthly cashback cap", not over_cap, str(over_cap[:5])))
        results.append(("no member month over the monthly top-up limit", not over_topup, str(over_topup[:5])))
        if acknowledged_count_min is not None:
            count = conn.execute("SELECT count(*) FROM payments").fetchone()[0]
            results.append(("payments recorded >= payments acknowledged", count >= acknowledged_count_min,
                            f"{count} recorded, {acknowledged_count_min} acknowledged"))
        if ack_dir is not None:
            results += check_acks(conn, read_acks(ack_dir))
    for name, ok, detail in results:
        print(f"  {'ok ' if ok else 'BAD'} {name}{'  ' + detail if detail and not ok else ''}")
    good = all(ok for _, ok, _ in results)
    print(f"book checks: {'all ok' if good else 'FAILED'}")
    return good
