"""A draft's conditions may name a merchant category or flag no registered merchant
carries: the registry holds them as free text, so `categories_exclude: [pharmcy]` (the
2023 pharmacy correction's kind of slip) validates, excludes no pharmacy, and the preview
shows nothing to be suspicious of. The draft is taken and its answer, its page (what the
approver reads) and its audit entry name each such name."""

from __future__ import annotations

import yaml

from tests.book_helpers import draft_with_variant, put_merchant


def test_a_category_or_flag_no_merchant_carries_is_named_in_the_answer_page_and_audit(api):
    put_merchant(api, "pharm", category="pharmacy")
    put_merchant(api, "cafe", category="cafe", flags=["good_price"])
    doc = draft_with_variant("typo", {"categories_include": ["pharmacy", "pharmcy"],
                                      "merchant_flags_all": ["good_prices"], "merchant_flags_none": ["good_price"]},
                             {"categories_exclude": ["cafe", "car_dealer"]})
    r = api.post("/v1/policies", doc, role="policy-editor")
    assert r.status_code == 201, r.text
    want = [("components[0].variants[0].when.categories_include[1]", "pharmcy", "category"),
            ("components[0].variants[0].when.merchant_flags_all[0]", "good_prices", "flag"),
            ("cashback_eligibility.categories_exclude[1]", "car_dealer", "category")]
    got = r.json()["warnings"]
    assert sorted((w["path"], w["name"]) for w in got) == sorted((path, name) for path, name, _ in want), got
    for w in got:
        kind = next(k for path, _, k in want if path == w["path"])
        assert f"the {kind} {w['name']!r}" in w["reason"], w
    assert r.json()["status"] == "draft"  # a warning, not a refusal

    page = api.get("/v1/policies/typo", role="policy-approver").json()
    assert sorted(w["name"] for w in page["warnings"]) == ["car_dealer", "good_prices", "pharmcy"]
    log = api.get("/v1/audit-log", params={"object_type": "policy", "object_id": "typo", "action": "policy.create"},
                  role="auditor").json()
    [entry] = log["items"]
    assert sorted(w["name"] for w in entry["detail"]["warnings"]) == ["car_dealer", "good_prices", "pharmcy"]

    # The page reads the registry as it is now: a car dealer registered since is no longer unknown.
    put_merchant(api, "cars", category="car_dealer")
    page = api.get("/v1/policies/typo", role="policy-approver").json()
    assert sorted(w["name"] for w in page["warnings"]) == ["good_prices", "pharmcy"]


def test_no_warning_where_every_name_is_carried_or_the_registry_is_empty(api):
    # No merchants yet (a new book): nothing to compare with, so nothing said.
    r = api.post("/v1/policies", draft_with_variant("early", {"categories_include": ["pharmacy"]}), role="policy-editor")
    assert r.status_code == 201 and r.json()["warnings"] == [], r.text
    put_merchant(api, "pharm", category="pharmacy", flags=["good_price"])
    r = api.post("/v1/policies", draft_with_variant("fine", {"categories_include": ["pharmacy"],
                                                             "merchant_flags_all": ["good_price"]}), role="policy-editor")
    assert r.status_code == 201 and r.json()["warnings"] == [], r.text
    # declined_categories names the businesses the card refuses, which are not registered: no warning
    assert api.get("/v1/policies/fine", role="policy-approver").json()["warnings"] == []
    # the winwin flag follows a merchant's share (ledger.registry.merchant_flags)
    put_merchant(api, "ww", category="cafe", merchant_share_bp=300)
    r = api.post("/v1/policies", draft_with_variant("ww", {"merchant_flags_all": ["winwin"]}), role="policy-editor")
    assert r.json()["warnings"] == [], r.text


def test_a_variant_after_a_catch_all_is_named_in_the_answer_page_and_audit(api):
    """The first variant whose conditions hold applies, and one with none always holds: a
    pharmacy 7% added below the standard variant validated, never applied, and its preview
    showed no change (the policy-workflow audit). Taken, with a warning naming it."""
    put_merchant(api, "pharm", category="pharmacy")
    doc = draft_with_variant("below", {"categories_include": ["pharmacy"]})
    variants = doc["components"][0]["variants"]
    variants.append(variants.pop(0))  # the pharmacy variant last, after the catch-all `standard`
    assert [v["id"] for v in variants] == ["ganghwa-ongjin", "standard", "special"]
    r = api.post("/v1/policies", doc, role="policy-editor")
    assert r.status_code == 201 and r.json()["status"] == "draft", r.text
    [warning] = r.json()["warnings"]
    assert warning["path"] == "components[0].variants[2]" and warning["name"] == "special", warning
    assert "'standard'" in warning["reason"] and "never" in warning["reason"], warning
    assert api.get("/v1/policies/below", role="policy-approver").json()["warnings"] == [warning]
    [entry] = api.get("/v1/audit-log", params={"object_id": "below", "action": "policy.create"},
                      role="auditor").json()["items"]
    assert entry["detail"]["warnings"] == [warning]
    # Listed first, it applies: nothing to say.
    assert api.post("/v1/policies", draft_with_variant("above", {"categories_include": ["pharmacy"]}),
                    role="policy-editor").json()["warnings"] == []


def test_eum_policy_validate_warns_of_a_variant_after_a_catch_all_with_its_line(tmp_path):
    """The same warning from `eum policy validate`, a WARN line with the variant's line;
    the file is still ok (exit 0)."""
    from typer.testing import CliRunner

    from eum.cli import app

    doc = draft_with_variant("below", {"categories_include": ["pharmacy"]})
    doc["components"][0]["variants"].append(doc["components"][0]["variants"].pop(0))
    path = tmp_path / "below.yaml"
    path.write_text(yaml.safe_dump(doc, allow_unicode=True, sort_keys=False), encoding="utf-8")
    line = next(n for n, text in enumerate(path.read_text().splitlines(), 1) if "id: special" in text)
    out = CliRunner().invoke(app, ["policy", "validate", str(path)])
    assert out.exit_code == 0 and f"ok   {path}: below (city)" in out.output, out.output
    assert f"WARN {path}:{line}: components[0].variants[2]: variant 'standard' before it" in out.output, out.output
