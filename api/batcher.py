"""Group commit: requests queue their command; one writer thread per worker process
drains the queue into batches and runs each batch as one database transaction.

While a batch is being written, the next one fills, so under load batches grow by
themselves and the cost of a commit (fsync, round trips, hot-row locks) is shared
by every payment in it. A request waits at most `request_timeout_ms`; if it gives up,
its command may still commit, and the client's retry with the same id replays it.

A batch waits for no member another transaction holds (another worker's batch, a
staff job's chunk, a session left open): those members' commands come back unrun
(`MemberHeld`) and wait here, to be run again with a later batch, until their member
is free or their request gives up. One held member holds up only its own requests.
"""

from __future__ import annotations

import asyncio
import collections
import os
import sys
import threading
import time
from typing import Callable

import structlog

from ledger.book import Book, PinnedConnection
from ledger.commands import Command, Outcome
from ledger.db import CONNECTION_MAX_AGE_S
from ledger.errors import InternalError, MemberHeld, Overloaded, Unavailable

log = structlog.get_logger("api.batcher")

# The writer thread shares the GIL with the event loop. A thread that wants the GIL back
# after a database round trip waits up to the switch interval (5 ms by default) while
# the loop parses requests: with ~4 round trips per batch that was most of a batch's
# time. A shorter interval hands the GIL over sooner (measured: docs/performance.md).
GIL_SWITCH_INTERVAL_S = float(os.environ.get("EUM_GIL_SWITCH_INTERVAL_S", "0.0005"))
# Writer threads per worker, each with its own connection. With two, a command that
# arrives while a batch waits on the database (round trips, the commit's fsync) goes
# into the next batch at once instead of waiting for that batch to finish. Two batches
# of one worker meet in the database exactly as two workers' batches do (the global
# lock order; a member in both waits for the first commit and then sees it). One is the
# default: with the 2 ms linger (eum.settings) its batches are about twice as large, and
# a payment costs ~20% less CPU in the worker and in PostgreSQL (docs/performance.md).
WRITERS = 1  # eum.settings `batch_writers` (EUM_BATCH_WRITERS)
# How long commands whose member was held wait before they are run again: another
# worker's batch holds its members for milliseconds, a staff job's chunk for seconds.
# A batch of nothing but such commands costs a round trip or two and finds them still
# held until the holder commits; retried at once it would spin on the database.
HELD_RETRY_S = 0.01


class Batcher:
    def __init__(self, book: Book, *, batch_size_max: int, linger_us: int, queue_max: int,
                 on_batch: Callable[[int, float], None] | None = None,
                 on_committed: Callable[[list[Command], list[Outcome]], object] | None = None,
                 after_answered: Callable[[object], None] | None = None,
                 connection_max_age_s: float = CONNECTION_MAX_AGE_S, writers: int | None = None):
        self._book = book
        self._batch_size_max = batch_size_max
        self._linger_s = linger_us / 1e6
        self._queue_max = queue_max
        self._queue: collections.deque = collections.deque()
        # Commands whose member another transaction held, as (due, item), due first: each
        # runs again with the first batch taken at or after its own due time, HELD_RETRY_S
        # after its last try (`_take`). One due time for all of them, put off by every batch
        # that brought a command back held, starved them while a staff job's chunks kept
        # holding other members: a member freed long before waited for the job to end.
        self._held: collections.deque = collections.deque()
        self._cv = threading.Condition()
        self._running = True
        self._on_batch = on_batch
        self._on_committed = on_committed  # after the commit, before the callers are answered
        self._after_answered = after_answered  # then, with what on_committed returned (Redis)
        if GIL_SWITCH_INTERVAL_S > 0:
            sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
        # Each writer keeps its own connection across batches (no pool checkout, no pre-ping).
        self._threads = [threading.Thread(target=self._run,
                                          args=(PinnedConnection(book.engine, max_age_s=connection_max_age_s),),
                                          name=f"eum-batch-writer-{n}", daemon=True) for n in range(writers or WRITERS)]
        for thread in self._threads:
            thread.start()

    @property
    def depth(self) -> int:
        return len(self._queue) + len(self._held)

    async def submit(self, command: Command, timeout_s: float) -> Outcome:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        with self._cv:
            # Those waiting for a held member count: they are as pending as the queued
            # ones (with the queue alone counted, a staff job holding many members let
            # the pending commands grow past the bound by as many as it held up).
            depth = len(self._queue) + len(self._held)
            if depth >= self._queue_max:
                raise Overloaded(f"{depth} commands pending", retry_after_s=1)
            self._queue.append((command, loop, future))
            # Wake a writer only when one can act: the queue was empty (writers wait for
            # work) or a lingering batch is now full. Waking one per command cost a
            # context switch and a GIL hand-off per request.
            depth = len(self._queue)
            if depth == 1 or depth == self._batch_size_max:
                self._cv.notify()
        # One timer, no wait_for/shield (three futures and their callbacks per request).
        timer = loop.call_later(timeout_s, self._expire, future)
        try:
            return await future
        except _TimedOut:
            raise Unavailable("the book of record did not answer in time; retry with the same id",
                              retry_after_s=1) from None
        finally:
            timer.cancel()

    def _expire(self, future: asyncio.Future) -> None:
        # Still queued: withdrawn, so it will never run (`_take` skips a finished future)
        # and a slow database does not work through a backlog nobody waits for. Already
        # taken into a batch: it may still commit; the retry with the same id replays it.
        with self._cv:
            if not future.done():
                future.set_exception(_TimedOut())

    def close(self, timeout_s: float = 10.0) -> None:
        with self._cv:
            self._running = False
            self._cv.notify_all()
        deadline = time.monotonic() + timeout_s
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    def _take(self) -> list | None:
        with self._cv:
            while self._running and not self._queue:
                if not self._held:
                    self._cv.wait()
                    continue
                remaining = self._held[0][0] - time.monotonic()
                if remaining <= 0:
                    break
                self._cv.wait(remaining)
            if not self._queue and not self._held:
                return None
            if self._linger_s:
                # Linger until the deadline or a full batch (not merely the next arrival).
                deadline = time.monotonic() + self._linger_s
                while self._running and len(self._queue) < self._batch_size_max:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    self._cv.wait(remaining)
            batch = []
            # First, those due: they were taken before anything now queued. At most half a
            # batch of them while others are queued: more of them than a batch holds, each
            # batch of them long enough for the rest to be due again, filled every batch,
            # and a command behind them whose member was free waited for their callers
            # to give up.
            now = time.monotonic()
            held_room = self._batch_size_max - min(len(self._queue), self._batch_size_max // 2)
            while self._held and len(batch) < held_room and (
                    self._held[0][0] <= now or not self._running):
                item = self._held.popleft()[1]
                if not item[2].done():
                    batch.append(item)
            while self._queue and len(batch) < self._batch_size_max:
                item = self._queue.popleft()
                if not item[2].done():  # its caller gave up while it waited (see _expire)
                    batch.append(item)
            if self._queue:  # more than one batch waits: another writer can start on it
                self._cv.notify()
            return batch

    def _run(self, pinned: PinnedConnection) -> None:
        try:
            self._write_batches(pinned)
        finally:
            pinned.close()

    def _write_batches(self, pinned: PinnedConnection) -> None:
        while True:
            batch = self._take()
            if batch is None:
                return
            if not batch:
                continue
            started = time.perf_counter()
            try:
                outcomes = self._book.execute([command for command, _, _ in batch], pinned=pinned,
                                              skip_held_members=True)
            except Unavailable as error:
                outcomes = [Outcome(error=error)] * len(batch)
            except Exception as error:  # a bug must not kill the writer thread
                # (the book runs a faulty batch's commands alone, so this is one command's,
                # or a fault outside any command's)
                log.exception("batch.crashed", size=len(batch))
                outcomes = [Outcome(error=InternalError(f"an unexpected error ({type(error).__name__}); it has been "
                                                        "logged, nothing of this request was recorded"))] * len(batch)
            seconds, size = time.perf_counter() - started, len(batch)
            batch, outcomes = self._hold_back(batch, outcomes)
            if self._on_batch is not None:  # the depth with the commands just put back held
                self._on_batch(size, seconds, self.depth)
            remembered = None
            if self._on_committed is not None:
                try:
                    remembered = self._on_committed([command for command, _, _ in batch], outcomes)
                except Exception:  # a cache must not hold answers back
                    log.exception("batch.on_committed_failed", size=len(batch))
            # One wake-up of each event loop per batch, not one per request.
            by_loop: dict = {}
            for (_, loop, future), outcome in zip(batch, outcomes):
                by_loop.setdefault(loop, []).append((future, outcome))
            for loop, answers in by_loop.items():
                try:
                    loop.call_soon_threadsafe(_resolve_all, answers)
                except RuntimeError:  # its loop is closed: no one is left to hear them
                    log.warning("batch.answers_to_a_closed_loop", answered=len(answers))
            if self._after_answered is not None and remembered:
                try:
                    self._after_answered(remembered)
                except Exception:
                    log.exception("batch.after_answered_failed", size=len(batch))


    def _hold_back(self, batch: list, outcomes: list[Outcome]) -> tuple[list, list[Outcome]]:
        """Put the commands whose member was held (`MemberHeld`) back, to run again after
        `HELD_RETRY_S`, and return the rest of the batch with their outcomes. A command
        whose caller gave up meanwhile is dropped; one of a writer that is stopping is
        answered as held (503, retry with the same id)."""
        held = [i for i, outcome in enumerate(outcomes) if isinstance(outcome.error, MemberHeld)]
        if not held:
            return batch, outcomes
        with self._cv:
            if self._running:
                if not self._held:
                    log.info("batch.member_held", commands=len(held))
                due = time.monotonic() + HELD_RETRY_S  # after every due already here
                self._held.extend((due, batch[i]) for i in held if not batch[i][2].done())
                self._cv.notify()
                kept = set(held)
                return ([item for i, item in enumerate(batch) if i not in kept],
                        [outcome for i, outcome in enumerate(outcomes) if i not in kept])
        return batch, outcomes


class _TimedOut(Exception):
    """A queued command's caller stopped waiting (`Batcher._expire`)."""


def _resolve_all(answers: list) -> None:
    for future, outcome in answers:
        if not future.done():
            future.set_result(outcome)
