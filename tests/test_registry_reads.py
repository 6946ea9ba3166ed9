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


def test_creators_racing_for_one_new_id_all_get_an_answer(pg_url):
    """Several requests creating the same member, merchant or policy at once (two hosts,
    a client's retry): one creates it, the others update it or are told it exists. The
    plain INSERT after finding no row was a 500 (unique violation) for the losers."""
    import threading

    from ledger import policies as pol
    from ledger import registry
    from ledger.db import make_engine
    from ledger.errors import EumError
    from ledger.keys import Principal
    from rules.loader import parse_policy_text
    from tests.conftest import POLICIES

    engine = make_engine(pg_url, pool_size=8)
    document = parse_policy_text((POLICIES / "2025-10-cap-50man.yaml").read_text(), "file")
    document = document.model_copy(update={"policy_id": "race-policy", "effective_from": None, "supersedes": None})
    calls = {
        "member": lambda conn, n: registry.put_member(conn, member_id="race-m", district="seo", status="active",
                                                      actor=f"a{n}"),
        "merchant": lambda conn, n: registry.put_merchant(
            conn, merchant_id="race-s", name="S", district="seo", category="cafe", annual_sales_won=1,
            registered_from=__import__("datetime").date(2020, 1, 1), flags=[], merchant_share_bp=0, actor=f"a{n}"),
        "policy": lambda conn, n: pol.create_draft(conn, document, Principal(f"k{n}", f"editor {n}", "policy-editor")),
    }
    for kind, call in calls.items():
        barrier = threading.Barrier(6)
        results: list = []

        def one(n: int) -> None:
            barrier.wait()
            try:
                with engine.begin() as conn:
                    results.append(("ok", call(conn, n)))
            except EumError as error:
                results.append(("refused", error.code))
            except Exception as error:  # noqa: BLE001 - what the test is about
                results.append(("crashed", type(error).__name__))

        threads = [threading.Thread(target=one, args=(n,)) for n in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert not [r for r in results if r[0] == "crashed"], (kind, results)
        if kind == "policy":
            assert sorted(r[0] for r in results) == ["ok"] + ["refused"] * 5, results
            assert {r[1] for r in results if r[0] == "refused"} == {"policy_exists"}
        else:
            created = [r for r in results if r[0] == "ok" and r[1][1]]
            assert len(results) == 6 and len(created) == 1, (kind, results)
    engine.dispose()
