"""Bulk payment replay: a clearing file, a backfill or a day of payments recorded
in-process, through the book's own decisions, in large chunks.

`replay_payments(engine, timeline, commands)` cuts the payments (in the given order) into
chunks of `CHUNK_MAX` and runs each chunk as one database transaction through
`ReplayBook`, which is `ledger.book.Book` with one change: on PostgreSQL the three big
tables of a chunk (ledger legs, their sealing ledger transactions, the payment rows) go in
by binary `COPY` instead of `INSERT ... SELECT unnest(array literal)`. Everything else is
the book's, line for line:

- decisions: each payment is evaluated by `rules.evaluate.evaluate_payment` against the
  chunk's in-memory state (a member's second payment sees the first), in order — spend
  order, cashback components, monthly bands and caps exactly as the online path;
- budgets: read optimistically; if any payment of the chunk finds a budget short (a
  `budget_partial`/`budget_skip` line), or the final `UPDATE` trips the within-limit
  CHECK, the chunk is thrown away and run again with the budget rows locked first — the
  exact path (`Book.execute`'s `_LockBudgets`). A budget is never overspent;
- exactly once per `payment_id`: ids are read after the chunk's members are locked; the
  same id and request hash is a replay (the stored answer), another hash
  `idempotency_conflict`; the primary key refuses a racing duplicate, and the chunk is
  read again;
- one ledger transaction for the payment and one for its cashback, as online: the
  readers (member history, refunds, settlement, simulation) see the same rows;
- the database guards are unchanged: `COPY` fires the statement-level guards once per
  statement (the accounts the legs name are inserted first; legs, then the sealing rows:
  balanced, `leg_count` legs), append-only, each transaction's leg 0 keyed to its seal
  and checked at COMMIT (migration 0008).

On SQLite the chunk takes the book's own writes (`executemany` in one transaction).
"""

from __future__ import annotations

import dataclasses
import threading
import time
import zlib
from dataclasses import dataclass, field
from typing import Callable, Sequence

from sqlalchemy import Connection, Engine

from ledger import collector, pgstore
from ledger.book import BatchState, Book
from ledger.commands import Outcome, Pay
from ledger.programs import ProgramCache
from rules.compiled import PolicyTimeline

# Payments per database transaction. A chunk holds its members from its read to its
# COMMIT (an online payment of one of them waits for it), and the budget rows and shared
# accounts every online payment draws on from its write to its COMMIT: 5,000 beside the
# service's 150 payments/s made their p50 0.6-0.9 s and p99 5.4-7.9 s while 60,000 were
# replayed; 1,000 made them 11-19 and 236-367 ms, the replay as fast (docs/design.md,
# "Budget rows are not skipped", which also measures what the rest is made of).
CHUNK_MAX = 1_000
WINDOW_CHUNKS = 8  # chunks per member stream that `replay_windows` holds at once

_PAYMENT_TYPES = tuple(pgstore.PAYMENT_TYPES)
SQL_COPY_LEGS = f"COPY ledger_legs ({', '.join(pgstore.LEG_COLUMNS)}) FROM STDIN (FORMAT BINARY)"
SQL_COPY_TXNS = f"COPY ledger_txns ({', '.join(pgstore.TXN_COLUMNS)}) FROM STDIN (FORMAT BINARY)"
SQL_COPY_PAYMENTS = f"COPY payments ({', '.join(pgstore.PAYMENT_COLUMNS)}) FROM STDIN (FORMAT BINARY)"


class ReplayBook(Book):
    """`Book` whose PostgreSQL write puts legs, sealing transactions and payment rows in by
    binary COPY, then hands the rest of the chunk (accounts, budgets, month counters,
    other kinds) and the COMMIT to `pgstore.write_batch` as the online path does."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # Seconds per step, summed over chunks (and over threads: with two streams the
        # steps of one overlap the other's). "evaluate" is the rest of `Book._run`: the
        # rules, legs, stored answers and details, in Python.
        self.step_seconds: dict[str, float] = {}
        self._steps_lock = threading.Lock()

    def _timed(self, step: str, started: float) -> None:
        with self._steps_lock:
            self.step_seconds[step] = self.step_seconds.get(step, 0.0) + time.perf_counter() - started

    def _run(self, conn: Connection, commands, **options):
        started = time.perf_counter()
        try:
            return super()._run(conn, commands, **options)
        finally:
            self._timed("chunk", started)

    def _read_pg(self, conn: Connection, commands, **options) -> BatchState:
        started = time.perf_counter()
        try:
            return super()._read_pg(conn, commands, **options)
        finally:
            self._timed("read", started)

    def _lock_budgets(self, conn: Connection, state: BatchState, commands) -> None:
        started = time.perf_counter()
        try:
            return super()._lock_budgets(conn, state, commands)
        finally:
            self._timed("budgets", started)

    def _write_pg(self, conn: Connection, state: BatchState) -> None:
        started = time.perf_counter()
        w = state.writes
        if w.txns:
            ids = state.txn_ids
            w = w.with_txn_ids(ids if len(ids) >= len(w.txns) else self._allocate_txn_ids(conn, len(w.txns)))
        self._timed("txn_ids", started)
        started = time.perf_counter()
        raw = pgstore.driver(conn)
        known = self._known_accounts(conn)
        # The accounts first: the legs' guard looks up the accounts they name (0008).
        new = pgstore.new_accounts(w.deltas, state.accounts_read, known)
        with pgstore.translated_errors("bulk replay COPY"), raw.cursor() as cur:
            if new:
                keys = sorted(k for k, v in w.budget_deltas.items() if v)
                if keys and pgstore.shared_new(new):  # budgets before a new shared account (`write_batch`)
                    cur.execute(pgstore.SQL_LOCK_BUDGET_KEYS, pgstore.budget_key_params(keys))
                cur.execute(pgstore.SQL_ENSURE_ACCOUNTS, pgstore.ensure_accounts_params(new))
            if w.txns:
                _copy(cur, SQL_COPY_LEGS, pgstore.LEG_TYPES, w.legs)
                # Sealing: the statement-level guard checks every transaction's legs at once.
                _copy(cur, SQL_COPY_TXNS, pgstore.TXN_TYPES, w.txns)
            if w.payments:
                columns = pgstore.PAYMENT_COLUMNS
                _copy(cur, SQL_COPY_PAYMENTS, _PAYMENT_TYPES, [[row[c] for c in columns] for row in w.payments])
        self._timed("copy", started)
        started = time.perf_counter()
        rest = dataclasses.replace(w, txns=[], legs=[], payments=[])  # everything else as the book writes it
        moved = pgstore.write_batch(conn, rest, self._month_rows(state), state.recorded_at_us,
                                    state.accounts_read.union(new), known)
        pgstore.remember_accounts(known, new)  # committed
        self._timed("write_commit", started)
        for source, period, committed in moved:  # as committed: exact thresholds for the warnings
            entry = state.budgets.get((source, period))
            if entry is not None:
                entry[1], entry[2] = committed, committed - w.budget_deltas[(source, period)]


def _copy(cur, sql: str, types: Sequence[str], rows: Sequence[Sequence]) -> None:
    """Rows (in the COPY's column order) by binary COPY."""
    with cur.copy(sql) as copy:
        copy.set_types(list(types))
        write = copy.write_row
        for row in rows:
            write(row)


@dataclass
class ReplayReport:
    payments: int = 0
    recorded: int = 0  # first runs (approved or declined, now in the book)
    approved: int = 0
    replayed: int = 0  # already in the book with the same request
    errors: dict[str, int] = field(default_factory=dict)  # problem code -> count
    seconds: float = 0.0
    chunks: int = 0

    def add(self, other: "ReplayReport") -> None:
        """Another window's counts into these (`replay_windows`)."""
        self.payments += other.payments
        self.recorded += other.recorded
        self.approved += other.approved
        self.replayed += other.replayed
        for code, count in other.errors.items():
            self.errors[code] = self.errors.get(code, 0) + count
        self.seconds += other.seconds
        self.chunks += other.chunks


def _members_sharing_ids(commands: Sequence[Pay]) -> dict[str, str]:
    """Members whose payments share a payment id (the same id sent for two members: one
    is recorded, the other refused, whichever comes first): each member of a group but
    its root (the least id, which keys itself) mapped to the root, so that a group is one
    stream and the first line given wins, as it does on one thread. Members of no group
    are left out: their own id keys their stream."""
    first_member: dict[str, str] = {}
    parent: dict[str, str] = {}

    def root(member: str) -> str:
        while (up := parent.get(member, member)) != member:
            parent[member] = parent.get(up, up)
            member = up
        return member

    for c in commands:
        owner = first_member.setdefault(c.payment_id, c.member_id)
        if owner != c.member_id:
            a, b = root(owner), root(c.member_id)
            if a != b:
                parent[max(a, b)] = min(a, b)
    return {member: root(member) for member in parent}


def replay_payments(book: Book, commands: Sequence[Pay], chunk: int = CHUNK_MAX,
                    threads: int = 1) -> tuple[ReplayReport, list[Outcome]]:
    """Record `commands` (payments, in their order) chunk by chunk. Each chunk is one
    database transaction through `book.execute` (its retries, its exact-path fallback when
    a budget binds, its one-by-one fallback when a command keeps failing). Returns the
    counts and each command's outcome, in the order given. Python's cyclic collector is
    paused meanwhile (`ledger.collector.paused`).

    `threads` > 1 (PostgreSQL): the payments are split into that many streams by member
    (crc32 of `member_id`), each stream's chunks run in order on a thread of its own, so
    every member's payments are still decided in the order given (month bands, caps, the
    wallet); members whose payments share a payment id are one stream, so the first of
    its lines given is the one recorded (`_members_sharing_ids`). Across members only a
    budget couples decisions: when none binds, the order between members changes
    nothing; when one does, the exact path (budget rows locked)
    gives the room to whichever chunk locks first, as two online workers would, and the
    within-limit CHECK keeps it from being overspent."""
    assert chunk >= 1 and threads >= 1
    report = ReplayReport(payments=len(commands))
    assert all(isinstance(c, Pay) for c in commands), "replay_payments takes payments only"
    outcomes: list[Outcome | None] = [None] * len(commands)
    streams: list[list[int]] = [[] for _ in range(threads)]
    if threads == 1:
        streams[0].extend(range(len(commands)))
    else:
        joined = _members_sharing_ids(commands)
        for i, c in enumerate(commands):
            streams[zlib.crc32(joined.get(c.member_id, c.member_id).encode()) % threads].append(i)
    failures: list[BaseException] = []
    lock = threading.Lock()

    def run(indexes: list[int]) -> None:
        try:
            for start in range(0, len(indexes), chunk):
                part = indexes[start:start + chunk]
                done = book.execute([commands[i] for i in part])
                with lock:
                    report.chunks += 1
                for i, outcome in zip(part, done):
                    outcomes[i] = outcome
        except BaseException as exc:  # reported to the caller below
            failures.append(exc)

    started = time.perf_counter()
    with collector.paused():  # the chunks' objects are acyclic: see ledger/collector.py
        if threads == 1:
            run(streams[0])
        else:
            pool = [threading.Thread(target=run, args=(stream,), name=f"replay-{n}") for n, stream in enumerate(streams)]
            for t in pool:
                t.start()
            for t in pool:
                t.join()
    report.seconds = time.perf_counter() - started
    if failures:
        raise failures[0]
    for outcome in outcomes:
        assert outcome is not None
        if outcome.error is not None:
            report.errors[outcome.error.code] = report.errors.get(outcome.error.code, 0) + 1
        elif outcome.replayed:
            report.replayed += 1
        else:
            report.recorded += 1
            if outcome.body.get("status") == "approved":
                report.approved += 1
    return report, outcomes  # type: ignore[return-value]


def replay_book(engine: Engine, timeline: PolicyTimeline, programs: ProgramCache | None = None) -> Book:
    """The book a replay writes through: `ReplayBook` on PostgreSQL, the plain book on SQLite."""
    return ReplayBook(engine, timeline, programs) if engine.dialect.name == "postgresql" else Book(engine, timeline, programs)


def replay_windows(book: Book, commands: list[Pay | None], chunk: int = CHUNK_MAX, threads: int = 1,
                   window: int | None = None,
                   sink: Callable[[Sequence[Pay], list[Outcome]], None] | None = None) -> ReplayReport:
    """`replay_payments` over `commands` a window at a time, for a file too large to hold
    every answer in memory (a peak day is 1.5 million payments; an answer and its outcome
    take ~2 KB, docs/design.md "Bulk payment replay").

    The windows (`window` payments each; by default `WINDOW_CHUNKS` chunks per member
    stream) run one after the other in the order given, so every member's payments are
    still decided in that order. Each window's payments and outcomes go to `sink` (in the
    order given) once the window has committed, and then the list lets go of them: its
    items become None, so the caller's list is consumed. Returns the counts of all windows.
    A database error stops it where it is, as `replay_payments` does: the windows and
    chunks committed before stay; `sink` has seen each window before the failing one (the
    failing window's committed chunks are answered as replays when the file is run again)."""
    size = window or chunk * threads * WINDOW_CHUNKS
    assert size >= 1
    total = ReplayReport()
    with collector.paused():  # one pause for the whole file, not one per window
        for start in range(0, len(commands), size):
            part = commands[start:start + size]
            assert all(c is not None for c in part), "replay_windows takes each list once"
            report, outcomes = replay_payments(book, part, chunk=chunk, threads=threads)  # type: ignore[arg-type]
            total.add(report)
            if sink is not None:
                sink(part, outcomes)  # type: ignore[arg-type]
            commands[start:start + len(part)] = [None] * len(part)
            del part, outcomes
    return total
