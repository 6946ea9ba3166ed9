"""The book checks a load run ends with (loadtests/checks.py) can fail: a member-month
over its monthly cashback cap, in all or in one component, is found in every month of
the policy history, the win-win layer's months included."""

from __future__ import annotations

import json

import psycopg
import pytest

from loadtests.checks import check_book_after_run, month_caps, over_caps
from rules.loader import timeline_from_dir
from settlement.testing import postgres_available, temp_database
from tests.conftest import POLICIES


def test_every_month_of_the_history_has_a_cap_to_check():
    """From 2023 the win-win layer (rates from the merchant's share) is in every stack;
    the check gave up on the whole month for it, so the cap check of 2023-2025's months
    could not fail. Each month now has its components' caps."""
    timeline = timeline_from_dir(POLICIES)
    by_component, _, topup_cap = month_caps(timeline, "2025-10")
    assert by_component["city"] == 75_000  # 10% (15% in Ganghwa/Ongjin) of the first 50만
    assert topup_cap == 1_500_000
    for month in ("2019-09", "2020-06", "2022-01", "2023-03", "2024-07", "2025-09", "2025-12"):
        assert month_caps(timeline, month)[0].get("city"), month


def test_a_member_month_over_a_components_cap_is_found():
    caps = ({"city": 75_000, "winwin-district": 6_000}, None, 1_500_000)
    rows = [("ok", "2025-10", 81_000, json.dumps({"city": 75_000, "winwin-district": 6_000}), 1_500_000),
            ("city", "2025-10", 80_000, json.dumps({"city": 80_000}), 0),
            ("winwin", "2025-10", 7_000, json.dumps({"winwin-district": 7_000}), 0),
            ("topup", "2025-10", 0, "{}", 1_500_001)]
    cashback, topups = over_caps(rows, caps)
    assert [row[0] for row in cashback] == ["city", "winwin"] and [row[0] for row in topups] == ["topup"]
    assert over_caps(rows[:1], (caps[0], 80_000, None)) == ([rows[0][:3] + ({},)], [])  # the month's own cap


@pytest.mark.postgres
@pytest.mark.skipif(not postgres_available(), reason="PostgreSQL is not reachable")
def test_the_load_runs_book_check_fails_on_a_month_over_its_cap(capsys):
    with temp_database("postgresql") as url:
        with psycopg.connect(url) as conn:
            conn.execute("INSERT INTO member_months (member_id, month, cashback_won, component_cashback) "
                         "VALUES ('m1', '2025-10', 50000, %s)", (json.dumps({"city": 50_000}),))
        check_book_after_run(url)  # a month at the cap (made up: no ledger pays it, which check_book says)
        first = capsys.readouterr().out
        assert "ok  no member month over the monthly cashback cap" in first
        assert "BAD month cashback counters equal their funder legs" in first
        with psycopg.connect(url) as conn:
            conn.execute("UPDATE member_months SET cashback_won = 5000000, component_cashback = %s",
                         (json.dumps({"city": 5_000_000}),))
        assert not check_book_after_run(url)
    out = capsys.readouterr().out
    assert "BAD no member month over the monthly cashback cap" in out and "book checks: FAILED" in out


@pytest.mark.skipif(not postgres_available(), reason="needs PostgreSQL")
def test_the_load_runs_registry_passes_the_book_check(capsys):
    """The load runs and benchmarks seed the registry by COPY (loadtests.harness); the
    dated registry's check ("registry rows equal their latest fact versions") reported
    every row of such a book until the seeder wrote the fact versions too."""
    from loadtests.harness import population, seed_registry

    with temp_database("postgresql") as url:
        seed_registry(url, population(3, 40, 12))
        assert check_book_after_run(url)
    out = capsys.readouterr().out
    assert "ok  registry rows equal their latest fact versions" in out and "book checks: all ok" in out, out
