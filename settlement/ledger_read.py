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
- **the movements** (the ledger's side of the checks): Σ legs by account class over the
  span, from the legs as read, classified as they arrive (`read_span`); less the legs of
  the span's transactions that are not the day's own (found in SQL through
  `ledger_txns`: a few late events for other dates, and transactions the run does not
  cover), which are also what gives each adjustment date its own movements. Those
  other-date sums and the database's digest of the span (count, Σ, Σ |·|, Σ amount ×
  account bytes) run on a second connection in the legs' own snapshot
  (`settlement.io.read_arrow_snapshot`), so they describe exactly the rows read; the
  run's checks compare the digest with the frame's. Wholly in SQL (`span_movements`:
  byte-wise prefix comparisons instead of `LIKE`) on SQLite, without ADBC, and as the
  tests' reference: the class sums cost PostgreSQL ~2.5 s of CPU a day, the digest ~0.9.

Reading on separate connections is safe: every covered transaction was recorded at or
before the watermark w, so it was committed before the run began (that is what w
guarantees) and the ledger is append-only; the set of settled dates only changes under
the settlement lock the run holds. Every snapshot sees the same covered rows; the
uncovered ones in the span (a transaction still in flight) are read, summed and
digested in one snapshot.

On SQLite (the embedded default) the same statements run one after the other on the
run's connection, which holds the write lock.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import polars as pl
from sqlalchemy import Connection, and_, case, func, literal, not_, select

from ledger import schema as s
from settlement import schema as ss
from settlement.compute import CLASSES, LEGS_SCHEMA, account_class
from settlement.io import read_arrow_snapshot, read_frame, read_frame_arrow

# What the settlement computes from (`settlement.compute`); a transaction's recorded_at_us
# decides whether it is covered, in SQL, and is not read (a column costs ~0.1 s a day).
TXN_COLUMNS = ("txn_id", "kind", "member_id", "merchant_id", "business_date")
TXN_SCHEMA = {k: LEGS_SCHEMA[k] for k in TXN_COLUMNS}
READ_SCHEMA = {k: v for k, v in LEGS_SCHEMA.items() if k != "recorded_at_us"}
LEG_SCHEMA = {k: LEGS_SCHEMA[k] for k in ("txn_id", "account_id", "amount_won")}
Span = tuple[int, int]
LIVE = ("settled", "reopened")  # a date with one of these is settled for late-event purposes
SUCCESSFUL = ("settled", "reopened", "superseded")  # the runs whose coverage stands


def highest_covered():
    """The highest transaction id any run covered (its `watermark_txn_id`), 0 before any."""
    st = ss.settlements
    return (select(func.coalesce(func.max(st.c.watermark_txn_id), 0))
            .where(st.c.status.in_(SUCCESSFUL)).scalar_subquery())


# How far back a clock may step and the transactions it stamps still be settled: they are
# looked for in the hour before the previous watermark (an index range of the hour's
# transactions; the whole book before it would be a scan of every transaction since the
# last run, ~2 s a peak day).
STEP_BACK_MAX_US = 3_600_000_000


def _stepped_back(t, day: str, prev_w: int):
    """Other settled dates' transactions stamped in the hour up to prev_w with an id above
    the highest any run covered: recorded after prev_w was taken (ids only grow), yet
    stamped before it, by a clock that stepped back more than the lag. No window
    (prev_w, w] holds them; without this branch they were never settled (operator audit)."""
    settled_dates = select(ss.settlements.c.business_date).where(ss.settlements.c.status.in_(LIVE))
    return and_(t.c.txn_id > highest_covered(), t.c.recorded_at_us <= prev_w,
                t.c.recorded_at_us > prev_w - STEP_BACK_MAX_US, t.c.business_date != day,
                t.c.business_date.in_(settled_dates.scalar_subquery()))


def stepped_back_stamps(conn: Connection, day: str, prev_w: int, txn_id_max: int) -> dict[str, int]:
    """Per other date, the earliest stamp of the `_stepped_back` transactions a run read
    (ids up to the highest it covered): an index range of the hour before prev_w."""
    t = s.ledger_txns
    stmt = (select(t.c.business_date, func.min(t.c.recorded_at_us))
            .where(_stepped_back(t, day, prev_w), t.c.txn_id <= txn_id_max)
            .group_by(t.c.business_date))
    return {d: int(us) for d, us in conn.execute(stmt)}


def covered(t, day: str, prev_w: int, w: int):
    """The transactions a run covers (see `settlement.service`): the day's own recorded
    at or before w, other, already settled dates' recorded in (prev_w, w], and theirs a
    clock stepped back stamped at or before prev_w (`_stepped_back`)."""
    settled_dates = select(ss.settlements.c.business_date).where(ss.settlements.c.status.in_(LIVE))
    return (and_(t.c.business_date == day, t.c.recorded_at_us <= w)
            | and_(t.c.recorded_at_us > prev_w, t.c.recorded_at_us <= w, t.c.business_date != day,
                   t.c.business_date.in_(settled_dates.scalar_subquery()))
            | _stepped_back(t, day, prev_w))


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
    # `+ 0`: min and max of the key itself are planned as a walk of the primary key from
    # its end, past every transaction since the last run; of an expression, by the hour's range.
    stepped = (select(func.min(t.c.txn_id + 0).label("lo"), func.max(t.c.txn_id + 0).label("hi"))
               .where(_stepped_back(t, day, prev_w)))
    both = own.union_all(late, stepped).subquery()
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
    """The legs of the covered transactions, each with its transaction's attributes
    (`READ_SCHEMA`, and the legs' `class` if they have one). Both sides in txn_id order,
    so that polars merges them instead of hashing."""
    columns = [*READ_SCHEMA, *(["class"] if "class" in legs.columns else [])]
    return (_by_txn_id(legs).join(_by_txn_id(txns), on="txn_id", how="inner")
            .select(columns).cast(READ_SCHEMA))


def read_covered(conn: Connection, day: str, prev_w: int, w: int, span: Span | None, *,
                 uri: str | None = None, statement_timeout_ms: int | None = None) -> pl.DataFrame:
    """The covered legs (`READ_SCHEMA`). With `uri` (PostgreSQL, ADBC installed) the
    transactions and the legs are read at once on two connections of their own;
    otherwise on `conn`, one after the other."""
    if span is None:
        return pl.DataFrame(schema=READ_SCHEMA)
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
    """Start the two reads on `pool` (two workers): the covered transactions, and the
    span (`read_span`); returns the two futures."""
    return (pool.submit(read_frame_arrow, uri, _txns_stmt(day, prev_w, w), TXN_SCHEMA, statement_timeout_ms),
            pool.submit(read_span, uri, day, prev_w, w, span, statement_timeout_ms))


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


def covered_counts(conn: Connection, day: str, prev_w: int, w: int) -> dict[str, int]:
    """The ledger's count of covered transactions per business date, in SQL."""
    t = s.ledger_txns
    return {d: int(n) for d, n in conn.execute(
        select(t.c.business_date, func.count()).where(covered(t, day, prev_w, w)).group_by(t.c.business_date))}


def _span_class_sums_sql(conn: Connection, span: Span) -> dict[str, int]:
    l = s.ledger_legs
    cls = account_class_sql(l.c.account_id, conn.dialect.name).label("cls")
    return {c: int(v) for c, v in conn.execute(
        select(cls, func.sum(l.c.amount_won)).where(l.c.txn_id.between(*span)).group_by(cls))}


def span_class_sums(legs: pl.DataFrame) -> dict[str, int]:
    """Σ legs by account class over a frame of the span's legs as read (with `class`)."""
    return {c: int(v) for c, v in legs.group_by("class").agg(pl.col("amount_won").sum()).iter_rows()}


def _others_stmt(day: str, prev_w: int, w: int, span: Span, dialect_name: str):
    """(business_date, covered 0/1, class, Σ legs) of the span's transactions that are not
    the day's own: a few (late events for other dates, transactions the run does not
    cover), found through `ledger_txns`."""
    t, l = s.ledger_txns, s.ledger_legs
    cls = account_class_sql(l.c.account_id, dialect_name).label("cls")
    is_covered = case((covered(t, day, prev_w, w), literal(1)), else_=literal(0)).label("is_covered")
    return (select(t.c.business_date, is_covered, cls, func.sum(l.c.amount_won))
            .select_from(t.join(l, l.c.txn_id == t.c.txn_id))
            .where(t.c.txn_id.between(*span), not_(_own(t, day, w)))
            .group_by(t.c.business_date, is_covered, cls))


def _others(rows) -> list[tuple[str, int, str, int]]:
    return [(d, int(f), c, int(v)) for d, f, c, v in rows]


def _movements(day: str, in_span: dict[str, int], others) -> dict[tuple[str, str], int]:
    """The span's class sums belong to `day`, less the legs of transactions that are not
    the day's own; those that are covered belong to their own business date."""
    movements: dict[tuple[str, str], int] = {(day, c): v for c, v in in_span.items()}
    for d, flag, c, v in others:
        movements[(day, c)] = movements.get((day, c), 0) - v
        if flag:
            movements[(d, c)] = movements.get((d, c), 0) + v
    return {k: v for k, v in movements.items() if v}


def span_movements(conn: Connection, day: str, prev_w: int, w: int,
                   span: Span | None) -> tuple[dict[tuple[str, str], int], dict[str, int]]:
    """The ledger's account movements by (business_date, class) for what the run covers,
    and its transaction count per business date, all summed in SQL (see the module
    docstring for how)."""
    counts = covered_counts(conn, day, prev_w, w)
    if span is None:
        return {}, counts
    others = _others(conn.execute(_others_stmt(day, prev_w, w, span, conn.dialect.name)))
    return _movements(day, _span_class_sums_sql(conn, span), others), counts


# A digest of the span's legs: (count, Σ amount, Σ |amount|, Σ amount × bytes of the
# account id). The server's, over the table, against the one of the frame as read.
Digest = tuple[int, int, int, int]


def _digest_stmt(span: Span):
    l = s.ledger_legs
    return select(
        func.count(), func.coalesce(func.sum(l.c.amount_won), 0), func.coalesce(func.sum(func.abs(l.c.amount_won)), 0),
        func.coalesce(func.sum(l.c.amount_won * func.octet_length(l.c.account_id)), 0),
    ).where(l.c.txn_id.between(*span))


def span_digest(legs: pl.DataFrame) -> Digest:
    """The digest of a frame of legs, as `_digest_stmt` computes it over the table."""
    a = pl.col("amount_won")
    row = legs.select(pl.len().cast(pl.Int64).alias("n"), a.sum().alias("s"), a.abs().sum().alias("a"),
                      (a * pl.col("account_id").str.len_bytes().cast(pl.Int64)).sum().alias("b")).row(0)
    return tuple(int(v or 0) for v in row)  # type: ignore[return-value]


@dataclass(frozen=True)
class SpanRead:
    """The span's legs as read (with their `class`), with what the run's checks need of
    them: the movements (the span's class sums taken from these legs, the few other-
    date rows from SQL), and the server's digest of the span against the frame's."""
    legs: pl.DataFrame
    movements: dict[tuple[str, str], int]
    ledger_digest: Digest
    read_digest: Digest


def read_span(uri: str, day: str, prev_w: int, w: int, span: Span,
              statement_timeout_ms: int | None = None) -> SpanRead:
    """The span's legs by binary COPY, classified; the server's digest of them and the
    other-date rows, meanwhile, on a second connection in the same snapshot
    (`read_arrow_snapshot`). Safe in a thread."""
    legs, (digest, others) = read_arrow_snapshot(
        uri, _legs_stmt(span), LEG_SCHEMA, (_digest_stmt(span), _others_stmt(day, prev_w, w, span, "postgresql")),
        statement_timeout_ms)
    legs = legs.with_columns(account_class().alias("class"))
    return SpanRead(legs, _movements(day, span_class_sums(legs), _others(others)),
                    tuple(int(v) for v in digest[0]), span_digest(legs))  # type: ignore[arg-type]


__all__ = ["covered", "covered_span", "covered_counts", "read_covered", "read_covered_async", "join_covered",
           "span_movements", "span_digest", "read_span", "SpanRead",
           "account_class_sql", "CLASSES"]
