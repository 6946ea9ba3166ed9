"""The service's group-commit batcher (`api.batcher.Batcher`) with a stand-in book: which
commands go into which batch. The linger waits for its deadline or a full batch, not
merely for the next command; a full batch goes at once; without a linger a command is
written as soon as a writer is free; a command whose member another transaction holds
waits in the batcher, not in the database, and holds up no other command."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from api import batcher as batcher_module
from api.batcher import Batcher
from ledger.book import Outcome


class RecordingBook:
    """Records each batch it is given; answers every command with its own index."""

    engine = None  # the writers' PinnedConnection is never used by this book

    def __init__(self, delay_s: float = 0.0):
        self.batches: list[list[int]] = []
        self.delay_s = delay_s
        self.lock = threading.Lock()
        self.running = 0
        self.running_max = 0

    def execute(self, commands, *, pinned=None, skip_held_members=False):
        assert skip_held_members  # the service's batches never wait for a held member
        with self.lock:
            self.running += 1
            self.running_max = max(self.running_max, self.running)
        time.sleep(self.delay_s)
        with self.lock:
            self.running -= 1
            self.batches.append(list(commands))
        return [self.outcome(command) for command in commands]

    def outcome(self, command) -> Outcome:
        return Outcome(body={"n": command})


class HoldingBook(RecordingBook):
    """A book in which the commands named "held..." find their member held by another
    transaction until `free` is set: they come back unrun, `MemberHeld`."""

    def __init__(self):
        super().__init__()
        self.free = threading.Event()

    def outcome(self, command) -> Outcome:
        from ledger.errors import MemberHeld

        if str(command).startswith("held") and not self.free.is_set():
            return Outcome(error=MemberHeld("held"))
        return super().outcome(command)

    def runs_of(self, command) -> int:
        with self.lock:
            return sum(batch.count(command) for batch in self.batches)


@pytest.fixture
def one_writer(monkeypatch):
    monkeypatch.setattr(batcher_module, "WRITERS", 1)


def make(book, **kw) -> Batcher:
    settings = {"batch_size_max": 100, "linger_us": 0, "queue_max": 1_000}
    settings.update(kw)
    return Batcher(book, **settings)


async def first_then(batcher: Batcher, count: int, pause_s: float, timeout_s: float) -> list:
    """Submit "first"; after `pause_s` (a writer is inside its batch by then) submit
    0..count-1; every outcome, in submission order."""
    first = asyncio.create_task(batcher.submit("first", timeout_s=timeout_s))
    await asyncio.sleep(pause_s)
    rest = [asyncio.create_task(batcher.submit(n, timeout_s=timeout_s)) for n in range(count)]
    return await asyncio.gather(first, *rest)


def test_linger_collects_every_command_that_arrives_before_its_deadline(one_writer):
    book = RecordingBook()
    batcher = make(book, linger_us=400_000)

    async def trickle():
        tasks = []
        for n in range(5):
            tasks.append(asyncio.create_task(batcher.submit(n, timeout_s=10)))
            await asyncio.sleep(0.02)
        return await asyncio.gather(*tasks)

    try:
        outcomes = asyncio.run(trickle())
    finally:
        batcher.close()
    assert [o.body["n"] for o in outcomes] == [0, 1, 2, 3, 4]
    # Five commands 20 ms apart, all inside the 400 ms linger: one batch, not one per
    # arrival (the old linger ended at the next command and wrote [0, 1], then [2, 3]...).
    assert book.batches == [[0, 1, 2, 3, 4]]


def test_a_full_batch_does_not_wait_for_the_linger(one_writer):
    book = RecordingBook()
    batcher = make(book, linger_us=30_000_000, batch_size_max=3)

    async def three():
        return await asyncio.wait_for(asyncio.gather(*(batcher.submit(n, timeout_s=60) for n in range(3))),
                                      timeout=10)

    try:
        outcomes = asyncio.run(three())
    finally:
        batcher.close()
    assert [o.body["n"] for o in outcomes] == [0, 1, 2]
    assert book.batches == [[0, 1, 2]]


def test_without_linger_commands_queue_behind_a_busy_writer_and_go_together(one_writer):
    book = RecordingBook(delay_s=0.2)
    batcher = make(book)
    try:
        outcomes = asyncio.run(first_then(batcher, 4, pause_s=0.05, timeout_s=10))
    finally:
        batcher.close()
    assert [o.body["n"] for o in outcomes] == ["first", 0, 1, 2, 3]
    assert book.batches == [["first"], [0, 1, 2, 3]]


def test_closing_during_a_linger_still_writes_what_was_queued(one_writer):
    book = RecordingBook()
    batcher = make(book, linger_us=30_000_000)

    async def run():
        task = asyncio.create_task(batcher.submit("queued", timeout_s=60))
        await asyncio.sleep(0.05)
        await asyncio.to_thread(batcher.close, 10.0)
        return await asyncio.wait_for(task, timeout=10)

    outcome = asyncio.run(run())
    assert outcome.body == {"n": "queued"}
    assert book.batches == [["queued"]]


def test_a_backlog_longer_than_a_batch_keeps_every_writer_busy(monkeypatch):
    monkeypatch.setattr(batcher_module, "WRITERS", 2)
    book = RecordingBook(delay_s=0.1)
    batcher = make(book, batch_size_max=2)
    try:
        # One writer is busy with "first" when the eight come; the other waits for work.
        outcomes = asyncio.run(first_then(batcher, 8, pause_s=0.03, timeout_s=30))
    finally:
        batcher.close()
    assert [o.body["n"] for o in outcomes] == ["first", *range(8)]
    assert sorted(n for batch in book.batches for n in batch if n != "first") == list(range(8))
    assert all(len(batch) <= 2 for batch in book.batches)
    # Eight commands queued behind a busy writer, two per batch: with wake-ups only when
    # a writer can act, both writers still take batches side by side.
    assert book.running_max == 2


def test_a_full_queue_refuses_the_next_command_and_never_writes_it(one_writer):
    """`EUM_BATCH_QUEUE_MAX` (docs/design.md, Limits): with a writer busy and the queue at
    its bound, the next command is 503 `overloaded` with Retry-After at once, and only the
    queued ones are written."""
    from ledger.errors import Overloaded

    book = RecordingBook(delay_s=0.2)
    batcher = make(book, queue_max=2)

    async def run():
        first = asyncio.create_task(batcher.submit("first", timeout_s=10))
        await asyncio.sleep(0.05)  # the writer is inside its batch: the queue is empty again
        queued = [asyncio.create_task(batcher.submit(n, timeout_s=10)) for n in range(2)]
        await asyncio.sleep(0)  # both are in the queue
        with pytest.raises(Overloaded) as refused:
            await batcher.submit("refused", timeout_s=10)
        return refused.value, await asyncio.gather(first, *queued)

    try:
        refused, outcomes = asyncio.run(run())
    finally:
        batcher.close()
    assert (refused.status, refused.code, refused.retry_after_s) == (503, "overloaded", 1)
    assert [o.body["n"] for o in outcomes] == ["first", 0, 1]
    assert book.batches == [["first"], [0, 1]]


def test_commands_waiting_for_a_held_member_count_toward_the_queue_bound(one_writer, monkeypatch):
    """`EUM_BATCH_QUEUE_MAX` bounds the commands pending in a worker: those waiting for
    their held member are pending too. Only the queue was counted, so a staff job that
    held many members let them pile up past the bound; with the bound reached by held
    ones the next command is 503 `overloaded` and never written."""
    from ledger.errors import Overloaded

    monkeypatch.setattr(batcher_module, "HELD_RETRY_S", 2.0)  # they wait held while the test looks
    book = StuckBook()
    batcher = make(book, queue_max=2)

    async def run():
        stuck = [asyncio.create_task(batcher.submit(f"stuck-{n}", timeout_s=30)) for n in range(2)]
        deadline = time.monotonic() + 5
        while len(batcher._held) < 2:  # both tried once, both back waiting
            assert time.monotonic() < deadline, "the held commands never came back to wait"
            await asyncio.sleep(0.005)
        with pytest.raises(Overloaded) as refused:
            await batcher.submit("refused", timeout_s=10)
        for task in stuck:
            task.cancel()
        return refused.value

    try:
        refused = asyncio.run(run())
    finally:
        batcher.close()
    assert (refused.status, refused.code, refused.retry_after_s) == (503, "overloaded", 1)
    assert "refused" not in [n for batch in book.batches for n in batch]


def test_a_command_whose_member_is_held_waits_in_the_batcher_and_runs_once_the_member_is_free(one_writer):
    """A member row another transaction holds (a staff job's chunk, a session left open)
    held up the writer's whole batch and every batch behind it, other members' payments
    too, for the lock timeout (5 s, as long as a request waits: 503s). The book now waits
    for no held member: its commands come back unrun, wait here and are run again with a
    later batch, while the other commands are answered at once; once the member is free
    the held command is run and answered as any other."""
    book = HoldingBook()
    batcher = make(book)

    async def run():
        held = asyncio.create_task(batcher.submit("held-1", timeout_s=30))
        other = await asyncio.wait_for(batcher.submit("other", timeout_s=30), timeout=10)
        # While the member is held: the other command is answered, the held one waits and
        # is tried again now and then, not in a loop.
        await asyncio.sleep(0.2)
        assert not held.done()
        tries = book.runs_of("held-1")
        book.free.set()
        return other, await asyncio.wait_for(held, timeout=10), tries

    try:
        other, held, tries = asyncio.run(run())
    finally:
        batcher.close()
    assert other.body == {"n": "other"} and held.body == {"n": "held-1"}
    assert 2 <= tries <= 0.2 / batcher_module.HELD_RETRY_S * 3, tries
    assert book.runs_of("held-1") == tries + 1  # run once more, when free, and answered


def test_a_held_command_whose_caller_gave_up_is_never_run_again(one_writer):
    """The caller's request timeout ends its wait (503, retry with the same id): the
    command is dropped from the batcher, so nothing of it is written behind the
    caller's back once the member is free."""
    from ledger.errors import Unavailable

    book = HoldingBook()
    batcher = make(book)

    async def run():
        with pytest.raises(Unavailable) as gave_up:
            await batcher.submit("held-1", timeout_s=0.1)
        runs = book.runs_of("held-1")
        book.free.set()
        after = await asyncio.wait_for(batcher.submit("other", timeout_s=10), timeout=10)
        await asyncio.sleep(3 * batcher_module.HELD_RETRY_S)
        return gave_up.value, runs, after

    try:
        gave_up, runs, after = asyncio.run(run())
    finally:
        batcher.close()
    assert gave_up.status == 503 and "same id" in str(gave_up)
    assert after.body == {"n": "other"}
    assert book.runs_of("held-1") == runs  # not run once its caller stopped waiting
    assert batcher.depth == 0


def test_a_writer_that_stops_answers_its_held_commands_503(one_writer):
    """Closing the service while a command waits for its held member: it is tried once
    more and, still held, answered 503 "retry with the same id" (MemberHeld), not left
    to its request timeout."""
    from ledger.errors import MemberHeld

    book = HoldingBook()
    batcher = make(book)

    async def run():
        held = asyncio.create_task(batcher.submit("held-1", timeout_s=30))
        await asyncio.sleep(0.05)
        await asyncio.to_thread(batcher.close, 10.0)
        return await asyncio.wait_for(held, timeout=5)

    outcome = asyncio.run(run())
    assert isinstance(outcome.error, MemberHeld) and outcome.error.status == 503


class StuckBook(HoldingBook):
    """HoldingBook, and the commands named "stuck..." find their member held for good
    (a staff job's chunks, one after another, each holding members the last did not)."""

    def outcome(self, command) -> Outcome:
        from ledger.errors import MemberHeld

        if str(command).startswith("stuck"):
            return Outcome(error=MemberHeld("held"))
        return super().outcome(command)


def test_a_held_command_is_tried_again_while_other_members_keep_coming_back_held(one_writer, monkeypatch):
    """Under load during a staff job every batch brought back some command of a member
    the job's current chunk held, and each such batch put the retry of all the waiting
    commands off by another HELD_RETRY_S: a payment whose member the job's first chunk
    had held (and freed long before) was not tried again until the job ended or its
    request gave up (503), although its member was free. Each waiting command is now
    tried again HELD_RETRY_S after its own last try, whatever else comes back held."""
    monkeypatch.setattr(batcher_module, "HELD_RETRY_S", 0.05)
    book = StuckBook()
    batcher = make(book)

    async def run():
        held = asyncio.create_task(batcher.submit("held-1", timeout_s=30))
        answered_while_streaming = False
        for n in range(400):  # a new held member in (nearly) every batch, for ~0.4 s or more
            asyncio.create_task(batcher.submit(f"stuck-{n}", timeout_s=0.2))
            await asyncio.sleep(0.001)
            if n == 20:
                book.free.set()
            answered_while_streaming = answered_while_streaming or held.done()
        outcome = await asyncio.wait_for(held, timeout=10)
        await asyncio.sleep(0.3)  # the stuck commands' callers give up
        return outcome, answered_while_streaming

    try:
        outcome, answered_while_streaming = asyncio.run(run())
    finally:
        batcher.close()
    assert outcome.body == {"n": "held-1"}
    assert answered_while_streaming, "the freed member's command waited for the held stream to stop"


def test_commands_held_for_good_do_not_crowd_new_ones_out_of_every_batch(one_writer):
    """Commands whose member stays held (a staff job's chunk) went first into every batch,
    up to a full batch: with more of them than a batch holds, each batch that ran them
    took long enough for the others to be due again, so a batch never had room for a
    command queued behind them, whose member was free, until the held ones' callers gave
    up. Due held commands now fill at most half a batch while others are queued."""
    book = StuckBook()
    book.delay_s = 0.02  # longer than HELD_RETRY_S: the other held half is due after each batch
    batcher = make(book, batch_size_max=2)

    async def run():
        stuck = [asyncio.create_task(batcher.submit(f"stuck-{n}", timeout_s=30)) for n in range(4)]
        await asyncio.sleep(0.2)  # each tried, and tried again, by now
        outcome = await asyncio.wait_for(batcher.submit("free-1", timeout_s=30), timeout=5)
        for task in stuck:
            task.cancel()
        return outcome

    try:
        outcome = asyncio.run(run())
    finally:
        batcher.close()
    assert outcome.body == {"n": "free-1"}


def test_a_batch_whose_callers_loop_closed_meanwhile_leaves_the_writer_writing(one_writer):
    """A batch's answers go to each caller's event loop. A loop closed while its batch
    was written (a worker stopping past `close`'s wait, a test's loop) made
    `call_soon_threadsafe` raise in the writer thread, which died: the commands of every
    other loop were never written again (this suite's warnings showed the thread's
    traceback)."""
    book = RecordingBook(delay_s=0.2)
    batcher = make(book)

    async def leave_early():
        asyncio.create_task(batcher.submit("gone", timeout_s=30))
        await asyncio.sleep(0.05)  # inside its batch; the loop is closed on return

    async def after():
        return await asyncio.wait_for(batcher.submit("after", timeout_s=30), timeout=5)

    try:
        asyncio.run(leave_early())
        outcome = asyncio.run(after())
    finally:
        batcher.close()
    assert outcome.body == {"n": "after"}
    assert book.batches == [["gone"], ["after"]]


def test_the_depth_after_a_batch_counts_the_commands_it_brought_back_held(one_writer):
    """`on_batch`'s depth (the `eum_batch_queue_depth` gauge after each batch) left out
    the commands waiting for their held member, which the gauge's every-second refresh
    (`Batcher.depth`) counts: the gauge dropped to 0 after each batch while they waited."""
    book = HoldingBook()
    depths: list[int] = []
    batcher = make(book, on_batch=lambda size, seconds, depth: depths.append(depth))

    async def run():
        held = asyncio.create_task(batcher.submit("held-1", timeout_s=30))
        while book.runs_of("held-1") < 2:
            await asyncio.sleep(0.005)
        book.free.set()
        return await asyncio.wait_for(held, timeout=10)

    try:
        outcome = asyncio.run(run())
    finally:
        batcher.close()
    assert outcome.body == {"n": "held-1"}
    assert depths[0] == 1 and depths[-1] == 0, depths
