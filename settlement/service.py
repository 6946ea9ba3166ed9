"""Daily settlement over the book of record: runs, idempotency, late events, reopening.

The watermark scheme (exactly once, never lost)
-----------------------------------------------
Every successful run R stores a watermark `w_R` (a `recorded_at_us`, inclusive) and the
previous successful run's watermark `p_R`; watermarks never go down, so the windows
(p_R, w_R] of successive runs partition time. A run settling date D covers:
  - D's own transactions recorded at or before w_R (all of D, whenever recorded), and
  - adjustments: transactions of every *other, already settled* date recorded in
    (p_R, w_R] — late clearing, backfills, anything that arrived after that date's run.
A transaction t of date S recorded at r lands exactly once: if r <= w of S's first
run, in that run (every later window starts at or after it); otherwise in the first
later run whose window holds r, and S is settled by then. The ledger is append-only,
so nothing already counted can change.

`w_R` must not pass a transaction that is recorded but not yet committed (it would be
missed). `recorded_at_us` is stamped inside the writing transaction, so:
  - on SQLite the run holds the one write lock (BEGIN IMMEDIATE) while it reads: no
    writer is in flight;
  - on PostgreSQL w_R is kept before the start of the oldest other open transaction
    (pg_stat_activity.xact_start), and runs are serialised by an advisory lock;
  - on both, `watermark_lag_us` keeps w_R that far behind the clock (clock skew between
    the app servers and the database).

A settled date run again returns the same settlement. Reopening needs a request and an
approval by a different person (audited); the next run of the date is a correction:
the whole day recomputed, with payout rows carrying only the difference from what the
earlier settlements of that date (and their adjustments) already paid; its totals are
what it pays, the whole day recomputed kept apart (`recomputed`). A failed run
changes nothing: the date stays as its last successful settlement left it (reopened
after a failed correction, so the next run corrects again).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

import orjson
import polars as pl
import structlog
from sqlalchemy import Connection, Engine, and_, case, func, or_, select, update

from ledger import audit
from ledger import schema as s
from ledger.errors import Conflict, EumError, NotFound, SecondPersonRequired
from ledger.keys import refuse_if_author_revoked, same_person
from ledger.db import APPLICATION_NAME
from rules.timeutil import local_date, local_midnight_us, rfc3339, to_us
from settlement import schema as ss
from settlement.calendar import add_business_days
from settlement.compute import (
    MERCHANTS_SCHEMA, MONEY_COLUMNS, PAYOUT_COLUMNS, Check, Computation, checks, compute, totals as totals_of,
)
from settlement.config import SettlementConfig, get_config
from settlement.io import adbc_uri, arrow_available, read_frame, write_frame_pg
from settlement.ledger_read import (  # noqa: F401 (LIVE is used through this module)
    LEG_SCHEMA, LIVE, READ_SCHEMA, SUCCESSFUL, TXN_SCHEMA, covered, covered_counts, covered_span, highest_covered,
    join_covered, read_covered, read_covered_async, span_movements, stepped_back_stamps,
)

log = structlog.get_logger("settlement")

SETTLE_LOCK_KEY = 7_301_002  # PostgreSQL advisory lock: one settlement run at a time, of any release
PAYOUT_INSERT_ROWS_MAX = 5_000


class SettlementNotFound(NotFound):
    code, title = "settlement_not_found", "Settlement not found"


class SettlementNotReopenable(Conflict):
    code, title = "settlement_not_reopenable", "Only a settled settlement can be reopened"


class BusinessDateOpen(EumError):
    status, code, title = 409, "business_date_open", "The business date has not ended yet"


class WatermarkHeld(EumError):
    status, code, title = 409, "settlement_watermark_held", "The book may still record events of that date"


class ReopenRequestNotFound(NotFound):
    code, title = "reopen_request_not_found", "Reopen request not found"


class ReopenRequestDecided(Conflict):
    code, title = "reopen_request_decided", "The reopen request is not pending"


@dataclass(frozen=True)
class SettlementResult:
    settlement_id: str
    business_date: str
    version: int
    kind: str
    status: str
    watermark_us: int
    prev_watermark_us: int
    payout_date: str
    totals: dict
    checks: list[dict]
    created_at_us: int
    replayed: bool = False

    @property
    def ok(self) -> bool:
        return self.status in SUCCESSFUL

    @property
    def failures(self) -> list[dict]:
        return [c for c in self.checks if not c["ok"]]

    def body(self) -> dict:
        return {"settlement_id": self.settlement_id, "business_date": self.business_date, "status": self.status,
                "totals": self.totals, "version": self.version, "kind": self.kind, "payout_date": self.payout_date,
                "watermark_us": self.watermark_us, "prev_watermark_us": self.prev_watermark_us,
                "checks": self.checks}


def _now_us() -> int:
    return time.time_ns() // 1000


def _dumps(value) -> str:
    return orjson.dumps(value, option=orjson.OPT_SORT_KEYS).decode()


# ---------------------------------------------------------------- the run


def settle(engine: Engine, business_date: dt.date, *, actor: str, config: SettlementConfig | None = None,
           clock: Callable[[], int] = _now_us, on_behalf_of: str | None = None) -> SettlementResult:
    """Settle one business date (Asia/Seoul). Idempotent; see the module docstring.
    `on_behalf_of`: whom the command line says it ran for, a detail of the run's audit
    entry (`actor`, the run's `run_by`, is who ran it)."""
    config = config or get_config()
    today = local_date(clock())
    if business_date >= today:
        raise BusinessDateOpen(f"{business_date} (Asia/Seoul) is not over; settle it from {business_date + dt.timedelta(days=1)}")
    with engine.begin() as conn:
        _serialise(conn, config)
        # The date stands as its last successful settlement: a failed run pays nothing and
        # changes nothing, so after a failed correction the date is still reopened and the
        # next run corrects it again (the whole day rerun as `day` paid it twice).
        latest = _latest(conn, business_date.isoformat(), statuses=SUCCESSFUL)
        if latest is not None and latest.status == "settled":
            return _result(latest, replayed=True)
        kind = "correction" if latest is not None and latest.status == "reopened" else "day"
        version = _next_version(conn, business_date.isoformat())
        prev_w, w, holder = _watermarks(conn, config, clock)
        day_end = local_midnight_us(business_date + dt.timedelta(days=1)) - 1
        if w < day_end:  # the run would leave part of the day to later runs as adjustments
            raise WatermarkHeld(
                f"{business_date} cannot be settled whole yet: "
                + (f"a transaction open since {rfc3339(holder[0])} (database session {holder[1]}, "
                   f"application {holder[2]!r}, {holder[3]}) may still record events" if holder is not None
                   else f"the last {config.watermark_lag_us // 1000} ms of the day are not settled yet (the "
                        "watermark lag)")
                + "; nothing was settled, try again when it ends", watermark=rfc3339(max(w, 0)))
        result = _run(conn, business_date, kind=kind, version=version, prev_w=prev_w, w=w,
                      actor=actor, config=config, now=clock(), reopened=latest if kind == "correction" else None,
                      on_behalf_of=on_behalf_of)
    log.info("settlement.run", settlement_id=result.settlement_id, status=result.status,
             failures=[c["name"] for c in result.failures])
    return result


def _serialise(conn: Connection, config: SettlementConfig) -> None:
    if conn.dialect.name == "postgresql":
        conn.exec_driver_sql(f"SET LOCAL statement_timeout = {int(config.statement_timeout_ms)}")
        conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({SETTLE_LOCK_KEY})")
    # SQLite: engine.begin() is BEGIN IMMEDIATE, the single write lock.


def _latest(conn: Connection, day: str, statuses: tuple[str, ...] | None = None):
    """The date's settlement of the highest version (of those `statuses`, if given)."""
    t = ss.settlements
    query = select(t).where(t.c.business_date == day)
    if statuses is not None:
        query = query.where(t.c.status.in_(statuses))
    return conn.execute(query.order_by(t.c.version.desc()).limit(1)).first()


def _next_version(conn: Connection, day: str) -> int:
    t = ss.settlements
    return int(conn.execute(select(func.coalesce(func.max(t.c.version), 0)).where(t.c.business_date == day))
               .scalar_one()) + 1


def _watermarks(conn: Connection, config: SettlementConfig, clock: Callable[[], int]
                ) -> tuple[int, int, tuple | None]:
    """(previous watermark, this run's, the session that held it back or None)."""
    t = ss.settlements
    prev = conn.execute(select(func.max(t.c.watermark_us)).where(t.c.status.in_(SUCCESSFUL))).scalar_one()
    prev = -1 if prev is None else int(prev)
    w = clock() - config.watermark_lag_us
    holder = None
    if conn.dialect.name == "postgresql":
        # The sessions that may be recording: the engine's own (ledger.db names them) and
        # any other holding a transaction id (it has written). A read-only session left
        # idle in a transaction (a BI tool, a psql prompt) records nothing, and used to
        # hold every later run's watermark back, so a day settled as empty.
        oldest = conn.exec_driver_sql(
            "SELECT xact_start, pid, application_name, state FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid() AND backend_type = 'client backend' "
            "AND xact_start IS NOT NULL AND (backend_xid IS NOT NULL OR application_name LIKE %(eum)s) "
            "ORDER BY xact_start LIMIT 1", {"eum": f"{APPLICATION_NAME}%"}).first()
        if oldest is not None and to_us(oldest[0]) - config.watermark_lag_us - 1 < w:
            w = to_us(oldest[0]) - config.watermark_lag_us - 1
            holder = (to_us(oldest[0]), oldest[1], oldest[2], oldest[3])
    return prev, max(w, prev), holder


def _covered(t, day: str, prev_w: int, w: int):
    """The transactions a run covers (see the module docstring)."""
    return covered(t, day, prev_w, w)


def _account_class_sql(a):
    return case(
        (a.like("merchant/%"), "merchant_payable"),
        (a.like("funder/merchant/%"), "funder_merchant"),
        (a.like("funder/%"), "funder_public"),
        (a.like("grantfund/%"), "grantfund"),
        (a.like("member/%/grant/%"), "member_grant"),
        (a.like("member/%/charged"), "member_charged"),
        (a.like("member/%/points"), "member_points"),
        (a.like("receivable/%"), "receivable"),
        (a == "operator/cash", "operator_cash"),
        else_="other",
    )


def load_legs(conn: Connection, day: str, prev_w: int, w: int) -> pl.DataFrame:
    """The covered legs with their transaction's attributes, the first way (legs joined
    to transactions in the database, CSV). Runs use `settlement.ledger_read`; this stays
    as the reference the tests compare that read with."""
    t, l = s.ledger_txns, s.ledger_legs
    txns = read_frame(conn, select(t.c.txn_id, t.c.kind, t.c.member_id, t.c.merchant_id, t.c.business_date)
                      .where(_covered(t, day, prev_w, w)), TXN_SCHEMA)
    legs = read_frame(conn, select(l.c.txn_id, l.c.account_id, l.c.amount_won)
                      .select_from(l.join(t, t.c.txn_id == l.c.txn_id)).where(_covered(t, day, prev_w, w)),
                      LEG_SCHEMA)
    return legs.join(txns, on="txn_id", how="inner").select(list(READ_SCHEMA))


def ledger_movements(conn: Connection, day: str, prev_w: int, w: int):
    """The ledger's own account movements for what the run covers, summed in SQL over the
    join of legs and transactions, classified with LIKE: the first way. Runs use
    `settlement.ledger_read.span_movements`; this stays as the tests' reference."""
    t, l = s.ledger_txns, s.ledger_legs
    cls = _account_class_sql(l.c.account_id).label("cls")
    rows = conn.execute(select(t.c.business_date, cls, func.sum(l.c.amount_won))
                        .select_from(l.join(t, t.c.txn_id == l.c.txn_id))
                        .where(_covered(t, day, prev_w, w)).group_by(t.c.business_date, cls)).all()
    counts = conn.execute(select(t.c.business_date, func.count()).where(_covered(t, day, prev_w, w))
                          .group_by(t.c.business_date)).all()
    return ({(d, c): int(v) for d, c, v in rows}, {d: int(n) for d, n in counts})


def _payments_won(conn: Connection, day: dt.date, w: int) -> dict[str, tuple[int, int]]:
    lo, hi = local_midnight_us(day), local_midnight_us(day + dt.timedelta(days=1))
    p, r = s.payments, s.refunds
    paid = conn.execute(select(func.coalesce(func.sum(p.c.amount_won), 0)).where(
        p.c.status == "approved", p.c.occurred_at_us >= lo, p.c.occurred_at_us < hi, p.c.recorded_at_us <= w)
    ).scalar_one()
    refunded = conn.execute(select(func.coalesce(func.sum(r.c.amount_won), 0)).where(
        r.c.occurred_at_us >= lo, r.c.occurred_at_us < hi, r.c.recorded_at_us <= w)).scalar_one()
    return {day.isoformat(): (int(paid), int(refunded))}


def load_merchants(conn: Connection) -> pl.DataFrame:
    m = s.merchants
    return read_frame(conn, select(m.c.merchant_id, m.c.district, m.c.category, m.c.annual_sales_won),
                      MERCHANTS_SCHEMA)


def _member_districts(conn: Connection, day: str, prev_w: int, w: int) -> pl.DataFrame:
    """The districts of the members whose grant money moves with no merchant (a
    disbursement, an expiry), by which `settlement.compute` charts it; what moves at a
    merchant (spending, a refund, money a refund returns to funders) is its district's."""
    t, m, d = s.ledger_txns, s.members, s.grant_disbursements
    own = (select(m.c.member_id, m.c.district).select_from(t.join(m, m.c.member_id == t.c.member_id))
           .where(t.c.kind.in_(("grant", "grant_expiry")), _covered(t, day, prev_w, w)))
    # A bulk disbursement's transaction carries many members: theirs are on the rows.
    bulk = (select(m.c.member_id, m.c.district)
            .select_from(t.join(d, d.c.txn_id == t.c.txn_id).join(m, m.c.member_id == d.c.member_id))
            .where(t.c.kind == "grant", t.c.member_id.is_(None), _covered(t, day, prev_w, w)))
    stmt = select(own.union(bulk).subquery())
    return read_frame(conn, stmt, {"member_id": pl.String, "district": pl.String})


@dataclass
class RunInputs:
    legs: pl.DataFrame
    merchants: pl.DataFrame
    member_districts: pl.DataFrame
    movements: dict
    txn_counts: dict
    payments_won: dict
    # (the database's digest of the span's legs, the digest of the legs as read) when the
    # movements' class sums come from the legs read (PostgreSQL with ADBC)
    legs_read: tuple | None = None


def read_inputs(conn: Connection, business_date: dt.date, prev_w: int, w: int, *, config: SettlementConfig,
                phases: dict[str, float] | None = None) -> RunInputs:
    """Everything a run reads: the covered legs, the registry, and the ledger's own sums
    for the checks (see settlement.ledger_read)."""
    day = business_date.isoformat()
    phases = {} if phases is None else phases
    clock_s = time.perf_counter
    t0 = clock_s()
    span = covered_span(conn, day, prev_w, w)
    uri = adbc_uri(conn) if conn.dialect.name == "postgresql" and arrow_available() else None
    if uri is not None and span is not None:
        # PostgreSQL: the covered transactions, and the span's legs with the database's
        # digest of them, by binary COPY on two connections of their own, while this one
        # reads the rest (see settlement.ledger_read).
        with ThreadPoolExecutor(2, thread_name_prefix="settle-read") as pool:
            txns, span_read = read_covered_async(pool, uri, day, prev_w, w, span, config.statement_timeout_ms)
            counts = covered_counts(conn, day, prev_w, w)
            merchants = load_merchants(conn)
            districts = _member_districts(conn, day, prev_w, w)
            payments_won = _payments_won(conn, business_date, w)
            phases["sql_s"] = clock_s() - t0
            txns, read = txns.result(), span_read.result()
            phases["reads_s"] = clock_s() - t0
            legs = join_covered(txns, read.legs)
            del txns
        return RunInputs(legs, merchants, districts, read.movements, counts, payments_won,
                         (read.ledger_digest, read.read_digest))
    legs = read_covered(conn, day, prev_w, w, span)
    movements, counts = span_movements(conn, day, prev_w, w, span)
    merchants = load_merchants(conn)
    districts = _member_districts(conn, day, prev_w, w)
    payments_won = _payments_won(conn, business_date, w)
    return RunInputs(legs, merchants, districts, movements, counts, payments_won)


def payout_date_for(business_date: dt.date, run_day: dt.date, config: SettlementConfig) -> dt.date:
    """D + N business days, as the schedule pays when D is settled the day after it; a
    later run (a late settlement, a correction, the adjustments it carries) pays no
    earlier than N - 1 business days after its own day: never on a date already past."""
    lag, country = config.payout_lag_business_days, config.holiday_country
    return max(add_business_days(business_date, lag, country), add_business_days(run_day, max(lag - 1, 0), country))


def _run(conn: Connection, business_date: dt.date, *, kind: str, version: int, prev_w: int, w: int, actor: str,
         config: SettlementConfig, now: int, reopened, on_behalf_of: str | None = None) -> SettlementResult:
    day = business_date.isoformat()
    payout_date = payout_date_for(business_date, local_date(now), config)
    phases: dict[str, float] = {}
    clock_s = time.perf_counter
    t0 = clock_s()
    inputs = read_inputs(conn, business_date, prev_w, w, config=config, phases=phases)
    phases["read_s"] = clock_s() - t0
    t0 = clock_s()
    comp = compute(inputs.legs, inputs.merchants, config=config, payout_date=payout_date, primary_date=day,
                   primary_kind=kind, member_districts=inputs.member_districts)
    phases["compute_s"] = clock_s() - t0
    t0 = clock_s()
    found = checks(comp, inputs.movements, inputs.txn_counts, inputs.payments_won, inputs.legs_read)
    del inputs
    phases["checks_s"] = clock_s() - t0
    payouts = comp.payouts
    flows = {"funders": comp.funders, "grants": comp.grants, "grant_funders": comp.grant_funders,
             "operator_cash": comp.operator_cash}
    figures = comp.totals
    if kind == "correction":
        payouts = _correction_rows(conn, payouts, day, payout_date.isoformat())
        flows = _correction_flows(conn, flows, day)
        # What the run pays, as its rows do; the whole day recomputed beside it, named so.
        figures = {**_correction_totals(conn, comp, day, prev_w, payouts=payouts, **flows), "recomputed": comp.totals}
    status = "settled" if all(c.ok for c in found) else "failed"
    settlement_id = f"stl-{day}-v{version}"
    totals = {**figures, "payout_rows": payouts.height,
              "payout_rows_net_payable_won": int(payouts["net_payable_won"].sum()) if payouts.height else 0,
              **{name: frame.to_dicts() for name, frame in flows.items()}}
    row = {"settlement_id": settlement_id, "business_date": day, "version": version, "kind": kind,
           "status": status, "watermark_us": w, "prev_watermark_us": prev_w,
           "watermark_txn_id": int(comp.txn_counts["txn_id_max"].max()) if comp.txn_counts.height else None,
           "payout_date": payout_date.isoformat(), "totals": _dumps(totals),
           "checks": _dumps([c.as_dict() for c in found]), "config": config.model_dump_json(),
           "run_by": actor, "created_at_us": now}
    # Read before the run's own row raises the highest id covered past what it read.
    earliest = (stepped_back_stamps(conn, day, prev_w, row["watermark_txn_id"])
                if comp.txn_counts.height > 1 else {})
    conn.execute(ss.settlements.insert().values(**row))
    t0 = clock_s()
    if status == "settled":
        _write_payouts(conn, settlement_id, payouts)
        _write_coverage(conn, settlement_id, comp, day, kind, prev_w, w, earliest)
        if reopened is not None:
            _claim(conn, reopened.settlement_id, "reopened", "superseded")
    phases["write_s"] = clock_s() - t0
    log.info("settlement.phases", settlement_id=settlement_id, legs=int(comp.txn_counts["txn_count"].sum() or 0),
             **{k: round(v, 3) for k, v in phases.items()})
    audit.append(conn, at_us=now, actor=actor, action=f"settlement.{status}", object_type="settlement",
                 object_id=settlement_id, detail={"business_date": day, "kind": kind, "watermark_us": w,
                                                  "prev_watermark_us": prev_w,
                                                  "failures": [c.name for c in found if not c.ok],
                                                  **({"on_behalf_of": on_behalf_of} if on_behalf_of else {})})
    # As stored (keys sorted), so that a replay, read back from the row, is this answer byte for byte.
    return SettlementResult(settlement_id, day, version, kind, status, w, prev_w, payout_date.isoformat(),
                            orjson.loads(row["totals"]), orjson.loads(row["checks"]), now)


def _correction_totals(conn: Connection, comp: Computation, day: str, prev_w: int, **written: pl.DataFrame) -> dict:
    """A correction's `dates` and `run`: what it writes, the difference, as a day run's
    are what it pays. The payout and flow rows `written` are differences already; the
    figures the legs give beside them (the transactions counted, merchant-funded cashback
    with no merchant, what members came to owe) are less those of the day's transactions
    recorded at or before `prev_w` with an id at or below the highest any run covered,
    which the date's earlier successful runs counted (the watermark windows partition
    time; one a clock stepped back stamped before `prev_w` has a higher id and was not)."""
    t, l = s.ledger_txns, s.ledger_legs
    earlier = and_(t.c.business_date == day, t.c.recorded_at_us <= prev_w, t.c.txn_id <= highest_covered())
    counted = int(conn.execute(select(func.count()).select_from(t).where(earlier)).scalar_one())
    unattributed_leg = and_(t.c.merchant_id.is_(None), l.c.account_id.like("funder/merchant/%"))
    receivable_leg = l.c.account_id.like("receivable/%")
    unattributed, owed = (int(v) for v in conn.execute(  # one read of the earlier legs for both
        select(*(func.coalesce(func.sum(case((leg, l.c.amount_won), else_=0)), 0)
                 for leg in (unattributed_leg, receivable_leg)))
        .select_from(l.join(t, t.c.txn_id == l.c.txn_id))
        .where(earlier, or_(unattributed_leg, receivable_leg))).one())
    on_day = pl.col("for_business_date") == day
    paid = dataclasses.replace(
        comp, **written,
        txn_counts=comp.txn_counts.with_columns(
            pl.when(on_day).then(pl.col("txn_count") - counted).otherwise(pl.col("txn_count")).alias("txn_count")),
        unattributed_share=comp.unattributed_share.with_columns(
            pl.when(on_day).then(pl.col("merchant_share_won") - unattributed).otherwise(pl.col("merchant_share_won"))
            .alias("merchant_share_won")))
    out = totals_of(paid)
    # (`classes` stays the whole day: the trial balance is of the whole day.)
    if day in out["dates"]:
        out["dates"][day]["receivable_net_won"] -= owed
    out["run"]["receivable_net_won"] -= owed
    return out


def _correction_rows(conn: Connection, full: pl.DataFrame, day: str, payout_date: str) -> pl.DataFrame:
    """The whole day recomputed, less what earlier settlements of the day paid. A row only
    earlier runs paid (the merchant has nothing now) is paid back on this run's
    `payout_date`, as compute dates every row of the run; a day with no rows at all (no
    payments, then or now) gives none."""
    p, t = ss.settlement_payouts, ss.settlements
    prior = read_frame(conn, select(p.c.merchant_id, p.c.payment_count, p.c.refund_count, p.c.sales_won,
                                    p.c.refunds_won, p.c.net_sales_won, p.c.fee_won, p.c.merchant_share_won,
                                    p.c.net_payable_won)
                       .select_from(p.join(t, t.c.settlement_id == p.c.settlement_id))
                       .where(p.c.for_business_date == day, t.c.status.in_(SUCCESSFUL)),
                       {"merchant_id": pl.String, **{c: pl.Int64 for c in
                                                     ("payment_count", "refund_count", *MONEY_COLUMNS)}})
    summed = ["payment_count", "refund_count", *MONEY_COLUMNS]
    prior = prior.group_by("merchant_id").agg(pl.col(c).sum().alias(f"{c}_prior") for c in summed)
    day_rows = full.filter(pl.col("for_business_date") == day)
    other = full.filter(pl.col("for_business_date") != day)
    merged = day_rows.join(prior, on="merchant_id", how="full", coalesce=True)
    merged = merged.with_columns(
        pl.col("for_business_date").fill_null(day), pl.col("kind").fill_null("correction"),
        pl.col("payout_date").fill_null(pl.lit(payout_date)),
        pl.col("fee_bp").fill_null(0),
        *[(pl.col(c).fill_null(0) - pl.col(f"{c}_prior").fill_null(0)).alias(c) for c in summed])
    nonzero = pl.any_horizontal([pl.col(c) != 0 for c in summed])
    return pl.concat([merged.filter(nonzero).select(PAYOUT_COLUMNS), other.select(PAYOUT_COLUMNS)])


FUNDER_KEYS = ("for_business_date", "month", "source", "district")
FUNDER_VALUES = ("cashback_accrued_won", "cashback_clawed_back_won", "cashback_corrected_won", "cashback_net_won")
GRANT_KEYS = ("for_business_date", "program_id", "district")
GRANT_VALUES = ("disbursed_won", "spent_won", "restored_won", "expired_won", "returned_to_funders_won")


GRANT_FUNDER_KEYS = ("for_business_date", "program_id", "source")
GRANT_FUNDER_VALUES = ("grant_funded_won", "grant_returned_won", "grant_net_won")
OPERATOR_CASH_KEYS = ("for_business_date",)
OPERATOR_CASH_VALUES = ("topped_up_won", "withdrawn_won", "operator_cash_net_won")
FLOWS = {"funders": (FUNDER_KEYS, FUNDER_VALUES), "grants": (GRANT_KEYS, GRANT_VALUES),
         "grant_funders": (GRANT_FUNDER_KEYS, GRANT_FUNDER_VALUES),
         "operator_cash": (OPERATOR_CASH_KEYS, OPERATOR_CASH_VALUES)}


def stored_flows(conn: Connection, *, day: str | None = None, month: str | None = None,
                 since: str | None = None) -> dict[str, pl.DataFrame]:
    """The funder, grant and grant-funder rows of every successful settlement (`FLOWS`),
    for one business date, a month of them, or every date from `since` on, summed per
    key: the current truth (corrections are deltas). Settlements stored before a flow
    existed hold none of its rows; before the budget month was kept, a funder row's month
    is its date's."""
    t = ss.settlements
    query = select(t.c.totals).where(t.c.status.in_(SUCCESSFUL))
    # Rows for a date come from any run that covered events recorded after its day began:
    # its own, later dates' (adjustments), and an earlier date's first run made after it
    # (late events ride on whichever run comes next). Nothing is recorded more than the
    # future skew before it occurred, so a run whose watermark is a day before `first`
    # began holds none of its rows.
    first = day or (f"{month}-01" if month is not None else since)
    if first is not None:
        began = local_midnight_us(dt.date.fromisoformat(first)) - 86_400_000_000
        query = query.where((t.c.business_date >= first) | (t.c.watermark_us >= began))
    found: dict[str, list[dict]] = {name: [] for name in FLOWS}
    for (text,) in conn.execute(query):
        totals = orjson.loads(text)
        for name, (_, values) in FLOWS.items():
            zero = {v: 0 for v in values}
            for row in totals.get(name, []):
                d = row["for_business_date"]
                if ((day is None or d == day) and (month is None or d.startswith(month))
                        and (since is None or d >= since)):
                    found[name].append({**zero, "month": d[:7], **row} if name == "funders" else {**zero, **row})
    out = {}
    for name, (keys, values) in FLOWS.items():
        schema = {**{k: pl.String for k in keys}, **{v: pl.Int64 for v in values}}
        frame = pl.DataFrame(found[name], schema=schema) if found[name] else pl.DataFrame(schema=schema)
        out[name] = frame.group_by(keys).agg(pl.col(v).sum() for v in values).sort(keys)
    return out


def budget_burn(funders: pl.DataFrame, month: str, through: str | None = None) -> pl.DataFrame:
    """Net cashback per business date and funder counted against `month`'s budgets, from
    stored funder rows (`stored_flows(since=month-01)`): the month's own cashback, and
    clawbacks of its payments refunded later (dated then, counted in this month, as the
    budgets count them). `through`: business dates up to then only."""
    rows = funders.filter(pl.col("month") == month)
    if through is not None:
        rows = rows.filter(pl.col("for_business_date") <= through)
    return (rows.group_by("for_business_date", "source").agg(pl.col("cashback_net_won").sum())
            .sort("for_business_date", "source"))


def _delta(full: pl.DataFrame, prior: pl.DataFrame, keys: tuple, values: tuple) -> pl.DataFrame:
    merged = full.join(prior.rename({v: f"{v}_prior" for v in values}), on=list(keys), how="full", coalesce=True)
    merged = merged.with_columns((pl.col(v).fill_null(0) - pl.col(f"{v}_prior").fill_null(0)).alias(v)
                                 for v in values)
    return merged.filter(pl.any_horizontal([pl.col(v) != 0 for v in values])).select(*keys, *values).sort(keys)


def _correction_flows(conn: Connection, flows: dict[str, pl.DataFrame], day: str) -> dict[str, pl.DataFrame]:
    """Each flow (`FLOWS`) of a reopened day's rerun as the difference from what earlier
    settlements of the day stored, its other dates' rows (late events) as they are."""
    priors = stored_flows(conn, day=day)
    out = {}
    for name, full in flows.items():
        keys, values = FLOWS[name]
        own = full.filter(pl.col("for_business_date") == day)
        out[name] = pl.concat([_delta(own, priors[name], keys, values),
                               full.filter(pl.col("for_business_date") != day)])
    return out


def _write_payouts(conn: Connection, settlement_id: str, payouts: pl.DataFrame) -> None:
    if not payouts.height:
        return
    frame = payouts.with_columns(pl.lit(settlement_id).alias("settlement_id"))
    if conn.dialect.name == "postgresql":
        write_frame_pg(conn, "settlement_payouts", frame)
        return
    for chunk in frame.iter_slices(PAYOUT_INSERT_ROWS_MAX):
        conn.execute(ss.settlement_payouts.insert(), chunk.to_dicts())


def _write_coverage(conn: Connection, settlement_id: str, comp: Computation, day: str, kind: str,
                    prev_w: int, w: int, earliest: dict[str, int]) -> None:
    counts = dict(comp.txn_counts.select("for_business_date", "txn_count").iter_rows())
    rows = [{"settlement_id": settlement_id, "business_date": day, "kind": kind,
             "txn_count": int(counts.get(day, 0)), "from_us": None, "to_us": w}]
    for other, n in sorted(counts.items()):
        if other != day:
            # The window the row's transactions were stamped in: (p, w], widened down to
            # any a clock stepped back stamped at or before p (`ledger_read._stepped_back`).
            start = min(prev_w, earliest[other] - 1) if other in earliest else prev_w
            rows.append({"settlement_id": settlement_id, "business_date": other, "kind": "adjustment",
                         "txn_count": int(n), "from_us": start, "to_us": w})
    conn.execute(ss.settlement_coverage.insert(), rows)


def _claim(conn: Connection, settlement_id: str, from_status: str, to_status: str) -> None:
    """A state change as a conditional UPDATE with a row-count check."""
    t = ss.settlements
    done = conn.execute(update(t).where(t.c.settlement_id == settlement_id, t.c.status == from_status)
                        .values(status=to_status)).rowcount
    if done != 1:
        raise SettlementNotReopenable(f"settlement {settlement_id!r} is no longer {from_status}")


# ---------------------------------------------------------------- reading back


def _result(row, replayed: bool = False) -> SettlementResult:
    return SettlementResult(row.settlement_id, row.business_date, row.version, row.kind, row.status,
                            row.watermark_us, row.prev_watermark_us, row.payout_date, orjson.loads(row.totals),
                            orjson.loads(row.checks), row.created_at_us, replayed)


def get_settlement(conn: Connection, settlement_id: str) -> SettlementResult:
    row = conn.execute(select(ss.settlements).where(ss.settlements.c.settlement_id == settlement_id)).first()
    if row is None:
        raise SettlementNotFound(f"no settlement {settlement_id!r}")
    return _result(row)


SETTLEMENTS_PAGE = 400


def list_settlements(conn: Connection, *, month: str | None = None, limit: int = SETTLEMENTS_PAGE,
                     after: str | None = None) -> list[SettlementResult]:
    """Settlements by business date and version, `limit` of them after the settlement
    `after` (a page's last id; an id that is not a settlement starts nowhere: empty)."""
    t = ss.settlements
    query = select(t).order_by(t.c.business_date, t.c.version).limit(limit)
    if month:
        query = query.where(t.c.business_date.like(f"{month}-%"))
    if after is not None:
        last = conn.execute(select(t.c.business_date, t.c.version).where(t.c.settlement_id == after)).first()
        if last is None:
            return []
        query = query.where((t.c.business_date > last.business_date)
                            | ((t.c.business_date == last.business_date) & (t.c.version > last.version)))
    return [_result(r) for r in conn.execute(query)]


def merchant_payouts(conn: Connection, settlement_id: str) -> pl.DataFrame:
    get_settlement(conn, settlement_id)
    p = ss.settlement_payouts
    stmt = (select(*[p.c[c] for c in PAYOUT_COLUMNS]).where(p.c.settlement_id == settlement_id)
            .order_by(p.c.for_business_date, p.c.merchant_id))
    schema = {c: (pl.String if c in ("for_business_date", "merchant_id", "kind", "payout_date") else pl.Int64)
              for c in PAYOUT_COLUMNS}
    return read_frame(conn, stmt, schema)


def month_payouts(conn: Connection, month: str) -> pl.DataFrame:
    """Every payout row of successful settlements for business dates in the month."""
    p, t = ss.settlement_payouts, ss.settlements
    stmt = (select(p.c.settlement_id, *[p.c[c] for c in PAYOUT_COLUMNS])
            .select_from(p.join(t, t.c.settlement_id == p.c.settlement_id))
            .where(t.c.status.in_(SUCCESSFUL), p.c.for_business_date.like(f"{month}-%")))
    schema = {"settlement_id": pl.String, **{c: (pl.String if c in ("for_business_date", "merchant_id", "kind",
                                                                      "payout_date") else pl.Int64)
                                             for c in PAYOUT_COLUMNS}}
    return read_frame(conn, stmt, schema)


# ---------------------------------------------------------------- reopening (four eyes)


def request_reopen(engine: Engine, settlement_id: str, *, actor: str, reason: str,
                   clock: Callable[[], int] = _now_us) -> dict:
    with engine.begin() as conn:
        _serialise(conn, get_config())  # one pending request: two at once both found none
        found = get_settlement(conn, settlement_id)
        if found.status != "settled":
            raise SettlementNotReopenable(f"settlement {settlement_id!r} is {found.status}")
        r = ss.settlement_reopen_requests
        pending = conn.execute(select(r.c.request_id, r.c.requested_by).where(
            r.c.settlement_id == settlement_id, r.c.status == "pending")).first()
        if pending is not None:  # one request waits for its second person; a second one would only confuse
            raise ReopenRequestDecided(f"settlement {settlement_id!r} already has a pending reopen request "
                                       f"{pending.request_id!r} by {pending.requested_by!r}; approve that one",
                                       request_id=pending.request_id)
        request_id = f"reopen-{uuid.uuid4().hex[:16]}"
        now = clock()
        conn.execute(ss.settlement_reopen_requests.insert().values(
            request_id=request_id, settlement_id=settlement_id, reason=reason, requested_by=actor,
            requested_at_us=now, status="pending"))
        audit.append(conn, at_us=now, actor=actor, action="settlement.reopen_requested", object_type="settlement",
                     object_id=settlement_id, detail={"request_id": request_id, "reason": reason})
    return {"request_id": request_id, "settlement_id": settlement_id, "status": "pending", "requested_by": actor}


def approve_reopen(engine: Engine, request_id: str, *, actor: str, clock: Callable[[], int] = _now_us) -> dict:
    with engine.begin() as conn:
        _serialise(conn, get_config())
        r = ss.settlement_reopen_requests
        row = conn.execute(select(r).where(r.c.request_id == request_id)).first()
        if row is None:
            raise ReopenRequestNotFound(f"no reopen request {request_id!r}")
        if row.status != "pending":
            raise ReopenRequestDecided(f"reopen request {request_id!r} was already {row.status} by "
                                       f"{row.decided_by!r}")
        if same_person(row.requested_by, actor):  # another key of the same name is the same person
            raise SecondPersonRequired(f"{row.requested_by!r} asked for this reopening; {actor!r} is the same "
                                       "person: another must approve it")
        refuse_if_author_revoked(conn, row.requested_by, f"reopen request {request_id!r}")
        now = clock()
        done = conn.execute(update(r).where(r.c.request_id == request_id, r.c.status == "pending")
                            .values(status="approved", decided_by=actor, decided_at_us=now)).rowcount
        if done != 1:
            raise ReopenRequestDecided(f"reopen request {request_id!r} was decided meanwhile")
        _claim(conn, row.settlement_id, "settled", "reopened")
        audit.append(conn, at_us=now, actor=actor, action="settlement.reopened", object_type="settlement",
                     object_id=row.settlement_id, detail={"request_id": request_id, "requested_by": row.requested_by,
                                                          "reason": row.reason})
    return {"request_id": request_id, "settlement_id": row.settlement_id, "status": "reopened",
            "requested_by": row.requested_by, "approved_by": actor}


def reopen_requests(conn: Connection, settlement_id: str) -> list[dict]:
    r = ss.settlement_reopen_requests
    return [dict(x._mapping) for x in conn.execute(select(r).where(r.c.settlement_id == settlement_id))]


__all__ = ["settle", "get_settlement", "list_settlements", "merchant_payouts", "month_payouts", "request_reopen",
           "approve_reopen", "SettlementResult", "Check"]
