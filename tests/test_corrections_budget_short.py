"""A correction over a payment whose component a budget cut or skipped.

A correction compares the wrong and the right policy without budgets (what the book's
budget did to each payment is not re-run). A payment whose `on_budget_short: skip`
component the budget skipped held 0 of it, and was planned right − wrong all the same:
a raise from 2% to 3% posted 1,000 of a 100,000 payment's district top-up, an amount
neither policy gives it (3,000, or 0 skipped), and a cut from 2% to 1% took back 1,000
it never held (the money audit of 2026-12-06i). Such a component is now planned from
what the payment holds: it keeps that (a correction does not pay what a budget refused
then) unless the right policy gives less, which it is cut to."""
import copy

import pytest
import yaml

from tests.book_helpers import assert_book_ok, assert_months_hold_their_payments, pay, put_member, put_merchant, topup
from tests.conftest import POLICIES, at


def _winwin(policy_id: str, district_bp: int) -> dict:
    doc = yaml.safe_load((POLICIES / "2023-01-winwin.yaml").read_text())
    doc.pop("effective_from")
    doc["policy_id"] = policy_id
    district = next(c for c in doc["components"] if c["id"] == "winwin-district")
    district["variants"][0]["bands"][0]["rate_bp"] = district_bp
    return copy.deepcopy(doc)


def _held(api, payment_id: str) -> dict[tuple[str, str], int]:
    from sqlalchemy import select
    import orjson

    from ledger import schema as s
    from ledger.book import cashback_held

    with api.services.reader.connect() as conn:
        detail, state = conn.execute(select(s.payments.c.detail, s.payments.c.refund_state)
                                     .where(s.payments.c.payment_id == payment_id)).one()
    return {k: v for k, v in cashback_held(orjson.loads(detail), orjson.loads(state or "{}")).items() if v}


def _seo_committed(api) -> int:
    budgets = api.get("/v1/budgets", role="policy-editor").json()["budgets"]
    return sum(b["committed"] for b in budgets if b["source"] == "seo")


def _correct(api, correction_id: str, district_bp: int) -> dict:
    right = _winwin(f"ww-{district_bp}", district_bp)
    assert api.post("/v1/policies", right, role="policy-editor").status_code == 201
    r = api.post("/v1/corrections", {"correction_id": correction_id, "wrong_policy_id": "winwin-2023",
                                     "right_policy_id": right["policy_id"], "from": at("2026-11-01", "00:00:00"),
                                     "to": at("2026-12-01", "00:00:00")}, role="policy-editor")
    assert r.status_code == 201, r.text
    r = api.post(f"/v1/corrections/{correction_id}/approve", role="policy-approver")
    assert r.status_code == 200, r.text
    return r.json()


def _skipped_payment(api) -> dict:
    """A 100,000 payment at a Seo-gu 상생 merchant sharing 5%, with 1,500 left of Seo-gu's
    November budget: its 2% district top-up (2,000) is skipped whole."""
    put_merchant(api, "ww", district="seo", merchant_share_bp=500)
    put_member(api, "m1")
    assert api.put("/v1/budgets/seo/2026-11", {"amount": 1_500}, role="policy-editor").status_code in (200, 201)
    topup(api, "t1", "m1", 200_000, at("2026-11-01"))
    answer = pay(api, "p1", "m1", "ww", 100_000, at("2026-11-02"))
    district = [c for c in answer["cashback"]["components"] if c["rule"] == "winwin-district"]
    assert all(c["amount"] == 0 for c in district), answer
    assert not any(k[0] == "winwin-district" for k in _held(api, "p1"))
    return answer


@pytest.mark.parametrize("district_bp", [300, 100])
def test_a_skipped_district_top_up_stays_skipped_under_a_correction(api, district_bp):
    _skipped_payment(api)
    before = _held(api, "p1")
    committed = _seo_committed(api)
    _correct(api, f"c-{district_bp}", district_bp)
    assert _held(api, "p1") == before  # neither 1,000 more nor 1,000 taken back of a component it never held
    assert _seo_committed(api) == committed
    assert_book_ok(api)
    assert_months_hold_their_payments(api)
