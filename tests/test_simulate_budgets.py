"""The policy preview's budget outlook (`settlement.simulate.budget_outlook`, the
report's `budget_outlook`): per funder budget (month and year) the range touches, the
limit, what the book has committed, what it would be with the range's cashback
replaced by the draft's, by how much the draft would pass the limit and the day it
would run out. Checked against the same traffic run through the book under the draft.

The preview audit's case: a district's 2% layer under a small October budget was
previewed at 28,803 where the book paid 19,878, and nothing in the report said the
district's budget would run out. Here: the district (Seo-gu) pays 1% on the first 30만
of each member's month at Seo-gu merchants, under a 20,000 won October budget (and a
year budget); a draft raises it to 2%. Charged money is spent first, so the points the
cashback brings do not re-split later payments (the preview is exact without budgets)."""

from __future__ import annotations

import datetime as dt

import orjson
import pytest
import yaml
from sqlalchemy import select
from typer.testing import CliRunner

from eum import settings as settings_module
from eum.cli import app
from ledger import registry
from ledger import schema as s
from ledger.book import Book
from ledger.db import make_engine
from rules.compiled import PolicyTimeline, compile_policy
from rules.document import PolicyDocument
from rules.timeutil import local_midnight_us
from settlement import datagen
from settlement.simulate import simulate, with_draft

MAN = 10_000
MEMBERS = [f"m{i}" for i in range(1, 7)]
# (member index, day of October, amount): 6 members, 4 payments each over the month
PAYMENTS = [(i, day, amount) for i in range(6)
            for day, amount in ((2 + i, 73_000 + 1_111 * i), (9 + i, 58_500), (15 + i, 91_230 - 777 * i),
                                (23 + i // 2, 64_900))]


def city() -> dict:
    return {"policy_id": "city-10", "name": "city 10%", "effective_from": "2023-01-01T00:00:00+09:00",
            "topup": {"min_won": 10_000, "monthly_max_won": 2_000_000},
            "spend_order": ["charged", "points", "grants"],
            "components": [{"id": "city", "funding": {"national": 4_000, "city": 6_000}, "remainder_to": "city",
                            "variants": [{"id": "standard", "bands": [{"up_to_won": 50 * MAN, "rate_bp": 1_000}]}]}]}


def district(rate_bp: int, policy_id: str, effective_from: str | None = "2023-01-01T00:00:00+09:00") -> dict:
    doc = {"policy_id": policy_id, "name": f"district {rate_bp} bp", "layer": "district",
           "components": [{"id": "district", "funding": {"$merchant_district": 10_000}, "on_budget_short": "skip",
                           "variants": [{"id": "seo-topup", "when": {"merchant_districts": ["seo"]},
                                         "bands": [{"up_to_won": 30 * MAN, "rate_bp": rate_bp}]}]}]}
    if effective_from:
        doc["effective_from"] = effective_from
    return doc


def compiled(doc: dict):
    return compile_policy(PolicyDocument.model_validate(doc))


def at(day: dt.date, seconds: int) -> int:
    return local_midnight_us(day) + seconds * 1_000_000


def run_book(url: str, district_doc: dict, budgets: dict[tuple[str, str], int]):
    """The traffic (a September payment each, then October's) through a book with the
    city policy and `district_doc` in force and `budgets` set; the engine."""
    engine = make_engine(url)
    with engine.begin() as conn:
        for member_id in MEMBERS:
            registry.put_member(conn, member_id=member_id, district="seo", status="active", actor="test")
        for merchant_id, where in (("s-seo", "seo"), ("s-jung", "jung")):
            registry.put_merchant(conn, merchant_id=merchant_id, name=merchant_id, district=where,
                                  category="restaurant", annual_sales_won=100_000_000,
                                  registered_from=dt.date(2019, 1, 1), flags=[], merchant_share_bp=0, actor="test")
        for (source, period), limit in budgets.items():
            registry.put_budget(conn, source=source, period=period, limit_won=limit, actor="test")
    book = Book(engine, PolicyTimeline([compiled(city()), compiled(district_doc)]))
    cmds = [datagen.topup(f"t-{m}", m, 1_000_000, at(dt.date(2025, 9, 1), 60)) for m in MEMBERS]
    cmds += [datagen.pay(f"sep-{m}", m, "s-seo", 45_000, at(dt.date(2025, 9, 20), 100 + i))
             for i, m in enumerate(MEMBERS)]
    cmds += [datagen.topup(f"t2-{m}", m, 1_000_000, at(dt.date(2025, 10, 1), 60)) for m in MEMBERS]
    cmds += [datagen.pay(f"oct-{i}-{day}", MEMBERS[i], "s-jung" if day % 7 == 0 else "s-seo", amount,
                         at(dt.date(2025, 10, day), 3_600 + 60 * i)) for i, day, amount in PAYMENTS]
    cmds.sort(key=lambda c: c.occurred_at_us)
    outcomes = [book.execute([c])[0] for c in cmds]
    assert all(o.ok and o.body.get("status") in (None, "approved") for o in outcomes), outcomes
    return engine


def committed(engine) -> dict[tuple[str, str], int]:
    with engine.connect() as conn:
        return {(r.source, r.period): r.committed_won for r in conn.execute(select(s.budgets))}


def district_paid(engine) -> list[tuple[int, str, int]]:
    """(occurred_at_us, payment_id, the district's share) of each payment, in time order."""
    import orjson

    with engine.connect() as conn:
        rows = conn.execute(select(s.payments.c.occurred_at_us, s.payments.c.payment_id, s.payments.c.detail)
                            .order_by(s.payments.c.occurred_at_us, s.payments.c.payment_id)).all()
    return [(occurred, pid, sum(amount for line in orjson.loads(detail)["lines"]
                                for source, amount in line["funded_by"] if source == "seo"))
            for occurred, pid, detail in rows]


def first_cut_day(limited, unlimited) -> str | None:
    """The Seoul day of the first payment the budget cut: the first whose district share
    the book with the budget paid short of the book without (a skipped line is not
    recorded at all)."""
    from rules.timeutil import local_date

    for (occurred, pid, paid), (_, same_pid, full) in zip(district_paid(limited), district_paid(unlimited)):
        assert pid == same_pid
        if paid != full:
            return local_date(occurred).isoformat()
    return None


OCT, NOV = at(dt.date(2025, 10, 1), 0), at(dt.date(2025, 11, 1), 0)
BUDGETS = {("seo", "2025-10"): 20_000, ("seo", "2025"): 60_000}


@pytest.fixture
def fresh_url(db_url, request, tmp_path):
    """Another empty book on `db_url`'s backend, each call a new one."""
    made = []

    def make() -> str:
        made.append(None)
        if db_url.startswith("sqlite"):
            import shutil

            path = tmp_path / f"book-{len(made)}.db"
            shutil.copyfile(request.getfixturevalue("_migrated_sqlite_file"), path)
            return f"sqlite:///{path}"
        from tests.conftest import create_pg_database, drop_pg_database

        name, url = create_pg_database(template=request.getfixturevalue("_migrated_pg_template"))
        request.addfinalizer(lambda: drop_pg_database(name))
        return url

    return make


def test_a_district_raise_over_a_small_october_budget(db_url, fresh_url):
    """Recorded at 1% (within the budget); the 2% draft previewed: the October budget's
    overrun is committed − held + simulated − limit, the simulated district cashback is
    what the book under the draft commits with no budget, and the book under the draft
    with the budget first cuts a payment on the day the outlook says it runs out."""
    engine = run_book(db_url, district(100, "district-1"), BUDGETS)
    book_now = committed(engine)
    timeline = PolicyTimeline([compiled(city()), compiled(district(100, "district-1"))])
    draft = with_draft(timeline, compiled(district(200, "district-2")), OCT, NOV)
    report = simulate(engine, draft, OCT, NOV, actual_timeline=timeline)
    rows = {(r["source"], r["period"]): r for r in report["budget_outlook"]}

    # What the district pays, recorded (1%) and simulated (2%), from by_funder.
    seo = next(r for r in report["by_funder"] if r["source"] == "seo")
    october = rows[("seo", "2025-10")]
    assert october["limit"] == 20_000 and october["committed"] == book_now[("seo", "2025-10")]
    assert october["range_held_won"] == book_now[("seo", "2025-10")] == seo["actual_won"]  # the whole month
    assert october["range_simulated_won"] == seo["simulated_won"]
    assert october["simulated_committed"] == october["committed"] - october["range_held_won"] + seo["simulated_won"]
    assert october["over_limit_won"] == october["simulated_committed"] - 20_000 > 0
    year = rows[("seo", "2025")]
    sept = book_now[("seo", "2025-09")]
    assert sept > 0 and year["committed"] == sept + october["committed"] and year["limit"] == 60_000
    assert year["simulated_committed"] == sept + seo["simulated_won"]
    assert year["over_limit_won"] == max(0, year["simulated_committed"] - 60_000)
    # Sources with no budget set are listed unlimited.
    assert rows[("city", "2025-10")]["limit"] is None and rows[("city", "2025-10")]["over_limit_won"] == 0
    assert rows[("city", "2025-10")]["range_simulated_won"] == rows[("city", "2025-10")]["range_held_won"]
    [note] = [n for n in report["notes"] if n.startswith("budget outlook")]
    assert f"seo 2025-10 by {october['over_limit_won']:,} won" in note, note
    assert report["notes"].index(note) == report["notes"].index(report["budgets"]) + 1

    # The book under the draft, no budget: it commits exactly what the preview says.
    unlimited_engine = run_book(fresh_url(), district(200, "district-2"), {})
    unlimited = committed(unlimited_engine)
    assert unlimited[("seo", "2025-10")] == seo["simulated_won"] == october["range_simulated_won"]
    # With the budgets: the book stays within them, and cuts first on the day the outlook gives.
    limited_engine = run_book(fresh_url(), district(200, "district-2"), BUDGETS)
    limited = committed(limited_engine)
    assert limited[("seo", "2025-10")] <= 20_000 < unlimited[("seo", "2025-10")]
    assert october["runs_out_on"] is not None
    assert first_cut_day(limited_engine, unlimited_engine) == october["runs_out_on"]


def test_nothing_over_no_note_and_a_partial_range(db_url):
    """The policy in force previewed: every budget as committed, nothing over, no note.
    A range inside the month replaces only the range's part of the month."""
    engine = run_book(db_url, district(100, "district-1"), BUDGETS)
    book_now = committed(engine)
    timeline = PolicyTimeline([compiled(city()), compiled(district(100, "district-1"))])
    same = simulate(engine, timeline, OCT, NOV, actual_timeline=timeline)
    assert not [n for n in same["notes"] if n.startswith("budget outlook")]
    for row in same["budget_outlook"]:
        assert row["simulated_committed"] == row["committed"] == book_now[(row["source"], row["period"])], row
        assert row["over_limit_won"] == 0 and row["runs_out_on"] is None
    # Every row GET /v1/budgets has for October and 2025 (the book makes a row, with no
    # limit, for each source a payment could charge: jung's district share here, at 0).
    assert {(r["source"], r["period"]) for r in same["budget_outlook"]} == {
        (src, per) for src in ("city", "jung", "national", "seo") for per in ("2025", "2025-10")} == {
        key for key in book_now if key[1] in ("2025", "2025-10")}

    mid = at(dt.date(2025, 10, 12), 0)
    draft = with_draft(timeline, compiled(district(200, "district-2")), mid, NOV)
    part = simulate(engine, draft, mid, NOV, actual_timeline=timeline)
    october = next(r for r in part["budget_outlook"] if (r["source"], r["period"]) == ("seo", "2025-10"))
    assert 0 < october["range_held_won"] < book_now[("seo", "2025-10")]
    seo = next(r for r in part["by_funder"] if r["source"] == "seo")
    assert october["range_simulated_won"] == seo["simulated_won"]
    assert october["simulated_committed"] == book_now[("seo", "2025-10")] - october["range_held_won"] \
        + seo["simulated_won"]


def test_a_year_budget_over_by_its_later_months(db_url):
    """September previewed at 2% under a small 2025 budget: October's commitments push
    the year past its limit, but they come after the range (a year's later months are
    counted after it), so the year is over without running out within September."""
    engine = run_book(db_url, district(100, "district-1"), BUDGETS)
    book_now = committed(engine)
    sep, oct_ = book_now[("seo", "2025-09")], book_now[("seo", "2025-10")]
    timeline = PolicyTimeline([compiled(city()), compiled(district(100, "district-1"))])
    first, end = at(dt.date(2025, 9, 1), 0), OCT
    draft = with_draft(timeline, compiled(district(200, "district-2")), first, end)
    for limit in (20_000, sep + oct_ + 1_000):
        with engine.begin() as conn:
            registry.put_budget(conn, source="seo", period="2025", limit_won=limit, actor="test")
        report = simulate(engine, draft, first, end, actual_timeline=timeline)
        year = next(r for r in report["budget_outlook"] if (r["source"], r["period"]) == ("seo", "2025"))
        simulated = next(r for r in report["by_funder"] if r["source"] == "seo")["simulated_won"]
        assert simulated == 2 * sep  # 4만5천 × 2% each, whole amounts
        assert (year["committed"], year["range_held_won"], year["range_simulated_won"]) == (sep + oct_, sep, simulated)
        assert year["over_limit_won"] == max(0, oct_ + simulated - limit)
        assert year["runs_out_on"] is None
        assert not any(r["over_limit_won"] for r in report["budget_outlook"] if r["period"] != "2025")
    assert [n for n in report["notes"] if n.startswith("budget outlook")]


def test_refunds_and_the_held_figures(db_url):
    """A partly refunded payment and a whole refund: `committed` counts what the
    payments hold after the clawbacks, and so does the range's held figure."""
    engine = run_book(db_url, district(100, "district-1"), BUDGETS)
    book = Book(engine, PolicyTimeline([compiled(city()), compiled(district(100, "district-1"))]))
    first = PAYMENTS[0]
    whole = PAYMENTS[1]
    for command in (datagen.refund("r1", f"oct-{first[0]}-{first[1]}", 12_345, at(dt.date(2025, 10, 28), 0)),
                    datagen.refund("r2", f"oct-{whole[0]}-{whole[1]}", whole[2], at(dt.date(2025, 10, 28), 10))):
        assert book.execute([command])[0].ok
    timeline = PolicyTimeline([compiled(city()), compiled(district(100, "district-1"))])
    report = simulate(engine, timeline, OCT, NOV)
    book_now = committed(engine)
    for row in report["budget_outlook"]:
        if len(row["period"]) == 7:
            assert row["range_held_won"] == row["committed"] == book_now[(row["source"], row["period"])], row


def test_a_refund_inside_the_month_puts_no_budget_over_for_a_draft_that_changes_nothing(db_url):
    """Beside the policies in force re-evaluated (as the API and the CLI preview), the
    draft's change is measured against them, not against what the payments hold: the
    net payment model re-evaluates a month with a whole refund inside it as if the
    refunded payment never was, which the book, judging the payments after it when it
    was there, did not. 10% on the first 10만: p1 80,000 (8,000), p2 50,000 (2,000 on
    the 20,000 left), p1 refunded whole, p3 30,000 (3,000): the book holds 5,000, the
    model 8,000. The policy in force previewed against itself showed the city's budget,
    set at what it had committed, over by 1,800 (the preview fuzz)."""
    doc = city()
    doc["components"][0]["variants"][0]["bands"] = [{"up_to_won": 10 * MAN, "rate_bp": 1_000}]
    timeline = PolicyTimeline([compiled(doc)])
    engine = make_engine(db_url)
    with engine.begin() as conn:
        registry.put_member(conn, member_id="m1", district="seo", status="active", actor="test")
        registry.put_merchant(conn, merchant_id="s1", name="s1", district="seo", category="restaurant",
                              annual_sales_won=100_000_000, registered_from=dt.date(2019, 1, 1), flags=[],
                              merchant_share_bp=0, actor="test")
    book = Book(engine, timeline)
    for command in (datagen.topup("t1", "m1", 1_000_000, at(dt.date(2025, 10, 1), 60)),
                    datagen.pay("p1", "m1", "s1", 80_000, at(dt.date(2025, 10, 2), 0)),
                    datagen.pay("p2", "m1", "s1", 50_000, at(dt.date(2025, 10, 3), 0)),
                    datagen.refund("r1", "p1", 80_000, at(dt.date(2025, 10, 10), 0)),
                    datagen.pay("p3", "m1", "s1", 30_000, at(dt.date(2025, 10, 15), 0))):
        assert book.execute([command])[0].ok
    book_now = committed(engine)
    assert book_now[("city", "2025-10")] == 3_000  # 60% of the 5,000 the payments hold
    with engine.begin() as conn:
        registry.put_budget(conn, source="city", period="2025-10", limit_won=3_000, actor="test")
    same = doc | {"policy_id": "same"}
    report = simulate(engine, with_draft(timeline, compiled(same), OCT, NOV), OCT, NOV, actual_timeline=timeline)
    assert report["totals"]["delta_won"] == 0
    for row in report["budget_outlook"]:
        assert row["over_limit_won"] == 0 and row["runs_out_on"] is None, row
        assert row["simulated_committed"] == row["committed"] == book_now.get((row["source"], row["period"]), 0), row
    assert not [note for note in report["notes"] if note.startswith("budget outlook")]
    engine.dispose()


def test_the_cli_prints_the_outlook(db_url, tmp_path, monkeypatch):
    engine = run_book(db_url, district(100, "district-1"), BUDGETS)
    engine.dispose()
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "city.yaml").write_text(yaml.safe_dump(city()))
    (policies / "district.yaml").write_text(yaml.safe_dump(district(100, "district-1")))
    draft = tmp_path / "draft.yaml"
    draft.write_text(yaml.safe_dump(district(200, "district-2", None)))
    monkeypatch.setenv("EUM_POLICIES_DIR", str(policies))
    settings_module.get_settings.cache_clear()
    args = ["policy", "simulate", str(draft), "--from", "2025-10-01", "--to", "2025-11-01", "--db", db_url]
    try:
        result = CliRunner().invoke(app, args)
        as_json = CliRunner().invoke(app, [*args, "--json"])
    finally:
        settings_module.get_settings.cache_clear()
    assert result.exit_code == 0 and as_json.exit_code == 0, result.output + as_json.output
    october = next(r for r in orjson.loads(as_json.stdout)["budget_outlook"]
                   if (r["source"], r["period"]) == ("seo", "2025-10"))
    assert october["over_limit_won"] > 0 and october["runs_out_on"]
    assert "budget outlook" in result.stdout
    line = next(x for x in result.stdout.splitlines() if x.split()[:2] == ["seo", "2025-10"])
    assert line.split()[2:] == [f"{october['limit']:,}", f"{october['committed']:,}",
                                f"{october['simulated_committed']:,}", f"{october['over_limit_won']:,}",
                                october["runs_out_on"]], line
    unlimited = next(x for x in result.stdout.splitlines() if x.split()[:2] == ["city", "2025-10"])
    assert "no limit" in unlimited
    assert "note: budget outlook: " in result.stdout


def test_the_api_answers_the_outlook(api):
    """POST /v1/policies/{id}/simulate: the shipped win-win layer (2% at Seo-gu's 상생
    merchants) under a 3,000 won October budget, a draft at 4%: the outlook's row is in
    the answer (checked against the documented model, `tests.conftest.check_answer`)."""
    from pathlib import Path

    api.put("/v1/members/m1", {"district": "seo"})
    api.put("/v1/merchants/shop", {"name": "S", "district": "seo", "category": "grocery",
                                   "annual_sales": 100_000_000, "registered_from": "2019-01-01",
                                   "merchant_share_bp": 100})
    assert api.put("/v1/budgets/seo/2025-10", {"amount": 3_000}, role="finance").status_code == 200
    api.post("/v1/topups", {"topup_id": "t", "member_id": "m1", "amount": 500_000,
                            "occurred_at": "2025-10-01T09:00:00+09:00"})
    for day, amount in ((2, 40_000), (5, 35_000), (9, 50_000)):
        r = api.post("/v1/payments", {"payment_id": f"p{day}", "member_id": "m1", "merchant_id": "shop",
                                      "amount": amount, "occurred_at": f"2025-10-0{day}T12:00:00+09:00"})
        assert r.json()["status"] == "approved", r.text
    held = api.get("/v1/budgets", role="finance").json()["budgets"]
    october = next(b for b in held if (b["source"], b["period"]) == ("seo", "2025-10"))
    assert 0 < october["committed"] < 3_000
    winwin = yaml.safe_load((Path(__file__).parent.parent / "policies" / "2023-01-winwin.yaml").read_text())
    winwin = {**winwin, "policy_id": "winwin-4"}
    winwin.pop("effective_from")
    winwin["components"][1]["variants"][0]["bands"][0]["rate_bp"] = 400
    assert api.post("/v1/policies", winwin, role="policy-editor").status_code == 201
    r = api.post("/v1/policies/winwin-4/simulate", {"from": "2025-10-01T00:00:00+09:00",
                                                     "to": "2025-11-01T00:00:00+09:00"}, role="policy-editor")
    assert r.status_code == 200, r.text
    report = r.json()
    row = next(b for b in report["budget_outlook"] if (b["source"], b["period"]) == ("seo", "2025-10"))
    seo = next(f for f in report["by_funder"] if f["source"] == "seo")
    # Re-split by the points the draft pays (spent first, settlement.points_model): the
    # 2nd earns 6,000 points where the book paid 5,200, so the 5th spends 800 more
    # (base 29,000: 4,350 points where the book paid 3,874) and the 9th 476 more (base
    # 45,650): 1,600 + 1,160 + 1,826 at 4% (the recorded split said 1,600 + 1,192 + 1,845).
    assert seo["simulated_won"] == 1_600 + 1_160 + 1_826
    assert row == {"source": "seo", "period": "2025-10", "limit": 3_000, "committed": october["committed"],
                   "range_held_won": october["committed"], "range_actual_won": october["committed"],
                   "range_simulated_won": seo["simulated_won"],
                   "simulated_committed": seo["simulated_won"], "over_limit_won": seo["simulated_won"] - 3_000,
                   "runs_out_on": "2025-10-09"}
    assert any(n.startswith("budget outlook: ") and f"seo 2025-10 by {seo['simulated_won'] - 3_000:,} won" in n
               for n in report["notes"])
    schema = api.client.get("/openapi.json").json()["components"]["schemas"]
    assert "budget_outlook" in schema["SimulationOut"]["properties"] and "BudgetOutlookRow" in schema


def test_a_draft_over_payments_a_budget_already_cut_is_measured_against_what_they_hold_too(db_url, fresh_url):
    """Budget audit: recorded at 2% under the October budget, which the book cut; the 3%
    draft previewed beside the policies in force re-evaluated. The re-evaluation applies
    no budget, so it prices the cut cashback as if committed and `simulated_committed`
    (committed − range_actual_won + range_simulated_won) understates the draft. A note
    gives the draft against what the payments hold: with no refund in the range, exactly
    what the book under the draft would commit without the budget."""
    engine = run_book(db_url, district(200, "district-2"), BUDGETS)
    book_now = committed(engine)
    assert book_now[("seo", "2025-10")] <= 20_000  # the budget skipped the district's share of some payments
    timeline = PolicyTimeline([compiled(city()), compiled(district(200, "district-2"))])
    report = simulate(engine, with_draft(timeline, compiled(district(300, "district-3")), OCT, NOV), OCT, NOV,
                      actual_timeline=timeline)
    october = next(r for r in report["budget_outlook"] if (r["source"], r["period"]) == ("seo", "2025-10"))
    held = book_now[("seo", "2025-10")]
    assert october["range_held_won"] == held < october["range_actual_won"]
    unlimited = committed(run_book(fresh_url(), district(300, "district-3"), {}))[("seo", "2025-10")]
    assert october["range_simulated_won"] == unlimited
    # The re-evaluated basis: short of the draft's cost by what the budget cut.
    assert october["simulated_committed"] == held - october["range_actual_won"] + unlimited < unlimited
    [note] = [n for n in report["notes"] if n.startswith("budget outlook: budgets cut")]
    assert "cashback of 9 payments in the range" in note, note  # those whose share the budget skipped
    assert "seo 2025:" not in note, note  # the year's limit not passed either way: not named
    assert (f"seo 2025-10: {unlimited:,} won committed with the draft, over its limit by {unlimited - 20_000:,} "
            f"(against {october['simulated_committed']:,})") in note, note
    # Against what the payments hold only (no re-evaluation): no such note, the outlook is on that basis.
    held_only = simulate(engine, with_draft(timeline, compiled(district(300, "district-3")), OCT, NOV), OCT, NOV)
    assert not [n for n in held_only["notes"] if n.startswith("budget outlook: budgets cut")]
    held_row = next(r for r in held_only["budget_outlook"] if (r["source"], r["period"]) == ("seo", "2025-10"))
    assert held_row["simulated_committed"] == unlimited
    engine.dispose()
