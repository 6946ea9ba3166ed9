"""Pure rule evaluation: (event, policy, member's month so far, wallet, budgets) -> decision.

No session, no Redis, no clock. Every amount is an int of won; every division floors.
The decision explains itself: each cashback line names its rule, band, rate, base and
funders, and a `reason` when it paid less than rate × base; `why` says what no line can:
the base's part past a component's last band, a payment the policy's eligibility refuses
cashback, and money spent outside the base.
"""

from __future__ import annotations

from rules.compiled import CompiledComponent, CompiledPolicy
from rules.facts import (
    BudgetView,
    CashbackLine,
    GrantLot,
    MonthSoFar,
    PaymentDecision,
    PaymentEvent,
    WEEKDAYS,
    TopupDecision,
    Wallet,
    WithdrawalDecision,
)
from rules.timeutil import month_of, year_of

BP_WHOLE = 10_000

DECLINE_INSUFFICIENT_FUNDS = "insufficient_funds"
DECLINE_MERCHANT_NOT_REGISTERED = "merchant_not_registered"
DECLINE_MERCHANT_CATEGORY = "merchant_category_excluded"
DECLINE_MEMBER_SUSPENDED = "member_suspended"
DECLINE_NO_POLICY = "no_policy_in_force"
DECLINE_TOPUP_BELOW_MIN = "topup_below_minimum"
DECLINE_TOPUP_MONTHLY_MAX = "topup_monthly_limit_exceeded"
DECLINE_NOTHING_TO_WITHDRAW = "nothing_to_withdraw"
DECLINE_WITHDRAWAL_BELOW_USED_SHARE = "withdrawal_below_used_share"
DECLINE_WITHDRAWAL_AMOUNT_MISMATCH = "withdrawal_amount_mismatch"
# `cashback.why` codes (docs/design.md, "Why less"): the month's eligible spend passes a
# component's last band; the policy's cashback_eligibility does not hold; money spent
# from a balance that earns no cashback.
WHY_BEYOND_LAST_BAND = "beyond_last_band"
WHY_NOT_ELIGIBLE = "not_eligible"
WHY_NOT_EARNING = "not_earning_money"
WHY_CODES = (WHY_BEYOND_LAST_BAND, WHY_NOT_ELIGIBLE, WHY_NOT_EARNING)
_NOT_EARNING, _FROM_POINTS = ("code", WHY_NOT_EARNING), ("balance", "points")  # made once: the points entry is common
DECLINE_CODES = (DECLINE_INSUFFICIENT_FUNDS, DECLINE_MERCHANT_NOT_REGISTERED, DECLINE_MERCHANT_CATEGORY,
                 DECLINE_MEMBER_SUSPENDED, DECLINE_NO_POLICY, DECLINE_TOPUP_BELOW_MIN, DECLINE_TOPUP_MONTHLY_MAX,
                 DECLINE_NOTHING_TO_WITHDRAW, DECLINE_WITHDRAWAL_BELOW_USED_SHARE, DECLINE_WITHDRAWAL_AMOUNT_MISMATCH)


def split_floor(amount_won: int, shares_bp: tuple[tuple[str, int], ...], remainder_to: str,
                whole: int = BP_WHOLE) -> dict[str, int]:
    """Split an amount by shares of `whole` (bp by default), flooring each; the remainder
    goes to a named funder."""
    parts = {source: amount_won * bp // whole for source, bp in shares_bp}
    parts[remainder_to] += amount_won - sum(parts.values())
    return parts


def evaluate_topup(amount_won: int, policy: CompiledPolicy | None, month: MonthSoFar, member_status: str) -> TopupDecision:
    if policy is None:
        return TopupDecision("", False, DECLINE_NO_POLICY)
    if member_status != "active":
        return TopupDecision(policy.policy_id, False, DECLINE_MEMBER_SUSPENDED)
    if amount_won < policy.topup_min_won:
        return TopupDecision(policy.policy_id, False, DECLINE_TOPUP_BELOW_MIN)
    if month.topped_up_won + amount_won > policy.topup_monthly_max_won:
        return TopupDecision(policy.policy_id, False, DECLINE_TOPUP_MONTHLY_MAX)
    return TopupDecision(policy.policy_id, True)


def evaluate_withdrawal(charged_won: int, charged_in_won: int, requested_won: int | None,
                        policy: CompiledPolicy | None, member_status: str) -> WithdrawalDecision:
    """Whether a member may take back the charged money left (`charged_won`), all of it:
    once the share used of the charged money put in since the last withdrawal
    (`charged_in_won`: top-ups, and what refunds of payments made before it restored,
    `ledger.book.ChargedIn`) is at least the policy's. Used is what was put in less what
    is left. `requested_won`: the amount the member was shown and confirmed, if sent; the
    money left must be exactly that. Declines in this order: no policy, a suspended card,
    nothing left, too little used, another amount."""
    assert 0 <= charged_won <= charged_in_won, (charged_won, charged_in_won)
    used_bp = (charged_in_won - charged_won) * BP_WHOLE // charged_in_won if charged_in_won else 0
    if policy is None:
        return WithdrawalDecision("", False, DECLINE_NO_POLICY, used_bp=used_bp)
    used_min_bp = policy.withdrawal_used_min_bp_for(charged_in_won)
    declined = None
    if member_status != "active":
        declined = DECLINE_MEMBER_SUSPENDED
    elif charged_won == 0:
        declined = DECLINE_NOTHING_TO_WITHDRAW
    elif used_bp < used_min_bp:  # floored: at least the share iff used × 10000 >= share × put in
        declined = DECLINE_WITHDRAWAL_BELOW_USED_SHARE
    elif requested_won is not None and requested_won != charged_won:
        declined = DECLINE_WITHDRAWAL_AMOUNT_MISMATCH
    if declined is not None:
        return WithdrawalDecision(policy.policy_id, False, declined, 0, used_bp, used_min_bp)
    return WithdrawalDecision(policy.policy_id, True, None, charged_won, used_bp, used_min_bp)


def usable_lots(event: PaymentEvent, wallet: Wallet) -> list[GrantLot]:
    """Grant lots spendable at this merchant now, soonest-expiring first; lots that
    expire at the same instant in program_id order (the contract names no tie order)."""
    if not wallet.lots:
        return []
    merchant = event.merchant
    lots = [
        lot for lot in wallet.lots
        if lot.amount_won > 0 and lot.program.usable(event.occurred_at_us, merchant)
    ]
    lots.sort(key=lambda lot: (lot.program.valid_until_us, lot.program.program_id))
    return lots


def evaluate_payment(
    event: PaymentEvent,
    policy: CompiledPolicy | None,
    month: MonthSoFar,
    wallet: Wallet,
    budgets: BudgetView,
) -> PaymentDecision:
    if policy is None:
        return PaymentDecision("", False, DECLINE_NO_POLICY)
    refusal = _refusal(event, policy)
    if refusal is not None:
        return PaymentDecision(policy.policy_id, False, refusal)
    lots = usable_lots(event, wallet)
    grants_available = sum(lot.amount_won for lot in lots) if lots else 0
    if grants_available + wallet.points_won + wallet.charged_won < event.amount_won:
        return PaymentDecision(policy.policy_id, False, DECLINE_INSUFFICIENT_FUNDS)

    spent_grants, spent_points, spent_charged = _spend(event.amount_won, policy.spend_order, lots, wallet)
    weekday = WEEKDAYS[event.local_date.weekday()]
    eligible = policy.eligibility.holds(event.merchant, event.member, event.local_date, weekday)
    if not eligible:  # nothing the payment spent earns: the one reason, and which condition
        condition = policy.eligibility.first_failing(event.merchant, event.member, event.local_date, weekday)
        return PaymentDecision(policy.policy_id, True, None, tuple(spent_grants), spent_points, spent_charged, 0,
                               False, (), ((("code", WHY_NOT_ELIGIBLE), ("condition", condition)),))
    base = _base(policy, spent_grants, spent_points, spent_charged, lots)
    if base == event.amount_won:
        why = ()
    elif not spent_grants and spent_points == event.amount_won - base and "points" not in policy.cashback_on:
        why = ((_NOT_EARNING, _FROM_POINTS, ("amount", spent_points)),)  # the common case: `_not_earning`, inline
    else:
        why = _not_earning(policy, spent_grants, spent_points, spent_charged, lots)
    if base > 0:
        ends = policy.band_ends_from_won  # below it no last band ends: one comparison on the common path
        if ends is not None and month.eligible_spend_won + base > ends:
            beyond: list = []
            lines = _cashback(event, weekday, policy, month, budgets, base, beyond)
            if beyond:
                why += tuple(beyond)
        else:
            lines = _cashback(event, weekday, policy, month, budgets, base)
    else:
        lines = ()
    # policy_id, approved, decline_code, spent_grants, spent_points_won, spent_charged_won,
    # base_won, counts_toward_month, lines, why (positional: the decision is made per payment)
    return PaymentDecision(policy.policy_id, True, None, tuple(spent_grants), spent_points, spent_charged, base,
                           True, lines, why)


def _refusal(event: PaymentEvent, policy: CompiledPolicy) -> str | None:
    if event.member.status != "active":
        return DECLINE_MEMBER_SUSPENDED
    merchant = event.merchant
    # Registration takes effect from `registered_from` (the day after registering).
    if merchant is None or event.local_date < merchant.registered_from:
        return DECLINE_MERCHANT_NOT_REGISTERED
    if merchant.category in policy.declined_categories:
        return DECLINE_MERCHANT_CATEGORY
    return None


def _spend(amount_won: int, order: tuple[str, ...], lots: list[GrantLot], wallet: Wallet):
    left = amount_won
    spent_grants: list[tuple[str, int]] = []
    spent_points = spent_charged = 0
    for balance in order:
        if left == 0:
            break
        if balance == "grants":
            for lot in lots:
                take = min(left, lot.amount_won)
                if take:
                    spent_grants.append((lot.program.program_id, take))
                    left -= take
                if left == 0:
                    break
        elif balance == "points":
            spent_points = min(left, wallet.points_won)
            left -= spent_points
        else:
            spent_charged = min(left, wallet.charged_won)
            left -= spent_charged
    assert left == 0, "spend split must cover the amount once funds were checked"
    return spent_grants, spent_points, spent_charged


def _base(policy: CompiledPolicy, spent_grants, spent_points: int, spent_charged: int, lots: list[GrantLot]) -> int:
    base = 0
    if "charged" in policy.cashback_on:
        base += spent_charged
    if "points" in policy.cashback_on:
        base += spent_points
    if not spent_grants:
        return base
    cashback_programs = {lot.program.program_id for lot in lots if lot.program.cashback_on_spend}
    for program_id, amount in spent_grants:
        if "grants" in policy.cashback_on or program_id in cashback_programs:
            base += amount
    return base


def _not_earning(policy: CompiledPolicy, spent_grants, spent_points: int, spent_charged: int,
                 lots: list[GrantLot]) -> tuple:
    """`why` entries for the money spent outside the base (`_base`'s complement): per
    balance in the spend order, grant money per program; they add up to the amount less
    the base of an eligible payment."""
    cashback_on = policy.cashback_on
    why = []
    for balance in policy.spend_order:
        if balance == "grants":
            if not spent_grants or "grants" in cashback_on:
                continue
            earning = {lot.program.program_id for lot in lots if lot.program.cashback_on_spend}
            why += [(_NOT_EARNING, ("balance", "grants"), ("program_id", program_id), ("amount", amount))
                    for program_id, amount in spent_grants if program_id not in earning]
        elif balance == "points":
            if spent_points and "points" not in cashback_on:
                why.append((_NOT_EARNING, _FROM_POINTS, ("amount", spent_points)))
        elif spent_charged and "charged" not in cashback_on:
            why.append((_NOT_EARNING, ("balance", "charged"), ("amount", spent_charged)))
    return tuple(why)


def _cashback(event: PaymentEvent, weekday: str, policy: CompiledPolicy, month: MonthSoFar, budgets: BudgetView,
              base: int, beyond: list | None = None):
    """The payment's cashback lines. With `beyond` (a list; given only once the base's span
    of the month passes the policy's least last-band end, `CompiledPolicy.band_ends_from_won`),
    the `why` entries of the components whose last band, of the variant applied, ends
    inside that span are added to it: the part beyond, which that component pays nothing on."""
    periods = None  # the budgets' month and year, when a budget has a limit (`_fund`)
    start, end = month.eligible_spend_won, month.eligible_spend_won + base
    total_room = None
    if policy.monthly_cashback_cap_won is not None:
        total_room = max(0, policy.monthly_cashback_cap_won - month.cashback_won)
    budget_used: dict[str, int] = {}
    lines: list[CashbackLine] = []
    merchant, member, day = event.merchant, event.member, event.local_date
    for component in policy.components:
        for variant in component.variants:  # the first variant whose conditions hold
            if variant.when.holds(merchant, member, day, weekday):
                break
        else:
            continue
        if beyond is not None:
            last = variant.bands[-1].upper_won  # None: open-ended, nothing lies beyond it
            if last is not None and end > last:
                beyond.append((("code", WHY_BEYOND_LAST_BAND), ("component", component.component_id),
                               ("base", end - (start if start > last else last)), ("spend_up_to", last)))
        room = None
        if component.monthly_cashback_cap_won is not None:
            earned = month.component_cashback_won.get(component.component_id, 0)
            room = max(0, component.monthly_cashback_cap_won - earned)
        # A component with on_budget_short: skip is skipped as a whole: a band short of a
        # budget skips its every band (API.md: a component its budget cannot cover in full
        # pays nothing), so its bands are funded on a trial copy of what the payment took.
        # Each band was skipped or paid alone: a 2019 district layer paid its second band
        # from the budget that had skipped its first (read-path audit).
        whole = budgets.remaining_won and component.on_budget_short == "skip" and len(variant.bands) > 1
        used = dict(budget_used) if whole else budget_used
        first, room_before = len(lines), total_room
        for index, band in enumerate(variant.bands, start=1):
            lower = band.lower_won if band.lower_won > start else start
            upper = band.upper_won
            if upper is None or upper > end:
                upper = end
            if upper <= lower:
                continue
            base_in_band = upper - lower
            rate_bp = merchant.merchant_share_bp if band.rate_from_merchant_share else band.rate_bp
            amount = base_in_band * rate_bp // BP_WHOLE
            reason = ""
            if room is not None and amount > room:
                amount, reason = room, "component_cap"
            if total_room is not None and amount > total_room:
                amount, reason = total_room, "total_cap"
            if amount and budgets.remaining_won and periods is None:
                periods = (month_of(day), year_of(day))
            funded, amount, short, short_of = _fund(component, event, amount, budgets, used, periods)
            if short:
                reason = short
            if room is not None:
                room -= amount
            if total_room is not None:
                total_room -= amount
            if rate_bp == 0 and amount == 0 and not reason:
                continue
            lines.append(CashbackLine(variant.rule, component.component_id, index, rate_bp, base_in_band, amount,
                                      funded, reason, short_of))
        if whole:
            mine = lines[first:]
            if any(line.reason == "budget_skip" for line in mine):
                short_of = tuple(dict.fromkeys(pair for line in mine for pair in line.short_of))
                lines[first:] = [line._replace(amount_won=0, funded_by=(), reason="budget_skip", short_of=short_of)
                                 if line.amount_won or line.reason == "budget_skip" else line for line in mine]
                total_room = room_before
            else:
                budget_used.update(used)
    return tuple(lines)


def _fund(component: CompiledComponent, event: PaymentEvent, amount: int, budgets: BudgetView, used: dict[str, int],
          periods: tuple[str, str] | None):
    """Split `amount` among the component's funders and hold it against their budgets
    (`periods`: the event's month and year; needed only when a budget has a limit).

    Returns (funded_by, amount actually paid, shortfall reason or "", the budgets that
    were short: (source, period) of the tighter limit, () when none was)."""
    if amount == 0:
        return (), 0, "", ()
    shares, remainder_to = component.resolved_funding(event.member, event.merchant)
    # `split_floor`, inline (calling it cost ~1 µs of a ~20 µs evaluation on the slowest
    # machine): each share floored, the remainder to one funder; `resolved_funding` gives
    # one share per funder. tests/test_funders.py holds the two equal.
    wanted: dict[str, int] = {}
    left = amount
    whole = component.funding_whole
    for source, share in shares:  # one share per funder (resolved_funding adds them up)
        part = wanted[source] = amount * share // whole
        left -= part
    wanted[remainder_to] += left
    remaining = budgets.remaining_won
    short_of: tuple[tuple[str, str], ...] = ()
    if not remaining:  # no limit set anywhere: every funder pays what it is asked
        granted, paid = wanted, amount
    else:
        month, year = periods
        granted = {}
        paid = 0
        for source, want in wanted.items():  # the tighter of the month's and the year's limits
            by_month, by_year = remaining.get((source, month)), remaining.get((source, year))
            limit = by_year if by_month is None else by_month if by_year is None else min(by_month, by_year)
            if limit is not None:
                room = limit - used.get(source, 0)
                if room < want:  # granted: min(want, max(0, room)); short when that is less than asked
                    got = room if room > 0 else 0
                    if got < want:  # named only here: the short path alone pays for it
                        binding = month if by_month is not None and (by_year is None or by_month <= by_year) else year
                        short_of += ((source, binding),)
                    want = got
            granted[source] = want
            paid += want
    if short_of and component.on_budget_short == "skip":
        return (), 0, "budget_skip", short_of
    funded = []
    for source, got in granted.items():
        used[source] = used.get(source, 0) + got
        if got > 0:
            funded.append((source, got))
    return tuple(funded), paid, "budget_partial" if short_of else "", short_of
