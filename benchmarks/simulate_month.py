"""Simulate one month at Incheon scale: 20 million payments re-evaluated under a policy
with the vectorised evaluator, and reported beside what was paid (target < 60 s).

  .venv/bin/python benchmarks/simulate_month.py [--payments 20000000] [--members 2400000]
      [--merchants 150000] [--policy policies/2025-09-all-under-30eok.yaml] [--pure 100000]

Phase 1 (not timed) generates September 2025 directly as a polars frame in the form
`rules.simulate` reads (vectorised; random numbers are hashes of the row index with a
seed): ~2.4 million members over the ten districts weighted by population, ~150,000
merchants with lognormal annual sales (settlement.datagen.merchant_frame) of which ~4%
are good-price shops, merchants picked in proportion to their sales, lognormal amounts
(median 12,300, mean ~17,000 won), lunch and dinner peaks; 15% of payments use some
points and 3% are paid with grant money (which earns nothing). "What was paid" is
generated too, untimed: the same month evaluated under the policy file with Ganghwa and
Ongjin at 10% instead of 15% (the 2024-07 rate), so the report has members who gain.

Phase 2 (timed, the target) is what `settlement.simulate.simulate` does after reading
the book: `rules.simulate.evaluate_frame` under the policy file (loaded by path), then
`settlement.simulate.summarise` (totals, by component, funder, merchant district and
tier, members affected). Budgets are not applied (cost without limits).

Phase 3 (context) times the pure evaluator, `rules.evaluate.evaluate_payment`, one
payment after the other on the first --pure payments, month state threaded through.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import math
import time
from dataclasses import replace
from pathlib import Path

from settlement_common import REPO, peak_rss_mib, show, timed

import polars as pl

from rules.compiled import compile_policy
from rules.loader import load_policy_file
from rules.simulate import evaluate_frame
from rules.timeutil import local_midnight_us
from settlement.datagen import AMOUNT_MAX_WON, AMOUNT_MEDIAN_WON, AMOUNT_MIN_WON, AMOUNT_SIGMA, DISTRICT_WEIGHTS, \
    merchant_frame
from settlement.simulate import costs_of, summarise

MONTH_START = dt.date(2025, 9, 1)
MONTH_DAYS = 30
POLICY = REPO / "policies" / "2025-09-all-under-30eok.yaml"
US_PER_MIN = 60_000_000
TARGET_S = 60
MASK53 = 2**53


def uniform(seed: int, stream: int) -> pl.Expr:
    """Uniform [0, 1) per row: the row index hashed with (seed, stream)."""
    return (pl.int_range(pl.len(), dtype=pl.Int64).hash(seed * 1_000_003 + stream) // 2048).cast(pl.Float64) / MASK53


def normal(seed: int, stream: int) -> pl.Expr:
    u1 = uniform(seed, stream).clip(1e-12, 1.0)
    return (-2.0 * u1.log()).sqrt() * (2.0 * math.pi * uniform(seed, stream + 1)).cos()


def pick(u: pl.Expr, weights: dict[str, float]) -> pl.Expr:
    total, acc, expr = sum(weights.values()), 0.0, None
    for name, weight in weights.items():
        acc += weight / total
        expr = (pl.when(u < acc) if expr is None else expr.when(u < acc)).then(pl.lit(name))
    return expr.otherwise(pl.lit(next(reversed(weights))))


def merchants(count: int, seed: int) -> pl.DataFrame:
    frame = merchant_frame(count, seed)
    return frame.with_columns(
        pl.when(uniform(seed, 40) < 0.04).then(pl.lit(["good_price"], pl.List(pl.String)))
        .otherwise(pl.lit([], pl.List(pl.String))).alias("flags"),
        pl.col("category").cast(pl.Categorical),
    )


def members(count: int, seed: int) -> pl.DataFrame:
    return pl.DataFrame({"i": pl.int_range(count, dtype=pl.Int64, eager=True)}).select(
        pl.format("M{}", pl.col("i").cast(pl.String).str.zfill(7)).alias("member_id"),
        pick(uniform(seed, 50), DISTRICT_WEIGHTS).alias("district"),
    )


def month_payments(count: int, shops: pl.DataFrame, people: pl.DataFrame, seed: int) -> pl.DataFrame:
    """A month of approved payments in the form `rules.simulate` reads."""
    weights = shops["annual_sales_won"].clip(10_000_000, None).cast(pl.Float64)
    cdf = weights.cum_sum() / weights.sum()
    p = pl.DataFrame({"i": pl.int_range(count, dtype=pl.Int64, eager=True)})
    shop = cdf.search_sorted(p.select(uniform(seed, 10)).to_series()).clip(0, shops.height - 1)
    person = p.select((uniform(seed, 11) * people.height).cast(pl.Int64).clip(0, people.height - 1)).to_series()
    pick_time = uniform(seed, 20)
    minute = (pl.when(pick_time < 0.35).then(12.5 * 60 + 45 * normal(seed, 21))
              .when(pick_time < 0.65).then(19 * 60 + 75 * normal(seed, 23))
              .otherwise(7 * 60 + 16 * 60 * uniform(seed, 25))).clip(0.0, 24 * 60 - 0.01)
    day = (uniform(seed, 26) * MONTH_DAYS).cast(pl.Int64)
    amount = (((math.log(AMOUNT_MEDIAN_WON) + AMOUNT_SIGMA * normal(seed, 12)).exp() / 100).floor().cast(pl.Int64)
              * 100).clip(AMOUNT_MIN_WON, AMOUNT_MAX_WON)
    p = p.with_columns(
        amount.alias("amount_won"),
        (local_midnight_us(MONTH_START) + day * 86_400_000_000 + (minute * US_PER_MIN).cast(pl.Int64))
        .alias("occurred_at_us"),
        uniform(seed, 30).alias("u_points"), uniform(seed, 31).alias("u_grants"),
    )
    points = pl.when(pl.col("u_points") < 0.15).then(
        pl.min_horizontal(pl.col("amount_won"), (pl.col("u_points") / 0.15 * 5_000).cast(pl.Int64))).otherwise(0)
    grants = pl.when(pl.col("u_grants") < 0.03).then(pl.col("amount_won")).otherwise(0)
    p = p.with_columns(grants.alias("spent_grants_won")).with_columns(
        pl.min_horizontal(points, pl.col("amount_won") - pl.col("spent_grants_won")).alias("spent_points_won"))
    return p.select(
        pl.format("P{}", pl.col("i").cast(pl.String).str.zfill(9)).alias("payment_id"),
        people["member_id"].gather(person).alias("member_id"),
        people["district"].gather(person).alias("member_district"),
        shops["merchant_id"].gather(shop).alias("merchant_id"),
        shops["district"].gather(shop).alias("merchant_district"),
        shops["category"].gather(shop).alias("category"),
        shops["annual_sales_won"].gather(shop).alias("annual_sales_won"),
        shops["flags"].gather(shop).alias("flags"),
        shops["merchant_share_bp"].gather(shop).alias("merchant_share_bp"),
        "amount_won", "occurred_at_us",
        (pl.col("amount_won") - pl.col("spent_grants_won") - pl.col("spent_points_won")).alias("spent_charged_won"),
        "spent_points_won", "spent_grants_won",
        pl.lit(0, pl.Int64).alias("grant_cashback_won"),
    )


def paid_policy(policy):
    """The policy file with Ganghwa/Ongjin at 10% (2024-07's rate): what was 'paid'."""
    city = policy.components[0]
    variants = tuple(replace(v, bands=tuple(replace(b, rate_bp=1_000) for b in v.bands)) for v in city.variants)
    return replace(policy, policy_id="paid-2024-07-rates", components=(replace(city, variants=variants),))


def pure_speed(frame: pl.DataFrame, policy, count: int) -> dict:
    """The pure evaluator one payment after the other, the month threaded through."""
    from rules.evaluate import evaluate_payment
    from rules.facts import BudgetView, MemberFacts, MerchantFacts, MonthSoFar, PaymentEvent, Wallet
    from rules.timeutil import local_date, month_of

    sample = frame.head(count).sort("occurred_at_us", "payment_id").to_dicts()
    registered = dt.date(2019, 1, 1)
    events = []
    for r in sample:
        merchant = MerchantFacts(r["merchant_id"], r["merchant_district"], str(r["category"]), r["annual_sales_won"],
                                 registered, frozenset(r["flags"]), r["merchant_share_bp"])
        member = MemberFacts(r["member_id"], r["member_district"], "active")
        day = local_date(r["occurred_at_us"])
        events.append((PaymentEvent(r["amount_won"], r["occurred_at_us"], day, member, merchant),
                       Wallet(r["spent_charged_won"], r["spent_points_won"]), (r["member_id"], month_of(day))))
    months: dict = {}
    budgets = BudgetView()
    start = time.perf_counter()
    for event, wallet, key in events:
        if event.amount_won != wallet.charged_won + wallet.points_won:
            wallet = Wallet(event.amount_won, 0)  # grant-paid rows: the pure path would need lots; charged here
        month = months.get(key) or MonthSoFar()
        d = evaluate_payment(event, policy, month, wallet, budgets)
        months[key] = MonthSoFar(month.eligible_spend_won + d.base_won, month.cashback_won + d.cashback_won, 0, {})
    seconds = time.perf_counter() - start
    return {"pure evaluator payments": len(events), "pure evaluator s": round(seconds, 3),
            "pure evaluator payments/s": round(len(events) / seconds),
            "pure evaluator µs/payment": round(seconds / len(events) * 1e6, 1)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--payments", type=int, default=20_000_000)
    parser.add_argument("--members", type=int, default=2_400_000)
    parser.add_argument("--merchants", type=int, default=150_000)
    parser.add_argument("--policy", type=Path, default=POLICY)
    parser.add_argument("--pure", type=int, default=100_000, help="payments for the pure evaluator's speed")
    parser.add_argument("--seed", type=int, default=11)
    args = parser.parse_args()
    policy = compile_policy(load_policy_file(args.policy))
    figures: dict = {}
    with timed("generate (not timed for the target) s", figures):
        shops, people = merchants(args.merchants, args.seed), members(args.members, args.seed)
        frame = month_payments(args.payments, shops, people, args.seed)
    figures["peak RSS after generating MiB"] = round(peak_rss_mib(), 1)
    with timed("evaluate what was paid (not timed) s", figures):
        paid = costs_of(evaluate_frame(paid_policy(policy), frame))
        gc.collect()
    figures["payments (rows)"] = frame.height
    figures["input frame MiB"] = round(frame.estimated_size("mb"), 1)
    figures["peak RSS before the timed phase MiB"] = round(peak_rss_mib(), 1)
    start = time.perf_counter()
    with timed("evaluate s", figures):
        simulated = evaluate_frame(policy, frame)
    with timed("aggregate s", figures):
        report = summarise(simulated, paid)
    total = time.perf_counter() - start
    figures["evaluate + aggregate s"] = round(total, 3)
    figures["rows/s"] = round(frame.height / total)
    figures["cashback lines"] = simulated.lines.height
    figures["funder rows"] = simulated.funding.height
    figures["simulated won"] = report["totals"]["simulated_won"]
    figures["paid won"] = report["totals"]["actual_won"]
    figures["members with payments"] = report["members"]["with_payments"]
    figures["members affected (gaining)"] = f"{report['members']['affected']} ({report['members']['gaining']})"
    figures["by funder"] = {r["source"]: r["simulated_won"] for r in report["by_funder"]}
    figures["by tier"] = {r["tier"]: r["simulated_won"] for r in report["by_merchant_tier"]}
    figures["peak RSS MiB"] = round(peak_rss_mib(), 1)
    del simulated, paid
    gc.collect()
    if args.pure:
        figures |= pure_speed(frame, policy, args.pure)
    show("simulate one month", {"payments": args.payments, "members": args.members, "merchants": args.merchants,
                                "policy": args.policy.name, "seed": args.seed, "budgets": "not applied",
                                "month": MONTH_START.strftime("%Y-%m")},
         figures, {"evaluate + aggregate s": TARGET_S})


if __name__ == "__main__":
    main()
