"""The cashback policy history (DOMAIN.md, 2019–2025) as worked examples.

Every file under `policies/` and `policies/grants/` is loaded exactly as written and shown
producing its documented result in won, through the pure `rules.evaluate` functions:
no database, no clock. The arithmetic is in the comments next to each figure.

Units: 만 = 10,000 won, 억 = 100,000,000 won; rates in the files are basis points.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
import yaml

from rules.compiled import CompiledPolicy, PolicyTimeline, compile_policy, merge_layers
from rules.evaluate import evaluate_payment, evaluate_topup
from rules.facts import (
    BudgetView,
    GrantLot,
    MemberFacts,
    MerchantFacts,
    MonthSoFar,
    PaymentDecision,
    PaymentEvent,
    Wallet,
)
from rules.grants import GrantProgramDocument
from rules.loader import load_policy_dir, load_policy_file, timeline_from_dir, validate_policy_data
from rules.timeutil import local_midnight_us

ROOT = Path(__file__).resolve().parent.parent
POLICIES = ROOT / "policies"
GRANTS = POLICIES / "grants"

MAN = 10_000
EOK = 100_000_000
LEDGER_ID_MAX = 64  # ledger.schema: payments.policy_id is String(64)


# ---------------------------------------------------------------------------------------
# Helpers: building facts and reading decisions
# ---------------------------------------------------------------------------------------

def noon_us(day: dt.date) -> int:
    """12:00 Seoul time on `day`, as epoch microseconds."""
    return local_midnight_us(day) + 12 * 3_600_000_000


def member(district: str = "namdong", member_id: str = "m-1") -> MemberFacts:
    return MemberFacts(member_id=member_id, district=district, status="active")


def merchant(
    district: str = "namdong",
    *,
    sales_won: int = 1 * EOK,
    category: str = "restaurant",
    flags: tuple[str, ...] = (),
    share_bp: int = 0,
) -> MerchantFacts:
    return MerchantFacts(
        merchant_id=f"shop-{district}-{category}",
        district=district,
        category=category,
        annual_sales_won=sales_won,
        registered_from=dt.date(2018, 1, 1),
        flags=frozenset(flags),
        merchant_share_bp=share_bp,
    )


def pay(
    policy: CompiledPolicy | None,
    day: dt.date,
    amount_won: int,
    *,
    who: MemberFacts | None = None,
    where: MerchantFacts | None = None,
    spent_before: int = 0,
    wallet: Wallet | None = None,
    budgets: BudgetView | None = None,
) -> PaymentDecision:
    """One payment at noon on `day`; `spent_before` is the member's eligible spend so far
    this month. By default the member pays from charged money and no budget is limited."""
    event = PaymentEvent(
        amount_won=amount_won,
        occurred_at_us=noon_us(day),
        local_date=day,
        member=who or member(),
        merchant=where or merchant(),
    )
    return evaluate_payment(
        event,
        policy,
        MonthSoFar(eligible_spend_won=spent_before),
        wallet or Wallet(charged_won=amount_won, points_won=0),
        budgets or BudgetView(),
    )


def by_component(decision: PaymentDecision) -> dict[str, int]:
    out: dict[str, int] = {}
    for line in decision.lines:
        out[line.component_id] = out.get(line.component_id, 0) + line.amount_won
    return out


def by_funder(decision: PaymentDecision) -> dict[str, int]:
    out: dict[str, int] = {}
    for line in decision.lines:
        for source, amount in line.funded_by:
            out[source] = out.get(source, 0) + amount
    return out


def city_file(name: str) -> CompiledPolicy:
    """A city-layer policy file on its own, compiled."""
    compiled = compile_policy(load_policy_file(POLICIES / name))
    assert compiled.layer == "city"
    return compiled


_TIMELINE: PolicyTimeline | None = None


def timeline() -> PolicyTimeline:
    global _TIMELINE
    if _TIMELINE is None:
        _TIMELINE = timeline_from_dir(POLICIES)
    return _TIMELINE


def stack_on(day: dt.date) -> CompiledPolicy:
    """The merged stack (city + every layer) in force at noon on `day`, from the whole directory."""
    stack = timeline().in_force(noon_us(day))
    assert stack is not None
    return stack


def grant_program(name: str) -> GrantProgramDocument:
    return GrantProgramDocument.model_validate(yaml.safe_load((GRANTS / name).read_text(encoding="utf-8")))


# Merchants used throughout.
SMALL = merchant(sales_won=2 * EOK)                       # ≤ 3억
MID = merchant(sales_won=10 * EOK)                        # 3–30억
BIG = merchant(sales_won=50 * EOK)                        # > 30억


# ---------------------------------------------------------------------------------------
# Every file has a worked example below (this list is checked against the directory)
# ---------------------------------------------------------------------------------------

POLICY_FILES = {
    "2019-01-flat-6.yaml": "test_2019_01_flat_6_no_cap",
    "2019-05-seo-card.yaml": "test_seo_card_2019_05_plus_4_inside_seo",
    "2019-07-michuhol-card.yaml": "test_michuhol_card_2019_07",
    "2019-07-yeonsu-card.yaml": "test_yeonsu_card_2019_07_launch_month",
    "2019-07-19-seo-card-30man.yaml": "test_seo_card_2019_07_19_first_30man",
    "2019-08-01-6-up-to-100man.yaml": "test_2019_08_01_first_100man_and_exclusions",
    "2019-08-01-seo-card-tiers.yaml": "test_seo_card_2019_08_tiers",
    "2019-08-01-yeonsu-card-100man.yaml": "test_yeonsu_card_2019_08",
    "2019-08-10-seo-card-ends.yaml": "test_seo_card_ends_2019_08_10",
    "2019-08-26-michuhol-card-ends.yaml": "test_michuhol_card_ends_2019_08_26",
    "2019-11-3-up-to-30man.yaml": "test_2019_11_at_most_9000",
    "2019-11-yeonsu-card-30man.yaml": "test_yeonsu_card_2019_11",
    "2020-01-tiers-4-2-1.yaml": "test_2020_01_tiers",
    "2020-01-yeonsu-card-ends.yaml": "test_yeonsu_card_ends_2020_01",
    "2020-03-bands.yaml": "test_2020_03_bands",
    "2021-11-promotion-10-up-to-100man.yaml": "test_2021_11_promotion",
    "2021-12-restore-2020-03-bands.yaml": "test_2021_12_restores_2020_03",
    "2022-07-01-5-up-to-30man.yaml": "test_2022_07_01_5_percent_up_to_30man",
    "2022-10-01-small-merchants-10.yaml": "test_2022_10_01_by_merchant_sales",
    "2023-01-winwin.yaml": "test_winwin_notice_example_8500",
    "2023-09-01-topup-150man.yaml": "test_2023_09_01_topups_up_to_150man",
    "2023-09-25-none-above-30eok.yaml": "test_2023_09_25_none_above_30eok",
    "2024-01-10-and-5.yaml": "test_2024_01_10_and_5",
    "2024-05-good-price-12.yaml": "test_2024_05_good_price_shops_12",
    "2024-07-ganghwa-ongjin-10.yaml": "test_2024_07_ganghwa_ongjin_10",
    "2025-09-all-under-30eok.yaml": "test_2025_09_ganghwa_15",
    "2025-10-cap-50man.yaml": "test_2025_10_cap_50man",
}
GRANT_FILES = {
    "2020-05-emergency-relief.yaml": "test_grant_2020_05_by_household_size",
    "2021-01-tailored-relief.yaml": "test_grant_2021_tailored_by_category",
    "2021-12-everyday-recovery.yaml": "test_grant_2021_12_per_resident",
    "2025-07-livelihood-coupon-round1.yaml": "test_grant_2025_coupon_round1",
    "2025-09-livelihood-coupon-round2.yaml": "test_grant_2025_coupon_round2",
}


def test_every_file_has_a_worked_example():
    assert sorted(p.name for p in POLICIES.glob("*.yaml")) == sorted(POLICY_FILES)
    assert sorted(p.name for p in GRANTS.glob("*.yaml")) == sorted(GRANT_FILES)
    for test_name in [*POLICY_FILES.values(), *GRANT_FILES.values()]:
        assert callable(globals().get(test_name)), test_name


@pytest.mark.parametrize("path", sorted(POLICIES.glob("*.yaml")) + sorted(GRANTS.glob("*.yaml")),
                         ids=lambda p: p.name)
def test_every_file_opens_with_a_comment_citing_its_rule(path: Path):
    assert path.read_text(encoding="utf-8").startswith("# ")


# ---------------------------------------------------------------------------------------
# City layer, one rule at a time
# ---------------------------------------------------------------------------------------

def test_2019_01_flat_6_no_cap():
    policy = city_file("2019-01-flat-6.yaml")
    day = dt.date(2019, 3, 15)
    # 2,000,000 × 6% = 120,000: no cap, one open-ended band.
    assert pay(policy, day, 2_000_000).cashback_won == 120_000
    # Still 6% after 1,000만 already spent this month: 100,000 × 6% = 6,000.
    decision = pay(policy, day, 100_000, spent_before=10_000_000)
    assert decision.cashback_won == 6_000
    # 4 of the 6 points national, 2 city: 6,000 → 4,000 + 2,000.
    assert by_funder(decision) == {"national": 4_000, "city": 2_000}
    # 4% and 2% exactly, in parts of 2 to 1 (6667 bp would give the nation 80,004).
    assert by_funder(pay(policy, day, 2_000_000)) == {"national": 80_000, "city": 40_000}
    # 12,345 × 6% = 740.7 → 740; the nation's 2/3 floored, 493; the won left to the city.
    assert by_funder(pay(policy, day, 12_345)) == {"national": 493, "city": 247}
    # Entertainment still earns here (excluded only from 2019-08-01).
    assert pay(policy, day, 100_000, where=merchant(category="entertainment")).cashback_won == 6_000
    # Department stores refuse the card.
    refused = pay(policy, day, 100_000, where=merchant(category="department_store"))
    assert not refused.approved and refused.decline_code == "merchant_category_excluded"


def test_funding_in_bp_must_sum_to_10000_and_parts_need_not():
    data = yaml.safe_load((POLICIES / "2019-01-flat-6.yaml").read_text())
    component = data["components"][0]
    component.update(funding={"national": 6000, "city": 3000})
    component.pop("funding_unit")
    with pytest.raises(Exception, match="must sum to 10000 bp, not 9000"):
        validate_policy_data(data)
    component["funding_unit"] = "parts"  # 6000 : 3000 is 2 : 1
    policy = compile_policy(validate_policy_data(data))
    assert by_funder(pay(policy, dt.date(2019, 3, 15), 2_000_000)) == {"national": 80_000, "city": 40_000}
    component["funding_unit"] = "thirds"
    with pytest.raises(Exception, match="funding_unit"):
        validate_policy_data(data)


def test_a_top_up_minimum_above_the_monthly_maximum_is_refused():
    data = yaml.safe_load((POLICIES / "2025-10-cap-50man.yaml").read_text())
    data["topup"] = {"min_won": 2_000_000, "monthly_max_won": 1_500_000}
    with pytest.raises(Exception, match="no top-up could be approved"):
        validate_policy_data(data)


def test_2019_08_01_first_100man_and_exclusions():
    policy = city_file("2019-08-01-6-up-to-100man.yaml")
    day = dt.date(2019, 8, 20)
    # 900,000 spent; a 200,000 payment: only 100,000 is below 100만 → 100,000 × 6% = 6,000.
    assert pay(policy, day, 200_000, spent_before=900_000).cashback_won == 6_000
    # Past 100만 nothing more.
    assert pay(policy, day, 50_000, spent_before=1_000_000).cashback_won == 0
    # At most 1,000,000 × 6% = 60,000 a month.
    assert pay(policy, day, 3_000_000).cashback_won == 60_000
    # Entertainment, gambling, car purchases, large electronics: the card works, no cashback,
    # and the spend does not use up the 100만.
    for category in ("entertainment", "gambling", "car_dealer", "electronics_large"):
        decision = pay(policy, day, 100_000, where=merchant(category=category))
        assert decision.approved and decision.cashback_won == 0 and not decision.counts_toward_month


def test_2019_11_at_most_9000():
    policy = city_file("2019-11-3-up-to-30man.yaml")
    day = dt.date(2019, 11, 20)
    # 1,000,000 at the start of the month: 300,000 × 3% = 9,000, the month's maximum.
    assert pay(policy, day, 1_000_000).cashback_won == 9_000
    # 100,000 → 3,000; after 30만 nothing.
    assert pay(policy, day, 100_000).cashback_won == 3_000
    assert pay(policy, day, 100_000, spent_before=300_000).cashback_won == 0


def test_2020_01_tiers():
    policy = city_file("2020-01-tiers-4-2-1.yaml")
    decision = pay(policy, dt.date(2020, 1, 20), 1_200_000)
    # 300,000 × 4% = 12,000; 200,000 × 2% = 4,000; 500,000 × 1% = 5,000; the last 200,000 earns 0.
    assert [(line.rate_bp, line.base_won, line.amount_won) for line in decision.lines] == [
        (400, 300_000, 12_000), (200, 200_000, 4_000), (100, 500_000, 5_000),
    ]
    assert decision.cashback_won == 21_000
    # Split 2 to 1 per band, each floored, the won left to the city (docs/design.md,
    # `funding`): 8,000 + 2,666 + 3,333 = 13,999 national, not 2/3 of 21,000 = 14,000.
    assert [dict(line.funded_by) for line in decision.lines] == [
        {"national": 8_000, "city": 4_000}, {"national": 2_666, "city": 1_334}, {"national": 3_333, "city": 1_667},
    ]
    assert by_funder(decision) == {"national": 13_999, "city": 7_001}


def test_2020_03_bands():
    policy = city_file("2020-03-bands.yaml")
    day = dt.date(2020, 6, 10)
    # 400,000 spent; a 200,000 payment straddles 50만: 100,000 × 10% + 100,000 × 1% = 10,000 + 1,000.
    assert pay(policy, day, 200_000, spent_before=400_000).cashback_won == 11_000
    # A month past 100만 earns nothing beyond.
    assert pay(policy, day, 50_000, spent_before=1_000_000).cashback_won == 0
    # At most 500,000 × 10% + 500,000 × 1% = 55,000 a month.
    assert pay(policy, day, 2_000_000).cashback_won == 55_000
    # 100,000 × 10% = 10,000: national 4,000, city 6,000.
    assert by_funder(pay(policy, day, 100_000)) == {"national": 4_000, "city": 6_000}


def test_2021_11_promotion():
    policy = city_file("2021-11-promotion-10-up-to-100man.yaml")
    day = dt.date(2021, 11, 15)
    # Flat 10% up to 100만: 1,500,000 → 1,000,000 × 10% = 100,000 (2020-03 rules would give 55,000).
    assert pay(policy, day, 1_500_000).cashback_won == 100_000
    # 600,000 spent: 100,000 more still earns 10% = 10,000 (under 2020-03 it would be 1%).
    assert pay(policy, day, 100_000, spent_before=600_000).cashback_won == 10_000


def test_2021_12_restores_2020_03():
    restored = city_file("2021-12-restore-2020-03-bands.yaml")
    original = city_file("2020-03-bands.yaml")
    # The same rule as 2020-03, under its own id and date.
    assert restored.document.components == original.document.components
    assert restored.declined_categories == original.declined_categories
    assert restored.eligibility == original.eligibility
    # 1,500,000 in December 2021: back to 50,000 + 5,000 = 55,000.
    assert pay(restored, dt.date(2021, 12, 15), 1_500_000).cashback_won == 55_000


def test_2022_07_01_5_percent_up_to_30man():
    policy = city_file("2022-07-01-5-up-to-30man.yaml")
    day = dt.date(2022, 7, 15)
    # 500,000 → 300,000 × 5% = 15,000, the month's maximum, at any merchant.
    assert pay(policy, day, 500_000).cashback_won == 15_000
    assert pay(policy, day, 100_000, where=BIG).cashback_won == 5_000


def test_2022_10_01_by_merchant_sales():
    policy = city_file("2022-10-01-small-merchants-10.yaml")
    day = dt.date(2022, 11, 10)
    # Exactly 3억 counts as small: 300,000 × 10% = 30,000.
    assert pay(policy, day, 300_000, where=merchant(sales_won=3 * EOK)).cashback_won == 30_000
    # Above 3억: 300,000 × 5% = 15,000. (No 30억 limit yet: a 50억 merchant also pays 5%.)
    assert pay(policy, day, 300_000, where=merchant(sales_won=3 * EOK + 1)).cashback_won == 15_000
    assert pay(policy, day, 100_000, where=BIG).cashback_won == 5_000
    # One 30만 allowance for both rates: 200,000 spent at a small shop, then 200,000 at a
    # larger one: only 100,000 is left in the band → 100,000 × 5% = 5,000.
    assert pay(policy, day, 200_000, where=MID, spent_before=200_000).cashback_won == 5_000


def test_2023_09_01_topups_up_to_150man():
    before, after = city_file("2022-10-01-small-merchants-10.yaml"), city_file("2023-09-01-topup-150man.yaml")
    # 200만 a month until August 2023; 150만 from September: 100만 topped up, 60만 more is 160만.
    assert evaluate_topup(600_000, before, MonthSoFar(topped_up_won=1_000_000), "active").approved
    refused = evaluate_topup(600_000, after, MonthSoFar(topped_up_won=1_000_000), "active")
    assert not refused.approved and refused.decline_code == "topup_monthly_limit_exceeded"
    assert evaluate_topup(500_000, after, MonthSoFar(topped_up_won=1_000_000), "active").approved
    # The cashback is 2022-10-01's: 10% at ≤ 3억 on the first 30만.
    assert pay(after, dt.date(2023, 9, 10), 300_000).cashback_won == 30_000
    assert pay(after, dt.date(2023, 9, 10), 100_000, where=BIG).cashback_won == 5_000
    assert stack_on(dt.date(2023, 9, 1)).policy_id == "incheon-2023-09+winwin-2023"
    assert stack_on(dt.date(2023, 8, 31)).policy_id == "incheon-2022-10+winwin-2023"


def test_2023_09_25_none_above_30eok():
    policy = city_file("2023-09-25-none-above-30eok.yaml")
    day = dt.date(2023, 10, 5)
    # Above 30억: the card works, no cashback, the spend does not count toward the 30만.
    above = pay(policy, day, 100_000, where=merchant(sales_won=30 * EOK + 1))
    assert above.approved and above.cashback_won == 0 and not above.counts_toward_month
    # Exactly 30억 is still eligible, at 7%: 100,000 × 7% = 7,000.
    assert pay(policy, day, 100_000, where=merchant(sales_won=30 * EOK)).cashback_won == 7_000
    # 3–30억: 7%; up to 3억: 10%.
    assert pay(policy, day, 100_000, where=MID).cashback_won == 7_000
    assert pay(policy, day, 100_000, where=SMALL).cashback_won == 10_000
    # Pharmacies have no rule of their own: a 10억 pharmacy earns 7% (7,000), not the 9%
    # (9,000) the October 2023 configuration error paid.
    pharmacy = merchant(sales_won=10 * EOK, category="pharmacy")
    assert pay(policy, day, 100_000, where=pharmacy).cashback_won == 7_000
    # Top-ups: at most 150만 a month from here on.
    assert evaluate_topup(500_000, policy, MonthSoFar(topped_up_won=1_000_000), "active").approved
    over = evaluate_topup(600_000, policy, MonthSoFar(topped_up_won=1_000_000), "active")
    assert over.decline_code == "topup_monthly_limit_exceeded"


def test_2024_01_10_and_5():
    policy = city_file("2024-01-10-and-5.yaml")
    day = dt.date(2024, 2, 10)
    assert pay(policy, day, 100_000, where=SMALL).cashback_won == 10_000   # 10%
    assert pay(policy, day, 100_000, where=MID).cashback_won == 5_000      # 5% (was 7% to year-end)
    assert pay(policy, day, 100_000, where=BIG).cashback_won == 0          # > 30억
    # Cap 30만: 500,000 at a small shop → 300,000 × 10% = 30,000.
    assert pay(policy, day, 500_000, where=SMALL).cashback_won == 30_000


def test_2024_05_good_price_shops_12():
    policy = city_file("2024-05-good-price-12.yaml")
    day = dt.date(2024, 5, 10)
    good_price_mid = merchant(sales_won=5 * EOK, flags=("good_price",))
    # A certified low-price shop: 100,000 × 12% = 12,000 whatever its sales up to 30억.
    assert pay(policy, day, 100_000, where=good_price_mid).cashback_won == 12_000
    assert pay(policy, day, 100_000, where=merchant(sales_won=1 * EOK, flags=("good_price",))).cashback_won == 12_000
    # The same shop without the flag: 5%.
    assert pay(policy, day, 100_000, where=merchant(sales_won=5 * EOK)).cashback_won == 5_000
    # Above 30억 nothing, flag or not.
    assert pay(policy, day, 100_000, where=merchant(sales_won=40 * EOK, flags=("good_price",))).cashback_won == 0
    # Same 30만 allowance: 400,000 → 300,000 × 12% = 36,000.
    assert pay(policy, day, 400_000, where=good_price_mid).cashback_won == 36_000
    # Before May (2024-01 rule) the flag meant nothing: 5%.
    assert pay(city_file("2024-01-10-and-5.yaml"), dt.date(2024, 4, 30), 100_000, where=good_price_mid).cashback_won == 5_000


def test_2024_07_ganghwa_ongjin_10():
    policy = city_file("2024-07-ganghwa-ongjin-10.yaml")
    day = dt.date(2024, 7, 10)
    # A 10억 merchant in Ganghwa or Ongjin: 10% (elsewhere 5%).
    assert pay(policy, day, 100_000, where=merchant("ganghwa", sales_won=10 * EOK)).cashback_won == 10_000
    assert pay(policy, day, 100_000, where=merchant("ongjin", sales_won=10 * EOK)).cashback_won == 10_000
    assert pay(policy, day, 100_000, where=merchant("namdong", sales_won=10 * EOK)).cashback_won == 5_000
    # Not above 30억, even there.
    assert pay(policy, day, 100_000, where=merchant("ganghwa", sales_won=40 * EOK)).cashback_won == 0
    # Low-price shops keep 12%, in Ganghwa too.
    assert pay(policy, day, 100_000, where=merchant("ganghwa", flags=("good_price",))).cashback_won == 12_000


def test_2025_09_ganghwa_15():
    policy = city_file("2025-09-all-under-30eok.yaml")
    day = dt.date(2025, 9, 10)
    # Ganghwa: 300,000 × 15% = 45,000, the month's maximum there.
    assert pay(policy, day, 500_000, where=merchant("ganghwa", sales_won=20 * EOK)).cashback_won == 45_000
    # Elsewhere 10% at every merchant ≤ 30억, small or not: 300,000 × 10% = 30,000.
    assert pay(policy, day, 300_000, where=merchant("namdong", sales_won=20 * EOK)).cashback_won == 30_000
    assert pay(policy, day, 100_000, where=BIG).cashback_won == 0
    assert pay(policy, day, 100_000, spent_before=300_000).cashback_won == 0
    # "At all merchants" read literally (docs/design.md, Choices): a low-price shop earns 10%
    # like any merchant (12% until 2025-08), and a car dealer earns again: 100,000 × 10%.
    assert pay(policy, day, 100_000, where=merchant(sales_won=10 * EOK, flags=("good_price",))).cashback_won == 10_000
    assert pay(policy, day, 100_000, where=merchant(category="car_dealer")).cashback_won == 10_000


def test_2025_10_cap_50man():
    policy = city_file("2025-10-cap-50man.yaml")
    day = dt.date(2025, 10, 10)
    # 600,000 → 500,000 × 10% = 50,000 (under 2025-09: 30,000).
    assert pay(policy, day, 600_000).cashback_won == 50_000
    # Ganghwa: 500,000 × 15% = 75,000.
    assert pay(policy, day, 600_000, where=merchant("ganghwa")).cashback_won == 75_000
    # 400,000 spent: 100,000 more still earns 10,000 (it would be 0 under 2025-09).
    assert pay(policy, day, 100_000, spent_before=400_000).cashback_won == 10_000
    assert pay(policy, day, 100_000, spent_before=500_000).cashback_won == 0


# ---------------------------------------------------------------------------------------
# District card layers, 2019 (evaluated on the merged stack from the whole directory)
# ---------------------------------------------------------------------------------------

SEO_MEMBER, MICHUHOL_MEMBER, YEONSU_MEMBER = member("seo"), member("michuhol"), member("yeonsu")


def test_seo_card_2019_05_plus_4_inside_seo():
    day = dt.date(2019, 6, 10)
    stack = stack_on(day)
    assert stack.policy_id == "incheon-2019-01+seo-2019-05"
    # A Seo-gu member inside Seo-gu: 100,000 × (6% + 4%) = 6,000 + 4,000 = 10,000; Seo-gu pays its 4,000.
    inside = pay(stack, day, 100_000, who=SEO_MEMBER, where=merchant("seo"))
    assert by_component(inside) == {"city": 6_000, "district-seo": 4_000}
    assert by_funder(inside) == {"national": 4_000, "city": 2_000, "seo": 4_000}
    # Elsewhere, or someone else in Seo-gu: the city's 6% only.
    assert pay(stack, day, 100_000, who=SEO_MEMBER, where=merchant("bupyeong")).cashback_won == 6_000
    assert pay(stack, day, 100_000, who=member("bupyeong"), where=merchant("seo")).cashback_won == 6_000
    # No cap on this first version: still 10% after 500만 spent.
    assert pay(stack, day, 100_000, who=SEO_MEMBER, where=merchant("seo"), spent_before=5_000_000).cashback_won == 10_000
    # Budget short: 3,000 won left of Seo-gu's 2019 budget cannot fund a 4,000 top-up,
    # so it pays none of it (on_budget_short: skip); the city's 6,000 is unaffected.
    short = pay(stack, day, 100_000, who=SEO_MEMBER, where=merchant("seo"),
                budgets=BudgetView({("seo", "2019"): 3_000}))
    assert short.cashback_won == 6_000
    assert [(line.component_id, line.amount_won, line.reason) for line in short.lines][-1] == ("district-seo", 0, "budget_skip")


def test_seo_card_2019_07_19_first_30man():
    day = dt.date(2019, 7, 25)
    stack = stack_on(day)
    assert "seo-2019-07-19" in stack.policy_id.split("+")
    # 250,000 spent; 100,000 inside Seo-gu: city 100,000 × 6% = 6,000; Seo-gu only on the
    # 50,000 below 30만 → 2,000. Total 8,000.
    decision = pay(stack, day, 100_000, who=SEO_MEMBER, where=merchant("seo"), spent_before=250_000)
    assert by_component(decision) == {"city": 6_000, "district-seo": 2_000}


def test_seo_card_2019_08_tiers():
    day = dt.date(2019, 8, 5)
    stack = stack_on(day)
    assert stack.policy_id == "incheon-2019-08+michuhol-2019-07+seo-2019-08+yeonsu-2019-08"
    # 600,000 inside Seo-gu from the start of the month:
    #   city 600,000 × 6% = 36,000; Seo-gu 300,000 × 4% + 200,000 × 1% = 12,000 + 2,000 = 14,000.
    # Total 50,000 = 10% of 30만 + 7% of 20만 + 6% of 10만 (30,000 + 14,000 + 6,000), as announced.
    decision = pay(stack, day, 600_000, who=SEO_MEMBER, where=merchant("seo"))
    assert by_component(decision) == {"city": 36_000, "district-seo": 14_000}


def test_seo_card_2019_08_short_budget_skips_the_whole_layer():
    """on_budget_short: skip pays none of a component its budget cannot cover in full
    (API.md), over all its bands: 400,000 inside Seo-gu wants 12,000 + 1,000 of Seo-gu.
    With 5,000 left the first band was skipped and the second paid 1,000 from the budget
    that had skipped it; with 12,500 the first was paid and the second skipped (read-path
    audit). Both now skip the layer; 13,000 left pays it all."""
    day = dt.date(2019, 8, 5)
    stack = stack_on(day)
    for left in (5_000, 12_500, 12_999):
        short = pay(stack, day, 400_000, who=SEO_MEMBER, where=merchant("seo"),
                    budgets=BudgetView({("seo", "2019-08"): left}))
        assert by_component(short) == {"city": 24_000, "district-seo": 0}, left
        seo = [(line.band, line.amount_won, line.funded_by, line.reason) for line in short.lines
               if line.component_id == "district-seo"]
        assert seo == [(1, 0, (), "budget_skip"), (2, 0, (), "budget_skip")], (left, seo)
    whole = pay(stack, day, 400_000, who=SEO_MEMBER, where=merchant("seo"),
                budgets=BudgetView({("seo", "2019-08"): 13_000}))
    assert by_component(whole) == {"city": 24_000, "district-seo": 13_000}
    assert by_funder(whole)["seo"] == 13_000


def test_seo_card_ends_2019_08_10():
    day = dt.date(2019, 8, 12)
    stack = stack_on(day)
    # The ended layer adds nothing and leaves the merged id.
    assert stack.policy_id == "incheon-2019-08+michuhol-2019-07+yeonsu-2019-08"
    assert "district-seo" not in {c.component_id for c in stack.components}
    # A Seo-gu member inside Seo-gu: back to 100,000 × 6% = 6,000.
    assert pay(stack, day, 100_000, who=SEO_MEMBER, where=merchant("seo")).cashback_won == 6_000


def test_michuhol_card_2019_07():
    day = dt.date(2019, 7, 10)
    stack = stack_on(day)
    assert stack.policy_id == "incheon-2019-01+michuhol-2019-07+seo-2019-05+yeonsu-2019-07"
    # A Michuhol-gu member, 600,000 from the start of the month:
    #   city 600,000 × 6% = 36,000; Michuhol-gu 300,000 × 2% + 200,000 × 1% = 6,000 + 2,000.
    # Total 44,000 = 8% of 30만 + 7% of 20만 + 6% of 10만.
    decision = pay(stack, day, 600_000, who=MICHUHOL_MEMBER, where=merchant("namdong"))
    assert by_component(decision) == {"city": 36_000, "district-michuhol": 8_000}
    assert by_funder(decision)["michuhol"] == 8_000
    # Other members: 6% only.
    assert pay(stack, day, 100_000, who=member("namdong")).cashback_won == 6_000


def test_michuhol_card_ends_2019_08_26():
    day = dt.date(2019, 8, 27)
    stack = stack_on(day)
    assert stack.policy_id == "incheon-2019-08+yeonsu-2019-08"
    assert pay(stack, day, 100_000, who=MICHUHOL_MEMBER).cashback_won == 6_000


def test_yeonsu_card_2019_07_launch_month():
    day = dt.date(2019, 7, 10)
    stack = stack_on(day)
    assert "yeonsu-2019-07" in stack.policy_id.split("+")
    # July 2019: 100,000 × (6% + 5%) = 11,000 (10% plus one launch-month point); Yeonsu-gu pays 5,000.
    decision = pay(stack, day, 100_000, who=YEONSU_MEMBER)
    assert by_component(decision) == {"city": 6_000, "district-yeonsu": 5_000}
    assert by_funder(decision)["yeonsu"] == 5_000


def test_yeonsu_card_2019_08():
    day = dt.date(2019, 9, 10)
    stack = stack_on(day)
    assert stack.policy_id == "incheon-2019-08+yeonsu-2019-08"
    # 100,000 × (6% + 4%) = 10,000: topped up to 10%.
    assert pay(stack, day, 100_000, who=YEONSU_MEMBER).cashback_won == 10_000
    # Beyond 100만 neither the city nor Yeonsu-gu pays.
    assert pay(stack, day, 100_000, who=YEONSU_MEMBER, spent_before=1_000_000).cashback_won == 0


def test_yeonsu_card_2019_11():
    day = dt.date(2019, 11, 10)
    stack = stack_on(day)
    assert stack.policy_id == "incheon-2019-11+yeonsu-2019-11"
    # 500,000: city 300,000 × 3% = 9,000; Yeonsu-gu 300,000 × 7% = 21,000. Total 30,000 = 10% of 30만.
    decision = pay(stack, day, 500_000, who=YEONSU_MEMBER)
    assert by_component(decision) == {"city": 9_000, "district-yeonsu": 21_000}
    # Everyone else: at most 9,000.
    assert pay(stack, day, 500_000).cashback_won == 9_000


def test_yeonsu_card_ends_2020_01():
    day = dt.date(2020, 1, 10)
    stack = stack_on(day)
    assert stack.policy_id == "incheon-2020-01"
    # A Yeonsu-gu member now earns the city's tiers only: 300,000 × 4% = 12,000.
    assert pay(stack, day, 300_000, who=YEONSU_MEMBER).cashback_won == 12_000


# ---------------------------------------------------------------------------------------
# Win-win (상생) layer, 2023 on
# ---------------------------------------------------------------------------------------

def winwin_shop(district: str, *, sales_won: int = 2 * EOK, share_bp: int = 500) -> MerchantFacts:
    return merchant(district, sales_won=sales_won, flags=("winwin",), share_bp=share_bp)


def test_winwin_notice_example_8500():
    day = dt.date(2023, 3, 15)
    stack = stack_on(day)
    assert stack.policy_id == "incheon-2022-10+winwin-2023"
    # The Seo-gu notice: 50,000 at a ≤ 30억 상생 merchant in Seo-gu sharing 5%:
    #   50,000 × 10% (city) + 50,000 × 2% (Seo-gu) + 50,000 × 5% (merchant) = 5,000 + 1,000 + 2,500 = 8,500.
    decision = pay(stack, day, 50_000, where=winwin_shop("seo"))
    assert decision.cashback_won == 8_500
    assert by_component(decision) == {"city": 5_000, "winwin-district": 1_000, "winwin-merchant": 2_500}
    assert by_funder(decision) == {"national": 2_000, "city": 3_000, "seo": 1_000, "merchant": 2_500}
    # The same in November 2025 on the 2025-10 city rule (10% at every merchant ≤ 30억).
    late = stack_on(dt.date(2025, 11, 5))
    assert late.policy_id == "incheon-2025-10+winwin-2023"
    assert pay(late, dt.date(2025, 11, 5), 50_000, where=winwin_shop("seo", sales_won=20 * EOK)).cashback_won == 8_500
    # A district that runs no top-up: 5,000 + 2,500 = 7,500.
    assert pay(stack, day, 50_000, where=winwin_shop("namdong")).cashback_won == 7_500
    # Bupyeong's top-up is funded by Bupyeong ($merchant_district).
    assert by_funder(pay(stack, day, 50_000, where=winwin_shop("bupyeong")))["bupyeong"] == 1_000
    # Not a 상생 merchant: the city's 10% only.
    assert pay(stack, day, 50_000, where=merchant("seo", sales_won=2 * EOK)).cashback_won == 5_000
    # After the month's 30만: no city or district part; the merchant's own 5% still: 2,500.
    assert pay(stack, day, 50_000, where=winwin_shop("seo"), spent_before=300_000).cashback_won == 2_500
    # From 2023-09-25, at a 10억 상생 merchant: 50,000 × (7% + 2% + 5%) = 3,500 + 1,000 + 2,500 = 7,000;
    # above 30억 nothing at all, the merchant's share included.
    autumn = dt.date(2023, 10, 5)
    assert pay(stack_on(autumn), autumn, 50_000, where=winwin_shop("seo", sales_won=10 * EOK)).cashback_won == 7_000
    assert pay(stack_on(autumn), autumn, 50_000, where=winwin_shop("seo", sales_won=40 * EOK)).cashback_won == 0


# ---------------------------------------------------------------------------------------
# The whole directory as one timeline
# ---------------------------------------------------------------------------------------

PERIODS = [
    (dt.date(2019, 3, 1), "incheon-2019-01"),
    (dt.date(2019, 6, 1), "incheon-2019-01+seo-2019-05"),
    (dt.date(2019, 7, 5), "incheon-2019-01+michuhol-2019-07+seo-2019-05+yeonsu-2019-07"),
    (dt.date(2019, 7, 25), "incheon-2019-01+michuhol-2019-07+seo-2019-07-19+yeonsu-2019-07"),
    (dt.date(2019, 8, 5), "incheon-2019-08+michuhol-2019-07+seo-2019-08+yeonsu-2019-08"),
    (dt.date(2019, 8, 15), "incheon-2019-08+michuhol-2019-07+yeonsu-2019-08"),
    (dt.date(2019, 9, 15), "incheon-2019-08+yeonsu-2019-08"),
    (dt.date(2019, 11, 15), "incheon-2019-11+yeonsu-2019-11"),
    (dt.date(2020, 1, 15), "incheon-2020-01"),
    (dt.date(2020, 6, 15), "incheon-2020-03"),
    (dt.date(2021, 11, 15), "incheon-2021-11"),
    (dt.date(2021, 12, 15), "incheon-2021-12"),
    (dt.date(2022, 8, 15), "incheon-2022-07"),
    (dt.date(2022, 11, 15), "incheon-2022-10"),
    (dt.date(2023, 3, 15), "incheon-2022-10+winwin-2023"),
    (dt.date(2023, 9, 10), "incheon-2023-09+winwin-2023"),
    (dt.date(2023, 10, 15), "incheon-2023-09-25+winwin-2023"),
    (dt.date(2024, 2, 15), "incheon-2024-01+winwin-2023"),
    (dt.date(2024, 6, 15), "incheon-2024-05+winwin-2023"),
    (dt.date(2024, 8, 15), "incheon-2024-07+winwin-2023"),
    (dt.date(2025, 9, 15), "incheon-2025-09+winwin-2023"),
    (dt.date(2025, 11, 15), "incheon-2025-10+winwin-2023"),
]


@pytest.mark.parametrize(("day", "expected"), PERIODS, ids=[str(day) for day, _ in PERIODS])
def test_timeline_policy_in_force(day: dt.date, expected: str):
    assert stack_on(day).policy_id == expected


def test_timeline_edges():
    t = timeline()
    # Nothing before the card's first rule.
    assert t.in_force(local_midnight_us(dt.date(2019, 1, 1)) - 1) is None
    # Changes take effect at 00:00 Seoul: the last microsecond of 2023-09-24 is still 2023-09.
    start = local_midnight_us(dt.date(2023, 9, 25))
    assert t.in_force(start - 1).policy_id == "incheon-2023-09+winwin-2023"
    assert t.in_force(start).policy_id == "incheon-2023-09-25+winwin-2023"


def test_timeline_ids_fit_the_ledger_and_components_never_clash():
    t = timeline()
    for policy in t:
        stack = t.in_force(policy.effective_from_us)
        assert stack is not None
        assert len(stack.policy_id) <= LEDGER_ID_MAX, stack.policy_id
        ids = [c.component_id for c in stack.components]
        assert len(ids) == len(set(ids))


def test_grant_programs_are_not_loaded_as_policies():
    ids = {policy.policy_id for policy in load_policy_dir(POLICIES)}
    assert len(ids) == len(POLICY_FILES)
    assert not ids & {grant_program(name).program_id for name in GRANT_FILES}


# ---------------------------------------------------------------------------------------
# Format: a layer policy with no components ends the layer (rules/compiled.merge_layers)
# ---------------------------------------------------------------------------------------

def _doc(policy_id: str, layer: str, start: str, components: list) -> CompiledPolicy:
    return compile_policy(validate_policy_data({
        "policy_id": policy_id, "name": policy_id, "layer": layer,
        "effective_from": f"{start}T00:00:00+09:00", "components": components,
    }))


def test_empty_layer_policy_ends_the_layer():
    top_up = [{"id": "district-x", "funding": {"seo": 10000},
               "variants": [{"id": "all", "bands": [{"rate_bp": 100}]}]}]
    base = _doc("base", "city", "2030-01-01", [])
    running = _doc("x-on", "district-x", "2030-01-01", top_up)
    ended = _doc("x-off", "district-x", "2030-02-01", [])
    # merge_layers leaves empty layer policies out, id included.
    assert merge_layers(base, [ended], 0) is base
    assert merge_layers(base, [running, ended], 0).policy_id == "base+x-on"
    # Through a timeline: in January the layer is in the stack, from February it is gone.
    t = PolicyTimeline([base, running, ended])
    assert t.in_force(local_midnight_us(dt.date(2030, 1, 15))).policy_id == "base+x-on"
    february = t.in_force(local_midnight_us(dt.date(2030, 2, 15)))
    assert february.policy_id == "base" and february.components == ()


# ---------------------------------------------------------------------------------------
# Relief grants (policies/grants/)
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(GRANT_FILES))
def test_grant_file_validates(name: str):
    program = grant_program(name)
    assert program.amount_rules is not None
    assert not program.cashback_on_spend  # DOMAIN.md: grant spending earns no cashback
    assert program.valid_until_us > program.valid_from_us


def test_grant_2020_05_by_household_size():
    rules = grant_program("2020-05-emergency-relief.yaml").amount_rules
    assert [rules.amount_for({"household_size": n}) for n in (1, 2, 3, 4, 6)] == [
        400_000, 600_000, 800_000, 1_000_000, 1_000_000,
    ]
    program = grant_program("2020-05-emergency-relief.yaml")
    # Usable through 2020-08-31 (Seoul), not a microsecond after.
    assert program.valid_until_us == local_midnight_us(dt.date(2020, 9, 1))
    # Grant money goes first and earns nothing: under 2020-03, a 100,000 payment with a
    # 60,000 relief balance spends 60,000 of grant and 40,000 charged → 40,000 × 10% = 4,000.
    lot = GrantLot(program.facts(), 60_000)
    day = dt.date(2020, 6, 10)
    decision = pay(city_file("2020-03-bands.yaml"), day, 100_000, wallet=Wallet(100_000, 0, (lot,)))
    assert decision.spent_grants == (("relief-2020-05", 60_000),)
    assert (decision.spent_charged_won, decision.base_won, decision.cashback_won) == (40_000, 40_000, 4_000)
    # After 2020-08-31 the lot cannot be spent: the whole payment comes from charged money.
    september = pay(city_file("2020-03-bands.yaml"), dt.date(2020, 9, 1), 100_000, wallet=Wallet(100_000, 0, (lot,)))
    assert september.spent_grants == () and september.cashback_won == 10_000


def test_grant_2021_tailored_by_category():
    rules = grant_program("2021-01-tailored-relief.yaml").amount_rules
    expected = {
        "closure_order_standing": 1_500_000,
        "closure_order_eased": 1_000_000,
        "operating_restriction": 500_000,
        "artist": 500_000,
        "tourism_business": 1_000_000,
        "corporate_taxi_driver": 500_000,
        "charter_bus": 1_000_000,
        "young_job_seeker": 3_000_000,
    }
    for category, amount in expected.items():
        assert rules.amount_for({"category": category}) == amount, category
    # Daycare: 20만 per class; 3 classes → 600,000.
    assert rules.amount_for({"category": "daycare", "classes": 3}) == 600_000
    with pytest.raises(ValueError):
        rules.amount_for({"category": "daycare"})  # the class count is required
    with pytest.raises(ValueError):
        rules.amount_for({"category": "unknown"})


def test_grant_2021_12_per_resident():
    program = grant_program("2021-12-everyday-recovery.yaml")
    assert program.amount_rules.amount_for({"district": "namdong"}) == 100_000
    assert program.valid_until_us == local_midnight_us(dt.date(2022, 4, 1))  # through 2022-03-31


def test_grant_2025_coupon_round1():
    program = grant_program("2025-07-livelihood-coupon-round1.yaml")
    rules = program.amount_rules
    assert rules.amount_for({"income_status": "general", "district": "namdong"}) == 150_000
    assert rules.amount_for({"income_status": "near_poor", "district": "namdong"}) == 300_000
    assert rules.amount_for({"income_status": "basic_livelihood", "district": "namdong"}) == 400_000
    # +5만 in Ganghwa/Ongjin: 400,000 + 50,000 = 450,000; 150,000 + 50,000 = 200,000.
    assert rules.amount_for({"income_status": "basic_livelihood", "district": "ganghwa"}) == 450_000
    assert rules.amount_for({"income_status": "general", "district": "ongjin"}) == 200_000
    # Each rule names its statuses, the Korean labels too; one none names, or none, has no amount.
    assert rules.amount_for({"income_status": "차상위", "district": "namdong"}) == 300_000
    assert rules.amount_for({"income_status": "일반", "district": "ganghwa"}) == 200_000
    for unnamed in ({"income_status": "vip", "district": "namdong"}, {"district": "namdong"}):
        with pytest.raises(ValueError, match="income_status"):
            rules.amount_for(unnamed)
    # Merchants ≤ 30억 only. Under 2025-09, at a 20억 shop a 100,000 payment is paid from
    # the coupon and earns nothing; at a 31억 shop the coupon cannot be used, the payment
    # comes from charged money, and (above 30억) earns nothing either.
    lot = GrantLot(program.facts(), 150_000)
    policy, day = city_file("2025-09-all-under-30eok.yaml"), dt.date(2025, 9, 10)
    inside = pay(policy, day, 100_000, where=merchant(sales_won=20 * EOK), wallet=Wallet(100_000, 0, (lot,)))
    assert inside.spent_grants == (("coupon-2025-r1", 100_000),) and inside.cashback_won == 0
    outside = pay(policy, day, 100_000, where=merchant(sales_won=31 * EOK), wallet=Wallet(100_000, 0, (lot,)))
    assert outside.spent_grants == () and outside.spent_charged_won == 100_000
    # Usable through 2025-11-30.
    assert program.valid_until_us == local_midnight_us(dt.date(2025, 12, 1))


def test_grant_2025_coupon_round2():
    program = grant_program("2025-09-livelihood-coupon-round2.yaml")
    assert program.amount_rules.amount_for({"income_status": "general", "district": "seo"}) == 100_000
    assert program.restrictions.merchant_sales_max_won == 30 * EOK
    assert program.valid_until_us == grant_program("2025-07-livelihood-coupon-round1.yaml").valid_until_us
