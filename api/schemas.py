"""Request bodies of the HTTP contract (API.md). Strict: a won amount is a JSON
integer (not 1.0, not "1", not true); a time carries its UTC offset; unknown fields
are refused so that a typo is an error, not a silent default."""

from __future__ import annotations

import datetime as dt
import re
import unicodedata
from typing import Annotated, Literal

from pydantic import (AfterValidator, AwareDatetime, BaseModel, BeforeValidator, ConfigDict, Field, StrictInt,
                      StrictStr, StringConstraints, ValidationError, WrapValidator, field_validator, model_validator)

from ledger.keys import invisible
from rules.document import CALLER_ID_PATTERN, DISTRICTS, NO_CONTROLS, TEXT_CHARS, District, NameText, shown_char
from rules.timeutil import RFC3339_PATTERN, in_range_text, in_span, time_text, to_the_microsecond

AMOUNT_WON_MAX = 10**12
MERCHANT_SHARE_BP_MIN, MERCHANT_SHARE_BP_MAX = 100, 500
CallerId = Annotated[str, StringConstraints(min_length=1, max_length=64, pattern=CALLER_ID_PATTERN)]
AmountWon = Annotated[int, Field(strict=True, ge=1, le=AMOUNT_WON_MAX)]
LimitWon = Annotated[int, Field(strict=True, ge=0, le=AMOUNT_WON_MAX)]  # 0: nothing may be spent
Period = Annotated[str, StringConstraints(pattern=r"^20[0-9]{2}(-(0[1-9]|1[0-2]))?$")]  # the book's span
# Why a registry entry or a budget changed, kept in its audit-log entry (who and when are).
Reason = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=500, pattern=TEXT_CHARS)]
Source = Literal["national", "city", "merchant", "jung", "dong", "michuhol", "yeonsu", "namdong",
                 "bupyeong", "gyeyang", "seo", "ganghwa", "ongjin"]

assert len(DISTRICTS) == 10

_RFC3339 = re.compile(RFC3339_PATTERN)


def _rfc3339_text(value: object) -> object:
    """Only RFC 3339 text: pydantic alone also takes Unix timestamps (1757905200 or
    "1757905200") and would read them as UTC seconds or milliseconds by their size; and
    none finer than the book keeps (pydantic cuts it to the microsecond)."""
    if isinstance(value, dt.datetime) or (isinstance(value, str) and _RFC3339.fullmatch(value)):
        return to_the_microsecond(value)
    raise ValueError("a time is RFC 3339 text with an offset, e.g. 2026-11-21T12:30:00+09:00")


def _field_named_when_refused(value: object, handler):
    """The time as parsed; when it is refused, the field out of range named if one is
    (`in_range_text`: a leap second, an offset of +24:00, hour 25). Only on the refusal:
    every payment's `occurred_at` comes this way, and the check cost ~2 µs each."""
    try:
        return handler(value)
    except ValidationError:
        in_range_text(value)
        raise


Rfc3339Time = Annotated[AwareDatetime, BeforeValidator(_rfc3339_text), WrapValidator(_field_named_when_refused),
                        AfterValidator(in_span)]


_ISO_DATE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")


def _date_text(value: object) -> object:
    """Only `YYYY-MM-DD`: pydantic alone also reads 1764547200 or "1764547200" as Unix
    seconds and a midnight datetime as its date, and a date settles or registers for good."""
    if (isinstance(value, dt.date) and not isinstance(value, dt.datetime)) or (
            isinstance(value, str) and _ISO_DATE.fullmatch(value)):
        return value
    raise ValueError("a date is YYYY-MM-DD text, e.g. 2026-11-21")


# In the span of every date and time the API takes (a merchant registered in year 1 or
# 9999 was stored, the fuzz audit).
IsoDate = Annotated[dt.date, BeforeValidator(_date_text), AfterValidator(in_span)]


def _not_a_bare_date(value: object) -> object:
    """A time, not a date alone: pydantic answers `2026-12-01` with "Input should have
    timezone info", which reads as if an offset were missing from a time sent. `eum policy
    simulate --from 2026-12-01` takes the date as Seoul midnight, so a client following the
    README sent the same to `POST /v1/policies/{id}/simulate` and was told that."""
    if isinstance(value, str) and _ISO_DATE.fullmatch(value.strip()):
        raise ValueError(f"{value.strip()} is a date; a time is wanted here, with its offset: "
                         f"{value.strip()}T00:00:00+09:00 is the start of that day in Seoul")
    return value


# A time that may be given as any ISO form pydantic reads (staff-facing bodies and
# queries), in the same span; never a bare number, nor finer than a microsecond, nor a
# date alone (its day's start in which zone is not said).
SpanTime = Annotated[AwareDatetime, BeforeValidator(time_text), BeforeValidator(_not_a_bare_date),
                     AfterValidator(in_span)]


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TopupIn(Body):
    topup_id: CallerId
    member_id: CallerId
    amount: AmountWon
    occurred_at: Rfc3339Time


class PaymentIn(Body):
    payment_id: CallerId
    member_id: CallerId
    merchant_id: CallerId
    amount: AmountWon
    occurred_at: Rfc3339Time


class RefundIn(Body):
    refund_id: CallerId
    amount: AmountWon
    occurred_at: Rfc3339Time


class WithdrawalIn(Body):
    withdrawal_id: CallerId
    occurred_at: Rfc3339Time
    amount: AmountWon | None = Field(None, description="the charged money left as the card app showed it to the "
                                                       "member: the withdrawal is declined "
                                                       "(`withdrawal_amount_mismatch`) if what is left differs; "
                                                       "omit to take whatever is left")


def _merchant_name(value: object) -> object:
    """A merchant's name NFC (a macOS client sends Hangul decomposed: 67 syllables were
    201 code points, over the 200 allowed, and an NFD name was stored beside its NFC twin
    as another text; stored NFC, the same PUT again changes nothing), refused naming the
    character NameText's pattern refuses (its refusal quoted the regex), and refused when
    nothing would show: whitespace and invisible characters only."""
    if not isinstance(value, str):
        return value  # str's own refusal
    value = unicodedata.normalize("NFC", value)
    if bad := sorted({c for c in value if not _NAME_CHAR.fullmatch(c)}):  # `$` passes a line feed to .match
        raise ValueError("a name may not hold control characters or bidirectional overrides (found "
                         + ", ".join(map(shown_char, bad)) + ")")
    if value and all(c.isspace() or invisible(c) for c in value):
        raise ValueError("a name may not be blank (only whitespace or invisible characters)")
    return value


_NAME_CHAR = re.compile(NO_CONTROLS)


class MerchantIn(Body):
    name: Annotated[NameText, BeforeValidator(_merchant_name)]
    district: District
    category: Annotated[str, StringConstraints(min_length=1, max_length=64, pattern=r"^[a-z0-9_]+$")]
    annual_sales: Annotated[int, Field(strict=True, ge=0, le=10**15)]
    registered_from: IsoDate
    # Left out: the merchant keeps what is stored (none when new); `[]` clears them.
    flags: Annotated[list[Annotated[str, StringConstraints(pattern=r"^[a-z0-9_]{1,32}$")]],
                     Field(max_length=16)] | None = None
    # 상생 merchants share 1–5% of a payment (DOMAIN.md); 0: no share. Left out: kept.
    merchant_share_bp: Annotated[int, Field(strict=True, ge=0, le=MERCHANT_SHARE_BP_MAX)] | None = None
    reason: Reason | None = None

    @field_validator("merchant_share_bp")
    @classmethod
    def _share(cls, value: int | None) -> int | None:
        if value is not None and 0 < value < MERCHANT_SHARE_BP_MIN:
            raise ValueError(f"a merchant's share is 0 (none) or {MERCHANT_SHARE_BP_MIN}..{MERCHANT_SHARE_BP_MAX} bp "
                             "(1-5%)")
        return value

    @model_validator(mode="after")
    def _kept(self):
        return _no_nulls(self)


def _no_nulls(model: BaseModel) -> BaseModel:
    """A field may be left out (kept as stored), but not sent as null."""
    nulls = sorted(name for name in model.model_fields_set if getattr(model, name) is None)
    if nulls:
        raise ValueError(f"{', '.join(nulls)}: leave the field out to keep what is stored; null is not a value")
    return model


class MemberIn(Body):
    district: District
    status: Literal["active", "suspended"] | None = None  # left out: kept (`active` when new)
    reason: Reason | None = None

    @model_validator(mode="after")
    def _kept(self):
        return _no_nulls(self)


class BudgetIn(Body):
    amount: LimitWon
    reason: Reason | None = None  # e.g. "supplementary budget (추경) 2026-2"


class BudgetRequestIn(BudgetIn):
    """A budget limit asked for: `POST /v1/budget-requests`, set when another person approves."""

    source: Source
    period: Period


class WithdrawIn(Body):
    reason: Reason | None = None


def _nfc_values(attributes: dict | None) -> dict | None:
    """Attribute text NFC, as a recipients file's is read (`ledger.grant_jobs`): a macOS
    client sends Hangul decomposed, and its 일반 was refused as no status the rules name,
    the error showing two strings that look the same, where the same value in a file was
    paid (the review of 2026-12-06i)."""
    if attributes is None:
        return None
    return {key: unicodedata.normalize("NFC", value) if isinstance(value, str) else value
            for key, value in attributes.items()}


class DisbursementIn(Body):
    disbursement_id: CallerId
    member_id: CallerId
    amount: AmountWon | None = Field(None, description="omit to compute it from the program's amount rules")
    attributes: Annotated[dict[str, StrictStr | StrictInt] | None, AfterValidator(_nfc_values)] = Field(
        None, description="recipient attributes for amount rules (text read NFC, as a recipients file's)")
    occurred_at: Rfc3339Time | None = None
