"""An operator's bad settings stop `eum serve` (and `eum db upgrade`) at once with one
`error:` line naming the setting, exit 2 (3 for a database that cannot be used), before
anything is migrated or a worker is started (a worker that fails its start stops the
whole service)."""

from __future__ import annotations

import socket
from pathlib import Path
import threading

import pytest
from typer.testing import CliRunner

from eum.cli import app
from eum.settings import get_settings
from settlement.config import get_config

runner = CliRunner()
# `--port PORT`: a port free when the command runs (`_run`). `eum serve` holds the port it
# serves on from its first check to its stop, a whole start here; a fixed one made two
# test processes at once (xdist, another checkout's run) refuse each other's start.
PORT = "<a free port>"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _run(monkeypatch, env: dict[str, str], *args: str):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    get_settings.cache_clear()
    get_config.cache_clear()
    try:
        return runner.invoke(app, [str(_free_port()) if arg == PORT else arg for arg in args])
    finally:
        get_settings.cache_clear()
        get_config.cache_clear()


@pytest.mark.parametrize("env,says", [
    ({"EUM_DATABASE_URL": "postgres://x@127.0.0.1/y"}, "EUM_DATABASE_URL"),
    ({"EUM_REDIS_URL": "http://x"}, "EUM_REDIS_URL"),
    ({"EUM_REDIS_URL": "redis://127.0.0.1:63790000/0"}, "EUM_REDIS_URL: Value error, a URL that does not parse"),
    ({"EUM_REDIS_URL": "redis://:pa/ss@127.0.0.1:6379/0"}, "EUM_REDIS_URL"),  # the worker's start: a traceback
    ({"EUM_REDIS_URL": "redis://127.0.0.1:6379/db1"}, "EUM_REDIS_URL"),  # had served on database 0, unsaid
    ({"EUM_LOG_LEVEL": "verbose"}, "EUM_LOG_LEVEL"),
    ({"EUM_BATCH_WRITERS": "abc"}, "EUM_BATCH_WRITERS"),
    ({"EUM_DB_POOL_SIZE": "-3"}, "EUM_DB_POOL_SIZE"),
    ({"EUM_DB_STATEMENT_TIMEOUT_MS": "3000000000"}, "EUM_DB_STATEMENT_TIMEOUT_MS"),  # past PostgreSQL's int
    ({"EUM_SETTLEMENT_STATEMENT_TIMEOUT_MS": "3000000000"}, "EUM_SETTLEMENT_STATEMENT_TIMEOUT_MS"),
    ({"EUM_SETTLEMENT_RECONCILE_TOLERANCE_WON": str(2**64)}, "EUM_SETTLEMENT_RECONCILE_TOLERANCE_WON"),  # TypeError
    ({"EUM_ENVIRONMENT": "prod"}, "EUM_ENVIRONMENT"),
    ({"EUM_POLICIES_DIR": "/nonexistent"}, "no policy files"),
    ({"EUM_SETTLEMENT_PAYOUT_LAG_BUSINESS_DAYS": "abc"}, "EUM_SETTLEMENT_PAYOUT_LAG_BUSINESS_DAYS"),
    ({"EUM_SETTLEMENT_HOLIDAY_COUNTRY": "ZZ"}, "EUM_SETTLEMENT_HOLIDAY_COUNTRY"),  # every settlement failed on it
    ({"EUM_RATE_LIMITS": "{bad"}, "EUM_RATE_LIMITS: not valid JSON"),  # pydantic-settings' SettingsError
    ({"EUM_RATE_LIMITS": ""}, "EUM_RATE_LIMITS: empty"),
    ({"EUM_SETTLEMENT_FEE_TIERS": "[{"}, "EUM_SETTLEMENT_FEE_TIERS: "),  # no longer read as JSON: refused
    ({"EUM_GIL_SWITCH_INTERVAL_S": "abc"}, "EUM_GIL_SWITCH_INTERVAL_S"),  # read when a worker imports api.batcher
    ({"EUM_GIL_SWITCH_INTERVAL_S": "-1"}, "EUM_GIL_SWITCH_INTERVAL_S"),
    ({"EUM_IDEMPOTENCY_LOOKUP": "redis"}, "EUM_IDEMPOTENCY_LOOKUP: redis needs EUM_REDIS_URL"),  # ran as local
    ({"EUM_IDEMPOTENCY_CACHE_TTL_S": str(10**17)}, "EUM_IDEMPOTENCY_CACHE_TTL_S"),  # Redis refused every SET
    ({"EUM_ENVIRONMENT": "production", "EUM_DATABASE_URL": "postgresql://postgres@127.0.0.1:5432/postgres",
      "EUM_KEY_PEPPER": "", "EUM_AUDIT_KEYS": "k1:" + "s" * 32}, "EUM_KEY_PEPPER"),  # compose's empty default
    ({"EUM_KEY_PEPPER": ""}, "EUM_KEY_PEPPER is empty"),  # development too: keys hashed with no pepper
    ({"EUM_KEY_PEPPER": "  "}, "EUM_KEY_PEPPER is empty"),
])
def test_a_bad_setting_is_one_line_and_nothing_starts(monkeypatch, tmp_path, env, says):
    monkeypatch.setattr("eum.cli._serve_on", lambda *a, **k: pytest.fail("a worker was started"))
    monkeypatch.setenv("EUM_DATABASE_URL", f"sqlite:///{tmp_path / 'eum.db'}")
    out = _run(monkeypatch, env, "serve", "--port", PORT)
    assert out.exit_code == 2 and says in out.output and "Traceback" not in out.output, out.output
    assert not (tmp_path / "eum.db").exists()  # nothing migrated


def test_a_sqlite_url_whose_options_sqlite_would_not_see_is_refused(monkeypatch, tmp_path):
    """Without uri=true SQLAlchemy drops a SQLite URL's query (`?mode=ro`) with a Python
    warning outside the JSON log: the service served the book writable, the operator
    taking it for read-only (operations audit)."""
    monkeypatch.setattr("eum.cli._serve_on", lambda *a, **k: pytest.fail("a worker was started"))
    out = _run(monkeypatch, {"EUM_DATABASE_URL": f"sqlite:///{tmp_path / 'eum.db'}?mode=ro"}, "serve", "--port", PORT)
    assert out.exit_code == 2 and out.stderr.startswith("error: EUM_DATABASE_URL: ") and "uri=true" in out.stderr
    assert len(out.stderr.splitlines()) == 1 and not (tmp_path / "eum.db").exists(), out.output


@pytest.mark.parametrize("value, code", [("5", 2), ("0.002", 0)])
def test_the_workers_own_settings_are_read_from_dotenv_too(monkeypatch, tmp_path, value, code):
    """EUM_GIL_SWITCH_INTERVAL_S (and EUM_GC_FREEZE), read by a worker from its
    environment, were ignored in `.env` without a word: 5 there started the service on
    the default (new-user audit). `eum serve` takes them from `.env`, the environment's
    own value first."""
    import os

    for name in ("EUM_GIL_SWITCH_INTERVAL_S", "EUM_GC_FREEZE"):
        monkeypatch.setenv(name, "0")
        monkeypatch.delenv(name)  # absent, and restored so after the test
    started = []
    monkeypatch.setattr("eum.cli._serve_on", lambda *a, **k: started.append(os.environ["EUM_GIL_SWITCH_INTERVAL_S"]))
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".env").write_text(f"EUM_GIL_SWITCH_INTERVAL_S={value}\n")
    out = _run(monkeypatch, {"EUM_DATABASE_URL": f"sqlite:///{tmp_path / 'eum.db'}"}, "serve", "--port", PORT)
    assert out.exit_code == code, (out.output, out.exception)
    if code:
        assert "EUM_GIL_SWITCH_INTERVAL_S" in out.stderr and not started
    else:
        assert started == [value] and "unknown settings" not in out.stderr


@pytest.mark.parametrize("change", ["clash", "unparseable", "id twice", "dangling link", "folder"])
def test_policy_files_that_cannot_serve_are_refused_before_the_database_is_touched(monkeypatch, tmp_path, change):
    """A start refused for its policy files had already made and migrated the database:
    on an upgrade, to a head the old release then refuses (new-user audit). A file that
    cannot be read (a dangling link, a folder named *.yaml) was an OSError traceback,
    exit 1 (operator audit)."""
    import shutil

    from tests.conftest import POLICIES

    monkeypatch.setattr("eum.cli._serve_on", lambda *a, **k: pytest.fail("a worker was started"))
    policies = tmp_path / "policies"
    shutil.copytree(POLICIES, policies)
    cap = (POLICIES / "2025-10-cap-50man.yaml").read_text()
    if change == "clash":  # same layer, same instant
        (policies / "twin.yaml").write_text(cap.replace("policy_id: incheon-2025-10", "policy_id: incheon-2025-10-twin"))
    elif change == "unparseable":
        (policies / "broken.yaml").write_text("policy_id: [unclosed\n")
    elif change == "dangling link":
        (policies / "gone.yaml").symlink_to(tmp_path / "moved-away.yaml")
    elif change == "folder":
        (policies / "old.yaml").mkdir()
    else:
        (policies / "copy.yaml").write_text(cap)
    out = _run(monkeypatch, {"EUM_DATABASE_URL": f"sqlite:///{tmp_path / 'eum.db'}", "EUM_POLICIES_DIR": str(policies)},
               "serve", "--port", PORT)
    assert out.exit_code == 2 and out.stderr.startswith("error: EUM_POLICIES_DIR"), (out.output, out.exception)
    assert "Traceback" not in out.output
    if change in ("dangling link", "folder"):
        assert "cannot be read" in out.stderr, out.stderr
    assert not (tmp_path / "eum.db").exists()  # nothing made, nothing migrated


@pytest.mark.parametrize("url", ["postgresql://eum:s3cret@127.0.0.1:54x/db", "postgresql://eum:s3cret@[::1/db",
                                 "postgresql://eum:s3cret@127.0.0.1:99999/db"])
@pytest.mark.parametrize("args", [("db", "check"), ("keys", "list"), ("audit-verify",), ("serve", "--port", PORT)])
def test_a_database_url_that_does_not_parse_is_a_bad_setting_for_every_command(monkeypatch, url, args):
    """A mistyped port was a traceback and exit 1 for `db check` (its BAD: a cron job
    watching the book would have reported it broken), `keys list` and `audit-verify`
    (the observability audit). It is a bad setting: one line naming it, exit 2, and the
    password not echoed."""
    monkeypatch.setattr("eum.cli._serve_on", lambda *a, **k: pytest.fail("a worker was started"))
    out = _run(monkeypatch, {"EUM_DATABASE_URL": url}, *args)
    assert out.exit_code == 2, (out.exit_code, out.output, out.exception)
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: EUM_DATABASE_URL"), out.stderr
    assert "s3cret" not in out.output and "Traceback" not in out.output, out.output


@pytest.mark.parametrize("url", ["postgresql://eum:s3cret@127.0.0.1:1", "postgresql+psycopg://eum:s3cret@127.0.0.1:1/"])
@pytest.mark.parametrize("args", [("db", "upgrade"), ("serve", "--port", PORT)])
def test_a_postgresql_url_without_its_database_is_a_bad_setting(monkeypatch, url, args):
    """Without a database in the URL PostgreSQL connects to the one named as the user:
    `eum serve` with `postgresql://postgres:...@host:5432` migrated the server's admin
    database `postgres` and served the book there (operations audit, 2026-12-07). It is
    refused as a bad setting: one line naming it, exit 2, nothing reached."""
    from eum.settings import Settings

    monkeypatch.setattr("eum.cli._serve_on", lambda *a, **k: pytest.fail("a worker was started"))
    out = _run(monkeypatch, {"EUM_DATABASE_URL": url}, *args)
    assert out.exit_code == 2, (out.exit_code, out.output, out.exception)
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: EUM_DATABASE_URL") and "names its database" in lines[0], \
        out.stderr
    assert "s3cret" not in out.output
    assert Settings(database_url="postgresql://eum@127.0.0.1:1?dbname=book").database_url  # libpq's own way: named


@pytest.mark.parametrize("args", [("--port", "99999"), ("--port", "0"), ("--port", "-1"), ("--workers", "0")])
def test_a_port_or_worker_count_out_of_range_is_refused(monkeypatch, tmp_path, args):
    """`--port 99999` logged "running on http://127.0.0.1:99999" and listened on another port."""
    monkeypatch.setattr("eum.cli._serve_on", lambda *a, **k: pytest.fail("a worker was started"))
    out = _run(monkeypatch, {"EUM_DATABASE_URL": f"sqlite:///{tmp_path / 'eum.db'}"}, "serve", *args)
    assert out.exit_code == 2 and "Invalid value for" in out.output, out.output
    assert not (tmp_path / "eum.db").exists()


def test_an_empty_metrics_token_is_a_warning_and_leaves_metrics_open(monkeypatch, tmp_path):
    """EUM_METRICS_TOKEN="" (compose's ${VAR:-}) left /metrics open without a word."""
    from api.app import create_app

    monkeypatch.setattr("eum.cli._serve_on", lambda *a, **k: None)
    for token in ("", "  "):
        out = _run(monkeypatch, {"EUM_DATABASE_URL": f"sqlite:///{tmp_path / 'eum.db'}", "EUM_METRICS_TOKEN": token},
                   "serve", "--port", PORT)
        assert out.exit_code == 0 and "warning: EUM_METRICS_TOKEN is empty: /metrics is open" in out.stderr, out.output
        get_settings.cache_clear()
        assert create_app().state.metrics_token is None
        get_settings.cache_clear()


def test_a_database_that_does_not_answer_stops_serve_with_exit_3(monkeypatch):
    """Exit 3, as every command the database stops (README, the `eum` command): 2 is a
    bad setting or input."""
    monkeypatch.setattr("eum.cli._serve_on", lambda *a, **k: pytest.fail("a worker was started"))
    out = _run(monkeypatch, {"EUM_DATABASE_URL": "postgresql://postgres@127.0.0.1:9/x"}, "serve", "--port", PORT)
    assert out.exit_code == 3 and "Traceback" not in out.output, out.output
    assert out.stderr.startswith("error: EUM_DATABASE_URL: cannot use the database ("), out.stderr


def test_an_sqlite_file_that_cannot_be_a_database_is_one_line(monkeypatch, tmp_path):
    """A path under a file, or a file that is not a database: `eum serve` and `eum db
    upgrade` ended in a FileExistsError or DatabaseError traceback, exit 1; one line,
    exit 3 (the database cannot be used)."""
    monkeypatch.setattr("eum.cli._serve_on", lambda *a, **k: pytest.fail("a worker was started"))
    (tmp_path / "a-file").write_text("not a folder")
    (tmp_path / "notes.db").write_text("not a database\n" * 100)
    for path in (tmp_path / "a-file" / "eum.db", tmp_path / "notes.db"):
        for args in (("serve", "--port", PORT), ("db", "upgrade")):
            out = _run(monkeypatch, {"EUM_DATABASE_URL": f"sqlite:///{path}"}, *args)
            assert out.exit_code == 3 and "Traceback" not in out.output, out.output
            assert out.stderr.startswith("error: EUM_DATABASE_URL: cannot use the database ("), out.stderr
            if path.parent.name == "a-file":  # it said only "File exists: '.../a-file'"
                assert f"{tmp_path / 'a-file'} is a file, not a folder" in out.stderr, out.stderr
    assert (tmp_path / "notes.db").read_text() == "not a database\n" * 100


def test_a_database_that_never_answers_is_given_up_on(monkeypatch):
    """A listener that accepts and never answers: the connect timeout bounds it (a start
    used to hang silently in the migration)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    held = []
    threading.Thread(target=lambda: held.extend(listener.accept() for _ in range(4)), daemon=True).start()
    port = listener.getsockname()[1]
    try:
        out = _run(monkeypatch, {"EUM_DATABASE_URL": f"postgresql://postgres@127.0.0.1:{port}/x",
                                 "EUM_DB_CONNECT_TIMEOUT_S": "2"}, "db", "upgrade")
    finally:
        listener.close()
    assert out.exit_code == 3 and "cannot use the database" in out.output, out.output


def test_an_unknown_setting_is_named(monkeypatch, tmp_path):
    """A typo of EUM_API_FAST_PATH too: every EUM_API_ name was taken for the command
    line's EUM_API_KEY and EUM_API_URL (the docs audit); those two stay unwarned."""
    monkeypatch.setattr("eum.cli._serve_on", lambda *a, **k: None)
    out = _run(monkeypatch, {"EUM_DATABASE_URL": f"sqlite:///{tmp_path / 'eum.db'}", "EUM_REDIS_ULR": "x",
                             "EUM_API_FAST_PAHT": "false", "EUM_API_KEY": "k", "EUM_API_URL": "http://x"},
               "serve", "--port", PORT)
    assert out.exit_code == 0 and "unknown settings ignored: EUM_API_FAST_PAHT, EUM_REDIS_ULR\n" in out.output, \
        out.output


@pytest.mark.postgres
def test_replicas_migrating_a_fresh_database_together_all_succeed():
    """Three processes upgrade one fresh PostgreSQL database at once (replicas on a first
    deploy): they take turns on an advisory lock; one used to fail on a unique violation."""
    import subprocess
    import sys

    from tests.conftest import create_pg_database, drop_pg_database

    name, url = create_pg_database()
    try:
        code = f"from ledger.db import migrate; migrate({url!r})"
        runs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
                for _ in range(3)]
        outputs = [(run.wait(timeout=120), run.stdout.read().decode()) for run in runs]
        assert all(rc == 0 for rc, _ in outputs), outputs
    finally:
        drop_pg_database(name)


@pytest.mark.postgres
def test_a_worker_that_fails_its_start_stops_serve_with_exit_3(tmp_path):
    """With --workers 2 (the Docker image's command) uvicorn stops the other workers when
    one fails its start and returned as if asked to stop: `eum serve` exited 0, and a
    supervisor saw a clean stop. Here the start's own checks are skipped, so the workers
    meet a folder they cannot load (two policies of one layer at one instant)."""
    import os
    import shutil
    import subprocess
    import sys

    from tests.conftest import POLICIES, create_pg_database, drop_pg_database

    shutil.copytree(POLICIES, tmp_path / "policies")
    october = (POLICIES / "2025-10-cap-50man.yaml").read_text(encoding="utf-8")
    (tmp_path / "policies" / "zz.yaml").write_text(october.replace("policy_id: incheon-2025-10",
                                                                   "policy_id: t-overlap"), encoding="utf-8")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    code = ("import sys; import eum.cli as cli; cli._check_policy_files = lambda settings: None; "
            "cli._check_policy_files_alone = lambda settings: None; "
            f"sys.argv = ['eum', 'serve', '--workers', '2', '--port', '{port}']; cli.main()")
    name, url = create_pg_database()
    try:
        env = {**os.environ, "EUM_DATABASE_URL": url, "EUM_POLICIES_DIR": str(tmp_path / "policies"),
               "EUM_LOG_LEVEL": "WARNING"}
        env.pop("EUM_REDIS_URL", None)
        served = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=180)
    finally:
        drop_pg_database(name)
    assert "PolicyClash" in served.stdout + served.stderr, served.stderr[-3000:]
    assert served.returncode == 3, (served.returncode, served.stderr[-3000:])
    assert served.stderr.rstrip().endswith("error: a worker failed its start (its log above); the service stopped")


PRODUCTION = {"EUM_ENVIRONMENT": "production", "EUM_DATABASE_URL": "postgresql://nobody@127.0.0.1:1/none",
              "EUM_KEY_PEPPER": "p" * 32, "EUM_AUDIT_KEYS": "k1:" + "s" * 32}


def test_a_database_that_stops_the_demo_is_one_line_and_exit_3(monkeypatch, tmp_path):
    """`eum demo` writes the book (the members' top-ups): the book giving up on a batch
    (Unavailable) or a database that cannot be reached was a traceback and exit 1."""
    from ledger.book import Book
    from ledger.errors import Unavailable

    def down(*args, **kwargs):
        raise Unavailable("the book of record could not be written; retry with the same id")

    monkeypatch.setattr(Book, "execute", down)
    env = {"EUM_DATABASE_URL": f"sqlite:///{tmp_path / 'demo.db'}", "EUM_LOG_LEVEL": "ERROR"}
    refused = _run(monkeypatch, {**env, "EUM_DATABASE_URL": "postgresql://postgres@127.0.0.1:1/none",
                                 "EUM_DB_CONNECT_TIMEOUT_S": "2"}, "demo")
    for result, says in ((_run(monkeypatch, env, "demo"), "Unavailable: the book of record could not be written"),
                         (refused, "OperationalError")):
        assert result.exit_code == 3, (result.output, result.exception)
        assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit)
        [line] = [line for line in result.stderr.splitlines() if not line.startswith("{")]  # beside the JSON log
        assert line.startswith(f"stopped by the database ({says}") and "anything loaded before it stopped stays" in line, \
            line


@pytest.mark.parametrize("args", [("demo",), ("serve", "--demo")])
def test_demo_data_and_printed_keys_are_refused_in_production(monkeypatch, args):
    """`--demo` loads demo members and prints a never-expiring admin key to stdout (the
    container's log); in production that is refused before anything is touched."""
    result = _run(monkeypatch, PRODUCTION, *args)
    assert result.exit_code == 2, result.output
    assert "not for EUM_ENVIRONMENT=production" in result.output and "eum_" not in result.output


def _key_count(url: str) -> int:
    from ledger.db import make_engine
    from ledger.keys import list_keys

    engine = make_engine(url)
    try:
        return len(list_keys(engine))
    finally:
        engine.dispose()


def test_serve_demo_prints_keys_only_when_it_loads_the_demo_data(monkeypatch, tmp_path):
    """`eum serve --demo` on a database that already had data said "demo data not
    loaded", then made and printed a new admin and card-app key all the same (working
    for 7 days, in the service's log), at every start. Keys come with the demo data now:
    a later start says no keys were made and how to make one."""
    monkeypatch.setattr("eum.cli._serve_on", lambda *a, **k: None)
    monkeypatch.delenv("EUM_REDIS_URL", raising=False)
    url = f"sqlite:///{tmp_path / 'eum.db'}"
    first = _run(monkeypatch, {"EUM_DATABASE_URL": url}, "serve", "--demo", "--port", PORT)
    assert first.exit_code == 0 and "demo data loaded" in first.stdout, first.output
    # Said in words, not a Python dict ({'members': 200, ...}).
    said = next(line for line in first.stdout.splitlines() if line.startswith("demo data loaded"))
    assert said == "demo data loaded: 200 members, 101 merchants, 200 top-ups, 5 grant programs", said
    assert "card-app key: eum_" in first.stdout and "admin key:    eum_" in first.stdout, first.stdout
    assert _key_count(url) == 2
    again = _run(monkeypatch, {"EUM_DATABASE_URL": url}, "serve", "--demo", "--port", PORT)
    assert again.exit_code == 0, again.output
    assert "database already has data; demo data not loaded" in again.stdout, again.stdout
    assert "no keys were made" in again.stdout and "eum keys create --name NAME --role card-app" in again.stdout
    assert "eum_" not in again.output, again.output
    assert _key_count(url) == 2


def _rows(url: str) -> dict[str, int]:
    """Every table's row count: what a refused command must leave as it was."""
    from sqlalchemy import inspect, text

    from ledger.db import make_engine

    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            return {name: conn.execute(text(f'SELECT count(*) FROM "{name}"')).scalar_one()
                    for name in inspect(conn).get_table_names()}
    finally:
        engine.dispose()


def _error_line(result) -> str:
    """The one `error:` line on stderr (beside the JSON log lines)."""
    lines = [line for line in result.stderr.splitlines() if not line.startswith("{")]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def test_demo_on_a_book_that_has_data_is_refused_and_writes_nothing(monkeypatch, tmp_path):
    """`eum demo` on a book that already had data printed "demo data not loaded" on
    stdout and exited 0: a script that loads the demo read that as done. It is a
    refusal now: one `error:` line saying what the book holds and how to get an empty
    one, exit 2, nothing written (not even the policy files recorded)."""
    url = f"sqlite:///{tmp_path / 'eum.db'}"
    env = {"EUM_DATABASE_URL": url, "EUM_LOG_LEVEL": "WARNING"}
    first = _run(monkeypatch, env, "demo")
    assert first.exit_code == 0 and "demo data loaded" in first.stdout, first.output
    before = _rows(url)
    again = _run(monkeypatch, env, "demo")
    assert again.exit_code == 2, again.output
    line = _error_line(again)
    assert "already holds 200 members" in line and "demo data goes into an empty database only" in line, line
    assert "nothing loaded" in line and "EUM_DATABASE_URL" in line, line
    assert "demo data loaded" not in again.stdout, again.stdout
    assert _rows(url) == before
    # counted up to a bound only: `serve --demo` asks at every start, and a real book's
    # ledger holds millions of rows
    from eum import demo as demo_data
    from ledger.db import make_engine

    monkeypatch.setattr(demo_data, "HELD_COUNTED", 150)
    engine = make_engine(url)
    held = demo_data.held_data(engine)
    engine.dispose()
    assert held.startswith("150+ members, ") and "1 merchant," not in held, held


def test_demo_is_refused_on_a_book_with_merchants_but_no_members(monkeypatch, tmp_path):
    """A book is judged by all it holds, not by its members alone: a real book whose
    merchants were registered before any member joined had the demo's 200 members, 101
    merchants and their top-ups loaded into it."""
    import datetime as dt

    from ledger import registry
    from ledger.db import make_engine, migrate

    url = f"sqlite:///{tmp_path / 'eum.db'}"
    migrate(url)
    engine = make_engine(url)
    with engine.begin() as conn:
        registry.put_merchant(conn, merchant_id="shop-real-1", name="a real shop", district="seo", category="cafe",
                              annual_sales_won=100_000_000, registered_from=dt.date(2024, 1, 1), flags=[],
                              merchant_share_bp=0, actor="ops")
    engine.dispose()
    before = _rows(url)
    refused = _run(monkeypatch, {"EUM_DATABASE_URL": url, "EUM_LOG_LEVEL": "WARNING"}, "demo")
    assert refused.exit_code == 2, refused.output
    assert "already holds 1 merchant" in _error_line(refused)
    assert _rows(url) == before


def test_demo_loads_into_a_book_that_holds_only_keys_and_the_policy_files(monkeypatch, tmp_path):
    """What a first `eum serve` or `eum keys create` leaves (the policy files recorded,
    a key) is not data the demo could mix with: it loads."""
    from api.services import book_timeline
    from ledger.db import make_engine

    url = f"sqlite:///{tmp_path / 'eum.db'}"
    env = {"EUM_DATABASE_URL": url, "EUM_LOG_LEVEL": "WARNING"}
    assert _run(monkeypatch, env, "keys", "create", "--name", "ops", "--role", "admin").exit_code == 0
    engine = make_engine(url)
    try:
        book_timeline(get_settings(), engine)  # the policy files recorded, as a start records them
    finally:
        engine.dispose()
    loaded = _run(monkeypatch, env, "demo")
    assert loaded.exit_code == 0 and "demo data loaded" in loaded.stdout, loaded.output


@pytest.mark.parametrize("args", [("db", "check"), ("keys", "list"), ("keys", "revoke", "k1"), ("audit-verify",),
                                  ("settle", "--date", "2025-01-02"), ("report", "--date", "2025-01-02"),
                                  ("grants", "expire", "prog-1")])
def test_a_command_on_a_sqlite_book_that_is_not_there_makes_no_file(monkeypatch, tmp_path, args):
    """A command that reads or writes a book made it when EUM_DATABASE_URL named a SQLite
    file not there (a typo, or a fresh clone's first command): its migration check's
    connection left an empty file and its folders, then refused the book as "not
    migrated" and told to run `eum db upgrade`, which would have made a new book at the
    typo. Now one `error:` line naming the path, exit 2, nothing made."""
    monkeypatch.chdir(tmp_path)
    missing = tmp_path / "typo" / "var" / "eum.db"
    out = _run(monkeypatch, {"EUM_DATABASE_URL": f"sqlite:///{missing}", "EUM_LOG_LEVEL": "WARNING"}, *args)
    assert out.exit_code == 2, (out.output, out.exception)
    line = _error_line(out)
    assert line.startswith(f"error: EUM_DATABASE_URL: no SQLite database at {missing}; nothing was made"), line
    assert sorted(p.name for p in tmp_path.iterdir()) == [], list(tmp_path.iterdir())


@pytest.mark.parametrize("args", [("db", "check"), ("settle", "--date", "2025-01-02")])
def test_a_sqlite_uri_naming_no_book_is_refused_by_its_path(monkeypatch, tmp_path, args):
    """`sqlite:///file:PATH?uri=true` was left to SQLite, which made the file and its
    missing folder under one named `file:` (`ledger.db.sqlite_file`)."""
    monkeypatch.chdir(tmp_path)
    missing = tmp_path / "typo" / "eum.db"
    out = _run(monkeypatch, {"EUM_DATABASE_URL": f"sqlite:///file:{missing}?uri=true", "EUM_LOG_LEVEL": "WARNING"},
               *args)
    assert out.exit_code == 2, (out.output, out.exception)
    line = _error_line(out)
    assert line.startswith(f"error: EUM_DATABASE_URL: no SQLite database at {missing}; nothing was made"), line
    assert sorted(p.name for p in tmp_path.iterdir()) == [], list(tmp_path.iterdir())


@pytest.mark.parametrize("args", [("db", "check"), ("settle", "--date", "2025-01-02")])
def test_a_command_on_a_sqlite_book_path_that_is_a_folder_says_so(monkeypatch, tmp_path, args):
    """A folder where EUM_DATABASE_URL names the book was refused as "no SQLite database
    there ... `eum db upgrade` makes it", and `db upgrade` then stopped with "unable to
    open database file", exit 3 (README walk-through). It is named as a folder: exit 2,
    nothing made, no advice to make a book where one cannot be."""
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "eum.db"
    folder.mkdir()
    out = _run(monkeypatch, {"EUM_DATABASE_URL": f"sqlite:///{folder}", "EUM_LOG_LEVEL": "WARNING"}, *args)
    assert out.exit_code == 2, (out.output, out.exception)
    line = _error_line(out)
    assert line == f"error: EUM_DATABASE_URL: {folder} is a folder, not a SQLite database; nothing was done", line
    assert list(tmp_path.iterdir()) == [folder] and list(folder.iterdir()) == []


@pytest.mark.parametrize("args,broken,says", [
    (("db", "upgrade"), "no policy files", "error: EUM_POLICIES_DIR: no policy files (*.yaml) in "),
    (("demo",), "policy", "error: EUM_POLICIES_DIR: "),
    (("demo",), "grant program", "error: EUM_POLICIES_DIR: "),
    (("serve", "--demo", "--port", PORT), "grant program", "error: EUM_POLICIES_DIR: "),
])
def test_a_command_refused_for_its_files_makes_no_book(monkeypatch, tmp_path, args, broken, says):
    """`db upgrade` refused for its policy folder had first made the SQLite book's folder
    and empty file (its database check ran first); `demo` had made and migrated a new
    book, then stopped on a grant file that does not parse with a traceback, exit 1 (and
    on a policy file with exit 2, the book migrated). The files are read first now: one
    `error:` line, exit 2, no book made. (`serve --demo` too: it had migrated the book,
    then stopped on the grant file with a traceback.)"""
    import shutil

    monkeypatch.setattr("eum.cli._serve_on", lambda *a, **k: pytest.fail("a worker was started"))

    policies = tmp_path / "policies"
    if broken != "no policy files":
        shutil.copytree(Path(__file__).parent.parent / "policies", policies)
        bad = sorted((policies / "grants" if broken == "grant program" else policies).glob("*.yaml"))[0]
        bad.write_text(bad.read_text(encoding="utf-8") + "garbage: [\n", encoding="utf-8")
    book = tmp_path / "fresh" / "eum.db"
    out = _run(monkeypatch, {"EUM_DATABASE_URL": f"sqlite:///{book}", "EUM_POLICIES_DIR": str(policies),
                             "EUM_LOG_LEVEL": "WARNING"}, *args)
    assert out.exit_code == 2, (out.output, out.exception)
    assert not isinstance(out.exception, Exception) or isinstance(out.exception, SystemExit), out.exception
    assert out.stderr.startswith(says) and "Traceback" not in out.output, out.stderr
    assert not (tmp_path / "fresh").exists()


@pytest.mark.parametrize("args", [("serve", "--demo"), ("serve",)])
def test_serve_on_a_port_it_cannot_listen_on_stops_before_anything(monkeypatch, tmp_path, args):
    """`eum serve --demo` on a port already taken loaded the demo data, made and printed
    two keys, and only then failed to bind. The port is tried first now: one `error:`
    line, exit 2, nothing migrated, loaded or made, and no file left behind."""
    monkeypatch.setattr("eum.cli._serve_on", lambda *a, **k: pytest.fail("a worker was started"))
    monkeypatch.delenv("EUM_REDIS_URL", raising=False)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        out = _run(monkeypatch, {"EUM_DATABASE_URL": f"sqlite:///{tmp_path / 'var' / 'eum.db'}"}, *args,
                   "--port", str(port))
    assert out.exit_code == 2 and "Traceback" not in out.output, out.output
    assert out.stderr.startswith(f"error: cannot listen on 127.0.0.1:{port} ("), out.stderr
    assert "nothing was started" in out.stderr and "eum_" not in out.output
    # Not even an empty book file, or its folder: the port is tried before the database
    # is touched (the start's database check had made both, then the port stopped it).
    assert not (tmp_path / "var").exists()


def test_keys_list_says_expired_and_a_key_cannot_be_made_already_dead(monkeypatch, tmp_path):
    from ledger.db import make_engine, migrate
    from ledger.keys import create_key

    url = f"sqlite:///{tmp_path / 'eum.db'}"
    migrate(url)
    engine = make_engine(url)
    create_key(engine, name="old", role="finance", pepper="x", expires_at_us=1)
    create_key(engine, name="new", role="auditor", pepper="x")
    listed = _run(monkeypatch, {"EUM_DATABASE_URL": url}, "keys", "list")
    assert listed.exit_code == 0, listed.output
    states = {line.split()[-1]: line.split()[2] for line in listed.output.splitlines() if line.strip()}
    assert states == {"old": "expired", "new": "active"}
    # Past ten years (3,650 days) the option is refused by Typer, exit 2: 999999999999 days
    # was a DataError traceback (bigint out of range), exit 1.
    for days in ("0", "-1", "3651", "999999999999"):
        made = _run(monkeypatch, {"EUM_DATABASE_URL": url}, "keys", "create", "--name", "x", "--role", "auditor",
                    "--expires-days", days)
        assert made.exit_code == 2 and "eum_" not in made.output, made.output
        assert made.exception is None or isinstance(made.exception, SystemExit), made.exception
    made = _run(monkeypatch, {"EUM_DATABASE_URL": url}, "keys", "create", "--name", "y", "--role", "auditor",
                "--expires-days", "3650")
    assert made.exit_code == 0 and "eum_" in made.output, made.output


def test_keys_list_says_when_each_key_expires(monkeypatch, tmp_path):
    """Keys carry an expiry (issue 6), yet `eum keys list` said only active or expired: an
    operator could not see which keys stop working next week, nor tell a key made with
    --expires-days from one that never expires, until it failed. Each line now says when
    (Seoul time, as every time the CLI prints) or that it never does."""
    from ledger.db import make_engine, migrate
    from ledger.keys import create_key
    from rules.timeutil import rfc3339

    url = f"sqlite:///{tmp_path / 'eum.db'}"
    migrate(url)
    engine = make_engine(url)
    soon = 1_900_000_000_000_000  # 2030-03-17
    create_key(engine, name="soon", role="finance", pepper="x", expires_at_us=soon)
    create_key(engine, name="gone", role="finance", pepper="x", expires_at_us=1_000_000)
    create_key(engine, name="kept", role="auditor", pepper="x")
    engine.dispose()
    listed = _run(monkeypatch, {"EUM_DATABASE_URL": url}, "keys", "list")
    assert listed.exit_code == 0, listed.output
    lines = {line.split()[-1]: line for line in listed.output.splitlines() if line.strip()}
    assert f"expires {rfc3339(soon)}" in lines["soon"] and lines["soon"].split()[2] == "active", lines
    assert f"expired {rfc3339(1_000_000)}" in lines["gone"] and lines["gone"].split()[2] == "expired", lines
    assert "never expires" in lines["kept"] and lines["kept"].split()[2] == "active", lines


def test_keys_revoke_tells_done_already_from_no_such_key_and_never_prints_a_key(monkeypatch, tmp_path):
    """An operator revoking a leaked key: a second revoke, a mistyped id and a pasted key
    all said "no active key X", exit 1, and the pasted key was printed back whole (the
    keys audit). Now: already revoked (exit 0, when); no such key (exit 1, nothing
    revoked: the key still works); a pasted key revokes its key, never printed."""
    from ledger.db import make_engine, migrate
    from ledger.keys import create_key

    url = f"sqlite:///{tmp_path / 'eum.db'}"
    migrate(url)
    engine = make_engine(url)
    key_id, _ = create_key(engine, name="a", role="card-app", pepper="x")
    other_id, other_token = create_key(engine, name="b", role="card-app", pepper="x")
    env = {"EUM_DATABASE_URL": url}
    done = _run(monkeypatch, env, "keys", "revoke", key_id)
    assert done.exit_code == 0 and f"revoked {key_id}" in done.output, done.output
    again = _run(monkeypatch, env, "keys", "revoke", key_id)
    assert again.exit_code == 0 and "already revoked, at " in again.output, again.output
    typo = key_id[:-1] + ("0" if key_id[-1] != "0" else "1")
    wrong = _run(monkeypatch, env, "keys", "revoke", typo)
    assert wrong.exit_code == 1 and f"no key {typo}" in wrong.output and "nothing revoked" in wrong.output
    pasted = _run(monkeypatch, env, "keys", "revoke", other_token)
    assert pasted.exit_code == 0 and other_id in pasted.output and other_token not in pasted.output, pasted.output
    listed = _run(monkeypatch, env, "keys", "list")
    assert {line.split()[0]: line.split()[2] for line in listed.output.splitlines() if line.strip()} == {
        key_id: "revoked", other_id: "revoked"}


def test_keys_create_refuses_an_invisible_name_and_keys_list_shows_an_old_one_escaped(monkeypatch, tmp_path):
    """`eum keys create --name $'ali\\u200bce'` made a key shown as "alice" that could
    approve Alice's change; it is refused now, one `error:` line, nothing created. A key
    issued so before is listed escaped, not as it would print."""
    from sqlalchemy import insert

    from ledger import schema as s
    from ledger.db import make_engine, migrate

    url = f"sqlite:///{tmp_path / 'eum.db'}"
    migrate(url)
    for name in ("ali\u200bce", "\u202eecila", "ali\u00adce", " "):
        made = _run(monkeypatch, {"EUM_DATABASE_URL": url}, "keys", "create", "--name", name, "--role", "auditor")
        assert made.exit_code == 2 and "eum_" not in made.output and "Traceback" not in made.output, made.output
        assert made.stderr.startswith("error: a key's name "), made.stderr
    engine = make_engine(url)
    with engine.begin() as conn:
        assert conn.execute(s.api_keys.select()).first() is None
        conn.execute(insert(s.api_keys).values(key_id="k-old", name="\u202eecila", role="policy-approver",
                                               key_hash="h", created_at_us=1))
    engine.dispose()
    listed = _run(monkeypatch, {"EUM_DATABASE_URL": url}, "keys", "list")
    assert listed.exit_code == 0 and "\u202e" not in listed.output, listed.output
    assert "'\\u202eecila'  (name holds characters now refused)" in listed.output, listed.output



def test_keys_create_refuses_an_unknown_role_with_one_error_line(monkeypatch, tmp_path):
    """README: exit 2 is one `error: ...` line. An unknown role printed `role must be one
    of: ...` without the prefix that every other refusal carries."""
    url = f"sqlite:///{tmp_path / 'eum.db'}"
    made = _run(monkeypatch, {"EUM_DATABASE_URL": url}, "keys", "create", "--name", "x", "--role", "nope")
    assert made.exit_code == 2 and "eum_" not in made.output, made.output
    assert made.stderr.startswith("error: role must be one of: card-app, ") and "'nope'" in made.stderr, made.stderr
    assert len(made.stderr.splitlines()) == 1, made.stderr
    assert not (tmp_path / "eum.db").exists()  # nothing migrated, nothing created


def test_keys_create_refuses_a_word_mixing_lookalike_scripts_and_allows_hangul(monkeypatch, tmp_path):
    """`eum keys create --name $'\\u041c\\u0430llory'` (Cyrillic М and а, Latin llory)
    made a key that reads "Mallory" and approved Mallory's draft. Refused now, one
    `error:` line naming the Cyrillic letters, nothing created; Korean names, and Hangul
    and Latin words side by side, are issued as before."""
    from ledger import schema as s
    from ledger.db import make_engine, migrate

    url = f"sqlite:///{tmp_path / 'eum.db'}"
    migrate(url)
    made = _run(monkeypatch, {"EUM_DATABASE_URL": url}, "keys", "create", "--name", "\u041c\u0430llory",
                "--role", "policy-approver")
    assert made.exit_code == 2 and "eum_" not in made.output and "Traceback" not in made.output, made.output
    assert made.stderr.startswith("error: a key's name may not mix Latin, Greek and Cyrillic letters in one word"), \
        made.stderr
    assert "U+041C CYRILLIC CAPITAL LETTER EM, U+0430 CYRILLIC SMALL LETTER A" in made.stderr
    assert made.stderr.rstrip().endswith("nothing was created") and len(made.stderr.splitlines()) == 1, made.stderr
    engine = make_engine(url)
    with engine.begin() as conn:
        assert conn.execute(s.api_keys.select()).first() is None
    engine.dispose()
    for name in ("김민준", "Kim 민준"):
        made = _run(monkeypatch, {"EUM_DATABASE_URL": url}, "keys", "create", "--name", name, "--role", "auditor")
        assert made.exit_code == 0 and made.stdout.startswith("eum_"), made.output


def test_a_dotenv_file_is_read_for_settlement_and_its_typos_are_named(monkeypatch, tmp_path):
    """README: "a .env file works too". The settlement settings ignored it (fee tiers and
    the payout lag put there were the defaults), and a typo there got no warning."""
    from settlement.config import SettlementConfig

    monkeypatch.chdir(tmp_path)
    (tmp_path / ".env").write_text("EUM_SETTLEMENT_PAYOUT_LAG_BUSINESS_DAYS=5\nEUM_BATCH_WRITER=x\n"
                                   "EUM_SETTLEMENT_PAYOUT_LAG=3\n")
    assert SettlementConfig().payout_lag_business_days == 5
    monkeypatch.setattr("eum.cli._serve_on", lambda *a, **k: None)
    out = _run(monkeypatch, {"EUM_DATABASE_URL": f"sqlite:///{tmp_path / 'eum.db'}",
                             "EUM_POLICIES_DIR": str(Path(__file__).resolve().parents[1] / "policies")},
               "serve", "--port", PORT)
    assert "unknown settings ignored: EUM_BATCH_WRITER, EUM_SETTLEMENT_PAYOUT_LAG" in out.output, out.output


@pytest.mark.parametrize("content, says", [
    (b"# the writers\nEUM_BATCH_WRITERS 2\nEUM_LOG_LEVEL=INFO\n", "error: .env: not NAME=VALUE at line 2 "),
    ("# 쓰기 스레드\nEUM_BATCH_WRITERS=2\n".encode("cp949"), "error: .env: not UTF-8 (byte 3"),
])
def test_a_dotenv_file_that_does_not_read_whole_is_one_line_and_nothing_starts(monkeypatch, tmp_path, content, says):
    """A `.env` line python-dotenv cannot parse was skipped (the setting its default)
    under "could not parse statement" lines naming neither file nor setting, and a file
    in CP949 was a UnicodeDecodeError traceback (operations audit)."""
    monkeypatch.setattr("eum.cli._serve_on", lambda *a, **k: pytest.fail("a worker was started"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".env").write_bytes(content)
    out = _run(monkeypatch, {"EUM_DATABASE_URL": f"sqlite:///{tmp_path / 'eum.db'}"}, "serve", "--port", PORT)
    assert out.exit_code == 2 and out.stderr.startswith(says) and len(out.stderr.splitlines()) == 1, out.output
    assert not (tmp_path / "eum.db").exists()
    listed = _run(monkeypatch, {"EUM_DATABASE_URL": f"sqlite:///{tmp_path / 'eum.db'}"}, "keys", "list")
    assert listed.exit_code == 2 and listed.stderr.startswith(says), listed.output  # every command reads it


def test_a_database_at_another_release_is_one_line_and_exit_2(tmp_path):
    """The `eum` command itself (its entry point, eum.cli:main; the typer app alone left
    these as 200-line tracebacks, exit 1): a database a newer release migrated, and a
    database not yet migrated to this release under a command that does not migrate."""
    import os
    import subprocess
    import sys

    from sqlalchemy import text

    from ledger.db import make_engine, migrate

    old, new = f"sqlite:///{tmp_path / 'old.db'}", f"sqlite:///{tmp_path / 'new.db'}"
    migrate(old, "0010")
    migrate(new)
    engine = make_engine(new)
    with engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = '0099'"))
    engine.dispose()

    def eum(url: str, *args: str):
        env = {**os.environ, "EUM_DATABASE_URL": url, "EUM_LOG_LEVEL": "WARNING"}
        return subprocess.run([sys.executable, "-m", "eum", *args], env=env, capture_output=True, text=True,
                              timeout=120)

    newer = eum(new, "db", "upgrade")
    assert newer.returncode == 2 and "a migration this release does not have" in newer.stderr, newer.stderr
    # Every command says so, not "run eum db upgrade", which would refuse (the review).
    for args in (("keys", "list"), ("db", "check"), ("settle", "--date", "2025-01-02")):
        refused = eum(new, *args)
        assert refused.returncode == 2 and "a migration this release does not have (0099)" in refused.stderr \
            and "eum db upgrade" not in refused.stderr, (args, refused.stderr)
    behind = eum(old, "audit-verify")
    assert behind.returncode == 2 and "not migrated to this release (at 0010" in behind.stderr, behind.stderr
    assert "Traceback" not in newer.stderr + behind.stderr


def test_a_database_a_newer_release_migrated_is_refused_before_alembic_runs(db_url, monkeypatch):
    """`eum db upgrade` and `eum serve` (which migrates) on a database at a migration this
    release does not have: alembic's "Can't locate revision" came out of the Typer app as
    a Rich traceback, exit 1 (only `eum.cli:main` turned it into a line, another than `db
    check`'s; the upgrade audit). `ledger.db.migrate` compares the stored revision with
    its scripts first and refuses as `db check` does: one `error:` line, exit 2, the
    database as it was."""
    from alembic.runtime.migration import MigrationContext
    from sqlalchemy import text

    from ledger.db import NewerMigration, make_engine, migrate

    def stored() -> str:
        engine = make_engine(db_url)
        try:
            with engine.connect() as conn:
                return MigrationContext.configure(conn).get_current_revision()
        finally:
            engine.dispose()

    engine = make_engine(db_url)
    try:
        with engine.begin() as conn:
            conn.execute(text("UPDATE alembic_version SET version_num = '0099'"))
    finally:
        engine.dispose()
    with pytest.raises(NewerMigration) as refused:
        migrate(db_url)
    assert refused.value.revision == "0099"
    monkeypatch.setattr("eum.cli._serve_on", lambda *a, **k: pytest.fail("a worker was started"))
    said = _run(monkeypatch, {"EUM_DATABASE_URL": db_url}, "db", "check")
    assert said.exit_code == 2, said.output
    for args in (("db", "upgrade"), ("serve", "--port", PORT)):
        out = _run(monkeypatch, {"EUM_DATABASE_URL": db_url}, *args)
        assert out.exit_code == 2 and "Traceback" not in out.output, (args, out.output)
        assert out.stderr == said.stderr, (args, out.stderr, said.stderr)  # db check's line
        assert out.stderr.startswith("error: the database is at a migration this release does not have (0099): a "
                                     "newer release upgraded it") and len(out.stderr.splitlines()) == 1, out.stderr
        assert stored() == "0099"


@pytest.mark.parametrize("args", [("db", "check"), ("audit-verify",), ("keys", "list"), ("keys", "revoke", "k1"),
                                  ("keys", "create", "--name", "x", "--role", "auditor"), ("demo",),
                                  ("settle", "--date", "2025-01-02"), ("report", "--date", "2025-01-02"),
                                  ("db", "upgrade")])
def test_a_database_that_cannot_be_reached_is_one_line_and_exit_3(tmp_path, args):
    """The `eum` command itself (eum.cli:main): these printed a traceback and exited 1,
    which is also `db check`'s BAD and `audit-verify`'s BROKEN, so a cron check raised a
    false integrity alarm. Now one `error:` line and exit 3, as `grants expire` and `db
    upgrade` stopped (README, the `eum` command)."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "EUM_DATABASE_URL": "postgresql://postgres@127.0.0.1:9/x", "EUM_LOG_LEVEL": "WARNING"}
    done = subprocess.run([sys.executable, "-m", "eum", *args], env=env, capture_output=True, text=True, timeout=120,
                          cwd=tmp_path)
    assert done.returncode == 3 and "Traceback" not in done.stderr, (done.returncode, done.stderr[-2000:])
    lines = done.stderr.strip().splitlines()
    # demo and settle say what stays of their work ("stopped by the database (...); ..."), the others only that
    assert len(lines) == 1 and ("cannot use the database (" in lines[0] or "stopped by the database (" in lines[0]) \
        and "Connection refused" in lines[0], lines


def test_a_database_behind_this_release_is_refused_before_any_command_touches_it(tmp_path, monkeypatch):
    """README: a database not migrated to this release is exit 2 with one `error:` line
    saying `eum db upgrade`, "the same for every command". That was found only after a
    database error: on a database two migrations behind, `eum settle` settled (exit 0),
    writing to a book of the wrong shape, and on an empty file `settle`, `grants
    disburse` and `payments replay` said exit 3 (the docs audit). Each command that
    reads or writes the book now checks the migration head first; the database is left
    as it was. `keys create` and `demo` migrate a new database, and had upgraded this one
    under the old release's processes (the new-user audit): refused too.)"""
    import os
    import subprocess
    import sys

    from ledger.db import migrate

    behind = f"sqlite:///{tmp_path / 'behind.db'}"
    migrate(behind, "0015")
    empty = tmp_path / "empty.db"
    empty.touch()
    replay = tmp_path / "payments.jsonl"
    replay.write_text('{"payment_id": "p-1", "member_id": "m1", "merchant_id": "s1", "amount": 1000, '
                      '"occurred_at": "2025-09-15T12:00:00+09:00"}\n')
    recipients = tmp_path / "recipients.csv"
    recipients.write_text("member_id,amount\nm1,1000\n")
    clearing = tmp_path / "clearing.csv"
    clearing.write_text("approval_id,merchant_id,amount_won,transacted_at\np-1,s1,1000,2025-09-15T12:00:00+09:00\n")
    commands = [("settle", "--date", "2025-01-02"), ("payments", "replay", str(replay)),
                ("grants", "disburse", "prog-1", str(recipients)), ("grants", "expire", "prog-1"),
                ("reconcile", str(clearing)), ("report", "--date", "2025-01-02", "--out", str(tmp_path / "r.html")),
                ("keys", "list"), ("keys", "revoke", "k1"), ("db", "check"), ("audit-verify",),
                ("keys", "create", "--name", "ops", "--role", "admin"), ("demo",)]

    tables = _rows

    # Every command on the database two migrations behind; on the empty file, those that
    # said exit 3. The first of each as a process of its own, the rest in this one (a
    # process start is ~1 s: the suite is CI-bound).
    said_3 = [commands[0], commands[1], commands[2]]
    for url, revision, run in ((behind, "at 0015", commands), (f"sqlite:///{empty}", "at none", said_3)):
        before = tables(url)
        monkeypatch.setenv("EUM_DATABASE_URL", url)
        monkeypatch.setenv("EUM_LOG_LEVEL", "WARNING")
        monkeypatch.chdir(tmp_path)
        for n, args in enumerate(run):
            if n == 0:
                done = subprocess.run([sys.executable, "-m", "eum", *args], env=dict(os.environ),
                                      capture_output=True, text=True, timeout=120)
                code, stderr = done.returncode, done.stderr
            else:
                done = _run(monkeypatch, {}, *args)
                code, stderr = done.exit_code, done.stderr
                assert not isinstance(done.exception, Exception) or isinstance(done.exception, SystemExit), \
                    (args, done.exception)
            assert code == 2 and "Traceback" not in stderr, (args, code, stderr[-1500:])
            assert f"not migrated to this release ({revision}" in stderr and "eum db upgrade" in stderr, (args, stderr)
        assert tables(url) == before, url


@pytest.mark.postgres
@pytest.mark.parametrize("args", [("db", "check"), ("audit-verify",)])
def test_a_whole_book_check_runs_under_the_jobs_statement_timeout(monkeypatch, pg_url, args):
    """`eum db check` and `audit-verify` read every leg (every entry) under a request's
    5 s statement timeout: a book of 1.4 million legs was cancelled mid-check (grant
    files audit). They get the settlement jobs' timeout; here a request's bound is made
    100 ms and a statement of 300 ms (pg_sleep in the check) finishes."""
    from sqlalchemy import text

    import ledger.db
    from ledger import audit, queries

    slow = "SELECT pg_sleep(0.3)"
    monkeypatch.setenv("EUM_SETTLEMENT_STATEMENT_TIMEOUT_MS", "60000")
    made = ledger.db.make_engine
    monkeypatch.setattr(ledger.db, "make_engine",
                        lambda url, **kw: made(url, **{**kw, "statement_timeout_ms": kw.get("statement_timeout_ms", 100)}))

    for module, name in ((queries, "check_book"), (audit, "verify")):
        original = getattr(module, name)

        def sleeping(conn, *a, _original=original, **kw):
            conn.execute(text(slow))
            return _original(conn, *a, **kw)

        monkeypatch.setattr(module, name, sleeping)
    out = _run(monkeypatch, {"EUM_DATABASE_URL": pg_url}, *args)
    assert out.exit_code == 0, (out.output, out.exception)


@pytest.mark.postgres
def test_a_database_that_takes_no_writes_stops_serve_with_exit_3(monkeypatch, tmp_path, pg_url):
    """A book the service may not write (a PostgreSQL standby, a database set read-only;
    a SQLite file the service's user may not write) started a service that said ready and
    answered every payment 503 "retry", its reason only in the log (operator audit)."""
    import sqlalchemy as sa

    from ledger.db import make_engine, migrate

    monkeypatch.setattr("eum.cli._serve_on", lambda *a, **k: pytest.fail("a worker was started"))
    book = tmp_path / "eum.db"
    migrate(f"sqlite:///{book}")
    engine = make_engine(pg_url)
    try:
        with engine.connect() as conn:
            name = conn.exec_driver_sql("SELECT current_database()").scalar_one()
            conn.exec_driver_sql(f'ALTER DATABASE "{name}" SET default_transaction_read_only = on')
            conn.commit()
    finally:
        engine.dispose()
    for url in (pg_url, f"sqlite:///file:{book}?mode=ro&uri=true"):
        out = _run(monkeypatch, {"EUM_DATABASE_URL": url}, "serve", "--port", PORT)
        assert out.exit_code == 3 and "Traceback" not in out.output, (url, out.output)
        assert out.stderr.startswith("error: EUM_DATABASE_URL: cannot use the database ("), out.stderr
        assert "read-only" in out.stderr or "readonly" in out.stderr, out.stderr
    started = []
    monkeypatch.setattr("eum.cli._serve_on", lambda *a, **k: started.append(k))
    out = _run(monkeypatch, {"EUM_DATABASE_URL": f"sqlite:///{book}"}, "serve", "--port", PORT)
    assert out.exit_code == 0 and started, out.output  # the same book, writable: served
    import sqlite3

    holder = sqlite3.connect(book, timeout=0, isolation_level=None)  # another process's write (a settlement run)
    holder.execute("BEGIN IMMEDIATE")
    try:
        started.clear()
        out = _run(monkeypatch, {"EUM_DATABASE_URL": f"sqlite:///{book}"}, "serve", "--port", PORT)
        assert out.exit_code == 0 and started, out.output  # busy is writable: served, not refused, not waited for
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    engine = sa.create_engine(f"sqlite:///{book}")
    try:
        with engine.connect() as conn:  # the probe left nothing behind
            assert not conn.exec_driver_sql("SELECT name FROM sqlite_master WHERE name = 'eum_write_probe'").all()
    finally:
        engine.dispose()


def test_a_malformed_sqlite_book_is_one_line_and_exit_3_for_db_check(tmp_path):
    """A torn copy of the SQLite file (copied while the service wrote) made `eum db check`
    a DatabaseError traceback, exit 1: the exit a cron job reads as a BAD check of a book
    that could be read. The database cannot be used: one line, exit 3 (operator audit)."""
    import sqlite3

    from ledger.db import migrate

    book = tmp_path / "eum.db"
    migrate(f"sqlite:///{book}")
    conn = sqlite3.connect(book)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    page = conn.execute("PRAGMA page_size").fetchone()[0]
    root = conn.execute("SELECT rootpage FROM sqlite_master WHERE name = 'accounts'").fetchone()[0]
    conn.close()
    data = bytearray(book.read_bytes())
    data[(root - 1) * page:root * page] = b"\xff" * page
    book.write_bytes(bytes(data))
    import os
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "eum", "db", "check"], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "EUM_DATABASE_URL": f"sqlite:///{book}", "EUM_LOG_LEVEL": "WARNING"})
    assert out.returncode == 3 and "Traceback" not in out.stderr, out.stderr
    assert out.stderr.strip() == "error: cannot use the database (database disk image is malformed); the command " \
                                 "stopped there", out.stderr


@pytest.mark.postgres
def test_a_database_not_in_utf8_is_refused_by_db_upgrade_and_serve(monkeypatch):
    """A PostgreSQL database created in EUC_KR (what a cluster initdb'd under ko_KR.eucKR
    makes) or SQL_ASCII: `eum db upgrade` said "database at head", and `eum serve` then
    died on the first policy text EUC-KR lacks (a traceback), or, its files fitting,
    answered 500 for a merchant named with such a character; SQL_ASCII hands the driver
    bytes (a cryptic "cannot use a string pattern" line). So is a client encoding other
    than UTF8 (PGCLIENTENCODING). One `error:` line naming the encoding and the remedy,
    exit 2, nothing migrated (Korean text audit, repro_2)."""
    import uuid

    import psycopg

    from tests.conftest import DB_PREFIX, PG_ADMIN_URL, _pg_url, drop_pg_database

    monkeypatch.setattr("eum.cli._serve_on", lambda *a, **k: pytest.fail("a worker was started"))
    for encoding in ("EUC_KR", "SQL_ASCII"):
        name = f"{DB_PREFIX}{uuid.uuid4().hex[:16]}"
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE \"{name}\" ENCODING '{encoding}' LC_COLLATE 'C' LC_CTYPE 'C' "
                         "TEMPLATE template0")
        try:
            # keys create and demo migrate a new database themselves (the review: they
            # migrated it, then demo died with a traceback and keys create stored a name
            # other than the one given)
            for args in (("db", "upgrade"), ("serve", "--port", PORT),
                         ("keys", "create", "--name", "똠순", "--role", "auditor"), ("demo",)):
                out = _run(monkeypatch, {"EUM_DATABASE_URL": _pg_url(name)}, *args)
                assert out.exit_code == 2 and "Traceback" not in out.output, (encoding, args, out.output)
                lines = out.stderr.strip().splitlines()
                assert len(lines) == 1 and lines[0].startswith("error: EUM_DATABASE_URL: "), out.stderr
                assert f"encoding is {encoding}, not UTF8" in lines[0], lines[0]
                assert "ENCODING 'UTF8' TEMPLATE template0" in lines[0], lines[0]
            with psycopg.connect(_pg_url(name)) as conn:  # nothing migrated
                assert conn.execute("SELECT to_regclass('alembic_version')").fetchone() == (None,)
        finally:
            drop_pg_database(name)
    name = f"{DB_PREFIX}{uuid.uuid4().hex[:16]}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE \"{name}\" ENCODING 'UTF8' TEMPLATE template0")
    try:
        out = _run(monkeypatch, {"EUM_DATABASE_URL": _pg_url(name), "PGCLIENTENCODING": "EUC_KR"}, "db", "upgrade")
        assert out.exit_code == 2 and "client encoding is EUC_KR, not UTF8" in out.stderr, out.output
        assert "PGCLIENTENCODING" in out.stderr, out.stderr
        monkeypatch.delenv("PGCLIENTENCODING")
        out = _run(monkeypatch, {"EUM_DATABASE_URL": _pg_url(name)}, "db", "upgrade")
        assert out.exit_code == 0 and "database at head" in out.stdout, out.output
    finally:
        drop_pg_database(name)


@pytest.mark.parametrize("module", ["eum", "eum.cli"])
def test_python_dash_m_runs_the_command(module):
    """`python -m eum.cli` imported the module and exited 0 having run nothing (the
    contract audit): a script that called it so took every command as done."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "Usage" in done.stdout and "serve" in done.stdout, (done.stdout, done.stderr)
