"""A policy or grant program is read as written: a yes/no is true or false (or YAML 1.1's
yes/no and on/off words for them), a household size a number, and each amount rule has
an id of its own. Lax, pydantic read `same_district: 1` and `"t"` as true and `0` and
`"n"` as false, and a household size `"3"` as 3; and two amount rules of one id, or a size
of -1, were taken without a word (policy audit). New documents are refused, naming the
field; documents stored before the checks still load."""

from __future__ import annotations

import pytest
import yaml

from rules.document import PolicyDocument
from rules.grants import GrantProgramDocument
from rules.loader import PolicyInvalid, parse_policy_text
from tests.book_helpers import draft_with_variant

PROGRAM = {"program_id": "words", "name": "words", "valid_from": "2025-07-01", "valid_until": "2025-12-31",
           "funding": {"city": 10000}, "amount_rules": {"base": [{"id": "flat", "amount_won": 100_000}]}}


@pytest.mark.parametrize("word", ["1", 1, 0, "t", "n", "yess", "maybe"])
def test_same_district_is_true_or_false_only(word):
    text = yaml.safe_dump(draft_with_variant("words", {"same_district": word}), sort_keys=False, allow_unicode=True)
    with pytest.raises(PolicyInvalid) as refused:
        parse_policy_text(text, "draft.yaml")
    [problem] = refused.value.problems
    assert problem.path == "components.0.variants.0.when.same_district" and "not true or false" in problem.reason


@pytest.mark.parametrize("written, read", [("true", True), ("false", False), ("yes", True), ("No", False),
                                           ("on", True), ("OFF", False)])
def test_same_district_takes_yamls_words_for_true_and_false(written, read):
    text = yaml.safe_dump(draft_with_variant("words", {"same_district": "SAME_DISTRICT_WORD"}), sort_keys=False)
    text = text.replace("SAME_DISTRICT_WORD", written)  # as a file would say it, unquoted
    document = parse_policy_text(text, "draft.yaml")
    assert document.components[0].variants[0].when.same_district is read


def test_a_policy_draft_saying_1_for_true_is_refused_and_not_stored(api):
    r = api.post("/v1/policies", draft_with_variant("words", {"same_district": 1}), role="policy-editor")
    assert r.status_code == 422, r.text
    assert "same_district" in r.text
    assert api.get("/v1/policies/words", role="policy-editor").status_code == 404


@pytest.mark.parametrize("field, value", [("cashback_on_spend", "y"), ("cashback_on_spend", 1),
                                          ("once_per_member", "0"), ("once_per_member", 0)])
def test_a_programs_yes_or_no_is_true_or_false_only(api, field, value):
    r = api.post("/v1/grant-programs", {**PROGRAM, field: value}, role="policy-editor")
    assert r.status_code == 422 and field in r.text, r.text
    assert api.get("/v1/grant-programs/words", role="policy-editor").status_code == 404
    assert api.post("/v1/grant-programs", {**PROGRAM, field: not value}, role="policy-editor").status_code == 201


@pytest.mark.parametrize("when", [{"household_size": ["3"]}, {"household_size_min": "3"},
                                  {"household_size_min": 2.0}, {"household_size": [True]}])
def test_a_household_size_is_a_whole_number_as_written(when):
    body = {**PROGRAM, "amount_rules": {"base": [{"id": "sized", "when": when, "amount_won": 1}]}}
    with pytest.raises(ValueError, match="household_size"):
        GrantProgramDocument.model_validate(body)


@pytest.mark.parametrize("when, said", [
    ({"household_size_min": -1}, "when.household_size_min -1 is not a household size"),
    ({"household_size": [2, -3]}, "when.household_size -3 is not a household size"),
    ({"household_size": [10_001]}, "when.household_size 10001 is not a household size"),
])
def test_a_household_size_no_household_has_is_refused_when_created(api, when, said):
    rules = {"base": [{"id": "sized", "when": when, "amount_won": 300_000}, {"id": "flat", "amount_won": 100_000}]}
    r = api.post("/v1/grant-programs", {**PROGRAM, "amount_rules": rules}, role="policy-editor")
    assert r.status_code == 422 and r.json()["code"] == "validation_error", r.text
    assert f"amount rule 'sized': {said}: sizes run from 0 to 10,000" in r.json()["detail"], r.text
    assert api.get("/v1/grant-programs/words", role="policy-editor").status_code == 404
    # As stored before the check, it loads.
    stored = GrantProgramDocument.model_validate({**PROGRAM, "amount_rules": rules})
    assert GrantProgramDocument.model_validate_json(stored.model_dump_json()) == stored


def test_two_amount_rules_of_one_id_are_refused_when_created(api):
    rules = {"base": [{"id": "one", "when": {"household_size": [1]}, "amount_won": 100_000},
                      {"id": "two", "amount_won": 200_000}],
             "add_ons": [{"id": "one", "when": {"income_status": ["basic"]}, "amount_won": 50_000}]}
    r = api.post("/v1/grant-programs", {**PROGRAM, "amount_rules": rules}, role="policy-editor")
    assert r.status_code == 422 and r.json()["code"] == "validation_error", r.text
    assert "amount rule id 'one' is given 2 times" in r.json()["detail"], r.text
    assert api.get("/v1/grant-programs/words", role="policy-editor").status_code == 404
    rules["add_ons"][0]["id"] = "basic"
    assert api.post("/v1/grant-programs", {**PROGRAM, "amount_rules": rules}, role="policy-editor").status_code == 201


def test_stored_documents_hold_json_booleans_and_numbers_so_they_load():
    """What the book stores is the model's own JSON, so the stricter reading loads it."""
    doc = PolicyDocument.model_validate(draft_with_variant("words", {"same_district": False}))
    assert PolicyDocument.model_validate_json(doc.model_dump_json()) == doc
    program = GrantProgramDocument.model_validate(
        {**PROGRAM, "cashback_on_spend": True, "once_per_member": False,
         "amount_rules": {"base": [{"id": "sized", "when": {"household_size": [1, 2], "household_size_min": 1},
                                    "amount_won": 1}]}})
    assert GrantProgramDocument.model_validate_json(program.model_dump_json()) == program
