"""Withdrawal of unspent charged money (잔액 환불, DOMAIN.md "Limits on the member's own
money"): a member may take back the charged money left once a share of the charged money
put in since the last withdrawal has been used, the share set by the policy in force
(`withdrawal`, by default 60%, 80% for 1만 or less; docs/design.md, "Withdrawals")."""

from __future__ import annotations

import pytest

from rules.compiled import compile_policy
from rules.loader import PolicyInvalid, load_policy_file, parse_policy_text
from tests.conftest import POLICIES

CURRENT = (POLICIES / "2025-10-cap-50man.yaml").read_text(encoding="utf-8")
RULE = "withdrawal:\n  used_min_bp: 6000\n  small_up_to_won: 10000\n  small_used_min_bp: 8000\n"


# ---------------------------------------------------------------- the policy's rule


def test_a_policy_that_says_nothing_takes_the_documented_default():
    assert RULE in CURRENT
    silent = compile_policy(load_policy_file(POLICIES / "2019-01-flat-6.yaml"))
    written = compile_policy(parse_policy_text(CURRENT, "t"))
    for policy in (silent, written):
        assert (policy.withdrawal_used_min_bp, policy.withdrawal_small_up_to_won,
                policy.withdrawal_small_used_min_bp) == (6_000, 10_000, 8_000)
        # 1만 or less put in: 80%; more: 60%
        assert policy.withdrawal_used_min_bp_for(10_000) == 8_000
        assert policy.withdrawal_used_min_bp_for(1) == 8_000
        assert policy.withdrawal_used_min_bp_for(10_001) == 6_000
    # the file spells out the default, so it is the same document as one that is silent
    assert parse_policy_text(CURRENT.replace(RULE, ""), "t") == parse_policy_text(CURRENT, "t")


def test_a_policy_may_set_its_own_share():
    text = CURRENT.replace(RULE, "withdrawal:\n  used_min_bp: 7000\n  small_up_to_won: 0\n")
    policy = compile_policy(parse_policy_text(text, "t"))
    assert policy.withdrawal_used_min_bp_for(5_000) == 7_000  # nothing is small
    assert policy.withdrawal_small_used_min_bp == 8_000  # left out: the default


@pytest.mark.parametrize("setting,why", [
    ("used_min_bp: 10001", "less than or equal to 10000"),
    ("used_min_bp: -1", "greater than or equal to 0"),
    ("used_min_bp: 0.6", "valid integer"),
    ("used_min_bp: '6000'", "valid integer"),
    ("small_used_min_bp: 80%", "valid integer"),
    ("small_up_to_won: -10000", "greater than or equal to 0"),
    ("used_share: 60", "Extra inputs are not permitted"),
])
def test_a_bad_withdrawal_setting_is_refused_with_its_line(setting, why):
    text = CURRENT.replace(RULE, f"withdrawal:\n  {setting}\n")
    with pytest.raises(PolicyInvalid) as caught:
        parse_policy_text(text, "t")
    (problem,) = caught.value.problems
    assert problem.path.startswith("withdrawal.") and why in problem.reason, problem
    assert text.splitlines()[problem.line - 1].strip() == setting


def test_only_the_city_layer_sets_it():
    seo = (POLICIES / "2019-05-seo-card.yaml").read_text(encoding="utf-8")
    with pytest.raises(PolicyInvalid) as caught:
        parse_policy_text(seo + "withdrawal:\n  used_min_bp: 7000\n", "t")
    assert [p.path for p in caught.value.problems] == ["withdrawal.used_min_bp"]
    assert "city" in caught.value.problems[0].reason
    # the default written out is no setting (every stored document spells it out)
    parse_policy_text(seo + RULE, "t")


def test_the_api_refuses_a_draft_with_a_bad_share_and_keeps_a_good_one(api):
    bad = CURRENT.replace("incheon-2025-10", "w-bad").replace("used_min_bp: 6000", "used_min_bp: 60000")
    r = api.client.post("/v1/policies", content=bad, headers={**api.h("policy-editor"),
                                                             "Content-Type": "application/yaml"})
    assert r.status_code == 422 and r.json()["code"] == "policy_invalid", r.text
    (problem,) = r.json()["problems"]
    assert problem["path"] == "withdrawal.used_min_bp" and "10000" in problem["reason"]
    assert api.get("/v1/policies/w-bad", role="auditor").status_code == 404
    good = CURRENT.replace("incheon-2025-10", "w-good").replace("used_min_bp: 6000", "used_min_bp: 7500")
    r = api.client.post("/v1/policies", content=good, headers={**api.h("policy-editor"),
                                                              "Content-Type": "application/yaml"})
    assert r.status_code == 201, r.text
    stored = api.get("/v1/policies/w-good", role="auditor").json()
    assert stored["document"]["withdrawal"] == {"used_min_bp": 7_500, "small_up_to_won": 10_000,
                                                "small_used_min_bp": 8_000}
