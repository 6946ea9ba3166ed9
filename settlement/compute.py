"""Settlement arithmetic on polars frames: pure functions, no database, no clock.

Input is the ledger legs a run covers, each with its transaction's attributes
(`LEGS_SCHEMA`; `recorded_at_us` may be left out, nothing here reads it), plus the
merchant registry. Output is a `Computation`: merchant payout rows, cashback and grant
flows per funder and district, the operator's cash in (top-ups) and out (withdrawals),
the trial balance by account class, and totals.
`checks` compares a computation with the ledger's own account movements, computed
elsewhere (SQL in the database, or `movements_from_legs`).

Money is Int64 won throughout. The only division is the fee:
  fee_won = floor(net_sales × fee_bp / 10000)
floored (toward −∞), never in the operator's favour: a sales day's fee is rounded down,
a net-refund day's credit up, so the fees of any run of days add up to no more than the
fee on their net sales together (a sale refunded whole over later days costs no fee;
floored toward zero it had cost 1 won, the refund audit).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field

import polars as pl

from ledger.accounts import LOT_NAME
from settlement.config import BP_WHOLE, SettlementConfig

# The ledger's transaction kinds as known today; the column is Categorical so that a kind
# added to the book later (grant_expiry and correction were) never breaks a run.
KINDS = ("topup", "payment", "cashback", "refund", "clawback", "grant", "grant_expiry", "correction", "withdrawal")
KIND = pl.Categorical()
CLASSES = ("merchant_payable", "funder_merchant", "funder_public", "grantfund", "member_charged",
           "member_points", "member_grant", "receivable", "operator_cash", "other")
CLASS = pl.Enum(CLASSES)

LEGS_SCHEMA = {
    "txn_id": pl.Int64,
    "kind": KIND,
    "member_id": pl.String,
    "merchant_id": pl.String,
    "business_date": pl.String,
    "recorded_at_us": pl.Int64,
    "account_id": pl.String,
    "amount_won": pl.Int64,
}
MERCHANTS_SCHEMA = {
    "merchant_id": pl.String,
    "district": pl.String,
    "category": pl.String,
    "annual_sales_won": pl.Int64,
}
PAYOUT_COLUMNS = ("for_business_date", "merchant_id", "kind", "payment_count", "refund_count", "sales_won",
                  "refunds_won", "net_sales_won", "fee_bp", "fee_won", "merchant_share_won", "net_payable_won",
                  "payout_date")
MONEY_COLUMNS = ("sales_won", "refunds_won", "net_sales_won", "fee_won", "merchant_share_won", "net_payable_won")
UNKNOWN_DISTRICT = "unknown"
OPERATOR_CASH_SCHEMA = {"for_business_date": pl.String, "topped_up_won": pl.Int64, "withdrawn_won": pl.Int64,
                        "operator_cash_net_won": pl.Int64}


def account_class() -> pl.Expr:
    """The class of a ledger account, from its name (see ledger/accounts.py): a grant lot
    by the name's parts (`LOT_NAME`), as a member may be called "grant".

    Each branch yields a `CLASS` literal, so the column is built as Enum codes; string
    literals cast to the Enum afterwards cost twice as much (a hash per row, ~8 million
    rows a day)."""
    a = pl.col("account_id")
    member = a.str.starts_with("member/")

    def c(name: str) -> pl.Expr:
        return pl.lit(name, dtype=CLASS)

    return (
        pl.when(a.str.starts_with("merchant/")).then(c("merchant_payable"))
        .when(a.str.starts_with("funder/merchant/")).then(c("funder_merchant"))
        .when(a.str.starts_with("funder/")).then(c("funder_public"))
        .when(a.str.starts_with("grantfund/")).then(c("grantfund"))
        .when(member & a.str.contains(LOT_NAME)).then(c("member_grant"))
        .when(member & a.str.ends_with("/charged")).then(c("member_charged"))
        .when(member & a.str.ends_with("/points")).then(c("member_points"))
        .when(a.str.starts_with("receivable/")).then(c("receivable"))
        .when(a == "operator/cash").then(c("operator_cash"))
        .otherwise(c("other"))
    )


def fee_bp_expr(config: SettlementConfig, sales: pl.Expr, day: pl.Expr) -> pl.Expr:
    """The fee tier's bp for a merchant's annual `sales` on business date `day` (text,
    YYYY-MM-DD), by the schedule in force that day; unknown sales (null) pay the last tier."""

    def tiered(tiers) -> pl.Expr:
        *bounded, last = tiers
        if not bounded:
            return pl.lit(last.fee_bp)
        expr = pl.when(sales <= bounded[0].sales_max_won).then(pl.lit(bounded[0].fee_bp))
        for tier in bounded[1:]:
            expr = expr.when(sales <= tier.sales_max_won).then(pl.lit(tier.fee_bp))
        return expr.otherwise(pl.lit(last.fee_bp))

    *later, first = reversed(config.schedules)
    if not later:
        return tiered(first.tiers).cast(pl.Int64)
    expr = pl.when(day >= pl.lit(later[0].from_date.isoformat())).then(tiered(later[0].tiers))
    for schedule in later[1:]:
        expr = expr.when(day >= pl.lit(schedule.from_date.isoformat())).then(tiered(schedule.tiers))
    return expr.otherwise(tiered(first.tiers)).cast(pl.Int64)


def fee_won_expr(net: pl.Expr, bp: pl.Expr) -> pl.Expr:
    """floor(net × bp / 10000), toward −∞ (polars' integer `//`, as Python's): never in
    the operator's favour, on a sales day or a net-refund day."""
    return net * bp // BP_WHOLE


@dataclass(frozen=True)
class Computation:
    payouts: pl.DataFrame  # PAYOUT_COLUMNS, one row per (for_business_date, merchant)
    funders: pl.DataFrame  # for_business_date, month (the budget's), source, district, cashback_*_won
    grants: pl.DataFrame  # for_business_date, program_id, district, disbursed/spent/restored/returned_to_funders
    classes: pl.DataFrame  # for_business_date, class, amount_won (Σ debit-positive legs)
    txn_counts: pl.DataFrame  # for_business_date, txn_count, txn_id_max
    unbalanced_txn_ids: list[int]
    unregistered_merchants: list[str]
    # merchant-funded cashback moved by transactions with no merchant (a correction line
    # posted before migration 0014, without its payments; later lines post the merchant
    # part with its merchant): reported beside the payouts, not charged to any merchant's payout
    unattributed_share: pl.DataFrame = field(default_factory=lambda: pl.DataFrame(
        schema={"for_business_date": pl.String, "merchant_share_won": pl.Int64}))
    # for_business_date, program_id, source, grant_funded_won, grant_returned_won, grant_net_won:
    # what each funder put into each grant program, and what came back to it
    grant_funders: pl.DataFrame = field(default_factory=lambda: pl.DataFrame(
        schema={"for_business_date": pl.String, "program_id": pl.String, "source": pl.String,
                "grant_funded_won": pl.Int64, "grant_returned_won": pl.Int64, "grant_net_won": pl.Int64}))
    # for_business_date, topped_up_won, withdrawn_won, operator_cash_net_won: the operator's
    # cash held for members' charged money, in by top-ups and out by withdrawals
    operator_cash: pl.DataFrame = field(default_factory=lambda: pl.DataFrame(schema=OPERATOR_CASH_SCHEMA))
    totals: dict = field(default_factory=dict)


def compute(legs: pl.DataFrame, merchants: pl.DataFrame, *, config: SettlementConfig, payout_date: dt.date,
            primary_date: str, primary_kind: str = "day",
            member_districts: pl.DataFrame | None = None) -> Computation:
    """Settle the legs a run covers. Rows for `primary_date` get `primary_kind`; rows of
    any other business date are late events (`adjustment`)."""
    lf = legs.lazy()
    if "class" not in legs.columns:  # a run's read classifies the legs as they arrive
        lf = lf.with_columns(account_class().alias("class"))
    classes = (lf.group_by("business_date", "class").agg(pl.col("amount_won").sum())
               .rename({"business_date": "for_business_date"}).sort("for_business_date", "class"))
    txn_sums = transaction_sums(legs)
    unbalanced = txn_sums.filter(pl.col("s") != 0).select("txn_id").head(20)
    txn_counts = (txn_sums.group_by("business_date")
                  .agg(pl.len().cast(pl.Int64).alias("txn_count"), pl.col("txn_id").max().alias("txn_id_max"))
                  .rename({"business_date": "for_business_date"}).sort("for_business_date"))
    m = merchants.lazy().select("merchant_id", "district", "annual_sales_won")

    payouts = _payouts(lf, m, config, payout_date, primary_date, primary_kind)
    funders = _funders(lf, m)
    grants = _grants(lf, m, member_districts)
    unattributed = (lf.filter((pl.col("class") == "funder_merchant") & pl.col("merchant_id").is_null())
                    .group_by("business_date").agg(pl.col("amount_won").sum().alias("merchant_share_won"))
                    .rename({"business_date": "for_business_date"}))
    grant_funders = _grant_funders(lf)
    operator_cash = _operator_cash(lf)
    (classes_df, unbalanced_df, counts_df, payouts_df, funders_df, grants_df, unattributed_df,
     grant_funders_df, operator_cash_df) = pl.collect_all(
        [classes, unbalanced, txn_counts, payouts, funders, grants, unattributed, grant_funders, operator_cash])
    unregistered = payouts_df.filter(pl.col("fee_bp").is_null())["merchant_id"].head(20).to_list()
    payouts_df = payouts_df.with_columns(pl.col("fee_bp").fill_null(
        fee_bp_expr(config, pl.lit(None, pl.Int64), pl.col("for_business_date"))))
    comp = Computation(payouts_df, funders_df, grants_df, classes_df, counts_df,
                       unbalanced_df["txn_id"].to_list(), unregistered, unattributed_df, grant_funders_df,
                       operator_cash_df)
    return Computation(**{**comp.__dict__, "totals": totals(comp)})


def transaction_sums(legs: pl.DataFrame) -> pl.LazyFrame:
    """(txn_id, s = Σ its legs, business_date): one row per transaction, exact.

    The legs a run reads come in txn_id order (`settlement.ledger_read.join_covered`).
    Then each transaction is a run of rows, and its sum is the difference of the running
    total at the end of its run and at the end of the previous run: one pass, no hash
    table over ~3 million ids (the group-by was ~40% of a day's computation). Legs in
    any other order are grouped by id. Both give the same rows (tests/test_settlement_compute.py).
    A transaction has one business date: its first leg's."""
    if legs.height and legs["txn_id"].is_sorted():
        txn = pl.col("txn_id")
        ends = legs.lazy().select(
            "txn_id", "business_date", pl.col("amount_won").cum_sum().alias("running"),
            (txn != txn.shift(-1)).fill_null(True).alias("end"))
        return (ends.filter("end")
                .select("txn_id", pl.col("running").diff().fill_null(pl.col("running")).alias("s"), "business_date"))
    return legs.lazy().group_by("txn_id").agg(pl.col("amount_won").sum().alias("s"), pl.col("business_date").first())


def _payouts(lf: pl.LazyFrame, merchants: pl.LazyFrame, config: SettlementConfig, payout_date: dt.date,
             primary_date: str, primary_kind: str) -> pl.LazyFrame:
    kind, amount = pl.col("kind"), pl.col("amount_won")
    sales_legs = lf.filter(pl.col("class") == "merchant_payable").with_columns(
        pl.col("account_id").str.strip_prefix("merchant/").str.strip_suffix("/payable").alias("merchant_id"))
    sales = sales_legs.group_by("business_date", "merchant_id").agg(
        (kind == "payment").sum().cast(pl.Int64).alias("payment_count"),
        (kind == "refund").sum().cast(pl.Int64).alias("refund_count"),
        (-amount).filter(kind == "payment").sum().alias("sales_won"),
        amount.filter(kind == "refund").sum().alias("refunds_won"),
        (-amount).sum().alias("net_sales_won"),
    )
    share = (lf.filter((pl.col("class") == "funder_merchant") & pl.col("merchant_id").is_not_null())
             .group_by("business_date", "merchant_id").agg(amount.sum().alias("merchant_share_won")))
    zero = pl.lit(0, pl.Int64)
    out = (sales.join(share, on=["business_date", "merchant_id"], how="full", coalesce=True)
           .with_columns(pl.col(c).fill_null(zero) for c in
                         ("payment_count", "refund_count", "sales_won", "refunds_won", "net_sales_won",
                          "merchant_share_won"))
           .join(merchants, on="merchant_id", how="left")
           .with_columns(fee_bp_expr(config, pl.col("annual_sales_won"), pl.col("business_date")).alias("fee_bp")))
    out = out.with_columns(
        pl.when(pl.col("annual_sales_won").is_null()).then(None).otherwise(pl.col("fee_bp")).alias("fee_bp"))
    out = out.with_columns(fee_won_expr(pl.col("net_sales_won"), pl.col("fee_bp").fill_null(0)).alias("fee_won"))
    return (out.with_columns(
        (pl.col("net_sales_won") - pl.col("fee_won") - pl.col("merchant_share_won")).alias("net_payable_won"),
        pl.when(pl.col("business_date") == primary_date).then(pl.lit(primary_kind))
        .otherwise(pl.lit("adjustment")).alias("kind"),
        pl.lit(payout_date.isoformat()).alias("payout_date"),
    ).rename({"business_date": "for_business_date"})
        .select(*PAYOUT_COLUMNS)
        .sort("for_business_date", "merchant_id"))


def _funders(lf: pl.LazyFrame, merchants: pl.LazyFrame) -> pl.LazyFrame:
    kind, amount = pl.col("kind"), pl.col("amount_won")
    legs = (lf.filter(pl.col("class").is_in(["funder_public", "funder_merchant"]))
            .with_columns(pl.col("account_id").str.strip_prefix("funder/").str.head(-8).alias("source"),
                          pl.col("account_id").str.tail(7).alias("month"))
            .join(merchants.select("merchant_id", "district"), on="merchant_id", how="left")
            .with_columns(pl.col("district").fill_null(UNKNOWN_DISTRICT)))
    # `month`: the budget month the cashback counts against (its funder account's), which
    # for a refund's clawback is its payment's month, not the refund's date
    return (legs.group_by("business_date", "month", "source", "district").agg(
        amount.filter(kind == "cashback").sum().alias("cashback_accrued_won"),
        (-amount).filter(kind == "clawback").sum().alias("cashback_clawed_back_won"),
        amount.filter(kind == "correction").sum().alias("cashback_corrected_won"),
        amount.sum().alias("cashback_net_won"),
    ).rename({"business_date": "for_business_date"}).sort("for_business_date", "month", "source", "district"))


def _grants(lf: pl.LazyFrame, merchants: pl.LazyFrame, member_districts: pl.DataFrame | None) -> pl.LazyFrame:
    kind, amount = pl.col("kind"), pl.col("amount_won")
    # Funders' legs of a disbursement feed no figure here (disbursed is read on the lots),
    # and a bulk disbursement's (ledger/bulk.py) has no member: left out. A bulk lot leg
    # names its member in the account, not in the transaction.
    legs = lf.filter(pl.col("class").is_in(["member_grant", "grantfund"])
                     & ~((pl.col("class") == "grantfund") & (kind == "grant"))).with_columns(
        pl.when(pl.col("class") == "member_grant")
        .then(pl.col("account_id").str.split("/").list.get(3))
        .otherwise(pl.col("account_id").str.split("/").list.get(1)).alias("program_id"),
        pl.when(pl.col("class") == "member_grant")  # (a NULL can arrive as "" through COPY)
        .then(pl.col("account_id").str.split("/").list.get(1))
        .otherwise(pl.col("member_id")).alias("member_id"))
    legs = legs.join(merchants.select("merchant_id", pl.col("district").alias("merchant_district")),
                     on="merchant_id", how="left")
    if member_districts is not None:
        legs = legs.join(member_districts.lazy().select("member_id", pl.col("district").alias("member_district")),
                         on="member_id", how="left")
    else:
        legs = legs.with_columns(pl.lit(None, pl.String).alias("member_district"))
    legs = legs.with_columns(
        pl.coalesce("merchant_district", "member_district", pl.lit(UNKNOWN_DISTRICT)).alias("district"))
    member, fund = pl.col("class") == "member_grant", pl.col("class") == "grantfund"
    return (legs.group_by("business_date", "program_id", "district").agg(
        (-amount).filter(member & (kind == "grant")).sum().alias("disbursed_won"),
        amount.filter(member & (kind == "payment")).sum().alias("spent_won"),
        # net of what a refund's clawback kept back from the grant money it restored
        (-amount).filter(member & kind.is_in(["refund", "clawback"])).sum().alias("restored_won"),
        amount.filter(member & (kind == "grant_expiry")).sum().alias("expired_won"),
        (-amount).filter(fund & kind.is_in(["refund", "grant_expiry"])).sum().alias("returned_to_funders_won"),
    ).rename({"business_date": "for_business_date"}).sort("for_business_date", "program_id", "district"))


def _grant_funders(lf: pl.LazyFrame) -> pl.LazyFrame:
    """Each funder's money in each grant program (`grantfund/{program}/{source}`): put in
    by disbursements (a bulk chunk's funder legs included), returned by expiries and by
    refunds of grant money spent after its program ended."""
    kind, amount = pl.col("kind"), pl.col("amount_won")
    legs = (lf.filter(pl.col("class") == "grantfund")
            .with_columns(pl.col("account_id").str.split("/").alias("_parts"))
            .with_columns(pl.col("_parts").list.get(1).alias("program_id"),
                          pl.col("_parts").list.get(2).alias("source")))
    return (legs.group_by("business_date", "program_id", "source").agg(
        amount.filter(kind == "grant").sum().alias("grant_funded_won"),
        (-amount).filter(kind != "grant").sum().alias("grant_returned_won"),
        amount.sum().alias("grant_net_won"),
    ).rename({"business_date": "for_business_date"}).sort("for_business_date", "program_id", "source"))


def _operator_cash(lf: pl.LazyFrame) -> pl.LazyFrame:
    """The operator's cash held for members' charged money (`operator/cash`), per business
    date: what top-ups brought in, what withdrawals paid back to members, and the account's
    whole movement (which the checks hold to the ledger's; a kind added later that moves
    it shows as the net differing from top-ups less withdrawals, as `cashback_net_won`
    holds what the named kinds do not)."""
    kind, amount = pl.col("kind"), pl.col("amount_won")
    return (lf.filter(pl.col("class") == "operator_cash").group_by("business_date").agg(
        amount.filter(kind == "topup").sum().alias("topped_up_won"),
        (-amount).filter(kind == "withdrawal").sum().alias("withdrawn_won"),
        amount.sum().alias("operator_cash_net_won"),
    ).rename({"business_date": "for_business_date"}).select(*OPERATOR_CASH_SCHEMA).sort("for_business_date"))


# ---------------------------------------------------------------- totals and checks


def _sum(df: pl.DataFrame, column: str) -> int:
    return int(df[column].sum()) if df.height else 0


def _by_source(frame: pl.DataFrame, columns: dict[str, str]) -> dict[str, dict[str, int]]:
    """{source: {name: Σ column}} over a frame's rows, sources in order."""
    sums = frame.group_by("source").agg(pl.col(column).sum().alias(name) for name, column in columns.items())
    return {row.pop("source"): row for row in sums.sort("source").iter_rows(named=True)}


def totals(c: Computation) -> dict:
    """Per business date covered, and for the run: the figures finance reads first."""
    out: dict = {"dates": {}}
    receivable = c.classes.filter(pl.col("class").cast(pl.String) == "receivable")
    dates = sorted(set(c.txn_counts["for_business_date"].to_list()) | set(c.payouts["for_business_date"].to_list()))
    for day in dates:
        p = c.payouts.filter(pl.col("for_business_date") == day)
        f = c.funders.filter(pl.col("for_business_date") == day)
        g = c.grants.filter(pl.col("for_business_date") == day)
        gf = c.grant_funders.filter(pl.col("for_business_date") == day)
        oc = c.operator_cash.filter(pl.col("for_business_date") == day)
        n = c.txn_counts.filter(pl.col("for_business_date") == day)
        out["dates"][day] = {
            "txn_count": _sum(n, "txn_count"),
            "merchant_count": p.height,
            "payment_count": _sum(p, "payment_count"),
            "refund_count": _sum(p, "refund_count"),
            **{column: _sum(p, column) for column in MONEY_COLUMNS},
            "cashback_by_source": _by_source(f, {"accrued_won": "cashback_accrued_won",
                                                 "clawed_back_won": "cashback_clawed_back_won",
                                                 "corrected_won": "cashback_corrected_won",
                                                 "net_won": "cashback_net_won"}),
            "grants": {column: _sum(g, column) for column in
                       ("disbursed_won", "spent_won", "restored_won", "expired_won", "returned_to_funders_won")},
            "grants_by_source": _by_source(gf, {"funded_won": "grant_funded_won", "returned_won": "grant_returned_won",
                                                "net_won": "grant_net_won"}),
            "operator_cash": {"topped_up_won": _sum(oc, "topped_up_won"), "withdrawn_won": _sum(oc, "withdrawn_won"),
                              "net_won": _sum(oc, "operator_cash_net_won")},
            # what members came to owe (corrections and refunds' clawbacks that took back
            # more than they held) less what later corrections, refunds and withdrawals settled:
            # `receivable/{member}`'s net movement
            "receivable_net_won": _sum(receivable.filter(pl.col("for_business_date") == day), "amount_won"),
        }
    run = {column: _sum(c.payouts, column) for column in MONEY_COLUMNS}
    run["payment_count"] = _sum(c.payouts, "payment_count")
    run["refund_count"] = _sum(c.payouts, "refund_count")
    run["txn_count"] = _sum(c.txn_counts, "txn_count")
    run["cashback_net_won"] = _sum(c.funders, "cashback_net_won")
    run["grants_funded_net_won"] = _sum(c.grant_funders, "grant_net_won")
    run["trial_balance_won"] = _sum(c.classes, "amount_won")
    run["merchant_share_unattributed_won"] = _sum(c.unattributed_share, "merchant_share_won")
    run["topped_up_won"] = _sum(c.operator_cash, "topped_up_won")
    run["withdrawn_won"] = _sum(c.operator_cash, "withdrawn_won")
    run["receivable_net_won"] = _sum(receivable, "amount_won")
    out["run"] = run
    return out


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str = ""

    def as_dict(self) -> dict:
        return {"name": self.name, "ok": self.ok, "detail": self.detail}


Movements = dict[tuple[str, str], int]  # (business_date, class) -> Σ debit-positive legs


def movements_from_legs(legs: pl.DataFrame) -> tuple[Movements, dict[str, int]]:
    """The ledger's account movements by class, and transaction counts, straight from
    the legs (for frames that do not come from a database)."""
    by_class = (legs.lazy().with_columns(account_class().alias("class"))
                .group_by("business_date", "class").agg(pl.col("amount_won").sum()).collect())
    counts = legs.group_by("business_date").agg(pl.col("txn_id").n_unique().alias("n"))
    return ({(r[0], r[1]): int(r[2]) for r in by_class.iter_rows()},
            {r[0]: int(r[1]) for r in counts.iter_rows()})


def checks(c: Computation, movements: Movements, txn_counts: dict[str, int],
           payments_won: dict[str, tuple[int, int]] | None = None,
           legs_read: tuple[tuple[int, ...], tuple[int, ...]] | None = None) -> list[Check]:
    """Validations as small functions returning errors as values; all must pass for a
    settlement to be marked settled. `payments_won`: per business date, (Σ approved
    payments, Σ refunds) from the payments and refunds tables — an independent source.
    `legs_read`: (the database's digest of the legs read, the digest of the legs as
    read), when the movements' class sums were taken from those legs
    (`settlement.ledger_read.read_span`)."""
    out: list[Check] = []
    if legs_read is not None:
        ledger, read = legs_read
        out.append(Check("the legs read equal the ledger's legs", ledger == read,
                         "" if ledger == read else
                         f"ledger (count, Σ, Σ|·|, Σ·bytes) {ledger}, as read {read}"))
    tb = sum(movements.values())
    out.append(Check("trial balance is zero", tb == 0 and _sum(c.classes, "amount_won") == 0,
                     f"ledger Σ legs = {tb}, settlement Σ legs = {_sum(c.classes, 'amount_won')}"))
    out.append(Check("every transaction balances", not c.unbalanced_txn_ids,
                     f"unbalanced: {c.unbalanced_txn_ids}" if c.unbalanced_txn_ids else ""))
    mine = {(r[0], r[1]): int(r[2]) for r in c.classes.iter_rows()}
    diff = {k: (mine.get(k, 0), movements.get(k, 0)) for k in set(mine) | set(movements)
            if mine.get(k, 0) != movements.get(k, 0)}
    out.append(Check("trial balance by account class equals the ledger", not diff, _show(diff)))
    counted = {r[0]: int(r[1]) for r in c.txn_counts.select("for_business_date", "txn_count").iter_rows()}
    out.append(Check("transaction count equals the ledger", counted == {k: v for k, v in txn_counts.items() if v},
                     "" if counted == txn_counts else f"settlement {counted} ledger {txn_counts}"))
    out.extend(_money_checks(c, movements))
    out.append(Check("every paid merchant is registered", not c.unregistered_merchants,
                     f"unregistered: {c.unregistered_merchants}" if c.unregistered_merchants else ""))
    if payments_won is not None:
        out.append(_payments_table_check(c, payments_won))
    return out


def _per_date(df: pl.DataFrame, column: str) -> dict[str, int]:
    if not df.height:
        return {}
    rows = df.group_by("for_business_date").agg(pl.col(column).sum()).iter_rows()
    return {d: int(v) for d, v in rows if v}


def _money_checks(c: Computation, mv: Movements) -> list[Check]:
    def ledger(cls: str, sign: int = 1) -> dict[str, int]:
        return {d: sign * v for (d, k), v in mv.items() if k == cls and v}

    pairs = [
        ("merchant net sales equal the merchant payable movement", _per_date(c.payouts, "net_sales_won"),
         ledger("merchant_payable", -1)),
        ("merchant-funded cashback equals the merchant funder movement",
         {d: v for d, v in _add(_per_date(c.payouts, "merchant_share_won"),
                                _per_date(c.unattributed_share, "merchant_share_won")).items() if v},
         ledger("funder_merchant")),
        ("cashback by funder and district equals the funder movement", _per_date(c.funders, "cashback_net_won"),
         {d: v for d, v in _add(ledger("funder_public"), ledger("funder_merchant")).items() if v}),
        ("grant money by funder equals the grant fund movement", _per_date(c.grant_funders, "grant_net_won"),
         ledger("grantfund")),
        ("operator cash in and out equals the operator cash movement",
         _per_date(c.operator_cash, "operator_cash_net_won"), ledger("operator_cash")),
    ]
    out = []
    for name, mine, theirs in pairs:
        ok = mine == theirs
        out.append(Check(name, ok, "" if ok else _show({d: (mine.get(d, 0), theirs.get(d, 0))
                                                         for d in set(mine) | set(theirs)
                                                         if mine.get(d, 0) != theirs.get(d, 0)})))
    g = c.grants
    grant_net = {}
    if g.height:
        for d, v in (g.group_by("for_business_date")
                     .agg((pl.col("spent_won") - pl.col("restored_won") - pl.col("disbursed_won")
                           + pl.col("expired_won")).sum())
                     .iter_rows()):
            if v:
                grant_net[d] = int(v)
    ok = grant_net == ledger("member_grant")
    out.append(Check("grant flows equal the member grant movement", ok,
                     "" if ok else f"settlement {grant_net} ledger {ledger('member_grant')}"))
    return out


def _payments_table_check(c: Computation, payments_won: dict[str, tuple[int, int]]) -> Check:
    bad = {}
    for day, (paid, refunded) in payments_won.items():
        p = c.payouts.filter(pl.col("for_business_date") == day)
        mine = (_sum(p, "sales_won"), _sum(p, "refunds_won"))
        if mine != (paid, refunded):
            bad[day] = {"settlement": mine, "payments_table": (paid, refunded)}
    return Check("sales and refunds equal the payments and refunds tables", not bad, str(bad) if bad else "")


def _add(a: dict[str, int], b: dict[str, int]) -> dict[str, int]:
    return {k: a.get(k, 0) + b.get(k, 0) for k in set(a) | set(b)}


def _show(diff: dict) -> str:
    if not diff:
        return ""
    items = sorted(diff.items(), key=str)[:10]
    return "; ".join(f"{k}: settlement {v[0]} vs ledger {v[1]}" for k, v in items)
