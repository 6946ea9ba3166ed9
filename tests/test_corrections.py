"""The 2023 pharmacy case end to end: pharmacies paid at the wrong rate, a correction
computed per member, approved by a second person, posted, and the book still balances."""

import orjson
import pytest
import yaml

from ledger.queries import check_book
from ledger import schema as s
from tests.book_helpers import (account_balance, approved_by_an_earlier_release, assert_book_ok,
                                assert_months_hold_their_payments, migrate_down_and_up, month_of_member, pay,
                                proposed_by_an_earlier_release, put_member, put_merchant, refund, topup)
from tests.conftest import POLICIES, at


def _right_policy():
    # What should have been in force for September 2025: pharmacies at 7%, not 10%.
    doc = yaml.safe_load((POLICIES / "2025-09-all-under-30eok.yaml").read_text())
    doc["policy_id"] = "incheon-2025-09-pharmacy-7"
    doc.pop("effective_from")
    variants = doc["components"][0]["variants"]
    variants.insert(1, {"id": "pharmacy", "when": {"categories_include": ["pharmacy"]},
                        "bands": [{"up_to_won": 300000, "rate_bp": 700}]})
    return doc


def _book_payments(api):
    for member in ("m1", "m2", "m3"):
        api.put(f"/v1/members/{member}", {"district": "namdong"})
        api.post("/v1/topups", {"topup_id": f"t-{member}", "member_id": member, "amount": 500_000,
                                "occurred_at": at("2025-09-01")})
    for merchant, category in (("pharm", "pharmacy"), ("cafe", "cafe")):
        api.put(f"/v1/merchants/{merchant}", {"name": merchant, "district": "namdong", "category": category,
                                              "annual_sales": 100_000_000, "registered_from": "2019-01-01"})
    payments = [("p1", "m1", "pharm", 12_345), ("p2", "m1", "cafe", 20_000), ("p3", "m2", "pharm", 250_000),
                ("p4", "m2", "pharm", 100_000), ("p5", "m3", "cafe", 30_000)]
    for day, (pid, member, merchant, amount) in enumerate(payments, start=2):
        r = api.post("/v1/payments", {"payment_id": pid, "member_id": member, "merchant_id": merchant,
                                      "amount": amount, "occurred_at": at(f"2025-09-{day:02d}")})
        assert r.json()["status"] == "approved"


def test_simulate_a_draft_against_what_was_in_force(api):
    _book_payments(api)
    assert api.post("/v1/policies", _right_policy(), role="policy-editor").status_code == 201
    r = api.post("/v1/policies/incheon-2025-09-pharmacy-7/simulate",
                 {"from": at("2025-09-01", "00:00:00"), "to": at("2025-10-01", "00:00:00")}, role="finance")
    assert r.status_code == 200, r.text
    report = r.json()
    # Pharmacy spend 12,345 + 250,000 + 50,000 (m2's band ends at 30만) earns 3 points less.
    # Under the draft m1 holds 370 fewer points at p2 (a cafe, 10%), so spends 370 more of
    # its charged money there and earns 37 more (the preview models the points feedback;
    # a correction keeps the recorded split: -370 and -9,000 below). m2's p4 is re-split
    # too (7,500 fewer points) and earns the same: its band had 50,000 left either way.
    assert report["payments"]["count"] == 5
    assert report["totals"]["actual_won"] - report["totals"]["simulated_won"] == 370 + 7_500 + 1_500 - 37
    assert report["points_feedback"]["modelled"] and report["points_feedback"]["payments"] == 2
    assert report["members"]["affected"] == 2


def _propose_september(api, correction_id: str = "pharmacy-2025-09"):
    """Propose September 2025's pharmacies at 7%, not 10% (`_right_policy`, posted first)."""
    return api.post("/v1/corrections", {"correction_id": correction_id, "wrong_policy_id": "incheon-2025-09",
                                        "right_policy_id": "incheon-2025-09-pharmacy-7",
                                        "from": at("2025-09-01", "00:00:00"), "to": at("2025-10-01", "00:00:00")},
                    role="policy-editor")


def test_pharmacy_correction_claws_back_the_difference_after_a_second_person(api):
    _book_payments(api)
    assert api.post("/v1/policies", _right_policy(), role="policy-editor").status_code == 201
    r = _propose_september(api)
    assert r.status_code == 201, r.text
    proposal = r.json()
    # m1: floor(12,345 × 7%) − floor(12,345 × 10%) = 864 − 1,234 = −370.
    # m2: 250,000 and then 50,000 of 100,000 inside the 30만 band: 3% of 300,000 = −9,000.
    deltas = {line["member_id"]: line["delta"] for line in proposal["lines"]}
    assert deltas == {"m1": -370, "m2": -9_000}
    assert proposal["summary"]["payments_changed"] == 3  # p1; p3 and p4
    assert proposal["status"] == "proposed"
    # The author's role cannot approve; the approver can, and posting follows.
    assert api.post("/v1/corrections/pharmacy-2025-09/approve", role="policy-editor").status_code == 403
    before = api.get("/v1/members/m2/balance", params={"month": "2025-09"}).json()
    r = api.post("/v1/corrections/pharmacy-2025-09/approve", role="policy-approver")
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "posted" and all(line["posted"] for line in r.json()["lines"])
    after = api.get("/v1/members/m2/balance", params={"month": "2025-09"}).json()
    # m2 spent 25,000 of its points on p4: the 5,000 left go first, 4,000 come from charged money.
    assert before["balances"]["points"] == 5_000 and after["balances"]["points"] == 0
    assert before["balances"]["charged"] - after["balances"]["charged"] == 4_000
    assert before["month"]["cashback_earned"] - after["month"]["cashback_earned"] == 9_000
    # Approving again posts nothing twice.
    again = api.post("/v1/corrections/pharmacy-2025-09/approve", role="policy-approver")
    assert again.status_code == 409
    assert api.get("/v1/members/m2/balance", params={"month": "2025-09"}).json()["balances"] == after["balances"]
    log = api.get("/v1/audit-log", role="auditor", params={"object_id": "pharmacy-2025-09"}).json()["items"]
    assert [e["action"] for e in log] == ["correction.propose", "correction.approve", "correction.post_lines",
                                          "correction.post"]
    with api.services.reader.connect() as conn:
        assert all(c.ok for c in check_book(conn)), check_book(conn)


def test_a_correction_over_a_range_without_payments_proposes_nothing(api):
    """No payment in the range (the book's read yields no chunk at all): a proposal of
    no lines, not a 500."""
    assert api.post("/v1/policies", _right_policy(), role="policy-editor").status_code == 201
    r = _propose_september(api, "empty")
    assert r.status_code == 201, r.text
    assert r.json()["lines"] == [] and r.json()["summary"]["payments"] == 0


# ---------------------------------------------------------------- refunds after a correction


def _pharm_7():
    """The policy in force for November 2026 (2025-10) with pharmacies at 7%."""
    doc = yaml.safe_load((POLICIES / "2025-10-cap-50man.yaml").read_text())
    doc["policy_id"] = "pharm-7"
    doc.pop("effective_from")
    doc["components"][0]["variants"].insert(1, {"id": "pharmacy", "when": {"categories_include": ["pharmacy"]},
                                                "bands": [{"up_to_won": 500000, "rate_bp": 700}]})
    return doc


def _november(api, *, cafe: bool = False):
    api.put("/v1/members/m1", {"district": "namdong"})
    for merchant, category in (("pharm", "pharmacy"), ("cafe", "cafe")):
        api.put(f"/v1/merchants/{merchant}", {"name": merchant, "district": "namdong", "category": category,
                                              "annual_sales": 100_000_000, "registered_from": "2019-01-01"})
    assert api.post("/v1/topups", {"topup_id": "t-m1", "member_id": "m1", "amount": 500_000,
                                   "occurred_at": at("2026-11-01")}).status_code == 201
    r = api.post("/v1/payments", {"payment_id": "p-pharm", "member_id": "m1", "merchant_id": "pharm",
                                  "amount": 100_000, "occurred_at": at("2026-11-02")})
    assert r.json()["cashback"]["amount"] == 10_000
    if cafe:  # 10,000 points and 90,000 charged: earns 9,000
        r = api.post("/v1/payments", {"payment_id": "p-cafe", "member_id": "m1", "merchant_id": "cafe",
                                      "amount": 100_000, "occurred_at": at("2026-11-03")})
        assert r.json()["cashback"]["amount"] == 9_000


def _pay_at_the_pharmacy(api, members, topup: int) -> None:
    """Each of `members` tops up `topup` on 1 November and pays 100,000 at the pharmacy
    on the 2nd: 10,000 cashback."""
    for member in members:
        api.put(f"/v1/members/{member}", {"district": "namdong"})
        assert api.post("/v1/topups", {"topup_id": f"t-{member}", "member_id": member, "amount": topup,
                                       "occurred_at": at("2026-11-01")}).status_code == 201
        r = api.post("/v1/payments", {"payment_id": f"p-{member}", "member_id": member, "merchant_id": "pharm",
                                      "amount": 100_000, "occurred_at": at("2026-11-02")})
        assert r.json()["cashback"]["amount"] == 10_000, r.text


def _correct_november(api, correction_id: str = "pharm-2026-11", policy: dict | None = None):
    policy = policy or _pharm_7()
    if api.get(f"/v1/policies/{policy['policy_id']}", role="policy-editor").status_code == 404:
        assert api.post("/v1/policies", policy, role="policy-editor").status_code == 201
    r = api.post("/v1/corrections", {"correction_id": correction_id, "wrong_policy_id": "incheon-2025-10",
                                     "right_policy_id": policy["policy_id"], "from": at("2026-11-01", "00:00:00"),
                                     "to": at("2026-12-01", "00:00:00")}, role="policy-editor")
    assert r.status_code == 201, r.text
    r = api.post(f"/v1/corrections/{correction_id}/approve", role="policy-approver")
    assert r.status_code == 200 and r.json()["status"] == "posted", r.text
    return r.json()


def _refund(api, refund_id: str, amount: int, day: str = "2026-11-20", payment_id: str = "p-pharm"):
    return api.post(f"/v1/payments/{payment_id}/refunds", {"refund_id": refund_id, "amount": amount,
                                                           "occurred_at": at(day)})


def _funders(api, month: str = "2026-11") -> dict[str, int]:
    return {source: account_balance(api, f"funder/{source}/{month}") for source in ("national", "city")}


def test_a_refund_after_a_clawback_correction_claws_back_only_what_the_payment_holds(api):
    """The upgrade audit's case: 10,000 paid at 10%, corrected to 7% (3,000 clawed back
    by the correction), then refunded whole: the refund claws back the 7,000 the payment
    holds, not its original 10,000 (the 3,000 twice; or, when it was the month's only
    cashback, a refund refused forever by the month counter's floor)."""
    _november(api)
    assert _correct_november(api)["lines"][0]["delta"] == -3_000
    balance = api.get("/v1/members/m1/balance", params={"month": "2026-11"}).json()
    assert balance["balances"]["points"] == 7_000 and balance["month"]["cashback_earned"] == 7_000
    assert _funders(api) == {"national": 2_800, "city": 4_200}
    r = _refund(api, "r-pharm", 100_000)
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["cashback_clawback"] == 7_000
    assert body["balances"] == {"charged": 500_000, "points": 0, "grants": []}
    assert _funders(api) == {"national": 0, "city": 0}
    month = api.get("/v1/members/m1/balance", params={"month": "2026-11"}).json()["month"]
    assert (month["cashback_eligible_spend"], month["cashback_earned"], month["cashback_by_component"]) == (0, 0, {})
    again = _refund(api, "r-pharm", 100_000)
    assert again.status_code == 200 and again.content == r.content
    assert_book_ok(api)
    assert_months_hold_their_payments(api)


def test_a_refund_after_a_correction_leaves_the_other_payments_cashback(api):
    """With a cafe payment beside it (10,000 points and 90,000 charged, 9,000 earned),
    the whole refund of the pharmacy payment leaves the member exactly the cafe's
    9,000: 409,000 in all, not 406,000 (the funders had kept 3,000 of it)."""
    _november(api, cafe=True)
    _correct_november(api)
    assert _funders(api) == {"national": 2_800 + 3_600, "city": 4_200 + 5_400}
    r = _refund(api, "r-pharm", 100_000)
    assert r.status_code == 201, r.text
    assert r.json()["cashback_clawback"] == 7_000
    balances = r.json()["balances"]
    assert balances["charged"] + balances["points"] == 409_000
    assert _funders(api) == {"national": 3_600, "city": 5_400}
    assert api.get("/v1/members/m1/balance", params={"month": "2026-11"}).json()["month"]["cashback_earned"] == 9_000
    assert_book_ok(api)
    assert_months_hold_their_payments(api)


def _points_and_month(api) -> tuple[int, int, int]:
    body = api.get("/v1/members/m1/balance", params={"month": "2026-11"}).json()
    return body["balances"]["charged"], body["balances"]["points"], body["month"]["cashback_earned"]


def test_partial_refunds_before_and_after_a_correction(api):
    """30,000 refunded before the correction claws back 3,000 of the 10,000; the plan
    re-evaluates the 70,000 left (7,000 → 4,900 at 7%: −2,100); refunds after it claw
    back from the 4,900 in proportion to the base left: 20,000 of 70,000 is 1,400, the
    last 50,000 the other 3,500. The funders end with nothing, the member with the
    500,000 topped up."""
    _november(api)
    assert _refund(api, "r-1", 30_000, "2026-11-05").json()["cashback_clawback"] == 3_000
    line = _correct_november(api)["lines"][0]
    assert line["delta"] == -2_100
    assert _points_and_month(api) == (430_000, 4_900, 4_900)
    assert _funders(api) == {"national": 1_960, "city": 2_940}
    assert _refund(api, "r-2", 20_000).json()["cashback_clawback"] == 1_400
    assert _points_and_month(api) == (450_000, 3_500, 3_500)
    assert_months_hold_their_payments(api)
    last = _refund(api, "r-3", 50_000)
    assert last.json()["cashback_clawback"] == 3_500
    assert _points_and_month(api) == (500_000, 0, 0)
    assert _funders(api) == {"national": 0, "city": 0}
    assert _refund(api, "r-3", 50_000).content == last.content
    assert_book_ok(api)
    assert_months_hold_their_payments(api)


def test_refunds_after_a_correction_that_raised_the_cashback(api):
    """Pharmacies at 12%: the correction pays 2,000 more (800 national, 1,200 city); a
    quarter refunded claws back a quarter of the 12,000, the rest the other 9,000."""
    _november(api)
    policy = _pharm_7()
    policy["policy_id"] = "pharm-12"
    policy["components"][0]["variants"][1]["bands"][0]["rate_bp"] = 1_200
    assert _correct_november(api, policy=policy)["lines"][0]["delta"] == 2_000
    assert _points_and_month(api) == (400_000, 12_000, 12_000)
    assert _funders(api) == {"national": 4_800, "city": 7_200}
    assert _refund(api, "r-1", 25_000).json()["cashback_clawback"] == 3_000
    assert _funders(api) == {"national": 3_600, "city": 5_400}
    assert _refund(api, "r-2", 75_000).json()["cashback_clawback"] == 9_000
    assert _points_and_month(api) == (500_000, 0, 0)
    assert _funders(api) == {"national": 0, "city": 0}
    assert_book_ok(api)
    assert_months_hold_their_payments(api)


def test_posting_the_rest_of_an_approved_correction_names_who_asked(api):
    """A line a budget refused (`budget_exceeded`) stays unposted; the next approve call
    posts the rest. Its audit entry's actor was `correction-poster`, whoever called: it
    names the caller now, with the approver and the author. The author may make that call
    with an approver key of their own (the approval covered every line; docs/design.md,
    "Second person everywhere money policy changes"), and the entry shows it was them."""
    from ledger.db import make_engine
    from ledger.keys import create_key

    _november(api)
    policy = _pharm_7()
    policy["policy_id"] = "pharm-12"
    policy["components"][0]["variants"][1]["bands"][0]["rate_bp"] = 1_200  # 2,000 more: city 1,200
    assert api.post("/v1/policies", policy, role="policy-editor").status_code == 201
    assert api.put("/v1/budgets/city/2026-11", {"amount": 6_000}, role="finance").status_code == 200  # all used
    r = api.post("/v1/corrections", {"correction_id": "c1", "wrong_policy_id": "incheon-2025-10",
                                     "right_policy_id": "pharm-12", "from": at("2026-11-01", "00:00:00"),
                                     "to": at("2026-12-01", "00:00:00")}, role="policy-editor")
    assert r.status_code == 201 and r.json()["lines"][0]["delta"] == 2_000, r.text
    r = api.post("/v1/corrections/c1/approve", role="policy-approver")
    assert r.status_code == 200 and r.json()["status"] == "approved", r.text
    assert not r.json()["lines"][0]["posted"]
    assert api.put("/v1/budgets/city/2026-11", {"amount": 10_000}, role="finance").status_code == 200
    engine = make_engine(api.settings.database_url)
    _, own = create_key(engine, name="test policy-editor", role="policy-approver",  # the author's second key
                        pepper=api.settings.key_pepper.get_secret_value())
    engine.dispose()
    r = api.client.post("/v1/corrections/c1/approve", headers={"Authorization": f"Bearer {own}"})
    assert r.status_code == 200 and r.json()["status"] == "posted", r.text
    assert _funders(api) == {"national": 4_800, "city": 7_200}
    log = api.get("/v1/audit-log", role="auditor", params={"object_id": "c1"}).json()["items"]
    posts = [e for e in log if e["action"] == "correction.post"]
    approver = next(e["actor"] for e in log if e["action"] == "correction.approve")
    author = next(e["actor"] for e in log if e["action"] == "correction.propose")
    assert approver.startswith("test policy-approver (") and author.startswith("test policy-editor (")
    assert [p["detail"]["failed"][0]["error"] for p in posts[:1]] == ["budget_exceeded"]
    assert [p["actor"] for p in posts] == [approver, f"test policy-editor ({own.split('_')[1]})"]
    assert all(p["detail"]["approved_by"] == approver and p["detail"]["author"] == author for p in posts)
    assert_book_ok(api)


def test_a_correction_planned_before_another_posted_more_of_its_lines_is_refused(api):
    """pharm-12 gives three members 2,000 each (city 1,200); the city budget covers one
    line, so two are refused. pharm-7 is then proposed, planned on those two months as
    pharm-12 left them: not corrected. The budget is raised by one line's city part and
    pharm-12 is approved again: one more line posts, one is refused again, and it stays
    approved. pharm-7's plan no longer holds for that month, and its approval is refused
    (the crash audit: a retry that posted lines but not all left the correction's
    `updated_at_us` as it was, so `_refuse_if_superseded` did not see it take effect)."""
    api.put("/v1/merchants/pharm", {"name": "pharm", "district": "namdong", "category": "pharmacy",
                                    "annual_sales": 100_000_000, "registered_from": "2019-01-01"})
    _pay_at_the_pharmacy(api, ("m1", "m2", "m3"), topup=100_000)
    committed = _funders(api)["city"]  # 3 × 6,000
    policy = _pharm_7()
    policy["policy_id"] = "pharm-12"
    policy["components"][0]["variants"][1]["bands"][0]["rate_bp"] = 1_200
    assert api.post("/v1/policies", policy, role="policy-editor").status_code == 201
    assert api.put("/v1/budgets/city/2026-11", {"amount": committed + 1_200}, role="finance").status_code == 200
    r = api.post("/v1/corrections", {"correction_id": "to-12", "wrong_policy_id": "incheon-2025-10",
                                     "right_policy_id": "pharm-12", "from": at("2026-11-01", "00:00:00"),
                                     "to": at("2026-12-01", "00:00:00")}, role="policy-editor")
    assert r.status_code == 201 and len(r.json()["lines"]) == 3, r.text
    r = api.post("/v1/corrections/to-12/approve", role="policy-approver")
    assert r.status_code == 200 and [line["posted"] for line in r.json()["lines"]].count(True) == 1, r.text
    _propose(api, "to-7")
    assert api.put("/v1/budgets/city/2026-11", {"amount": committed + 2_400}, role="finance").status_code == 200
    r = api.post("/v1/corrections/to-12/approve", role="policy-approver")
    assert r.status_code == 200 and r.json()["status"] == "approved", r.text
    assert [line["posted"] for line in r.json()["lines"]].count(True) == 2, r.text
    r = api.post("/v1/corrections/to-7/approve", role="policy-approver")
    assert r.status_code == 409 and r.json()["code"] == "correction_state_conflict", r.text
    assert "'to-12'" in r.json()["detail"]
    assert_book_ok(api)
    assert_months_hold_their_payments(api)


def _propose(api, correction_id: str = "pharm-2026-11"):
    assert api.post("/v1/policies", _pharm_7(), role="policy-editor").status_code == 201
    r = api.post("/v1/corrections", {"correction_id": correction_id, "wrong_policy_id": "incheon-2025-10",
                                     "right_policy_id": "pharm-7", "from": at("2026-11-01", "00:00:00"),
                                     "to": at("2026-12-01", "00:00:00")}, role="policy-editor")
    assert r.status_code == 201, r.text
    return r.json()


def test_refunds_between_the_proposal_and_its_approval(api):
    """The plan saw nothing refunded (−3,000); 40,000 is refunded before a second person
    approves, clawing back 4,000 of the original 10,000. Posting then takes only the
    60% of the delta that the payment still has (−1,800), and the payment holds 4,200:
    7% of the 60,000 left, which the last refund claws back."""
    _november(api)
    assert _propose(api)["lines"][0]["delta"] == -3_000
    assert _refund(api, "r-1", 40_000, "2026-11-05").json()["cashback_clawback"] == 4_000
    r = api.post("/v1/corrections/pharm-2026-11/approve", role="policy-approver")
    assert r.status_code == 200 and r.json()["status"] == "posted", r.text
    # The history audit's case: the lines said -3,000 (city -1,800, national -1,200) was
    # posted, where the member was charged -1,800: each posted line gives what posted too.
    for answer in (r.json(), api.get("/v1/corrections/pharm-2026-11", role="auditor").json()):
        [line] = answer["lines"]
        assert (line["delta"], line["by_funder"]) == (-3_000, {"city": -1_800, "national": -1_200}), line
        assert (line["posted_delta"], line["posted_by_funder"]) == (-1_800, {"city": -1_080, "national": -720}), line
        assert line["clawback_detail"] == {"from_points": 1_800, "from_charged": 0, "owed": 0}, line
    assert _points_and_month(api) == (440_000, 4_200, 4_200)
    assert _funders(api) == {"national": 1_680, "city": 2_520}
    assert_months_hold_their_payments(api)
    assert _refund(api, "r-2", 60_000).json()["cashback_clawback"] == 4_200
    assert _points_and_month(api) == (500_000, 0, 0)
    assert_book_ok(api)


def test_a_payment_refunded_whole_before_the_approval_is_not_corrected(api):
    _november(api)
    _propose(api)
    assert _refund(api, "r-1", 100_000, "2026-11-05").json()["cashback_clawback"] == 10_000
    r = api.post("/v1/corrections/pharm-2026-11/approve", role="policy-approver")
    assert r.status_code == 200 and r.json()["status"] == "posted", r.text
    assert _points_and_month(api) == (500_000, 0, 0)
    assert _funders(api) == {"national": 0, "city": 0}
    assert_book_ok(api)
    assert_months_hold_their_payments(api)


def _lines_of(correction_id: str):
    cl = s.correction_lines
    return cl.select().with_only_columns(cl.c.line_id).where(cl.c.correction_id == correction_id)


def _forget_payments(api, correction_id: str) -> None:
    """The correction as one proposed before migration 0014: no per-payment rows."""
    cp = s.correction_payments
    with api.services.engine.begin() as conn:
        conn.execute(cp.delete().where(cp.c.line_id.in_(_lines_of(correction_id))))


def test_a_correction_proposed_before_per_payment_rows_is_not_approved(api):
    _november(api)
    with proposed_by_an_earlier_release():
        _propose(api)
    _forget_payments(api, "pharm-2026-11")
    r = api.post("/v1/corrections/pharm-2026-11/approve", role="policy-approver")
    assert r.status_code == 409 and r.json()["code"] == "correction_state_conflict", r.text
    assert "propose it again" in r.json()["detail"]
    assert api.get("/v1/corrections/pharm-2026-11", role="policy-editor").json()["status"] == "proposed"
    assert _points_and_month(api) == (400_000, 10_000, 10_000)


def _post_as_before_0014(api):
    """Approved and posted as the code before migration 0014 posted it: per
    member-month only, the payments keeping their original lines."""
    with proposed_by_an_earlier_release():
        _propose(api)
    _forget_payments(api, "pharm-2026-11")
    approved_by_an_earlier_release(api, "pharm-2026-11")
    r = api.post("/v1/corrections/pharm-2026-11/approve", role="policy-approver")
    assert r.status_code == 200 and r.json()["status"] == "posted", r.text
    with api.services.reader.connect() as conn:
        states = conn.execute(s.payments.select().with_only_columns(s.payments.c.refund_state)).scalars().all()
    assert all("corrected" not in state for state in states)


def test_a_refund_after_a_correction_posted_before_0014_goes_through(api):
    """No per-payment record: the refund claws back from the original lines as before,
    but no funder gives back more than its month's account holds and no counter goes
    below zero, so it is recorded instead of refused at every retry. Here the payment
    was the month's only cashback, so what the funders hold is exactly the 7,000."""
    _november(api)
    _post_as_before_0014(api)
    assert _funders(api) == {"national": 2_800, "city": 4_200}
    r = _refund(api, "r-pharm", 100_000)
    assert r.status_code == 201, r.text
    assert r.json()["cashback_clawback"] == 7_000
    assert _points_and_month(api) == (500_000, 0, 0)
    assert _funders(api) == {"national": 0, "city": 0}
    assert _refund(api, "r-pharm", 100_000).content == r.content
    assert_book_ok(api)


def test_a_refund_after_a_correction_posted_before_0014_beside_other_cashback(api):
    """With the cafe's 9,000 beside it the funders' accounts hold enough, and without a
    per-payment record nothing tells the 3,000 the correction took from the rest: the
    refund claws back the original 10,000 (the member ends at 406,000, as before the
    fix). It goes through, and the book balances (docs/design.md, "Corrections")."""
    _november(api, cafe=True)
    _post_as_before_0014(api)
    r = _refund(api, "r-pharm", 100_000)
    assert r.status_code == 201, r.text
    assert r.json()["cashback_clawback"] == 10_000
    balances = r.json()["balances"]
    assert balances["charged"] + balances["points"] == 406_000
    assert_book_ok(api)


def test_migration_0014_adds_and_drops_the_per_payment_rows(db_url):
    from alembic import command
    from sqlalchemy import inspect

    from ledger.db import alembic_config, make_engine, migrate

    command.downgrade(alembic_config(db_url), "0013")
    engine = make_engine(db_url)
    assert "correction_payments" not in inspect(engine).get_table_names()
    engine.dispose()
    migrate(db_url)
    engine = make_engine(db_url)
    assert {c["name"] for c in inspect(engine).get_columns("correction_payments")} == {
        "line_id", "payment_id", "refunded_won", "deltas", "corrections_seen", "base"}  # the last two: 0015, 0017
    engine.dispose()


def test_migration_0014_will_not_go_down_while_per_payment_rows_are_recorded(api, db_url):
    from ledger.db import migrate

    def rows() -> list[tuple]:
        cp = s.correction_payments
        with api.services.reader.connect() as conn:
            return sorted(tuple(row) for row in conn.execute(cp.select()))

    _book_payments(api)
    assert api.post("/v1/policies", _right_policy(), role="policy-editor").status_code == 201
    r = _propose_september(api)
    assert r.status_code == 201, r.text
    kept = rows()
    assert len(kept) == 3  # p1, p3, p4
    with pytest.raises(RuntimeError, match="correction_payments holds"):
        migrate_down_and_up(db_url, "0013")
    migrate(db_url)  # back at the head, wherever the refusal left it
    if db_url.startswith("postgresql"):  # the whole downgrade rolled back
        assert rows() == kept
        r = api.post("/v1/corrections/pharmacy-2025-09/approve", role="policy-approver")  # posted from them
        assert r.status_code == 200 and r.json()["status"] == "posted", r.text
        assert_book_ok(api)
    else:  # no transactional DDL: 0017's and 0015's downgrades ran (and dropped their columns) before it
        assert [row[:4] for row in rows()] == [row[:4] for row in kept]
        # What they dropped is gone: the lines are not as proposed, and the book check says so.
        with pytest.raises(AssertionError, match="correction pharmacy-2025-09: lines"):
            assert_book_ok(api)


# ---------------------------------------------------------------- corrections that change what counts


def _ceiling(policy_id: str, sales_max_won: int) -> dict:
    """The policy in force for November 2026 (2025-10: 10% on the first 50만, at most
    50,000 a month) with another merchant sales ceiling than its 30억."""
    doc = yaml.safe_load((POLICIES / "2025-10-cap-50man.yaml").read_text())
    doc["policy_id"] = policy_id
    doc.pop("effective_from")
    doc["cashback_eligibility"]["merchant_sales_max_won"] = sales_max_won
    return doc


def _two_shops(api, big_sales: int = 4_000_000_000,
               payments=(("p1", "big", "2026-11-05"), ("p2", "small", "2026-11-15"))):
    """m1 pays 300,000 at a shop of `big_sales` a year (40억: above the 30억 ceiling, no
    cashback and not counted toward the month), then 300,000 at a 10억 shop (or
    `payments`: (payment_id, "big" or "small", day), 300,000 each)."""
    api.put("/v1/members/m1", {"district": "namdong"})
    for merchant, sales in (("big", big_sales), ("small", 1_000_000_000)):
        api.put(f"/v1/merchants/{merchant}", {"name": merchant, "district": "namdong", "category": "restaurant",
                                              "annual_sales": sales, "registered_from": "2019-01-01"})
    assert api.post("/v1/topups", {"topup_id": "t-m1", "member_id": "m1", "amount": 1_500_000,
                                   "occurred_at": at("2026-11-01")}).status_code == 201
    for pid, merchant, day in payments:
        r = api.post("/v1/payments", {"payment_id": pid, "member_id": "m1", "merchant_id": merchant,
                                      "amount": 300_000, "occurred_at": at(day)})
        assert r.json()["status"] == "approved", r.text


def _month(api) -> tuple[int, int]:
    month = api.get("/v1/members/m1/balance", params={"month": "2026-11"}).json()["month"]
    return month["cashback_eligible_spend"], month["cashback_earned"]


def _payment_base(api, payment_id: str) -> tuple[int, bool]:
    with api.services.reader.connect() as conn:
        row = conn.execute(s.payments.select()
                           .with_only_columns(s.payments.c.base_won, s.payments.c.counts_toward_month)
                           .where(s.payments.c.payment_id == payment_id)).one()
    return row.base_won, bool(row.counts_toward_month)


def test_a_correction_that_counts_a_payment_moves_the_months_eligible_spend(api):
    """The s20 domain audit's case: with the ceiling at 50억 the 40억 shop's 300,000
    counts (30,000) and the 10억 shop's 300,000 falls 200,000 inside the 50만 band
    (20,000): the correction pays 20,000 more, and the month has 600,000 of eligible
    spend. It kept 300,000, so 200,000 more at the 10억 shop earned 20,000 again, the
    month at 70,000 where the cap is 50,000; it earns nothing now."""
    _two_shops(api)
    assert _month(api) == (300_000, 30_000)
    _correct_november(api, "ceiling", _ceiling("ceiling-50eok", 5_000_000_000))
    assert _month(api) == (600_000, 50_000)
    assert _payment_base(api, "p1") == (300_000, True)
    assert_book_ok(api)
    assert_months_hold_their_payments(api)
    r = api.post("/v1/payments", {"payment_id": "p3", "member_id": "m1", "merchant_id": "small",
                                  "amount": 200_000, "occurred_at": at("2026-11-20")})
    assert r.json()["cashback"]["amount"] == 0, r.text
    assert _month(api)[1] == 50_000
    assert_book_ok(api)
    assert_months_hold_their_payments(api)


def test_a_correction_that_stops_a_payment_counting_and_its_refund(api):
    """Ceiling at 20억, not 30억: the 25억 shop's 300,000 (30,000) no longer counts, and
    the 10억 shop's payment (30,000 of points from the first and 270,000 charged) earns
    10% of all its 270,000 base (27,000; 20,000 before): −23,000, and the month's
    eligible spend is 270,000, not 570,000. A whole refund of the payment that no
    longer counts takes nothing from the month's eligible spend (it took 300,000, to
    0 with 270,000 of counted spend left); half of the other takes 150,000 and 15,000
    of cashback."""
    _two_shops(api, big_sales=2_500_000_000)
    assert _month(api) == (570_000, 50_000)
    assert _correct_november(api, "ceiling", _ceiling("ceiling-20eok", 2_000_000_000))["lines"][0]["delta"] == -23_000
    assert _month(api) == (270_000, 27_000)
    assert _payment_base(api, "p1") == (0, False)
    r = _refund(api, "r-1", 300_000, payment_id="p1")
    assert r.status_code == 201 and r.json()["cashback_clawback"] == 0, r.text
    assert _month(api) == (270_000, 27_000)
    assert _refund(api, "r-2", 150_000, payment_id="p2").json()["cashback_clawback"] == 15_000
    assert _month(api) == (120_000, 12_000)
    assert_book_ok(api)
    assert_months_hold_their_payments(api)


def _propose_over_november(api, correction_id: str, wrong_policy_id: str, right: dict) -> dict:
    """`right` submitted, and a correction from `wrong_policy_id` to it over November proposed."""
    assert api.post("/v1/policies", right, role="policy-editor").status_code == 201
    r = api.post("/v1/corrections", {"correction_id": correction_id, "wrong_policy_id": wrong_policy_id,
                                     "right_policy_id": right["policy_id"], "from": at("2026-11-01", "00:00:00"),
                                     "to": at("2026-12-01", "00:00:00")}, role="policy-editor")
    assert r.status_code == 201, r.text
    return r.json()


def test_a_second_correction_of_the_month_re_bases_from_the_first(api):
    """The first correction counted the 40억 shop (ceiling 50억); a second one finds the
    ceiling should have been 35억 (wrong: the first's right policy) and puts it back
    out: the month returns to 300,000 of eligible spend and 30,000, each payment
    holding what the 35억 policy gives it."""
    _two_shops(api)
    _correct_november(api, "to-50", _ceiling("ceiling-50eok", 5_000_000_000))
    assert _month(api) == (600_000, 50_000)
    proposal = _propose_over_november(api, "to-35", "ceiling-50eok", _ceiling("ceiling-35eok", 3_500_000_000))
    assert [line["delta"] for line in proposal["lines"]] == [-20_000], proposal
    r = api.post("/v1/corrections/to-35/approve", role="policy-approver")
    assert r.status_code == 200 and r.json()["status"] == "posted", r.text
    assert _month(api) == (300_000, 30_000)
    assert _payment_base(api, "p1") == (0, False) and _payment_base(api, "p2") == (300_000, True)
    assert_book_ok(api)
    assert_months_hold_their_payments(api)


def test_a_correction_of_part_of_a_month_re_evaluates_the_rest_of_it(api):
    """The s20 domain audit's window case: the slip is corrected over 1–11 November
    only, and the 10억 shop's payment of the 15th, under the policy in force, earned
    the band's first 300,000 (30,000) because the 40억 shop's payment did not count.
    Counted, it takes that band room: the rest of the month is re-evaluated after the
    range, and the 15th's payment gives back 10,000 (200,000 in the band: 20,000). The
    correction paid the 40억 shop's 30,000 alone, and the month ended at 60,000 where
    its cap is 50,000."""
    _two_shops(api)
    assert api.post("/v1/policies", _ceiling("ceiling-50eok", 5_000_000_000), role="policy-editor").status_code == 201
    r = api.post("/v1/corrections", {"correction_id": "window", "wrong_policy_id": "incheon-2025-10",
                                     "right_policy_id": "ceiling-50eok", "from": at("2026-11-01", "00:00:00"),
                                     "to": at("2026-11-11", "00:00:00")}, role="policy-editor")
    assert r.status_code == 201, r.text
    assert [line["delta"] for line in r.json()["lines"]] == [20_000]
    assert r.json()["summary"]["payments_changed"] == 2
    r = api.post("/v1/corrections/window/approve", role="policy-approver")
    assert r.status_code == 200 and r.json()["status"] == "posted", r.text
    assert _month(api) == (600_000, 50_000)
    assert_book_ok(api)
    assert_months_hold_their_payments(api)
    assert _refund(api, "r-2", 300_000, payment_id="p2").json()["cashback_clawback"] == 20_000


@pytest.mark.parametrize("order", ["in date order", "out of date order"])
def test_the_rest_of_the_month_is_corrected_again_by_a_correction_whose_range_holds_it(api, order):
    """The s20 review's case: a correction of 1–11 November to a 50억 ceiling at 12%
    re-evaluates the 15th's payment under the policy in force then (10%: 20,000), and the
    payment was recorded as corrected to that right policy, so a correction of 11–30
    November to the same policy planned nothing for it: it kept 20,000 where the right
    policy over its own date gives 24,000 (200,000 of band room at 12%).

    Out of date order (the s20 review's third case): 11–30 November first gives the
    15th's payment 36,000 (the band's first 300,000 at 12%, the 5th's payment not
    counted then); 1–11 November then counts the 5th's (36,000) and re-evaluated the
    rest of the month under the policy in force, not under the first correction's right
    policy, so the 15th's payment kept 36,000: the month at 72,000 where 500,000 of
    band at 12% gives 60,000. Either way the month ends as the right policy over the
    whole month has it. m2, whose only payment (the 40억 shop's, the 6th) the 11–30
    correction does not touch, is planned beside m1 under the timeline as first in
    force: 36,000."""
    _two_shops(api)
    api.put("/v1/members/m2", {"district": "namdong"})
    assert api.post("/v1/topups", {"topup_id": "t-m2", "member_id": "m2", "amount": 300_000,
                                   "occurred_at": at("2026-11-01")}).status_code == 201
    assert api.post("/v1/payments", {"payment_id": "p-m2", "member_id": "m2", "merchant_id": "big",
                                     "amount": 300_000, "occurred_at": at("2026-11-06")}).status_code == 201
    right = _ceiling("ceiling-50eok-12", 5_000_000_000)
    for variant in right["components"][0]["variants"]:
        if variant["id"] == "standard":
            variant["bands"][0]["rate_bp"] = 1_200
    assert api.post("/v1/policies", right, role="policy-editor").status_code == 201
    ranges = [("first", "2026-11-01", "2026-11-11"), ("rest", "2026-11-11", "2026-12-01")]
    for correction_id, start, end in ranges if order == "in date order" else ranges[::-1]:
        r = api.post("/v1/corrections", {"correction_id": correction_id, "wrong_policy_id": "incheon-2025-10",
                                         "right_policy_id": "ceiling-50eok-12", "from": at(start, "00:00:00"),
                                         "to": at(end, "00:00:00")}, role="policy-editor")
        assert r.status_code == 201, r.text
        r = api.post(f"/v1/corrections/{correction_id}/approve", role="policy-approver")
        assert r.status_code == 200 and r.json()["status"] == "posted", r.text
    assert _month(api) == (600_000, 60_000)  # 36,000 + 24,000: 500,000 of band at 12%
    m2 = api.get("/v1/members/m2/balance", params={"month": "2026-11"}).json()["month"]
    assert (m2["cashback_eligible_spend"], m2["cashback_earned"]) == (300_000, 36_000)
    assert_book_ok(api)
    assert_months_hold_their_payments(api)


def _last_post_failures(api) -> list[dict]:
    """The failed lines the last `correction.post` audit entry lists."""
    with api.services.reader.connect() as conn:
        entry = conn.execute(s.audit_log.select().where(s.audit_log.c.action == "correction.post")
                             .order_by(s.audit_log.c.entry_id.desc()).limit(1)).one()
    return orjson.loads(entry.detail)["failed"]


def test_a_line_whose_month_has_payments_recorded_since_its_plan_is_refused(api):
    """The s20 review's case: the 40억 shop's payment of the 2nd is corrected to a 50억
    ceiling (+30,000); before a second person approves, the member pays 300,000 at a
    10억 shop on the 4th and earns the band's first 300,000 (30,000), which the plan never
    saw: posted, the month ended at 60,000 where its cap is 50,000. The line is refused
    (nothing posted), and the correction proposed again corrects both."""
    _two_shops(api)
    assert api.post("/v1/policies", _ceiling("ceiling-50eok", 5_000_000_000), role="policy-editor").status_code == 201
    body = {"wrong_policy_id": "incheon-2025-10", "right_policy_id": "ceiling-50eok",
            "from": at("2026-11-01", "00:00:00"), "to": at("2026-11-11", "00:00:00")}
    r = api.post("/v1/payments/p2/refunds", {"refund_id": "r-p2", "amount": 300_000, "occurred_at": at("2026-11-16")})
    assert r.status_code == 201, r.text
    assert _month(api) == (0, 0)
    assert api.post("/v1/corrections", {"correction_id": "early", **body}, role="policy-editor").status_code == 201
    r = api.post("/v1/payments", {"payment_id": "p3", "member_id": "m1", "merchant_id": "small", "amount": 300_000,
                                  "occurred_at": at("2026-11-20")})
    assert r.json()["cashback"]["amount"] == 30_000, r.text
    r = api.post("/v1/corrections/early/approve", role="policy-approver")
    assert r.status_code == 200 and r.json()["status"] == "approved", r.text
    assert _month(api) == (300_000, 30_000)  # nothing of the line posted
    [failed] = _last_post_failures(api)
    assert failed["error"] == "payments_recorded_since_planned" and "p3" in failed["detail"], failed
    assert api.post("/v1/corrections", {"correction_id": "again", **body}, role="policy-editor").status_code == 201
    r = api.post("/v1/corrections/again/approve", role="policy-approver")
    assert r.status_code == 200 and r.json()["status"] == "posted", r.text
    assert _month(api) == (600_000, 50_000)
    assert_book_ok(api)
    assert_months_hold_their_payments(api)


def test_a_line_whose_month_has_refunds_recorded_since_its_plan_is_refused(api):
    """A refund of a payment the line does not hold also moves band room: m1 pays
    300,000 at the 10억 shop on the 3rd (30,000) and 300,000 at the 40억 shop on the
    15th (none: above the 30억 ceiling; 30,000 of it paid with the points of the 3rd, so
    its base is 270,000). A correction of the 11th-30th to a 50억 ceiling plans the
    15th's payment the 200,000 of band left (+20,000). Before a second person approves,
    the payment of the 3rd is refunded whole (its 30,000 clawed back, its 300,000 out of
    the band): the right policy now gives the 15th's its whole base in the band (27,000),
    and the plan posted left the month at 20,000. The line is refused (nothing posted),
    and the correction proposed again posts +27,000."""
    _two_shops(api, payments=(("p0", "small", "2026-11-03"), ("pb", "big", "2026-11-15")))
    assert _month(api) == (300_000, 30_000)
    assert api.post("/v1/policies", _ceiling("ceiling-50eok", 5_000_000_000), role="policy-editor").status_code == 201
    body = {"wrong_policy_id": "incheon-2025-10", "right_policy_id": "ceiling-50eok",
            "from": at("2026-11-11", "00:00:00"), "to": at("2026-12-01", "00:00:00")}
    r = api.post("/v1/corrections", {"correction_id": "late", **body}, role="policy-editor")
    assert r.status_code == 201 and [line["delta"] for line in r.json()["lines"]] == [20_000], r.text
    r = _refund(api, "r-p0", 300_000, "2026-11-20", payment_id="p0")
    assert r.status_code == 201 and r.json()["cashback_clawback"] == 30_000, r.text
    assert _month(api) == (0, 0)
    r = api.post("/v1/corrections/late/approve", role="policy-approver")
    assert r.status_code == 200 and r.json()["status"] == "approved", r.text
    assert _month(api) == (0, 0)  # nothing of the line posted
    [failed] = _last_post_failures(api)
    assert failed["error"] == "payments_recorded_since_planned" and "r-p0" in failed["detail"], failed
    r = api.post("/v1/corrections", {"correction_id": "again", **body}, role="policy-editor")
    assert r.status_code == 201 and [line["delta"] for line in r.json()["lines"]] == [27_000], r.text
    r = api.post("/v1/corrections/again/approve", role="policy-approver")
    assert r.status_code == 200 and r.json()["status"] == "posted", r.text
    assert _month(api) == (270_000, 27_000)
    assert_book_ok(api)
    assert_months_hold_their_payments(api)


def test_a_refund_between_the_proposal_and_its_approval_of_a_payment_it_counts(api):
    """100,000 of the 40억 shop's payment is refunded before a second person approves
    the 50억 ceiling: it had no base then, so its +30,000 is cut to the share of the
    right policy's base still left (two thirds: +20,000), and it counts its 200,000
    left. It was posted whole, and the month kept 300,000 of eligible spend."""
    _two_shops(api)
    assert api.post("/v1/policies", _ceiling("ceiling-50eok", 5_000_000_000), role="policy-editor").status_code == 201
    r = api.post("/v1/corrections", {"correction_id": "ceiling", "wrong_policy_id": "incheon-2025-10",
                                     "right_policy_id": "ceiling-50eok", "from": at("2026-11-01", "00:00:00"),
                                     "to": at("2026-12-01", "00:00:00")}, role="policy-editor")
    assert r.status_code == 201 and [line["delta"] for line in r.json()["lines"]] == [20_000], r.text
    assert _refund(api, "r-1", 100_000, "2026-11-16", payment_id="p1").json()["cashback_clawback"] == 0
    r = api.post("/v1/corrections/ceiling/approve", role="policy-approver")
    assert r.status_code == 200 and r.json()["status"] == "posted", r.text
    assert _month(api) == (500_000, 40_000)
    assert _payment_base(api, "p1") == (300_000, True)
    assert_book_ok(api)
    assert_months_hold_their_payments(api)
    assert _refund(api, "r-2", 200_000, "2026-11-20", payment_id="p1").json()["cashback_clawback"] == 20_000
    assert _month(api) == (300_000, 20_000)
    assert_book_ok(api)
    assert_months_hold_their_payments(api)


def _forget_base(api, correction_id: str) -> None:
    """The correction as one proposed before migration 0017: per-payment rows without the base."""
    cp = s.correction_payments
    with api.services.engine.begin() as conn:
        conn.execute(cp.update().where(cp.c.line_id.in_(_lines_of(correction_id))).values(base=None))


def _propose_ceiling_without_base(api) -> None:
    """November to a 50억 ceiling, proposed as before migration 0017."""
    assert api.post("/v1/policies", _ceiling("ceiling-50eok", 5_000_000_000), role="policy-editor").status_code == 201
    with proposed_by_an_earlier_release():
        r = api.post("/v1/corrections", {"correction_id": "ceiling", "wrong_policy_id": "incheon-2025-10",
                                         "right_policy_id": "ceiling-50eok", "from": at("2026-11-01", "00:00:00"),
                                         "to": at("2026-12-01", "00:00:00")}, role="policy-editor")
    assert r.status_code == 201, r.text
    _forget_base(api, "ceiling")


def test_a_correction_proposed_before_the_base_was_recorded_is_not_approved(api):
    _two_shops(api)
    _propose_ceiling_without_base(api)
    r = api.post("/v1/corrections/ceiling/approve", role="policy-approver")
    assert r.status_code == 409 and r.json()["code"] == "correction_state_conflict", r.text
    assert "migration 0017" in r.json()["detail"] and "propose it again" in r.json()["detail"]
    assert api.get("/v1/corrections/ceiling", role="policy-editor").json()["status"] == "proposed"
    assert _month(api) == (300_000, 30_000)


def test_the_rest_of_a_correction_approved_before_the_base_was_recorded_posts_as_before(api):
    """Approved before migration 0017 (a line left unposted): the rest posts its cashback,
    the payments' base and the month's eligible spend left as they were. The same
    correction proposed again then re-bases them, moving no money."""
    _two_shops(api)
    _propose_ceiling_without_base(api)
    approved_by_an_earlier_release(api, "ceiling")
    r = api.post("/v1/corrections/ceiling/approve", role="policy-approver")
    assert r.status_code == 200 and r.json()["status"] == "posted", r.text
    assert _month(api) == (300_000, 50_000)
    assert _payment_base(api, "p1") == (0, False)
    assert_book_ok(api)
    posted = _correct_november(api, "again", _ceiling("ceiling-50eok", 5_000_000_000))
    assert [line["delta"] for line in posted["lines"]] == [0], posted
    assert posted["summary"]["payments_changed"] == 1  # p1: p2 counted already
    assert _month(api) == (600_000, 50_000)
    assert_book_ok(api)
    assert_months_hold_their_payments(api)


def test_migration_0017_adds_and_drops_the_base(db_url):
    before, between, after = migrate_down_and_up(db_url, "0016", "correction_payments")
    assert "base" in before and "base" not in between and "corrections_seen" in between and "base" in after


def test_a_simulation_of_another_spend_order_says_it_keeps_the_recorded_split(api):
    """The policy audit's case: a draft that spends charged money before points was
    simulated over a month whose second payment had spent the first's 10,000 points:
    19,000 beside 19,000, delta 0 and no word of it, where the draft pays 20,000 on the
    same payments made after it went live (the second paid from charged money whole).
    A simulation keeps each payment's recorded split; it now says so when the draft
    spends in another order than the policies in force did, and not otherwise."""
    api.put("/v1/members/m1", {"district": "namdong"})
    api.put("/v1/merchants/small", {"name": "small", "district": "namdong", "category": "restaurant",
                                    "annual_sales": 1_000_000_000, "registered_from": "2019-01-01"})
    assert api.post("/v1/topups", {"topup_id": "t-m1", "member_id": "m1", "amount": 500_000,
                                   "occurred_at": at("2026-11-01")}).status_code == 201
    for pid, day in (("p1", "2026-11-03"), ("p2", "2026-11-04")):
        r = api.post("/v1/payments", {"payment_id": pid, "member_id": "m1", "merchant_id": "small",
                                      "amount": 100_000, "occurred_at": at(day)})
        assert r.status_code == 201, r.text
    assert _month(api) == (190_000, 19_000)
    charged_first = {**_ceiling("charged-first", 3_000_000_000), "spend_order": ["grants", "charged", "points"]}
    same_order = _ceiling("same-order", 3_000_000_000)
    for doc in (charged_first, same_order):
        assert api.post("/v1/policies", doc, role="policy-editor").status_code == 201
    november = {"from": at("2026-11-01", "00:00:00"), "to": at("2026-12-01", "00:00:00")}
    r = api.post("/v1/policies/charged-first/simulate", november, role="finance")
    assert r.status_code == 200, r.text
    assert r.json()["totals"] == {"simulated_won": 19_000, "actual_won": 19_000, "delta_won": 0}
    [note] = [n for n in r.json()["notes"] if n.startswith("spend_order")]
    assert "grants, charged, points" in note and "grants, points, charged" in note, note
    r = api.post("/v1/policies/same-order/simulate", november, role="finance")
    assert r.status_code == 200 and not [n for n in r.json()["notes"] if n.startswith("spend_order")], r.json()


def _three_at_the_pharmacy(api, *, propose: bool = True) -> None:
    """m1, m2 and m3 each pay 100,000 at the pharmacy on 2 November (10,000 each), and
    pharm-7 (pharmacies at 7%) is proposed over November as `c1`: three lines of -3,000."""
    _november(api)
    _pay_at_the_pharmacy(api, ("m2", "m3"), topup=500_000)
    if not propose:
        return
    proposal = _propose(api, "c1")
    assert [line["delta"] for line in proposal["lines"]] == [-3_000] * 3, proposal


def _entries(api, correction_id: str = "c1") -> list[dict]:
    return api.get("/v1/audit-log", role="auditor", params={"object_id": correction_id}).json()["items"]


def test_a_posting_cut_short_leaves_an_entry_for_every_line_it_posted(api, monkeypatch):
    """The record audit's case: a correction posted one line per batch, the database gone
    on the second batch: the approval answered 503, m1's -3,000 was in the book, and no
    entry named its posting (the one `correction.post` entry was written after all the
    batches). Each batch now writes its `correction.post_lines` entry in its own
    transaction; approving again posts the rest, and the entries add up to the ledger."""
    from ledger import corrections
    from ledger.errors import Unavailable

    monkeypatch.setattr(corrections, "POST_BATCH_MAX", 1)
    _three_at_the_pharmacy(api)
    book, batches = api.services.book, []
    execute = book.execute

    def gone_on_the_second(commands, **kwargs):
        batches.append(commands)
        if len(batches) == 2:
            raise Unavailable("the book of record could not be written; retry with the same id")
        return execute(commands, **kwargs)

    monkeypatch.setattr(book, "execute", gone_on_the_second)
    assert api.post("/v1/corrections/c1/approve", role="policy-approver").status_code == 503
    assert [line["posted"] for line in api.get("/v1/corrections/c1", role="auditor").json()["lines"]] == \
        [True, False, False]
    log = _entries(api)
    assert [e["action"] for e in log] == ["correction.propose", "correction.approve", "correction.post_lines"]
    assert {k: log[-1]["detail"][k] for k in ("lines", "posted", "amount_won", "replayed", "failed")} == \
        {"lines": 1, "posted": 1, "amount_won": -3_000, "replayed": 0, "failed": []}
    approver = log[1]["actor"]
    assert log[-1]["actor"] == approver and log[-1]["detail"]["approved_by"] == approver
    monkeypatch.setattr(book, "execute", execute)
    r = api.post("/v1/corrections/c1/approve", role="policy-approver")
    assert r.status_code == 200 and r.json()["status"] == "posted", r.text
    log = _entries(api)
    lines = [e["detail"] for e in log if e["action"] == "correction.post_lines"]
    assert [(d["posted"], d["amount_won"]) for d in lines] == [(1, -3_000)] * 3
    [summary] = [e["detail"] for e in log if e["action"] == "correction.post"]
    assert {k: summary[k] for k in ("lines", "posted", "replayed", "failed_count", "failed")} == \
        {"lines": 2, "posted": 2, "replayed": 0, "failed_count": 0, "failed": []}
    assert sum(d["amount_won"] for d in lines) == -9_000 == \
        sum(account_balance(api, f"funder/{source}/2026-11") for source in ("national", "city")) - 30_000
    assert_book_ok(api)


def test_the_post_summary_counts_every_failed_line_and_each_batch_lists_its_own(api, monkeypatch):
    """The record audit's case: 130 lines all refused (the city budget full) and the
    `correction.post` entry listed 100 failed lines with no count: a reader took 30 as
    posted. The summary now gives `posted` and `failed_count` beside the first
    FAILED_LISTED_MAX (here 2 of 3), and each batch's entry lists all its failures."""
    from ledger import corrections

    monkeypatch.setattr(corrections, "FAILED_LISTED_MAX", 2)
    _three_at_the_pharmacy(api, propose=False)
    policy = {**_pharm_7(), "policy_id": "pharm-12"}
    policy["components"][0]["variants"][1]["bands"][0]["rate_bp"] = 1_200  # +2,000 each: city 1,200
    assert api.post("/v1/policies", policy, role="policy-editor").status_code == 201
    assert api.put("/v1/budgets/city/2026-11", {"amount": 18_000}, role="finance").status_code == 200  # all used
    r = api.post("/v1/corrections", {"correction_id": "c1", "wrong_policy_id": "incheon-2025-10",
                                     "right_policy_id": "pharm-12", "from": at("2026-11-01", "00:00:00"),
                                     "to": at("2026-12-01", "00:00:00")}, role="policy-editor")
    assert r.status_code == 201 and [line["delta"] for line in r.json()["lines"]] == [2_000] * 3, r.text
    r = api.post("/v1/corrections/c1/approve", role="policy-approver")
    assert r.status_code == 200 and r.json()["status"] == "approved", r.text
    log = _entries(api)
    [summary] = [e["detail"] for e in log if e["action"] == "correction.post"]
    assert (summary["lines"], summary["posted"], summary["failed_count"], len(summary["failed"])) == (3, 0, 3, 2)
    [batch] = [e["detail"] for e in log if e["action"] == "correction.post_lines"]
    assert (batch["posted"], batch["amount_won"]) == (0, 0)
    assert [f["error"] for f in batch["failed"]] == ["budget_exceeded"] * 3
    assert_book_ok(api)


def test_payments_of_one_instant_are_planned_in_the_order_the_book_paid_them(api):
    """The book state machine's case: p-5 (120,000 at a 10억 shop: 12,000) and then
    p-10 (600,000 at a 30억 shop: the band's 380,000 left, 38,000) are paid at the same
    instant. A correction to a 20억 ceiling takes p-10 out. Re-evaluated by payment id,
    "p-10" came first and held the band (50,000) and p-5 nothing, so the plan took
    50,000 from p-10 (which held 38,000: floored there) and gave p-5 +12,000: the month
    ended at 24,000 on 120,000 of eligible spend. In the order the book recorded them
    the plan takes p-10's 38,000 and leaves p-5 as it is: 12,000."""
    api.put("/v1/members/m1", {"district": "namdong"})
    for merchant, sales in (("small", 1_000_000_000), ("mid", 3_000_000_000)):
        api.put(f"/v1/merchants/{merchant}", {"name": merchant, "district": "namdong", "category": "restaurant",
                                              "annual_sales": sales, "registered_from": "2019-01-01"})
    assert api.post("/v1/topups", {"topup_id": "t-m1", "member_id": "m1", "amount": 1_500_000,
                                   "occurred_at": at("2026-11-01")}).status_code == 201
    for pid, merchant, amount, cashback in (("p-5", "small", 120_000, 12_000), ("p-10", "mid", 600_000, 38_000)):
        r = api.post("/v1/payments", {"payment_id": pid, "member_id": "m1", "merchant_id": merchant,
                                      "amount": amount, "occurred_at": at("2026-11-05")})
        assert r.json()["cashback"]["amount"] == cashback, r.text
    assert _month(api) == (708_000, 50_000)
    proposal = _propose_over_november(api, "c1", "incheon-2025-10", _ceiling("ceiling-20eok", 2_000_000_000))
    assert [line["delta"] for line in proposal["lines"]] == [-38_000], proposal
    assert proposal["summary"]["recorded_mismatch_payments"] == 0, proposal["summary"]
    r = api.post("/v1/corrections/c1/approve", role="policy-approver")
    assert r.status_code == 200 and r.json()["status"] == "posted", r.text
    assert _month(api) == (120_000, 12_000)
    assert_book_ok(api)
    assert_months_hold_their_payments(api)


def _two_rate_cuts_end_at_7_percent(api) -> None:
    for wrong, right, rate_bp in (("incheon-2025-10", "rate-8", 800), ("rate-8", "rate-7", 700)):
        _propose_over_november(api, f"to-{right}", wrong, _standard_rate(right, rate_bp))
        assert api.post(f"/v1/corrections/to-{right}/approve", role="policy-approver").status_code == 200
    assert _month(api) == (1_150_000, 35_000), _held_by_payment(api)


def test_one_batchs_payments_are_planned_in_the_order_the_book_paid_them(api):
    """A backdated payment recorded in the same batch as a later one, just after it (the
    batcher's few milliseconds; an offline card's uploads in a burst): the batch shared
    one `recorded_at_us`, and the plan ordered its payments by time, so the two rate
    cuts paid the month to 85,000 again (the session's audit). One member's payments of
    a batch are now taken in the order of their transactions' ids, which the batch
    allocates in the order it paid them (`settlement.simulate._batch_positions`)."""
    _two_shops(api, payments=())
    _one_batch(api, _paid("pA", "small", "2026-11-20", 500_000), _paid("pB", "small", "2026-11-05", 700_000))
    assert _held_by_payment(api) == {"pA": 50_000, "pB": 0}
    _two_rate_cuts_end_at_7_percent(api)
    assert _held_by_payment(api) == {"pA": 35_000, "pB": 0}


def _one_batch(api, *bodies) -> None:
    from api.cardfast import _command

    assert all(o.ok for o in api.services.book.execute([_command("payment", orjson.dumps(b)) for b in bodies]))


def _paid(payment_id: str, merchant: str, day: str, amount: int = 100_000) -> dict:
    return {"payment_id": payment_id, "member_id": "m1", "merchant_id": merchant, "amount": amount,
            "occurred_at": at(day)}


def test_a_batchs_payments_keep_its_time_for_settlement(api):
    """The book's order within a batch is read from its transactions' ids, not written
    into the payment rows' `recorded_at_us`: stamped the batch's time plus a position, a
    settlement watermark between the two counted a payment's transaction and not its row,
    and the run failed its payments-table check (the audit of that change)."""
    import datetime as dt

    from sqlalchemy import func, select

    from settlement import service
    from settlement.config import SettlementConfig

    _two_shops(api, payments=())
    _one_batch(api, _paid("pa", "small", "2026-11-20"), _paid("pb", "small", "2026-11-20"))
    with api.services.reader.connect() as conn:
        stamp = conn.execute(select(func.max(s.ledger_txns.c.recorded_at_us))
                             .where(s.ledger_txns.c.kind == "payment")).scalar_one()
        rows = conn.execute(select(s.payments.c.recorded_at_us)).scalars().all()
    assert set(rows) == {stamp}
    run = service.settle(api.services.engine, dt.date(2026, 11, 20), actor="finance-1",
                         config=SettlementConfig(watermark_lag_us=0), clock=lambda: stamp)
    assert run.ok, run.checks


def test_a_line_is_not_refused_for_a_payment_its_plan_read(api, monkeypatch):
    """A proposal timed at a batch's own time that read the batch: its payments are not
    "recorded since planned" (with the rows stamped a position later, pb was, and the
    line was refused `payments_recorded_since_planned`; the audit of that change)."""
    from sqlalchemy import func, select

    from ledger import corrections

    _two_shops(api, payments=())
    _one_batch(api, _paid("pa", "small", "2026-11-20"), _paid("pb", "big", "2026-11-21"))
    with api.services.reader.connect() as conn:
        stamp = conn.execute(select(func.min(s.payments.c.recorded_at_us))).scalar_one()
    monkeypatch.setattr(corrections, "_now_us", lambda: stamp)
    assert _propose_over_november(api, "to-7", "incheon-2025-10",
                                  _standard_rate("rate-7", 700))["summary"]["payments"] == 2
    monkeypatch.undo()
    assert api.post("/v1/corrections/to-7/approve", role="policy-approver").json()["status"] == "posted"


def test_a_replayed_instant_is_planned_in_the_files_order(api, tmp_path, monkeypatch):
    """`eum payments replay` keeps a file's order among payments of one instant, one chunk
    one batch: p-5 then p-10 were planned by id, p-10 first (the end-of-session audit)."""
    from typer.testing import CliRunner

    from eum import settings as settings_module
    from eum.cli import app

    _two_shops(api, payments=())
    monkeypatch.setenv("EUM_DATABASE_URL", api.settings.database_url)
    monkeypatch.setenv("EUM_POLICIES_DIR", str(api.settings.policies_dir))
    settings_module.get_settings.cache_clear()
    try:
        path, when = tmp_path / "p.csv", at("2026-11-20")
        path.write_text("payment_id,member_id,merchant_id,amount_won,occurred_at\r\n"
                        f"p-5,m1,small,500000,{when}\r\np-10,m1,small,700000,{when}\r\n")
        result = CliRunner().invoke(app, ["payments", "replay", str(path)])
        assert result.exit_code == 0, result.output
    finally:
        settings_module.get_settings.cache_clear()
    assert _held_by_payment(api) == {"p-5": 50_000, "p-10": 0}
    _two_rate_cuts_end_at_7_percent(api)
    assert _held_by_payment(api) == {"p-5": 35_000, "p-10": 0}


@pytest.mark.parametrize("case", ["payment before the range recorded after it", "payment after the range recorded "
                                  "before it"])
def test_a_range_of_a_month_is_planned_in_the_order_the_book_paid_it(api, case):
    """Backdated payments where a correction covers part of the month. First case: pY
    (500,000 on the 20th, recorded first) took the 50만 band, pX (700,000 on the 5th,
    recorded after it) got nothing; corrections of the 10th-30th to 8%, then to 7%, take
    pY to 40,000 and 35,000: pX, before the range but paid after pY, is re-evaluated with
    it, not taken as the month's start (which gave pY no band at all, and both planned
    nothing: the month stayed at 50,000). Second case: pZ (the 25th, recorded first)
    took the band, pW (the 5th, recorded after it) nothing; corrections of the 1st-10th
    move nothing, pZ being outside the range (in time order the first planned pW
    -10,000, clamped at 0, and the second +35,000: the month at 85,000)."""
    _two_shops(api, payments=())
    if case.startswith("payment before"):
        paid, span, months = (("pY", 500_000, "2026-11-20", 50_000), ("pX", 700_000, "2026-11-05", 0)), \
            ("2026-11-10", "2026-12-01"), ((-10_000, 40_000), (-5_000, 35_000))
        held = {"pY": None, "pX": 0}
    else:
        paid, span, months = (("pZ", 500_000, "2026-11-25", 50_000), ("pW", 700_000, "2026-11-05", 0)), \
            ("2026-11-01", "2026-11-10"), ((None, 50_000), (None, 50_000))
        held = {"pZ": 50_000, "pW": 0}
    for payment_id, amount, day, cashback in paid:
        r = api.post("/v1/payments", {"payment_id": payment_id, "member_id": "m1", "merchant_id": "small",
                                      "amount": amount, "occurred_at": at(day)})
        assert r.json()["cashback"]["amount"] == cashback, r.text
    for (wrong, right, rate_bp), (delta, month) in zip((("incheon-2025-10", "rate-8", 800), ("rate-8", "rate-7", 700)),
                                                       months):
        assert api.post("/v1/policies", _standard_rate(right, rate_bp), role="policy-editor").status_code == 201
        r = api.post("/v1/corrections", {"correction_id": f"to-{right}", "wrong_policy_id": wrong,
                                         "right_policy_id": right, "from": at(span[0], "00:00:00"),
                                         "to": at(span[1], "00:00:00")}, role="policy-editor")
        assert r.status_code == 201, r.text
        assert [line["delta"] for line in r.json()["lines"]] == ([delta] if delta else []), r.json()
        assert r.json()["summary"]["recorded_mismatch_payments"] == 0, r.json()["summary"]
        r = api.post(f"/v1/corrections/to-{right}/approve", role="policy-approver")
        assert r.status_code == 200, r.text
        assert _month(api) == (1_150_000, month)
        assert _held_by_payment(api) == {k: month if v is None else v for k, v in held.items()}
    assert_book_ok(api)
    assert_months_hold_their_payments(api)


def test_a_payment_before_the_range_recorded_after_it_moves_with_the_range(api):
    """pY (300,000 on the 20th at a 20억 shop, recorded first) earned 30,000; pX (400,000
    on the 5th at a 10억 shop, recorded after it: 30,000 points, 370,000 charged) the
    band's 200,000 left, 20,000. A correction of the 10th-30th to a 15억 ceiling takes
    pY out of the month: pX, before the range but paid from where pY left the band, now
    has the band from its start, 37,000; the line is -30,000 + 17,000. (As the month's
    start, pX was never re-evaluated: the month would end at 20,000 on 370,000.)"""
    _two_shops(api, big_sales=2_000_000_000, payments=())
    for payment_id, shop, amount, day, cashback in (("pY", "big", 300_000, "2026-11-20", 30_000),
                                                    ("pX", "small", 400_000, "2026-11-05", 20_000)):
        r = api.post("/v1/payments", {"payment_id": payment_id, "member_id": "m1", "merchant_id": shop,
                                      "amount": amount, "occurred_at": at(day)})
        assert r.json()["cashback"]["amount"] == cashback, r.text
    assert api.post("/v1/policies", _ceiling("ceiling-15eok", 1_500_000_000), role="policy-editor").status_code == 201
    r = api.post("/v1/corrections", {"correction_id": "c", "wrong_policy_id": "incheon-2025-10",
                                     "right_policy_id": "ceiling-15eok", "from": at("2026-11-10", "00:00:00"),
                                     "to": at("2026-12-01", "00:00:00")}, role="policy-editor")
    assert r.status_code == 201, r.text
    assert [line["delta"] for line in r.json()["lines"]] == [-13_000], r.json()
    summary = r.json()["summary"]
    assert (summary["payments"], summary["payments_changed"], summary["recorded_mismatch_payments"]) == (2, 2, 0)
    assert api.post("/v1/corrections/c/approve", role="policy-approver").status_code == 200
    assert _month(api) == (370_000, 37_000)
    assert _held_by_payment(api) == {"pY": 0, "pX": 37_000}
    assert_book_ok(api)
    assert_months_hold_their_payments(api)


def test_a_member_sees_what_a_correction_left_owing(api):
    """m1 earned 50,000 on 500,000 and spent it; a correction to 7% takes back 15,000 the
    member no longer holds: the receivable. The balance shows it as `owed`, and the
    correction's entry in the history as its change (before, neither said so: the
    balance read 0 and 0, the history a change of 0)."""
    _two_shops(api, payments=())
    for payment_id, amount in (("p-earn", 1_500_000), ("p-spend", 50_000)):
        r = api.post("/v1/payments", {"payment_id": payment_id, "member_id": "m1", "merchant_id": "small",
                                      "amount": amount, "occurred_at": at("2026-11-10")})
        assert r.json()["status"] == "approved", r.text
    balance = api.get("/v1/members/m1/balance", params={"month": "2026-11"}).json()
    assert (balance["balances"]["charged"], balance["balances"]["points"], balance["owed"]) == (0, 0, 0)
    _propose_over_november(api, "to-7", "incheon-2025-10", _standard_rate("rate-7", 700))
    r = api.post("/v1/corrections/to-7/approve", role="policy-approver")
    assert r.status_code == 200, r.text
    assert r.json()["lines"][0]["clawback_detail"] == {"from_points": 0, "from_charged": 0, "owed": 15_000}
    balance = api.get("/v1/members/m1/balance", params={"month": "2026-11"}).json()
    assert (balance["balances"]["charged"], balance["balances"]["points"], balance["owed"]) == (0, 0, 15_000)
    entry = api.get("/v1/members/m1/transactions").json()["items"][0]
    assert entry["kind"] == "correction"
    assert entry["balance_changes"] == {"charged": 0, "points": 0, "grants": 0, "owed": 15_000}, entry
    assert_book_ok(api)


def test_a_correction_that_gives_settles_what_the_member_owes_first(api):
    """A correction to 7% leaves m1 owing 15,000; one back to 10% gives the 15,000 back.
    It settles what is owed (the member audit: it credited 15,000 points and left the
    15,000 owed, points the member could spend while owing); what it gives beyond that
    goes to points (to 12% then gives 10,000 more)."""
    _two_shops(api, payments=())
    for payment_id, amount in (("p-earn", 1_500_000), ("p-spend", 50_000)):
        r = api.post("/v1/payments", {"payment_id": payment_id, "member_id": "m1", "merchant_id": "small",
                                      "amount": amount, "occurred_at": at("2026-11-10")})
        assert r.json()["status"] == "approved", r.text
    _propose_over_november(api, "to-7", "incheon-2025-10", _standard_rate("rate-7", 700))
    assert api.post("/v1/corrections/to-7/approve", role="policy-approver").status_code == 200
    _propose_over_november(api, "to-10", "rate-7", _standard_rate("rate-10", 1_000))
    r = api.post("/v1/corrections/to-10/approve", role="policy-approver")
    assert r.status_code == 200, r.text
    line = r.json()["lines"][0]
    assert (line["delta"], line["owed_settled"]) == (15_000, 15_000), line
    assert line["clawback_detail"] == {"from_points": 0, "from_charged": 0, "owed": 0}
    balance = api.get("/v1/members/m1/balance", params={"month": "2026-11"}).json()
    assert (balance["balances"]["charged"], balance["balances"]["points"], balance["owed"]) == (0, 0, 0)
    entry = api.get("/v1/members/m1/transactions").json()["items"][0]
    assert entry["balance_changes"] == {"charged": 0, "points": 0, "grants": 0, "owed": -15_000}, entry
    _propose_over_november(api, "to-12", "rate-10", _standard_rate("rate-12", 1_200))
    r = api.post("/v1/corrections/to-12/approve", role="policy-approver")
    line = r.json()["lines"][0]
    assert (line["delta"], line["owed_settled"]) == (10_000, 0), line
    balance = api.get("/v1/members/m1/balance", params={"month": "2026-11"}).json()
    assert (balance["balances"]["points"], balance["owed"]) == (10_000, 0)
    assert_book_ok(api)
    assert_months_hold_their_payments(api)


def test_a_payment_recorded_after_a_correction_is_planned_from_what_it_holds(api):
    """November corrected to 7%; then p2 (100,000 on the 6th, backdated into it: 7,000
    points and 93,000 charged) is paid by the policy activated, 10%: 9,300, where the
    month as corrected gives 6,510. A correction from 7% to 6% planned it right - wrong,
    -930, and it kept 8,370 where 6% gives 5,580 (the end-of-session audit); it is
    planned from what it holds, as a payment a correction re-based is. Proposing the 7%
    correction again takes it to 6,510 the same way."""
    _two_shops(api, payments=())
    for payment_id, day in (("p1", "2026-11-05"), ("p2", "2026-11-06")):
        if payment_id == "p2":
            _propose_over_november(api, "to-7", "incheon-2025-10", _standard_rate("rate-7", 700))
            assert api.post("/v1/corrections/to-7/approve", role="policy-approver").status_code == 200
        r = api.post("/v1/payments", {"payment_id": payment_id, "member_id": "m1", "merchant_id": "small",
                                      "amount": 100_000, "occurred_at": at(day)})
        assert r.json()["cashback"]["amount"] == {"p1": 10_000, "p2": 9_300}[payment_id], r.text
    assert _held_by_payment(api) == {"p1": 7_000, "p2": 9_300}
    r = api.post("/v1/corrections", {"correction_id": "again-7", "wrong_policy_id": "rate-7",
                                     "right_policy_id": "rate-7", "from": at("2026-11-01", "00:00:00"),
                                     "to": at("2026-12-01", "00:00:00")}, role="policy-editor")
    assert r.status_code == 201, r.text
    assert [line["delta"] for line in r.json()["lines"]] == [-2_790], r.json()
    assert api.post("/v1/corrections/again-7/approve", role="policy-approver").status_code == 200
    assert _held_by_payment(api) == {"p1": 7_000, "p2": 6_510}
    _propose_over_november(api, "to-6", "rate-7", _standard_rate("rate-6", 600))
    assert api.post("/v1/corrections/to-6/approve", role="policy-approver").status_code == 200
    assert _held_by_payment(api) == {"p1": 6_000, "p2": 5_580}
    assert _month(api) == (193_000, 11_580)
    assert_book_ok(api)
    assert_months_hold_their_payments(api)


def test_a_payment_recorded_while_a_correction_waited_for_approval_is_planned_from_what_it_holds(api):
    """to-7 is proposed with a line for m1 only; m2's backdated payment q (100,000 on the
    10th) is recorded before the approval, paid 10% by the policy activated. No line of
    to-7 is m2's, so nothing refuses it, and November as corrected gives q 7%. A later
    correction to 6% planned q right - wrong, -1,000, and q kept 9,000 where 6% gives
    6,000 (the third corrections audit): "paid after" counted from when a correction
    took effect, not from its plan. It counts from the plan now, so q is planned from
    what it holds."""
    _two_shops(api, payments=(("p1", "small", "2026-11-05"),))
    api.put("/v1/members/m2", {"district": "namdong"})
    assert api.post("/v1/topups", {"topup_id": "t-m2", "member_id": "m2", "amount": 500_000,
                                   "occurred_at": at("2026-11-01")}).status_code == 201
    proposal = _propose_over_november(api, "to-7", "incheon-2025-10", _standard_rate("rate-7", 700))
    assert [line["member_id"] for line in proposal["lines"]] == ["m1"]
    r = api.post("/v1/payments", {"payment_id": "q", "member_id": "m2", "merchant_id": "small",
                                  "amount": 100_000, "occurred_at": at("2026-11-10")})
    assert r.json()["cashback"]["amount"] == 10_000, r.text
    assert api.post("/v1/corrections/to-7/approve", role="policy-approver").json()["status"] == "posted"
    assert _held_by_payment(api) == {"p1": 21_000, "q": 10_000}
    _propose_over_november(api, "to-6", "rate-7", _standard_rate("rate-6", 600))
    assert api.post("/v1/corrections/to-6/approve", role="policy-approver").json()["status"] == "posted"
    assert _held_by_payment(api) == {"p1": 18_000, "q": 6_000}
    assert_book_ok(api)
    assert_months_hold_their_payments(api)


def test_a_payment_recorded_after_one_paid_outside_the_corrected_month_is_planned_from_it(api):
    """The 1st-15th corrected to a 50억 ceiling (p0, 300,000 at a 40억 shop, counted:
    30,000); then p (300,000 at the 40억 shop on the 5th) is paid by the policy activated,
    not counted, and q (500,000 at a 10억 shop on the 20th, outside the range) from the
    band p did not take: 20,000. Proposing the correction again gives p the band's
    200,000 left (+20,000) and takes q to 0: planned from what it holds too, as a
    payment recorded after p in its month (before, q was planned right − wrong = 0 − 0
    and kept 20,000: the month at 70,000 under its 50,000 cap; the session's audit)."""
    _two_shops(api, payments=(("p0", "big", "2026-11-03"),))
    right = _ceiling("ceiling-50eok", 5_000_000_000)
    assert api.post("/v1/policies", right, role="policy-editor").status_code == 201

    def correct(correction_id: str, wrong: str) -> None:
        r = api.post("/v1/corrections", {"correction_id": correction_id, "wrong_policy_id": wrong,
                                         "right_policy_id": right["policy_id"], "from": at("2026-11-01", "00:00:00"),
                                         "to": at("2026-11-16", "00:00:00")}, role="policy-editor")
        assert r.status_code == 201, r.text
        assert api.post(f"/v1/corrections/{correction_id}/approve", role="policy-approver").status_code == 200

    correct("x1", "incheon-2025-10")
    for payment_id, shop, amount, day in (("p", "big", 300_000, "2026-11-05"), ("q", "small", 500_000, "2026-11-20")):
        assert api.post("/v1/payments", {"payment_id": payment_id, "member_id": "m1", "merchant_id": shop,
                                         "amount": amount, "occurred_at": at(day)}).status_code == 201
    assert _held_by_payment(api) == {"p0": 30_000, "p": 0, "q": 20_000}
    correct("x2", "ceiling-50eok")
    assert _held_by_payment(api) == {"p0": 30_000, "p": 20_000, "q": 0}
    assert _month(api)[1] == 50_000
    assert_book_ok(api)
    assert_months_hold_their_payments(api)


def _held_by_payment(api) -> dict[str, int]:
    """What each payment holds now (`ledger.book.cashback_held`)."""
    from ledger.book import cashback_held

    with api.services.reader.connect() as conn:
        rows = conn.execute(s.payments.select().with_only_columns(
            s.payments.c.payment_id, s.payments.c.detail, s.payments.c.refund_state)).all()
    return {payment_id: sum(cashback_held(orjson.loads(detail), orjson.loads(state or "{}")).values())
            for payment_id, detail, state in rows}


def _standard_rate(policy_id: str, rate_bp: int) -> dict:
    """The policy in force for November 2026 (2025-10) with its standard rate at `rate_bp`."""
    doc = yaml.safe_load((POLICIES / "2025-10-cap-50man.yaml").read_text())
    doc["policy_id"] = policy_id
    doc.pop("effective_from")
    next(v for v in doc["components"][0]["variants"] if v["id"] == "standard")["bands"][0]["rate_bp"] = rate_bp
    return doc


def test_two_rate_cuts_over_a_backdated_payment_never_pay_out(api):
    """The backdated audit's case: pA (500,000 on the 20th, recorded first) took the whole
    50만 band (50,000); pB (700,000 on the 5th, recorded after it) got nothing. A plan
    evaluates the month in the order the book paid it (`settlement.simulate.BOOK_ORDER`),
    so a correction to 8% takes pA to 40,000 and one from 8% to 7% to 35,000, pB at 0.
    (In time order, the first planned pB -10,000, clamped at the 0 it held, and marked it
    corrected; the second planned pB right - held = +35,000 and left pA's 50,000: the
    month ended at 85,000 where 7% gives at most 35,000.)"""
    _two_shops(api, payments=())
    for payment_id, amount, day, cashback in (("pA", 500_000, "2026-11-20", 50_000), ("pB", 700_000, "2026-11-05", 0)):
        r = api.post("/v1/payments", {"payment_id": payment_id, "member_id": "m1", "merchant_id": "small",
                                      "amount": amount, "occurred_at": at(day)})
        assert r.json()["cashback"]["amount"] == cashback, r.text
    assert _month(api) == (1_150_000, 50_000)
    for wrong, right, rate_bp, delta, month in (("incheon-2025-10", "rate-8", 800, -10_000, 40_000),
                                                ("rate-8", "rate-7", 700, -5_000, 35_000)):
        proposal = _propose_over_november(api, f"to-{right}", wrong, _standard_rate(right, rate_bp))
        assert [line["delta"] for line in proposal["lines"]] == [delta], proposal
        assert proposal["summary"]["recorded_mismatch_payments"] == 0, proposal["summary"]
        r = api.post(f"/v1/corrections/to-{right}/approve", role="policy-approver")
        assert r.status_code == 200, r.text
        assert _month(api) == (1_150_000, month)
        assert _held_by_payment(api) == {"pA": month, "pB": 0}
    assert_book_ok(api)
    assert_months_hold_their_payments(api)


@pytest.mark.parametrize("start, end", [("2026-12-01", "2026-11-01"), ("2026-11-01", "2026-11-01")])
def test_a_correction_whose_range_does_not_run_forward_is_refused(api, start, end):
    """`to` before `from` was a 500 (a ValueError from the plan's read), and `to` at
    `from` a 409 `policy_clash` naming two policies that did not clash (the policy-staff
    audit): 422 `validation_error` now, as a simulation's range, nothing proposed."""
    assert api.post("/v1/policies", _pharm_7(), role="policy-editor").status_code == 201
    r = api.post("/v1/corrections", {"correction_id": "backwards", "wrong_policy_id": "incheon-2025-10",
                                     "right_policy_id": "pharm-7", "from": at(start, "00:00:00"),
                                     "to": at(end, "00:00:00")}, role="policy-editor")
    assert r.status_code == 422 and r.json()["code"] == "validation_error", r.text
    assert "`to` must be after `from`" in r.text
    assert api.get("/v1/corrections/backwards", role="policy-editor").status_code == 404


def test_a_correction_starting_in_the_future_is_refused(api):
    """A correction corrects cashback already paid; one whose range started ahead of the
    book's clock was accepted (the policy-staff audit), a policy change by another door.
    422 `occurred_at_in_future` now, nothing proposed; a range that runs into the future
    from the past (this month so far) is still taken."""
    import datetime as dt
    import time

    from rules.timeutil import local_date

    assert api.post("/v1/policies", _pharm_7(), role="policy-editor").status_code == 201
    today = local_date(time.time_ns() // 1000)
    first_next = (today.replace(day=1) + dt.timedelta(days=32)).replace(day=1)
    after = (first_next + dt.timedelta(days=32)).replace(day=1)
    r = api.post("/v1/corrections", {"correction_id": "ahead", "wrong_policy_id": "incheon-2025-10",
                                     "right_policy_id": "pharm-7", "from": at(first_next.isoformat(), "00:00:00"),
                                     "to": at(after.isoformat(), "00:00:00")}, role="policy-editor")
    assert r.status_code == 422 and r.json()["code"] == "occurred_at_in_future", r.text
    assert api.get("/v1/corrections/ahead", role="policy-editor").status_code == 404
    r = api.post("/v1/corrections", {"correction_id": "so-far", "wrong_policy_id": "incheon-2025-10",
                                     "right_policy_id": "pharm-7", "from": at(today.replace(day=1).isoformat(), "00:00:00"),
                                     "to": at(first_next.isoformat(), "00:00:00")}, role="policy-editor")
    assert r.status_code == 201, r.text


def test_a_correction_and_a_member_with_the_longest_ids_post(api):
    """A correction line's key is `correction_id/member_id/month`, up to 137 characters,
    and it is the ledger transaction's `ref`: that column held 64, so on PostgreSQL a
    correction covering a member with a UUID id under a 20-character correction id was
    approved and then never posted, 503 "retry" at every approval, the other members'
    lines with it (idempotency audit). Migration 0018 widens it."""
    _book_payments(api)
    member = "m" * 64
    api.put(f"/v1/members/{member}", {"district": "namdong"})
    api.post("/v1/topups", {"topup_id": "t-long", "member_id": member, "amount": 100_000,
                            "occurred_at": at("2025-09-01")})
    r = api.post("/v1/payments", {"payment_id": "p-long", "member_id": member, "merchant_id": "pharm",
                                  "amount": 10_000, "occurred_at": at("2025-09-20")})
    assert r.json()["status"] == "approved", r.text
    assert api.post("/v1/policies", _right_policy(), role="policy-editor").status_code == 201
    correction_id = "c" * 64
    assert _propose_september(api, correction_id).status_code == 201
    r = api.post(f"/v1/corrections/{correction_id}/approve", role="policy-approver")
    assert r.status_code == 200, r.text
    lines = {line["member_id"]: line for line in r.json()["lines"]}
    assert r.json()["status"] == "posted" and all(line["posted"] for line in lines.values())
    assert lines[member]["delta"] == -300  # floor(10,000 × 7%) − floor(10,000 × 10%)
    assert_book_ok(api)


def test_a_straddling_payment_refunded_before_the_proposal_keeps_less_than_one_refunded_after(api):
    """The contract's clawback in proportion to the refunded base (docs/design.md, "A known
    tension in the contract") carried into a correction: 600,000 at the pharmacy earns
    10% of the first 500,000 (50,000) and 100,000 of it is refunded (8,333). Refunded
    before the proposal, the plan re-rates the 500,000 left (50,000 → 35,000: −15,000)
    and the payment keeps 26,667. Refunded between the proposal and its approval,
    posting takes five sixths of the −15,000 (−12,500); refunded after the posting, the
    refund claws back a sixth of the corrected 35,000 (5,833): either way it keeps
    29,167. The proposal counts the first among `recorded_mismatch_payments`. Pinned so
    the design's figures stay true."""
    put_merchant(api, "pharm", district="namdong", category="pharmacy")
    members = ("before", "between", "after")
    for member in members:
        put_member(api, member, district="namdong")
        topup(api, f"t-{member}", member, 1_000_000, at("2026-11-01"))
        assert pay(api, f"p-{member}", member, "pharm", 600_000, at("2026-11-02"))["cashback"]["amount"] == 50_000
    assert refund(api, "p-before", "r-before", 100_000, at("2026-11-10"))["cashback_clawback"] == 8_333
    proposal = _propose(api)
    assert {line["member_id"]: line["delta"] for line in proposal["lines"]} == dict.fromkeys(members, -15_000)
    assert proposal["summary"]["recorded_mismatch_payments"] == 1
    assert refund(api, "p-between", "r-between", 100_000, at("2026-11-10"))["cashback_clawback"] == 8_333
    r = api.post("/v1/corrections/pharm-2026-11/approve", role="policy-approver")
    assert r.status_code == 200 and r.json()["status"] == "posted", r.text
    assert {line["member_id"]: line["posted_delta"] for line in r.json()["lines"]} == {
        "before": -15_000, "between": -12_500, "after": -15_000}
    assert refund(api, "p-after", "r-after", 100_000, at("2026-11-10"))["cashback_clawback"] == 5_833
    held = {member: month_of_member(api, member, "2026-11")["month"] for member in members}
    assert {member: (month["cashback_eligible_spend"], month["cashback_earned"]) for member, month in held.items()} \
        == {"before": (500_000, 26_667), "between": (500_000, 29_167), "after": (500_000, 29_167)}
    assert_book_ok(api)
    assert_months_hold_their_payments(api)
