"""What PostgreSQL itself spends per payment on each part of a bulk chunk, with no Python.

Row (c) asks for 50,000 payments/s durably recorded: 40 µs of all CPU per payment on 2
cores, Python included. This measures the server's share alone, for the rows a chunk of
bulk payments writes today and for the shape a chunk-level posting would write, each
generated inside PostgreSQL (`generate_series`, no client rows, no protocol), one
transaction per chunk, durable commits, with the book's own schema and guards (a fresh
database migrated to head):

- `payment_rows`: the `payments` rows (their request hash, a detail of ~290 and an answer
  of ~700 characters, as the book stores them; 3 indexes);
- `ledger_per_payment`: the book's ledger shape today: per payment a `payment`
  transaction (merchant, member's charged money) and a `cashback` one (three funders,
  the member's points): 2 sealed transactions and 6 legs;
- `ledger_per_chunk`: one sealed transaction per chunk, its legs summed per account
  (each merchant, each member's charged money and points, each funder): the
  "chunk-level posting" that docs/performance.md names as the next step;
- `account_updates`: the chunk's balance updates, one per account it moves (the same
  for either ledger shape).

And two parts of the smaller book that docs/performance.md ("What limits the next step")
weighs, each written into today's tables so that the difference is the rows alone:

- `payment_rows_slim`: the same payment rows with the detail cut to what a refund needs
  (the spend split and each funder's cashback, ~60 characters) and no stored answer
  (a replay would rebuild it from the row);
- `account_updates_folded`: the balance updates with a member's points folded into the
  row of their charged money, so a chunk updates one row per member instead of two;
- `ledger_per_payment_merged`: the online path's step named since 2026-12-04f: one
  sealed transaction per payment with its cashback (the same 6 legs, half the
  transaction rows and seals).
- `balances_from_legs`: balances kept as a snapshot plus the legs after it, so a chunk
  updates no balance row: the per-chunk ledger written with an index on the legs'
  (account_id, txn_id), and before it the chunk's read of its accounts' legs since the
  snapshot (the first chunk's transaction): what would replace `account_updates`.

Each shape runs in a database of its own, after a warm-up of 10,000 payments and an
ANALYZE (and another ANALYZE after each round, as autovacuum would on a live book), in
alternating rounds; the CPU is the
backend's (from /proc) and the wall time is the client's. Each round also runs the same
statements' SELECT alone (rows made and counted, nothing written), and the result line
gives the CPU of writing less that of making the rows: the figure a client's COPY of
ready rows would come near. Payments are spread over
`--members` members and `--merchants` merchants, so a chunk touches about
min(chunk, members) members.

    .venv/bin/python benchmarks/pg_shapes.py [--chunks 10] [--chunk 10000] [--rounds 3] [--shapes A,B]
        [--members 50000] [--merchants 5000]  (as bulk_replay.py)
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psycopg  # noqa: E402

from loadtests import harness as h  # noqa: E402

SHAPES = ("payment_rows", "ledger_per_payment", "ledger_per_chunk", "account_updates",
          "payment_rows_slim", "account_updates_folded", "ledger_per_payment_merged", "balances_from_legs")
LEGS_BY_ACCOUNT = "CREATE INDEX ledger_legs_account_txn ON ledger_legs (account_id, txn_id)"
READ = "/* read */ "
MONTH = "2025-11"
FUNDERS = ("national", "city", "district-a")
AT_US = 1_761_900_000_000_000  # 2025-10-31T08:40:00Z


def seed_sql(members: int, merchants: int) -> list[str]:
    return [
        "INSERT INTO accounts (account_id, type, owner_id, balance_won, floor_zero) "
        f"SELECT 'member/m' || i || '/charged', 'liability', 'm' || i, 10000000000, true FROM generate_series(0, {members - 1}) i",
        "INSERT INTO accounts (account_id, type, owner_id, balance_won, floor_zero) "
        f"SELECT 'member/m' || i || '/points', 'liability', 'm' || i, 0, true FROM generate_series(0, {members - 1}) i",
        "INSERT INTO accounts (account_id, type, owner_id, balance_won, floor_zero) "
        f"SELECT 'merchant/s' || i || '/payable', 'liability', NULL, 0, false FROM generate_series(0, {merchants - 1}) i",
        "INSERT INTO accounts (account_id, type, owner_id, balance_won, floor_zero) "
        f"SELECT 'funder/' || f || '/{MONTH}', 'expense', NULL, 0, false "
        f"FROM unnest(ARRAY[{', '.join(repr(f) for f in FUNDERS)}]) f",
    ]


def chunk_sql(shape: str, n: int, size: int, members: int, merchants: int) -> list[str]:
    """The statements of chunk `n` (payments n*size .. n*size+size-1) for `shape`."""
    lo, hi = n * size, n * size + size - 1
    series = f"generate_series({lo}, {hi}) i"
    member, merchant = f"(i % {members})", f"(i % {merchants})"
    funder_legs = " ".join(f"WHEN {k} THEN 'funder/{f}/{MONTH}'" for k, f in enumerate(FUNDERS))
    if shape in ("payment_rows", "payment_rows_slim"):
        detail, response = ("repeat(md5(i::text), 9)", "repeat(md5((i * 7)::text), 22)") if shape == "payment_rows" \
            else ("left(md5(i::text), 8) || ':12300:0:41:41:41:0:' || left(md5((i * 7)::text), 24)", "''")
        return [
            "INSERT INTO payments (payment_id, request_hash, member_id, merchant_id, amount_won, occurred_at_us, month, "
            "status, decline_code, policy_id, base_won, counts_toward_month, cashback_won, detail, refunded_won, "
            "refund_state, response, recorded_at_us) "
            f"SELECT 'pay-' || i, md5(i::text) || md5((i + 1)::text), 'm' || {member}, 's' || {merchant}, 12300, "
            f"{AT_US} + i, '{MONTH}', 'approved', NULL, 'incheon-2025-10', 12300, true, 123, "
            f"{detail}, 0, '{{}}', {response}, {AT_US} FROM {series}"]
    if shape == "ledger_per_payment":
        first = 10_000_000
        return [
            "INSERT INTO ledger_legs (txn_id, leg_no, account_id, amount_won) "
            f"SELECT {first} + 2 * i, k, CASE k WHEN 0 THEN 'merchant/s' || {merchant} || '/payable' "
            f"ELSE 'member/m' || {member} || '/charged' END, CASE k WHEN 0 THEN -12300 ELSE 12300 END "
            f"FROM {series}, generate_series(0, 1) k "
            "UNION ALL "
            f"SELECT {first} + 2 * i + 1, k, CASE k {funder_legs} ELSE 'member/m' || {member} || '/points' END, "
            f"CASE WHEN k < 3 THEN 41 ELSE -123 END FROM {series}, generate_series(0, 3) k",
            "INSERT INTO ledger_txns (txn_id, kind, ref, member_id, merchant_id, occurred_at_us, business_date, "
            "recorded_at_us, leg_count) "
            f"SELECT {first} + 2 * i + k, CASE k WHEN 0 THEN 'payment' ELSE 'cashback' END, 'pay-' || i, "
            f"'m' || {member}, 's' || {merchant}, {AT_US} + i, '2025-11-01', {AT_US}, CASE k WHEN 0 THEN 2 ELSE 4 END "
            f"FROM {series}, generate_series(0, 1) k"]
    if shape == "ledger_per_payment_merged":
        first = 10_000_000
        return [
            "INSERT INTO ledger_legs (txn_id, leg_no, account_id, amount_won) "
            f"SELECT {first} + i, k, CASE k WHEN 0 THEN 'merchant/s' || {merchant} || '/payable' "
            f"WHEN 1 THEN 'member/m' || {member} || '/charged' WHEN 2 THEN 'funder/{FUNDERS[0]}/{MONTH}' "
            f"WHEN 3 THEN 'funder/{FUNDERS[1]}/{MONTH}' WHEN 4 THEN 'funder/{FUNDERS[2]}/{MONTH}' "
            f"ELSE 'member/m' || {member} || '/points' END, "
            "CASE k WHEN 0 THEN -12300 WHEN 1 THEN 12300 WHEN 5 THEN -123 ELSE 41 END "
            f"FROM {series}, generate_series(0, 5) k",
            "INSERT INTO ledger_txns (txn_id, kind, ref, member_id, merchant_id, occurred_at_us, business_date, "
            "recorded_at_us, leg_count) "
            f"SELECT {first} + i, 'payment', 'pay-' || i, 'm' || {member}, 's' || {merchant}, {AT_US} + i, "
            f"'2025-11-01', {AT_US}, 6 FROM {series}"]
    if shape in ("ledger_per_chunk", "balances_from_legs"):
        txn = 90_000_000 + n
        read = [] if shape == "ledger_per_chunk" else [
            f"{READ}SELECT count(*), sum(r.s) FROM (SELECT l.account_id, sum(l.amount_won) AS s FROM ledger_legs l "
            f"JOIN (SELECT DISTINCT 'member/m' || {member} || '/charged' AS a FROM {series} "
            f"UNION ALL SELECT DISTINCT 'member/m' || {member} || '/points' FROM {series} "
            f"UNION ALL SELECT DISTINCT 'merchant/s' || {merchant} || '/payable' FROM {series}) x "
            "ON l.account_id = x.a WHERE l.txn_id >= 90000000 GROUP BY 1) r"]
        return read + [
            "INSERT INTO ledger_legs (txn_id, leg_no, account_id, amount_won) "
            f"SELECT {txn}, (row_number() OVER ())::int - 1, a, v FROM ("
            f"SELECT 'merchant/s' || {merchant} || '/payable' AS a, -sum(12300) AS v FROM {series} GROUP BY 1 "
            f"UNION ALL SELECT 'member/m' || {member} || '/charged', sum(12300) FROM {series} GROUP BY 1 "
            f"UNION ALL SELECT 'member/m' || {member} || '/points', -sum(123) FROM {series} GROUP BY 1 "
            f"UNION ALL SELECT 'funder/' || f || '/{MONTH}', 41 * {size} "
            f"FROM unnest(ARRAY[{', '.join(repr(f) for f in FUNDERS)}]) f) x",
            "INSERT INTO ledger_txns (txn_id, kind, ref, member_id, merchant_id, occurred_at_us, business_date, "
            f"recorded_at_us, leg_count) SELECT {txn}, 'payment', 'bulk:{n}', NULL, NULL, {AT_US}, '2025-11-01', "
            f"{AT_US}, (SELECT count(*) FROM ledger_legs WHERE txn_id = {txn})"]
    assert shape in ("account_updates", "account_updates_folded"), shape
    points = "" if shape == "account_updates_folded" else \
        f"UNION ALL SELECT 'member/m' || {member} || '/points', sum(123) FROM {series} GROUP BY 1"
    charged = "-sum(12300) + sum(123)" if shape == "account_updates_folded" else "-sum(12300)"
    return [
        "UPDATE accounts a SET balance_won = a.balance_won + d.v FROM ("
        f"SELECT 'merchant/s' || {merchant} || '/payable' AS id, sum(12300) AS v FROM {series} GROUP BY 1 "
        f"UNION ALL SELECT 'member/m' || {member} || '/charged', {charged} FROM {series} GROUP BY 1 "
        f"{points}) d WHERE a.account_id = d.id"]


def generation_only(statement: str) -> str:
    """The rows of `statement` made and counted, not written: what generating them costs
    the server (string building, md5, grouping), to be taken off the shape's figure."""
    # OFFSET 0 keeps the subquery whole, so each row's columns are computed, not pruned.
    if statement.startswith(READ):  # the accounts to read made, not looked up
        return "SELECT count(*) FROM (" + statement.split(" JOIN (", 1)[1].rsplit(") x ON", 1)[0] + " OFFSET 0) g"
    if statement.startswith("UPDATE"):
        return "SELECT count(*) FROM (" + statement.split(" FROM (", 1)[1].rsplit(") d ", 1)[0] + " OFFSET 0) d"
    return "SELECT count(*) FROM (" + statement[statement.index(" SELECT ") + 1:] + " OFFSET 0) g"


def run_round(conn: psycopg.Connection, shape: str, first_chunk: int, args, *, chunks: int | None = None,
              generate_only: bool = False) -> tuple[float, float]:
    """(wall µs, backend CPU µs) per payment over `chunks` (default `args.chunks`) chunks,
    each committed."""
    chunks = args.chunks if chunks is None else chunks
    pid = conn.info.backend_pid
    cpu0, started = h.cpu_seconds(pid), time.perf_counter()
    for n in range(first_chunk, first_chunk + chunks):
        with conn.transaction():
            for statement in chunk_sql(shape, n, args.chunk, args.members, args.merchants):
                if generate_only:
                    statement = generation_only(statement)
                    if "(SELECT count(*) FROM ledger_legs" in statement:
                        continue  # the seal's leg count reads what the legs' statement wrote
                conn.execute(statement)
    wall = time.perf_counter() - started
    payments = chunks * args.chunk
    return wall / payments * 1e6, (h.cpu_seconds(pid) - cpu0) / payments * 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chunks", type=int, default=10, help="chunks per round")
    parser.add_argument("--chunk", type=int, default=10_000, help="payments per chunk (one transaction)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--members", type=int, default=50_000)
    parser.add_argument("--merchants", type=int, default=5_000)
    parser.add_argument("--shapes", default=",".join(SHAPES), help=f"comma-separated, of {', '.join(SHAPES)}")
    args = parser.parse_args()
    shapes = tuple(args.shapes.split(","))
    if not shapes or any(shape not in SHAPES for shape in shapes):
        parser.error(f"--shapes: each of {', '.join(SHAPES)}")
    if args.chunk > 10_000:
        parser.error("--chunk at most 10,000: a chunk-level transaction's leg_count is a SMALLINT")
    h.print_machine({"shapes": ", ".join(shapes), "chunk": args.chunk, "chunks per round": args.chunks,
                     "rounds": args.rounds, "members": args.members, "merchants": args.merchants})
    results: dict[str, list[tuple[float, float, float]]] = {shape: [] for shape in shapes}
    with contextlib.ExitStack() as stack:
        urls = {shape: stack.enter_context(h.fresh_database(f"eum_shapes_{n}")) for n, shape in enumerate(shapes)}
        conns = {}
        try:
            for shape, url in urls.items():
                conns[shape] = conn = psycopg.connect(url.replace("postgresql+psycopg://", "postgresql://"),
                                                      autocommit=True)
                for statement in seed_sql(args.members, args.merchants):
                    conn.execute(statement)
                if shape == "balances_from_legs":
                    conn.execute(LEGS_BY_ACCOUNT)
                conn.execute("VACUUM ANALYZE")
                # A warm-up of 10,000 payments (chunk numbers after the measured ones), then
                # ANALYZE, as autovacuum's analyze would do on a live book. Without it a
                # connection that first checked a foreign key while `ledger_txns` was a page
                # or two keeps that check's sequential-scan plan for its life when nothing
                # analyzes the table (docs/design.md, "Database-side guarantees").
                run_round(conn, shape, args.rounds * args.chunks, args, chunks=max(1, 10_000 // args.chunk))
                conn.execute("ANALYZE")
                conn.execute("CHECKPOINT")
            for round_no in range(args.rounds):
                for shape in shapes:
                    wall, cpu = run_round(conns[shape], shape, round_no * args.chunks, args)
                    _, made = run_round(conns[shape], shape, round_no * args.chunks, args, generate_only=True)
                    results[shape].append((wall, cpu, made))
                    conns[shape].execute("ANALYZE")  # as autovacuum would, between rounds
                    print(f"round {round_no + 1} {shape:<26} {wall:7.1f} µs wall, {cpu:7.1f} µs backend CPU per "
                          f"payment, of which {made:5.1f} µs making the rows")
            for shape, conn in conns.items():  # the rows are the book's: its own guards let them in
                legs, txns = conn.execute("SELECT (SELECT count(*) FROM ledger_legs), (SELECT count(*) FROM ledger_txns)").fetchone()
                unbalanced = conn.execute("SELECT count(*) FROM (SELECT txn_id FROM ledger_legs GROUP BY txn_id "
                                          "HAVING sum(amount_won) <> 0) x").fetchone()[0]
                assert unbalanced == 0, f"{shape}: unbalanced transactions"
                print(f"{shape}: {txns} transactions, {legs} legs, all balanced")
        finally:
            for conn in conns.values():
                conn.close()
    print()
    for shape in shapes:
        walls = [w for w, _, _ in results[shape]]
        cpus = [c for _, c, _ in results[shape]]
        writes = [c - m for _, c, m in results[shape]]
        print(f"RESULT pg_shapes {shape}: median {statistics.median(walls):.1f} µs wall, "
              f"{statistics.median(cpus):.1f} µs backend CPU per payment; writing alone (less making the rows) "
              f"{statistics.median(writes):.1f} µs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
