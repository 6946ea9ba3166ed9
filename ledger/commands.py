"""Commands the book executes, and what comes back. Frozen data."""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from typing import Any

import orjson

from ledger.errors import EumError


# An event may be dated a little ahead of the book's clock (a terminal's or the card
# network's clock running fast), no more: the book refuses one dated further ahead, and a
# policy activation must lie beyond this (ledger.policies), so no event is decided before
# the policy in force at its time is known.
FUTURE_SKEW_S = 60
FUTURE_SKEW_US = FUTURE_SKEW_S * 1_000_000
# A simulation's range re-evaluates recorded payments: one starting past
# the latest time an event can be dated has none, and its zeros would read as "costs nothing".
RANGE_IN_FUTURE = ("starts in the future: a simulation re-evaluates recorded payments, and none can be recorded "
                   "after now")


def starts_in_future(from_us: int) -> bool:
    """Whether a range starting at `from_us` lies wholly past what the book can hold
    (events dated up to FUTURE_SKEW_S ahead of its clock)."""
    return from_us > time.time_ns() // 1000 + FUTURE_SKEW_US


def request_hash(kind: str, body: dict[str, Any]) -> str:
    """Fingerprint of a request for idempotency: same id + same hash = a replay."""
    return hashlib.sha256(kind.encode() + b"\0" + orjson.dumps(body, option=orjson.OPT_SORT_KEYS)).hexdigest()


@dataclass(frozen=True, slots=True)
class TopUp:
    topup_id: str
    member_id: str
    amount_won: int
    occurred_at_us: int
    request_hash: str
    kind = "topup"

    @property
    def key(self) -> str:
        return self.topup_id


@dataclass(frozen=True, slots=True)
class Withdraw:
    """Take back the member's charged money left (잔액 환불), all of it, once the policy's
    share of the charged money put in since the last withdrawal has been used.
    `amount_won`: what the member was shown and confirmed (None: whatever is left)."""

    withdrawal_id: str
    member_id: str
    amount_won: int | None
    occurred_at_us: int
    request_hash: str
    kind = "withdrawal"

    @property
    def key(self) -> str:
        return self.withdrawal_id


@dataclass(frozen=True, slots=True)
class Pay:
    payment_id: str
    member_id: str
    merchant_id: str
    amount_won: int
    occurred_at_us: int
    request_hash: str
    kind = "payment"

    @property
    def key(self) -> str:
        return self.payment_id


@dataclass(frozen=True, slots=True)
class Refund:
    refund_id: str
    payment_id: str
    amount_won: int
    occurred_at_us: int
    request_hash: str
    kind = "refund"

    @property
    def key(self) -> str:
        return self.refund_id


@dataclass(frozen=True, slots=True)
class Disburse:
    disbursement_id: str
    program_id: str
    member_id: str
    amount_won: int
    occurred_at_us: int
    request_hash: str
    actor: str | None = None  # who disbursed it (not part of the request: a resend by another is a replay)
    kind = "disbursement"

    @property
    def key(self) -> str:
        return self.disbursement_id


@dataclass(frozen=True, slots=True)
class ExpireLot:
    """Return what is left of a member's grant lot to the program's funders, once the
    program has ended. Idempotent by state: an empty lot returns nothing."""

    program_id: str
    member_id: str
    occurred_at_us: int
    request_hash: str = ""
    kind = "expiry"

    @property
    def key(self) -> str:
        return f"{self.program_id}/{self.member_id}"


@dataclass(frozen=True, slots=True)
class Correct:
    """Post one approved member-month line of a correction: extra cashback (positive
    amounts) or a clawback (negative), by funder and component. `payments` is the line
    per payment, (payment_id, refunded_won the plan saw, ((component_id, funder, won),
    ...), corrections the payment had then or None, the right policy's base: (counts
    toward the month, (balances it earns cashback on, ...)) or None): posting re-bases
    each payment's cashback on it, and its base and its month's eligible spend on the
    right policy's (None: planned before migration 0017, left as they were), and refuses
    the line if a payment has been corrected since (None: planned before migration 0015,
    not checked); empty for a line proposed before they were recorded (migration 0014).
    `planned_at_us`: the line is refused if its member-month has an approved payment
    recorded since then that is not one of `payments`, or a refund recorded since then
    of a payment that is not one of them (None: not checked); `planned_txn_id`: the
    highest ledger transaction id the plan saw: one of those above it was recorded since,
    whatever its stamp says (a clock stepped back; None: by the time alone)."""

    line_id: str
    member_id: str
    month: str
    by_funder: tuple[tuple[str, int], ...]
    by_component: tuple[tuple[str, int], ...]
    occurred_at_us: int
    request_hash: str
    payments: tuple[tuple[str, int, tuple[tuple[str, str, int], ...], int | None,
                          tuple[bool, tuple[str, ...]] | None], ...] = ()
    planned_at_us: int | None = None
    planned_txn_id: int | None = None
    kind = "correction"

    @property
    def key(self) -> str:
        return self.line_id


Command = TopUp | Pay | Refund | Disburse | ExpireLot | Correct | Withdraw


@dataclass(frozen=True, slots=True)
class Outcome:
    """A command's answer: the stored response body, or a business error."""

    body: dict[str, Any] | None = None
    replayed: bool = False
    error: EumError | None = None
    raw: bytes | None = None  # `body` as the JSON stored in the book (the answer's exact bytes)
    # A replay of what this batch's own earlier attempt committed, unseen (its connection
    # broke during the COMMIT): new to the book's counters, a replay to the client.
    own_commit: bool = False

    @property
    def ok(self) -> bool:
        return self.error is None
