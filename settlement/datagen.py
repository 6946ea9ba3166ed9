"""Realistic Incheon e-eum data from a seed, for tests, demos and benchmarks.

Two outputs:
- `command_plan`: registry rows and `ledger.commands` (top-ups, payments, refunds,
  grant disbursements) to run through `ledger.book.Book.execute`, for end-to-end data
  (small: thousands of commands).
- `merchant_frame` / `day_frames`: polars frames shaped like the ledger's tables
  (legs with their transaction's attributes, payments, refunds), generated vectorised
  (1.5 million payments in a few seconds) for the benchmarks.

Shapes (from DOMAIN.md): ten districts weighted by population; ~150,000 merchants with
lognormal annual sales (median ~1.2억; about a quarter above 3억, under 1% above 30억);
payment amounts lognormal around 17,000 won on average (median ~12,000), rounded to
100 won; time of day a mix of a lunch peak (12:30), a dinner peak (19:00) and a flat
07:00–23:00 background, all in Asia/Seoul; ~3% of payments refunded.

Random numbers in the frame generator are hashes of a row index with a seed
(`pl.int_range(n).hash(seed)`), so a seed gives the same frames on every machine
running the same polars version, with no numpy.
"""

from __future__ import annotations

import datetime as dt
import math
import random
from dataclasses import dataclass, field

import polars as pl

from ledger.commands import Command, Disburse, Pay, Refund, TopUp, request_hash
from rules.compiled import PolicyTimeline, compile_policy
from rules.grants import GrantProgramDocument
from rules.loader import validate_policy_data
from rules.timeutil import local_midnight_us, rfc3339
from settlement.compute import KIND, LEGS_SCHEMA

DISTRICT_WEIGHTS: dict[str, float] = {
    "seo": 0.20, "namdong": 0.18, "bupyeong": 0.17, "michuhol": 0.14, "yeonsu": 0.13,
    "gyeyang": 0.10, "jung": 0.05, "dong": 0.02, "ganghwa": 0.025, "ongjin": 0.007,
}
DISTRICTS = tuple(DISTRICT_WEIGHTS)
CATEGORY_WEIGHTS: dict[str, float] = {
    "restaurant": 0.30, "grocery": 0.15, "cafe": 0.10, "retail": 0.10, "convenience": 0.08,
    "beauty": 0.06, "clinic": 0.05, "education": 0.05, "pharmacy": 0.04, "fuel": 0.03, "bakery": 0.04,
}
SALES_MEDIAN_WON = 120_000_000
SALES_SIGMA = 1.3
AMOUNT_MEDIAN_WON = 12_300  # lognormal σ 0.8: mean ≈ 17,000
AMOUNT_SIGMA = 0.8
AMOUNT_MIN_WON = 1_000
AMOUNT_MAX_WON = 2_000_000
REFUND_SHARE = 0.03
US_PER_MIN = 60_000_000
US_PER_DAY = 86_400_000_000
MASK53 = 2 ** 53

# ---------------------------------------------------------------- the demo policy


def demo_policy_data(effective_from: str = "2026-01-01T00:00:00+09:00") -> dict:
    """City 10% on the first 30만 (national 4, city 6 of 10), a 2% district top-up in
    Seo-gu, Yeonsu-gu and Michuhol-gu paid by the district, and the merchant's own
    상생 share paid by the merchant: all three funders appear in the book."""
    return {
        "policy_id": "datagen-2026", "name": "datagen: city 10% + district 2% + merchant share",
        "effective_from": effective_from,
        "topup": {"min_won": 10_000, "monthly_max_won": 2_000_000},
        "declined_categories": ["department_store", "large_mart", "entertainment", "gambling", "online"],
        "cashback_eligibility": {"merchant_sales_max_won": 3_000_000_000},
        "components": [
            {"id": "city", "funding": {"national": 4000, "city": 6000}, "remainder_to": "city",
             "variants": [{"id": "standard", "bands": [{"up_to_won": 300_000, "rate_bp": 1000}]}]},
            {"id": "district", "funding": {"$merchant_district": 10000},
             "variants": [{"id": "topup", "when": {"merchant_districts": ["seo", "yeonsu", "michuhol"]},
                           "bands": [{"up_to_won": 300_000, "rate_bp": 200}]}]},
            {"id": "sangsaeng", "funding": {"merchant": 10000},
             "variants": [{"id": "share", "bands": [{"up_to_won": 300_000, "rate_from": "merchant_share_bp"}]}]},
        ],
    }


def demo_timeline() -> PolicyTimeline:
    return PolicyTimeline([compile_policy(validate_policy_data(demo_policy_data()))])


def demo_grant_program(valid_from: dt.date, valid_until: dt.date) -> GrantProgramDocument:
    return GrantProgramDocument.model_validate({
        "program_id": "relief-datagen", "name": "datagen relief grant", "valid_from": valid_from,
        "valid_until": valid_until, "restrictions": {"merchant_sales_max_won": 3_000_000_000},
        "funding": {"national": 8000, "city": 2000}, "remainder_to": "national"})


# ---------------------------------------------------------------- command streams (small, end to end)


@dataclass
class CommandPlan:
    members: list[dict]
    merchants: list[dict]
    programs: list[GrantProgramDocument]
    commands: list[Command] = field(default_factory=list)

    def batches(self, size_max: int = 256) -> list[list[Command]]:
        """Commands in time order, cut so that no refund shares a batch with its payment."""
        out: list[list[Command]] = []
        current: list[Command] = []
        paid: set[str] = set()
        for command in sorted(self.commands, key=_command_time):
            if len(current) >= size_max or (isinstance(command, Refund) and command.payment_id in paid):
                out.append(current)
                current, paid = [], set()
            current.append(command)
            if isinstance(command, Pay):
                paid.add(command.payment_id)
        if current:
            out.append(current)
        return out


def _command_time(command: Command) -> tuple[int, int]:
    order = {"disbursement": 0, "topup": 1, "payment": 2, "refund": 3}[command.kind]
    return command.occurred_at_us, order


def _pick(rng: random.Random, weights: dict[str, float]) -> str:
    return rng.choices(list(weights), weights=list(weights.values()))[0]


def _merchant_rows(rng: random.Random, count: int, registered_from: dt.date) -> list[dict]:
    rows = []
    for i in range(count):
        sales = int(math.exp(math.log(SALES_MEDIAN_WON) + SALES_SIGMA * rng.gauss(0, 1)))
        share = rng.choice((100, 200, 300, 500)) if rng.random() < 0.12 else 0
        rows.append({"merchant_id": f"S{i:06d}", "name": f"가맹점 {i}", "district": _pick(rng, DISTRICT_WEIGHTS),
                     "category": _pick(rng, CATEGORY_WEIGHTS), "annual_sales_won": sales,
                     "registered_from": registered_from, "flags": ["winwin"] if share else [],
                     "merchant_share_bp": share})  # as ledger.registry.merchant_flags stores them
    return rows


def _local_time_us(rng: random.Random, day: dt.date) -> int:
    """A moment of the Seoul day: lunch peak, dinner peak, or the 07–23h background."""
    draw = rng.random()
    if draw < 0.35:
        minute = rng.gauss(12.5 * 60, 45)
    elif draw < 0.65:
        minute = rng.gauss(19 * 60, 75)
    else:
        minute = rng.uniform(7 * 60, 23 * 60)
    minute = min(max(minute, 0.0), 24 * 60 - 0.01)
    return local_midnight_us(day) + int(minute * US_PER_MIN)


def _amount(rng: random.Random) -> int:
    raw = math.exp(math.log(AMOUNT_MEDIAN_WON) + AMOUNT_SIGMA * rng.gauss(0, 1))
    return min(max(int(raw // 100) * 100, AMOUNT_MIN_WON), AMOUNT_MAX_WON)


def topup(topup_id: str, member_id: str, amount_won: int, at_us: int) -> TopUp:
    body = {"topup_id": topup_id, "member_id": member_id, "amount": amount_won, "occurred_at": rfc3339(at_us)}
    return TopUp(topup_id, member_id, amount_won, at_us, request_hash("topup", body))


def pay(payment_id: str, member_id: str, merchant_id: str, amount_won: int, at_us: int) -> Pay:
    body = {"payment_id": payment_id, "member_id": member_id, "merchant_id": merchant_id, "amount": amount_won,
            "occurred_at": rfc3339(at_us)}
    return Pay(payment_id, member_id, merchant_id, amount_won, at_us, request_hash("payment", body))


def refund(refund_id: str, payment_id: str, amount_won: int, at_us: int) -> Refund:
    body = {"refund_id": refund_id, "payment_id": payment_id, "amount": amount_won, "occurred_at": rfc3339(at_us)}
    return Refund(refund_id, payment_id, amount_won, at_us, request_hash("refund", body))


def disburse(disbursement_id: str, program_id: str, member_id: str, amount_won: int, at_us: int) -> Disburse:
    body = {"disbursement_id": disbursement_id, "member_id": member_id, "amount": amount_won}
    return Disburse(disbursement_id, program_id, member_id, amount_won, at_us, request_hash("disbursement", body))


def command_plan(seed: int, start: dt.date, days: int, *, members: int = 300, merchants: int = 60,
                 payments_per_day: int = 200, topup_won: int = 500_000, grant_share: float = 0.1,
                 grant_won: int = 100_000) -> CommandPlan:
    """Members top up on the first day, a share of them get a relief grant, then pay
    every day at merchants weighted by sales; ~3% of payments are refunded later."""
    assert days >= 1 and members >= 1 and merchants >= 1
    rng = random.Random(seed)
    member_rows = [{"member_id": f"M{i:07d}", "district": _pick(rng, DISTRICT_WEIGHTS), "status": "active"}
                   for i in range(members)]
    merchant_rows = _merchant_rows(rng, merchants, start - dt.timedelta(days=30))
    weights = [max(row["annual_sales_won"], 10_000_000) for row in merchant_rows]
    end = start + dt.timedelta(days=days)
    program = demo_grant_program(start, end + dt.timedelta(days=60))
    plan = CommandPlan(member_rows, merchant_rows, [program])
    day_start = local_midnight_us(start)
    for index, member in enumerate(member_rows):
        plan.commands.append(topup(f"T-{seed}-{index}", member["member_id"], topup_won, day_start + 6 * 3_600_000_000))
        if rng.random() < grant_share:
            plan.commands.append(disburse(f"D-{seed}-{index}", program.program_id, member["member_id"], grant_won,
                                          day_start + 5 * 3_600_000_000))
    serial = 0
    for offset in range(days):
        day = start + dt.timedelta(days=offset)
        for _ in range(payments_per_day):
            member = rng.choice(member_rows)["member_id"]
            merchant = rng.choices(merchant_rows, weights=weights)[0]["merchant_id"]
            at = _local_time_us(rng, day)
            payment_id = f"P-{seed}-{serial}"
            amount = _amount(rng)
            plan.commands.append(pay(payment_id, member, merchant, amount, at))
            if rng.random() < REFUND_SHARE:
                later = at + int(rng.uniform(10, 2 * 24 * 60) * US_PER_MIN)
                part = amount if rng.random() < 0.7 else max(100, (amount // 2) // 100 * 100)
                plan.commands.append(refund(f"R-{seed}-{serial}", payment_id, part, later))
            serial += 1
    return plan


def plant_farming(plan: CommandPlan, day: dt.date, *, member_id: str = "M-FARMER", merchant_id: str = "S-COLLUDER",
                  district: str = "bupyeong") -> None:
    """A cashing-out (깡) ring: one member pays round near-cap amounts at one small
    colluding merchant in a burst, and part of it is refunded after the cashback."""
    plan.members.append({"member_id": member_id, "district": district, "status": "active"})
    plan.merchants.append({"merchant_id": merchant_id, "name": "수상한 상점", "district": district,
                           "category": "retail", "annual_sales_won": 90_000_000,
                           "registered_from": day - dt.timedelta(days=30), "flags": [], "merchant_share_bp": 0})
    start = local_midnight_us(day) + 14 * 3_600_000_000
    plan.commands.append(topup(f"T-{member_id}", member_id, 1_000_000, start - 3_600_000_000))
    for i in range(6):
        at = start + i * 3 * US_PER_MIN
        plan.commands.append(pay(f"P-{member_id}-{i}", member_id, merchant_id, 50_000, at))
    for i in range(2):
        plan.commands.append(refund(f"R-{member_id}-{i}", f"P-{member_id}-{i}", 50_000,
                                    start + (60 + i) * US_PER_MIN))


def register(conn, plan: CommandPlan, actor: str = "datagen") -> None:
    """Members, merchants and grant programs into the registry, inside the caller's
    transaction (`with engine.begin() as conn`)."""
    from ledger import registry

    for row in plan.merchants:
        registry.put_merchant(conn, actor=actor, **row)
    for row in plan.members:
        registry.put_member(conn, actor=actor, **row)
    for program in plan.programs:
        registry.create_grant_program(conn, program, actor, approved_by=actor)  # generated data: trusted


# ---------------------------------------------------------------- vectorised frames (benchmarks)


def _uniform(seed: int, stream: int) -> pl.Expr:
    """Uniform [0, 1) per row: the row index hashed with (seed, stream)."""
    return ((pl.int_range(pl.len(), dtype=pl.Int64).hash(seed * 1_000_003 + stream) // 2048).cast(pl.Float64)
            / float(MASK53))


def _normal(seed: int, stream: int) -> pl.Expr:
    """Standard normal by Box–Muller from two uniform streams."""
    u1 = _uniform(seed, stream).clip(1e-12, 1.0)
    u2 = _uniform(seed, stream + 1)
    return (-2.0 * u1.log()).sqrt() * (2.0 * math.pi * u2).cos()


def _pick_expr(u: pl.Expr, weights: dict[str, float]) -> pl.Expr:
    total = sum(weights.values())
    expr, acc = None, 0.0
    for name, weight in weights.items():
        acc += weight / total
        expr = (pl.when(u < acc).then(pl.lit(name)) if expr is None else expr.when(u < acc).then(pl.lit(name)))
    return expr.otherwise(pl.lit(next(reversed(weights))))


def merchant_frame(count: int = 150_000, seed: int = 7) -> pl.DataFrame:
    base = pl.DataFrame({"i": pl.int_range(count, dtype=pl.Int64, eager=True)})
    return base.select(
        pl.format("S{}", pl.col("i").cast(pl.String).str.zfill(6)).alias("merchant_id"),
        _pick_expr(_uniform(seed, 1), DISTRICT_WEIGHTS).alias("district"),
        _pick_expr(_uniform(seed, 2), CATEGORY_WEIGHTS).alias("category"),
        (math.log(SALES_MEDIAN_WON) + SALES_SIGMA * _normal(seed, 3)).exp().cast(pl.Int64).alias("annual_sales_won"),
        pl.when(_uniform(seed, 5) < 0.12).then((_uniform(seed, 6) * 4).cast(pl.Int64) * 100 + 100)
        .otherwise(0).cast(pl.Int64).alias("merchant_share_bp"),
    )


@dataclass(frozen=True)
class DayFrames:
    legs: pl.DataFrame  # LEGS_SCHEMA
    payments: pl.DataFrame  # payment_id, member_id, merchant_id, amount_won, occurred_at_us, cashback_won, ...
    refunds: pl.DataFrame  # refund_id, payment_id, amount_won, occurred_at_us, clawback_won, recorded_at_us


def _times(seed: int, day: dt.date) -> pl.Expr:
    pick = _uniform(seed, 20)
    minute = (pl.when(pick < 0.35).then(12.5 * 60 + 45 * _normal(seed, 21))
              .when(pick < 0.65).then(19 * 60 + 75 * _normal(seed, 23))
              .otherwise(7 * 60 + 16 * 60 * _uniform(seed, 25))).clip(0.0, 24 * 60 - 0.01)
    return pl.lit(local_midnight_us(day), pl.Int64) + (minute * US_PER_MIN).cast(pl.Int64)


def _sales_cdf(merchants: pl.DataFrame) -> pl.Series:
    weights = merchants["annual_sales_won"].clip(10_000_000, None).cast(pl.Float64)
    return (weights.cum_sum() / weights.sum()).alias("cdf")


def day_frames(day: dt.date, merchants: pl.DataFrame, *, payments: int = 1_500_000, members: int = 2_400_000,
               seed: int = 1, txn_id_start: int = 1, cdf: pl.Series | None = None) -> DayFrames:
    """One business day of approved payments, their cashback, refunds and clawbacks, as
    the ledger would hold them. Cashback: city 10% (national 40% floored, city the rest),
    2% district top-up in seo/yeonsu/michuhol, the merchant's share; merchants above
    30억 earn nothing. The monthly cap is not modelled (frames are per day)."""
    cdf = _sales_cdf(merchants) if cdf is None else cdf
    m = merchants.with_row_index("merchant_index").with_columns(pl.col("merchant_index").cast(pl.Int64))
    tag = day.strftime("%Y%m%d")
    month = day.strftime("%Y-%m")
    bd = day.isoformat()
    p = pl.DataFrame({"i": pl.int_range(payments, dtype=pl.Int64, eager=True)})
    u_m = p.select(_uniform(seed, 10)).to_series()
    p = p.with_columns(
        pl.Series("merchant_index", cdf.search_sorted(u_m).clip(0, merchants.height - 1), dtype=pl.Int64),
        ((_uniform(seed, 11) ** 1.6) * members).cast(pl.Int64).alias("member_index"),
        (((math.log(AMOUNT_MEDIAN_WON) + AMOUNT_SIGMA * _normal(seed, 12)).exp() / 100).floor().cast(pl.Int64) * 100)
        .clip(AMOUNT_MIN_WON, AMOUNT_MAX_WON).alias("amount_won"),
        _times(seed, day).alias("occurred_at_us"),
        (_uniform(seed, 30) < REFUND_SHARE).alias("refunded"),
        (_uniform(seed, 31) * 600 * US_PER_MIN / 60).cast(pl.Int64).alias("refund_delay_us"),
    ).join(m, on="merchant_index", how="left")
    p = p.with_columns(
        pl.format("P{}-{}", pl.lit(tag), pl.col("i")).alias("payment_id"),
        pl.format("M{}", pl.col("member_index").cast(pl.String).str.zfill(7)).alias("member_id"),
        (pl.col("occurred_at_us") + 40_000).alias("recorded_at_us"),
        (pl.lit(txn_id_start) + 2 * pl.col("i")).alias("txn_pay"),
        (pl.lit(txn_id_start) + 2 * pl.col("i") + 1).alias("txn_cb"),
    )
    eligible = pl.col("annual_sales_won") <= 3_000_000_000
    city_total = pl.when(eligible).then(pl.col("amount_won") * 1000 // 10_000).otherwise(0)
    p = p.with_columns(
        (city_total * 4000 // 10_000).alias("cb_national"),
        (city_total - city_total * 4000 // 10_000).alias("cb_city"),
        pl.when(eligible & pl.col("district").is_in(["seo", "yeonsu", "michuhol"]))
        .then(pl.col("amount_won") * 200 // 10_000).otherwise(0).alias("cb_district"),
        pl.when(eligible).then(pl.col("amount_won") * pl.col("merchant_share_bp") // 10_000).otherwise(0)
        .alias("cb_merchant"),
    ).with_columns(
        (pl.col("cb_national") + pl.col("cb_city") + pl.col("cb_district") + pl.col("cb_merchant")).alias("cashback_won"))
    legs = _payment_legs(p, bd, month)
    r = p.filter(pl.col("refunded")).with_columns(
        pl.format("R{}-{}", pl.lit(tag), pl.col("i")).alias("refund_id"),
        (pl.col("occurred_at_us") + pl.col("refund_delay_us")).alias("refund_at_us"),
        (pl.lit(txn_id_start + 2 * payments) + 2 * pl.col("i")).alias("txn_ref"),
        (pl.lit(txn_id_start + 2 * payments) + 2 * pl.col("i") + 1).alias("txn_claw"),
    ).with_columns(pl.col("refund_at_us").clip(None, local_midnight_us(day) + US_PER_DAY - 1))
    legs = pl.concat([legs, _refund_legs(r, bd, month)], how="vertical")
    payments_df = p.select("payment_id", "member_id", "merchant_id", "amount_won", "occurred_at_us",
                           pl.lit(bd).alias("business_date"), "cashback_won",
                           pl.when(pl.col("refunded")).then(pl.col("amount_won")).otherwise(0).alias("refunded_won"),
                           "recorded_at_us")
    refunds_df = r.select("refund_id", "payment_id", "amount_won", pl.col("refund_at_us").alias("occurred_at_us"),
                          pl.col("cashback_won").alias("clawback_won"),
                          (pl.col("refund_at_us") + 40_000).alias("recorded_at_us"))
    return DayFrames(legs, payments_df, refunds_df)


def _leg(df: pl.DataFrame, txn: str, kind: str, account: pl.Expr, amount: pl.Expr, bd: str,
         at: str = "recorded_at_us") -> pl.DataFrame:
    return df.select(
        pl.col(txn).alias("txn_id"), pl.lit(kind).cast(KIND).alias("kind"), "member_id", "merchant_id",
        pl.lit(bd).alias("business_date"), pl.col(at).alias("recorded_at_us"),
        account.alias("account_id"), amount.alias("amount_won"),
    ).filter(pl.col("amount_won") != 0)


def _payment_legs(p: pl.DataFrame, bd: str, month: str) -> pl.DataFrame:
    a = pl.col("amount_won")
    mid, mem = pl.col("merchant_id"), pl.col("member_id")
    cb = p.filter(pl.col("cashback_won") > 0)
    parts = [
        _leg(p, "txn_pay", "payment", pl.format("merchant/{}/payable", mid), -a, bd),
        _leg(p, "txn_pay", "payment", pl.format("member/{}/charged", mem), a, bd),
        _leg(cb, "txn_cb", "cashback", pl.lit(f"funder/national/{month}"), pl.col("cb_national"), bd),
        _leg(cb, "txn_cb", "cashback", pl.lit(f"funder/city/{month}"), pl.col("cb_city"), bd),
        _leg(cb, "txn_cb", "cashback", pl.format("funder/{}/" + month, pl.col("district")), pl.col("cb_district"), bd),
        _leg(cb, "txn_cb", "cashback", pl.lit(f"funder/merchant/{month}"), pl.col("cb_merchant"), bd),
        _leg(cb, "txn_cb", "cashback", pl.format("member/{}/points", mem), -pl.col("cashback_won"), bd),
    ]
    return pl.concat(parts, how="vertical").cast(LEGS_SCHEMA)


def _refund_legs(r: pl.DataFrame, bd: str, month: str) -> pl.DataFrame:
    a = pl.col("amount_won")
    mid, mem = pl.col("merchant_id"), pl.col("member_id")
    r = r.with_columns((pl.col("refund_at_us") + 40_000).alias("refund_recorded_us"))
    cb = r.filter(pl.col("cashback_won") > 0)
    at = "refund_recorded_us"
    parts = [
        _leg(r, "txn_ref", "refund", pl.format("merchant/{}/payable", mid), a, bd, at),
        _leg(r, "txn_ref", "refund", pl.format("member/{}/charged", mem), -a, bd, at),
        _leg(cb, "txn_claw", "clawback", pl.lit(f"funder/national/{month}"), -pl.col("cb_national"), bd, at),
        _leg(cb, "txn_claw", "clawback", pl.lit(f"funder/city/{month}"), -pl.col("cb_city"), bd, at),
        _leg(cb, "txn_claw", "clawback", pl.format("funder/{}/" + month, pl.col("district")), -pl.col("cb_district"),
             bd, at),
        _leg(cb, "txn_claw", "clawback", pl.lit(f"funder/merchant/{month}"), -pl.col("cb_merchant"), bd, at),
        _leg(cb, "txn_claw", "clawback", pl.format("member/{}/points", mem), pl.col("cashback_won"), bd, at),
    ]
    return pl.concat(parts, how="vertical").cast(LEGS_SCHEMA)


def clearing_frame(payments: pl.DataFrame) -> pl.DataFrame:
    """The card network's clearing rows for approved payments (the documented CSV columns)."""
    return payments.select(
        pl.lit("P").alias("record_type"), pl.col("payment_id").alias("approval_id"), "merchant_id",
        "amount_won", pl.col("occurred_at_us").alias("transacted_at_us"))
