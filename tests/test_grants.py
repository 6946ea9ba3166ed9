"""A relief program from disbursement to expiry, with the money accounted for to the won."""

import pytest
import yaml

from ledger.queries import check_book
from tests.book_helpers import approve_program, assert_book_ok
from tests.conftest import POLICIES, at

COUPON = yaml.safe_load((POLICIES / "grants" / "2025-07-livelihood-coupon-round1.yaml").read_text())


def _setup(api):
    for member, district in (("m1", "seo"), ("m2", "ganghwa"), ("m3", "namdong")):
        assert api.put(f"/v1/members/{member}", {"district": district}).status_code == 201
    for merchant, sales in (("small", 200_000_000), ("big", 5_000_000_000)):
        api.put(f"/v1/merchants/{merchant}", {"name": merchant, "district": "seo", "category": "grocery",
                                              "annual_sales": sales, "registered_from": "2019-01-01"})
    # The file's dates as RFC 3339 so JSON carries them.
    body = {**COUPON, "valid_from": "2025-07-21", "valid_until": "2025-11-30"}
    r = api.post("/v1/grant-programs", body, role="policy-editor")
    assert r.status_code == 201 and r.json()["status"] == "draft", r.text
    approve_program(api, body["program_id"])
    assert api.post("/v1/grant-programs", body, role="policy-editor").status_code == 200  # replay


def test_bulk_disbursement_reports_bad_rows_and_is_idempotent(api):
    _setup(api)
    csv_text = ("disbursement_id,member_id,income_status,district\n"
                "d1,m1,basic_livelihood,seo\n"        # 400,000
                "d2,m2,general,ganghwa\n"             # 150,000 + 50,000
                "d3,nobody,general,seo\n"             # unknown member: reported, the rest go on
                "d4,m3,차상위,namdong\n"               # near-poor by its Korean label: 300,000
                ",m3,general,namdong\n")              # no id: reported
    data = csv_text.encode("cp949")  # as Korean Excel saves it
    path = "/v1/grant-programs/coupon-2025-r1/disbursements/bulk?occurred_at=2025-08-01T09:00:00%2B09:00"
    headers = {**api.h("policy-editor"), "Content-Type": "text/csv"}
    report = api.client.post(path, content=data, headers=headers).json()
    assert report["rows"] == 5 and report["disbursed"] == 3 and report["amount"] == 900_000, report["errors"]
    assert sorted(e["line"] for e in report["errors"]) == [4, 6]
    assert "member_not_found" in next(e["error"] for e in report["errors"] if e["line"] == 4)
    again = api.client.post(path, content=b"\xef\xbb\xbf" + csv_text.encode(), headers=headers).json()
    assert again["disbursed"] == 0 and again["replayed"] == 3
    balance = api.get("/v1/members/m2/balance").json()["balances"]
    assert balance["grants"] == [{"program_id": "coupon-2025-r1", "amount": 200_000,
                                  "expires_at": "2025-12-01T00:00:00+09:00"}]


def test_an_income_status_the_coupon_does_not_name_is_refused_and_nothing_is_paid(api):
    """The coupon pays 15/30/40만 by income status: a status its rules do not name, or
    none, is refused (it was paid the general 15만, and once per member then refused the
    difference). The document names the Korean labels a CP949 file carries (차상위 is
    near-poor, 30만; 일반 general; 기초생활수급 basic livelihood)."""
    from tests.book_helpers import snapshot

    _setup(api)
    for member in ("m4", "m5", "m6", "m7"):
        assert api.put(f"/v1/members/{member}", {"district": "seo"}).status_code == 201
    single = "/v1/grant-programs/coupon-2025-r1/disbursements"
    before = snapshot(api)
    for n, attributes in enumerate([{"income_status": "차상위계층"}, {"income_status": "GENERAL"}, {},
                                    {"district": "seo"}]):
        r = api.post(single, {"disbursement_id": f"u{n}", "member_id": "m1", "occurred_at": at("2025-08-01"),
                              "attributes": attributes}, role="policy-editor")
        assert r.status_code == 422 and r.json()["code"] == "amount_not_computable", (attributes, r.text)
        assert "near_poor, single_parent, 차상위, 한부모, general, 일반" in r.json()["detail"], r.text
    assert snapshot(api) == before
    csv_text = ("disbursement_id,member_id,income_status\n"
                "k1,m1,차상위\n"             # 300,000
                "k2,m2,일반\n"               # 150,000 + 50,000 (Ganghwa, by the registry)
                "k3,m3,기초생활수급\n"       # 400,000
                "k4,m4,차상위계층\n"         # no rule names it: refused
                "k5,m5,\n"                   # none: refused
                "k6,m6,vip\n"                # refused
                "k7,m7,single_parent\n")     # 300,000
    path = "/v1/grant-programs/coupon-2025-r1/disbursements/bulk?occurred_at=2025-08-01T09:00:00%2B09:00"
    headers = {**api.h("policy-editor"), "Content-Type": "text/csv"}
    report = api.client.post(path, content=csv_text.encode("cp949"), headers=headers).json()
    assert report["disbursed"] == 4 and report["amount"] == 1_200_000, report
    errors = {e["line"]: e["error"] for e in report["errors"]}
    assert sorted(errors) == [5, 6, 7], errors
    assert "income_status '차상위계층' is not one the rules name" in errors[5]
    assert "no income_status was sent" in errors[6] and "'vip'" in errors[7], errors
    paid = {m: api.get(f"/v1/members/{m}/balance").json()["balances"]["grants"] for m in ("m1", "m2", "m3", "m4")}
    assert [g[0]["amount"] if g else 0 for g in paid.values()] == [300_000, 200_000, 400_000, 0]
    # a refused row recorded nothing: the member is paid once the status is known
    fixed = api.client.post(path, content="disbursement_id,member_id,income_status\nk8,m4,차상위\n".encode("cp949"),
                            headers=headers).json()
    assert fixed["disbursed"] == 1 and fixed["amount"] == 300_000, fixed
    assert_book_ok(api)


# A program that pays more by household size and a fallback to anyone else: an attribute
# name its rules do not read (a typo) was paid the fallback.
HOUSEHOLDS = {"program_id": "households", "name": "by household size", "valid_from": "2025-07-01",
              "valid_until": "2025-11-30", "funding": {"city": 10000},
              "amount_rules": {"base": [{"id": "large", "when": {"household_size_min": 4}, "amount_won": 1_000_000},
                                        {"id": "anyone", "amount_won": 400_000}]}}


def test_an_attribute_the_amount_rules_do_not_read_is_refused_and_nothing_is_paid(api):
    """`houshold_size` (a typo) was accepted and ignored, so a household of 5 was paid the
    fallback 40만, not 100만, and once per member then refused the right one; the coupon's
    `income_stauts` beside `income_status`, and a column literally named `attributes`, were
    dropped alike. An attribute the rules do not read is now 422 `validation_error` alone,
    and such a column refuses the whole file (`bad_csv`), naming it and what the rules
    read; nothing is paid. A district may be sent whichever program (the registry's)."""
    from tests.book_helpers import snapshot

    _setup(api)
    assert api.post("/v1/grant-programs", HOUSEHOLDS, role="policy-editor").status_code == 201
    approve_program(api, "households")
    before = snapshot(api)
    single = "/v1/grant-programs/households/disbursements"
    r = api.post(single, {"disbursement_id": "h1", "member_id": "m1", "occurred_at": at("2025-08-01"),
                          "attributes": {"houshold_size": "5"}}, role="policy-editor")
    assert r.status_code == 422 and r.json()["code"] == "validation_error", r.text
    assert "'houshold_size'" in r.json()["detail"] and "household_size" in r.json()["detail"], r.text
    r = api.post("/v1/grant-programs/coupon-2025-r1/disbursements",
                 {"disbursement_id": "c1", "member_id": "m1", "occurred_at": at("2025-08-01"),
                  "attributes": {"income_status": "general", "income_stauts": "basic_livelihood"}},
                 role="policy-editor")
    assert r.status_code == 422 and r.json()["code"] == "validation_error", r.text
    assert "'income_stauts'" in r.json()["detail"] and "income_status" in r.json()["detail"], r.text
    headers = {**api.h("policy-editor"), "Content-Type": "text/csv"}
    for program, text, column in (
            ("households", "disbursement_id,member_id,houshold_size\nh2,m2,5\n", "'houshold_size'"),
            ("households", "disbursement_id,member_id,household_size,size\nh2,m2,5,5\n", "'size'"),
            ("coupon-2025-r1", "disbursement_id,member_id,income_status,attributes\nc2,m2,general,x\n",
             "'attributes'"),
            ("coupon-2025-r1", "disbursement_id,member_id,income_status,income_stauts\nc2,m2,general,\n",
             "'income_stauts'")):
        r = api.client.post(f"/v1/grant-programs/{program}/disbursements/bulk?occurred_at=2025-08-01T09:00:00%2B09:00",
                            content=text.encode(), headers=headers)
        assert r.status_code == 422 and r.json()["code"] == "bad_csv", (text, r.text)
        assert column in r.json()["detail"] and "district" in r.json()["detail"], r.text
    assert snapshot(api) == before
    # Sent as the rules read it, each member is paid what they are owed; a district column
    # is taken whichever program, and a bad household size is its row's error.
    r = api.post(single, {"disbursement_id": "h1-fixed", "member_id": "m1", "occurred_at": at("2025-08-01"),
                          "attributes": {"household_size": 5}}, role="policy-editor")
    assert r.status_code == 201 and r.json()["amount"] == 1_000_000, r.text
    report = api.client.post("/v1/grant-programs/households/disbursements/bulk?occurred_at=2025-08-01T09:00:00%2B09:00",
                             content=b"disbursement_id,member_id,household_size,district\nh2,m2,2,ganghwa\n"
                                     b"h3,m3,four,namdong\n", headers=headers).json()
    assert report["disbursed"] == 1 and report["amount"] == 400_000, report
    assert [e["line"] for e in report["errors"]] == [3] and "household_size must be a whole number" in \
        report["errors"][0]["error"], report
    assert_book_ok(api)


def test_a_household_size_no_rule_pays_is_named_in_the_refusal(api):
    """Rules by household size with no fallback: a size none names, or none sent (a
    file's blank cell), was refused "no amount rule matches this recipient", not saying
    that the household size was the reason nor which sizes the rules pay. The refusal
    names it, as it names an income status the rules do not know; nothing is paid."""
    from tests.book_helpers import snapshot

    _setup(api)
    program = {**HOUSEHOLDS, "program_id": "sizes",
               "amount_rules": {"base": [{"id": "large", "when": {"household_size_min": 4}, "amount_won": 1_000_000},
                                         {"id": "small", "when": {"household_size": [2, 1]}, "amount_won": 400_000}]}}
    assert api.post("/v1/grant-programs", program, role="policy-editor").status_code == 201
    approve_program(api, "sizes")
    before = snapshot(api)
    single = "/v1/grant-programs/sizes/disbursements"
    for n, (attributes, why) in enumerate((
            ({"household_size": 3}, "household_size 3 is not one the rules name (1, 2, 4 or more)"),
            ({}, "no household_size was sent, which the rules read (1, 2, 4 or more)"))):
        r = api.post(single, {"disbursement_id": f"s{n}", "member_id": "m1", "occurred_at": at("2025-08-01"),
                              "attributes": attributes}, role="policy-editor")
        assert r.status_code == 422 and r.json()["code"] == "amount_not_computable", r.text
        assert r.json()["detail"] == f"no amount rule matches this recipient: {why}", r.text
    assert snapshot(api) == before
    report = api.client.post("/v1/grant-programs/sizes/disbursements/bulk?occurred_at=2025-08-01T09:00:00%2B09:00",
                             content=b"disbursement_id,member_id,household_size\nb1,m1,3\nb2,m2,\nb3,m3,5\n",
                             headers={**api.h("policy-editor"), "Content-Type": "text/csv"}).json()
    assert report["disbursed"] == 1 and report["amount"] == 1_000_000, report
    assert {e["line"]: e["error"] for e in report["errors"]} == {
        2: "no amount rule matches this recipient: household_size 3 is not one the rules name (1, 2, 4 or more)",
        3: "no amount rule matches this recipient: no household_size was sent, which the rules read (1, 2, 4 or "
           "more)"}, report
    assert_book_ok(api)


def test_grant_spent_first_then_expires_back_to_funders(api):
    _setup(api)
    r = api.post("/v1/grant-programs/coupon-2025-r1/disbursements",
                 {"disbursement_id": "d1", "member_id": "m1", "attributes": {"income_status": "general"},
                  "occurred_at": at("2025-08-01")}, role="policy-editor")
    assert r.status_code == 201 and r.json()["amount"] == 150_000
    api.post("/v1/topups", {"topup_id": "t1", "member_id": "m1", "amount": 100_000, "occurred_at": at("2025-08-01")})
    # Grant money first, and it earns no cashback; the charged part does (2025-07 rule in force).
    pay = api.post("/v1/payments", {"payment_id": "p1", "member_id": "m1", "merchant_id": "small", "amount": 160_000,
                                    "occurred_at": at("2025-09-10")}).json()
    assert pay["spent"] == {"grants": 150_000, "points": 0, "charged": 10_000}
    assert pay["cashback"]["base"] == 10_000
    # Above 30억 the coupon is not usable: charged money only.
    pay2 = api.post("/v1/payments", {"payment_id": "p2", "member_id": "m1", "merchant_id": "big", "amount": 5_000,
                                     "occurred_at": at("2025-09-10")}).json()
    assert pay2["spent"]["grants"] == 0
    # Refund 40,000 of p1: charged first (10,000), then points (none), then 30,000 back to the grant lot.
    ref = api.post("/v1/payments/p1/refunds", {"refund_id": "r1", "amount": 40_000, "occurred_at": at("2025-09-11")}).json()
    assert ref["restored"]["grants"] == 30_000
    # Program by program: which lot it went back to (the refunds audit: sums only before).
    assert ref["grants"] == [{"program_id": "coupon-2025-r1", "amount": 30_000, "to": "member", "withheld": 0}]
    assert api.post("/v1/payments/p2/refunds", {"refund_id": "r0", "amount": 5_000,
                                                "occurred_at": at("2025-09-11")}).json()["grants"] == []
    # Ended, not yet expired: the lot is the member's in the book until the expiry run
    # moves it, so the balance lists it, its expires_at past; a payment spends none of it.
    after_end = api.post("/v1/payments", {"payment_id": "p3", "member_id": "m1", "merchant_id": "small",
                                          "amount": 1_000, "occurred_at": at("2025-12-01")}).json()
    assert after_end["status"] == "approved" and after_end["spent"]["grants"] == 0, after_end
    lots = api.get("/v1/members/m1/balance").json()["balances"]["grants"]
    assert lots == [{"program_id": "coupon-2025-r1", "amount": 30_000, "expires_at": "2025-12-01T00:00:00+09:00"}]
    r = api.post("/v1/grant-programs/coupon-2025-r1/expire", {"as_of": at("2025-12-01", "00:00:00")},
                 role="policy-editor")
    assert r.status_code == 200, r.text
    # Expire at the end: the 30,000 left go to the national treasury (the coupon's terms).
    assert r.json()["returned"] == 30_000 and r.json()["returned_by_funder"] == {"national": 30_000}
    # A refund after expiry returns grant money to the funders, not to the member.
    late = api.post("/v1/payments/p1/refunds", {"refund_id": "r2", "amount": 120_000,
                                                 "occurred_at": at("2025-12-02")}).json()
    assert late["restored"]["grants"] == 0 and late["returned_to_funders"] == 120_000
    assert late["grants"] == [{"program_id": "coupon-2025-r1", "amount": 120_000, "to": "funders", "withheld": 0}]
    # The payment's refunds, as each was answered.
    listed = api.get("/v1/payments/p1", role="auditor").json()["refunds"]
    assert [refund["grants"] for refund in listed] == [ref["grants"], late["grants"]], listed
    money = api.get("/v1/grant-programs/coupon-2025-r1", role="auditor").json()["money"]
    assert money["disbursed"] == 150_000
    assert money["disbursed"] == money["held_by_members"] + money["spent_net_of_refunds"] + money["returned_to_funders"]
    # All of it is back with the funders: 30,000 by the expiry, 120,000 by the late refund.
    assert (money["held_by_members"], money["spent_net_of_refunds"], money["returned_to_funders"]) == (0, 0, 150_000)
    # Every won of the funders' 150,000 is either at merchants (0 net now) or back with
    # them: all with national, which put in 120,000, the city's 30,000 included.
    assert money["funders_net"] == {"national": -30_000, "city": 30_000}
    # Expiring again returns nothing more.
    assert api.post("/v1/grant-programs/coupon-2025-r1/expire", {"as_of": at("2025-12-03")},
                    role="policy-editor").json()["returned"] == 0
    with api.services.reader.connect() as conn:
        assert all(c.ok for c in check_book(conn)), check_book(conn)


def test_expiry_before_the_end_is_refused(api):
    _setup(api)
    api.post("/v1/grant-programs/coupon-2025-r1/disbursements",
             {"disbursement_id": "d1", "member_id": "m1", "amount": 1_000, "occurred_at": at("2025-08-01")},
             role="policy-editor")
    r = api.post("/v1/grant-programs/coupon-2025-r1/expire", {"as_of": at("2025-11-30")}, role="policy-editor")
    assert r.status_code == 409 and r.json()["code"] == "grant_program_not_expired"


def test_a_disbursement_never_gives_more_than_the_approved_rules_and_bad_attributes_are_422(api):
    """The amount rules are what a second person approved: an amount sent may be less
    (worked out elsewhere) but not more, for the recipient's attributes or, without
    them, for anyone; attributes of the wrong type are a 422, not a 500."""
    from tests.book_helpers import snapshot

    _setup(api)
    before = snapshot(api)

    def disburse(n: int, **body):  # each given to its own Ganghwa member: the coupon gives a member once
        member_id = "m2" if n < 10 else f"g{n}"
        return api.post("/v1/grant-programs/coupon-2025-r1/disbursements",
                        {"disbursement_id": f"dx{n}", "member_id": member_id, "occurred_at": at("2025-08-01"),
                         **body}, role="policy-editor")

    for n in (10, 11, 12, 13):
        assert api.put(f"/v1/members/g{n}", {"district": "ganghwa"}).status_code == 201
    before = snapshot(api)

    # The coupon gives at most 40만 (basic livelihood) + 5만 (Ganghwa/Ongjin) = 45만 to anyone.
    for n, body in enumerate([{"amount": 900_000_000_000}, {"amount": 450_001},
                              # m2 lives in Ganghwa: 15만 + the 5만 add-on at most
                              {"amount": 200_001, "attributes": {"income_status": "general"}},
                              {"attributes": {"household_size": "4"}}, {"attributes": {"household_size": True}},
                              {"attributes": {"district": "busan"}}, {"attributes": {"district": 5}}]):
        r = disburse(n, **body)
        assert r.status_code == 422 and r.json()["code"] in ("amount_not_computable", "validation_error"), (body, r.text)
    assert snapshot(api) == before
    assert disburse(10, amount=120_000).json()["amount"] == 120_000  # less than the rules: paid as sent
    assert disburse(11, amount=450_000).json()["amount"] == 450_000
    assert disburse(12, attributes={"income_status": "general", "district": "ganghwa"}).json()["amount"] == 200_000
    assert disburse(13, attributes={"income_status": "general"}).json()["amount"] == 200_000  # the registry's district
    # In bulk, the same rules per row, each refusal reported with its line.
    csv_text = ("disbursement_id,member_id,amount,district,income_status\n"
                "b1,m1,900000000000,,\n"
                "b2,m1,,busan,general\n"
                "b3,m1,100000,,\n"
                "b4,m3,,ganghwa,general\n")  # m3 lives in Namdong
    report = api.client.post("/v1/grant-programs/coupon-2025-r1/disbursements/bulk?occurred_at=2025-08-01T09:00:00%2B09:00",
                             content=csv_text.encode(), headers={**api.h("policy-editor"), "Content-Type": "text/csv"}
                             ).json()
    assert report["disbursed"] == 1 and report["amount"] == 100_000
    reasons = {e["line"]: e["error"] for e in report["errors"]}
    assert "more than the program's amount rules give" in reasons[2]
    assert "'district' must be one of" in reasons[3]
    assert "by the registry" in reasons[5]


def test_every_disbursement_names_who_gave_it(api):
    """One at a time or in bulk, each row records the key's holder: money given to a
    member is traced to whoever gave it, as policy and budget changes are."""
    from sqlalchemy import select

    from ledger import schema as s

    _setup(api)
    r = api.post("/v1/grant-programs/coupon-2025-r1/disbursements",
                 {"disbursement_id": "who-1", "member_id": "m1", "attributes": {"income_status": "general"},
                  "occurred_at": at("2025-08-01")}, role="policy-editor")
    assert r.status_code == 201, r.text
    bulk = api.client.post("/v1/grant-programs/coupon-2025-r1/disbursements/bulk?occurred_at=2025-08-01T09:00:00%2B09:00",
                           content=b"disbursement_id,member_id,income_status\nwho-2,m2,general\nwho-3,m3,general\n",
                           headers={**api.h("admin"), "Content-Type": "text/csv"})
    assert bulk.json()["disbursed"] == 2, bulk.text
    with api.services.reader.connect() as conn:
        actors = dict(conn.execute(select(s.grant_disbursements.c.disbursement_id, s.grant_disbursements.c.actor)).all())
    assert actors["who-1"].startswith("test policy-editor")
    assert actors["who-2"].startswith("test admin") and actors["who-3"] == actors["who-2"]


def test_an_expiry_run_later_is_dated_when_the_program_ended(api):
    """Run weeks after the program's end, with no `as_of`, the unspent money goes back
    to the funders on the program's last instant's business date, not the run's."""
    from sqlalchemy import select

    from ledger import schema as s

    _setup(api)
    api.post("/v1/grant-programs/coupon-2025-r1/disbursements",
             {"disbursement_id": "late-1", "member_id": "m1", "attributes": {"income_status": "general"},
              "occurred_at": at("2025-08-01")}, role="policy-editor")
    r = api.post("/v1/grant-programs/coupon-2025-r1/expire", {}, role="policy-editor")
    assert r.status_code == 200 and r.json()["returned"] == 150_000, r.text
    with api.services.reader.connect() as conn:
        dates = conn.execute(select(s.ledger_txns.c.business_date).where(s.ledger_txns.c.kind == "grant_expiry")).scalars().all()
    assert dates == ["2025-12-01"]  # valid until 2025-11-30: usable to the end of that day


def test_grant_credited_ahead_or_to_a_suspended_card_is_spent_only_when_usable(api):
    """A list loaded the evening before the program opens is credited but not spendable
    until `valid_from`; a suspended member is credited, the card declines until active."""
    _setup(api)
    r = api.post("/v1/grant-programs/coupon-2025-r1/disbursements",
                 {"disbursement_id": "early", "member_id": "m1", "attributes": {"income_status": "general"},
                  "occurred_at": at("2025-07-20", "21:00:00")}, role="policy-editor")
    assert r.status_code == 201 and r.json()["amount"] == 150_000, r.text
    api.post("/v1/topups", {"topup_id": "t1", "member_id": "m1", "amount": 50_000, "occurred_at": at("2025-07-20")})
    before = api.post("/v1/payments", {"payment_id": "p-eve", "member_id": "m1", "merchant_id": "small",
                                       "amount": 20_000, "occurred_at": at("2025-07-20", "22:00:00")}).json()
    assert before["spent"] == {"grants": 0, "points": 0, "charged": 20_000}, before
    opened = api.post("/v1/payments", {"payment_id": "p-open", "member_id": "m1", "merchant_id": "small",
                                       "amount": 20_000, "occurred_at": at("2025-07-21", "09:00:00")}).json()
    assert opened["spent"]["grants"] == 20_000, opened
    # Suspended (a lost card): the grant is credited, payments decline, reactivated it spends.
    assert api.put("/v1/members/m3", {"district": "namdong", "status": "suspended"}).status_code == 200
    r = api.post("/v1/grant-programs/coupon-2025-r1/disbursements",
                 {"disbursement_id": "lost", "member_id": "m3", "attributes": {"income_status": "general"},
                  "occurred_at": at("2025-08-01")}, role="policy-editor")
    assert r.status_code == 201 and r.json()["balances"]["grants"][0]["amount"] == 150_000, r.text
    declined = api.post("/v1/payments", {"payment_id": "p-lost", "member_id": "m3", "merchant_id": "small",
                                         "amount": 10_000, "occurred_at": at("2025-08-02")}).json()
    assert declined["status"] == "declined" and declined["decline_code"] == "member_suspended"
    assert api.put("/v1/members/m3", {"district": "namdong", "status": "active"}).status_code == 200
    paid = api.post("/v1/payments", {"payment_id": "p-found", "member_id": "m3", "merchant_id": "small",
                                     "amount": 10_000, "occurred_at": at("2025-08-03")}).json()
    assert paid["status"] == "approved" and paid["spent"]["grants"] == 10_000, paid
    with api.services.reader.connect() as conn:
        assert all(c.ok for c in check_book(conn)), check_book(conn)


def test_a_key_with_a_long_holder_name_creates_and_disburses(api):
    """Key names may be 200 characters; the actor columns of programs and disbursements
    were 64 wide, and PostgreSQL refused the row (500)."""
    from ledger.db import make_engine
    from ledger.keys import create_key

    engine = make_engine(api.settings.database_url)
    name = "인천광역시 소상공인정책과 민생회복지원팀 주무관 " + "x" * 120
    _, token = create_key(engine, name=name, role="policy-editor", pepper=api.settings.key_pepper.get_secret_value())
    engine.dispose()
    headers = {"Authorization": f"Bearer {token}"}
    api.put("/v1/members/m1", {"district": "seo"})
    body = {**COUPON, "program_id": "long-name", "valid_from": "2025-07-21", "valid_until": "2025-11-30"}
    r = api.client.post("/v1/grant-programs", json=body, headers=headers)
    assert r.status_code == 201, r.text
    approve_program(api, "long-name")
    r = api.client.post("/v1/grant-programs/long-name/disbursements", headers=headers, json={
        "disbursement_id": "d-long", "member_id": "m1", "attributes": {"income_status": "general"},
        "occurred_at": at("2025-08-01")})
    assert r.status_code == 201, r.text


def test_a_resent_disbursement_is_the_same_request_whatever_the_registry_says_now(api):
    """Its fingerprint is the request as sent: a resend after the member moved is a replay
    of what was given (it was a 409 because the amount worked out anew differed), and the
    same id with another time is a conflict (it was replayed as if the same)."""
    _setup(api)
    body = {"disbursement_id": "rs-1", "member_id": "m2",
            "attributes": {"income_status": "general", "district": "ganghwa"},  # as the README's example sends it
            "occurred_at": at("2025-08-01")}
    first = api.post("/v1/grant-programs/coupon-2025-r1/disbursements", body, role="policy-editor")
    assert first.status_code == 201 and first.json()["amount"] == 200_000  # Ganghwa: 15만 + 5만
    assert api.put("/v1/members/m2", {"district": "seo"}).status_code == 200
    again = api.post("/v1/grant-programs/coupon-2025-r1/disbursements", body, role="policy-editor")
    assert again.status_code == 200 and again.headers["idempotent-replayed"] == "true", again.text
    assert again.json() == first.json()
    later = api.post("/v1/grant-programs/coupon-2025-r1/disbursements", {**body, "occurred_at": at("2025-11-29")},
                     role="policy-editor")
    assert later.status_code == 409 and later.json()["code"] == "idempotency_conflict", later.text


@pytest.mark.postgres
def test_an_expiry_leaves_no_disbursement_behind(pg_url):
    """Expiry closes the program before it chooses the lots it returns: a disbursement
    that was in flight meanwhile (here held up on its member's lock) and commits after
    the lots were chosen finds the program expired and is refused, instead of leaving
    its money in a lot of an expired program; one sent after the expiry is refused too,
    alone or in a file."""
    import threading
    import time as clock

    import psycopg

    from ledger import grant_jobs
    from ledger.commands import Disburse
    from tests.conftest import make_api

    api = make_api(pg_url)
    with api.client:
        _setup(api)
        body = {"member_id": "m1", "attributes": {"income_status": "general"}, "occurred_at": at("2025-08-01")}
        path = "/v1/grant-programs/coupon-2025-r1/disbursements"
        assert api.post(path, {"disbursement_id": "e1", **body}, role="policy-editor").status_code == 201
        book = api.services.book
        holder = psycopg.connect(pg_url)
        holder.execute("SELECT 1 FROM members WHERE member_id = 'm3' FOR UPDATE")
        outcome: list = []
        late = threading.Thread(target=lambda: outcome.extend(book.execute([Disburse(
            "e3", "coupon-2025-r1", "m3", 150_000, _us("2025-08-01"), "h-e3")])))
        late.start()
        clock.sleep(0.5)  # the disbursement waits for m3
        expired = grant_jobs.expire_program(book, api.services.reader, "coupon-2025-r1", actor="test")
        assert expired["lots_expired"] == 1 and expired["returned"] == 150_000
        holder.commit()
        holder.close()
        late.join(30)
        assert outcome[0].error is not None and outcome[0].error.code == "grant_program_closed", outcome
        after = api.post(path, {"disbursement_id": "e4", **body, "member_id": "m2"}, role="policy-editor")
        assert after.status_code == 409 and after.json()["code"] == "grant_program_closed", after.text
        bulk = api.client.post(f"{path}/bulk?occurred_at=2025-08-01T09:00:00%2B09:00",
                               content=b"disbursement_id,member_id,income_status\ne5,m2,general\n",
                               headers={**api.h("policy-editor"), "Content-Type": "text/csv"}).json()
        assert bulk["disbursed"] == 0 and "grant_program_closed" in bulk["errors"][0]["error"], bulk
        money = api.get("/v1/grant-programs/coupon-2025-r1", role="policy-editor").json()["money"]
        assert money["held_by_members"] == 0 and money["disbursed"] == money["returned_to_funders"] == 150_000
        assert_book_ok(api)


def _us(day: str) -> int:
    import datetime as dt

    from rules.timeutil import to_us

    return to_us(dt.datetime.fromisoformat(at(day)))


def test_a_refund_sent_after_the_expiry_gives_grant_money_back_to_the_funders(api):
    """Dated before the program ended but sent after its expiry ran, a refund of grant
    spending went back into the member's lot: money in a lot of an expired program, which
    only a second expiry run would have returned."""
    from tests.book_helpers import pay, refund

    _setup(api)
    r = api.post("/v1/grant-programs/coupon-2025-r1/disbursements",
                 {"disbursement_id": "x1", "member_id": "m1", "attributes": {"income_status": "general"},
                  "occurred_at": at("2025-08-01")}, role="policy-editor")
    assert r.status_code == 201 and r.json()["amount"] == 150_000
    spent = pay(api, "px", "m1", "small", 50_000, at("2025-08-02"))
    assert spent["spent"]["grants"] == 50_000
    expired = api.post("/v1/grant-programs/coupon-2025-r1/expire", {}, role="policy-editor")
    assert expired.status_code == 200 and expired.json()["returned"] == 100_000, expired.text
    back = refund(api, "px", "rx", 50_000, at("2025-11-29"))
    assert back["restored"]["grants"] == 0 and back["balances"]["grants"] == [], back
    money = api.get("/v1/grant-programs/coupon-2025-r1", role="policy-editor").json()["money"]
    assert money["held_by_members"] == 0 and money["returned_to_funders"] == 150_000, money
    assert_book_ok(api)


def _running_program(api, program_id: str) -> str:
    """A program open now, valid through tomorrow (Seoul); returns a time past its end
    that is still ahead of the book's clock."""
    import datetime as dt

    from rules.timeutil import SEOUL

    today = dt.datetime.now(SEOUL).date()
    body = {**COUPON, "program_id": program_id, "valid_from": str(today - dt.timedelta(days=10)),
            "valid_until": str(today + dt.timedelta(days=1))}
    assert api.post("/v1/grant-programs", body, role="policy-editor").status_code == 201
    approve_program(api, program_id)
    return at(str(today + dt.timedelta(days=5)))


def test_an_expiry_refused_as_ahead_of_the_clock_leaves_the_program_open(api):
    """An `as_of` past the program's end but ahead of the book's clock was refused
    (422, "nothing was recorded") after the program had been marked expired: no money
    went back, members still held it, and a refund of their spending would have gone to
    the funders while new disbursements were refused as if it had expired."""
    from tests.book_helpers import assert_book_ok, snapshot

    _setup(api)
    future = _running_program(api, "running")
    path = "/v1/grant-programs/running/disbursements"
    body = {"member_id": "m1", "attributes": {"income_status": "general"}}
    assert api.post(path, {"disbursement_id": "r1", **body}, role="policy-editor").status_code == 201
    before = snapshot(api)
    r = api.post("/v1/grant-programs/running/expire", {"as_of": future}, role="policy-editor")
    assert r.status_code == 422 and r.json()["code"] == "occurred_at_in_future", r.text
    assert snapshot(api) == before
    assert api.get("/v1/grant-programs/running", role="auditor").json()["status"] == "open"
    log = api.get("/v1/audit-log", role="auditor", params={"object_id": "running", "action": "grant_program.expire"})
    assert log.json()["items"] == []
    again = api.post(path, {"disbursement_id": "r2", **body, "member_id": "m3"}, role="policy-editor")
    assert again.status_code == 201, again.text
    assert_book_ok(api)


def test_an_expiry_at_the_end_is_refused_until_the_book_s_clock_reaches_it(api, monkeypatch):
    """An `as_of` equal to `valid_until`, still ahead of the clock but within the 60 s
    skew, expired the program early: the member's lot went back to the funders while
    they could still spend it until the end. Refused (409, nothing changed) until the
    book's clock reaches the end; then the same request returns the lot."""
    import datetime as dt

    import ledger.book
    from rules.timeutil import SEOUL, to_us
    from tests.book_helpers import assert_book_ok, snapshot

    _setup(api)
    _running_program(api, "running")  # valid through tomorrow: it ends the day after, 00:00 Seoul
    end = dt.datetime.combine(dt.datetime.now(SEOUL).date() + dt.timedelta(days=2), dt.time(), SEOUL)
    assert api.post("/v1/grant-programs/running/disbursements",
                    {"disbursement_id": "r1", "member_id": "m1", "attributes": {"income_status": "general"}},
                    role="policy-editor").status_code == 201
    before = snapshot(api)
    monkeypatch.setattr(ledger.book, "now_us", lambda: to_us(end) - 30_000_000)  # 30 s before the end
    r = api.post("/v1/grant-programs/running/expire", {"as_of": end.isoformat()}, role="policy-editor")
    assert r.status_code == 409 and r.json()["code"] == "grant_program_not_expired", r.text
    assert snapshot(api) == before
    assert api.get("/v1/grant-programs/running", role="auditor").json()["status"] == "open"
    monkeypatch.setattr(ledger.book, "now_us", lambda: to_us(end))
    r = api.post("/v1/grant-programs/running/expire", {"as_of": end.isoformat()}, role="policy-editor")
    assert r.status_code == 200 and r.json()["returned"] == 150_000, r.text
    assert_book_ok(api)


def _expiry_log(api, program_id: str = "coupon-2025-r1") -> list[str]:
    """The program's closing, reopening and expiry entries, oldest first."""
    items = api.get("/v1/audit-log", role="auditor", params={"object_id": program_id}).json()["items"]
    actions = [e["action"] for e in sorted(items, key=lambda e: e["entry_id"])]
    return [a for a in actions if a in ("grant_program.close", "grant_program.reopen", "grant_program.expire")]


def test_an_expiry_that_fails_before_returning_anything_leaves_the_status_as_it_was(api, monkeypatch):
    """A failure of the book (a database down) before any lot went back restores the
    program's status: nothing was returned, so it is not expired."""
    from ledger import grant_jobs
    from ledger.book import Book
    from ledger.errors import Unavailable

    _setup(api)
    api.post("/v1/grant-programs/coupon-2025-r1/disbursements",
             {"disbursement_id": "f1", "member_id": "m1", "attributes": {"income_status": "general"},
              "occurred_at": at("2025-08-01")}, role="policy-editor")

    def down(self, commands, **kw):
        raise Unavailable("the book of record could not be written")

    monkeypatch.setattr(Book, "execute", down)
    with pytest.raises(Unavailable):
        grant_jobs.expire_program(api.services.book, api.services.reader, "coupon-2025-r1", actor="test")
    monkeypatch.undo()
    assert api.get("/v1/grant-programs/coupon-2025-r1", role="auditor").json()["status"] == "open"
    assert _expiry_log(api) == ["grant_program.close", "grant_program.reopen"]
    r = api.post("/v1/grant-programs/coupon-2025-r1/expire", {}, role="policy-editor")
    assert r.status_code == 200 and r.json()["returned"] == 150_000, r.text
    assert api.get("/v1/grant-programs/coupon-2025-r1", role="auditor").json()["status"] == "expired"


def test_an_expiry_whose_first_batch_committed_before_failing_stays_expired(api, monkeypatch):
    """The first batch's COMMIT went through and then its connection broke (the book
    raised Unavailable): its lots are back with the funders, so the program stays
    expired — were it open again, its members could be given lots the expiry already
    counted as returned — and running the expiry again returns the rest."""
    from ledger import grant_jobs
    from ledger.book import Book
    from ledger.errors import Unavailable

    _setup(api)
    given = {}
    for i, member in enumerate(("m1", "m2")):
        r = api.post("/v1/grant-programs/coupon-2025-r1/disbursements",
                     {"disbursement_id": f"c{i}", "member_id": member, "attributes": {"income_status": "general"},
                      "occurred_at": at("2025-08-01")}, role="policy-editor")
        assert r.status_code == 201, r.text
        given[member] = r.json()["amount"]
    monkeypatch.setattr(grant_jobs, "BATCH_SIZE_MAX", 1)
    execute = Book.execute

    def commits_then_breaks(self, commands, **kw):
        execute(self, commands, **kw)
        raise Unavailable("the book of record could not be written; retry with the same id")

    monkeypatch.setattr(Book, "execute", commits_then_breaks)
    with pytest.raises(Unavailable):
        grant_jobs.expire_program(api.services.book, api.services.reader, "coupon-2025-r1", actor="test")
    monkeypatch.setattr(Book, "execute", execute)
    assert api.get("/v1/grant-programs/coupon-2025-r1", role="auditor").json()["status"] == "expired"
    # The run cut short is on the audit log: its lots went back with no entry before.
    assert _expiry_log(api) == ["grant_program.close"]
    r = api.post("/v1/grant-programs/coupon-2025-r1/expire", {}, role="policy-editor")
    # The first batch returned m1's lot (members go in id order); the rerun, m2's.
    assert r.status_code == 200 and r.json()["returned"] == given["m2"] and r.json()["lots_expired"] == 1, r.text
    for member in ("m1", "m2"):
        assert api.get(f"/v1/members/{member}/balance").json()["balances"]["grants"] == [], member
    assert_book_ok(api)


def test_an_expiry_cut_short_and_run_again_has_every_won_returned_on_the_log(api, monkeypatch):
    """Three lots, one per batch; the database goes away at the second batch; the expiry
    run again returns the rest. Each batch writes what it returned in its transaction
    (`grant_program.expire_lots`), so the entries add up to every won returned (the
    crash audit: the totals entry came only after the last batch, and the rerun's said
    2 lots and 350,000 of 500,000; the first run's 150,000 was on no entry)."""
    from ledger import grant_jobs
    from ledger.book import Book
    from ledger.errors import Unavailable

    _setup(api)
    given = 0
    for i, member in enumerate(("m1", "m2", "m3")):
        r = api.post("/v1/grant-programs/coupon-2025-r1/disbursements",
                     {"disbursement_id": f"c{i}", "member_id": member, "attributes": {"income_status": "general"},
                      "occurred_at": at("2025-08-01")}, role="policy-editor")
        assert r.status_code == 201, r.text
        given += r.json()["amount"]
    monkeypatch.setattr(grant_jobs, "BATCH_SIZE_MAX", 1)
    execute, calls = Book.execute, []

    def second_batch_fails(self, commands, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise Unavailable("the book of record could not be written; retry with the same id")
        return execute(self, commands, **kw)

    monkeypatch.setattr(Book, "execute", second_batch_fails)
    with pytest.raises(Unavailable):
        grant_jobs.expire_program(api.services.book, api.services.reader, "coupon-2025-r1", actor="test")
    monkeypatch.setattr(Book, "execute", execute)
    r = api.post("/v1/grant-programs/coupon-2025-r1/expire", {}, role="policy-editor")
    assert r.status_code == 200 and r.json()["lots_expired"] == 2, r.text
    assert_book_ok(api)
    items = api.get("/v1/audit-log", role="auditor", params={"object_id": "coupon-2025-r1"}).json()["items"]
    batches = [e["detail"] for e in items if e["action"] == "grant_program.expire_lots"]
    assert len(batches) == 3 and [b["lots_expired"] for b in batches] == [1, 1, 1]
    assert sum(b["returned"] for b in batches) == given
    by_funder: dict[str, int] = {}
    for b in batches:
        for source, amount in b["returned_by_funder"].items():
            by_funder[source] = by_funder.get(source, 0) + amount
    assert sum(by_funder.values()) == given and all(b["as_of"] for b in batches)


def test_a_process_that_cannot_sign_the_audit_log_moves_no_grant_money(api):
    """`eum grants disburse` and `eum grants expire` in a shell without EUM_AUDIT_KEYS, on
    a keyed log: the audit entry was appended after the money had committed, so the
    refusal ("... nothing was changed") came with the rows paid, or the lots returned,
    and no entry. The process's keys are checked before any money moves."""
    from sqlalchemy import func, select

    from ledger import audit, grant_jobs
    from ledger import schema as s
    from tests.book_helpers import snapshot

    _setup(api)
    api.post("/v1/grant-programs/coupon-2025-r1/disbursements",
             {"disbursement_id": "k1", "member_id": "m1", "attributes": {"income_status": "general"},
              "occurred_at": at("2025-08-01")}, role="policy-editor")
    audit.configure(audit.Keyring.parse("k1:" + "k" * 32))
    assert api.put("/v1/members/m4", {"district": "seo"}).status_code == 201  # a keyed entry: the service's
    audit.configure(audit.Keyring.parse(None))  # the operator's shell
    before = snapshot(api)
    with api.services.reader.connect() as conn:
        entries = conn.execute(select(func.count()).select_from(s.audit_log)).scalar_one()
    book, reader = api.services.book, api.services.reader
    with pytest.raises(audit.UnkeyedAppend, match="nothing was changed"):
        grant_jobs.bulk_disburse(book, reader, "coupon-2025-r1",
                                 b"disbursement_id,member_id,income_status\nk2,m3,general\n", actor="ops")
    with pytest.raises(audit.UnkeyedAppend, match="nothing was changed"):
        grant_jobs.expire_program(book, reader, "coupon-2025-r1", actor="ops")
    assert snapshot(api) == before
    assert api.get("/v1/grant-programs/coupon-2025-r1", role="auditor").json()["status"] == "open"
    with api.services.reader.connect() as conn:
        assert conn.execute(select(func.count()).select_from(s.audit_log)).scalar_one() == entries


def test_a_district_other_than_the_registry_s_is_district_mismatch_alone_as_in_bulk(api):
    """The district is the registry's, not the sender's word: one disbursement that sent
    another was answered 422 `amount_not_computable` ("No amount the program can give")
    where the same row of a file is `district_mismatch`."""
    from tests.book_helpers import snapshot

    _setup(api)
    before = snapshot(api)
    r = api.post("/v1/grant-programs/coupon-2025-r1/disbursements",
                 {"disbursement_id": "dm1", "member_id": "m2", "occurred_at": at("2025-08-01"),
                  "attributes": {"income_status": "general", "district": "seo"}}, role="policy-editor")
    assert r.status_code == 422 and r.json()["code"] == "district_mismatch", r.text
    assert "'ganghwa' by the registry, not 'seo'" in r.json()["detail"]
    bulk = api.client.post("/v1/grant-programs/coupon-2025-r1/disbursements/bulk?occurred_at=2025-08-01T09:00:00%2B09:00",
                           content=b"disbursement_id,member_id,income_status,district\ndm2,m2,general,seo\n",
                           headers={**api.h("policy-editor"), "Content-Type": "text/csv"}).json()
    assert bulk["errors"][0]["error"].startswith("district_mismatch: ") and r.json()["detail"] in bulk["errors"][0]["error"]
    # A district that is not Incheon's is a bad attribute, not another district.
    r = api.post("/v1/grant-programs/coupon-2025-r1/disbursements",
                 {"disbursement_id": "dm3", "member_id": "m2", "occurred_at": at("2025-08-01"),
                  "attributes": {"district": "busan"}}, role="policy-editor")
    assert r.status_code == 422 and r.json()["code"] == "amount_not_computable", r.text
    assert snapshot(api) == before


def test_amount_rules_never_give_less_than_1_won_or_more_than_10_to_the_12(api):
    """A per-unit rule gave 2조 for 2 units at 1조 (the contract's amounts are 1..10^12)
    and 0 won for 0 units, recorded as a disbursement of 0 with no ledger transaction.
    Rules that can give more are refused when the program is created; what the rules
    give outside 1..10^12 (0 units; a program stored before that check) is 422
    `amount_not_computable`, alone and as a file's row."""
    from sqlalchemy import func, select

    from ledger import registry
    from ledger import schema as s
    from rules.grants import GrantProgramDocument
    from tests.book_helpers import snapshot

    _setup(api)
    program = {"program_id": "per-class", "name": "per class", "valid_from": "2025-07-01",
               "valid_until": "2025-12-31", "funding": {"city": 10000},
               "amount_rules": {"base": [{"id": "a", "per_unit_won": 1_000_000_000_000, "unit": "classes"}]}}
    r = api.post("/v1/grant-programs", program, role="policy-editor")
    assert r.status_code == 422 and "more than the 1,000,000,000,000 won" in r.json()["detail"], r.text
    with api.services.engine.begin() as conn:  # as stored before the check
        registry.create_grant_program(conn, GrantProgramDocument.model_validate(program), "old loader",
                                      approved_by="old approver")
    before = snapshot(api)
    path = "/v1/grant-programs/per-class/disbursements"
    for n, classes in ((1, 2), (2, 0)):
        r = api.post(path, {"disbursement_id": f"pc{n}", "member_id": "m1", "attributes": {"classes": classes},
                            "occurred_at": at("2025-08-01")}, role="policy-editor")
        assert r.status_code == 422 and r.json()["code"] == "amount_not_computable", r.text
    assert "(0 'classes')" in r.json()["detail"]
    report = api.client.post(f"{path}/bulk?occurred_at=2025-08-01T09:00:00%2B09:00",
                             content=b"disbursement_id,member_id,classes\npc3,m1,2\npc4,m3,0\n",
                             headers={**api.h("policy-editor"), "Content-Type": "text/csv"}).json()
    assert report["disbursed"] == 0 and [e["line"] for e in report["errors"]] == [2, 3], report
    assert "2,000,000,000,000 won" in report["errors"][0]["error"]
    assert "(0 'classes')" in report["errors"][1]["error"]
    assert snapshot(api) == before
    with api.services.reader.connect() as conn:
        assert conn.execute(select(func.count()).select_from(s.grant_disbursements)).scalar_one() == 0
    assert api.post(path, {"disbursement_id": "pc5", "member_id": "m1", "attributes": {"classes": 1},
                           "occurred_at": at("2025-08-01")}, role="policy-editor").json()["amount"] == 10**12
    # The most a rule can give: 1억 a unit at 10,000 units.
    program = {**program, "program_id": "per-class-2",
               "amount_rules": {"base": [{"id": "a", "per_unit_won": 100_000_000, "unit": "classes"}]}}
    assert api.post("/v1/grant-programs", program, role="policy-editor").status_code == 201


def test_a_per_unit_rule_counting_no_whole_number_attribute_is_refused_when_created(api):
    """A per-unit rule's `unit` is an attribute a recipient sends as a whole number; only
    household_size, classes and units are (every other attribute is text). A program
    whose rule counted `district`, `income_status` or a name no rule compares (`widgets`)
    was created and approved, and then gave no recipient an amount: each one, alone or a
    file's row, was refused "recipient needs a whole number 'district'". It is refused
    when created (422 `validation_error`, naming the rule and its unit) as `eum grants
    validate` refuses the file; a program stored before the check still loads."""
    from ledger import registry
    from rules.grants import GrantProgramDocument

    _setup(api)
    program = {"program_id": "per-unit", "name": "per unit", "valid_from": "2025-07-01",
               "valid_until": "2025-12-31", "funding": {"city": 10000}}
    for unit in ("district", "income_status", "widgets"):
        body = {**program, "amount_rules": {"base": [{"id": "each", "per_unit_won": 10_000, "unit": unit}]}}
        r = api.post("/v1/grant-programs", body, role="policy-editor")
        assert r.status_code == 422 and r.json()["code"] == "validation_error", (unit, r.text)
        assert f"amount rule 'each': unit {unit!r} is not a whole-number attribute" in r.json()["detail"], r.text
        assert "household_size, classes, units" in r.json()["detail"], r.text
        add_on = {**program, "amount_rules": {"base": [{"id": "flat", "amount_won": 1_000}],
                                              "add_ons": [{"id": "more", "per_unit_won": 10, "unit": unit}]}}
        assert GrantProgramDocument.model_validate(add_on).amount_problems() == [
            f"amount rule 'more': unit {unit!r} is not a whole-number attribute (household_size, classes, units), "
            "so the rule could give no recipient an amount"]
    assert api.get("/v1/grant-programs/per-unit", role="policy-editor").status_code == 404
    for unit in ("household_size", "classes", "units"):
        body = {**program, "program_id": f"per-{unit}",
                "amount_rules": {"base": [{"id": "each", "per_unit_won": 10_000, "unit": unit}]}}
        assert api.post("/v1/grant-programs", body, role="policy-editor").status_code == 201, unit
    # As stored before the check: it loads, and its rule gives no amount, as before.
    old = {**program, "amount_rules": {"base": [{"id": "each", "per_unit_won": 10_000, "unit": "district"}]}}
    with api.services.engine.begin() as conn:
        registry.create_grant_program(conn, GrantProgramDocument.model_validate(old), "old loader",
                                      approved_by="old approver")
    r = api.post("/v1/grant-programs/per-unit/disbursements",
                 {"disbursement_id": "pu1", "member_id": "m1", "attributes": {"district": "seo"},
                  "occurred_at": at("2025-08-01")}, role="policy-editor")
    assert r.status_code == 422 and r.json()["code"] == "amount_not_computable", r.text
    assert_book_ok(api)


def test_unspent_money_can_return_to_one_funder(api):
    """DOMAIN.md: the 2025 coupon's leftovers return to the national treasury, but a
    program's unspent money could only go back to its funders by their split (national
    320,000, city 80,000 of 400,000). `unspent: {return_to: FUNDER}` sends every won of
    it to that funder, at expiry and by a refund after it, whoever's share it was; the
    named funder's net may then go below zero (the others' shares it took), and every
    won is still accounted for."""
    from tests.book_helpers import pay, refund

    _setup(api)
    program = {**COUPON, "program_id": "to-national", "valid_from": "2025-07-21", "valid_until": "2025-11-30",
               "unspent": {"return_to": "national"}}
    assert api.post("/v1/grant-programs", program, role="policy-editor").status_code == 201
    approve_program(api, "to-national")
    path = "/v1/grant-programs/to-national/disbursements"
    for n, (member, status) in enumerate((("m1", "basic_livelihood"), ("m3", "general"))):
        r = api.post(path, {"disbursement_id": f"n{n}", "member_id": member, "occurred_at": at("2025-08-01"),
                            "attributes": {"income_status": status}}, role="policy-editor")
        assert r.status_code == 201, r.text
    spent = pay(api, "pn", "m3", "small", 50_000, at("2025-08-02"))
    assert spent["spent"]["grants"] == 50_000
    r = api.post("/v1/grant-programs/to-national/expire", {}, role="policy-editor")
    assert r.status_code == 200, r.text
    assert r.json()["returned"] == 500_000 and r.json()["returned_by_funder"] == {"national": 500_000}
    back = refund(api, "pn", "rn", 50_000, at("2025-12-02"))
    assert back["returned_to_funders"] == 50_000
    money = api.get("/v1/grant-programs/to-national", role="auditor").json()["money"]
    assert money["disbursed"] == 550_000 and money["returned_to_funders"] == 550_000
    # National put in 440,000 and took back all 550,000: the city's 110,000 went to it.
    assert money["funders_net"] == {"national": -110_000, "city": 110_000}
    assert_book_ok(api)
    # Settled, the grant money by funder is the grant fund accounts' movement, named
    # funder's taking included.
    import datetime as dt
    import time

    from settlement.service import settle

    later = lambda: time.time_ns() // 1000 + 3_600_000_000  # past the watermark lag  # noqa: E731
    for day, returned in (("2025-12-01", 500_000), ("2025-12-02", 50_000)):
        result = settle(api.services.engine, dt.date.fromisoformat(day), actor="test", clock=later)
        assert result.status == "settled", result.checks
        by_source = result.totals["dates"][day]["grants_by_source"]
        assert by_source == {"national": {"funded_won": 0, "returned_won": returned, "net_won": -returned}}, by_source
    # The funder named must be one of the program's.
    bad = {**program, "program_id": "to-seo", "unspent": {"return_to": "seo"}}
    r = api.post("/v1/grant-programs", bad, role="policy-editor")
    assert r.status_code == 422 and "return_to" in r.text, r.text


def test_settled_grant_flows_chart_an_expiry_in_the_members_district(api):
    """An expiry was charted in district 'unknown' (settlement `grants` rows, the report):
    the members' districts were read for disbursements only, and an expiry has no merchant.
    Money moving with no merchant is charted by the member's district, money moving at a
    merchant (spent, restored, returned to funders by a late refund) by the merchant's."""
    import datetime as dt
    import time

    from settlement.service import settle
    from tests.book_helpers import pay, refund

    _setup(api)
    for member in ("m1", "m2"):
        r = api.post("/v1/grant-programs/coupon-2025-r1/disbursements",
                     {"disbursement_id": f"d-{member}", "member_id": member, "attributes": {"income_status": "general"},
                      "occurred_at": at("2025-08-01")}, role="policy-editor")
        assert r.status_code == 201 and r.json()["amount"] in (150_000, 200_000), r.text
    assert pay(api, "pg", "m2", "small", 50_000, at("2025-08-02"))["spent"]["grants"] == 50_000
    expired = api.post("/v1/grant-programs/coupon-2025-r1/expire", {}, role="policy-editor")
    assert expired.status_code == 200, expired.text
    assert refund(api, "pg", "rg", 50_000, at("2025-12-02"))["returned_to_funders"] == 50_000
    later = lambda: time.time_ns() // 1000 + 3_600_000_000  # past the watermark lag  # noqa: E731
    rows = {}
    for day in ("2025-12-01", "2025-12-02"):
        result = settle(api.services.engine, dt.date.fromisoformat(day), actor="test", clock=later)
        assert result.status == "settled", result.checks
        rows[day] = {r["district"]: (r["expired_won"], r["returned_to_funders_won"]) for r in result.totals["grants"]}
    # m1 (seo) had 150,000 left, m2 (ganghwa) 150,000; the late refund was at a seo merchant
    assert rows == {"2025-12-01": {"seo": (150_000, 150_000), "ganghwa": (150_000, 150_000)},
                    "2025-12-02": {"seo": (0, 50_000)}}, rows


def test_the_shipped_coupons_return_their_leftovers_to_the_national_treasury():
    """DOMAIN.md "Relief grants": the 2025 coupon's leftovers go to the national
    treasury; the 2020 relief's unspent money to the national and local governments
    that funded it."""
    from rules.loader import load_grant_program_file

    grants = POLICIES / "grants"
    for name in ("2025-07-livelihood-coupon-round1.yaml", "2025-09-livelihood-coupon-round2.yaml"):
        assert load_grant_program_file(grants / name).facts().unspent_to == "national", name
    relief = load_grant_program_file(grants / "2020-05-emergency-relief.yaml")
    assert relief.unspent == "return_to_funders" and relief.facts().unspent_to is None


def test_a_book_that_recorded_the_coupon_before_keeps_its_terms(api):
    """The shipped coupon's `unspent` changed: a book that recorded the program from the
    old file keeps the terms it recorded (its leftovers by the split), and the new file
    submitted there is refused with nothing changed."""
    from tests.book_helpers import assert_book_ok, snapshot

    for member in ("m1", "m2"):
        assert api.put(f"/v1/members/{member}", {"district": "seo"}).status_code == 201
    old = {**COUPON, "valid_from": "2025-07-21", "valid_until": "2025-11-30", "unspent": "return_to_funders"}
    assert api.post("/v1/grant-programs", old, role="policy-editor").status_code == 201
    approve_program(api, "coupon-2025-r1")
    r = api.post("/v1/grant-programs/coupon-2025-r1/disbursements",
                 {"disbursement_id": "o1", "member_id": "m1", "attributes": {"income_status": "general"},
                  "occurred_at": at("2025-08-01")}, role="policy-editor")
    assert r.status_code == 201, r.text
    before = snapshot(api)
    shipped = {**COUPON, "valid_from": "2025-07-21", "valid_until": "2025-11-30"}
    r = api.post("/v1/grant-programs", shipped, role="policy-editor")
    assert r.status_code == 409 and r.json()["code"] == "conflict", r.text
    assert snapshot(api) == before
    r = api.post("/v1/grant-programs/coupon-2025-r1/expire", {}, role="policy-editor")
    assert r.json()["returned_by_funder"] == {"national": 120_000, "city": 30_000}, r.text
    assert_book_ok(api)


def test_a_program_stored_past_the_span_still_serves_its_members(api):
    """A release without the 2000–2099 check stored a program valid until 2100-12-31; the
    check, in the model, made every payment of its members a 500 (the program cache could
    not read the program). New programs are still refused; stored ones load."""
    from ledger import registry
    from ledger.db import make_engine
    from rules.grants import GrantProgramDocument

    _setup(api)
    late = {**COUPON, "program_id": "edge-2100", "valid_from": "2025-07-21", "valid_until": "2100-12-31"}
    r = api.post("/v1/grant-programs", late, role="policy-editor")
    assert r.status_code == 422 and "2099" in r.json()["detail"], r.text
    engine = make_engine(api.settings.database_url)
    with engine.begin() as conn:  # as the older release stored it
        registry.create_grant_program(conn, GrantProgramDocument.model_validate(late), "old release",
                                      approved_by="old approver")
    engine.dispose()
    r = api.post("/v1/grant-programs/edge-2100/disbursements",
                 {"disbursement_id": "e1", "member_id": "m1", "occurred_at": at("2025-08-01"),
                  "attributes": {"income_status": "general"}}, role="admin")
    assert r.status_code == 201, r.text
    paid = api.post("/v1/payments", {"payment_id": "e-p1", "member_id": "m1", "merchant_id": "small",
                                     "amount": 10_000, "occurred_at": at("2025-08-02")})
    assert paid.status_code == 201 and paid.json()["spent"]["grants"] == 10_000, paid.text
    assert api.get("/v1/members/m1/balance", role="card-app").status_code == 200


def test_a_programs_dates_are_never_unix_seconds(api):
    """pydantic read 1767225600 as a time (09:00 Seoul), so a program sent with numbers
    ended some 15 hours before the day it meant; "20260101" was seconds too."""
    for valid_from in (1767225600, "1767225600", "20260101", 20260101.0):
        body = {**COUPON, "program_id": "numbers", "valid_from": valid_from, "valid_until": "2026-12-31"}
        r = api.post("/v1/grant-programs", body, role="policy-editor")
        assert r.status_code == 422 and "not a number" in r.text, (valid_from, r.text)
    assert api.get("/v1/grant-programs/numbers", role="auditor").status_code == 404


def test_a_process_that_cannot_sign_is_refused_a_single_disbursement_and_the_rest_of_its_batch_is_written(api):
    """A disbursement's entry is written in its own transaction now: a process without
    the log's key (on a keyed log) is refused the disbursement, 500 `audit_key_missing`
    and nothing of it recorded, where it used to give the money and log that the entry
    failed. A top-up in the same batch is written without it."""
    import datetime as dt

    from ledger import audit
    from ledger.commands import Disburse, TopUp, request_hash
    from rules.timeutil import to_us
    from tests.book_helpers import assert_problem, snapshot

    _setup(api)
    audit.configure(audit.Keyring.parse("k1:" + "k" * 32))
    assert api.put("/v1/members/m4", {"district": "seo"}).status_code == 201  # a keyed entry: the service's
    audit.configure(audit.Keyring.parse(None))
    before = snapshot(api)
    body = {"disbursement_id": "nokey-1", "member_id": "m1", "attributes": {"income_status": "general"},
            "occurred_at": at("2025-08-01")}
    assert_problem(api.post("/v1/grant-programs/coupon-2025-r1/disbursements", body, role="policy-editor"), 500,
                   "audit_key_missing")
    assert snapshot(api) == before
    at_us = to_us(dt.datetime.fromisoformat(at("2025-08-01")))
    topup = TopUp("nokey-t", "m2", 10_000, at_us, request_hash("topup", {"topup_id": "nokey-t"}))
    given = Disburse("nokey-2", "coupon-2025-r1", "m3", 100_000, at_us, request_hash("disbursement", {}), actor="x")
    done = api.services.book.execute([topup, given])
    assert done[0].ok and isinstance(done[1].error, audit.UnkeyedAppend), done
    assert not _disbursed(api, "nokey-1") and not _disbursed(api, "nokey-2")
    assert api.get("/v1/members/m2/balance").json()["balances"]["charged"] == 10_000
    assert_book_ok(api)


def _disburse_entries(api, disbursement_id: str) -> list[dict]:
    entries = api.get("/v1/audit-log", role="auditor", params={"action": "grant.disburse"}).json()["items"]
    return [e for e in entries if e["detail"]["disbursement_id"] == disbursement_id]


def test_a_disbursement_committed_after_its_request_timed_out_is_audited_once(db_url, monkeypatch):
    """The first request gave up at the request timeout (503) while its batch went on to
    commit, and the retry was a 200 replay: the audit entry was written only after a 201,
    so this disbursement had none. It is written in the transaction that records the
    disbursement, so it is there exactly when the money is, whoever got the answer."""
    import time

    from tests.book_helpers import commit_late
    from tests.conftest import make_api

    api = make_api(db_url, request_timeout_ms=300)
    with api.client:
        _setup(api)
        commit_late(monkeypatch, "late-1", 1.0)
        body = {"disbursement_id": "late-1", "member_id": "m1", "attributes": {"income_status": "general"},
                "occurred_at": at("2025-08-01")}
        first = api.post("/v1/grant-programs/coupon-2025-r1/disbursements", body, role="policy-editor")
        assert first.status_code == 503, first.text
        deadline = time.monotonic() + 5
        while not _disbursed(api, "late-1") and time.monotonic() < deadline:
            time.sleep(0.05)
        again = api.post("/v1/grant-programs/coupon-2025-r1/disbursements", body, role="admin")
        assert again.status_code == 200 and again.headers["idempotent-replayed"] == "true", again.text
        entries = _disburse_entries(api, "late-1")
        assert [(e["actor"].split(" (")[0], e["object_id"], e["detail"]["amount_won"]) for e in entries] == [
            ("test policy-editor", "coupon-2025-r1", again.json()["amount"])]  # who gave it, not who resent it
        assert_book_ok(api)


def test_a_disbursement_whose_commit_broke_the_writers_connection_is_audited_once(pg_url, monkeypatch):
    """The COMMIT went through and the connection broke with it: the writer ran the batch
    again on a new connection and answered the first request itself as a replay (200),
    so the entry written only after a 201 was never written."""
    from tests.book_helpers import commit_then_break
    from tests.conftest import make_api

    api = make_api(pg_url)
    with api.client:
        _setup(api)
        injected = commit_then_break(monkeypatch)
        first = api.post("/v1/grant-programs/coupon-2025-r1/disbursements",
                         {"disbursement_id": "broken-1", "member_id": "m1",
                          "attributes": {"income_status": "general"}, "occurred_at": at("2025-08-01")},
                         role="policy-editor")
        assert injected and _disbursed(api, "broken-1")
        assert first.status_code == 200 and first.headers["idempotent-replayed"] == "true", first.text
        assert [e["detail"]["amount_won"] for e in _disburse_entries(api, "broken-1")] == [first.json()["amount"]]
        assert_book_ok(api)


def _disbursed(api, disbursement_id: str) -> bool:
    from sqlalchemy import select

    from ledger import schema as s

    t = s.grant_disbursements
    with api.services.reader.connect() as conn:
        found = conn.execute(select(t.c.disbursement_id).where(t.c.disbursement_id == disbursement_id)).first()
    return found is not None


def _expire_longest_ids(api) -> str:
    """A program of a 64-character id given to a member of a 64-character id (and another),
    then expired: the lot's key is 129 characters. Its id."""
    program_id, member = "p" * 64, "m" * 64
    assert api.put(f"/v1/members/{member}", {"district": "seo"}).status_code == 201
    assert api.put("/v1/members/short", {"district": "seo"}).status_code == 201
    body = {**COUPON, "program_id": program_id, "valid_from": "2025-07-21", "valid_until": "2025-11-30"}
    assert api.post("/v1/grant-programs", body, role="policy-editor").status_code == 201
    approve_program(api, program_id)
    for n, who in enumerate((member, "short")):
        r = api.post(f"/v1/grant-programs/{program_id}/disbursements",
                     {"disbursement_id": f"d{n}", "member_id": who, "attributes": {"income_status": "general"},
                      "occurred_at": at("2025-08-01")}, role="policy-editor")
        assert r.status_code == 201, r.text
    r = api.post(f"/v1/grant-programs/{program_id}/expire", {"as_of": at("2025-12-01", "00:00:00")},
                 role="policy-editor")
    assert r.status_code == 200, r.text
    assert r.json()["returned"] == 300_000
    assert api.get(f"/v1/members/{member}/balance").json()["balances"]["grants"] == []
    return program_id


def test_a_program_and_a_member_with_the_longest_ids_expire(api):
    """An expired lot's idempotency key is `program_id/member_id`, up to 129 characters,
    and it is the ledger transaction's `ref`: that column held 64, so on PostgreSQL every
    expiry of a program with one recipient of a long id (a UUID under a 29-character
    program id) failed the whole batch as an outage, 503 "retry" each time, and no lot
    went back (idempotency audit). Migration 0018 widens it."""
    _expire_longest_ids(api)
    assert_book_ok(api)


def test_migration_0018_will_not_go_down_while_a_long_ref_is_recorded(api, db_url):
    """0017's `ref` held 64 characters: on PostgreSQL a downgrade is refused while a key
    longer than that is recorded (it would not fit), and changes nothing; SQLite does not
    enforce the length, so there it goes down and up as before."""
    from alembic import command

    from ledger.db import alembic_config, migrate

    _expire_longest_ids(api)
    if db_url.startswith("postgresql"):
        with pytest.raises(RuntimeError, match="longer than 64"):
            command.downgrade(alembic_config(db_url), "0017")
    else:
        command.downgrade(alembic_config(db_url), "0017")
        migrate(db_url)
    assert_book_ok(api)


def test_a_program_names_who_takes_the_splits_remainder_so_funders_reordered_are_other_terms(api):
    """With no `remainder_to` the won a split leaves goes to the first funder as written,
    but nothing recorded said so: the audit entry's keys are sorted, a create with the
    same funders in another order was answered as a replay (200) of terms that pay the
    remainder elsewhere, and the book check compares the stored program with its entry
    whatever the keys' order. The program now names the funder when it comes in."""
    from rules.grants import GrantProgramDocument
    from tests.book_helpers import flat_grant_program

    body = flat_grant_program("rem-first")
    del body["remainder_to"]
    body["funding"] = {"national": 5000, "city": 5000}
    r = api.post("/v1/grant-programs", body, role="policy-editor")
    assert r.status_code == 201, r.text
    assert r.json()["remainder_to"] == "national", r.json()
    entry = next(e for e in api.get("/v1/audit-log?object_type=grant_program&object_id=rem-first",
                                    role="auditor").json()["items"] if e["action"] == "grant_program.create")
    assert entry["detail"]["remainder_to"] == "national", entry
    reordered = {**body, "funding": {"city": 5000, "national": 5000}}
    assert api.post("/v1/grant-programs", reordered, role="policy-editor").status_code == 409
    assert api.post("/v1/grant-programs", body, role="policy-editor").status_code == 200  # the same terms: a replay
    # Stored before this (no remainder_to): it loads paying the first funder as stored, as it did.
    old = GrantProgramDocument.model_validate_json(
        '{"program_id": "old", "name": "old", "valid_from": "2025-07-01", "valid_until": "2025-11-30", '
        '"funding": {"city": 5000, "national": 5000}}')
    assert old.remainder_to == "city" and old.facts().remainder_to == "city"
