"""Grant programs, disbursements and budgets (policy staff)."""

from __future__ import annotations

import asyncio
import time
from typing import Annotated, Literal

import structlog

from fastapi import APIRouter, Depends, Query, Request
from api.responses import Json

from api.auth import KeysOnce, PolicyApprover, PolicyReader, services, require
from api.cardapp import run
from api.schemas import (CALLER_ID_PATTERN, Body, BudgetIn, BudgetRequestIn, CallerId, DisbursementIn, Period,
                         Source, SpanTime, WithdrawIn)
from eum.textfiles import BadUpload
from ledger import grant_jobs
from api.services import Services, seoul_today
from api.uploads import read_body, upload_slot
from api import answers as A
from api import metrics
from api.answers import ok
from ledger import budget_requests, queries, registry
from ledger.commands import Disburse
from ledger.errors import (AmountNotComputable, DistrictMismatch, EumError, PageTooLarge, ProgramNotFound,
                           SecondPersonRequired)
from ledger.keys import Principal
from ledger.programs import require_approved
from rules.grants import AttributesNotRead, GrantProgramDocument, RegistryDistrictMismatch
from rules.timeutil import to_us

log = structlog.get_logger("api.programs")

router = APIRouter(prefix="/v1", tags=["grants and budgets"])
ServicesDep = Annotated[Services, Depends(services)]
GrantOfficer = Annotated[Principal, Depends(require("policy-editor", "admin"))]
BudgetOfficer = Annotated[Principal, Depends(require("policy-editor", "finance"))]
BudgetApprover = Annotated[Principal, Depends(require("policy-editor", "policy-approver", "finance"))]
BUDGET_REQUESTS_PAGE_MAX = 1_000


class BadCsv(EumError):
    status, code, title = 422, "bad_csv", "The CSV file cannot be read"


class BadProgramText(EumError):
    status, code, title = 422, "validation_error", "The request is not valid"  # as every other 422 of its code


class AttributeNotRead(EumError):
    status, code, title = 422, "validation_error", "The request is not valid"


@router.post("/grant-programs", status_code=201, responses=ok(
    A.ProgramOut, 201, resend="a resend of the same program: the program as it stands now (its status may have "
                              "moved on since, e.g. approved)"))
def create_program(body: GrantProgramDocument, svc: ServicesDep, who: GrantOfficer,
                   _: KeysOnce):
    """Create a program as a `draft`; it disburses only after `approve` by a second person."""
    if bad := body.text_problems():
        raise BadProgramText(f"{', '.join(bad)}: names and text may not hold control characters or "
                             "bidirectional overrides")
    if bad := body.amount_problems() + body.span_problems() + body.match_problems():
        raise BadProgramText(bad[0])
    with svc.engine.begin() as conn:
        out, created = registry.create_grant_program(conn, body, who.actor)
    return Json(out, status_code=201 if created else 200,
                          headers=None if created else {"Idempotent-Replayed": "true"})


@router.post("/grant-programs/{program_id}/approve", responses=ok(A.ProgramOut))
def approve_program(program_id: CallerId, svc: ServicesDep, who: PolicyApprover):
    """A policy-approver other than the creator (another key and another name) opens the
    program for disbursement (maker-checker, audited). 403 `self_approval` for the creator."""
    with svc.engine.begin() as conn:
        return Json(registry.approve_grant_program(conn, program_id, who))


async def _require_approved(svc: Services, program_id: str) -> None:
    """404 or 409 `grant_program_not_approved` before anything is queued. An approved
    program is in the process's cache after its first use: no read for the next ones."""
    if svc.programs.get(program_id) is not None:
        return

    def read() -> None:
        with svc.reader.connect() as conn:
            require_approved(conn, program_id)

    await asyncio.to_thread(read)


@router.post("/grant-programs/{program_id}/disbursements", status_code=201, responses=ok(A.DisbursementOut, 201))
async def disburse(program_id: CallerId, body: DisbursementIn, svc: ServicesDep, who: GrantOfficer,
                   _: KeysOnce):
    await _require_approved(svc, program_id)
    amount = await asyncio.to_thread(_amount, svc, program_id, body.member_id, body.amount, body.attributes or {},
                                     body.disbursement_id)
    sent_us = to_us(body.occurred_at) if body.occurred_at else None
    occurred_us = sent_us if sent_us is not None else time.time_ns() // 1000
    fingerprint = grant_jobs.disbursement_fingerprint(program_id, body.member_id, body.amount, body.attributes,
                                                      sent_us)
    # Its audit entry (`grant.disburse`) is written by the book in the transaction that
    # records it: there whether this request or a retry hears the answer.
    command = Disburse(body.disbursement_id, program_id, body.member_id, amount, occurred_us, fingerprint,
                       actor=who.actor)
    return await run(svc, command)


def _amount(svc: Services, program_id: str, member_id: str, amount: int | None, attributes: dict,
            disbursement_id: str) -> int:
    """The amount the program gives this member (its rules read the member's district
    from the registry); a read of the database, so run off the event loop. An id already
    recorded is not worked out again (0): the book replays it by its fingerprint or
    refuses it as a conflict, whatever the registry says now."""
    from ledger import schema as s
    from ledger.grant_jobs import member_districts
    from sqlalchemy import select

    with svc.reader.connect() as conn:
        t = s.grant_disbursements
        if conn.execute(select(t.c.disbursement_id).where(t.c.disbursement_id == disbursement_id)).first():
            return 0
        text = conn.execute(select(s.grant_programs.c.document)
                            .where(s.grant_programs.c.program_id == program_id)).scalar_one_or_none()
        if text is None:
            raise ProgramNotFound(f"no grant program {program_id!r}")
        program = GrantProgramDocument.model_validate_json(text)
        district = member_districts(conn, [member_id]).get(member_id) if program.reads_district else None
    try:
        return program.disbursement_amount(amount, program.with_registry_district(attributes, district, amount))
    except RegistryDistrictMismatch as error:  # as a file's row says it
        raise DistrictMismatch(str(error)) from None
    except AttributesNotRead as error:  # a typo the rules would not read: the request, not the amount
        raise AttributeNotRead(str(error)) from None
    except ValueError as error:
        raise AmountNotComputable(str(error)) from None


BULK_BODY = {"requestBody": {"required": True, "description": "CSV (UTF-8, UTF-8 with BOM or CP949): header "
              "disbursement_id,member_id[,amount][,district][,the attributes the program's amount rules read, e.g. "
              "category, household_size, income_status, classes]; another column refuses the file (422 bad_csv)",
              "content": {"text/csv": {"schema": {"type": "string"}}}}}


@router.post("/grant-programs/{program_id}/disbursements/bulk", openapi_extra=BULK_BODY, responses=ok(A.BulkDisbursementOut))
async def disburse_bulk(program_id: CallerId, request: Request, svc: ServicesDep, who: GrantOfficer,
                        occurred_at: Annotated[SpanTime | None, Query()] = None):
    """A CSV of recipients; each row idempotent by its disbursement_id; bad rows reported by line."""
    occurred_us = to_us(occurred_at) if occurred_at else None
    async with upload_slot(request) as upload:
        data = await read_body(request)
        try:
            report = await upload.run(grant_jobs.bulk_disburse, svc.book, svc.reader, program_id, data,
                                             occurred_us, None, who.actor, svc.settings.upload_bytes_max)
        except (ValueError, BadUpload) as error:
            raise BadCsv(str(error)) from None
    return Json(report.as_dict())


class ExpireIn(Body):
    as_of: SpanTime | None = None


@router.post("/grant-programs/{program_id}/expire", responses=ok(A.ExpiryOut))
async def expire(program_id: CallerId, body: ExpireIn, svc: ServicesDep, who: GrantOfficer, _: KeysOnce):
    """Return the unspent money of an ended program to its funders (audited, with who)."""
    as_of = to_us(body.as_of) if body.as_of else None
    return Json(await asyncio.to_thread(grant_jobs.expire_program, svc.book, svc.reader, program_id, as_of,
                                        who.actor))


@router.get("/grant-programs", responses=ok(A.ProgramsOut))
def list_programs(svc: ServicesDep, _: PolicyReader):
    """Every grant program: `draft` (awaiting a second person), `open`, or `expired`."""
    with svc.reader.connect() as conn:
        return Json({"grant_programs": queries.grant_programs(conn)})


@router.get("/grant-programs/{program_id}", responses=ok(A.ProgramDetailOut))
def get_program(program_id: CallerId, svc: ServicesDep, _: PolicyReader):
    with svc.reader.connect() as conn:
        return Json(queries.grant_program(conn, program_id))


@router.put("/budgets/{source}/{period}", responses=ok(A.BudgetOut))
def put_budget(source: Source, period: Period, body: BudgetIn, svc: ServicesDep, who: BudgetOfficer,
               _: KeysOnce):
    """Set a budget's limit (one person: API.md's form). With
    EUM_BUDGET_APPROVAL=second_person, refused (403 `second_person_required`): a limit is
    then asked for (`POST /v1/budget-requests`) and set by another person's approval."""
    if svc.settings.budget_approval == "second_person":
        raise SecondPersonRequired("budget limits are set by a second person here (EUM_BUDGET_APPROVAL="
                                   "second_person): POST /v1/budget-requests, then a different person approves it")
    with svc.engine.begin() as conn:
        return Json(registry.put_budget(conn, source=source, period=period, limit_won=body.amount,
                                        actor=who.actor, reason=body.reason, on_budget_event=metrics.budget_event))


@router.post("/budget-requests", status_code=201, responses=ok(A.BudgetRequestOut, 201, resend=None))
def request_budget(body: BudgetRequestIn, svc: ServicesDep, who: BudgetOfficer, _: KeysOnce):
    """Ask for a budget's limit; a different person approves it (`.../approve`), which
    sets it as `PUT /v1/budgets/...` does. One pending request per budget (409
    `budget_request_pending`)."""
    with svc.engine.begin() as conn:
        return Json(budget_requests.request(conn, source=body.source, period=body.period, amount_won=body.amount,
                                            actor=who.actor, reason=body.reason), status_code=201)


@router.get("/budget-requests", responses=ok(A.BudgetRequestsOut))
def list_budget_requests(svc: ServicesDep, _: PolicyReader,
                         status: Literal["pending", "approved", "withdrawn"] | None = None,
                         limit: Annotated[int, Query(ge=1, description=f"at most {BUDGET_REQUESTS_PAGE_MAX:,}; "
                                                                        "more is 422 page_size_too_large")] = 50,
                         after: Annotated[str | None, Query(max_length=64, pattern=CALLER_ID_PATTERN,
                                                           description="request_id to continue after")] = None):
    """Budget requests, newest first, a page at a time: pass `next_after` as `after`."""
    if limit > BUDGET_REQUESTS_PAGE_MAX:
        raise PageTooLarge(f"limit may be at most {BUDGET_REQUESTS_PAGE_MAX}", limit_max=BUDGET_REQUESTS_PAGE_MAX)
    with svc.reader.connect() as conn:
        items = budget_requests.listed(conn, status=status, limit=limit + 1, after=after)
    page = items[:limit]
    return Json({"items": page, "next_after": page[-1]["request_id"] if len(items) > limit else None})


@router.post("/budget-requests/{request_id}/approve", responses=ok(A.BudgetRequestOut))
def approve_budget_request(request_id: CallerId, svc: ServicesDep, who: BudgetApprover):
    """Set the limit a pending request asks for: a different person than the one who
    asked (403 `self_approval`), while the limit it replaces is still the budget's (409
    `budget_changed_since_request`)."""
    with svc.engine.begin() as conn:
        return Json(budget_requests.approve(conn, request_id, actor=who.actor, on_budget_event=metrics.budget_event))


@router.post("/budget-requests/{request_id}/withdraw", responses=ok(A.BudgetRequestOut))
def withdraw_budget_request(request_id: CallerId, svc: ServicesDep, who: BudgetApprover, _: KeysOnce,
                            body: WithdrawIn | None = None):
    """Take back a pending request (nothing is set)."""
    with svc.engine.begin() as conn:
        return Json(budget_requests.withdraw(conn, request_id, actor=who.actor,
                                             reason=None if body is None else body.reason))


@router.get("/budgets", responses=ok(A.BudgetsOut))
def list_budgets(svc: ServicesDep, _: PolicyReader):
    with svc.reader.connect() as conn:
        return Json({"budgets": queries.budgets(conn, seoul_today())})
