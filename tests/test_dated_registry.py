"""The dated registry (migration 0022): a correction, and the policy preview, judge a
past payment by the merchant's and member's facts as the registry stood when the book
recorded it, not as they stand now (docs/design.md, "Corrections")."""

from __future__ import annotations

import copy

import pytest
import yaml
from alembic import command
from sqlalchemy import select, text

from ledger import schema as s
from ledger.db import alembic_config, make_engine, migrate
from ledger.queries import check_book
from tests.book_helpers import assert_book_ok
from tests.conftest import at, create_pg_database, drop_pg_database
from tests.test_corrections import POLICIES, _right_policy

SEPTEMBER = {"from": at("2025-09-01", "00:00:00"), "to": at("2025-10-01", "00:00:00")}


def _pharmacy(api, merchant_id: str, district: str, **extra):
    r = api.put(f"/v1/merchants/{merchant_id}", {"name": merchant_id, "district": district, "category": "pharmacy",
                                                 "annual_sales": 100_000_000, "registered_from": "2019-01-01",
                                                 **extra})
    assert r.status_code in (200, 201), r.text


def _member(api, member_id: str, district: str, day: str = "2025-09-01"):
    assert api.put(f"/v1/members/{member_id}", {"district": district}).status_code in (200, 201)
    r = api.post("/v1/topups", {"topup_id": f"t-{member_id}-{day}", "member_id": member_id, "amount": 500_000,
                                "occurred_at": at(day)})
    assert r.json()["status"] == "approved", r.text


def _pay(api, payment_id: str, member_id: str, merchant_id: str, day: str, amount: int = 100_000) -> int:
    r = api.post("/v1/payments", {"payment_id": payment_id, "member_id": member_id, "merchant_id": merchant_id,
                                  "amount": amount, "occurred_at": at(day)})
    assert r.json()["status"] == "approved", r.text
    return r.json()["cashback"]["amount"]


def _propose(api, correction_id: str, wrong: str, right: str, span: dict = SEPTEMBER):
    r = api.post("/v1/corrections", {"correction_id": correction_id, "wrong_policy_id": wrong,
                                     "right_policy_id": right, **span}, role="policy-editor")
    assert r.status_code == 201, r.text
    return r.json()


def _pharmacies_at_7(api, correction_id: str = "pharmacy-7"):
    assert api.post("/v1/policies", _right_policy(), role="policy-editor").status_code == 201
    return _propose(api, correction_id, "incheon-2025-09", "incheon-2025-09-pharmacy-7")


def _versions(api, table, key: str, entity_id: str) -> list[tuple]:
    with api.services.reader.connect() as conn:
        return conn.execute(select(table).where(table.c[key] == entity_id).order_by(table.c.valid_from_us)).all()


def test_a_moved_merchant_is_corrected_by_the_district_it_was_paid_in(api):
    """The review's case: a Ganghwa pharmacy paid 15%, then moved to Seo-gu. Under the
    right policy (pharmacies 7%, the Ganghwa variant first) a Ganghwa pharmacy keeps
    15%: nothing to correct there. Judged by today's Seo-gu, it was clawed back 3,000."""
    _member(api, "m1", "namdong")
    _member(api, "m2", "namdong")
    _pharmacy(api, "pharm-ganghwa", "ganghwa")
    _pharmacy(api, "pharm-seo", "seo")
    assert _pay(api, "p1", "m1", "pharm-ganghwa", "2025-09-02") == 15_000
    assert _pay(api, "p2", "m2", "pharm-seo", "2025-09-03") == 10_000
    _pharmacy(api, "pharm-ganghwa", "seo")  # relocated, or a registry fix
    proposal = _pharmacies_at_7(api)
    assert {line["member_id"]: line["delta"] for line in proposal["lines"]} == {"m2": -3_000}
    assert proposal["summary"]["recorded_mismatch_payments"] == 0
    # The preview, beside the policies in force re-evaluated: m2 alone is affected.
    r = api.post("/v1/policies/incheon-2025-09-pharmacy-7/simulate", SEPTEMBER, role="policy-editor")
    assert r.status_code == 200, r.text
    report = r.json()
    assert report["members"]["affected"] == 1
    assert report["totals"]["simulated_won"] == 15_000 + 7_000
    assert report["totals"]["actual_won"] == 15_000 + 10_000
    assert "members' and merchants' facts are the registry's current ones" not in report["notes"]
    r = api.post("/v1/corrections/pharmacy-7/approve", role="policy-approver")
    assert r.status_code == 200 and r.json()["status"] == "posted", r.text
    assert_book_ok(api)
    # Proposed again, it plans nothing: every payment holds what the corrected timeline gives it.
    assert _propose(api, "pharmacy-7-again", "incheon-2025-09", "incheon-2025-09-pharmacy-7")["lines"] == []


def test_a_merchant_changed_twice_is_judged_by_each_version_in_turn(api):
    """Ganghwa (p1), then Seo-gu (p2), then Ongjin, rural again (p3): the correction
    moves p2 alone, though today's facts (Ongjin) would leave every payment alone."""
    for member_id in ("m1", "m2", "m3"):
        _member(api, member_id, "namdong")
    _pharmacy(api, "pharm", "ganghwa")
    assert _pay(api, "p1", "m1", "pharm", "2025-09-02", 50_000) == 7_500
    _pharmacy(api, "pharm", "seo")
    assert _pay(api, "p2", "m2", "pharm", "2025-09-03", 50_000) == 5_000
    _pharmacy(api, "pharm", "ongjin")
    assert _pay(api, "p3", "m3", "pharm", "2025-09-04", 50_000) == 7_500
    versions = _versions(api, s.merchant_facts, "merchant_id", "pharm")
    assert [v.district for v in versions] == ["ganghwa", "seo", "ongjin"]
    proposal = _pharmacies_at_7(api)
    assert [(line["member_id"], line["delta"]) for line in proposal["lines"]] == [("m2", -1_500)]
    assert proposal["summary"]["payments_changed"] == 1
    assert proposal["summary"]["recorded_mismatch_payments"] == 0


def _yeonsu_at_4() -> dict:
    """The Yeonsu-gu card layer of July 2019 at +4%, not the launch month's +5%."""
    doc = yaml.safe_load((POLICIES / "2019-07-yeonsu-card.yaml").read_text())
    doc = copy.deepcopy(doc)
    doc["policy_id"] = "yeonsu-2019-07-4"
    doc.pop("effective_from")
    doc["components"][0]["variants"][0]["bands"] = [{"up_to_won": None, "rate_bp": 400}]
    return doc


def test_a_moved_member_is_corrected_by_the_district_they_paid_from(api):
    """The district top-up follows the member's district: a Yeonsu-gu member paid the
    +5% launch top-up, then moved to Namdong-gu. The launch month at +4% takes 1% back
    from that payment; judged by today's Namdong-gu, neither policy paid a top-up and
    the correction missed it."""
    _member(api, "m1", "yeonsu", "2019-07-01")
    _pharmacy(api, "shop", "yeonsu")
    assert _pay(api, "p1", "m1", "shop", "2019-07-10") == 6_000 + 5_000
    assert api.put("/v1/members/m1", {"district": "namdong"}).status_code == 200
    assert [v.district for v in _versions(api, s.member_facts, "member_id", "m1")] == ["yeonsu", "namdong"]
    assert api.post("/v1/policies", _yeonsu_at_4(), role="policy-editor").status_code == 201
    proposal = _propose(api, "yeonsu-launch", "yeonsu-2019-07", "yeonsu-2019-07-4",
                        {"from": at("2019-07-01", "00:00:00"), "to": at("2019-08-01", "00:00:00")})
    assert [(line["member_id"], line["delta"], line["by_funder"]) for line in proposal["lines"]] == [
        ("m1", -1_000, {"yeonsu": -1_000})]
    assert proposal["summary"]["recorded_mismatch_payments"] == 0


def test_a_put_that_changes_no_fact_adds_no_version(api):
    _pharmacy(api, "pharm", "seo")
    _pharmacy(api, "pharm", "seo")  # the same again
    _pharmacy(api, "pharm", "seo", flags=[])  # the same facts, said otherwise
    assert api.put("/v1/merchants/pharm", {"name": "renamed", "district": "seo", "category": "pharmacy",
                                           "annual_sales": 100_000_000, "registered_from": "2019-01-01"}
                   ).status_code == 200  # the name is no fact a rule reads
    assert len(_versions(api, s.merchant_facts, "merchant_id", "pharm")) == 1
    _pharmacy(api, "pharm", "seo", annual_sales=200_000_000)
    _pharmacy(api, "pharm", "seo", merchant_share_bp=200)
    versions = _versions(api, s.merchant_facts, "merchant_id", "pharm")
    assert [(v.annual_sales_won, v.flags, v.merchant_share_bp) for v in versions] == [
        (100_000_000, "", 0), (200_000_000, "", 0), (100_000_000, "winwin", 200)]
    assert [v.valid_from_us for v in versions] == sorted({v.valid_from_us for v in versions})
    assert api.put("/v1/members/m1", {"district": "seo"}).status_code == 201
    assert api.put("/v1/members/m1", {"district": "seo"}).status_code == 200
    assert api.put("/v1/members/m1", {"district": "seo", "status": "suspended"}).status_code == 200
    assert [(v.district, v.status) for v in _versions(api, s.member_facts, "member_id", "m1")] == [
        ("seo", "active"), ("seo", "suspended")]
    assert_book_ok(api)


def test_the_book_check_finds_a_registry_row_without_its_version(api):
    """A merchant or member row changed without the registry (an UPDATE by hand) has no
    version equal to it: corrections would judge its payments by the version before."""
    _pharmacy(api, "pharm", "seo")
    assert api.put("/v1/members/m1", {"district": "seo"}).status_code == 201
    assert_book_ok(api)
    with api.services.engine.begin() as conn:
        conn.execute(text("UPDATE merchants SET district = 'ganghwa' WHERE merchant_id = 'pharm'"))
        conn.execute(text("UPDATE members SET district = 'jung' WHERE member_id = 'm1'"))
    with api.services.reader.connect() as conn:
        bad = [c for c in check_book(conn) if not c.ok]
    assert [c.name for c in bad] == ["registry rows equal their latest fact versions"]
    assert "merchant pharm" in bad[0].detail and "member m1" in bad[0].detail


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def fresh_url(request, tmp_path):
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'old.db'}"
        return
    name, url = create_pg_database()
    try:
        yield url
    finally:
        drop_pg_database(name)


def test_a_book_made_before_the_migration_is_judged_by_its_registry_as_it_stands(fresh_url):
    """Migration 0022 seeds each merchant's and member's facts as they stand, valid from
    0: a payment recorded before it is judged by them, as before the migration."""
    migrate(fresh_url, "0021")
    engine = make_engine(fresh_url)
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO members (member_id, district, status, created_at_us, updated_at_us) "
                          "VALUES ('m1', 'ganghwa', 'active', 5, 5)"))
        conn.execute(text("INSERT INTO merchants (merchant_id, name, district, category, annual_sales_won, "
                          "registered_from, flags, merchant_share_bp, updated_at_us) "
                          "VALUES ('pharm', 'pharm', 'ongjin', 'pharmacy', 7, '2019-01-01', 'good_price', 0, 5)"))
    engine.dispose()
    migrate(fresh_url)
    engine = make_engine(fresh_url)
    try:
        with engine.connect() as conn:
            assert conn.execute(select(s.merchant_facts)).all() == [
                ("pharm", 0, "ongjin", "pharmacy", 7, "2019-01-01", "good_price", 0)]
            assert conn.execute(select(s.member_facts)).all() == [("m1", 0, "ganghwa", "active")]
            assert all(c.ok for c in check_book(conn)), check_book(conn)
        command.downgrade(alembic_config(fresh_url), "0021")  # and back
        with engine.connect() as conn:
            assert "merchant_facts" not in {r[0] for r in conn.execute(text(
                "SELECT name FROM sqlite_master WHERE type = 'table'" if engine.dialect.name == "sqlite" else
                "SELECT tablename FROM pg_tables WHERE schemaname = 'public'"))}
    finally:
        engine.dispose()
