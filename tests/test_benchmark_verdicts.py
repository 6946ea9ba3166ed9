"""The benchmark scripts' verdicts and exit codes (benchmarks/), checked in seconds
without running a benchmark: a book check that fails is exit 1 (a target missed stays
exit 0: a figure), a run with errors is not a PASS, and the bulk replay seeds SQLite's
merchants as PostgreSQL's, so both backends do the same work."""

from __future__ import annotations

import sys
from types import SimpleNamespace

import pytest
from sqlalchemy import select

from benchmarks import bulk_disburse, bulk_replay, service_runs
from loadtests import harness as h


def _argv(monkeypatch, *args: str) -> None:
    monkeypatch.setattr(sys, "argv", ["benchmark", *args])


@pytest.mark.parametrize("book_ok, code", [(True, 0), (False, 1)])
def test_bulk_replay_exits_1_on_a_failed_book_check_and_0_on_a_missed_target(monkeypatch, capsys, book_ok, code):
    """It printed BAD and MISS and exited 0 whatever the book said."""
    slow = {"per_s": 10.0, "python_us": 1.0, "postgres_us": 0.0, "ok": book_ok, "elapsed": 1.0, "n": 10}
    monkeypatch.setattr(bulk_replay, "run_sqlite", lambda *args, **kwargs: dict(slow))
    monkeypatch.setattr(h, "print_machine", lambda *args, **kwargs: {})
    _argv(monkeypatch, "--backends", "sqlite", "--modes", "execute", "--repeats", "1", "--payments", "1000",
          "--members", "50", "--merchants", "20")
    assert bulk_replay.main() == code
    out = capsys.readouterr().out
    assert "MISS" in out and (f"book {'ok' if book_ok else 'FAILED'}") in out
    assert ("FAILED: the book checks of sqlite execute" in out) == (not book_ok)


@pytest.mark.parametrize("book_ok, code", [(True, 0), (False, 1)])
def test_bulk_disburse_exits_1_on_a_failed_check_and_0_on_a_missed_target(monkeypatch, capsys, book_ok, code):
    slow = {"rows": 1_000, "disbursed": 1_000, "errors": 0, "seconds": 600.0, "cpu_s": 1.0, "again_s": 1.0,
            "check_s": 0.1, "ok": book_ok}
    monkeypatch.setattr(bulk_disburse, "run", lambda *args, **kwargs: dict(slow))
    monkeypatch.setattr(h, "print_machine", lambda *args, **kwargs: {})
    monkeypatch.setattr(bulk_disburse, "recipients", lambda rows, seed, repeats: ([], b"", 0))
    monkeypatch.setattr(bulk_disburse, "expected_total", lambda data: 0)
    _argv(monkeypatch, "--rows", "1000", "--backends", "sqlite")
    assert bulk_disburse.main() == code
    out = capsys.readouterr().out
    assert "MISS" in out and ("FAILED: the book checks of sqlite" in out) == (not book_ok)


def test_hot_accounts_with_errors_is_not_a_pass():
    assert service_runs.hot_verdict(1.2, 0, True) == "PASS"
    assert service_runs.hot_verdict(1.2, 3, True) == "MISS"
    assert service_runs.hot_verdict(1.2, 0, False) == "MISS"
    assert service_runs.hot_verdict(0.8, 0, True) == "MISS"


def test_writer_configs_name_the_workers_of_each_setting_given_or_not():
    configs = service_runs.writer_configs("1:2000,1:2000:1,2:0:3", workers=2)
    one_writer = {"EUM_BATCH_WRITERS": "1", "EUM_BATCH_LINGER_US": "2000"}
    assert configs == {"2 workers, 1 writer, linger 2 ms": (2, one_writer),
                       "1 worker, 1 writer, linger 2 ms": (1, one_writer),
                       "3 workers, 2 writers, linger 0 ms": (3, {"EUM_BATCH_WRITERS": "2", "EUM_BATCH_LINGER_US": "0"})}
    for bad in ("1", "1:2000:0", "9:0", "1:2000:1:1"):
        with pytest.raises(AssertionError):
            service_runs.writer_configs(bad)


def test_bulk_replay_seeds_sqlite_merchants_with_their_winwin_flag(tmp_path):
    """SQLite's merchants were seeded with no flags and their share kept, so a win-win
    merchant earned no win-win component on SQLite and did on PostgreSQL (migration
    0012's rule: a sharing merchant carries `winwin`): the backends did different work."""
    import datetime as dt

    from ledger import schema as s
    from ledger.book import Book
    from ledger.commands import TopUp, request_hash
    from ledger.db import make_engine, migrate
    from rules.loader import timeline_from_dir
    from rules.timeutil import to_us
    from settlement import datagen

    url = f"sqlite:///{tmp_path}/bulk.db"
    migrate(url)
    engine = make_engine(url)
    pop = h.population(21, 20, 200)
    try:
        bulk_replay.seed_sqlite_registry(engine, pop)
        with engine.connect() as conn:
            flags = dict(conn.execute(select(s.merchants.c.merchant_id, s.merchants.c.flags)).all())
        assert flags == {r["merchant_id"]: ",".join(r["flags"]) for r in pop.merchants}
        sharing = [r for r in pop.merchants if r["merchant_share_bp"] > 0 and r["category"] != "large_mart"
                   and r["annual_sales_won"] <= 3_000_000_000]
        assert sharing and all(flags[r["merchant_id"]] == "winwin" for r in sharing)
        book = Book(engine, timeline_from_dir(h.REPO_ROOT / "policies"))
        at = to_us(dt.datetime.combine(h.PEAK_DAY, dt.time(12, 0), h.SEOUL))
        member = pop.members[0]["member_id"]
        book.execute([TopUp("t1", member, 100_000, at - 1, request_hash("topup", {"t": 1}))])
        [outcome] = book.execute([datagen.pay("p1", member, sharing[0]["merchant_id"], 10_000, at)])
        rules = [c["rule"] for c in outcome.body["cashback"]["components"]]
        assert outcome.body["status"] == "approved" and any(r.startswith("winwin-merchant/") for r in rules), rules
    finally:
        engine.dispose()


def test_beside_reads_a_window_and_the_services_histogram_between_two_scrapes():
    """`service_runs.py beside`: a window's figures count only answered 2xx latencies
    (status 0, no answer, and non-2xx are errors), and the service's own quantile is the
    bucket bound under which that share of what was counted between the scrapes fell."""
    samples = [(0.0, 0.010, 201)] * 98 + [(0.0, 0.300, 201), (0.0, 5.0, 0), (0.0, 0.002, 503)]
    f = service_runs.window_figures(samples)
    assert (f["n"], f["errors"], f["p50"], f["max"]) == (101, 2, 10.0, 300.0)
    inf = float("inf")
    before = {0.01: 10.0, 0.025: 10.0, 0.5: 10.0, inf: 10.0}
    after = {0.01: 108.0, 0.025: 108.0, 0.5: 110.0, inf: 110.0}  # 98 under 10 ms, 2 under 500 ms
    assert service_runs.histogram_quantile_bound(before, after, 0.5) == "<= 10 ms"
    assert service_runs.histogram_quantile_bound(before, after, 0.99) == "<= 500 ms"
    assert service_runs.histogram_quantile_bound(after, after, 0.99) == "n/a"
