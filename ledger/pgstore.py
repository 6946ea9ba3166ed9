"""The book's batch on PostgreSQL in two round trips (three when the budgets are
locked), with the driver's own SQL.

`Book._run` on PostgreSQL spends its time here, so this module is written for it:
- every statement's text is fixed whatever the batch size (ids travel as arrays:
  `= ANY(%s)`, `unnest(%s::text[], ...)`), so each is prepared once per connection
  and the server never parses it again (it still plans some per execution: with an
  array parameter a custom plan looks cheaper than the generic one, see
  docs/performance.md);
- the batch read and the batch write go to libpq's pipeline directly (`Pipeline`,
  `psycopg.pq`), without psycopg's cursors: their parameters are already strings, and
  psycopg's per-statement machinery was a third of the writer thread's time;
- one multi-row statement per table: the ledger guards are statement-level triggers
  (ledger/migrations/guards.py), so a batch fires each guard once, not once per row;
- statements are pipelined (libpq's pipeline mode): the reads go in one round trip
  (the member lock, then every other read as one statement, `SQL_BATCH_READS`, with a
  generic plan and no sequential scans for that statement alone: `ST_GENERIC_PLAN`);
  when a budget row is new or binds, the budget locks in a second; all the writes and
  the COMMIT in the last.

Lock order is the book's: members (sorted, FOR UPDATE), then budgets (sorted), then
the shared accounts (an ordered SELECT ... FOR NO KEY UPDATE before the set-based
UPDATE, so rows are locked in account order). A member's own accounts are nobody
else's to wait for (their member's lock guards them): they are written before the
budgets. Semantics are the SQLAlchemy path's (used on SQLite), statement for statement.

Errors from the driver are re-raised as SQLAlchemy's (IntegrityError, OperationalError,
...) so `Book.execute`'s retry rules see the same classes on both paths.
"""

from __future__ import annotations

import contextlib
import re
import select
import time
import weakref
from typing import Iterable, Sequence

import orjson
import psycopg
from psycopg import pq
from sqlalchemy import Connection
from sqlalchemy.exc import DBAPIError

from ledger import accounts as acct
from rules.timeutil import local_date

IDEMPOTENCY_TABLES = {
    "payment": ("payments", "payment_id"),
    "topup": ("topups", "topup_id"),
    "refund": ("refunds", "refund_id"),
    "disbursement": ("grant_disbursements", "disbursement_id"),
}

PAYMENT_COLUMNS = ("payment_id", "request_hash", "member_id", "merchant_id", "amount_won", "occurred_at_us", "month",
                   "status", "decline_code", "policy_id", "base_won", "counts_toward_month", "cashback_won",
                   "detail", "refunded_won", "refund_state", "response", "recorded_at_us")
PAYMENT_TYPES = ("text", "text", "text", "text", "int8", "int8", "text", "text", "text", "text", "int8", "bool",
                 "int8", "text", "int8", "text", "text", "int8")
TOPUP_COLUMNS = ("topup_id", "request_hash", "member_id", "amount_won", "occurred_at_us", "status", "decline_code",
                 "response", "recorded_at_us")
TOPUP_TYPES = ("text", "text", "text", "int8", "int8", "text", "text", "text", "int8")
REFUND_COLUMNS = ("refund_id", "request_hash", "payment_id", "amount_won", "occurred_at_us", "clawback_won",
                  "response", "recorded_at_us")
REFUND_TYPES = ("text", "text", "text", "int8", "int8", "int8", "text", "int8")
WITHDRAWAL_COLUMNS = ("withdrawal_id", "request_hash", "member_id", "requested_won", "amount_won", "charged_in_won",
                      "occurred_at_us", "status", "decline_code", "policy_id", "response", "recorded_at_us")
WITHDRAWAL_TYPES = ("text", "text", "text", "int8", "int8", "int8", "int8", "text", "text", "text", "text", "int8")
DISBURSEMENT_COLUMNS = ("disbursement_id", "request_hash", "program_id", "member_id", "amount_won", "response",
                        "recorded_at_us", "actor")
DISBURSEMENT_TYPES = ("text", "text", "text", "text", "int8", "text", "int8", "text")
TXN_COLUMNS = ("txn_id", "kind", "ref", "member_id", "merchant_id", "occurred_at_us", "business_date",
               "recorded_at_us", "leg_count")
TXN_TYPES = ("int8", "text", "text", "text", "text", "int8", "text", "int8", "int2")
MONTH_COLUMNS = ("member_id", "month", "eligible_spend_won", "cashback_won", "topped_up_won", "component_cashback")
MONTH_TYPES = ("text", "text", "int8", "int8", "int8", "text")


def _insert_unnest(table: str, columns: Sequence[str], types: Sequence[str], tail: str = "") -> str:
    arrays = ", ".join(f"%s::{t}[]" for t in types)
    return f"INSERT INTO {table} ({', '.join(columns)}) SELECT * FROM unnest({arrays}){tail}"


SQL_LOCK_MEMBERS = ("SELECT member_id, district, status FROM members WHERE member_id = ANY(%s::text[]) "
                    "ORDER BY member_id FOR UPDATE")
# The service's batches lock the members no other transaction holds and leave the rest
# (`read_batch`'s `free_members_only`): which of those left exist is read after.
SQL_LOCK_FREE_MEMBERS = SQL_LOCK_MEMBERS + " SKIP LOCKED"
SQL_MEMBERS_EXIST = "SELECT member_id FROM members WHERE member_id = ANY(%s::text[])"
SQL_PAYMENT_MEMBERS = "SELECT payment_id, member_id, month FROM payments WHERE payment_id = ANY(%s::text[])"
SQL_EXISTING = {kind: f"SELECT {column}, request_hash, response FROM {table} WHERE {column} = ANY(%s::text[])"
                for kind, (table, column) in IDEMPOTENCY_TABLES.items()}
SQL_BALANCES = "SELECT account_id, owner_id, balance_won FROM accounts WHERE owner_id = ANY(%s::text[])"
SQL_PAYMENTS = f"SELECT {', '.join(PAYMENT_COLUMNS)} FROM payments WHERE payment_id = ANY(%s::text[])"
SQL_MONTHS = (f"SELECT {', '.join(MONTH_COLUMNS)} FROM member_months "
              "WHERE member_id = ANY(%s::text[]) AND month = ANY(%s::text[])")
SQL_MERCHANTS = ("SELECT merchant_id, district, category, annual_sales_won, registered_from, flags, "
                 "merchant_share_bp FROM merchants WHERE merchant_id = ANY(%s::text[])")
SQL_ENSURE_BUDGETS = ("INSERT INTO budgets (source, period, limit_won, committed_won, updated_at_us) "
                      "SELECT s, p, NULL, 0, %s::int8 FROM unnest(%s::text[], %s::text[]) AS k(s, p) "
                      "ON CONFLICT DO NOTHING RETURNING source, period")
SQL_LOCK_BUDGETS = ("SELECT b.source, b.period, b.limit_won, b.committed_won FROM budgets b "
                    "JOIN unnest(%s::text[], %s::text[]) AS k(s, p) ON b.source = k.s AND b.period = k.p "
                    "ORDER BY b.source, b.period FOR UPDATE OF b")
LEG_COLUMNS = ("txn_id", "leg_no", "account_id", "amount_won")
LEG_TYPES = ("int8", "int2", "text", "int8")
SQL_INSERT_LEGS = _insert_unnest("ledger_legs", LEG_COLUMNS, LEG_TYPES)
SQL_INSERT_TXNS = _insert_unnest("ledger_txns", TXN_COLUMNS, TXN_TYPES)
SQL_INSERT = {
    "payments": _insert_unnest("payments", PAYMENT_COLUMNS, PAYMENT_TYPES),
    "topups": _insert_unnest("topups", TOPUP_COLUMNS, TOPUP_TYPES),
    "refunds": _insert_unnest("refunds", REFUND_COLUMNS, REFUND_TYPES),
    "grant_disbursements": _insert_unnest("grant_disbursements", DISBURSEMENT_COLUMNS, DISBURSEMENT_TYPES),
    "withdrawals": _insert_unnest("withdrawals", WITHDRAWAL_COLUMNS, WITHDRAWAL_TYPES),
}
INSERT_COLUMNS = {"payments": (PAYMENT_COLUMNS, PAYMENT_TYPES), "topups": (TOPUP_COLUMNS, TOPUP_TYPES),
                  "refunds": (REFUND_COLUMNS, REFUND_TYPES),
                  "grant_disbursements": (DISBURSEMENT_COLUMNS, DISBURSEMENT_TYPES),
                  "withdrawals": (WITHDRAWAL_COLUMNS, WITHDRAWAL_TYPES)}
SQL_PAYMENT_UPDATES = ("UPDATE payments p SET refunded_won = v.rw, refund_state = v.rs, base_won = v.bw, "
                       "counts_toward_month = v.ct FROM unnest(%s::text[], %s::int8[], %s::text[], %s::int8[], "
                       "%s::bool[]) AS v(pid, rw, rs, bw, ct) WHERE p.payment_id = v.pid")
SQL_CORRECTION_UPDATES = ("UPDATE correction_lines c SET response = v.resp, posted_at_us = v.at "
                          "FROM unnest(%s::text[], %s::text[], %s::int8[]) AS v(lid, resp, at) "
                          "WHERE c.line_id = v.lid AND c.response IS NULL")
SQL_UPSERT_MONTHS = _insert_unnest(
    "member_months", MONTH_COLUMNS, MONTH_TYPES,
    " ON CONFLICT (member_id, month) DO UPDATE SET eligible_spend_won = EXCLUDED.eligible_spend_won, "
    "cashback_won = EXCLUDED.cashback_won, topped_up_won = EXCLUDED.topped_up_won, "
    "component_cashback = EXCLUDED.component_cashback")
# Accounts: those the batch names that may not exist yet are created at zero (fed in
# account order), then every account the batch moves is locked in account order, then
# moved by its batch delta. (Creating with the delta in one upsert is not possible: the
# floor check runs on the row proposed for insertion, before the conflict is seen.)
SQL_ENSURE_ACCOUNTS = (
    "INSERT INTO accounts (account_id, type, owner_id, balance_won, floor_zero) "
    "SELECT a, t, o, 0, f FROM unnest(%s::text[], %s::text[], %s::text[], %s::bool[]) AS v(a, t, o, f) "
    "ORDER BY a ON CONFLICT DO NOTHING")
SQL_LOCK_ACCOUNTS = "SELECT 1 FROM accounts WHERE account_id = ANY(%s::text[]) ORDER BY account_id FOR NO KEY UPDATE"
SQL_MOVE_ACCOUNTS = ("UPDATE accounts a SET balance_won = a.balance_won + v.d "
                     "FROM unnest(%s::text[], %s::int8[]) AS v(id, d) WHERE a.account_id = v.id")
# SQL_LOCK_ACCOUNTS and SQL_MOVE_ACCOUNTS as one statement (the payment path's shared
# accounts: one statement less per batch). The CTE locks the rows in account order (its
# sort is below the lock), and the UPDATE reaches a row only through the CTE's row for
# it, so a row is moved only once locked and every wait is in the CTE, in the book's
# order, as the two statements had it. (A row another transaction moved meanwhile is
# moved from its newest version: the UPDATE follows it, as any UPDATE under READ
# COMMITTED does.)
SQL_LOCK_MOVE_ACCOUNTS = (
    "WITH l AS MATERIALIZED (SELECT account_id FROM accounts WHERE account_id = ANY(%s::text[]) "
    "ORDER BY account_id FOR NO KEY UPDATE) "
    "UPDATE accounts a SET balance_won = a.balance_won + v.d "
    "FROM unnest(%s::text[], %s::int8[]) AS v(id, d) JOIN l ON l.account_id = v.id WHERE a.account_id = v.id")
SQL_BUDGETS_SNAPSHOT = ("SELECT source, period, limit_won, committed_won FROM budgets "
                        "WHERE period = ANY(%s::text[])")
# What the members of a batch's refunds owe (`receivable/{member}`: no owner_id, so not
# among SQL_BALANCES), which a refund's shortfall adds to and its restorations settle.
SQL_OWED = "SELECT account_id, balance_won FROM accounts WHERE account_id = ANY(%s::text[])"


def _rows_json(select: str) -> str:
    """A read as one JSON column of row arrays (`[]` when none): the batch's reads after
    the member lock travel as a single statement with one row (`SQL_BATCH_READS`)."""
    columns, _, rest = select.removeprefix("SELECT ").partition(" FROM ")
    return f"(SELECT coalesce(json_agg(json_build_array({columns})), '[]') FROM {rest})"


# Every read of a batch after the member lock, as ONE statement. Each statement in the
# pipeline costs the writer thread its own Python (psycopg's pipeline machinery was 19%
# of a worker's GIL time at 1,000 payments/s) and the server its own executor start; at
# a few payments a batch that fixed cost outweighed the payments' own work. One
# statement also reads everything from one snapshot, taken after the lock is held (the
# lock stays its own statement: in READ COMMITTED a statement that waits for a lock
# still reads from the snapshot it started with). Absent parts get empty arrays, so
# the text is fixed and `Pipeline` prepares it once per connection. The budgets are read
# unlocked: the batch is evaluated against this snapshot and its UPDATE (last, under
# the within-limit CHECK) settles it; see Book._lock_budgets.
BATCH_READ_KINDS = tuple(IDEMPOTENCY_TABLES)
SQL_BATCH_READS = "SELECT " + ", ".join(
    [_rows_json(SQL_EXISTING[kind]) for kind in BATCH_READ_KINDS]
    + [_rows_json(SQL_BALANCES), _rows_json(SQL_PAYMENTS), _rows_json(SQL_MONTHS), _rows_json(SQL_MERCHANTS),
       # the batch's transaction ids
       "(SELECT coalesce(json_agg(nextval('ledger_txn_id_seq')), '[]') FROM generate_series(1, %s::int))",
       _rows_json(SQL_BUDGETS_SNAPSHOT)])
# With the receivables of the batch's refunds' members: only a batch with refunds reads
# them (a refund adds what its member does not hold and settles what they owe), so a
# batch of payments and top-ups does not pay for the part (~10 µs a batch, within the
# noise of the read's ~360 µs; docs/performance-log.md, 2026-12-07a).
SQL_BATCH_READS_OWED = SQL_BATCH_READS + ", " + _rows_json(SQL_OWED)
SQL_LOCK_BUDGET_KEYS = ("SELECT 1 FROM budgets b JOIN unnest(%s::text[], %s::text[]) AS k(s, p) "
                        "ON b.source = k.s AND b.period = k.p ORDER BY b.source, b.period FOR NO KEY UPDATE OF b")
# The budgets' locks (as SQL_LOCK_BUDGET_KEYS takes them), their moves and the same
# moves under the batch's day (`budget_days`, what the forecast's recent burn reads) in
# one statement: no statement more in the batch's pipeline. `v` joins the locked rows
# and sorts, so every budget row is locked, in (source, period) order, before any move
# or day row is written; the day rows of a budget are written only under its row lock,
# so racing batches take them in the budgets' order and never meet on a new day's row.
# (After a locked read, or the early lock of a batch that creates a shared account, the
# rows are this transaction's already: taking them again waits for nothing.)
SQL_UPDATE_BUDGETS = ("WITH l AS MATERIALIZED (SELECT b.source, b.period FROM budgets b "
                      "JOIN unnest(%s::text[], %s::text[]) AS k(s, p) ON b.source = k.s AND b.period = k.p "
                      "ORDER BY b.source, b.period FOR NO KEY UPDATE OF b), "
                      "v AS (SELECT v.s, v.p, v.d FROM unnest(%s::text[], %s::text[], %s::int8[]) AS v(s, p, d) "
                      "JOIN l ON l.source = v.s AND l.period = v.p ORDER BY 1, 2), "
                      "days AS (INSERT INTO budget_days AS bd (source, period, day, committed_won) "
                      "SELECT s, p, %s::text, d FROM v ORDER BY 1, 2 ON CONFLICT (source, period, day) "
                      "DO UPDATE SET committed_won = bd.committed_won + EXCLUDED.committed_won) "
                      "UPDATE budgets b SET committed_won = b.committed_won + v.d, updated_at_us = %s::int8 "
                      "FROM v WHERE b.source = v.s AND b.period = v.p RETURNING b.source, b.period, b.committed_won")


@contextlib.contextmanager
def translated_errors(statement: str = "(pipelined batch)"):
    """Driver errors as SQLAlchemy's, so callers keep one set of except clauses."""
    try:
        yield
    except psycopg.Error as error:
        raise DBAPIError.instance(statement, None, error, psycopg.Error) from error


def driver(conn: Connection) -> psycopg.Connection:
    return conn.connection.driver_connection


def _text_array(values: Iterable) -> str:
    """A PostgreSQL array literal of text (NULL for None). Built with str methods (C),
    it costs a fraction of the driver's per-element Python array dumper; the server
    parses it with `array_in`. Without NULLs the whole column is joined on NUL (which no
    PostgreSQL text can hold), escaped once and split back: a few C calls per column
    instead of a Python step per value."""
    values = values if isinstance(values, list) else list(values)
    if not values:
        return "{}"
    if None not in values:
        joined = "\x00".join(values)
        if joined.count("\x00") == len(values) - 1:  # no value held a NUL of its own
            if "\\" in joined:
                joined = joined.replace("\\", "\\\\")
            if '"' in joined:
                joined = joined.replace('"', '\\"')
            return '{"' + joined.replace("\x00", '","') + '"}'
    return "{" + ",".join("NULL" if v is None else '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
                          for v in values) + "}"


def _int_array(values: Iterable) -> str:
    values = values if isinstance(values, list) else list(values)
    if None not in values:
        return "{" + ",".join(map(str, map(int, values))) + "}"
    return "{" + ",".join(["NULL" if v is None else str(int(v)) for v in values]) + "}"


def _bool_array(values: Iterable) -> str:
    return "{" + ",".join(["NULL" if v is None else ("t" if v else "f") for v in values]) + "}"


_ARRAY_LITERAL = {"text": _text_array, "int8": _int_array, "int2": _int_array, "int": _int_array,
                  "bool": _bool_array}


def _columns(rows: list[dict], names: Sequence[str], types: Sequence[str]) -> list[str]:
    """Column-wise array literals of `rows`, one per name, for `unnest(%s::type[], ...)`."""
    return [_ARRAY_LITERAL[t]([row[name] for row in rows]) for name, t in zip(names, types)]


def _tuple_columns(rows: list[tuple], types: Sequence[str]) -> list[str]:
    """`_columns` of rows that are tuples in the columns' order."""
    return [_ARRAY_LITERAL[t](column) for column, t in zip(zip(*rows), types, strict=True)]


# -- the batch's statements on libpq's pipeline, without psycopg's cursor machinery
#
# psycopg's `Cursor.execute` in pipeline mode costs ~45-65 us of Python per statement
# (query conversion, dumpers, prepared-statement bookkeeping, result objects), and a
# batch sends ~13 of them: py-spy (`--gil`) put psycopg's cursor and pipeline code at
# about a third of the writer thread's GIL time at 1,000 payments/s. Every statement
# here has a fixed text and text parameters the caller already holds as strings (the
# array literals above), so they go straight to libpq (`psycopg.pq`): prepared once per
# connection under a name of ours, then sent with `PQsendQueryPrepared`, the results
# read as bytes. Errors are psycopg's own exception classes (`error_from_result`), so
# `translated_errors` and the book's retry rules see what they saw before.

_OK = (pq.ExecStatus.COMMAND_OK, pq.ExecStatus.TUPLES_OK)
_FATAL = pq.ExecStatus.FATAL_ERROR
_PIPELINE_SYNC = pq.ExecStatus.PIPELINE_SYNC
_IDLE = pq.TransactionStatus.IDLE
PREPARED_LOST = "prepared statement lost"
_DEALLOCATE = "DEALLOCATE ALL"


class _Session:
    """What the book keeps about one server connection: the names prepared on it, and
    its own planner settings (put back after the batch read, `read_batch`)."""

    __slots__ = ("prepared", "unknown", "plan_defaults", "statement_s")

    def __init__(self, plan_defaults: tuple[str, str], statement_timeout_ms: int):
        self.prepared: set[bytes] = set()
        # True once a statement was found lost or prepared twice: which names the server
        # still holds is then unknown, so the next pipeline that prepares starts with
        # DEALLOCATE ALL and an empty `prepared` (`Pipeline.send`).
        self.unknown = False
        self.plan_defaults = plan_defaults
        # What bounds a pipeline's wait for the server (`Pipeline.reply_wait_s`): each
        # statement ends by the server's statement timeout (or its lock timeout).
        self.statement_s = statement_timeout_ms / 1000 if statement_timeout_ms > 0 else REPLY_WAIT_UNBOUNDED_S


_SESSIONS: "weakref.WeakKeyDictionary[psycopg.Connection, _Session]" = weakref.WeakKeyDictionary()


class Statement:
    """A fixed statement: its psycopg-style text (`%s`) as PostgreSQL's (`$n`), and the
    name it is prepared under on every connection that runs it."""

    __slots__ = ("name", "text", "sql")
    _count = 0

    def __init__(self, sql: str):
        Statement._count += 1
        self.name = f"eum_{Statement._count}".encode()
        self.sql = sql
        numbers = iter(range(1, 10_000))
        self.text = re.sub(r"%s", lambda _: f"${next(numbers)}", sql).encode()


def _param(value) -> bytes | None:
    if value is None:
        return None
    if isinstance(value, str):
        return value.encode()
    return str(int(value)).encode()


class Pipeline:
    """Statements queued on a connection's libpq pipeline, sent and answered in one
    round trip by `run` (which ends with a sync). A statement that fails aborts the
    rest up to the sync, as in psycopg's pipeline; `run` then raises the first error."""

    def __init__(self, raw: psycopg.Connection):
        self._raw = raw
        self._pgconn = raw.pgconn
        session = _SESSIONS.get(raw)
        if session is None:
            # psycopg answers any ROLLBACK on a connection where it prepared statements
            # of its own with DEALLOCATE ALL, which would take ours too: the book's
            # engines open every connection with `prepare_threshold=None`
            # (`ledger.db.make_engine`); a connection made elsewhere prepares none from
            # here on (after one last clear, if it had some: `run` re-prepares on a lost
            # statement).
            raw.prepare_threshold = None
            # The session's planner settings are read once per connection (psycopg
            # opens the batch's transaction for it, as it would for any first statement).
            plan_cache_mode, seqscan, statement_timeout_ms = raw.execute(
                "SELECT current_setting('plan_cache_mode'), current_setting('enable_seqscan'), "
                "(SELECT setting::int FROM pg_settings WHERE name = 'statement_timeout')").fetchone()
            session = _SESSIONS[raw] = _Session((plan_cache_mode, seqscan), statement_timeout_ms)
        self._session = session
        self._prepared = session.prepared
        self.plan_defaults = session.plan_defaults
        self._statement_s = session.statement_s
        self._preparing: list[bytes] = []
        self._expected: list[str] = []  # one label per statement sent, results in order
        self._count = 0  # statements whose results `run` returns (prepares left out)
        self._pgconn.enter_pipeline_mode()

    def begin(self) -> None:
        """BEGIN, if no transaction is open (psycopg would have sent it before the first
        statement of a non-autocommit connection)."""
        if self._pgconn.transaction_status == _IDLE:
            self.command(b"BEGIN")

    def command(self, sql: bytes) -> int:
        self._pgconn.send_query_params(sql, None)
        self._expected.append(sql.decode())
        self._count += 1
        return self._count - 1

    def send(self, statement: Statement, params: Sequence) -> int:
        """Queue a statement; returns the index of its result in `run`'s list."""
        if self._session.unknown:
            # Not transactional, and allowed in a transaction block; its result is not
            # one of `run`'s (like a PREPARE's).
            self._session.unknown = False
            self._prepared.clear()
            self._pgconn.send_query_params(b"DEALLOCATE ALL", None)
            self._expected.append(_DEALLOCATE)
        if statement.name not in self._prepared and statement.name not in self._preparing:
            self._pgconn.send_prepare(statement.name, statement.text)
            self._preparing.append(statement.name)
            self._expected.append("PREPARE " + statement.sql)
        self._pgconn.send_query_prepared(statement.name, [_param(v) for v in params])
        self._expected.append(statement.sql)
        self._count += 1
        return self._count - 1

    def reply_wait_s(self) -> float:
        """The longest `run` waits for the server's next bytes: the server sends a
        pipeline's results at its sync (or when its buffer fills), so the silence may
        last as long as all its statements together, each ended by the statement (or
        lock) timeout; past that and a margin the connection is stuck (a hung backend
        or pooler, a peer that keeps the TCP connection up and answers nothing)."""
        return self._statement_s * max(1, len(self._expected)) + REPLY_MARGIN_S

    def run(self) -> list:
        """Send everything and the sync; return each statement's result (prepares left
        out), in the order sent. Leaves pipeline mode whatever happens."""
        pgconn = self._pgconn
        results: list = []
        error: Exception | None = None
        self._wait_s = self.reply_wait_s()
        try:
            pgconn.pipeline_sync()
            fd = pgconn.socket
            while pgconn.flush():  # the server may answer while a big batch is still going out
                if _wait(fd, select.POLLIN | select.POLLOUT, self._wait_s) & select.POLLIN:
                    pgconn.consume_input()
            preparing = iter(self._preparing)
            for label in self._expected:
                result = self._next(fd)
                while self._next(fd) is not None:  # each statement's results end with a NULL
                    pass
                if result is not None and result.status == _FATAL and error is None:
                    error = psycopg.errors.error_from_result(result, encoding=self._raw.info.encoding)
                    error.add_note(f"statement: {label[:200]}")
                if label is _DEALLOCATE:
                    if result is None or result.status != pq.ExecStatus.COMMAND_OK:
                        self._session.unknown = True
                elif label.startswith("PREPARE "):
                    name = next(preparing)
                    if result is not None and result.status == pq.ExecStatus.COMMAND_OK:
                        self._prepared.add(name)  # it exists now, whatever fails after it
                else:
                    results.append(result)
            sync = self._next(fd)
            if sync is None or sync.status != _PIPELINE_SYNC:
                raise psycopg.OperationalError(f"pipeline out of step: {sync and sync.status}")
        except NoReply:
            self._raw.close()  # out of step for good: the book runs the batch again on a new one
            raise
        finally:
            try:
                pgconn.exit_pipeline_mode()
            except psycopg.Error:
                # Results still pending (the wait itself failed): the connection is out
                # of step with the server and must not run another statement.
                if pgconn.pipeline_status != pq.PipelineStatus.OFF:
                    self._raw.close()
        if error is not None:
            if isinstance(error, (psycopg.errors.InvalidSqlStatementName,
                                  psycopg.errors.DuplicatePreparedStatement)):
                # Deallocated behind our back (psycopg's DEALLOCATE ALL on a rollback,
                # before this pipeline), or a name the set had lost: which names the
                # server holds is unknown (those prepared by pipelines since that
                # DEALLOCATE still exist), so the next pipeline clears them all and
                # prepares what it uses; the batch is retried (ledger.book._transient).
                # Keeping only this pipeline's names forgot the others: preparing one
                # again failed as a duplicate, not retried, on every later batch that
                # used it on this connection (503s; the money audit of 2026-12-06i).
                self._session.unknown = True
                raise psycopg.OperationalError(f"{PREPARED_LOST}: {error}") from error
            raise error
        for result in results:
            if result is None or result.status not in _OK:
                raise psycopg.OperationalError(f"unexpected result: {result and result.status}")
        return results

    def _next(self, fd: int):
        pgconn = self._pgconn
        while pgconn.is_busy():
            _wait(fd, select.POLLIN, self._wait_s)
            pgconn.consume_input()
        return pgconn.get_result()


# See `Pipeline.reply_wait_s`: a margin past the statements' timeouts, and a statement's
# bound when the server sets no timeout.
REPLY_MARGIN_S = 5.0
REPLY_WAIT_UNBOUNDED_S = 60.0


class NoReply(psycopg.OperationalError):
    """The server sent nothing within `Pipeline.reply_wait_s`."""


def _wait(fd: int, events: int, timeout_s: float) -> int:
    """Block (without the GIL) until the socket is ready; returns the events seen. poll,
    not select: a worker serving many clients has descriptors past select's 1,024.
    Bounded: nothing for `timeout_s` raises `NoReply` (it waited without end, and the
    worker's writer with it, on a peer that kept the connection up and answered
    nothing, while /readyz said ready; the connection-loss audit)."""
    poller = select.poll()
    poller.register(fd, events)
    deadline = time.monotonic() + timeout_s
    while True:
        left_ms = (deadline - time.monotonic()) * 1000
        if left_ms <= 0:
            raise NoReply(f"no answer from the database in {timeout_s:g} s (its statements' timeouts and a margin); "
                          "the connection is dropped")
        ready = poller.poll(max(1, int(left_ms)))
        if ready:
            return ready[0][1]


def _rows(result) -> list[tuple]:
    """A text-format result's rows as tuples of str (None for NULL)."""
    columns = range(result.nfields)
    return [tuple(None if (v := result.get_value(r, c)) is None else v.decode() for c in columns)
            for r in range(result.ntuples)]


def existing_members(conn: Connection, member_ids: Iterable[str]) -> set[str]:
    """Of `member_ids`, those that exist (read without a lock): of the members a SKIP
    LOCKED lock left, those another transaction holds, not those that do not exist."""
    with translated_errors(SQL_MEMBERS_EXIST), driver(conn).cursor() as cur:
        cur.execute(SQL_MEMBERS_EXIST, (_text_array(member_ids),))
        return {row[0] for row in cur.fetchall()}


class Reads:
    """Results of the first round trip."""

    __slots__ = ("members", "existing", "balances", "payments", "months", "merchants", "txn_ids", "budgets", "owed",
                 "held")

    def __init__(self) -> None:
        self.members: list[tuple] = []
        self.held: set[str] = set()  # members another transaction holds (`free_members_only`)
        self.existing: list[tuple[str, tuple]] = []
        self.balances: list[tuple] = []
        self.payments: list[tuple] = []
        self.months: list[tuple] = []
        self.merchants: list[tuple] = []
        self.txn_ids: list[int] = []
        self.budgets: list[tuple] = []
        self.owed: list[tuple] = []


def payment_members(conn: Connection, payment_ids: Iterable[str]) -> list[tuple[str, str, str]]:
    """(payment_id, member_id, month) of the payments a batch refunds."""
    with translated_errors(SQL_PAYMENT_MEMBERS), driver(conn).cursor() as cur:
        cur.execute(SQL_PAYMENT_MEMBERS, (_text_array(payment_ids),))
        return cur.fetchall()


ST_LOCK_MEMBERS = Statement(SQL_LOCK_MEMBERS)
ST_LOCK_FREE_MEMBERS = Statement(SQL_LOCK_FREE_MEMBERS)
# The member lock and the batch read with a generic plan, and no sequential scans (until
# the end of the read).
# Left to itself the server plans it anew for every batch (a custom plan: with array
# parameters the generic plan never looks cheaper), ~0.2 ms of planning for ~0.15 ms
# of execution (EXPLAIN ANALYZE, batches of 4). Every part of it is a look-up by key
# or index, so index scans are the right plan at any table size; without
# `enable_seqscan = off` a generic plan made while a table was still small would keep
# its sequential scan as the table grew (measured: PostgreSQL CPU per payment up by
# half). `set_config(..., true)` lasts until the transaction ends; ST_PLAN_DEFAULTS
# puts the session's own values back for the rest of the batch.
ST_GENERIC_PLAN = Statement("SELECT set_config('plan_cache_mode', 'force_generic_plan', true), "
                            "set_config('enable_seqscan', 'off', true)")
ST_PLAN_DEFAULTS = Statement("SELECT set_config('plan_cache_mode', %s, true), set_config('enable_seqscan', %s, true)")
ST_BATCH_READS = Statement(SQL_BATCH_READS)
ST_BATCH_READS_OWED = Statement(SQL_BATCH_READS_OWED)


def read_batch(conn: Connection, *, member_ids: list[str], keys_by_kind: dict[str, list[str]],
               refund_payment_ids: list[str], months: list[str], merchant_ids: list[str],
               txn_ids_max: int, budget_periods: list[str], owed_accounts: Sequence[str] = (),
               free_members_only: bool = False) -> Reads:
    """One round trip: lock the members, then (seeing what the lock waited for) read
    idempotency records, balances, refunded payments, month counters, merchants, the
    budgets' snapshot and, when there are any, what `owed_accounts` (receivables) hold,
    and take enough transaction ids for the batch (`SQL_BATCH_READS`, or
    `SQL_BATCH_READS_OWED`; both with a generic plan: `ST_GENERIC_PLAN`).

    `free_members_only`: the lock waits for no member (SKIP LOCKED); those another
    transaction holds are left unlocked and named in `Reads.held` (read in a second
    round trip, only when a member was left: one not locked may also not exist)."""
    out = Reads()
    members_literal = _text_array(member_ids)
    empty = "{}"
    params = [_text_array(keys_by_kind[kind]) if keys_by_kind.get(kind) else empty for kind in BATCH_READ_KINDS]
    params += (members_literal, _text_array(refund_payment_ids) if refund_payment_ids else empty,
               members_literal, _text_array(months) if months else empty,
               _text_array(merchant_ids) if merchant_ids else empty, txn_ids_max,
               _text_array(budget_periods) if budget_periods else empty)
    if owed_accounts:
        params.append(_text_array(owed_accounts))
    with translated_errors():
        pipe = Pipeline(driver(conn))
        pipe.begin()
        pipe.send(ST_GENERIC_PLAN, ())
        lock_at = (pipe.send(ST_LOCK_FREE_MEMBERS if free_members_only else ST_LOCK_MEMBERS, (members_literal,))
                   if member_ids else None)
        reads_at = pipe.send(ST_BATCH_READS_OWED if owed_accounts else ST_BATCH_READS, params)
        pipe.send(ST_PLAN_DEFAULTS, pipe.plan_defaults)
        results = pipe.run()
    if lock_at is not None:
        out.members = _rows(results[lock_at])
        if free_members_only and len(out.members) < len(member_ids):
            locked = {row[0] for row in out.members}
            out.held = existing_members(conn, [m for m in member_ids if m not in locked])
    reads = results[reads_at]
    row = [orjson.loads(reads.get_value(0, column)) for column in range(reads.nfields)]
    kinds = len(BATCH_READ_KINDS)
    out.existing = [(kind, r) for kind, rows in zip(BATCH_READ_KINDS, row[:kinds]) for r in rows]
    out.balances, out.payments, out.months, out.merchants, out.txn_ids, out.budgets = row[kinds:kinds + 6]
    out.owed = row[kinds + 6] if owed_accounts else []
    return out


def lock_budgets(conn: Connection, keys: list[tuple[str, str]], stamp_us: int,
                 known: set) -> tuple[list[tuple], list[tuple]]:
    """Create the budget rows not known to exist (limit unset), then lock every row in
    (source, period) order. Returns the locked (source, period, limit, committed) rows
    and the keys this transaction created."""
    raw = driver(conn)
    missing = [k for k in keys if k not in known]
    with translated_errors(SQL_LOCK_BUDGETS):
        with raw.pipeline(), raw.cursor() as ensure, raw.cursor() as lock:
            if missing:
                ensure.execute(SQL_ENSURE_BUDGETS, (stamp_us, _text_array(k[0] for k in missing),
                                                     _text_array(k[1] for k in missing)))
            lock.execute(SQL_LOCK_BUDGETS, (_text_array(k[0] for k in keys), _text_array(k[1] for k in keys)))
            created = ensure.fetchall() if missing else []
            rows = lock.fetchall()
    return rows, created


ST_INSERT_LEGS = Statement(SQL_INSERT_LEGS)
ST_INSERT_TXNS = Statement(SQL_INSERT_TXNS)
ST_INSERT = {table: Statement(sql) for table, sql in SQL_INSERT.items()}
ST_PAYMENT_UPDATES = Statement(SQL_PAYMENT_UPDATES)
ST_CORRECTION_UPDATES = Statement(SQL_CORRECTION_UPDATES)
ST_UPSERT_MONTHS = Statement(SQL_UPSERT_MONTHS)
ST_ENSURE_ACCOUNTS = Statement(SQL_ENSURE_ACCOUNTS)
ST_LOCK_BUDGET_KEYS = Statement(SQL_LOCK_BUDGET_KEYS)
ST_UPDATE_BUDGETS = Statement(SQL_UPDATE_BUDGETS)
ST_MOVE_ACCOUNTS = Statement(SQL_MOVE_ACCOUNTS)
ST_LOCK_MOVE_ACCOUNTS = Statement(SQL_LOCK_MOVE_ACCOUNTS)


# Accounts other than members' (merchants', funders', the operator's) seen committed, at
# most this many per book: beyond it the set starts again (a cache, not a registry).
KNOWN_ACCOUNTS_MAX = 200_000


def new_accounts(deltas, accounts_existing: set[str], accounts_known: set[str]) -> list[str]:
    """The accounts the legs name that this batch did not read and the book does not
    know: each gets an `INSERT ... ON CONFLICT DO NOTHING` (sorted: the lock order)."""
    return [a for a in sorted(deltas) if a not in accounts_existing and a not in accounts_known]


def ensure_accounts_params(new: list[str]) -> tuple:
    types, owners, floors = [], [], []
    for account_id in new:
        kind, floor_zero = acct.account_type(account_id)
        types.append(kind)
        owners.append(account_id.split("/")[1] if account_id.startswith(acct.MEMBER_PREFIX) else None)
        floors.append(floor_zero)
    return _text_array(new), _text_array(types), _text_array(owners), _bool_array(floors)


def budget_key_params(keys: list[tuple[str, str]]) -> tuple[str, str]:
    """Budget (source, period) keys, sorted (the lock order), as the two array
    parameters of `SQL_LOCK_BUDGET_KEYS` (and the first two of the update)."""
    return _text_array(k[0] for k in keys), _text_array(k[1] for k in keys)


def shared_new(new: list[str]) -> bool:
    """Whether a batch's new accounts include one that is not a member's (a funder's new
    month, a merchant's or a program fund's first): see `write_batch`."""
    return any(not a.startswith(acct.MEMBER_PREFIX) for a in new)


def remember_accounts(accounts_known: set[str], new: list[str]) -> None:
    """After the COMMIT: the accounts other than members' that it inserted are known."""
    if new:
        if len(accounts_known) > KNOWN_ACCOUNTS_MAX:
            accounts_known.clear()
        accounts_known.update(a for a in new if not a.startswith(acct.MEMBER_PREFIX))


def split_member_accounts(moved: list[tuple[str, int]]) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """A batch's balance moves, (account, delta) sorted by account, as the members'
    accounts and the shared ones (budgets' funders, merchants, grant funds, the
    operator's, receivables).

    A member's accounts (`member/...`) are written only by a transaction that holds the
    member's row (every writer locks its members first: the book, the replay, the grant
    writer), so no other transaction ever waits for them: they are written before the
    batch takes the rows others share, in no particular order, and those are held only
    for their own statements and the COMMIT. Written after the budgets, the ~2,000
    member accounts of a replay chunk of 1,000 payments held the budget rows every online
    payment needs for ~60 ms more per chunk (docs/design.md, "Budget rows are not
    skipped")."""
    own = [(a, v) for a, v in moved if a.startswith(acct.MEMBER_PREFIX)]
    if not own:
        return [], moved
    return own, [(a, v) for a, v in moved if not a.startswith(acct.MEMBER_PREFIX)]


def write_batch(conn: Connection, writes, months: list[dict], recorded_at_us: int,
                accounts_existing: set[str], accounts_known: set[str], commit: bool = True) -> list[tuple]:
    """Every write of the batch and its COMMIT in one round trip (`commit` False: the
    transaction is left open for the caller, a batch with audit entries to append after
    its row locks, then committed by SQLAlchemy).

    The hot rows (budgets, then the busiest accounts: funders, big merchants) are
    locked by the last statements, after the members' own accounts
    (`split_member_accounts`), and the COMMIT travels in the same pipeline, so they
    are held for the server's own time (those statements and the WAL flush) and never
    across a client round trip. With `synchronous_commit = on` the batch is durable when
    this returns: only then are the callers answered. (SQLAlchemy's own commit at the end
    of `engine.begin()` then finds no transaction open and sends nothing.)

    Accounts are never deleted, so an account in `accounts_existing` (read by this
    batch) or in `accounts_known` (the book's: committed by an earlier batch) needs no
    INSERT ... ON CONFLICT; the others get one, and those that are not members' join
    `accounts_known` once the COMMIT is through. (Were one missing all the same, the
    legs' guard would refuse them, naming `ledger_legs_account_exists`, and the book
    forgets them.)

    Returns (source, period, committed) of the budget rows moved, as committed."""
    w = writes
    with translated_errors():
        pipe = Pipeline(driver(conn))
        pipe.begin()
        # Every account a leg names must exist before the legs (their guard looks them
        # up per statement, migration 0008), even at a net zero for the batch.
        new = new_accounts(w.deltas, accounts_existing, accounts_known)
        budget_deltas = sorted((k, v) for k, v in w.budget_deltas.items() if v)
        if budget_deltas:
            sources, periods = budget_key_params([k for k, _ in budget_deltas])
            if new and shared_new(new):
                # An account name inserted is locked until the COMMIT (another inserting it
                # waits). Inserted before the budgets, a funder's new month was taken before
                # them by this batch and after them by one that had locked them in its read
                # (a budget binding): a lock cycle PostgreSQL broke after deadlock_timeout
                # (1 s) (tests/test_lock_cycles.py). So a batch that creates a shared account
                # takes the budgets first (the book's order: budgets, then accounts); the
                # rest of the time it takes them late, as below.
                pipe.send(ST_LOCK_BUDGET_KEYS, (sources, periods))
        if new:
            pipe.send(ST_ENSURE_ACCOUNTS, ensure_accounts_params(new))
        if w.txns:
            pipe.send(ST_INSERT_LEGS, _tuple_columns(w.legs, LEG_TYPES))
            # Sealing: the statement-level guard checks every transaction's legs at once.
            pipe.send(ST_INSERT_TXNS, _tuple_columns(w.txns, TXN_TYPES))
        for table, rows in (("topups", w.topups), ("payments", w.payments), ("refunds", w.refunds),
                            ("grant_disbursements", w.disbursements), ("withdrawals", w.withdrawals)):
            if rows:
                pipe.send(ST_INSERT[table], _columns(rows, *INSERT_COLUMNS[table]))
        if w.payment_updates:
            pipe.send(ST_PAYMENT_UPDATES, _columns(list(w.payment_updates.values()),
                                                   ("payment_id", "refunded_won", "refund_state", "base_won",
                                                    "counts_toward_month"),
                                                   ("text", "int8", "text", "int8", "bool")))
        if w.correction_updates:
            pipe.send(ST_CORRECTION_UPDATES, _columns(w.correction_updates, ("lid", "resp", "at"),
                                                      ("text", "text", "int8")))
        if months:
            pipe.send(ST_UPSERT_MONTHS, _columns(months, MONTH_COLUMNS, MONTH_TYPES))
        moved = sorted((a, v) for a, v in w.deltas.items() if v)
        own, shared = split_member_accounts(moved)
        if own:  # no other transaction waits for these: written before the shared rows are taken
            pipe.send(ST_MOVE_ACCOUNTS, (_text_array([a for a, _ in own]),
                                         _int_array(acct.natural_delta(a, v) for a, v in own)))
        # Lock order: members (read), budgets, then the shared accounts. Budgets are
        # already locked when this batch read them under lock; when it read them
        # optimistically this UPDATE takes them, and the within-limit CHECK refuses an
        # overspend.
        if budget_deltas:
            budgets_at = pipe.send(ST_UPDATE_BUDGETS, (sources, periods, sources, periods,
                                                       _int_array(v for _, v in budget_deltas),
                                                       local_date(recorded_at_us).isoformat(), recorded_at_us))
        if shared:
            ids_literal = _text_array([a for a, _ in shared])
            pipe.send(ST_LOCK_MOVE_ACCOUNTS, (ids_literal, ids_literal,
                                              _int_array(acct.natural_delta(a, v) for a, v in shared)))
        if commit:
            pipe.command(b"COMMIT")
        results = pipe.run()
    remember_accounts(accounts_known, new)
    if not budget_deltas:
        return []
    return [(source, period, int(committed)) for source, period, committed in _rows(results[budgets_at])]
