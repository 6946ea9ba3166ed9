"""A Hypothesis state machine against a small reference model of the card-app contract.

The model below is written from API.md and the two policy files, not from the
implementation: members' charged money and points, each member-month's eligible spend,
cashback and top-ups, the budgets, and every recorded request (for replays). Random
top-ups, payments (small, large and rural merchants, excluded categories, unregistered
merchants, suspended and unknown members), partial refunds, replays of earlier ids with
the same and with a different body, budget changes and bad requests run against the
real app, and withdrawals (at any time, or after using the share, a won short of it or
over it; refunds after them of payments made before, and of payments made since, then a
withdrawal; what a correction left owed settled by a withdrawal): after every step:
- `check_book` is all ok (balanced legs, balances = legs, budgets = funder accounts);
- no balance, month counter or budget is negative; no budget passes its limit;
- the month's cap is never exceeded (cashback ≤ what the policy's bands can pay on the
  month's eligible spend: 30,000 a month under 2025-09, 45,000 if Ganghwa/Ongjin
  merchants were used, 55,000 under 2020-03);
- the book's balances, what members owe, `operator/cash`, the withdrawals recorded,
  month counters and budgets equal the model's, and every answer of the service equals
  the model's (a withdrawal's `charged_in`, `used`, shares, `owed_settled`, `paid_out`
  by docs/design.md "Withdrawals": `tests.machines.withdraw`).

Corrections of 2025-09 (cafes at 7% instead of the 10%/15% paid: a clawback; restaurants
at 12%: extra cashback; a sales ceiling of 50억 or 20억 instead of 30억: payments that
count toward the month, or stop counting, moving the bands of the month's other
payments) are proposed and approved by a second person between the other steps, so
refunds come before, between and after them. The model computes each member-month's
plan per payment (right − wrong, both on what is left of each payment after its
refunds; right − what it holds for a payment an earlier correction re-based; the payments
whose cashback, base or counting the two policies give differently, as docs/design.md
"Corrections" says), posts it as the book must (a line one of whose payments another
correction re-based since its proposal refused, the share of refunds made since the
proposal left out, nothing taken below what a payment holds, a budget short refusing
an extra; each payment's base and counting put on the right policy's and the month's
eligible spend moved by the difference), and claws back a corrected payment's refunds
from what it holds after the correction, over its re-based base; every month's
counters also equal what its payments hold (`assert_months_hold_their_payments`).

Dates are in 2020-03..2020-05 (policy incheon-2020-03) and 2025-09 (incheon-2025-09).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field

import orjson
import pytest
import yaml
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import invariant, precondition, rule
from sqlalchemy import select

from ledger import schema as s
from tests.book_helpers import assert_book_ok, assert_months_hold_their_payments
from tests.conftest import POLICIES
from tests.machines import (SMALL_UP_TO, SMALL_USED_MIN_BP, USED_MIN_BP, CardAppMachine, ChargedWindow,
                            Merchant, ModelError, Month, local, reached, refund_amount, run_counted, run_on_postgres, run_on_sqlite,
                            settle_owed, topup_decline, walk, withdraw)

# ---------------------------------------------------------------- the reference model

# (lower, upper, rate_bp) of each band; cashback_on charged money only.
POLICY_2020 = {"name": "2020-03", "id": "incheon-2020-03", "topup_min": 10_000, "topup_max": 2_000_000,
               "declined": {"department_store", "large_mart", "ssm", "franchise_hq", "entertainment", "gambling",
                            "online"}}
POLICY_2025 = {"name": "2025-09", "id": "incheon-2025-09+winwin-2023", "topup_min": 10_000, "topup_max": 1_500_000,
               "declined": POLICY_2020["declined"]}
NATIONAL_BP = 4_000  # national pays 40% of each band's cashback (floored), the city the rest


def policy_for(local: dt.datetime) -> dict:
    if dt.date(2020, 3, 1) <= local.date() <= dt.date(2020, 10, 31):
        return POLICY_2020
    if dt.date(2025, 9, 1) <= local.date() <= dt.date(2025, 9, 30):
        return POLICY_2025
    raise AssertionError(f"no test policy for {local}")


def eligible(policy: dict, merchant: "Merchant") -> bool:
    if policy is POLICY_2020:
        return merchant.category not in ("car_dealer", "electronics_large")
    return merchant.sales <= 3_000_000_000


def bands(policy: dict, merchant: "Merchant") -> list[tuple[int, int, int]]:
    if policy is POLICY_2020:
        return [(0, 500_000, 1_000), (500_000, 1_000_000, 100)]
    rate = 1_500 if merchant.district in ("ganghwa", "ongjin") else 1_000
    return [(0, 300_000, rate)]


def cap_bound(month: str, eligible_won: int, rate_bp: int) -> int:
    """The most the month's bands can pay on this much eligible spend (2025: its band of
    30만 at `rate_bp`, the highest rate any of the month's payments was paid at)."""
    if month.startswith("2020"):
        return min(eligible_won, 500_000) // 10 + max(0, min(eligible_won, 1_000_000) - 500_000) // 100
    return min(eligible_won, 300_000) * rate_bp // 10_000


MERCHANTS = [
    Merchant("shop-seo", "seo", "restaurant", 100_000_000, dt.date(2019, 1, 1)),
    Merchant("shop-big", "yeonsu", "grocery", 5_000_000_000, dt.date(2019, 1, 1)),
    Merchant("shop-30eok", "namdong", "grocery", 3_000_000_000, dt.date(2019, 1, 1)),
    Merchant("shop-ganghwa", "ganghwa", "cafe", 200_000_000, dt.date(2019, 1, 1)),
    Merchant("shop-ongjin-big", "ongjin", "cafe", 3_500_000_000, dt.date(2019, 1, 1)),
    Merchant("mart", "bupyeong", "large_mart", 90_000_000_000, dt.date(2019, 1, 1)),
    Merchant("cars", "seo", "car_dealer", 500_000_000, dt.date(2019, 1, 1)),
    Merchant("shop-new", "jung", "bakery", 50_000_000, dt.date(2025, 9, 20)),
]
MERCHANT_IDS = [m.merchant_id for m in MERCHANTS] + ["shop-ghost"]  # the last is not registered
MEMBERS = {"m-a": ("seo", "active"), "m-b": ("ganghwa", "active"), "m-s": ("dong", "suspended")}
TIMES = ["2020-03-10T12:00:00+09:00", "2020-03-31T23:59:59+09:00", "2020-04-30T15:30:00Z",  # = 05-01 00:30 Seoul
         "2025-09-05T08:00:00+09:00", "2025-09-19T15:00:00+00:00",  # = 09-20 00:00 Seoul
         "2025-09-30T23:59:59+09:00"]
MONTHS = ["2020-03", "2020-04", "2020-05", "2025-09"]
# Withdrawals also in October 2025 (incheon-2025-10, the same default share): after
# everything else, so a withdrawal there is never dated before what it takes. (The
# policy an answer names is the stack in force: the 상생 layer of 2023 is in 2025's.)
WITHDRAW_TIMES = [*TIMES, "2025-10-02T10:00:00+09:00"]


def withdrawal_policy(moment: dt.datetime) -> str:
    return "incheon-2025-10+winwin-2023" if moment.date() >= dt.date(2025, 10, 1) else policy_for(moment)["id"]


@dataclass
class PaymentRecord:
    member_id: str
    month: str
    amount: int
    status: str
    spent_points: int = 0
    spent_charged: int = 0
    base: int = 0
    counts: bool = False
    funded: list[tuple[int, str, int]] = field(default_factory=list)  # (line, source, won)
    rural: bool = False
    refunded: int = 0
    refunded_points: int = 0
    refunded_charged: int = 0
    base_refunded: int = 0
    at: dt.datetime | None = None
    clawed: dict[tuple[int, str], int] = field(default_factory=dict)
    merchant: Merchant | None = None
    payment_id: str = ""
    # After a correction: the base refunded then, and per (component, funder) what the
    # payment held then and what refunds clawed back of it since; how many corrections
    # re-based it. (`base`, `counts` and `base_refunded` are then the right policy's.)
    corrected_base: int = 0
    corrected: dict[tuple[str, str], list[int]] | None = None
    corrections: int = 0
    top_rate_bp: int = 0  # the highest rate a correction's right policy paid it at
    recorded_clock: int = 0  # the model's clock when it was recorded
    budget_cut: bool = False  # a budget paid a funder less than its share (budget_partial)

    def granted(self) -> dict[str, int]:
        """What the first answer paid each funder, less what refunds clawed back of it by
        the contract's formula: the most a correction gives a cut payment's funder."""
        out: dict[str, int] = {}
        for _, source, won in self.funded:
            out[source] = out.get(source, 0) + won
        if self.base and self.base_refunded:
            out = {source: won - won * self.base_refunded // self.base for source, won in out.items()}
        return out

    def held(self) -> dict[tuple[str, str], int]:
        if self.corrected is not None:
            return {key: amount - clawed for key, (amount, clawed) in self.corrected.items()}
        out: dict[tuple[str, str], int] = {}
        for line, source, won in self.funded:
            out[("city", source)] = out.get(("city", source), 0) + won - self.clawed.get((line, source), 0)
        return out


# The drafts a correction of 2025-09 says should have been in force: a variant ahead of
# the policy's own (so it wins over Ganghwa/Ongjin's), at this rate, for this category;
# or the merchant sales ceiling at this instead of 30억.
SALES_MAX_2025 = 3_000_000_000
DRAFTS = {"cafe-7": ("cafe", 700, SALES_MAX_2025), "restaurant-12": ("restaurant", 1_200, SALES_MAX_2025),
          "ceiling-50eok": (None, 0, 5_000_000_000), "ceiling-20eok": (None, 0, 2_000_000_000)}


def draft_policy(name: str) -> dict:
    category, rate_bp, sales_max = DRAFTS[name]
    doc = yaml.safe_load((POLICIES / "2025-09-all-under-30eok.yaml").read_text())
    doc["policy_id"] = f"incheon-2025-09-{name}"
    doc.pop("effective_from")
    doc["cashback_eligibility"]["merchant_sales_max_won"] = sales_max
    if category is not None:
        doc["components"][0]["variants"].insert(0, {"id": name, "when": {"categories_include": [category]},
                                                    "bands": [{"up_to_won": 300000, "rate_bp": rate_bp}]})
    return doc


def rate_2025(merchant: Merchant, draft: str | None) -> int:
    if draft is not None and merchant.category == DRAFTS[draft][0]:
        return DRAFTS[draft][1]
    return 1_500 if merchant.district in ("ganghwa", "ongjin") else 1_000


def counts_2025(merchant: Merchant, draft: str | None) -> bool:
    return merchant.sales <= (DRAFTS[draft][2] if draft is not None else SALES_MAX_2025)


class Model:
    """What the contract says the service must answer and hold."""

    def __init__(self) -> None:
        self.members = {m: {"district": d, "status": st_, "charged": 0, "points": 0, "owed": 0,
                            "window": ChargedWindow(), "withdrawn": 0, "gave_back_use": False}
                        for m, (d, st_) in MEMBERS.items()}
        self.cash = 0  # operator/cash: top-ups in, withdrawals paid out
        self.withdrawals: dict[str, tuple] = {}  # id -> (status, decline_code, amount, owed settled) recorded
        self.merchants = {m.merchant_id: m for m in MERCHANTS}
        self.months: dict[tuple[str, str], Month] = {}
        self.payments: dict[str, PaymentRecord] = {}
        self.budgets: dict[tuple[str, str], list] = {}  # (source, period) -> [limit or None, committed]
        self.extra: dict[tuple[str, str], int] = {}  # cashback corrections paid beyond the month's cap
        self.known_at_plan: dict[str, set[str]] = {}  # draft -> the payments recorded when it was planned
        self.refunded_in_order: list[str] = []  # the refunded payment of each refund recorded, in order
        self.refunds_at_plan: dict[str, int] = {}  # draft -> how many refunds were recorded when it was planned
        # Approved corrections' drafts: when each took effect (its first line posted, else
        # its approval), and the lines that did not post (their member-months stay as
        # they were); a member-month is as the last one in effect over it left it.
        self.clock = 0
        self.approved_at: dict[str, int] = {}
        self.took_effect: dict[str, int] = {}
        self.planned_at: dict[str, int] = {}
        self.updated_at: dict[str, int] = {}  # approved, and again once every line has posted
        self.refused_lines: set[tuple[str, str, str]] = set()

    def month(self, member_id: str, month: str) -> Month:
        return self.months.setdefault((member_id, month), Month())

    def balances(self, member_id: str) -> dict:
        m = self.members[member_id]
        return {"charged": m["charged"], "points": m["points"], "grants": []}

    def _budget(self, source: str, period: str) -> list:
        return self.budgets.setdefault((source, period), [None, 0])

    def _room(self, source: str, month: str) -> int | None:
        rooms = [limit - committed for limit, committed in (self._budget(source, month), self._budget(source, month[:4]))
                 if limit is not None]
        return min(rooms) if rooms else None

    def _commit(self, source: str, month: str, won: int) -> None:
        for period in (month, month[:4]):
            self._budget(source, period)[1] += won

    def topup(self, member_id: str, amount: int, when: str) -> dict:
        member = self.members.get(member_id)
        if member is None:
            raise ModelError(404, "member_not_found")
        moment = local(when)
        policy = policy_for(moment)
        month = self.month(member_id, moment.strftime("%Y-%m"))
        code = topup_decline(member, month, amount, policy["topup_min"], policy["topup_max"])
        if code is None:
            member["window"].topup(amount, moment)
            self.cash += amount
        return {"status": "declined" if code else "approved", "decline_code": code,
                "balances": self.balances(member_id)}

    def pay(self, payment_id: str, member_id: str, merchant_id: str, amount: int, when: str) -> dict:
        member = self.members.get(member_id)
        if member is None:
            raise ModelError(404, "member_not_found")
        moment = local(when)
        policy = policy_for(moment)
        month_key = moment.strftime("%Y-%m")
        merchant = self.merchants.get(merchant_id)
        code = None
        if member["status"] != "active":
            code = "member_suspended"
        elif merchant is None or moment.date() < merchant.registered_from:
            code = "merchant_not_registered"
        elif merchant.category in policy["declined"]:
            code = "merchant_category_excluded"
        elif member["points"] + member["charged"] < amount:
            code = "insufficient_funds"
        if code is not None:
            self.payments[payment_id] = PaymentRecord(member_id, month_key, amount, "declined", at=moment)
            return {"status": "declined", "decline_code": code, "spent": {"grants": 0, "points": 0, "charged": 0},
                    "cashback": 0, "components": [], "balances": self.balances(member_id)}

        points = min(amount, member["points"])
        charged = amount - points
        counts = eligible(policy, merchant)
        base = charged if counts else 0
        month = self.month(member_id, month_key)
        components, funded = [], []
        used: dict[str, int] = {}
        cut = False
        if base > 0:
            start, end = month.eligible, month.eligible + base
            for lower, upper, rate_bp in bands(policy, merchant):
                lo, hi = max(start, lower), min(end, upper)
                if hi <= lo:
                    continue
                want_total = (hi - lo) * rate_bp // 10_000
                want = {"national": want_total * NATIONAL_BP // 10_000}
                want["city"] = want_total - want["national"]
                got = {}
                for source, won in want.items():
                    room = self._room(source, month_key)
                    got[source] = won if room is None else min(won, room - used.get(source, 0))
                    used[source] = used.get(source, 0) + got[source]
                    cut = cut or got[source] < won
                line = len(components)
                components.append({"rate_bp": rate_bp, "base": hi - lo, "amount": sum(got.values()),
                                   "funded_by": {k: v for k, v in got.items() if v > 0}})
                funded += [(line, source, won) for source, won in got.items() if won > 0]
        cashback = sum(c["amount"] for c in components)
        member["points"] += cashback - points
        member["charged"] -= charged
        member["window"].payment(payment_id, charged, moment)
        if counts:
            month.eligible += base
        month.cashback += cashback
        for _, source, won in funded:
            self._commit(source, month_key, won)
        self.payments[payment_id] = PaymentRecord(
            member_id, month_key, amount, "approved", points, charged, base, counts, funded,
            rural=merchant.district in ("ganghwa", "ongjin") and policy is POLICY_2025, at=moment,
            merchant=merchant, payment_id=payment_id, recorded_clock=self.clock, budget_cut=cut)
        return {"status": "approved", "decline_code": None, "spent": {"grants": 0, "points": points, "charged": charged},
                "cashback": cashback, "components": components, "balances": self.balances(member_id)}

    def refund(self, payment_id: str, amount: int, when: str) -> dict:
        p = self.payments.get(payment_id)
        if p is None:
            raise ModelError(404, "payment_not_found")
        if p.status != "approved":
            raise ModelError(409, "payment_not_refundable")
        if local(when) < p.at:
            raise ModelError(409, "refund_before_payment")
        if amount > p.amount - p.refunded:
            raise ModelError(409, "refund_exceeds_payment")
        # reverse of the spend order: charged money first, then points
        charged = min(amount, p.spent_charged - p.refunded_charged)
        points = amount - charged
        assert points <= p.spent_points - p.refunded_points
        base_step = charged if p.base else 0
        base_cum = p.base_refunded + base_step
        steps = []
        for line, source, won in p.funded:
            # over the base that recorded the lines: the charged money (a payment with
            # lines counted), whatever a correction re-based it on since
            target = won * (p.refunded_charged + charged) // p.spent_charged
            if p.corrected is None:
                steps.append((line, source, target - p.clawed.get((line, source), 0)))
            else:  # what the original policy would claw back, moving no money
                p.clawed[(line, source)] = target
        for key, (won, clawed) in sorted((p.corrected or {}).items()):
            if p.corrected_base < p.base:
                target = won * (base_cum - p.corrected_base) // (p.base - p.corrected_base)
            else:
                target = won if p.refunded + amount == p.amount else clawed
            steps.append((key, key[1], target - clawed))
        member = self.members[p.member_id]
        clawback_by_source: dict[str, int] = {}
        for line, source, step in steps:
            if p.corrected is None:
                p.clawed[(line, source)] = p.clawed.get((line, source), 0) + step
            else:
                p.corrected[line][1] += step
            clawback_by_source[source] = clawback_by_source.get(source, 0) + step
        clawback = sum(clawback_by_source.values())
        # All of it: what the member does not hold (points and charged money, this
        # refund's included) they owe; the clawback takes this refund's points first.
        owed = max(0, clawback - (member["points"] + points + member["charged"] + charged))
        withheld = max(0, clawback - owed - (member["points"] + points))
        from_points = clawback - owed - withheld
        member["charged"] += charged - withheld
        member["points"] += points - from_points
        held = member["charged"]
        owed, settled = settle_owed(member, owed, max(0, points - from_points), max(0, charged - withheld))
        window = member["window"]
        if charged and payment_id in window.payments:
            member["gave_back_use"] = True  # a payment since the last withdrawal: not put in again
        if member["withdrawn"] and charged and payment_id not in window.payments:
            reached("refund after withdrawal puts in again")  # the charged money was withdrawn since
            if withheld:
                reached("refund after withdrawal withholds clawback")
        window.refund(payment_id, charged, withheld + held - member["charged"], local(when))
        if owed:
            reached("refund owed")
        p.refunded += amount
        p.refunded_charged += charged
        p.refunded_points += points
        p.base_refunded = base_cum
        month = self.month(p.member_id, p.month)
        if p.counts:
            month.eligible -= base_step
        month.cashback -= clawback
        for source, won in clawback_by_source.items():
            self._commit(source, p.month, -won)
        self.refunded_in_order.append(payment_id)
        return {"restored": {"grants": 0, "points": points, "charged": charged - withheld},
                "cashback_clawback": clawback, "owed": owed, "owed_settled": settled, "not_recovered": 0,
                "balances": self.balances(p.member_id)}

    def withdraw(self, withdrawal_id: str, member_id: str, amount: int | None, when: str) -> dict:
        member = self.members.get(member_id)
        if member is None:
            raise ModelError(404, "member_not_found")
        moment = local(when)
        answer = withdraw(member, amount, moment, withdrawal_policy(moment), lambda: self.balances(member_id))
        if member["gave_back_use"]:
            reached("withdrawal after a refund gave back use")
        self.withdrawals[withdrawal_id] = (answer["status"], answer["decline_code"], answer["amount"],
                                           answer["owed_settled"])
        if answer["status"] == "approved":
            member["withdrawn"] += 1
            member["gave_back_use"] = False
            self.cash -= answer["paid_out"]
        return answer

    def correction_plan(self, draft: str) -> dict[tuple[str, str], list[tuple]]:
        """Per member-month of 2025-09, the payments whose cashback, base or counting
        toward the month the draft changes: (payment_id, refunded, ((component, funder,
        won), ...), corrections that had re-based it, (counts, balances that earn
        cashback) under the draft). Both policies evaluated on what is left of each
        approved payment after its refunds, in the order recorded, without budgets: right −
        wrong, or for a payment an earlier correction re-based right − what it holds
        both against the month as corrected (the draft of the last correction in effect
        over it, `as_corrected`); left out when the draft gives it what that does and
        its base is the draft's already."""
        self.known_at_plan[draft] = set(self.payments)
        self.refunds_at_plan[draft] = len(self.refunded_in_order)
        self.clock += 1
        self.planned_at[draft] = self.clock
        out: dict[tuple[str, str], list] = {}
        months: dict[str, list[int]] = {}  # member -> eligible spend so far: right, as corrected
        # in the order the book recorded them (as it paid them their band room), whatever
        # their times: a backdated payment after those recorded before it
        for payment_id, p in self.payments.items():
            if p.status != "approved" or p.month != "2025-09":
                continue
            spend = months.setdefault(p.member_id, [0, 0])
            left = p.spent_charged - p.refunded_charged
            gives: list[dict[str, int]] = []
            based = []
            for i, policy_draft in enumerate((draft, self.as_corrected(p.member_id, p.month))):
                counts = counts_2025(p.merchant, policy_draft)
                base = left if counts else 0
                won = max(0, min(base, 300_000 - spend[i])) * rate_2025(p.merchant, policy_draft) // 10_000
                spend[i] += base
                national = won * NATIONAL_BP // 10_000
                gives.append({("city", "national"): national, ("city", "city"): won - national})
                based.append((counts, base))
            right, now = gives
            held_base = (p.counts, p.base - p.base_refunded if p.counts else 0)
            # Recorded since a correction was planned: paid by the policy activated, not
            # as corrected, so planned from what it holds, as a re-based payment is.
            paid_after = p.corrected is None and any(self.planned_at[d] <= p.recorded_clock for d in self.approved_at)
            if (not paid_after and not _minus(right, now) and based[0] == based[1]
                    and (p.corrected is None or held_base == based[0])):
                continue
            parts = _minus(right, now)
            if p.budget_cut:
                # A component a budget cut: each funder no more than was granted (net of
                # refunds), planned from what it holds (settlement.simulate._budget_kept).
                granted = p.granted()
                right = {key: min(won, granted.get(key[1], 0)) for key, won in right.items()}
                right = {key: won for key, won in right.items() if won}
            if p.corrected is not None or paid_after or p.budget_cut:
                parts = _minus(right, p.held())
                if not parts and held_base == based[0]:
                    continue
            out.setdefault((p.member_id, p.month), []).append(
                (payment_id, p.refunded, parts, p.corrections, (based[0][0], ("charged",))))
        return {key: sorted(entries) for key, entries in out.items()}

    def as_corrected(self, member_id: str, month: str) -> str | None:
        """The draft of the last approved correction in effect over the member-month."""
        drafts = [d for d in self.approved_at if (d, member_id, month) not in self.refused_lines]
        return max(drafts, key=lambda d: self.took_effect.get(d, self.approved_at[d]), default=None)

    def approve_correction(self, draft: str) -> bool:
        """False when refused: another correction took effect over the month since it was
        planned."""
        if any(d != draft and at > self.planned_at[draft] for d, at in self.updated_at.items()):
            return False
        self.clock += 1
        if draft not in self.approved_at:
            self.approved_at[draft] = self.updated_at[draft] = self.clock
        return True

    def all_posted(self, draft: str) -> None:
        self.clock += 1
        self.updated_at[draft] = self.clock

    def post_correction(self, member_id: str, month: str, payments: list[tuple], draft: str) -> int | None:
        """Post one line as the book must; its total, or None when one of its payments was
        corrected since the plan, its member-month has a payment recorded since (or a
        refund of a payment the line does not hold), or a budget cannot pay its extra
        (the line stays unposted)."""
        if any(self.payments[payment_id].corrections != seen for payment_id, _, _, seen, _ in payments):
            return None
        # a payment of the member-month recorded since the plan, which it never saw
        if any(p.status == "approved" and (p.member_id, p.month) == (member_id, month)
               for payment_id, p in self.payments.items() if payment_id not in self.known_at_plan[draft]):
            return None
        # a refund since the plan of a payment of the member-month the line does not hold:
        # it gave back band room the plan never saw
        line_payments = {payment_id for payment_id, *_ in payments}
        if any((self.payments[payment_id].member_id, self.payments[payment_id].month) == (member_id, month)
               and payment_id not in line_payments
               for payment_id in self.refunded_in_order[self.refunds_at_plan[draft]:]):
            return None
        posted: list[tuple["PaymentRecord", tuple[str, str], int]] = []
        by_source: dict[str, int] = {}
        rebased = []
        for payment_id, refunded_planned, parts, _, (counts, _) in payments:
            p = self.payments[payment_id]
            charged_planned = min(refunded_planned, p.spent_charged)  # charged money is refunded first
            # (whole, refunded when planned, refunded now) of the base as it is and as
            # the draft has it (cashback on charged money)
            before = (p.base, charged_planned if p.base else 0, p.base_refunded)
            after = (p.spent_charged, charged_planned, p.refunded_charged) if counts else (0, 0, 0)
            share = next(((now - planned, whole - planned) for whole, planned, now in (before, after)
                          if planned < whole), None)
            held = p.held()
            for component_id, source, delta in parts:
                if share is not None:
                    delta -= delta * share[0] // share[1]
                elif p.refunded == p.amount:
                    delta = 0
                key = (component_id, source)
                delta = max(delta, -held.get(key, 0))
                held[key] = held.get(key, 0) + delta
                posted.append((p, key, delta))
                by_source[source] = by_source.get(source, 0) + delta
            rebased.append((p, counts, before, after))
        for source, won in by_source.items():
            room = self._room(source, month)
            if won > 0 and room is not None and won > room:
                return None
        row = self.month(member_id, month)
        for p, counts, before, after in rebased:
            held = p.held()
            for q, key, delta in posted:
                if q is p:
                    held[key] = held.get(key, 0) + delta
            p.corrected = {key: [won, 0] for key, won in held.items() if won}
            row.eligible += (after[0] - after[2] if counts else 0) - (before[0] - before[2] if p.counts else 0)
            p.base, p.counts, p.base_refunded = after[0], counts, after[2]
            p.corrected_base = p.base_refunded
            p.corrections += 1
            p.top_rate_bp = max(p.top_rate_bp, rate_2025(p.merchant, draft))
        self.refused_lines.discard((draft, member_id, month))
        if draft not in self.took_effect:
            self.clock += 1
            self.took_effect[draft] = self.clock
        total = sum(by_source.values())
        member = self.members[member_id]
        if total >= 0:  # what is owed settled first
            settled = min(total, member.get("owed", 0))
            member["owed"] = member.get("owed", 0) - settled
            member["points"] += total - settled
        else:
            from_points = min(-total, member["points"])
            from_charged = min(-total - from_points, member["charged"])
            member["points"] -= from_points
            member["charged"] -= from_charged
            member["owed"] = member.get("owed", 0) + (-total - from_points - from_charged)  # the receivable
            if -total - from_points - from_charged:
                reached("correction owed")
        row.cashback = max(0, row.cashback + total)
        for source, won in by_source.items():
            self._commit(source, month, won)
        return total

    def put_budget(self, source: str, period: str, limit: int) -> None:
        budget = self._budget(source, period)
        if limit < budget[1]:
            raise ModelError(409, "budget_below_committed")
        budget[0] = limit

    def cap_slack(self, member_id: str, month: str) -> int:
        """Clawback floors per funder and line, so a partly refunded payment may keep up
        to one won per (line, funder) more than its exact share, which a later payment
        can earn again in the band the refund freed (the contract's floored clawback); a
        partly refunded payment a correction re-based, one won per part more for each
        correction (the share of a correction that refunds since its proposal leave out
        is floored alike), even where the payment no longer counts toward the month. (A
        clawback the member could not pay no longer stays in the month: they owe it.)"""
        return sum(len(p.funded) for p in self.payments.values() if p.member_id == member_id and p.month == month
                   and p.corrected is None and 0 < p.base_refunded < p.base) \
            + sum(len(p.corrected) * (1 + p.corrections) for p in self.payments.values()
                  if p.member_id == member_id and p.month == month and p.corrected is not None
                  and 0 < p.refunded < p.amount) \
            + self.extra.get((member_id, month), 0)


def _minus(right: dict[tuple[str, str], int], other: dict[tuple[str, str], int]) -> tuple:
    """((component, funder, right − other), ...) where they differ, in key order."""
    return tuple((component, source, right.get((component, source), 0) - other.get((component, source), 0))
                 for component, source in sorted({*right, *other})
                 if right.get((component, source), 0) != other.get((component, source), 0))


# ---------------------------------------------------------------- the machine

AMOUNTS = st.one_of(st.integers(1, 60_000), st.integers(1, 60_000), st.integers(1, 700_000),
                    st.sampled_from([1, 9, 10_000, 17_000, 300_000, 500_000, 1_000_000, 3_000_000]))
# mostly the two active members; the suspended and the unknown one now and then
MEMBER_PICKS = st.sampled_from(["m-a", "m-b", "m-a", "m-b", "m-a", "m-b", "m-s", "m-ghost"])
FUNDED_AT = ["2020-03-10T09:00:00+09:00", "2025-09-05T07:00:00+09:00"]
BAD_AMOUNTS = st.sampled_from([0, -1, -17_000, 17_000.5, 1.0, "100", True, None, 10**12 + 1])


class BookMachine(CardAppMachine):
    def __init__(self) -> None:
        super().__init__(Model(), MERCHANTS, MEMBERS)
        self.corrections: dict[str, dict] = {}  # draft -> its lines not yet posted, as planned
        # start the active members with money in both policy periods, so that most
        # payments are approved and refunds have something to work on
        for member_id in ("m-a", "m-b"):
            for when in FUNDED_AT:
                self.send_topup(member_id, 1_000_000, when)
        # and with payments that a correction of 2025-09 changes (the rate, or whether they count)
        self.send_payment("m-a", "shop-seo", 120_000, TIMES[3])
        self.send_payment("m-b", "shop-ganghwa", 90_000, TIMES[3])
        self.send_payment("m-a", "shop-big", 200_000, TIMES[3])
        self.send_payment("m-b", "shop-30eok", 100_000, TIMES[3])

    # -- the card app

    @rule(member=MEMBER_PICKS, amount=st.one_of(
        st.sampled_from([9_999, 10_000, 50_000, 300_000, 1_000_000]), st.integers(1, 2_000_000)),
        when=st.sampled_from(TIMES))
    def topup(self, member, amount, when):
        self.send_topup(member, amount, when)

    @rule(member=MEMBER_PICKS, merchant=st.sampled_from(MERCHANT_IDS), amount=AMOUNTS,
          when=st.sampled_from(TIMES))
    def pay(self, member, merchant, amount, when):
        self.send_payment(member, merchant, amount, when)

    @rule(member=st.sampled_from(["m-a", "m-b"]), merchants=st.tuples(*[st.sampled_from(MERCHANT_IDS[:-1])] * 2),
          amounts=st.tuples(*[st.integers(100_000, 400_000)] * 2))
    def pay_then_backdated(self, member, merchants, amounts):
        """A payment at September's end, then one backdated to its 5th: the book pays the
        second from the band position the first left, and a correction's plan must too."""
        self.send_payment(member, merchants[0], amounts[0], TIMES[-1])
        self.send_payment(member, merchants[1], amounts[1], TIMES[3])

    @precondition(lambda self: self.model.payments)
    @rule(data=st.data(), share=st.sampled_from(["all", "part", "part", "one", "over"]),
          which=st.sampled_from(["open", "open", "open", "any", "corrected", "corrected"]), when=st.sampled_from(TIMES))
    def refund(self, data, share, which, when):
        payment_ids = sorted(self.model.payments) + ["p-none"]  # the last was never paid
        if which in ("open", "corrected"):  # approved with something left to refund (and corrected)
            payment_ids = [p for p in payment_ids if p in self.model.payments
                           and self.model.payments[p].status == "approved"
                           and self.model.payments[p].refunded < self.model.payments[p].amount] or payment_ids
        if which == "corrected":  # in a correction not yet posted, or else corrected
            planned = {p for lines in self.corrections.values() for entries in lines.values() for p, *_ in entries}
            payment_ids = [p for p in payment_ids if p in planned] or [
                p for p in payment_ids if p in self.model.payments
                and self.model.payments[p].corrected is not None] or payment_ids
        payment_id = data.draw(st.sampled_from(payment_ids), label="payment")
        record = self.model.payments.get(payment_id)
        self.send_refund(payment_id, refund_amount(data, record.amount - record.refunded if record else 1_000, share),
                         when)

    # -- withdrawals

    def _withdraw_time(self, member: str) -> str:
        """The first withdrawal time not before what the member's window holds."""
        if member not in self.model.members:
            return WITHDRAW_TIMES[-1]
        latest = self.model.members[member]["window"].latest
        return next(w for w in WITHDRAW_TIMES if latest is None or local(w) >= latest)

    def _shown(self, member: str, shown: str) -> int | None:
        """The `amount` the card app sends: none, the charged money left, or a stale one."""
        left = self.model.members[member]["charged"] if member in self.model.members else 1_000
        return {"none": None, "left": left or None, "stale": left + 1}[shown]

    @rule(member=MEMBER_PICKS, when=st.sampled_from(WITHDRAW_TIMES), shown=st.sampled_from(["none", "left", "stale"]))
    def withdraw(self, member, when, shown):
        """A withdrawal at any time: dated before the member's last top-up, payment or
        refund it is refused; mostly declined for too little used."""
        self.send_withdrawal(member, self._shown(member, shown), when)

    @rule(member=MEMBER_PICKS, merchant=st.sampled_from(["shop-seo", "shop-big", "shop-30eok", "shop-ganghwa"]),
          when=st.sampled_from(TIMES), short=st.sampled_from([0, 0, 0, 1, -1, -5_000]),
          shown=st.sampled_from(["none", "left", "left", "stale"]))
    def spend_to_withdraw(self, member, merchant, when, short, shown):
        """A payment of the points and as much charged money as makes the used share the
        policy's (`short` won short of it: 1 won short is declined, 1 won over or exactly
        it approved), then a withdrawal no earlier than what it takes back."""
        held = self.model.members.get(member)
        if held is not None and held["status"] == "active" and held["charged"]:
            window = held["window"]
            min_bp = SMALL_USED_MIN_BP if window.put_in <= SMALL_UP_TO else USED_MIN_BP
            needed = -(-min_bp * window.put_in // 10_000) - (window.put_in - held["charged"])
            charged = min(held["charged"], max(0, needed + short))
            if held["points"] + charged:
                self.send_payment(member, merchant, held["points"] + charged, when)
        self.send_withdrawal(member, self._shown(member, shown), self._withdraw_time(member))

    @rule(member=st.sampled_from(["m-a", "m-b"]), when=st.sampled_from(TIMES))
    def spend_points(self, member, when):
        """All the member's points spent (earning nothing: cashback is on charged money)."""
        if self.model.members[member]["points"]:
            self.send_payment(member, "shop-big", self.model.members[member]["points"], when)

    @precondition(lambda self: any(self._withdrawn_payments()))
    @rule(data=st.data(), share=st.sampled_from(["all", "part", "one"]))
    def refund_after_withdrawal(self, data, share):
        """A refund of a payment whose charged money was withdrawn since: what it restores
        is put in again, and its clawback is taken from the points and the charged money
        it restores."""
        payment_id = data.draw(st.sampled_from(self._withdrawn_payments()), label="payment")
        p = self.model.payments[payment_id]
        when = data.draw(st.sampled_from([w for w in TIMES if local(w) >= p.at]), label="when")
        self.send_refund(payment_id, refund_amount(data, p.amount - p.refunded, share), when)

    @precondition(lambda self: any(self._window_payments()))
    @rule(data=st.data(), share=st.sampled_from(["all", "part", "one"]),
          short=st.sampled_from([0, 0, 1, -1]))
    def refund_then_withdraw(self, data, share, short):
        """A refund of a payment made since the member's last withdrawal gives back money
        it used (it puts nothing in), then the share is used and a withdrawal tried."""
        payment_id = data.draw(st.sampled_from(self._window_payments()), label="payment")
        p = self.model.payments[payment_id]
        when = data.draw(st.sampled_from([w for w in TIMES if local(w) >= p.at]), label="when")
        self.send_refund(payment_id, refund_amount(data, p.amount - p.refunded, share), when)
        self.spend_to_withdraw(p.member_id, "shop-big", when, short, "left")

    def _window_payments(self) -> list[str]:
        """Approved payments of charged money, not all refunded, made since their member's
        last withdrawal (or ever, for one who never withdrew)."""
        members = self.model.members
        return [payment_id for payment_id, p in sorted(self.model.payments.items())
                if p.status == "approved" and p.refunded_charged < p.spent_charged
                and payment_id in members[p.member_id]["window"].payments]

    def _withdrawn_payments(self) -> list[str]:
        """Approved payments of charged money, not all refunded, made before their member's
        last withdrawal."""
        members = self.model.members
        return [payment_id for payment_id, p in sorted(self.model.payments.items())
                if p.status == "approved" and p.refunded_charged < p.spent_charged
                and members[p.member_id]["withdrawn"] and payment_id not in members[p.member_id]["window"].payments]

    @precondition(lambda self: {"cafe-7", "ceiling-20eok"} - set(self.corrections))
    @rule(data=st.data(), settle=st.sampled_from(["withdrawal", "withdrawal", "refund"]),
          topup=st.sampled_from([10_000, 50_000]))
    def owe_then_withdraw(self, data, settle, topup):
        """What is owed and its settling: by a withdrawal, or by a refund."""
        self.owe(data.draw(st.sampled_from(sorted({"cafe-7", "ceiling-20eok"} - set(self.corrections))),
                           label="draft"))
        if settle == "refund":
            self.refund(data, "part", "open", TIMES[-1])
        else:
            self.settle_by_withdrawal(topup)

    def owe(self, draft: str) -> None:
        """m-b uses the share, withdraws and spends the points; a correction taking back
        cafe or 20–30억 cashback is proposed and approved, which m-b, holding nothing, owes."""
        self.spend_to_withdraw("m-b", "shop-seo", TIMES[0], 0, "left")
        self.spend_points("m-b", TIMES[0])
        self._propose(draft)
        self._approve(draft)

    def settle_by_withdrawal(self, topup: int) -> None:
        """A top-up, the share used again and a withdrawal, which settles what is owed first
        from the money it takes. A top-up of 1만 alone is the small amount whose share is
        80%, and leaves less to take than a cafe's 7,200 owed: all of it settles, nothing
        is paid out."""
        self.send_topup("m-b", topup, TIMES[1])
        self.spend_to_withdraw("m-b", "shop-seo", TIMES[1], 0, "left")

    @rule(data=st.data())
    def replay_same(self, data):
        if self.requests:
            self.replay_one(data)

    @rule(data=st.data(), change=st.sampled_from(["amount", "occurred_at", "member"]))
    def replay_different(self, data, change):
        if not self.requests:
            return
        path, body, _ = data.draw(st.sampled_from(self.requests), label="request")
        other = dict(body)
        if change == "member" and path.endswith("/withdrawals"):  # the member is the path's
            path = "/v1/members/{}/withdrawals".format("m-b" if path.startswith("/v1/members/m-a/") else "m-a")
        elif change in ("amount", "member"):  # (a withdrawal need not send one)
            other["amount"] = (body.get("amount") or 0) + 1
        else:
            other["occurred_at"] = "2025-09-15T12:34:56+09:00" if body["occurred_at"] != "2025-09-15T12:34:56+09:00" \
                else "2025-09-16T12:34:56+09:00"
        r = self.api.post(path, other)
        self.expect_error(r, ModelError(409, "idempotency_conflict"))

    @rule(kind=st.sampled_from(["topup", "payment", "refund", "withdrawal"]), amount=BAD_AMOUNTS)
    def bad_amount(self, kind, amount):
        if kind == "withdrawal":
            if amount is None:  # the amount shown is optional
                return
            path, body = "/v1/members/m-a/withdrawals", {"withdrawal_id": self.next_id("w")}
        elif kind == "topup":
            path, body = "/v1/topups", {"topup_id": self.next_id("t"), "member_id": "m-a"}
        elif kind == "payment":
            path, body = "/v1/payments", {"payment_id": self.next_id("p"), "member_id": "m-a",
                                          "merchant_id": "shop-seo"}
        else:
            target = next(iter(self.model.payments), "p-none")
            path, body = f"/v1/payments/{target}/refunds", {"refund_id": self.next_id("r")}
        body.update(amount=amount, occurred_at=TIMES[3])
        r = self.api.post(path, body)
        self.expect_error(r, ModelError(422, "validation_error"))

    # -- policy staff

    @rule(source=st.sampled_from(["city", "national"]), period=st.sampled_from(["2025-09", "2025", "2020-03"]),
          delta=st.integers(-5_000, 30_000))
    def put_budget(self, source, period, delta):
        committed = self.model.budgets.get((source, period), [None, 0])[1]
        limit = max(0, committed + delta)
        r = self.api.put(f"/v1/budgets/{source}/{period}", {"amount": limit}, role="policy-editor")
        try:
            self.model.put_budget(source, period, limit)
        except ModelError as error:
            return self.expect_error(r, error)
        assert r.status_code == 200, r.text
        assert (r.json()["limit"], r.json()["committed"]) == (limit, committed)

    @precondition(lambda self: len(self.corrections) < len(DRAFTS))
    @rule(data=st.data())
    def propose_correction(self, data):
        self._propose(data.draw(st.sampled_from(sorted(set(DRAFTS) - set(self.corrections))), label="draft"))

    def _propose(self, draft: str) -> None:
        """Once per draft: the proposal's lines, and each line's part per payment, are
        the model's plan."""
        policy = draft_policy(draft)
        assert self.api.post("/v1/policies", policy, role="policy-editor").status_code == 201
        correction_id = f"fix-{draft}"
        r = self.api.post("/v1/corrections", {
            "correction_id": correction_id, "wrong_policy_id": "incheon-2025-09",
            "right_policy_id": policy["policy_id"], "from": "2025-09-01T00:00:00+09:00",
            "to": "2025-10-01T00:00:00+09:00"}, role="policy-editor")
        assert r.status_code == 201, r.text
        plan = self.model.correction_plan(draft)
        assert {(l["member_id"], l["month"]): l["delta"] for l in r.json()["lines"]} == {
            key: sum(won for _, _, parts, _, _ in entries for _, _, won in parts) for key, entries in plan.items()}
        cl, cp = s.correction_lines, s.correction_payments
        rows: dict[tuple[str, str], list] = {}
        with self.api.services.reader.connect() as conn:
            for member_id, month, payment_id, refunded, deltas, seen, base in conn.execute(
                    select(cl.c.member_id, cl.c.month, cp.c.payment_id, cp.c.refunded_won, cp.c.deltas,
                           cp.c.corrections_seen, cp.c.base)
                    .join(cp, cp.c.line_id == cl.c.line_id).where(cl.c.correction_id == correction_id)):
                base = orjson.loads(base)
                rows.setdefault((member_id, month), []).append(
                    (payment_id, refunded, tuple(tuple(part) for part in orjson.loads(deltas)), seen,
                     (base["counts_toward_month"], tuple(base["cashback_on"]))))
        assert {key: sorted(entries) for key, entries in rows.items()} == plan
        self.corrections[draft] = plan  # the lines not posted yet

    @precondition(lambda self: any(self.corrections.values()))
    @rule(data=st.data(), share=st.sampled_from(["all", "part", "part"]))
    def refund_before_the_approval(self, data, share):
        """A payment of a proposed correction refunded before a second person approves
        it: posting leaves out the refunded share."""
        self.refund(data, share, "corrected", TIMES[-1])

    @precondition(lambda self: any(self.corrections.values()))
    @rule(data=st.data())
    def approve_correction(self, data):
        self._approve(data.draw(st.sampled_from(sorted(d for d, pending in self.corrections.items() if pending)),
                                label="draft"))

    def _approve(self, draft: str) -> None:
        """A second person approves (or, after a line found a budget short, posts again)."""
        pending = self.corrections[draft]
        refused = not self.model.approve_correction(draft)
        r = self.api.post(f"/v1/corrections/fix-{draft}/approve", role="policy-approver")
        if refused:  # planned before another correction took effect over the month: never posts
            assert r.status_code == 409 and r.json()["code"] == "correction_state_conflict", r.text
            pending.clear()
            return
        assert r.status_code == 200, r.text
        posted = {(l["member_id"], l["month"]): l["posted"] for l in r.json()["lines"]}
        for key in sorted(pending):
            total = self.model.post_correction(*key, pending[key], draft)
            assert posted[key] == (total is not None), (key, total)
            if total is None:
                self.model.refused_lines.add((draft, *key))
            if total is not None:
                del pending[key]
                if total > 0:
                    self.model.extra[key] = self.model.extra.get(key, 0) + total
        assert r.json()["status"] == ("approved" if pending else "posted")
        if not pending:
            self.model.all_posted(draft)

    # -- reads

    @rule(member=st.sampled_from([*MEMBERS, "m-ghost"]), month=st.sampled_from(MONTHS))
    def balance(self, member, month):
        r = self.api.get(f"/v1/members/{member}/balance", params={"month": month})
        if member not in self.model.members:
            return self.expect_error(r, ModelError(404, "member_not_found"))
        assert r.status_code == 200, r.text
        got = r.json()
        want = self.model.months.get((member, month), Month())
        assert got["balances"] == self.model.balances(member)
        assert got["owed"] == self.model.members[member].get("owed", 0)
        assert (got["month"]["cashback_eligible_spend"], got["month"]["cashback_earned"],
                got["month"]["topped_up"]) == (want.eligible, want.cashback, want.topped_up)

    # -- after every step

    @invariant()
    def book_agrees_with_the_model(self):
        assert_book_ok(self.api)
        assert_months_hold_their_payments(self.api)
        with self.api.services.reader.connect() as conn:
            accounts = dict(conn.execute(select(s.accounts.c.account_id, s.accounts.c.balance_won)).all())
            months = {(r.member_id, r.month): r for r in conn.execute(select(s.member_months))}
            budgets = {(r.source, r.period): r for r in conn.execute(select(s.budgets))}
            w = s.withdrawals
            withdrawals = {r.withdrawal_id: (r.status, r.decline_code, r.amount_won, orjson.loads(r.response))
                           for r in conn.execute(select(w.c.withdrawal_id, w.c.status, w.c.decline_code,
                                                        w.c.amount_won, w.c.response))}
        for member_id, member in self.model.members.items():
            assert accounts.get(f"member/{member_id}/charged", 0) == member["charged"] >= 0, member_id
            assert accounts.get(f"member/{member_id}/points", 0) == member["points"] >= 0, member_id
            assert accounts.get(f"receivable/{member_id}", 0) == member["owed"] >= 0, member_id
        # the operator's cash: top-ups in, withdrawals' `paid_out` out (what settled owed stays)
        assert accounts.get("operator/cash", 0) == self.model.cash
        assert {key: (status, code, amount, answer["owed_settled"])
                for key, (status, code, amount, answer) in withdrawals.items()} == self.model.withdrawals
        for key in set(months) | set(self.model.months):
            row, want = months.get(key), self.model.months.get(key, Month())
            got = (row.eligible_spend_won, row.cashback_won, row.topped_up_won) if row else (0, 0, 0)
            assert got == (want.eligible, want.cashback, want.topped_up), key
            assert min(got) >= 0, key
            member_id, month = key
            # The month's band at the highest rate it paid: 15% where a payment was rural,
            # a correction's right policy's where one paid more (restaurants at 12%).
            paid = [p for p in self.model.payments.values()
                    if p.status == "approved" and p.member_id == member_id and p.month == month]
            rate_bp = max([1_500 if any(p.rural for p in paid) else 1_000] + [p.top_rate_bp for p in paid])
            assert got[1] <= cap_bound(month, got[0], rate_bp) + self.model.cap_slack(member_id, month), key
            assert got[1] <= (55_000 if month.startswith("2020") else 300_000 * rate_bp // 10_000) \
                + self.model.cap_slack(member_id, month), key
        for key in set(budgets) | set(self.model.budgets):
            row, want = budgets.get(key), self.model.budgets.get(key, [None, 0])
            got = (row.limit_won, row.committed_won) if row else (None, 0)
            assert got == tuple(want), key
            assert got[1] >= 0 and (got[0] is None or got[1] <= got[0]), key


# ---------------------------------------------------------------- the runs

PROFILE = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])


def test_book_against_model_sqlite():
    run_counted(run_on_sqlite, BookMachine, settings(max_examples=8, stateful_step_count=30, **PROFILE))


@pytest.mark.postgres
def test_book_against_model_postgres():
    run_counted(run_on_postgres, BookMachine, settings(max_examples=5, stateful_step_count=25, **PROFILE))


def _first(machine: BookMachine, member_id: str, month: str) -> str:
    return next(payment_id for payment_id, p in machine.model.payments.items()
                if (p.member_id, p.month, p.status) == (member_id, month, "approved"))


def _resend(machine: BookMachine, change: dict | None) -> None:
    """The last withdrawal sent again: as it was (its first answer), or changed (409)."""
    path, body, first = next(request for request in reversed(machine.requests) if "withdrawal_id" in request[1])
    r = machine.api.post(path, {**body, **(change or {})})
    if change is None:
        assert (r.status_code, r.json()) == (200, first), r.text
    else:
        machine.expect_error(r, ModelError(409, "idempotency_conflict"))


def test_the_machine_walks_the_withdrawal_paths():
    """The states a random run may or may not reach, each step checked against the model
    as in any run: m-b owes what a correction took back and a withdrawal of 1만's charged
    money (80% of it used) settles all it takes, the next pays out the rest; a refund of
    a payment whose charged money was withdrawn puts it in again, its clawback withheld
    from it; m-a's refund of a payment made since gives back use, then a won short of the
    share, a stale amount, the share, nothing left; a suspended card, an unknown member,
    a withdrawal dated before the last; a resend, and one changed."""
    steps = [lambda m: m.owe("cafe-7"),
             lambda m: m.withdraw("m-b", TIMES[0], "none"),
             lambda m: m.settle_by_withdrawal(10_000),
             lambda m: m.settle_by_withdrawal(50_000),
             lambda m: m.send_refund(_first(m, "m-b", "2020-03"), 100_000, TIMES[2]),
             lambda m: m.send_refund(_first(m, "m-a", "2025-09"), 20_000, TIMES[3]),
             lambda m: m.spend_to_withdraw("m-a", "shop-big", TIMES[3], -1, "left"),
             lambda m: m.spend_to_withdraw("m-a", "shop-big", TIMES[3], 0, "stale"),
             lambda m: m.withdraw("m-a", WITHDRAW_TIMES[-1], "left"),
             lambda m: _resend(m, None),
             lambda m: _resend(m, {"occurred_at": "2025-10-03T10:00:00+09:00"}),
             lambda m: m.withdraw("m-a", WITHDRAW_TIMES[-1], "none"),
             lambda m: m.withdraw("m-s", WITHDRAW_TIMES[-1], "none"),
             lambda m: m.withdraw("m-ghost", WITHDRAW_TIMES[-1], "none")]
    reached = walk(BookMachine, steps, BookMachine.book_agrees_with_the_model)
    assert {"correction owed", "withdrawal all to owed", "withdrawal settled owed", "withdrawal refused",
            "refund after withdrawal puts in again", "refund after withdrawal withholds clawback",
            "withdrawal after a refund gave back use", *[f"withdrawal declined {code}" for code in (
                "withdrawal_below_used_share", "withdrawal_amount_mismatch", "nothing_to_withdraw",
                "member_suspended")]} <= set(reached), reached
