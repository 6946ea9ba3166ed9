"""Finance endpoints (role finance; reading also auditor): daily settlement, merchant
payout files, reopening with a second person, clearing-file reconciliation, reports.

Heavy work (a day of the book, a clearing file) runs in a worker thread so that the
event loop keeps serving card payments, and only so much of it at once (api/heavy.py)."""

from __future__ import annotations

import datetime as dt
import hashlib
from functools import partial
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Path, Query, Request
from pydantic import Field
from starlette.responses import HTMLResponse, Response

from api.auth import Finance, KeysOnce, require, services
from api.responses import Json
from api.schemas import Body, CallerId, IsoDate
from api.heavy import run_heavy, take_slot
from api.uploads import body_chunks, upload_slot
from rules.document import CALLER_ID_PATTERN, TEXT_CHARS
from api.services import Services
from api import answers as A
from api.answers import ok
from ledger.errors import PageTooLarge, SheetTooLarge
from ledger.keys import Principal
from settlement import export, report, runs, service
from settlement.config import get_config
from settlement.reconcile import parse_clearing, reconcile_parsed

router = APIRouter(prefix="/v1", tags=["finance"])
ServicesDep = Annotated[Services, Depends(services)]
FinanceReader = Annotated[Principal, Depends(require("finance", "auditor"))]
# The book's era: dates outside it are refused as input (422), not computed on (years like
# 0128 overflow the time arithmetic of the reports).
MONTH_PATTERN = r"^20\d{2}-(0[1-9]|1[0-2])$"
BusinessDate = Annotated[IsoDate, Field(ge=dt.date(2000, 1, 1), le=dt.date(2099, 12, 31))]
ROWS_MAX = 100_000


class SettlementIn(Body):
    business_date: BusinessDate = Field(description="the Asia/Seoul business date to settle")


class ReopenIn(Body):
    reason: str = Field(min_length=1, max_length=2_000, pattern=TEXT_CHARS)


def _body(result: service.SettlementResult) -> dict:
    return result.body()


@router.post("/settlements", status_code=201, responses=ok(A.SettlementOut, 201))
async def settle(request: Request, body: SettlementIn, svc: ServicesDep, who: Finance, _: KeysOnce):
    """Settle a business date. A settled date returns the same settlement (200, replayed);
    a run whose checks fail is recorded as `failed` with the reasons and can be run again.
    A heavy job (api/heavy.py): past the worker's share, 503 `overloaded`, nothing run."""
    result = await run_heavy(request.app.state, partial(service.settle, svc.engine, body.business_date,
                                                        actor=who.actor))
    if result.replayed:
        return Json(_body(result), status_code=200, headers={"Idempotent-Replayed": "true"})
    return Json(_body(result), status_code=201)


# A page of settlements or reconciliation runs: past it, 422 page_size_too_large with
# limit_max, as every list says it (it was validation_error, with no bound to read back).
LIST_PAGE_MAX = 1_000


def _bounded(limit: int) -> None:
    if limit > LIST_PAGE_MAX:
        raise PageTooLarge(f"limit may be at most {LIST_PAGE_MAX}", limit_max=LIST_PAGE_MAX)


@router.get("/settlements", responses=ok(A.SettlementsOut))
def list_settlements(svc: ServicesDep, _: FinanceReader,
                     month: Annotated[str | None, Query(pattern=MONTH_PATTERN)] = None,
                     limit: Annotated[int, Query(ge=1, description=f"at most {LIST_PAGE_MAX:,}")]
                     = service.SETTLEMENTS_PAGE,
                     after: Annotated[str | None, Query(max_length=64, pattern=CALLER_ID_PATTERN,
                                                       description="settlement_id to continue after")] = None):
    """Settlements in business-date order, a page at a time: pass `next_after` as `after`
    (null on the last page). Without `month`, every month's."""
    _bounded(limit)
    with svc.reader.connect() as conn:
        items = service.list_settlements(conn, month=month, limit=limit + 1, after=after)
    page = items[:limit]
    return Json({"items": [{k: v for k, v in r.body().items() if k != "totals"} for r in page],
                 "next_after": page[-1].settlement_id if len(items) > limit and page else None})


@router.get("/settlements/{settlement_id}", responses=ok(A.SettlementOut))
def get_settlement(settlement_id: CallerId, svc: ServicesDep, _: FinanceReader):
    with svc.reader.connect() as conn:
        return Json(_body(service.get_settlement(conn, settlement_id)))


MEDIA = {"csv": "text/csv; charset=utf-8", "parquet": "application/vnd.apache.parquet",
         "xlsx": "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet"}


# The answer by `format`: JSON (`PayoutsOut`), or one of these files.
_PAYOUT_FILES = {media.split(";")[0]: {"schema": {"type": "string", "format": "binary"}} for media in MEDIA.values()}


@router.get("/settlements/{settlement_id}/merchant-payouts",
            responses={200: {**ok(A.PayoutsOut)[200], "content": _PAYOUT_FILES}})
def merchant_payouts(settlement_id: CallerId, svc: ServicesDep, _: FinanceReader,
                     format: Literal["json", "csv", "parquet", "xlsx"] = "json"):
    """One row per merchant (and per late business date adjusted): sales, refunds, fee,
    merchant-funded cashback share, net payable and payout date, in won."""
    with svc.reader.connect() as conn:
        frame = service.merchant_payouts(conn, settlement_id)
    if format == "json":
        return Json({"settlement_id": settlement_id, "count": frame.height, "items": frame.to_dicts()})
    try:
        data = {"csv": export.csv_bytes, "parquet": export.parquet_bytes,
                "xlsx": lambda f: export.xlsx_bytes({"merchant payouts": f})}[format](frame)
    except export.XlsxRowsExceeded as error:  # was a 500 (settlement outputs audit)
        raise SheetTooLarge(str(error)) from None
    name = f"{settlement_id}-merchant-payouts.{format}"
    return Response(data, media_type=MEDIA[format], headers={"Content-Disposition": f'attachment; filename="{name}"'})


@router.post("/settlements/{settlement_id}/reopen-requests", status_code=201,
             responses=ok(A.ReopenOut, 201, resend=None))  # a second request: 409
def request_reopen(settlement_id: CallerId, body: ReopenIn, svc: ServicesDep, who: Finance, _: KeysOnce):
    """Ask to reopen a settled date; a different person approves it."""
    return Json(service.request_reopen(svc.engine, settlement_id, actor=who.actor, reason=body.reason),
                status_code=201)


@router.post("/settlement-reopen-requests/{request_id}/approve", responses=ok(A.ReopenOut))
def approve_reopen(request_id: CallerId, svc: ServicesDep, who: Finance):
    """Approve a reopening (403 second_person_required for the requester's own key)."""
    return Json(service.approve_reopen(svc.engine, request_id, actor=who.actor))


CLEARING_BODY = {"requestBody": {"required": True, "description": (
    "The card network's clearing file, CSV in UTF-8, UTF-8 with BOM or CP949. Columns: approval_id (our "
    "payment_id), merchant_id, amount_won, transacted_at; optional record_type (P|R), split_seq, refund_id. "
    "In a file with a split_seq column, lines of one approval without it are resends, not split parts. "
    "See settlement/reconcile.py."), "content": {"text/csv": {"schema": {"type": "string"}}}}}


@router.post("/reconciliations", openapi_extra=CLEARING_BODY, responses=ok(A.ReconciliationOut))
async def reconciliations(request: Request, svc: ServicesDep, who: Finance,
                          tolerance_won: Annotated[int | None, Query(ge=0, le=10**12)] = None,
                          rows_max: Annotated[int, Query(ge=0, le=ROWS_MAX)] = 1_000,
                          business_date: Annotated[BusinessDate | None, Query()] = None):
    """{matched, missing_in_ledger, missing_in_clearing, amount_mismatch, duplicates,
    merchant_mismatch, late}: each the list of its rows (at most `rows_max`), with `counts` and
    `rows_truncated` per category; malformed files (and files
    with no lines) are 422 `clearing_file_invalid` with the lines at fault. Rows with a
    time carry it as integer microseconds (`occurred_at_us`, `transacted_at_us`) and, beside
    it, as RFC 3339 in Seoul (`occurred_at`, `transacted_at`).
    `business_date`: the day the file clears; by default the days of its lines' times.
    The run is stored (`reconciliation_id`; `GET /v1/reconciliations/{id}`) with its
    exception rows, and the day's and month's reports show the latest run of each date;
    the same file again is a new run, compared with the book as it is then. A file refused
    (422) stores nothing. The CSV is the body itself: a multipart form is 415."""
    async with upload_slot(request) as upload:
        # Its day of the book is read too: a heavy job as well (api/heavy.py), the slot
        # taken before the body is read (refused: the body read and dropped, as an upload's).
        slots = await take_slot(request.app.state, drain=request)
        # The file's bytes in a list the parse pops them from: nothing holds them while the
        # book is read and the lines matched (request.body() would: Starlette keeps the body
        # on the request). A day's file is ~90 MiB, and a worker takes two uploads at once.
        digest = hashlib.sha256()
        chunks = []
        try:
            async for chunk in body_chunks(request):  # a body that stops coming gives the slots back
                digest.update(chunk)
                chunks.append(chunk)
        except BaseException:  # too large, or the client gone: the job never starts
            slots.release()
            raise
        body = [b"".join(chunks)]
        del chunks
        size = len(body[0])

        def work() -> dict:
            config = get_config()
            with svc.reader.connect() as conn:
                clearing, facts = parse_clearing(body.pop(), config)
                result = reconcile_parsed(conn, clearing, facts, config=config, tolerance_won=tolerance_won,
                                          business_date=business_date)
            del clearing
            return runs.store(svc.engine, result, actor=who.actor, file_sha256=digest.hexdigest(), file_bytes=size,
                              rows_max=rows_max)

        return Json(await run_heavy(request.app.state, work, slots=slots, also=upload))


@router.get("/reconciliations", responses=ok(A.ReconciliationsOut))
def list_reconciliations(svc: ServicesDep, _: FinanceReader,
                         date: Annotated[BusinessDate | None, Query(description="runs that compared this business "
                                                                                "date")] = None,
                         limit: Annotated[int, Query(ge=1, description=f"at most {LIST_PAGE_MAX:,}")]
                         = runs.RUNS_PAGE,
                         after: Annotated[str | None, Query(max_length=64, pattern=CALLER_ID_PATTERN,
                                                           description="reconciliation_id to continue after")] = None):
    """Stored reconciliation runs in the order they were made (the same file twice is two
    runs), a page at a time: pass `next_after` as `after` (null on the last page)."""
    _bounded(limit)
    with svc.reader.connect() as conn:
        items = runs.list_runs(conn, date=date.isoformat() if date else None, limit=limit + 1, after=after)
    page = items[:limit]
    return Json({"items": page, "next_after": page[-1]["reconciliation_id"] if len(items) > limit and page else None})


@router.get("/reconciliations/{reconciliation_id}", responses=ok(A.ReconciliationOut))
def get_reconciliation(reconciliation_id: CallerId, svc: ServicesDep, _: FinanceReader):
    """A stored run's answer, as `POST /v1/reconciliations` gave it but for the matched
    rows, which are not kept (none listed; `rows_truncated.matched` true if there were)."""
    with svc.reader.connect() as conn:
        return Json(runs.answer(conn, reconciliation_id))


@router.get("/reports/daily/{business_date}", response_class=HTMLResponse)
async def daily_report(request: Request, business_date: BusinessDate, svc: ServicesDep, _: FinanceReader):
    """The day's self-contained HTML report (charts inline); its reconciliation exceptions
    are the latest stored run's that compared the day. A heavy job (api/heavy.py)."""
    def work() -> str:
        with svc.reader.connect() as conn:
            return report.render(report.day_data(conn, business_date))

    return HTMLResponse(await run_heavy(request.app.state, work))


@router.get("/reports/monthly/{month}", response_class=HTMLResponse)
async def monthly_report(request: Request, month: Annotated[str, Path(pattern=MONTH_PATTERN)], svc: ServicesDep,
                         _: FinanceReader):
    """The month's self-contained HTML report (charts inline); its reconciliation
    exceptions are those of the latest stored run of each of its days. A heavy job
    (api/heavy.py): a month of the book."""
    def work() -> str:
        with svc.reader.connect() as conn:
            return report.render(report.month_data(conn, month))

    return HTMLResponse(await run_heavy(request.app.state, work))
