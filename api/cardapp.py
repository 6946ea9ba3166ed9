"""Card-app endpoints: top-ups, payments, refunds, withdrawals, balance, history.

A write is validated here, turned into a command, and queued for the next group
commit. Replays are answered from Redis when it has them, else by the book itself."""

from __future__ import annotations

from typing import Annotated, Literal

import orjson
from fastapi import APIRouter, Depends, Query
from starlette.responses import Response
from api.responses import Json

from api.auth import CardApp, KeysOnce, MemberReader, services
from api.schemas import CallerId, PaymentIn, RefundIn, TopupIn, WithdrawalIn
from api.services import Services, seoul_today
from api import answers as A
from api.answers import ok
from ledger import queries
from ledger.commands import Command, Pay, Refund, TopUp, Withdraw, request_hash
from ledger.errors import IdempotencyConflict, PageTooLarge
from rules.timeutil import month_of, to_us

router = APIRouter(prefix="/v1", tags=["card app"])
ServicesDep = Annotated[Services, Depends(services)]

REPLAYED = {"Idempotent-Replayed": "true"}


async def answer(svc: Services, command: Command) -> tuple[int, bytes, bool]:
    """(status, the answer's JSON bytes, replayed) of a write: from this worker's replay
    table, else from the next group commit. The bytes are those stored in the book."""
    cached = await svc.idempotency.get(command.kind, command.key)
    if cached is not None:
        digest, raw = cached
        if digest != command.request_hash:
            raise IdempotencyConflict(f"{command.kind} id {command.key!r} was used with a different request")
        return 200, raw, True
    outcome = await svc.batcher.submit(command, svc.settings.request_timeout_ms / 1000)
    if outcome.error is not None:
        raise outcome.error
    raw = outcome.raw if outcome.raw is not None else orjson.dumps(outcome.body)
    if outcome.replayed:
        return 200, raw, True
    # Remembered for replays, and a payment counted in the metrics, by the writer thread
    # at the commit (api/services.py), before this answer left.
    return 201, raw, False


async def run(svc: Services, command: Command) -> Response:
    status, raw, replayed = await answer(svc, command)
    return Response(raw, status_code=status, media_type="application/json", headers=REPLAYED if replayed else None)


def _fingerprint(kind: str, body, **extra) -> str:
    data = body.model_dump(mode="json")
    data["occurred_at_us"] = to_us(body.occurred_at)
    data.pop("occurred_at")
    data.update(extra)
    return request_hash(kind, data)


def topup_command(body: TopupIn) -> TopUp:
    """The top-up a body asks for, for the route and the ASGI fast path (`api.cardfast`).
    The fingerprint is `_fingerprint`'s, built from the fields (its `model_dump` cost
    more than the body's validation)."""
    at_us = to_us(body.occurred_at)
    return TopUp(body.topup_id, body.member_id, body.amount, at_us, request_hash("topup", {
        "topup_id": body.topup_id, "member_id": body.member_id, "amount": body.amount, "occurred_at_us": at_us}))


def payment_command(body: PaymentIn) -> Pay:
    """The payment a body asks for, fingerprint included (as `topup_command`): made here
    for the route, the fast path and `eum payments replay`, so a payment recorded any of
    these ways and its resend by another are one payment. tests/test_performance_paths.py
    holds the fingerprints equal to `_fingerprint`'s."""
    at_us = to_us(body.occurred_at)
    return Pay(body.payment_id, body.member_id, body.merchant_id, body.amount, at_us, request_hash("payment", {
        "payment_id": body.payment_id, "member_id": body.member_id, "merchant_id": body.merchant_id,
        "amount": body.amount, "occurred_at_us": at_us}))


@router.post("/topups", status_code=201, responses=ok(A.TopupOut, 201))
async def create_topup(body: TopupIn, svc: ServicesDep, _: CardApp, __: KeysOnce):
    return await run(svc, topup_command(body))


@router.post("/payments", status_code=201, responses=ok(A.PaymentOut, 201))
async def create_payment(body: PaymentIn, svc: ServicesDep, _: CardApp, __: KeysOnce):
    return await run(svc, payment_command(body))


@router.get("/payments/{payment_id}", responses=ok(A.PaymentRead),
            description="The payment as first answered (the POST's answer but its balances) and as it stands now: "
                        "refunded so far, what is left to refund, the cashback the member holds for it after "
                        "clawbacks and corrections, and its refunds (the first "
                        f"{queries.PAYMENT_REFUNDS_SHOWN}; `refund_count` says how many "
                        "there are, `refunds_next_cursor` continues on GET /v1/payments/{payment_id}/refunds). "
                        "A read after a timeout, in place of a resend; "
                        "it records nothing. Any payment's: the API has no per-member auth (the card-app key is "
                        "the backend's), so the backend shows a member their own payments only. No parameters: "
                        "one is 422.")
def read_payment(payment_id: CallerId, svc: ServicesDep, _: MemberReader):
    with svc.reader.connect() as conn:
        return Json(queries.payment(conn, payment_id, svc.programs))


@router.get("/payments/{payment_id}/refunds", responses=ok(A.RefundsPage),
            description="The payment's refunds, in the order the book recorded them, each as GET "
                        "/v1/payments/{payment_id} shows it; resend `next_cursor` for the next page (a refund "
                        "recorded meanwhile comes on the last). A declined payment has none. Any other parameter "
                        "is 422.")
def payment_refunds(payment_id: CallerId, svc: ServicesDep, _: MemberReader,
                    limit: Annotated[int, Query(ge=1, description="at most the service's page size "
                                                                 "(EUM_PAGE_SIZE_MAX, 200 by default); more is 422 "
                                                                 "page_size_too_large with limit_max")] = 50,
                    cursor: Annotated[str | None, Query(max_length=100)] = None):
    page_max = svc.settings.page_size_max
    if limit > page_max:
        raise PageTooLarge(f"limit may be at most {page_max}", limit_max=page_max)
    with svc.reader.connect() as conn:
        return Json(queries.payment_refunds(conn, payment_id, limit, cursor))


@router.post("/payments/{payment_id}/refunds", status_code=201, responses=ok(A.RefundOut, 201))
async def create_refund(payment_id: CallerId, body: RefundIn, svc: ServicesDep, _: CardApp, __: KeysOnce):
    command = Refund(body.refund_id, payment_id, body.amount, to_us(body.occurred_at),
                     _fingerprint("refund", body, payment_id=payment_id))
    return await run(svc, command)


@router.post("/members/{member_id}/withdrawals", status_code=201, responses=ok(A.WithdrawalOut, 201))
async def create_withdrawal(member_id: CallerId, body: WithdrawalIn, svc: ServicesDep, _: CardApp, __: KeysOnce):
    """The member takes back all the charged money left (잔액 환불), once the policy's share of
    the charged money put in since their last withdrawal has been used; else a recorded
    `declined` answer with its `decline_code`, as a top-up's. Idempotent by
    `withdrawal_id`, as top-ups are."""
    command = Withdraw(body.withdrawal_id, member_id, body.amount, to_us(body.occurred_at),
                       _fingerprint("withdrawal", body, member_id=member_id))
    return await run(svc, command)


Month = Annotated[str | None, Query(pattern=r"^20[0-9]{2}-(0[1-9]|1[0-2])$")]  # the book's span


@router.get("/members/{member_id}/balance", responses=ok(A.BalanceOut))
def member_balance(member_id: CallerId, svc: ServicesDep, _: MemberReader, month: Month = None):
    with svc.reader.connect() as conn:
        return Json(queries.member_balance(conn, member_id, month or month_of(seoul_today()), svc.programs))


TxnKind = Literal[queries.TXN_KINDS]  # type: ignore[valid-type]


@router.get("/members/{member_id}/transactions", responses=ok(A.TransactionsOut),
            description="The member's history, newest first in the order the book recorded it (transaction "
                        "id), not by occurred_at: a backdated event recorded later is listed above earlier-"
                        "dated ones. Filters: `kind` (repeat it for several kinds: any of them) and `month` "
                        "(the Seoul month the transaction occurred in); a page's `next_cursor` is resent with "
                        "the same filters. Any other parameter is 422.")
def member_transactions(member_id: CallerId, svc: ServicesDep, _: MemberReader,
                        limit: Annotated[int, Query(ge=1, description="at most the service's page size "
                                                                     "(EUM_PAGE_SIZE_MAX, 200 by default); more "
                                                                     "is 422 page_size_too_large with limit_max")]
                        = 50,
                        cursor: Annotated[str | None, Query(max_length=100)] = None,
                        kind: Annotated[list[TxnKind] | None,
                                        Query(description="only transactions of these kinds")] = None,
                        month: Annotated[Month, Query(description="only transactions that occurred in this "
                                                                  "Seoul month (YYYY-MM)")] = None):
    page_max = svc.settings.page_size_max
    if limit > page_max:
        raise PageTooLarge(f"limit may be at most {page_max}", limit_max=page_max)
    with svc.reader.connect() as conn:
        return Json(queries.member_transactions(conn, member_id, limit, cursor, kind or (), month))
