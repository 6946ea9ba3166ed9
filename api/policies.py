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
from pydantic import Field, StringConstraints, model_validator
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from api.auth import Auditor, KeysOnce, PolicyApprover, PolicyEditor, PolicyReader, PolicyStaff, require, services
from api.responses import Json
from api.schemas import Body, CallerId, SpanTime
from api.heavy import run_heavy
from api.uploads import read_body, upload_slot
from rules.document import TEXT_CHARS
from api.services import Services, timeline_in
from api import answers as A
from api.answers import ok
from ledger import policies
from ledger import schema as s
from ledger.commands import RANGE_IN_FUTURE, starts_in_future
from ledger.errors import EumError, OccurredInFuture, PageTooLarge
from ledger.keys import Principal
from rules.compiled import compile_policy
from rules.document import PolicyDocument, policy_json_schema
from rules.loader import PolicyInvalid, parse_policy_text, text_problems
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
    effective_from: SpanTime


@router.get("/policies/schema")
def schema(_: PolicyReader):
    return Json(policy_json_schema())


@router.post("/policies", status_code=201, responses=ok(A.PolicyStep, 201, resend=None), openapi_extra={"requestBody": {
    "required": True, "content": {"application/json": {"schema": {"type": "object"}},
                                  "application/yaml": {"schema": {"type": "string"}}}, **POLICY_BODY_DOC}})
async def create_policy(request: Request, svc: ServicesDep, who: PolicyEditor):
    async with upload_slot(request) as upload:  # parsed in a thread, and only so many at once: the parse holds the GIL
        raw = await read_body(request)
        try:
            document = await upload.run(parse_policy_text, raw.decode("utf-8"), "request body")
        except UnicodeDecodeError:
            raise PolicyDocumentInvalid("the body must be UTF-8 text") from None
        except PolicyInvalid as invalid:
            raise PolicyDocumentInvalid(str(invalid), problems=[
                {"line": p.line, "path": p.path, "reason": p.reason} for p in invalid.problems]) from None
    if bad := text_problems(document, raw.decode("utf-8")):  # each with its line (it was null)
        raise PolicyDocumentInvalid("names and text may not hold control characters or bidirectional overrides",
                                    problems=[{"line": p.line, "path": p.path, "reason": p.reason} for p in bad])
    with svc.engine.begin() as conn:
        return Json(policies.create_draft(conn, document, who), status_code=201)


@router.get("/policies", responses=ok(A.PoliciesOut))
def list_policies(svc: ServicesDep, _: PolicyReader):
    with svc.reader.connect() as conn:
        return Json({"policies": policies.list_policies(conn)})


@router.get("/policies/{policy_id}", responses=ok(A.PolicyOut))
def get_policy(policy_id: CallerId, svc: ServicesDep, _: PolicyReader):
    with svc.reader.connect() as conn:
        return Json(policies.get_policy(conn, policy_id))


@router.post("/policies/{policy_id}/approve", responses=ok(A.PolicyStep))
def approve(policy_id: CallerId, svc: ServicesDep, who: PolicyApprover):
    with svc.engine.begin() as conn:
        return Json(policies.approve(conn, policy_id, who))


@router.post("/policies/{policy_id}/activate", responses=ok(A.PolicyStep))
def activate(policy_id: CallerId, body: ActivateIn, svc: ServicesDep, who: PolicyStaff, _: KeysOnce):
    with svc.engine.begin() as conn:
        out = policies.activate(conn, policy_id, to_us(body.effective_from), who)
        # A clash: 409 policy_clash, the activation rolled back. Concurrent activations and
        # withdrawals serialise on the audit log's lock (audit.append above, in the same
        # transaction), so each check sees the others' committed steps. Committed, this
        # worker reloads its timeline (the others at their next poll).
        timeline_in(conn, svc.files)
    svc.reload_policies()
    return Json(out)


class WithdrawIn(Body):
    reason: Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=500, pattern=TEXT_CHARS)]


@router.post("/policies/{policy_id}/withdraw", responses=ok(A.PolicyStep))
def withdraw(policy_id: CallerId, body: WithdrawIn, svc: ServicesDep, who: PolicyStaff, _: KeysOnce):
    """Take back a draft, an approved policy, or a scheduled activation at least
    ACTIVATION_LEAD_S + FUTURE_SKEW_S ahead; the reason goes to the audit log."""
    with svc.engine.begin() as conn:
        out = policies.withdraw(conn, policy_id, body.reason, who)
        if out["was"] == "scheduled":  # the layer's earlier policy runs on: it must still stack with the rest
            timeline_in(conn, svc.files)
    if out["was"] == "scheduled":
        svc.reload_policies()
    return Json(out)


class RangeIn(Body):
    from_: SpanTime = Field(alias="from")
    to: SpanTime

    @model_validator(mode="after")
    def _ordered(self) -> "RangeIn":
        if self.to <= self.from_:
            raise ValueError("`to` must be after `from`")
        return self


Simulators = Annotated[Principal, Depends(require("policy-editor", "policy-approver", "finance"))]


@router.post("/policies/{policy_id}/simulate", responses=ok(A.SimulationOut))
async def simulate(request: Request, policy_id: CallerId, body: RangeIn, svc: ServicesDep, _: Simulators,
                   __: KeysOnce):
    """The policy's cashback over recorded payments in [from, to), beside what was in force.
    A heavy job (api/heavy.py): past the worker's share, 503 `overloaded`; a range of more
    than `EUM_SIMULATION_PAYMENTS_MAX` payments, 422 `range_too_large`."""
    from settlement.simulate import refuse_range_over, simulate as run_simulation, with_draft

    start, end = to_us(body.from_), to_us(body.to)
    if starts_in_future(start):  # as a correction's range (ledger.corrections.propose)
        raise OccurredInFuture(f"the range {RANGE_IN_FUTURE}; nothing was simulated")
    timeline = svc.timeline
    payments_max = svc.settings.simulation_payments_max

    def run() -> dict:  # all of it in a thread: the read and the compile too, not on the event loop
        with svc.reader.connect() as conn:
            document = PolicyDocument.model_validate(policies.get_policy(conn, policy_id)["document"])
            refuse_range_over(conn, start, end, payments_max, job="simulation",
                              advice="simulate a shorter range, or run `eum policy simulate` on the policy's file, "
                                   "which this bound does not limit")
        draft = with_draft(timeline, compile_policy(document, body.from_), start, end)
        return run_simulation(svc.reader, draft, start, end, actual_timeline=timeline, payments_max=payments_max)

    return Json(await run_heavy(request.app.state, run))


class CorrectionIn(RangeIn):
    """A correction's range runs forward, as a simulation's (`RangeIn`): `to` before
    `from` was a 500, and `to` at `from` a 409 `policy_clash` naming two policies that
    did not clash (the policy-staff audit)."""

    correction_id: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._-]+$")]
    wrong_policy_id: CallerId
    right_policy_id: CallerId


@router.post("/corrections", status_code=201, responses=ok(A.CorrectionOut, 201, resend=None))
async def propose_correction(request: Request, body: CorrectionIn, svc: ServicesDep, who: PolicyEditor,
                             _: KeysOnce):
    """Each member's over- or under-payment between a wrong and a right policy over a past range.
    A heavy job (api/heavy.py): past the worker's share, 503 `overloaded`; more than
    `EUM_CORRECTION_PAYMENTS_MAX` payments to read, 422 `range_too_large`."""
    from functools import partial

    from ledger import corrections

    result = await run_heavy(request.app.state, partial(
        corrections.propose, svc.engine, svc.timeline, correction_id=body.correction_id,
        wrong_policy_id=body.wrong_policy_id, right_policy_id=body.right_policy_id,
        from_us_=to_us(body.from_), to_us_=to_us(body.to), author=who,
        payments_max=svc.settings.correction_payments_max))
    return Json(result, status_code=201)


@router.post("/corrections/{correction_id}/approve", responses=ok(A.CorrectionOut))
async def approve_correction(correction_id: CallerId, svc: ServicesDep, who: PolicyApprover):
    """A second person approves; the lines are then posted through the book."""
    from ledger import corrections

    return Json(await asyncio.to_thread(corrections.approve_and_post, svc.engine, svc.book, correction_id, who))


@router.get("/corrections/{correction_id}", responses=ok(A.CorrectionOut))
def get_correction(correction_id: CallerId, svc: ServicesDep, _: PolicyReader):
    from ledger import corrections

    return Json(corrections.get(svc.reader, correction_id))


AUDIT_PAGE_MAX = 500
PRINTABLE = r"^[^\x00-\x1f\x7f]*$"  # a filter with a control character matches nothing; PostgreSQL refuses NUL


@router.get("/audit-log", responses=ok(A.AuditLogOut))
def audit_log(svc: ServicesDep, _: Auditor,
              limit: Annotated[int, Query(ge=1, description=f"at most {AUDIT_PAGE_MAX}")] = 100,
              after: Annotated[int | None, Query(ge=0, le=2**63 - 1, description="entry_id to continue after")] = None,
              object_type: Annotated[str | None, Query(max_length=32, pattern=PRINTABLE)] = None,
              object_id: Annotated[str | None, Query(max_length=200, pattern=PRINTABLE)] = None,
              action: Annotated[str | None, Query(max_length=64, pattern=PRINTABLE,
                                                  description="exact, or a prefix ending in '.' (policy.)")] = None,
              actor: Annotated[str | None, Query(max_length=200, pattern=PRINTABLE,
                                                 description="part of the actor: a holder's name or a key id")]
              = None,
              since: Annotated[SpanTime | None, Query(description="entries at or after this time")] = None,
              until: Annotated[SpanTime | None, Query(description="entries before this time")] = None):
    """The audit log in entry order, filtered; page on with `after` = `next_after`."""
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
    if action:
        query = query.where(t.c.action.startswith(action, autoescape=True) if action.endswith(".")
                            else t.c.action == action)
    if actor:
        query = query.where(t.c.actor.contains(actor, autoescape=True))
    if since is not None:
        query = query.where(t.c.at_us >= to_us(since))
    if until is not None:
        query = query.where(t.c.at_us < to_us(until))
    with svc.reader.connect() as conn:
        rows = conn.execute(query).all()
    items = [{"entry_id": r.entry_id, "at": rfc3339(r.at_us), "actor": r.actor, "action": r.action,
              "object_type": r.object_type, "object_id": r.object_id, "detail": orjson.loads(r.detail),
              "prev_hash": r.prev_hash, "entry_hash": r.entry_hash, "chain": r.chain} for r in rows[:limit]]
    return Json({"items": items, "next_after": items[-1]["entry_id"] if len(rows) > limit else None})


def sync_files(svc: Services) -> None:
    """Record the shipped policy files in the policies table (once). Workers racing on a
    new file: the one that lost checks its files against what the other recorded."""
    for attempt in (1, 2):
        try:
            with svc.engine.begin() as conn:
                added = policies.sync_file_policies(conn, svc.files, svc.settings.policies_dir)
        except IntegrityError:
            if attempt == 2:
                raise
            continue
        if added:
            log.info("policies.files_recorded", added=added)
        return


async def refresher(svc: Services) -> None:
    """Reload the policy timeline when any worker commits an activation or a withdrawal."""
    try:
        seen = await asyncio.to_thread(_version, svc)
    except Exception as error:  # the database went down since start-up: reload once it answers
        seen = None
        log.warning("policies.refresh_failed", error=str(error)[:200])
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


