"""Business errors: each carries its HTTP status and a stable machine code."""

from __future__ import annotations


class EumError(Exception):
    status = 400
    code = "bad_request"
    title = "Bad request"

    def __init__(self, detail: str = "", **extra):
        super().__init__(detail or self.title)
        self.detail = detail or self.title
        self.extra = extra


class NotFound(EumError):
    status, code, title = 404, "not_found", "Not found"


class MemberNotFound(NotFound):
    code, title = "member_not_found", "Member not found"


class MerchantNotFound(NotFound):
    code, title = "merchant_not_found", "Merchant not found"


class PaymentNotFound(NotFound):
    code, title = "payment_not_found", "Payment not found"


class ProgramNotFound(NotFound):
    code, title = "grant_program_not_found", "Grant program not found"


class OccurredInFuture(EumError):
    status, code, title = 422, "occurred_at_in_future", "The time is ahead of the book's clock"


class DistrictMismatch(EumError):
    status, code, title = 422, "district_mismatch", "The district sent is not the member's"


class AmountNotComputable(EumError):
    status, code, title = 422, "amount_not_computable", "No amount the program can give"


class Conflict(EumError):
    status, code, title = 409, "conflict", "Conflict"


class IdempotencyConflict(Conflict):
    code, title = "idempotency_conflict", "Same id, different request"


class RefundExceedsPayment(Conflict):
    code, title = "refund_exceeds_payment", "Refund exceeds what is left of the payment"


class RefundBeforePayment(Conflict):
    code, title = "refund_before_payment", "A refund cannot come before its payment"


class WithdrawalBeforeActivity(Conflict):
    code, title = "withdrawal_before_activity", "A withdrawal cannot come before the money it withdraws"


class PaymentNotRefundable(Conflict):
    code, title = "payment_not_refundable", "Only approved payments can be refunded"


class ProgramClosed(Conflict):
    code, title = "grant_program_closed", "Grant program is not open for disbursement"


class AlreadyDisbursed(Conflict):
    code, title = "already_disbursed", "The member has already received this program"


class ProgramNotExpired(Conflict):
    code, title = "grant_program_not_expired", "Grant program has not ended yet"


class BudgetExceeded(Conflict):
    code, title = "budget_exceeded", "The budget cannot cover this"


class CorrectedSincePlanned(Conflict):
    code = "payment_corrected_since_planned"
    title = "A payment of the correction line was corrected since it was planned"


class PaymentsSincePlanned(Conflict):
    code = "payments_recorded_since_planned"
    title = "The correction line's member-month has payments or refunds recorded since it was planned"


class SelfApproval(EumError):
    """Maker-checker: the approver is the author (the same key, or another key under the
    same name). One title for every kind of change; the detail names which."""

    status, code, title = 403, "self_approval", "The author of a change cannot approve it"


class AuthorKeyRevoked(Conflict):
    """Maker-checker: the key the change was made with has been revoked since. Whoever
    held it (a leaked key, a person who left) is no longer vouched for, and the approver
    cannot tell a stolen key's draft from its holder's: made again under a live key, it
    can be approved (the keys audit of 2026-12-06i: a revoked editor's draft policy and
    grant program were approved, and the program paid out)."""

    code, title = "author_key_revoked", "The key the change was made with has been revoked"


class BudgetBelowCommitted(Conflict):
    code, title = "budget_below_committed", "Limit is below what is already committed"


class SecondPersonRequired(EumError):
    status, code, title = 403, "second_person_required", "A different person must approve"


class BudgetRequestNotFound(NotFound):
    code, title = "budget_request_not_found", "Budget request not found"


class BudgetRequestDecided(Conflict):
    code, title = "budget_request_decided", "The budget request is not pending"


class BudgetRequestPending(Conflict):
    code, title = "budget_request_pending", "The budget already has a request waiting for its second person"


class BudgetChangedSinceRequest(Conflict):
    code, title = "budget_changed_since_request", "The budget's limit changed after the request was made"


class Unavailable(EumError):
    """The book of record cannot be reached or did not answer in time. Always sent with
    `Retry-After`; the request may or may not have committed, so the client retries
    with the same id and gets exactly one result (docs/reliability.md)."""

    status, code, title = 503, "service_unavailable", "Service unavailable"

    def __init__(self, detail: str = "", retry_after_s: int = 1, **extra):
        super().__init__(detail, **extra)
        self.retry_after_s = retry_after_s


class MemberHeld(Unavailable):
    """A command of the service's batch whose member another transaction holds (another
    worker's batch, a staff job's chunk, a session left open): nothing of it was run. The
    service's writer puts it back in its queue until the member is free or its request
    gives up (`api.batcher`); it is answered so only when the writer stops first."""


class InternalError(EumError):
    """One command met a fault of the engine's own (a bug, or an input the checks let
    through): nothing of it was recorded, and the other commands of its batch were
    written without it. Retrying the same request meets the same fault."""

    status, code, title = 500, "internal_error", "Internal error"


class Overloaded(Unavailable):
    code, title = "overloaded", "Too much work queued; retry shortly"


class RangeTooLarge(EumError, ValueError):
    """A simulation's or a correction's range holds more payments than the job reads
    (`payments_max`): what the job holds in memory grows with them. Nothing was read past
    the count, nothing recorded. A ValueError too, as the simulator raised before it
    was named."""

    status, code, title = 422, "range_too_large", "The range holds more payments than this job reads"


class CorrectionTooLarge(RangeTooLarge):
    """A correction's plan changes more payments than a proposal holds
    (`payments_changed_max`): its lines, a row per payment changed, are kept whole
    until they are written, where the payments read are held one member group at a
    time. Found while planning; nothing proposed. Of `range_too_large`, as its remedy is
    the same: a shorter range (and so its title: one code, one title, docs/design.md
    "Problem codes"; the detail names the bound)."""


class PageTooLarge(EumError):
    status, code, title = 422, "page_size_too_large", "Page size too large"


class SheetTooLarge(EumError):
    status, code, title = 422, "sheet_too_large", "More rows than an xlsx sheet holds"


class WinwinWithoutShare(EumError):
    status, code, title = 422, "winwin_without_share", "A 상생 merchant shares 1-5%"


class PayloadTooLarge(EumError):
    status, code, title = 413, "payload_too_large", "Request body too large"


class BodyTooSlow(EumError):
    status, code, title = 408, "request_timeout", "The request body arrived too slowly"


class UnsupportedMediaType(EumError):
    status, code, title = 415, "unsupported_media_type", "Unsupported media type"
