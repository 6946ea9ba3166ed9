"""(d) Rule evaluation alone: `rules.evaluate.evaluate_payment` with the 2025 policy
stack loaded (policies/*.yaml, the stack in force in November 2025), on Incheon-shaped
events (members in the ten districts, sales-weighted merchants, lognormal amounts,
members part-way through their month, a budget with a limit set).

Times each call with perf_counter_ns over --payments events, --repeats times; prints the
median of the run medians and p99. Target: median < 20 µs per payment.

    .venv/bin/python benchmarks/rule_eval.py [--payments 50000] [--repeats 5]"""

from __future__ import annotations

import argparse
import datetime as dt
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from loadtests import harness as h  # noqa: E402

TARGET_US = 20.0


def events(count: int, seed: int):
    from rules.facts import BudgetView, MemberFacts, MerchantFacts, MonthSoFar, PaymentEvent, Wallet
    from rules.timeutil import local_date, to_us

    rng = random.Random(seed)
    pop = h.population(seed, 5_000, 2_000)
    merchants = [MerchantFacts(r["merchant_id"], r["district"], r["category"], r["annual_sales_won"],
                               r["registered_from"], frozenset(r["flags"]), r["merchant_share_bp"])
                 for r in pop.merchants]
    members = [MemberFacts(m["member_id"], m["district"], "active") for m in pop.members]
    picks = rng.choices(merchants, weights=pop.merchant_weights, k=count)
    start = to_us(dt.datetime.combine(h.PEAK_DAY, dt.time(7, 0), h.SEOUL))
    budgets = BudgetView({("city", "2025-11"): 5_000_000_000, ("city", "2025"): 60_000_000_000,
                          ("national", "2025-11"): 3_000_000_000})
    out = []
    for i in range(count):
        at = start + rng.randrange(16 * 3_600_000_000)
        spent = rng.choice((0, 0, 50_000, 120_000, 250_000, 320_000))
        month = MonthSoFar(spent, min(spent // 10, 30_000), 500_000, {"city": min(spent // 10, 30_000)})
        wallet = Wallet(rng.choice((300_000, 1_000_000)), rng.choice((0, 1_500, 12_000)))
        out.append((PaymentEvent(h.amount_won(rng), at, local_date(at), rng.choice(members), picks[i]),
                    month, wallet, budgets))
    return out


def main() -> int:
    from rules.evaluate import evaluate_payment
    from rules.loader import timeline_from_dir

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--payments", type=int, default=50_000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    assert 1_000 <= args.payments <= 1_000_000 and 1 <= args.repeats <= 20
    timeline = timeline_from_dir(h.REPO_ROOT / "policies")
    sample = events(args.payments, 1)
    policy = timeline.in_force(sample[0][0].occurred_at_us)
    h.print_machine({"policy stack": policy.policy_id, "components": len(policy.components),
                     "payments per run": args.payments, "repeats": args.repeats, "timer": "perf_counter_ns per call"})
    medians, p99s, approved = [], [], 0
    clock = time.perf_counter_ns
    for _ in range(args.repeats):
        took = []
        for event, month, wallet, budgets in sample:
            t0 = clock()
            policy_now = timeline.in_force(event.occurred_at_us)
            decision = evaluate_payment(event, policy_now, month, wallet, budgets)
            took.append(clock() - t0)
            approved += decision.approved
        took.sort()
        medians.append(took[len(took) // 2] / 1000)
        p99s.append(took[int(len(took) * 0.99)] / 1000)
        print(f"run: median {medians[-1]:.2f} µs, p99 {p99s[-1]:.2f} µs per payment (policy look-up included)")
    median = h.median(medians)
    print(f"approved share {approved / (args.payments * args.repeats):.3f}")
    print(f"RESULT rule_eval median {median:.2f} µs, p99 {h.median(p99s):.2f} µs per payment "
          f"(target < {TARGET_US} µs): {'PASS' if median < TARGET_US else 'MISS'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
