"""Read side: balances, history, budgets, and the book's own consistency checks."""

from __future__ import annotations

import base64
import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass

import orjson
from sqlalchemy import BigInteger, Connection, and_, case, cast, func, or_, select
from sqlalchemy.dialects.postgresql import JSONB

from ledger import accounts as acct
from ledger import schema as s
from ledger.errors import EumError, MemberNotFound
from ledger.programs import ProgramCache
from rules.timeutil import local_midnight_us, rfc3339


class BadCursor(EumError):
    status, code, title = 422, "bad_cursor", "The cursor is not one this service issued"


def member_balances(conn: Connection, member_id: str, programs: ProgramCache) -> dict:
    rows = conn.execute(select(s.accounts.c.account_id, s.accounts.c.balance_won)
                        .where(s.accounts.c.owner_id == member_id)).all()
    charged = points = 0
    grants = []
    lots = {}
    for account_id, balance in rows:
        tail = account_id[len("member/") + len(member_id) + 1:]
        if tail == "charged":
            charged = balance
        elif tail == "points":
            points = balance
        elif tail.startswith("grant/") and balance > 0:
            lots[tail[len("grant/"):]] = balance
    programs.ensure(conn, set(lots))
    for program_id in sorted(lots):
        program = programs.get(program_id)
        grants.append({"program_id": program_id, "amount": lots[program_id],
                       "expires_at": rfc3339(program.valid_until_us) if program else None})
    return {"charged": charged, "points": points, "grants": grants}


def member_balance(conn: Connection, member_id: str, month: str, programs: ProgramCache) -> dict:
    if conn.execute(select(s.members.c.member_id).where(s.members.c.member_id == member_id)).first() is None:
        raise MemberNotFound(f"no member {member_id!r}")
    t = s.member_months
    row = conn.execute(select(t).where((t.c.member_id == member_id) & (t.c.month == month))).first()
    # What corrections and refunds took back that the member no longer held
    # (`receivable/{member}`): owed to the operator, settled by later corrections that give,
    # refunds that give back and withdrawals (docs/design.md, Corrections, Refunds, Withdrawals).
    owed = conn.execute(select(s.accounts.c.balance_won)
                        .where(s.accounts.c.account_id == acct.member_receivable(member_id))).scalar()
    return {
        "member_id": member_id,
        "balances": member_balances(conn, member_id, programs),
        "owed": owed or 0,
        "month": {
            "month": month,
            "cashback_eligible_spend": row.eligible_spend_won if row else 0,
            "cashback_earned": row.cashback_won if row else 0,
            "topped_up": row.topped_up_won if row else 0,
            "cashback_by_component": orjson.loads(row.component_cashback) if row else {},
        },
    }


# A cursor is a position, its kind's letter first: `t` a transaction id (a member's
# history), `r` a payment's refunded total (its refunds page), so one list's cursor is
# refused by another.
def _cursor(position: int, kind: str = "t") -> str:
    return base64.urlsafe_b64encode(f"{kind}{position}".encode()).decode().rstrip("=")


def _uncursor(cursor: str, kind: str = "t") -> int:
    """The position a cursor of `kind` names. An empty one is refused, as an empty
    `limit` is: read as none, a null `next_cursor` resent as `cursor=` started over."""
    if not cursor:
        raise BadCursor("cursor is empty: leave it out for the first page")
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        digits = text[1:]
        if not text.startswith(kind) or not (digits.isascii() and digits.isdigit()) or len(digits) > 19:
            raise ValueError
        position = int(digits)
        if not 0 < position < 2**63 or _cursor(position, kind) != cursor:  # as written: the decoder skips
            raise ValueError                                                # what is not base64 ("d.D.E" read "dDE")
        return position
    except (ValueError, UnicodeDecodeError):
        raise BadCursor("cursor is malformed") from None


# The kinds of the book's transactions (`ledger.book`'s `post` calls, the bulk writer's
# "grant"): what a member's history can be filtered by.
TXN_KINDS = ("topup", "payment", "cashback", "refund", "clawback", "withdrawal", "grant", "grant_expiry",
             "correction")


def member_transactions(conn: Connection, member_id: str, limit: int, cursor: str | None,
                        kinds: Sequence[str] = (), month: str | None = None) -> dict:
    """Newest first. Each item says what the transaction did to the member's balances.
    A bulk disbursement's transaction (ledger/bulk.py) carries many members: it is found
    through the member's `grant_disbursements` row, and shows that row's amount.

    `kinds` (any of them; none: all) and `month` (YYYY-MM: the transaction occurred in
    that Seoul month) filter; the order and the cursor are the unfiltered history's, so
    a page's cursor asked with the same filters gives the next matching items. The read
    walks the member's transactions newest first and skips what does not match: a
    member's history, not the book."""
    if conn.execute(select(s.members.c.member_id).where(s.members.c.member_id == member_id)).first() is None:
        raise MemberNotFound(f"no member {member_id!r}")
    t, d = s.ledger_txns, s.grant_disbursements
    before = _uncursor(cursor) if cursor is not None else None
    query = select(t).where(t.c.member_id == member_id)
    bulk = (select(t, d.c.disbursement_id, d.c.amount_won.label("bulk_amount_won"))
            .join(d, d.c.txn_id == t.c.txn_id).where(d.c.member_id == member_id, t.c.member_id.is_(None)))
    if kinds:
        query = query.where(t.c.kind.in_(sorted(set(kinds))))
        bulk = bulk.where(t.c.kind.in_(sorted(set(kinds))))
    if month is not None:
        first, last = period_days(month)
        start, end = local_midnight_us(first), local_midnight_us(last + dt.timedelta(days=1))
        query = query.where(t.c.occurred_at_us >= start, t.c.occurred_at_us < end)
        bulk = bulk.where(t.c.occurred_at_us >= start, t.c.occurred_at_us < end)
    if before is not None:
        query = query.where(t.c.txn_id < before)
        bulk = bulk.where(t.c.txn_id < before)
    own = conn.execute(query.order_by(t.c.txn_id.desc()).limit(limit + 1)).all()
    shared = {row.txn_id: row for row in conn.execute(bulk.order_by(t.c.txn_id.desc()).limit(limit + 1))}
    txns = sorted([*own, *shared.values()], key=lambda x: x.txn_id, reverse=True)
    more = len(txns) > limit
    txns = txns[:limit]
    legs: dict[int, list] = {}
    own_ids = [x.txn_id for x in txns if x.txn_id not in shared]
    if own_ids:
        for leg in conn.execute(select(s.ledger_legs).where(s.ledger_legs.c.txn_id.in_(own_ids))):
            legs.setdefault(leg.txn_id, []).append(leg)
    prefix = f"member/{member_id}/"
    receivable = acct.member_receivable(member_id)
    items = []
    for txn in txns:
        effect = {"charged": 0, "points": 0, "grants": 0, "owed": 0}
        ref = txn.ref
        if txn.txn_id in shared:
            effect["grants"] = shared[txn.txn_id].bulk_amount_won
            ref = shared[txn.txn_id].disbursement_id
        for leg in legs.get(txn.txn_id, []):
            if leg.account_id.startswith(prefix):
                tail = leg.account_id[len(prefix):]
                key = "grants" if tail.startswith("grant/") else tail
                effect[key] += -leg.amount_won  # member accounts are credit-normal
            elif leg.account_id == receivable:
                effect["owed"] += leg.amount_won  # an asset: debit-normal
        items.append({"transaction_id": txn.txn_id, "kind": txn.kind, "ref": ref, "merchant_id": txn.merchant_id,
                      "occurred_at": rfc3339(txn.occurred_at_us), "recorded_at": rfc3339(txn.recorded_at_us),
                      "balance_changes": effect})
    return {"items": items, "next_cursor": _cursor(txns[-1].txn_id) if more else None}


_ADDED_UP = ("amount", "returned_to_funders", "cashback_clawback", "owed_settled")
_ADDED_UP_DETAIL = ("from_points", "withheld_from_charged", "withheld_from_grants", "owed")
_RESTORED = ("grants", "points", "charged")

# The refunds a payment's read back holds: its first, in the order the book recorded
# them; the rest are on its refunds page (`payment_refunds`). A payment may be refunded
# in as many parts as it has won, and the answer is bounded as every list is; the usual
# payment has a handful, all of them here.
PAYMENT_REFUNDS_SHOWN = 50


def _answer_won(conn: Connection, *path: str):
    """A number of won in a refund's stored answer (`refunds.response`, JSON text), in
    SQL: NULL where the answer lacks it (one recorded before the field)."""
    response = s.refunds.c.response
    if conn.dialect.name == "postgresql":
        return cast(cast(response, JSONB)[path].astext, BigInteger)
    return func.json_extract(response, "$." + ".".join(path))


def _refund_order(conn: Connection):
    """A refund's place among its payment's: `payment_refunded_total` in its answer,
    what the payment's refunds came to with it. Each refund adds at least 1 won to the
    payment's row, read and written with its member locked (`ledger.book`), so it grows
    in the order the book recorded them, and one recorded later always comes last
    (`recorded_at` does not order them: refunds of one batch share it)."""
    return _answer_won(conn, "payment_refunded_total")


def _refund_answers(conn: Connection, payment_id: str, after: int | None, limit: int) -> list[dict]:
    """Up to `limit` of the payment's refunds recorded after the one whose refunded
    total is `after` (None: from the first), each its stored answer less its `balances`,
    with its `recorded_at`."""
    r, order = s.refunds, _refund_order(conn)
    query = select(r.c.response, r.c.recorded_at_us).where(r.c.payment_id == payment_id)
    if after is not None:
        query = query.where(order > after)
    refunds = []
    for response, recorded_at_us in conn.execute(query.order_by(order).limit(limit)):
        refund = orjson.loads(response)
        refund.pop("balances", None)
        refund["recorded_at"] = rfc3339(recorded_at_us)
        refunds.append(refund)
    return refunds


def _refunds_page(refunds: list[dict], limit: int) -> tuple[list[dict], str | None]:
    """The first `limit` of `refunds` (read `limit + 1`) and the cursor past them, None
    when there are no more."""
    page = refunds[:limit]
    return page, _cursor(page[-1]["payment_refunded_total"], "r") if len(refunds) > limit else None


def _refunded(conn: Connection, payment_id: str) -> tuple[int, dict]:
    """How many refunds the payment has, and their answers added up (`refunded` less
    `clawback_detail.not_recovered`), in SQL: over every refund, whatever their number."""
    paths = [(name,) for name in _ADDED_UP] + [("restored", name) for name in _RESTORED] + [
        ("clawback_detail", name) for name in _ADDED_UP_DETAIL]
    # PostgreSQL sums bigints as numeric: cast back, so each is an int on both backends.
    columns = [cast(func.coalesce(func.sum(_answer_won(conn, *path)), 0), BigInteger) for path in paths]
    count, *totals = conn.execute(select(func.count(), *columns)
                                  .where(s.refunds.c.payment_id == payment_id)).one()
    won = dict(zip(paths, (int(total) for total in totals)))
    refunded = {"amount": won[("amount",)], "restored": {name: won[("restored", name)] for name in _RESTORED}}
    refunded.update({name: won[(name,)] for name in _ADDED_UP[1:]})
    refunded["clawback_detail"] = {name: won[("clawback_detail", name)] for name in _ADDED_UP_DETAIL}
    return count, refunded


def payment(conn: Connection, payment_id: str, programs: ProgramCache) -> dict:
    """A payment as first answered and as it stands now (`GET /v1/payments/{id}`).

    The first answer is the one stored with the payment (the bytes a resend replays),
    its refunds' the ones stored with them: nothing is serialised a second time, so the
    read and a replay cannot drift apart. Their `balances` are left out (the member's
    then, not the payment's). What is derived is derived by the book's own rules:
    what the payment holds of its cashback is `cashback_held` (what a refund claws back
    from), and what its refunds so far still owe of their clawback is what a refund of
    nothing would take first (`plan_refund`), so no second copy of either rule."""
    from ledger.book import cashback_held, plan_refund
    from ledger.errors import PaymentNotFound

    p = s.payments
    row = conn.execute(select(p.c.status, p.c.amount_won, p.c.occurred_at_us, p.c.refunded_won, p.c.base_won,
                              p.c.detail, p.c.refund_state, p.c.response, p.c.recorded_at_us)
                       .where(p.c.payment_id == payment_id)).first()
    if row is None:
        raise PaymentNotFound(f"no payment {payment_id!r}")
    body = orjson.loads(row.response)
    body.pop("balances", None)
    body["recorded_at"] = rfc3339(row.recorded_at_us)
    # (`owed_settled`, `owed`: absent from answers recorded before them, added as 0)
    refund_count, refunded = _refunded(conn, payment_id)
    refunds, next_cursor = _refunds_page(
        _refund_answers(conn, payment_id, None, PAYMENT_REFUNDS_SHOWN + 1), PAYMENT_REFUNDS_SHOWN)
    by_component: dict[str, int] = {}
    by_funder: dict[str, int] = {}
    corrections: list[str] = []
    not_recovered = 0
    if row.status == "approved":
        stored = {"payment_id": payment_id, "amount_won": row.amount_won, "refunded_won": row.refunded_won,
                  "base_won": row.base_won, "detail": row.detail, "refund_state": row.refund_state}
        detail, state = orjson.loads(row.detail), orjson.loads(row.refund_state or "{}")
        for (component_id, source), won in sorted(cashback_held(detail, state).items()):
            if won:
                by_component[component_id] = by_component.get(component_id, 0) + won
                by_funder[source] = by_funder.get(source, 0) + won
        # a correction line's id is correction_id/member_id/month (ids hold no "/")
        corrections = [line_id.split("/", 1)[0] for line_id in state.get("corrected", {}).get("lines", [])]
        not_recovered = plan_refund(stored, 0, row.occurred_at_us, programs).clawback
    refunded["clawback_detail"]["not_recovered"] = not_recovered
    body["refunded"] = refunded
    body["refundable"] = row.amount_won - row.refunded_won if row.status == "approved" else 0
    body["cashback_now"] = {"amount": sum(by_funder.values()), "by_component": by_component,
                            "by_funder": by_funder, "corrections": corrections}
    body["refunds"] = refunds
    body["refund_count"] = refund_count
    body["refunds_next_cursor"] = next_cursor
    return body


def payment_refunds(conn: Connection, payment_id: str, limit: int, cursor: str | None) -> dict:
    """A page of the payment's refunds, in the order the book recorded them, each as
    `payment` shows it (`GET /v1/payments/{id}/refunds`); `next_cursor` None on the last.
    A cursor is a position in the payment's refunds, so a refund recorded since a page
    was read moves none of it: it comes on the last page."""
    from ledger.errors import PaymentNotFound

    after = _uncursor(cursor, "r") if cursor is not None else None
    if conn.execute(select(s.payments.c.payment_id).where(s.payments.c.payment_id == payment_id)).first() is None:
        raise PaymentNotFound(f"no payment {payment_id!r}")
    items, next_cursor = _refunds_page(_refund_answers(conn, payment_id, after, limit + 1), limit)
    return {"items": items, "next_cursor": next_cursor}


def budgets(conn: Connection, today: dt.date) -> list[dict]:
    """Every budget with its limit, what is committed, the forecast, and the request
    for a new limit waiting for its second person, if any (`ledger.budget_requests`)."""
    rows = conn.execute(select(s.budgets).order_by(s.budgets.c.source, s.budgets.c.period)).all()
    recent = recent_burn(conn, today)
    r = s.budget_requests
    pending = {(p.source, p.period): {"request_id": p.request_id, "amount": p.amount_won, "requested_by": p.requested_by}
               for p in conn.execute(select(r.c.source, r.c.period, r.c.request_id, r.c.amount_won, r.c.requested_by)
                                     .where(r.c.status == "pending"))}
    out = []
    for row in rows:
        remaining = None if row.limit_won is None else row.limit_won - row.committed_won
        out.append({"source": row.source, "period": row.period, "limit": row.limit_won,
                    "committed": row.committed_won, "remaining": remaining,
                    "used_bp": used_bp(row.committed_won, row.limit_won),
                    "forecast_exhausted_on": forecast_exhausted_on(
                        row.period, row.limit_won, row.committed_won, today,
                        recent_won=recent.get((row.source, row.period), 0)),
                    "pending_request": pending.get((row.source, row.period))})
    return with_payable(out)


def with_payable(rows: list[dict]) -> list[dict]:
    """Each budget row with `payable`, what its source can still pay in its period, and
    `payable_exhausted_on`, the day that reaches 0 at the recent burn: a month's the
    tighter of its own limit and its year's (the book pays the tighter of the two), a
    year's its own. A month row alone said 20,000 remaining, running out on the 11th,
    when the year's limit was spent and its source could pay nothing more (the budgets
    audit). None where neither limit is set (not limited)."""
    years = {(row["source"], row["period"]): row for row in rows if len(row["period"]) == 4}
    for row in rows:
        year = years.get((row["source"], row["period"][:4])) if len(row["period"]) == 7 else None
        limits = [r for r in (row, year) if r is not None and r["remaining"] is not None]
        row["payable"] = min((max(0, r["remaining"]) for r in limits), default=None)
        first, last = (day.isoformat() for day in period_days(row["period"]))
        days = [r["forecast_exhausted_on"] for r in limits
                if r["forecast_exhausted_on"] is not None and first <= r["forecast_exhausted_on"] <= last]
        row["payable_exhausted_on"] = min(days, default=None)
    return rows


def used_bp(committed: int, limit: int | None) -> int | None:
    """How much of a limit is committed, in basis points; a limit of 0 is all used."""
    if limit is None:
        return None
    return 10_000 if limit == 0 else committed * 10_000 // limit


def period_days(period: str) -> tuple[dt.date, dt.date]:
    """First and last day of a budget period ("2026" or "2026-11")."""
    if len(period) == 4:
        return dt.date(int(period), 1, 1), dt.date(int(period), 12, 31)
    return dt.date(int(period[:4]), int(period[5:7]), 1), _month_end(period)


BURN_WINDOW_DAYS = 7  # the forecast's recent burn: the last week of the period, today included


def burn_window_days(period: str, today: dt.date) -> int:
    """The days the forecast's recent burn is over: the last BURN_WINDOW_DAYS of the
    period through `today`, or its days so far when fewer (0: not begun)."""
    first, _ = period_days(period)
    return max(0, min(BURN_WINDOW_DAYS, (today - first).days + 1))


def recent_burn(conn: Connection, today: dt.date) -> dict[tuple[str, str], int]:
    """What each budget committed over its `burn_window_days` through `today`, net of
    what refunds, clawbacks and corrections gave back there (`budget_days`, dated by
    the book's clock). Budgets with no move in their window are absent (0)."""
    t = s.budget_days
    since = (today - dt.timedelta(days=BURN_WINDOW_DAYS - 1)).isoformat()
    out: dict[tuple[str, str], int] = {}
    for source, period, day, won in conn.execute(
            select(t.c.source, t.c.period, t.c.day, t.c.committed_won)
            .where(t.c.day >= since, t.c.day <= today.isoformat())):
        if day >= period_days(period)[0].isoformat():  # a period's window starts on its first day
            out[(source, period)] = out.get((source, period), 0) + int(won)
    return out


def forecast_exhausted_on(period: str, limit: int | None, committed: int, today: dt.date, *,
                          recent_won: int) -> str | None:
    """The day a budget's limit is reached if the rest of its period burns at its recent
    daily burn: `recent_won`, what it committed over its `burn_window_days` (the last 7
    days of the period through `today`, fewer early in a period), divided by those days
    (floored). Today when nothing is left; none when that day falls outside the period,
    when the period has not begun or has ended, or when nothing is burning (money given
    back in the window is no burn). The API's budgets and the settlement reports
    forecast by this one rule."""
    first, last = period_days(period)
    if limit is None or not first <= today <= last:
        return None
    remaining = limit - committed
    if remaining <= 0:
        return today.isoformat()
    per_day = recent_won // burn_window_days(period, today)
    if per_day <= 0:
        return None
    days = -(-remaining // per_day)
    if days > (last - today).days:  # also before the date overflows: 10^12 left at 1 won a day
        return None
    return (today + dt.timedelta(days=days)).isoformat()


def _month_end(month: str) -> dt.date:
    year, mon = int(month[:4]), int(month[5:7])
    first_next = dt.date(year + (mon == 12), mon % 12 + 1, 1)
    return first_next - dt.timedelta(days=1)


# ---------------------------------------------------------------- book checks


@dataclass(frozen=True)
class BookCheck:
    name: str
    ok: bool
    detail: str = ""


def txns_without_leg_0(limit: int = 5):
    """The first transactions without a leg 0, as a set difference: hashed or sorted,
    never a loop per transaction. Written as NOT EXISTS, PostgreSQL planned a nested loop
    over a scan of the legs when the tables' statistics were those of an empty book (a
    fresh database with autovacuum off, a lunch-peak run's 27,582 transactions): the
    check ran past the statement timeout and the run's book checks failed."""
    legs, txns = s.ledger_legs, s.ledger_txns
    difference = select(txns.c.txn_id).except_(select(legs.c.txn_id).where(legs.c.leg_no == 0)).subquery()
    return select(difference.c.txn_id).order_by(difference.c.txn_id).limit(limit)


def check_book(conn: Connection) -> list[BookCheck]:
    """The money invariant, read back from the database. Cheap enough for tests and
    after load runs; settlement runs the same checks per day."""
    legs, txns, accounts = s.ledger_legs, s.ledger_txns, s.accounts
    out = []
    unbalanced = conn.execute(select(legs.c.txn_id).group_by(legs.c.txn_id)
                              .having(func.sum(legs.c.amount_won) != 0).limit(5)).scalars().all()
    out.append(BookCheck("transactions balance", not unbalanced, f"unbalanced: {unbalanced}" if unbalanced else ""))
    total = conn.execute(select(func.coalesce(func.sum(legs.c.amount_won), 0))).scalar_one()
    out.append(BookCheck("trial balance is zero", total == 0, f"sum of all legs = {total}"))
    orphans = conn.execute(select(func.count()).select_from(legs).outerjoin(txns, txns.c.txn_id == legs.c.txn_id)
                           .where(txns.c.txn_id.is_(None))).scalar_one()
    out.append(BookCheck("every leg is sealed", orphans == 0, f"{orphans} unsealed legs" if orphans else ""))
    # Each transaction numbers its legs from 0: on PostgreSQL the legs' guard relies on it
    # (a sealed transaction's leg 0 is in the table, so the primary key refuses legs for
    # it in a statement that brings its leg 0; migration 0024).
    no_first = conn.execute(txns_without_leg_0()).scalars().all()
    out.append(BookCheck("every transaction has its leg 0", not no_first, f"without: {no_first}" if no_first else ""))
    sums = dict(conn.execute(select(legs.c.account_id, func.sum(legs.c.amount_won)).group_by(legs.c.account_id)).all())
    mismatched, negative = [], []
    for account_id, balance, floor_zero in conn.execute(select(accounts.c.account_id, accounts.c.balance_won,
                                                               accounts.c.floor_zero)):
        expected = acct.natural_delta(account_id, int(sums.get(account_id, 0)))
        if expected != balance:
            mismatched.append((account_id, balance, expected))
        if floor_zero and balance < 0:
            negative.append(account_id)
    out.append(BookCheck("balances equal their legs", not mismatched, str(mismatched[:5]) if mismatched else ""))
    out.append(BookCheck("no floor-zero account below zero", not negative, str(negative[:5]) if negative else ""))
    b = s.budgets
    over = conn.execute(select(b.c.source, b.c.period).where((b.c.limit_won.is_not(None)) &
                                                             (b.c.committed_won > b.c.limit_won))).all()
    out.append(BookCheck("no budget over its limit", not over, str(over) if over else ""))
    committed = _funder_totals(conn)
    wrong = [(src, per, row_c, committed.get((src, per), 0))
             for src, per, row_c in conn.execute(select(b.c.source, b.c.period, b.c.committed_won))
             if committed.get((src, per), 0) != row_c]
    out.append(BookCheck("budgets equal funder accounts", not wrong, str(wrong[:5]) if wrong else ""))
    off_days = _budget_days_off(conn)
    out.append(BookCheck("budget days sum to their budgets", not off_days, str(off_days[:5]) if off_days else ""))
    drifted = _month_counters_drifted(conn)
    out.append(BookCheck("month counters equal their payments and top-ups", not drifted,
                         str(drifted[:5]) if drifted else ""))
    off = _cashback_off_the_book(conn)
    out.append(BookCheck("cashback posted once per payment, as recorded", not off, str(off[:5]) if off else ""))
    cashback_drifted = _month_cashback_drifted(conn)
    out.append(BookCheck("month cashback counters equal their funder legs", not cashback_drifted,
                         str(cashback_drifted[:5]) if cashback_drifted else ""))
    unmatched = _withdrawals_off_the_book(conn)
    out.append(BookCheck("withdrawals equal their ledger transactions", not unmatched,
                         str(unmatched[:5]) if unmatched else ""))
    ungranted = _disbursements_off_the_book(conn)
    out.append(BookCheck("grant disbursements equal their ledger transactions", not ungranted,
                         str(ungranted[:5]) if ungranted else ""))
    edited = _documents_not_as_audited(conn)
    out.append(BookCheck("policies, grant programs and corrections are as audited", not edited,
                         str(edited[:5]) if edited else ""))
    undated = _registry_not_as_versioned(conn)
    out.append(BookCheck("registry rows equal their latest fact versions", not undated,
                         ", ".join(undated[:10]) if undated else ""))
    unsettled = _settled_dates_not_covered(conn)
    out.append(BookCheck("every transaction of a settled date is in one settlement", not unsettled,
                         "; ".join(f"{day}: {ledger} in the ledger, {counted} settled"
                                   for day, ledger, counted in unsettled[:5]) if unsettled else ""))
    return out


def _settled_dates_not_covered(conn: Connection) -> list[tuple[str, int, int]]:
    """The settled dates whose transactions recorded up to the last run's watermark are
    not, in number, those the runs counted (`settlement_coverage`), as (date, in the
    ledger, counted). A date's latest successful run counted all of it up to its
    watermark (a correction run recounts the whole day), and each later run counts, as
    adjustments, its transactions recorded in that run's window; the windows partition
    time (docs/settlement.md, "the watermark"), so the two are equal, unless a run missed
    one: a clock stepped back by more than the hour a run looks back for
    (`STEP_BACK_MAX_US`) stamps a late transaction before every later window, and no run
    settles it, its merchant never paid. Found here, the date is reopened, and its
    correction run settles it and counts it. Transactions stamped after the last
    watermark are the next run's, not counted."""
    from settlement import schema as ss
    from settlement.ledger_read import SUCCESSFUL

    st, cov, t = ss.settlements, ss.settlement_coverage, s.ledger_txns
    runs = conn.execute(select(st.c.settlement_id, st.c.business_date, st.c.version, st.c.watermark_us)
                        .where(st.c.status.in_(SUCCESSFUL))).all()
    if not runs:
        return []
    latest: dict[str, tuple] = {}  # date: its latest successful run
    for run in runs:
        if run.business_date not in latest or run.version > latest[run.business_date].version:
            latest[run.business_date] = run
    watermark = {run.settlement_id: run.watermark_us for run in runs}
    counted = dict.fromkeys(latest, 0)
    for settlement_id, day, kind, n in conn.execute(
            select(cov.c.settlement_id, cov.c.business_date, cov.c.kind, cov.c.txn_count)
            .where(cov.c.settlement_id.in_(list(watermark)))):
        own = latest.get(day)
        if own is None:
            continue
        if settlement_id == own.settlement_id and kind != "adjustment":
            counted[day] += int(n)
        elif kind == "adjustment" and watermark[settlement_id] > own.watermark_us:
            counted[day] += int(n)
    last = max(watermark.values())
    ledger = {day: int(n) for day, n in conn.execute(
        select(t.c.business_date, func.count()).where(t.c.business_date.in_(list(latest)), t.c.recorded_at_us <= last)
        .group_by(t.c.business_date))}
    return [(day, ledger.get(day, 0), counted[day]) for day in sorted(latest) if ledger.get(day, 0) != counted[day]]


def _registry_not_as_versioned(conn: Connection) -> list[str]:
    """Merchants and members whose row is not their latest fact version (migration
    0022): changed around the registry (an UPDATE by hand, a loader of its own), so a
    correction would judge their payments since by the version before (or, with none
    at all, by the row as it stands then: `settlement.simulate._fact_versions`)."""
    found = []
    for kind, rows, versions, key, facts in (
            ("merchant", s.merchants, s.merchant_facts, "merchant_id",
             ("district", "category", "annual_sales_won", "registered_from", "flags", "merchant_share_bp")),
            ("member", s.members, s.member_facts, "member_id", ("district", "status"))):
        latest = (select(func.max(versions.c.valid_from_us)).where(versions.c[key] == rows.c[key])
                  .correlate(rows).scalar_subquery())
        joined = rows.outerjoin(versions, (versions.c[key] == rows.c[key]) & (versions.c.valid_from_us == latest))
        differs = or_(versions.c[key].is_(None), *(versions.c[f] != rows.c[f] for f in facts))
        found += [f"{kind} {entity_id}" for entity_id in conn.execute(
            select(rows.c[key]).select_from(joined).where(differs).order_by(rows.c[key]).limit(5)).scalars()]
    return found


def _documents_not_as_audited(conn: Connection) -> list[str]:
    """Policies and grant programs whose stored row is not what their audit entries
    recorded: a document other than its create or load entry's (a digest for policies,
    the whole document for programs); a policy with no such entry at all; an API policy
    approved, in force or withdrawn without the entry that made it so (its approver's,
    its activation at that instant). These rows decide money, and their tables have no
    append-only guard of their own: an UPDATE of a rate or of a draft's status would
    pay by rules nobody approved. Entries from before the digests vouch for no document."""
    import hashlib

    from rules.timeutil import rfc3339

    a = s.audit_log
    recorded: dict[tuple[str, str], dict] = {}
    approvers: dict[str, set[str]] = {}
    activations: dict[str, set[str]] = {}
    withdrawn: set[str] = set()
    program_approvals: set[str] = set()
    program_closed: dict[str, dict | None] = {}  # the last close (its detail) or reopen (None) of each
    # Releases before the close entry (7083544) expired a program with one
    # `grant_program.expire` entry, the close's only record (below).
    expired_before_closes: dict[str, dict] = {}
    closes_seen = False
    proposed: dict[str, dict] = {}
    correction_approvers: dict[str, set[str]] = {}
    correction_posts: set[str] = set()
    for object_type, object_id, action, actor, detail in conn.execute(
            select(a.c.object_type, a.c.object_id, a.c.action, a.c.actor, a.c.detail)
            .where(a.c.action.in_(("policy.create", "policy.load_file", "grant_program.create", "policy.approve",
                                   "policy.activate", "policy.withdraw", "grant_program.approve",
                                   "grant_program.close", "grant_program.reopen", "grant_program.expire",
                                   "correction.propose", "correction.approve", "correction.post")))
            .order_by(a.c.entry_id)):
        if action == "grant_program.approve":
            program_approvals.add(object_id)
        elif action == "grant_program.close":
            program_closed[object_id] = orjson.loads(detail)
            closes_seen = True
        elif action == "grant_program.expire":
            if not closes_seen:  # every expiry since writes a close first: a later one alone is no release's
                expired_before_closes[object_id] = orjson.loads(detail)
        elif action == "grant_program.reopen":
            program_closed[object_id] = None
        elif action == "correction.propose":
            proposed[object_id] = orjson.loads(detail)
        elif action == "correction.approve":
            correction_approvers.setdefault(object_id, set()).add(actor)
        elif action == "correction.post":
            correction_posts.add(object_id)
        elif action == "policy.approve":
            approvers.setdefault(object_id, set()).add(actor)
        elif action == "policy.activate":
            activations.setdefault(object_id, set()).add(orjson.loads(detail).get("effective_from"))
        elif action == "policy.withdraw":
            withdrawn.add(object_id)
        else:
            recorded[(object_type, object_id)] = {**orjson.loads(detail), "_action": action}
    edited = []
    p = s.policies
    for row in conn.execute(select(p.c.policy_id, p.c.document, p.c.status, p.c.origin, p.c.approver,
                                   p.c.effective_from_us)):
        entry = recorded.get(("policy", row.policy_id))
        digest = None if entry is None else entry.get("document_sha256")
        if entry is None:
            edited.append(f"policy {row.policy_id}: no create entry")
        elif digest is not None and digest != hashlib.sha256(row.document.encode()).hexdigest():
            edited.append(f"policy {row.policy_id}: document")
        made_by = None if entry is None else entry["_action"]
        if row.origin == "file":  # recorded from a file: in force from the instant its entry says, always
            if made_by == "policy.create" or (entry is not None and (
                    row.status != "activated" or entry.get("effective_from") != rfc3339(row.effective_from_us))):
                edited.append(f"policy {row.policy_id}: not as its file was recorded")
            continue
        if made_by == "policy.load_file":
            edited.append(f"policy {row.policy_id}: recorded from a file, now marked {row.origin}")
        if row.status in ("approved", "activated") and row.approver not in approvers.get(row.policy_id, ()):
            edited.append(f"policy {row.policy_id}: approval")
        if row.status == "activated" and rfc3339(row.effective_from_us) not in activations.get(row.policy_id, ()):
            edited.append(f"policy {row.policy_id}: activation")
        if row.status == "withdrawn" and row.policy_id not in withdrawn:
            edited.append(f"policy {row.policy_id}: withdrawal")
        if row.status in ("approved", "activated") and row.policy_id in withdrawn:  # a withdrawal is final
            edited.append(f"policy {row.policy_id}: withdrawn, yet {row.status}")
    # A book an earlier release expired a program in (its expire entry, written before the
    # book's first close, naming the program; no close or reopen of it at all) has that
    # entry for its close, from a program not a draft (those releases refused to expire
    # one): it stays BAD otherwise after the upgrade, for good, as if tampered with (the
    # upgrade audit). A status set by an UPDATE, or an expiry of theirs undone by one,
    # still shows.
    for program_id, detail in expired_before_closes.items():
        if program_id not in program_closed and detail.get("program_id") == program_id:
            program_closed[program_id] = {**detail, "status_before": None}
    g = s.grant_programs
    for program_id, text, status in conn.execute(select(g.c.program_id, g.c.document, g.c.status)):
        document = recorded.get(("grant_program", program_id))
        if document is None:
            edited.append(f"grant program {program_id}: no create entry")
        elif {k: v for k, v in document.items() if k != "_action"} != orjson.loads(text):
            edited.append(f"grant program {program_id}")
        # Open or expired only by a second person's approval, expired by a close (the
        # last of its closes and reopens): a draft opened by an UPDATE paid out with the
        # check green (the security audit).
        closed = program_closed.get(program_id)
        if status == "open" and program_id not in program_approvals:
            edited.append(f"grant program {program_id}: open without an approval")
        if status == "expired" and closed is None:
            edited.append(f"grant program {program_id}: expired without a close")
        if status == "expired" and closed and closed.get("status_before") != "draft" \
                and program_id not in program_approvals:
            edited.append(f"grant program {program_id}: approval")
        if status != "expired" and closed is not None:
            edited.append(f"grant program {program_id}: closed, yet {status}")
    # Corrections move money by lines fixed at the proposal: approved or posted only with
    # the approver's entry, posted with a posting, and the lines as the proposal's entry
    # recorded them (its digest, `correction_lines_sha256`): a correction marked approved
    # by an UPDATE was posted by the next approval call, "the rest" (the security audit).
    c = s.corrections
    for correction_id, status, approver in conn.execute(select(c.c.correction_id, c.c.status, c.c.approver)):
        edited += [f"correction {correction_id}: {what}" for what in correction_not_as_audited(
            conn, correction_id, status, approver, proposed.get(correction_id),
            correction_approvers.get(correction_id, set()), correction_id in correction_posts)]
    return edited


def correction_not_as_audited(conn: Connection, correction_id: str, status: str, approver: str | None,
                              proposal: dict | None, approvers: set[str], posted: bool) -> list[str]:
    """What of a correction is not as its audit entries made it: "no propose entry";
    "approval" (approved or posted without its approver's `correction.approve`);
    "posting" (posted without a `correction.post`); "lines" (its lines and their payments
    not as the proposal's digest recorded them; proposals from before it are not
    compared). `check_book` reports them and approval refuses them
    (`ledger.corrections._refuse_if_not_as_proposed`)."""
    if proposal is None:
        return ["no propose entry"]
    found = []
    if status in ("approved", "posted") and approver not in approvers:
        found.append("approval")
    if status == "posted" and not posted:
        found.append("posting")
    digest = proposal.get("lines_sha256")
    if digest is not None and digest != correction_lines_sha256(conn, correction_id):
        found.append("lines")
    return found


def correction_lines_sha256(conn: Connection, correction_id: str) -> str:
    """The digest of a correction's lines and their payments as stored, which its
    `correction.propose` entry records (`ledger.corrections.propose`) and approval and
    `check_book` compare: what posting moves is fixed by them."""
    import hashlib

    cl, cp = s.correction_lines, s.correction_payments
    lines = [list(row) for row in conn.execute(
        select(cl.c.line_id, cl.c.member_id, cl.c.month, cl.c.delta_won, cl.c.by_funder, cl.c.by_component,
               cl.c.request_hash).where(cl.c.correction_id == correction_id).order_by(cl.c.line_id))]
    payments = [list(row) for row in conn.execute(
        select(cp.c.line_id, cp.c.payment_id, cp.c.refunded_won, cp.c.deltas, cp.c.corrections_seen, cp.c.base)
        .join(cl, cl.c.line_id == cp.c.line_id).where(cl.c.correction_id == correction_id)
        .order_by(cp.c.line_id, cp.c.payment_id))]
    return hashlib.sha256(orjson.dumps({"lines": lines, "payments": payments})).hexdigest()


def _month_counters_drifted(conn: Connection) -> list[tuple]:
    """Each member-month's eligible spend (what the cap's bands and the monthly limits
    read) and top-ups, recomputed from the request rows: approved payments that count
    toward the month, less the base their refunds gave back; approved top-ups by their
    Seoul month. A counter written from a stale read would pass every money check and
    still let a member past the top-up limit or the cashback cap."""
    from rules.timeutil import local_date, month_of

    p, t, m = s.payments, s.topups, s.member_months
    expected: dict[tuple[str, str], list[int]] = {}
    counted = (p.c.status == "approved") & p.c.counts_toward_month
    for member_id, month, base in conn.execute(select(p.c.member_id, p.c.month, func.sum(p.c.base_won))
                                               .where(counted).group_by(p.c.member_id, p.c.month)):
        expected.setdefault((member_id, month), [0, 0])[0] += int(base)
    for member_id, month, state in conn.execute(select(p.c.member_id, p.c.month, p.c.refund_state)
                                                .where(counted & (p.c.refunded_won > 0))):
        expected.setdefault((member_id, month), [0, 0])[0] -= int(orjson.loads(state).get("base", 0))
    for member_id, at_us, amount in conn.execute(select(t.c.member_id, t.c.occurred_at_us, t.c.amount_won)
                                                 .where(t.c.status == "approved")):
        expected.setdefault((member_id, month_of(local_date(at_us))), [0, 0])[1] += int(amount)
    drifted = []
    for member_id, month, eligible, topped_up in conn.execute(
            select(m.c.member_id, m.c.month, m.c.eligible_spend_won, m.c.topped_up_won)):
        want = expected.pop((member_id, month), [0, 0])
        if [eligible, topped_up] != want:
            drifted.append((member_id, month, (eligible, topped_up), tuple(want)))
    drifted += [(member_id, month, None, tuple(want)) for (member_id, month), want in expected.items() if any(want)]
    return drifted


def _cashback_off_the_book(conn: Connection) -> list[tuple]:
    """Payments whose cashback and ledger disagree: an approved payment with cashback is
    one `cashback` transaction whose funder legs pay its `cashback_won`, and a payment
    without any has none; each `cashback` transaction is a payment's. A transaction
    posted twice moves balances and budgets alike, so every other money check passes
    (the load-run audit: 268,000 won of points against a 50,000 cap went unseen).
    (payment_id, recorded cashback_won or None, transactions, won their legs paid)."""
    p, t, legs = s.payments, s.ledger_txns, s.ledger_legs
    paid = (select(t.c.ref.label("ref"), func.count(func.distinct(t.c.txn_id)).label("txns"),
                   func.coalesce(func.sum(legs.c.amount_won), 0).label("won"))
            .join(legs, legs.c.txn_id == t.c.txn_id)
            .where(t.c.kind == "cashback", legs.c.account_id.like("funder/%"))
            .group_by(t.c.ref).subquery())
    want = case((p.c.status == "approved", p.c.cashback_won), else_=0)
    found = [(payment_id, int(cashback), int(txns), int(won)) for payment_id, cashback, txns, won in conn.execute(
        select(p.c.payment_id, want, func.coalesce(paid.c.txns, 0), func.coalesce(paid.c.won, 0))
        .outerjoin(paid, paid.c.ref == p.c.payment_id)
        .where((func.coalesce(paid.c.won, 0) != want)
               | (func.coalesce(paid.c.txns, 0) != case((want > 0, 1), else_=0)))
        .limit(5))]
    found += [(ref, None, int(txns), int(won)) for ref, txns, won in conn.execute(
        select(paid.c.ref, paid.c.txns, paid.c.won)
        .where(~select(p.c.payment_id).where(p.c.payment_id == paid.c.ref).exists()).limit(5))]
    return found


def _month_cashback_drifted(conn: Connection) -> list[tuple]:
    """Member-months whose cashback counter (what a policy's monthly cashback cap reads)
    is not what the ledger paid them: the funder legs, on that month's accounts, of the
    member's cashback, clawback and correction transactions. (A counter floors at 0
    where a correction posted before migration 0014 took what a refund then took again:
    such a book shows those months here.) (member_id, month, counter, ledger)."""
    t, legs, m = s.ledger_txns, s.ledger_legs, s.member_months
    expected: dict[tuple[str, str], int] = {}
    for member_id, account_id, won in conn.execute(
            select(t.c.member_id, legs.c.account_id, func.sum(legs.c.amount_won))
            .join(legs, legs.c.txn_id == t.c.txn_id)
            .where(t.c.kind.in_(("cashback", "clawback", "correction")), legs.c.account_id.like("funder/%"))
            .group_by(t.c.member_id, legs.c.account_id)):
        key = (member_id, account_id.rsplit("/", 1)[1])
        expected[key] = expected.get(key, 0) + int(won)
    drifted = []
    for member_id, month, cashback in conn.execute(select(m.c.member_id, m.c.month, m.c.cashback_won)):
        want = expected.pop((member_id, month), 0)
        if cashback != want:
            drifted.append((member_id, month, cashback, want))
    drifted += [(member_id, month, None, want) for (member_id, month), want in expected.items() if want]
    return drifted


def _withdrawals_off_the_book(conn: Connection) -> list[tuple]:
    """Withdrawals whose record and ledger disagree: each approved `withdrawals` row is one
    `withdrawal` transaction moving its amount from the member's charged money to the
    operator's cash, less what settled what the member owed (to their receivable), and
    each such transaction is an approved row's. (A declined row moved nothing.) The
    stored answer (what the card app was told, and a replay sends again) is held to it
    too: its `amount` is the row's, its `owed_settled` went to the receivable and its
    `paid_out` out of the operator's cash."""
    w, t, legs = s.withdrawals, s.ledger_txns, s.ledger_legs
    expected, told = {}, []
    for ref, member_id, amount, response in conn.execute(
            select(w.c.withdrawal_id, w.c.member_id, w.c.amount_won, w.c.response).where(w.c.status == "approved")):
        amount, answer = int(amount), orjson.loads(response)
        # `owed_settled` and `paid_out` are absent from answers recorded before withdrawals
        # settled what is owed: all of it was paid out.
        settled = int(answer.get("owed_settled") or 0)
        paid_out = answer.get("paid_out")
        paid_out = amount - settled if paid_out is None else int(paid_out)
        moved = {acct.member_charged(member_id): amount, acct.OPERATOR_CASH: -paid_out,
                 acct.member_receivable(member_id): -settled}
        expected[ref] = {account_id: won for account_id, won in moved.items() if won}
        if answer.get("amount") != amount:
            told.append((ref, {"amount": amount}, {"the answer's amount": answer.get("amount")}))
    booked: dict[str, dict[str, int]] = {}
    for ref, account_id, amount in conn.execute(select(t.c.ref, legs.c.account_id, legs.c.amount_won)
                                                .join(legs, legs.c.txn_id == t.c.txn_id)
                                                .where(t.c.kind == "withdrawal")):
        moved = booked.setdefault(ref, {})
        moved[account_id] = moved.get(account_id, 0) + int(amount)
    return told + [(ref, expected.get(ref), booked.get(ref)) for ref in sorted(set(expected) | set(booked))
                   if expected.get(ref) != booked.get(ref)]


def _disbursements_off_the_book(conn: Connection) -> list[tuple]:
    """Grant disbursements whose record and ledger disagree. A disbursement given alone is
    one `grant` transaction (ref its id, the member's) crediting its amount to the
    member's lot of its program; one of a bulk chunk (`txn_id` set) is its line in the
    chunk's transaction, which credits each of its rows' lots and nothing else; and each
    `grant` transaction is a disbursement's. (The program's money, `disbursed = held +
    spent + returned`, is read off the same legs, so it holds whatever the rows say: a
    row edited, or a chunk posted without its rows, went unseen by every check.)
    (a disbursement id, its amount (None: no row), (its transactions, won they credited));
    (a bulk transaction and what is off, the lot, won)."""
    d, t, legs = s.grant_disbursements, s.ledger_txns, s.ledger_legs
    credited = func.coalesce(-func.sum(legs.c.amount_won), 0)
    lots = legs.c.account_id.like("member/%")
    # alone: per (ref, member, lot account), its transactions and what they credited
    alone = (select(t.c.ref.label("ref"), t.c.member_id.label("member_id"), legs.c.account_id.label("account_id"),
                    func.count(func.distinct(t.c.txn_id)).label("txns"), credited.label("won"))
             .join(legs, legs.c.txn_id == t.c.txn_id)
             .where(t.c.kind == "grant", t.c.member_id.is_not(None), lots)
             .group_by(t.c.ref, t.c.member_id, legs.c.account_id).subquery())
    lot = "member/" + d.c.member_id + "/grant/" + d.c.program_id
    found = [(ref, int(amount), (int(txns), int(won))) for ref, amount, txns, won in conn.execute(
        select(d.c.disbursement_id, d.c.amount_won, func.coalesce(alone.c.txns, 0), func.coalesce(alone.c.won, 0))
        .outerjoin(alone, and_(alone.c.ref == d.c.disbursement_id, alone.c.member_id == d.c.member_id,
                               alone.c.account_id == lot))
        .where(d.c.txn_id.is_(None))
        .where((func.coalesce(alone.c.won, 0) != d.c.amount_won) | (func.coalesce(alone.c.txns, 0) != 1))
        .limit(5))]
    given = select(d.c.disbursement_id).where(d.c.txn_id.is_(None), d.c.disbursement_id == alone.c.ref,
                                              d.c.member_id == alone.c.member_id, lot == alone.c.account_id)
    found += [(ref, None, (int(txns), int(won))) for ref, txns, won in conn.execute(
        select(alone.c.ref, alone.c.txns, alone.c.won).where(~given.exists()).limit(5))]
    # in bulk: each row is one credit leg of its chunk's transaction on the row's lot (a
    # member is once in a chunk), and each credit leg of a chunk's transaction is a row's
    rows = (select(d.c.txn_id.label("txn_id"), lot.label("account_id"), (-d.c.amount_won).label("won"))
            .where(d.c.txn_id.is_not(None)))
    credits = (select(legs.c.txn_id, legs.c.account_id, legs.c.amount_won).join(t, t.c.txn_id == legs.c.txn_id)
               .where(t.c.kind == "grant", t.c.member_id.is_(None), lots))
    for what, query in (("a row its chunk does not credit", rows.except_(credits)),
                        ("a credit no row of its chunk gives", credits.except_(rows))):
        found += [(f"bulk transaction {txn_id}: {what}", account_id, -int(won))
                  for txn_id, account_id, won in conn.execute(select(query.subquery()).limit(5))]
    return found


def _budget_days_off(conn: Connection) -> list[tuple[str, str, int, int]]:
    """Budgets whose days (`budget_days`, the forecast's recent burn) do not sum to what
    the budget row holds committed: (source, period, committed, days' sum). Days of a
    budget with no row count against a row holding 0."""
    b, d = s.budgets, s.budget_days
    days = {(src, per): int(won) for src, per, won in conn.execute(
        select(d.c.source, d.c.period, func.sum(d.c.committed_won)).group_by(d.c.source, d.c.period))}
    rows = {(src, per): int(won) for src, per, won in conn.execute(select(b.c.source, b.c.period, b.c.committed_won))}
    return [(src, per, rows.get((src, per), 0), days.get((src, per), 0)) for src, per in sorted(set(days) | set(rows))
            if rows.get((src, per), 0) != days.get((src, per), 0)]


def _funder_totals(conn: Connection) -> dict[tuple[str, str], int]:
    a = s.accounts
    out: dict[tuple[str, str], int] = {}
    for account_id, balance in conn.execute(select(a.c.account_id, a.c.balance_won).where(a.c.account_id.like("funder/%"))):
        _, source, month = account_id.split("/")
        for period in (month, month[:4]):
            out[(source, period)] = out.get((source, period), 0) + balance
    return out




def grant_programs(conn: Connection) -> list[dict]:
    """Every grant program with its status, its creator and (from the audit log) its approver."""
    t, log = s.grant_programs, s.audit_log
    approvers = dict(conn.execute(select(log.c.object_id, log.c.actor)
                                  .where(log.c.object_type == "grant_program")
                                  .where(log.c.action == "grant_program.approve")).all())
    rows = conn.execute(select(t.c.program_id, t.c.name, t.c.status, t.c.valid_from_us, t.c.valid_until_us,
                               t.c.created_by, t.c.created_at_us)
                        .order_by(t.c.valid_from_us, t.c.program_id)).all()
    return [{"program_id": r.program_id, "name": r.name, "status": r.status,
             "valid_from": rfc3339(r.valid_from_us), "valid_until": rfc3339(r.valid_until_us),
             "created_by": r.created_by, "approved_by": approvers.get(r.program_id),
             "created_at": rfc3339(r.created_at_us)} for r in rows]


def grant_program(conn: Connection, program_id: str) -> dict:
    """A program's terms and where its money is, to the won:
    disbursed = held by members + spent at merchants + returned to funders."""
    from ledger.errors import ProgramNotFound
    from rules.grants import GrantProgramDocument

    row = conn.execute(select(s.grant_programs).where(s.grant_programs.c.program_id == program_id)).first()
    if row is None:
        raise ProgramNotFound(f"no grant program {program_id!r}")
    document = GrantProgramDocument.model_validate_json(row.document)
    legs, txns = s.ledger_legs, s.ledger_txns
    by_kind = dict(conn.execute(
        select(txns.c.kind, func.sum(legs.c.amount_won)).join(txns, txns.c.txn_id == legs.c.txn_id)
        .where(acct.program_lots_sql(legs.c.account_id, program_id)).group_by(txns.c.kind)).all())
    held = conn.execute(select(func.coalesce(func.sum(s.accounts.c.balance_won), 0))
                        .where(acct.program_lots_sql(s.accounts.c.account_id, program_id))).scalar_one()
    funds = dict(conn.execute(select(s.accounts.c.account_id, s.accounts.c.balance_won)
                              .where(acct.program_funds_sql(s.accounts.c.account_id, program_id))).all())
    disbursed = -int(by_kind.get("grant", 0))
    # A refund of money spent after the program ended goes from the merchant straight
    # back to the funders (`grantfund` legs, no lot leg): spent no more, and returned.
    refunded_to_funders = -int(conn.execute(
        select(func.coalesce(func.sum(legs.c.amount_won), 0)).join(txns, txns.c.txn_id == legs.c.txn_id)
        .where(acct.program_funds_sql(legs.c.account_id, program_id), txns.c.kind == "refund")).scalar_one())
    funders_net: dict[str, int] = {}  # grantfund/{program}/{source}, and /unspent taken by a named funder
    for account_id, balance in funds.items():
        source = account_id.split("/")[2]
        funders_net[source] = funders_net.get(source, 0) + int(balance)
    return {
        "program_id": program_id, "name": row.name, "status": row.status,
        "valid_from": rfc3339(row.valid_from_us), "valid_until": rfc3339(row.valid_until_us),
        "document": document.model_dump(mode="json", exclude_none=True),
        "money": {
            "disbursed": disbursed,
            # a refund's clawback kept back from the grant money it restored counts as spent
            # (on the cashback given back to its funders)
            "spent_net_of_refunds": int(by_kind.get("payment", 0)) + int(by_kind.get("refund", 0))
            + int(by_kind.get("clawback", 0)) - refunded_to_funders,
            "returned_to_funders": int(by_kind.get("grant_expiry", 0)) + refunded_to_funders,
            "held_by_members": int(held),
            "funders_net": funders_net,
        },
    }
