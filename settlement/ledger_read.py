"""Reading what a settlement run covers, fast, and the ledger's own movements for it.

The covered transactions (see `settlement.service`) of one Incheon day are ~3 million
transactions with ~8 million legs. PostgreSQL is slow at joining and grouping that many
rows (a hash join of legs to transactions, then a grouping by a `CASE … LIKE` account
class, cost it 4–5 s on two cores), and CSV made it format every value as text. So:

- **the span**: the smallest and largest covered `txn_id`, in SQL. Transaction ids come
  from a sequence taken in recording order, so a day's transactions lie close together;
- **the read**: the covered transactions, and the legs whose `txn_id` is in the span
  (a range of the legs' primary key: no join in the database), each as binary COPY into
  Arrow (ADBC) on its own connection, at the same time; joined in polars, which keeps
  exactly the legs of covered transactions. A leg of a transaction in the span that the
  run does not cover is read and dropped;
- **the movements** (the independent side of the checks), in SQL on the run's own
  connection while the read runs: Σ legs by account class over the span, with no join,
  classified by byte-wise prefix comparisons (cheap) instead of `LIKE`; less the legs of
  the span's transactions that are not the day's own (found through `ledger_txns`, a
  few: late events for other dates, and transactions the run does not cover), which
  are also what gives each adjustment date its own movements.

Reading on separate connections is safe: every covered transaction was recorded at or
before the watermark w, so it was committed before the run began (that is what w
guarantees) and the ledger is append-only; the set of settled dates only changes under
the settlement lock the run holds. Every snapshot sees the same covered rows.

On SQLite (the embedded default) the same statements run one after the other on the
run's connection, which holds the write lock.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import polars as pl
from sqlalchemy import Connection, and_, case, func, literal, not_, select

from ledger import schema as s
from settlement import schema as ss
from settlement.compute import CLASSES, LEGS_SCHEMA
from settlement.io import read_frame, read_frame_arrow

TXN_COLUMNS = ("txn_id", "kind", "member_id", "merchant_id", "business_date", "recorded_at_us")
TXN_SCHEMA = {k: LEGS_SCHEMA[k] for k in TXN_COLUMNS}
LEG_SCHEMA = {k: LEGS_SCHEMA[k] for k in ("txn_id", "account_id", "amount_won")}
Span = tuple[int, int]
LIVE = ("settled", "reopened")  # a date with one of these is settled for late-event purposes


def covered(t, day: str, prev_w: int, w: int):
    """The transactions a run covers (see `settlement.service`): the day's own recorded
    at or before w, and other, already settled dates' recorded in (prev_w, w]."""
    settled_dates = select(ss.settlements.c.business_date).where(ss.settlements.c.status.in_(LIVE))
    return (and_(t.c.business_date == day, t.c.recorded_at_us <= w)
            | and_(t.c.recorded_at_us > prev_w, t.c.recorded_at_us <= w, t.c.business_date != day,
                   t.c.business_date.in_(settled_dates.scalar_subquery())))


def _own(t, day: str, w: int):
    return and_(t.c.business_date == day, t.c.recorded_at_us <= w)


def covered_span(conn: Connection, day: str, prev_w: int, w: int) -> Span | None:
    """(smallest, largest) covered txn_id, or None when the run covers nothing."""
    # Two branches, each answered from its own index, whatever the book's age: the day's
    # own transactions by (business_date, txn_id) (two probes; migration 0006), the late
    # events by recorded_at_us (a range of recent entries). As one OR-ed aggregate the
    # planner walked the primary key from the book's first transaction instead.
    t = s.ledger_txns
    settled_dates = select(ss.settlements.c.business_date).where(ss.settlements.c.status.in_(LIVE))
    own = (select(func.min(t.c.txn_id).label("lo"), func.max(t.c.txn_id).label("hi"))
           .where(_own(t, day, w)))
    late = (select(func.min(t.c.txn_id).label("lo"), func.max(t.c.txn_id).label("hi"))
            .where(t.c.recorded_at_us > prev_w, t.c.recorded_at_us <= w, t.c.business_date != day,
                   t.c.business_date.in_(settled_dates.scalar_subquery())))
    both = own.union_all(late).subquery()
    lo, hi = conn.execute(select(func.min(both.c.lo), func.max(both.c.hi))).one()
    return None if lo is None else (int(lo), int(hi))


def _txns_stmt(day: str, prev_w: int, w: int):
    t = s.ledger_txns
    return select(*(t.c[c] for c in TXN_COLUMNS)).where(covered(t, day, prev_w, w))


def _legs_stmt(span: Span):
    l = s.ledger_legs
    return select(l.c.txn_id, l.c.account_id, l.c.amount_won).where(l.c.txn_id.between(*span))


def _by_txn_id(frame: pl.DataFrame) -> pl.DataFrame:
    """`frame` in txn_id order, flagged so. The book appends in (nearly) txn_id order, so
    a heap scan returns rows in it or close to it: then nothing, or little, moves. (From
    a heap in another order, the sort scatters the strings in memory and every later
    string operation is several times slower.)"""
    if frame["txn_id"].is_sorted():
        return frame.with_columns(pl.col("txn_id").set_sorted())
    return frame.sort("txn_id", maintain_order=True)


def join_covered(txns: pl.DataFrame, legs: pl.DataFrame) -> pl.DataFrame:
    """The legs of the covered transactions, each with its transaction's attributes.
    Both sides in txn_id order, so that polars merges them instead of hashing."""
    return (_by_txn_id(legs).join(_by_txn_id(txns), on="txn_id", how="inner")
            .select(list(LEGS_SCHEMA)).cast(LEGS_SCHEMA))


def read_covered(conn: Connection, day: str, prev_w: int, w: int, span: Span | None, *,
                 uri: str | None = None, statement_timeout_ms: int | None = None) -> pl.DataFrame:
    """The covered legs (`LEGS_SCHEMA`). With `uri` (PostgreSQL, ADBC installed) the
    transactions and the legs are read at once on two connections of their own;
    otherwise on `conn`, one after the other."""
    if span is None:
        return pl.DataFrame(schema=LEGS_SCHEMA)
    if uri is None:
        txns = read_frame(conn, _txns_stmt(day, prev_w, w), TXN_SCHEMA)
        if conn.dialect.name == "postgresql":
            # CSV cannot tell NULL from "" (a top-up has no merchant); the book never
            # writes an empty id, so "" is a NULL.
            txns = txns.with_columns(pl.col(c).replace("", None) for c in ("member_id", "merchant_id"))
        legs = read_frame(conn, _legs_stmt(span), LEG_SCHEMA)
        return join_covered(txns, legs)
    with ThreadPoolExecutor(2, thread_name_prefix="settle-read") as pool:
        txns = pool.submit(read_frame_arrow, uri, _txns_stmt(day, prev_w, w), TXN_SCHEMA, statement_timeout_ms)
        legs = pool.submit(read_frame_arrow, uri, _legs_stmt(span), LEG_SCHEMA, statement_timeout_ms)
        return join_covered(txns.result(), legs.result())


def read_covered_async(pool: ThreadPoolExecutor, uri: str, day: str, prev_w: int, w: int, span: Span,
                       statement_timeout_ms: int | None):
    """Start the two reads on `pool` (two workers); returns the two futures."""
    return (pool.submit(read_frame_arrow, uri, _txns_stmt(day, prev_w, w), TXN_SCHEMA, statement_timeout_ms),
            pool.submit(read_frame_arrow, uri, _legs_stmt(span), LEG_SCHEMA, statement_timeout_ms))


# ---------------------------------------------------------------- the ledger's own movements


def _prefix(a, prefix: str):
    """`a` starts with `prefix` (which ends in "/"), as two byte-wise comparisons: the
    strings that start with "x/" are exactly those in ["x/", "x0") ("0" follows "/")."""
    return and_(a >= prefix, a < prefix[:-1] + "0")


def account_class_sql(account, dialect_name: str):
    """The account class of `settlement.compute.account_class`, in SQL. Prefixes are
    tested by byte-wise comparison (COLLATE "C" on PostgreSQL; SQLite compares bytes),
    several times cheaper per row than LIKE; only member accounts need a pattern."""
    a = account.collate("C") if dialect_name == "postgresql" else account
    member = case(
        (a.like("member/%/grant/%"), "member_grant"),
        (a.like("%/charged"), "member_charged"),
        (a.like("%/points"), "member_points"),
        else_="other",
    )
    return case(
        (_prefix(a, "member/"), member),
        (_prefix(a, "funder/merchant/"), "funder_merchant"),
        (_prefix(a, "funder/"), "funder_public"),
        (_prefix(a, "merchant/"), "merchant_payable"),
        (_prefix(a, "grantfund/"), "grantfund"),
        (_prefix(a, "receivable/"), "receivable"),
        (a == "operator/cash", "operator_cash"),
        else_="other",
    )


def span_movements(conn: Connection, day: str, prev_w: int, w: int,
                   span: Span | None) -> tuple[dict[tuple[str, str], int], dict[str, int]]:
    """The ledger's account movements by (business_date, class) for what the run covers,
    and its transaction count per business date, summed in SQL: the independent side of
    the settlement's checks (see the module docstring for how)."""
    t, l = s.ledger_txns, s.ledger_legs
    counts = {d: int(n) for d, n in conn.execute(
        select(t.c.business_date, func.count()).where(covered(t, day, prev_w, w)).group_by(t.c.business_date))}
    if span is None:
        return {}, counts
    dialect = conn.dialect.name
    cls = account_class_sql(l.c.account_id, dialect).label("cls")
    in_span = {c: int(v) for c, v in conn.execute(
        select(cls, func.sum(l.c.amount_won)).where(l.c.txn_id.between(*span)).group_by(cls))}
    is_covered = case((covered(t, day, prev_w, w), literal(1)), else_=literal(0)).label("is_covered")
    others = conn.execute(
        select(t.c.business_date, is_covered, cls, func.sum(l.c.amount_won))
        .select_from(t.join(l, l.c.txn_id == t.c.txn_id))
        .where(t.c.txn_id.between(*span), not_(_own(t, day, w)))
        .group_by(t.c.business_date, is_covered, cls)).all()
    movements: dict[tuple[str, str], int] = {}
    for c, v in in_span.items():
        movements[(day, c)] = v
    for d, flag, c, v in others:
        movements[(day, c)] = movements.get((day, c), 0) - int(v)
        if int(flag):
            movements[(d, c)] = movements.get((d, c), 0) + int(v)
    return {k: v for k, v in movements.items() if v}, counts


__all__ = ["covered", "covered_span", "read_covered", "read_covered_async", "join_covered", "span_movements",
           "account_class_sql", "CLASSES"]
