"""Uploads (clearing files, recipient lists, policy documents) a worker takes at once.

A body is read whole before its job runs; four 35 MB clearing files sent together took
one worker to 1.9 GB. Past `EUM_UPLOADS_AT_ONCE` the next is refused without its body
being kept (it is read and dropped): 503 `overloaded` with Retry-After, nothing done, so
the sender resends it."""

from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager

from ledger.errors import Overloaded

RETRY_AFTER_S = 5


@asynccontextmanager
async def upload_slot(request):
    app_state = request.app.state
    slots = getattr(app_state, "upload_slots", None)
    if slots is None:
        slots = app_state.upload_slots = asyncio.Semaphore(app_state.services.settings.uploads_at_once)
    if slots.locked():
        # Read the body to its end without keeping it: a client still sending would
        # otherwise meet a closed connection instead of the answer.
        async for _ in request.stream():
            pass
        raise Overloaded("this worker is already working on as many uploads as it takes at once; send it again "
                         "shortly (nothing of it was done)", retry_after_s=RETRY_AFTER_S)
    async with slots:
        yield
