"""The bulk grant writer (ledger/bulk.py) on both backends: exactly once per
disbursement_id across re-uploads, bad rows reported by line while the others land,
money conserved to the won (funders' legs = Σ of each row's floored split), the member's
history, settlement's grant flows, and expiry back to the funders."""

import datetime as dt
import json
import shutil
import time

import polars as pl
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy import func, select

from ledger import bulk, grant_jobs
from ledger import schema as s
from rules.evaluate import split_floor
from tests.book_helpers import account_balance, approve_program, assert_book_ok, legs_sum
from tests.conftest import POLICIES, at

# A program with a three-way split whose floors leave remainders (national 3333 bp, ...).
PROGRAM = {
    "program_id": "bulk-test", "name": "bulk test grant", "valid_from": "2025-07-01", "valid_until": "2025-11-30",
    "restrictions": {}, "funding": {"national": 3333, "city": 3334, "seo": 3333}, "remainder_to": "city",
    "cashback_on_spend": False,
    "once_per_member": False,  # these tests give a member a second disbursement on purpose
    "amount_rules": {"base": [{"id": "general", "amount_won": 100_001}],
                     "add_ons": [{"id": "ganghwa", "when": {"district": ["ganghwa"]}, "amount_won": 50_003}]},
}
PATH = "/v1/grant-programs/bulk-test/disbursements/bulk?occurred_at=2025-08-01T09:00:00%2B09:00"
MEMBERS = {f"m{i}": ("ganghwa" if i % 3 == 0 else "seo") for i in range(1, 12)}


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 4 rows, so a small file crosses several batch transactions."""
    monkeypatch.setattr(bulk, "CHUNK_ROWS_MAX", 4)
    monkeypatch.setattr(grant_jobs, "CHUNK_ROWS_MAX", 4)
    original = bulk.chunks
    monkeypatch.setattr(grant_jobs, "chunks", lambda rows, size=4: original(rows, size))


def _setup(api):
    for member, district in MEMBERS.items():
        assert api.put(f"/v1/members/{member}", {"district": district}).status_code == 201
    api.put("/v1/merchants/shop", {"name": "shop", "district": "seo", "category": "grocery",
                                   "annual_sales": 100_000_000, "registered_from": "2019-01-01"})
    assert api.post("/v1/grant-programs", PROGRAM, role="policy-editor").status_code == 201
    approve_program(api, PROGRAM["program_id"])


def _upload(api, text: str) -> dict:
    headers = {**api.h("policy-editor"), "Content-Type": "text/csv"}
    r = api.client.post(PATH, content=text.encode(), headers=headers)
    assert r.status_code == 200, r.text
    return r.json()


CSV = ("disbursement_id,member_id,district,amount\n"
       "b1,m1,seo,\n"            # line 2: 100,001
       "b2,m2,seo,\n"            # line 3
       "b3,m3,ganghwa,\n"        # line 4: 150,004
       "b4,nobody,seo,\n"        # line 5: unknown member
       "b5,m5,seo,abc\n"         # line 6: bad amount
       "b6,m6,ganghwa,\n"        # line 7
       ",m7,seo,\n"              # line 8: no id
       "b8,m8,seo,77777\n"       # line 9: an explicit amount
       "b9,m1,seo,\n"            # line 10: m1 again, another id: a second disbursement
       "b10,m10,seo,0\n"         # line 11: amount out of range
       "b11,m11,seo,\n"          # line 12
       "b2,m2,seo,\n")           # line 13: the same row again in the file: a replay


def test_bulk_exactly_once_bad_rows_reported_money_conserved(api, small_chunks):
    _setup(api)
    # m2 already holds a lot of this program from a single disbursement: the bulk row adds to it.
    r = api.post("/v1/grant-programs/bulk-test/disbursements",
                 {"disbursement_id": "single-1", "member_id": "m2", "amount": 10_000,
                  "occurred_at": at("2025-07-15")}, role="policy-editor")
    assert r.status_code == 201, r.text

    report = _upload(api, CSV)
    good = {"b1": 100_001, "b2": 100_001, "b3": 150_004, "b6": 150_004, "b8": 77_777, "b9": 100_001,
            "b11": 100_001}
    assert report["rows"] == 12
    assert report["disbursed"] == len(good) and report["replayed"] == 1, report
    assert report["amount"] == sum(good.values())
    errors = {e["line"]: e for e in report["errors"]}
    assert sorted(errors) == [5, 6, 8, 11], errors
    assert "member_not_found" in errors[5]["error"] and errors[5]["disbursement_id"] == "b4"

    # Exactly once: the same file again disburses nothing; a changed row is a conflict.
    again = _upload(api, CSV)
    assert again["disbursed"] == 0 and again["replayed"] == len(good) + 1 and again["amount"] == 0
    conflict = _upload(api, "disbursement_id,member_id,amount\nb1,m1,5\n")
    assert conflict["disbursed"] == 0 and "idempotency_conflict" in conflict["errors"][0]["error"]
    with api.services.reader.connect() as conn:
        rows = conn.execute(select(func.count()).select_from(s.grant_disbursements)).scalar_one()
    assert rows == len(good) + 1  # + the single disbursement

    # Money: each lot holds what its rows gave; funders put in Σ of each row's floored split.
    by_member: dict[str, int] = {"m2": 10_000}
    members = {"b1": "m1", "b2": "m2", "b3": "m3", "b6": "m6", "b8": "m8", "b9": "m1", "b11": "m11"}
    for did, amount in good.items():
        by_member[members[did]] = by_member.get(members[did], 0) + amount
    for member, amount in by_member.items():
        assert account_balance(api, f"member/{member}/grant/bulk-test") == amount
        assert -legs_sum(api, f"member/{member}/grant/bulk-test") == amount
    expected_funders: dict[str, int] = {}
    for amount in [10_000, *good.values()]:
        for source, part in split_floor(amount, tuple(PROGRAM["funding"].items()), "city").items():
            expected_funders[source] = expected_funders.get(source, 0) + part
    for source, amount in expected_funders.items():
        assert account_balance(api, f"grantfund/bulk-test/{source}") == amount
    money = api.get("/v1/grant-programs/bulk-test", role="policy-editor").json()["money"]
    assert money["disbursed"] == sum(good.values()) + 10_000 == sum(money["funders_net"].values())
    assert money["held_by_members"] == money["disbursed"]
    assert_book_ok(api)

    # The member's answer and history: a bulk row replays through the single endpoint
    # with the answer the book would have given, and shows in the history as its own item.
    replay = api.post("/v1/grant-programs/bulk-test/disbursements",
                      {"disbursement_id": "b3", "member_id": "m3", "attributes": {"district": "ganghwa"},
                       "occurred_at": "2025-08-01T09:00:00+09:00"},  # the file's time: the same request
                      role="policy-editor")
    assert replay.status_code == 200 and replay.headers.get("Idempotent-Replayed") == "true", replay.text
    assert replay.json()["balances"]["grants"] == [{"program_id": "bulk-test", "amount": 150_004,
                                                    "expires_at": "2025-12-01T00:00:00+09:00"}]
    history = api.get("/v1/members/m1/transactions?limit=1").json()
    assert [i["ref"] for i in history["items"]] == ["b9"]
    assert history["items"][0]["balance_changes"] == {"charged": 0, "points": 0, "grants": 100_001, "owed": 0}
    rest = api.get(f"/v1/members/m1/transactions?limit=5&cursor={history['next_cursor']}").json()
    assert [i["ref"] for i in rest["items"]] == ["b1"] and rest["next_cursor"] is None
    m2 = api.get("/v1/members/m2/transactions").json()["items"]
    assert [(i["ref"], i["balance_changes"]["grants"]) for i in m2] == [("b2", 100_001), ("single-1", 10_000)]
    # filtered, a bulk row's transaction (no member of its own) is found by its kind and month too
    for params, want in (({"kind": "grant"}, ["b2", "single-1"]), ({"kind": "topup"}, []),
                         ({"month": "2025-08"}, ["b2"]), ({"month": "2025-07"}, ["single-1"]),
                         ({"month": "2024-01"}, []),
                         ({"kind": "grant", "limit": 1}, ["b2"])):
        got = api.get("/v1/members/m2/transactions", params=params).json()["items"]
        assert [i["ref"] for i in got] == want, params


def test_bulk_grants_spent_settled_and_expired_back_to_funders(api, small_chunks):
    _setup(api)
    rows = "".join(f"e{i},{m},{d}\n" for i, (m, d) in enumerate(MEMBERS.items()))
    report = _upload(api, "disbursement_id,member_id,district\n" + rows)
    assert report["disbursed"] == len(MEMBERS) and not report["errors"]
    # One member spends part of the grant, then the program ends.
    r = api.post("/v1/payments", {"payment_id": "p1", "member_id": "m3", "merchant_id": "shop", "amount": 30_000,
                                  "occurred_at": at("2025-08-02")})
    assert r.status_code == 201 and r.json()["spent"]["grants"] == 30_000, r.text

    # Settlement of the disbursement day attributes the bulk lots to the members' districts.
    from settlement.service import settle

    later = lambda: time.time_ns() // 1000 + 3_600_000_000  # past the watermark lag  # noqa: E731
    result = settle(api.services.engine, dt.date(2025, 8, 1), actor="test", clock=later)
    assert result.status == "settled", result.checks
    flows = {(g["district"], g["program_id"]): g["disbursed_won"] for g in result.totals["grants"]}
    ganghwa = sum(150_004 for d in MEMBERS.values() if d == "ganghwa")
    seo = sum(100_001 for d in MEMBERS.values() if d == "seo")
    assert flows == {("ganghwa", "bulk-test"): ganghwa, ("seo", "bulk-test"): seo}

    out = api.post("/v1/grant-programs/bulk-test/expire", {"as_of": at("2025-12-02")}, role="policy-editor").json()
    assert out["lots_expired"] == len(MEMBERS) and out["returned"] == ganghwa + seo - 30_000
    money = api.get("/v1/grant-programs/bulk-test", role="policy-editor").json()["money"]
    assert money["held_by_members"] == 0
    assert money["disbursed"] == money["spent_net_of_refunds"] + money["returned_to_funders"]
    assert sum(money["funders_net"].values()) == 30_000  # what was spent stays funded; the rest came back

    # Settled, each funder's grant money per day (put in on the 1st, back with the expiry)
    # sums to that funder's grantfund account: the settlement's figures are the book's.
    funded = result.totals["dates"]["2025-08-01"]["grants_by_source"]
    expected: dict[str, int] = {}
    for district in MEMBERS.values():
        amount = 150_004 if district == "ganghwa" else 100_001
        for source, part in split_floor(amount, tuple(PROGRAM["funding"].items()), "city").items():
            expected[source] = expected.get(source, 0) + part
    assert {k: (v["funded_won"], v["returned_won"], v["net_won"]) for k, v in funded.items()} == {
        k: (v, 0, v) for k, v in expected.items()}
    assert sum(v["funded_won"] for v in funded.values()) == ganghwa + seo
    expiry_day = settle(api.services.engine, dt.date(2025, 12, 2), actor="test", clock=later)
    assert expiry_day.status == "settled", expiry_day.checks
    back = expiry_day.totals["dates"]["2025-12-02"]["grants_by_source"]
    assert sum(v["returned_won"] for v in back.values()) == ganghwa + seo - 30_000
    from settlement import report as report_mod
    from settlement.service import stored_flows

    with api.services.reader.connect() as conn:
        flows = stored_flows(conn)["grant_funders"]
        html = report_mod.render(report_mod.day_data(conn, dt.date(2025, 12, 2), with_abuse=False))
    net = flows.group_by("source").agg(pl.col("grant_net_won").sum())
    assert {r[0]: r[1] for r in net.iter_rows()} == {
        source: account_balance(api, f"grantfund/bulk-test/{source}") for source in PROGRAM["funding"]}
    assert "Grant programs" in html and f"{ganghwa + seo - 30_000:,}" in html
    assert_book_ok(api)


def test_shipped_program_rows_match_the_single_path(api):
    """The 2025 coupon from its file: bulk amounts and splits equal the book's one-by-one
    disbursements of the same rows (funders' totals to the won)."""
    coupon = yaml.safe_load((POLICIES / "grants" / "2025-07-livelihood-coupon-round1.yaml").read_text())
    for member, district in MEMBERS.items():
        api.put(f"/v1/members/{member}", {"district": district})
    body = {**coupon, "valid_from": "2025-07-21", "valid_until": "2025-11-30"}
    assert api.post("/v1/grant-programs", body, role="policy-editor").status_code == 201
    approve_program(api, body["program_id"])
    statuses = ["general", "basic_livelihood", "near_poor"]
    rows = [(f"c{i}", m, statuses[i % 3], d) for i, (m, d) in enumerate(MEMBERS.items())]
    headers = {**api.h("policy-editor"), "Content-Type": "text/csv"}
    text = "disbursement_id,member_id,income_status,district\n" + "".join(",".join(r) + "\n" for r in rows)
    report = api.client.post("/v1/grant-programs/coupon-2025-r1/disbursements/bulk"
                             "?occurred_at=2025-08-01T09:00:00%2B09:00", content=text.encode(), headers=headers).json()
    assert report["disbursed"] == len(rows), report
    national = city = 0
    for _, member, status, district in rows:
        amount = {"general": 150_000, "basic_livelihood": 400_000, "near_poor": 300_000}[status]
        amount += 50_000 if district == "ganghwa" else 0
        parts = split_floor(amount, (("national", 8000), ("city", 2000)), "national")
        national, city = national + parts["national"], city + parts["city"]
        assert account_balance(api, f"member/{member}/grant/coupon-2025-r1") == amount
    assert account_balance(api, "grantfund/coupon-2025-r1/national") == national
    assert account_balance(api, "grantfund/coupon-2025-r1/city") == city
    assert report["amount"] == national + city
    assert_book_ok(api)


def test_a_file_without_a_district_column_is_paid_by_the_registrys_district(api, small_chunks):
    """The coupon's +5만 in Ganghwa/Ongjin: a file with no district column pays what one
    disbursement pays, by the member's district in the registry (it paid 150,000 and
    400,000, and once_per_member then refused the 5만 made up). A district sent that is
    not the registry's is still refused; an amount sent is held to the rules for the
    registry's district."""
    coupon = yaml.safe_load((POLICIES / "grants" / "2025-07-livelihood-coupon-round1.yaml").read_text())
    members = {"gh-1": "ganghwa", "gh-2": "ganghwa", "oj-3": "ongjin", "seo-4": "seo", "gh-5": "ganghwa",
               "gh-6": "ganghwa", "seo-7": "seo"}
    for member, district in members.items():
        assert api.put(f"/v1/members/{member}", {"district": district}).status_code == 201
    body = {**coupon, "valid_from": "2025-07-21", "valid_until": "2025-11-30"}
    assert api.post("/v1/grant-programs", body, role="policy-editor").status_code == 201
    approve_program(api, body["program_id"])
    single = api.post("/v1/grant-programs/coupon-2025-r1/disbursements",
                      {"disbursement_id": "one-1", "member_id": "gh-1", "occurred_at": at("2025-08-01"),
                       "attributes": {"income_status": "general"}}, role="policy-editor")
    assert single.status_code == 201 and single.json()["amount"] == 200_000, single.text
    text = ("disbursement_id,member_id,income_status,amount\n"
            "c2,gh-2,general,\n"              # line 2: 150,000 + 50,000
            "c3,oj-3,basic_livelihood,\n"     # line 3: 400,000 + 50,000
            "c4,seo-4,general,\n"             # line 4: 150,000
            "c5,gh-5,general,200000\n"        # line 5: an amount sent, within the rules for Ganghwa
            "c6,gh-6,general,200001\n"        # line 6: more than the rules give a Ganghwa resident
            "c7,nobody,general,\n")           # line 7: no such member
    report = api.client.post("/v1/grant-programs/coupon-2025-r1/disbursements/bulk"
                             "?occurred_at=2025-08-01T09:00:00%2B09:00", content=text.encode(),
                             headers={**api.h("policy-editor"), "Content-Type": "text/csv"}).json()
    paid = {"gh-1": 200_000, "gh-2": 200_000, "oj-3": 450_000, "seo-4": 150_000, "gh-5": 200_000}
    assert report["disbursed"] == 4 and report["amount"] == 1_000_000, report
    errors = {e["line"]: e["error"] for e in report["errors"]}
    assert sorted(errors) == [6, 7] and errors[6].startswith("amount_not_computable: 200,001 won is more than"), errors
    assert errors[7].startswith("member_not_found"), errors
    for member, amount in paid.items():
        assert account_balance(api, f"member/{member}/grant/coupon-2025-r1") == amount
    assert account_balance(api, "member/gh-6/grant/coupon-2025-r1") == 0
    # a district sent that is not the registry's is still refused
    mismatch = api.client.post("/v1/grant-programs/coupon-2025-r1/disbursements/bulk",
                               content=b"disbursement_id,member_id,income_status,district\nc8,seo-7,general,ganghwa\n",
                               headers={**api.h("policy-editor"), "Content-Type": "text/csv"}).json()
    assert mismatch["disbursed"] == 0 and mismatch["errors"][0]["error"].startswith("district_mismatch"), mismatch
    # the row is the same request as one disbursement sent with its attributes: it replays
    replay = api.post("/v1/grant-programs/coupon-2025-r1/disbursements",
                      {"disbursement_id": "c2", "member_id": "gh-2", "attributes": {"income_status": "general"},
                       "occurred_at": "2025-08-01T09:00:00+09:00"}, role="policy-editor")
    assert replay.status_code == 200 and replay.json()["amount"] == 200_000, replay.text
    money = api.get("/v1/grant-programs/coupon-2025-r1", role="policy-editor").json()["money"]
    assert money["disbursed"] == sum(paid.values()) == sum(money["funders_net"].values())
    assert_book_ok(api)


def test_a_program_given_once_per_member_refuses_a_second_disbursement_in_bulk_or_alone(api, small_chunks):
    """A relief grant is given to a member once (the default): one officer's key must not
    pay the same person again under a new disbursement id, alone, in a file, or twice
    in one file. Nothing of a refused row is written."""
    from tests.book_helpers import snapshot

    _setup(api)
    once = {**PROGRAM, "program_id": "once-test", "once_per_member": True}
    assert api.post("/v1/grant-programs", once, role="policy-editor").status_code == 201
    approve_program(api, "once-test")
    path = PATH.replace("bulk-test", "once-test")
    single = "/v1/grant-programs/once-test/disbursements"
    body = {"member_id": "m1", "occurred_at": at("2025-08-01")}
    assert api.post(single, {"disbursement_id": "o1", **body}, role="policy-editor").status_code == 201
    before = snapshot(api)
    again = api.post(single, {"disbursement_id": "o2", **body}, role="admin")
    assert again.status_code == 409 and again.json()["code"] == "already_disbursed", again.text
    assert snapshot(api) == before
    headers = {**api.h("policy-editor"), "Content-Type": "text/csv"}
    report = api.client.post(path, content=b"disbursement_id,member_id\no3,m1\no4,m2\no5,m2\no6,m4\n",
                             headers=headers).json()
    assert report["disbursed"] == 2 and report["amount"] == 2 * 100_001, report  # m2 once, m4
    errors = {e["line"]: e for e in report["errors"]}
    assert sorted(errors) == [2, 4] and all("already_disbursed" in e["error"] for e in errors.values()), errors
    held = {m: api.get(f"/v1/members/{m}/balance").json()["balances"]["grants"] for m in ("m1", "m2")}
    assert held == {"m1": [{"program_id": "once-test", "amount": 100_001, "expires_at": held["m1"][0]["expires_at"]}],
                    "m2": [{"program_id": "once-test", "amount": 100_001, "expires_at": held["m2"][0]["expires_at"]}]}
    # the original id replays as ever
    assert api.post(single, {"disbursement_id": "o1", **body}, role="policy-editor").status_code == 200
    assert_book_ok(api)


def test_bulk_ids_follow_the_apis_id_rules(api, small_chunks):
    """A file's ids are held to what the API takes (letters, digits, . _ : -): a formula or
    a control character would otherwise be stored as a ledger reference and shown in
    histories, audits and exports."""
    from tests.book_helpers import snapshot

    _setup(api)
    before = snapshot(api)
    text = "disbursement_id,member_id\n=cmd|' /C calc'!A0,m1\n\"a b\tc;DROP\",m2\nok-1,m\x1b3\n"
    report = _upload(api, text)
    assert report["disbursed"] == 0 and sorted(e["line"] for e in report["errors"]) == [2, 3, 4], report
    assert all("1-64 letters, digits" in e["error"] for e in report["errors"])
    assert snapshot(api) == before


def test_a_file_sent_with_a_time_is_resumed_from_the_cli_with_the_same_time(api, tmp_path, monkeypatch):
    """`eum grants disburse --occurred-at` gives each row the request the API's bulk upload
    gave it: a file first sent there with a time replays from the command line (without
    the time it would be another request: a conflict per row)."""
    from typer.testing import CliRunner

    from eum.cli import app as cli
    from eum.settings import get_settings

    _setup(api)
    text = "disbursement_id,member_id\nc1,m1\nc2,m2\n"
    assert _upload(api, text)["disbursed"] == 2  # PATH sends occurred_at=2025-08-01T09:00:00+09:00
    path = tmp_path / "recipients.csv"
    path.write_text(text + "c3,m4\n")
    monkeypatch.setenv("EUM_DATABASE_URL", api.services.settings.database_url)
    get_settings.cache_clear()
    try:
        run = CliRunner().invoke(cli, ["grants", "disburse", "bulk-test", str(path),
                                       "--occurred-at", "2025-08-01T09:00:00+09:00", "--actor", "Kim"])
        assert run.exit_code == 0, run.output
        assert '"disbursed":1' in run.output and '"replayed":2' in run.output, run.output
        late = CliRunner().invoke(cli, ["grants", "disburse", "bulk-test", str(path), "--occurred-at", "2150-01-01"])
        assert late.exit_code == 2 and "2099" in late.output, late.output
    finally:
        get_settings.cache_clear()


def _cli(api, monkeypatch, *args: str):
    """`eum ARGS` against the api fixture's database."""
    from typer.testing import CliRunner

    from eum.cli import app as cli
    from eum.settings import get_settings

    monkeypatch.setenv("EUM_DATABASE_URL", api.services.settings.database_url)
    get_settings.cache_clear()
    try:
        return CliRunner().invoke(cli, list(args))
    finally:
        get_settings.cache_clear()


def _audited(api) -> int:
    with api.services.reader.connect() as conn:
        return conn.execute(select(func.count()).select_from(s.audit_log)).scalar_one()


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_the_cli_refuses_what_it_cannot_start_on_in_one_line(api, tmp_path, monkeypatch):
    """`eum grants disburse` and `eum grants expire` refuse an unknown program, a draft, a
    file that cannot be read, has no recipients' header or a column the program's amount
    rules do not read, a bad time and a program not yet ended with one `error:` line and
    exit 2 (exit 1 is "some rows were refused"): nothing disbursed or returned, nothing
    audited, never a traceback."""
    from tests.book_helpers import snapshot

    _setup(api)
    draft = {**PROGRAM, "program_id": "draft-test"}
    assert api.post("/v1/grant-programs", draft, role="policy-editor").status_code == 201
    running = {**PROGRAM, "program_id": "running-test", "valid_until": "2099-11-30"}
    assert api.post("/v1/grant-programs", running, role="policy-editor").status_code == 201
    approve_program(api, "running-test")
    good = tmp_path / "recipients.csv"
    good.write_text("disbursement_id,member_id\nr1,m1\n")
    no_id = tmp_path / "no-id.csv"
    no_id.write_text("member_id,amount\nm1,1000\n")
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    binary = tmp_path / "binary.csv"
    binary.write_bytes(b"\xff\xfe\x00\x81 not text")
    typo = tmp_path / "typo.csv"  # the rules read district: the typo was dropped, m3 paid without the add-on
    typo.write_text("disbursement_id,member_id,distrct\nr1,m3,ganghwa\n")
    before, audited = snapshot(api), _audited(api)
    for args, words in (
            (["disburse", "nope", str(good)], ["grant_program_not_found", "nope"]),
            (["disburse", "draft-test", str(good)], ["grant_program_not_approved", "draft-test"]),
            (["disburse", "bulk-test", str(tmp_path / "absent.csv")], ["absent.csv", "No such file"]),
            (["disburse", "bulk-test", str(tmp_path)], [str(tmp_path), "directory"]),
            (["disburse", "bulk-test", str(no_id)], ["no-id.csv", "disbursement_id"]),
            (["disburse", "bulk-test", str(empty)], ["empty.csv", "disbursement_id"]),
            (["disburse", "bulk-test", str(binary)], ["binary.csv", "UTF-8 or CP949"]),
            (["disburse", "bulk-test", str(typo)], ["typo.csv", "'distrct'", "district"]),
            (["disburse", "bulk-test", str(good), "--occurred-at", "yesterday"], ["--occurred-at", "yesterday"]),
            (["disburse", "bulk-test", str(good), "--occurred-at", "2150-01-01"], ["--occurred-at", "2099"]),
            (["disburse", "bulk-test", str(good), "--occurred-at", "0001-01-01T00:00:00+14:00"],
             ["--occurred-at", "2099"]),  # was an OverflowError traceback
            (["expire", "nope"], ["grant_program_not_found", "nope"]),
            (["expire", "draft-test"], ["grant_program_not_approved"]),
            (["expire", "running-test"], ["grant_program_not_expired", "2099-12-01"]),
            (["disburse", "bulk-test", str(good), "--actor", "bob\u202e"], ["--on-behalf-of", "U+202E"]),
            (["expire", "bulk-test", "--on-behalf-of", "bob\nroot (eum cli)"], ["--on-behalf-of", "U+000A"])):
        out = _cli(api, monkeypatch, "grants", *args)
        assert out.exit_code == 2, (args, out.exit_code, out.output, out.exception)
        assert out.exception is None or isinstance(out.exception, SystemExit), (args, out.exception)
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), (args, out.stderr)
        assert all(word in lines[0] for word in words), (args, words, lines[0])
        assert "Traceback" not in out.output
    assert snapshot(api) == before and _audited(api) == audited

    # Rows refused one by one are exit 1, the others disbursed; the help says which is which.
    (tmp_path / "rows.csv").write_text("disbursement_id,member_id\nr1,m1\nr2,nobody\n")
    out = _cli(api, monkeypatch, "grants", "disburse", "bulk-test", str(tmp_path / "rows.csv"),
               "--occurred-at", "2025-08-01")
    assert out.exit_code == 1 and '"disbursed":1' in out.stdout, out.output
    assert json.loads(out.stdout.splitlines()[-1])["disbursed"] == 1  # JSON, not a Python dict's repr
    assert "line 3: member_not_found" in out.stderr, out.stderr
    helped = _cli(api, monkeypatch, "grants", "disburse", "--help")
    assert all(word in " ".join(helped.stdout.split()) for word in ("Exit 0", "1:", "2:", "3:")), helped.stdout


def test_a_file_dated_ahead_of_the_clock_is_refused_whole_as_one_disbursement_is(api, tmp_path, monkeypatch):
    """One disbursement dated 2030 is 422 occurred_at_in_future; the same time on a file
    (the upload's occurred_at, `eum grants disburse --occurred-at`) was recorded, its
    lots on business date 2030. Now the whole file is refused before anything is
    written: 422 from the API, exit 2 with one `error:` line from the command line."""
    from tests.book_helpers import snapshot

    _setup(api)
    running = {**PROGRAM, "program_id": "running-test", "valid_until": "2099-11-30"}
    assert api.post("/v1/grant-programs", running, role="policy-editor").status_code == 201
    approve_program(api, "running-test")
    one = api.post("/v1/grant-programs/running-test/disbursements",
                   {"disbursement_id": "f0", "member_id": "m1", "occurred_at": "2030-01-01T00:00:00+09:00"},
                   role="policy-editor")
    assert one.status_code == 422 and one.json()["code"] == "occurred_at_in_future", one.text
    before, audited = snapshot(api), _audited(api)
    r = api.client.post("/v1/grant-programs/running-test/disbursements/bulk?occurred_at=2030-01-01T00:00:00%2B09:00",
                        content=b"disbursement_id,member_id\nf1,m1\nf2,m2\n",
                        headers={**api.h("policy-editor"), "Content-Type": "text/csv"})
    assert r.status_code == 422 and r.json()["code"] == "occurred_at_in_future", r.text
    path = tmp_path / "recipients.csv"
    path.write_text("disbursement_id,member_id\nf1,m1\nf2,m2\n")
    out = _cli(api, monkeypatch, "grants", "disburse", "running-test", str(path), "--occurred-at", "2030-01-01")
    assert out.exit_code == 2, out.output
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: occurred_at_in_future"), out.stderr
    assert snapshot(api) == before and _audited(api) == audited
    # A time within the skew, and no time at all, are recorded as before.
    soon = dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "%2B00:00")
    r = api.client.post(f"/v1/grant-programs/running-test/disbursements/bulk?occurred_at={soon}",
                        content=b"disbursement_id,member_id\nf1,m1\n",
                        headers={**api.h("policy-editor"), "Content-Type": "text/csv"})
    assert r.status_code == 200 and r.json()["disbursed"] == 1, r.text
    path.write_text("disbursement_id,member_id\nf2,m2\n")
    assert _cli(api, monkeypatch, "grants", "disburse", "running-test", str(path)).exit_code == 0
    assert_book_ok(api)


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_the_cli_records_its_os_account_as_the_actor_whatever_actor_it_is_told(api, tmp_path, monkeypatch):
    """`eum grants disburse/expire --actor "bob (8a2963892f53)"` wrote that string as the
    audit entries' actor (and each row's), which reads as an API key holder's. The actor
    is the OS account with `eum cli` (docs/design.md, "The audit log"); what --actor (now
    --on-behalf-of) said is kept as the detail `on_behalf_of`."""
    from ledger.keys import operator

    _setup(api)
    claimed = "bob (8a2963892f53)"
    path = tmp_path / "recipients.csv"
    path.write_text("disbursement_id,member_id\nk1,m1\nk2,m2\n")
    out = _cli(api, monkeypatch, "grants", "disburse", "bulk-test", str(path), "--occurred-at", "2025-08-01",
               "--actor", claimed)
    assert out.exit_code == 0 and '"disbursed":2' in out.stdout, out.output
    out = _cli(api, monkeypatch, "grants", "expire", "bulk-test", "--on-behalf-of", claimed)
    assert out.exit_code == 0 and '"lots_expired":2' in out.stdout, out.output
    assert json.loads(out.stdout.splitlines()[-1])["lots_expired"] == 2  # JSON, not a Python dict's repr
    log = api.get("/v1/audit-log", role="auditor", params={"object_id": "bulk-test"}).json()["items"]
    entries = {e["action"]: e for e in log if e["action"] in ("grant_program.disburse_bulk", "grant_program.expire")}
    assert set(entries) == {"grant_program.disburse_bulk", "grant_program.expire"}, log
    for entry in entries.values():
        assert entry["actor"] == operator() and entry["actor"].endswith(" (eum cli)"), entry
        assert entry["detail"]["on_behalf_of"] == claimed, entry
    assert api.get("/v1/audit-log", role="auditor", params={"actor": claimed}).json()["items"] == []
    with api.services.reader.connect() as conn:
        rows = set(conn.execute(select(s.grant_disbursements.c.actor)
                                .where(s.grant_disbursements.c.disbursement_id.in_(["k1", "k2"]))).scalars())
    assert rows == {operator()}
    assert_book_ok(api)


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_file_bad_past_its_first_chunk_is_refused_before_any_row_is_written(api, tmp_path, monkeypatch,
                                                                              small_chunks):
    """A line the CSV reader cannot read past the first chunk: the whole file is read as
    CSV before anything is written, so the command refuses it, exit 2 ("nothing done")
    naming the line. (It used to be found only when the 4 rows before it had been
    written: exit 1 and "4 rows ... again".)"""
    _setup(api)
    path = tmp_path / "recipients.csv"
    path.write_text("disbursement_id,member_id\n" + "".join(f"x{i},m{i}\n" for i in range(1, 6))
                    + "x9,\"" + "m" * 200_000 + "\"\n")  # past the csv module's field size limit
    out = _cli(api, monkeypatch, "grants", "disburse", "bulk-test", str(path), "--occurred-at", "2025-08-01")
    assert out.exit_code == 2, (out.output, out.exception)
    assert out.exception is None or isinstance(out.exception, SystemExit), out.exception
    assert "line 7" in out.stderr and "not CSV" in out.stderr, out.stderr
    with api.services.reader.connect() as conn:
        assert conn.execute(select(func.count()).select_from(s.grant_disbursements)).scalar_one() == 0
    assert_book_ok(api)


def test_a_database_never_migrated_refuses_the_cli_with_what_to_do(tmp_path, monkeypatch):
    """Never migrated: exit 2 before anything is read, as `eum payments replay`, no
    traceback (it was exit 3 once the first read failed)."""
    from typer.testing import CliRunner

    from eum.cli import app as cli
    from eum.settings import get_settings

    path = tmp_path / "recipients.csv"
    path.write_text("disbursement_id,member_id\nr1,m1\n")
    (tmp_path / "empty.db").touch()  # there, never migrated (a book not there is refused as such)
    monkeypatch.setenv("EUM_DATABASE_URL", f"sqlite:///{tmp_path / 'empty.db'}")
    get_settings.cache_clear()
    try:
        outs = [CliRunner().invoke(cli, ["grants", "disburse", "bulk-test", str(path)]),
                CliRunner().invoke(cli, ["grants", "expire", "bulk-test"])]
    finally:
        get_settings.cache_clear()
    for out in outs:
        assert out.exit_code == 2, (out.output, out.exception)
        assert out.exception is None or isinstance(out.exception, SystemExit), out.exception
        assert "not migrated to this release (at none" in out.stderr, out.stderr
        assert "eum db upgrade" in out.stderr


def test_the_file_limit_is_the_callers_not_a_fixed_256_mib(api, tmp_path, monkeypatch):
    """The decode step refused anything over its own 256 MiB, so EUM_UPLOAD_BYTES_MAX could
    only lower the limit, and a command-line file of Incheon's ~3 M residents could be
    refused. Shown with the default shrunk: the command line's limit (1 GiB) and the API's
    setting are the ones that count."""
    import eum.textfiles

    _setup(api)
    monkeypatch.setattr(eum.textfiles, "UPLOAD_BYTES_MAX", 10)  # the fixed limit, made tiny
    path = tmp_path / "recipients.csv"
    path.write_text("disbursement_id,member_id\nz1,m1\n")
    run = _cli(api, monkeypatch, "grants", "disburse", "bulk-test", str(path),
               "--occurred-at", "2025-08-01T09:00:00+09:00")
    assert run.exit_code == 0 and '"disbursed":1' in run.output, run.output
    assert _upload(api, "disbursement_id,member_id\nz2,m2\n")["disbursed"] == 1  # EUM_UPLOAD_BYTES_MAX's default


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_book_that_cannot_write_stops_the_cli_with_exit_3(api, tmp_path, monkeypatch):
    """`Book.execute` gives up with Unavailable (the database stopped a batch): `eum grants
    expire` printed a traceback and exited 1, and `eum grants disburse` would have said
    "refused" (exit 2, "nothing done"). Both are the database's stop now: exit 3, one
    line, what stays."""
    from ledger.book import Book
    from ledger.errors import Unavailable

    _setup(api)
    r = api.post("/v1/grant-programs/bulk-test/disbursements", {"disbursement_id": "u2", "member_id": "m2",
                                                                "occurred_at": at("2025-08-01")}, role="policy-editor")
    assert r.status_code == 201, r.text  # a lot for the expiry to return (the program ended 2025-11-30)
    path = tmp_path / "recipients.csv"
    path.write_text("disbursement_id,member_id\nu1,m1\n")

    def down(*args, **kw):
        raise Unavailable("the book of record could not be written; retry with the same id")

    monkeypatch.setattr(Book, "execute", down)
    monkeypatch.setattr(bulk.BulkGrantWriter, "write", down)
    out = _cli(api, monkeypatch, "grants", "disburse", "bulk-test", str(path), "--occurred-at", "2025-08-01")
    assert out.exit_code == 3 and "stopped by the database (Unavailable" in out.stderr, (out.output, out.exception)
    out = _cli(api, monkeypatch, "grants", "expire", "bulk-test")
    assert out.exit_code == 3, (out.output, out.exception)
    assert out.exception is None or isinstance(out.exception, SystemExit), out.exception
    assert "stopped by the database (Unavailable" in out.stderr, out.stderr


def test_a_recipients_file_naming_a_column_twice_is_refused(api):
    """`disbursement_id,member_id,income_status,member_id`: the row's grant went to the
    last member_id (m2), whichever was meant. Refused whole now, nothing disbursed."""
    _setup(api)
    before = _audited(api)
    r = api.client.post("/v1/grant-programs/bulk-test/disbursements/bulk",
                        content=b"disbursement_id,member_id,income_status,member_id\nb1,m1,general,m2\n",
                        headers={**api.h("policy-editor"), "Content-Type": "text/csv"})
    assert r.status_code == 422 and "named twice" in r.text and "member_id" in r.text, r.text
    assert _audited(api) == before
    assert api.get("/v1/members/m2/balance").json()["balances"]["grants"] == []


def test_a_header_of_thousands_of_columns_is_refused_at_once_naming_a_few(api):
    """A header of 30,000 names (200 kB) was checked for a name given twice by counting
    each name in the whole header: seconds of a worker's upload slot for 30,000, minutes
    for 100,000 (the security audit); the refusal then echoed every name. Refused at
    once now, naming the first 20 and counting the rest, nothing disbursed."""
    _setup(api)
    before = _audited(api)
    names = [f"c{i}" for i in range(30_000)]
    started = time.perf_counter()
    r = api.client.post(PATH, content=("disbursement_id,member_id," + ",".join(names) + "\nb1,m1"
                                       + "," * len(names) + "\n").encode(),
                        headers={**api.h("policy-editor"), "Content-Type": "text/csv"})
    assert time.perf_counter() - started < 3
    assert r.status_code == 422 and "'c0', 'c1'" in r.text and "and 29,980 more" in r.text, r.text[:500]
    assert "'c20'" not in r.text and len(r.text) < 2_000, r.text[:500]
    assert _audited(api) == before
    assert api.get("/v1/members/m1/balance").json()["balances"]["grants"] == []


def test_an_upload_cut_short_has_each_committed_chunk_audited(api, small_chunks, monkeypatch):
    """An upload's one audit entry was written after its last chunk: an upload whose
    worker died after some chunks had committed left their money with no entry, and the
    file sent again recorded those rows only as `replayed`. Each chunk's entry is now
    written in the chunk's own transaction (`grant_program.disburse_chunk`, naming its
    ledger transaction, rows and amount), the upload's summary after the last as before."""
    import hashlib

    from ledger.errors import EumError
    from rules.timeutil import to_us

    _setup(api)
    text = "disbursement_id,member_id\n" + "".join(f"k{i},m{i}\n" for i in range(1, 11))  # 3 chunks
    write, calls = bulk.BulkGrantWriter.write, []

    def dies_at_the_third_chunk(self, *args, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise EumError("the worker died")  # as a process killed between chunks
        return write(self, *args, **kw)

    monkeypatch.setattr(bulk.BulkGrantWriter, "write", dies_at_the_third_chunk)
    with pytest.raises(EumError):
        grant_jobs.bulk_disburse(api.services.book, api.services.reader, "bulk-test", text.encode(),
                                 to_us(dt.datetime.fromisoformat("2025-08-01T09:00:00+09:00")),  # PATH's time
                                 actor="test uploader")
    monkeypatch.setattr(bulk.BulkGrantWriter, "write", write)
    again = _upload(api, text)
    assert (again["disbursed"], again["replayed"]) == (2, 8), again

    def entries(action: str) -> list[dict]:
        return api.get("/v1/audit-log", role="auditor", params={"action": action}).json()["items"]

    t = s.grant_disbursements
    with api.services.reader.connect() as conn:
        given = conn.execute(select(t.c.txn_id, func.count(), func.sum(t.c.amount_won), func.min(t.c.actor))
                             .group_by(t.c.txn_id)).all()
    chunks = entries("grant_program.disburse_chunk")
    assert sorted((e["detail"]["txn_id"], e["detail"]["disbursed"], e["detail"]["amount_won"], e["actor"])
                  for e in chunks) == sorted((txn_id, n, amount, actor) for txn_id, n, amount, actor in given)
    assert len(chunks) == 3 and {e["object_id"] for e in chunks} == {"bulk-test"}
    assert [e["detail"]["file_sha256"] for e in chunks] == [hashlib.sha256(text.encode()).hexdigest()] * 3
    [upload] = entries("grant_program.disburse_bulk")  # only the upload that finished sums itself up
    assert (upload["detail"]["disbursed"], upload["detail"]["replayed"]) == (2, 8)
    assert_book_ok(api)


def test_a_row_with_more_fields_than_the_header_is_reported_and_not_paid(api):
    """`b1,m1,5000,m2` under a header of three columns: the csv module puts the fourth
    field under no name, and the row was paid as if it were not there, whichever member
    or amount was meant. The row is an error now; the file's other rows are paid."""
    _setup(api)
    report = _upload(api, "disbursement_id,member_id,amount\nb1,m1,5000,m2\nb2,m2,5000\n")
    assert report["disbursed"] == 1 and report["amount"] == 5_000, report
    [error] = report["errors"]
    assert error["line"] == 2 and error["disbursement_id"] == "b1" and "more fields than the header" in error["error"]
    assert api.get("/v1/members/m1/balance").json()["balances"]["grants"] == []
    assert_book_ok(api)


def test_a_files_refused_rows_are_listed_in_line_order(api, small_chunks):
    """The rows refused as the file is read (a bad amount, no id) and those its chunks
    refuse (an unknown member) are one list in line order, for an officer mending the file
    from the top: the chunks' came after the others (line 3, then 2)."""
    _setup(api)
    report = _upload(api, "disbursement_id,member_id,district,amount\nc1,m1,ganghwa,\nc2,m2,seo,abc\n")
    assert [(e["line"], e["error"].split()[0]) for e in report["errors"]] == \
        [(2, "district_mismatch:"), (3, "amount")], report["errors"]


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_refused_cli_command_records_no_new_policy_file(api, tmp_path, monkeypatch):
    """A `grants disburse` or `grants expire` refused before anything (exit 2: an unknown
    program, a misspelt column, a program not ended) recorded the policy files of
    EUM_POLICIES_DIR the book did not have yet (a `policies` row and a `policy.load_file`
    entry): the program and the file are checked before the policy files are synced."""
    import shutil

    _setup(api)
    folder = tmp_path / "policies"
    shutil.copytree(POLICIES, folder)
    shipped = (POLICIES / "2025-10-cap-50man.yaml").read_text()
    (folder / "2027-01-new.yaml").write_text(
        shipped.replace("policy_id: incheon-2025-10", "policy_id: incheon-2027-01")
        .replace('effective_from: "2025-10-01T00:00:00+09:00"', 'effective_from: "2027-01-01T00:00:00+09:00"'))
    assert "incheon-2027-01" in (folder / "2027-01-new.yaml").read_text()
    monkeypatch.setenv("EUM_POLICIES_DIR", str(folder))
    typo = tmp_path / "typo.csv"
    typo.write_text("disbursement_id,member_id,income_stauts\nr1,m1,general\n")
    good = tmp_path / "good.csv"
    good.write_text("disbursement_id,member_id\nr1,m1\n")

    def policies() -> int:
        with api.services.reader.connect() as conn:
            return conn.execute(select(func.count()).select_from(s.policies)).scalar_one()

    before, audited = policies(), _audited(api)
    for args in (["disburse", "nope", str(good)], ["disburse", "bulk-test", str(typo)],
                 ["disburse", "bulk-test", str(tmp_path / "absent.csv")], ["expire", "nope"]):
        out = _cli(api, monkeypatch, "grants", *args)
        assert out.exit_code == 2, (args, out.output)
        assert (policies(), _audited(api)) == (before, audited), (args, out.output)
    # A command that goes ahead records the new file as before.
    out = _cli(api, monkeypatch, "grants", "disburse", "bulk-test", str(good), "--occurred-at", "2025-08-01")
    assert out.exit_code == 0, out.output
    assert policies() == before + 1


def test_a_refused_row_is_named_by_its_line_in_the_file_past_blank_lines(api):
    """Rows were counted, not lines: with blank lines in the file, b2 on line 6 and the
    unknown member on line 7 were reported as lines 3 and 4 (line 3 being b1, which was
    paid). Each row is named by its line in the file, as `eum payments replay` names it."""
    _setup(api)
    report = _upload(api, "disbursement_id,member_id,amount\n\nb1,m1,5000\n\n\nb2,m2,abc\nb3,nobody,5000\n")
    assert report["disbursed"] == 1, report
    assert [(e["line"], e["disbursement_id"]) for e in report["errors"]] == [(6, "b2"), (7, "b3")], report


def test_a_row_with_thousands_of_digits_gets_a_clear_error(api):
    """int() of more than 4,300 digits raises Python's own message ("Exceeds the limit
    (4300 digits) for integer string conversion"), which was the row's error: an amount
    or a whole-number attribute that long is refused with the range, the digits cut short."""
    from rules.grants import GrantProgramDocument

    _setup(api)
    long = "1" + "0" * 5_000
    report = _upload(api, f"disbursement_id,member_id,amount\nb1,m1,{long}\nb3,m3,5000\n")
    assert report["disbursed"] == 1, report
    [error] = report["errors"]
    assert error["line"] == 2 and "from 1 to 10^12" in error["error"] and "5001 characters" in error["error"], error
    assert "4300" not in error["error"] and len(error["error"]) < 200, error
    sized = GrantProgramDocument.model_validate({**PROGRAM, "amount_rules": {
        "base": [{"id": "general", "amount_won": 1_000}],
        "add_ons": [{"id": "big", "when": {"household_size_min": 3}, "amount_won": 500}]}})
    with pytest.raises(ValueError) as refused:
        grant_jobs._bulk_row(sized, False, 2, {"disbursement_id": "b2", "member_id": "m2", "household_size": long},
                             None)
    reason = str(refused.value)
    assert "from 0 to 10,000" in reason and "5001 characters" in reason and len(reason) < 200, reason


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_policy_file_that_does_not_parse_is_the_policies_folders_fault(api, tmp_path, monkeypatch):
    """The review's case: with a policy file that does not parse in EUM_POLICIES_DIR, `eum
    grants disburse` of a good recipients file said "error: .../recipients.csv: .../
    2027-01-broken.yaml: line 3: ..." (the policy's fault as the file's). It names the
    policies folder now, exit 2, nothing disbursed."""
    _setup(api)
    folder = tmp_path / "policies"
    shutil.copytree(POLICIES, folder)
    (folder / "2027-01-broken.yaml").write_text("policy_id: incheon-2027-01\nthis is: [not a policy\n")
    monkeypatch.setenv("EUM_POLICIES_DIR", str(folder))
    good = tmp_path / "recipients.csv"
    good.write_text("disbursement_id,member_id\nr1,m1\n")
    out = _cli(api, monkeypatch, "grants", "disburse", "bulk-test", str(good), "--occurred-at", "2025-08-01")
    assert out.exit_code == 2, out.output
    [line] = [line for line in out.output.splitlines() if line.startswith("error:")]
    assert line.startswith("error: EUM_POLICIES_DIR: ") and "2027-01-broken.yaml" in line and "recipients" not in line
    with api.services.reader.connect() as conn:
        assert conn.execute(select(func.count()).select_from(s.grant_disbursements)).scalar_one() == 0


@pytest.mark.parametrize("bad_line", ["k6,m6," + "x" * 200_000, 'k6,"m6 ' + "y" * 200_000 + '"'])
def test_a_line_that_is_not_csv_anywhere_in_the_file_refuses_it_before_any_row_is_paid(api, small_chunks, bad_line):
    """Line 7 is not CSV (a field over the csv module's limit, quoted or not): the upload
    is refused whole, 422 bad_csv naming the line, nothing paid. It was
    read one chunk at a time, so the chunks before it had paid: 422 "cannot be read" with
    4 rows, 450,007 won, paid and no summary entry (the crash audit)."""
    _setup(api)
    text = "disbursement_id,member_id\n" + "".join(f"k{i},m{i}\n" for i in range(1, 6)) + bad_line + "\n"
    r = api.client.post(PATH, content=text.encode(), headers={**api.h("policy-editor"), "Content-Type": "text/csv"})
    assert r.status_code == 422 and r.json()["code"] == "bad_csv", r.text
    assert "line 7" in r.json()["detail"], r.json()
    with api.services.reader.connect() as conn:
        assert conn.execute(select(func.count()).select_from(s.grant_disbursements)).scalar_one() == 0
    assert_book_ok(api)


def test_a_chunk_whose_commit_went_through_before_its_connection_broke_counts_as_disbursed(api, monkeypatch):
    """The first-ever upload of two rows: its chunk's COMMIT goes through, then the
    connection breaks (OperationalError) and the writer tries again. The rows it finds
    are its own, written by the attempt whose answer was lost: the answer and the
    summary say 2 disbursed, 200,002 won, as the book counts its own commits (the crash
    audit: they said 0 disbursed, 2 replayed, 0 won)."""
    from sqlalchemy.exc import OperationalError

    _setup(api)
    real_write, commits = bulk.BulkGrantWriter.write, []

    def write(self, *args, **kwargs):
        engine = self.engine

        class Begin:
            def __enter__(self_):
                self_.inner = engine.begin()
                return self_.inner.__enter__()

            def __exit__(self_, *exc):
                out = self_.inner.__exit__(*exc)
                commits.append(exc[0] is None)
                if len(commits) == 1 and exc[0] is None:  # the COMMIT done, its answer lost
                    raise OperationalError("COMMIT", {}, Exception("server closed the connection unexpectedly"))
                return out

        class Engine:
            def __getattr__(self_, name):
                return getattr(engine, name)

            def begin(self_):
                return Begin()

        self.engine = Engine()
        try:
            return real_write(self, *args, **kwargs)
        finally:
            self.engine = engine

    monkeypatch.setattr(bulk.BulkGrantWriter, "write", write)
    report = _upload(api, "disbursement_id,member_id\nz1,m1\nz2,m2\n")
    assert (report["disbursed"], report["replayed"], report["amount"]) == (2, 0, 200_002), report
    items = api.get("/v1/audit-log", role="auditor", params={"action": "grant_program."}).json()["items"]
    summary = [e["detail"] for e in items if e["action"] == "grant_program.disburse_bulk"]
    chunks = [e["detail"] for e in items if e["action"] == "grant_program.disburse_chunk"]
    assert [(d["disbursed"], d["amount_won"]) for d in summary] == [(2, 200_002)], summary
    assert [(d["disbursed"], d["amount_won"]) for d in chunks] == [(2, 200_002)], chunks  # written once
    monkeypatch.setattr(bulk.BulkGrantWriter, "write", real_write)
    again = _upload(api, "disbursement_id,member_id\nz1,m1\nz2,m2\n")  # the same file sent again: replays
    assert (again["disbursed"], again["replayed"], again["amount"]) == (0, 2, 0), again
    assert_book_ok(api)


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_retry_does_not_count_another_uploads_rows_as_its_own(api, monkeypatch):
    """On SQLite a chunk's transaction id is max + 1: an attempt that fails after taking
    it (rolled back) leaves the id to the next writer. The same file uploaded again in
    between commits its rows under that id; the first upload's retry finds them written
    by "its" transaction and counted them as disbursed: both answers said 200,002 won
    disbursed for 200,002 moved (the review). An attempt is its id and its time now."""
    import datetime as dt

    from sqlalchemy.exc import OperationalError

    from rules.timeutil import to_us

    _setup(api)
    text = "disbursement_id,member_id\nz1,m1\nz2,m2\n"
    real_write, real_sleep, other, calls = bulk.BulkGrantWriter._write_sqlite, bulk.time.sleep, {}, []

    def write(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 1:  # the first attempt fails after taking its id: rolled back, nothing written
            raise OperationalError("INSERT", {}, Exception("disk I/O error"))
        return real_write(self, *args, **kwargs)

    def sleep(seconds):
        if not other:  # meanwhile the same file is uploaded again (a client retrying), and commits
            other["report"] = grant_jobs.bulk_disburse(
                api.services.book, api.services.engine, "bulk-test", text.encode(),
                to_us(dt.datetime.fromisoformat("2025-08-01T09:00:00+09:00")))
        real_sleep(seconds)

    monkeypatch.setattr(bulk.BulkGrantWriter, "_write_sqlite", write)
    monkeypatch.setattr(bulk.time, "sleep", sleep)
    first = _upload(api, text)
    assert other["report"].disbursed == 2
    assert (first["disbursed"], first["replayed"], first["amount"]) == (0, 2, 0), first
    assert_book_ok(api)


@pytest.mark.parametrize("text", ["disbursement_id,member_id,amount\nc1,m1,7\r7777\nc2,m2,\n",
                                  "disbursement_id,member_id,amount\r\nc1,m1,7\r7777\r\nc2,m2,\r\n"])
def test_a_carriage_return_inside_a_line_refuses_the_file(api, text):
    """The csv module ends a record at a bare CR: `c1,m1,7<CR>7777` was paid 7 won, the
    rest a row error on the wrong line, and the upload answered 200 (the review). In a
    file of LF or CRLF lines it refuses the file, naming the line; nothing paid."""
    _setup(api)
    r = api.client.post(PATH, content=text.encode(), headers={**api.h("policy-editor"), "Content-Type": "text/csv"})
    assert r.status_code == 422 and r.json()["code"] == "bad_csv", r.text
    assert "line 2" in r.json()["detail"] and "carriage return" in r.json()["detail"], r.json()
    with api.services.reader.connect() as conn:
        assert conn.execute(select(func.count()).select_from(s.grant_disbursements)).scalar_one() == 0


def test_a_file_of_cr_line_ends_is_read_as_it_is(api):
    """An old Mac's file, CR line ends alone, is read line by line as before."""
    _setup(api)
    report = _upload(api, "disbursement_id,member_id\rcr1,m1\rcr2,m2\r")
    assert (report["disbursed"], report["error_count"]) == (2, 0), report


def _program(pid: str) -> dict:
    return {"program_id": pid, "name": pid, "valid_from": "2025-07-01", "valid_until": "2025-11-30",
            "funding": {"city": 10000}, "amount_rules": {"base": [{"id": "flat", "amount_won": 100000}]}}


@pytest.mark.parametrize("db_url,mine,other", [
    ("postgres", "relief_x", "relief-x"),  # LIKE's "_" is any one character
    ("sqlite", "Relief-X", "relief-x"),    # and SQLite's LIKE ignores ASCII case
    ("sqlite", "relief_x", "relief-x"),
], indirect=["db_url"])
def test_a_program_counts_and_expires_only_its_own_lots(api, mine, other):
    """A program's summary and expiry found its lots and funds by LIKE on the account
    names: `relief_x` took in `relief-x`'s lots (disbursed 300,000 for 100,000; its expiry
    visited m1 twice and audited 200,000 returned for 100,000) (grant files audit)."""
    from tests.book_helpers import approve_program, assert_book_ok

    for pid in (mine, other):
        assert api.post("/v1/grant-programs", _program(pid), role="policy-editor").status_code == 201
        approve_program(api, pid)
    for member in ("m1", "m2"):
        assert api.put(f"/v1/members/{member}", {"district": "seo"}).status_code == 201
    headers = {**api.h("policy-editor"), "Content-Type": "text/csv"}
    when = "?occurred_at=2025-08-01T09:00:00%2B09:00"
    r = api.client.post(f"/v1/grant-programs/{other}/disbursements/bulk{when}",
                        content=b"disbursement_id,member_id\nd1,m1\nd2,m2\n", headers=headers)
    assert r.status_code == 200 and r.json()["disbursed"] == 2, r.text
    r = api.client.post(f"/v1/grant-programs/{mine}/disbursements/bulk{when}",
                        content=b"disbursement_id,member_id\nu1,m1\n", headers=headers)
    assert r.json()["disbursed"] == 1, r.text

    money = api.get(f"/v1/grant-programs/{mine}", role="auditor").json()["money"]
    assert (money["disbursed"], money["held_by_members"], money["funders_net"]) == (100_000, 100_000,
                                                                                    {"city": 100_000})
    expired = api.post(f"/v1/grant-programs/{mine}/expire", {}, role="policy-editor").json()
    assert (expired["lots_expired"], expired["returned"]) == (1, 100_000), expired
    log = api.get("/v1/audit-log", role="auditor", params={"object_id": mine}).json()["items"]
    assert sum(e["detail"]["returned"] for e in log if e["action"] == "grant_program.expire_lots") == 100_000
    others = api.get(f"/v1/grant-programs/{other}", role="auditor").json()["money"]
    assert (others["disbursed"], others["held_by_members"]) == (200_000, 200_000)  # untouched by the expiry
    assert_book_ok(api)


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_every_refused_row_is_named_by_its_line(api, tmp_path, monkeypatch):
    """`eum grants disburse` named the first 50 refused rows and said nothing of the rest
    (grant files audit): every row the report keeps is named, and past those a count."""
    import re

    from ledger import grant_jobs

    _setup(api)
    path = tmp_path / "recipients.csv"
    path.write_text("disbursement_id,member_id\nok1,m1\n" + "".join(f"g{i},ghost{i}\n" for i in range(60)))
    out = _cli(api, monkeypatch, "grants", "disburse", "bulk-test", str(path), "--occurred-at", "2025-08-01")
    assert out.exit_code == 1 and '"error_count":60' in out.stdout, out.output
    assert {int(n) for n in re.findall(r"^line (\d+): member_not_found", out.stderr, re.M)} == set(range(3, 63))
    assert "more" not in out.stderr
    monkeypatch.setattr(grant_jobs, "ERRORS_KEPT_MAX", 25)
    path.write_text("disbursement_id,member_id\n" + "".join(f"h{i},ghost{i}\n" for i in range(60)))
    out = _cli(api, monkeypatch, "grants", "disburse", "bulk-test", str(path), "--occurred-at", "2025-08-01")
    assert len(re.findall(r"^line \d+: member_not_found", out.stderr, re.M)) == 25
    assert "... and 35 more, not named" in out.stderr, out.stderr[-500:]


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_header_with_blanks_after_its_commas_is_read_as_its_rows_are(api):
    """`disbursement_id, member_id, district` was refused for lacking member_id, while
    `disbursement_id,member_id, district` was paid: rows' keys and the later checks
    strip the names, the required-columns check did not (grant files audit)."""
    _setup(api)
    body = _upload(api, "disbursement_id, member_id, district\nsp1,m1,seo\nsp2, m2 ,seo\n")
    assert (body["disbursed"], body["error_count"]) == (2, 0), body


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_an_amount_grouped_by_thousands_is_read_as_the_clearing_file_and_replay_read_it(api):
    """Korean Excel writes a number cell in 쉼표 스타일 (#,##0) as "100,000": a grant row
    was refused for it while the clearing file and `eum payments replay` took it (Korean
    text audit, repro_7). One reading for all three (`eum.textfiles.won_digits`): commas
    group by three, or the row is refused as before."""
    _setup(api)
    report = _upload(api, 'disbursement_id,member_id,amount\nc1,m1,"100,000"\nc2,m2,"1,000,00"\nc3,m3,"12000,00"\n')
    assert (report["disbursed"], report["amount"]) == (1, 100_000), report
    assert [e["line"] for e in report["errors"]] == [3, 4], report


def test_a_macos_nfd_file_and_a_header_after_two_boms_are_read_as_written(api):
    """A recipients' file saved on macOS (its Hangul decomposed, NFD) had every Korean row
    refused with "income_status '일반' is not one the rules name (..., 일반)", the two
    looking the same; attribute values are read NFC. A header after two BOMs (a BOM'd file
    saved again with one) was "the CSV needs a header with ... disbursement_id" (Korean
    text audit, repro_5)."""
    import unicodedata

    coupon = {**yaml.safe_load((POLICIES / "grants" / "2025-07-livelihood-coupon-round1.yaml").read_text()),
              "valid_from": "2025-07-21", "valid_until": "2025-11-30"}
    assert api.post("/v1/grant-programs", coupon, role="policy-editor").status_code == 201
    approve_program(api, coupon["program_id"])
    statuses = [("일반", 150_000), ("차상위", 300_000), ("기초생활수급", 400_000), ("한부모", 300_000)]
    path = f"/v1/grant-programs/{coupon['program_id']}/disbursements/bulk?occurred_at=2025-08-01T09:00:00%2B09:00"
    headers = {**api.h("policy-editor"), "Content-Type": "text/csv"}
    for prefix, make in (("nfd", lambda text: unicodedata.normalize("NFD", text).encode()),
                         ("bom", lambda text: b"\xef\xbb\xbf\xef\xbb\xbf" + text.encode())):
        for i in range(len(statuses)):
            assert api.put(f"/v1/members/{prefix}-m{i}", {"district": "seo"}).status_code == 201
        text = "disbursement_id,member_id,income_status\n" + "".join(
            f"{prefix}-{i},{prefix}-m{i},{status}\n" for i, (status, _) in enumerate(statuses))
        r = api.client.post(path, content=make(text), headers=headers)
        assert r.status_code == 200, r.text
        assert (r.json()["disbursed"], r.json()["amount"], r.json()["errors"]) == (
            4, sum(won for _, won in statuses), []), r.text
    # One at a time, the same: a macOS client's decomposed 일반 (the review of 2026-12-06i)
    assert api.put("/v1/members/one-m", {"district": "seo"}).status_code == 201
    one = api.post(f"/v1/grant-programs/{coupon['program_id']}/disbursements",
                   {"disbursement_id": "one-1", "member_id": "one-m", "occurred_at": "2025-08-01T09:00:00+09:00",
                    "attributes": {"income_status": unicodedata.normalize("NFD", "일반")}}, role="policy-editor")
    assert one.status_code == 201 and one.json()["amount"] == 150_000, one.text
    assert_book_ok(api)


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_recipients_file_past_the_limit_is_refused_by_its_size_unread(api, tmp_path, monkeypatch):
    """`eum grants disburse` read the file whole before its size was checked, as payments
    replay did (a file larger than memory: a MemoryError traceback). A sparse 1 TiB file,
    its reading standing for running out of memory."""
    from pathlib import Path

    from eum.backfill import FILE_BYTES_MAX

    _setup(api)
    path = tmp_path / "recipients.csv"
    with open(path, "wb") as f:
        f.truncate(1 << 40)
    monkeypatch.setattr(Path, "read_bytes", lambda self: (_ for _ in ()).throw(MemoryError))
    out = _cli(api, monkeypatch, "grants", "disburse", "bulk-test", str(path), "--occurred-at", "2025-08-01")
    assert out.exception is None or isinstance(out.exception, SystemExit), repr(out.exception)
    assert out.exit_code == 2 and f"file larger than {FILE_BYTES_MAX} bytes" in out.stderr, out.output


def _row(line: int, disbursement_id: str, member_id: str) -> bulk.BulkRow:
    return bulk.BulkRow(line=line, disbursement_id=disbursement_id, member_id=member_id, amount_won=1,
                        request_hash="h")


def test_a_file_with_a_few_repeated_members_is_cut_into_few_chunks():
    """A member repeated here and there no longer starts a new chunk at each repeat: 2%
    of a 10,000-row window repeating a member were 201 chunks (each a transaction, and
    ~7x the time to disburse the file); they are two rounds now, the repeats in the
    second, each after its member's first row (grant files audit)."""
    rows = [_row(i + 2, f"d{i}", f"m{i - 1}" if i % 50 == 49 else f"m{i}") for i in range(10_000)]
    laid = bulk.chunks(rows)
    assert [len(c) for c in laid] == [9_800, 200]
    assert all(r.line % 50 == 1 for r in laid[1])  # the repeats, in the file's order
    assert [r.line for r in laid[1]] == sorted(r.line for r in laid[1])


@settings(max_examples=120, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 6), st.integers(0, 9)), max_size=60), st.integers(1, 7))
def test_chunks_keep_each_member_and_id_in_order_and_never_twice_in_one(pairs, size):
    rows = [_row(n + 2, f"d{i}", f"m{m}") for n, (m, i) in enumerate(pairs)]
    laid = bulk.chunks(rows, size)
    assert sorted(r.line for c in laid for r in c) == [r.line for r in rows]  # each row once
    where = {r.line: k for k, c in enumerate(laid) for r in c}
    for chunk in laid:
        assert 0 < len(chunk) <= size
        assert len({r.member_id for r in chunk}) == len(chunk) == len({r.disbursement_id for r in chunk})
        assert [r.line for r in chunk] == sorted(r.line for r in chunk)
    for a in rows:
        for b in rows:
            if a.line < b.line and (a.member_id == b.member_id or a.disbursement_id == b.disbursement_id):
                assert where[a.line] < where[b.line], (a, b)


def test_the_book_check_holds_each_disbursement_to_its_ledger_credit(api, small_chunks):
    """`grant_disbursements` is the record of what each recipient was given (a resend is
    answered from it, a member's history shows a bulk row by it) and the ledger's `grant`
    transactions are the money: a row edited, a row whose lot leg is another member's,
    or a chunk's legs without its rows went unseen by every check (the program's money
    summary reads the legs alone, so it still added up). `eum db check` holds them
    together, alone and in bulk."""
    from ledger.queries import check_book

    _setup(api)
    r = api.post("/v1/grant-programs/bulk-test/disbursements",
                 {"disbursement_id": "one", "member_id": "m1", "occurred_at": at("2025-08-01")}, role="policy-editor")
    assert r.status_code == 201, r.text
    report = _upload(api, "disbursement_id,member_id\n" + "".join(f"k{i},m{i}\n" for i in range(2, 8)))
    assert report["disbursed"] == 6, report
    assert_book_ok(api)

    def off() -> str | None:
        with api.services.reader.connect() as conn:
            (check,) = [c for c in check_book(conn) if c.name == "grant disbursements equal their ledger transactions"]
        return None if check.ok else check.detail

    d = s.grant_disbursements
    for disbursement_id, change, named in (
            ("one", {"amount_won": 100_000}, "'one'"),                    # a row that is not what was credited
            ("one", {"member_id": "m9"}, "'one'"),                        # the credit is another member's lot
            ("k3", {"amount_won": 1}, "bulk transaction"),                # a bulk row edited
            ("k4", {"member_id": "m9"}, "bulk transaction")):             # a bulk row naming another member
        with api.services.engine.begin() as conn:
            before = conn.execute(select(d).where(d.c.disbursement_id == disbursement_id)).one()._asdict()
            conn.execute(d.update().where(d.c.disbursement_id == disbursement_id).values(**change))
        assert named in (off() or ""), (disbursement_id, change, off())
        with api.services.engine.begin() as conn:
            conn.execute(d.update().where(d.c.disbursement_id == disbursement_id).values(**before))
        assert off() is None
    # a chunk's credits without their rows
    with api.services.engine.begin() as conn:
        conn.execute(d.delete().where(d.c.disbursement_id == "k5"))
    assert "a credit no row of its chunk gives" in (off() or ""), off()
