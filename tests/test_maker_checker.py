"""Maker-checker wherever money policy changes: a policy, a correction, a settlement
reopening and a grant program each need a second person. The author can never approve:
not with the same key, not with another key under the same name. A refused approval
changes nothing, and every approval is in the audit log with both people."""

from __future__ import annotations

import datetime as dt
import unicodedata

import pytest
import yaml

from ledger.db import make_engine
from ledger.keys import create_key, list_keys, same_person
from tests.book_helpers import (approve_program, assert_book_ok, assert_problem, put_member, put_merchant, snapshot,
                                topup)
from tests.conftest import POLICIES, at

COUPON = yaml.safe_load((POLICIES / "grants" / "2025-07-livelihood-coupon-round1.yaml").read_text())


def new_key(api, name: str, role: str) -> dict[str, str]:
    return new_key_and_id(api, name, role)[1]


def new_key_and_id(api, name: str, role: str) -> tuple[str, dict[str, str]]:
    """A key made as `eum keys create` makes one: its id and the headers that send it."""
    engine = make_engine(api.settings.database_url)
    try:
        key_id, token = create_key(engine, name=name, role=role, pepper=api.settings.key_pepper.get_secret_value())
    finally:
        engine.dispose()
    return key_id, {"Authorization": f"Bearer {token}"}


def revoke(api, key_id: str) -> None:
    """The key revoked as `eum keys revoke` does."""
    from ledger.keys import revoke_key

    engine = make_engine(api.settings.database_url)
    try:
        assert revoke_key(engine, key_id, actor="ops lead (cli)")
    finally:
        engine.dispose()


def test_one_person_is_one_key_or_one_name():
    assert same_person("Kim (k1)", "Kim (k1)")
    assert same_person("Kim (k1)", "Kim (k2)")  # another key, same name
    assert same_person("Kim (k1)", "Lee (k1)")  # the same key renamed
    assert not same_person("Kim (k1)", "Lee (k2)")
    assert not same_person("policy-files", "Kim (k1)")


def test_one_name_whatever_its_case_spacing_or_width():
    """A name is compared casefolded, NFKC-normalised and without its whitespace: a key
    issued to "Alice" is the same person as one issued to "alice", and "김 민준" (a space
    between surname and given name, as forms write it) is 김민준: with whitespace runs
    made one space, not removed, one person authored and approved (Korean text audit).
    "Alice Kim" and "AliceKim" are then one person too: a false match only asks for
    another approver."""
    nfd = unicodedata.normalize("NFD", "김민준")
    for a, b in (("Alice (k1)", "alice (k2)"), (" Alice  Kim (k1)", "alice kim (k2)"),
                 ("Alice\u00a0Kim (k1)", "ALICE\tKIM (k2)"), ("\uff21lice (k1)", "alice (k2)"),
                 ("Straße (k1)", "STRASSE (k2)"), ("김철수 (k1)", " 김철수 (k2)"), ("Alice", "alice (k2)"),
                 ("김민준 (k1)", "김 민준 (k2)"), ("김민준 (k1)", f"{nfd[:3]} {nfd[3:]} (k2)"),
                 ("Alice Kim (k1)", "AliceKim (k2)"), ("Mallory (k1)", f"{MALLORY_CYRILLIC[:3]} {MALLORY_CYRILLIC[3:]} (k2)")):
        assert same_person(a, b) and same_person(b, a), (a, b)
    assert not same_person("Alice (k1)", "Alicia (k2)")

INVISIBLE_ALICE = ("ali\u200bce", "ali\u00adce", "\u202eecila", "\u2066alice\u2069", "alice\ufeff", "a\u200dlice",
                   # default-ignorable, not Cf: combining grapheme joiner, variation selectors, a Hangul filler
                   "ali\u034fce", "alice\ufe0f", "ali\u180bce", "alice\u3164", "ali\U000e0100ce",
                   # graphic, yet drawn blank: the Braille blank, the Khitan filler, the null notehead
                   "alice\u2800", "\u2800alice", "ali\U00016fe4ce", "alice\U0001d159")


@pytest.mark.parametrize("lookalike", INVISIBLE_ALICE)
def test_an_invisible_or_reversed_spelling_is_the_same_name(lookalike):
    """A zero-width space, a soft hyphen, a bidirectional control, a byte-order mark, a
    combining grapheme joiner, a variation selector or a Hangul filler inside a name is
    invisible where the name is shown; "ecila" after a right-to-left
    override is shown "alice". Each is Alice (a key issued so before such names were
    refused still cannot approve her change)."""
    assert same_person(f"{lookalike} (k2)", "alice (k1)") and same_person("Alice (k1)", f"{lookalike} (k2)")
    assert not same_person("\u202eecila (k2)", "ecilia (k1)") and not same_person("ali\u200bce (k2)", "alicia (k1)")


@pytest.mark.parametrize("lookalike", ["ali\u200bce", "ali\u00adce", "\u202eecila", "alice\u202c",
                                       "ali\nce", "ali\x00ce", "ali\u2028ce", " ", "\u200b",
                                       "ali\u034fce", "alice\ufe0f", "ali\u180bce", "alice\u3164", "\u3164",
                                       "alice\u2800", "\u2800", "ali\U00016fe4ce", "alice\U0001d159"])
def test_a_key_name_with_invisible_or_control_characters_is_refused(api, lookalike):
    engine = make_engine(api.settings.database_url)
    try:
        before = len(list_keys(engine))
        with pytest.raises(ValueError, match="control, invisible or bidirectional|blank"):
            create_key(engine, name=lookalike, role="policy-approver",
                       pepper=api.settings.key_pepper.get_secret_value())
        assert len(list_keys(engine)) == before
    finally:
        engine.dispose()


def _key_issued_before_the_rule(api, name: str, role: str) -> dict[str, str]:
    """A key under a name create_key now refuses, written as it could be before."""
    from ledger import schema as s
    from ledger.keys import hash_key

    token = f"eum_old{len(name)}{ord(name[-1]):x}_{'x' * 40}"
    engine = make_engine(api.settings.database_url)
    try:
        with engine.begin() as conn:
            conn.execute(s.api_keys.insert().values(
                key_id=f"old{len(name)}{ord(name[-1]):x}", name=name, role=role,
                key_hash=hash_key(token, api.settings.key_pepper.get_secret_value()), created_at_us=1,
                expires_at_us=None, revoked_at_us=None))
    finally:
        engine.dispose()
    return {"Authorization": f"Bearer {token}"}


@pytest.mark.parametrize("lookalike", ["ali\u200bce", "ali\u00adce", "\u202eecila"])
def test_a_key_under_an_invisible_spelling_of_the_authors_name_cannot_approve(api, lookalike):
    author = new_key(api, "alice", "policy-editor")
    doc = {"policy_id": "p-look", "name": "look", "layer": "promo", "components": [
        {"id": "promo-x", "funding": {"city": 10000},
         "variants": [{"id": "v", "bands": [{"up_to_won": 100000, "rate_bp": 100}]}]}]}
    assert api.client.post("/v1/policies", json=doc, headers=author).status_code == 201
    twin = _key_issued_before_the_rule(api, lookalike, "policy-approver")
    assert_problem(api.client.post("/v1/policies/p-look/approve", headers=twin), 403, "self_approval")
    assert api.get("/v1/policies/p-look", role="auditor").json()["status"] == "draft"
    assert api.post("/v1/policies/p-look/approve", role="policy-approver").status_code == 200



MALLORY_CYRILLIC = "\u041c\u0430llory"  # Cyrillic М and а, Latin llory: reads "Mallory"
APPLE_CYRILLIC = "\u0430\u0440\u0440\u04cf\u0435"  # all Cyrillic, the small palochka: reads "apple"


@pytest.mark.parametrize("name,lookalike", [("Mallory", MALLORY_CYRILLIC), ("mallory", MALLORY_CYRILLIC),
                                            ("apple", APPLE_CYRILLIC), ("Alice", "\u0391lice"),  # Greek Alpha
                                            ("PAYPAL", "\u0420\u0410\u0423\u0420\u0410L"),
                                            ("Alice", "\u0430lice\u200b"), ("Bob", "B0b"),
                                            ("\u202eecila", "\u0430lice"),
                                            # the policy audit's: dashes that read as a hyphen
                                            *[("Kim Min-jun", f"Kim Min{dash}jun")
                                              for dash in ("\u2010", "\u2011", "\u2013", "\u2212", "\u02d7",
                                                           "\u2043", "\ufe63", "\uff0d")],
                                            ("O'Brien", "O\u2019Brien"), ("O'Brien", "O\u02bcBrien"),
                                            ("J. Park", "J\u2024 Park"),
                                            # the policy-workflow audit's: capitals, whose "I" reads
                                            # "l" where a small "i" did not, with a look-alike hyphen
                                            ("test policy-editor", "TEST POLICY\u2010EDITOR"),
                                            ("Kim Min-jun", "KIM MIN\u2010JUN"), ("Kim", "\u039a\u0399\u039c"),
                                            ("Kim", "\u041a\u0406\u041c")])
def test_a_name_that_looks_like_another_is_the_same_person(name, lookalike):
    """Names are compared by their look too (UTS #39's skeleton, blind to case): a key
    issued to "Mallory" with a Cyrillic "М" and "а" is Mallory's, and so is an
    all-Cyrillic "аррӏе" Apple's; written as another person's name, it would approve
    their change."""
    assert same_person(f"{name} (k1)", f"{lookalike} (k2)") and same_person(f"{lookalike} (k2)", f"{name} (k1)")


@pytest.mark.parametrize("a,b", [("Alice", "Alicia"), ("Kim Min-jun", "Kim Min-jin"), ("Lee", "Lei"),
                                 ("Ana", "Anna"), ("김민준", "김민지"), ("Kim 민준", "Kim 민지"), ("Ivan", "Иван"),
                                 ("Jung", "Jang"), ("test policy-editor", "test policy-approver"),
                                 ("Γιώργος", "Giorgos"), ("Park", "Parker")])
def test_distinct_names_stay_two_people(a, b):
    assert not same_person(f"{a} (k1)", f"{b} (k2)") and not same_person(f"{b} (k2)", f"{a} (k1)")


@pytest.mark.parametrize("name", [MALLORY_CYRILLIC, "\u0391lice", "Ivan \u0418vanov", "\u0440aypal",
                                  "\u0391\u0430lice", "Mallory-\u0421mith"])
def test_a_key_name_mixing_latin_greek_and_cyrillic_in_a_word_is_refused(api, name):
    engine = make_engine(api.settings.database_url)
    try:
        before = len(list_keys(engine))
        with pytest.raises(ValueError, match="may not mix Latin, Greek and Cyrillic letters in one word"):
            create_key(engine, name=name, role="policy-approver", pepper=api.settings.key_pepper.get_secret_value())
        assert len(list_keys(engine)) == before
    finally:
        engine.dispose()


@pytest.mark.parametrize("name", ["김민준", "Kim 민준", "민준 Kim", "Kim민준", "Иван Петров", "Γιώργος Παπαδόπουλος",
                                  "Ivan Иванов", "O'Brien-Smith", "Mallory 2", "Müller", APPLE_CYRILLIC])
def test_a_key_name_with_each_word_in_one_script_is_allowed(api, name):
    """Korean names in Hangul, Hangul and Latin words side by side, a word in any one
    script: allowed (a whole-script look-alike such as "аррӏе" is caught at approval)."""
    engine = make_engine(api.settings.database_url)
    try:
        key_id, _ = create_key(engine, name=name, role="auditor", pepper=api.settings.key_pepper.get_secret_value())
        assert {k["key_id"]: k["name"] for k in list_keys(engine)}[key_id] == name
    finally:
        engine.dispose()


@pytest.mark.parametrize("author,lookalike", [("Mallory", MALLORY_CYRILLIC), ("apple", APPLE_CYRILLIC),
                                              ("Kim Min-jun", "Kim Min\u2010jun"), ("Kim Min-jun", "Kim Min\u2013jun"),
                                              ("Kim Min-jun", "KIM MIN\u2010JUN"), ("김민준", "김 민준")])
def test_a_key_under_a_lookalike_of_the_authors_name_cannot_approve(api, author, lookalike):
    """The audit's repro: Mallory's editor key posts a draft, and a policy-approver key
    issued (before such names were refused) to "Маllory" with a Cyrillic "М" and "а"
    approved it, where "mallory" and "ＭＡＬＬＯＲＹ" were refused. Refused now, for a
    policy and a grant program alike; a second person still approves. The policy
    audit's: a key issued to "Kim Min‐jun" with U+2010 HYPHEN (or an en dash), which
    `keys create` accepts, approved Kim Min-jun's draft."""
    editor = new_key(api, author, "policy-editor")
    doc = {"policy_id": "p-look", "name": "look", "layer": "promo", "components": [
        {"id": "promo-x", "funding": {"city": 10000},
         "variants": [{"id": "v", "bands": [{"up_to_won": 100000, "rate_bp": 100}]}]}]}
    assert api.client.post("/v1/policies", json=doc, headers=editor).status_code == 201
    program = {"program_id": "g-look", "name": "g", "valid_from": "2025-09-01", "valid_until": "2025-12-31",
               "funding": {"city": 10_000}}
    assert api.client.post("/v1/grant-programs", json=program, headers=editor).status_code == 201
    twin = _key_issued_before_the_rule(api, lookalike, "policy-approver")
    for same_case in (twin, new_key(api, author.upper(), "policy-approver")):
        assert_problem(api.client.post("/v1/policies/p-look/approve", headers=same_case), 403, "self_approval")
        assert_problem(api.client.post("/v1/grant-programs/g-look/approve", headers=same_case), 403, "self_approval")
    assert api.get("/v1/policies/p-look", role="auditor").json()["status"] == "draft"
    assert api.get("/v1/grant-programs/g-look", role="auditor").json()["status"] == "draft"
    other = new_key(api, "Trent", "policy-approver")
    assert api.client.post("/v1/policies/p-look/approve", headers=other).status_code == 200
    assert api.client.post("/v1/grant-programs/g-look/approve", headers=other).status_code == 200


# ---------------------------------------------------------------- grant programs


def test_grant_program_is_a_draft_until_a_second_person_approves(api):
    put_member(api, "m1", district="ganghwa")
    editor = new_key(api, "Park", "policy-editor")
    body = {**COUPON, "valid_from": "2025-07-21", "valid_until": "2025-11-30"}
    r = api.client.post("/v1/grant-programs", json=body, headers=editor)
    assert r.status_code == 201 and r.json()["status"] == "draft", r.text
    program = body["program_id"]
    before = snapshot(api)
    # A draft moves no money: one at a time, in bulk, or by expiry.
    one = {"disbursement_id": "d1", "member_id": "m1", "amount": 100_000, "occurred_at": at("2025-08-01")}
    assert_problem(api.post(f"/v1/grant-programs/{program}/disbursements", one, role="policy-editor"), 409,
                   "grant_program_not_approved")
    bulk = api.client.post(f"/v1/grant-programs/{program}/disbursements/bulk", content=b"disbursement_id,member_id,"
                           b"amount\nd2,m1,1000\n", headers={**api.h("policy-editor"), "content-type": "text/csv"})
    assert_problem(bulk, 409, "grant_program_not_approved")
    assert_problem(api.post(f"/v1/grant-programs/{program}/expire", {"as_of": at("2025-12-01")},
                            role="policy-editor"), 409, "grant_program_not_approved")
    # The creator's name on an approver key is still the creator.
    same_name = new_key(api, "Park", "policy-approver")
    assert_problem(api.client.post(f"/v1/grant-programs/{program}/approve", headers=same_name), 403, "self_approval")
    other_case = new_key(api, " PARK ", "policy-approver")
    assert_problem(api.client.post(f"/v1/grant-programs/{program}/approve", headers=other_case), 403,
                   "self_approval")
    # Neither the editor nor an admin may approve at all.
    assert_problem(api.client.post(f"/v1/grant-programs/{program}/approve", headers=editor), 403, "forbidden")
    assert_problem(api.post(f"/v1/grant-programs/{program}/approve", role="admin"), 403, "forbidden")
    assert snapshot(api) == before
    assert api.get(f"/v1/grant-programs/{program}", role="auditor").json()["status"] == "draft"

    approved = api.post(f"/v1/grant-programs/{program}/approve", role="policy-approver")
    assert approved.status_code == 200 and approved.json()["status"] == "open", approved.text
    assert_problem(api.post(f"/v1/grant-programs/{program}/approve", role="policy-approver-2"), 409,
                   "grant_program_state_conflict")
    r = api.post(f"/v1/grant-programs/{program}/disbursements", one, role="policy-editor")
    assert r.status_code == 201, r.text
    log = api.get("/v1/audit-log", role="auditor", params={"object_id": program}).json()["items"]
    assert [(e["action"], e["actor"].split(" (")[0]) for e in log] == [
        ("grant_program.create", "Park"), ("grant_program.approve", "test policy-approver"),
        ("grant.disburse", "test policy-editor")]
    assert log[1]["detail"]["author"].startswith("Park (")
    assert log[2]["detail"]["amount_won"] == r.json()["amount"]
    assert_book_ok(api)


def test_grant_program_created_by_an_admin_needs_a_policy_approver_of_another_name(api):
    body = {"program_id": "g-admin", "name": "g", "valid_from": "2025-09-01", "valid_until": "2025-12-31",
            "funding": {"city": 10_000}}
    assert api.post("/v1/grant-programs", body, role="admin").status_code == 201
    assert_problem(api.client.post("/v1/grant-programs/g-admin/approve", headers=new_key(api, "test admin",
                                                                                          "policy-approver")),
                   403, "self_approval")
    assert api.post("/v1/grant-programs/g-admin/approve", role="policy-approver").status_code == 200


# ---------------------------------------------------------------- policies and corrections


def _pharmacy_policy() -> dict:
    doc = yaml.safe_load((POLICIES / "2025-09-all-under-30eok.yaml").read_text())
    doc["policy_id"] = "incheon-2025-09-pharmacy-7"
    doc.pop("effective_from")
    doc["components"][0]["variants"].insert(1, {"id": "pharmacy", "when": {"categories_include": ["pharmacy"]},
                                                "bands": [{"up_to_won": 300000, "rate_bp": 700}]})
    return doc


def test_policy_and_correction_authors_never_approve_their_own(api):
    put_member(api, "m1", district="namdong")
    put_merchant(api, "pharm", district="namdong", category="pharmacy")
    topup(api, "t1", "m1", 100_000, at("2025-09-01"))
    r = api.post("/v1/payments", {"payment_id": "p1", "member_id": "m1", "merchant_id": "pharm", "amount": 12_345,
                                  "occurred_at": at("2025-09-02")})
    assert r.json()["status"] == "approved"
    author = new_key(api, "Choi", "policy-editor")
    same_name = new_key(api, "Choi", "policy-approver")
    other_case = new_key(api, "choi", "policy-approver")  # the same name, as another key was issued it
    assert api.client.post("/v1/policies", json=_pharmacy_policy(), headers=author).status_code == 201
    for same_person_key in (same_name, other_case):
        assert_problem(api.client.post("/v1/policies/incheon-2025-09-pharmacy-7/approve", headers=same_person_key),
                       403, "self_approval")
    assert api.get("/v1/policies/incheon-2025-09-pharmacy-7", role="auditor").json()["status"] == "draft"

    correction = {"correction_id": "pharm-fix", "wrong_policy_id": "incheon-2025-09",
                  "right_policy_id": "incheon-2025-09-pharmacy-7",
                  "from": at("2025-09-01", "00:00:00"), "to": at("2025-10-01", "00:00:00")}
    r = api.client.post("/v1/corrections", json=correction, headers=author)
    assert r.status_code == 201 and r.json()["lines"], r.text
    before = snapshot(api)
    for same_person_key in (same_name, other_case):
        assert_problem(api.client.post("/v1/corrections/pharm-fix/approve", headers=same_person_key), 403,
                       "self_approval")
    assert_problem(api.client.post("/v1/corrections/pharm-fix/approve", headers=author), 403, "forbidden")
    assert snapshot(api) == before
    assert api.get("/v1/corrections/pharm-fix", role="auditor").json()["status"] == "proposed"
    r = api.post("/v1/corrections/pharm-fix/approve", role="policy-approver")
    assert r.status_code == 200 and r.json()["status"] == "posted", r.text
    assert snapshot(api) != before
    assert_book_ok(api)


def test_the_author_of_a_draft_right_policy_does_not_approve_the_correction_that_pays_it(api):
    """A correction's right policy may be a draft: its approval is the second person's
    look at the rules it pays. So its approver is neither the correction's author nor,
    while the right policy is a draft, the draft's: Kim drafted 30% at pharmacies (her
    approver key refused for the draft), Lee proposed a correction to it, and Kim's
    approver key posted it, rules no second person had read (the security audit). Once
    another person approves the draft, Kim may approve the correction."""
    put_member(api, "m1", district="namdong")
    put_merchant(api, "pharm", district="namdong", category="pharmacy")
    topup(api, "t1", "m1", 100_000, at("2025-09-01"))
    assert api.post("/v1/payments", {"payment_id": "p1", "member_id": "m1", "merchant_id": "pharm", "amount": 12_345,
                                     "occurred_at": at("2025-09-02")}).json()["status"] == "approved"
    kim, kim_approver = new_key(api, "Kim", "policy-editor"), new_key(api, "Kim", "policy-approver")
    lee = new_key(api, "Lee", "policy-editor")
    assert api.client.post("/v1/policies", json=_pharmacy_policy(), headers=kim).status_code == 201
    correction = {"correction_id": "pharm-fix", "wrong_policy_id": "incheon-2025-09",
                  "right_policy_id": "incheon-2025-09-pharmacy-7",
                  "from": at("2025-09-01", "00:00:00"), "to": at("2025-10-01", "00:00:00")}
    assert api.client.post("/v1/corrections", json=correction, headers=lee).status_code == 201
    before = snapshot(api)
    r = assert_problem(api.client.post("/v1/corrections/pharm-fix/approve", headers=kim_approver), 403,
                       "self_approval")
    assert "right policy" in r["detail"], r
    assert snapshot(api) == before
    assert api.get("/v1/corrections/pharm-fix", role="auditor").json()["status"] == "proposed"
    assert api.post("/v1/policies/incheon-2025-09-pharmacy-7/approve", role="policy-approver").status_code == 200
    r = api.client.post("/v1/corrections/pharm-fix/approve", headers=kim_approver)
    assert r.status_code == 200 and r.json()["status"] == "posted", r.text
    assert_book_ok(api)


def test_a_withdrawn_right_policy_is_no_correction_s_rules(api):
    """A withdrawn policy's rules were set aside: a correction to them is refused when
    proposed, and one proposed before the withdrawal is refused when approved, nothing
    posted (409 `policy_state_conflict`)."""
    put_member(api, "m1", district="namdong")
    put_merchant(api, "pharm", district="namdong", category="pharmacy")
    topup(api, "t1", "m1", 100_000, at("2025-09-01"))
    assert api.post("/v1/payments", {"payment_id": "p1", "member_id": "m1", "merchant_id": "pharm", "amount": 12_345,
                                     "occurred_at": at("2025-09-02")}).json()["status"] == "approved"
    assert api.post("/v1/policies", _pharmacy_policy(), role="policy-editor").status_code == 201
    correction = {"correction_id": "pharm-fix", "wrong_policy_id": "incheon-2025-09",
                  "right_policy_id": "incheon-2025-09-pharmacy-7",
                  "from": at("2025-09-01", "00:00:00"), "to": at("2025-10-01", "00:00:00")}
    assert api.post("/v1/corrections", correction, role="policy-editor").status_code == 201
    withdrawn = api.post("/v1/policies/incheon-2025-09-pharmacy-7/withdraw", {"reason": "set aside"},
                         role="policy-editor")
    assert withdrawn.status_code == 200, withdrawn.text
    before = snapshot(api)
    r = assert_problem(api.post("/v1/corrections/pharm-fix/approve", role="policy-approver"), 409,
                       "policy_state_conflict")
    assert "withdrawn" in r["detail"], r
    assert snapshot(api) == before
    assert_problem(api.post("/v1/corrections", {**correction, "correction_id": "pharm-fix-2"}, role="policy-editor"),
                   409, "policy_state_conflict")
    assert api.get("/v1/corrections/pharm-fix-2", role="auditor").status_code == 404

    # Once a correction to it is approved, its rules have paid: it is not withdrawn.
    assert api.post("/v1/policies", {**_pharmacy_policy(), "policy_id": "pharm-8"}, role="policy-editor").status_code == 201
    assert api.post("/v1/corrections", {**correction, "correction_id": "pharm-fix-8", "right_policy_id": "pharm-8"},
                    role="policy-editor").status_code == 201
    assert api.post("/v1/corrections/pharm-fix-8/approve", role="policy-approver").json()["status"] == "posted"
    r = assert_problem(api.post("/v1/policies/pharm-8/withdraw", {"reason": "too late"}, role="policy-editor"), 409,
                       "policy_state_conflict")
    assert "pharm-fix-8" in r["detail"], r
    assert api.get("/v1/policies/pharm-8", role="auditor").json()["status"] == "draft"
    assert_book_ok(api)


# ---------------------------------------------------------------- settlement reopening


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_settlement_reopen_needs_another_person_not_another_key(api, no_watermark_lag):
    put_member(api, "m1")
    put_merchant(api, "shop", registered_from="2026-01-01")
    topup(api, "t1", "m1", 100_000, "2026-11-03T08:00:00+09:00")
    requester = new_key(api, "Jung", "finance")
    settled = api.client.post("/v1/settlements", json={"business_date": "2026-11-03"}, headers=requester)
    assert settled.status_code == 201, settled.text
    sid = settled.json()["settlement_id"]
    asked = api.client.post(f"/v1/settlements/{sid}/reopen-requests", json={"reason": "fee tier"}, headers=requester)
    assert asked.status_code == 201, asked.text
    request_id = asked.json()["request_id"]
    # the same key; another key, same name; the name in another case and spacing
    for same_person_key in (requester, new_key(api, "Jung", "finance"), new_key(api, " JUNG", "finance")):
        r = api.client.post(f"/v1/settlement-reopen-requests/{request_id}/approve", headers=same_person_key)
        assert_problem(r, 403, "second_person_required")
    assert api.get(f"/v1/settlements/{sid}", role="finance").json()["status"] == "settled"
    r = api.post(f"/v1/settlement-reopen-requests/{request_id}/approve", role="finance")
    assert r.status_code == 200 and r.json()["status"] == "reopened", r.text


def test_one_rule_of_one_person_for_every_maker_checker():
    """Policies, grant programs and corrections judge 'the same person' as settlement
    reopening does (ledger.keys.same_person): the same key, or the same name on any key,
    including an author recorded by name alone (an in-process loader)."""
    from ledger.keys import Principal, same_person
    from ledger.policies import _same_person

    kim = Principal(key_id="k2", name="Kim", role="policy-approver")
    for author, expected in (("Kim (k1)", True), ("Lee (k2)", True), ("Kim", True), ("Lee (k1)", False),
                             ("Lee", False)):
        assert _same_person(author, kim) is expected is same_person(author, kim.actor), author


def test_the_audit_log_says_what_a_registry_change_was_and_filters_by_actor_action_and_time(api):
    """An auditor reads a merchant's change with what it was before, and narrows the log
    by actor, action (exact or prefix) and time; unknown matches give nothing."""
    import datetime as dt

    body = {"name": "shop-b", "district": "seo", "category": "grocery", "annual_sales": 800_000_000,
            "registered_from": "2019-01-01"}
    assert api.put("/v1/merchants/shop-b", body).status_code == 201
    assert api.put("/v1/merchants/shop-b", {**body, "annual_sales": 3_100_000_000, "flags": ["good_price"]}
                   ).status_code == 200
    log = api.get("/v1/audit-log", role="auditor", params={"object_id": "shop-b"}).json()["items"]
    assert "before" not in log[0]["detail"]
    assert log[1]["detail"]["annual_sales_won"] == 3_100_000_000
    assert log[1]["detail"]["before"] == {"annual_sales_won": 800_000_000, "flags": ""}
    put_member(api, "m9")
    by = lambda **params: api.get("/v1/audit-log", role="auditor", params=params).json()["items"]  # noqa: E731
    assert {e["action"] for e in by(action="merchant.put")} == {"merchant.put"}
    assert {e["action"] for e in by(action="member.")} == {"member.put"}
    assert by(actor="nobody-at-all") == []
    assert all("test admin" in e["actor"] for e in by(actor="test admin"))
    assert by(since="2099-01-01T00:00:00+09:00") == []
    now = dt.datetime.now(dt.timezone.utc).isoformat()
    assert len(by(until=now)) == len(by()) and by(since=now) == []


def test_keys_bulk_grants_and_expiry_are_in_the_audit_log(api):
    """Who issued and revoked which key, who uploaded a bulk disbursement (its rows, amount
    and the file's digest) and who expired a program (what went back to whom)."""
    import hashlib

    from ledger.keys import create_key, revoke_key

    engine = make_engine(api.settings.database_url)
    key_id, _ = create_key(engine, name="Kim", role="policy-approver", pepper=api.settings.key_pepper.get_secret_value(),
                           actor="ops lead (cli)")
    assert revoke_key(engine, key_id, actor="ops lead (cli)")
    engine.dispose()
    keys = api.get("/v1/audit-log", role="auditor", params={"object_id": key_id}).json()["items"]
    assert [(e["action"], e["actor"]) for e in keys] == [("key.create", "ops lead (cli)"), ("key.revoke", "ops lead (cli)")]
    assert keys[0]["detail"]["name"] == "Kim" and keys[0]["detail"]["role"] == "policy-approver"

    put_member(api, "m1")
    program = {**COUPON, "program_id": "audited", "valid_from": "2025-07-21", "valid_until": "2025-11-30"}
    assert api.post("/v1/grant-programs", program, role="policy-editor").status_code == 201
    assert api.post("/v1/grant-programs/audited/approve", role="policy-approver").status_code == 200
    csv_text = b"disbursement_id,member_id,income_status\nb1,m1,general\nb2,nobody,general\n"
    r = api.client.post("/v1/grant-programs/audited/disbursements/bulk?occurred_at=2025-08-01T09:00:00%2B09:00",
                        content=csv_text, headers={**api.h("policy-editor"), "Content-Type": "text/csv"})
    assert r.status_code == 200 and r.json()["disbursed"] == 1, r.text
    r = api.post("/v1/grant-programs/audited/expire", {"as_of": at("2025-12-01", "00:00:00")}, role="admin")
    assert r.status_code == 200 and r.json()["returned"] == 150_000, r.text
    log = api.get("/v1/audit-log", role="auditor", params={"object_id": "audited", "action": "grant_program."}
                  ).json()["items"]
    bulk = next(e for e in log if e["action"] == "grant_program.disburse_bulk")
    assert bulk["actor"].startswith("test policy-editor") and bulk["detail"]["disbursed"] == 1
    assert bulk["detail"]["errors"] == 1 and bulk["detail"]["amount_won"] == 150_000
    assert bulk["detail"]["file_sha256"] == hashlib.sha256(csv_text).hexdigest()
    expiry = next(e for e in log if e["action"] == "grant_program.expire")
    assert expiry["actor"].startswith("test admin") and expiry["detail"]["returned"] == 150_000


# ---------------------------------------------------------------- the tables behind the API


def test_a_grant_program_or_correction_moved_by_an_update_shows_and_does_not_post(api):
    """A draft program opened by an UPDATE paid out, a program inserted with no audit
    entry passed, and a correction marked approved by an UPDATE was posted by the next
    approval call as "the rest" (30% at pharmacies nobody approved), `eum db check`
    green throughout (the security audit). The book check now wants a program's approval
    (and a close for an expired one) and a correction's approval, posting and lines as
    its proposal recorded them; approving refuses a correction whose lines or approval
    are not as the audit log says, nothing posted."""
    from sqlalchemy import text

    from tests.test_grants import COUPON

    put_member(api, "m1", district="namdong")
    put_merchant(api, "pharm", district="namdong", category="pharmacy")
    topup(api, "t1", "m1", 100_000, at("2025-09-01"))
    assert api.post("/v1/payments", {"payment_id": "p1", "member_id": "m1", "merchant_id": "pharm", "amount": 12_345,
                                     "occurred_at": at("2025-09-02")}).json()["status"] == "approved"
    coupon = {**COUPON, "valid_from": "2025-07-21", "valid_until": "2025-11-30"}
    assert api.post("/v1/grant-programs", coupon, role="policy-editor").json()["status"] == "draft"
    assert api.post("/v1/policies", _pharmacy_policy(), role="policy-editor").status_code == 201
    correction = {"correction_id": "fix", "wrong_policy_id": "incheon-2025-09",
                  "right_policy_id": "incheon-2025-09-pharmacy-7",
                  "from": at("2025-09-01", "00:00:00"), "to": at("2025-10-01", "00:00:00")}
    assert api.post("/v1/corrections", correction, role="policy-editor").status_code == 201
    assert api.post("/v1/corrections", {**correction, "correction_id": "fix-2"}, role="policy-editor").status_code == 201
    assert_book_ok(api)

    engine = make_engine(api.settings.database_url)
    try:
        with engine.begin() as conn:
            conn.execute(text("UPDATE grant_programs SET status = 'open' WHERE program_id = :p"),
                         {"p": coupon["program_id"]})
            conn.execute(text("INSERT INTO grant_programs (program_id, name, document, valid_from_us, valid_until_us, "
                              "status, created_by, created_at_us) SELECT 'ghost', name, document, valid_from_us, "
                              "valid_until_us, 'open', created_by, created_at_us FROM grant_programs "
                              "WHERE program_id = :p"), {"p": coupon["program_id"]})
            conn.execute(text("UPDATE corrections SET status = 'approved', approver = 'nobody (0)' "
                              "WHERE correction_id = 'fix'"))
            conn.execute(text("UPDATE correction_lines SET by_funder = replace(by_funder, '-', '') "
                              "WHERE correction_id = 'fix-2'"))
    finally:
        engine.dispose()
    with pytest.raises(AssertionError) as caught:
        assert_book_ok(api)
    for says in (f"grant program {coupon['program_id']}: open without an approval", "grant program ghost: no create",
                 "correction fix: approval", "correction fix-2: lines"):
        assert says in str(caught.value), (says, caught.value)
    before = snapshot(api)
    for correction_id, says in (("fix", "no such approval"), ("fix-2", "not as proposed")):
        r = assert_problem(api.post(f"/v1/corrections/{correction_id}/approve", role="policy-approver"), 409,
                           "correction_state_conflict")
        assert says in r["detail"], r
    assert snapshot(api) == before


def _expired_as_releases_before_the_close_entry(api, program_id: str, member_ids: list[str], as_of: str) -> None:
    """A program expired as releases before 7083544 expired it (`grant_jobs.expire_program`
    then): each lot returned by the book's `ExpireLot`, then in one transaction the status
    set to expired and one `grant_program.expire` entry with the run's totals; no
    `grant_program.close` (those releases had none) nor `expire_lots` entries."""
    import time

    from ledger import audit
    from ledger import schema as s
    from ledger.commands import ExpireLot
    from rules.timeutil import to_us

    as_of_us = to_us(dt.datetime.fromisoformat(as_of))
    outcomes = api.services.book.execute([ExpireLot(program_id, member_id, as_of_us) for member_id in member_ids])
    assert all(o.error is None for o in outcomes), outcomes
    returned = [o.body for o in outcomes if o.body["returned"]]
    by_funder: dict[str, int] = {}
    for body in returned:
        for source, amount in body["returned_by_funder"].items():
            by_funder[source] = by_funder.get(source, 0) + amount
    with api.services.engine.begin() as conn:
        conn.execute(s.grant_programs.update().where(s.grant_programs.c.program_id == program_id)
                     .values(status="expired"))
        audit.append(conn, at_us=time.time_ns() // 1000, actor="test admin (earlier release)",
                     action="grant_program.expire", object_type="grant_program", object_id=program_id,
                     detail={"program_id": program_id, "lots_expired": len(returned),
                             "returned": sum(body["returned"] for body in returned), "returned_by_funder": by_funder,
                             "as_of": as_of})


def test_a_program_an_earlier_release_expired_is_as_audited_and_tampering_still_shows(api):
    """Releases before the close entry (7083544) expired a program with a
    `grant_program.expire` entry alone; the check that wants a close (7139d13) made every
    such book BAD after the upgrade, for good (the log is append-only), reading as
    tampering (upgrade audit). Such an entry stands for the close when the program has no
    close or reopen entry at all, it was written before the book's first close (every
    expiry since writes one first) and names its program. A status set by an UPDATE, a
    program reopened by one after such an expiry, such an entry written after the book's
    first close or naming another program still show."""
    import time

    from sqlalchemy import text

    put_member(api, "m1", district="seo")
    ended = {**COUPON, "valid_from": "2025-07-21", "valid_until": "2025-11-30"}
    for program_id in ("old-a", "old-b", "old-c", "now-d", "late-e", "mixed-f"):
        assert api.post("/v1/grant-programs", {**ended, "program_id": program_id},
                        role="policy-editor").status_code == 201
        approve_program(api, program_id)
    r = api.post("/v1/grant-programs/old-a/disbursements", {
        "disbursement_id": "d1", "member_id": "m1", "occurred_at": at("2025-08-01"),
        "attributes": {"income_status": "general", "district": "seo"}}, role="admin")
    assert r.status_code == 201 and r.json()["amount"] == 150_000, r.text
    _expired_as_releases_before_the_close_entry(api, "old-a", ["m1"], at("2025-12-01", "00:00:00"))
    _expired_as_releases_before_the_close_entry(api, "old-b", [], at("2025-12-01", "00:00:00"))
    assert api.get("/v1/members/m1/balance").json()["balances"]["grants"] == []  # the lot went back
    assert_book_ok(api)  # was BAD: "grant program old-a: expired without a close"

    # What the legacy entry must not let through.
    from ledger import audit

    engine = make_engine(api.settings.database_url)
    try:
        with engine.begin() as conn:
            conn.execute(text("UPDATE grant_programs SET status = 'open' WHERE program_id = 'old-b'"))
            conn.execute(text("UPDATE grant_programs SET status = 'expired' "
                              "WHERE program_id IN ('old-c', 'mixed-f')"))
            # the old shape, before any close, naming another program than its own
            audit.append(conn, at_us=time.time_ns() // 1000, actor="x", action="grant_program.expire",
                         object_type="grant_program", object_id="mixed-f",
                         detail={"program_id": "old-a", "lots_expired": 0, "returned": 0, "returned_by_funder": {},
                                 "as_of": at("2025-12-01", "00:00:00")})
    finally:
        engine.dispose()
    r = api.post("/v1/grant-programs/now-d/expire", {"as_of": at("2025-12-01", "00:00:00")}, role="admin")
    assert r.status_code == 200, r.text  # this release: a close, then the expire entry
    _expired_as_releases_before_the_close_entry(api, "late-e", [], at("2025-12-01", "00:00:00"))  # after a close
    with pytest.raises(AssertionError) as caught:
        assert_book_ok(api)
    says = str(caught.value)
    for program_id, what in (("old-b", "closed, yet open"), ("old-c", "expired without a close"),
                             ("late-e", "expired without a close"), ("mixed-f", "expired without a close")):
        assert f"grant program {program_id}: {what}" in says, (program_id, says)
    assert "old-a" not in says and "now-d" not in says, says


def test_a_change_made_with_a_key_revoked_since_is_not_approved(api):
    """Kim drafts a policy and a grant program; Kim's key is then revoked (leaked, or
    Kim left). The drafts are not approved (409 author_key_revoked, nothing changes):
    the approver cannot tell a stolen key's draft from its holder's (the keys audit of
    2026-12-06i: both were approved and the program could pay out). Made again under a
    live key, they are. The revocation's audit entry names whose key and which role."""
    key_id, kim = new_key_and_id(api, "Kim", "policy-editor")
    doc = {"policy_id": "p-kim", "name": "kim's", "layer": "promo", "components": [
        {"id": "promo-x", "funding": {"city": 10000},
         "variants": [{"id": "v", "bands": [{"up_to_won": 100000, "rate_bp": 100}]}]}]}
    assert api.client.post("/v1/policies", json=doc, headers=kim).status_code == 201
    program = {**COUPON, "program_id": "kims", "valid_from": "2025-07-21", "valid_until": "2025-11-30"}
    assert api.client.post("/v1/grant-programs", json=program, headers=kim).status_code == 201
    revoke(api, key_id)
    before = snapshot(api)
    assert_problem(api.post("/v1/policies/p-kim/approve", role="policy-approver"), 409, "author_key_revoked")
    assert_problem(api.post("/v1/grant-programs/kims/approve", role="policy-approver"), 409, "author_key_revoked")
    assert snapshot(api) == before
    assert api.get("/v1/policies/p-kim", role="auditor").json()["status"] == "draft"
    assert api.get("/v1/grant-programs/kims", role="auditor").json()["status"] == "draft"
    [entry] = api.get("/v1/audit-log", role="auditor", params={"action": "key.revoke", "object_id": key_id}
                      ).json()["items"]
    assert entry["detail"] == {"name": "Kim", "role": "policy-editor"}
    doc["policy_id"] = "p-kim-again"
    assert api.post("/v1/policies", doc, role="policy-editor").status_code == 201
    assert api.post("/v1/policies/p-kim-again/approve", role="policy-approver").status_code == 200


def test_a_draft_made_with_a_key_revoked_since_is_no_corrections_right_policy(api):
    """A draft right policy is paid on a correction's approval alone, so a revoked key's
    draft, refused approval itself, must not be paid that way (the review of 2026-12-06i:
    Kim's 20% draft, Kim's key revoked, was posted as a correction's right policy)."""
    from tests.test_corrections_budget_short import _city

    put_merchant(api, "shop", district="namdong")
    put_member(api, "m1", district="namdong")
    topup(api, "t1", "m1", 200_000, at("2026-11-01"))
    assert api.post("/v1/payments", {"payment_id": "p1", "member_id": "m1", "merchant_id": "shop",
                                     "amount": 100_000, "occurred_at": at("2026-11-02")}).status_code == 201
    key_id, kim = new_key_and_id(api, "Kim", "policy-editor")
    assert api.client.post("/v1/policies", json=_city("city-20", 2_000), headers=kim).status_code == 201
    proposal = {"correction_id": "c1", "wrong_policy_id": "incheon-2025-10", "right_policy_id": "city-20",
                "from": at("2026-11-01", "00:00:00"), "to": at("2026-12-01", "00:00:00")}
    assert api.post("/v1/corrections", proposal, role="policy-editor").status_code == 201
    revoke(api, key_id)
    before = snapshot(api)
    assert_problem(api.post("/v1/corrections/c1/approve", role="policy-approver"), 409, "author_key_revoked")
    assert_problem(api.post("/v1/corrections", {**proposal, "correction_id": "c2"}, role="policy-editor"), 409,
                   "author_key_revoked")
    assert snapshot(api) == before
