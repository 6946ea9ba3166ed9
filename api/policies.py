"""Policy staff: drafts, second-person approval, activation, the audit log.

Workers reload their policy timeline when an activation is committed (polled every
`REFRESH_S`); activations must lie `ACTIVATION_LEAD_S` ahead, far more than that, so
no worker evaluates an event with a stale stack."""

from __future__ import annotations

import asyncio
from typing import Annotated

import orjson
import structlog
from fastapi import APIRouter, Depends, Query, Request
from pydantic import AwareDatetime
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from api.auth import Auditor, PolicyApprover, PolicyEditor, PolicyReader, PolicyStaff, services
from api.responses import Json
from api.schemas import Body
from api.services import Services
from ledger import policies
from ledger import schema as s
from ledger.errors import EumError, PageTooLarge
from rules.document import policy_json_schema
from rules.loader import PolicyInvalid, parse_policy_text, load_policy_dir
from rules.timeutil import rfc3339, to_us

log = structlog.get_logger("api.policies")
router = APIRouter(prefix="/v1", tags=["policies"])
ServicesDep = Annotated[Services, Depends(services)]
REFRESH_S = 1.0
POLICY_BODY_DOC = {"description": "a policy document (JSON, or YAML with Content-Type: application/yaml); "
                                  "schema at GET /v1/policies/schema"}


class PolicyDocumentInvalid(EumError):
    status, code, title = 422, "policy_invalid", "The policy document is not valid"


class ActivateIn(Body):
    effective_from: AwareDatetime


@router.get("/policies/schema")
def schema(_: PolicyReader):
    return Json(policy_json_schema())


@router.post("/policies", status_code=201, openapi_extra={"requestBody": {
    "required": True, "content": {"application/json": {"schema": {"type": "object"}},
                                  "application/yaml": {"schema": {"type": "string"}}}, **POLICY_BODY_DOC}})
async def create_policy(request: Request, svc: ServicesDep, who: PolicyEditor):
    raw = await request.body()
    try:
        document = parse_policy_text(raw.decode("utf-8"), "request body")
    except UnicodeDecodeError:
        raise PolicyDocumentInvalid("the body must be UTF-8 text") from None
    except PolicyInvalid as invalid:
        raise PolicyDocumentInvalid(str(invalid), problems=[
            {"line": p.line, "path": p.path, "reason": p.reason} for p in invalid.problems]) from None
    with svc.engine.begin() as conn:
        return Json(policies.create_draft(conn, document, who), status_code=201)


@router.get("/policies")
def list_policies(svc: ServicesDep, _: PolicyReader):
    with svc.reader.connect() as conn:
        return Json({"policies": policies.list_policies(conn)})


@router.get("/policies/{policy_id}")
def get_policy(policy_id: str, svc: ServicesDep, _: PolicyReader):
    with svc.reader.connect() as conn:
        return Json(policies.get_policy(conn, policy_id))


@router.post("/policies/{policy_id}/approve")
def approve(policy_id: str, svc: ServicesDep, who: PolicyApprover):
    with svc.engine.begin() as conn:
        return Json(policies.approve(conn, policy_id, who))


@router.post("/policies/{policy_id}/activate")
def activate(policy_id: str, body: ActivateIn, svc: ServicesDep, who: PolicyStaff):
    with svc.engine.begin() as conn:
        out = policies.activate(conn, policy_id, to_us(body.effective_from), who)
    svc.reload_policies()
    return Json(out)


AUDIT_PAGE_MAX = 500


@router.get("/audit-log")
def audit_log(svc: ServicesDep, _: Auditor, limit: Annotated[int, Query(ge=1)] = 100,
              after: Annotated[int | None, Query(ge=0, description="entry_id to continue after")] = None,
              object_type: Annotated[str | None, Query(max_length=32)] = None,
              object_id: Annotated[str | None, Query(max_length=200)] = None):
    if limit > AUDIT_PAGE_MAX:
        raise PageTooLarge(f"limit may be at most {AUDIT_PAGE_MAX}", limit_max=AUDIT_PAGE_MAX)
    t = s.audit_log
    query = select(t).order_by(t.c.entry_id).limit(limit + 1)
    if after is not None:
        query = query.where(t.c.entry_id > after)
    if object_type:
        query = query.where(t.c.object_type == object_type)
    if object_id:
        query = query.where(t.c.object_id == object_id)
    with svc.reader.connect() as conn:
        rows = conn.execute(query).all()
    items = [{"entry_id": r.entry_id, "at": rfc3339(r.at_us), "actor": r.actor, "action": r.action,
              "object_type": r.object_type, "object_id": r.object_id, "detail": orjson.loads(r.detail),
              "prev_hash": r.prev_hash, "entry_hash": r.entry_hash} for r in rows[:limit]]
    return Json({"items": items, "next_after": items[-1]["entry_id"] if len(rows) > limit else None})


def sync_files(svc: Services) -> None:
    """Record the shipped policy files in the policies table (once; workers race harmlessly)."""
    try:
        with svc.engine.begin() as conn:
            added = policies.sync_file_policies(conn, load_policy_dir(svc.settings.policies_dir))
        if added:
            log.info("policies.files_recorded", added=added)
    except IntegrityError:
        pass  # another worker recorded them first


async def refresher(svc: Services) -> None:
    """Reload the policy timeline when an activation is committed by any worker."""
    with svc.reader.connect() as conn:
        seen = policies.policies_version(conn)
    while True:
        await asyncio.sleep(REFRESH_S)
        try:
            version = await asyncio.to_thread(_version, svc)
            if version != seen:
                await asyncio.to_thread(svc.reload_policies)
                seen = version
                log.info("policies.reloaded", policies=len(svc.timeline))
        except asyncio.CancelledError:
            raise
        except Exception as error:  # the database may be down; keep the current timeline
            log.warning("policies.refresh_failed", error=str(error)[:200])


def _version(svc: Services):
    with svc.reader.connect() as conn:
        return policies.policies_version(conn)


