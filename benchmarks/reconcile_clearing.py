"""Reconcile a clearing file of 1.5 million rows (target < 10 s), and its peak memory.

  python benchmarks/reconcile_clearing.py [--rows 1500000] [--encoding utf-8|utf-8-sig|cp949]

Not timed: a day of 1.5 million payments is generated and written as the network's CSV
(Korean header, Seoul local times, thousands separators in amounts), with planted
differences: 1,000 missing, 1,000 unknown approvals, 1,000 amount mismatches, 1,000
duplicated lines and 1,000 payments split in two parts.
Timed, in a process of its own (the generation's pages are not the reconciliation's): the
file's bytes and the ledger's frames are loaded, then decoding, parsing and validating the
file and matching it against the ledger's payments and refunds of that day (as frames,
the shape `load_ledger_side` reads); the file's bytes are let go once parsed, as the API
route and the CLI do. Memory: the peak resident set of that process from the moment its
inputs are loaded (VmHWM reset then), less what it held then (the interpreter, polars,
the ledger frames and the file's bytes), in MiB and as a multiple of the file's size.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from settlement_common import show

import polars as pl

from settlement import datagen
from settlement.reconcile import parse_clearing, reconcile_frames

DAY = dt.date(2026, 11, 20)
PLANTED = 1_000


def clearing_csv(payments: pl.DataFrame, encoding: str) -> tuple[bytes, dict]:
    n = payments.height
    p = payments.with_row_index("i")
    local = pl.from_epoch(pl.col("occurred_at_us") + 9 * 3_600_000_000, time_unit="us").dt.strftime("%Y-%m-%d %H:%M:%S")
    base = p.filter(pl.col("i") >= PLANTED)  # the first PLANTED are missing from the file
    mismatch = pl.col("i").is_between(PLANTED, 2 * PLANTED - 1)
    split = pl.col("i").is_between(2 * PLANTED, 3 * PLANTED - 1)
    rows = base.select("i", "payment_id", "merchant_id",
                       pl.when(mismatch).then(pl.col("amount_won") + 10).otherwise(pl.col("amount_won")).alias("amt"),
                       local.alias("t"), pl.lit(None, pl.Int64).alias("seq"))
    halves = base.filter(split).select("i", "payment_id", "merchant_id", "amount_won", local.alias("t"))
    rows = pl.concat([
        rows.filter(~split),
        halves.select("i", "payment_id", "merchant_id", (pl.col("amount_won") // 2).alias("amt"), "t",
                      pl.lit(1, pl.Int64).alias("seq")),
        halves.select("i", "payment_id", "merchant_id", (pl.col("amount_won") - pl.col("amount_won") // 2).alias("amt"),
                      "t", pl.lit(2, pl.Int64).alias("seq")),
        rows.filter(pl.col("i").is_between(5 * PLANTED, 6 * PLANTED - 1)),  # duplicated lines
        pl.DataFrame({"i": range(n, n + PLANTED), "payment_id": [f"UNKNOWN-{k}" for k in range(PLANTED)],
                      "merchant_id": ["S000001"] * PLANTED, "amt": [5_000] * PLANTED,
                      "t": [f"{DAY} 12:00:00"] * PLANTED, "seq": [None] * PLANTED},
                     schema={"i": pl.UInt32, "payment_id": pl.String, "merchant_id": pl.String, "amt": pl.Int64,
                             "t": pl.String, "seq": pl.Int64}),
    ], how="vertical_relaxed").sort("i", "seq", nulls_last=False)
    text = rows.select(pl.col("payment_id").alias("승인번호"), pl.col("merchant_id").alias("가맹점번호"),
                       pl.col("amt").map_elements(lambda v: f"{v:,}", return_dtype=pl.String).alias("거래금액"),
                       pl.col("t").alias("거래일시"), pl.col("seq").alias("분할순번")).write_csv()
    expected = {"missing_in_clearing": PLANTED, "missing_in_ledger": PLANTED, "amount_mismatch": PLANTED,
                "duplicates": PLANTED, "split payments matched": PLANTED}
    return text.encode(encoding), expected


def _status_mib(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key):
            return int(line.split()[1]) / 1024
    return 0.0


def child(folder: Path) -> None:
    """The timed part, in its own process: prints its figures as JSON."""
    payments = pl.read_parquet(folder / "payments.parquet")
    refunds = pl.read_parquet(folder / "refunds.parquet")
    holder = [(folder / "clearing.csv").read_bytes()]
    gc.collect()
    base = _status_mib("VmRSS:")
    try:
        Path("/proc/self/clear_refs").write_text("5")  # the peak from here on
    except OSError:
        pass
    start = time.perf_counter()
    clearing, facts = parse_clearing(holder.pop())
    result = reconcile_frames(clearing, payments, refunds, declares_refunds=facts["declares_refunds"],
                              declares_splits=facts["declares_splits"])
    seconds = time.perf_counter() - start
    peak = _status_mib("VmHWM:")
    print(json.dumps({"seconds": seconds, "base_mib": base, "peak_mib": peak, "lines": clearing.height,
                      "counts": result.counts(),
                      "split": result.frames["matched"].filter(pl.col("split").fill_null(False)).height}))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=1_500_000)
    parser.add_argument("--encoding", default="cp949", choices=["utf-8", "utf-8-sig", "cp949"])
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child)
    figures: dict = {}
    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        merchants = datagen.merchant_frame(150_000)
        day = datagen.day_frames(DAY, merchants, payments=args.rows)
        data, expected = clearing_csv(day.payments, args.encoding)
        (Path(folder) / "clearing.csv").write_bytes(data)
        day.payments.select("payment_id", "merchant_id", "amount_won", "occurred_at_us",
                            pl.lit("approved").alias("status")).write_parquet(Path(folder) / "payments.parquet")
        day.refunds.select("refund_id", "payment_id", "amount_won", "occurred_at_us").write_parquet(
            Path(folder) / "refunds.parquet")
        figures["generate (not part of the target) s"] = round(time.perf_counter() - start, 3)
        file_mib = len(data) / 2**20
        del data, day, merchants
        out = subprocess.run([sys.executable, __file__, "--child", folder], check=True, capture_output=True,
                             text=True).stdout
    run = json.loads(out.strip().splitlines()[-1])
    counts = run["counts"]
    figures["file MiB"] = round(file_mib, 1)
    figures["reconcile s"] = round(run["seconds"], 3)
    figures["clearing lines"] = run["lines"]
    figures.update(counts)
    assert {k: counts[k] for k in ("missing_in_clearing", "missing_in_ledger", "amount_mismatch", "duplicates")} \
        == {k: expected[k] for k in ("missing_in_clearing", "missing_in_ledger", "amount_mismatch", "duplicates")}
    assert run["split"] == PLANTED, run["split"]
    figures["planted differences found exactly"] = "yes"
    figures["inputs held before (RSS MiB)"] = round(run["base_mib"], 1)
    figures["peak RSS over the inputs MiB"] = round(run["peak_mib"] - run["base_mib"], 1)
    figures["peak over the inputs / file size"] = round((run["peak_mib"] - run["base_mib"]) / file_mib, 2)
    show("reconcile a clearing file", {"rows": args.rows, "encoding": args.encoding, "tolerance_won": 0},
         figures, {"reconcile s": 10})


if __name__ == "__main__":
    main()
