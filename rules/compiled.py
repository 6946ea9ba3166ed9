"""A validated policy document turned into frozen data that is cheap to evaluate.

Lists become frozensets, dates become Seoul-local dates, funders keep their
placeholders (`$merchant_district`) to be resolved per event.
"""

from __future__ import annotations

import bisect
import datetime as dt
from dataclasses import dataclass, field, replace

from rules.document import BASE_LAYER, Conditions, PolicyDocument
from rules.facts import MemberFacts, MerchantFacts
from rules.timeutil import rfc3339, to_us


def _set(values) -> frozenset[str] | None:
    return None if values is None else frozenset(str(v) for v in values)


@dataclass(frozen=True, slots=True)
class CompiledConditions:
    sales_min_won: int | None = None
    sales_max_won: int | None = None
    categories_include: frozenset[str] | None = None
    categories_exclude: frozenset[str] | None = None
    merchant_districts: frozenset[str] | None = None
    merchant_districts_exclude: frozenset[str] | None = None
    member_districts: frozenset[str] | None = None
    same_district: bool | None = None
    flags_all: frozenset[str] | None = None
    flags_none: frozenset[str] | None = None
    date_from: dt.date | None = None
    date_until: dt.date | None = None
    weekdays: frozenset[str] | None = None

    @classmethod
    def of(cls, c: Conditions) -> "CompiledConditions":
        return cls(
            sales_min_won=c.merchant_sales_min_won,
            sales_max_won=c.merchant_sales_max_won,
            categories_include=_set(c.categories_include),
            categories_exclude=_set(c.categories_exclude),
            merchant_districts=_set(c.merchant_districts),
            merchant_districts_exclude=_set(c.merchant_districts_exclude),
            member_districts=_set(c.member_districts),
            same_district=c.same_district,
            flags_all=_set(c.merchant_flags_all),
            flags_none=_set(c.merchant_flags_none),
            date_from=c.date_from,
            date_until=c.date_until,
            weekdays=_set(w.value for w in c.weekdays) if c.weekdays is not None else None,
        )

    def holds(self, merchant: MerchantFacts, member: MemberFacts, local_date: dt.date, weekday: str) -> bool:
        # One flat chain of early returns: this runs for every variant of every payment.
        sales = merchant.annual_sales_won
        if self.sales_max_won is not None and sales > self.sales_max_won:
            return False
        if self.sales_min_won is not None and sales <= self.sales_min_won:
            return False
        if self.categories_include is not None and merchant.category not in self.categories_include:
            return False
        if self.categories_exclude is not None and merchant.category in self.categories_exclude:
            return False
        if self.merchant_districts is not None and merchant.district not in self.merchant_districts:
            return False
        if self.merchant_districts_exclude is not None and merchant.district in self.merchant_districts_exclude:
            return False
        if self.member_districts is not None and member.district not in self.member_districts:
            return False
        if self.same_district is not None and (merchant.district == member.district) != self.same_district:
            return False
        if self.flags_all is not None and not self.flags_all <= merchant.flags:
            return False
        if self.flags_none is not None and self.flags_none & merchant.flags:
            return False
        if self.date_from is not None and local_date < self.date_from:
            return False
        if self.date_until is not None and local_date > self.date_until:
            return False
        if self.weekdays is not None and weekday not in self.weekdays:
            return False
        return True

    def first_failing(self, merchant: MerchantFacts, member: MemberFacts, local_date: dt.date,
                      weekday: str) -> str | None:
        """The first condition that does not hold, by its field in the policy document
        (`merchant_sales_max_won`, `categories_exclude`, ...), in `holds`' order; None when
        they all hold. Off the hot path: a payment's answer names it when the policy's
        `cashback_eligibility` refuses it cashback (`cashback.why`); tests/test_cashback_why.py
        holds it to `holds`, condition by condition."""
        sales = merchant.annual_sales_won
        if self.sales_max_won is not None and sales > self.sales_max_won:
            return "merchant_sales_max_won"
        if self.sales_min_won is not None and sales <= self.sales_min_won:
            return "merchant_sales_min_won"
        if self.categories_include is not None and merchant.category not in self.categories_include:
            return "categories_include"
        if self.categories_exclude is not None and merchant.category in self.categories_exclude:
            return "categories_exclude"
        if self.merchant_districts is not None and merchant.district not in self.merchant_districts:
            return "merchant_districts"
        if self.merchant_districts_exclude is not None and merchant.district in self.merchant_districts_exclude:
            return "merchant_districts_exclude"
        if self.member_districts is not None and member.district not in self.member_districts:
            return "member_districts"
        if self.same_district is not None and (merchant.district == member.district) != self.same_district:
            return "same_district"
        if self.flags_all is not None and not self.flags_all <= merchant.flags:
            return "merchant_flags_all"
        if self.flags_none is not None and self.flags_none & merchant.flags:
            return "merchant_flags_none"
        if self.date_from is not None and local_date < self.date_from:
            return "date_from"
        if self.date_until is not None and local_date > self.date_until:
            return "date_until"
        if self.weekdays is not None and weekday not in self.weekdays:
            return "weekdays"
        return None


ALWAYS = CompiledConditions()


@dataclass(frozen=True, slots=True)
class CompiledBand:
    lower_won: int
    upper_won: int | None  # None: open-ended
    rate_bp: int | None
    rate_from_merchant_share: bool


@dataclass(frozen=True, slots=True)
class CompiledVariant:
    variant_id: str
    rule: str
    when: CompiledConditions
    bands: tuple[CompiledBand, ...]


@dataclass(frozen=True, slots=True)
class CompiledComponent:
    component_id: str
    variants: tuple[CompiledVariant, ...]
    funding: tuple[tuple[str, int], ...]
    remainder_to: str
    on_budget_short: str
    monthly_cashback_cap_won: int | None
    # What the shares of `funding` add up to: 10000 (bp), or their sum (parts).
    funding_whole: int = 10_000
    # (shares by resolved funder, in the order of `funding`; the remainder's funder)
    # by `funder_facts`: the same for every event of those facts (tests/test_funders.py).
    _resolved: dict = field(default_factory=dict, init=False, repr=False, compare=False, hash=False)

    def funders(self) -> tuple[str, ...]:
        return tuple(source for source, _ in self.funding)

    def resolved_funding(self, member, merchant: MerchantFacts | None) -> tuple[tuple[tuple[str, int], ...], str]:
        """`funding` with its placeholders resolved for this member and merchant, the
        shares of one funder added up, and `remainder_to` resolved: worked out once per
        (member district, merchant district) and kept on the component."""
        key = funder_facts(member, merchant)
        hit = self._resolved.get(key)
        if hit is None:
            shares: dict[str, int] = {}
            for source, bp in self.funding:
                resolved = resolve_funder(source, member, merchant)
                shares[resolved] = shares.get(resolved, 0) + bp
            hit = self._resolved[key] = (tuple(shares.items()), resolve_funder(self.remainder_to, member, merchant))
        return hit


@dataclass(frozen=True, slots=True)
class CompiledPolicy:
    policy_id: str
    name: str
    effective_from_us: int
    layer: str
    topup_min_won: int
    topup_monthly_max_won: int
    withdrawal_used_min_bp: int
    withdrawal_small_up_to_won: int
    withdrawal_small_used_min_bp: int
    spend_order: tuple[str, ...]
    cashback_on: frozenset[str]
    declined_categories: frozenset[str]
    eligibility: CompiledConditions
    monthly_cashback_cap_won: int | None
    components: tuple[CompiledComponent, ...]
    document: PolicyDocument
    # The least monthly eligible spend at which some variant's last band ends (None: every
    # last band is open-ended): a payment whose span of the month stays below it has no
    # base beyond a last band, and the evaluator looks no further (`cashback.why`).
    # Worked out from `components`, so a merged stack (`merge_layers`) has its own.
    band_ends_from_won: int | None = field(default=None, init=False, compare=False)

    def __post_init__(self) -> None:
        ends = [variant.bands[-1].upper_won for component in self.components for variant in component.variants
                if variant.bands[-1].upper_won is not None]
        object.__setattr__(self, "band_ends_from_won", min(ends) if ends else None)

    def withdrawal_used_min_bp_for(self, charged_in_won: int) -> int:
        """The least share (bp) of `charged_in_won`, the charged money put in since the
        member's last withdrawal, that must have been used before the rest may be
        withdrawn: the small-amount share when it is at most `withdrawal_small_up_to_won`.
        With nothing put in (so nothing to withdraw) it is the share asked of more: 0 won
        is no 1만-or-less amount, and an answer saying 80% after a withdrawal misled."""
        if 0 < charged_in_won <= self.withdrawal_small_up_to_won:
            return self.withdrawal_small_used_min_bp
        return self.withdrawal_used_min_bp

    def funders(self, member: MemberFacts, merchant: MerchantFacts | None) -> set[str]:
        """Every budget source this policy could charge for an event of this member."""
        out: set[str] = set()
        for component in self.components:
            for source in component.funders():
                out.add(resolve_funder(source, member, merchant))
        return out


def funder_facts(member, merchant: MerchantFacts | None) -> tuple[str, str | None]:
    """What `resolve_funder` reads of an event's member (anything with a `district`:
    `MemberFacts`, the book's `MemberState`) and merchant: two events alike in these
    have the same funders under the same policy."""
    return member.district, (merchant.district if merchant is not None else None)


def resolve_funder(source: str, member: MemberFacts, merchant: MerchantFacts | None) -> str:
    if source == "$merchant_district":
        return merchant.district if merchant is not None else member.district
    if source == "$member_district":
        return member.district
    return source


def _bands(bands) -> tuple[CompiledBand, ...]:
    out, lower = [], 0
    for band in bands:
        out.append(CompiledBand(lower, band.up_to_won, band.rate_bp, band.rate_from is not None))
        lower = band.up_to_won if band.up_to_won is not None else lower
    return tuple(out)


def compile_policy(document: PolicyDocument, effective_from: dt.datetime | None = None) -> CompiledPolicy:
    start = effective_from or document.effective_from
    if start is None:
        raise ValueError(f"policy {document.policy_id} has no effective_from")
    components = tuple(
        CompiledComponent(
            component_id=c.id,
            variants=tuple(
                CompiledVariant(v.id, f"{c.id}/{v.id}", CompiledConditions.of(v.when), _bands(v.bands))
                for v in c.variants
            ),
            funding=tuple(c.funding.items()),
            remainder_to=c.remainder_to,  # named by the document (rules.document.Component)
            on_budget_short=c.on_budget_short,
            monthly_cashback_cap_won=c.monthly_cashback_cap_won,
            funding_whole=sum(c.funding.values()) if c.funding_unit == "parts" else 10_000,
        )
        for c in document.components
    )
    return CompiledPolicy(
        policy_id=document.policy_id,
        name=document.name,
        effective_from_us=to_us(start),
        layer=document.layer,
        topup_min_won=document.topup.min_won,
        topup_monthly_max_won=document.topup.monthly_max_won,
        withdrawal_used_min_bp=document.withdrawal.used_min_bp,
        withdrawal_small_up_to_won=document.withdrawal.small_up_to_won,
        withdrawal_small_used_min_bp=document.withdrawal.small_used_min_bp,
        spend_order=tuple(b.value for b in document.spend_order),
        cashback_on=frozenset(b.value for b in document.cashback_on),
        declined_categories=frozenset(document.declined_categories),
        eligibility=CompiledConditions.of(document.cashback_eligibility),
        monthly_cashback_cap_won=document.monthly_cashback_cap_won,
        components=components,
        document=document,
    )


class PolicyClash(ValueError):
    """Policies that cannot be in force together: two of one layer at one instant, or a
    component id used by two layers in force at once (a payment's lines and counters are
    keyed by component id)."""


def merge_layers(base: CompiledPolicy, others: list[CompiledPolicy], start_us: int) -> CompiledPolicy:
    """The stack in force: the base (city) policy with the components of every other
    layer's policy in force appended.

    A non-base policy with no components ends its layer (a district card whose budget
    ran out): it adds nothing and is left out of the merged id, so ended layers do not
    pile up in the `policy_id` every payment records."""
    others = [policy for policy in others if policy.components]
    if not others:
        return base
    components = list(base.components)
    seen = {c.component_id for c in components}
    for policy in others:
        for component in policy.components:
            if component.component_id in seen:
                raise PolicyClash(f"component id {component.component_id!r} of {policy.policy_id} is also a "
                                  f"component of another layer in force from {rfc3339(start_us)}; "
                                  "component ids must differ across layers")
            seen.add(component.component_id)
            components.append(component)
    return replace(base, policy_id="+".join([base.policy_id, *(p.policy_id for p in others)]),
                   effective_from_us=start_us, components=tuple(components))


class PolicyTimeline:
    """The policy stack in force over time.

    Within a layer, the policy whose `effective_from` is the latest at or before an
    event's `occurred_at` applies; the stacks of all layers are merged once, here, for
    every interval between two start instants, so a look-up is one bisect."""

    __slots__ = ("_starts", "_stacks", "_policies")

    def __init__(self, policies: list[CompiledPolicy]):
        by_key: dict[tuple[str, int], CompiledPolicy] = {}
        for policy in policies:
            key = (policy.layer, policy.effective_from_us)
            if key in by_key:
                raise PolicyClash(f"{policy.policy_id} and {by_key[key].policy_id} take effect in the same "
                                  f"layer at the same instant")
            by_key[key] = policy
        self._policies = sorted(policies, key=lambda p: (p.effective_from_us, p.layer))
        self._starts: list[int] = []
        self._stacks: list[CompiledPolicy | None] = []
        current: dict[str, CompiledPolicy] = {}
        for start in sorted({p.effective_from_us for p in policies}):
            for policy in self._policies:
                if policy.effective_from_us == start:
                    current[policy.layer] = policy
            base = current.get(BASE_LAYER)
            others = [current[layer] for layer in sorted(current) if layer != BASE_LAYER]
            self._starts.append(start)
            self._stacks.append(merge_layers(base, others, start) if base is not None else None)

    def in_force(self, at_us: int) -> CompiledPolicy | None:
        index = bisect.bisect_right(self._starts, at_us) - 1
        return self._stacks[index] if index >= 0 else None

    def in_force_between(self, from_us: int, to_us: int) -> list[CompiledPolicy]:
        """The stacks in force at some instant of [from, to), in order."""
        first = max(bisect.bisect_right(self._starts, from_us) - 1, 0)
        last = bisect.bisect_left(self._starts, to_us)
        return [stack for start, stack in zip(self._starts[first:last], self._stacks[first:last])
                if stack is not None and start < to_us]

    def __iter__(self):
        return iter(self._policies)

    def __len__(self) -> int:
        return len(self._policies)
