"""What a correction proposal's summary tells its approver (docs/design.md, "Corrections"):
`held_won`, what the range's payments hold now, beside `recorded_won`, what was recorded;
and `recorded_mismatch_payments` counts the payments whose cashback the wrong policy,
re-evaluated, does not give what they hold.

The s21 audit: on a second correction, the summary compared the wrong policy with the
payments' original record, so its mismatch warning flagged every payment the first
correction had moved (11,759 of 35,700 payments against 357 on the first), and nothing
in it said what the payments held, so `wrong_won`/`right_won` did not reconcile with
what the correction posts (`extra_won`, `clawback_won`)."""

from tests.book_helpers import assert_book_ok
from tests.conftest import at
from tests.test_corrections import _ceiling, _month, _two_shops

RANGE = {"from": at("2026-11-01", "00:00:00"), "to": at("2026-12-01", "00:00:00")}


def _propose(api, correction_id: str, wrong: str, right: str) -> dict:
    r = api.post("/v1/corrections", {"correction_id": correction_id, "wrong_policy_id": wrong,
                                     "right_policy_id": right, **RANGE}, role="policy-editor")
    assert r.status_code == 201, r.text
    return r.json()["summary"]


def _approve(api, correction_id: str) -> None:
    r = api.post(f"/v1/corrections/{correction_id}/approve", role="policy-approver")
    assert r.status_code == 200 and r.json()["status"] == "posted", r.text


def test_a_second_corrections_summary_starts_from_what_the_payments_hold(api):
    """p1 (40억 shop, not counted under the 30억 ceiling: 0) and p2 (10억 shop: 30,000).
    To a 50억 ceiling: both count, 30,000 + 20,000. Then from 50억 to 35억: the wrong
    policy gives what the payments hold (no mismatch), and right − held is what posts."""
    _two_shops(api)
    for doc in (_ceiling("ceiling-50eok", 5_000_000_000), _ceiling("ceiling-35eok", 3_500_000_000)):
        assert api.post("/v1/policies", doc, role="policy-editor").status_code == 201
    first = _propose(api, "to-50", "incheon-2025-10", "ceiling-50eok")
    assert {k: first[k] for k in ("wrong_won", "right_won", "recorded_won", "held_won",
                                  "recorded_mismatch_payments", "extra_won", "clawback_won")} == {
        "wrong_won": 30_000, "right_won": 50_000, "recorded_won": 30_000, "held_won": 30_000,
        "recorded_mismatch_payments": 0, "extra_won": 20_000, "clawback_won": 0}, first
    _approve(api, "to-50")
    second = _propose(api, "to-35", "ceiling-50eok", "ceiling-35eok")
    assert {k: second[k] for k in ("wrong_won", "right_won", "recorded_won", "held_won",
                                   "recorded_mismatch_payments", "extra_won", "clawback_won",
                                   "payments_already_corrected")} == {
        "wrong_won": 50_000, "right_won": 30_000, "recorded_won": 30_000, "held_won": 50_000,
        "recorded_mismatch_payments": 0, "extra_won": 0, "clawback_won": 20_000,
        "payments_already_corrected": 2}, second
    assert second["right_won"] - second["held_won"] == second["extra_won"] - second["clawback_won"]
    # The same figures are read back, and in the proposal's audit entry.
    assert api.get("/v1/corrections/to-35", role="policy-approver").json()["summary"] == second
    log = api.get("/v1/audit-log", role="auditor", params={"object_id": "to-35"}).json()["items"]
    assert log[0]["action"] == "correction.propose" and log[0]["detail"]["held_won"] == 50_000
    _approve(api, "to-35")
    assert _month(api) == (300_000, 30_000)
    assert_book_ok(api)


def test_naming_the_policy_first_in_force_plans_against_the_month_as_corrected(api):
    """After the 50억 correction posted, a correction that names the policy first in force
    (30억) as the wrong one: the plan compares the right policy with the month as
    corrected all the same, so the wrong policy re-evaluated gives what the payments
    hold (no mismatch), and the summary is that of naming 50억."""
    _two_shops(api)
    for doc in (_ceiling("ceiling-50eok", 5_000_000_000), _ceiling("ceiling-35eok", 3_500_000_000)):
        assert api.post("/v1/policies", doc, role="policy-editor").status_code == 201
    _propose(api, "to-50", "incheon-2025-10", "ceiling-50eok")
    _approve(api, "to-50")
    summary = _propose(api, "to-35", "incheon-2025-10", "ceiling-35eok")
    assert (summary["recorded_won"], summary["held_won"], summary["wrong_won"], summary["recorded_mismatch_payments"]
            ) == (30_000, 50_000, 50_000, 0), summary
    assert summary == _propose(api, "to-35-named", "ceiling-50eok", "ceiling-35eok"), summary
