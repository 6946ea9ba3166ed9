"""A condition list that a value must be one of, given empty, holds for nothing: a
variant with `member_districts: []` (written to mean "any member") never applied, a
`cashback_eligibility` with `categories_include: []` paid no cashback at all, and a
grant program restricted to `categories_include: []` had its money disbursed onto cards
where it could be spent at no merchant. Each was taken without a word; new documents
are refused with the path (and line) and what to write instead, and stored ones still load."""

from __future__ import annotations

import pytest
import yaml

from rules.document import PolicyDocument
from rules.grants import GrantProgramDocument
from rules.loader import PolicyInvalid, parse_policy_text
from tests.book_helpers import draft_with_variant
from tests.conftest import POLICIES


@pytest.mark.parametrize("name", ["categories_include", "merchant_districts", "member_districts", "weekdays"])
def test_an_empty_list_a_value_must_be_in_is_refused_with_its_line(name):
    text = yaml.safe_dump(draft_with_variant("empty", {name: []}), sort_keys=False, allow_unicode=True)
    with pytest.raises(PolicyInvalid) as refused:
        parse_policy_text(text, "draft.yaml")
    [problem] = refused.value.problems
    assert problem.path == f"components.0.variants.0.when.{name}"
    assert problem.line == next(n for n, line in enumerate(text.splitlines(), 1) if f"{name}: []" in line)
    assert "variant 'special' would never apply" in problem.reason and f"leave {name} out" in problem.reason
    # A document stored before the check still loads (read back without it).
    assert PolicyDocument.model_validate(yaml.safe_load(text)).components[0].variants[0].when.model_dump()[name] == ()


def test_the_exclude_lists_empty_exclude_nothing_and_are_taken():
    doc = draft_with_variant("empty-excludes", {"categories_exclude": [], "merchant_districts_exclude": [],
                                                "merchant_flags_none": [], "merchant_flags_all": []})
    parse_policy_text(yaml.safe_dump(doc), "draft.yaml")


def test_a_draft_whose_eligibility_matches_nothing_is_refused_and_not_stored(api):
    r = api.post("/v1/policies", draft_with_variant("no-cashback", {}, {"categories_include": []}), role="policy-editor")
    assert r.status_code == 422 and r.json()["code"] == "policy_invalid", r.text
    [problem] = r.json()["problems"]
    assert problem["path"] == "cashback_eligibility.categories_include"
    assert "no payment would earn cashback" in problem["reason"]
    assert api.get("/v1/policies/no-cashback", role="auditor").status_code == 404


def _program(program_id: str, **changes) -> dict:
    doc = yaml.safe_load((POLICIES / "grants" / "2025-07-livelihood-coupon-round1.yaml").read_text())
    return {**doc, "program_id": program_id, "valid_from": "2026-12-01", "valid_until": "2027-03-31", **changes}


def test_a_grant_program_its_money_could_be_spent_nowhere_is_refused(api):
    r = api.post("/v1/grant-programs", _program("nowhere", restrictions={"categories_include": []}),
                 role="policy-editor")
    assert r.status_code == 422 and r.json()["code"] == "validation_error", r.text
    assert "restrictions.categories_include" in r.json()["detail"] and "spent nowhere" in r.json()["detail"]
    assert api.get("/v1/grant-programs/nowhere", role="auditor").status_code == 404


def test_an_amount_rule_that_matches_no_recipient_is_refused(api):
    rules = {"base": [{"id": "households", "when": {"household_size": []}, "amount_won": 100_000}]}
    r = api.post("/v1/grant-programs", _program("no-one", amount_rules=rules), role="policy-editor")
    assert r.status_code == 422, r.text
    assert "amount rule 'households': when.household_size" in r.json()["detail"]
    assert GrantProgramDocument.model_validate(_program("stored", amount_rules=rules)).match_problems()
    assert api.get("/v1/grant-programs/no-one", role="auditor").status_code == 404
