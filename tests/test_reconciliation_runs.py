"""A reconciliation's run is stored (`reconciliations`, migration 0020): read back by id,
listed by business date, audited, and shown by the finance endpoints' HTML reports, which
said "No clearing file reconciled" whatever had been reconciled. On SQLite and PostgreSQL."""

from __future__ import annotations

import hashlib

import pytest
from sqlalchemy import func, select
from typer.testing import CliRunner

from ledger.db import make_engine
from settlement import schema as ss
from tests.test_settlement_api import DAY, _book_a_day

pytestmark = pytest.mark.usefixtures("no_watermark_lag")  # tests/conftest.py

HEADER = "승인번호,가맹점번호,거래금액,거래일시\n"
# p-1 cleared 100 won high, a line of no payment, p-2 missing from the file
WRONG = (HEADER + f"p-0,shop-a,17000,{DAY} 12:30:00\np-1,shop-b,23100,{DAY} 12:31:00\n"
         f"ghost-1,shop-b,5000,{DAY} 12:40:00\n").encode("cp949")
# the network's corrected file: every payment, as booked
RIGHT = (HEADER + f"p-0,shop-a,17000,{DAY} 12:30:00\np-1,shop-b,23000,{DAY} 12:31:00\n"
         f"p-2,shop-b,40000,{DAY} 12:32:00\n").encode("cp949")


def _post(api, data: bytes, role: str = "finance", query: str = "", **headers):
    return api.client.post(f"/v1/reconciliations{query}", content=data,
                           headers={**api.h(role), "Content-Type": "text/csv", **headers})


def _runs(api) -> int:
    engine = make_engine(api.settings.database_url)
    try:
        with engine.connect() as conn:
            return conn.execute(select(func.count()).select_from(ss.reconciliations)).scalar_one()
    finally:
        engine.dispose()


def _section(html: str) -> str:
    """The report's reconciliation section."""
    start = html.index("<h2>Reconciliation exceptions</h2>")
    return html[start:html.index("<h2>", start + 4)]


def test_a_reconciled_day_shows_its_exceptions_in_the_reports_and_a_later_run_replaces_them(api):
    _book_a_day(api)
    assert api.post("/v1/settlements", {"business_date": DAY}, role="finance").status_code == 201
    before = _section(api.get(f"/v1/reports/daily/{DAY}", role="finance").text)
    assert "No clearing file reconciled" in before
    first = _post(api, WRONG)
    assert first.status_code == 200, first.text
    run_id = first.json()["reconciliation_id"]
    daily = _section(api.get(f"/v1/reports/daily/{DAY}", role="auditor").text)
    assert run_id in daily and "ghost-1" in daily and "amount_mismatch (1)" in daily
    assert "missing_in_clearing (1)" in daily and "No clearing file" not in daily
    monthly = _section(api.get("/v1/reports/monthly/2026-11", role="finance").text)
    assert run_id in monthly and "ghost-1" in monthly
    # Another day's report is not this file's.
    other = _section(api.get("/v1/reports/daily/2026-11-04", role="finance").text)
    assert "No clearing file reconciled" in other and "ghost-1" not in other

    second = _post(api, RIGHT)
    assert second.status_code == 200 and second.json()["counts"]["matched"] == 3
    later = second.json()["reconciliation_id"]
    assert later != run_id
    daily = _section(api.get(f"/v1/reports/daily/{DAY}", role="finance").text)
    assert later in daily and run_id not in daily and "ghost-1" not in daily
    monthly = _section(api.get("/v1/reports/monthly/2026-11", role="finance").text)
    assert later in monthly and "ghost-1" not in monthly


def test_the_stored_run_reads_back_as_it_was_answered(api):
    _book_a_day(api)
    posted = _post(api, WRONG, query="?rows_max=5")
    assert posted.status_code == 200, posted.text
    body = posted.json()
    run_id = body["reconciliation_id"]
    assert body["run"]["file_sha256"] == hashlib.sha256(WRONG).hexdigest()
    assert body["run"]["file_bytes"] == len(WRONG) and body["run"]["run_by"].startswith("test finance")
    assert body["amounts"]["amount_mismatch"] == {"clearing_won": 23_100, "ledger_won": 23_000}
    assert body["amounts"]["missing_in_ledger"] == {"clearing_won": 5_000, "ledger_won": 0}
    assert body["amounts"]["missing_in_clearing"] == {"clearing_won": 0, "ledger_won": 40_000}
    for role in ("finance", "auditor"):
        got = api.get(f"/v1/reconciliations/{run_id}", role=role)
        assert got.status_code == 200, got.text
        # The matched rows are not stored: the rest is the answer as given.
        assert got.json() == {**body, "matched": [], "rows_truncated": {**body["rows_truncated"], "matched": True}}
    assert body["matched"] and body["counts"]["matched"] == 1

    listed = api.get(f"/v1/reconciliations?date={DAY}", role="auditor")
    assert listed.status_code == 200, listed.text
    [item] = listed.json()["items"]
    assert item["reconciliation_id"] == run_id and item["business_dates"] == [DAY]
    assert item["counts"] == body["counts"] and listed.json()["next_after"] is None
    assert api.get("/v1/reconciliations?date=2026-11-04", role="finance").json()["items"] == []

    entries = api.get(f"/v1/audit-log?action=reconciliation.run&object_id={run_id}", role="auditor").json()["items"]
    assert len(entries) == 1 and entries[0]["actor"] == body["run"]["run_by"]
    assert entries[0]["detail"]["file_sha256"] == body["run"]["file_sha256"]
    assert entries[0]["detail"]["counts"] == body["counts"]


def test_the_same_file_again_is_a_new_run_and_the_list_pages(api):
    _book_a_day(api)
    ids = [_post(api, WRONG).json()["reconciliation_id"] for _ in range(3)]
    assert len(set(ids)) == 3
    page = api.get(f"/v1/reconciliations?date={DAY}&limit=2", role="finance").json()
    assert [i["reconciliation_id"] for i in page["items"]] == ids[:2] and page["next_after"] == ids[1]
    rest = api.get(f"/v1/reconciliations?date={DAY}&limit=2&after={ids[1]}", role="finance").json()
    assert [i["reconciliation_id"] for i in rest["items"]] == ids[2:] and rest["next_after"] is None
    assert [i["reconciliation_id"] for i in api.get("/v1/reconciliations", role="finance").json()["items"]] == ids


def test_unknown_ids_are_404_and_other_roles_403(api):
    missing = api.get("/v1/reconciliations/rec-0000000000000000", role="finance")
    assert missing.status_code == 404 and missing.json()["code"] == "reconciliation_not_found"
    assert api.get("/v1/reconciliations/bad%20id", role="finance").status_code == 422
    for role in ("card-app", "policy-editor", "admin"):
        assert api.get("/v1/reconciliations/rec-0000000000000000", role=role).status_code == 403
        assert api.get("/v1/reconciliations", role=role).status_code == 403
    assert _post(api, RIGHT, role="auditor").status_code == 403
    assert _runs(api) == 0


def test_a_refused_file_stores_nothing(api):
    _book_a_day(api)
    bad = _post(api, b"approval_id,merchant_id,amount_won,transacted_at\np-0,shop-a,ten,2026-11-03 12:00:00\n")
    assert bad.status_code == 422 and bad.json()["code"] == "clearing_file_invalid"
    assert _post(api, b"approval_id,merchant_id,amount_won,transacted_at\n").status_code == 422  # no lines
    assert _runs(api) == 0
    assert api.get("/v1/audit-log?action=reconciliation.run", role="auditor").json()["items"] == []


def test_a_multipart_upload_is_told_to_send_the_csv_as_the_body(api):
    """A form upload was read as the CSV: 422 "the header lacks approval_id, ..."."""
    _book_a_day(api)
    form = api.client.post("/v1/reconciliations", files={"file": ("clearing.csv", RIGHT, "text/csv")},
                           headers=api.h("finance"))
    assert form.status_code == 415, form.text
    assert form.json()["code"] == "unsupported_media_type" and "request body" in form.json()["detail"]
    assert _runs(api) == 0
    # The other CSV upload answers the same.
    bulk = api.client.post("/v1/grant-programs/any/disbursements/bulk", headers=api.h("policy-editor"),
                           files={"file": ("r.csv", b"disbursement_id,member_id\nd-1,m-1\n", "text/csv")})
    assert bulk.status_code == 415 and bulk.json()["code"] == "unsupported_media_type", bulk.text


def test_eum_reconcile_stores_its_run_for_the_reports(api, monkeypatch, tmp_path):
    """The command reads and writes the book the service does: its run is the day's latest."""
    from eum import settings as settings_module
    from eum.cli import app

    _book_a_day(api)
    _post(api, RIGHT)
    monkeypatch.setenv("EUM_DATABASE_URL", api.settings.database_url)
    settings_module.get_settings.cache_clear()
    path = tmp_path / "clearing.csv"
    path.write_bytes(WRONG)
    try:
        out = CliRunner().invoke(app, ["reconcile", str(path)])
    finally:
        settings_module.get_settings.cache_clear()
    assert out.exit_code == 1, (out.output, out.exception)
    assert "reconciliation rec-" in out.stdout
    run_id = out.stdout.split("reconciliation ", 1)[1].split()[0]
    got = api.get(f"/v1/reconciliations/{run_id}", role="auditor").json()
    assert got["run"]["run_by"].endswith("(eum cli)") and got["counts"]["missing_in_ledger"] == 1
    daily = _section(api.get(f"/v1/reports/daily/{DAY}", role="finance").text)
    assert run_id in daily and "ghost-1" in daily


def test_a_run_keeps_at_most_its_rows_max_or_what_the_report_shows_of_each_category(api):
    """Exception rows past the cap are not kept: their count and amounts are, and the
    report says how many it does not show."""
    _book_a_day(api)
    ghosts = "".join(f"ghost-{i:03d},shop-b,1000,{DAY} 12:40:00\n" for i in range(250)).encode()
    few = _post(api, RIGHT + ghosts, query="?rows_max=0").json()
    assert few["missing_in_ledger"] == [] and few["rows_truncated"]["missing_in_ledger"]
    assert few["counts"]["missing_in_ledger"] == 250 and few["amounts"]["missing_in_ledger"]["clearing_won"] == 250_000
    got = api.get(f"/v1/reconciliations/{few['reconciliation_id']}", role="finance").json()
    assert got["missing_in_ledger"] == [] and got["counts"] == few["counts"]
    daily = _section(api.get(f"/v1/reports/daily/{DAY}", role="finance").text)
    assert "missing_in_ledger (250)" in daily and "50 more rows not shown" in daily  # 200 kept for it
    assert "ghost-199" in daily and "ghost-200" not in daily

    many = _post(api, RIGHT + ghosts, query="?rows_max=220").json()
    assert len(many["missing_in_ledger"]) == 220
    got = api.get(f"/v1/reconciliations/{many['reconciliation_id']}", role="finance").json()
    assert got["missing_in_ledger"] == many["missing_in_ledger"] and got["rows_truncated"]["missing_in_ledger"]
