"""The card app's two hottest writes, POST /v1/payments and POST /v1/topups, answered
on their happy path before any middleware (`api.app.EumApp.__call__`).

Routing, dependency solving and request/response objects cost more CPU per request
than the book's own work for a payment (docs/performance.md). A well-formed JSON body
with a valid card-app key needs none of it: the body is validated with the very same
pydantic model, the command is built the same way (`api.cardapp`), and it goes to the
same `cardapp.answer`, so the answer is the route's answer, byte for byte (the JSON the
book stored, sent as it is). The body cap, request id, metrics and access log of
`api.app.Edge` are done here for these requests.

Anything else — another content type, a body that may give a key twice, an Authorization
or Content-Type header given twice, a missing, unknown or wrong-role key, a body the
model refuses, an unexpected exception before the command is queued — is handed to the
FastAPI application with the body replayed, so every error keeps the one canonical
form (problem documents, 401/403/422) and the OpenAPI document keeps the routes."""

from __future__ import annotations

import time

import structlog
from pydantic import ValidationError

from api import cardapp, metrics
from api.problems import eum_problem, problem
from api.requestids import request_id_of
from api.schemas import PaymentIn, TopupIn
from ledger.errors import EumError

ROUTES = {"/v1/payments": "payment", "/v1/topups": "topup"}
ROLE = "card-app"
BODY_MESSAGES_MAX = 1_000  # a body in more pieces than this goes the long way
REPLAYED_HEADER = (b"idempotent-replayed", b"true")
log = structlog.get_logger("api")
# Every answer: balances and histories are not kept by shared caches or browsers, and a
# browser takes each answer as the type it says it is (api.app.Edge adds them to the rest).
ANSWER_HEADERS = ((b"cache-control", b"no-store"), (b"x-content-type-options", b"nosniff"))


# Each model's keys as they appear in a body that escapes none of their characters.
QUOTED_KEYS = {"payment": tuple(f'"{name}"'.encode() for name in PaymentIn.model_fields),
               "topup": tuple(f'"{name}"'.encode() for name in TopupIn.model_fields)}


def may_give_a_key_twice(kind: str, raw: bytes) -> bool:
    """False when no key can be in `raw` twice, in a few byte counts: the models take no
    other keys (extra="forbid"), and a key written without a backslash appears in the
    text as its quoted name, so a key given twice shows as a name found twice. True
    sends the body the long way, where the route's `KeysOnce` reads it exactly (a value
    equal to a key's name, or any escape, costs that read and refuses nothing else)."""
    return b"\\" in raw or any(raw.count(key) > 1 for key in QUOTED_KEYS[kind])


def says_json(content_type: bytes) -> bool:
    """Whether the Content-Type is `application/json` itself, parameters aside. A prefix
    test took `application/jsonx` or `application/json-seq` here, where the route reads
    no JSON from such a body (FastAPI's own test: subtype `json` or `+json`) and answers
    422: one request was a 201 or a 422 by whether the worker had the key cached yet.
    Any other spelling the route takes (`Application/JSON`, `+json`) goes the route's way."""
    return content_type.split(b";", 1)[0].strip() == b"application/json"


# The headers the fast path reads (the body's length is the server's: h11 refuses two).
READ_HEADERS = (b"authorization", b"content-type")


def gives_a_read_header_twice(raw_headers) -> bool:
    """Whether a header the fast path reads comes more than once: `dict` keeps the last
    and the route (Starlette's `headers.get`) reads the first, so such a request goes
    the route's way (a bad key then a card-app key had been paid here and 401 there).
    Looked at only when some name repeats (the dict is shorter than the list)."""
    names = [name for name, _ in raw_headers if name in READ_HEADERS]
    return len(names) != len(set(names))


def _command(kind: str, raw: bytes):
    """The route's command for this body (`cardapp.payment_command`, `topup_command`)."""
    if kind == "payment":
        return cardapp.payment_command(PaymentIn.model_validate_json(raw))
    return cardapp.topup_command(TopupIn.model_validate_json(raw))


async def handle(app, fallback, scope, receive, send) -> None:
    """Answer the request here, or hand it to `fallback` (the whole FastAPI stack, with
    `api.app.Edge`) with the body replayed. Called before any middleware: on the happy
    path this function is the Edge (body cap, request id, metrics, access log)."""
    started = time.perf_counter()
    headers = dict(scope["headers"])
    limit = app.body_bytes_max
    length = headers.get(b"content-length")
    chunks, more, messages, size, first = [], True, 0, 0, None
    command = principal = None
    if length is None or (length.isdigit() and int(length) <= limit):
        while more and messages < BODY_MESSAGES_MAX and size <= limit:
            message = await receive()
            messages += 1
            if message["type"] != "http.request":
                first = message
                break
            chunk = message.get("body", b"")
            chunks.append(chunk)
            size += len(chunk)
            more = message.get("more_body", False)
        if (first is None and not more and size <= limit
                and says_json(headers.get(b"content-type", b""))
                and (len(headers) == len(scope["headers"]) or not gives_a_read_header_twice(scope["headers"]))):
            command, principal = _fast_command(app.state.services, headers, b"".join(chunks), scope["path"])
    if command is None:
        pending = [{"type": "http.request", "body": b"".join(chunks), "more_body": more}] if messages else []
        if first is not None:
            pending.append(first)

        async def replay():
            return pending.pop(0) if pending else await receive()

        await fallback(scope, replay, send)
        return

    request_id = request_id_of(headers)
    status, sent = 500, False
    try:
        await app.state.limiter.check(principal)  # 429; the key was verified once, in _fast_command
        status, raw, replayed = await cardapp.answer(app.state.services, command)
        sent = True
        response_headers = [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode()),
                            (b"x-request-id", request_id.encode()), *ANSWER_HEADERS]
        if replayed:
            response_headers.append(REPLAYED_HEADER)
        await send({"type": "http.response.start", "status": status, "headers": response_headers})
        await send({"type": "http.response.body", "body": raw})
    except Exception as error:
        if sent:  # the answer had started to leave (the client went away): nothing to add
            raise
        if isinstance(error, EumError):
            response = eum_problem(error)
        else:
            log.exception("request.crashed", path=scope["path"], request_id=request_id)
            response = problem(500, "internal_error", "Internal error", "an unexpected error; it has been logged")
        status = response.status_code
        response.raw_headers.append((b"x-request-id", request_id.encode()))
        await response(scope, receive, send)
    finally:
        elapsed = time.perf_counter() - started
        metrics.observe_request(scope["path"], status, elapsed)
        if status >= 500:
            log.warning("request", method="POST", path=scope["path"], status=status, ms=round(elapsed * 1000, 2),
                        request_id=request_id)


def _fast_command(svc, headers: dict, raw: bytes, path: str):
    """(command, its key's principal) when the request is on the happy path; else
    (None, None)."""
    scheme, _, token = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
    if scheme.lower() != "bearer" or not token:
        return None, None
    known, principal = svc.keys.cached(token.strip())
    if not known or principal is None or principal.role != ROLE:
        return None, None
    kind = ROUTES[path]
    if may_give_a_key_twice(kind, raw):
        return None, None
    try:
        return _command(kind, raw), principal
    except (ValidationError, ValueError):
        return None, None
