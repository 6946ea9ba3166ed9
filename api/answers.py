"""The answers of the HTTP contract, for `/openapi.json` (what a client is generated
from). The routes build their bodies as plain dicts and send them with orjson
(`api.responses.Json`), so these models document, they do not filter: the tests check
every 2xx body the suite receives against its route's schema (`tests/conftest.py`), so
a field renamed in the code and not here fails there. Fields not named here may be
added; a client must ignore what it does not know.

Money is whole won (JSON integers); times are RFC 3339 text with the Seoul offset."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from ledger.queries import PAYMENT_REFUNDS_SHOWN
from rules.evaluate import DECLINE_CODES

Time = Annotated[str, Field(json_schema_extra={"format": "date-time"})]  # RFC 3339, Seoul offset
DeclineCode = Annotated[str | None, Field(description="why a top-up, payment or withdrawal was declined: one of "
                                                      + ", ".join(f"`{c}`" for c in DECLINE_CODES)
                                                      + " (more may be added)")]


class Answer(BaseModel):
    """Documented fields; more may be present."""

    model_config = ConfigDict(populate_by_name=True)


# ---------------------------------------------------------------- card app


class GrantLot(Answer):
    program_id: str
    amount: int
    expires_at: Time


class Balances(Answer):
    charged: int
    points: int
    grants: list[GrantLot]


class Spent(Answer):
    grants: int
    points: int
    charged: int


class BudgetNamed(Answer):
    source: str
    period: str = Field(description="YYYY-MM (a month's limit) or YYYY (the year's)")


class CashbackLine(Answer):
    rule: str
    component: str
    band: int
    rate_bp: int
    base: int
    amount: int
    funded_by: dict[str, int] = Field(description="won per funding source: national, city, a district, merchant")
    reason: str | None = Field(None, description="why the line pays less than its rate, when it does")
    short_of: list[BudgetNamed] | None = Field(
        None, description="with reason budget_partial or budget_skip: the budgets that were short, each the "
                          "tighter of its source's month and year limits (absent otherwise, and in answers "
                          "recorded before this field existed)")


class CashbackWhy(Answer):
    """One reason the cashback is less than the rate × the amount that no line's `reason`
    gives (docs/design.md, "Why less"). Which fields come with it depends on `code`."""

    code: str = Field(description=(
        "`beyond_last_band`: the month's eligible spend passes the last band of `component` "
        "(a cap of monthly spend, e.g. 50만), and `base` won of this payment's base lie beyond it "
        "(`spend_up_to`: where the band ends), earning nothing from that component; "
        "`not_eligible`: the policy's `cashback_eligibility` does not hold (`condition`: the first "
        "of its fields that fails, e.g. `merchant_sales_max_won` for a merchant above 30억): "
        "nothing the payment spent earns or counts toward the month, the one entry then; "
        "`not_earning_money`: `amount` won was spent from a `balance` (`points`, `grants` per "
        "`program_id`, `charged`) that earns no cashback under the policy or the grant program: "
        "outside `cashback.base`. More codes may be added; a client must ignore one it does not know"))
    component: str | None = Field(None, description="beyond_last_band: the component (as in a line's `component`)")
    base: int | None = Field(None, description="beyond_last_band: won of the payment's base past the last band")
    spend_up_to: int | None = Field(None, description="beyond_last_band: the month's eligible spend up to which "
                                                      "the component earns (its last band's upper bound)")
    condition: str | None = Field(None, description="not_eligible: the field of the policy's "
                                                    "`cashback_eligibility` that does not hold")
    balance: Literal["grants", "points", "charged"] | None = Field(
        None, description="not_earning_money: the balance the money came from")
    program_id: str | None = Field(None, description="not_earning_money from grants: the grant program")
    amount: int | None = Field(None, description="not_earning_money: won spent outside the base")


class Cashback(Answer):
    amount: int
    base: int
    components: list[CashbackLine]
    # Not required: a payment recorded by a release before it replays its first answer
    # byte for byte, without the field (read as []).
    why: list[CashbackWhy] | None = Field(None, description=(
        "why the cashback is less than the rate × the amount where no line's `reason` says so: "
        "[] when declined, or when every won of the amount is base and earns in a band; absent in "
        "answers recorded before this field existed (read as [])"))


class SpentGrant(Answer):
    program_id: str
    amount: int


class Judged(Answer):
    """A top-up or payment judged by the policy in force at its `occurred_at`."""
    member_id: str
    amount: int
    occurred_at: Time
    status: Literal["approved", "declined"]
    decline_code: DeclineCode = None
    policy_id: str | None


class Decision(Judged):
    """A top-up or payment judged, with the member's balances just after it: a write's answer."""
    balances: Balances


class TopupOut(Decision):
    topup_id: str


class Payment(Judged):
    """A payment as it was answered, but for the member's balances just after it."""
    payment_id: str
    merchant_id: str
    spent: Spent
    spent_grants: list[SpentGrant]
    cashback: Cashback


class PaymentOut(Payment, Decision):
    # The POST's answer: a payment and the balances after it. GET /v1/payments/{id}
    # shares the payment's fields (`Payment`), not the balances then (`PaymentRead`).
    pass


class WithdrawalOut(Answer):
    """A withdrawal of the member's unspent charged money, judged by the policy in force at
    its `occurred_at` (docs/design.md, "Withdrawals")."""
    withdrawal_id: str
    member_id: str
    status: Literal["approved", "declined"]
    decline_code: DeclineCode = None
    amount: int = Field(description="won withdrawn: all the charged money that was left; 0 when declined")
    # Not required: answers recorded before withdrawals settled what is owed have neither.
    owed_settled: int | None = Field(None, description="of `amount`, what settled what the member owed (cashback a "
                                                       "refund or a correction took back that they no longer "
                                                       "held: the balance's `owed`); 0 when nothing was owed")
    paid_out: int | None = Field(None, description="of `amount`, what is paid out to the member: `amount` less "
                                                   "`owed_settled`")
    amount_requested: int | None = Field(description="the `amount` sent, if any")
    occurred_at: Time
    policy_id: str | None
    charged_in: int = Field(description="charged money put in since the last withdrawal: top-ups, and what "
                                        "refunds of payments made before it restored")
    used: int = Field(description="of it, what was used: charged_in less the charged money left")
    used_share_bp: int = Field(description="used × 10000 / charged_in, floored (0 when nothing was put in)")
    used_share_min_bp: int | None = Field(description="the least share the policy asks for (none without a "
                                                      "policy in force; with nothing put in, the share it asks "
                                                      "of more than 1만)")
    balances: Balances


class ClawbackDetail(Answer):
    from_points: int
    withheld_from_charged: int
    # Not required, as `not_recovered` below.
    withheld_from_grants: int | None = Field(None, description="kept back from the grant money this refund "
                                                               "restored to the member's lots (what points and "
                                                               "the charged money restored did not cover); "
                                                               "absent in answers recorded before this field "
                                                               "existed (read as 0)")
    # Not required: a refund recorded by a release before it replays its first answer
    # byte for byte, without the field (0 then).
    not_recovered: int | None = Field(None, description="the payment's clawback still not recovered after this "
                                                        "refund: 0 for refunds recorded since a clawback the "
                                                        "member does not hold is owed (`owed`); a refund "
                                                        "recorded before then gave what it left outstanding on "
                                                        "the payment (a later refund of it takes it), so not a "
                                                        "figure to add up over its refunds; absent in answers "
                                                        "recorded before this field existed (read as 0)")
    # Not required: refunds recorded before it replay their first answer without it.
    owed: int | None = Field(None, description="of the clawback, what the member did not hold (points and money "
                                               "spent, the money restored gone to an ended program's funders): "
                                               "added to what they owe (`receivable/{member}`, GET balance's "
                                               "`owed`), as a correction's clawback beyond what they hold; "
                                               "absent in answers recorded before this field existed (read as 0)")


class RefundedGrant(Answer):
    program_id: str
    amount: int = Field(description="this program's grant money the payment spent that the refund gives back")
    to: Literal["member", "funders"] = Field(description="member: into the member's lot of the program; funders: the "
                                                         "program had ended, so to its funders (`unspent`)")
    withheld: int = Field(description="of `amount`, kept back for the cashback clawback (what points and the charged "
                                      "money restored did not cover); 0 when `to` is funders")


class Refunded(Answer):
    """A refund as it was answered, but for the member's balances just after it."""
    refund_id: str
    payment_id: str
    amount: int
    occurred_at: Time
    restored: Spent
    cashback_clawback: int
    clawback_detail: ClawbackDetail
    owed_settled: int | None = Field(None, description="of what the member owed before (`receivable/{member}`), "
                                                       "what this refund's restorations settled: the points "
                                                       "restored, then the charged money restored, that its "
                                                       "clawback left (never grant money, nor more than was "
                                                       "owed); `restored` is before it. Absent in answers "
                                                       "recorded before this field existed (read as 0)")
    returned_to_funders: int
    # Not required, as owed_settled: a refund recorded before it replays its answer as it was.
    grants: list[RefundedGrant] | None = Field(
        None, description="the grant money given back, program by program (none when the payment spent none): "
                          "`restored.grants` is the sum of `amount - withheld` of those to the member, "
                          "`returned_to_funders` the sum of `amount` of those to the funders; absent in answers "
                          "recorded before this field existed")
    payment_refunded_total: int


class RefundOut(Refunded):
    balances: Balances


class RefundRecord(Refunded):
    recorded_at: Time


class RefundedSoFar(Answer):
    """A payment's refunds added up: each field the sum of theirs (as each was answered),
    but `clawback_detail.not_recovered`."""
    amount: int
    restored: Spent
    returned_to_funders: int
    cashback_clawback: int
    owed_settled: int | None = Field(None, description="what the payment's refunds settled of what the member "
                                                       "owed, summed")
    clawback_detail: ClawbackDetail = Field(description=(
        "from_points, withheld_from_charged, withheld_from_grants, owed: summed over the refunds; not_recovered: what "
        "of the clawback its refunds so far owe the payment is still not recovered now, the member not holding "
        "it (a later refund of the payment, if any of it is left to refund, takes it first if the member then "
        "holds it; a payment refunded whole keeps it outstanding: docs/design.md, Refunds)"))


class CashbackNow(Answer):
    """The cashback a payment carries now: as answered, less what its refunds clawed back,
    as the corrections posted on it re-based it. What its funders pay for it, credited to
    the member as points when earned (which may since have been spent); a refund of the
    rest of the payment claws back all of it the member then holds (docs/design.md,
    Refunds)."""
    amount: int
    by_component: dict[str, int] = Field(description="won per component (a cashback line's `component`)")
    by_funder: dict[str, int] = Field(description="won per funding source: national, city, a district, merchant")
    corrections: list[str] = Field(description="the corrections that re-based the payment's cashback, in the "
                                               "order posted (`GET /v1/corrections/{correction_id}`)")


class PaymentRead(Payment):
    """A payment as first answered (the POST's answer but its `balances`, which were the
    member's just after it; `GET /v1/members/{member_id}/balance` has them now), and as
    it stands now: what its refunds gave back and clawed back, what is left to refund,
    the cashback the member holds for it, and its refunds (docs/design.md, "Reading a
    payment back")."""
    recorded_at: Time
    refunded: RefundedSoFar
    refundable: int = Field(description="won of the payment that may still be refunded: 0 when declined")
    cashback_now: CashbackNow
    refunds: list[RefundRecord] = Field(description="the payment's refunds in the order the book recorded them, as "
                                                    "each was answered but its balances: all of them up to "
                                                    f"{PAYMENT_REFUNDS_SHOWN}, else the first {PAYMENT_REFUNDS_SHOWN} "
                                                    "(the rest: refunds_next_cursor)")
    refund_count: int = Field(description="how many refunds the payment has; `refunded` adds up all of them")
    refunds_next_cursor: str | None = Field(description="null when `refunds` holds them all; else the cursor of "
                                                        "GET /v1/payments/{payment_id}/refunds for the rest")


class RefundsPage(Answer):
    items: list[RefundRecord] = Field(description="refunds in the order the book recorded them, each as "
                                                  "GET /v1/payments/{payment_id} shows it")
    next_cursor: str | None


class MonthSoFar(Answer):
    month: str
    cashback_eligible_spend: int
    cashback_earned: int
    topped_up: int
    cashback_by_component: dict[str, int]


class BalanceOut(Answer):
    member_id: str
    balances: Balances
    owed: int = Field(description="won a correction or a refund took back that the member no longer held (points "
                                  "and charged money both spent), less what later corrections, refunds and "
                                  "withdrawals settled: owed to the operator, 0 when nothing is")
    month: MonthSoFar


class BalanceChanges(Answer):
    charged: int
    points: int
    grants: int
    owed: int = Field(description="what the transaction added to what the member owes (a correction's or a "
                                  "refund's clawback beyond what they held; negative: what it settled, as a "
                                  "later correction, refund or withdrawal does)")


class TransactionItem(Answer):
    transaction_id: int
    kind: str = Field(description="topup, payment, cashback, refund, clawback, withdrawal, grant, grant_expiry, "
                                  "correction (more may be added)")
    ref: str
    merchant_id: str | None
    occurred_at: Time
    recorded_at: Time
    balance_changes: BalanceChanges


class TransactionsOut(Answer):
    items: list[TransactionItem]
    next_cursor: str | None


# ---------------------------------------------------------------- registry


class MerchantOut(Answer):
    merchant_id: str
    name: str
    district: str
    category: str
    annual_sales: int
    registered_from: str
    flags: list[str]
    merchant_share_bp: int


class MemberOut(Answer):
    member_id: str
    district: str
    status: Literal["active", "suspended"]


class MerchantRecord(MerchantOut):
    updated_at: Time = Field(description="when the record last changed")


class MerchantsOut(Answer):
    items: list[MerchantRecord]
    next_after: str | None = Field(description="pass as `after` for the next page; null on the last page")


class MemberRecord(MemberOut):
    created_at: Time
    updated_at: Time = Field(description="when the district or status last changed")


# ---------------------------------------------------------------- policy staff


class PolicyWarning(Answer):
    """A category or flag a condition names that no registered merchant carries now
    (free text in the registry: a misspelt one matches nothing), or a variant listed
    after its component's catch-all, which never applies (`name`: the variant's id)."""

    path: str = Field(description='where in the document, e.g. "cashback_eligibility.categories_exclude[0]"')
    name: str
    reason: str


class PolicyStep(Answer):
    policy_id: str
    status: Literal["draft", "approved", "scheduled", "active", "withdrawn"]
    effective_from: str | None = None
    was: str | None = Field(None, description="withdraw: the status it was withdrawn from")
    warnings: list[PolicyWarning] | None = Field(None, description="create: categories and flags the document's "
                                                                   "conditions name that no merchant carries, and "
                                                                   "variants listed after a catch-all (never applied)")


class PolicySummary(Answer):
    policy_id: str
    name: str | None
    layer: str
    status: Literal["draft", "approved", "scheduled", "active", "superseded", "withdrawn"]
    origin: Literal["file", "api"]
    author: str
    approver: str | None
    effective_from: str | None
    supersedes: str | None
    created_at: str


class PoliciesOut(Answer):
    policies: list[PolicySummary]


class PolicyOut(PolicySummary):
    document: dict = Field(description="the policy document (schema: GET /v1/policies/schema)")
    diff: str = Field(description="unified diff against the policy it supersedes, else the layer's policy in "
                                  "force just before it starts (a draft without a date: in force now)")
    warnings: list[PolicyWarning] = Field(description="categories and flags the document's conditions name that "
                                                      "no merchant in the registry carries now, and variants "
                                                      "listed after a catch-all (never applied)")


class BudgetOutlookRow(Answer):
    """A funder budget the simulated range touches, with the range's cashback replaced
    by the draft's (docs/design.md, "The budget outlook")."""

    source: str
    period: str
    limit: int | None = Field(description="as GET /v1/budgets; null: no limit set (not limited)")
    committed: int = Field(description="what the book has committed against it now, as GET /v1/budgets")
    range_held_won: int = Field(description="what the range's payments hold for this source and period "
                                            "(the part of `committed` the draft replaces)")
    # Not required: a report made before it (none is stored, but the model is shared) reads as range_held_won.
    range_actual_won: int | None = Field(None, description=(
        "the range's cashback for this source and period under the policies in force, as the preview evaluates "
        "them (actual_basis): what the payments hold, or beside the policies in force re-evaluated, that"))
    range_simulated_won: int = Field(description="the draft's cashback for this source and period over the range")
    simulated_committed: int = Field(description="committed - range_actual_won + range_simulated_won")
    over_limit_won: int = Field(description="how far simulated_committed passes the limit; 0 within it or with none")
    runs_out_on: str | None = Field(description=(
        "the first day of the range on which the period's other commitments plus the draft's cashback through "
        "that day pass the limit; null when not within the range"))


class SimulationOut(Answer):
    range: dict[str, str]
    policy_ids: list[str]
    totals: dict[str, int] = Field(description="simulated_won, actual_won, delta_won")
    by_component: list[dict]
    by_funder: list[dict]
    by_merchant_district: list[dict]
    by_merchant_tier: list[dict]
    members: dict[str, int]
    member_differences: list[dict]
    member_differences_truncated: bool
    payments: dict[str, int]
    recorded: dict
    points_feedback: dict[str, int | bool] = Field(description=(
        "modelled (true: the figures include it), members, payments, points_won, rate_bp, unresolved_payments, "
        "bound_won: the later payments whose split of points and charged money the draft's cashback (paid as "
        "points) changes, re-split and evaluated so; the payments the preview cannot re-split (a cut, paid with "
        "points alone) and how far they may put the figures off; declined_payments, declined_points_won: payments "
        "the draft declines that spent points in the book, modelled: their points stay with the member and pay "
        "part of later payments; insufficient_payments: the range's payments the book declined for want of money, "
        "which the draft's points may have paid, not modelled; declined_grant_payments, declined_grants_won: "
        "payments the draft declines that spent grant money in the book, not modelled: under the draft it stays "
        "in the member's lots and pays later payments first (docs/design.md, the kept split)"))
    budget_outlook: list[BudgetOutlookRow] = Field(description=(
        "each funder budget (month and year) the range touches, with the range's cashback replaced by the draft's; "
        "budgets are still not applied to the simulated payments"))
    notes: list[str]


class CorrectionOut(Answer):
    correction_id: str
    status: str
    wrong_policy_id: str
    right_policy_id: str
    from_: str = Field(alias="from")
    to: str
    author: str
    approver: str | None
    summary: dict[str, int] = Field(description=(
        "payments, payments_changed, payments_already_corrected, members, lines, wrong_won, right_won, "
        "recorded_won, held_won, extra_won, clawback_won, recorded_mismatch_payments (docs/design.md, "
        "Corrections)"))
    lines: list[dict]


class AuditEntry(Answer):
    entry_id: int
    at: str
    actor: str
    action: str
    object_type: str
    object_id: str
    detail: dict
    prev_hash: str
    entry_hash: str
    chain: str | None = Field(description="the kind of link: null (legacy, before migration 0011), \"v2\", or "
                                          "\"v2:<key id>\" (an HMAC under that audit key)")


class AuditLogOut(Answer):
    items: list[AuditEntry]
    next_after: int | None


# ---------------------------------------------------------------- grants and budgets


class ProgramOut(Answer):
    program_id: str
    name: str
    status: Literal["draft", "open", "expired"]
    valid_from: str
    valid_until: str
    funding: dict[str, int]


class ProgramMoney(Answer):
    disbursed: int
    held_by_members: int
    spent_net_of_refunds: int
    returned_to_funders: int
    funders_net: dict[str, int]


class ProgramDetailOut(Answer):
    program_id: str
    name: str
    status: Literal["draft", "open", "expired"]
    valid_from: str
    valid_until: str
    document: dict
    money: ProgramMoney


class ProgramsOut(Answer):
    grant_programs: list[dict]


class DisbursementOut(Answer):
    disbursement_id: str
    program_id: str
    member_id: str
    amount: int
    status: Literal["disbursed"]
    balances: Balances


class BulkError(Answer):
    line: int
    disbursement_id: str | None
    error: str


class BulkDisbursementOut(Answer):
    rows: int
    disbursed: int
    replayed: int
    amount: int
    error_count: int
    errors: list[BulkError]
    seconds: float


class ExpiryOut(Answer):
    program_id: str
    lots_expired: int
    returned: int
    returned_by_funder: dict[str, int]


class BudgetOut(Answer):
    source: str
    period: str
    limit: int | None
    committed: int
    remaining: int | None


class PendingBudgetRequest(Answer):
    request_id: str
    amount: int
    requested_by: str


class BudgetRow(BudgetOut):
    used_bp: int | None
    forecast_exhausted_on: str | None
    payable: int | None = Field(description="what the source can still pay in this period: for a month, the tighter "
                                            "of its own remaining and its year's (the book pays the tighter of the "
                                            "two limits); for a year, its remaining; null when neither is set")
    payable_exhausted_on: str | None = Field(description="the day `payable` reaches 0 at the recent burn: the earlier "
                                                         "of this row's `forecast_exhausted_on` and, for a month, its "
                                                         "year's when that falls in the month")
    pending_request: PendingBudgetRequest | None = Field(
        None, description="the request for a new limit waiting for a second person "
                          "(POST /v1/budget-requests/{request_id}/approve); null: none")


class BudgetsOut(Answer):
    budgets: list[BudgetRow]


class BudgetRequestOut(Answer):
    """A budget limit asked for by one person, set when a different person approves it."""

    request_id: str
    source: str
    period: str
    amount: int = Field(description="the limit asked for, won")
    limit_before: int | None = Field(description="the limit it replaces (null: none set); approving it after the "
                                                 "limit changed is 409 budget_changed_since_request")
    reason: str | None
    status: Literal["pending", "approved", "withdrawn"]
    requested_by: str
    requested_at: Time
    decided_by: str | None = Field(description="who approved or withdrew it")
    decided_at: Time | None
    committed: int | None = Field(None, description="on the request's answer: what the budget has committed now")
    budget: BudgetOut | None = Field(None, description="on the approval's answer: the budget as set")


class BudgetRequestsOut(Answer):
    items: list[BudgetRequestOut]
    next_after: str | None = Field(description="request_id to pass as `after` for the next page; null on the last")


# ---------------------------------------------------------------- finance


class Check(Answer):
    name: str
    ok: bool
    detail: str


class SettlementOut(Answer):
    settlement_id: str
    business_date: str
    version: int
    kind: Literal["day", "adjustment", "correction"]
    status: Literal["settled", "failed", "reopened", "superseded"]
    payout_date: str
    watermark_us: int
    prev_watermark_us: int | None
    checks: list[Check]
    totals: dict = Field(description="per business date covered (`dates`) and for the run (`run`): counts, sales, "
                                     "fees, merchant share, net payable, cashback by source, grants, "
                                     "grants_by_source and operator_cash (top-ups in, withdrawals out); the "
                                     "funder, grant, grant-funder and operator-cash flow rows. A correction's are "
                                     "what it pays (the differences); the whole day recomputed is beside them as "
                                     "`recomputed` (`dates`, `run`)")


class SettlementListItem(Answer):
    settlement_id: str
    business_date: str
    version: int
    kind: str
    status: str
    payout_date: str
    checks: list[Check]


class SettlementsOut(Answer):
    items: list[SettlementListItem]
    next_after: str | None = Field(description="pass as `after` for the next page; null on the last page")


class PayoutRow(Answer):
    merchant_id: str
    for_business_date: str
    kind: str
    payout_date: str
    payment_count: int
    refund_count: int
    sales_won: int
    refunds_won: int
    net_sales_won: int
    fee_bp: int
    fee_won: int
    merchant_share_won: int
    net_payable_won: int


class PayoutsOut(Answer):
    settlement_id: str
    count: int
    items: list[PayoutRow]


class ReopenOut(Answer):
    request_id: str
    settlement_id: str
    status: str
    requested_by: str
    approved_by: str | None = None


class ReconciliationRun(Answer):
    run_by: str = Field(description="who ran it: the key's holder and key id, or the OS account and `eum cli`")
    created_at: Time
    file_sha256: str = Field(description="SHA-256 of the file's bytes as sent, hex")
    file_bytes: int


class ReconciliationAmounts(Answer):
    clearing_won: int = Field(description="the file's amounts in the category's rows, purchases and refunds alike")
    ledger_won: int = Field(description="the ledger's amounts in the category's rows")


class ReconciliationOut(Answer):
    reconciliation_id: str = Field(description="the run, stored: `GET /v1/reconciliations/{id}` reads it back "
                                               "(its matched rows are not kept) and the reports show the latest "
                                               "run of each business date")
    run: ReconciliationRun
    amounts: dict[str, ReconciliationAmounts] = Field(description="per category, every row's, listed or not")
    counts: dict[str, int]
    facts: dict
    rows_truncated: dict[str, bool] = Field(description="per category: more rows than rows_max were found")
    matched: list[dict]
    missing_in_ledger: list[dict]
    missing_in_clearing: list[dict]
    amount_mismatch: list[dict]
    merchant_mismatch: list[dict]
    duplicates: list[dict]
    late: list[dict] = Field(description="matched by id, amount and merchant, but on another Asia/Seoul business "
                                         "date than the ledger's payment or refund: both times and both dates")


class ReconciliationListItem(ReconciliationRun):
    reconciliation_id: str
    business_dates: list[str]
    counts: dict[str, int]
    amounts: dict[str, ReconciliationAmounts]


class ReconciliationsOut(Answer):
    items: list[ReconciliationListItem]
    next_after: str | None = Field(description="pass as `after` for the next page; null on the last page")


REPLAY_HEADER = {"Idempotent-Replayed": {"description": "`true` on a replay: the stored answer of the first "
                                                        "request with this id", "schema": {"type": "string"}}}


REPLAYED = "a resend of an id already written: the first answer, unchanged"


def ok(model: type[Answer], status: int = 200, description: str = "", resend: str | None = REPLAYED,
       created: str | None = None) -> dict:
    """`responses=` for a route: its success answer (errors: `api.access.install_openapi`).
    A 201 route (a write with a caller's id) answers a resend 200 as `resend` says (by
    default the stored answer); `resend=None` for one whose resend is a 409 problem (it
    had been documented as a 200 replay all the same: the contract audit). `created`: a
    200 route that answers 201 when it creates (a registry PUT; undocumented before)."""
    out = {status: {"model": model, "description": description or model.__doc__ or "OK"}}
    if status == 201 and resend is not None:
        out[200] = {"model": model, "headers": REPLAY_HEADER, "description": resend}
    if created is not None:
        out[201] = {"model": model, "description": created}
    return out
