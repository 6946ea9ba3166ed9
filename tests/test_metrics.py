"""/metrics, as an operator scrapes it: payments by outcome, cashback, batches and the
writers' queue depth are there and move with the traffic."""

from __future__ import annotations

import re

from tests.book_helpers import put_member, put_merchant, topup
from tests.conftest import at


def _value(text: str, name: str, labels: str = "") -> float:
    found = re.search(rf"^{re.escape(name)}{re.escape(labels)} ([0-9.e+]+)$", text, re.M)
    return float(found.group(1)) if found else 0.0


def test_metrics_move_with_payments(api):
    put_member(api, "m1")
    put_merchant(api, "shop")
    topup(api, "t1", "m1", 100_000, at("2025-09-10"))
    before = api.client.get("/metrics").text
    r = api.post("/v1/payments", {"payment_id": "p1", "member_id": "m1", "merchant_id": "shop", "amount": 10_000,
                                  "occurred_at": at("2025-09-15")})
    assert r.status_code == 201 and r.json()["status"] == "approved", r.text
    after = api.client.get("/metrics").text
    approved = 'eum_payments_total{decline_code="",status="approved"}'
    assert _value(after, approved) == _value(before, approved) + 1
    assert _value(after, "eum_cashback_won_total") == _value(before, "eum_cashback_won_total") + r.json()[
        "cashback"]["amount"]
    assert _value(after, "eum_batch_commands_count") > _value(before, "eum_batch_commands_count")
    assert re.search(r"^eum_batch_queue_depth [0-9.]+$", after, re.M), "queue depth gauge missing"


def test_metrics_can_be_closed_with_a_token(tmp_path):
    """With EUM_METRICS_TOKEN, /metrics (payments by decline code, cashback paid, budget
    events) answers only the scraper that sends it."""
    from ledger.db import migrate
    from tests.conftest import make_api

    url = f"sqlite:///{tmp_path / 'eum.db'}"
    migrate(url)
    api = make_api(url, metrics_token="scrape-" + "t" * 24)
    with api.client:
        assert api.client.get("/metrics").status_code == 401
        assert api.client.get("/metrics", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert api.client.get("/metrics", headers={"Authorization": api.h("admin")["Authorization"]}).status_code == 401
        ok = api.client.get("/metrics", headers={"Authorization": "Bearer scrape-" + "t" * 24})
        assert ok.status_code == 200 and "eum_" in ok.text
