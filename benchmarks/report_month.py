"""Report one month: 20 million payments (target < 2 min, peak memory < 4 GiB).

  python benchmarks/report_month.py [--payments 20000000] [--month 2026-11] [--data DIR]

Preparation (not timed, in a child process so that its memory is not counted): the
month is generated day by day as ledger-shaped Parquet files (legs, payments, refunds),
as an export of the book of record would be.
Timed, in this process: every day read and settled (payouts, funder and district flows,
trial balance, checks), then the month: top merchants, budget burn and forecast, the
abuse (깡) report over all 20 million payments, the HTML report and the month's payout
file (Parquet). Peak memory is this process's ru_maxrss.
"""

from __future__ import annotations

import argparse
import datetime as dt
import subprocess
import sys
from pathlib import Path

from settlement_common import peak_rss_mib, show, timed

import polars as pl

from settlement import abuse, datagen, report
from settlement.calendar import add_business_days, month_days
from settlement.compute import checks, compute, movements_from_legs
from settlement.config import SettlementConfig


def day_counts(total: int, days: list[dt.date]) -> list[int]:
    """Payments per day: weekends 20% busier (?), summing exactly to `total`."""
    weights = [12 if d.weekday() >= 5 else 10 for d in days]
    counts = [total * w // sum(weights) for w in weights]
    counts[-1] += total - sum(counts)
    return counts


def prepare(folder: Path, month: str, total: int, merchants_n: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    merchants = datagen.merchant_frame(merchants_n)
    merchants.write_parquet(folder / "merchants.parquet")
    cdf = datagen._sales_cdf(merchants)
    days = month_days(month)
    txn_id = 1
    for i, (day, n) in enumerate(zip(days, day_counts(total, days))):
        frames = datagen.day_frames(day, merchants, payments=n, seed=100 + i, txn_id_start=txn_id, cdf=cdf)
        txn_id += 2 * n + 2 * frames.refunds.height + 2
        frames.legs.with_columns(pl.col("kind").cast(pl.String)).write_parquet(folder / f"{day}.legs.parquet")
        frames.payments.write_parquet(folder / f"{day}.payments.parquet")
        frames.refunds.write_parquet(folder / f"{day}.refunds.parquet")
    (folder / "READY").write_text(f"{month} {total}\n")


PAYOUT_SUMS = ("payment_count", "refund_count", "sales_won", "refunds_won", "net_sales_won", "fee_won",
               "merchant_share_won", "net_payable_won")


def run(folder: Path, month: str, out: Path) -> dict:
    """Nothing of a day outlives the day but small aggregates: payouts go to Parquet and
    into running per-merchant totals; abuse signals' per-pair chunks spill to Parquet and
    are aggregated at the month's end by the streaming engine."""
    figures: dict = {}
    config = SettlementConfig()
    merchants = pl.read_parquet(folder / "merchants.parquet")
    spill = out / "spill"
    for sub in ("payouts", "abuse"):
        (spill / sub).mkdir(parents=True, exist_ok=True)
        for old in (spill / sub).glob("*.parquet"):
            old.unlink()
    merchant_totals: pl.DataFrame | None = None
    funders, settlements = [], []
    payments = 0
    with timed("report total s", figures):
        with timed("settle 30 days s", figures):
            for day in month_days(month):
                legs = pl.read_parquet(folder / f"{day}.legs.parquet").with_columns(
                    pl.col("kind").cast(pl.Categorical))
                comp = compute(legs, merchants, config=config, payout_date=add_business_days(day, 2),
                               primary_date=day.isoformat())
                found = checks(comp, *movements_from_legs(legs))
                del legs
                assert all(c.ok for c in found), [c for c in found if not c.ok]
                comp.payouts.write_parquet(spill / "payouts" / f"{day}.parquet")
                sums = comp.payouts.group_by("merchant_id").agg(pl.col(c).sum() for c in PAYOUT_SUMS)
                merchant_totals = sums if merchant_totals is None else (
                    pl.concat([merchant_totals, sums]).group_by("merchant_id").agg(pl.col(c).sum() for c in PAYOUT_SUMS))
                funders.append(comp.funders)
                payments += comp.totals["run"]["payment_count"]
                settlements.append({"settlement_id": f"bench-{day}", "business_date": day.isoformat(),
                                    "status": "settled", "kind": "day", "payout_date": comp.payouts["payout_date"][0],
                                    "watermark_us": 0, "failures": [], "checks": len(found)})
                abuse.prepare(pl.read_parquet(folder / f"{day}.payments.parquet"),
                              pl.read_parquet(folder / f"{day}.refunds.parquet")).write_parquet(
                    spill / "abuse" / f"{day}.parquet")
        figures["payments"] = payments
        with timed("abuse report over the month s", figures):
            flagged = abuse.report_prepared(pl.scan_parquet(spill / "abuse" / "*.parquet"),
                                            merchants.select("merchant_id", "annual_sales_won"),
                                            abuse.AbuseConfig(period_days=len(month_days(month))))
        with timed("html and files s", figures):
            days = [d.isoformat() for d in month_days(month)]
            budgets = [{"source": "city", "period": month, "limit_won": 60_000_000_000},
                       {"source": "national", "period": month, "limit_won": 40_000_000_000}]
            data = report.ReportData(f"e-eum settlement — {month} (benchmark)", month, days, settlements,
                                     pl.concat(funders), merchant_totals, budgets, None, flagged, "benchmark")
            html = report.render(data)
            out.mkdir(parents=True, exist_ok=True)
            (out / f"report-{month}.html").write_text(html, encoding="utf-8")
            month_payouts = pl.scan_parquet(spill / "payouts" / "*.parquet")
            month_payouts.sink_parquet(out / f"payouts-{month}.parquet")
    figures["merchant payout rows"] = pl.scan_parquet(out / f"payouts-{month}.parquet").select(pl.len()).collect().item()
    figures["html bytes"] = len(html.encode())
    figures["top flagged member"] = flagged.members["member_id"][0] if flagged.members.height else None
    figures["peak RSS MiB"] = round(peak_rss_mib(), 1)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--payments", type=int, default=20_000_000)
    parser.add_argument("--merchants", type=int, default=150_000)
    parser.add_argument("--month", default="2026-11")
    parser.add_argument("--data", type=Path, default=Path("/tmp/eum-bench-month"))
    parser.add_argument("--out", type=Path, default=Path("/tmp/eum-bench-month/out"))
    parser.add_argument("--prepare-only", action="store_true")
    args = parser.parse_args()
    ready = args.data / "READY"
    if args.prepare_only:
        prepare(args.data, args.month, args.payments, args.merchants)
        return
    prepared: dict = {}
    if not ready.exists() or ready.read_text().split() != [args.month, str(args.payments)]:
        with timed("prepare the month's Parquet (not timed) s", prepared):
            subprocess.run([sys.executable, __file__, "--prepare-only", "--payments", str(args.payments),
                            "--merchants", str(args.merchants), "--month", args.month, "--data", str(args.data)],
                           check=True)
    figures = {**prepared, **run(args.data, args.month, args.out)}
    show("report one month", {"payments": args.payments, "merchants": args.merchants, "month": args.month,
                              "data": str(args.data)},
         figures, {"report total s": 120, "peak RSS MiB": 4096})


if __name__ == "__main__":
    main()
