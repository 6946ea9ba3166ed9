"""The finance endpoints of API.md through the whole app, on SQLite and PostgreSQL."""

from __future__ import annotations

import io

import polars as pl
import pytest

from ledger.db import make_engine
from ledger.keys import create_key
from tests.conftest import at

DAY = "2026-11-03"


pytestmark = pytest.mark.usefixtures("no_watermark_lag")  # tests/conftest.py


def _book_a_day(api) -> list[str]:
    for merchant, sales in (("shop-a", 200_000_000), ("shop-b", 800_000_000)):
        assert api.put(f"/v1/merchants/{merchant}", {
            "name": merchant, "district": "seo", "category": "restaurant", "annual_sales": sales,
            "registered_from": "2026-01-01"}).status_code in (200, 201)
    assert api.put("/v1/members/m-1", {"district": "seo"}).status_code in (200, 201)
    assert api.post("/v1/topups", {"topup_id": "t-1", "member_id": "m-1", "amount": 500_000,
                                   "occurred_at": f"{DAY}T08:00:00+09:00"}).json()["status"] == "approved"
    ids = []
    for i, (merchant, amount) in enumerate((("shop-a", 17_000), ("shop-b", 23_000), ("shop-b", 40_000))):
        body = {"payment_id": f"p-{i}", "member_id": "m-1", "merchant_id": merchant, "amount": amount,
                "occurred_at": f"{DAY}T12:3{i}:00+09:00"}
        assert api.post("/v1/payments", body).json()["status"] == "approved"
        ids.append(body["payment_id"])
    return ids


def test_settle_payouts_reconcile_reopen_and_reports(api):
    _book_a_day(api)
    assert api.post("/v1/settlements", {"business_date": DAY}, role="card-app").status_code == 403
    first = api.post("/v1/settlements", {"business_date": DAY}, role="finance")
    assert first.status_code == 201, first.text
    body = first.json()
    assert body["status"] == "settled" and body["business_date"] == DAY
    assert body["totals"]["run"]["sales_won"] == 80_000 and body["totals"]["run"]["payment_count"] == 3
    again = api.post("/v1/settlements", {"business_date": DAY}, role="finance")
    assert again.status_code == 200 and again.headers["Idempotent-Replayed"] == "true"
    assert again.json()["settlement_id"] == body["settlement_id"]
    # The replay is the first answer byte for byte, as /openapi.json says (the first had
    # its totals' keys in the order they were built, a replay as stored: sorted).
    assert again.content == first.content
    sid = body["settlement_id"]

    rows = api.get(f"/v1/settlements/{sid}/merchant-payouts", role="finance").json()["items"]
    fee = {r["merchant_id"]: (r["net_sales_won"], r["fee_won"]) for r in rows}
    assert fee == {"shop-a": (17_000, 0), "shop-b": (63_000, 63_000 * 55 // 10_000)}
    csv = api.get(f"/v1/settlements/{sid}/merchant-payouts?format=csv", role="auditor")
    assert csv.content.startswith(b"\xef\xbb\xbf") and csv.headers["content-type"].startswith("text/csv")
    parquet = api.get(f"/v1/settlements/{sid}/merchant-payouts?format=parquet", role="finance")
    assert pl.read_parquet(io.BytesIO(parquet.content)).height == 2
    assert api.get(f"/v1/settlements/{sid}/merchant-payouts?format=xlsx", role="finance").content[:2] == b"PK"
    assert api.get("/v1/settlements/nope/merchant-payouts", role="finance").json()["code"] == "settlement_not_found"

    clearing = ("승인번호,가맹점번호,거래금액,거래일시\n"
                f"p-0,shop-a,17000,{DAY} 12:30:00\n"
                f"p-1,shop-b,23100,{DAY} 12:31:00\n"
                f"ghost,shop-b,5000,{DAY} 12:40:00\n").encode("cp949")
    recon = api.client.post("/v1/reconciliations", content=clearing, headers={**api.h("finance"),
                                                                               "Content-Type": "text/csv"})
    assert recon.status_code == 200, recon.text
    r = recon.json()
    assert (len(r["matched"]), len(r["amount_mismatch"]), len(r["missing_in_ledger"]),
            len(r["missing_in_clearing"]), len(r["duplicates"])) == (1, 1, 1, 1, 0)  # API.md: the rows of each
    assert r["counts"]["matched"] == 1 and r["rows_truncated"] == {name: False for name in r["counts"]}
    assert r["missing_in_clearing"][0]["approval_id"] == "p-2"
    # Times in the rows: the microseconds as before, and RFC 3339 in Seoul beside them.
    missing = r["missing_in_clearing"][0]
    assert missing["occurred_at"] == f"{DAY}T12:32:00+09:00" and isinstance(missing["occurred_at_us"], int)
    assert r["amount_mismatch"][0]["difference_won"] == 100
    bad = api.client.post("/v1/reconciliations", content=b"approval_id,merchant_id,amount_won,transacted_at\n"
                                                         b"p-0,shop-a,ten,2026-11-03 12:00:00\n",
                          headers=api.h("finance"))
    assert bad.status_code == 422 and bad.json()["code"] == "clearing_file_invalid"
    assert bad.json()["errors"] == [{"line": 2, "reason": "amount_won is not a whole number of won"}]

    asked = api.post(f"/v1/settlements/{sid}/reopen-requests", {"reason": "fee tier was wrong"}, role="finance")
    assert asked.status_code == 201
    request_id = asked.json()["request_id"]
    same = api.post(f"/v1/settlement-reopen-requests/{request_id}/approve", role="finance")
    assert same.status_code == 403 and same.json()["code"] == "second_person_required"
    engine = make_engine(api.settings.database_url)
    _, second = create_key(engine, name="second finance", role="finance",
                           pepper=api.settings.key_pepper.get_secret_value())
    engine.dispose()
    approved = api.client.post(f"/v1/settlement-reopen-requests/{request_id}/approve",
                               headers={"Authorization": f"Bearer {second}"})
    assert approved.status_code == 200 and approved.json()["status"] == "reopened"
    corrected = api.post("/v1/settlements", {"business_date": DAY}, role="finance").json()
    assert corrected["kind"] == "correction" and corrected["status"] == "settled"

    daily = api.get(f"/v1/reports/daily/{DAY}", role="auditor")
    assert daily.status_code == 200 and "<svg" in daily.text and corrected["settlement_id"] in daily.text
    monthly = api.get("/v1/reports/monthly/2026-11", role="finance")
    assert monthly.status_code == 200 and monthly.text.count("<svg") >= 4
    listed = api.get("/v1/settlements?month=2026-11", role="finance").json()["items"]
    assert [i["status"] for i in listed] == ["superseded", "settled"]


def _second_key(api, name: str, role: str) -> str:
    engine = make_engine(api.settings.database_url)
    _, token = create_key(engine, name=name, role=role, pepper=api.settings.key_pepper.get_secret_value())
    engine.dispose()
    return token


def test_a_reopened_day_without_payouts_settles_again_as_a_correction(api):
    """A day with nothing recorded, settled, reopened by a second person and run again:
    the rerun was a 500 (polars `fill_null(None)`: no payout row to take a payout date
    from) and the day stayed `reopened`. Now it is a settled correction with no rows,
    and the first run is superseded (docs/settlement.md, "Reopening")."""
    day = "2026-11-04"
    first = api.post("/v1/settlements", {"business_date": day}, role="finance")
    assert first.status_code == 201, first.text
    sid = first.json()["settlement_id"]
    asked = api.post(f"/v1/settlements/{sid}/reopen-requests", {"reason": "recheck"}, role="finance")
    assert asked.status_code == 201, asked.text
    approved = api.client.post(f"/v1/settlement-reopen-requests/{asked.json()['request_id']}/approve",
                               headers={"Authorization": f"Bearer {_second_key(api, 'second finance', 'finance')}"})
    assert approved.status_code == 200 and approved.json()["status"] == "reopened", approved.text
    rerun = api.post("/v1/settlements", {"business_date": day}, role="finance")
    assert rerun.status_code == 201, rerun.text
    assert rerun.json()["kind"] == "correction" and rerun.json()["status"] == "settled", rerun.text
    assert rerun.json()["totals"]["payout_rows"] == 0
    listed = api.get("/v1/settlements?month=2026-11", role="finance").json()["items"]
    assert [(i["settlement_id"], i["status"]) for i in listed] == [(sid, "superseded"),
                                                                   (rerun.json()["settlement_id"], "settled")]


def test_the_settlement_list_pages_on_instead_of_stopping_at_the_oldest(api):
    """Without `month` the list held the 400 oldest settlements and said nothing: after a
    year of daily runs the newest never showed. Now it pages with `next_after`."""
    for day in ("2026-10-30", "2026-10-31", "2026-11-01", "2026-11-02"):
        assert api.post("/v1/settlements", {"business_date": day}, role="finance").status_code == 201
    seen, after = [], None
    while True:
        r = api.get("/v1/settlements", role="finance", params={"limit": 3, **({"after": after} if after else {})})
        assert r.status_code == 200, r.text
        seen += [i["business_date"] for i in r.json()["items"]]
        after = r.json()["next_after"]
        if after is None:
            break
    assert seen == ["2026-10-30", "2026-10-31", "2026-11-01", "2026-11-02"]
    assert api.get("/v1/settlements?month=2026-10", role="finance").json()["next_after"] is None
    assert api.get("/v1/settlements?limit=1001", role="finance").status_code == 422


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_sale_refunded_whole_over_later_days_costs_its_merchant_no_fee(api):
    """A 50,000 sale at 0.55% settled, then refunded 30,001 and 19,999 on the next two
    days, each settled: the fees were 275, −165, −109, 1 won on no sales (the refund
    audit); now 275, −166, −110."""
    from tests.book_helpers import pay, put_member, put_merchant, refund, topup
    from tests.conftest import at

    put_member(api, "m1")
    put_merchant(api, "shop", sales=800_000_000)
    topup(api, "t1", "m1", 100_000, at("2026-11-01"))
    pay(api, "p1", "m1", "shop", 50_000, at("2026-11-03"))
    rows = []
    for day, refund_id, amount in (("2026-11-03", None, 0), ("2026-11-04", "r1", 30_001), ("2026-11-05", "r2", 19_999)):
        if refund_id:
            refund(api, "p1", refund_id, amount, at(day))
        settled = api.post("/v1/settlements", {"business_date": day}, role="finance")
        assert settled.status_code == 201, settled.text
        rows += api.get(f"/v1/settlements/{settled.json()['settlement_id']}/merchant-payouts",
                        role="finance").json()["items"]
    assert [(r["net_sales_won"], r["fee_won"]) for r in rows] == [(50_000, 275), (-30_001, -166), (-19_999, -110)]
    assert sum(r["net_payable_won"] for r in rows) == 1  # the merchant got back a won more than it paid


def test_a_member_called_grant_does_not_stop_the_days_settlement(api):
    """`member/grant/charged` was read as a grant lot (its name holds "/grant/"): the day
    of a member called "grant" (a valid id) failed its checks and paid no merchant; a lot
    of theirs was read as program "grant/P" (settlement outputs audit)."""
    from tests.book_helpers import approve_program

    assert api.put("/v1/merchants/shop", {"name": "shop", "district": "seo", "category": "restaurant",
                                          "annual_sales": 600_000_000, "registered_from": "2019-01-01"}).status_code == 201
    assert api.put("/v1/members/grant", {"district": "seo"}).status_code == 201
    program = {"program_id": "relief", "name": "relief", "valid_from": "2026-10-01", "valid_until": "2026-12-31",
               "funding": {"city": 10000}, "amount_rules": {"base": [{"id": "flat", "amount_won": 5_000}]}}
    assert api.post("/v1/grant-programs", program, role="policy-editor").status_code == 201
    approve_program(api, "relief")
    r = api.post("/v1/grant-programs/relief/disbursements",
                 {"disbursement_id": "g1", "member_id": "grant", "occurred_at": at("2026-11-03", "07:00:00")},
                 role="policy-editor")
    assert r.status_code in (200, 201), r.text
    assert api.post("/v1/topups", {"topup_id": "t1", "member_id": "grant", "amount": 100_000,
                                   "occurred_at": at("2026-11-03", "08:00:00")}).status_code == 201
    paid = api.post("/v1/payments", {"payment_id": "p1", "member_id": "grant", "merchant_id": "shop",
                                     "amount": 20_000, "occurred_at": at("2026-11-03", "12:00:00")}).json()
    assert paid["status"] == "approved" and paid["spent"]["grants"] == 5_000, paid

    body = api.post("/v1/settlements", {"business_date": "2026-11-03"}, role="finance").json()
    assert body["status"] == "settled", [(c["name"], c["detail"]) for c in body["checks"] if not c["ok"]]
    rows = api.get(f"/v1/settlements/{body['settlement_id']}/merchant-payouts", role="finance").json()["items"]
    assert [(r["merchant_id"], r["sales_won"], r["fee_won"], r["net_payable_won"]) for r in rows] == [
        ("shop", 20_000, 110, 19_890)]
    grants = body["totals"]["dates"]["2026-11-03"]["grants"]
    assert (grants["disbursed_won"], grants["spent_won"]) == (5_000, 5_000), grants


def test_grant_money_a_refunds_clawback_kept_back_is_settled_as_not_restored(api):
    """A refund's clawback kept back from the grant money it restored (a program whose
    spending earns cashback, the points spent): the lot's clawback leg is netted out of
    the day's `restored_won`, and the grant flows still equal the lots' movement."""
    from tests.book_helpers import approve_program

    for merchant_id, sales in (("shop", 600_000_000), ("big", 9_000_000_000)):
        assert api.put(f"/v1/merchants/{merchant_id}", {"name": merchant_id, "district": "seo",
                                                        "category": "restaurant", "annual_sales": sales,
                                                        "registered_from": "2019-01-01"}).status_code == 201
    assert api.put("/v1/members/m1", {"district": "seo"}).status_code == 201
    program = {"program_id": "earns", "name": "earns", "valid_from": "2026-10-01", "valid_until": "2026-12-31",
               "funding": {"city": 10000}, "cashback_on_spend": True,
               "amount_rules": {"base": [{"id": "flat", "amount_won": 100_000}]}}
    assert api.post("/v1/grant-programs", program, role="policy-editor").status_code == 201
    approve_program(api, "earns")
    assert api.post("/v1/grant-programs/earns/disbursements",
                    {"disbursement_id": "g1", "member_id": "m1", "occurred_at": at("2026-11-03", "07:00:00")},
                    role="policy-editor").status_code == 201
    paid = api.post("/v1/payments", {"payment_id": "p1", "member_id": "m1", "merchant_id": "shop",
                                     "amount": 100_000, "occurred_at": at("2026-11-03", "12:00:00")}).json()
    assert paid["cashback"]["amount"] == 10_000, paid
    assert api.post("/v1/payments", {"payment_id": "p2", "member_id": "m1", "merchant_id": "big", "amount": 10_000,
                                     "occurred_at": at("2026-11-03", "12:30:00")}).json()["spent"]["points"] == 10_000
    back = api.post("/v1/payments/p1/refunds", {"refund_id": "r1", "amount": 100_000,
                                                "occurred_at": at("2026-11-03", "13:00:00")}).json()
    assert back["clawback_detail"]["withheld_from_grants"] == 10_000, back

    body = api.post("/v1/settlements", {"business_date": "2026-11-03"}, role="finance").json()
    assert body["status"] == "settled", [(c["name"], c["detail"]) for c in body["checks"] if not c["ok"]]
    grants = body["totals"]["dates"]["2026-11-03"]["grants"]
    assert (grants["disbursed_won"], grants["spent_won"], grants["restored_won"]) == (100_000, 100_000, 90_000)


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_payouts_too_many_for_an_xlsx_sheet_are_refused_not_a_500(api, monkeypatch):
    """More payout rows than a sheet holds answered 500 "an unexpected error", where the
    CLI says to use CSV or Parquet (settlement outputs audit). The sheet's limit is
    lowered here so that two rows pass it; a million rows take the same path."""
    from settlement import export

    _book_a_day(api)
    sid = api.post("/v1/settlements", {"business_date": DAY}, role="finance").json()["settlement_id"]
    monkeypatch.setattr(export, "XLSX_ROWS_MAX", 1)
    r = api.get(f"/v1/settlements/{sid}/merchant-payouts?format=xlsx", role="finance")
    assert r.status_code == 422 and r.json()["code"] == "sheet_too_large", r.text
    assert "use CSV or Parquet" in r.json()["detail"]
    assert api.get(f"/v1/settlements/{sid}/merchant-payouts?format=csv", role="finance").status_code == 200
