"""The policy preview on a book already written (`simulate_book.py --keep NAME --build-only`),
two code trees alternated in one run: `simulate()` of a city-wide raise (every band
rate of the benchmark's policy raised by --raise-bp) timed in a fresh process per run,
A, B, A, B, ... so that the machine's load falls on both alike; the medians side by side.

  .venv/bin/python benchmarks/simulate_feedback_ab.py --database postgresql://.../eum_bench_sim_book1m \
      --a /path/to/tree-before --b /path/to/tree-after [--runs 3] [--raise-bp 200] [--decline CATEGORY ...]

`--decline` adds categories to those the draft declines (the book paid them, some with
points: the payments the draft declines give their points back, docs/design.md).

Each tree is put first on the child's sys.path (its `rules`, `settlement`, `eum`); the
policy file is read from tree B. A run prints its own timings (read, evaluate, aggregate)
and the report's totals and points_feedback, so the two trees' figures can be compared.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve()


def child(root: str, database: str, policy_file: str, raise_bp: int, decline: list[str]) -> None:
    sys.path.insert(0, root)
    import eum  # noqa: F401  (the allocator's default, before polars loads)
    import datetime as dt
    import time
    from dataclasses import replace

    from ledger.db import make_engine, reader
    from rules.compiled import compile_policy
    from rules.loader import load_policy_file
    from rules.timeutil import local_midnight_us
    from settlement.simulate import simulate

    policy = compile_policy(load_policy_file(Path(policy_file)))
    components = tuple(replace(c, variants=tuple(
        replace(v, bands=tuple(replace(b, rate_bp=b.rate_bp + raise_bp) for b in v.bands)) for v in c.variants))
        for c in policy.components)
    draft = replace(policy, policy_id=f"{policy.policy_id}-raise-{raise_bp}", components=components,
                    declined_categories=frozenset(policy.declined_categories) | frozenset(decline))
    month = dt.date(2025, 9, 1)
    start_us, end_us = local_midnight_us(month), local_midnight_us(month + dt.timedelta(days=30))
    engine = make_engine(database, statement_timeout_ms=3_600_000)
    phases: dict = {}
    try:
        with reader(engine).connect() as conn:
            clock = time.perf_counter()
            report = simulate(conn, draft, start_us, end_us, timings=phases)
            total = time.perf_counter() - clock
    finally:
        engine.dispose()
    print(json.dumps({"simulate s": round(total, 3), "read s": phases.get("read s"),
                      "evaluate s": round(phases.get("evaluate s", 0), 3),
                      "aggregate s": round(phases.get("aggregate s", 0), 3),
                      "payments": report["payments"]["count"], "totals": report["totals"],
                      "points_feedback": report["points_feedback"]}))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--database", required=True)
    parser.add_argument("--a", required=True, help="code tree A (e.g. a worktree of main)")
    parser.add_argument("--b", required=True, help="code tree B")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--raise-bp", type=int, default=200)
    parser.add_argument("--decline", nargs="*", default=[], metavar="CATEGORY")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    policy_file = str(Path(args.b) / "policies" / "2025-09-all-under-30eok.yaml")
    if args.child:
        child(args.child, args.database, policy_file, args.raise_bp, args.decline)
        return
    times: dict[str, list[float]] = {"A": [], "B": []}
    for run in range(args.runs):
        for name, root in (("A", args.a), ("B", args.b)):
            out = subprocess.run([sys.executable, str(HERE), "--database", args.database, "--a", args.a,
                                  "--b", args.b, "--raise-bp", str(args.raise_bp),
                                  *(["--decline", *args.decline] if args.decline else []), "--child", root],
                                 capture_output=True, text=True, env={**os.environ, "PYTHONPATH": root}, check=True)
            figures = json.loads(out.stdout.strip().splitlines()[-1])
            times[name].append(figures["simulate s"])
            print(f"run {run + 1} {name}: {json.dumps(figures)}", flush=True)
    a, b = statistics.median(times["A"]), statistics.median(times["B"])
    print(f"median A {a:.3f} s ({times['A']}), B {b:.3f} s ({times['B']}): B/A = {b / a:.2f}")


if __name__ == "__main__":
    main()
