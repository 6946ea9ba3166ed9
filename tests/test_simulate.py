"""Simulation: the vectorised evaluator (`rules.simulate`) gives what the pure evaluator
(`rules.evaluate.evaluate_payment`) gives, won for won, line for line; and
`settlement.simulate.simulate` / `corrections` over a recorded book of record.

The reference is the pure evaluator run payment by payment in occurred_at order, with
the member's month threaded through `MonthSoFar` as the book does and an unlimited
`BudgetView` (the simulation applies no budgets). Units: 만 = 10,000 won."""

from __future__ import annotations

import datetime as dt
from bisect import bisect_right
from dataclasses import dataclass
from pathlib import Path

import polars as pl
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from ledger import registry
from ledger.book import Book
from ledger.db import make_engine
from rules.compiled import CompiledPolicy, PolicyTimeline, compile_policy
from rules.document import BASE_LAYER, CITY_ONLY, DISTRICTS, INPUT, PolicyDocument
from rules.evaluate import evaluate_payment
from rules.facts import (
    BudgetView,
    GrantLot,
    GrantProgramFacts,
    GrantRestrictions,
    MemberFacts,
    MerchantFacts,
    MonthSoFar,
    PaymentDecision,
    PaymentEvent,
    Wallet,
)
from rules.loader import load_policy_file, validate_policy_data
from rules.simulate import Evaluation, MonthStart, evaluate_frame, month_key
from rules.timeutil import local_date, local_midnight_us, month_of
from settlement import datagen
from settlement.simulate import correction_plan, corrections, simulate, with_draft

ROOT = Path(__file__).resolve().parent.parent
POLICIES = ROOT / "policies"
MAN = 10_000
EOK = 100_000_000
US_PER_S = 1_000_000
DAY0 = dt.date(2025, 9, 24)  # the generated payments run 14 days from here, into October
DAYS = 14

PROGRAM_EARNS = GrantProgramFacts("g-earns", 0, 2**62, True, GrantRestrictions(), (("city", 10_000),), "city")
PROGRAM_PLAIN = GrantProgramFacts("g-plain", 0, 2**62, False, GrantRestrictions(), (("city", 10_000),), "city")


def at_us(day: dt.date, seconds: int = 12 * 3600) -> int:
    return local_midnight_us(day) + seconds * US_PER_S


def policy_from(data: dict) -> CompiledPolicy:
    """The policy as a document is read, without what only a new one is refused for
    (`PolicyDocument.input_problems`): the drawn caps of 0 won are what documents stored
    by an earlier release still hold, and still evaluate."""
    return compile_policy(PolicyDocument.model_validate(data, context={INPUT: True}))


def policy_file(name: str) -> CompiledPolicy:
    return compile_policy(load_policy_file(POLICIES / name))


# ---------------------------------------------------------------- the reference and the frame


@dataclass(frozen=True)
class Payment:
    payment_id: str
    member: MemberFacts
    merchant: MerchantFacts
    occurred_at_us: int
    charged_won: int
    points_won: int = 0
    grant_earning_won: int = 0  # from a program with cashback_on_spend
    grant_plain_won: int = 0

    @property
    def amount_won(self) -> int:
        return self.charged_won + self.points_won + self.grant_earning_won + self.grant_plain_won


def member(member_id: str, district: str = "seo") -> MemberFacts:
    return MemberFacts(member_id, district, "active")


def merchant(merchant_id: str, district: str = "seo", *, category: str = "restaurant", sales_won: int = 1 * EOK,
             flags: tuple[str, ...] = (), share_bp: int = 0) -> MerchantFacts:
    return MerchantFacts(merchant_id, district, category, sales_won, dt.date(2019, 1, 1), frozenset(flags), share_bp)


def run_pure(policy: CompiledPolicy | PolicyTimeline, payments: list[Payment],
             start: dict[tuple[str, str], MonthSoFar] | None = None, *,
             as_given: bool = False) -> dict[str, PaymentDecision]:
    """evaluate_payment one payment after the other, the month threaded as the book does:
    in time order, or with `as_given` in the list's order (as the book pays them)."""
    months: dict[tuple[str, str], MonthSoFar] = dict(start or {})
    out = {}
    for p in payments if as_given else sorted(payments, key=lambda p: (p.occurred_at_us, p.payment_id)):
        stack = policy if isinstance(policy, CompiledPolicy) else policy.in_force(p.occurred_at_us)
        day = local_date(p.occurred_at_us)
        key = (p.member.member_id, month_of(day))
        month = months.get(key, MonthSoFar())
        lots = tuple(GrantLot(program, amount) for program, amount in
                     ((PROGRAM_EARNS, p.grant_earning_won), (PROGRAM_PLAIN, p.grant_plain_won)) if amount)
        wallet = Wallet(p.charged_won, p.points_won, lots)  # exactly the split: any spend order spends it all
        event = PaymentEvent(p.amount_won, p.occurred_at_us, day, p.member, p.merchant)
        decision = evaluate_payment(event, stack, month, wallet, BudgetView())
        if decision.approved:
            components = dict(month.component_cashback_won)
            for line in decision.lines:
                components[line.component_id] = components.get(line.component_id, 0) + line.amount_won
            months[key] = MonthSoFar(
                month.eligible_spend_won + (decision.base_won if decision.counts_toward_month else 0),
                month.cashback_won + decision.cashback_won, 0, components)
        out[p.payment_id] = decision
    return out


def frame_of(payments: list[Payment]) -> pl.DataFrame:
    rows = [{
        "payment_id": p.payment_id, "member_id": p.member.member_id, "member_district": p.member.district,
        "merchant_id": p.merchant.merchant_id, "merchant_district": p.merchant.district,
        "category": p.merchant.category, "annual_sales_won": p.merchant.annual_sales_won,
        "flags": sorted(p.merchant.flags), "merchant_share_bp": p.merchant.merchant_share_bp,
        "amount_won": p.amount_won, "occurred_at_us": p.occurred_at_us, "spent_charged_won": p.charged_won,
        "spent_points_won": p.points_won, "spent_grants_won": p.grant_earning_won + p.grant_plain_won,
        "grant_cashback_won": p.grant_earning_won,
    } for p in payments]
    return pl.DataFrame(rows, schema_overrides={"flags": pl.List(pl.String)})


def month_start(start: dict[tuple[str, str], MonthSoFar]) -> MonthStart:
    months = [(m, month_key(mo), s.eligible_spend_won, s.cashback_won) for (m, mo), s in start.items()]
    comps = [(m, month_key(mo), c, v) for (m, mo), s in start.items() for c, v in s.component_cashback_won.items()]
    empty = MonthStart.empty()
    return MonthStart(pl.DataFrame(months, schema=empty.months.schema, orient="row"),
                      pl.DataFrame(comps, schema=empty.components.schema, orient="row"))


def by_payment(evaluation: Evaluation, payments: list[Payment], column: str) -> dict:
    """payment_id -> a column of the evaluation's payments (`row` is the frame position)."""
    frame = evaluation.payments.select("row", pl.col(column).cast(pl.String) if column == "policy_id" else column)
    return {payments[row].payment_id: value for row, value in frame.iter_rows()}


def vector_decisions(evaluation: Evaluation, payments: list[Payment]) -> dict[str, tuple]:
    ids = [p.payment_id for p in payments]
    funding: dict[tuple[int, str, int], list] = {}
    for row, component_id, band, _entry, source, amount in evaluation.funding.sort("row", "component_id", "band",
                                                                                   "entry").iter_rows():
        funding.setdefault((row, component_id, band), []).append((source, amount))
    lines: dict[int, list] = {}
    for r in evaluation.lines.iter_rows(named=True):
        lines.setdefault(r["row"], []).append((
            r["component_id"], r["rule"], r["band"], r["rate_bp"], r["base_won"], r["amount_won"],
            tuple(funding.get((r["row"], r["component_id"], r["band"]), ())), r["reason"]))
    out = {}
    for r in evaluation.payments.iter_rows(named=True):
        out[ids[r["row"]]] = (not r["declined"], r["base_won"], r["counts_toward_month"],
                              sorted(lines.get(r["row"], []), key=lambda line: (line[0], line[2])))
    return out


def pure_view(decision: PaymentDecision) -> tuple:
    lines = sorted(((line.component_id, line.rule, line.band, line.rate_bp, line.base_won, line.amount_won,
                     line.funded_by, line.reason) for line in decision.lines), key=lambda line: (line[0], line[2]))
    if not decision.approved:
        return (False, 0, False, [])
    return (True, decision.base_won, decision.counts_toward_month, lines)


def assert_same(policy, payments: list[Payment], start: dict[tuple[str, str], MonthSoFar] | None = None, *,
                time_order: bool = False, chunk_rows_max: int = 1_000, as_given: bool = False) -> Evaluation:
    """`time_order`: hand the frame over in (occurred_at, payment_id) order, as a
    simulation reads the book (the evaluator's fast path); otherwise in the order given.
    `as_given`: evaluate in the list's order, as the book paid them (a correction's
    plan), against evaluate_payment in that order.
    `chunk_rows_max`: small values cut the member-months into several chunks."""
    pure = run_pure(policy, payments, start, as_given=as_given)
    if time_order:
        payments = sorted(payments, key=lambda p: (p.occurred_at_us, p.payment_id))
    evaluation = evaluate_frame(policy, frame_of(payments), month_start(start or {}), explain=True,
                                chunk_rows_max=chunk_rows_max, as_given=as_given)
    vector = vector_decisions(evaluation, payments)
    for p in payments:
        assert vector[p.payment_id] == pure_view(pure[p.payment_id]), p.payment_id
    cashback = by_payment(evaluation, payments, "cashback_won")
    assert cashback == {pid: d.cashback_won if d.approved else 0 for pid, d in pure.items()}
    return evaluation


# ---------------------------------------------------------------- random policies in the document format

CATEGORIES = ("restaurant", "pharmacy", "cafe", "grocery", "casino")
SOME_DISTRICTS = ("seo", "jung", "ganghwa", "namdong")
FLAGS = ("good_price", "winwin")
FUNDER_CHOICES = ("national", "city", "merchant", "seo", "jung", "$merchant_district", "$member_district")
WEEKDAY_NAMES = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")


def sometimes(draw, p_in_20: int = 4) -> bool:
    return draw(st.integers(0, 19)) < p_in_20


@st.composite
def conditions(draw, p_in_20: int = 2) -> dict:
    """Each condition present with probability p_in_20 / 20 (13 kinds: most blocks hold
    for some payments, so that the lines behind them are reached)."""
    c: dict = {}
    if sometimes(draw, 6):  # sales tiers are the commonest condition of the real policies
        lo, hi = draw(st.sampled_from([(None, 3 * EOK), (1 * EOK, None), (1 * EOK, 30 * EOK), (None, 30 * EOK)]))
        c |= {k: v for k, v in (("merchant_sales_min_won", lo), ("merchant_sales_max_won", hi)) if v is not None}
    for name, pool in (("categories_include", CATEGORIES), ("categories_exclude", CATEGORIES),
                       ("merchant_districts", SOME_DISTRICTS), ("merchant_districts_exclude", SOME_DISTRICTS),
                       ("member_districts", SOME_DISTRICTS), ("merchant_flags_all", FLAGS),
                       ("merchant_flags_none", FLAGS), ("weekdays", WEEKDAY_NAMES)):
        if sometimes(draw, p_in_20):
            c[name] = sorted(draw(st.sets(st.sampled_from(pool), max_size=len(pool) - 1)))
    if sometimes(draw, p_in_20):
        c["same_district"] = draw(st.booleans())
    if sometimes(draw, p_in_20):
        first = draw(st.integers(0, DAYS))
        last = draw(st.integers(first, DAYS + 1))
        if draw(st.booleans()):
            c["date_from"] = (DAY0 + dt.timedelta(days=first)).isoformat()
        if draw(st.booleans()):
            c["date_until"] = (DAY0 + dt.timedelta(days=last)).isoformat()
    return c


@st.composite
def bands(draw) -> list[dict]:
    ups = sorted(draw(st.sets(st.sampled_from([2 * MAN, 5 * MAN, 10 * MAN, 20 * MAN, 30 * MAN, 50 * MAN]),
                              min_size=1, max_size=3)))
    if draw(st.booleans()):
        ups[-1] = None
    out = []
    for up in ups:
        if sometimes(draw):
            out.append({"up_to_won": up, "rate_from": "merchant_share_bp"})
        else:
            rate_bp = draw(st.sampled_from([0, 1, 77, 333, 700, 900, 1000, 1500, 10_000]))
            out.append({"up_to_won": up, "rate_bp": rate_bp})
    return out


@st.composite
def funding(draw) -> tuple[dict, str | None, bool]:
    """Shares in bp summing to 10000, or now and then in parts (any whole numbers)."""
    sources = draw(st.lists(st.sampled_from(FUNDER_CHOICES), min_size=1, max_size=3, unique=True))
    if sometimes(draw, 4):
        shares = {source: draw(st.integers(1, 7)) for source in sources}
        return shares, draw(st.one_of(st.none(), st.sampled_from(sources))), True
    cuts = sorted(draw(st.sets(st.integers(1, 9_999), min_size=len(sources) - 1, max_size=len(sources) - 1)))
    edges = [0, *cuts, 10_000]
    shares = {source: edges[i + 1] - edges[i] for i, source in enumerate(sources)}
    return shares, draw(st.one_of(st.none(), st.sampled_from(sources))), False


@st.composite
def component(draw, component_id: str) -> dict:
    shares, remainder_to, in_parts = draw(funding())
    count = draw(st.integers(1, 3))
    variants = [{"id": f"v{i}", "when": draw(conditions()), "bands": draw(bands())} for i in range(count)]
    if draw(st.booleans()):
        variants[-1]["when"] = {}
    out = {"id": component_id, "funding": shares, "variants": variants}
    if in_parts:
        out["funding_unit"] = "parts"
    if remainder_to:
        out["remainder_to"] = remainder_to
    if sometimes(draw, 10):
        out["monthly_cashback_cap_won"] = draw(st.sampled_from([0, 700, 3_000, 15_000]))
    return out


@st.composite
def policy_data(draw, policy_id: str, effective_from: str, layer: str = "city", prefix: str = "c") -> dict:
    data = {
        "policy_id": policy_id, "name": policy_id, "effective_from": effective_from, "layer": layer,
        "cashback_on": sorted(draw(st.sets(st.sampled_from(["charged", "points", "grants"]), min_size=1))),
        "declined_categories": sorted(draw(st.sets(st.sampled_from(CATEGORIES), max_size=1))),
        "cashback_eligibility": draw(conditions(1)),
        "components": [draw(component(f"{prefix}{i}")) for i in range(draw(st.integers(1, 3)))],
    }
    if sometimes(draw, 10):
        data["monthly_cashback_cap_won"] = draw(st.sampled_from([4_000, 9_000, 20_000, 40_000]))
    if layer != BASE_LAYER:  # only the city layer's policy sets these (PolicyDocument.layer_problems)
        data = {key: value for key, value in data.items() if key not in CITY_ONLY}
    return data


def instant(draw) -> str:
    moment = dt.datetime.combine(DAY0, dt.time(0), tzinfo=dt.timezone(dt.timedelta(hours=9)))
    moment += dt.timedelta(days=draw(st.integers(1, DAYS - 1)), seconds=draw(st.integers(0, 86_399)))
    return moment.isoformat()


@st.composite
def stacks(draw) -> CompiledPolicy | PolicyTimeline:
    """A single stack applied to every payment, or a timeline: a city policy, perhaps a
    second one from some instant (same component ids: their caps carry over), perhaps a
    second layer."""
    first = policy_from(draw(policy_data("p-city-1", "2025-09-01T00:00:00+09:00")))
    if draw(st.booleans()):
        return first
    policies = [first]
    if draw(st.booleans()):
        policies.append(policy_from(draw(policy_data("p-city-2", instant(draw)))))
    if draw(st.booleans()):
        policies.append(policy_from(draw(policy_data("p-extra", instant(draw), "extra", "x"))))
    return PolicyTimeline(policies)


@st.composite
def scenarios(draw):
    policy = draw(stacks())
    members = [member(f"m{i}", draw(st.sampled_from(SOME_DISTRICTS))) for i in range(3)]
    merchants = [merchant(f"s{i}", draw(st.sampled_from(SOME_DISTRICTS)), category=draw(st.sampled_from(CATEGORIES)),
                          sales_won=draw(st.sampled_from([EOK // 2, 1 * EOK, 3 * EOK, 10 * EOK, 30 * EOK, 50 * EOK])),
                          flags=tuple(draw(st.sets(st.sampled_from(FLAGS)))),
                          share_bp=draw(st.sampled_from([0, 100, 250, 500])))
                 for i in range(4)]
    amounts = st.one_of(st.just(0), st.integers(1, 9_999), st.integers(10_000, 200_000))
    payments = []
    for i in range(draw(st.integers(1, 30))):
        split = [draw(amounts), draw(st.sampled_from([0, 0, 1_500, 40_000])),
                 draw(st.sampled_from([0, 0, 3_000, 60_000])), draw(st.sampled_from([0, 0, 5_000]))]
        if sum(split) == 0:
            split[0] = 10_000
        day = DAY0 + dt.timedelta(days=draw(st.integers(0, DAYS - 1)))
        seconds = draw(st.sampled_from([0, 1, 43_200, 86_399]) | st.integers(0, 86_399))
        payments.append(Payment(f"p{i:03d}", draw(st.sampled_from(members)), draw(st.sampled_from(merchants)),
                                at_us(day, seconds), *split))
    start = {}
    component_ids = sorted({c.component_id for p in _policies(policy) for c in p.components})
    for m in members:
        if draw(st.booleans()):
            comps = {c: draw(st.sampled_from([0, 500, 5_000, 20_000])) for c in component_ids if draw(st.booleans())}
            spent = draw(st.sampled_from([0, 123_456, 290_000, 600_000]))
            earned = draw(st.sampled_from([0, 1_000, 3_999, 19_000, 50_000]))
            start[(m.member_id, "2025-09")] = MonthSoFar(spent, earned, 0, comps)
    order = draw(st.sampled_from(["time", "given", "as_given"]))
    return policy, payments, start, order, draw(st.sampled_from([3, 1_000, 1_000]))


def _policies(policy) -> list[CompiledPolicy]:
    return [policy] if isinstance(policy, CompiledPolicy) else list(policy)


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(scenarios())
def test_vectorised_equals_pure_evaluator_won_for_won(scenario):
    policy, payments, start, order, chunk_rows_max = scenario
    evaluation = assert_same(policy, payments, start, time_order=order == "time", chunk_rows_max=chunk_rows_max,
                             as_given=order == "as_given")
    event(f"order: {order}")
    if order == "as_given" and not isinstance(policy, CompiledPolicy):
        starts = sorted({p.effective_from_us for p in policy})
        last: dict[tuple[str, str], int] = {}
        for p in payments:  # a member-month going back to an earlier interval: evaluated in passes
            key, interval = (p.member.member_id, month_of(local_date(p.occurred_at_us))), bisect_right(
                starts, p.occurred_at_us)
            if interval < last.get(key, interval):
                event("as given: a member-month goes back to an earlier policy interval")
            last[key] = interval
    lines, payments_out = evaluation.lines, evaluation.payments
    event(f"stack: {'single' if isinstance(policy, CompiledPolicy) else f'timeline of {len(policy)}'}")
    event(f"lines: {'none' if lines.is_empty() else 'some'}; paid > 0: {bool((lines['amount_won'] > 0).any())}")
    for reason in set(lines["reason"].cast(pl.String)) - {""}:
        event(f"reason {reason}")
    if (lines["band"] > 1).any():
        event("a later band earned")
    if payments_out["declined"].any():
        event("a payment declined (category or no policy)")
    if (evaluation.funding.group_by("row", "component_id", "band").len()["len"] > 1).any():
        event("a line split between funders")


# ---------------------------------------------------------------- worked examples


def test_2025_09_band_position_tiers_and_ganghwa():
    """incheon-2025-09: 10% (15% in Ganghwa/Ongjin) on the first 30만 of the month,
    nothing above 30억. The member had spent 25만 before the range."""
    policy = policy_file("2025-09-all-under-30eok.yaml")
    me = member("m1", "seo")
    seo, ganghwa, big = merchant("s-seo"), merchant("s-gh", "ganghwa"), merchant("s-big", sales_won=31 * EOK)
    day = dt.date(2025, 9, 15)
    payments = [
        Payment("a", me, big, at_us(day, 100), 10 * MAN),       # above 30억: no base, not counted
        Payment("b", me, seo, at_us(day, 200), 3 * MAN),        # 25만 → 28만: 3,000
        Payment("c", me, ganghwa, at_us(day, 300), 4 * MAN),    # 28만 → 32만: 2만 in band × 15% = 3,000
        Payment("d", me, seo, at_us(day, 400), 1 * MAN),        # beyond the last band: no line
    ]
    start = {("m1", "2025-09"): MonthSoFar(25 * MAN, 25_000, 0, {"city": 25_000})}
    ev = assert_same(policy, payments, start)
    assert by_payment(ev, payments, "cashback_won") == {"a": 0, "b": 3_000, "c": 3_000, "d": 0}
    assert by_payment(ev, payments, "counts_toward_month") == {"a": False, "b": True, "c": True, "d": True}
    funders = ev.funding.group_by("source").agg(pl.col("amount_won").sum()).sort("source")
    # national 40%, city the rest: 1,200 + 1,200 and 1,800 + 1,800
    assert dict(funders.iter_rows()) == {"national": 2_400, "city": 3_600}


def test_seo_notice_winwin_stack_8500():
    """Seo-gu's notice: 50,000 × (10% + 2% + 5%) = 8,500 at a ≤ 30억 상생 merchant in
    Seo-gu sharing 5%, with 2025-09's city rate and the win-win layer stacked."""
    timeline = PolicyTimeline([policy_file("2025-09-all-under-30eok.yaml"), policy_file("2023-01-winwin.yaml")])
    shop = merchant("s-ww", "seo", flags=("winwin",), share_bp=500)
    ev = assert_same(timeline, [Payment("p", member("m1", "namdong"), shop, at_us(dt.date(2025, 9, 10)), 5 * MAN)])
    assert ev.payments["cashback_won"].to_list() == [8_500]
    by_source = dict(ev.funding.group_by("source").agg(pl.col("amount_won").sum()).iter_rows())
    # city 5,000 = national 2,000 + city 3,000; merchant 2,500; the merchant's district 1,000
    assert by_source == {"national": 2_000, "city": 3_000, "merchant": 2_500, "seo": 1_000}


def test_caps_cut_in_order_component_then_total():
    """A 2,000 component cap and a 2,500 total cap: lines are cut in the order the pure
    evaluator visits them (payment, component, band), and say why."""
    data = {
        "policy_id": "caps", "name": "caps", "effective_from": "2025-09-01T00:00:00+09:00",
        "monthly_cashback_cap_won": 2_500,
        "components": [
            {"id": "a", "funding": {"national": 5_000, "$member_district": 5_000}, "monthly_cashback_cap_won": 2_000,
             "variants": [{"id": "all", "bands": [{"up_to_won": 10 * MAN, "rate_bp": 1_000},
                                                  {"up_to_won": None, "rate_bp": 333}]}]},
            {"id": "b", "funding": {"city": 10_000},
             "variants": [{"id": "all", "bands": [{"up_to_won": None, "rate_bp": 100}]}]},
        ],
    }
    policy = policy_from(data)
    me, shop = member("m1", "jung"), merchant("s1")
    day = dt.date(2025, 9, 2)
    payments = [Payment("p1", me, shop, at_us(day, 1), 15_000), Payment("p2", me, shop, at_us(day, 2), 15_000),
                Payment("p3", me, shop, at_us(day, 3), 90_000)]
    ev = assert_same(policy, payments)
    lines = ev.lines.sort("row", "component_id", "band").select(
        pl.col("row"), pl.col("component_id").cast(pl.String), "band", "amount_won", pl.col("reason").cast(pl.String))
    assert lines.rows() == [
        (0, "a", 1, 1_500, ""), (0, "b", 1, 150, ""),                  # 1,650 so far
        (1, "a", 1, 500, "component_cap"), (1, "b", 1, 150, ""),      # a reaches 2,000; 2,300 so far
        (2, "a", 1, 0, "component_cap"), (2, "a", 2, 0, "component_cap"), (2, "b", 1, 200, "total_cap"),
    ]
    # 500 split 50/50 national and the member's district (jung)
    assert ev.funding.filter(pl.col("row") == 1).select("source", "amount_won").rows() == \
        [("national", 250), ("jung", 250), ("city", 150)]


def test_timeline_carries_the_month_across_a_policy_change():
    """10% on the first 30만 until the 15th, then 5% on the first 30만: spend and the
    component's cashback carry across the change (same component id)."""
    def city(pid: str, start: str, rate: int) -> CompiledPolicy:
        return policy_from({"policy_id": pid, "name": pid, "effective_from": start, "components": [
            {"id": "city", "funding": {"city": 10_000}, "monthly_cashback_cap_won": 25_000,
             "variants": [{"id": "all", "bands": [{"up_to_won": 30 * MAN, "rate_bp": rate}]}]}]})
    timeline = PolicyTimeline([city("ten", "2025-09-01T00:00:00+09:00", 1_000),
                               city("five", "2025-09-15T00:00:00+09:00", 500)])
    me, shop = member("m1"), merchant("s1")
    payments = [Payment("p1", me, shop, at_us(dt.date(2025, 9, 10)), 20 * MAN),   # 20,000
                Payment("p2", me, shop, at_us(dt.date(2025, 9, 20)), 20 * MAN)]   # 10만 × 5% = 5,000, capped at 25,000
    ev = assert_same(timeline, payments)
    assert by_payment(ev, payments, "cashback_won") == {"p1": 20_000, "p2": 5_000}
    assert by_payment(ev, payments, "policy_id") == {"p1": "ten", "p2": "five"}


def test_weekend_promotion_by_seoul_date_and_weekday():
    """A +5% weekend promotion (sat, sun) from 2025-09-06 to 2025-09-14 on top of 10%:
    the day and weekday are Seoul's, so 23:59:59 Friday earns 10% and 00:00 Saturday 15%
    (Friday 15:00 UTC); Monday and the weekend after the window earn 10%."""
    promo = policy_from({"policy_id": "weekend", "name": "weekend", "effective_from": "2025-09-01T00:00:00+09:00",
                         "components": [
                             {"id": "city", "funding": {"city": 10_000},
                              "variants": [{"id": "all", "bands": [{"up_to_won": None, "rate_bp": 1_000}]}]},
                             {"id": "weekend", "funding": {"$member_district": 10_000},
                              "variants": [{"id": "w", "when": {"weekdays": ["sat", "sun"], "date_from": "2025-09-06",
                                                                "date_until": "2025-09-14"},
                                            "bands": [{"up_to_won": None, "rate_bp": 500}]}]}]})
    me, shop = member("m1", "ganghwa"), merchant("s1")
    friday, saturday = dt.date(2025, 9, 5), dt.date(2025, 9, 6)
    payments = [Payment("fri-late", me, shop, at_us(friday, 86_399), 10_000),
                Payment("sat-midnight", me, shop, at_us(saturday, 0), 10_000),
                Payment("sun", me, shop, at_us(dt.date(2025, 9, 14), 86_399), 10_000),
                Payment("mon", me, shop, at_us(dt.date(2025, 9, 8)), 10_000),
                Payment("sat-after", me, shop, at_us(dt.date(2025, 9, 20)), 10_000)]
    assert at_us(saturday, 0) % 86_400_000_000 == 15 * 3_600_000_000  # Friday 15:00 UTC
    ev = assert_same(promo, payments)
    assert by_payment(ev, payments, "cashback_won") == \
        {"fri-late": 1_000, "sat-midnight": 1_500, "sun": 1_500, "mon": 1_000, "sat-after": 1_000}
    assert set(ev.funding.filter(pl.col("component_id") == "weekend")["source"].cast(pl.String)) == {"ganghwa"}


# ---------------------------------------------------------------- simulate() and corrections() over a book


def standard_policy(rate_bp: int, *, pharmacy_bp: int | None = None, policy_id: str = "sim-city") -> CompiledPolicy:
    """10%-style city cashback on the first 30만, national 4 / city 6 of 10; optionally
    another rate at pharmacies. Charged money is spent first, so that the points the
    cashback brings (which earn nothing) do not shrink the next payment's base and the
    worked figures below stay whole amounts."""
    variants = [{"id": "standard", "bands": [{"up_to_won": 30 * MAN, "rate_bp": rate_bp}]}]
    if pharmacy_bp is not None:
        variants.insert(0, {"id": "pharmacy", "when": {"categories_include": ["pharmacy"]},
                            "bands": [{"up_to_won": 30 * MAN, "rate_bp": pharmacy_bp}]})
    return policy_from({"policy_id": policy_id, "name": policy_id, "effective_from": "2023-01-01T00:00:00+09:00",
                        "topup": {"min_won": 10_000, "monthly_max_won": 2_000_000},
                        "spend_order": ["charged", "points", "grants"],
                        "components": [{"id": "city", "funding": {"national": 4_000, "city": 6_000},
                                        "remainder_to": "city", "variants": variants}]})


def recorded_book(url: str, timeline: PolicyTimeline, members: dict[str, str], merchants: list[dict],
                  commands: list, declines: tuple[str, ...] = ()) -> object:
    """The commands booked one by one under `timeline`: each approved, or declined with
    one of `declines` (a book run under a draft that declines what the first book paid)."""
    engine = make_engine(url)
    with engine.begin() as conn:
        for member_id, district in members.items():
            registry.put_member(conn, member_id=member_id, district=district, status="active", actor="test")
        for m in merchants:
            registry.put_merchant(conn, merchant_id=m["id"], name=m["id"], district=m.get("district", "seo"),
                                  category=m.get("category", "restaurant"), annual_sales_won=m.get("sales", EOK),
                                  registered_from=dt.date(2019, 1, 1), flags=[], merchant_share_bp=0, actor="test")
    book = Book(engine, timeline)
    outcomes = [book.execute([command])[0] for command in commands]  # a refund never shares its payment's batch
    assert all(o.ok and (o.body.get("status") in (None, "approved") or o.body.get("decline_code") in declines)
               for o in outcomes), outcomes
    return engine


def test_simulate_against_the_recorded_book(db_url):
    """Recorded under 10%: re-evaluated under the same policy nothing changes (also with
    a whole and a partial refund); under 12% everyone in band gains 2 points."""
    ten = standard_policy(1_000)
    day = dt.date(2025, 9, 2)
    members = {"m1": "seo", "m2": "jung", "m3": "seo"}
    cmds = [datagen.topup(f"t-{m}", m, 1_000_000, at_us(dt.date(2025, 9, 1))) for m in members]
    cmds += [
        datagen.pay("p1", "m1", "s1", 20 * MAN, at_us(day, 100)),   # before `from`: the month starts at 20만
        datagen.pay("p2", "m1", "s1", 10 * MAN, at_us(day, 200)),
        datagen.pay("p3", "m2", "s2", 3_333, at_us(day, 300)),
        datagen.pay("p4", "m3", "s1", 5 * MAN, at_us(day, 400)),
        datagen.pay("p5", "m3", "s1", 4 * MAN, at_us(day, 500)),
    ]
    cmds += [datagen.refund("r4", "p4", 5 * MAN, at_us(day, 600)),   # whole refund
             datagen.refund("r5", "p5", 1 * MAN, at_us(day, 700))]   # partial: 3만 left
    engine = recorded_book(db_url, PolicyTimeline([ten]), members,
                           [{"id": "s1"}, {"id": "s2", "district": "jung"}], cmds)
    start, end = at_us(day, 150), at_us(dt.date(2025, 10, 1), 0)   # p1 is before the range

    same = simulate(engine, ten, start, end)
    assert same["totals"] == {"simulated_won": 10_000 + 333 + 3_000, "actual_won": 13_333, "delta_won": 0}
    assert same["members"]["affected"] == 0 and same["payments"]["count"] == 4
    # national 40% floored, the remainder to the city: 3,333 → 133 + 200
    assert same["by_funder"] == [{"source": "city", "simulated_won": 8_000, "actual_won": 8_000, "delta_won": 0},
                                 {"source": "national", "simulated_won": 5_333, "actual_won": 5_333, "delta_won": 0}]
    assert same["budgets"].startswith("budgets not applied")

    twelve = simulate(engine, standard_policy(1_200, policy_id="sim-12"), start, end)
    # m1: p2 from 20만 to 30만 → 12,000; m2: 3,333 → 399; m3: p5's 3만 left → 3,600
    assert twelve["totals"] == {"simulated_won": 15_999, "actual_won": 13_333, "delta_won": 2_666}
    assert twelve["members"] == {"with_payments": 3, "affected": 3, "gaining": 3, "losing": 0,
                                      "gained_won": 2_666, "lost_won": 0}
    assert [d["member_id"] for d in twelve["member_differences"]] == ["m1", "m2", "m3"]
    assert twelve["by_merchant_district"] == [
        {"merchant_district": "jung", "simulated_won": 399, "actual_won": 333, "delta_won": 66},
        {"merchant_district": "seo", "simulated_won": 15_600, "actual_won": 13_000, "delta_won": 2_600}]
    assert [t["tier"] for t in twelve["by_merchant_tier"]] == ["le_3eok"]
    assert twelve["by_component"][0]["component_id"] == "city"

    # The same, against the in-force timeline re-evaluated instead of the recorded figures.
    baseline = simulate(engine, standard_policy(1_200, policy_id="sim-12"), start, end,
                        actual_timeline=PolicyTimeline([ten]))
    assert baseline["totals"]["actual_won"] == 13_333 and baseline["recorded"]["cashback_won"] == 13_333


def test_simulate_starts_from_the_recorded_month(db_url):
    """A draft with 5% up to 10만 from the 15th: a member who had spent 25만 earlier in
    the month is already past its band; a member starting fresh earns 5% on 10만."""
    ten = standard_policy(1_000)
    draft = policy_from({"policy_id": "draft", "name": "draft", "effective_from": "2025-09-15T00:00:00+09:00",
                         "components": [{"id": "city", "funding": {"city": 10_000}, "variants": [
                             {"id": "all", "bands": [{"up_to_won": 10 * MAN, "rate_bp": 500}]}]}]})
    cmds = [datagen.topup("t1", "m1", 1_000_000, at_us(dt.date(2025, 9, 1))),
            datagen.topup("t2", "m2", 1_000_000, at_us(dt.date(2025, 9, 1))),
            datagen.pay("early", "m1", "s1", 25 * MAN, at_us(dt.date(2025, 9, 3))),
            datagen.pay("late1", "m1", "s1", 20 * MAN, at_us(dt.date(2025, 9, 20))),
            datagen.pay("late2", "m2", "s1", 20 * MAN, at_us(dt.date(2025, 9, 20)))]
    engine = recorded_book(db_url, PolicyTimeline([ten]), {"m1": "seo", "m2": "seo"}, [{"id": "s1"}], cmds)
    report = simulate(engine, draft, at_us(dt.date(2025, 9, 15), 0), at_us(dt.date(2025, 10, 1), 0))
    got = {d["member_id"]: (d["simulated_won"], d["actual_won"]) for d in report["member_differences"]}
    # m1 actual: 25만 → 45만, 5만 in the 30만 band = 5,000; m2: 20만 × 10% = 20,000
    assert got == {"m1": (0, 5_000), "m2": (5_000, 20_000)}
    assert report["members"]["losing"] == 2

    # the draft as activated on the 15th in the in-force timeline gives the same
    timeline = with_draft(PolicyTimeline([ten]), draft, at_us(dt.date(2025, 9, 15), 0), at_us(dt.date(2025, 10, 1), 0))
    again = simulate(engine, timeline, at_us(dt.date(2025, 9, 15), 0), at_us(dt.date(2025, 10, 1), 0))
    assert again["totals"] == report["totals"]


def test_2023_pharmacy_correction_9_instead_of_7(db_url):
    """2023: pharmacies paid 9% instead of 7% for 11 days. Recorded under the wrong
    policy, the correction claws back from each member exactly what 9% paid above 7%,
    floored per band as the rules do, split by funder; members who never paid at a
    pharmacy are untouched."""
    wrong = standard_policy(1_000, pharmacy_bp=900, policy_id="pharmacy-9")
    right = standard_policy(1_000, pharmacy_bp=700, policy_id="pharmacy-7")
    first = dt.date(2023, 5, 10)
    members = {"m1": "seo", "m2": "namdong", "m3": "bupyeong"}
    shops = [{"id": "rx1", "category": "pharmacy"}, {"id": "rx2", "category": "pharmacy", "district": "namdong"},
             {"id": "food", "category": "restaurant"}]
    pays = [("a", "m1", "rx1", 12_345, 0), ("b", "m1", "rx2", 8_900, 3), ("c", "m1", "food", 50_000, 4),
            ("d", "m2", "rx2", 29 * MAN, 5), ("e", "m2", "rx1", 3 * MAN, 6),   # e straddles the 30만 band
            ("f", "m3", "food", 40_000, 7), ("g", "m1", "rx1", 99_999, 10)]
    cmds = [datagen.topup(f"t-{m}", m, 2_000_000, at_us(dt.date(2023, 5, 1))) for m in members]
    cmds += [datagen.pay(pid, m, shop, amount, at_us(first + dt.timedelta(days=d))) for pid, m, shop, amount, d in pays]
    engine = recorded_book(db_url, PolicyTimeline([wrong]), members, shops, cmds)
    start, end = at_us(first, 0), at_us(first + dt.timedelta(days=11), 0)

    def floor_diff(base: int) -> int:
        return base * 700 // 10_000 - base * 900 // 10_000

    expected_m1 = floor_diff(12_345) + floor_diff(8_900) + floor_diff(99_999)
    expected_m2 = floor_diff(29 * MAN) + floor_diff(1 * MAN)  # only 1만 of e is inside the band
    got = corrections(engine, wrong, right, start, end)
    assert [(m, d) for m, d, _ in got] == [("m1", expected_m1), ("m2", expected_m2)]
    assert expected_m1 == -(247 + 178 + 2_000) and expected_m2 == -(5_800 + 200)
    for _member, delta, by_funder in got:
        assert sum(by_funder.values()) == delta and set(by_funder) == {"national", "city"}

    plan = correction_plan(engine, wrong, right, start, end)
    assert plan.recorded_mismatch_payments == 0 and plan.recorded_won == plan.wrong_won
    assert plan.right_won - plan.wrong_won == expected_m1 + expected_m2
    assert [(line.member_id, line.month, line.by_component) for line in plan.lines] == \
        [("m1", "2023-05", {"city": expected_m1}), ("m2", "2023-05", {"city": expected_m2})]


def test_districts_and_frame_checks():
    """Districts outside Incheon's ten, and missing columns, are refused up front."""
    frame = frame_of([Payment("p", member("m1"), merchant("s1"), at_us(DAY0), 1_000)])
    with pytest.raises(ValueError, match="lacks columns"):
        evaluate_frame(standard_policy(1_000), frame.drop("flags"))
    with pytest.raises(pl.exceptions.InvalidOperationError):
        evaluate_frame(standard_policy(1_000), frame.with_columns(pl.lit("mars").alias("merchant_district")))
    assert set(DISTRICTS) == {"jung", "dong", "michuhol", "yeonsu", "namdong", "bupyeong", "gyeyang", "seo",
                              "ganghwa", "ongjin"}


def test_a_generated_book_re_evaluated_under_its_own_policy(db_url):
    """settlement.datagen's book (three components, `$merchant_district` funding, the
    merchant's share, grants and points spent first): re-evaluated under the policy
    that recorded it, every payment gets what the book gave it, won for won. Refunds
    then differ only through the net payment model (see settlement.simulate): a payment
    refunded later held its place in the month until the refund; re-evaluated, it never
    did. So only members with a refund differ, and nobody does against the in-force
    policy re-evaluated the same way (`actual_timeline`)."""
    from ledger import schema as s
    from ledger.commands import Refund
    from sqlalchemy import select

    start = dt.date(2026, 3, 2)
    plan = datagen.command_plan(3, start, 3, members=60, merchants=20, payments_per_day=300)
    timeline = datagen.demo_timeline()
    engine = make_engine(db_url)
    with engine.begin() as conn:
        datagen.register(conn, plan)
    book = Book(engine, timeline)
    refunds = [c for c in plan.commands if isinstance(c, Refund)]
    plan.commands = [c for c in plan.commands if not isinstance(c, Refund)]
    for batch in plan.batches(256):
        assert all(o.ok for o in book.execute(batch))
    first, end = at_us(start + dt.timedelta(days=1), 0), at_us(start + dt.timedelta(days=5), 0)

    exact = simulate(engine, timeline, first, end)
    assert exact["totals"]["delta_won"] == 0 and exact["members"]["affected"] == 0
    assert all(row["delta_won"] == 0 for row in exact["by_funder"] + exact["by_component"])
    assert {row["source"] for row in exact["by_funder"]} >= {"national", "city", "merchant"}
    assert exact["payments"]["count"] > 500

    assert refunds and all(o.ok for o in book.execute(refunds))
    with engine.connect() as conn:
        refunded = {m for (m,) in conn.execute(select(s.payments.c.member_id).where(s.payments.c.refunded_won > 0))}
    netted = simulate(engine, timeline, first, end, member_differences_max=10_000)
    assert {d["member_id"] for d in netted["member_differences"]} <= refunded
    assert netted["recorded"]["refunded_payments"] > 0
    same = simulate(engine, timeline, first, end, actual_timeline=timeline)
    assert same["totals"]["delta_won"] == 0 and same["members"]["affected"] == 0


def points_first_policy(rate_bp: int, policy_id: str, **extra) -> CompiledPolicy:
    """The shipped policies' spend order: grants, then points, then charged money; only
    charged money (and grants) earn, so the points a payment earns shrink the next one's
    base."""
    return policy_from({"policy_id": policy_id, "name": policy_id, "effective_from": "2023-01-01T00:00:00+09:00",
                        "topup": {"min_won": 10_000, "monthly_max_won": 2_000_000},
                        "spend_order": ["grants", "points", "charged"],
                        "components": [{"id": "city", "funding": {"national": 4_000, "city": 6_000},
                                        "remainder_to": "city", "variants": [
                                            {"id": "standard", "bands": [{"up_to_won": 50 * MAN,
                                                                          "rate_bp": rate_bp}]}]}], **extra})


def _points_first_book(url: str, rate_bp: int, policy_id: str):
    """One member, 100만 topped up, three 10만 payments in September 2025, under one
    points-first policy at `rate_bp`."""
    day = dt.date(2025, 9, 2)
    cmds = [datagen.topup("t-m1", "m1", 1_000_000, at_us(dt.date(2025, 9, 1)))]
    cmds += [datagen.pay(f"p{i}", "m1", "s1", 10 * MAN, at_us(day, 100 * i)) for i in (1, 2, 3)]
    return recorded_book(url, PolicyTimeline([points_first_policy(rate_bp, policy_id)]), {"m1": "seo"},
                         [{"id": "s1"}], cmds)


def _held_cashback(engine) -> int:
    from sqlalchemy import func, select

    from ledger import schema as s

    with engine.connect() as conn:
        return int(conn.execute(select(func.sum(s.payments.c.cashback_won))
                                .where(s.payments.c.status == "approved")).scalar_one())


@pytest.fixture
def another_db_url(db_url, request, tmp_path):
    """A second empty book on `db_url`'s backend (the same traffic under another policy)."""
    if db_url.startswith("sqlite"):
        import shutil

        path = tmp_path / "another.db"
        shutil.copyfile(request.getfixturevalue("_migrated_sqlite_file"), path)
        return f"sqlite:///{path}"
    from tests.conftest import create_pg_database, drop_pg_database

    name, url = create_pg_database(template=request.getfixturevalue("_migrated_pg_template"))
    request.addfinalizer(lambda: drop_pg_database(name))
    return url


def test_simulate_models_the_points_a_raise_pays_exactly(db_url, another_db_url):
    """Recorded at 10% spending points first: p1 earns 10,000 points, p2 spends them
    (base 9만: 9,000), p3 spends 9,000 (base 91,000: 9,100). A 12% draft re-evaluated on
    that split would give 12,000 + 10,800 + 10,920 = 33,720; the book under the draft
    spends 12,000 points on p2 (base 88,000: 10,560) and 10,560 on p3 (base 89,440:
    10,732), 33,292. The preview re-splits p2 and p3 by the points the draft holds more
    (2,000, then 1,560) and gives the book's 33,292, funder for funder."""
    ten = points_first_policy(1_000, "ten")
    twelve = points_first_policy(1_200, "twelve")
    engine = _points_first_book(db_url, 1_000, "ten")
    start, end = at_us(dt.date(2025, 9, 1), 0), at_us(dt.date(2025, 10, 1), 0)
    report = simulate(engine, twelve, start, end, actual_timeline=PolicyTimeline([ten]))
    assert report["totals"]["actual_won"] == _held_cashback(engine) == 28_100
    draft_engine = _points_first_book(another_db_url, 1_200, "twelve")
    under_draft = simulate(draft_engine, twelve, start, end)
    assert under_draft["totals"]["actual_won"] == _held_cashback(draft_engine) == 33_292
    assert report["totals"]["simulated_won"] == 33_292
    assert {r["source"]: r["simulated_won"] for r in report["by_funder"]} == \
        {r["source"]: r["actual_won"] for r in under_draft["by_funder"]}
    feedback = report["points_feedback"]
    assert feedback == {"modelled": True, "members": 1, "payments": 2, "points_won": 2_000, "rate_bp": 1_200,
                        "unresolved_payments": 0, "bound_won": 0, "declined_payments": 0,
                        "declined_points_won": 0, "insufficient_payments": 0, "declined_grant_payments": 0, "declined_grants_won": 0}
    [note] = [n for n in report["notes"] if n.startswith("points feedback")]
    assert "re-split" in note and "2 of their payments" in note, note
    # The draft over its own book: nothing re-split, nothing said.
    assert under_draft["totals"]["delta_won"] == 0 and under_draft["points_feedback"]["payments"] == 0
    same = simulate(engine, ten, start, end, actual_timeline=PolicyTimeline([ten]))
    assert same["points_feedback"]["payments"] == 0 and not [n for n in same["notes"] if "points feedback" in n]
    assert same["totals"]["delta_won"] == 0


def test_simulate_models_the_points_a_cut_takes_exactly(db_url, another_db_url):
    """The reverse: recorded at 12% (33,292), previewed at 10%. The member holds 2,000
    points fewer at p2, which spends charged money for them (base 90,000: 9,000), then
    1,560 fewer at p3 (base 91,000: 9,100): the book under 10%, 28,100, to the won.
    Re-evaluated on the recorded split it would say 27,744."""
    ten = points_first_policy(1_000, "ten")
    engine = _points_first_book(db_url, 1_200, "twelve")
    start, end = at_us(dt.date(2025, 9, 1), 0), at_us(dt.date(2025, 10, 1), 0)
    report = simulate(engine, ten, start, end)
    assert report["totals"]["actual_won"] == 33_292
    assert report["totals"]["simulated_won"] == _held_cashback(_points_first_book(another_db_url, 1_000, "ten")) \
        == 28_100
    assert report["points_feedback"] | {"points_won": None} == {
        "modelled": True, "members": 1, "payments": 2, "points_won": None, "rate_bp": 1_000,
        "unresolved_payments": 0, "bound_won": 0, "declined_payments": 0, "declined_points_won": 0,
        "insufficient_payments": 0, "declined_grant_payments": 0, "declined_grants_won": 0}
    assert report["points_feedback"]["points_won"] == 2_000


def test_simulate_says_what_a_cut_cannot_re_split(db_url):
    """A payment paid wholly with points: under a cut the member holds fewer points, and
    whether they still cover it depends on the book's balance, which the preview does
    not read. It keeps the recorded split and the report bounds it."""
    ten = points_first_policy(1_000, "ten")
    day = dt.date(2025, 9, 2)
    cmds = [datagen.topup("t-m1", "m1", 1_000_000, at_us(dt.date(2025, 9, 1))),
            datagen.pay("p1", "m1", "s1", 10 * MAN, at_us(day, 100)),   # 12,000 points at 12%
            datagen.pay("p2", "m1", "s1", 5_000, at_us(day, 200))]      # paid with 5,000 of them
    engine = recorded_book(db_url, PolicyTimeline([points_first_policy(1_200, "twelve")]), {"m1": "seo"},
                           [{"id": "s1"}], cmds)
    start, end = at_us(dt.date(2025, 9, 1), 0), at_us(dt.date(2025, 10, 1), 0)
    report = simulate(engine, ten, start, end)
    assert report["totals"]["simulated_won"] == 10_000
    feedback = report["points_feedback"]
    assert feedback == {"modelled": True, "members": 0, "payments": 0, "points_won": 0, "rate_bp": 1_000,
                        "unresolved_payments": 1, "bound_won": 201, "declined_payments": 0,
                        "declined_points_won": 0, "insufficient_payments": 0, "declined_grant_payments": 0, "declined_grants_won": 0}
    [note] = [n for n in report["notes"] if n.startswith("points feedback")]
    assert "1 payment" in note and "201 won" in note, note


@pytest.mark.parametrize("draft_bp, declines", [(1_300, ()), (700, ()), (1_300, ("cafe",))])
def test_a_generated_book_previewed_equals_the_book_run_under_the_draft(db_url, another_db_url, draft_bp,
                                                                        declines):
    """settlement.datagen's traffic (three components, the district top-up, the
    merchant's share, grants and points spent first, months crossing the 30만 band)
    booked twice: under its policy and under a draft that raises (cuts) the city's rate,
    and, the third time, also declines cafés (the book paid them, some with points).
    Previewed on the first book, the draft gives what the second book paid, in total,
    per funder and per member, to the won, where no refund intervenes."""
    from ledger.commands import Refund

    start = dt.date(2026, 3, 2)
    plan = datagen.command_plan(5, start, 6, members=25, merchants=15, payments_per_day=60, topup_won=2_000_000)
    plan.commands = [c for c in plan.commands if not isinstance(c, Refund)]
    timeline = datagen.demo_timeline()
    data = datagen.demo_policy_data()
    data["policy_id"] = "draft"
    data["components"][0]["variants"][0]["bands"][0]["rate_bp"] = draft_bp
    data["declined_categories"] += list(declines)
    draft = compile_policy(validate_policy_data(data))
    first, end = at_us(start + dt.timedelta(days=1), 0), at_us(start + dt.timedelta(days=6), 0)
    engines = []
    for url, book_timeline in ((db_url, timeline), (another_db_url, with_draft(timeline, draft, first, end))):
        engine = make_engine(url)
        with engine.begin() as conn:
            datagen.register(conn, plan)
        book = Book(engine, book_timeline)
        outcomes = [o for batch in plan.batches(64) for o in book.execute(batch)]
        assert all(o.ok and o.body.get("decline_code") in (None, "merchant_category_excluded") for o in outcomes)
        engines.append(engine)
    report = simulate(engines[0], draft, first, end, member_differences_max=10_000)
    booked = simulate(engines[1], draft, first, end, member_differences_max=10_000)
    assert booked["totals"]["delta_won"] == 0
    assert report["totals"]["simulated_won"] == booked["totals"]["actual_won"]
    assert {r["source"]: r["simulated_won"] for r in report["by_funder"]} == \
        {r["source"]: r["actual_won"] for r in booked["by_funder"]}
    assert {r["component_id"]: r["simulated_won"] for r in report["by_component"]} == \
        {r["component_id"]: r["actual_won"] for r in booked["by_component"]}
    # Per member: the second book's cashback, as the preview of the first gives it.
    same = simulate(engines[0], timeline, first, end, member_differences_max=10_000)
    assert same["members"]["affected"] == 0
    actual_first = _member_cashback(engines[0], first, end)
    previewed = actual_first | {d["member_id"]: d["simulated_won"] for d in report["member_differences"]}
    assert previewed == _member_cashback(engines[1], first, end)
    assert booked["points_feedback"]["payments"] == 0
    assert report["points_feedback"]["payments"] > 20 and report["points_feedback"]["unresolved_payments"] == 0
    assert (report["points_feedback"]["declined_payments"] > 0) == bool(declines), report["points_feedback"]


def _member_cashback(engine, from_us: int, to_us: int) -> dict[str, int]:
    from sqlalchemy import func, select

    from ledger import schema as s

    p = s.payments
    with engine.connect() as conn:
        rows = conn.execute(select(p.c.member_id, func.sum(p.c.cashback_won)).where(
            p.c.status == "approved", p.c.occurred_at_us >= from_us, p.c.occurred_at_us < to_us)
            .group_by(p.c.member_id))
        return {m: int(won) for m, won in rows}


def test_a_payment_the_draft_declines_gives_its_points_back(db_url, another_db_url):
    """The review's case: at 10%, p1 earns 10,000 points, p2 (a casino, 5,000) spends
    5,000 of them, p3 (10만) the other 5,000 (base 95,000: 9,500), 19,500 in all. A draft
    declining gambling declines p2: its 5,000 points stay with the member and p3 spends
    all 10,000 (base 90,000: 9,000), 19,000: the book under the draft. (Before, the
    preview kept p3's recorded split and said 19,500, with a note that it did.)"""
    ten = points_first_policy(1_000, "ten")
    draft = points_first_policy(1_000, "ten-no-gambling", declined_categories=["gambling"])
    day = dt.date(2025, 9, 2)
    cmds = [datagen.topup("t1", "m1", 1_000_000, at_us(dt.date(2025, 9, 1))),
            datagen.pay("p1", "m1", "s1", 100_000, at_us(day, 100)),
            datagen.pay("p2", "m1", "casino", 5_000, at_us(day, 200)),
            datagen.pay("p3", "m1", "s1", 100_000, at_us(day, 300))]
    merchants = [{"id": "s1"}, {"id": "casino", "category": "gambling"}]
    engine = recorded_book(db_url, PolicyTimeline([ten]), {"m1": "seo"}, merchants, cmds)
    under_draft = recorded_book(another_db_url, PolicyTimeline([draft]), {"m1": "seo"}, merchants, cmds,
                                declines=("merchant_category_excluded",))
    assert _held_cashback(engine) == 19_500 and _held_cashback(under_draft) == 19_000
    start, end = at_us(dt.date(2025, 9, 1), 0), at_us(dt.date(2025, 10, 1), 0)
    booked = simulate(under_draft, draft, start, end)
    for actual_timeline in (None, PolicyTimeline([ten])):
        report = simulate(engine, draft, start, end, actual_timeline=actual_timeline)
        assert report["totals"]["simulated_won"] == 19_000, report["totals"]
        assert {r["source"]: r["simulated_won"] for r in report["by_funder"]} == \
            {r["source"]: r["actual_won"] for r in booked["by_funder"]}
        assert report["points_feedback"] == {
            "modelled": True, "members": 1, "payments": 1, "points_won": 5_000, "rate_bp": 1_000,
            "unresolved_payments": 0, "bound_won": 0, "declined_payments": 1, "declined_points_won": 5_000,
            "insufficient_payments": 0, "declined_grant_payments": 0, "declined_grants_won": 0}
        [note] = [n for n in report["notes"] if "the draft declines" in n]
        assert "1 payment(s) the draft declines spent 5,000 won of points" in note and "modelled" in note, note
    same = simulate(engine, ten, start, end, actual_timeline=PolicyTimeline([ten]))
    assert same["points_feedback"]["declined_payments"] == 0 and same["totals"]["delta_won"] == 0


@pytest.mark.parametrize("draft_bp", [1_300, 700])
def test_backdated_payments_previewed_in_the_order_the_book_paid_them(db_url, another_db_url, draft_bp):
    """The generated traffic of the test above, but a third of its payments of the
    range's first two days recorded after all the rest (backdated: the book paid them
    from the band room the later-dated ones left), those in reverse time order, 64 a
    batch (so one member's payments share a batch out of their time order). Booked twice,
    under its policy and under the draft; the preview of the first book is the second
    book, to the won, per funder, component and member: it evaluates each member's
    payments in the order the book paid them. (In time order it was off: the preview
    fuzz, 14 of 30 books with backdated payments off by 1 to 476 won.)"""
    from ledger.commands import Pay, Refund

    start = dt.date(2026, 3, 2)
    plan = datagen.command_plan(5, start, 6, members=25, merchants=15, payments_per_day=60, topup_won=2_000_000)
    first, end = at_us(start + dt.timedelta(days=1), 0), at_us(start + dt.timedelta(days=6), 0)
    commands = sorted((c for c in plan.commands if not isinstance(c, Refund)), key=datagen._command_time)
    early = [c for c in commands if isinstance(c, Pay) and first <= c.occurred_at_us < first + 2 * 86_400 * US_PER_S]
    late = {id(c) for c in early[::3]}
    in_order = [c for c in commands if id(c) not in late]
    backdated = [c for c in reversed(commands) if id(c) in late]
    batches = [in_order[i:i + 64] for i in range(0, len(in_order), 64)]
    batches += [backdated[i:i + 64] for i in range(0, len(backdated), 64)]
    timeline = datagen.demo_timeline()
    data = datagen.demo_policy_data()
    data["policy_id"] = "draft"
    data["components"][0]["variants"][0]["bands"][0]["rate_bp"] = draft_bp
    draft = compile_policy(validate_policy_data(data))
    engines = []
    for url, book_timeline in ((db_url, timeline), (another_db_url, with_draft(timeline, draft, first, end))):
        engine = make_engine(url)
        with engine.begin() as conn:
            datagen.register(conn, plan)
        book = Book(engine, book_timeline)
        outcomes = [o for batch in batches for o in book.execute(batch)]
        assert all(o.ok and o.body.get("decline_code") in (None, "merchant_category_excluded") for o in outcomes)
        engines.append(engine)
    # The draft's band binds where the order moves it: in time order the preview is not the book.
    report = simulate(engines[0], draft, first, end, member_differences_max=10_000)
    booked = simulate(engines[1], draft, first, end, member_differences_max=10_000)
    same = simulate(engines[0], timeline, first, end, member_differences_max=10_000)
    assert same["members"]["affected"] == 0 and same["totals"]["delta_won"] == 0
    assert booked["totals"]["delta_won"] == 0 and booked["members"]["affected"] == 0
    assert report["totals"]["simulated_won"] == booked["totals"]["actual_won"]
    assert {r["source"]: r["simulated_won"] for r in report["by_funder"]} == \
        {r["source"]: r["actual_won"] for r in booked["by_funder"]}
    assert {r["component_id"]: r["simulated_won"] for r in report["by_component"]} == \
        {r["component_id"]: r["actual_won"] for r in booked["by_component"]}
    previewed = _member_cashback(engines[0], first, end) | {
        d["member_id"]: d["simulated_won"] for d in report["member_differences"]}
    assert previewed == _member_cashback(engines[1], first, end)
    # Against the policies in force re-evaluated the same way: the same figures.
    beside = simulate(engines[0], draft, first, end, actual_timeline=timeline, member_differences_max=10_000)
    assert beside["totals"]["simulated_won"] == booked["totals"]["actual_won"]
    assert beside["totals"]["actual_won"] == same["totals"]["actual_won"]


@pytest.mark.parametrize("draft_bp", [1_200, 800])
def test_declined_payments_and_a_rate_change_previewed_as_the_book_under_the_draft(db_url, another_db_url,
                                                                                   draft_bp):
    """Two members at 10%, a draft declining gambling that also raises (cuts) the rate.
    m1's casino payment spent points and charged money (so it had spent every point the
    book held): declined, its points and the draft's more (fewer) from p1 pay p3 and p4.
    m2's casino payment and the next were paid with points alone (the book's balance
    before them known from m2's last payment, which spent charged money). Previewed on
    the first book, the draft gives what the book under the draft pays, per funder and
    per member, to the won."""
    ten = points_first_policy(1_000, "ten")
    draft = points_first_policy(draft_bp, "draft", declined_categories=["gambling"])
    day = dt.date(2025, 9, 2)
    cmds = [datagen.topup(f"t-{m}", m, 1_000_000, at_us(dt.date(2025, 9, 1))) for m in ("m1", "m2")]
    cmds += [datagen.pay("a1", "m1", "s1", 100_000, at_us(day, 100)),
             datagen.pay("a2", "m1", "casino", 30_000, at_us(day, 200)),
             datagen.pay("a3", "m1", "s1", 50_000, at_us(day, 300)),
             datagen.pay("a4", "m1", "s1", 100_000, at_us(day, 400)),
             datagen.pay("b1", "m2", "s1", 100_000, at_us(day, 110)),
             datagen.pay("b2", "m2", "casino", 3_000, at_us(day, 210)),
             datagen.pay("b3", "m2", "s1", 5_000, at_us(day, 310)),
             datagen.pay("b4", "m2", "s1", 50_000, at_us(day, 410))]
    members, merchants = {"m1": "seo", "m2": "seo"}, [{"id": "s1"}, {"id": "casino", "category": "gambling"}]
    engine = recorded_book(db_url, PolicyTimeline([ten]), members, merchants, cmds)
    under_draft = recorded_book(another_db_url, PolicyTimeline([draft]), members, merchants, cmds,
                                declines=("merchant_category_excluded",))
    start, end = at_us(dt.date(2025, 9, 1), 0), at_us(dt.date(2025, 10, 1), 0)
    report = simulate(engine, draft, start, end, member_differences_max=10)
    booked = simulate(under_draft, draft, start, end)
    assert report["totals"]["simulated_won"] == booked["totals"]["actual_won"] == _held_cashback(under_draft)
    assert {r["source"]: r["simulated_won"] for r in report["by_funder"]} == \
        {r["source"]: r["actual_won"] for r in booked["by_funder"]}
    previewed = {d["member_id"]: d["simulated_won"] for d in report["member_differences"]}
    assert previewed == _member_cashback(under_draft, start, end)
    feedback = report["points_feedback"]
    assert (feedback["declined_payments"], feedback["declined_points_won"]) == (2, 13_000), feedback
    assert feedback["unresolved_payments"] == 0 and booked["points_feedback"]["payments"] == 0


def test_a_category_both_sides_decline_gives_back_nothing(db_url):
    """A casino paid with points under a policy that did not decline gambling: a
    timeline declining it, re-evaluated, declines it as the draft does, so against it the
    draft re-splits nothing (the same policy previews no change); against what the
    payments hold (the book paid it) the draft gives its points back. (This was a
    restaurant registered as a casino after its payment; the preview now judges a
    payment by the registry as it was recorded, migration 0022: as a restaurant.)"""
    ten = points_first_policy(1_000, "ten")
    ten_no_gambling = points_first_policy(1_000, "ten-no-gambling", declined_categories=["gambling"])
    timeline = PolicyTimeline([ten_no_gambling])
    day = dt.date(2025, 9, 2)
    cmds = [datagen.topup("t1", "m1", 1_000_000, at_us(dt.date(2025, 9, 1))),
            datagen.pay("p1", "m1", "s1", 100_000, at_us(day, 100)),
            datagen.pay("p2", "m1", "bar", 5_000, at_us(day, 200)),
            datagen.pay("p3", "m1", "s1", 100_000, at_us(day, 300))]
    engine = recorded_book(db_url, PolicyTimeline([ten]), {"m1": "seo"},
                           [{"id": "s1"}, {"id": "bar", "category": "gambling"}], cmds)
    start, end = at_us(dt.date(2025, 9, 1), 0), at_us(dt.date(2025, 10, 1), 0)
    same = simulate(engine, ten_no_gambling, start, end, actual_timeline=timeline)
    assert same["totals"]["delta_won"] == 0 and same["points_feedback"]["payments"] == 0
    assert same["points_feedback"]["declined_payments"] == 0, same["points_feedback"]
    held = simulate(engine, ten_no_gambling, start, end)
    assert held["totals"]["simulated_won"] == 19_000 and held["points_feedback"]["declined_payments"] == 1


def test_a_payment_the_book_declined_for_want_of_money_is_counted(db_url, another_db_url):
    """The converse, not modelled: 10만 topped up and spent by p1 (10,000 points), p2 (a
    casino) spends 5,000 of them, p3 (10,000) finds 5,000 points and no charged money and
    is declined. A draft declining gambling keeps p2's points, so the book under it pays
    p3 with them (it earns nothing: points do not). The preview leaves p3 declined (its
    cashback is 0 either way here) and counts it, with a note."""
    ten = points_first_policy(1_000, "ten")
    draft = points_first_policy(1_000, "ten-no-gambling", declined_categories=["gambling"])
    day = dt.date(2025, 9, 2)
    cmds = [datagen.topup("t1", "m1", 100_000, at_us(dt.date(2025, 9, 1))),
            datagen.pay("p1", "m1", "s1", 100_000, at_us(day, 100)),
            datagen.pay("p2", "m1", "casino", 5_000, at_us(day, 200)),
            datagen.pay("p3", "m1", "s1", 10_000, at_us(day, 300))]
    merchants = [{"id": "s1"}, {"id": "casino", "category": "gambling"}]
    engine = recorded_book(db_url, PolicyTimeline([ten]), {"m1": "seo"}, merchants, cmds,
                           declines=("insufficient_funds",))
    under_draft = recorded_book(another_db_url, PolicyTimeline([draft]), {"m1": "seo"}, merchants, cmds,
                                declines=("merchant_category_excluded",))
    from sqlalchemy import select

    from ledger import schema as s

    for book, status in ((engine, "declined"), (under_draft, "approved")):
        with book.connect() as conn:
            assert conn.execute(select(s.payments.c.status).where(s.payments.c.payment_id == "p3")).scalar_one() \
                == status
    start, end = at_us(dt.date(2025, 9, 1), 0), at_us(dt.date(2025, 10, 1), 0)
    report = simulate(engine, draft, start, end)
    assert report["totals"]["simulated_won"] == _held_cashback(under_draft) == 10_000
    feedback = report["points_feedback"]
    assert (feedback["declined_payments"], feedback["insufficient_payments"]) == (1, 1), feedback
    [note] = [n for n in report["notes"] if "for want of money" in n]
    assert "declined 1 payment(s) in the range for want of money" in note and "does not model" in note, note
    assert simulate(engine, draft, start, at_us(day, 250))["points_feedback"]["insufficient_payments"] == 0


def test_grant_money_of_a_payment_the_draft_declines_is_counted_and_noted_not_claimed_exact():
    """A payment the draft declines that spent grant money in the book: under the draft
    the money stays in the member's lots and pays their later payments first, which the
    points model does not follow; the report said "modelled, the figures include it"
    (the review of 2026-12-06i: a member previewed 32,719 where the book under the draft
    pays 31,456). It is counted (declined_grant_payments, declined_grants_won) and a note
    says the figures are not exact there."""
    from settlement.points_model import evaluate_with_points

    draft = points_first_policy(1_200, "draft", declined_categories=["gambling"])
    m1, shop, casino = member("m1"), merchant("shop"), merchant("casino", category="gambling")
    day = dt.date(2025, 9, 2)
    payments = [Payment("p1", m1, shop, at_us(day, 100), 100_000),
                Payment("p2", m1, casino, at_us(day, 200), 0, points_won=2_000, grant_plain_won=5_000),
                Payment("p3", m1, shop, at_us(day, 300), 50_000)]
    frame = frame_of(payments)
    held = pl.Series([10_000, 0, 5_000], dtype=pl.Int64)
    _, fed = evaluate_with_points(draft, frame, MonthStart.empty(), held, frame["member_id"])
    assert (fed.declined_payments, fed.declined_points_won) == (1, 2_000)
    assert (fed.declined_grant_payments, fed.declined_grants_won) == (1, 5_000)
    report = fed.report()
    assert report["declined_grant_payments"] == 1 and report["declined_grants_won"] == 5_000
    [note] = [n for n in fed.note() if "grant money" in n and "does not model" in n]
    assert "1 payment(s) the draft declines spent 5,000 won of grant money" in note, note
    # A draft earning on points as on charged money re-splits nothing, and still its
    # declined payment's grant money pays later payments first under it: counted too.
    both = points_first_policy(1_200, "both", declined_categories=["gambling"], cashback_on=["charged", "points"])
    _, fed = evaluate_with_points(both, frame, MonthStart.empty(), held, frame["member_id"])
    assert (fed.declined_grant_payments, fed.declined_grants_won) == (1, 5_000), fed
