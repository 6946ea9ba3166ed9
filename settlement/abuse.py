"""Cashing-out (깡) and cashback-farming report: members and merchants whose pattern looks
like farming, ranked, each with its reasons and the money at stake.

Signals (thresholds in `AbuseConfig`; each firing signal adds its weight to the score):
  members
  - near_cap_concentrated: monthly spend near the cashback cap, most of it at one merchant
  - pay_then_refund: payments that earned cashback and were refunded
  - round_amounts: many large round amounts (multiples of 10,000 won)
  - burst: several payments at one merchant within minutes
  merchants
  - few_customers: most of the sales come from a handful of members
  - round_amounts, refunds: as above, over the merchant's sales
  - farming_customers: members flagged above spend mostly here
  - over_declared_sales: the period's sales, annualised, far above the declared annual sales
Money at stake: the cashback the payments hold now, after their refunds' clawbacks and
any correction that re-based them (as the funders' accounts have it) — for a member on
all its payments, for a merchant on the payments made there.
"""

from __future__ import annotations

from dataclasses import dataclass

import polars as pl

MINUTE_US = 60_000_000


@dataclass(frozen=True)
class AbuseConfig:
    # The monthly eligible spend that earns cashback (2025-09: 30만); None: no cap, so no
    # spend is near it. The reports take the city policy's in force (`report._abuse_config`).
    cap_spend_won: int | None = 300_000
    near_cap_bp: int = 9_000  # spend >= 90% of the cap
    concentration_bp: int = 8_000  # >= 80% at the top merchant
    refund_ratio_bp: int = 2_500
    refunds_min: int = 2
    round_unit_won: int = 10_000
    round_min_won: int = 30_000
    round_share_bp: int = 6_000
    round_count_min: int = 3
    burst_payments: int = 4
    burst_window_us: int = 30 * MINUTE_US
    merchant_top_members: int = 3
    merchant_top_share_bp: int = 7_000
    merchant_sales_min_won: int = 300_000
    over_declared_factor: int = 3
    period_days: int = 30
    rows_max: int = 200


WEIGHTS = {"near_cap_concentrated": 3.0, "pay_then_refund": 2.0, "round_amounts": 1.5, "burst": 1.5,
           "few_customers": 2.0, "refunds": 1.5, "farming_customers": 3.0, "over_declared_sales": 1.0}

PAYMENTS_SCHEMA = {"payment_id": pl.String, "member_id": pl.String, "merchant_id": pl.String,
                   "amount_won": pl.Int64, "occurred_at_us": pl.Int64, "cashback_won": pl.Int64}
# Optional in `payments`: what a payment holds of its cashback now, after refunds and
# corrections (`ledger.book.cashback_held`); null or absent: `cashback_won` less its
# refunds' clawbacks (a payment no correction re-based: corrections leave `cashback_won`).
HELD_COLUMN = "held_won"
REFUNDS_SCHEMA = {"refund_id": pl.String, "payment_id": pl.String, "amount_won": pl.Int64,
                  "occurred_at_us": pl.Int64, "clawback_won": pl.Int64}


@dataclass(frozen=True)
class AbuseReport:
    members: pl.DataFrame
    merchants: pl.DataFrame


def _reasons(flags: dict[str, pl.Expr], texts: dict[str, pl.Expr]) -> tuple[pl.Expr, pl.Expr]:
    score = pl.sum_horizontal([pl.when(flag).then(pl.lit(WEIGHTS[name])).otherwise(0.0)
                               for name, flag in flags.items()])
    reasons = pl.concat_list([pl.when(flag).then(texts[name]).otherwise(pl.lit(None, pl.String))
                              for name, flag in flags.items()]).list.drop_nulls().list.join("; ")
    return score, reasons


def _pct(numerator: pl.Expr, denominator: pl.Expr) -> pl.Expr:
    """Whole percent, floored (display only)."""
    return (numerator * 100 // pl.when(denominator == 0).then(1).otherwise(denominator)).cast(pl.String) + "%"


def report(payments: pl.DataFrame, refunds: pl.DataFrame, merchants: pl.DataFrame | None = None,
           config: AbuseConfig = AbuseConfig()) -> AbuseReport:
    """`payments`: approved payments of the period (PAYMENTS_SCHEMA); `refunds`: their refunds."""
    return report_prepared(prepare(payments, refunds, config), merchants, config)


COUNT_COLUMNS = ("payments", "round_payments", "refunded", "refunded_after_cashback")
PAIR_SUMS = ("payments", "spend_won", "round_payments", "refunded", "refunded_after_cashback", "held_won")


def prepare(payments: pl.DataFrame, refunds: pl.DataFrame, config: AbuseConfig = AbuseConfig()) -> pl.DataFrame:
    """Per (member, merchant) sums of a chunk of payments (a day, or the whole period),
    refunds folded in. A month is the concatenation of its days' chunks: nothing holds
    20 million payments at once. Bursts are found within a chunk (so a burst across
    midnight in day chunks is missed)."""
    c = config
    claw = (refunds.lazy().group_by("payment_id")
            .agg(pl.col("amount_won").sum().alias("refunded_won"), pl.col("clawback_won").sum().alias("claw_won")))
    held = pl.col(HELD_COLUMN) if HELD_COLUMN in payments.columns else pl.lit(None, pl.Int64).alias(HELD_COLUMN)
    p = (payments.lazy().select(*PAYMENTS_SCHEMA, held).join(claw, on="payment_id", how="left")
         .with_columns(pl.col("refunded_won").fill_null(0), pl.col("claw_won").fill_null(0))
         .with_columns(pl.coalesce(HELD_COLUMN, pl.col("cashback_won") - pl.col("claw_won")).alias(HELD_COLUMN)))
    burst = (p.select("member_id", "merchant_id", "occurred_at_us").sort("member_id", "merchant_id", "occurred_at_us")
             .with_columns((pl.col("occurred_at_us") - pl.col("occurred_at_us").shift(c.burst_payments - 1))
                           .alias("span_us"),
                           ((pl.col("member_id") == pl.col("member_id").shift(c.burst_payments - 1))
                            & (pl.col("merchant_id") == pl.col("merchant_id").shift(c.burst_payments - 1)))
                           .alias("same"))
             .filter(pl.col("same") & (pl.col("span_us") <= c.burst_window_us))
             .select("member_id", "merchant_id").unique().with_columns(pl.lit(True).alias("burst")))
    refunded = pl.col("refunded_won") > 0
    pairs = p.group_by("member_id", "merchant_id").agg(
        pl.len().cast(pl.Int64).alias("payments"), pl.col("amount_won").sum().alias("spend_won"),
        ((pl.col("amount_won") % c.round_unit_won == 0) & (pl.col("amount_won") >= c.round_min_won))
        .sum().cast(pl.Int64).alias("round_payments"),
        refunded.sum().cast(pl.Int64).alias("refunded"),
        # Earned cashback: when paid, or from a correction (held now or clawed back since).
        (refunded & ((pl.col("cashback_won") > 0) | (pl.col(HELD_COLUMN) + pl.col("claw_won") > 0)))
        .sum().cast(pl.Int64).alias("refunded_after_cashback"),
        pl.col(HELD_COLUMN).sum())
    out = pairs.join(burst, on=["member_id", "merchant_id"], how="left").with_columns(pl.col("burst").fill_null(False))
    # Ids as Categorical and counts as Int32: a month of day chunks stays small.
    return out.with_columns(pl.col("member_id", "merchant_id").cast(pl.Categorical),
                            pl.col(COUNT_COLUMNS).cast(pl.Int32)).collect()


def report_prepared(chunks: pl.DataFrame | pl.LazyFrame, merchants: pl.DataFrame | None = None,
                    config: AbuseConfig = AbuseConfig()) -> AbuseReport:
    """`chunks`: `prepare` outputs concatenated (or scanned from Parquet files)."""
    c = config
    src = chunks.lazy()
    sums = [pl.col(x).cast(pl.Int64).sum() for x in PAIR_SUMS]
    # Per member and per merchant straight from the chunks (small results); only the
    # spend is carried at the (member, merchant) level, for the top merchant of each
    # member and the top members of each merchant: a month stays within memory.
    by_member, by_merchant, pair_df = pl.collect_all(
        [src.group_by("member_id").agg(*sums, pl.col("burst").any()),
         src.group_by("merchant_id").agg(*sums),
         src.select("member_id", "merchant_id", "spend_won").group_by("member_id", "merchant_id")
         .agg(pl.col("spend_won").sum())], engine="streaming")
    pair = pair_df.lazy()
    top = pair.group_by("member_id").agg(
        pl.col("merchant_id").get(pl.col("spend_won").arg_max()).alias("top_merchant_id"),
        pl.col("spend_won").max().alias("top_spend_won"))
    members = (by_member.lazy().join(top, on="member_id", how="left")
               .with_columns(pl.col(HELD_COLUMN).alias("money_at_stake_won"))
               .with_columns(pl.col("member_id", "top_merchant_id").cast(pl.String)))
    mflags = {
        "near_cap_concentrated": (pl.lit(c.cap_spend_won is not None)
                                  & (pl.col("spend_won") * 10_000 >= (c.cap_spend_won or 0) * c.near_cap_bp))
        & (pl.col("top_spend_won") * 10_000 >= pl.col("spend_won") * c.concentration_bp),
        "pay_then_refund": (pl.col("refunded_after_cashback") >= c.refunds_min)
        & (pl.col("refunded_after_cashback") * 10_000 >= pl.col("payments") * c.refund_ratio_bp),
        "round_amounts": (pl.col("round_payments") >= c.round_count_min)
        & (pl.col("round_payments") * 10_000 >= pl.col("payments") * c.round_share_bp),
        "burst": pl.col("burst"),
    }
    mtexts = {
        "near_cap_concentrated": pl.format("spent {} won, near the {} cap, {} at {}", pl.col("spend_won"),
                                           pl.lit(c.cap_spend_won), _pct(pl.col("top_spend_won"), pl.col("spend_won")),
                                           pl.col("top_merchant_id")),
        "pay_then_refund": pl.format("{} payments refunded after earning cashback", pl.col("refunded_after_cashback")),
        "round_amounts": pl.format("{} of {} payments are round amounts", pl.col("round_payments"),
                                   pl.col("payments")),
        "burst": pl.format("{}+ payments within {} min at one merchant", pl.lit(c.burst_payments),
                           pl.lit(c.burst_window_us // MINUTE_US)),
    }
    score, reasons = _reasons(mflags, mtexts)
    members = (members.with_columns(score.alias("score"), reasons.alias("reasons"),
                                    mflags["near_cap_concentrated"].alias("_farming"))
               .filter(pl.col("score") > 0))
    farming_at = (members.filter(pl.col("_farming")).group_by("top_merchant_id")
                  .agg(pl.len().cast(pl.Int64).alias("farming_customers")).rename({"top_merchant_id": "merchant_id"}))
    merchants_out = _merchants(by_merchant.lazy(), pair, farming_at, merchants, c)
    member_cols = ["rank", "member_id", "score", "reasons", "money_at_stake_won", "payments", "spend_won",
                   "top_merchant_id", "top_spend_won", "refunded_after_cashback", "round_payments"]
    members_df, merchants_df = pl.collect_all([_rank(members, "member_id").select(member_cols).head(c.rows_max),
                                               merchants_out.head(c.rows_max)])
    counts = pl.selectors.unsigned_integer()
    return AbuseReport(members_df.with_columns(counts.cast(pl.Int64)), merchants_df.with_columns(counts.cast(pl.Int64)))


def _rank(frame: pl.LazyFrame, key: str) -> pl.LazyFrame:
    return (frame.sort(["score", "money_at_stake_won", key], descending=[True, True, False])
            .with_row_index("rank", offset=1).with_columns(pl.col("rank").cast(pl.Int64)))


def _merchants(by_merchant: pl.LazyFrame, pair: pl.LazyFrame, farming_at: pl.LazyFrame,
               registry: pl.DataFrame | None, c: AbuseConfig) -> pl.LazyFrame:
    customers = pair.group_by("merchant_id").agg(
        pl.col("spend_won").top_k(c.merchant_top_members).sum().alias("top_members_won"),
        pl.len().cast(pl.Int64).alias("customers"))
    m = (by_merchant.join(customers, on="merchant_id", how="left").select(
        "merchant_id", "payments", pl.col("spend_won").alias("sales_won"),
        pl.col(HELD_COLUMN).alias("money_at_stake_won"),
        pl.col("refunded").alias("refunds"), "round_payments", "top_members_won", "customers")
        .with_columns(pl.col("merchant_id").cast(pl.String)))
    m = m.join(farming_at, on="merchant_id", how="left").with_columns(
        pl.col("farming_customers").fill_null(0).cast(pl.Int64))
    if registry is not None:
        m = m.join(registry.lazy().select("merchant_id", "annual_sales_won"), on="merchant_id", how="left")
    else:
        m = m.with_columns(pl.lit(None, pl.Int64).alias("annual_sales_won"))
    annualised = pl.col("sales_won") * 365 // c.period_days
    flags = {
        "few_customers": (pl.col("sales_won") >= c.merchant_sales_min_won)
        & (pl.col("top_members_won") * 10_000 >= pl.col("sales_won") * c.merchant_top_share_bp),
        "round_amounts": (pl.col("round_payments") >= c.round_count_min)
        & (pl.col("round_payments") * 10_000 >= pl.col("payments") * c.round_share_bp),
        "refunds": (pl.col("refunds") >= c.refunds_min)
        & (pl.col("refunds") * 10_000 >= pl.col("payments") * c.refund_ratio_bp),
        "farming_customers": pl.col("farming_customers") >= 1,
        "over_declared_sales": (pl.col("annual_sales_won").is_not_null()
                                & (annualised > pl.col("annual_sales_won") * c.over_declared_factor)).fill_null(False),
    }
    texts = {
        "few_customers": pl.format("top {} of {} customers bring {} of sales", pl.lit(c.merchant_top_members),
                                   pl.col("customers"), _pct(pl.col("top_members_won"), pl.col("sales_won"))),
        "round_amounts": pl.format("{} of {} payments are round amounts", pl.col("round_payments"),
                                   pl.col("payments")),
        "refunds": pl.format("{} of {} payments refunded", pl.col("refunds"), pl.col("payments")),
        "farming_customers": pl.format("{} near-cap member(s) spend mostly here", pl.col("farming_customers")),
        "over_declared_sales": pl.format("sales annualised {} won vs {} declared", annualised,
                                         pl.col("annual_sales_won")),
    }
    score, reasons = _reasons(flags, texts)
    cols = ["rank", "merchant_id", "score", "reasons", "money_at_stake_won", "payments", "sales_won", "customers",
            "refunds", "round_payments", "farming_customers"]
    return _rank(m.with_columns(score.alias("score"), reasons.alias("reasons")).filter(pl.col("score") > 0),
                 "merchant_id").select(cols)
