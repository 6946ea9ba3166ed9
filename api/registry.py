"""Registry endpoints (role admin): merchants and members."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends
from api.responses import Json

from api.auth import Admin, services
from api.schemas import CallerId, MemberIn, MerchantIn
from api.services import Services
from api import answers as A
from api.answers import ok
from ledger import registry

router = APIRouter(prefix="/v1", tags=["registry"])
ServicesDep = Annotated[Services, Depends(services)]


@router.put("/merchants/{merchant_id}", responses=ok(A.MerchantOut))
def put_merchant(merchant_id: CallerId, body: MerchantIn, svc: ServicesDep, who: Admin):
    with svc.engine.begin() as conn:
        out, created = registry.put_merchant(
            conn, merchant_id=merchant_id, name=body.name, district=body.district, category=body.category,
            annual_sales_won=body.annual_sales, registered_from=body.registered_from, flags=body.flags,
            merchant_share_bp=body.merchant_share_bp, actor=who.actor)
    return Json(out, status_code=201 if created else 200)


@router.put("/members/{member_id}", responses=ok(A.MemberOut))
def put_member(member_id: CallerId, body: MemberIn, svc: ServicesDep, who: Admin):
    with svc.engine.begin() as conn:
        out, created = registry.put_member(conn, member_id=member_id, district=body.district, status=body.status,
                                           actor=who.actor)
    return Json(out, status_code=201 if created else 200)
