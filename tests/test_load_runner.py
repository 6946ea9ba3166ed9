"""loadtests/run.py reads Locust's final figures and judges a run by them.

It read `<prefix>_stats.csv`, which Locust rewrites once a second while it runs and not
again at shutdown: a run whose service died in its last fraction of a second read 0
failures there (and exited 0, `book ok`) against Locust's own report's 20, and a normal
run ~3% fewer payments than the report and the book. Here Locust itself runs, as run.py
runs it (`locust_command`), for 5 s against a small HTTP server on 127.0.0.1 that answers
200 and then, from 2 s after the first request on, 500 (5 s: on a loaded machine Locust's
first request came more than a second into a 3-s run, which then saw no 500 at all): the figures run.py prints must be those of Locust's HTML
report, failures included, and the run must be judged failed (no database or service).
The scenario checks (the top-up storm's limit reset and bound, grant money spent) are
read from a PostgreSQL book.

Skipped when Locust, or PostgreSQL for its test, is not there."""

from __future__ import annotations

import json
import re
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from loadtests import harness as h
from loadtests import run

LOCUST = Path(h.PYTHON).parent / "locust"

LOCUSTFILE = """
from locust import FastHttpUser, constant_throughput, task

class Steady(FastHttpUser):
    wait_time = constant_throughput(40)

    @task(3)
    def pay(self):
        self.client.post("/pay", json={})

    @task(1)
    def look(self):
        self.client.get("/look")
"""


def _server(fail_after_s: float) -> tuple[ThreadingHTTPServer, list[float]]:
    started: list[float] = []

    class Handler(BaseHTTPRequestHandler):
        def _answer(self) -> None:
            if self.command == "POST":
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
            started.append(started[0] if started else time.monotonic())
            code = 200 if time.monotonic() - started[0] < fail_after_s else 500
            self.send_response(code)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"{}")

        do_GET = do_POST = _answer

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer((h.LOOPBACK, 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, started


def _html_figures(path: Path) -> dict:
    """The request and response-time tables of Locust's HTML report (its embedded
    `window.templateArgs`), by request name."""
    found = re.search(r"window\.templateArgs = (\{.*?\})\s*\n", path.read_text())
    assert found, "no templateArgs in the HTML report"
    args = json.loads(found.group(1))
    times = {row["name"]: row for row in args["response_time_statistics"]}
    return {row["name"]: {**row, **times[row["name"]]} for row in args["requests_statistics"]}


@pytest.mark.skipif(not LOCUST.exists(), reason="locust is not installed")
def test_the_figures_are_locusts_final_ones_and_late_failures_fail_the_run(tmp_path):
    (tmp_path / "lf.py").write_text(LOCUSTFILE)
    server, _ = _server(fail_after_s=2.0)
    try:
        prefix = tmp_path / "run"
        done = subprocess.run(run.locust_command(tmp_path / "lf.py", "Steady", f"http://{h.LOOPBACK}:{server.server_port}",
                                                 4, 5, prefix), capture_output=True, text=True, timeout=120)
    finally:
        server.shutdown()
    assert done.returncode == 1, done.stderr[-2000:]  # Locust's: some requests failed
    stats = run.read_stats(Path(f"{prefix}.json"))
    report = _html_figures(Path(f"{prefix}.html"))
    for name in ("/pay", "/look", "Aggregated"):
        assert stats[name]["requests"] == report[name]["num_requests"] > 0, (name, stats[name], report[name])
        assert stats[name]["failures"] == report[name]["num_failures"], (name, stats[name], report[name])
        assert stats[name]["max"] == report[name]["max_response_time"], (name, stats[name], report[name])
        for key, q in (("p50", 0.5), ("p95", 0.95), ("p99", 0.99)):
            assert stats[name][key] == report[name][str(q)], (name, key, stats[name], report[name])
        assert isinstance(stats[name]["max"], int)
    total = stats["Aggregated"]
    assert total["failures"] > 0 and total["requests"] == stats["/pay"]["requests"] + stats["/look"]["requests"]
    problems = run.locust_verdict(stats, done.returncode)
    assert problems and "not answered 200 or 201" in problems[0], problems


def test_the_verdict_of_a_run_without_a_kill():
    clean = {"Aggregated": {"requests": 100, "failures": 0}}
    assert run.locust_verdict(clean, 0) == []
    assert "a user's task raised" in run.locust_verdict(clean, 1)[0]  # Locust's 1 with no failed request
    assert "Locust exited 2" in run.locust_verdict(clean, 2)[0]
    assert "20 requests" in run.locust_verdict({"Aggregated": {"requests": 100, "failures": 20}}, 1)[0]
    assert run.locust_verdict({}, 0) == ["Locust recorded no request"]


def test_percentiles_are_locusts_over_its_buckets():
    # Locust's rule: from the slowest bucket down, the first at which no more than
    # count x q requests are left below it.
    buckets = {10: 51, 20: 44, 100: 4, 400: 1}  # 100 requests
    assert [run.percentile_ms(buckets, 100, q) for q in (0.5, 0.9, 0.95, 0.99, 0.999)] == [10, 20, 100, 400, 400]
    assert run.percentile_ms({}, 0, 0.5) == 0


@pytest.mark.postgres
def test_the_scenario_checks_fail_when_the_scenario_did_not_do_its_work(capsys):
    """The top-up storm had no November top-ups, so its limit never reset nor bound, and
    nothing said so; the grant day spent almost no grant money. The runner now checks."""
    import psycopg

    from settlement.testing import postgres_available, temp_database

    if not postgres_available():
        pytest.skip("PostgreSQL is not reachable")
    with temp_database("postgresql") as url:
        assert [ok for _, ok, _ in run.scenario_figures(url, "topup-storm")] == [False, False]
        assert [ok for _, ok, _ in run.scenario_figures(url, "grant-day")] == [False]
        december_1st_us = 1_764_514_800_000_000  # 2025-12-01T00:00+09:00
        with psycopg.connect(url) as conn:
            for topup_id, amount, status, code in (("T-a-1", 500_000, "approved", None),
                                                   ("T-a-4", 500_000, "declined", "topup_monthly_limit_exceeded"),
                                                   ("seed-M1", 1_400_000, "approved", None)):
                conn.execute("INSERT INTO topups (topup_id, request_hash, member_id, amount_won, occurred_at_us, "
                             "status, decline_code, response, recorded_at_us) VALUES (%s, 'h', 'M1', %s, %s, %s, %s, "
                             "'{}', 0)", (topup_id, amount, december_1st_us + 3_600_000_000, status, code))
        assert [ok for _, ok, _ in run.scenario_figures(url, "topup-storm")] == [True, True]
    out = capsys.readouterr().out
    assert "2025-12 approved 1, 2025-12 declined topup_monthly_limit_exceeded 1" in out
