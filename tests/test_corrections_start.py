"""A correction's plan starts each member-month, as of its `from`, from what the month's
earlier payments hold: a posted correction's cashback included (docs/design.md,
"Corrections").

The s21 audit's case, under a 20,000 monthly cashback cap: pharmacy 100,000 on the 2nd
earns 10,000; a restaurant's 100,000 on the 20th (10,000 of it points) earns 9,000, and
another on the 25th the 1,000 the cap leaves. A correction of the 1st–15th to pharmacies
at 7% posts 7,000 / 9,000 / 4,000 (the month 20,000). A second one, of the 15th–30th to
12% elsewhere, started the month from the pharmacy payment's 10,000 as recorded, not the
7,000 it holds: it posted −3,000, 7,000 / 10,000 / 0, the month at 17,000 under its
20,000 cap, where the right policies give 7,000 / 10,800 / 2,200."""

from __future__ import annotations

import datetime as dt
import shutil
from pathlib import Path

import orjson
import pytest
import yaml
from sqlalchemy import select

from ledger import schema as s
from ledger.book import cashback_held
from rules.timeutil import to_us
from settlement.simulate import _read_compact, load_range, load_range_rows
from tests.book_helpers import assert_book_ok, assert_months_hold_their_payments
from tests.conftest import POLICIES, at, make_api

CAP = 20_000


def _capped(policy_id: str, *, pharmacy_bp: int | None = None, standard_bp: int | None = None) -> dict:
    """The 2025-10 policy with a 20,000 monthly cap; pharmacies or the rest at another rate."""
    doc = yaml.safe_load((POLICIES / "2025-10-cap-50man.yaml").read_text())
    doc["policy_id"] = policy_id
    doc["monthly_cashback_cap_won"] = CAP
    variants = doc["components"][0]["variants"]
    if standard_bp is not None:
        next(v for v in variants if v["id"] == "standard")["bands"][0]["rate_bp"] = standard_bp
    if pharmacy_bp is not None:
        variants.insert(1, {"id": "pharmacy", "when": {"categories_include": ["pharmacy"]},
                            "bands": [{"up_to_won": 500_000, "rate_bp": pharmacy_bp}]})
    return doc


def pharmacy_and_cafe(api, *, topup: int, amount: int, restaurant: bool = False) -> None:
    """m1 tops up `topup` on 1 November and pays `amount` at a pharmacy on the 2nd
    (`p-pharm`) and at a cafe on the 3rd (`p-cafe`); 10억 shops, and a restaurant too."""
    api.put("/v1/members/m1", {"district": "namdong"})
    shops = (("pharm", "pharmacy"), ("cafe", "cafe"), *((("rest", "restaurant"),) if restaurant else ()))
    for merchant, category in shops:
        api.put(f"/v1/merchants/{merchant}", {"name": merchant, "district": "namdong", "category": category,
                                              "annual_sales": 1_000_000_000, "registered_from": "2019-01-01"})
    assert api.post("/v1/topups", {"topup_id": "t-m1", "member_id": "m1", "amount": topup,
                                   "occurred_at": at("2026-11-01", "00:30:00")}).status_code == 201
    for payment_id, merchant, day in (("p-pharm", "pharm", "2026-11-02"), ("p-cafe", "cafe", "2026-11-03")):
        assert api.post("/v1/payments", {"payment_id": payment_id, "member_id": "m1", "merchant_id": merchant,
                                         "amount": amount, "occurred_at": at(day)}).status_code == 201


def capped_policies(tmp_path) -> Path:
    """The shipped policies and, in force from October 2026, the 2025-10 policy under a
    20,000 monthly cashback cap: their directory."""
    directory = tmp_path / "policies"
    shutil.copytree(POLICIES, directory)
    doc = _capped("cap-2026-10")
    doc["effective_from"] = "2026-10-01T00:00:00+09:00"
    (directory / "2026-10-cap-20k.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    return directory


@pytest.fixture
def capped_api(db_url, tmp_path):
    """The app with `capped_policies`."""
    app = make_api(db_url, policies_dir=capped_policies(tmp_path))
    with app.client:
        yield app


def _month_of_three(api) -> None:
    api.put("/v1/members/m1", {"district": "namdong"})
    for merchant, category in (("pharm", "pharmacy"), ("rest", "restaurant")):
        api.put(f"/v1/merchants/{merchant}", {"name": merchant, "district": "namdong", "category": category,
                                              "annual_sales": 1_000_000_000, "registered_from": "2019-01-01"})
    assert api.post("/v1/topups", {"topup_id": "t-m1", "member_id": "m1", "amount": 1_500_000,
                                   "occurred_at": at("2026-11-01", "00:30:00")}).status_code == 201
    for payment_id, merchant, day, earned in (("p-pharm", "pharm", "02", 10_000), ("p-rest", "rest", "20", 9_000),
                                              ("p-rest2", "rest", "25", 1_000)):
        r = api.post("/v1/payments", {"payment_id": payment_id, "member_id": "m1", "merchant_id": merchant,
                                      "amount": 100_000, "occurred_at": at(f"2026-11-{day}")})
        assert r.status_code == 201 and r.json()["cashback"]["amount"] == earned, r.text


def _correct(api, correction_id: str, right_policy_id: str, start: str, end: str) -> dict:
    r = api.post("/v1/corrections", {"correction_id": correction_id, "wrong_policy_id": "cap-2026-10",
                                     "right_policy_id": right_policy_id, "from": at(start, "00:00:00"),
                                     "to": at(end, "00:00:00")}, role="policy-editor")
    assert r.status_code == 201, r.text
    proposal = r.json()
    r = api.post(f"/v1/corrections/{correction_id}/approve", role="policy-approver")
    assert r.status_code == 200 and r.json()["status"] == "posted", r.text
    return proposal


def _held(api) -> dict[str, int]:
    with api.services.reader.connect() as conn:
        rows = conn.execute(select(s.payments.c.payment_id, s.payments.c.detail, s.payments.c.refund_state)).all()
    return {payment_id: sum(cashback_held(orjson.loads(detail), orjson.loads(state or "{}")).values())
            for payment_id, detail, state in rows}


def _us(text: str) -> int:
    return to_us(dt.datetime.fromisoformat(text))


def _month(api) -> int:
    return api.get("/v1/members/m1/balance", params={"month": "2026-11"}).json()["month"]["cashback_earned"]


def test_a_correction_of_the_rest_of_a_month_starts_from_what_an_earlier_one_left(capped_api):
    api = capped_api
    _month_of_three(api)
    for doc in (_capped("pharm-7", pharmacy_bp=700), _capped("std-12", standard_bp=1_200)):
        assert api.post("/v1/policies", doc, role="policy-editor").status_code == 201
    _correct(api, "first-half", "pharm-7", "2026-11-01", "2026-11-15")
    assert _held(api) == {"p-pharm": 7_000, "p-rest": 9_000, "p-rest2": 4_000} and _month(api) == CAP
    proposal = _correct(api, "second-half", "std-12", "2026-11-15", "2026-12-01")
    # 12% of the 90,000 charged is 10,800; the cap leaves 20,000 − 7,000 − 10,800 for the 25th.
    assert [line["delta"] for line in proposal["lines"]] == [0], proposal  # cashback moved between payments
    assert _held(api) == {"p-pharm": 7_000, "p-rest": 10_800, "p-rest2": 2_200}
    assert _month(api) == CAP
    assert_book_ok(api)
    assert_months_hold_their_payments(api)


def test_every_reader_starts_the_month_from_what_the_payments_hold(capped_api):
    """The months' start as of the 15th, after the first correction posted, is the 7,000
    the pharmacy payment holds, in the bulk reader (Arrow or COPY on PostgreSQL), the row
    reader and the simulation's narrow reader alike; the range's payments are read with
    what was recorded (p-rest2: 1,000) and what they hold (4,000)."""
    api = capped_api
    _month_of_three(api)
    assert api.post("/v1/policies", _capped("pharm-7", pharmacy_bp=700), role="policy-editor").status_code == 201
    _correct(api, "first-half", "pharm-7", "2026-11-01", "2026-11-15")
    from_us, to_us_ = _us(at("2026-11-15", "00:00:00")), _us(at("2026-12-01", "00:00:00"))
    with api.services.reader.connect() as conn:
        loaded = [load_range(conn, from_us, to_us_), load_range_rows(conn, from_us, to_us_)]
        compact = _read_compact(conn, from_us, to_us_)
    for read in loaded:
        assert read.start.months.select("eligible_spend_won", "cashback_won").rows() == [(100_000, 7_000)]
        assert read.start.components.select("component_id", "cashback_won").rows() == [("city", 7_000)]
        assert read.recorded.payments["cashback_won"].to_list() == [9_000, 1_000]
        assert read.held.payments["cashback_won"].to_list() == [9_000, 4_000]
        assert sorted(read.held.by_funder.rows()) == [("city", 7_800), ("national", 5_200)]
    assert compact.start.months.select("eligible_spend_won", "cashback_won").rows() == [(100_000, 7_000)]
    assert compact.start.components.select("component_id", "cashback_won").rows() == [("city", 7_000)]
    assert compact.rows["held_cashback_won"].to_list() == [9_000, 4_000] and compact.recorded_won == 10_000
    assert (compact.held_components, compact.held_funders) == ({"city": 13_000}, {"city": 7_800, "national": 5_200})


def test_a_simulation_compares_with_what_the_payments_hold(capped_api):
    """The policy simulation starts the month and reports its actual figures from what the
    payments hold: after the first correction, the 15th–30th simulated under the policy
    in force is what its payments hold (no member affected), the recorded cashback beside."""
    from eum.cli import _simulation_text
    from settlement.simulate import simulate

    api = capped_api
    _month_of_three(api)
    assert api.post("/v1/policies", _capped("pharm-7", pharmacy_bp=700), role="policy-editor").status_code == 201
    _correct(api, "first-half", "pharm-7", "2026-11-01", "2026-11-15")
    r = api.post("/v1/policies/cap-2026-10/simulate", {"from": at("2026-11-15", "00:00:00"),
                                                       "to": at("2026-12-01", "00:00:00")}, role="finance")
    assert r.status_code == 200, r.text
    # 9,000 and the 4,000 the cap leaves after 7,000 + 9,000, beside the timeline in force
    assert r.json()["totals"] == {"simulated_won": 13_000, "actual_won": 13_000, "delta_won": 0}, r.json()
    assert r.json()["recorded"]["cashback_won"] == 10_000 and r.json()["recorded"]["held_won"] == 13_000
    report = simulate(api.services.reader, api.services.timeline, _us(at("2026-11-15", "00:00:00")),
                      _us(at("2026-12-01", "00:00:00")))
    assert report["totals"] == {"simulated_won": 13_000, "actual_won": 13_000, "delta_won": 0}, report["totals"]
    assert report["members"]["affected"] == 0
    assert (report["recorded"]["cashback_won"], report["recorded"]["held_won"]) == (10_000, 13_000)
    assert "(recorded 10,000 won, 13,000 won held after corrections)" in _simulation_text(report)
    assert report["by_funder"] == [{"source": "city", "simulated_won": 7_800, "actual_won": 7_800, "delta_won": 0},
                                   {"source": "national", "simulated_won": 5_200, "actual_won": 5_200,
                                    "delta_won": 0}]


def _with_cafe(policy_id: str, *, pharmacy_bp: int | None = None, cafe_bp: int | None = None) -> dict:
    doc = _capped(policy_id, pharmacy_bp=pharmacy_bp)
    if cafe_bp is not None:
        doc["components"][0]["variants"].insert(1, {"id": "cafe", "when": {"categories_include": ["cafe"]},
                                                    "bands": [{"up_to_won": 500_000, "rate_bp": cafe_bp}]})
    return doc


def test_a_correction_planned_before_another_took_effect_over_its_month_is_refused(capped_api):
    """The s21 review's case, under a 20,000 cap: A (pharmacies at 7%) and B (cafes at 5%)
    proposed at once, on different payments; B approved, then A. A had been planned
    against a month without B's cafe fix, and posted, the month as corrected (A's right
    policy, the last) said the cafe payment held 9,000 where it held 4,500: a restaurant
    payment then earned the cap's last 8,500, and a third correction with both fixes
    paid it 4,500 more (the month at 24,500). A's approval is refused now, nothing
    posted (it stays proposed); proposed again, it is planned against B's month, and
    the month stays at the cap through all three."""
    api = capped_api
    pharmacy_and_cafe(api, topup=1_500_000, amount=100_000, restaurant=True)
    for doc in (_with_cafe("pharm-7", pharmacy_bp=700), _with_cafe("cafe-5", cafe_bp=500),
                _with_cafe("both", pharmacy_bp=700, cafe_bp=500)):
        assert api.post("/v1/policies", doc, role="policy-editor").status_code == 201
    span = {"from": at("2026-11-01", "00:00:00"), "to": at("2026-12-01", "00:00:00")}

    def propose(correction_id: str, wrong: str, right: str) -> None:
        r = api.post("/v1/corrections", {"correction_id": correction_id, "wrong_policy_id": wrong,
                                         "right_policy_id": right, **span}, role="policy-editor")
        assert r.status_code == 201, r.text

    def approve(correction_id: str):
        return api.post(f"/v1/corrections/{correction_id}/approve", role="policy-approver")

    propose("A", "cap-2026-10", "pharm-7")
    propose("B", "cap-2026-10", "cafe-5")
    assert approve("B").json()["status"] == "posted"
    before = _held(api)
    r = approve("A")
    assert r.status_code == 409 and r.json()["code"] == "correction_state_conflict", r.text
    assert "'B'" in r.json()["detail"], r.text
    assert _held(api) == before == {"p-pharm": 10_000, "p-cafe": 4_500}
    assert api.get("/v1/corrections/A", role="policy-editor").json()["status"] == "proposed"
    propose("A2", "cafe-5", "both")  # the pharmacy fix, keeping B's
    assert approve("A2").json()["status"] == "posted"
    assert api.post("/v1/payments", {"payment_id": "p-rest", "member_id": "m1", "merchant_id": "rest",
                                     "amount": 100_000, "occurred_at": at("2026-11-20")}).status_code == 201
    propose("C", "both", "both")
    assert approve("C").json()["status"] == "posted"
    assert _held(api) == {"p-pharm": 7_000, "p-cafe": 4_500, "p-rest": 8_500} and _month(api) == CAP
    assert_book_ok(api)
