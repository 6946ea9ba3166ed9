"""/metrics, as an operator scrapes it: payments by outcome, cashback, batches and the
writers' queue depth are there and move with the traffic."""

from __future__ import annotations

import os
import re
import time

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


class _Spy:
    """A module's structlog logger, its warnings kept as (event, fields) and passed on."""

    def __init__(self, real):
        self.real, self.warnings = real, []

    def warning(self, event, **fields):
        self.warnings.append((event, fields))
        return self.real.warning(event, **fields)

    def __getattr__(self, name):
        return getattr(self.real, name)


def test_a_limit_put_past_a_mark_warns_and_payments_a_budget_cuts_are_counted(api, monkeypatch):
    """A budget limit set or lowered so that what is committed is at or past 80%/95%
    warned nothing (only a payment batch crossing a mark did), and payments a budget cut
    (`budget_partial`) showed nowhere but in their own answers. Now the PUT logs
    `budget.threshold` and counts the same metric event, and each cut payment is counted
    per budget and reason, with one `budget.cut` line per budget per batch."""
    import ledger.book
    import ledger.registry
    from tests.book_helpers import budget_rows, pay

    book_log, registry_log = _Spy(ledger.book.log), _Spy(ledger.book.log)
    monkeypatch.setattr(ledger.book, "log", book_log)
    monkeypatch.setattr(ledger.registry, "log", registry_log, raising=False)
    put_merchant(api, "shop")
    for member in ("m1", "m2", "m3", "m4"):
        put_member(api, member)
        topup(api, f"t-{member}", member, 200_000, at("2025-09-10"))
    before = api.client.get("/metrics").text

    def moved(name: str, labels: str) -> float:
        return _value(api.client.get("/metrics").text, name, labels) - _value(before, name, labels)

    def event(source: str, name: str) -> float:
        return moved("eum_budget_events_total", f'{{event="{name}",source="{source}"}}')

    def cuts(source: str, period: str) -> float:
        return moved("eum_budget_cut_payments_total", f'{{period="{period}",reason="budget_partial",source="{source}"}}')

    assert api.put("/v1/budgets/city/2025-09", {"amount": 9_000}, role="policy-editor").status_code == 200
    assert api.put("/v1/budgets/national/2025-09", {"amount": 100_000}, role="policy-editor").status_code == 200
    assert registry_log.warnings == []  # nothing committed yet
    assert pay(api, "p1", "m1", "shop", 100_000, at("2025-09-11"))["cashback"]["amount"] == 10_000  # city 6,000
    # lowered to 7,000: 6,000 committed is 85.7%, past 80% (and not 95%)
    assert api.put("/v1/budgets/city/2025-09", {"amount": 7_000}, role="policy-editor").status_code == 200
    assert [(e, f["source"], f["threshold_bp"]) for e, f in registry_log.warnings] == [
        ("budget.threshold", "city", 8_000)]
    assert (event("city", "threshold_80"), event("city", "threshold_95")) == (1, 0)
    assert api.put("/v1/budgets/city/2025-09", {"amount": 7_000}, role="policy-editor").status_code == 200
    assert len(registry_log.warnings) == 1  # the same limit again crosses nothing

    short = pay(api, "p2", "m2", "shop", 100_000, at("2025-09-11"))  # city has 1,000 left of 6,000 asked
    assert short["cashback"]["components"][0]["reason"] == "budget_partial"
    # The budget that was short is answered too (the budgets audit), named as the API names budgets.
    assert short["cashback"]["components"][0]["short_of"] == [{"source": "city", "period": "2025-09"}]
    assert (event("city", "threshold_80"), event("city", "threshold_95")) == (1, 1)  # the batch crossed 95%
    pay(api, "p3", "m3", "shop", 100_000, at("2025-09-12"))  # city has nothing left
    assert cuts("city", "2025-09") == 2
    # the year's limit set at what it holds: past both marks at once; then it binds too
    national_year = budget_rows(api)[("national", "2025")]["committed"]
    assert api.put("/v1/budgets/national/2025", {"amount": national_year}, role="policy-editor").status_code == 200
    assert [(f["source"], f["period"], f["threshold_bp"]) for _, f in registry_log.warnings[1:]] == [
        ("national", "2025", 8_000), ("national", "2025", 9_500)]
    assert (event("national", "threshold_80"), event("national", "threshold_95")) == (1, 1)
    assert pay(api, "p4", "m4", "shop", 100_000, at("2025-09-12"))["cashback"]["amount"] == 0
    assert (cuts("city", "2025-09"), cuts("national", "2025"), cuts("national", "2025-09")) == (3, 1, 0)
    cut_lines = [(f["source"], f["period"], f["budget_partial_payments"]) for e, f in book_log.warnings
                 if e == "budget.cut"]
    assert cut_lines == [("city", "2025-09", 1), ("city", "2025-09", 1), ("city", "2025-09", 1),
                         ("national", "2025", 1)]


def _counted_after(api, before: str, want: float, labels: str) -> float:
    """How far the metric moved from `before`, once it reaches `want` or 2 s have
    passed: the writer thread counts just after its commit, beside the answer."""
    import time

    deadline = time.monotonic() + 2
    while True:
        moved = _value(api.client.get("/metrics").text, *labels) - _value(before, *labels)
        if moved >= want or time.monotonic() > deadline:
            return moved
        time.sleep(0.05)


def _payment_counted_once(api, before: str, answer: dict) -> None:
    approved = ("eum_payments_total", '{decline_code="",status="approved"}')
    assert _counted_after(api, before, 1, approved) == 1
    cashback = answer["cashback"]["amount"]
    assert cashback > 0 and _counted_after(api, before, cashback, ("eum_cashback_won_total", "")) == cashback


def test_a_payment_committed_after_its_request_timed_out_is_counted_once(db_url, monkeypatch):
    """The first request gave up at the request timeout (503) while its batch went on to
    commit, and the retry is a 200 replay: the payment was counted only where a 201 was
    answered, so never. It is counted at its commit, by the writer that committed it."""
    import time

    from tests.book_helpers import commit_late, txn_count
    from tests.conftest import make_api

    api = make_api(db_url, request_timeout_ms=300)
    with api.client:
        put_member(api, "m1")
        put_merchant(api, "shop")
        topup(api, "t1", "m1", 100_000, at("2025-09-10"))
        commit_late(monkeypatch, "p1", 1.0)
        before = api.client.get("/metrics").text
        body = {"payment_id": "p1", "member_id": "m1", "merchant_id": "shop", "amount": 10_000,
                "occurred_at": at("2025-09-15")}
        first = api.post("/v1/payments", body)
        assert first.status_code == 503, first.text
        deadline = time.monotonic() + 5
        while txn_count(api, "p1") < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        again = api.post("/v1/payments", body)
        assert again.status_code == 200 and again.headers["idempotent-replayed"] == "true", again.text
        _payment_counted_once(api, before, again.json())
        assert api.post("/v1/payments", body).status_code == 200  # a replay is not counted again
        _payment_counted_once(api, before, again.json())


def test_a_payment_whose_commit_broke_the_writers_connection_is_counted_once(pg_url, monkeypatch):
    """The COMMIT went through and the connection broke with it: the writer ran the batch
    again on a new connection, found the payment and answered it as a replay (200), so
    the first request itself never saw a 201 and the payment was never counted."""
    from tests.book_helpers import commit_then_break, txn_count
    from tests.conftest import make_api

    api = make_api(pg_url)
    with api.client:
        put_member(api, "m1")
        put_merchant(api, "shop")
        topup(api, "t1", "m1", 100_000, at("2025-09-10"))
        injected = commit_then_break(monkeypatch)
        before = api.client.get("/metrics").text
        first = api.post("/v1/payments", {"payment_id": "p1", "member_id": "m1", "merchant_id": "shop",
                                          "amount": 10_000, "occurred_at": at("2025-09-15")})
        assert injected and txn_count(api, "p1") == 2
        assert first.status_code == 200 and first.headers["idempotent-replayed"] == "true", first.text
        _payment_counted_once(api, before, first.json())


def test_a_dead_workers_queue_depth_leaves_the_sum_and_its_counts_stay(tmp_path, monkeypatch):
    """eum_batch_queue_depth sums live workers (livesum). A worker killed and replaced
    left its last depth in the sum until the service restarted: a backlog no queue held
    (the observability audit). Its counters stay: what it counted happened."""
    import subprocess
    import sys

    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    code = ("from api import metrics; metrics.observe_batch(1, 0.001, depth={}); "
            "metrics.count_payment('approved', '', 5)")
    dead = subprocess.run([sys.executable, "-c", code.format(123)], env=env, capture_output=True, text=True,
                          timeout=120)
    assert dead.returncode == 0, dead.stderr
    ready = "; print('ready', flush=True); import sys; sys.stdin.read()"
    alive = subprocess.Popen([sys.executable, "-c", code.format(7) + ready], env=env,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # its metrics written, not only its gauge's file made: a scrape read its
        # counter's file before that was sized (prometheus/client_python#1199)
        assert alive.stdout.readline().strip() == "ready", alive.stderr.read()
        monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
        from api import metrics

        text = metrics.render()[0].decode()
    finally:
        alive.communicate("", timeout=60)
    assert re.search(r"^eum_batch_queue_depth 7\.0$", text, re.M), text  # the live one's, not 130
    assert re.search(r'^eum_payments_total\{decline_code="",status="approved"\} 2\.0$', text, re.M), text


def test_a_workers_file_of_no_bytes_is_left_out_not_a_failed_scrape(tmp_path, monkeypatch):
    """prometheus_client makes a worker's file, then sizes it. A scrape in between, or
    after the worker was killed in between, failed on the empty file (struct.error), a
    500 losing every worker's metrics (prometheus/client_python#1199): seen in this
    suite. The empty file is left out; the others are read."""
    import subprocess
    import sys

    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    wrote = subprocess.run([sys.executable, "-c", "from api import metrics; metrics.count_payment('approved', '', 5)"],
                           env=env, capture_output=True, text=True, timeout=120)
    assert wrote.returncode == 0, wrote.stderr
    (tmp_path / "counter_4194000.db").touch()  # a worker's, made and not yet sized (or never: killed)
    (tmp_path / "histogram_4194000.db").touch()
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    from api import metrics

    text = metrics.render()[0].decode()
    assert re.search(r'^eum_payments_total\{decline_code="",status="approved"\} 1\.0$', text, re.M), text
    assert re.search(r"^eum_cashback_won_total 5\.0$", text, re.M), text


def test_a_dead_workers_gauge_removed_by_another_scrape_meanwhile_is_no_error(tmp_path, monkeypatch):
    """Two workers scraping at once both removed a dead worker's gauge file: the second
    got FileNotFoundError, a 500 (review of the dead-worker fix)."""
    import subprocess
    import sys

    from prometheus_client import multiprocess

    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    dead = subprocess.run([sys.executable, "-c", "from api import metrics; metrics.observe_batch(1, 0.001, depth=9)"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert dead.returncode == 0, dead.stderr
    removed_first = multiprocess.mark_process_dead

    def raced(pid, path=None):
        removed_first(pid, path)  # the other scrape's removal, then this one's
        raise FileNotFoundError(2, "No such file or directory")

    monkeypatch.setattr(multiprocess, "mark_process_dead", raced)
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    from api import metrics

    text = metrics.render()[0].decode()
    assert not re.search(r"^eum_batch_queue_depth [1-9]", text, re.M), text


def test_every_metric_is_documented():
    """An operator wiring alerts reads docs/design.md for what `/metrics` serves: four of
    its nine metrics (the requests, their latency, the batches and their time) were named
    nowhere but in `api/metrics.py` (operations audit, 2026-12-07). Each has its row in
    the table of "Budget warnings and metrics" now."""
    from pathlib import Path

    from prometheus_client import REGISTRY

    from api import metrics  # noqa: F401  (registers them)

    design = (Path(__file__).resolve().parents[1] / "docs" / "design.md").read_text(encoding="utf-8")
    names = {family.name + ("_total" if family.type == "counter" else "") for collector in
             list(REGISTRY._collector_to_names) if hasattr(collector, "describe") for family in collector.describe()
             if family.name.startswith("eum_")}
    assert len(names) >= 9, names
    assert not [name for name in sorted(names) if f"| `{name}` |" not in design], sorted(names)


def test_the_queue_depth_gauge_moves_while_the_writer_is_stuck(sqlite_url, monkeypatch):
    """`eum_batch_queue_depth` was set by the writer after each batch only, so while the
    writer waited on a stalled database (the time the queue fills and payments are 503)
    it showed its last figure, 0. Each worker sets it every second too now."""
    import threading

    from api import app as app_module
    from tests.conftest import make_api

    monkeypatch.setattr(app_module, "QUEUE_WATCH_S", 0.05, raising=False)
    api = make_api(sqlite_url, request_timeout_ms=300, batch_writers=1)
    with api.client:
        put_member(api, "m1")
        put_merchant(api, "shop")
        book = api.client.app.state.services.book
        stalled, real = threading.Event(), book.execute

        def stuck(*args, **kwargs):
            stalled.wait(30)
            return real(*args, **kwargs)

        monkeypatch.setattr(book, "execute", stuck)
        try:
            for n in range(4):  # the first is taken into the stuck batch; three stay queued
                r = api.post("/v1/topups", {"topup_id": f"t{n}", "member_id": "m1", "amount": 10_000,
                                            "occurred_at": at("2025-09-10")})
                assert r.status_code == 503, r.text
            time.sleep(0.3)
            depth = _value(api.client.get("/metrics").text, "eum_batch_queue_depth")
        finally:
            stalled.set()
    assert depth == 3
