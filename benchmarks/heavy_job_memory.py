"""Peak memory of one heavy job in a fresh process, for the HTTP bounds on a range
(`EUM_SIMULATION_PAYMENTS_MAX`, `EUM_CORRECTION_PAYMENTS_MAX`; docs/performance.md,
Simulation): `simulate()` or a correction's plan (`correction_plan`, the one-frame read
a proposal makes) over the generated month of a book `simulate_book.py --keep NAME
--build-only` wrote.

  .venv/bin/python benchmarks/heavy_job_memory.py postgresql://postgres@127.0.0.1:5432/NAME simulate|plan

One job per process: peak RSS is the process's, so a second job in the same one would
read the first's peak."""

from __future__ import annotations

import datetime as dt
import sys
import time

from settlement_common import peak_rss_mib
from simulate_month import MONTH_START, POLICY, paid_policy

from ledger.db import make_engine, reader
from rules.compiled import compile_policy
from rules.loader import load_policy_file
from rules.timeutil import local_midnight_us
from settlement.simulate import correction_plan, simulate


def main() -> None:
    url, job = sys.argv[1], sys.argv[2]
    if job not in ("simulate", "plan"):
        raise SystemExit("the job is simulate or plan")
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
        correction_plan(engine, paid_policy(policy), policy, start, end)
    print(f"{job}: payments {payments:,}, peak RSS before {before:,.0f} MiB, after {peak_rss_mib():,.0f} MiB, "
          f"{time.perf_counter() - clock:.1f} s")
    engine.dispose()


if __name__ == "__main__":
    main()
