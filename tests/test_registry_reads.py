"""The registry read back: a merchant or member as PUT left it, and the merchant list."""

from tests.book_helpers import assert_problem, topup
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
    setup_shop(api, "shop-a", sales=4_000_000_000)  # crosses the 30억 tier; flags and share left out: kept
    again = api.get("/v1/merchants/shop-a", role="auditor").json()
    assert again["annual_sales"] == 4_000_000_000 and again["flags"] == ["good_price", "winwin"]
    assert again["merchant_share_bp"] == 300 and again["updated_at"] >= first["updated_at"]
    setup_shop(api, "shop-a", sales=4_000_000_000, flags=[], merchant_share_bp=0)  # cleared when sent
    cleared = api.get("/v1/merchants/shop-a", role="auditor").json()
    assert cleared["flags"] == [] and cleared["merchant_share_bp"] == 0
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


def test_a_put_keeps_what_it_leaves_out(api):
    """API.md's `status?`, `flags?` and `merchant_share_bp?` are optional: a PUT that
    leaves one out keeps what is stored (a district change must not reactivate a
    suspended card, nor a yearly sales update drop 착한가격업소 or the 상생 share); null
    is refused, not taken as "leave it"."""
    assert api.put("/v1/members/m1", {"district": "seo", "status": "suspended"}).status_code == 201
    r = api.put("/v1/members/m1", {"district": "jung"})
    assert r.status_code == 200 and r.json()["status"] == "suspended", r.text
    assert api.get("/v1/members/m1", role="admin").json()["status"] == "suspended"
    assert api.put("/v1/members/m2", {"district": "seo"}).json()["status"] == "active"  # new: active
    assert_problem(api.put("/v1/members/m1", {"district": "jung", "status": None}), 422, "validation_error")
    setup_shop(api, "shop-g", flags=["good_price"])
    r = api.put("/v1/merchants/shop-g", {"name": "Shop", "district": "seo", "category": "restaurant",
                                         "annual_sales": 120_000_000, "registered_from": "2019-01-01"})
    assert r.status_code == 200 and r.json()["flags"] == ["good_price"], r.text
    assert_problem(api.put("/v1/merchants/shop-g", {
        "name": "Shop", "district": "seo", "category": "restaurant", "annual_sales": 1, "registered_from": "2019-01-01",
        "merchant_share_bp": None}), 422, "validation_error")
    audit = api.get("/v1/audit-log?object_type=member&object_id=m1", role="auditor").json()["items"]
    assert [e["detail"]["status"] for e in audit] == ["suspended", "suspended"]  # the district change, recorded


def test_the_winwin_flag_follows_the_share(api):
    """API.md's `merchant_share_bp` is the 상생 share: a merchant PUT with a share and no
    flag is a 상생 merchant (it used to earn neither its share nor the district's 2%); one
    with the flag and no share is refused; ending the share drops the flag."""
    setup_shop(api, "ww", merchant_share_bp=300)
    assert api.get("/v1/merchants/ww", role="admin").json()["flags"] == ["winwin"]
    assert api.put("/v1/members/m1", {"district": "seo"}).status_code == 201
    topup(api, "t1", "m1", 100_000, "2025-11-03T09:00:00+09:00")
    paid = api.post("/v1/payments", {"payment_id": "p1", "member_id": "m1", "merchant_id": "ww", "amount": 50_000,
                                     "occurred_at": "2025-11-03T12:00:00+09:00"})
    assert paid.status_code == 201, paid.text
    assert [(c["rule"], c["amount"]) for c in paid.json()["cashback"]["components"]] == [
        ("city/standard", 5_000), ("winwin-merchant/winwin-merchants", 1_500),
        ("winwin-district/winwin-in-topup-districts", 1_000)]
    assert_problem(api.put("/v1/merchants/nw", {"name": "Shop", "district": "seo", "category": "restaurant",
                                                "annual_sales": 1, "registered_from": "2019-01-01",
                                                "flags": ["winwin"]}), 422, "winwin_without_share")
    assert api.get("/v1/merchants/nw", role="admin").status_code == 404  # nothing written
    setup_shop(api, "ww", flags=["winwin", "good_price"])  # the flags read back, sent again: the stored share holds
    assert api.get("/v1/merchants/ww", role="admin").json()["flags"] == ["good_price", "winwin"]
    setup_shop(api, "ww", merchant_share_bp=0)
    assert api.get("/v1/merchants/ww", role="admin").json()["flags"] == ["good_price"]
    assert_problem(api.put("/v1/merchants/ww", {"name": "Shop", "district": "seo", "category": "restaurant",
                                                "annual_sales": 1, "registered_from": "2019-01-01",
                                                "flags": ["winwin", "good_price"]}), 422, "winwin_without_share")
    assert api.get("/v1/merchants/ww", role="admin").json()["flags"] == ["good_price"]


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


def test_the_migration_makes_stored_flags_follow_the_share(db_url):
    """Rows written before 0012 (a share without the flag, a flag without a share) agree
    with their share after it; shares and other flags are untouched."""
    from alembic import command
    from sqlalchemy import text

    from ledger.db import alembic_config, make_engine, migrate

    command.downgrade(alembic_config(db_url), "0011")
    engine = make_engine(db_url)
    rows = {"share-only": ("good_price", 300), "flag-only": ("good_price,winwin", 0), "both": ("winwin", 500),
            "neither": ("", 0)}
    with engine.begin() as conn:
        for merchant_id, (flags, share) in rows.items():
            conn.execute(text("INSERT INTO merchants (merchant_id, name, district, category, annual_sales_won, "
                              "registered_from, flags, merchant_share_bp, updated_at_us) VALUES "
                              "(:m, 'x', 'seo', 'cafe', 1, '2019-01-01', :f, :s, 1)"),
                         {"m": merchant_id, "f": flags, "s": share})
    engine.dispose()
    migrate(db_url)
    engine = make_engine(db_url)
    with engine.connect() as conn:
        stored = dict(conn.execute(text("SELECT merchant_id, flags || '/' || merchant_share_bp FROM merchants")).all())
        touched = dict(conn.execute(text("SELECT merchant_id, updated_at_us > 1 FROM merchants")).all())
    engine.dispose()
    assert stored == {"share-only": "good_price,winwin/300", "flag-only": "good_price/0", "both": "winwin/500",
                      "neither": "/0"}
    assert touched == {"share-only": True, "flag-only": True, "both": False, "neither": False}


def test_a_budget_or_registry_change_can_say_why(api):
    """Who and when were recorded, and the values before and after; now the why too."""
    assert api.put("/v1/budgets/seo/2026-03", {"amount": 100, "reason": "supplementary budget (추경)"},
                   role="finance").status_code == 200
    assert api.put("/v1/members/m1", {"district": "seo", "reason": "moved house"}).status_code == 201
    setup_shop(api, "shop-r", reason="annual sales review 2026")
    log = api.get("/v1/audit-log", role="auditor").json()["items"]
    reasons = {(e["action"], e["object_id"]): e["detail"].get("reason") for e in log}
    assert reasons[("budget.put", "seo/2026-03")] == "supplementary budget (추경)"
    assert reasons[("member.put", "m1")] == "moved house"
    assert reasons[("merchant.put", "shop-r")] == "annual sales review 2026"
    assert_problem(api.put("/v1/budgets/seo/2026-03", {"amount": 100, "reason": "a\u202eb"}, role="finance"), 422,
                   "validation_error")
