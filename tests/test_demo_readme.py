"""The README's try-it examples give the answers the README shows, on the demo data
(`eum serve --demo`): the first payment, the win-win payment worked as Seo-gu's notice
does, and the Ganghwa coupon disbursed and spent."""

from __future__ import annotations

import re

import orjson

from eum import demo as demo_data
from eum.settings import REPO_ROOT
from ledger.book import Book
from ledger.db import make_engine, migrate
from rules.loader import timeline_from_dir
from tests.conftest import POLICIES, make_api

README = (REPO_ROOT / "README.md").read_text()


def _readme_body(payment_id: str) -> dict:
    """The JSON body of the README's curl for this id (its -d '...' text)."""
    import orjson

    found = re.search(r"-d '(\{\"(?:payment|disbursement)_id\":\"" + payment_id + r"\".*?\})'", README, re.S)
    assert found, payment_id
    return orjson.loads(found.group(1).replace("\n", " "))


def test_readme_examples_answer_as_the_readme_shows(tmp_path):
    url = f"sqlite:///{tmp_path / 'demo.db'}"
    migrate(url)
    engine = make_engine(url)
    demo_data.load(engine, Book(engine, timeline_from_dir(POLICIES)), grants_dir=POLICIES / "grants")
    engine.dispose()
    api = make_api(url)
    with api.client:
        first = api.post("/v1/payments", _readme_body("try-1"))
        assert first.status_code == 201, first.text
        body = first.json()
        assert body["policy_id"] == "incheon-2025-10+winwin-2023" and body["cashback"]["amount"] == 1700
        assert body["cashback"]["components"][0]["funded_by"] == {"national": 680, "city": 1020}
        assert '"cashback":{"amount":1700' in README
        assert body["cashback"]["why"] == [] and '"amount":1700,"funded_by":{"national":680,"city":1020}}],"why":[]}' \
            in README
        # read back: as first answered but its balances, and as it stands now
        read = api.get("/v1/payments/try-1")
        assert read.status_code == 200, read.text
        assert read.json() == {**{k: v for k, v in body.items() if k != "balances"}, **{
            k: read.json()[k] for k in ("recorded_at", "refunded", "refundable", "cashback_now", "refunds",
                                        "refund_count", "refunds_next_cursor")}}
        # what its refunds gave back and clawed back, `clawback_detail` but its last field elided
        refunded = orjson.dumps(read.json()["refunded"]).decode()
        detail = orjson.dumps(read.json()["refunded"]["clawback_detail"]).decode()
        elided = refunded.replace(detail, '{...,"not_recovered":0}')
        assert detail.endswith(',"not_recovered":0}') and f'"refunded":{elided},' in re.sub(r"\n#\s+", "", README)
        shown = re.search(r"(\"refundable\".*?),\"refunds\":\[\],(.*?)}\n", README, re.S)
        assert '"refundable":17000,"cashback_now":' + orjson.dumps(read.json()["cashback_now"]).decode() == \
            re.sub(r"\n#\s+", "", shown.group(1))
        assert "{" + re.sub(r"\n#\s+", "", shown.group(2)) + "}" == orjson.dumps(
            {k: read.json()[k] for k in ("refund_count", "refunds_next_cursor")}).decode()

        winwin = api.post("/v1/payments", _readme_body("try-2")).json()
        lines = [(c["rule"], c["rate_bp"], c["amount"], c["funded_by"]) for c in winwin["cashback"]["components"]]
        assert winwin["cashback"]["amount"] == 8500, winwin
        assert lines == [("city/standard", 1000, 5000, {"national": 2000, "city": 3000}),
                         ("winwin-merchant/winwin-merchants", 500, 2500, {"merchant": 2500}),
                         ("winwin-district/winwin-in-topup-districts", 200, 1000, {"seo": 1000})]
        for rule, rate, amount, funded in lines:
            assert f'"rule":"{rule}","rate_bp":{rate},"amount":{amount}' in README

        granted = api.post("/v1/grant-programs/coupon-2025-r1/disbursements", _readme_body("try-d1"), role="admin")
        assert granted.status_code == 201 and granted.json()["amount"] == 200_000, granted.text
        spent = api.post("/v1/payments", _readme_body("try-g1")).json()
        assert spent["spent"] == {"grants": 30_000, "points": 0, "charged": 0} and spent["cashback"]["amount"] == 0
        assert spent["balances"]["grants"][0]["amount"] == 170_000
        assert spent["cashback"]["why"] == [{"code": "not_earning_money", "balance": "grants",
                                             "program_id": "coupon-2025-r1", "amount": 30_000}]
        assert '"why":[{"code":"not_earning_money",\n#    "balance":"grants","program_id":"coupon-2025-r1","amount":30000}]' \
            in README


def test_the_demo_loaded_on_the_first_before_nine_has_money(tmp_path, monkeypatch):
    """The demo dated its top-ups 09:00 on the month's first day: loaded between 00:00 and
    09:00 that day, the book refused all 200 as ahead of its clock while the demo said it
    had loaded them, and every member had 0 won (new-user audit)."""
    import datetime as dt

    from sqlalchemy import text

    import ledger.book

    seoul = dt.timezone(dt.timedelta(hours=9))
    at = dt.datetime(2026, 12, 1, 8, 0, tzinfo=seoul)
    monkeypatch.setattr(ledger.book, "now_us", lambda: int(at.timestamp() * 1_000_000))
    url = f"sqlite:///{tmp_path / 'demo.db'}"
    migrate(url)
    engine = make_engine(url)
    try:
        counts = demo_data.load(engine, Book(engine, timeline_from_dir(POLICIES)), today=at.date(),
                                grants_dir=POLICIES / "grants")
        with engine.connect() as conn:
            recorded, first, last = conn.execute(
                text("SELECT count(*), min(occurred_at_us), max(occurred_at_us) FROM topups")).one()
    finally:
        engine.dispose()
    assert recorded == counts["topups"] == 200
    midnight = dt.datetime(2026, 12, 1, tzinfo=seoul).timestamp() * 1_000_000
    assert midnight <= first == last <= at.timestamp() * 1_000_000
