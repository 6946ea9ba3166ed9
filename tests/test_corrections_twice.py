"""Two corrections of one range with the same wrong and right policy (two staff
proposing at once on two instances, or the same correction proposed again under a new id)
both post: the payment's cashback is cut twice. After the first, the payment holds what the
right policy gives (docs/design.md, Corrections); the second takes the difference again."""

from tests.book_helpers import assert_book_ok
from tests.test_corrections import _november, _pharm_7
from tests.conftest import at


def test_a_second_correction_of_a_corrected_range_takes_nothing_more(api):
    _november(api)  # p-pharm: 100,000 at the pharmacy, 10,000 cashback (10%)
    assert api.post("/v1/policies", _pharm_7(), role="policy-editor").status_code == 201
    body = {"wrong_policy_id": "incheon-2025-10", "right_policy_id": "pharm-7",
            "from": at("2026-11-01", "00:00:00"), "to": at("2026-12-01", "00:00:00")}
    for cid in ("c1", "c2"):  # proposed before either is approved, as two people at once would
        assert api.post("/v1/corrections", {**body, "correction_id": cid}, role="policy-editor").status_code == 201
    assert api.post("/v1/corrections/c1/approve", role="policy-approver").status_code == 200
    # planned before c1 took effect: refused, nothing posted
    assert api.post("/v1/corrections/c2/approve", role="policy-approver").status_code == 409
    month = api.get("/v1/members/m1/balance", params={"month": "2026-11"}).json()["month"]
    assert month["cashback_earned"] == 7_000, month  # 7% of 100,000; actual: 4,000
    assert_book_ok(api)


def test_the_same_correction_proposed_again_after_posting_takes_nothing_more(api):
    _november(api)
    assert api.post("/v1/policies", _pharm_7(), role="policy-editor").status_code == 201
    body = {"wrong_policy_id": "incheon-2025-10", "right_policy_id": "pharm-7",
            "from": at("2026-11-01", "00:00:00"), "to": at("2026-12-01", "00:00:00")}
    for cid in ("c1", "c2"):
        r = api.post("/v1/corrections", {**body, "correction_id": cid}, role="policy-editor")
        assert r.status_code == 201
        assert api.post(f"/v1/corrections/{cid}/approve", role="policy-approver").status_code == 200
    month = api.get("/v1/members/m1/balance", params={"month": "2026-11"}).json()["month"]
    assert month["cashback_earned"] == 7_000, month
