"""Heavy jobs a worker runs at once: those that read a range of the book into memory.

A simulation of a month at Incheon scale (20 million payments) peaks at ~6.4 GiB, a
correction's plan at more per payment (docs/performance.md), and they run in the same
process as the payment path. Past `EUM_HEAVY_JOBS_AT_ONCE` the next is refused at
once: 503 `overloaded` with Retry-After, nothing read, nothing done or audited, so the
caller sends it again. The heavy routes (docs/design.md, Limits): a policy simulation, a
correction proposal, a settlement run, the daily and monthly reports, and a
reconciliation (which also holds an upload slot, api/uploads.py: its file and its day
of the book are both in memory).

A slot is held until the job's thread ends, not until its request does: a thread
cannot be stopped, so a client that gives up (its request cancelled) leaves the job
running, and the slot with it, until the job returns or fails. Freed then, whatever
the outcome."""

from __future__ import annotations

import asyncio
from typing import Any, Callable

from api.uploads import Slot, _drain, run_holding
from ledger.errors import Overloaded

RETRY_AFTER_S = 10  # a heavy job takes seconds to a minute; sooner would only be refused again


def _slots(app_state) -> asyncio.Semaphore:
    slots = getattr(app_state, "heavy_slots", None)
    if slots is None:
        slots = app_state.heavy_slots = asyncio.Semaphore(app_state.services.settings.heavy_jobs_at_once)
    return slots


async def take_slot(app_state, *, drain=None) -> asyncio.Semaphore:
    """A slot taken now or 503 `overloaded`: never a wait (a queue of heavy jobs is the
    memory this bound is for). `drain`: an upload's request, whose body is read and
    dropped before the refusal (api/uploads.py). The caller releases the slot
    (`run_heavy` does)."""
    slots = _slots(app_state)
    if slots.locked():
        if drain is not None:
            await _drain(drain)
        raise Overloaded("this worker is already running as many heavy jobs (simulations, corrections, settlement "
                         "runs, reports, reconciliations) as it runs at once; send it again shortly (nothing of it "
                         "was done)", retry_after_s=RETRY_AFTER_S)
    await slots.acquire()  # free: taken without suspending, so nothing else took it since the test
    return slots


async def run_heavy(app_state, job: Callable[[], Any], *, slots: asyncio.Semaphore | None = None,
                    also: Slot | None = None) -> Any:
    """`job()` in a worker thread under a heavy slot (taken here unless `slots` is one
    the caller took): its result, or its exception. The slot is given back when the
    thread ends, even if the awaiting request was cancelled before it did; so is the
    upload slot `also`, whose bytes the job holds (a reconciliation)."""
    slots = await take_slot(app_state) if slots is None else slots
    return await run_holding(job, slots.release, *(() if also is None else (also.hand_over(),)))
