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
from contextlib import asynccontextmanager

from ledger.errors import Overloaded, UnsupportedMediaType

RETRY_AFTER_S = 5


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
    async with slots:
        yield


async def _drain(request) -> None:
    """Read the body to its end without keeping it: a client still sending would otherwise
    meet a closed connection instead of the answer."""
    async for _ in request.stream():
        pass
