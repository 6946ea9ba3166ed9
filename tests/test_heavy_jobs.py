"""Heavy jobs (api/heavy.py): a worker runs EUM_HEAVY_JOBS_AT_ONCE of them at once, the
next is refused at once with nothing done, and a job that fails or is cancelled gives its
slot back when its thread ends. A simulation's or a correction's range is bounded by the
payments it would read (422 `range_too_large`, nothing done). No timing: a slot is held
by a job blocked on an event."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from types import SimpleNamespace

import httpx
import pytest
import uvicorn
from sqlalchemy import func, select

from api import heavy, uploads
from ledger import schema as s
from ledger.errors import Overloaded
from settlement import schema as ss
from tests.book_helpers import assert_book_ok, assert_problem, pay, put_member, put_merchant, snapshot, topup
from tests.conftest import at, make_api
from tests.test_concurrency import free_port

pytestmark = pytest.mark.usefixtures("no_watermark_lag")  # the settlement run settles what the test wrote

SIMULATE = ("/v1/policies/incheon-2025-09/simulate", {"from": at("2025-09-01"), "to": at("2025-10-01")})


def _correction(correction_id: str) -> dict:
    return {"correction_id": correction_id, "wrong_policy_id": "incheon-2025-09",
            "right_policy_id": "incheon-2025-09", "from": at("2025-09-01"), "to": at("2025-10-01")}


def _book(api) -> None:
    put_member(api, "m1")
    put_merchant(api, "shop")
    topup(api, "t1", "m1", 100_000, at("2025-09-10"))
    for i, day in enumerate(("2025-09-15", "2025-09-16")):
        assert pay(api, f"p{i}", "m1", "shop", 10_000, at(day))["status"] == "approved"


def _recorded(api) -> dict:
    """What a heavy job could leave behind, beside `snapshot`'s book."""
    with api.services.reader.connect() as conn:
        return {t.name: int(conn.execute(select(func.count()).select_from(t)).scalar_one())
                for t in (s.audit_log, s.corrections, s.correction_lines, ss.settlements, ss.reconciliations)}


def _heavy_calls(api) -> list:
    clearing = b"approval_id,merchant_id,amount_won,transacted_at\np0,shop,10000,2025-09-15T12:00:00+09:00\n"
    return [
        lambda: api.post(*SIMULATE, role="policy-editor"),
        lambda: api.post("/v1/corrections", _correction("c-refused"), role="policy-editor"),
        lambda: api.post("/v1/settlements", {"business_date": "2025-09-15"}, role="finance"),
        lambda: api.get("/v1/reports/daily/2025-09-15", role="finance"),
        lambda: api.get("/v1/reports/monthly/2025-09", role="finance"),
        lambda: api.client.post("/v1/reconciliations", content=clearing,
                                headers={**api.h("finance"), "content-type": "text/csv"}),
    ]


def _booked(sqlite_url, **settings):
    """A served app with `settings`, its book made (`_book`): each fixture's body."""
    api = make_api(sqlite_url, rate_limits={}, **settings)
    with api.client:
        _book(api)
        yield api


@pytest.fixture
def one_at_once(sqlite_url):
    yield from _booked(sqlite_url, heavy_jobs_at_once=1)


def test_a_heavy_job_past_the_workers_share_is_refused_and_does_nothing(one_at_once):
    api = one_at_once
    before, recorded = snapshot(api), _recorded(api)
    state = api.client.app.state
    state.heavy_slots = asyncio.Semaphore(0)  # as if the worker's one slot were taken
    for call in _heavy_calls(api):
        r = call()
        assert_problem(r, 503, "overloaded")
        assert r.headers["retry-after"] == str(heavy.RETRY_AFTER_S)
    assert snapshot(api) == before and _recorded(api) == recorded  # nothing run, nothing audited
    # Routes that are not heavy are not held back by it.
    assert api.get("/v1/policies/incheon-2025-09", role="policy-editor").status_code == 200
    state.heavy_slots = asyncio.Semaphore(1)  # the slot free again: each goes through, one after the other
    for call in _heavy_calls(api):
        assert call().status_code in (200, 201)
    assert not state.heavy_slots.locked()
    assert_book_ok(api)


def test_a_running_job_holds_the_slot_until_it_ends(one_at_once, monkeypatch):
    """A simulation blocked in its thread holds the worker's one slot: a correction and a
    second simulation are refused meanwhile, and go through once it has answered."""
    from settlement import simulate as sim

    api = one_at_once
    entered, release, real = threading.Event(), threading.Event(), sim.simulate

    def blocked(*args, **kwargs):
        entered.set()
        assert release.wait(30), "the test never released the job"
        return real(*args, **kwargs)

    monkeypatch.setattr(sim, "simulate", blocked)
    out = {}
    first = threading.Thread(target=lambda: out.setdefault("first", api.post(*SIMULATE, role="policy-editor")))
    first.start()
    try:
        assert entered.wait(30)
        recorded = _recorded(api)
        assert_problem(api.post(*SIMULATE, role="finance"), 503, "overloaded")
        assert_problem(api.post("/v1/corrections", _correction("c1"), role="policy-editor"), 503, "overloaded")
        assert _recorded(api) == recorded
    finally:
        release.set()
        first.join(30)
    assert out["first"].status_code == 200, out["first"].text
    assert api.post("/v1/corrections", _correction("c1"), role="policy-editor").status_code == 201


def test_a_job_that_fails_gives_its_slot_back(one_at_once, monkeypatch):
    from settlement import simulate as sim

    api = one_at_once
    assert_problem(api.post("/v1/policies/no-such/simulate", SIMULATE[1], role="policy-editor"), 404,
                   "policy_not_found")

    def broken(*args, **kwargs):
        raise RuntimeError("a fault of the simulator's own")

    with monkeypatch.context() as patched:
        patched.setattr(sim, "simulate", broken)
        assert_problem(api.post(*SIMULATE, role="policy-editor"), 500, "internal_error")
    assert not api.client.app.state.heavy_slots.locked()
    assert api.post(*SIMULATE, role="policy-editor").status_code == 200


def test_a_cancelled_job_gives_its_slot_back_when_its_thread_ends():
    """A request cancelled while its job runs (the client gone) cannot stop the thread:
    the slot stays taken until the thread ends, then it is free again."""
    state = SimpleNamespace(services=SimpleNamespace(settings=SimpleNamespace(heavy_jobs_at_once=1)))
    entered, release, finished = threading.Event(), threading.Event(), threading.Event()

    def job() -> str:
        entered.set()
        assert release.wait(30)
        finished.set()
        return "done"

    async def scenario() -> None:
        waiting = asyncio.ensure_future(heavy.run_heavy(state, job))
        await asyncio.to_thread(entered.wait, 30)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        with pytest.raises(Overloaded):  # the thread still runs: its slot is still taken
            await heavy.run_heavy(state, lambda: "second")
        release.set()
        await asyncio.to_thread(finished.wait, 30)
        for _ in range(1_000):  # the thread's end reaches the loop a few callbacks later
            if not state.heavy_slots.locked():
                break
            await asyncio.sleep(0)
        assert await heavy.run_heavy(state, lambda: "second") == "second"
        assert not state.heavy_slots.locked()

    asyncio.run(scenario())


@pytest.fixture
def small_ranges(sqlite_url):
    yield from _booked(sqlite_url, simulation_payments_max=1, correction_payments_max=1)


def test_a_range_of_more_payments_than_the_bound_is_422_and_does_nothing(small_ranges):
    api = small_ranges
    before, recorded = snapshot(api), _recorded(api)
    r = api.post(*SIMULATE, role="policy-editor")
    problem = assert_problem(r, 422, "range_too_large")
    assert problem["payments_max"] == 1 and "more than 1 payments" in problem["detail"], problem
    assert "eum policy simulate" in problem["detail"]
    problem = assert_problem(api.post("/v1/corrections", _correction("c1"), role="policy-editor"), 422,
                             "range_too_large")
    assert problem["payments_max"] == 1, problem
    assert snapshot(api) == before and _recorded(api) == recorded
    assert not api.client.app.state.heavy_slots.locked()
    # A range holding one payment is within it.
    one = {"from": at("2025-09-01"), "to": at("2025-09-16")}
    assert api.post("/v1/policies/incheon-2025-09/simulate", one, role="policy-editor").status_code == 200


def test_a_correction_counts_the_rest_of_its_month(sqlite_url):
    """A correction reads its range and the rest of its month from the month's first day:
    a range holding one of the month's two payments is over a bound of one."""
    api = make_api(sqlite_url, correction_payments_max=1, rate_limits={})
    with api.client:
        _book(api)
        body = {**_correction("c1"), "to": at("2025-09-16")}
        assert_problem(api.post("/v1/corrections", body, role="policy-editor"), 422, "range_too_large")
    api = make_api(sqlite_url, correction_payments_max=2, rate_limits={})
    with api.client:
        assert api.post("/v1/corrections", body, role="policy-editor").status_code == 201


def test_a_cancelled_upload_keeps_its_slot_until_its_thread_ends():
    """An upload's job holds the upload's bytes in its thread: a request cancelled while
    the job runs gave its slot back at once (`async with` left), so the next upload was
    taken beside one still running, past EUM_UPLOADS_AT_ONCE. The slot is now held until
    the thread ends (`api.uploads.Slot.run`); a reconciliation's upload slot too, handed
    to its heavy job (`run_heavy(also=)`)."""
    from api.uploads import upload_slot

    settings = SimpleNamespace(uploads_at_once=1, heavy_jobs_at_once=1)
    state = SimpleNamespace(services=SimpleNamespace(settings=settings))
    request = SimpleNamespace(app=SimpleNamespace(state=state), headers={"content-type": "text/csv"})

    async def stream():
        yield b"a,b\n"

    request.stream = stream
    entered, release, finished = threading.Event(), threading.Event(), threading.Event()

    def job(n: int) -> int:
        entered.set()
        assert release.wait(30)
        finished.set()
        return n

    async def freed(*semaphores) -> bool:
        for _ in range(1_000):  # the thread's end reaches the loop a few callbacks later
            if not any(s.locked() for s in semaphores):
                return True
            await asyncio.sleep(0)
        return False

    async def upload(run) -> int:
        async with upload_slot(request) as slot:
            return await run(slot)

    async def scenario(run, semaphores) -> None:
        entered.clear(), release.clear(), finished.clear()
        waiting = asyncio.ensure_future(upload(run))
        await asyncio.to_thread(entered.wait, 30)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        with pytest.raises(Overloaded):  # the thread still runs: its upload slot is still taken
            await upload(lambda slot: slot.run(lambda: 0))
        release.set()
        await asyncio.to_thread(finished.wait, 30)
        assert await freed(*semaphores())
        assert await upload(lambda slot: slot.run(lambda: 7)) == 7

    async def both() -> None:
        await scenario(lambda slot: slot.run(job, 1), lambda: (state.upload_slots,))
        await scenario(lambda slot: heavy.run_heavy(state, lambda: job(2), also=slot),
                       lambda: (state.upload_slots, state.heavy_slots))
        assert not state.upload_slots.locked() and not state.heavy_slots.locked()

    asyncio.run(both())


def _answer_of(sock: socket.socket) -> str:
    """An HTTP answer read whole from a socket: its head, then its body by Content-Length
    (one recv took the head alone when uvicorn sent the two as separate writes)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return data.decode()
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                   if line.lower().startswith(b"content-length:")), 0)
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return (head + b"\r\n\r\n" + body).decode()


def test_an_upload_whose_body_stops_coming_is_408_and_gives_its_slots_back(sqlite_url, monkeypatch):
    """A reconciliation takes its slots (an upload's, a heavy job's) before its body is
    read: a client that sent a few bytes of the file and then a byte now and then held
    the worker's heavy slot for as long as it went on, every settlement run, report and
    reconciliation there 503 meanwhile (the security audit). A body slower than
    BODY_BYTES_PER_S_MIN after BODY_GRACE_S is 408 `request_timeout`, the slots given
    back. Served by uvicorn: the test client reads a request's body before the app runs."""
    monkeypatch.setattr(uploads, "BODY_GRACE_S", 0.5)
    api = make_api(sqlite_url, rate_limits={}, heavy_jobs_at_once=1, uploads_at_once=1)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(api.client.app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
            time.sleep(0.05)
        with socket.create_connection(("127.0.0.1", port), timeout=10) as slow:
            slow.sendall(f"POST /v1/reconciliations HTTP/1.1\r\nHost: test\r\nAuthorization: "
                         f"{api.h('finance')['Authorization']}\r\nContent-Type: text/csv\r\n"
                         f"Content-Length: 1000000\r\n\r\napproval_id,".encode())
            answer = _answer_of(slow)  # before: nothing, the socket's 10 s timeout
        assert answer.startswith("HTTP/1.1 408") and '"code":"request_timeout"' in answer, answer
        assert "KiB/s" in answer and "nothing of it was done" in answer, answer
        base, finance = f"http://127.0.0.1:{port}", api.h("finance")
        report = httpx.get(f"{base}/v1/reports/daily/2025-09-15", headers=finance, timeout=30)
        assert report.status_code == 200, report.text  # the heavy slot is back
        clearing = b"approval_id,merchant_id,amount_won,transacted_at\np0,shop,10000,2025-09-15T12:00:00+09:00\n"
        upload = httpx.post(f"{base}/v1/reconciliations", content=clearing,
                            headers={**finance, "content-type": "text/csv"}, timeout=30)
        assert upload.status_code == 200, upload.text  # and the upload slot
    finally:
        server.should_exit = True
        thread.join(30)
