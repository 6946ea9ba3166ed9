"""Registry endpoints (role admin): merchants and members."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query
from api.responses import Json

from api.auth import Admin, KeysOnce, RegistryReader, services
from api.schemas import CallerId, MemberIn, MerchantIn
from api.services import Services
from api import answers as A
from api.answers import ok
from ledger import registry
from ledger.errors import PageTooLarge
from rules.document import CALLER_ID_PATTERN, District

router = APIRouter(prefix="/v1", tags=["registry"])
ServicesDep = Annotated[Services, Depends(services)]


CREATED = "the entry did not exist: created (200 when it did: updated)"


@router.put("/merchants/{merchant_id}", responses=ok(A.MerchantOut, created=CREATED))
def put_merchant(merchant_id: CallerId, body: MerchantIn, svc: ServicesDep, who: Admin, _: KeysOnce):
    with svc.engine.begin() as conn:
        out, created = registry.put_merchant(
            conn, merchant_id=merchant_id, name=body.name, district=body.district, category=body.category,
            annual_sales_won=body.annual_sales, registered_from=body.registered_from, flags=body.flags,
            merchant_share_bp=body.merchant_share_bp, actor=who.actor, reason=body.reason)
    return Json(out, status_code=201 if created else 200)


@router.put("/members/{member_id}", responses=ok(A.MemberOut, created=CREATED))
def put_member(member_id: CallerId, body: MemberIn, svc: ServicesDep, who: Admin, _: KeysOnce):
    with svc.engine.begin() as conn:
        out, created = registry.put_member(conn, member_id=member_id, district=body.district, status=body.status,
                                           actor=who.actor, reason=body.reason)
    return Json(out, status_code=201 if created else 200)


MERCHANT_PAGE_MAX = 1000


@router.get("/merchants", responses=ok(A.MerchantsOut))
def list_merchants(svc: ServicesDep, _: RegistryReader,
                   limit: Annotated[int, Query(ge=1, description=f"at most {MERCHANT_PAGE_MAX}")] = 100,
                   after: Annotated[str | None, Query(max_length=64, pattern=CALLER_ID_PATTERN,
                                                      description="merchant_id to continue after")] = None,
                   district: District | None = None,
                   flag: Annotated[str | None, Query(pattern=r"^[a-z0-9_]{1,32}$",
                                                     description="only merchants with this flag")] = None):
    """The merchant registry in id order; page on with `after` = `next_after`."""
    if limit > MERCHANT_PAGE_MAX:
        raise PageTooLarge(f"limit may be at most {MERCHANT_PAGE_MAX}", limit_max=MERCHANT_PAGE_MAX)
    with svc.reader.connect() as conn:
        return Json(registry.list_merchants(conn, limit=limit, after=after, district=district, flag=flag))


@router.get("/merchants/{merchant_id}", responses=ok(A.MerchantRecord))
def get_merchant(merchant_id: CallerId, svc: ServicesDep, _: RegistryReader):
    with svc.reader.connect() as conn:
        return Json(registry.get_merchant(conn, merchant_id))


@router.get("/members/{member_id}", responses=ok(A.MemberRecord))
def get_member(member_id: CallerId, svc: ServicesDep, _: RegistryReader):
    with svc.reader.connect() as conn:
        return Json(registry.get_member(conn, member_id))
