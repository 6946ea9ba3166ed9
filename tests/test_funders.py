"""`rules.compiled.funder_facts` names everything `resolve_funder` reads of an event's
member and merchant: under every policy stack in force from 2019 to 2025, two events
alike in those facts have the same funders (the book counts each alike group once when it
takes a batch's budget rows)."""

from __future__ import annotations

import dataclasses
import datetime as dt

from hypothesis import given
from hypothesis import strategies as st

from rules.compiled import funder_facts
from rules.facts import MemberFacts, MerchantFacts
from rules.loader import timeline_from_dir
from tests.conftest import POLICIES

TIMELINE = timeline_from_dir(POLICIES)
STACKS = {id(p): p for p in (TIMELINE.in_force(us) for us in range(
    1_546_300_800_000_000, 1_767_225_600_000_000, 7 * 86_400_000_000)) if p is not None}  # every week, 2019-2025
DISTRICTS = ["seo", "namdong", "ganghwa", "bupyeong", "yeonsu", "ongjin"]

members = st.builds(MemberFacts, st.sampled_from(["a", "b"]), st.sampled_from(DISTRICTS),
                    st.sampled_from(["active", "suspended"]))
merchants = st.none() | st.builds(
    MerchantFacts, st.sampled_from(["s1", "s2"]), st.sampled_from(DISTRICTS),
    st.sampled_from(["restaurant", "grocery", "academy"]), st.integers(0, 10_000_000_000),
    st.just(dt.date(2019, 1, 1)), st.frozensets(st.sampled_from(["winwin", "franchise"])), st.integers(0, 1_000))


def test_the_stacks_include_a_district_funder_and_a_split_in_parts():
    assert len(STACKS) > 5
    assert any(source.startswith("$") for p in STACKS.values() for c in p.components for source, _ in c.funding)
    assert any(c.funding_whole != 10_000 for p in STACKS.values() for c in p.components)


@given(members, merchants, members, merchants)
def test_events_alike_in_funder_facts_have_the_same_funders(member_a, merchant_a, member_b, merchant_b):
    # b made alike to a in the funder facts, every other fact left as drawn
    member_b = MemberFacts(member_b.member_id, member_a.district, member_b.status)
    if merchant_a is None:
        merchant_b = None
    elif merchant_b is not None:
        merchant_b = dataclasses.replace(merchant_b, district=merchant_a.district)
    else:
        merchant_b = dataclasses.replace(merchant_a, merchant_id="other", category="academy", flags=frozenset())
    assert funder_facts(member_a, merchant_a) == funder_facts(member_b, merchant_b)
    for policy in STACKS.values():
        assert policy.funders(member_a, merchant_a) == policy.funders(member_b, merchant_b)


@given(members, merchants, members, merchants)
def test_events_with_other_funders_differ_in_funder_facts(member_a, merchant_a, member_b, merchant_b):
    for policy in STACKS.values():
        if policy.funders(member_a, merchant_a) != policy.funders(member_b, merchant_b):
            assert funder_facts(member_a, merchant_a) != funder_facts(member_b, merchant_b)


@given(members, merchants, st.integers(1, 10**9))
def test_the_evaluators_funding_is_split_floor_over_the_funders_resolved_per_event(member, merchant, amount):
    """`_fund` splits with its own copy of `split_floor` over the component's funding as
    resolved and kept per (member district, merchant district): with no budget limit it
    pays exactly `split_floor` of the funding resolved for this very event."""
    from rules.compiled import resolve_funder
    from rules.evaluate import _fund, split_floor
    from rules.facts import BudgetView, PaymentEvent

    event = PaymentEvent(amount, 0, dt.date(2025, 11, 14), member, merchant)
    for policy in STACKS.values():
        for component in policy.components:
            shares: dict[str, int] = {}
            for source, bp in component.funding:
                resolved = resolve_funder(source, member, merchant)
                shares[resolved] = shares.get(resolved, 0) + bp
            expected = split_floor(amount, tuple(shares.items()),
                                   resolve_funder(component.remainder_to, member, merchant), component.funding_whole)
            used: dict[str, int] = {}
            funded, paid, short, _ = _fund(component, event, amount, BudgetView(), used, None)
            assert funded == tuple((s, v) for s, v in expected.items() if v > 0)
            assert paid == amount == sum(expected.values()) and short == ""
            assert used == expected
