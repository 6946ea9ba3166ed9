"""Operations: liveness, readiness, metrics."""

from __future__ import annotations

import asyncio
import hmac

from fastapi import APIRouter, Request, Response
from api.responses import Json
from sqlalchemy import text

from api import metrics
from api.access import PROBLEM_CONTENT, RETRY_AFTER
from api.auth import Unauthorized
from api.problems import eum_problem, problem

router = APIRouter(tags=["operations"])


# HEAD for probes that send it: a route of its own, so each operation has its own
# operationId (one route for both gave them one, which OpenAPI does not allow).
@router.head("/healthz")
@router.get("/healthz")
def healthz():
    return Json({"status": "ok"})


_READY = {200: {"description": "ready: the book of record answers and takes writes (Redis reported, not deciding)",
                "content": {"application/json": {"schema": {"type": "object"}}}},
          503: {"description": "not ready (`not_ready`): the database does not answer in time, or takes no writes "
                               "(a standby, or set read-only)",
                "content": PROBLEM_CONTENT, "headers": RETRY_AFTER}}
_METRICS = {200: {"description": "Prometheus text exposition",
                  "content": {"text/plain": {"schema": {"type": "string"}}}},
            401: {"description": "with EUM_METRICS_TOKEN set: no or another bearer token", "content": PROBLEM_CONTENT}}


@router.get("/readyz", responses=_READY)
async def readyz(request: Request):
    """Ready when the book of record answers and takes writes. Redis is reported but does
    not decide: it is only a replay cache (api/fastpath.py), and the service answers
    without it."""
    svc = request.app.state.services
    # In a thread: a slow or restarting database must not stall this worker's event loop.
    state = await _bounded(asyncio.to_thread(_db_state, svc), svc.settings.request_timeout_ms / 1000)
    checks = {"database": state is not None, "database_writable": state,
              "redis": await svc.idempotency.ping() if svc.idempotency.enabled else None}
    ready = bool(state)
    if not ready:
        return problem(503, "not_ready", "Not ready", f"dependencies: {checks}", headers={"Retry-After": "1"},
                       checks=checks)
    return Json({"status": "ready", "checks": checks, "queue_depth": svc.batcher.depth})


async def _bounded(check, timeout_s: float):
    """A check that does not answer in time is a failed check, None (its thread finishes alone)."""
    try:
        return await asyncio.wait_for(check, timeout_s)
    except asyncio.TimeoutError:
        return None


# A standby (a fail-over onto a replica) or a database set read-only answers every read
# and refuses every write: `SELECT 1` alone had kept such a book "ready" while each payment
# was a 503 (`ReadOnlySqlTransaction`), and a balancer kept sending it the card app's
# traffic. The reader's own transactions are READ ONLY, so the session's default is read.
_WRITABLE = text("SELECT NOT pg_is_in_recovery() AND current_setting('default_transaction_read_only') = 'off'")


def _db_state(svc) -> bool | None:
    """Whether the book takes writes; None when it does not answer."""
    try:
        with svc.reader.connect() as conn:
            if conn.dialect.name != "postgresql":
                conn.execute(text("SELECT 1"))
                return True
            return bool(conn.execute(_WRITABLE).scalar_one())
    except Exception:
        return None


@router.get("/metrics", response_class=Response, responses=_METRICS)
def prometheus(request: Request):
    """Prometheus text. With `EUM_METRICS_TOKEN` set, only for `Authorization: Bearer
    <token>` (the figures include payments by decline code, cashback paid and budget
    events); unset, open as before, for a scraper on the host's own network."""
    token = request.app.state.metrics_token
    if token is not None:
        sent = request.headers.get("authorization", "")
        if not hmac.compare_digest(sent.encode(), f"Bearer {token}".encode()):
            return eum_problem(Unauthorized("a valid metrics token is required: send Authorization: Bearer "
                                            "<EUM_METRICS_TOKEN>"))
    body, content_type = metrics.render()
    return Response(body, media_type=content_type)
