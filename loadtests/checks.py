"""The book, read back after a load run.

1. `ledger.queries.check_book`: every transaction balances, the trial balance is zero,
   every leg is sealed, every transaction has its leg 0, balances equal their legs, no
   floor-zero account below zero, no budget over its limit, budgets equal their funder
   accounts, month counters equal their records and each payment's cashback is posted
   once (docs/design.md, "The money invariant").
2. No member month past the policy's monthly cashback cap or top-up limit (the month's
   counters, which check 1 holds to the payments and to the ledger).
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


def month_caps(timeline, month: str) -> tuple[dict[str, int], int | None, int | None]:
    """What a member-month may hold at most, by the policies in force at the month's
    first and last instant (the largest either allows): ({component: cashback cap}, the
    month's cashback cap, the top-up cap), None where unbounded. A component's cap is its
    own cap, else what its bands give at most on the best variant; a component with a
    band open-ended or rated from the merchant's share has none (the win-win layer's),
    and then the month's total has none unless the policy caps it. (This once gave up on
    the whole month as soon as one component was unbounded: from 2023, with the win-win
    layer in every stack, the check of the monthly cap could not fail.)"""
    from rules.compiled import CompiledPolicy
    from rules.timeutil import local_midnight_us
    import datetime as dt

    year, mon = int(month[:4]), int(month[5:7])
    start = local_midnight_us(dt.date(year, mon, 1))
    end = local_midnight_us(dt.date(year + (mon == 12), mon % 12 + 1, 1)) - 1
    policies: list[CompiledPolicy] = [p for p in (timeline.in_force(start), timeline.in_force(end)) if p]
    components: dict[str, int | None] = {}
    month_cap: int | None = 0
    topup_cap = 0
    for policy in policies:
        topup_cap = max(topup_cap, policy.topup_monthly_max_won)
        total: int | None = 0
        for component in policy.components:
            best: int | None = 0
            for variant in component.variants:
                earned: int | None = 0
                for band in variant.bands:
                    if band.upper_won is None or band.rate_from_merchant_share:
                        earned = None
                        break
                    earned += (band.upper_won - band.lower_won) * band.rate_bp // 10_000
                best = None if (earned is None or best is None) else max(best, earned)
            if component.monthly_cashback_cap_won is not None:
                best = component.monthly_cashback_cap_won if best is None else min(best, component.monthly_cashback_cap_won)
            seen = components.get(component.component_id, 0)
            components[component.component_id] = None if (best is None or seen is None) else max(seen, best)
            total = None if (best is None or total is None) else total + best
        if policy.monthly_cashback_cap_won is not None:
            total = policy.monthly_cashback_cap_won if total is None else min(total, policy.monthly_cashback_cap_won)
        month_cap = None if (total is None or month_cap is None) else max(month_cap, total)
    return ({c: cap for c, cap in components.items() if cap is not None}, month_cap if policies else None,
            topup_cap or None)


def over_caps(rows, caps: tuple[dict[str, int], int | None, int | None]) -> tuple[list, list]:
    """The member-months of `rows` (member_id, month, cashback_won, component_cashback
    JSON, topped_up_won) over a cap of `caps` (`month_caps`): (cashback, top-ups)."""
    by_component, month_cap, topup_cap = caps
    over_cashback, over_topup = [], []
    for member_id, month, cashback, component_text, topped_up in rows:
        held = json.loads(component_text or "{}")
        over = {c: won for c, won in held.items() if c in by_component and won > by_component[c]}
        if over or (month_cap is not None and cashback > month_cap):
            over_cashback.append((member_id, month, cashback, over))
        if topup_cap is not None and topped_up > topup_cap:
            over_topup.append((member_id, month, topped_up))
    return over_cashback, over_topup


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
            rows = conn.execute("SELECT member_id, month, cashback_won, component_cashback, topped_up_won "
                                "FROM member_months WHERE month = %s", (month,))
            cashback, topups = over_caps(rows, month_caps(timeline, month))
            over_cap += cashback
            over_topup += topups
        results.append(("no member month over the monthly cashback cap (in all, or of a component)", not over_cap,
                        str(over_cap[:5])))
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
