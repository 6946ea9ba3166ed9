"""Bearer API keys with one role each. Every route names the roles it admits; the
table of routes × roles is in docs/access.md and checked by tests/test_access.py.
Each key is rate limited by its role (api/ratelimit.py)."""

from __future__ import annotations

import asyncio
import json
from concurrent.futures import ThreadPoolExecutor
from typing import Annotated, Callable

import structlog
from fastapi import Depends, Request

from api.problems import NOT_UTF8, problem  # noqa: F401  (problem re-exported for routers)
from ledger.errors import EumError, Unavailable
from ledger.keys import CACHE_TTL_S, Principal

# Key reads have threads of their own: on the default executor they queued behind finance
# jobs (reconciliations, reports, bulk uploads) and a card app's key, re-read every
# CACHE_TTL_S, timed out into 503s for its payments.
KEY_READS = ThreadPoolExecutor(max_workers=2, thread_name_prefix="eum-keys")
# The re-read of the keys in use has a thread of its own too: a flood of unknown tokens
# queues on KEY_READS, and must not keep the real keys from being refreshed.
KEY_REFRESH = ThreadPoolExecutor(max_workers=1, thread_name_prefix="eum-keys-refresh")
log = structlog.get_logger("api.auth")


class Unauthorized(EumError):
    status, code, title = 401, "unauthorized", "A valid API key is required"


class Forbidden(EumError):
    status, code, title = 403, "forbidden", "This key's role may not do that"


async def services(request: Request):
    # Async: FastAPI runs a sync dependency in the thread pool, a hop per request.
    return request.app.state.services


async def _verify(request: Request, keys, token: str) -> Principal | None:
    """A key-cache miss reads the database in a thread, bounded like a write
    (`EUM_REQUEST_TIMEOUT_MS`): a slow database gets a 503, never a hang. The read goes
    on in its thread and fills the cache for the next request. (asyncio.to_thread, not
    the anyio pool: its future can be given up on while the thread finishes.)

    One read per key at a time: the requests that miss while it runs wait for that same
    read (shielded, so one caller's timeout does not cancel it for the others). Without
    this, a burst as the key's cache entry expires read the database once per request."""
    timeout_s = request.app.state.services.settings.request_timeout_ms / 1000
    reads = _key_reads(request.app.state)
    read = reads.get(token)
    if read is None:
        read = reads[token] = asyncio.get_running_loop().run_in_executor(KEY_READS, keys.verify, token)
        read.add_done_callback(lambda _: reads.pop(token, None))
    try:
        return await asyncio.wait_for(asyncio.shield(read), timeout_s)
    except asyncio.TimeoutError:
        raise Unavailable("the key store did not answer in time; retry shortly", retry_after_s=1) from None


async def keep_keys_warm(keys) -> None:
    """Re-read every key in use before its cache entry lapses, so that a key in use never
    waits for a read on a request (nor behind unknown keys' reads). A revoked key is not
    re-read and lapses within CACHE_TTL_S."""
    loop = asyncio.get_running_loop()
    while True:
        await asyncio.sleep(CACHE_TTL_S / 2)
        try:
            await loop.run_in_executor(KEY_REFRESH, keys.warm)
        except Exception as error:  # the database may be down: requests read (and 503) as before
            log.warning("keys.refresh_failed", error=type(error).__name__)


def _key_reads(state) -> dict[str, asyncio.Future]:
    """The key reads in flight on this worker's event loop, by token."""
    reads = getattr(state, "key_reads", None)
    if reads is None:
        reads = state.key_reads = {}
    return reads


def require(*roles: str) -> Callable[..., Principal]:
    allowed = frozenset(roles)

    async def dependency(request: Request) -> Principal:
        # Async: a sync dependency would cost every request a hop to the thread pool.
        # The key cache answers on the event loop; a miss reads the database in a thread.
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise Unauthorized("send Authorization: Bearer <key>")
        keys = request.app.state.services.keys
        known, principal = keys.cached(token.strip())
        if not known:
            principal = await _verify(request, keys, token.strip())
        if principal is None:
            raise Unauthorized("unknown, revoked or expired key")
        request.state.caller = principal  # for the access log, refused calls included
        # Every authenticated call spends one of its key's tokens, refused ones included.
        await request.app.state.limiter.check(principal)
        if principal.role not in allowed:
            raise Forbidden(f"role {principal.role!r} may not call this; needs one of {sorted(allowed)}")
        request.state.principal = principal
        return principal

    dependency.roles = allowed  # read by the access-matrix test
    return dependency


class KeyGivenTwice(EumError):
    status, code, title = 422, "validation_error", "The request is not valid"


class NotUtf8(EumError):
    status, code, title = 422, "validation_error", "The request is not valid"


async def json_keys_once(request: Request) -> None:
    """A JSON body that gives a key twice is refused: JSON reads the last one silently
    (`{"amount": 1000, "amount": 1000000000}` set a budget of 10억), so which was meant is
    not known. A route takes it after its key check (`KeysOnce` after the role), so
    access is still decided before the body is read. The card app's fast path
    (api/cardfast.py) screens its bodies in a few byte counts and sends only those that
    may give a key twice here (`cardfast.may_give_a_key_twice`).

    A body that is not UTF-8 is refused here too: JSON is UTF-8 (RFC 8259 §8.1), yet
    `json.loads` of bytes, and so FastAPI, guesses UTF-16 and UTF-32 (a payment sent in
    UTF-16 paid, the fuzz audit); the fast path's parse refuses such a body and sends it
    here."""
    from rules.loader import json_duplicate_keys

    body = await request.body()
    try:  # what `json.loads` would guess (NUL bytes read as UTF-16 or UTF-32), and whether it is
        utf8 = json.detect_encoding(body) in ("utf-8", "utf-8-sig") and body.decode("utf-8") is not None
    except UnicodeDecodeError:
        utf8 = False
    if not utf8:
        raise NotUtf8(NOT_UTF8)
    # Whatever the Content-Type says: FastAPI reads `Application/JSON` and `*/*+json` as
    # JSON too, and a body that is not JSON has no keys to give twice.
    if twice := json_duplicate_keys(body):
        raise KeyGivenTwice(f"{', '.join(twice)}: given twice in the body; only one is read, so which was "
                            "meant is not known: send each key once")


KeysOnce = Annotated[None, Depends(json_keys_once)]
CardApp = Annotated[Principal, Depends(require("card-app"))]
Admin = Annotated[Principal, Depends(require("admin"))]
MemberReader = Annotated[Principal, Depends(require("card-app", "finance", "auditor", "admin"))]
PolicyEditor = Annotated[Principal, Depends(require("policy-editor"))]
PolicyApprover = Annotated[Principal, Depends(require("policy-approver"))]
PolicyStaff = Annotated[Principal, Depends(require("policy-editor", "policy-approver"))]
PolicyReader = Annotated[Principal, Depends(require("policy-editor", "policy-approver", "finance", "auditor", "admin"))]
Finance = Annotated[Principal, Depends(require("finance"))]
# Every staff role: the audit log and the registry's reads are theirs.
Auditor = Annotated[Principal, Depends(require("auditor", "admin", "policy-editor", "policy-approver", "finance"))]
RegistryReader = Auditor
