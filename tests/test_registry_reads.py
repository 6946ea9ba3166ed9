"""The registry read back: a merchant or member as PUT left it, and the merchant list."""

from tests.book_helpers import assert_problem
from tests.test_smoke_api import setup_shop


def test_a_merchant_reads_back_as_put_with_its_last_change(api):
    setup_shop(api, "shop-a", flags=["good_price", "winwin"], merchant_share_bp=300)
    r = api.get("/v1/merchants/shop-a", role="admin")
    assert r.status_code == 200, r.text
    first = r.json()
    assert {k: first[k] for k in ("merchant_id", "district", "category", "annual_sales", "registered_from",
                                  "flags", "merchant_share_bp")} == {
        "merchant_id": "shop-a", "district": "seo", "category": "restaurant", "annual_sales": 100_000_000,
        "registered_from": "2019-01-01", "flags": ["good_price", "winwin"], "merchant_share_bp": 300}
    assert first["updated_at"].endswith("+09:00")
    setup_shop(api, "shop-a", sales=4_000_000_000)  # crosses the 30억 tier: flags and share cleared too
    again = api.get("/v1/merchants/shop-a", role="auditor").json()
    assert again["annual_sales"] == 4_000_000_000 and again["flags"] == [] and again["merchant_share_bp"] == 0
    assert again["updated_at"] >= first["updated_at"]
    assert_problem(api.get("/v1/merchants/nobody", role="admin"), 404, "merchant_not_found")


def test_a_member_reads_back_with_its_status(api):
    assert api.put("/v1/members/m1", {"district": "ganghwa"}).status_code == 201
    r = api.get("/v1/members/m1", role="admin")
    assert r.status_code == 200, r.text
    assert {k: r.json()[k] for k in ("member_id", "district", "status")} == {
        "member_id": "m1", "district": "ganghwa", "status": "active"}
    assert api.put("/v1/members/m1", {"district": "ganghwa", "status": "suspended"}).status_code == 200
    body = api.get("/v1/members/m1", role="finance").json()
    assert body["status"] == "suspended" and body["created_at"] <= body["updated_at"]
    assert_problem(api.get("/v1/members/nobody", role="admin"), 404, "member_not_found")
    assert api.get("/v1/members/m1", role="card-app").status_code == 403


def test_the_merchant_list_pages_and_filters(api):
    for i, district in enumerate(["seo", "jung", "seo", "ganghwa", "seo"]):
        setup_shop(api, f"shop-{i}", district=district, flags=["good_price"] if i % 2 else [])
    setup_shop(api, "shop-9", flags=["good_price_x"])  # a flag that only begins like another
    seen, after = [], None
    while True:
        params = {"limit": 2, **({"after": after} if after else {})}
        page = api.get("/v1/merchants", role="admin", params=params).json()
        seen += [m["merchant_id"] for m in page["items"]]
        after = page["next_after"]
        if after is None:
            break
        assert len(page["items"]) == 2
    assert seen == ["shop-0", "shop-1", "shop-2", "shop-3", "shop-4", "shop-9"]
    seo = api.get("/v1/merchants", role="admin", params={"district": "seo"}).json()
    assert [m["merchant_id"] for m in seo["items"]] == ["shop-0", "shop-2", "shop-4", "shop-9"]
    assert seo["next_after"] is None
    good = api.get("/v1/merchants", role="admin", params={"flag": "good_price"}).json()
    assert [m["merchant_id"] for m in good["items"]] == ["shop-1", "shop-3"]
    assert_problem(api.get("/v1/merchants", role="admin", params={"limit": 1001}), 422, "page_size_too_large")
    assert api.get("/v1/merchants", role="admin", params={"district": "busan"}).status_code == 422
    assert api.get("/v1/merchants", role="admin", params={"flag": "a%"}).status_code == 422
