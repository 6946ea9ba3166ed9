"""`eum policy simulate FILE --from --to [--db] [--json]` over a small recorded book with
known figures: recorded under 10% on the first 30만, re-evaluated under a 12% draft."""

from __future__ import annotations

import datetime as dt
import uuid

import orjson
import pytest
import yaml
from typer.testing import CliRunner

from eum import settings as settings_module
from eum.cli import app
from ledger import registry
from ledger.book import Book
from ledger.db import make_engine
from rules.loader import timeline_from_dir
from rules.timeutil import local_midnight_us
from settlement import datagen

MAN = 10_000


def _policy(policy_id: str, rate_bp: int, effective_from: str | None) -> dict:
    doc = {"policy_id": policy_id, "name": policy_id,
           "topup": {"min_won": 10_000, "monthly_max_won": 2_000_000},
           "spend_order": ["charged", "points", "grants"],
           "components": [{"id": "city", "funding": {"national": 4_000, "city": 6_000}, "remainder_to": "city",
                           "variants": [{"id": "standard", "bands": [{"up_to_won": 30 * MAN, "rate_bp": rate_bp}]}]}]}
    if effective_from:
        doc["effective_from"] = effective_from
    return doc


@pytest.fixture
def book(db_url, tmp_path, monkeypatch):
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "ten.yaml").write_text(yaml.safe_dump(_policy("ten", 1_000, "2023-01-01T00:00:00+09:00")))
    draft = tmp_path / "draft-12.yaml"
    draft.write_text(yaml.safe_dump(_policy("draft-12", 1_200, None)))
    monkeypatch.setenv("EUM_POLICIES_DIR", str(policies))
    monkeypatch.setenv("EUM_DATABASE_URL", "sqlite:////nonexistent/not-this-one.db")  # --db must win
    settings_module.get_settings.cache_clear()

    engine = make_engine(db_url)
    with engine.begin() as conn:
        for member_id, district in (("m1", "seo"), ("m2", "jung"), ("m3", "seo")):
            registry.put_member(conn, member_id=member_id, district=district, status="active", actor="test")
        for merchant_id, district in (("s1", "seo"), ("s2", "jung")):
            registry.put_merchant(conn, merchant_id=merchant_id, name=merchant_id, district=district,
                                  category="restaurant", annual_sales_won=100_000_000,
                                  registered_from=dt.date(2019, 1, 1), flags=[], merchant_share_bp=0, actor="test")
    book = Book(engine, timeline_from_dir(policies))

    def at(day: int, second: int) -> int:
        return local_midnight_us(dt.date(2025, 9, day)) + second * 1_000_000

    commands = [datagen.topup(f"t-{m}", m, 1_000_000, at(1, 60)) for m in ("m1", "m2", "m3")]
    commands += [datagen.pay("p1", "m1", "s1", 20 * MAN, at(2, 100)),   # before --from: m1's month starts at 20만
                 datagen.pay("p2", "m1", "s1", 10 * MAN, at(3, 100)),
                 datagen.pay("p3", "m2", "s2", 3_333, at(3, 200)),
                 datagen.pay("p4", "m3", "s2", 5 * MAN, at(3, 300))]
    assert all(o.ok for o in book.execute(commands))
    engine.dispose()
    yield db_url, draft
    settings_module.get_settings.cache_clear()


def test_policy_simulate_json(book):
    url, draft = book
    result = CliRunner().invoke(app, ["policy", "simulate", str(draft), "--from", "2025-09-03", "--to", "2025-10-01",
                                      "--db", url, "--json"])
    assert result.exit_code == 0, result.output
    report = orjson.loads(result.stdout)
    assert report["range"] == {"from": "2025-09-03T00:00:00+09:00", "to": "2025-10-01T00:00:00+09:00"}
    assert report["payments"]["count"] == 3
    # actual: 10만 × 10% + 3,333 × 10% + 5만 × 10%; simulated at 12%
    assert report["totals"] == {"simulated_won": 12_000 + 399 + 6_000, "actual_won": 10_000 + 333 + 5_000,
                                "delta_won": 3_066}
    assert report["recorded"]["cashback_won"] == 15_333
    # national 40% floored, the remainder to the city
    assert report["by_funder"] == [
        {"source": "city", "simulated_won": 7_200 + 240 + 3_600, "actual_won": 6_000 + 200 + 3_000, "delta_won": 1_840},
        {"source": "national", "simulated_won": 4_800 + 159 + 2_400, "actual_won": 4_000 + 133 + 2_000,
         "delta_won": 1_226}]
    assert report["by_component"] == [{"component_id": "city", "simulated_won": 18_399, "actual_won": 15_333,
                                       "delta_won": 3_066}]
    assert report["by_merchant_district"] == [
        {"merchant_district": "jung", "simulated_won": 6_399, "actual_won": 5_333, "delta_won": 1_066},
        {"merchant_district": "seo", "simulated_won": 12_000, "actual_won": 10_000, "delta_won": 2_000}]
    assert report["by_merchant_tier"] == [{"tier": "le_3eok", "simulated_won": 18_399, "actual_won": 15_333,
                                           "delta_won": 3_066}]
    assert report["members"] == {"with_payments": 3, "affected": 3, "gaining": 3, "losing": 0,
                                 "gained_won": 3_066, "lost_won": 0}


def test_policy_simulate_text_and_bad_input(book):
    url, draft = book
    runner = CliRunner()
    result = runner.invoke(app, ["policy", "simulate", str(draft), "--from", "2025-09-03T00:00:00+09:00",
                                 "--to", "2025-10-01", "--db", url])
    assert result.exit_code == 0, result.output
    assert "cashback: simulated 18,399 won, actual 15,333 won, delta +3,066 won" in result.stdout
    assert "members: 3 with payments, 3 affected: 3 gain 3,066 won, 0 lose 0 won" in result.stdout
    assert "  national" in result.stdout and "+1,226" in result.stdout

    bad = draft.parent / "bad.yaml"
    bad.write_text("policy_id: x\ncomponents: 7\n")
    result = runner.invoke(app, ["policy", "simulate", str(bad), "--from", "2025-09-03", "--to", "2025-10-01",
                                 "--db", url])
    assert result.exit_code == 2 and "bad.yaml" in result.output
    binary = draft.parent / "bin.yaml"
    binary.write_bytes(b"\xff\xfe garbage")  # was a UnicodeDecodeError traceback
    result = runner.invoke(app, ["policy", "simulate", str(binary), "--from", "2025-09-03", "--to", "2025-10-01",
                                 "--db", url])
    assert result.exit_code == 2 and result.stderr == f"BAD  {binary}:1: (document): not UTF-8 text\n", result.output
    for garbage in ("garbage", "postgres://x@127.0.0.1/y"):  # was an ArgumentError traceback
        result = runner.invoke(app, ["policy", "simulate", str(draft), "--from", "2025-09-03", "--to", "2025-10-01",
                                     "--db", garbage])
        assert result.exit_code == 2 and "Invalid value for --db" in result.output, (garbage, result.output)
        assert result.exception is None or isinstance(result.exception, SystemExit), (garbage, result.exception)
    result = runner.invoke(app, ["policy", "simulate", str(draft), "--from", "2025-10-01", "--to", "2025-09-03",
                                 "--db", url])
    assert result.exit_code != 0 and "--to must be after --from" in result.output
    result = runner.invoke(app, ["policy", "simulate", str(draft), "--from", "2025-09-03T00:00:00",
                                 "--to", "2025-10-01", "--db", url])
    assert result.exit_code != 0 and "no UTC offset" in result.output
    # A range wholly in the future has no recorded payment: its zeros read as "costs nothing".
    result = runner.invoke(app, ["policy", "simulate", str(draft), "--from", "2099-01-01", "--to", "2099-02-01",
                                 "--db", url])
    said = " ".join(result.output.replace("│", " ").split())
    assert result.exit_code == 2 and "starts in the future" in said and "--from" in said, result.output


def test_policy_simulate_takes_the_apis_span_only(book):
    """`--from 0001-01-01T00:00:00+14:00` ended in an OverflowError traceback, and
    `--from 0001-01-01 --to 9999-12-31` was simulated where POST /v1/policies/{id}/simulate
    refuses a range outside 2000–2099 with 422. Now each is a usage error naming the
    option and the span, exit 2, as `--to` before `--from` is."""
    url, draft = book
    runner = CliRunner()
    for from_, to, option in (("0001-01-01T00:00:00+14:00", "2025-01-01", "--from"),
                              ("0001-01-01", "9999-12-31", "--from"),
                              ("2025-09-03", "9999-12-31", "--to"),
                              ("2025-09-03", "2100-01-01", "--to"),
                              ("1999-12-31T23:59:59+09:00", "2025-10-01", "--from")):
        result = runner.invoke(app, ["policy", "simulate", str(draft), "--from", from_, "--to", to, "--db", url])
        assert result.exit_code == 2, (from_, to, result.exit_code, result.output, result.exception)
        assert result.exception is None or isinstance(result.exception, SystemExit), (from_, to, result.exception)
        said = " ".join(result.output.replace("│", " ").split())
        assert option in said and "2000-01-01 and 2099-12-31" in said, (from_, to, said)
    edge = runner.invoke(app, ["policy", "simulate", str(draft), "--from", "2000-01-01", "--to",
                               "2099-12-31T23:59:59+09:00", "--db", url, "--json"])
    assert edge.exit_code == 0, edge.output
    assert orjson.loads(edge.stdout)["payments"]["count"] == 4


def test_policy_simulate_checks_its_db_as_the_setting_is_checked(book, tmp_path):
    """--db skipped what EUM_DATABASE_URL gets: a mysql:// URL and a database not migrated
    were tracebacks (exit 1) through --db, one line and exit 2 through the setting; and a
    SQLite path under missing folders made the folders and an empty database for this
    read-only command. Now: usage error for the URL, "not migrated ... eum db upgrade" for
    the database, one `error:` line for a SQLite file that is not there (nothing made)."""
    import sqlite3

    url, draft = book
    runner = CliRunner()
    span = ["--from", "2025-09-03", "--to", "2025-10-01"]

    def simulate(db: str):
        result = runner.invoke(app, ["policy", "simulate", str(draft), *span, "--db", db])
        assert result.exception is None or isinstance(result.exception, SystemExit), (db, result.exception)
        return result

    result = simulate("mysql://x@localhost/db")
    assert result.exit_code == 2 and "Invalid value for --db" in result.output, result.output
    path = tmp_path / "empty.db"  # a database nobody migrated
    sqlite3.connect(path).close()
    result = simulate(f"sqlite:///{path}")
    assert result.exit_code == 2, result.output
    assert "not migrated to this release (at none" in result.stderr and "eum db upgrade" in result.stderr, result.output
    missing = tmp_path / "typo" / "sub" / "eum.db"
    result = simulate(f"sqlite:///{missing}")
    assert result.exit_code == 2 and result.stderr.startswith("error: --db: ") and str(missing) in result.stderr, \
        result.output
    assert len(result.stderr.splitlines()) == 1 and not (tmp_path / "typo").exists()


@pytest.mark.postgres
def test_policy_simulate_with_a_db_that_cannot_be_reached_says_so(book, tmp_path, monkeypatch):
    """The review's case: --db naming a PostgreSQL database that does not exist was left to
    main(), which judged EUM_DATABASE_URL's database instead: "not migrated ... run eum db
    upgrade" (exit 2), and the default SQLite file made. Now one "cannot use the database"
    line about --db's, exit 3, as through EUM_DATABASE_URL, and nothing made."""
    from tests.conftest import PG_ADMIN_URL

    _, draft = book
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("EUM_DATABASE_URL", f"sqlite:///{tmp_path / 'var' / 'eum.db'}")
    missing = f"{PG_ADMIN_URL.rsplit('/', 1)[0]}/eum_no_such_{uuid.uuid4().hex[:12]}"
    result = CliRunner().invoke(app, ["policy", "simulate", str(draft), "--from", "2025-09-03", "--to", "2025-10-01",
                                      "--db", missing])
    assert result.exit_code == 3, (result.output, result.exception)
    assert result.stderr.startswith("error: cannot use the database (") and "does not exist" in result.stderr
    assert "eum db upgrade" not in result.stderr and not (tmp_path / "var").exists()


def test_a_draft_reusing_a_recorded_policy_id_is_refused(book, tmp_path):
    """A draft file whose policy_id the book records with another document could never be
    submitted, yet was previewed, its figures labelled with the recorded policy's id
    (preview audit). One line, exit 2; the recorded document itself previews as before."""
    from sqlalchemy import select, update

    from ledger import schema as s
    from ledger.policies import sync_file_policies
    from rules.compiled import compile_policy
    from rules.loader import load_policy_file

    url, _ = book
    shipped = tmp_path / "policies" / "ten.yaml"
    engine = make_engine(url)
    with engine.begin() as conn:
        sync_file_policies(conn, [compile_policy(load_policy_file(shipped))])
    engine.dispose()
    reuse = tmp_path / "ten-at-12.yaml"
    reuse.write_text(yaml.safe_dump(_policy("ten", 1_200, None)))
    span = ["--from", "2025-09-03", "--to", "2025-10-01", "--db", url]
    result = CliRunner().invoke(app, ["policy", "simulate", str(reuse), *span])
    assert result.exit_code == 2 and "policy_id 'ten' is recorded in the book with another document" in result.output, \
        result.output
    same = CliRunner().invoke(app, ["policy", "simulate", str(shipped), *span, "--json"])
    assert same.exit_code == 0, same.output
    # A book an earlier release recorded stores the document without fields added since
    # (their defaults): the same document, as the service's start compares it (review).
    engine = make_engine(url)
    with engine.begin() as conn:
        stored = orjson.loads(conn.execute(select(s.policies.c.document)
                                           .where(s.policies.c.policy_id == "ten")).scalar_one())
        stored.pop("withdrawal")
        conn.execute(update(s.policies).where(s.policies.c.policy_id == "ten")
                     .values(document=orjson.dumps(stored, option=orjson.OPT_SORT_KEYS).decode()))
    engine.dispose()
    older = CliRunner().invoke(app, ["policy", "simulate", str(shipped), *span, "--json"])
    assert older.exit_code == 0, older.output


def test_policy_simulate_is_not_bound_by_the_workers_range_but_by_the_simulators(book, monkeypatch):
    """Staff run a big simulation on purpose from the CLI, in a process of its own:
    EUM_SIMULATION_PAYMENTS_MAX (the API workers' bound) does not refuse it; the
    simulator's own ceiling does, as an `error:` line, not a traceback."""
    from settlement import simulate as sim

    url, draft = book
    monkeypatch.setenv("EUM_SIMULATION_PAYMENTS_MAX", "1")
    settings_module.get_settings.cache_clear()
    args = ["policy", "simulate", str(draft), "--from", "2025-09-03", "--to", "2025-10-01", "--db", url, "--json"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert orjson.loads(result.stdout)["payments"]["count"] == 3
    real = sim.simulate
    monkeypatch.setattr(sim, "simulate", lambda *a, **k: real(*a, **k, payments_max=2))  # as if PAYMENTS_MAX were 2
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    assert "error: more than 2 payments in the range" in result.stderr and not result.stdout
