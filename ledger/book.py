"""The book of record: executes batches of card-app commands in one database transaction.

One batch = one transaction = one commit (group commit). Inside it:
  1. lock the members the batch touches (sorted; PostgreSQL `FOR UPDATE`, SQLite's
     `BEGIN IMMEDIATE` write lock), then read their balances and month counters;
  2. check idempotency (after the member lock, so a racing duplicate sees the winner);
  3. lock the budget rows the batch could charge (sorted), read them;
  4. evaluate every command in order with the pure rules, against in-memory state;
  5. write ledger legs, seal transactions, update balances, counters and budgets
     (accounts sorted, so every batch takes row locks in one global order:
     members, then budgets, then other accounts — no deadlock between workers; a
     member's own accounts, which only the holder of its member row writes, before
     the budgets).

The money invariant, checked by the database and by `ledger.checks`:
  every transaction's legs sum to zero; no member balance, funder account or budget
  goes below zero; no budget passes its limit; each account's balance equals the sum
  of its legs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import math
import threading
import time
from collections import namedtuple
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import orjson
import structlog
from sqlalchemy import Connection, Engine, func, select, tuple_
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import DataError, DBAPIError, IntegrityError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from ledger import accounts as acct
from ledger import audit, pgstore
from ledger import schema as s
from ledger.commands import (FUTURE_SKEW_S, FUTURE_SKEW_US, Command, Correct, Disburse, ExpireLot, Outcome, Pay,
                             Refund, TopUp, Withdraw)
from ledger.db import CONNECTION_MAX_AGE_S, error_kind
from ledger.errors import (
    Conflict,
    CorrectedSincePlanned,
    EumError,
    IdempotencyConflict,
    InternalError,
    MemberHeld,
    MemberNotFound,
    OccurredInFuture,
    PaymentNotFound,
    PaymentsSincePlanned,
    RefundBeforePayment,
    PaymentNotRefundable,
    BudgetExceeded,
    AlreadyDisbursed,
    ProgramClosed,
    ProgramNotExpired,
    ProgramNotFound,
    RefundExceedsPayment,
    Unavailable,
    WithdrawalBeforeActivity,
)
from ledger.programs import ProgramCache
from rules.compiled import PolicyTimeline, funder_facts
from rules.evaluate import evaluate_payment, evaluate_topup, evaluate_withdrawal, split_floor
from rules.facts import (
    BudgetView,
    GrantLot,
    GrantProgramFacts,
    MemberFacts,
    MerchantFacts,
    MonthSoFar,
    PaymentDecision,
    PaymentEvent,
    Wallet,
)
from rules.timeutil import local_date, month_of, rfc3339

log = structlog.get_logger("ledger.book")

# `Book.execute`'s audit hook: (the batch's commands, their outcomes) -> the batch's audit
# entry (actor, action, object_type, object_id, detail) or None.
AuditEntry = Callable[[Sequence[Command], list[Outcome]], "dict[str, Any] | None"]

RETRIES_MAX = 3
REREADS_MAX = 8  # batches run again for refunds whose payments committed meanwhile, beyond RETRIES_MAX
TXNS_PER_COMMAND_MAX = 2  # a payment and its cashback; a refund and its clawback
BUDGET_THRESHOLDS_BP = (8_000, 9_500)  # warn when a budget passes 80% and 95%
BUDGET_SHORT_REASONS = frozenset({"budget_partial", "budget_skip"})
MERCHANT_FUNDER = "merchant"  # the funder of a 상생 merchant's own share: `funder/merchant/{month}`
MERCHANT_FACTS_MAX = 20_000  # merchants' facts kept by their row (`Book._merchant`), ~560 bytes each
WITHIN_LIMIT_CHECK = "ck_budgets_within_limit"
# The legs' guard on PostgreSQL (migration 0008) names this when a leg names an account
# that does not exist: the write did not insert it because the book knew it to exist
# (pgstore.write_batch), and it was not there after all.
LEG_ACCOUNT_KEY = "ledger_legs_account_exists"


class _LockBudgets(Exception):
    """An optimistic batch met a budget that binds: run it again with budgets locked."""


class _Reread(Exception):
    """A refunded payment committed (by another worker) between the batch's look-up of
    its member, before the member locks, and the read of the payment after them: its
    member was never locked nor its month read. Run the batch again; the look-up now
    finds it."""


def now_us() -> int:
    return time.time_ns() // 1000


def _recorded_since(line: Correct, recorded_at_us: int, txn_id: int | None) -> bool:
    """Whether an event of a correction line's member-month was recorded after its plan:
    stamped after the plan's time, or (planned from migration 0019 on) with a ledger
    transaction id above the highest the plan saw, which a clock stepped back cannot fake."""
    return recorded_at_us > line.planned_at_us or (
        line.planned_txn_id is not None and txn_id is not None and txn_id > line.planned_txn_id)


# ---------------------------------------------------------------- in-memory state


@dataclass(slots=True)
class MonthRow:
    eligible_spend_won: int = 0
    cashback_won: int = 0
    topped_up_won: int = 0
    components: dict[str, int] = field(default_factory=dict)
    dirty: bool = False

    def snapshot(self) -> MonthSoFar:
        return MonthSoFar(self.eligible_spend_won, self.cashback_won, self.topped_up_won, dict(self.components))


@dataclass(slots=True)
class MemberState:
    member_id: str
    district: str
    status: str
    charged: int = 0
    points: int = 0
    lots: dict[str, int] = field(default_factory=dict)
    months: dict[str, MonthRow] = field(default_factory=dict)
    _facts: MemberFacts | None = field(default=None, init=False, repr=False)

    def facts(self) -> MemberFacts:
        """The rules' view of the member (id, district, status: fixed within a batch)."""
        if self._facts is None:
            self._facts = MemberFacts(self.member_id, self.district, self.status)
        return self._facts

    def month(self, month: str) -> MonthRow:
        row = self.months.get(month)
        if row is None:
            row = self.months[month] = MonthRow()
        return row


@dataclass(slots=True)
class Writes:
    """Everything a batch will write, gathered while evaluating.

    Ledger transactions and legs are tuples in the columns' order
    (`pgstore.TXN_COLUMNS`, `pgstore.LEG_COLUMNS`), numbered by their index in the
    batch until the database's ids replace it (`with_txn_ids`); the writers pass them on
    as they are."""

    txns: list[tuple] = field(default_factory=list)
    legs: list[tuple] = field(default_factory=list)
    deltas: dict[str, int] = field(default_factory=dict)  # account -> Σ debit-positive legs
    payments: list[dict] = field(default_factory=list)
    # payment_id -> its refunded amount and refund state as the batch leaves them
    payment_updates: dict[str, dict] = field(default_factory=dict)
    topups: list[dict] = field(default_factory=list)
    refunds: list[dict] = field(default_factory=list)
    disbursements: list[dict] = field(default_factory=list)
    withdrawals: list[dict] = field(default_factory=list)
    correction_updates: list[dict] = field(default_factory=list)
    budget_deltas: dict[tuple[str, str], int] = field(default_factory=dict)
    # Audit entries (`audit.append_many`'s), one per disbursement: written in the batch's
    # transaction, so an entry is there exactly when its money is, whoever got the answer.
    audit: list[dict] = field(default_factory=list)

    def update_payment(self, payment: dict) -> None:
        """Write the payment's `refunded_won`, `refund_state`, `base_won` and
        `counts_toward_month` as they stand (a later refund or correction of it in the
        same batch replaces the earlier write; only a correction moves the last two)."""
        self.payment_updates[payment["payment_id"]] = {
            "payment_id": payment["payment_id"], "refunded_won": payment["refunded_won"],
            "refund_state": payment["refund_state"], "base_won": payment["base_won"],
            "counts_toward_month": bool(payment["counts_toward_month"])}

    def post(self, *, kind: str, ref: str, member_id: str | None, merchant_id: str | None,
             occurred_at_us: int, recorded_at_us: int, legs: Iterable[tuple[str, int]]) -> None:
        merged: dict[str, int] = {}
        for account_id, amount in legs:
            merged[account_id] = merged.get(account_id, 0) + amount
        lines = [(a, v) for a, v in merged.items() if v != 0]
        if not lines:
            return
        assert sum(v for _, v in lines) == 0, f"unbalanced {kind} {ref}: {lines}"
        assert len(lines) >= 2, f"{kind} {ref} needs two legs"
        txn_index = len(self.txns)
        deltas = self.deltas
        for leg_no, (account_id, amount) in enumerate(lines):
            self.legs.append((txn_index, leg_no, account_id, amount))
            deltas[account_id] = deltas.get(account_id, 0) + amount
        self.txns.append((txn_index, kind, ref, member_id, merchant_id, occurred_at_us,
                          local_date(occurred_at_us).isoformat(), recorded_at_us, len(lines)))

    def with_txn_ids(self, ids: Sequence[int]) -> "Writes":
        """These writes with each transaction's batch index replaced by `ids[index]`."""
        return dataclasses.replace(self, legs=[(ids[t], n, a, v) for t, n, a, v in self.legs],
                                   txns=[(ids[t[0]], *t[1:]) for t in self.txns])

    def budget(self, source: str, month: str, amount: int) -> None:
        for period in (month, month[:4]):
            key = (source, period)
            self.budget_deltas[key] = self.budget_deltas.get(key, 0) + amount


@dataclass(slots=True)
class BatchState:
    members: dict[str, MemberState]
    merchants: dict[str, MerchantFacts]
    payments: dict[str, dict]  # payment rows (for refunds), payment_id -> row
    existing: dict[tuple[str, str], tuple[str, str]]  # (kind, id) -> (hash, response)
    budgets: dict[tuple[str, str], list]  # (source, period) -> [limit or None, committed]
    writes: Writes
    recorded_at_us: int
    seen: dict[tuple[str, str], tuple[str, dict]] = field(default_factory=dict)  # within-batch ids
    txn_ids: list[int] = field(default_factory=list)  # taken ahead (PostgreSQL), used in order
    accounts_read: set[str] = field(default_factory=set)  # accounts known to exist (their balance was read)
    # PostgreSQL: budgets read without a lock (None: not read), whether the batch then
    # locked them, and whether a payment found a budget short (the snapshot then decides).
    budget_snapshot: dict[tuple[str, str], tuple] | None = None
    budgets_locked: bool = True
    budget_short: bool = False
    # The payments a budget cut in this batch: (source, period, reason) -> payments, for
    # `_budget_warnings` (None until a payment is cut: the common batch pays nothing for it).
    budget_cuts: dict[tuple[str, str, str], int] | None = None
    # What the rules see of `budgets` (limit - committed, limited ones only), built at the
    # batch's first payment and kept current by `_commit_budget`.
    budget_view: BudgetView | None = None
    # The grant programs a batch disburses or refunds into: each one's status, read under a
    # share lock (PostgreSQL) that an expiry's status update waits for
    # (`grant_jobs.expire_program`).
    program_status: dict[str, str] = field(default_factory=dict)
    # What each funder of a program returned to by the split holds in it (`grantfund/
    # {program}/{source}` as read, program -> source -> won), read only for the batch's
    # expiries and refunds of an ended program's money (`_read_funds`); the batch's own
    # legs are added to it when it is used (`Book._funds_held`).
    funds: dict[str, dict[str, int]] = field(default_factory=dict)
    # PostgreSQL, a batch that waits for no member (`Book.execute`'s `skip_held_members`):
    # the members another transaction holds, whose commands are not run (`MemberHeld`).
    held_members: set[str] = field(default_factory=set)
    # What each withdrawing member put in since their last withdrawal, as the book held
    # it when the batch read it (`Book._read_charged_in`), read only for the batch's
    # withdrawals; the batch's own legs are added to it when it is used (`Book._charged_in`).
    charged_in: dict[str, "ChargedIn"] = field(default_factory=dict)
    # (member, month) -> approved payments recorded there after the earliest
    # `Correct.planned_at_us` of the batch, or with a ledger transaction id above the lowest
    # `Correct.planned_txn_id`: (payment_id, recorded_at_us, that id or None), for `_correct`.
    recorded_since: dict[tuple[str, str], list[tuple[str, int, int | None]]] = field(default_factory=dict)
    # (member, month) -> refunds of that member-month's payments recorded after the same
    # time or id: (refund_id, payment_id, recorded_at_us, its id or None), for `_correct`.
    refunded_since: dict[tuple[str, str], list[tuple[str, str, int, int | None]]] = field(default_factory=dict)
    # What each member of the batch's correction lines, refunds and withdrawals owes
    # (`receivable/{member}` as read, with the member locked; kept current by `_correct`,
    # `_post_refund` and `_withdraw`), read only for those members (`Book._read_owed`; on
    # PostgreSQL's pipelined read with the rest, for refunds).
    owed: dict[str, int] = field(default_factory=dict)


# The kinds of transaction on a member's charged money a withdrawal may not be dated
# before, as the refusal names them (a refund's clawback is dated and named as its refund).
_WITHDRAWN_FROM = {"topup": "top-up", "payment": "payment", "refund": "refund", "clawback": "refund"}


@dataclass(slots=True)
class ChargedIn:
    """A member's charged money put in since their last withdrawal (docs/design.md,
    "Withdrawals"): top-ups, and what refunds restored of payments made before it
    (`won`); the payments made since (`payments`), whose refunds give back money they
    used rather than put money in. `latest_us`: the latest `occurred_at` of the top-ups,
    payments and refunds among them, or the last withdrawal's when none is later (None:
    neither), which the next withdrawal may not be dated before; `latest` names it."""

    won: int = 0
    payments: set[str] = field(default_factory=set)
    latest_us: int | None = None
    latest: str = ""

    def add(self, kind: str, ref: str, amount: int, occurred_at_us: int,
            payment_of_refund: Callable[[str], str | None]) -> None:
        """One leg on the member's charged account (debit positive), in recording order."""
        if kind == "withdrawal":
            self.won, self.payments = 0, set()
            self.latest_us, self.latest = occurred_at_us, f"the member's previous withdrawal {ref!r}"
            return
        if kind in _WITHDRAWN_FROM and (self.latest_us is None or occurred_at_us > self.latest_us):
            self.latest_us, self.latest = occurred_at_us, f"{_WITHDRAWN_FROM[kind]} {ref!r}"
        if kind == "payment":
            self.payments.add(ref)
        elif amount < 0 and not (kind == "refund" and payment_of_refund(ref) in self.payments):
            self.won -= amount


def _count_cuts(state: BatchState, lines) -> None:
    """One payment cut, counted once per budget that was short for it and reason."""
    cuts = state.budget_cuts
    if cuts is None:
        cuts = state.budget_cuts = {}
    for key in {(source, period, line.reason) for line in lines if line.reason in BUDGET_SHORT_REASONS
                for source, period in line.short_of}:
        cuts[key] = cuts.get(key, 0) + 1


def _refunded_programs(payments: dict[str, dict]) -> set[str]:
    """The grant programs whose money the refunded payments spent."""
    out: set[str] = set()
    for payment in payments.values():
        spent = orjson.loads(payment["detail"]).get("spent", {})
        out.update(program_id for program_id, _ in spent.get("grants", ()))
    return out


def program_statuses(conn: Connection, program_ids: set[str]) -> dict[str, str]:
    """Grant programs' statuses, share-locked on PostgreSQL until the transaction ends: an
    expiry marks its program expired first, and waits for the disbursements that read it
    open, so none lands after the expiry chose the lots it returns."""
    if not program_ids:
        return {}
    t = s.grant_programs
    query = select(t.c.program_id, t.c.status).where(t.c.program_id.in_(sorted(program_ids)))
    if conn.dialect.name == "postgresql":
        query = query.with_for_update(read=True)
    return dict(conn.execute(query).all())


# ---------------------------------------------------------------- the writer's connection


class PinnedConnection:
    """One connection kept across batches by one writer thread (not thread-safe).

    `engine.begin()` per batch checks a connection out of the pool and pre-pings it: a
    round trip and ~100 µs of Python per batch, and one more point where the writer
    gives up the GIL and waits to get it back from the event loop. Under load the writer
    keeps its connection; after `idle_ping_s` without a batch it hands it back and takes
    one through the pool again (pre-ping). A connection that broke under a batch is
    dropped, and `Book.execute` runs the batch again on a new one (`take_broken`). One
    kept for `max_age_s` on PostgreSQL is closed for good before the next batch and a new
    one opened: PostgreSQL keeps some plans per connection (`ledger.db.CONNECTION_MAX_AGE_S`)."""

    def __init__(self, engine: Engine, idle_ping_s: float = 1.0, max_age_s: float = CONNECTION_MAX_AGE_S):
        self._engine = engine
        self._idle_ping_s = idle_ping_s
        # SQLite makes no plans that outlive a statement's cache; its connection is kept.
        postgres = engine is not None and engine.dialect.name == "postgresql"
        self._max_age_s = max_age_s if postgres else math.inf
        self._conn: Connection | None = None
        self._last = 0.0
        self._opened = 0.0
        self._broken = False

    @contextlib.contextmanager
    def begin(self):
        now = time.monotonic()
        conn = self._conn
        if conn is not None and now - self._opened > self._max_age_s:
            self.close(for_good=True)
            conn = None
        if conn is not None and (conn.closed or conn.invalidated or now - self._last > self._idle_ping_s):
            self.close()
            conn = None
        if conn is None:
            conn = self._conn = self._engine.connect()
            self._opened = now
        self._last = now
        try:
            with conn.begin():
                yield conn
        except BaseException:
            if self._is_broken(conn):
                self._broken = True
                self.close()
            raise

    @staticmethod
    def _is_broken(conn: Connection) -> bool:
        if conn.closed or conn.invalidated:
            return True
        try:
            raw = conn.connection.dbapi_connection
        except Exception:
            return True
        return raw is None or bool(getattr(raw, "closed", False)) or bool(getattr(raw, "broken", False))

    def take_broken(self) -> bool:
        """Whether the last batch broke its connection (then cleared)."""
        broken, self._broken = self._broken, False
        return broken

    def close(self, for_good: bool = False) -> None:
        """Back to the pool; closed for good (the pool opens a new one in its place) when
        broken or when `for_good`."""
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.invalidate() if for_good or self._is_broken(conn) else conn.close()


# ---------------------------------------------------------------- the book


class Book:
    def __init__(self, engine: Engine, timeline: PolicyTimeline, programs: ProgramCache | None = None,
                 on_budget_event: Callable[[str, str], None] | None = None,
                 on_budget_cut: Callable[[str, str, str, int], None] | None = None):
        self.engine = engine
        self.on_budget_event = on_budget_event
        self.on_budget_cut = on_budget_cut  # (source, period, reason, payments) per batch
        self._unlimited_warned: set[tuple[str, str]] = set()
        self.timeline = timeline
        self.programs = programs or ProgramCache()
        self.dialect = engine.dialect.name
        self._insert = pg_insert if self.dialect == "postgresql" else sqlite_insert
        # Budget rows seen committed: never deleted, so they need no INSERT ... ON CONFLICT again.
        self._budgets_known: set[tuple[str, str]] = set()
        # Accounts other than members' known committed: no INSERT ... ON CONFLICT for them
        # (pgstore.write_batch). Read from the book at the first batch, then kept up.
        self._accounts_known: set[str] = set()
        self._accounts_loaded = False
        # Merchants' facts by their row as read: a chunk reads thousands of merchants,
        # mostly the same ones as the chunk before.
        self._merchant_facts: dict[tuple, MerchantFacts] = {}
        # Per writer thread: the outcomes of the attempt now writing (`_run`), for the
        # attempt after it when the write's COMMIT may have gone through (`execute`).
        self._writing = threading.local()

    # -- entry point

    def execute(self, commands: Sequence[Command], *, pinned: "PinnedConnection | None" = None,
                audit_entry: "AuditEntry | None" = None, skip_held_members: bool = False) -> list[Outcome]:
        """Run a batch atomically. A transient database failure retries the batch; a
        failure that persists for a batch of several commands runs them one by one so
        that one bad command cannot sink the others. `pinned`: the caller's own
        connection, kept across batches (the service's writer thread), instead of a
        pool checkout per batch. `audit_entry(commands, outcomes)`: the audit entry of
        what the batch did (or None), written in its transaction, so money a batch
        moved is never without its entry (a batch run one by one writes one each).
        `skip_held_members` (the service's writer; PostgreSQL, payments, top-ups,
        refunds and withdrawals): the batch waits for no member another transaction holds; their
        commands are not run and come back as `MemberHeld`, for the caller to run again.
        Without it a batch waits for its members, as bulk writers do."""
        last: Exception | None = None
        lock_budgets = False
        rereads = 0
        attempt = -1
        unconfirmed: list[Outcome] | None = None  # what an attempt wrote before its connection broke
        while attempt < RETRIES_MAX - 1:
            attempt += 1
            self._writing.outcomes = None
            try:
                with (pinned.begin() if pinned is not None else self.engine.begin()) as conn:
                    outcomes = self._run(conn, commands, lock_budgets=lock_budgets, audit_entry=audit_entry,
                                         skip_held_members=skip_held_members)
                return outcomes if unconfirmed is None else _own_commits(unconfirmed, outcomes)
            except _LockBudgets:
                lock_budgets = True
                continue
            except _Reread:
                log.info("batch.refund_reread", attempt=attempt)
                if rereads < REREADS_MAX:  # not a failed attempt: each reread finds payments committed since
                    rereads += 1
                    attempt -= 1
                continue
            except IntegrityError as exc:
                if LEG_ACCOUNT_KEY in str(exc.orig):
                    self._accounts_known.clear()  # one it knew was missing after all: insert them again
                if WITHIN_LIMIT_CHECK in str(exc.orig) and not lock_budgets:
                    # Another worker spent the budget this batch counted on: again, locked.
                    lock_budgets = True
                    continue
                # A racing duplicate id committed by another worker: the retry replays it.
                last = exc
                log.info("batch.integrity_retry", attempt=attempt, error=error_kind(exc))
            except OperationalError as exc:
                last = exc
                if pinned is not None and pinned.take_broken():
                    # The kept connection had died (a database restart): again on a new
                    # one, as a pool checkout's pre-ping would have done. Had the COMMIT
                    # gone through, the retry finds the rows and replays them.
                    unconfirmed = unconfirmed or self._writing.outcomes
                    log.warning("batch.reconnect_retry", attempt=attempt, error=error_kind(exc))
                    continue
                if not _transient(exc):
                    break
                log.warning("batch.transient_retry", attempt=attempt, error=error_kind(exc))
                time.sleep(0.005 * (attempt + 1))
            except DataError as exc:
                # A value a column cannot hold (too long, out of range): one command's fault,
                # as a bug is, not the database's. It failed the batch as an outage, 503
                # "retry", at every retry, the batch's other commands with it (an expired
                # lot's key of long ids: idempotency audit).
                if len(commands) == 1:
                    raise
                log.error("batch.command_fault", size=len(commands), error=error_kind(exc))
                return [self._alone(command, pinned, audit_entry, skip_held_members) for command in commands]
            except DBAPIError as exc:
                last = exc
                if pinned is not None and pinned.take_broken():
                    unconfirmed = unconfirmed or self._writing.outcomes
                    log.warning("batch.reconnect_retry", attempt=attempt, error=error_kind(exc))
                    continue
                break
            except PoolTimeout as exc:
                # No connection within the pool's timeout (the writer takes a new one after a
                # broken one, or after handing its idle one back): the database's trouble, not
                # a command's; it has waited its bound already. An attempt before may have
                # committed: the retry with the same id replays it (it was a 500 "nothing of
                # this request was recorded", the connection-loss audit).
                last = exc
                log.warning("batch.pool_timeout", attempt=attempt, error=str(exc)[:200])
                break
            except audit.UnkeyedAppend as error:
                # This process cannot sign a disbursement's entry (no EUM_AUDIT_KEYS on a
                # keyed log): the disbursement is refused with nothing of it recorded, and
                # the rest of its batch is written without it.
                if len(commands) == 1:
                    return [Outcome(error=error)]
                return [self._alone(command, pinned, audit_entry, skip_held_members) for command in commands]
            except EumError:
                raise
            except Exception as exc:  # noqa: BLE001 - not the database's: one command's fault
                # A bug, or an input the checks let through, in one command must not sink
                # the batch: the transaction rolled back, so each command runs alone and
                # only the faulty one fails (InternalError).
                if len(commands) == 1:
                    raise
                log.exception("batch.command_fault", size=len(commands), error=f"{type(exc).__name__}: {exc}"[:300])
                return [self._alone(command, pinned, audit_entry, skip_held_members) for command in commands]
        if len(commands) > 1 and isinstance(last, IntegrityError):
            return [self._alone(command, pinned, audit_entry, skip_held_members) for command in commands]
        log.error("batch.failed", size=len(commands),
                  error=error_kind(last) if isinstance(last, DBAPIError) else str(last)[:500])
        raise Unavailable("the book of record could not be written; retry with the same id") from last

    def _alone(self, command: Command, pinned: "PinnedConnection | None",
               audit_entry: "AuditEntry | None" = None, skip_held_members: bool = False) -> Outcome:
        """One command of a batch that failed as a whole, in its own transaction: its
        outcome, or its failure as an outcome, so the others' answers still go out."""
        try:
            return self.execute([command], pinned=pinned, audit_entry=audit_entry,
                                skip_held_members=skip_held_members)[0]
        except EumError as error:  # Unavailable: the database, for this command too
            return Outcome(error=error)
        except Exception as exc:  # noqa: BLE001
            log.exception("command.fault", kind=command.kind, key=command.key,
                          error=f"{type(exc).__name__}: {exc}"[:300])
            return Outcome(error=InternalError(f"an unexpected error ({type(exc).__name__}); it has been logged, "
                                               "nothing of this request was recorded"))

    # -- one transaction

    def _run(self, conn: Connection, commands: Sequence[Command], *, lock_budgets: bool = False,
             audit_entry: "AuditEntry | None" = None, skip_held_members: bool = False) -> list[Outcome]:
        if self.dialect == "postgresql" and all(type(c) in PIPELINED_READS for c in commands):
            state = self._read_pg(conn, commands, budget_snapshot=not lock_budgets,
                                  skip_held_members=skip_held_members)
        else:
            state = self._read(conn, commands, skip_held_members=skip_held_members and self.dialect == "postgresql")
        self._lock_budgets(conn, state, commands)

        outcomes = [self._one(state, command) for command in commands]
        if state.budget_short and not state.budgets_locked:
            raise _LockBudgets()
        self._writing.outcomes = outcomes
        if audit_entry is not None and (entry := audit_entry(commands, outcomes)) is not None:
            state.writes.audit.append({"at_us": state.recorded_at_us, **entry})
        self._write(conn, state)
        if state.writes.audit:  # after every row the batch locks (`_write_pg` left the COMMIT to the caller)
            audit.append_many(conn, state.writes.audit)
        self._budget_warnings(state)
        return outcomes

    def _read_pg(self, conn: Connection, commands: Sequence[Command], *, budget_snapshot: bool,
                 skip_held_members: bool = False) -> BatchState:
        """`_read` in one round trip (two with refunds), see ledger/pgstore.py.
        `skip_held_members`: the members another transaction holds are left unlocked and
        named in `BatchState.held_members` (`pgstore.read_batch`'s `free_members_only`)."""
        refunded = sorted({c.payment_id for c in commands if isinstance(c, Refund)})
        refunded_rows = pgstore.payment_members(conn, refunded) if refunded else []
        member_ids = {c.member_id for c in commands if not isinstance(c, Refund)}
        member_ids.update(row[1] for row in refunded_rows)
        pairs = {(c.member_id, month_of(local_date(c.occurred_at_us))) for c in commands if isinstance(c, (Pay, TopUp))}
        pairs.update((row[1], row[2]) for row in refunded_rows)
        keys_by_kind: dict[str, set[str]] = {}
        for c in commands:
            keys_by_kind.setdefault(c.kind, set()).add(c.key)
        reads = pgstore.read_batch(
            conn, member_ids=sorted(member_ids), keys_by_kind={k: sorted(v) for k, v in keys_by_kind.items()},
            refund_payment_ids=refunded, months=sorted({month for _, month in pairs}),
            merchant_ids=sorted({c.merchant_id for c in commands if isinstance(c, Pay)}),
            txn_ids_max=TXNS_PER_COMMAND_MAX * len(commands),
            budget_periods=sorted({p for _, month in pairs for p in (month, month[:4])}) if budget_snapshot else [],
            owed_accounts=sorted({acct.member_receivable(row[1]) for row in refunded_rows}),
            free_members_only=skip_held_members)
        state = BatchState(
            members={m: MemberState(m, d, st) for m, d, st in reads.members},
            merchants={row[0]: self._merchant(row) for row in reads.merchants},
            payments={row[0]: dict(zip(pgstore.PAYMENT_COLUMNS, row)) for row in reads.payments},
            existing={(kind, row[0]): (row[1], row[2]) for kind, row in reads.existing},
            budgets={},
            writes=Writes(),
            recorded_at_us=now_us(),
            txn_ids=reads.txn_ids,
            budget_snapshot={(row[0], row[1]): row for row in reads.budgets} if budget_snapshot else None,
        )
        if len(state.payments) > len(refunded_rows):
            raise _Reread()
        if reads.held:  # their balances were read without their lock: not the batch's to use
            state.held_members = reads.held
            self._set_balances(state, [row for row in reads.balances if row[1] in state.members])
        else:
            self._set_balances(state, reads.balances)
        state.owed = {account_id[len("receivable/"):]: balance for account_id, balance in reads.owed}
        disbursed = {c.program_id for c in commands if isinstance(c, Disburse)}
        program_ids = set(disbursed)
        for member in state.members.values():
            program_ids.update(member.lots)
        self.programs.ensure(conn, program_ids)
        state.program_status = program_statuses(conn, disbursed | _refunded_programs(state.payments))
        self._read_funds(conn, state, commands)
        for member_id, month, eligible, cashback, topped_up, components in reads.months:
            if (member_id, month) in pairs and member_id in state.members:
                state.members[member_id].months[month] = MonthRow(eligible, cashback, topped_up,
                                                                  orjson.loads(components))
        return state

    def _merchant(self, row: list) -> MerchantFacts:
        key = tuple(row)
        facts = self._merchant_facts.get(key)
        if facts is None:
            if len(self._merchant_facts) >= MERCHANT_FACTS_MAX:
                self._merchant_facts.clear()
            facts = self._merchant_facts[key] = merchant_facts(MerchantRow(*row))
        return facts

    def _read(self, conn: Connection, commands: Sequence[Command], *, skip_held_members: bool = False) -> BatchState:
        """The batch's state read statement by statement (SQLite; on PostgreSQL a batch
        with a kind `_read_pg` does not read: a withdrawal, a correction, an expiry).
        `skip_held_members` (PostgreSQL): as `_read_pg`'s, the members another
        transaction holds are left unlocked and named in `BatchState.held_members`."""
        refund_payment_ids = {c.payment_id for c in commands if isinstance(c, Refund)}
        refund_payment_ids.update(p[0] for c in commands if isinstance(c, Correct) for p in c.payments)
        payment_members = self._payment_members(conn, refund_payment_ids)
        member_ids = {c.member_id for c in commands if not isinstance(c, Refund)}
        member_ids |= set(payment_members.values())
        members, held = self._lock_members(conn, member_ids, skip_held=skip_held_members)
        state = BatchState(
            members=members,
            merchants={},
            payments={},
            existing=self._existing(conn, commands),
            budgets={},
            writes=Writes(),
            recorded_at_us=now_us(),
        )
        state.held_members = held
        self._load_balances(conn, state)
        state.payments = self._load_payments(conn, refund_payment_ids)
        if len(state.payments) > len(payment_members):
            raise _Reread()
        program_ids = {c.program_id for c in commands if isinstance(c, (Disburse, ExpireLot))}
        for member in state.members.values():
            program_ids.update(member.lots)
        self.programs.ensure(conn, program_ids)
        state.program_status = program_statuses(conn, {c.program_id for c in commands if isinstance(c, Disburse)}
                                                | _refunded_programs(state.payments))
        self._read_funds(conn, state, commands)
        self._load_months(conn, state, commands)
        state.merchants = self._load_merchants(conn, {c.merchant_id for c in commands if isinstance(c, Pay)})
        state.charged_in = self._read_charged_in(conn, {c.member_id for c in commands if isinstance(c, Withdraw)}
                                                 & set(state.members))
        state.recorded_since, state.refunded_since = self._read_recorded_since(
            conn, [c for c in commands if isinstance(c, Correct) and c.planned_at_us is not None])
        owing = {c.member_id for c in commands if isinstance(c, (Correct, Withdraw))}
        owing.update(payment_members[c.payment_id] for c in commands
                     if isinstance(c, Refund) and c.payment_id in payment_members)
        state.owed = self._read_owed(conn, owing & set(state.members))
        return state

    @staticmethod
    def _read_owed(conn: Connection, member_ids: set[str]) -> dict[str, int]:
        """What each of `member_ids` owes (`receivable/{member}`), read with them locked."""
        if not member_ids:
            return {}
        accounts = {acct.member_receivable(m): m for m in member_ids}
        return {accounts[account_id]: balance for account_id, balance in conn.execute(
            select(s.accounts.c.account_id, s.accounts.c.balance_won)
            .where(s.accounts.c.account_id.in_(sorted(accounts))))}

    @staticmethod
    def _read_recorded_since(conn: Connection, lines: list[Correct]) -> tuple[
            dict[tuple[str, str], list[tuple[str, int, int | None]]],
            dict[tuple[str, str], list[tuple[str, str, int, int | None]]]]:
        """The approved payments of the lines' member-months recorded after the earliest
        line's plan (stamped after its time, or with a ledger transaction id above the
        lowest its plan saw), and the refunds of those member-months' payments recorded
        after it; read with the members locked, so none can be recorded meanwhile."""
        if not lines:
            return {}, {}
        p, r, t = s.payments, s.refunds, s.ledger_txns
        since = min(c.planned_at_us for c in lines)
        members, months = sorted({c.member_id for c in lines}), sorted({c.month for c in lines})
        # By id too, which a clock stepped back cannot make older (migration 0019): the
        # members' payment and refund transactions above the lowest id the lines' plans
        # saw (the members' (member, txn_id) index: the few recorded since), each with its id.
        since_txn = min((c.planned_txn_id for c in lines if c.planned_txn_id is not None), default=None)
        ids: dict[tuple[str, str], int] = {}  # (kind, payment or refund id) -> its one transaction's id
        if since_txn is not None:
            ids = {(kind, ref): txn_id for kind, ref, txn_id in conn.execute(
                select(t.c.kind, t.c.ref, t.c.txn_id)
                .where(t.c.member_id.in_(members), t.c.txn_id > since_txn, t.c.kind.in_(("payment", "refund"))))}
        by_id = {kind: sorted(ref for k, ref in ids if k == kind) for kind in ("payment", "refund")}
        payments: dict[tuple[str, str], list[tuple[str, int, int | None]]] = {}
        rows = set(conn.execute(
            select(p.c.payment_id, p.c.member_id, p.c.month, p.c.recorded_at_us)
            .where(p.c.member_id.in_(members), p.c.month.in_(months), p.c.status == "approved",
                   p.c.recorded_at_us > since)).all())
        for start in range(0, len(by_id["payment"]), 900):  # SQLite's bound-parameter limit
            rows |= set(conn.execute(
                select(p.c.payment_id, p.c.member_id, p.c.month, p.c.recorded_at_us)
                .where(p.c.payment_id.in_(by_id["payment"][start:start + 900]), p.c.month.in_(months),
                       p.c.status == "approved")).all())
        for payment_id, member_id, month, recorded in sorted(rows):
            payments.setdefault((member_id, month), []).append(
                (payment_id, recorded, ids.get(("payment", payment_id))))
        refunds: dict[tuple[str, str], list[tuple[str, str, int, int | None]]] = {}
        joined = select(r.c.refund_id, r.c.payment_id, p.c.member_id, p.c.month, r.c.recorded_at_us) \
            .select_from(p.join(r, r.c.payment_id == p.c.payment_id))
        rows = set(conn.execute(joined.where(p.c.member_id.in_(members), p.c.month.in_(months),
                                             r.c.recorded_at_us > since)).all())
        for start in range(0, len(by_id["refund"]), 900):
            rows |= set(conn.execute(joined.where(r.c.refund_id.in_(by_id["refund"][start:start + 900]),
                                                  p.c.month.in_(months))).all())
        for refund_id, payment_id, member_id, month, recorded in sorted(rows):
            refunds.setdefault((member_id, month), []).append(
                (refund_id, payment_id, recorded, ids.get(("refund", refund_id))))
        return payments, refunds

    def _one(self, state: BatchState, command: Command) -> Outcome:
        key = (command.kind, command.key)
        replay = self._replay(state, key, command.request_hash)
        if replay is not None:  # a recorded id's answer needs nothing of its member, held or not
            return replay
        if state.held_members and _member_of(state, command) in state.held_members:
            return Outcome(error=MemberHeld(
                "the member's record is held by another transaction (another worker's batch, a staff job); "
                "nothing of this request was recorded: retry with the same id", retry_after_s=1))
        if command.occurred_at_us > state.recorded_at_us + FUTURE_SKEW_US:
            return Outcome(error=OccurredInFuture(
                f"occurred_at {rfc3339(command.occurred_at_us)} is more than {FUTURE_SKEW_S} s ahead of the book's "
                f"clock ({rfc3339(state.recorded_at_us)}); nothing was recorded"))
        try:
            if isinstance(command, Pay):
                body = self._pay(state, command)
            elif isinstance(command, TopUp):
                body = self._topup(state, command)
            elif isinstance(command, Refund):
                body = self._refund(state, command)
            elif isinstance(command, Disburse):
                body = self._disburse(state, command)
            elif isinstance(command, ExpireLot):
                body = self._expire(state, command)
            elif isinstance(command, Withdraw):
                body = self._withdraw(state, command)
            else:
                body = self._correct(state, command)
        except EumError as error:
            return Outcome(error=error)
        state.seen[key] = (command.request_hash, body)
        rows = _RESPONSE_ROWS.get(command.kind)
        raw = getattr(state.writes, rows)[-1]["response"].encode() if rows else None
        return Outcome(body=body, raw=raw)

    @staticmethod
    def _replay(state: BatchState, key: tuple[str, str], request_hash: str) -> Outcome | None:
        prior = state.seen.get(key)
        if prior is None:
            stored = state.existing.get(key)
            if stored is None:
                return None
            if stored[0] != request_hash:
                return Outcome(error=IdempotencyConflict(f"{key[0]} id {key[1]!r} was used with a different request"))
            return Outcome(body=orjson.loads(stored[1]), replayed=True, raw=stored[1].encode())
        if prior[0] != request_hash:
            return Outcome(error=IdempotencyConflict(f"{key[0]} id {key[1]!r} was used with a different request"))
        return Outcome(body=prior[1], replayed=True)

    # -- reads

    def _read_funds(self, conn: Connection, state: BatchState, commands: Sequence[Command]) -> None:
        """What the funders hold in each program the batch may return money to by the
        split: an expiry's, or one whose money a refund dated after its end (or after its
        expiry) gives back. An unlocked read (no lock out of the book's order; the write
        takes the rows last, in order): a return that a concurrent one makes too big is
        refused by the accounts' floor, and the retry reads again."""
        program_ids: set[str] = set()
        for c in commands:
            if isinstance(c, ExpireLot):
                program = self.programs.get(c.program_id)
                if program is not None and c.occurred_at_us >= program.valid_until_us:
                    program_ids.add(c.program_id)
            elif isinstance(c, Refund) and state.program_status:  # some refunded payment spent grant money
                payment = state.payments.get(c.payment_id)
                if payment is None:
                    continue
                for program_id, _ in orjson.loads(payment["detail"]).get("spent", {}).get("grants", ()):
                    program = self.programs.get(program_id)
                    if program is not None and (c.occurred_at_us >= program.valid_until_us
                                                or state.program_status.get(program_id) == "expired"):
                        program_ids.add(program_id)
        names = {}
        for program_id in sorted(program_ids):
            program = self.programs.get(program_id)
            if program.unspent_to is None:
                state.funds[program_id] = dict.fromkeys((source for source, _ in program.funding), 0)
                names.update({acct.grant_fund(program_id, source): (program_id, source)
                              for source, _ in program.funding})
        if not names:
            return
        rows = conn.execute(select(s.accounts.c.account_id, s.accounts.c.balance_won)
                            .where(s.accounts.c.account_id.in_(sorted(names))))
        for account_id, balance in rows:
            program_id, source = names[account_id]
            state.funds[program_id][source] = balance

    @staticmethod
    def _read_charged_in(conn: Connection, member_ids: set[str]) -> dict[str, ChargedIn]:
        """What each member put in since their last withdrawal (`ChargedIn`; since the
        start for one who never withdrew), from the legs on their charged account in
        their transactions after it. Read with the members locked, through their
        transactions (`ix_ledger_txns_member`), only for a batch that withdraws.
        Transaction ids follow a member's recording order: the batches of one member are
        serialised by its lock and take their ids after it."""
        t, legs, r = s.ledger_txns, s.ledger_legs, s.refunds
        out = {}
        for member_id in sorted(member_ids):
            last = (select(func.coalesce(func.max(t.c.txn_id), 0))
                    .where(t.c.member_id == member_id, t.c.kind == "withdrawal").scalar_subquery())
            # From the last withdrawal itself: its time is one the next may not precede.
            rows = conn.execute(select(t.c.kind, t.c.ref, legs.c.amount_won, t.c.occurred_at_us)
                                .select_from(t.join(legs, legs.c.txn_id == t.c.txn_id))
                                .where(t.c.member_id == member_id, t.c.txn_id >= last,
                                       legs.c.account_id == acct.member_charged(member_id))
                                .order_by(t.c.txn_id, legs.c.leg_no)).all()
            refund_ids = sorted({ref for kind, ref, _, _ in rows if kind == "refund"})
            refunded = dict(conn.execute(select(r.c.refund_id, r.c.payment_id)
                                         .where(r.c.refund_id.in_(refund_ids))).all()) if refund_ids else {}
            window = out[member_id] = ChargedIn()
            for kind, ref, amount, occurred_at_us in rows:
                window.add(kind, ref, int(amount), int(occurred_at_us), refunded.get)
        return out

    @staticmethod
    def _charged_in(state: BatchState, member_id: str) -> ChargedIn:
        """The charged money the member put in since their last withdrawal: as read, with
        this batch's legs so far (a withdrawal of the batch starts it again)."""
        window = state.charged_in[member_id]
        window = ChargedIn(window.won, set(window.payments), window.latest_us, window.latest)
        account = acct.member_charged(member_id)
        txns = state.writes.txns
        refunded = {row["refund_id"]: row["payment_id"] for row in state.writes.refunds}
        for txn_index, _, account_id, amount in state.writes.legs:
            if account_id == account:
                txn = txns[txn_index]
                window.add(txn[1], txn[2], amount, txn[5], refunded.get)
        return window

    def _funds_held(self, state: BatchState, program_id: str) -> dict[str, int] | None:
        """What each funder holds in the program now: as read, with the batch's legs so far
        (None: not read, the program's money goes to the one funder it names)."""
        read = state.funds.get(program_id)
        if read is None:
            return None
        deltas = state.writes.deltas
        return {source: won + deltas.get(acct.grant_fund(program_id, source), 0) for source, won in read.items()}

    def _payment_members(self, conn: Connection, payment_ids: set[str]) -> dict[str, str]:
        if not payment_ids:
            return {}
        rows = conn.execute(select(s.payments.c.payment_id, s.payments.c.member_id)
                            .where(s.payments.c.payment_id.in_(payment_ids)))
        return dict(rows.all())

    def _lock_members(self, conn: Connection, member_ids: set[str], *,
                      skip_held: bool = False) -> tuple[dict[str, MemberState], set[str]]:
        """The members locked, and (`skip_held`, PostgreSQL: SKIP LOCKED) those another
        transaction holds, left unlocked: of the members not locked, those that exist."""
        if not member_ids:
            return {}, set()
        query = (select(s.members.c.member_id, s.members.c.district, s.members.c.status)
                 .where(s.members.c.member_id.in_(sorted(member_ids)))
                 .order_by(s.members.c.member_id)
                 .with_for_update(skip_locked=skip_held))
        members = {m: MemberState(m, d, st) for m, d, st in conn.execute(query)}
        held: set[str] = set()
        if skip_held and len(members) < len(member_ids):
            held = pgstore.existing_members(conn, sorted(member_ids - set(members)))
        return members, held

    def _existing(self, conn: Connection, commands: Sequence[Command]) -> dict:
        out: dict[tuple[str, str], tuple[str, str]] = {}
        for kind, table, column in (
            ("payment", s.payments, s.payments.c.payment_id),
            ("topup", s.topups, s.topups.c.topup_id),
            ("refund", s.refunds, s.refunds.c.refund_id),
            ("disbursement", s.grant_disbursements, s.grant_disbursements.c.disbursement_id),
            ("correction", s.correction_lines, s.correction_lines.c.line_id),
            ("withdrawal", s.withdrawals, s.withdrawals.c.withdrawal_id),
        ):
            ids = {c.key for c in commands if c.kind == kind}
            if not ids:
                continue
            rows = conn.execute(select(column, table.c.request_hash, table.c.response).where(column.in_(ids)))
            for key, digest, response in rows:
                if response is not None:  # a correction line is recorded before it is posted
                    out[(kind, key)] = (digest, response)
        return out

    def _load_balances(self, conn: Connection, state: BatchState) -> None:
        if not state.members:
            return
        rows = conn.execute(select(s.accounts.c.account_id, s.accounts.c.owner_id, s.accounts.c.balance_won)
                            .where(s.accounts.c.owner_id.in_(state.members)))
        self._set_balances(state, rows)

    @staticmethod
    def _set_balances(state: BatchState, rows) -> None:
        for account_id, owner, balance in rows:
            state.accounts_read.add(account_id)
            member = state.members[owner]
            tail = account_id[len("member/") + len(owner) + 1:]
            if tail == "charged":
                member.charged = balance
            elif tail == "points":
                member.points = balance
            elif tail.startswith("grant/"):
                member.lots[tail[len("grant/"):]] = balance

    def _load_payments(self, conn: Connection, payment_ids: set[str]) -> dict[str, dict]:
        if not payment_ids:
            return {}
        rows = conn.execute(select(s.payments).where(s.payments.c.payment_id.in_(payment_ids)))
        return {row.payment_id: dict(row._mapping) for row in rows}

    def _load_months(self, conn: Connection, state: BatchState, commands: Sequence[Command]) -> None:
        pairs = set()
        for c in commands:
            if isinstance(c, (Pay, TopUp)):
                pairs.add((c.member_id, month_of(local_date(c.occurred_at_us))))
            elif isinstance(c, Correct):
                pairs.add((c.member_id, c.month))
        for payment in state.payments.values():
            pairs.add((payment["member_id"], payment["month"]))
        pairs = {(m, mo) for m, mo in pairs if m in state.members}
        if not pairs:
            return
        # By member and by month, the pairs picked out here: a tuple IN list costs
        # SQLAlchemy more to render than the read itself (bulk chunks on SQLite).
        t = s.member_months
        rows = conn.execute(select(t.c.member_id, t.c.month, t.c.eligible_spend_won, t.c.cashback_won,
                                   t.c.topped_up_won, t.c.component_cashback)
                            .where(t.c.member_id.in_(sorted({m for m, _ in pairs})),
                                   t.c.month.in_(sorted({mo for _, mo in pairs}))))
        for member_id, month, eligible, cashback, topped_up, components in rows:
            if (member_id, month) in pairs:
                state.members[member_id].months[month] = MonthRow(eligible, cashback, topped_up,
                                                                  orjson.loads(components))

    def _load_merchants(self, conn: Connection, merchant_ids: set[str]) -> dict[str, MerchantFacts]:
        if not merchant_ids:
            return {}
        rows = conn.execute(select(s.merchants).where(s.merchants.c.merchant_id.in_(merchant_ids)))
        return {r.merchant_id: merchant_facts(r) for r in rows}

    def _lock_budgets(self, conn: Connection, state: BatchState, commands: Sequence[Command]) -> None:
        keys: set[tuple[str, str]] = set()
        alike: set[tuple] = set()  # (policy, month, funder facts) already counted
        horizon = state.recorded_at_us + FUTURE_SKEW_US  # later ones are refused: no budget rows for them
        for c in commands:
            if isinstance(c, Pay) and c.member_id in state.members and c.occurred_at_us <= horizon:
                policy = self.timeline.in_force(c.occurred_at_us)
                if policy is None:
                    continue
                month = month_of(local_date(c.occurred_at_us))
                member, merchant = state.members[c.member_id], state.merchants.get(c.merchant_id)
                seen = (id(policy), month, funder_facts(member, merchant))
                if seen in alike:
                    continue
                alike.add(seen)
                for source in policy.funders(member.facts(), merchant):
                    keys.update(((source, month), (source, month[:4])))
        for c in commands:
            if isinstance(c, Correct):
                sources = {source for source, _ in c.by_funder}
                sources.update(part[1] for entry in c.payments for part in entry[2])
                for source in sources:
                    keys.update(((source, c.month), (source, c.month[:4])))
        for payment in state.payments.values():
            sources = {source for line in orjson.loads(payment["detail"]).get("lines", [])
                       for source, _ in line["funded_by"]}
            corrected = orjson.loads(payment["refund_state"] or "{}").get("corrected")
            if corrected:  # a correction may have added funders the payment's lines do not name
                sources.update(part[1] for part in corrected["parts"])
            for source in sources:
                keys.update(((source, payment["month"]), (source, payment["month"][:4])))
        if not keys:
            return
        ordered = sorted(keys)
        stamp = state.recorded_at_us
        if state.budget_snapshot is not None and all(key in state.budget_snapshot for key in ordered):
            # Optimistic: evaluate against the unlocked rows. The write's UPDATE takes the
            # rows last, and the within-limit CHECK refuses an overspend; a batch in which
            # a budget binds is run again locked (`_LockBudgets`), so decisions are always
            # those of a locked read.
            for key in ordered:
                _, _, limit, committed = state.budget_snapshot[key]
                state.budgets[key] = [limit, committed, committed]
            state.budgets_locked = False
            return
        if self.dialect == "postgresql":
            rows, created = pgstore.lock_budgets(conn, ordered, stamp, self._budgets_known)
            for src, per, limit, committed in rows:
                state.budgets[(src, per)] = [limit, committed, committed]
            # Rows this transaction did not create were committed before: known from now on.
            self._budgets_known.update(set(state.budgets) - set(created))
            return
        conn.execute(
            self._insert(s.budgets).on_conflict_do_nothing(),
            [{"source": src, "period": per, "limit_won": None, "committed_won": 0, "updated_at_us": stamp}
             for src, per in ordered],
        )
        t = s.budgets
        rows = conn.execute(select(t.c.source, t.c.period, t.c.limit_won, t.c.committed_won)
                            .where(tuple_(t.c.source, t.c.period).in_(ordered))
                            .order_by(t.c.source, t.c.period).with_for_update())
        for src, per, limit, committed in rows:
            state.budgets[(src, per)] = [limit, committed, committed]

    # -- the commands

    def _topup(self, state: BatchState, c: TopUp) -> dict:
        member = _member(state, c.member_id)
        month = month_of(local_date(c.occurred_at_us))
        row = member.month(month)
        policy = self.timeline.in_force(c.occurred_at_us)
        decision = evaluate_topup(c.amount_won, policy, row.snapshot(), member.status)
        if decision.approved:
            state.writes.post(kind="topup", ref=c.topup_id, member_id=member.member_id, merchant_id=None,
                              occurred_at_us=c.occurred_at_us, recorded_at_us=state.recorded_at_us,
                              legs=[(acct.OPERATOR_CASH, c.amount_won), (acct.member_charged(member.member_id), -c.amount_won)])
            member.charged += c.amount_won
            row.topped_up_won += c.amount_won
            row.dirty = True
        body = {"topup_id": c.topup_id, "member_id": member.member_id,
                "status": "approved" if decision.approved else "declined",
                "amount": c.amount_won, "occurred_at": rfc3339(c.occurred_at_us),
                "policy_id": decision.policy_id or None, "balances": self.balances(member)}
        if decision.decline_code:
            body["decline_code"] = decision.decline_code
        response = _dumps(body)
        state.writes.topups.append({
            "topup_id": c.topup_id, "request_hash": c.request_hash, "member_id": member.member_id,
            "amount_won": c.amount_won, "occurred_at_us": c.occurred_at_us, "status": body["status"],
            "decline_code": decision.decline_code, "response": response, "recorded_at_us": state.recorded_at_us})
        return body

    def _withdraw(self, state: BatchState, c: Withdraw) -> dict:
        """All the member's charged money left back to them (Dr member charged, Cr
        operator/cash), once the policy's share of what they put in since their last
        withdrawal has been used; else a recorded decline, as a top-up's. What the member
        owes (`receivable/{member}`: cashback a refund or a correction took back that they
        no longer held) is settled first from that money (Cr receivable), and the rest is
        paid out (`paid_out`): the operator does not hand over cash while it is owed."""
        member = _member(state, c.member_id)
        window = self._charged_in(state, member.member_id)
        if window.latest_us is not None and c.occurred_at_us < window.latest_us:
            # It would pay out, in a business date, a settlement and a policy's rule, money
            # not yet put in or used then; and it would come before the previous one.
            raise WithdrawalBeforeActivity(
                f"the withdrawal's occurred_at {rfc3339(c.occurred_at_us)} is before {rfc3339(window.latest_us)}, "
                f"the time of {window.latest}: a withdrawal may not be dated before the top-ups, payments and "
                "refunds of the charged money it takes back, nor before the member's previous withdrawal; "
                "nothing was recorded", earliest=rfc3339(window.latest_us))
        charged_in, left = window.won, member.charged
        policy = self.timeline.in_force(c.occurred_at_us)
        decision = evaluate_withdrawal(left, charged_in, c.amount_won, policy, member.status)
        settled = 0
        if decision.approved:
            owed = state.owed.get(member.member_id, 0)
            settled = min(max(owed, 0), decision.amount_won)
            state.writes.post(kind="withdrawal", ref=c.withdrawal_id, member_id=member.member_id, merchant_id=None,
                              occurred_at_us=c.occurred_at_us, recorded_at_us=state.recorded_at_us,
                              legs=[(acct.member_charged(member.member_id), decision.amount_won),
                                    (acct.OPERATOR_CASH, settled - decision.amount_won),
                                    (acct.member_receivable(member.member_id), -settled)])
            member.charged -= decision.amount_won
            if settled:
                state.owed[member.member_id] = owed - settled
        body = {"withdrawal_id": c.withdrawal_id, "member_id": member.member_id,
                "status": "approved" if decision.approved else "declined",
                "amount": decision.amount_won, "owed_settled": settled, "paid_out": decision.amount_won - settled,
                "amount_requested": c.amount_won,
                "occurred_at": rfc3339(c.occurred_at_us), "policy_id": decision.policy_id or None,
                "charged_in": charged_in, "used": charged_in - left,
                "used_share_bp": decision.used_bp, "used_share_min_bp": decision.used_min_bp,
                "balances": self.balances(member)}
        if decision.decline_code:
            body["decline_code"] = decision.decline_code
        state.writes.withdrawals.append({
            "withdrawal_id": c.withdrawal_id, "request_hash": c.request_hash, "member_id": member.member_id,
            "requested_won": c.amount_won, "amount_won": decision.amount_won, "charged_in_won": charged_in,
            "occurred_at_us": c.occurred_at_us, "status": body["status"], "decline_code": decision.decline_code,
            "policy_id": decision.policy_id or None, "response": _dumps(body), "recorded_at_us": state.recorded_at_us})
        return body

    def _pay(self, state: BatchState, c: Pay) -> dict:
        member = _member(state, c.member_id)
        day = local_date(c.occurred_at_us)
        month = month_of(day)
        row = member.month(month)
        event = PaymentEvent(c.amount_won, c.occurred_at_us, day, member.facts(), state.merchants.get(c.merchant_id))
        policy = self.timeline.in_force(c.occurred_at_us)
        decision = evaluate_payment(event, policy, row.snapshot(), self._wallet(member), self._budget_view(state))
        if any(line.reason in BUDGET_SHORT_REASONS for line in decision.lines):
            state.budget_short = True
            _count_cuts(state, decision.lines)
        if decision.approved:
            self._post_payment(state, c, member, month, decision)
            if decision.counts_toward_month:
                row.eligible_spend_won += decision.base_won
            row.cashback_won += decision.cashback_won
            for line in decision.lines:
                row.components[line.component_id] = row.components.get(line.component_id, 0) + line.amount_won
            row.dirty = True
        body = payment_body(c, decision, self.balances(member))
        detail = {
            "spend_order": list(policy.spend_order) if policy else [],
            "spent": {"grants": [list(g) for g in decision.spent_grants], "points": decision.spent_points_won,
                      "charged": decision.spent_charged_won},
            "base_parts": _base_parts(policy.cashback_on, decision.spent_grants, self.programs)
            if decision.approved and decision.base_won else {},
            "lines": [{"component_id": l.component_id, "rule": l.rule, "band": l.band, "amount": l.amount_won,
                       "funded_by": [list(f) for f in l.funded_by]} for l in decision.lines],
        }
        state.writes.payments.append({
            "payment_id": c.payment_id, "request_hash": c.request_hash, "member_id": member.member_id,
            "merchant_id": c.merchant_id, "amount_won": c.amount_won, "occurred_at_us": c.occurred_at_us,
            "month": month, "status": body["status"], "decline_code": decision.decline_code,
            "policy_id": decision.policy_id or None, "base_won": decision.base_won,
            "counts_toward_month": decision.counts_toward_month, "cashback_won": decision.cashback_won,
            "detail": _dumps(detail), "refunded_won": 0, "refund_state": "{}",
            "response": _dumps(body), "recorded_at_us": state.recorded_at_us})
        if decision.approved:
            state.payments[c.payment_id] = state.writes.payments[-1]
        return body

    def _post_payment(self, state: BatchState, c: Pay, member: MemberState, month: str, d: PaymentDecision) -> None:
        mid = member.member_id
        legs = [(acct.merchant_payable(c.merchant_id), -c.amount_won)]
        if d.spent_charged_won:
            legs.append((acct.member_charged(mid), d.spent_charged_won))
            member.charged -= d.spent_charged_won
        if d.spent_points_won:
            legs.append((acct.member_points(mid), d.spent_points_won))
            member.points -= d.spent_points_won
        for program_id, amount in d.spent_grants:
            legs.append((acct.member_grant(mid, program_id), amount))
            member.lots[program_id] -= amount
        w = state.writes
        w.post(kind="payment", ref=c.payment_id, member_id=mid, merchant_id=c.merchant_id,
               occurred_at_us=c.occurred_at_us, recorded_at_us=state.recorded_at_us, legs=legs)
        cashback = d.cashback_won
        if cashback:
            funders: list[tuple[str, int]] = []
            for line in d.lines:
                for source, amount in line.funded_by:
                    funders.append((acct.funder_cashback(source, month), amount))
                    w.budget(source, month, amount)
                    _commit_budget(state, source, month, amount)
            w.post(kind="cashback", ref=c.payment_id, member_id=mid, merchant_id=c.merchant_id,
                   occurred_at_us=c.occurred_at_us, recorded_at_us=state.recorded_at_us,
                   legs=[*funders, (acct.member_points(mid), -cashback)])
            member.points += cashback

    def _refund(self, state: BatchState, c: Refund) -> dict:
        payment = state.payments.get(c.payment_id)
        if payment is None:
            raise PaymentNotFound(f"no payment {c.payment_id!r}")
        if payment["status"] != "approved":
            raise PaymentNotRefundable(f"payment {c.payment_id!r} was {payment['status']}")
        if c.occurred_at_us < payment["occurred_at_us"]:
            # It would land in a business date before its payment's, in a settlement
            # and a month that never held the payment.
            raise RefundBeforePayment(f"the refund's occurred_at {rfc3339(c.occurred_at_us)} is before the payment's "
                                      f"{rfc3339(payment['occurred_at_us'])}")
        left = payment["amount_won"] - payment["refunded_won"]
        if c.amount_won > left:
            raise RefundExceedsPayment(f"refund of {c.amount_won} exceeds the {left} won left of the payment",
                                       remaining=left)
        member = state.members[payment["member_id"]]
        plan = plan_refund(payment, c.amount_won, c.occurred_at_us, self.programs,
                           closed={p for p, status in state.program_status.items() if status == "expired"})
        self._post_refund(state, c, payment, member, plan)
        refund_state = plan.state_after
        payment["refunded_won"] += c.amount_won
        payment["refund_state"] = _dumps(refund_state)
        state.writes.update_payment(payment)
        body = {
            "refund_id": c.refund_id, "payment_id": c.payment_id, "amount": c.amount_won,
            "occurred_at": rfc3339(c.occurred_at_us),
            "restored": {"grants": plan.grants_to_member - plan.withheld_from_grants, "points": plan.points,
                         "charged": plan.charged - plan.withheld},
            "returned_to_funders": plan.grants_to_funders,
            "grants": plan.grants_answer(),
            "cashback_clawback": plan.clawback,
            # `not_recovered`: 0 since a shortfall is owed (`owed`), kept for the contract;
            # refunds recorded before kept theirs on the payment.
            "clawback_detail": {"from_points": plan.from_points, "withheld_from_charged": plan.withheld,
                                "withheld_from_grants": plan.withheld_from_grants,
                                "not_recovered": 0, "owed": plan.owed},
            "owed_settled": plan.owed_settled,
            "payment_refunded_total": payment["refunded_won"],
            "balances": self.balances(member),
        }
        state.writes.refunds.append({
            "refund_id": c.refund_id, "request_hash": c.request_hash, "payment_id": c.payment_id,
            "amount_won": c.amount_won, "occurred_at_us": c.occurred_at_us, "clawback_won": plan.clawback,
            "response": _dumps(body), "recorded_at_us": state.recorded_at_us})
        return body

    def _post_refund(self, state: BatchState, c: Refund, payment: dict, member: MemberState, plan: "RefundPlan") -> None:
        mid, month = member.member_id, payment["month"]
        # Clawback comes from points (including points this refund restores); what points
        # cannot cover is withheld from the charged money restored, then from the grant
        # money restored to the member's lots (it matters where the program's spending
        # earns cashback), then from the charged money the member holds. What the member
        # does not hold at all (points and money spent) they owe (`receivable/{member}`,
        # as a correction's clawback beyond what they hold): the funders, budgets and the
        # month get the whole clawback back now, and a refund must go through.
        points_after = member.points + plan.points
        cut = plan.limit_by_funders({source: state.budgets[(source, month)][1] for source in plan.clawback_by_source})
        if cut:
            log.warning("refund.clawback_beyond_funders", refund_id=c.refund_id, left_with_member=cut,
                        hint="a correction posted before migration 0014 took this cashback back already")
        lots_back = [(program_id, amount) for program_id, amount in plan.grant_parts if program_id not in plan.expired]
        held = points_after + member.charged + plan.charged + sum(a for _, a in lots_back)
        plan.owed = max(0, plan.clawback - max(held, 0))
        beyond = max(0, plan.clawback - plan.owed - points_after)
        rest = beyond - min(beyond, plan.charged)
        for program_id, amount in lots_back:
            take = min(rest, amount)
            if take:
                plan.withheld_grants.append((program_id, take))
                rest -= take
        plan.withheld = beyond - plan.withheld_from_grants
        owed_before = state.owed.get(mid, 0)
        plan.settle(owed_before)
        legs = [(acct.merchant_payable(payment["merchant_id"]), c.amount_won)]
        if plan.charged:
            legs.append((acct.member_charged(mid), -plan.charged))
        if plan.points:
            legs.append((acct.member_points(mid), -plan.points))
        for program_id, amount in plan.grant_parts:
            if program_id in plan.expired:
                legs += unspent_legs(self.programs.get(program_id), amount, self._funds_held(state, program_id))[1]
            else:
                legs.append((acct.member_grant(mid, program_id), -amount))
                member.lots[program_id] = member.lots.get(program_id, 0) + amount
        w = state.writes
        w.post(kind="refund", ref=c.refund_id, member_id=mid, merchant_id=payment["merchant_id"],
               occurred_at_us=c.occurred_at_us, recorded_at_us=state.recorded_at_us, legs=legs)
        member.charged += plan.charged
        member.points += plan.points
        if plan.clawback or plan.owed_settled:
            # One transaction: the clawback, what the member came to owe by it, or what of
            # what they owed the money this refund gives back settles (never both: a
            # shortfall leaves nothing of it).
            claw_legs = []
            for source, amount in plan.clawback_by_source.items():
                claw_legs.append((acct.funder_cashback(source, month), -amount))
                w.budget(source, month, -amount)
                _commit_budget(state, source, month, -amount)
            from_points = plan.from_points
            if from_points:
                claw_legs.append((acct.member_points(mid), from_points))
            if plan.withheld:
                claw_legs.append((acct.member_charged(mid), plan.withheld))
            for program_id, take in plan.withheld_grants:
                claw_legs.append((acct.member_grant(mid, program_id), take))
                member.lots[program_id] -= take
            claw_legs += [(acct.member_points(mid), plan.settled_points),
                          (acct.member_charged(mid), plan.settled_charged),
                          (acct.member_receivable(mid), plan.owed - plan.owed_settled)]
            w.post(kind="clawback", ref=c.refund_id, member_id=mid, merchant_id=payment["merchant_id"],
                   occurred_at_us=c.occurred_at_us, recorded_at_us=state.recorded_at_us, legs=claw_legs)
            member.points -= from_points + plan.settled_points
            member.charged -= plan.withheld + plan.settled_charged
            state.owed[mid] = owed_before + plan.owed - plan.owed_settled
        row = member.month(month)
        if payment["counts_toward_month"]:
            row.eligible_spend_won -= plan.base_refunded
        # Floored as a correction floors them: a correction posted before migration 0014
        # may have taken from the counters what this clawback takes again.
        row.cashback_won = max(0, row.cashback_won - plan.clawback)
        for component_id, amount in plan.clawback_by_component.items():
            row.components[component_id] = max(0, row.components.get(component_id, 0) - amount)
        row.dirty = True

    def _disburse(self, state: BatchState, c: Disburse) -> dict:
        member = _member(state, c.member_id)
        program = self.programs.get(c.program_id)
        if program is None:
            raise ProgramNotFound(f"no grant program {c.program_id!r}")
        if c.occurred_at_us >= program.valid_until_us:
            raise ProgramClosed(f"grant program {c.program_id!r} ended {rfc3339(program.valid_until_us)}")
        if state.program_status.get(c.program_id) == "expired":
            raise ProgramClosed(f"grant program {c.program_id!r} has expired: its unspent money went back to "
                                "its funders")
        if program.once_per_member and c.program_id in member.lots:  # a lot account: an earlier disbursement
            raise AlreadyDisbursed(f"member {member.member_id!r} has already received {c.program_id!r}; the "
                                   "program gives each member once")
        legs = [(acct.member_grant(member.member_id, c.program_id), -c.amount_won)]
        for source, part in split_floor(c.amount_won, program.funding, program.remainder_to).items():
            if part:
                legs.append((acct.grant_fund(c.program_id, source), part))
        state.writes.post(kind="grant", ref=c.disbursement_id, member_id=member.member_id, merchant_id=None,
                          occurred_at_us=c.occurred_at_us, recorded_at_us=state.recorded_at_us, legs=legs)
        member.lots[c.program_id] = member.lots.get(c.program_id, 0) + c.amount_won
        body = {"disbursement_id": c.disbursement_id, "program_id": c.program_id, "member_id": member.member_id,
                "amount": c.amount_won, "status": "disbursed", "balances": self.balances(member)}
        state.writes.disbursements.append({
            "disbursement_id": c.disbursement_id, "request_hash": c.request_hash, "program_id": c.program_id,
            "member_id": member.member_id, "amount_won": c.amount_won, "response": _dumps(body),
            "recorded_at_us": state.recorded_at_us, "actor": c.actor})
        state.writes.audit.append({
            "at_us": state.recorded_at_us, "actor": c.actor or "unknown", "action": "grant.disburse",
            "object_type": "grant_program", "object_id": c.program_id,
            "detail": {"disbursement_id": c.disbursement_id, "member_id": member.member_id,
                       "amount_won": c.amount_won}})
        return body

    def _expire(self, state: BatchState, c: ExpireLot) -> dict:
        member = _member(state, c.member_id)
        program = self.programs.get(c.program_id)
        if program is None:
            raise ProgramNotFound(f"no grant program {c.program_id!r}")
        if c.occurred_at_us < program.valid_until_us:
            raise ProgramNotExpired(f"grant program {c.program_id!r} runs until {rfc3339(program.valid_until_us)}")
        left = member.lots.get(c.program_id, 0)
        returned: dict[str, int] = {}
        if left > 0:
            returned, funder_legs = unspent_legs(program, left, self._funds_held(state, c.program_id))
            legs = [(acct.member_grant(member.member_id, c.program_id), left), *funder_legs]
            state.writes.post(kind="grant_expiry", ref=c.key, member_id=member.member_id, merchant_id=None,
                              occurred_at_us=c.occurred_at_us, recorded_at_us=state.recorded_at_us, legs=legs)
            member.lots[c.program_id] = 0
        return {"program_id": c.program_id, "member_id": member.member_id, "returned": max(left, 0),
                "returned_by_funder": {k: v for k, v in returned.items() if v}}

    def _correct(self, state: BatchState, c: Correct) -> dict:
        """Extra cashback (Dr funder, Cr points) or clawback (Cr funder; Dr points, then
        charged money, then a receivable for what the member no longer holds).

        With the line's payments (`Correct.payments`), what is posted is their parts as
        `correct_payment` adjusts them (refunds since the plan, nothing below what a
        payment holds), and each payment's cashback is re-based on them, so its refunds
        claw back what it holds after the correction; with the right policy's base
        (migration 0017) its base and whether it counts toward the month are re-based
        too, and the month's eligible spend moves by the difference. A payment another
        correction re-based after the plan was made refuses the whole line
        (`CorrectedSincePlanned`): the plan started from what the payment held then.
        Checked here, in the book's transaction with the member locked, so of two lines
        planned from the same holding only the first posts. Without them (a line proposed
        before migration 0014), the line as planned, and the payments keep their lines."""
        member = _member(state, c.member_id)
        mid, month = member.member_id, c.month
        if c.planned_at_us is not None:
            planned = {entry[0] for entry in c.payments}
            since = sorted(payment_id for payment_id, recorded, txn_id in state.recorded_since.get((mid, month), ())
                           if _recorded_since(c, recorded, txn_id) and payment_id not in planned)
            if since:
                # Not in the plan: each took band room where the wrong policy had left it.
                raise PaymentsSincePlanned(
                    f"{len(since)} payment(s) of {mid} in {month} recorded since the line was planned "
                    f"({', '.join(since[:5])}); propose the correction again")
            # A refund of a payment the line does not hold gave band room back that the
            # plan did not see (the line's own payments' refunds are taken by `correct_payment`).
            refunds = sorted(f"{refund_id} of {payment_id}" for refund_id, payment_id, recorded, txn_id
                             in state.refunded_since.get((mid, month), ())
                             if _recorded_since(c, recorded, txn_id) and payment_id not in planned)
            if refunds:
                raise PaymentsSincePlanned(
                    f"{len(refunds)} refund(s) of {mid}'s payments in {month} recorded since the line was planned "
                    f"({', '.join(refunds[:5])}); propose the correction again")
        by_funder, by_component = c.by_funder, c.by_component
        rebased = []
        if c.payments:
            funders: dict[str, int] = {}
            components: dict[str, int] = {}
            for entry in c.payments:
                payment_id, refunded_planned, parts = entry[:3]
                seen = entry[3] if len(entry) > 3 else None
                base = entry[4] if len(entry) > 4 else None
                payment = state.payments.get(payment_id)
                if payment is None:
                    raise PaymentNotFound(f"no payment {payment_id!r} for correction line {c.line_id!r}")
                if (payment["member_id"], payment["month"], payment["status"]) != (mid, month, "approved"):
                    raise Conflict(f"payment {payment_id!r} is not an approved payment of the line's member-month")
                corrected = correct_payment(payment, refunded_planned, parts, c.line_id, seen, base, self.programs)
                rebased.append((payment, corrected))
                for component_id, source, amount in corrected.posted:
                    funders[source] = funders.get(source, 0) + amount
                    components[component_id] = components.get(component_id, 0) + amount
            by_funder = tuple(sorted(funders.items()))
            by_component = tuple(sorted(components.items()))
        total = sum(amount for _, amount in by_funder)
        for source, amount in by_funder:
            if amount > 0:
                limit, committed, _ = state.budgets[(source, month)]
                year_limit, year_committed, _ = state.budgets[(source, month[:4])]
                if (limit is not None and committed + amount > limit) or \
                        (year_limit is not None and year_committed + amount > year_limit):
                    raise BudgetExceeded(f"the {source} budget cannot cover {amount} won of this correction")
        for source, amount in by_funder:
            if amount:
                state.writes.budget(source, month, amount)
                _commit_budget(state, source, month, amount)
        moved: dict[str, int] = {}  # the member's accounts, debits positive, over the line's transactions
        owed_before = state.owed.get(mid, 0)
        for merchant_id, legs in _correction_txns(member, month, by_funder, rebased, owed_before):
            state.writes.post(kind="correction", ref=c.line_id, member_id=mid, merchant_id=merchant_id,
                              occurred_at_us=c.occurred_at_us, recorded_at_us=state.recorded_at_us, legs=legs)
            for account_id, amount in legs:
                moved[account_id] = moved.get(account_id, 0) + amount
        # What the legs took: points, then charged money, then what is owed; or what a
        # line that gives settled of what was owed, the rest to points.
        from_points = moved.get(acct.member_points(mid), 0)
        from_charged = moved.get(acct.member_charged(mid), 0)
        owed = moved.get(acct.member_receivable(mid), 0)
        member.points -= from_points
        member.charged -= from_charged
        state.owed[mid] = owed_before + owed
        from_points = max(from_points, 0)
        row = member.month(month)
        for payment, corrected in rebased:
            payment["refund_state"] = corrected.refund_state
            payment["base_won"], payment["counts_toward_month"] = corrected.base_won, corrected.counts_toward_month
            row.eligible_spend_won += corrected.eligible_won
            state.writes.update_payment(payment)
        # Floored: a line posted without its payments (before migration 0014) may take
        # more than the month's counters hold.
        row.cashback_won = max(0, row.cashback_won + total)
        for component_id, amount in by_component:
            row.components[component_id] = max(0, row.components.get(component_id, 0) + amount)
        row.dirty = True
        body = {"line_id": c.line_id, "member_id": mid, "month": month, "amount": total,
                "by_funder": {source: amount for source, amount in by_funder if amount},
                "planned": sum(amount for _, amount in c.by_funder), "payments": len(c.payments),
                "clawback_detail": {"from_points": from_points, "from_charged": from_charged, "owed": max(owed, 0)},
                "owed_settled": max(-owed, 0),
                "balances": self.balances(member)}
        state.writes.correction_updates.append({"lid": c.line_id, "resp": _dumps(body), "at": state.recorded_at_us})
        return body

    # -- helpers

    def _wallet(self, member: MemberState) -> Wallet:
        lots = []
        for program_id, amount in member.lots.items():
            if amount > 0:
                program = self.programs.get(program_id)
                assert program is not None, f"lot of unknown program {program_id}"
                lots.append(GrantLot(program, amount))
        return Wallet(member.charged, member.points, tuple(lots))

    @staticmethod
    def _budget_view(state: BatchState) -> BudgetView:
        view = state.budget_view
        if view is None:
            view = state.budget_view = BudgetView({key: limit - committed for key, (limit, committed, _)
                                                   in state.budgets.items() if limit is not None})
        return view

    def balances(self, member: MemberState) -> dict[str, Any]:
        grants = []
        for program_id in sorted(member.lots):
            amount = member.lots[program_id]
            if amount > 0:
                program = self.programs.get(program_id)
                grants.append({"program_id": program_id, "amount": amount,
                               "expires_at": rfc3339(program.valid_until_us) if program else None})
        return {"charged": member.charged, "points": member.points, "grants": grants}

    def _budget_warnings(self, state: BatchState) -> None:
        """Log and count budgets that crossed 80% or 95% in this batch, sources that paid
        cashback with no limit set for the month nor the year, and the payments a budget
        cut (`budget_partial`/`budget_skip` lines): one `budget.cut` line per budget per
        batch, and the count per budget and reason."""
        if state.budget_cuts:
            self._cut_warnings(state)
        charged_sources: dict[str, set[str]] = {}
        for (source, period), delta in state.writes.budget_deltas.items():
            if delta > 0:
                charged_sources.setdefault(source, set()).add(period)
        for source, periods in charged_sources.items():
            limits = {p: state.budgets[(source, p)][0] for p in periods}
            if all(limit is None for limit in limits.values()):
                for period in periods:
                    if len(period) == 7 and (source, period) not in self._unlimited_warned:
                        self._unlimited_warned.add((source, period))
                        log.warning("budget.no_limit", source=source, period=period)
                self._emit(source, "no_limit")
            for period, limit in limits.items():
                if not limit:
                    continue
                _, after, before = state.budgets[(source, period)]
                for threshold_bp in BUDGET_THRESHOLDS_BP:
                    mark = -(-limit * threshold_bp // 10_000)  # the least committed that is at or past it
                    if before < mark <= after:
                        log.warning("budget.threshold", source=source, period=period, threshold_bp=threshold_bp,
                                    committed=after, limit=limit)
                        self._emit(source, f"threshold_{threshold_bp // 100}")

    def _cut_warnings(self, state: BatchState) -> None:
        by_budget: dict[tuple[str, str], dict[str, int]] = {}
        for (source, period, reason), payments in sorted(state.budget_cuts.items()):
            by_budget.setdefault((source, period), {})[reason] = payments
            if self.on_budget_cut is not None:
                self.on_budget_cut(source, period, reason, payments)
        for (source, period), counts in by_budget.items():
            limit, committed, _ = state.budgets.get((source, period), (None, None, None))
            log.warning("budget.cut", source=source, period=period, limit=limit, committed=committed,
                        **{f"{reason}_payments": n for reason, n in counts.items()})

    def _emit(self, source: str, event: str) -> None:
        if self.on_budget_event is not None:
            self.on_budget_event(source, event)

    # -- writes

    def _write(self, conn: Connection, state: BatchState) -> None:
        """SQLite: every write of the batch by `executemany` on the driver, rows as tuples
        in the columns' order (the statements are `SQLITE_*` below); PostgreSQL:
        `_write_pg`."""
        if self.dialect == "postgresql":
            return self._write_pg(conn, state)
        w = state.writes
        run = conn.exec_driver_sql
        if w.txns:
            w = w.with_txn_ids(self._allocate_txn_ids(conn, len(w.txns)))
            self._ensure_accounts(conn, state, w.deltas)
            run(SQLITE_INSERT_LEGS, w.legs)
            run(SQLITE_INSERT_TXNS, w.txns)  # seals: the database checks the balance
        for statement, columns, rows in ((SQLITE_INSERT_TOPUPS, pgstore.TOPUP_COLUMNS, w.topups),
                                         (SQLITE_INSERT_PAYMENTS, pgstore.PAYMENT_COLUMNS, w.payments),
                                         (SQLITE_INSERT_REFUNDS, pgstore.REFUND_COLUMNS, w.refunds),
                                         (SQLITE_INSERT_DISBURSEMENTS, pgstore.DISBURSEMENT_COLUMNS, w.disbursements),
                                         (SQLITE_INSERT_WITHDRAWALS, pgstore.WITHDRAWAL_COLUMNS, w.withdrawals)):
            if rows:
                run(statement, [tuple([row[c] for c in columns]) for row in rows])
        if w.payment_updates:
            run("UPDATE payments SET refunded_won = ?, refund_state = ?, base_won = ?, counts_toward_month = ? "
                "WHERE payment_id = ?",
                [(u["refunded_won"], u["refund_state"], u["base_won"], u["counts_toward_month"], u["payment_id"])
                 for u in w.payment_updates.values()])
        if w.correction_updates:
            run("UPDATE correction_lines SET response = ?, posted_at_us = ? WHERE line_id = ? AND response IS NULL",
                [(u["resp"], u["at"], u["lid"]) for u in w.correction_updates])
        self._write_budgets(conn, state)
        self._write_balances(conn, w.deltas)
        self._write_months(conn, state)

    def _allocate_txn_ids(self, conn: Connection, count: int) -> list[int]:
        if self.dialect == "postgresql":
            return conn.exec_driver_sql(
                "SELECT nextval('ledger_txn_id_seq') FROM generate_series(1, %(n)s)", {"n": count}).scalars().all()
        # SQLite: BEGIN IMMEDIATE holds the only write lock, so max+1 onwards is ours.
        first = conn.execute(select(func.coalesce(func.max(s.ledger_txns.c.txn_id), 0))).scalar_one() + 1
        return list(range(first, first + count))

    @staticmethod
    def _ensure_accounts(conn: Connection, state: BatchState, deltas: dict[str, int]) -> None:
        """SQLite: the accounts the legs name that this batch did not read (the members'
        it read exist: `BEGIN IMMEDIATE` holds the only write lock), inserted if absent."""
        rows = []
        for account_id in sorted(deltas):
            if account_id in state.accounts_read:
                continue
            kind, floor_zero = acct.account_type(account_id)
            owner = account_id.split("/")[1] if account_id.startswith("member/") else None
            rows.append((account_id, kind, owner, floor_zero))
        if rows:
            conn.exec_driver_sql("INSERT INTO accounts (account_id, type, owner_id, balance_won, floor_zero) "
                                 "VALUES (?, ?, ?, 0, ?) ON CONFLICT (account_id) DO NOTHING", rows)

    @staticmethod
    def _write_balances(conn: Connection, deltas: dict[str, int]) -> None:
        params = [(acct.natural_delta(a, v), a) for a, v in sorted(deltas.items()) if v]
        if params:
            conn.exec_driver_sql("UPDATE accounts SET balance_won = balance_won + ? WHERE account_id = ?", params)

    @staticmethod
    def _write_budgets(conn: Connection, state: BatchState) -> None:
        params = [(v, state.recorded_at_us, k[0], k[1]) for k, v in sorted(state.writes.budget_deltas.items()) if v]
        if params:
            conn.exec_driver_sql("UPDATE budgets SET committed_won = committed_won + ?, updated_at_us = ? "
                                 "WHERE source = ? AND period = ?", params)
            # The same moves under the batch's day: what the forecast's recent burn reads.
            day = local_date(state.recorded_at_us).isoformat()
            conn.exec_driver_sql(SQLITE_UPSERT_BUDGET_DAYS, [(src, per, day, v) for v, _, src, per in params])

    def _write_pg(self, conn: Connection, state: BatchState) -> None:
        w = state.writes
        if w.txns:
            ids = state.txn_ids
            w = w.with_txn_ids(ids if len(ids) >= len(w.txns) else self._allocate_txn_ids(conn, len(w.txns)))
        moved = pgstore.write_batch(conn, w, self._month_rows(state), state.recorded_at_us, state.accounts_read,
                                      self._known_accounts(conn), commit=not w.audit)
        for source, period, committed in moved:  # as committed: exact thresholds for the warnings
            entry = state.budgets.get((source, period))
            if entry is not None:
                entry[1], entry[2] = committed, committed - w.budget_deltas[(source, period)]

    def _known_accounts(self, conn: Connection) -> set[str]:
        """The accounts other than members' that exist (merchants', funders', the
        operator's), read once per book, at most `pgstore.KNOWN_ACCOUNTS_MAX` of them."""
        if not self._accounts_loaded:
            self._accounts_loaded = True
            rows = conn.execute(select(s.accounts.c.account_id).where(s.accounts.c.owner_id.is_(None))
                                .limit(pgstore.KNOWN_ACCOUNTS_MAX))
            self._accounts_known.update(row[0] for row in rows)
        return self._accounts_known

    def _write_months(self, conn: Connection, state: BatchState) -> None:
        rows = self._month_rows(state)
        if rows:
            conn.exec_driver_sql(SQLITE_UPSERT_MONTHS, [
                (r["member_id"], r["month"], r["eligible_spend_won"], r["cashback_won"], r["topped_up_won"],
                 r["component_cashback"]) for r in rows])

    @staticmethod
    def _month_rows(state: BatchState) -> list[dict]:
        rows = []
        for member in state.members.values():
            for month, row in member.months.items():
                if row.dirty:
                    rows.append({"member_id": member.member_id, "month": month,
                                 "eligible_spend_won": row.eligible_spend_won, "cashback_won": row.cashback_won,
                                 "topped_up_won": row.topped_up_won,
                                 "component_cashback": _dumps({k: v for k, v in sorted(row.components.items()) if v})})
        return rows


# ---------------------------------------------------------------- refunds (pure)


@dataclass(slots=True)
class RefundPlan:
    charged: int
    points: int
    grant_parts: list[tuple[str, int]]
    expired: set[str]
    base_refunded: int
    clawback: int
    clawback_by_source: dict[str, int]
    clawback_by_component: dict[str, int]
    state_after: dict
    # (state key, funder, component, won clawed back) per part of `clawback`: the key is
    # "line/funder" of `clawed`, or "corrected/i" of the i-th part of `corrected`
    steps: list[tuple[str, str, str, int]] = field(default_factory=list)
    withheld: int = 0  # from charged money (restored, then held)
    withheld_grants: list[tuple[str, int]] = field(default_factory=list)  # (program, won) from lots restored
    owed: int = 0  # of `clawback`, what the member does not hold: debited to `receivable/{member}`
    # What of what the member owed before this refund's restorations settle (`settle`):
    # from the points restored, then the charged money restored, that the clawback left.
    settled_points: int = 0
    settled_charged: int = 0

    @property
    def withheld_from_grants(self) -> int:
        return sum(take for _, take in self.withheld_grants)

    def grants_answer(self) -> list[dict]:
        """The grant money given back, program by program, as the refund's answer says it
        (`RefundedGrant`): a member holding two programs' money was told only the sums,
        and could not tell which lot it went back to, nor why a program's went to its
        funders (the refunds audit)."""
        withheld = dict(self.withheld_grants)
        return [{"program_id": program_id, "amount": amount,
                 "to": "funders" if program_id in self.expired else "member",
                 "withheld": 0 if program_id in self.expired else withheld.get(program_id, 0)}
                for program_id, amount in self.grant_parts]

    @property
    def from_points(self) -> int:
        return self.clawback - self.withheld - self.withheld_from_grants - self.owed

    @property
    def owed_settled(self) -> int:
        return self.settled_points + self.settled_charged

    def settle(self, owed_before: int) -> None:
        """Settle what the member owed before (`owed_before`, `receivable/{member}`) from
        what this refund gives back and its clawback leaves: the points restored, then
        the charged money restored, never more than is owed. The clawback takes the
        refund's own restorations first (points restored before the points held; the
        charged money restored before any held: `withheld`), so the rest of them is what
        reaches the member. Grant money restored stays in its lot: it is its program's.
        A refund that adds to what is owed has nothing left to settle with."""
        due = max(owed_before, 0)
        if self.owed or not due:
            return
        self.settled_points = min(due, max(0, self.points - self.from_points))
        self.settled_charged = min(due - self.settled_points, max(0, self.charged - self.withheld))

    def limit_by_funders(self, held: dict[str, int]) -> int:
        """Take back from no funder more than its month's account holds (`held`, its
        budget's committed amount): the last parts first, the rest left with the member
        (logged as `refund.clawback_beyond_funders`). Only a correction posted
        without its payments (before migration 0014) took from the funders what a
        payment's refund then claws back again; without this its refund was refused at
        every retry. Returns what was left."""
        parts = [step for _, _, _, step in self.steps]
        cut = 0
        for source, total in self.clawback_by_source.items():
            over = total - max(held.get(source, 0), 0)
            for i in reversed(range(len(parts))):
                if over <= 0:
                    break
                if self.steps[i][1] == source:
                    less = min(parts[i], over)
                    parts[i] -= less
                    over -= less
                    cut += less
        if cut:
            self._take(parts)
        return cut

    def _take(self, parts: list[int]) -> None:
        """Claw back `parts` instead of the planned steps, the state recording them."""
        by_source: dict[str, int] = {}
        by_component: dict[str, int] = {}
        clawed = self.state_after["clawed"]
        corrected = self.state_after.get("corrected")
        for (key, source, component_id, step), part in zip(self.steps, parts):
            if key.startswith("corrected/"):
                corrected["parts"][int(key[len("corrected/"):])][3] -= step - part
            else:
                clawed[key] -= step - part
            if part:
                by_source[source] = by_source.get(source, 0) + part
                by_component[component_id] = by_component.get(component_id, 0) + part
        self.steps = [(key, source, component_id, part)
                      for (key, source, component_id, _), part in zip(self.steps, parts)]
        self.clawback = sum(parts)
        self.clawback_by_source, self.clawback_by_component = by_source, by_component

    @property
    def grants_to_member(self) -> int:
        return sum(a for p, a in self.grant_parts if p not in self.expired)

    @property
    def grants_to_funders(self) -> int:
        return sum(a for p, a in self.grant_parts if p in self.expired)


def _restore(detail: dict, prior: dict, amount_won: int) -> tuple[int, int, list[tuple[str, int]]]:
    """Where `amount_won` more of a payment goes back: charged, points, [(program, won)],
    in the reverse of the spend order, after what `prior` restored. Each balance is
    filled in turn, so refunds totalling the same amount restore the same, whatever
    their sizes."""
    spent = detail["spent"]
    done_charged, done_points = prior.get("charged", 0), prior.get("points", 0)
    done_grants: dict[str, int] = prior.get("grants", {})
    left = amount_won
    charged = points = 0
    grant_parts: list[tuple[str, int]] = []
    for balance in reversed(detail["spend_order"]):
        if balance == "charged":
            charged = min(left, spent["charged"] - done_charged)
            left -= charged
        elif balance == "points":
            points = min(left, spent["points"] - done_points)
            left -= points
        else:
            for program_id, spent_amount in reversed(spent["grants"]):
                take = min(left, spent_amount - done_grants.get(program_id, 0))
                if take > 0:
                    grant_parts.append((program_id, take))
                    left -= take
    assert left == 0, "refund within the payment must be fully placed"
    return charged, points, grant_parts


def base_parts_of(detail: dict, state: dict) -> dict:
    """Which of a payment's balances count as its base (`_base_parts`): as the right
    policy of the last correction that re-based its base gave them
    (`corrected.base_parts`, from migration 0017), else as the policy that recorded it."""
    return state.get("corrected", {}).get("base_parts", detail["base_parts"])


def _base_of(parts: dict, charged: int, points: int, grant_parts: Iterable[Sequence]) -> int:
    """The part of this money (restored, or spent) that counts as the payment's base
    under `parts` (`base_parts_of`)."""
    base = 0
    if parts.get("charged"):
        base += charged
    if parts.get("points"):
        base += points
    for program_id, take in grant_parts:
        if program_id in parts.get("grants", []):
            base += take
    return base


def cashback_held(detail: dict, state: dict) -> dict[tuple[str, str], int]:
    """What a payment holds of its cashback now, per (component, funder): its corrected
    parts less what refunds took back of them, or else its lines less what refunds
    took back of those."""
    held: dict[tuple[str, str], int] = {}
    corrected = state.get("corrected")
    if corrected is not None:
        for component_id, source, amount, clawed in corrected["parts"]:
            held[(component_id, source)] = held.get((component_id, source), 0) + amount - clawed
        return held
    clawed_by_key: dict[str, int] = state.get("clawed", {})
    for index, line in enumerate(detail["lines"]):
        for source, funded in line["funded_by"]:
            key = (line["component_id"], source)
            held[key] = held.get(key, 0) + funded - clawed_by_key.get(f"{index}/{source}", 0)
    return held


def _correction_txns(member: "MemberState", month: str, by_funder: Sequence[tuple[str, int]],
                     rebased: Sequence[tuple[dict, "CorrectedPayment"]], owed: int = 0
                     ) -> list[tuple[str | None, list]]:
    """A correction line's transactions, (merchant_id, legs) each: the part funded by
    `merchant` (a 상생 merchant's own share) of each merchant whose payments the line
    corrects in one of its own, carrying that merchant, so settlement withholds it from
    (or pays it back to) that merchant's payout as it does a payment's cashback and its
    refund's clawback; the rest (the public funders, and a line's merchant part posted
    without its payments, before migration 0014) in one with no merchant. (Before, the
    whole line was one transaction with no merchant: its merchant part was reported
    apart and charged to no merchant, while the payment's refund clawed it back through
    the merchant's payout: 3,000 paid to a merchant for a sale refunded whole.)

    Each transaction balances against the member, and each account's legs sum to what
    the line as one transaction moves, whatever the signs of its parts: a line that gives
    settles first what the member owes (`owed`, `receivable/{member}`: a correction took
    back more than they held), then credits points; one that takes comes from points,
    then charged money, then the receivable. (Before, what a line gave all went to
    points while the member still owed: a correction to 7% left 15,000 owed, one back to
    10% gave 15,000 points and left the 15,000 owed.) Those that give are posted first.
    Reads the member's balances and does not move them (the caller moves them by what
    the legs sum to)."""
    parts: dict[str, int] = {}
    for payment, corrected in rebased:
        for _, source, amount in corrected.posted:
            if source == MERCHANT_FUNDER and amount:
                parts[payment["merchant_id"]] = parts.get(payment["merchant_id"], 0) + amount
    groups: list[tuple[str | None, list, int]] = []
    rest = [(acct.funder_cashback(source, month), amount - (sum(parts.values()) if source == MERCHANT_FUNDER else 0))
            for source, amount in by_funder]
    groups.append((None, rest, sum(amount for _, amount in rest)))
    groups += [(merchant_id, [(acct.funder_cashback(MERCHANT_FUNDER, month), amount)], amount)
               for merchant_id, amount in sorted(parts.items()) if amount]
    points, charged, receivable = (acct.member_points(member.member_id), acct.member_charged(member.member_id),
                                   acct.member_receivable(member.member_id))
    # The member's side of the line as one transaction, as pools the transactions draw
    # on in turn: what the gives credit, what the takes debit.
    gives = sum(total for _, _, total in groups if total > 0)
    net = sum(total for _, _, total in groups)
    if net >= 0:
        settled = min(net, owed)
        credits = [[receivable, settled], [points, gives - settled]]
        debits = [[points, gives - net]]
    else:
        from_points = min(-net, member.points)
        from_charged = min(-net - from_points, member.charged)
        credits = [[points, gives]]
        debits = [[points, from_points + gives], [charged, from_charged],
                  [receivable, -net - from_points - from_charged]]
    out = []
    for merchant_id, legs, total in sorted(groups, key=lambda g: g[2] < 0):
        legs = [leg for leg in legs if leg[1]]
        pools, due, sign = (credits, total, -1) if total >= 0 else (debits, -total, 1)
        for pool in pools:
            drawn = min(due, pool[1])
            if drawn:
                legs.append((pool[0], sign * drawn))
                pool[1] -= drawn
                due -= drawn
        assert due == 0, f"a correction line's transaction is short {due} won of the member's side"
        out.append((merchant_id, legs))
    return out


def corrections_of(state: dict) -> int:
    """How many correction lines have re-based a payment (its refund state's `corrected.lines`)."""
    return len(state.get("corrected", {}).get("lines", []))


@dataclass(frozen=True, slots=True)
class CorrectedPayment:
    """A correction line's part of one payment as posted (`correct_payment`), and the
    payment as it leaves it."""

    posted: list[tuple[str, str, int]]  # (component, funder, won)
    refund_state: str
    base_won: int
    counts_toward_month: bool
    eligible_won: int  # what its member-month's eligible spend moves by


def correct_payment(payment: dict, refunded_planned: int, parts: Iterable[Sequence], line_id: str,
                    corrections_seen: int | None = None, base: Sequence | None = None,
                    programs: ProgramCache | None = None) -> CorrectedPayment:
    """A correction line's part of one payment, as posted, and the payment re-based on it.

    The plan evaluated what was left of the payment after `refunded_planned` of refunds.
    Refunds since then took back their share of the original cashback; of the delta the
    same share is not posted (floored as a refund's clawback is, so the member never
    gets less than the exact share; the share of the base the payment has, or, when it
    has none, of the right policy's). Nor is more taken from a (component, funder) than
    the payment holds of it (the plan compares two re-evaluations, and what was recorded
    may be less than the wrong policy gives, e.g. when a budget ran short). The payment
    then holds, per (component, funder), what it held plus what was posted
    (`corrected.parts`: [component, funder, amount, clawed since]), from the base it had
    refunded by then (`corrected.base`); `plan_refund` claws back from that.

    `base`: whether the right policy counts the payment toward the month and the
    balances it earns cashback on, (counts, cashback_on) (None: planned before
    migration 0017, the base left as it was). The payment's base, whether it counts,
    the base its refunds gave back (the refund state's `base`) and its member-month's
    eligible spend then follow the right policy (`corrected.base_parts`), so later
    payments of the month and its refunds see the month as the right policy has it.

    `corrections_seen`: how many corrections had re-based the payment when the plan was
    made (None: planned before migration 0015, not checked). Another since, and the part
    is stale (planned from what the payment held before it): `CorrectedSincePlanned`."""
    detail = orjson.loads(payment["detail"])
    state = orjson.loads(payment["refund_state"] or "{}")
    if corrections_seen is not None and corrections_of(state) != corrections_seen:
        since = ", ".join(state.get("corrected", {}).get("lines", [])[corrections_seen:]) or "none"
        raise CorrectedSincePlanned(
            f"payment {payment['payment_id']!r} was corrected since the line {line_id!r} was planned "
            f"(corrections {corrections_seen} then, {corrections_of(state)} now; since: {since}); nothing of "
            "the line was posted, propose the correction again to correct the rest")
    refunded_now = payment["refunded_won"]
    if refunded_planned > refunded_now:
        raise Conflict(f"the correction line {line_id!r} saw more refunded of payment {payment['payment_id']!r} "
                       "than the book holds")
    # (whole, refunded when planned, refunded now) of the payment's base, as it is and
    # as the correction leaves it
    base_now = state.get("base", 0)
    parts_now = base_parts_of(detail, state)
    before = after = (payment["base_won"], base_now if refunded_planned == refunded_now else
                      _base_of(parts_now, *_restore(detail, {}, refunded_planned)), base_now)
    counts, parts_after = bool(payment["counts_toward_month"]), parts_now
    if base is not None:
        counts = bool(base[0])
        parts_after = _base_parts(base[1], detail["spent"]["grants"], programs) if counts else {}
        after = _bases(detail, parts_after, refunded_planned, refunded_now)
    share = next(((now - planned, whole - planned) for whole, planned, now in (before, after) if planned < whole),
                 None)
    held = cashback_held(detail, state)
    posted = []
    for component_id, source, delta in parts:
        if share is not None:
            delta -= delta * share[0] // share[1]
        elif refunded_now == payment["amount_won"]:
            delta = 0  # nothing left of the payment for it to apply to
        key = (component_id, source)
        delta = max(delta, -held.get(key, 0))
        held[key] = held.get(key, 0) + delta
        posted.append((component_id, source, delta))
    lines = state.get("corrected", {}).get("lines", [])
    state["corrected"] = {"base": after[2], "parts": [[c, s, won, 0] for (c, s), won in sorted(held.items()) if won],
                          "lines": [*lines, line_id]}
    if parts_after is not detail["base_parts"]:  # re-based now or by an earlier correction
        state["corrected"]["base_parts"] = parts_after
    if "base" in state:  # refunded: the base they gave back, as the payment's base is now
        state["base"] = after[2]
    eligible_before = before[0] - before[2] if payment["counts_toward_month"] else 0
    eligible_after = after[0] - after[2] if counts else 0
    return CorrectedPayment(posted, _dumps(state), after[0], counts, eligible_after - eligible_before)


def _bases(detail: dict, parts: dict, refunded_planned: int, refunded_now: int) -> tuple[int, int, int]:
    """The payment's base under `parts`: whole, refunded when `refunded_planned` was,
    and refunded now (refunds restore the same money, whatever their sizes: `_restore`)."""
    spent = detail["spent"]
    return (_base_of(parts, spent["charged"], spent["points"], spent["grants"]),
            _base_of(parts, *_restore(detail, {}, refunded_planned)),
            _base_of(parts, *_restore(detail, {}, refunded_now)))


def plan_refund(payment: dict, amount_won: int, occurred_at_us: int, programs: ProgramCache,
                closed: set[str] | frozenset[str] = frozenset()) -> RefundPlan:
    """Where a refund's money goes back to, and how much cashback it claws back.

    Restores in the reverse of the spend order. Clawback per (line, funder) is
    cumulative and floored: floor(funded × refunded_base / base), so a whole refund
    claws back exactly all the cashback and partial refunds never claw back more.

    A payment a correction re-based (`corrected`, `correct_payment`) is clawed back the
    same way from what it held per (component, funder) after the correction, over the
    base left then: floor(amount × (refunded_base − base then) / (base − base then)),
    so a whole refund claws back exactly what it holds. The refunded base is counted as
    the payment's base is now (`base_parts_of`: a correction may have re-based it). Its
    `clawed` still follows the original lines over the base that recorded them (what
    the policy that recorded it would have clawed back: the simulation's recorded
    figure); no money moves by it."""
    detail = orjson.loads(payment["detail"])
    prior = orjson.loads(payment["refund_state"] or "{}")
    done_grants: dict[str, int] = prior.get("grants", {})
    charged, points, grant_parts = _restore(detail, prior, amount_won)
    grants_after = dict(done_grants)
    for program_id, take in grant_parts:
        grants_after[program_id] = grants_after.get(program_id, 0) + take
    corrected = prior.get("corrected")
    base_refunded = _base_of(base_parts_of(detail, prior), charged, points, grant_parts)
    base_total = payment["base_won"]
    base_cum = prior.get("base", 0) + base_refunded
    lines_total, lines_cum = base_total, base_cum
    if corrected is not None and "base_parts" in corrected:
        spent, recorded = detail["spent"], detail["base_parts"]
        lines_total = _base_of(recorded, spent["charged"], spent["points"], spent["grants"])
        lines_cum = _base_of(recorded, prior.get("charged", 0) + charged, prior.get("points", 0) + points,
                             grants_after.items())
    clawed_prior: dict[str, int] = prior.get("clawed", {})
    clawed_after: dict[str, int] = {}
    steps: list[tuple[str, str, str, int]] = []
    for index, line in enumerate(detail["lines"]):
        for source, funded in line["funded_by"]:
            key = f"{index}/{source}"
            target = funded * lines_cum // lines_total if lines_total else 0
            clawed_after[key] = target
            if corrected is None and target != clawed_prior.get(key, 0):
                steps.append((key, source, line["component_id"], target - clawed_prior.get(key, 0)))
    if corrected is not None:
        corrected = {**corrected, "parts": [list(part) for part in corrected["parts"]]}
        base_then = corrected["base"]
        whole = payment["refunded_won"] + amount_won == payment["amount_won"]
        for i, part in enumerate(corrected["parts"]):
            component_id, source, amount, clawed = part
            if base_then < base_total:
                target = amount * (base_cum - base_then) // (base_total - base_then)
            else:  # no base was left to refund: what it holds goes with the payment's last won
                target = amount if whole else clawed
            if target != clawed:
                steps.append((f"corrected/{i}", source, component_id, target - clawed))
                part[3] = target
    by_source: dict[str, int] = {}
    by_component: dict[str, int] = {}
    for _, source, component_id, step in steps:
        by_source[source] = by_source.get(source, 0) + step
        by_component[component_id] = by_component.get(component_id, 0) + step
    expired = set()
    for program_id, _ in grant_parts:
        program = programs.get(program_id)
        # Ended, or already expired by the expiry job (a refund dated before the end but
        # sent after the expiry ran): the money goes back to the funders, not into a lot.
        if program is not None and (occurred_at_us >= program.valid_until_us or program_id in closed):
            expired.add(program_id)
    state_after = {"charged": prior.get("charged", 0) + charged, "points": prior.get("points", 0) + points,
                   "grants": grants_after, "base": base_cum, "clawed": clawed_after}
    if corrected is not None:
        state_after["corrected"] = corrected
    return RefundPlan(charged, points, grant_parts, expired, base_refunded, sum(by_source.values()),
                      {k: v for k, v in by_source.items() if v}, {k: v for k, v in by_component.items() if v},
                      state_after, steps)


# ---------------------------------------------------------------- small helpers


def unspent_legs(program: GrantProgramFacts, amount: int, held: dict[str, int] | None = None
                 ) -> tuple[dict[str, int], list[tuple[str, int]]]:
    """Where a program's unspent money goes (an expired lot, a refund of its spending
    after the end): by funder, and the credit legs. All of it to the one funder the
    program names (`acct.grant_unspent`: it may take more than it put in), else back
    by the funding split, no funder getting more than it holds in the program (`held`,
    `split_capped`)."""
    if program.unspent_to is not None:
        return {program.unspent_to: amount}, [(acct.grant_unspent(program.program_id, program.unspent_to), -amount)]
    returned = split_floor(amount, program.funding, program.remainder_to)
    if held is not None:
        returned = split_capped(returned, program.funding, held)
    return returned, [(acct.grant_fund(program.program_id, source), -part) for source, part in returned.items() if part]


def split_capped(parts: dict[str, int], funding: Sequence[tuple[str, int]], held: dict[str, int]) -> dict[str, int]:
    """`parts` (a by-the-split return) with no funder given back more than it holds
    (`held`): each share is floored on its own, so the pieces of a program's money that
    come back one by one (refunds, lots) can give the remainder funder more than it put
    in. What a share passes its holding by goes to the other funders, in the split's
    order, up to what each holds. What the funders hold together is what can still come
    back (disbursed − returned), so it all finds room; were it not (a concurrent return
    changed them since they were read), the split as it was: the accounts' floor refuses
    it, and a retry reads them again."""
    out = dict(parts)
    excess = 0
    for source, _ in funding:
        room = max(held.get(source, 0), 0)
        if out[source] > room:
            excess += out[source] - room
            out[source] = room
    if not excess:
        return parts
    for source, _ in funding:
        more = min(max(held.get(source, 0), 0) - out[source], excess)
        if more > 0:
            out[source] += more
            excess -= more
    return parts if excess else out


def _member_of(state: BatchState, command: Command) -> str | None:
    """The member whose money a command of a `_read_pg` batch moves (a refund's: its
    payment's)."""
    if isinstance(command, Refund):
        payment = state.payments.get(command.payment_id)
        return payment["member_id"] if payment is not None else None
    return command.member_id


def _member(state: BatchState, member_id: str) -> MemberState:
    member = state.members.get(member_id)
    if member is None:
        raise MemberNotFound(f"no member {member_id!r}")
    return member


def _commit_budget(state: BatchState, source: str, month: str, amount: int) -> None:
    view = state.budget_view
    for period in (month, month[:4]):
        key = (source, period)
        entry = state.budgets.get(key)
        assert entry is not None, f"budget {source}/{period} was not locked"
        entry[1] += amount
        if view is not None and entry[0] is not None:
            view.remaining_won[key] -= amount  # type: ignore[index]


def _base_parts(cashback_on: Iterable[str], spent_grants: Iterable[Sequence], programs: ProgramCache) -> dict:
    """Which of a payment's balances earn cashback (`rules.evaluate._base`): those the
    policy's `cashback_on` names, and grant money of programs whose spending earns it."""
    grants = [p for p, _ in spent_grants
              if "grants" in cashback_on or (programs.get(p) and programs.get(p).cashback_on_spend)]
    return {"charged": "charged" in cashback_on, "points": "points" in cashback_on, "grants": grants}


def _sqlite_insert(table: str, columns: Sequence[str]) -> str:
    return f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})"


SQLITE_UPSERT_BUDGET_DAYS = ("INSERT INTO budget_days (source, period, day, committed_won) VALUES (?, ?, ?, ?) "
                             "ON CONFLICT (source, period, day) DO UPDATE "
                             "SET committed_won = budget_days.committed_won + excluded.committed_won")
SQLITE_INSERT_LEGS = _sqlite_insert("ledger_legs", pgstore.LEG_COLUMNS)
SQLITE_INSERT_TXNS = _sqlite_insert("ledger_txns", pgstore.TXN_COLUMNS)
SQLITE_INSERT_PAYMENTS = _sqlite_insert("payments", pgstore.PAYMENT_COLUMNS)
SQLITE_INSERT_TOPUPS = _sqlite_insert("topups", pgstore.TOPUP_COLUMNS)
SQLITE_INSERT_REFUNDS = _sqlite_insert("refunds", pgstore.REFUND_COLUMNS)
SQLITE_INSERT_DISBURSEMENTS = _sqlite_insert("grant_disbursements", pgstore.DISBURSEMENT_COLUMNS)
SQLITE_INSERT_WITHDRAWALS = _sqlite_insert("withdrawals", pgstore.WITHDRAWAL_COLUMNS)
SQLITE_UPSERT_MONTHS = (
    "INSERT INTO member_months (member_id, month, eligible_spend_won, cashback_won, topped_up_won, component_cashback) "
    "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (member_id, month) DO UPDATE SET "
    "eligible_spend_won = excluded.eligible_spend_won, cashback_won = excluded.cashback_won, "
    "topped_up_won = excluded.topped_up_won, component_cashback = excluded.component_cashback")
MerchantRow = namedtuple("MerchantRow", "merchant_id district category annual_sales_won registered_from flags "
                                        "merchant_share_bp")
PIPELINED_READS = (Pay, TopUp, Refund, Disburse)  # kinds `Book._read_pg` reads for
# Where each kind's stored answer is appended (`Writes`), so the JSON written to the
# book is also the bytes sent and cached: one serialisation per answer.
_RESPONSE_ROWS = {"payment": "payments", "topup": "topups", "refund": "refunds", "disbursement": "disbursements",
                  "withdrawal": "withdrawals"}


def merchant_facts(row) -> MerchantFacts:
    flags = frozenset(f for f in row.flags.split(",") if f)
    return MerchantFacts(row.merchant_id, row.district, row.category, row.annual_sales_won,
                         dt.date.fromisoformat(row.registered_from), flags, row.merchant_share_bp)


def payment_body(c: Pay, d: PaymentDecision, balances: dict) -> dict:
    body: dict[str, Any] = {
        "payment_id": c.payment_id, "member_id": c.member_id, "merchant_id": c.merchant_id,
        "amount": c.amount_won, "occurred_at": rfc3339(c.occurred_at_us),
        "status": "approved" if d.approved else "declined",
        "policy_id": d.policy_id or None,
        "spent": {"grants": sum(a for _, a in d.spent_grants), "points": d.spent_points_won,
                  "charged": d.spent_charged_won},
        "spent_grants": [{"program_id": p, "amount": a} for p, a in d.spent_grants],
        "cashback": {
            "amount": d.cashback_won,
            "base": d.base_won,
            "components": [
                {"rule": l.rule, "component": l.component_id, "band": l.band, "rate_bp": l.rate_bp,
                 "base": l.base_won, "amount": l.amount_won, "funded_by": dict(l.funded_by),
                 **({"reason": l.reason} if l.reason else {}),
                 # Which budget stopped it: a line said budget_partial, and support could
                 # only guess the source from funded_by, never the month or the year (the
                 # budgets audit).
                 **({"short_of": [{"source": source, "period": period} for source, period in l.short_of]}
                    if l.short_of and l.reason in BUDGET_SHORT_REASONS else {})}
                for l in d.lines
            ],
            "why": [dict(w) for w in d.why],
        },
        "balances": balances,
    }
    if d.decline_code:
        body["decline_code"] = d.decline_code
    return body


def _own_commits(written: list[Outcome], outcomes: list[Outcome]) -> list[Outcome]:
    """A batch run again after its connection broke while it wrote (`written`: that
    attempt's outcomes): a replay of what the broken attempt wrote as new, with the very
    answer it wrote, is that attempt's COMMIT, which went through. It is answered as the
    replay it is, and marked `own_commit`, so the writer counts it as it counts a new one."""
    return [dataclasses.replace(o, own_commit=True)
            if o.replayed and o.error is None and w.error is None and not w.replayed and w.raw is not None
            and w.raw == o.raw else o
            for w, o in zip(written, outcomes)]


def _dumps(value: Any) -> str:
    return orjson.dumps(value).decode()


def _transient(exc: OperationalError) -> bool:
    text = str(exc.orig).lower()
    return any(word in text for word in ("deadlock", "could not serialize", "database is locked", "lock timeout",
                                         "canceling statement", pgstore.PREPARED_LOST))
