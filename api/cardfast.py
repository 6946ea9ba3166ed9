"""The card app's two hottest writes, POST /v1/payments and POST /v1/topups, answered
straight from the ASGI edge (`api.app.Edge`) on their happy path.

Routing, dependency solving and request/response objects cost more CPU per request
than the book's own work for a payment (docs/performance.md). A well-formed JSON body
with a valid card-app key needs none of it: the body is validated with the very same
pydantic model, the command is built the same way (`api.cardapp`), and it goes to the
same `cardapp.run`, so the answer is the route's answer, byte for byte.

Anything else — another content type, a missing, unknown or wrong-role key, a body the
model refuses, an unexpected exception before the command is queued — is handed to
the FastAPI application with the body replayed, so every error keeps the one canonical
form (problem documents, 401/403/422) and the OpenAPI document keeps the routes."""

from __future__ import annotations

from pydantic import ValidationError

from api import cardapp
from api.problems import eum_problem
from api.schemas import PaymentIn, TopupIn
from ledger.commands import Pay, TopUp
from ledger.errors import EumError
from rules.timeutil import to_us

ROUTES = {"/v1/payments": "payment", "/v1/topups": "topup"}
ROLE = "card-app"
BODY_MESSAGES_MAX = 1_000  # a body in more pieces than this goes the long way


def _command(kind: str, raw: bytes):
    if kind == "payment":
        body = PaymentIn.model_validate_json(raw)
        return Pay(body.payment_id, body.member_id, body.merchant_id, body.amount, to_us(body.occurred_at),
                   cardapp._fingerprint("payment", body))
    body = TopupIn.model_validate_json(raw)
    return TopUp(body.topup_id, body.member_id, body.amount, to_us(body.occurred_at),
                 cardapp._fingerprint("topup", body))


async def handle(app, scope, headers: dict, receive, send) -> bool:
    """Answer the request, or hand it to `app`. Returns True when answered here."""
    chunks, more, messages = [], True, 0
    first = None
    while more and messages < BODY_MESSAGES_MAX:
        message = await receive()
        messages += 1
        if message["type"] != "http.request":
            first = message
            break
        chunks.append(message.get("body", b""))
        more = message.get("more_body", False)
    raw = b"".join(chunks)

    async def replay():
        nonlocal raw, more
        if raw is not None:
            out = {"type": "http.request", "body": raw, "more_body": more}
            raw = None
            return out
        return await receive()

    command = None
    if first is None and not more and headers.get(b"content-type", b"").startswith(b"application/json"):
        command = _fast_command(scope, headers, raw)
    if command is None:
        await app(scope, replay, send)
        return False
    svc = scope["app"].state.services
    try:
        await scope["app"].state.limiter.check_header(svc.keys, headers.get(b"authorization"))  # 429
        response = await cardapp.run(svc, command)
    except EumError as error:
        response = eum_problem(error)
    await response(scope, receive, send)
    return True


def _fast_command(scope, headers: dict, raw: bytes):
    """The command, when the request is on the happy path; else None."""
    scheme, _, token = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
    if scheme.lower() != "bearer" or not token:
        return None
    known, principal = scope["app"].state.services.keys.cached(token.strip())
    if not known or principal is None or principal.role != ROLE:
        return None
    try:
        return _command(ROUTES[scope["path"]], raw)
    except (ValidationError, ValueError):
        return None
