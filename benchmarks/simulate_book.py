"""Simulate one month *from the book*: `settlement.simulate.simulate` as the API and
`eum policy simulate` run it — the recorded payments read narrow from PostgreSQL or
SQLite (`_read_compact`: two streams side by side on PostgreSQL, ids as integer codes,
JSON detail taken apart vectorised, earlier rows reduced as they come), then evaluated
one member group at a time and the report's figures added up. `benchmarks/simulate_month.py`
times the evaluation alone on data already in memory. Target: 20 million payments < 60 s,
peak memory a few GB (the same code runs inside an API worker).

  .venv/bin/python benchmarks/simulate_book.py [--payments 20000000] [--members 2400000]
      [--merchants 150000] [--backends postgresql,sqlite] [--reference-payments 200000]
      [--keep DBNAME [--build-only]] [--database URL] [--recorded paid|one-batch] [--backdated-share 0.01]
      [--registry-moves 0.05]

Not timed: generating the month (simulate_month.py's generator: Incheon districts by
population, lognormal sales and amounts, lunch/dinner peaks, 15% points, 3% grants),
evaluating it under the policy that "paid" it (Ganghwa/Ongjin at 10%) and writing the
`members`, `merchants` and `payments` rows as the book stores them: each payment's
`detail` in `Book._pay`'s exact JSON (spend split, lines, funders), 3% of payments with
a partial refund recorded in their refund state. Each payment is recorded 2 s after it
occurred (its own batch), or with `--recorded one-batch` all at one instant (the book
before: every member's payments one batch, so the preview reads each one's place in it,
`_batch_positions`, and finds no ledger transaction); `--backdated-share` records that
share of them after the month, in time order (backdated: the preview reorders their
members, `_in_book_order`). Ledger legs are not written: the simulation does not read
them. Timed: the whole of `simulate()` (its read, evaluation
and aggregation reported apart), with the process's peak RSS; and, for comparison, the
row-by-row reader (`load_range_rows`) and the one-frame bulk reader (`load_range`, what
corrections use) on the first --reference-payments payments' range. Generating a 20M
book takes ~15 min: `--keep NAME --build-only` writes one to keep, `--database URL`
times it again.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import io
import tempfile
import time
from pathlib import Path

from settlement_common import REPO, peak_rss_mib, show, timed
from simulate_month import MONTH_START, POLICY, members, merchants, month_payments, paid_policy

import polars as pl

from rules.compiled import compile_policy
from rules.loader import load_policy_file
from rules.simulate import evaluate_frame
from rules.timeutil import local_midnight_us
from settlement.simulate import load_range, load_range_rows, simulate

TARGET_S = 60
WRITE_ROWS = 500_000
NOW_US = 1_760_000_000_000_000
PROGRAM = "relief-bench"


def cat(*parts) -> pl.Expr:
    """Text from literal strings (str) and expressions, as one string column."""
    return pl.concat_str([pl.lit(p) if isinstance(p, str) else p.cast(pl.String) for p in parts])


def detail_frames(frame: pl.DataFrame, paid, recorded: pl.Expr = pl.lit(NOW_US)) -> pl.DataFrame:
    """payment rows as the book stores them (the columns `load_range` reads and the rest)."""
    wanted = frame.select(pl.col("source_row").cast(paid.payments["row"].dtype).alias("row"))
    lines = paid.lines.join(wanted, on="row", how="semi").with_columns(pl.col("component_id", "rule").cast(pl.String))
    funding = paid.funding.join(wanted, on="row", how="semi").with_columns(
        pl.col("component_id", "source").cast(pl.String))
    funded = (funding.sort("row", "component_id", "band", "entry")
              .group_by("row", "component_id", "band", maintain_order=True)
              .agg(cat('["', pl.col("source"), '",', pl.col("amount_won"), "]").str.join(",").alias("funded_by")))
    text = (lines.join(funded, on=["row", "component_id", "band"], how="left")
            .sort("row", maintain_order=True)
            .select("row", cat('{"component_id":"', pl.col("component_id"), '","rule":"', pl.col("rule"),
                               '","band":', pl.col("band"), ',"amount":', pl.col("amount_won"), ',"funded_by":[',
                               pl.col("funded_by").fill_null(""), "]}").alias("line"))
            .group_by("row", maintain_order=True).agg(pl.col("line").str.join(",").alias("lines")))
    p = paid.payments.select("row", pl.col("policy_id").cast(pl.String), "declined", "counts_toward_month",
                             "base_won", "cashback_won")
    rows = (frame.with_columns(pl.col("source_row").cast(p["row"].dtype).alias("row"))
            .join(p, on="row").join(text, on="row", how="left"))
    refunded = (pl.col("row").hash(7) % 100 < 3) & (pl.col("spent_charged_won") >= 1_000)
    x = pl.lit(1_000, pl.Int64)
    return rows.select(
        "payment_id", pl.lit("0" * 64).alias("request_hash"), "member_id", "merchant_id", "amount_won",
        "occurred_at_us", pl.lit(MONTH_START.strftime("%Y-%m")).alias("month"),
        pl.when(pl.col("declined")).then(pl.lit("declined")).otherwise(pl.lit("approved")).alias("status"),
        pl.lit(None, pl.String).alias("decline_code"), "policy_id", "base_won",
        pl.col("counts_toward_month").cast(pl.Int64).alias("counts_toward_month"), "cashback_won",
        cat('{"spend_order":["grants","points","charged"],"spent":{"grants":[',
            pl.when(pl.col("spent_grants_won") > 0)
            .then(cat(f'["{PROGRAM}",', pl.col("spent_grants_won"), "]")).otherwise(pl.lit("")),
            '],"points":', pl.col("spent_points_won"), ',"charged":', pl.col("spent_charged_won"),
            '},"base_parts":{"charged":true,"points":false,"grants":[]},"lines":[', pl.col("lines").fill_null(""),
            "]}").alias("detail"),
        pl.when(refunded).then(x).otherwise(0).alias("refunded_won"),
        pl.when(refunded).then(pl.lit('{"charged":1000,"points":0,"grants":{},"base":1000,"clawed":{}}'))
        .otherwise(pl.lit("{}")).alias("refund_state"),
        pl.lit("{}").alias("response"), recorded.cast(pl.Int64).alias("recorded_at_us"),
    )


def write_table(engine, table: str, frame: pl.DataFrame) -> None:
    with engine.begin() as conn:
        if engine.dialect.name == "postgresql":
            raw = conn.connection.driver_connection
            columns = ", ".join(frame.columns)
            for start in range(0, frame.height, WRITE_ROWS):
                buffer = io.BytesIO()
                part = frame.slice(start, WRITE_ROWS)
                if "counts_toward_month" in part.columns:
                    part = part.with_columns(pl.col("counts_toward_month").cast(pl.Boolean))
                part.write_csv(buffer, include_header=False, null_value="")
                with raw.cursor().copy(f"COPY {table} ({columns}) FROM STDIN WITH (FORMAT csv)") as copy:
                    copy.write(buffer.getvalue())
        else:
            marks = ", ".join("?" * frame.width)
            for start in range(0, frame.height, WRITE_ROWS):
                conn.exec_driver_sql(f"INSERT INTO {table} ({', '.join(frame.columns)}) VALUES ({marks})",
                                     frame.slice(start, WRITE_ROWS).rows())


def build_book(url: str, shops: pl.DataFrame, people: pl.DataFrame, frame: pl.DataFrame, paid,
               recorded_mode: str = "paid", backdated_share: float = 0.0, registry_moves: float = 0.0) -> None:
    from ledger.db import make_engine

    engine = make_engine(url, statement_timeout_ms=3_600_000)
    try:
        member_rows = people.select("member_id", "district", pl.lit("active").alias("status"))
        merchant_rows = shops.select(
            "merchant_id", "district", pl.col("category").cast(pl.String), "annual_sales_won",
            pl.lit("2019-01-01").alias("registered_from"), pl.col("flags").list.join(",").alias("flags"),
            "merchant_share_bp")
        # The registry's fact versions (migration 0022): each row's, from before the month;
        # with --registry-moves, that share of members and merchants moved to another
        # district mid-month (a second version, the row as it stands after it), so the
        # preview looks each payment's facts up as of its recording (`_as_of`).
        mid_us = local_midnight_us(MONTH_START + dt.timedelta(days=15))
        versions = []
        for rows, key in ((member_rows, "member_id"), (merchant_rows, "merchant_id")):
            moved = pl.col(key).hash(17) % 1_000_000 < int(registry_moves * 1_000_000)
            after = rows.filter(moved).with_columns(
                pl.when(pl.col("district") == "seo").then(pl.lit("ganghwa")).otherwise(pl.lit("seo")).alias("district"))
            first = rows.with_columns(pl.lit(0, pl.Int64).alias("valid_from_us"))
            second = after.with_columns(pl.lit(mid_us, pl.Int64).alias("valid_from_us"))
            versions.append(pl.concat([first, second]).select(key, "valid_from_us", pl.exclude(key, "valid_from_us")))
            rows = pl.concat([rows.filter(~moved), after])
            if key == "member_id":
                member_rows = rows
            else:
                merchant_rows = rows
        write_table(engine, "members", member_rows.with_columns(pl.lit(NOW_US).alias("created_at_us"),
                                                                pl.lit(NOW_US).alias("updated_at_us")))
        write_table(engine, "merchants", merchant_rows.select(
            "merchant_id", pl.col("merchant_id").alias("name"), pl.exclude("merchant_id"),
            pl.lit(NOW_US).alias("updated_at_us")))
        write_table(engine, "member_facts", versions[0])
        write_table(engine, "merchant_facts", versions[1])
        # As a book records them: in time order (the evaluation's rows keep their own numbering).
        order = frame.select(pl.arg_sort_by("occurred_at_us", "payment_id")).to_series()
        frame = frame.with_row_index("source_row").gather(order)
        if recorded_mode == "one-batch":
            recorded = pl.lit(NOW_US, pl.Int64)
        else:  # 2 s after it occurred; a backdated share after the month (+1 µs each, in time order)
            late = pl.col("source_row").hash(13) % 1_000_000 < int(backdated_share * 1_000_000)
            month_end = local_midnight_us(MONTH_START + dt.timedelta(days=31))
            recorded = pl.when(late).then(month_end + pl.int_range(pl.len(), dtype=pl.Int64)).otherwise(
                pl.col("occurred_at_us") + 2_000_000)
        frame = frame.with_columns(recorded.alias("recorded_at_us"))
        for start in range(0, frame.height, 2_000_000):  # the detail text of a slice at a time
            part = frame.slice(start, 2_000_000)
            rows = detail_frames(part, paid, pl.col("recorded_at_us"))
            write_table(engine, "payments", rows)
            del rows
            gc.collect()
        if engine.dialect.name == "postgresql":
            with engine.connect() as conn:
                conn.exec_driver_sql("ANALYZE payments")
                conn.exec_driver_sql("ANALYZE members")
                conn.exec_driver_sql("ANALYZE merchants")
                conn.exec_driver_sql("ANALYZE member_facts")
                conn.exec_driver_sql("ANALYZE merchant_facts")
                conn.commit()
    finally:
        engine.dispose()


def run(url: str, policy, args) -> dict:
    from ledger.db import make_engine, reader

    figures: dict = {}
    engine = make_engine(url, statement_timeout_ms=3_600_000)
    start_us = local_midnight_us(MONTH_START)
    end_us = local_midnight_us(MONTH_START + dt.timedelta(days=30))
    try:
        read = reader(engine)
        t0 = time.perf_counter()
        phases: dict = {}
        with read.connect() as conn:  # what the API and `eum policy simulate` run
            report = simulate(conn, policy, start_us, end_us, timings=phases)
        total = time.perf_counter() - t0
        figures["simulate() from the book s"] = round(total, 3)
        figures["read (narrow, two connections) s"] = phases["read s"]
        figures["evaluate s (member groups)"] = round(phases["evaluate s"], 3)
        figures["aggregate s"] = round(phases["aggregate s"], 3)
        figures["member groups"] = phases["groups"]
        n = report["payments"]["count"]
        figures["payments read"] = n
        figures["read µs/payment"] = round(phases["read s"] / n * 1e6, 2)
        figures["payments/s end to end"] = round(n / total)
        figures["payments with a refund state"] = report["recorded"]["refunded_payments"]
        figures["simulated won"] = report["totals"]["simulated_won"]
        figures["recorded won"] = report["totals"]["actual_won"]
        figures["members affected (gaining)"] = f"{report['members']['affected']} ({report['members']['gaining']})"
        figures["peak RSS MiB"] = round(peak_rss_mib(), 1)
        del report
        gc.collect()
        if args.reference_payments:
            # The row reader on a range holding about --reference-payments payments.
            with read.connect() as conn:
                stop = conn.exec_driver_sql(
                    "SELECT occurred_at_us FROM payments WHERE status = 'approved' ORDER BY occurred_at_us "
                    f"LIMIT 1 OFFSET {int(args.reference_payments)}").scalar()
                ref: dict = {}
                with timed("s", ref):
                    rows = load_range_rows(conn, start_us, stop)
                with timed("bulk s", ref):
                    bulk = load_range(conn, start_us, stop)
            figures["row reader (before) µs/payment"] = round(ref["s"] / rows.payments.height * 1e6, 1)
            figures["bulk reader, same range, µs/payment"] = round(ref["bulk s"] / bulk.payments.height * 1e6, 2)
    finally:
        engine.dispose()
    return figures


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--payments", type=int, default=20_000_000)
    parser.add_argument("--members", type=int, default=2_400_000)
    parser.add_argument("--merchants", type=int, default=150_000)
    parser.add_argument("--policy", type=Path, default=POLICY)
    parser.add_argument("--backends", default="postgresql,sqlite")
    parser.add_argument("--reference-payments", type=int, default=200_000)
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--database", help="time an existing book (written by an earlier run) instead of making one")
    parser.add_argument("--keep", metavar="DBNAME",
                        help="PostgreSQL: write the book into a new database of this name and keep it "
                             "(time it later with --database; drop it yourself)")
    parser.add_argument("--build-only", action="store_true", help="with --keep: write the book, time nothing")
    parser.add_argument("--recorded", choices=("paid", "one-batch"), default="paid",
                        help="each payment recorded 2 s after it occurred, or all at one instant (one batch)")
    parser.add_argument("--backdated-share", type=float, default=0.0,
                        help="this share of the payments recorded after the month (backdated)")
    parser.add_argument("--registry-moves", type=float, default=0.0,
                        help="this share of members and merchants moved to another district mid-month (a second "
                             "fact version, migration 0022)")
    args = parser.parse_args()
    from loadtests import harness as h
    from ledger.db import migrate

    policy = compile_policy(load_policy_file(args.policy))
    settings = {"payments": args.payments, "members": args.members, "merchants": args.merchants,
                "policy": args.policy.name, "seed": args.seed, "month": MONTH_START.strftime("%Y-%m"),
                "read chunk rows": 1_000_000, "recorded": args.recorded,
                "backdated share": args.backdated_share, "registry moves": args.registry_moves}
    if args.database:
        show("simulate one month from the book (given database)", {**settings, "database": args.database},
             run(args.database, policy, args), {"simulate() from the book s": TARGET_S}, database=args.database)
        return

    def make(url: str, figures: dict) -> None:
        """Generate, evaluate what was paid, write; nothing of it stays alive for the timed part."""
        with timed("generate and evaluate what was paid (not timed) s", figures):
            shops, people = merchants(args.merchants, args.seed), members(args.members, args.seed)
            frame = month_payments(args.payments, shops, people, args.seed)
            paid = evaluate_frame(paid_policy(policy), frame)
        with timed("write the book (not timed) s", figures):
            build_book(url, shops, people, frame, paid, args.recorded, args.backdated_share, args.registry_moves)
        del shops, people, frame, paid
        gc.collect()

    for backend in args.backends.split(","):
        figures: dict = {}
        if backend == "postgresql" and args.keep:
            url = h.pg_url(args.keep)
            import psycopg
            with psycopg.connect(h.PG_ADMIN_URL, autocommit=True) as conn:
                conn.execute(f'CREATE DATABASE "{args.keep}"')
            migrate(url)
            make(url, figures)
            if not args.build_only:
                figures |= run(url, policy, args)
            figures["kept database"] = url
        elif backend == "postgresql":
            with h.fresh_database("eum_bench_sim") as url:
                make(url, figures)
                figures |= run(url, policy, args)
        else:
            with tempfile.TemporaryDirectory() as tmp:
                url = f"sqlite:///{tmp}/sim.db"
                migrate(url)
                make(url, figures)
                figures |= run(url, policy, args)
        show(f"simulate one month from the book ({backend})", settings, figures,
             {"simulate() from the book s": TARGET_S},
             database=h.PG_ADMIN_URL if backend == "postgresql" else None)  # (the run's own is dropped by now)


if __name__ == "__main__":
    main()
