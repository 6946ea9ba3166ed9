"""Peak memory of one heavy job in a fresh process, for the HTTP bounds on a range
(`EUM_SIMULATION_PAYMENTS_MAX`, `EUM_CORRECTION_PAYMENTS_MAX`; docs/performance.md,
Simulation): `simulate()` or a correction's plan (`correction_plan`, read and evaluated
one member group of PLAN_GROUP_ROWS payments at a time, or of `--group-rows`) over the
generated month of a book `simulate_book.py --keep NAME --build-only` wrote.

  .venv/bin/python benchmarks/heavy_job_memory.py postgresql://postgres@127.0.0.1:5432/NAME simulate|plan \
      [--group-rows N] [--every-payment]

`--every-payment`: the plan's right policy is what paid the month with the city's rate
at 11% instead of 10%, so every payment the city component pays changes and the plan's
lines (kept whole, not by group) are as large as they get, up to PLAN_PAYMENTS_CHANGED_MAX
(past it the plan is refused, and the peak is the bound's); otherwise the policy file,
which changes the Ganghwa/Ongjin payments (~3%).

One job per process: peak RSS is the process's, so a second job in the same one would
read the first's peak."""

from __future__ import annotations

import argparse
import datetime as dt
import time
from dataclasses import replace

from settlement_common import peak_rss_mib
from simulate_month import MONTH_START, POLICY, paid_policy

from ledger.db import make_engine, reader
from ledger.errors import CorrectionTooLarge
from rules.compiled import compile_policy
from rules.loader import load_policy_file
from rules.timeutil import local_midnight_us
from settlement.simulate import PLAN_GROUP_ROWS, correction_plan, simulate


def every_payment(paid):
    """What paid the month, with the city component at 11% where it gave 10%."""
    city = paid.components[0]
    variants = tuple(replace(v, bands=tuple(replace(b, rate_bp=b.rate_bp + 100) for b in v.bands))
                     for v in city.variants)
    return replace(paid, policy_id="paid-plus-1", components=(replace(city, variants=variants), *paid.components[1:]))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("url")
    parser.add_argument("job", choices=("simulate", "plan"))
    parser.add_argument("--group-rows", type=int, default=PLAN_GROUP_ROWS, help="the plan's payments per member group")
    parser.add_argument("--every-payment", action="store_true", help="a right policy that changes every payment")
    args = parser.parse_args()
    url, job = args.url, args.job
    policy = compile_policy(load_policy_file(POLICY))
    engine = make_engine(url, statement_timeout_ms=3_600_000)
    start = local_midnight_us(MONTH_START)
    end = local_midnight_us(MONTH_START + dt.timedelta(days=30))
    with engine.connect() as conn:
        payments = conn.exec_driver_sql("SELECT count(*) FROM payments WHERE occurred_at_us >= %s "
                                        "AND occurred_at_us < %s" % (start, end)).scalar()
    before = peak_rss_mib()
    clock = time.perf_counter()
    if job == "simulate":
        simulate(reader(engine), policy, start, end)
    else:  # what "paid" the month as the wrong policy, the file as the right one
        right = every_payment(paid_policy(policy)) if args.every_payment else policy
        try:
            plan = correction_plan(engine, paid_policy(policy), right, start, end, group_rows=args.group_rows)
            print(f"plan: group rows {args.group_rows:,}, lines {len(plan.lines):,}, "
                  f"payments changed {sum(len(line.payments) for line in plan.lines):,}")
        except CorrectionTooLarge as refused:  # the peak is then the bound's: its lines and one group
            print(f"plan: group rows {args.group_rows:,}, refused: {refused.detail}")
    print(f"{job}: payments {payments:,}, peak RSS before {before:,.0f} MiB, after {peak_rss_mib():,.0f} MiB, "
          f"{time.perf_counter() - clock:.1f} s")
    engine.dispose()


if __name__ == "__main__":
    main()
