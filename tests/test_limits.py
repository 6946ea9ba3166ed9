"""Every bound says so with a problem document, and a refused request changes nothing:
request body size (JSON and uploads), page sizes, and batch sizes (rows in a bulk
file, size of a policy or clearing file)."""

from __future__ import annotations

import pytest
import yaml

from ledger import grant_jobs
from tests.book_helpers import approve_program, assert_book_ok, assert_problem, put_member, snapshot
from tests.conftest import POLICIES, at, make_api

pytestmark = pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)


@pytest.fixture
def small(db_url):
    """The app with small limits, so that each can be passed cheaply."""
    api = make_api(db_url, request_body_bytes_max=1024, upload_bytes_max=4096, page_size_max=5)
    with api.client:
        put_member(api, "m1")
        program = yaml.safe_load((POLICIES / "grants" / "2025-07-livelihood-coupon-round1.yaml").read_text())
        program = {**program, "valid_from": "2025-07-21", "valid_until": "2025-11-30"}
        assert api.post("/v1/grant-programs", program, role="policy-editor").status_code == 201
        approve_program(api, program["program_id"])
        yield api


def test_json_body_over_the_limit_is_413(small):
    before = snapshot(small)
    body = {"topup_id": "t1", "member_id": "m1", "amount": 1_000, "occurred_at": at("2025-09-01"),
            "pad": "x" * 2_000}
    refused = small.post("/v1/topups", body)
    assert_problem(refused, 413, "payload_too_large")
    assert refused.headers["cache-control"] == "no-store" and refused.headers["x-request-id"]
    assert_problem(small.put("/v1/members/m2", {"district": "seo", "pad": "x" * 2_000}), 413, "payload_too_large")
    assert snapshot(small) == before


def test_uploads_have_their_own_larger_limit(small):
    before = snapshot(small)
    rows = "disbursement_id,member_id,amount\n" + "".join(f"d{i},m1,1000\n" for i in range(400))
    assert len(rows) > 4096
    r = small.client.post("/v1/grant-programs/coupon-2025-r1/disbursements/bulk", content=rows.encode(),
                          headers={**small.h("policy-editor"), "content-type": "text/csv"})
    assert_problem(r, 413, "payload_too_large")
    r = small.client.post("/v1/reconciliations", content=b"approval_id,merchant_id,amount_won,transacted_at\n" * 100,
                          headers={**small.h("finance"), "content-type": "text/csv"})
    assert_problem(r, 413, "payload_too_large")
    # ... larger than a JSON body may be: 2 KiB of CSV is read (and refused for its contents)
    r = small.client.post("/v1/reconciliations", content=b"approval_id,merchant_id\n" + b"p,s\n" * 400,
                          headers={**small.h("finance"), "content-type": "text/csv"})
    assert_problem(r, 422, "clearing_file_invalid")
    assert snapshot(small) == before


def test_page_sizes_are_bounded(small):
    assert_problem(small.get("/v1/members/m1/transactions?limit=6"), 422, "page_size_too_large")
    assert small.get("/v1/members/m1/transactions?limit=5").status_code == 200
    r = small.get("/v1/audit-log?limit=501", role="auditor")
    assert_problem(r, 422, "page_size_too_large")
    assert r.json()["limit_max"] == 500
    assert_problem(small.client.post("/v1/reconciliations?rows_max=100001", content=b"x",
                                     headers=small.h("finance")), 422, "validation_error")
    # Every list's page bound is the same problem, with its limit_max: the finance lists said
    # validation_error with no bound to read back (a client paging by limit_max could not).
    for path, page_max in (("/v1/settlements", 1_000), ("/v1/reconciliations", 1_000), ("/v1/merchants", 1_000)):
        r = small.get(f"{path}?limit={page_max + 1}", role="finance")
        assert_problem(r, 422, "page_size_too_large")
        assert r.json()["limit_max"] == page_max, (path, r.json())
        assert small.get(f"{path}?limit={page_max}", role="finance").status_code == 200, path


def test_bulk_file_over_the_row_limit_moves_no_money(small, monkeypatch):
    monkeypatch.setattr(grant_jobs, "ROWS_MAX", 3)
    monkeypatch.setattr(grant_jobs, "CHUNK_ROWS_MAX", 2)  # rows are written two at a time
    before = snapshot(small)
    rows = "disbursement_id,member_id,amount\n" + "".join(f"d{i},m1,1000\n" for i in range(5))
    r = small.client.post("/v1/grant-programs/coupon-2025-r1/disbursements/bulk?occurred_at=2025-08-01T09:00:00%2B09:00",
                          content=rows.encode(), headers={**small.h("policy-editor"), "content-type": "text/csv"})
    assert_problem(r, 422, "bad_csv")
    assert "more than 3 rows" in r.json()["detail"]
    assert snapshot(small) == before  # refused whole: not the first rows and then an error
    assert_book_ok(small)


def test_policy_document_over_its_size_is_named(small):
    text = "policy_id: big\nname: big\n" + "# padding\n" * 110_000
    r = small.client.post("/v1/policies", content=text.encode(),
                          headers={**small.h("policy-editor"), "content-type": "application/yaml"})
    # over the upload limit of this app: 413; the document limit itself (1 MB) is in
    # tests/test_fuzz_inputs.py, below any upload limit a deployment would set
    assert_problem(r, 413, "payload_too_large")


def test_uploads_past_the_workers_share_are_refused_and_their_body_not_kept(small):
    """A worker takes EUM_UPLOADS_AT_ONCE uploads at once (their bodies are read whole):
    the next is 503 overloaded with Retry-After, and nothing of it is done."""
    import asyncio

    before = snapshot(small)
    state = small.client.app.state
    state.upload_slots = asyncio.Semaphore(0)  # as if the worker's slots were all taken
    rows = b"disbursement_id,member_id\nu1,m1\n"
    for path, role in (("/v1/grant-programs/coupon-2025-r1/disbursements/bulk", "policy-editor"),
                       ("/v1/reconciliations", "finance")):
        r = small.client.post(path, content=rows, headers={**small.h(role), "content-type": "text/csv"})
        assert_problem(r, 503, "overloaded")
        assert r.headers["retry-after"] == "5"
    assert snapshot(small) == before
    state.upload_slots = asyncio.Semaphore(1)  # a slot free again: the same file goes through
    r = small.client.post("/v1/grant-programs/coupon-2025-r1/disbursements/bulk?occurred_at=2025-08-01T09:00:00%2B09:00",
                          content=b"disbursement_id,member_id,income_status\nu1,m1,general\n",
                          headers={**small.h("policy-editor"), "content-type": "text/csv"})
    assert r.status_code == 200 and r.json()["disbursed"] == 1, r.text
