"""Request bodies of the HTTP contract (API.md). Strict: a won amount is a JSON
integer (not 1.0, not "1", not true); a time carries its UTC offset; unknown fields
are refused so that a typo is an error, not a silent default."""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, StringConstraints

from rules.document import DISTRICTS, District

AMOUNT_WON_MAX = 10**12
CallerId = Annotated[str, StringConstraints(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._:-]+$")]
AmountWon = Annotated[int, Field(strict=True, ge=1, le=AMOUNT_WON_MAX)]
LimitWon = Annotated[int, Field(strict=True, ge=0, le=10**15)]
Period = Annotated[str, StringConstraints(pattern=r"^(19|20)[0-9]{2}(-(0[1-9]|1[0-2]))?$")]
Source = Literal["national", "city", "merchant", "jung", "dong", "michuhol", "yeonsu", "namdong",
                 "bupyeong", "gyeyang", "seo", "ganghwa", "ongjin"]

assert len(DISTRICTS) == 10


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TopupIn(Body):
    topup_id: CallerId
    member_id: CallerId
    amount: AmountWon
    occurred_at: AwareDatetime


class PaymentIn(Body):
    payment_id: CallerId
    member_id: CallerId
    merchant_id: CallerId
    amount: AmountWon
    occurred_at: AwareDatetime


class RefundIn(Body):
    refund_id: CallerId
    amount: AmountWon
    occurred_at: AwareDatetime


class MerchantIn(Body):
    name: Annotated[str, StringConstraints(min_length=1, max_length=200)]
    district: District
    category: Annotated[str, StringConstraints(min_length=1, max_length=64, pattern=r"^[a-z0-9_]+$")]
    annual_sales: Annotated[int, Field(strict=True, ge=0, le=10**15)]
    registered_from: dt.date
    flags: Annotated[list[Annotated[str, StringConstraints(pattern=r"^[a-z0-9_]{1,32}$")]], Field(max_length=16)] = []
    merchant_share_bp: Annotated[int, Field(strict=True, ge=0, le=10_000)] = 0


class MemberIn(Body):
    district: District
    status: Literal["active", "suspended"] = "active"


class BudgetIn(Body):
    amount: LimitWon


class DisbursementIn(Body):
    disbursement_id: CallerId
    member_id: CallerId
    amount: AmountWon | None = Field(None, description="omit to compute it from the program's amount rules")
    attributes: dict[str, str | int] | None = Field(None, description="recipient attributes for amount rules")
    occurred_at: AwareDatetime | None = None
