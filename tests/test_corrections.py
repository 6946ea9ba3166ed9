"""The 2023 pharmacy case end to end: pharmacies paid at the wrong rate, a correction
computed per member, approved by a second person, posted, and the book still balances."""

import yaml

from ledger.queries import check_book
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
    assert report["payments"]["count"] == 5
    assert report["totals"]["actual_won"] - report["totals"]["simulated_won"] == 370 + 7_500 + 1_500
    assert report["members"]["affected"] == 2


def test_pharmacy_correction_claws_back_the_difference_after_a_second_person(api):
    _book_payments(api)
    assert api.post("/v1/policies", _right_policy(), role="policy-editor").status_code == 201
    body = {"correction_id": "pharmacy-2025-09", "wrong_policy_id": "incheon-2025-09",
            "right_policy_id": "incheon-2025-09-pharmacy-7",
            "from": at("2025-09-01", "00:00:00"), "to": at("2025-10-01", "00:00:00")}
    r = api.post("/v1/corrections", body, role="policy-editor")
    assert r.status_code == 201, r.text
    proposal = r.json()
    # m1: floor(12,345 × 7%) − floor(12,345 × 10%) = 864 − 1,234 = −370.
    # m2: 250,000 and then 50,000 of 100,000 inside the 30만 band: 3% of 300,000 = −9,000.
    deltas = {line["member_id"]: line["delta"] for line in proposal["lines"]}
    assert deltas == {"m1": -370, "m2": -9_000}
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
    assert [e["action"] for e in log] == ["correction.propose", "correction.approve", "correction.post"]
    with api.services.reader.connect() as conn:
        assert all(c.ok for c in check_book(conn)), check_book(conn)


def test_a_correction_over_a_range_without_payments_proposes_nothing(api):
    """No payment in the range (the book's read yields no chunk at all): a proposal of
    no lines, not a 500."""
    assert api.post("/v1/policies", _right_policy(), role="policy-editor").status_code == 201
    r = api.post("/v1/corrections", {"correction_id": "empty", "wrong_policy_id": "incheon-2025-09",
                                     "right_policy_id": "incheon-2025-09-pharmacy-7",
                                     "from": at("2025-09-01", "00:00:00"), "to": at("2025-10-01", "00:00:00")},
                 role="policy-editor")
    assert r.status_code == 201, r.text
    assert r.json()["lines"] == [] and r.json()["summary"]["payments"] == 0
