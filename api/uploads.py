"""Uploads (clearing files, recipient lists, policy documents) a worker takes at once.

A body is read whole before its job runs; four 35 MB clearing files sent together took
one worker to 1.9 GB. Past `EUM_UPLOADS_AT_ONCE` the next is refused without its body
being kept (it is read and dropped): 503 `overloaded` with Retry-After, nothing done, so
the sender resends it.

A multipart/form-data body (a browser form, `curl -F`) is refused as well, 415
`unsupported_media_type`, nothing done: every upload route takes the file itself as the
body, and a form was read as the file (the CSV routes answered that its first line, the
form's boundary, lacked their columns). A body labelled application/x-www-form-urlencoded
(curl's default for --data-binary) is read as it is: those are the file's bytes."""

from __future__ import annotations

import asyncio
import time
from contextlib import asynccontextmanager
from functools import partial
from typing import Any, AsyncIterator, Callable

import structlog

from ledger.errors import BodyTooSlow, Overloaded, UnsupportedMediaType

RETRY_AFTER_S = 5
# An upload's body is read while it holds its slots (an upload's, a reconciliation's heavy
# one): it must keep coming. Past a grace, at least this many bytes a second on average,
# else 408 `request_timeout`, nothing done. A finance client trickling a clearing file a
# byte every few seconds held the worker's heavy slot for as long as it went on: every
# settlement run, report and reconciliation there was 503 meanwhile (the security audit).
BODY_GRACE_S = 30.0
BODY_BYTES_PER_S_MIN = 64 * 1024  # 256 MiB in ~68 min; a day's ~90 MiB file in ~24 min
log = structlog.get_logger("api.uploads")


class Slot:
    """A slot taken (`upload_slot`): given back when the request leaves it, or, once a
    job runs on it (`run`), when that job's thread ends."""

    def __init__(self, slots: asyncio.Semaphore) -> None:
        self._slots = slots
        self._handed = False

    async def run(self, job: Callable[..., Any], *args: Any) -> Any:
        """`job(*args)` in a worker thread, this slot held until the thread ends: a
        request cancelled while it runs (the client gone) cannot stop the thread, which
        still holds the upload's bytes, so the slot was given back while the upload
        still ran and the next was taken beside it."""
        return await run_holding(partial(job, *args), self.hand_over())

    def hand_over(self) -> Callable[[], None]:
        """This slot's release, for a job's thread to call when it ends (`run_holding`);
        the request no longer gives it back."""
        self._handed = True
        return self._slots.release

    def _leave(self) -> None:
        if not self._handed:
            self._slots.release()


async def run_holding(job: Callable[[], Any], *releases: Callable[[], None]) -> Any:
    """`job()` in a worker thread: its result, or its exception. Each of `releases` is
    called when the thread ends, even if the awaiting request was cancelled before it
    did (the thread cannot be stopped, so what it holds is held until then)."""
    try:
        task = asyncio.ensure_future(asyncio.to_thread(job))
    except BaseException:
        for release in releases:
            release()
        raise

    def done(finished: asyncio.Future) -> None:
        for release in releases:
            release()
        if finished.cancelled():
            return
        error = finished.exception()  # retrieved, so that a job no one awaits any more is not reported unread
        if error is not None and not isinstance(error, Exception):
            log.warning("thread_job.stopped", error=repr(error)[:200])

    task.add_done_callback(done)
    return await asyncio.shield(task)


@asynccontextmanager
async def upload_slot(request):
    app_state = request.app.state
    if request.headers.get("content-type", "").lower().lstrip().startswith("multipart/"):
        await _drain(request)
        raise UnsupportedMediaType("the file is sent as the request body itself, not as a multipart/form-data form "
                                   "(curl --data-binary @FILE -H 'Content-Type: text/csv', not -F); nothing of it "
                                   "was done")
    slots = getattr(app_state, "upload_slots", None)
    if slots is None:
        slots = app_state.upload_slots = asyncio.Semaphore(app_state.services.settings.uploads_at_once)
    if slots.locked():
        await _drain(request)
        raise Overloaded("this worker is already working on as many uploads as it takes at once; send it again "
                         "shortly (nothing of it was done)", retry_after_s=RETRY_AFTER_S)
    await slots.acquire()  # free: taken without suspending, so nothing else took it since the test
    slot = Slot(slots)
    try:
        yield slot
    finally:
        slot._leave()


async def body_chunks(request) -> AsyncIterator[bytes]:
    """The body's chunks as they come (`request.stream()`), each due by the time the body
    so far would have taken at BODY_BYTES_PER_S_MIN after BODY_GRACE_S: later is
    `BodyTooSlow` (408), whatever is held given back as the caller leaves."""
    grace_s, started, received = BODY_GRACE_S, time.monotonic(), 0
    chunks = request.stream().__aiter__()
    while True:
        due = started + grace_s + received / BODY_BYTES_PER_S_MIN
        try:
            chunk = await asyncio.wait_for(chunks.__anext__(), max(due - time.monotonic(), 0.0))
        except StopAsyncIteration:
            return
        except asyncio.TimeoutError:
            raise BodyTooSlow(f"the body came slower than {BODY_BYTES_PER_S_MIN // 1024} KiB/s after its first "
                              f"{grace_s:g} s ({received:,} bytes in {time.monotonic() - started:.0f} s); nothing "
                              "of it was done: send it again over a better link") from None
        received += len(chunk)
        yield chunk


async def read_body(request) -> bytes:
    """The whole body, read as `body_chunks` reads it."""
    return b"".join([chunk async for chunk in body_chunks(request)])


async def _drain(request) -> None:
    """Read the body to its end without keeping it: a client still sending would otherwise
    meet a closed connection instead of the answer. (As slow a body is 408 here too.)"""
    async for _ in body_chunks(request):
        pass
