"""A member's history filtered by kind and by Seoul month (`GET
/v1/members/{id}/transactions?kind=&month=`): a card app shows "this month's payments"
or "top-ups" without paging through everything. Filters keep the history's order (as
recorded, newest first) and its cursor; a cursor is resent with the same filters."""

from __future__ import annotations

from tests.book_helpers import assert_problem, pay, put_member, put_merchant, refund, snapshot, topup
from tests.conftest import at

HISTORY = "/v1/members/m1/transactions"


def _book(api) -> None:
    """m1's September and October 2025, with events either side of the month's edge in
    Seoul (00:10 on 1 October is 30 September in UTC)."""
    put_member(api, "m1")
    put_member(api, "m2")
    put_merchant(api, "shop")
    topup(api, "t-sep", "m1", 100_000, at("2025-09-02"))
    pay(api, "p-sep", "m1", "shop", 20_000, at("2025-09-10"))
    pay(api, "p-sep-late", "m1", "shop", 5_000, at("2025-09-30", "23:50:00"))
    topup(api, "t-oct", "m1", 50_000, at("2025-10-01", "00:10:00"))
    pay(api, "p-oct", "m1", "shop", 8_000, at("2025-10-03"))
    refund(api, "p-sep", "r-sep", 20_000, at("2025-10-04"))  # a refund in October of a September payment
    topup(api, "t-other", "m2", 70_000, at("2025-09-15"))  # another member's: never in m1's history


def _refs(api, **params) -> list[tuple[str, str]]:
    """Every (kind, ref) the filtered history gives, page by page (2 to a page), each
    page asked with the same filters and the last page's cursor."""
    out, cursor = [], None
    while True:
        query = {**params, "limit": 2, **({"cursor": cursor} if cursor else {})}
        r = api.get(HISTORY, params=query)
        assert r.status_code == 200, r.text
        body = r.json()
        assert len(body["items"]) <= 2
        out += [(item["kind"], item["ref"]) for item in body["items"]]
        cursor = body["next_cursor"]
        if cursor is None:
            return out


def test_history_filtered_by_kind_and_month_keeps_its_order_and_pages(api):
    _book(api)
    everything = _refs(api)
    assert everything == [("clawback", "r-sep"), ("refund", "r-sep"), ("cashback", "p-oct"), ("payment", "p-oct"),
                          ("topup", "t-oct"), ("cashback", "p-sep-late"), ("payment", "p-sep-late"),
                          ("cashback", "p-sep"), ("payment", "p-sep"), ("topup", "t-sep")]

    assert _refs(api, kind="topup") == [("topup", "t-oct"), ("topup", "t-sep")]
    # several kinds: the parameter repeated
    assert _refs(api, kind=["payment", "refund"]) == [("refund", "r-sep"), ("payment", "p-oct"),
                                                      ("payment", "p-sep-late"), ("payment", "p-sep")]
    # the month each event occurred in, in Seoul: 23:50 on 30 September is September,
    # 00:10 on 1 October October; the October refund of a September payment is October's
    assert _refs(api, month="2025-09") == [("cashback", "p-sep-late"), ("payment", "p-sep-late"),
                                          ("cashback", "p-sep"), ("payment", "p-sep"), ("topup", "t-sep")]
    assert _refs(api, month="2025-10") == [("clawback", "r-sep"), ("refund", "r-sep"), ("cashback", "p-oct"),
                                          ("payment", "p-oct"), ("topup", "t-oct")]
    assert _refs(api, month="2025-10", kind="payment") == [("payment", "p-oct")]
    assert _refs(api, month="2025-08") == []
    assert _refs(api, kind="withdrawal") == []

    # the items are the unfiltered history's, as they are there
    full = {(i["kind"], i["ref"]): i for i in api.get(HISTORY, params={"limit": 50}).json()["items"]}
    for item in api.get(HISTORY, params={"kind": "payment", "month": "2025-09"}).json()["items"]:
        assert item == full[(item["kind"], item["ref"])]


def test_a_bad_filter_is_refused_and_changes_nothing(api):
    _book(api)
    before = snapshot(api)
    body = assert_problem(api.get(HISTORY, params={"kind": "purchase"}), 422, "validation_error")
    assert body["errors"][0]["loc"] == ["query", "kind", "0"], body
    assert "'payment'" in body["errors"][0]["msg"], body  # it names what it takes
    assert_problem(api.get(HISTORY, params={"kind": ["topup", "Payment"]}), 422, "validation_error")
    for month in ("2025-13", "2025-9", "25-09", "1999-12", "2025-09-01", ""):
        assert_problem(api.get(HISTORY, params={"month": month}), 422, "validation_error")
    assert_problem(api.get(HISTORY, params={"month": ["2025-09", "2025-10"]}), 422, "validation_error")
    assert_problem(api.get("/v1/members/nobody/transactions", params={"kind": "topup"}), 404, "member_not_found")
    assert snapshot(api) == before


def test_every_kind_the_book_writes_is_a_filter():
    """The filter's kinds are the book's: a kind a new command posts and the list forgot
    would be refused as a filter while its transactions fill the history."""
    import re
    from pathlib import Path

    from ledger.queries import TXN_KINDS

    text = "".join(path.read_text() for path in (Path(__file__).parent.parent / "ledger").glob("*.py"))
    written = set(re.findall(r'\.post\(kind="([a-z_]+)"', text))
    assert len(written) >= 9, written  # every command's, found by the pattern
    assert written <= set(TXN_KINDS), written - set(TXN_KINDS)
    assert len(TXN_KINDS) == len(set(TXN_KINDS))
