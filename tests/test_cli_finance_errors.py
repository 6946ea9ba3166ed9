"""`eum settle` and `eum reconcile` refuse bad input before they touch anything: one line
on stderr (`error: ...`), exit 2, no settlement and no audit entry recorded; never a
traceback. On a SQLite database of its own per test."""

from __future__ import annotations

import datetime as dt
import time
from pathlib import Path

import pytest
from sqlalchemy import func, select
from typer.testing import CliRunner

from eum import settings as settings_module
from eum.cli import app
from ledger import schema as s
from ledger.db import make_engine
from rules.timeutil import local_date
from settlement import schema as ss

runner = CliRunner()
HEADER = "approval_id,merchant_id,amount_won,transacted_at\n"


def _today() -> dt.date:
    return local_date(time.time_ns() // 1000)


PAST = (_today() - dt.timedelta(days=10)).isoformat()  # over in Asia/Seoul: settles (empty)


@pytest.fixture
def book(sqlite_url, monkeypatch):
    """An empty migrated SQLite book; the CLI's settings point at it."""
    monkeypatch.setenv("EUM_DATABASE_URL", sqlite_url)
    settings_module.get_settings.cache_clear()
    engine = make_engine(sqlite_url)
    yield engine
    engine.dispose()
    settings_module.get_settings.cache_clear()


def _recorded(engine) -> tuple[int, int]:
    """(settlements, audit entries)."""
    with engine.connect() as conn:
        return (conn.execute(select(func.count()).select_from(ss.settlements)).scalar_one(),
                conn.execute(select(func.count()).select_from(s.audit_log)).scalar_one())


def _refused(result, *words: str) -> None:
    """Exit 2, one `error:` line on stderr naming `words`, no traceback."""
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit), result.exception
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    for word in words:
        assert word in lines[0], (word, lines[0])


# ---------------------------------------------------------------- eum settle


@pytest.mark.parametrize("name", ["out.txt", "out", "out.CSV.bak"])
def test_a_payouts_file_of_an_unknown_format_is_refused_before_settling(book, tmp_path, name):
    out = runner.invoke(app, ["settle", "--date", PAST, "--payouts", str(tmp_path / name)])
    _refused(out, "--payouts", "unknown format", ".csv", "nothing settled")
    assert _recorded(book) == (0, 0)
    assert not (tmp_path / name).exists()


def test_a_payouts_file_that_cannot_be_written_is_refused_before_settling(book, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    out = runner.invoke(app, ["settle", "--date", PAST, "--payouts", str(blocker / "payouts.csv")])
    _refused(out, "--payouts", "not a folder")
    out = runner.invoke(app, ["settle", "--date", PAST, "--payouts", str(tmp_path)])  # a folder, not a file
    _refused(out, "--payouts")
    assert _recorded(book) == (0, 0)


def test_a_range_writes_its_payouts_a_file_a_day_named_by_the_date(book, tmp_path):
    """What README and docs/settlement.md say `--payouts F` does with `--to`: F itself is
    not written, F-DATE.EXT is, one a day, each path said on stdout."""
    first = _today() - dt.timedelta(days=5)
    days = [first, first + dt.timedelta(days=1)]
    folder = tmp_path / "payouts"
    folder.mkdir()
    out = runner.invoke(app, ["settle", "--date", days[0].isoformat(), "--to", days[1].isoformat(),
                              "--payouts", str(folder / "payouts.csv")])
    assert out.exit_code == 0, (out.output, out.exception)
    written = [folder / f"payouts-{day}.csv" for day in days]
    assert sorted(folder.iterdir()) == written
    assert [line.split()[-1] for line in out.stdout.splitlines() if "payouts written to" in line] == \
        [str(path) for path in written]


def test_a_reversed_range_is_refused(book):
    first = _today() - dt.timedelta(days=3)
    last = first - dt.timedelta(days=2)
    out = runner.invoke(app, ["settle", "--date", first.isoformat(), "--to", last.isoformat()])
    _refused(out, "--to", "before --date", last.isoformat())
    assert _recorded(book) == (0, 0)


@pytest.mark.parametrize("option", ["--date", "--to"])
@pytest.mark.parametrize("text", ["2026-12-32", "2026-02-30", "20261203", "yesterday", "1999-12-31", "2100-01-01"])
def test_a_date_that_is_not_a_business_date_is_refused(book, option, text):
    args = ["settle", "--date", text] if option == "--date" else ["settle", "--date", PAST, "--to", text]
    _refused(runner.invoke(app, args), option, text[:4])
    assert _recorded(book) == (0, 0)


@pytest.mark.parametrize("days_ahead", [0, 1])
def test_a_date_still_open_is_refused_as_the_api_refuses_it(book, days_ahead):
    day = _today() + dt.timedelta(days=days_ahead)
    out = runner.invoke(app, ["settle", "--date", day.isoformat()])
    _refused(out, "business_date_open", day.isoformat(), "not over")
    assert _recorded(book) == (0, 0)


def test_a_range_reaching_an_open_date_settles_no_day_of_it(book):
    today = _today()
    first = today - dt.timedelta(days=2)
    out = runner.invoke(app, ["settle", "--date", first.isoformat(), "--to", (today + dt.timedelta(days=3)).isoformat()])
    _refused(out, "business_date_open", today.isoformat(), "nothing settled")
    assert _recorded(book) == (0, 0)  # not the two closed days before it either


@pytest.mark.parametrize("name,value", [("PAYOUT_LAG_BUSINESS_DAYS", "abc"), ("HOLIDAY_COUNTRY", "ZZ"),
                                        ("FEE_TIERS", "[]")])
@pytest.mark.parametrize("command", [["settle", "--date", PAST], ["report", "--date", PAST]])
def test_a_bad_settlement_setting_is_refused_before_anything(book, tmp_path, monkeypatch, name, value, command):
    """EUM_SETTLEMENT_* were read only when a day was settled: `eum settle` ended in a
    traceback, exit 1 (a run failing its checks), and POST /v1/settlements in a 500."""
    from settlement.config import get_config

    monkeypatch.setenv(f"EUM_SETTLEMENT_{name}", value)
    get_config.cache_clear()
    try:
        out = runner.invoke(app, [*command, "--out", str(tmp_path / "r.html")] if command[0] == "report" else command)
    finally:
        get_config.cache_clear()
    _refused(out, f"EUM_SETTLEMENT_{name}")
    assert _recorded(book) == (0, 0) and not (tmp_path / "r.html").exists()


def test_a_good_range_still_settles_and_writes_each_days_payouts(book, tmp_path):
    first = _today() - dt.timedelta(days=3)
    last = first + dt.timedelta(days=1)
    out = runner.invoke(app, ["settle", "--date", first.isoformat(), "--to", last.isoformat(),
                              "--payouts", str(tmp_path / "new" / "payouts.csv")])
    assert out.exit_code == 0, (out.output, out.exception)
    assert (tmp_path / "new" / f"payouts-{first}.csv").exists() and (tmp_path / "new" / f"payouts-{last}.csv").exists()
    settled, audited = _recorded(book)
    assert settled == 2 and audited >= 2


def test_a_run_is_recorded_as_the_os_accounts_whatever_actor_it_is_told(book):
    """`eum settle --actor "bob (8a2963892f53)"` wrote that string as the run's `run_by`
    and its audit entry's actor, which reads as an API key holder's. Both are the OS
    account with `eum cli` now; what --actor (now --on-behalf-of) said is the detail
    `on_behalf_of`. One that could spoof the log (a control or bidi character) is refused."""
    import orjson

    from ledger.keys import operator

    out = runner.invoke(app, ["settle", "--date", PAST, "--on-behalf-of", "bob\u202e"])
    _refused(out, "--on-behalf-of", "U+202E", "nothing done")
    assert _recorded(book) == (0, 0)
    out = runner.invoke(app, ["settle", "--date", PAST, "--actor", "bob (8a2963892f53)"])
    assert out.exit_code == 0, (out.output, out.exception)
    with book.connect() as conn:
        (run_by,) = conn.execute(select(ss.settlements.c.run_by)).one()
        actor, detail = conn.execute(select(s.audit_log.c.actor, s.audit_log.c.detail)
                                     .where(s.audit_log.c.action == "settlement.settled")).one()
    assert run_by == actor == operator() and actor.endswith(" (eum cli)")
    assert orjson.loads(detail)["on_behalf_of"] == "bob (8a2963892f53)"


@pytest.mark.parametrize("raised", ["sqlalchemy", "driver"])
def test_a_database_that_stops_a_range_is_exit_3_with_the_days_settled_before(book, monkeypatch, raised):
    """The database stopped `eum settle` on the second day of a range (its backends
    terminated; a day is read through SQLAlchemy, and through psycopg or ADBC directly):
    the command printed a traceback and exited 1. It is the database's stop: one line,
    exit 3, the day settled before stays."""
    import psycopg
    from sqlalchemy.exc import OperationalError

    from settlement import service

    settle, days = service.settle, []
    cut = psycopg.OperationalError("terminating connection due to administrator command")

    def stops_on_the_second_day(engine, day, **kwargs):
        days.append(day)
        if len(days) == 2:
            raise OperationalError("SELECT ...", {}, cut) if raised == "sqlalchemy" else cut
        return settle(engine, day, **kwargs)

    monkeypatch.setattr(service, "settle", stops_on_the_second_day)
    first = _today() - dt.timedelta(days=4)
    out = runner.invoke(app, ["settle", "--date", first.isoformat(), "--to", (first + dt.timedelta(days=2)).isoformat()])
    assert out.exit_code == 3, (out.exit_code, out.output, out.exception)
    assert "Traceback" not in out.output
    assert not isinstance(out.exception, Exception) or isinstance(out.exception, SystemExit), out.exception
    [line] = [line for line in out.stderr.splitlines() if not line.startswith("{")]  # beside the JSON log
    assert line.startswith("stopped by the database (OperationalError") and "administrator command" in line, line
    assert "the 1 day(s) before it stay settled" in line and "run it again" in line, line
    assert _recorded(book)[0] == 1 and len(days) == 2


@pytest.mark.parametrize("level,as_json", [("INFO", "true"), ("ERROR", "true"), ("INFO", "false")])
def test_logs_go_to_stderr_as_the_settings_say_and_stdout_holds_only_the_results(sqlite_url, level, as_json):
    """Run as its own process, as an operator runs it (loggers are set up once a process):
    the service's log lines go to stderr at EUM_LOG_LEVEL, as EUM_LOG_JSON says, as
    `eum serve` honours them; stdout is one whole line per settled day, not wrapped at the
    terminal's width and without the progress bar, so a script can read it."""
    import json
    import os
    import re
    import subprocess
    import sys

    first = _today() - dt.timedelta(days=12)
    env = {**os.environ, "EUM_DATABASE_URL": sqlite_url, "EUM_LOG_LEVEL": level, "EUM_LOG_JSON": as_json,
           "COLUMNS": "60"}
    run = subprocess.run([sys.executable, "-c", "from eum.cli import main; main()", "settle", "--date",
                          first.isoformat(), "--to", (first + dt.timedelta(days=1)).isoformat()],
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, (run.stdout, run.stderr)
    lines = run.stdout.splitlines()
    assert len(lines) == 2 and all(re.fullmatch(r"stl-\S+ +settled +payments +0 +net payable +0 won +topped up +0 "
                                                r"won +withdrawals paid out +0 won +payout \d{4}-\d{2}-\d{2}", line)
                                   for line in lines), run.stdout
    if level == "ERROR":
        assert "settlement.run" not in run.stderr, run.stderr
    elif as_json == "true":
        logged = [json.loads(line) for line in run.stderr.splitlines() if line.startswith("{")]
        assert [e["settlement_id"] for e in logged if e["event"] == "settlement.run"] == [
            line.split()[0] for line in lines], run.stderr
        assert all(e["level"] == "info" for e in logged)
    else:
        assert run.stderr.count("settlement.run") == 2 and "[info" in run.stderr, run.stderr


# ---------------------------------------------------------------- eum reconcile


@pytest.mark.parametrize("tolerance", ["-5", "1000000000001"])
def test_a_tolerance_outside_the_apis_range_is_refused(book, tmp_path, tolerance):
    path = tmp_path / "clearing.csv"
    path.write_text(HEADER + "p-1,s1,12000,2026-11-03T12:00:00+09:00\n")
    _refused(runner.invoke(app, ["reconcile", str(path), "--tolerance-won", tolerance]), "--tolerance-won", tolerance)
    assert _recorded(book) == (0, 0)


def test_a_clearing_file_that_does_not_exist_is_refused(book, tmp_path):
    path = tmp_path / "absent.csv"
    _refused(runner.invoke(app, ["reconcile", str(path)]), "absent.csv", "No such file")
    _refused(runner.invoke(app, ["reconcile", str(tmp_path)]), str(tmp_path))  # a folder
    assert _recorded(book) == (0, 0)


@pytest.mark.parametrize("text", [HEADER, HEADER.replace("\n", "\r\n")])
def test_a_header_only_clearing_file_is_refused_not_reported_clean(book, tmp_path, text):
    path = tmp_path / "clearing.csv"
    path.write_bytes(text.encode())
    out = runner.invoke(app, ["reconcile", str(path), "--out", str(tmp_path / "result.xlsx")])
    _refused(out, "clearing.csv", "no clearing lines")
    assert "matched" not in out.stdout  # no table of zeros
    assert not (tmp_path / "result.xlsx").exists()
    assert _recorded(book) == (0, 0)


def test_a_clearing_file_with_lines_is_still_reconciled(book, tmp_path):
    path = tmp_path / "clearing.csv"
    path.write_text(HEADER + "p-unknown,s1,12000,2026-11-03T12:00:00+09:00\n")
    out = runner.invoke(app, ["reconcile", str(path)])
    assert out.exit_code == 1, (out.output, out.exception)  # one exception row: missing in the ledger
    assert "missing_in_ledger" in out.stdout and "Traceback" not in out.output


def test_reconcile_names_the_columns_it_ignored_and_refuses_record_types_under_another_name(book, tmp_path):
    """A 구분 column under a name the format does not know was dropped without a word, and
    its 취소 lines read as purchases (Korean text audit)."""
    path = tmp_path / "clearing.csv"
    path.write_text(HEADER.replace("\n", ",가맹점명\n") + "p-unknown,s1,12000,2026-11-03T12:00:00+09:00,한빛\n")
    out = runner.invoke(app, ["reconcile", str(path)])
    assert out.exit_code == 1 and "note: columns ignored (no name this format knows): '가맹점명'" in out.stderr, out.output
    path.write_text(HEADER.replace("\n", ",매출구분\n") + "p-unknown,s1,12000,2026-11-03T12:00:00+09:00,취소\n")
    refused = runner.invoke(app, ["reconcile", str(path)])
    assert refused.exit_code == 2 and "Traceback" not in refused.output, refused.output
    first, *lines = refused.stderr.strip().splitlines()
    assert first.startswith("error: ") and "'매출구분'" in first and "record_type" in first, first
    assert lines == ["  line 1: column '매출구분': record types under a name this format does not know"], lines


def test_reconcile_out_files_carry_readable_times_beside_the_microseconds(book, tmp_path):
    """The rows of --out carry `transacted_at` (RFC 3339, Seoul) beside `transacted_at_us`."""
    import io
    import zipfile

    import polars as pl

    path = tmp_path / "clearing.csv"
    line = "p-unknown,s1,12000,2026-11-03T12:00:00.250000+09:00\n"
    path.write_text(HEADER + line + line)
    out = runner.invoke(app, ["reconcile", str(path), "--out", str(tmp_path / "rows")])
    assert out.exit_code == 1, (out.output, out.exception)
    dupes = pl.read_csv(io.BytesIO((tmp_path / "rows" / "duplicates.csv").read_bytes()))
    assert dupes.columns.index("transacted_at") == dupes.columns.index("transacted_at_us") + 1
    assert dupes["transacted_at"].to_list() == ["2026-11-03T12:00:00.250000+09:00"]
    assert dupes["transacted_at_us"].to_list() == [1_793_674_800_250_000]
    out = runner.invoke(app, ["reconcile", str(path), "--out", str(tmp_path / "rows.xlsx")])
    assert out.exit_code == 1, (out.output, out.exception)
    with zipfile.ZipFile(tmp_path / "rows.xlsx") as z:
        strings = z.read("xl/sharedStrings.xml").decode()
    assert "transacted_at" in strings and "2026-11-03T12:00:00.250000+09:00" in strings


def test_a_late_line_is_counted_and_written_to_out_with_both_times(book, tmp_path):
    """A payment at 2025-09-30T23:59:59.999999 cleared on 10-05: `late` (exit 1), with both
    times and both business dates in its rows."""
    import io

    import polars as pl
    from sqlalchemy import insert

    at = 1_759_244_399_999_999  # 2025-09-30T23:59:59.999999+09:00
    with book.begin() as conn:
        conn.execute(insert(s.payments).values(
            payment_id="p1", request_hash="h", member_id="M1", merchant_id="s1", amount_won=12_000, occurred_at_us=at,
            month="2025-09", status="approved", detail="{}", response="{}", recorded_at_us=at))
    path = tmp_path / "clearing.csv"
    path.write_text(HEADER + "p1,s1,12000,2025-10-05T12:00:00+09:00\n")
    out = runner.invoke(app, ["reconcile", str(path), "--out", str(tmp_path / "rows")])
    assert out.exit_code == 1, (out.output, out.exception)
    assert [line.split() for line in out.stdout.splitlines() if line.startswith(("late", "matched"))] == [
        ["matched", "0"], ["late", "1"]]
    late = pl.read_csv(io.BytesIO((tmp_path / "rows" / "late.csv").read_bytes()))
    assert late.select("approval_id", "occurred_at", "transacted_at", "ledger_business_date",
                       "clearing_business_date").rows() == [
        ("p1", "2025-09-30T23:59:59.999999+09:00", "2025-10-05T12:00:00+09:00", "2025-09-30", "2025-10-05")]


def test_an_out_that_cannot_be_written_is_refused_before_reconciling(book, tmp_path, monkeypatch):
    """`--out` is an .xlsx file or a folder (one .csv per category): a path that is
    neither, or that cannot be written, is refused before the file is reconciled (exit 2
    is "refused", nothing done), not found out after the results were printed; and
    `--out result.csv` no longer makes a folder of that name."""
    path = tmp_path / "clearing.csv"
    path.write_text(HEADER + "p-unknown,s1,12000,2026-11-03T12:00:00+09:00\n")
    monkeypatch.setattr("settlement.reconcile.reconcile", lambda *a, **k: pytest.fail("reconciled"))
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    (tmp_path / "rows").mkdir()
    (tmp_path / "rows" / "matched.csv").mkdir()  # where a category's file goes
    (tmp_path / "folder.xlsx").mkdir()
    for out, words in ((tmp_path / "result.csv", ["result.csv", ".xlsx", "folder"]),
                       (tmp_path / "result.parquet", ["result.parquet", ".xlsx", "folder"]),
                       (blocker, ["a-file", "not a folder"]),
                       (blocker / "rows", ["not a folder"]),
                       (blocker / "rows.xlsx", ["not a folder"]),
                       (tmp_path / "folder.xlsx", ["folder.xlsx", "is a folder"]),
                       (tmp_path / "rows", ["matched.csv", "is a folder"])):
        result = runner.invoke(app, ["reconcile", str(path), "--out", str(out)])
        _refused(result, "--out", *words)
        assert result.stdout == "", result.stdout  # no counts: nothing was reconciled
    assert not (tmp_path / "result.csv").exists() and not (tmp_path / "result.parquet").exists()
    assert [p.name for p in (tmp_path / "rows").iterdir()] == ["matched.csv"]  # no category file written


def test_an_out_that_fails_after_reconciling_is_exit_1_not_refused(book, tmp_path, monkeypatch):
    """Writing can still fail once the results are out (more rows than xlsx holds, a full
    disk): exit 1 with the reason, as `eum report` does; 2 would say nothing was done."""
    from settlement import export

    path = tmp_path / "clearing.csv"
    path.write_text(HEADER + "p-unknown,s1,12000,2026-11-03T12:00:00+09:00\n")
    monkeypatch.setattr(export, "XLSX_ROWS_MAX", 0)
    result = runner.invoke(app, ["reconcile", str(path), "--out", str(tmp_path / "rows.xlsx")])
    assert result.exit_code == 1, (result.output, result.exception)
    assert "missing_in_ledger" in result.stdout
    assert result.stderr.startswith("error: --out") and "xlsx holds 0" in result.stderr, result.stderr
    assert "Traceback" not in result.output


# ---------------------------------------------------------------- eum report


def _nothing_written(tmp_path, *names: str) -> None:
    for name in names:
        assert not (tmp_path / name).exists(), name


@pytest.mark.parametrize("text", ["2026-12-32", "2026-02-30", "20261203", "yesterday", "1999-12-31", "2100-01-01"])
def test_report_refuses_a_bad_date(book, tmp_path, text):
    out = runner.invoke(app, ["report", "--date", text, "--out", str(tmp_path / "r.html")])
    _refused(out, "--date", text[:4])
    _nothing_written(tmp_path, "r.html")


@pytest.mark.parametrize("text", ["2026-13", "2026-00", "2026-1", "202611", "november", "1999-12", "2100-01",
                                  "2026-11-03"])
def test_report_refuses_a_bad_month(book, tmp_path, text):
    out = runner.invoke(app, ["report", "--month", text, "--out", str(tmp_path / "r.html")])
    _refused(out, "--month", text[:4])
    _nothing_written(tmp_path, "r.html")


@pytest.mark.parametrize("args", [[], ["--month", "2026-11", "--date", PAST]])
def test_report_refuses_neither_or_both_periods(book, tmp_path, args):
    out = runner.invoke(app, ["report", *args, "--out", str(tmp_path / "r.html")])
    _refused(out, "--month", "--date")
    _nothing_written(tmp_path, "r.html")


def test_report_refuses_a_clearing_file_that_cannot_be_read(book, tmp_path):
    out = runner.invoke(app, ["report", "--date", PAST, "--out", str(tmp_path / "r.html"),
                              "--clearing", str(tmp_path / "absent.csv")])
    _refused(out, "--clearing", "absent.csv", "No such file")
    out = runner.invoke(app, ["report", "--date", PAST, "--out", str(tmp_path / "r.html"),
                              "--clearing", str(tmp_path)])  # a folder
    _refused(out, "--clearing", str(tmp_path))
    _nothing_written(tmp_path, "r.html")


def test_report_refuses_a_malformed_clearing_file_in_one_line(book, tmp_path):
    path = tmp_path / "clearing.csv"
    path.write_text(HEADER + "p-1,s1,ten,2026-11-03T12:00:00+09:00\n")
    out = runner.invoke(app, ["report", "--date", PAST, "--out", str(tmp_path / "r.html"),
                              "--payouts", str(tmp_path / "p.csv"), "--clearing", str(path)])
    _refused(out, "--clearing", "clearing.csv", "line", "2")
    _nothing_written(tmp_path, "r.html", "p.csv")


@pytest.mark.parametrize("name", ["payouts.txt", "payouts", "payouts.CSV.bak"])
def test_report_refuses_a_payouts_file_of_an_unknown_format_before_writing_the_html(book, tmp_path, name):
    out = runner.invoke(app, ["report", "--date", PAST, "--out", str(tmp_path / "r.html"),
                              "--payouts", str(tmp_path / name)])
    _refused(out, "--payouts", "unknown format", ".csv")
    _nothing_written(tmp_path, "r.html", name)


def test_report_refuses_files_that_cannot_be_written(book, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    _refused(runner.invoke(app, ["report", "--date", PAST, "--out", str(blocker / "r.html")]), "--out", "not a folder")
    out = runner.invoke(app, ["report", "--date", PAST, "--out", str(tmp_path / "r.html"),
                              "--payouts", str(blocker / "p.csv")])
    _refused(out, "--payouts", "not a folder")
    _refused(runner.invoke(app, ["report", "--date", PAST, "--out", str(tmp_path)]), "--out")  # a folder
    _nothing_written(tmp_path, "r.html")


def test_an_output_that_is_the_clearing_file_read_is_refused(book, tmp_path):
    """`eum report --clearing F --out F` wrote the HTML over the network's clearing file,
    and `eum reconcile matched.csv --out .` its matched rows over it (the security audit):
    the file was gone. Refused, exit 2, the file as it was, nothing reconciled."""
    clearing = tmp_path / "matched.csv"
    text = HEADER + "p-unknown,s1,12000,2026-11-03T12:00:00+09:00\n"
    clearing.write_text(text)
    link = tmp_path / "link.html"
    link.symlink_to(clearing)
    for option, target in (("--out", clearing), ("--out", link), ("--payouts", clearing)):
        args = ["report", "--date", PAST, "--clearing", str(clearing)]
        args += [option, str(target)] if option == "--out" else ["--out", str(tmp_path / "r.html"), option, str(target)]
        _refused(runner.invoke(app, args), option, "is the --clearing file", "nothing written")
    before = _recorded(book)
    _refused(runner.invoke(app, ["reconcile", str(clearing), "--out", str(tmp_path)]), "--out",
             "is the clearing file", "nothing reconciled")
    assert clearing.read_text() == text and _recorded(book) == before
    assert not (tmp_path / "r.html").exists()


def test_a_good_report_is_still_written_with_its_payouts(book, tmp_path):
    out = runner.invoke(app, ["report", "--month", PAST[:7], "--out", str(tmp_path / "new" / "r.html"),
                              "--payouts", str(tmp_path / "new" / "p.csv")])
    assert out.exit_code == 0, (out.output, out.exception)
    assert (tmp_path / "new" / "r.html").read_text(encoding="utf-8").startswith("<!DOCTYPE html>")
    assert (tmp_path / "new" / "p.csv").exists()
    out = runner.invoke(app, ["report", "--date", PAST, "--out", str(tmp_path / "d.html")])
    assert out.exit_code == 0, (out.output, out.exception)
    assert (tmp_path / "d.html").exists()


def test_a_report_without_out_is_named_by_what_it_covers(book, tmp_path, monkeypatch):
    """Without --out every report went to reports/report.html: a day's report written
    over the month's, or over another day's. Each is named by its period now, and the
    path written is printed."""
    monkeypatch.chdir(tmp_path)
    other = (dt.date.fromisoformat(PAST) - dt.timedelta(days=1)).isoformat()
    written = {}
    for args in (["--month", PAST[:7]], ["--date", PAST], ["--date", other]):
        out = runner.invoke(app, ["report", *args])
        assert out.exit_code == 0, (out.output, out.exception)
        path = Path("reports") / f"report-{args[1]}.html"
        assert f"report written to {path}\n" in out.stdout, out.stdout
        written[args[1]] = (tmp_path / path).read_text(encoding="utf-8")
    assert sorted(p.name for p in (tmp_path / "reports").iterdir()) == sorted(
        f"report-{period}.html" for period in (PAST[:7], PAST, other))
    for period, html in written.items():  # each file holds its own period's report
        assert f"<title>e-eum settlement — {period}</title>" in html, (period, html[:300])


@pytest.mark.postgres
def test_reconcile_on_an_unmigrated_postgresql_database_says_to_upgrade(tmp_path):
    """`eum reconcile FILE` and `eum report --clearing FILE` read the book through psycopg
    (settlement/io.py's COPY): on a database never migrated they were a psycopg
    UndefinedTable traceback, exit 1, where `eum report --date` alone said to run `eum db
    upgrade`, exit 2. All three say so now (eum.cli:main)."""
    import os
    import subprocess
    import sys

    from tests.conftest import create_pg_database, drop_pg_database

    name, url = create_pg_database()
    try:
        clearing = tmp_path / "clearing.csv"
        clearing.write_text(HEADER + f"p-1,shop-1,1000,{PAST}T12:00:00+09:00\n")
        env = {**os.environ, "EUM_DATABASE_URL": url, "EUM_LOG_LEVEL": "WARNING"}
        report = ["report", "--date", PAST, "--out", str(tmp_path / "r.html")]
        for args in (report, ["reconcile", str(clearing)], [*report, "--clearing", str(clearing)]):
            done = subprocess.run([sys.executable, "-m", "eum", *args], env=env, capture_output=True, text=True,
                                  timeout=120, cwd=tmp_path)
            assert done.returncode == 2 and "Traceback" not in done.stderr, (args, done.stderr[-2000:])
            assert "not migrated" in done.stderr and "eum db upgrade" in done.stderr, (args, done.stderr)
    finally:
        drop_pg_database(name)


def test_a_raw_driver_error_that_stops_a_command_is_exit_3(monkeypatch, capsys):
    """A psycopg OperationalError raised past SQLAlchemy (settlement's own reads) on a
    migrated database is the database stopping the command: one line, exit 3, as
    SQLAlchemy's OperationalError is."""
    import psycopg

    from eum import cli

    def stopped():
        raise psycopg.OperationalError("consuming input failed: server closed the connection unexpectedly")

    monkeypatch.setattr(cli, "app", stopped)
    monkeypatch.setattr(cli, "_migrations_behind", lambda: None)
    with pytest.raises(SystemExit) as ended:
        cli.main()
    assert ended.value.code == 3
    err = capsys.readouterr().err
    assert err.startswith("error: cannot use the database (consuming input failed") and len(err.splitlines()) == 1


def test_an_unkeyed_audit_append_that_stops_a_command_is_one_line_and_exit_2(monkeypatch, capsys):
    """A process without EUM_AUDIT_KEYS writing after keyed entries: eum.cli:main's
    `error:` line and exit 2, found without importing the database libraries first."""
    from eum import cli
    from ledger.audit import UnkeyedAppend

    def refused():
        raise UnkeyedAppend("the audit log is keyed: set EUM_AUDIT_KEYS; nothing was changed")

    monkeypatch.setattr(cli, "app", refused)
    with pytest.raises(SystemExit) as ended:
        cli.main()
    assert ended.value.code == 2
    assert capsys.readouterr().err == "error: the audit log is keyed: set EUM_AUDIT_KEYS; nothing was changed\n"


def test_help_imports_no_database_library():
    """`eum --help`, and every command before it opens a database, imported alembic and
    psycopg (eum.cli:main's error handling, ledger.db's top): `--help` took 0.70-0.90 s on
    a quiet machine, now 0.29 s. They are imported where a migration is run or a
    connection made."""
    import subprocess
    import sys

    code = ("import sys\nsys.argv = ['eum', '--help']\nfrom eum.cli import main\nimport ledger.db\n"
            "try:\n    main()\nexcept SystemExit as ended:\n    assert ended.code == 0, ended.code\n"
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'alembic', 'psycopg', 'polars'}))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Commands" in done.stdout and done.stdout.splitlines()[-1] == "[]", done.stdout[-500:]


def test_help_lists_each_command_on_one_line():
    """`eum --help` listed commands in Rich's panel with their docstrings' line breaks
    kept, so a command's summary ran over up to eight ragged lines; it is Click's plain
    listing now, a line a command, as each command's own --help always was."""
    from typer.testing import CliRunner

    from eum.cli import app

    listed = CliRunner().invoke(app, ["--help"], env={"COLUMNS": "100"})
    assert listed.exit_code == 0, listed.output
    rows = listed.output.split("Commands:\n", 1)[1].rstrip("\n").splitlines()
    names = [row.split()[0] for row in rows]
    assert {"serve", "settle", "reconcile", "report", "audit-verify", "keys", "db", "policy", "grants",
            "payments"} <= set(names) and len(names) == len(set(names)), rows
    assert all(row.startswith("  ") and not row.startswith("   ") for row in rows), rows


def test_a_clearing_file_past_its_limit_is_refused_by_its_size_unread(book, tmp_path, monkeypatch):
    """`eum reconcile` read the file whole before its size was checked (a file larger
    than memory: a MemoryError traceback; the payments replay audit's finding, here too).
    A sparse 1 TiB file, its reading standing for running out of memory."""
    from pathlib import Path

    path = tmp_path / "clearing.csv"
    with open(path, "wb") as f:
        f.truncate(1 << 40)
    monkeypatch.setattr(Path, "read_bytes", lambda self: (_ for _ in ()).throw(MemoryError))
    _refused(runner.invoke(app, ["reconcile", str(path)]), "clearing.csv", "file larger than")


@pytest.mark.parametrize("command", [["reconcile", "clearing.csv"],
                                     ["report", "--date", "2025-09-15", "--out", "r.html", "--clearing", "clearing.csv"],
                                     ["policy", "submit", "policy.yaml", "--api-url", "http://127.0.0.1:9", "--key", "k"]])
def test_a_bad_settlement_setting_is_one_line_where_a_file_is_read(book, tmp_path, monkeypatch, command):
    """Reading the clearing file by its size bound read the settlement settings unchecked:
    a bad one was a traceback, and `policy submit`, which needs none, crashed on it too
    (the review of that change)."""
    (tmp_path / "clearing.csv").write_text(HEADER + "p1,s1,1000,2025-09-15 12:00:00\n")
    (tmp_path / "policy.yaml").write_text("policy_id: x\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("EUM_SETTLEMENT_PAYOUT_LAG_BUSINESS_DAYS", "abc")
    from settlement.config import get_config

    get_config.cache_clear()
    try:
        out = runner.invoke(app, command)
    finally:
        get_config.cache_clear()
    assert not isinstance(out.exception, Exception) or isinstance(out.exception, SystemExit), repr(out.exception)
    if command[0] == "policy":  # no settlement setting needed: it goes on to the service (not there)
        assert out.stderr.startswith("error: cannot reach the service"), out.stderr
    else:
        _refused(out, "EUM_SETTLEMENT_PAYOUT_LAG_BUSINESS_DAYS")
