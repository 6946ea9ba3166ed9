"""Settle one Incheon business day: 1.5 million payments (target < 10 s).

  python benchmarks/settle_day.py [--payments 1500000] [--merchants 150000] [--database URL]

Phase 1 (not timed) generates the day as ledger-shaped polars frames (settlement.datagen).
Phase 2 (timed) is the settlement on polars: per-merchant payouts with fees by tier and
merchant share, funder and district flows, the trial balance, the checks against the
ledger's account movements, and the payout file written as Parquet.
With --database (PostgreSQL), the frames are also loaded into a fresh book of record
(COPY, triggers off for the load only) and `settlement.service.settle` runs end to end:
COPY out of the legs, compute, SQL-side checks, payout rows written.
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import os
import time

from settlement_common import peak_rss_mib, show, timed

import polars as pl

from settlement import datagen, export
from settlement.compute import checks, compute, movements_from_legs
from settlement.config import SettlementConfig
from settlement.calendar import add_business_days

DAY = dt.date(2026, 11, 20)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--payments", type=int, default=1_500_000)
    parser.add_argument("--merchants", type=int, default=150_000)
    parser.add_argument("--members", type=int, default=2_400_000)
    parser.add_argument("--database", help="postgresql://... : also settle through the database")
    parser.add_argument("--keep", metavar="DBNAME", help="load into (or reuse) this database and keep it")
    parser.add_argument("--runs", type=int, default=1, help="settle the day this many times (afresh each time)")
    parser.add_argument("--compare-reads", type=int, default=0, metavar="N",
                        help="then time the first read (join and LIKE in SQL, CSV) against the span read, "
                             "alternating, N rounds each")
    args = parser.parse_args()
    figures: dict = {}
    with timed("generate (not part of the target) s", figures):
        merchants = datagen.merchant_frame(args.merchants)
        day = datagen.day_frames(DAY, merchants, payments=args.payments, members=args.members)
    figures["legs"] = day.legs.height
    figures["refunds"] = day.refunds.height
    config = SettlementConfig()
    with timed("settle on polars s", figures):
        comp = compute(day.legs, merchants, config=config, payout_date=add_business_days(DAY, 2),
                       primary_date=DAY.isoformat())
        found = checks(comp, *movements_from_legs(day.legs))
        parquet = export.parquet_bytes(comp.payouts)
    assert all(c.ok for c in found), [c for c in found if not c.ok]
    figures["checks passed"] = f"{sum(c.ok for c in found)}/{len(found)}"
    figures["merchant payout rows"] = comp.payouts.height
    figures["payout parquet bytes"] = len(parquet)
    figures["net payable won"] = comp.totals["run"]["net_payable_won"]
    del comp, found, parquet
    if args.database:
        # The run reads the day from the database: the generated frames (~3 GB) are
        # dropped once loaded, as a settlement process would never hold them.
        generated = [day]
        del day
        database_run(args.database, merchants, generated, figures, args.keep, args.runs, args.compare_reads)
    figures["peak RSS MiB"] = round(peak_rss_mib(), 1)
    show("settle one day", {"payments": args.payments, "merchants": args.merchants, "members": args.members,
                            "payout_lag_business_days": config.payout_lag_business_days},
         figures, {"settle on polars s": 10,
                   **{k: 10 for k in figures if k.startswith("settle through PostgreSQL s")}},
         database=args.database)


def database_run(url: str, merchants: pl.DataFrame, generated: list[datagen.DayFrames], figures: dict,
                 keep: str | None, runs: int = 1, compare_reads: int = 0) -> None:
    """`generated` holds the day's frames; they are taken out (and freed) once loaded."""
    day = generated.pop()
    import uuid

    import psycopg
    from sqlalchemy import delete

    from ledger.db import make_engine, migrate
    from settlement import schema as ss
    from settlement import service

    name = keep or f"eum_bench_{uuid.uuid4().hex[:12]}"
    admin = url.rsplit("/", 1)[0] + "/postgres"
    with psycopg.connect(admin, autocommit=True) as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
        if not exists:
            conn.execute(f'CREATE DATABASE "{name}"')
    target = url.rsplit("/", 1)[0] + f"/{name}"
    try:
        if not exists:
            migrate(target)
            with timed("load the book by COPY (not part of the target) s", figures):
                load(target, merchants, day)
        del day
        engine = make_engine(target)
        with engine.begin() as conn:  # a kept database is settled afresh
            for table in (ss.settlement_payouts, ss.settlement_coverage, ss.settlements):
                conn.execute(delete(table))
        for run in range(runs):
            if run:
                with engine.begin() as conn:
                    for table in (ss.settlement_payouts, ss.settlement_coverage, ss.settlements):
                        conn.execute(delete(table))
            label = "settle through PostgreSQL s" + (f" (run {run + 1})" if runs > 1 else "")
            with timed(label, figures):
                result = service.settle(engine, DAY, actor="bench", config=SettlementConfig(watermark_lag_us=0))
            assert result.status == "settled", result.failures
            figures[f"  load average after run {run + 1}"] = round(os.getloadavg()[0], 2)
        if compare_reads:
            compare_read_paths(engine, figures, compare_reads)
        engine.dispose()
    finally:
        if not keep:
            with psycopg.connect(admin, autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def compare_read_paths(engine, figures: dict, rounds: int) -> None:
    """What a run reads before computing, both ways, in alternating rounds (so that the
    machine's other load falls on both alike): wall time and this process's CPU time
    (the database's own CPU is not in it)."""
    from settlement import service

    config = SettlementConfig(watermark_lag_us=0)
    w = 1 << 62

    def first(conn):
        legs = service.load_legs(conn, DAY.isoformat(), -1, w)
        service.load_merchants(conn)
        service._member_districts(conn, DAY.isoformat(), -1, w)
        service.ledger_movements(conn, DAY.isoformat(), -1, w)
        service._payments_won(conn, DAY, w)
        return legs.height

    def span(conn):
        return service.read_inputs(conn, DAY, -1, w, config=config).legs.height

    results: dict[str, list[tuple[float, float]]] = {"first": [], "span": []}
    for _ in range(rounds):
        for name, read in (("first", first), ("span", span)):
            with engine.connect() as conn:
                conn.exec_driver_sql(f"SET statement_timeout = {config.statement_timeout_ms}")
                start, cpu = time.perf_counter(), time.process_time()
                n = read(conn)
                results[name].append((time.perf_counter() - start, time.process_time() - cpu))
            assert n == figures["legs"], (name, n)
    for name, runs in results.items():
        walls = sorted(r[0] for r in runs)
        figures[f"read ({name}) wall s, median of {rounds}"] = round(walls[len(walls) // 2], 2)
        figures[f"read ({name}) wall s, each"] = [round(r[0], 2) for r in runs]
        figures[f"read ({name}) client CPU s, each"] = [round(r[1], 2) for r in runs]
    figures["load average after the read rounds"] = round(os.getloadavg()[0], 2)


def _copy(cur, table: str, frame: pl.DataFrame) -> None:
    buffer = io.BytesIO()
    frame.write_csv(buffer, include_header=False)
    with cur.copy(f"COPY {table} ({', '.join(frame.columns)}) FROM STDIN WITH (FORMAT csv)") as copy:
        copy.write(buffer.getvalue())


def load(url: str, merchants: pl.DataFrame, day: datagen.DayFrames) -> None:
    """Bulk-load generated frames (a benchmark fixture, not a way to write the book)."""
    import psycopg

    legs = day.legs
    txns = (legs.group_by("txn_id").agg(pl.col("kind").first().cast(pl.String), pl.col("member_id").first(),
                                        pl.col("merchant_id").first(), pl.col("business_date").first(),
                                        pl.col("recorded_at_us").first(), pl.len().alias("leg_count"))
            .with_columns(pl.col("txn_id").cast(pl.String).alias("ref"), (pl.col("recorded_at_us") - 40_000)
                          .alias("occurred_at_us"))
            .sort("txn_id"))  # the book appends transactions in id order
    with psycopg.connect(url.replace("postgresql+psycopg", "postgresql")) as conn, conn.cursor() as cur:
        cur.execute("SET session_replication_role = replica")  # no triggers or FK checks for the load
        _copy(cur, "merchants", merchants.select(
            "merchant_id", pl.col("merchant_id").alias("name"), "district", "category", "annual_sales_won",
            pl.lit("2026-01-01").alias("registered_from"), pl.lit("").alias("flags"), "merchant_share_bp",
            pl.lit(0).alias("updated_at_us")))
        _copy(cur, "ledger_txns", txns.select("txn_id", "kind", "ref", "member_id", "merchant_id", "occurred_at_us",
                                              "business_date", "recorded_at_us", "leg_count"))
        _copy(cur, "ledger_legs", legs.select("txn_id", pl.int_range(pl.len()).over("txn_id").alias("leg_no"),
                                              "account_id", "amount_won").sort("txn_id", "leg_no"))
        p = day.payments
        _copy(cur, "payments", p.select(
            "payment_id", pl.lit("x").alias("request_hash"), "member_id", "merchant_id", "amount_won",
            "occurred_at_us", pl.lit("2026-11").alias("month"), pl.lit("approved").alias("status"),
            "cashback_won", pl.lit("{}").alias("detail"), "refunded_won", pl.lit("{}").alias("response"),
            "recorded_at_us"))
        _copy(cur, "refunds", day.refunds.select("refund_id", pl.lit("x").alias("request_hash"), "payment_id",
                                                 "amount_won", "occurred_at_us", "clawback_won",
                                                 pl.lit("{}").alias("response"), "recorded_at_us"))
        conn.commit()
    # A book written over a day has been vacuumed and its hint bits set by then; a
    # freshly COPYed one has not, and its first reader would pay for that.
    with psycopg.connect(url.replace("postgresql+psycopg", "postgresql"), autocommit=True) as conn:
        conn.execute("VACUUM (ANALYZE) ledger_txns, ledger_legs, merchants, payments, refunds")


if __name__ == "__main__":
    main()
