"""Operations: liveness, readiness, metrics."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request, Response
from api.responses import Json
from sqlalchemy import text

from api import metrics
from api.problems import problem

router = APIRouter(tags=["operations"])


@router.get("/healthz")
def healthz():
    return Json({"status": "ok"})


@router.get("/readyz")
async def readyz(request: Request):
    """Ready when the book of record answers. Redis is reported but does not decide:
    it is only a replay cache (api/fastpath.py), and the service answers without it."""
    svc = request.app.state.services
    # In a thread: a slow or restarting database must not stall this worker's event loop.
    checks = {"database": await asyncio.to_thread(_db_ok, svc),
              "redis": await svc.idempotency.ping() if svc.idempotency.enabled else None}
    ready = checks["database"]
    if not ready:
        return problem(503, "not_ready", "Not ready", f"dependencies: {checks}", headers={"Retry-After": "1"},
                       checks=checks)
    return Json({"status": "ready", "checks": checks, "queue_depth": svc.batcher.depth})


def _db_ok(svc) -> bool:
    try:
        with svc.reader.connect() as conn:
            conn.execute(text("SELECT 1"))
        return True
    except Exception:
        return False


@router.get("/metrics")
def prometheus():
    body, content_type = metrics.render()
    return Response(body, media_type=content_type)
