"""GET /v1/payments/{payment_id}: a payment as it was first answered and as it stands
now (refunds, their clawbacks, corrections), so the card app can read one back after a
timeout instead of resending the whole body, and show what it is worth now."""

from __future__ import annotations

import datetime as dt

from sqlalchemy import event

from ledger.book import Refund
from rules.timeutil import to_us
from tests.book_helpers import PROBLEM_FIELDS, assert_book_ok, put_member, put_merchant, topup
from tests.conftest import at
from tests.test_corrections import _correct_november, _november
from tests.test_corrections import _refund as _refund_pharm


def _pay(api, payment_id: str, amount: int, *, member: str = "m1", merchant: str = "shop",
         day: str = "2026-11-10"):
    return api.post("/v1/payments", {"payment_id": payment_id, "member_id": member, "merchant_id": merchant,
                                     "amount": amount, "occurred_at": at(day)})


def _refund(api, payment_id: str, refund_id: str, amount: int, day: str = "2026-11-20"):
    r = api.post(f"/v1/payments/{payment_id}/refunds", {"refund_id": refund_id, "amount": amount,
                                                        "occurred_at": at(day)})
    assert r.status_code == 201, r.text
    return r.json()


def _read(api, payment_id: str, role: str = "card-app") -> dict:
    r = api.get(f"/v1/payments/{payment_id}", role=role)
    assert r.status_code == 200, r.text
    return r.json()


def _first_answer(body: dict) -> dict:
    """A POST answer as the GET gives it: all but the member's balances just after it."""
    return {k: v for k, v in body.items() if k != "balances"}


def _shop(api, member: str = "m1", charged: int = 100_000) -> None:
    put_member(api, member)
    put_merchant(api, "shop")
    put_merchant(api, "cafe")
    topup(api, f"t-{member}", member, charged, at("2026-11-01"))


NOTHING_REFUNDED = {"amount": 0, "restored": {"grants": 0, "points": 0, "charged": 0}, "returned_to_funders": 0,
                    "cashback_clawback": 0, "owed_settled": 0,
                    "clawback_detail": {"from_points": 0, "withheld_from_charged": 0, "withheld_from_grants": 0,
                                        "owed": 0, "not_recovered": 0}}


def test_an_approved_payment_reads_back_as_answered_and_whole(api):
    _shop(api)
    posted = _pay(api, "p1", 30_000)
    assert posted.status_code == 201, posted.text
    body = _read(api, "p1")
    assert {k: body[k] for k in _first_answer(posted.json())} == _first_answer(posted.json())
    assert "balances" not in body  # the member's balances then are not the payment's; GET balance has them now
    assert body["status"] == "approved" and body["cashback"]["amount"] == 3_000
    assert body["refunded"] == NOTHING_REFUNDED
    assert body["refundable"] == 30_000 and body["refunds"] == []
    assert body["refund_count"] == 0 and body["refunds_next_cursor"] is None
    assert body["cashback_now"] == {"amount": 3_000, "by_component": {"city": 3_000},
                                    "by_funder": {"national": 1_200, "city": 1_800}, "corrections": []}
    assert dt.datetime.fromisoformat(body["recorded_at"]).utcoffset() == dt.timedelta(hours=9)


def test_a_declined_payment_reads_back_declined_with_nothing_to_refund(api):
    _shop(api, charged=10_000)
    posted = _pay(api, "p-big", 50_000)
    assert posted.json()["status"] == "declined", posted.text
    body = _read(api, "p-big")
    assert {k: body[k] for k in _first_answer(posted.json())} == _first_answer(posted.json())
    assert (body["status"], body["decline_code"]) == ("declined", "insufficient_funds")
    assert body["refundable"] == 0 and body["refunds"] == [] and body["refunded"] == NOTHING_REFUNDED
    assert body["cashback_now"] == {"amount": 0, "by_component": {}, "by_funder": {}, "corrections": []}


def test_partial_then_whole_refund_of_a_payment_spending_points_and_charged_money(api):
    """p1 earns 3,000 points; p2 (20,000) spends them and 17,000 charged money, earning
    1,700. Refunds restore charged money first, then points: 10,000 then the other
    10,000, clawing back in proportion to the base (the charged part)."""
    _shop(api)
    _pay(api, "p1", 30_000, day="2026-11-05")
    posted = _pay(api, "p2", 20_000, merchant="cafe")
    assert posted.json()["spent"] == {"grants": 0, "points": 3_000, "charged": 17_000}, posted.text
    assert posted.json()["cashback"]["amount"] == 1_700
    first = _refund(api, "p2", "r1", 10_000, "2026-11-12")
    body = _read(api, "p2")
    assert body["refundable"] == 10_000
    assert body["refunded"]["amount"] == 10_000
    assert body["refunded"]["restored"] == first["restored"]
    assert body["refunded"]["cashback_clawback"] == first["cashback_clawback"] == 1_000
    assert body["cashback_now"]["amount"] == 700
    assert body["refunds"] == [{**_first_answer(first), "recorded_at": body["refunds"][0]["recorded_at"]}]
    second = _refund(api, "p2", "r2", 10_000, "2026-11-13")
    body = _read(api, "p2")
    assert body["refundable"] == 0 and body["refunded"]["amount"] == 20_000
    assert [(r["refund_id"], r["amount"], r["occurred_at"]) for r in body["refunds"]] == [
        ("r1", 10_000, at("2026-11-12")), ("r2", 10_000, at("2026-11-13"))]
    assert body["refund_count"] == 2 and body["refunds_next_cursor"] is None  # a handful: all of them here
    for field in ("grants", "points", "charged"):
        assert body["refunded"]["restored"][field] == first["restored"][field] + second["restored"][field]
    # the whole base (17,000 charged) restored, the 3,000 points too; all 1,700 clawed back
    assert body["refunded"]["cashback_clawback"] == 1_700
    assert body["refunded"]["clawback_detail"]["from_points"] == 1_700
    assert body["refunded"]["restored"]["points"] == 3_000
    assert body["cashback_now"] == {"amount": 0, "by_component": {}, "by_funder": {}, "corrections": []}
    # the first answer does not move
    assert {k: body[k] for k in _first_answer(posted.json())} == _first_answer(posted.json())
    # what the member holds adds up to what the book says
    balance = api.get("/v1/members/m1/balance", params={"month": "2026-11"}).json()
    held = _read(api, "p1")["cashback_now"]["amount"] + body["cashback_now"]["amount"]
    assert balance["month"]["cashback_earned"] == held == 3_000
    assert_book_ok(api)


def test_a_correction_moves_the_cashback_held_not_the_first_answer(api):
    """10,000 earned at 10%, the pharmacy corrected to 7% (−3,000), then 30,000 of
    100,000 refunded: the payment holds 7,000, then 4,900 (docs/design.md, Refunds)."""
    _november(api)
    first = _read(api, "p-pharm")
    assert first["cashback_now"]["amount"] == 10_000
    assert _correct_november(api)["lines"][0]["delta"] == -3_000
    body = _read(api, "p-pharm")
    assert body["cashback"] == first["cashback"]  # as first answered
    assert body["cashback_now"] == {"amount": 7_000, "by_component": {"city": 7_000},
                                    "by_funder": {"national": 2_800, "city": 4_200},
                                    "corrections": ["pharm-2026-11"]}
    assert _refund_pharm(api, "r-1", 30_000).json()["cashback_clawback"] == 2_100
    body = _read(api, "p-pharm")
    assert body["cashback_now"]["amount"] == 4_900 and body["cashback_now"]["corrections"] == ["pharm-2026-11"]
    assert body["refunded"]["cashback_clawback"] == 2_100 and body["refundable"] == 70_000
    balance = api.get("/v1/members/m1/balance", params={"month": "2026-11"}).json()
    assert balance["month"]["cashback_earned"] == 4_900
    # what the payment carries is what a refund of the rest claws back
    assert _refund_pharm(api, "r-2", 70_000).json()["cashback_clawback"] == 4_900
    body = _read(api, "p-pharm")
    assert body["cashback_now"]["amount"] == 0 and body["refunded"]["cashback_clawback"] == 7_000
    assert body["refundable"] == 0
    assert_book_ok(api)


def test_clawback_the_member_could_not_cover_is_owed_not_outstanding(api):
    """The last won of p1 claws back 2 (a won per funder the floors left) from a member
    who has spent everything: both are clawed back, 1 taken from the member and 1 owed;
    nothing is outstanding on the payment and it carries no cashback. (Before, 1 was not
    recovered and the payment still carried it.)"""
    _shop(api)
    put_merchant(api, "big", sales=5_000_000_000)  # above 30억: earns nothing
    _pay(api, "p1", 100_000)
    _pay(api, "p2", 10_000, merchant="cafe")  # the 10,000 points
    assert _refund(api, "p1", "r1", 99_999)["cashback_clawback"] == 9_998
    assert _pay(api, "p3", 90_001, merchant="big").json()["status"] == "approved"  # the charged money left
    last = _refund(api, "p1", "r2", 1)
    assert (last["cashback_clawback"], last["clawback_detail"]["not_recovered"]) == (2, 0), last
    assert last["clawback_detail"]["owed"] == 1
    body = _read(api, "p1")
    assert body["refunded"]["cashback_clawback"] == 10_000
    assert (body["refunded"]["clawback_detail"]["not_recovered"], body["refunded"]["clawback_detail"]["owed"]) == (0, 1)
    assert body["cashback_now"]["amount"] == 0 and body["refundable"] == 0
    assert api.get("/v1/members/m1/balance", params={"month": "2026-11"}).json()["owed"] == 1
    assert_book_ok(api)


def test_a_correction_that_raised_the_cashback(api):
    from tests.test_corrections import _pharm_7

    _november(api)
    policy = _pharm_7()
    policy["policy_id"] = "pharm-12"
    policy["components"][0]["variants"][1]["bands"][0]["rate_bp"] = 1_200
    _correct_november(api, "pharm-up", policy=policy)
    body = _read(api, "p-pharm")
    assert body["cashback"]["amount"] == 10_000
    assert body["cashback_now"]["amount"] == 12_000 and body["cashback_now"]["corrections"] == ["pharm-up"]


def test_a_replayed_post_and_the_get_agree(api):
    _shop(api)
    request = {"payment_id": "p1", "member_id": "m1", "merchant_id": "shop", "amount": 12_345,
               "occurred_at": at("2026-11-10")}
    created = api.post("/v1/payments", request)
    assert created.status_code == 201
    _refund(api, "p1", "r1", 345)
    replayed = api.post("/v1/payments", request)
    assert replayed.status_code == 200 and replayed.headers["Idempotent-Replayed"] == "true"
    assert replayed.content == created.content
    body = _read(api, "p1")
    assert {k: body[k] for k in _first_answer(replayed.json())} == _first_answer(replayed.json())
    assert body["refundable"] == 12_000


def test_an_unknown_payment_is_a_404_problem(api):
    r = api.get("/v1/payments/nope")
    assert r.status_code == 404
    assert r.headers["content-type"].startswith("application/problem+json")
    problem = r.json()
    assert all(field in problem for field in PROBLEM_FIELDS), problem
    assert problem["code"] == "payment_not_found"


def test_unknown_query_parameters_and_bad_ids_are_422(api):
    _shop(api)
    _pay(api, "p1", 1_000)
    r = api.get("/v1/payments/p1", params={"expand": "refunds"})
    assert r.status_code == 422 and r.json()["code"] == "validation_error", r.text
    assert "expand" in r.text
    r = api.get("/v1/payments/" + "x" * 65)
    assert r.status_code == 422 and r.json()["code"] == "validation_error", r.text
    r = api.get("/v1/payments/bad%20id")
    assert r.status_code == 422, r.text


def test_roles(api):
    _shop(api)
    _pay(api, "p1", 1_000)
    assert api.client.get("/v1/payments/p1").status_code == 401
    assert api.client.get("/v1/payments/p1", headers={"Authorization": "Bearer eum_nope_nope"}).status_code == 401
    for role in ("policy-editor", "policy-approver"):
        r = api.get("/v1/payments/p1", role=role)
        assert r.status_code == 403 and r.json()["code"] == "forbidden", (role, r.text)
    # as the member's balance and history: the card app, and finance, auditors and admins
    for role in ("card-app", "finance", "auditor", "admin"):
        assert api.get("/v1/payments/p1", role=role).status_code == 200, role


def test_a_payment_is_read_in_one_snapshot(api):
    """A refund that commits after the payment's row was read is not in the answer's
    refunds either: `refunded` and `refunds` agree (ledger.db.reader)."""
    _shop(api)
    _pay(api, "p1", 30_000)
    _refund(api, "p1", "r1", 10_000)
    engine, outcomes = api.services.engine, []
    late = Refund("r2", "p1", 5_000, to_us(dt.datetime.fromisoformat(at("2026-11-21"))), "h-r2")

    def after(conn, _cursor, statement, _parameters, _context, _many):
        if not outcomes and conn.get_execution_options().get("readonly") and "FROM payments" in statement:
            outcomes.extend(api.services.book.execute([late]))

    event.listen(engine, "after_cursor_execute", after)
    try:
        body = _read(api, "p1")
    finally:
        event.remove(engine, "after_cursor_execute", after)
    assert outcomes and outcomes[0].error is None, outcomes
    assert body["refunded"]["amount"] == sum(r["amount"] for r in body["refunds"]) == 10_000, body
    body = _read(api, "p1")
    assert body["refunded"]["amount"] == sum(r["amount"] for r in body["refunds"]) == 15_000, body


def test_the_route_is_in_the_openapi_document(api):
    document = api.client.get("/openapi.json").json()
    operation = document["paths"]["/v1/payments/{payment_id}"]["get"]
    schema = operation["responses"]["200"]["content"]["application/json"]["schema"]
    assert schema == {"$ref": "#/components/schemas/PaymentRead"}
    read = document["components"]["schemas"]["PaymentRead"]
    assert {"payment_id", "status", "spent", "cashback", "refunded", "refundable", "cashback_now",
            "refunds"} <= set(read["required"])
    assert "balances" not in read["properties"]
    # the POST's answer is the same model as before, balances included
    assert "balances" in document["components"]["schemas"]["PaymentOut"]["required"]


def _many_refunds(api, payment_id: str, count: int, *, first: int = 0, batches: int = 2) -> list[str]:
    """`count` refunds of 100 won each of the payment, recorded through the book in
    `batches` batches (refunds of one batch share their recorded_at), their ids in
    another order than the book's (r-999, r-998, ...), so only the recording order
    orders them. Returns the ids in the order recorded."""
    ids = [f"r-{999 - first - i}" for i in range(count)]
    at_us = to_us(dt.datetime.fromisoformat(at("2026-11-20")))
    size = -(-count // batches)
    for start in range(0, count, size):
        outcomes = api.services.book.execute([Refund(refund_id, payment_id, 100, at_us, f"h-{refund_id}")
                                              for refund_id in ids[start:start + size]])
        assert all(outcome.error is None for outcome in outcomes), outcomes
    return ids


def _pages(api, payment_id: str, **params) -> list[dict]:
    """Every page of the payment's refunds, following next_cursor."""
    pages, cursor = [], None
    while True:
        r = api.get(f"/v1/payments/{payment_id}/refunds", params={**params, **({"cursor": cursor} if cursor else {})})
        assert r.status_code == 200, r.text
        pages.append(r.json())
        cursor = r.json()["next_cursor"]
        if cursor is None:
            return pages


def test_a_payment_refunded_many_times_shows_its_first_refunds_and_pages_the_rest(api):
    """A payment may be refunded in thousands of parts: its read back holds the first
    PAYMENT_REFUNDS_SHOWN in the order the book recorded them, how many there are, and a
    cursor to the refunds page; what they add up to is over all of them."""
    from ledger.queries import PAYMENT_REFUNDS_SHOWN

    _shop(api)
    assert _pay(api, "p1", 30_000).status_code == 201
    count = PAYMENT_REFUNDS_SHOWN + 5
    ids = _many_refunds(api, "p1", count)
    body = _read(api, "p1")
    assert [r["refund_id"] for r in body["refunds"]] == ids[:PAYMENT_REFUNDS_SHOWN]
    totals = [r["payment_refunded_total"] for r in body["refunds"]]
    assert totals == [100 * (i + 1) for i in range(PAYMENT_REFUNDS_SHOWN)]
    assert body["refund_count"] == count and body["refunds_next_cursor"] is not None
    assert body["refunded"]["amount"] == 100 * count and body["refundable"] == 30_000 - 100 * count
    # the rest, from where the payment's answer left off
    rest = api.get("/v1/payments/p1/refunds", params={"cursor": body["refunds_next_cursor"]}).json()
    assert [r["refund_id"] for r in rest["items"]] == ids[PAYMENT_REFUNDS_SHOWN:] and rest["next_cursor"] is None
    # all of them, in pages of 7, each refund as the payment's answer shows it
    pages = _pages(api, "p1", limit=7)
    items = [item for page in pages for item in page["items"]]
    assert [len(page["items"]) for page in pages] == [7] * (count // 7) + ([count % 7] if count % 7 else [])
    assert [r["refund_id"] for r in items] == ids
    assert items[:PAYMENT_REFUNDS_SHOWN] == body["refunds"]
    assert sum(r["amount"] for r in items) == body["refunded"]["amount"]
    assert sum(r["cashback_clawback"] for r in items) == body["refunded"]["cashback_clawback"]
    assert_book_ok(api)


def test_a_refund_recorded_after_a_page_was_read_comes_last(api):
    """Pages follow the recording order, so one recorded meanwhile moves no refund from a
    page already read: it is on the last."""
    _shop(api)
    _pay(api, "p1", 30_000)
    ids = _many_refunds(api, "p1", 5, batches=1)
    first = api.get("/v1/payments/p1/refunds", params={"limit": 3}).json()
    assert [r["refund_id"] for r in first["items"]] == ids[:3]
    later = _many_refunds(api, "p1", 1, first=5, batches=1)
    second = api.get("/v1/payments/p1/refunds", params={"limit": 3, "cursor": first["next_cursor"]}).json()
    assert [r["refund_id"] for r in second["items"]] == ids[3:] + later and second["next_cursor"] is None


def test_the_refunds_page_refuses_what_every_page_refuses(api):
    _shop(api)
    _pay(api, "p1", 1_000)
    page_max = api.settings.page_size_max
    r = api.get("/v1/payments/p1/refunds", params={"limit": page_max + 1})
    assert r.status_code == 422 and r.json()["code"] == "page_size_too_large" and r.json()["limit_max"] == page_max
    assert api.get("/v1/payments/p1/refunds", params={"limit": page_max}).json() == {"items": [], "next_cursor": None}
    for bad in ("nope", "dDE", "t1"):
        r = api.get("/v1/payments/p1/refunds", params={"cursor": bad})
        assert r.status_code == 422 and r.json()["code"] == "bad_cursor", (bad, r.text)
    r = api.get("/v1/payments/p1/refunds", params={"limit": 0})
    assert r.status_code == 422 and r.json()["code"] == "validation_error"
    r = api.get("/v1/payments/p1/refunds", params={"month": "2026-11"})
    assert r.status_code == 422 and "month" in r.text
    r = api.get("/v1/payments/nope/refunds")
    assert r.status_code == 404 and r.json()["code"] == "payment_not_found"
    assert api.get("/v1/payments/p1/refunds", role="policy-editor").status_code == 403
    for role in ("card-app", "finance", "auditor", "admin"):
        assert api.get("/v1/payments/p1/refunds", role=role).status_code == 200, role


def test_the_refunds_page_is_in_the_openapi_document(api):
    document = api.client.get("/openapi.json").json()
    operation = document["paths"]["/v1/payments/{payment_id}/refunds"]["get"]
    schema = operation["responses"]["200"]["content"]["application/json"]["schema"]
    assert schema == {"$ref": "#/components/schemas/RefundsPage"}
    read = document["components"]["schemas"]["PaymentRead"]
    assert {"refund_count", "refunds_next_cursor"} <= set(read["required"])
