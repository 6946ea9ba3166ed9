"""Policy lifecycle: draft → approved by a second person → scheduled/active; audited."""

import datetime as dt

import pytest
import yaml

from ledger import audit
from ledger.db import make_engine
from ledger.keys import create_key
from tests.conftest import POLICIES

SEOUL = dt.timezone(dt.timedelta(hours=9))


def draft(policy_id="pharmacy-fix", rate_bp=700, supersedes=None):
    doc = yaml.safe_load((POLICIES / "2025-09-all-under-30eok.yaml").read_text())
    doc["policy_id"] = policy_id
    doc.pop("effective_from")
    doc["components"][0]["variants"][1]["bands"][0]["rate_bp"] = rate_bp
    if supersedes:
        doc["supersedes"] = supersedes
    return doc


def test_draft_needs_a_second_person_and_is_audited(api):
    r = api.post("/v1/policies", draft(), role="policy-editor")
    assert r.status_code == 201, r.text
    assert r.json() == {"policy_id": "pharmacy-fix", "status": "draft", "warnings": []}
    # The editor's role cannot approve; an approver can.
    assert api.post("/v1/policies/pharmacy-fix/approve", role="policy-editor").status_code == 403
    # Activation before approval is refused.
    soon = (dt.datetime.now(SEOUL) + dt.timedelta(hours=1)).isoformat()
    r = api.post("/v1/policies/pharmacy-fix/activate", {"effective_from": soon}, role="policy-approver")
    assert r.status_code == 409 and r.json()["code"] == "policy_state_conflict"
    r = api.post("/v1/policies/pharmacy-fix/approve", role="policy-approver")
    assert r.status_code == 200 and r.json()["status"] == "approved"
    # An approved policy is never edited: the same id again is refused.
    r = api.post("/v1/policies", draft(rate_bp=900), role="policy-editor")
    assert r.status_code == 409 and r.json()["code"] == "policy_exists"
    # The past is refused; an hour ahead is scheduled.
    past = (dt.datetime.now(SEOUL) - dt.timedelta(minutes=1)).isoformat()
    r = api.post("/v1/policies/pharmacy-fix/activate", {"effective_from": past}, role="policy-approver")
    assert r.status_code == 409 and r.json()["code"] == "activation_in_past"
    r = api.post("/v1/policies/pharmacy-fix/activate", {"effective_from": soon}, role="policy-approver")
    assert r.status_code == 200 and r.json()["status"] == "scheduled"
    listed = {p["policy_id"]: p for p in api.get("/v1/policies", role="auditor").json()["policies"]}
    assert listed["pharmacy-fix"]["status"] == "scheduled"
    assert listed["incheon-2020-03"]["origin"] == "file"
    detail = api.get("/v1/policies/pharmacy-fix", role="auditor").json()
    assert "-          rate_bp: 1000" in detail["diff"].replace("- {", "-").replace("  - ", "  ") or "rate_bp: 700" in detail["diff"]
    log = api.get("/v1/audit-log", role="auditor", params={"object_id": "pharmacy-fix"}).json()["items"]
    assert [e["action"] for e in log] == ["policy.create", "policy.approve", "policy.activate"]
    assert log[0]["actor"].startswith("test policy-editor") and log[1]["actor"].startswith("test policy-approver")
    with api.services.reader.connect() as conn:
        report = audit.verify(conn)
        assert report.ok and len(report.head) == 64
    # A head kept from before is still found after more entries; one the chain never had
    # (as after its tail was cut off) is a break.
    assert api.post("/v1/policies", {**draft(rate_bp=650), "policy_id": "pharmacy-fix-2"},
                    role="policy-editor").status_code == 201
    with api.services.reader.connect() as conn:
        later = audit.verify(conn, expect_head=report.head)
        assert later.ok and later.entries == report.entries + 1 and later.head != report.head
        cut = audit.verify(conn, expect_head="0" * 64)
        assert not cut.ok and "cut off" in cut.reason


def _in_force_at(api, monkeypatch, policy_id: str, start: dt.datetime) -> None:
    """Activate the approved `policy_id` at `start` (two hours ahead), move the book's
    clock just past it (it refuses events dated more than a minute ahead of it), and top
    m1 up an hour before."""
    import ledger.book
    from rules.timeutil import to_us

    r = api.post(f"/v1/policies/{policy_id}/activate", {"effective_from": start.isoformat()}, role="policy-editor")
    assert r.status_code == 200, r.text
    monkeypatch.setattr(ledger.book, "now_us", lambda: to_us(start) + 30_000_000)
    api.post("/v1/topups", {"topup_id": "t", "member_id": "m1", "amount": 100_000,
                            "occurred_at": (start - dt.timedelta(hours=1)).isoformat()})


def test_activated_policy_decides_payments_from_its_start(api, monkeypatch):
    api.put("/v1/members/m1", {"district": "seo"})
    api.put("/v1/merchants/shop", {"name": "S", "district": "seo", "category": "pharmacy",
                                   "annual_sales": 100_000_000, "registered_from": "2019-01-01"})
    start = dt.datetime.now(SEOUL).replace(microsecond=0) + dt.timedelta(hours=2)
    assert api.post("/v1/policies", draft(rate_bp=700), role="policy-editor").status_code == 201
    assert api.post("/v1/policies/pharmacy-fix/approve", role="policy-approver").status_code == 200
    _in_force_at(api, monkeypatch, "pharmacy-fix", start)
    before = api.post("/v1/payments", {"payment_id": "p0", "member_id": "m1", "merchant_id": "shop", "amount": 10_000,
                                       "occurred_at": (start - dt.timedelta(seconds=1)).isoformat()}).json()
    after = api.post("/v1/payments", {"payment_id": "p1", "member_id": "m1", "merchant_id": "shop", "amount": 10_000,
                                      "occurred_at": start.isoformat()}).json()
    assert before["cashback"]["amount"] == 1_000 and not before["policy_id"].startswith("pharmacy-fix")
    # The 1,000 points are spent first; the 9,000 charged earn 7% under the new policy.
    assert after["spent"] == {"grants": 0, "points": 1_000, "charged": 9_000}
    assert after["cashback"]["amount"] == 630 and after["policy_id"].startswith("pharmacy-fix")


def test_same_person_cannot_approve_with_another_key(api):
    engine = make_engine(api.settings.database_url)
    _, token = create_key(engine, name="test policy-editor", role="policy-approver",
                          pepper=api.settings.key_pepper.get_secret_value())
    engine.dispose()
    assert api.post("/v1/policies", draft(), role="policy-editor").status_code == 201
    r = api.client.post("/v1/policies/pharmacy-fix/approve", headers={"Authorization": f"Bearer {token}"})
    assert r.status_code == 403 and r.json()["code"] == "self_approval"


def test_invalid_document_names_line_and_reason(api):
    text = (POLICIES / "2025-09-all-under-30eok.yaml").read_text().replace("rate_bp: 1500", "rate_bp: 15000")
    r = api.client.post("/v1/policies", content=text.replace("incheon-2025-09", "bad-one"),
                        headers={**api.h("policy-editor"), "Content-Type": "application/yaml"})
    assert r.status_code == 422
    body = r.json()
    assert body["code"] == "policy_invalid"
    problem = body["problems"][0]
    assert problem["path"].endswith("rate_bp") and "10000" in problem["reason"]
    assert text.splitlines()[problem["line"] - 1].strip().startswith("- {up_to_won: 300000, rate_bp: 15000}")


def test_activation_keeps_the_approved_date_and_says_when_it_is_already_active(api):
    """A document approved with its effective_from is activated at that time only (the
    approver reviewed that date); activating twice says it is already active; a
    simulation range that ends before it starts is a 422."""
    start = dt.datetime.now(SEOUL).replace(microsecond=0) + dt.timedelta(hours=3)
    doc = {**draft(policy_id="dated", rate_bp=650), "effective_from": start.isoformat()}
    assert api.post("/v1/policies", doc, role="policy-editor").status_code == 201
    assert api.post("/v1/policies/dated/approve", role="policy-approver").status_code == 200
    other = api.post("/v1/policies/dated/activate", {"effective_from": (start + dt.timedelta(hours=1)).isoformat()},
                     role="policy-editor")
    assert other.status_code == 409 and "takes effect at" in other.json()["detail"], other.text
    assert api.post("/v1/policies/dated/activate", {"effective_from": start.isoformat()},
                    role="policy-editor").status_code == 200
    again = api.post("/v1/policies/dated/activate", {"effective_from": start.isoformat()}, role="policy-editor")
    assert again.status_code == 409 and "already activated" in again.json()["detail"], again.text
    backwards = api.post("/v1/policies/dated/simulate", {"from": "2025-10-01T00:00:00+09:00",
                                                         "to": "2025-09-01T00:00:00+09:00"}, role="policy-editor")
    assert backwards.status_code == 422 and backwards.json()["code"] == "validation_error", backwards.text


def test_a_document_whose_own_date_has_passed_says_it_can_no_longer_be_activated(api):
    """Approved with a date now past, a draft was told "at least 70 s from now" at its date
    and "activate it then" at the `earliest` that answer gave: a loop. Either activation
    now says the date has passed and a new draft is the way; nothing is activated."""
    doc = {**draft(policy_id="dated-past", rate_bp=650), "effective_from": "2026-01-01T00:00:00+09:00"}
    assert api.post("/v1/policies", doc, role="policy-editor").status_code == 201
    assert api.post("/v1/policies/dated-past/approve", role="policy-approver").status_code == 200
    later = (dt.datetime.now(SEOUL).replace(microsecond=0) + dt.timedelta(hours=1)).isoformat()
    for effective_from in ("2026-01-01T00:00:00+09:00", later):
        r = api.post("/v1/policies/dated-past/activate", {"effective_from": effective_from}, role="policy-editor")
        assert r.status_code == 409 and r.json()["code"] == "activation_in_past", r.text
        assert "has passed" in r.json()["detail"] and "submit a new draft" in r.json()["detail"], r.text
        assert "earliest" not in r.json()
    assert api.get("/v1/policies/dated-past", role="auditor").json()["status"] == "approved"


def test_withdraw_takes_back_a_draft_or_a_scheduled_activation_but_not_history(api, monkeypatch):
    """Policy staff take back a draft, an approved policy, or an activation still far
    enough ahead; workers stop using a withdrawn schedule; what took effect stays."""
    api.put("/v1/members/m1", {"district": "seo"})
    api.put("/v1/merchants/shop", {"name": "S", "district": "seo", "category": "pharmacy",
                                   "annual_sales": 100_000_000, "registered_from": "2019-01-01"})
    # A draft: withdrawn with a reason, then it can be neither approved nor activated.
    assert api.post("/v1/policies", draft(policy_id="typo"), role="policy-editor").status_code == 201
    blank = api.post("/v1/policies/typo/withdraw", {"reason": "   "}, role="policy-editor")
    assert blank.status_code == 422, blank.text
    assert api.post("/v1/policies/typo/withdraw", {"reason": "x"}, role="auditor").status_code == 403
    r = api.post("/v1/policies/typo/withdraw", {"reason": "rate typed as 700 instead of 70"}, role="policy-editor")
    assert r.status_code == 200 and r.json() == {"policy_id": "typo", "status": "withdrawn", "was": "draft"}, r.text
    r = api.post("/v1/policies/typo/approve", role="policy-approver")
    assert r.status_code == 409 and r.json()["code"] == "policy_state_conflict"
    again = api.post("/v1/policies/typo/withdraw", {"reason": "again"}, role="policy-editor")
    assert again.status_code == 409 and "already withdrawn" in again.json()["detail"]
    assert api.post("/v1/policies", draft(policy_id="typo"), role="policy-editor").status_code == 409  # ids stay taken
    # A scheduled activation: withdrawn, the timeline no longer holds it.
    start = dt.datetime.now(SEOUL).replace(microsecond=0) + dt.timedelta(hours=2)
    assert api.post("/v1/policies", draft(rate_bp=700), role="policy-editor").status_code == 201
    assert api.post("/v1/policies/pharmacy-fix/approve", role="policy-approver").status_code == 200
    assert api.post("/v1/policies/pharmacy-fix/activate", {"effective_from": start.isoformat()},
                    role="policy-editor").status_code == 200
    assert any(p.policy_id == "pharmacy-fix" for p in api.services.timeline)
    r = api.post("/v1/policies/pharmacy-fix/withdraw", {"reason": "council vote postponed"}, role="policy-approver")
    assert r.status_code == 200 and r.json()["was"] == "scheduled", r.text
    assert not any(p.policy_id == "pharmacy-fix" for p in api.services.timeline)
    listed = {p["policy_id"]: p["status"] for p in api.get("/v1/policies", role="auditor").json()["policies"]}
    assert listed["pharmacy-fix"] == "withdrawn" and listed["typo"] == "withdrawn"
    log = api.get("/v1/audit-log", role="auditor", params={"object_id": "pharmacy-fix"}).json()["items"]
    assert log[-1]["action"] == "policy.withdraw" and log[-1]["actor"].startswith("test policy-approver")
    assert log[-1]["detail"]["reason"] == "council vote postponed" and log[-1]["detail"]["was"] == "scheduled"
    # Two hours later a payment is judged by the policy in force, not the withdrawn one.
    import ledger.book
    from rules.timeutil import to_us

    monkeypatch.setattr(ledger.book, "now_us", lambda: to_us(start) + 30_000_000)
    api.post("/v1/topups", {"topup_id": "t", "member_id": "m1", "amount": 100_000,
                            "occurred_at": (start - dt.timedelta(hours=1)).isoformat()})
    paid = api.post("/v1/payments", {"payment_id": "p1", "member_id": "m1", "merchant_id": "shop",
                                     "amount": 10_000, "occurred_at": start.isoformat()}).json()
    assert not paid["policy_id"].startswith("pharmacy-fix") and paid["cashback"]["amount"] == 1_000
    # An activation too close (or already in force) and a policy shipped as a file stay.
    assert api.post("/v1/policies", draft(policy_id="soon", rate_bp=650), role="policy-editor").status_code == 201
    assert api.post("/v1/policies/soon/approve", role="policy-approver").status_code == 200
    import ledger.policies

    monkeypatch.setattr(ledger.policies, "_now_us", lambda: to_us(start) + 30_000_000)
    soon = start + dt.timedelta(seconds=30 + 100)
    assert api.post("/v1/policies/soon/activate", {"effective_from": soon.isoformat()},
                    role="policy-editor").status_code == 200
    monkeypatch.setattr(ledger.policies, "_now_us", lambda: to_us(soon) - 30_000_000)
    late = api.post("/v1/policies/soon/withdraw", {"reason": "too late"}, role="policy-editor")
    assert late.status_code == 409 and "stays recorded" in late.json()["detail"], late.text
    shipped = api.post("/v1/policies/incheon-2025-09/withdraw", {"reason": "no"}, role="policy-editor")
    assert shipped.status_code == 409 and "file" in shipped.json()["detail"], shipped.text
    assert api.post("/v1/policies/nope/withdraw", {"reason": "no"}, role="policy-editor").status_code == 404
    with api.services.reader.connect() as conn:
        assert audit.verify(conn).ok


def _approved(api, doc) -> None:
    assert api.post("/v1/policies", doc, role="policy-editor").status_code == 201
    assert api.post(f"/v1/policies/{doc['policy_id']}/approve", role="policy-approver").status_code == 200


def _stored_by_an_older_release(api, doc: dict, status: str = "activated",
                                effective_from_us: int | None = 1_900_000_000_000_000) -> None:
    """`doc` written into the policies table as an earlier release, which accepted it,
    stored it; then the service reloads its policies."""
    import orjson

    from ledger import schema as s
    from rules.document import PolicyDocument

    text = orjson.dumps(PolicyDocument.model_validate(doc).model_dump(mode="json", exclude_none=True)).decode()
    with api.services.engine.begin() as conn:
        conn.execute(s.policies.insert().values(
            policy_id=doc["policy_id"], document=text, status=status, origin="api", author="old (k0)",
            approver="older (k1)" if status != "draft" else None, effective_from_us=effective_from_us,
            supersedes=None, created_at_us=1, updated_at_us=1))
    api.services.reload_policies()


def _with_component(doc: dict, component_id: str) -> dict:
    extra = {**doc["components"][0], "id": component_id, "name": f"extra {component_id}"}
    return {**doc, "components": [*doc["components"], extra]}


def test_a_component_id_another_layer_uses_is_refused_before_anything_is_committed(api):
    """A city draft reusing the win-win layer's `winwin-district` cannot be in force with
    it: simulating it and activating it are 409 `policy_clash`, the activation is rolled
    back (still approved, not audited as activated), and the service's timeline and later
    activations are untouched."""
    clashing = _with_component(draft(policy_id="clash"), "winwin-district")
    _approved(api, clashing)
    sim = api.post("/v1/policies/clash/simulate", {"from": "2025-10-01T00:00:00+09:00",
                                                   "to": "2025-10-02T00:00:00+09:00"}, role="policy-editor")
    assert sim.status_code == 409 and sim.json()["code"] == "policy_clash", sim.text
    start = (dt.datetime.now(SEOUL).replace(microsecond=0) + dt.timedelta(hours=2)).isoformat()
    before = len(api.services.timeline)
    r = api.post("/v1/policies/clash/activate", {"effective_from": start}, role="policy-editor")
    assert r.status_code == 409 and r.json()["code"] == "policy_clash" and "winwin-district" in r.json()["detail"]
    assert api.get("/v1/policies/clash", role="auditor").json()["status"] == "approved"
    log = api.get("/v1/audit-log", role="auditor", params={"object_id": "clash"}).json()["items"]
    assert [e["action"] for e in log] == ["policy.create", "policy.approve"]
    assert len(api.services.timeline) == before
    _approved(api, draft(policy_id="fine", rate_bp=650))
    assert api.post("/v1/policies/fine/activate", {"effective_from": start}, role="policy-editor").status_code == 200
    # Times are text: a bare number is not read as Unix seconds.
    _approved(api, draft(policy_id="numeric", rate_bp=640))
    n = api.post("/v1/policies/numeric/activate", {"effective_from": 1796656277}, role="policy-editor")
    assert n.status_code == 422 and n.json()["code"] == "validation_error", n.text
    capped = {**draft(policy_id="cap-zero"), "monthly_cashback_cap_won": 0}
    assert api.post("/v1/policies", capped, role="policy-editor").status_code == 422


def test_withdrawing_a_schedule_that_would_leave_a_clash_is_refused(api):
    """City A0 (with a `bonus` component) is replaced by A1 (without) before a win-win
    policy W that also has `bonus` starts. Withdrawing A1 would leave A0 in force beside
    W: refused (409 policy_clash), A1 stays scheduled."""
    now = dt.datetime.now(SEOUL).replace(microsecond=0)
    _approved(api, _with_component(draft(policy_id="a0"), "bonus"))
    _approved(api, draft(policy_id="a1", rate_bp=650))
    winwin = yaml.safe_load((POLICIES / "2023-01-winwin.yaml").read_text())
    winwin.pop("effective_from")
    _approved(api, _with_component({**winwin, "policy_id": "w-bonus"}, "bonus"))
    for policy_id, hours in (("a0", 1), ("a1", 2), ("w-bonus", 3)):
        r = api.post(f"/v1/policies/{policy_id}/activate",
                     {"effective_from": (now + dt.timedelta(hours=hours)).isoformat()}, role="policy-editor")
        assert r.status_code == 200, (policy_id, r.text)
    r = api.post("/v1/policies/a1/withdraw", {"reason": "try"}, role="policy-editor")
    assert r.status_code == 409 and r.json()["code"] == "policy_clash", r.text
    assert api.get("/v1/policies/a1", role="auditor").json()["status"] == "scheduled"


def test_a_simulation_names_the_stacks_it_applied_not_the_whole_history(api):
    from rules.timeutil import to_us

    assert api.post("/v1/policies", draft(), role="policy-editor").status_code == 201
    r = api.post("/v1/policies/pharmacy-fix/simulate", {"from": "2025-10-01T00:00:00+09:00",
                                                         "to": "2025-10-02T00:00:00+09:00"}, role="policy-editor")
    assert r.status_code == 200 and r.json()["policy_ids"] == ["pharmacy-fix+winwin-2023"], r.json()["policy_ids"]
    spans = api.services.timeline.in_force_between(to_us(dt.datetime(2025, 9, 15, tzinfo=SEOUL)),
                                                    to_us(dt.datetime(2025, 10, 15, tzinfo=SEOUL)))
    assert [s.policy_id for s in spans] == ["incheon-2025-09+winwin-2023", "incheon-2025-10+winwin-2023"]


def test_a_zero_cap_is_refused_in_new_drafts_but_read_in_stored_ones(api):
    """An earlier version accepted caps of 0: such a stored policy still loads (startup,
    listing), while a new draft with one is a 422 naming the path."""
    doc = {**draft(policy_id="cap-zero"), "monthly_cashback_cap_won": 0}
    r = api.post("/v1/policies", doc, role="policy-editor")
    assert r.status_code == 422 and r.json()["problems"][0]["path"] == "monthly_cashback_cap_won", r.text
    _stored_by_an_older_release(api, doc)
    assert any(p.policy_id == "cap-zero" for p in api.services.timeline)
    assert api.get("/v1/policies/cap-zero", role="auditor").status_code == 200
    # Staff times are text with a date first: no number in any spelling is Unix seconds.
    _approved(api, draft(policy_id="numbers", rate_bp=630))
    for value in ("+1796656277", "1.796656277e9", "1796656277"):
        r = api.post("/v1/policies/numbers/activate", {"effective_from": value}, role="policy-editor")
        assert r.status_code == 422, (value, r.text)


def _diffed_against(api, policy_id: str) -> str:
    diff = api.get(f"/v1/policies/{policy_id}", role="auditor").json()["diff"]
    return diff.splitlines()[0].removeprefix("--- ")


def test_a_policy_is_diffed_against_the_one_of_its_layer_in_force_before_it(api):
    """The review diff (the draft's audit entry, GET /v1/policies/{id}) is against the
    layer's policy in force just before the policy's start, or now for a draft without a
    date: not the layer's newest, and never a withdrawn one."""
    now = dt.datetime.now(SEOUL).replace(microsecond=0)
    _approved(api, draft(policy_id="scheduled-cut", rate_bp=500))
    r = api.post("/v1/policies/scheduled-cut/activate", {"effective_from": (now + dt.timedelta(hours=2)).isoformat()},
                 role="policy-editor")
    assert r.status_code == 200, r.text
    assert _diffed_against(api, "scheduled-cut") == "incheon-2025-10"
    # History: each file against its layer's policy before it, whatever came later.
    assert _diffed_against(api, "incheon-2019-08") == "incheon-2019-01"
    assert _diffed_against(api, "incheon-2025-10") == "incheon-2025-09"
    assert _diffed_against(api, "seo-2019-07-19") == "seo-2019-05"
    assert _diffed_against(api, "incheon-2019-01") == "(none)"
    # A draft without a date replaces what is in force now, not what is only scheduled.
    assert api.post("/v1/policies", draft(policy_id="next", rate_bp=800), role="policy-editor").status_code == 201
    created = api.get("/v1/audit-log", role="auditor", params={"object_id": "next"}).json()["items"][0]
    assert created["detail"]["diff"].startswith("--- incheon-2025-10\n"), created["detail"]["diff"]
    assert _diffed_against(api, "next") == "incheon-2025-10"
    # A draft dated after the schedule replaces the scheduled one, until it is withdrawn.
    later = {**draft(policy_id="later", rate_bp=900), "effective_from": (now + dt.timedelta(hours=3)).isoformat()}
    assert api.post("/v1/policies", later, role="policy-editor").status_code == 201
    assert _diffed_against(api, "later") == "scheduled-cut"
    assert api.post("/v1/policies/scheduled-cut/withdraw", {"reason": "vote postponed"},
                    role="policy-editor").status_code == 200
    assert _diffed_against(api, "later") == "incheon-2025-10"
    assert _diffed_against(api, "incheon-2025-10") == "incheon-2025-09"


def test_two_policies_of_a_layer_at_one_instant_are_a_policy_clash(api):
    """Activated one after the other, as when both at once (docs/design.md): 409
    `policy_clash`, the second stays approved; another layer at that instant is fine."""
    start = (dt.datetime.now(SEOUL).replace(microsecond=0) + dt.timedelta(hours=2)).isoformat()
    _approved(api, draft(policy_id="first", rate_bp=650))
    _approved(api, draft(policy_id="second", rate_bp=640))
    assert api.post("/v1/policies/first/activate", {"effective_from": start}, role="policy-editor").status_code == 200
    r = api.post("/v1/policies/second/activate", {"effective_from": start}, role="policy-editor")
    assert r.status_code == 409 and r.json()["code"] == "policy_clash", r.text
    assert "first" in r.json()["detail"] and "city" in r.json()["detail"], r.text
    assert api.get("/v1/policies/second", role="auditor").json()["status"] == "approved"
    winwin = yaml.safe_load((POLICIES / "2023-01-winwin.yaml").read_text())
    winwin.pop("effective_from")
    _approved(api, {**winwin, "policy_id": "winwin-next"})
    assert api.post("/v1/policies/winwin-next/activate", {"effective_from": start},
                    role="policy-editor").status_code == 200


def test_a_policy_or_program_document_edited_in_the_table_shows_in_the_book_check(api):
    """The documents decide money and their table has no append-only guard: their audit
    entries now carry the document's digest (the whole document for a program), so an
    UPDATE by someone with database access fails the book check, as the audit chain would
    for an edited entry. A draft approved as it was stays green."""
    import pytest
    from sqlalchemy import text

    from ledger.db import make_engine
    from tests.book_helpers import assert_book_ok

    from tests.test_grants import COUPON

    _approved(api, draft())
    coupon = {**COUPON, "valid_from": "2025-07-21", "valid_until": "2025-11-30"}
    assert api.post("/v1/grant-programs", coupon, role="policy-editor").status_code == 201
    assert_book_ok(api)
    entry = [e for e in api.get("/v1/audit-log", role="auditor", params={"object_id": "pharmacy-fix"}).json()["items"]
             if e["action"] == "policy.approve"][0]
    assert len(entry["detail"]["document_sha256"]) == 64  # what the approver approved
    engine = make_engine(api.settings.database_url)
    with engine.begin() as conn:
        conn.execute(text("UPDATE policies SET document = replace(document, '700', '900') "
                          "WHERE policy_id = 'pharmacy-fix'"))
        conn.execute(text("UPDATE grant_programs SET document = replace(document, '150000', '950000')"))
    engine.dispose()
    with pytest.raises(AssertionError, match="policy pharmacy-fix: document.*grant program"):
        assert_book_ok(api)
    # A draft put in force by an UPDATE, never approved nor activated by anyone: flagged too.
    assert api.post("/v1/policies", draft(policy_id="sneak", rate_bp=900), role="policy-editor").status_code == 201
    engine = make_engine(api.settings.database_url)
    with engine.begin() as conn:
        conn.execute(text("UPDATE policies SET status = 'activated', approver = 'z (9)', "
                          "effective_from_us = 1756652400000000 WHERE policy_id = 'sneak'"))
    with pytest.raises(AssertionError, match="policy sneak: approval.*policy sneak: activation"):
        assert_book_ok(api)
    with engine.begin() as conn:
        conn.execute(text("DELETE FROM policies WHERE policy_id = 'sneak'"))
    # A withdrawn scheduled policy put back in force: its approve and activate entries are
    # there, but its last word is the withdrawal.
    _approved(api, draft(policy_id="back", rate_bp=800))
    soon = (dt.datetime.now(SEOUL) + dt.timedelta(hours=2)).isoformat()
    assert api.post("/v1/policies/back/activate", {"effective_from": soon}, role="policy-approver").status_code == 200
    assert api.post("/v1/policies/back/withdraw", {"reason": "wrong rate"}, role="policy-approver").status_code == 200
    with engine.begin() as conn:
        conn.execute(text("UPDATE policies SET status = 'activated' WHERE policy_id = 'back'"))
    engine.dispose()
    with pytest.raises(AssertionError, match="policy back: withdrawn, yet activated"):
        assert_book_ok(api)
    engine = make_engine(api.settings.database_url)
    with engine.begin() as conn:
        conn.execute(text("UPDATE policies SET status = 'withdrawn' WHERE policy_id = 'back'"))
        # A file's policy moved to another instant, and a draft relabelled as a file's.
        conn.execute(text("UPDATE policies SET effective_from_us = effective_from_us + 1 "
                          "WHERE policy_id = 'incheon-2025-10'"))
        conn.execute(text("UPDATE policies SET origin = 'file', status = 'activated' WHERE policy_id = 'pharmacy-fix'"))
    engine.dispose()
    with pytest.raises(AssertionError) as caught:
        assert_book_ok(api)
    assert "incheon-2025-10: not as its file" in str(caught.value), caught.value
    assert "pharmacy-fix: not as its file" in str(caught.value), caught.value

def test_the_remainder_goes_to_the_first_funder_as_written_on_every_path(api, monkeypatch):
    """No `remainder_to`: the won the split leaves goes to the first funder as written.
    Documents are stored with sorted keys (city before national); the default used to be
    taken from the stored order, so a draft sent through the API paid city the won its
    text (and `eum policy simulate` on the file) gave the nation. It is now filled in when
    the document is read, and stored with it."""
    import orjson

    from rules.compiled import compile_policy
    from rules.document import PolicyDocument
    from rules.loader import PolicyInvalid, parse_policy_text

    text = ("policy_id: s18-rem\nname: remainder to the first funder\nlayer: s18\ncomponents:\n"
            "  - id: s18-rem\n    funding: {national: 1, city: 1}\n    funding_unit: parts\n"
            "    variants:\n      - id: all\n        bands: [{rate_bp: 100}]\n")
    document = parse_policy_text(text, "file")
    assert document.components[0].remainder_to == "national"
    stored = orjson.dumps(document.model_dump(mode="json", exclude_none=True), option=orjson.OPT_SORT_KEYS)
    again = PolicyDocument.model_validate_json(stored)
    assert again == document
    assert compile_policy(again, dt.datetime(2030, 1, 1, tzinfo=SEOUL)).components[0].remainder_to == "national"
    # Stored before this (no remainder_to, keys sorted): it still loads, and pays the first
    # funder of the stored order, as it did since it was stored.
    old = orjson.loads(stored)
    del old["components"][0]["remainder_to"]
    assert PolicyDocument.model_validate_json(orjson.dumps(old)).components[0].remainder_to == "city"
    # A component with no funder has no first funder (it crashed the compile): refused.
    with pytest.raises(PolicyInvalid, match="funding"):
        parse_policy_text(text.replace("{national: 1, city: 1}", "{}"), "file")

    api.put("/v1/members/m1", {"district": "seo"})
    api.put("/v1/merchants/shop", {"name": "S", "district": "seo", "category": "cafe",
                                   "annual_sales": 100_000_000, "registered_from": "2019-01-01"})
    r = api.client.post("/v1/policies", content=text, headers={**api.h("policy-editor"),
                                                              "Content-Type": "application/yaml"})
    assert r.status_code == 201, r.text
    assert api.post("/v1/policies/s18-rem/approve", role="policy-approver").status_code == 200
    assert api.get("/v1/policies/s18-rem", role="auditor").json()["document"]["components"][0]["remainder_to"] \
        == "national"
    start = dt.datetime.now(SEOUL).replace(microsecond=0) + dt.timedelta(hours=2)
    _in_force_at(api, monkeypatch, "s18-rem", start)
    paid = api.post("/v1/payments", {"payment_id": "p1", "member_id": "m1", "merchant_id": "shop", "amount": 10_100,
                                     "occurred_at": start.isoformat()}).json()
    line = next(c for c in paid["cashback"]["components"] if c["component"] == "s18-rem")
    assert line["amount"] == 101 and line["funded_by"] == {"national": 51, "city": 50}, line


PROMO = """policy_id: s18-promo2
name: a promotion that tries the city's settings
layer: promo
topup: {min_won: 50000}
spend_order: [charged, points, grants]
cashback_on: [charged, points]
declined_categories: [cafe]
cashback_eligibility: {merchant_sales_max_won: 100000000}
monthly_cashback_cap_won: 5000
components:
  - id: promo2
    funding: {city: 10000}
    variants: [{id: all, bands: [{rate_bp: 500}]}]
"""


def test_a_layer_that_sets_the_city_layers_settings_is_refused(api, tmp_path):
    """Only the city policy's top-up limits, spend order, cashback balances, declined
    categories, eligibility and total cap apply (rules.compiled.merge_layers); another
    layer's were accepted and ignored (a cafe with 2억 sales earned the promotion's
    cashback, a 20,000 top-up under its 50,000 minimum went through). Refused, each with
    its line; values equal to the defaults, which every stored document spells out, are
    not settings. `layer: City` is not the city layer: layers are lower case."""
    import orjson
    from typer.testing import CliRunner

    from eum.cli import app
    from rules.loader import PolicyInvalid, parse_policy_text

    with pytest.raises(PolicyInvalid) as caught:
        parse_policy_text(PROMO, "t")
    lines = PROMO.splitlines()
    found = {p.path: lines[p.line - 1] for p in caught.value.problems}
    assert set(found) == {"topup.min_won", "spend_order", "cashback_on", "declined_categories",
                          "cashback_eligibility.merchant_sales_max_won", "monthly_cashback_cap_won"}, found
    assert all(line.startswith(path.split(".")[0]) for path, line in found.items())
    assert "city" in caught.value.problems[0].reason
    # The same settings in the city layer are the city's; a layer without them is fine.
    assert parse_policy_text(PROMO.replace("layer: promo", "layer: city"), "t").topup.min_won == 50_000
    plain = "\n".join(line for line in lines if not line.startswith(tuple(p.split(".")[0] for p in found)))
    promo = parse_policy_text(plain, "t")
    # Written out in full, as stored and shown by GET /v1/policies/{id}, it is still fine.
    full = orjson.dumps(promo.model_dump(mode="json", exclude_none=True)).decode()
    assert "topup" in full and parse_policy_text(full, "t") == promo
    for layer in ("City", "CITY", "District-Seo"):
        with pytest.raises(PolicyInvalid, match="lower case"):
            parse_policy_text(plain.replace("layer: promo", f"layer: {layer}"), "t")
    # eum policy validate says so
    bad = tmp_path / "promo.yaml"
    bad.write_text(PROMO, encoding="utf-8")
    result = CliRunner().invoke(app, ["policy", "validate", str(bad)])
    assert result.exit_code == 1 and f"BAD  {bad}:4: topup.min_won:" in result.output, result.output
    # The API refuses the draft and stores nothing.
    r = api.client.post("/v1/policies", content=PROMO, headers={**api.h("policy-editor"),
                                                               "Content-Type": "application/yaml"})
    assert r.status_code == 422 and r.json()["code"] == "policy_invalid", r.text
    assert {p["path"] for p in r.json()["problems"]} == set(found)
    assert api.get("/v1/policies/s18-promo2", role="auditor").status_code == 404
    # A document an earlier version accepted still loads: start-up, listing, reading.
    _stored_by_an_older_release(api, yaml.safe_load(PROMO))
    assert any(p.policy_id == "s18-promo2" for p in api.services.timeline)
    assert api.get("/v1/policies/s18-promo2", role="auditor").status_code == 200


def test_documents_an_older_release_stored_still_load_where_new_ones_are_refused(api):
    """An older release accepted a top-up minimum above the maximum (then superseded) and a
    draft dated 1999; the checks, in the model, stopped the service from starting and made
    the draft's page a 500. New documents are refused; stored ones load."""
    unreachable = {**draft(policy_id="topup-upside-down"), "topup": {"min_won": 2_000_000, "monthly_max_won": 1_500_000}}
    r = api.post("/v1/policies", unreachable, role="policy-editor")
    assert r.status_code == 422 and r.json()["problems"][0]["path"] == "topup.min_won", r.text
    old_draft = {**draft(policy_id="dated-1999"), "effective_from": "1999-06-01T00:00:00+09:00"}
    r = api.post("/v1/policies", old_draft, role="policy-editor")
    assert r.status_code == 422 and r.json()["problems"][0]["path"] == "effective_from", r.text
    _stored_by_an_older_release(api, unreachable)
    _stored_by_an_older_release(api, old_draft, status="draft", effective_from_us=None)
    assert any(p.policy_id == "topup-upside-down" for p in api.services.timeline)
    assert api.get("/v1/policies/dated-1999", role="auditor").status_code == 200


def test_a_drafts_effective_from_is_never_unix_seconds(api):
    for value in (1798675200, "1798675200"):
        r = api.post("/v1/policies", {**draft(policy_id="unix"), "effective_from": value}, role="policy-editor")
        assert r.status_code == 422 and "not a number" in r.text, (value, r.text)


def test_dates_in_conditions_are_never_unix_seconds(api, tmp_path):
    """`cashback_eligibility.date_from: 1714521600` passed `eum policy validate` and the
    API, read as 2024-05-01 (pydantic's Unix seconds), where every other document date
    refuses a bare number. New documents are refused, naming the path and its line; a
    document read back from the book is not held to it (checked where documents come in)."""
    from typer.testing import CliRunner

    from eum.cli import app
    from rules.document import PolicyDocument

    for where, value in (("eligibility", 1714521600), ("eligibility", "1714521600"), ("variant", 1717113600)):
        doc = draft(policy_id="unix-dates")
        if where == "eligibility":
            doc["cashback_eligibility"] = {**doc.get("cashback_eligibility", {}), "date_from": value}
            path = "cashback_eligibility.date_from"
        else:
            doc["components"][0]["variants"][0]["when"] = {"date_until": value}
            path = "components.0.variants.0.when.date_until"
        r = api.post("/v1/policies", doc, role="policy-editor")
        assert r.status_code == 422 and "not a number" in r.text, (where, value, r.text)
        assert path in {p["path"] for p in r.json()["problems"]}, r.text
    assert api.get("/v1/policies/unix-dates", role="auditor").status_code == 404
    bad = tmp_path / "unix.yaml"
    bad.write_text(yaml.safe_dump({**draft(policy_id="unix-file"),
                                   "cashback_eligibility": {"date_from": 1714521600}}, sort_keys=False))
    result = CliRunner().invoke(app, ["policy", "validate", str(bad)])
    assert result.exit_code == 1 and "cashback_eligibility.date_from" in result.output, result.output
    assert "not a number" in result.output, result.output
    # Dates as text pass; a document read back (no input context) is read as before.
    good = {**draft(policy_id="text-dates"), "cashback_eligibility": {"date_from": "2024-05-01"}}
    assert api.post("/v1/policies", good, role="policy-editor").status_code == 201
    stored = PolicyDocument.model_validate({**good, "cashback_eligibility": {"date_from": 1714521600}})
    assert stored.cashback_eligibility.date_from == dt.date(2024, 5, 1)


def test_a_worker_installs_policy_timelines_in_the_order_it_read_them(api, monkeypatch):
    """The poller and each activation or withdrawal install the timeline they read. One
    read before another's step and installed after it left the worker on the older
    timeline (a withdrawn policy still paying) until the next change: the reload now
    reads and installs under one lock (the staff-races audit). Two reloads, the first
    slow between its read and its install: the second's, read later, is the one left."""
    import threading
    import time

    import api.services as services_module

    svc = api.client.app.state.services
    reads, first_read = [], threading.Event()

    def timeline_in(conn, files):
        reads.append(len(reads))
        read = f"timeline {reads[-1]}"
        if reads[-1] == 0:
            first_read.set()
            time.sleep(0.5)  # read, not yet installed
        return read

    monkeypatch.setattr(services_module, "timeline_in", timeline_in)
    monkeypatch.setattr(svc.book, "timeline", svc.book.timeline)
    slow = threading.Thread(target=svc.reload_policies)
    slow.start()
    assert first_read.wait(5)
    svc.reload_policies()
    slow.join()
    assert reads == [0, 1] and svc.book.timeline == "timeline 1"


def test_the_diff_an_approver_reads_is_against_what_the_draft_replaces(api):
    """A draft's `supersedes` names the policy its review diff is taken against. It could
    name any policy, the author's own draft never approved included: a draft tripling
    the city's rates, then a copy "superseding" it, showed its approver a change of name
    only (the security audit). `supersedes` must name a policy of the draft's layer that
    was put in force (activated, from a file or the API); a row that names another, as
    an earlier release took, is diffed against the layer's policy in force."""
    import copy

    from ledger import schema as s

    in_force = yaml.safe_load((POLICIES / "2025-10-cap-50man.yaml").read_text())
    shadow = copy.deepcopy(in_force)
    shadow["policy_id"] = "shadow"
    shadow.pop("effective_from")
    for component in shadow["components"]:
        for variant in component["variants"]:
            for band in variant["bands"]:
                band["rate_bp"] *= 3
    assert api.post("/v1/policies", shadow, role="policy-editor").status_code == 201
    tidy = {**copy.deepcopy(shadow), "policy_id": "tidy", "name": "tidy-up of names", "supersedes": "shadow"}
    r = api.post("/v1/policies", tidy, role="policy-editor")
    assert r.status_code == 409 and r.json()["code"] == "policy_state_conflict", r.text
    assert "shadow" in r.json()["detail"]
    assert api.get("/v1/policies/tidy", role="auditor").status_code == 404
    other_layer = {"policy_id": "promo-1", "name": "promo", "layer": "promo", "supersedes": in_force["policy_id"],
                   "components": [{"id": "promo-x", "funding": {"city": 10000},
                                   "variants": [{"id": "v", "bands": [{"up_to_won": 100000, "rate_bp": 100}]}]}]}
    r = api.post("/v1/policies", other_layer, role="policy-editor")
    assert r.status_code == 409 and r.json()["code"] == "policy_state_conflict", r.text
    assert api.post("/v1/policies", {**other_layer, "supersedes": None}, role="policy-editor").status_code == 201
    # Named as what it replaces, the policy in force: the review shows the rates tripled.
    assert api.post("/v1/policies", {**tidy, "supersedes": in_force["policy_id"]}, role="policy-editor").status_code == 201
    assert "rate_bp" in api.get("/v1/policies/tidy", role="policy-approver").json()["diff"]
    # A row naming the draft, as an earlier release took it: diffed against the policy in force.
    engine = make_engine(api.settings.database_url)
    try:
        with engine.begin() as conn:
            conn.execute(s.policies.update().where(s.policies.c.policy_id == "tidy").values(supersedes="shadow"))
            document = conn.execute(s.policies.select().where(s.policies.c.policy_id == "tidy")).one().document
            conn.execute(s.policies.update().where(s.policies.c.policy_id == "tidy")
                         .values(document=document.replace('"supersedes":"incheon-2025-10"', '"supersedes":"shadow"')))
    finally:
        engine.dispose()
    diff = api.get("/v1/policies/tidy", role="policy-approver").json()["diff"]
    assert "rate_bp" in diff and "supersedes" in diff, diff
