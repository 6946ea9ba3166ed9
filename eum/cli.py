"""`eum`: the one command-line entry (typer)."""

from __future__ import annotations

import io
import os
import re
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Annotated, NoReturn, Optional

import typer

from eum.logs import uvicorn_log_config
from eum.settings import get_settings

app = typer.Typer(help="e-eum cashback engine", no_args_is_help=True, add_completion=False, rich_markup_mode=None)
# EUM_ names read outside eum.settings.Settings (tools, tests, benchmarks, tuning knobs):
# prefixes, and whole names (the command line's EUM_API_KEY and EUM_API_URL: a prefix
# "EUM_API_" hid a typo of the setting EUM_API_FAST_PATH)
OTHER_ENV = ("EUM_SETTLEMENT_", "EUM_TEST_", "EUM_BENCH_", "EUM_LT_", "EUM_WRK_", "EUM_FAULT_",
             "EUM_SCHEMATHESIS_")
OTHER_NAMES = frozenset(("EUM_API_KEY", "EUM_API_URL", "EUM_GC_FREEZE", "EUM_GIL_SWITCH_INTERVAL_S",
                         "EUM_SKIP_SERVICES", "EUM_SUPERVISOR_PID"))
# Read by a worker from its environment as it starts: `eum serve` takes them from `.env`
# too (they had been ignored there, unwarned: the new-user audit).
WORKER_ENV = ("EUM_GC_FREEZE", "EUM_GIL_SWITCH_INTERVAL_S")


def _operator() -> str:
    from ledger.keys import operator

    return operator()


ON_BEHALF_OF_HELP = ("whom this run is for, kept in the audit entry's detail as `on_behalf_of`; the entry's actor is "
                     "always this OS account (`eum cli`). `--actor` is its old name")


def _on_behalf_of(name: str | None) -> str | None:
    """--on-behalf-of, checked as a key's name is (no control, invisible or bidi
    characters, no word mixing Latin, Greek and Cyrillic letters: it is shown in the
    audit log), or a refusal before anything is done."""
    from ledger.keys import name_problem
    from settlement.cli import _refuse

    if not name:
        return None
    if (problem := name_problem(name, "--on-behalf-of")) is not None:
        _refuse(f"{problem}; nothing done")
    return name


def _settings():
    """The settings, or one `error:` line per bad EUM_ setting and exit 2 (not a traceback).
    The command's log lines go to stderr at EUM_LOG_LEVEL, JSON or not by EUM_LOG_JSON:
    stdout holds its results (`serve`'s workers log to stdout, api.app.create_app)."""
    from eum.logs import configure_logging

    settings = _checked(get_settings, "EUM_")
    configure_logging(settings.log_level, settings.log_json, _Stderr())
    return settings


def _settlement_config():
    """The settlement settings (EUM_SETTLEMENT_*), checked as `_settings` checks the rest:
    `eum serve` and the finance commands stop on a bad one before anything is done (it
    had surfaced only when a day was settled: a 500, or a traceback from `eum settle`)."""
    from settlement.config import get_config

    return _checked(get_config, "EUM_SETTLEMENT_")


def _checked(build, prefix: str):
    """build(), or one `error:` line per bad setting (named with `prefix`) and exit 2."""
    import re

    from pydantic import ValidationError
    from pydantic_settings import SettingsError

    _check_dotenv()
    try:
        return build()
    except ValidationError as invalid:
        for error in invalid.errors(include_url=False):
            name = prefix + str(error["loc"][0]).upper() if error["loc"] else "settings"
            typer.echo(f"error: {name}: {error['msg']}", err=True)
        raise typer.Exit(2) from None
    except SettingsError as unreadable:  # a JSON setting (EUM_RATE_LIMITS) that does not parse, or is empty
        field = re.search(r'field "(\w+)"', str(unreadable))
        name = prefix + field.group(1).upper() if field else "settings"
        reason = unreadable.__cause__ or unreadable
        empty = getattr(reason, "doc", None) == ""  # compose's ${VAR:-}: unset it for the default
        typer.echo(f"error: {name}: {'empty' if empty else 'not valid JSON'} ({reason}); give JSON or unset it",
                   err=True)
        raise typer.Exit(2) from None


def _check_dotenv() -> None:
    """The `.env` the settings read (in the folder the command runs in) whole, else one
    `error:` line and exit 2 (operations audit): python-dotenv skips a line it cannot
    parse (`EUM_BATCH_SIZE_MAX 5`), so the setting was its default, under three
    "could not parse statement" lines that named neither file nor setting; and a file
    not in UTF-8 (CP949, a Korean comment) was a UnicodeDecodeError traceback."""
    from dotenv.parser import parse_stream

    path = Path(".env")
    if not path.is_file():
        return
    try:
        text = path.read_text()  # as python-dotenv opens it for the settings: the locale's encoding, UTF-8
    except UnicodeDecodeError as error:
        typer.echo(f"error: .env: not UTF-8 (byte {error.start + 1}: {error.reason}); save it as UTF-8", err=True)
        raise typer.Exit(2) from None
    except OSError as error:
        typer.echo(f"error: .env: cannot be read ({error.strerror})", err=True)
        raise typer.Exit(2) from None
    bad = [str(binding.original.line) for binding in parse_stream(io.StringIO(text)) if binding.error]
    if bad:
        typer.echo(f"error: .env: not NAME=VALUE at line {', '.join(bad)} (python-dotenv would skip it, and the "
                   "setting meant would take its default); fix it, or make it a comment (#)", err=True)
        raise typer.Exit(2)


class _Stderr:
    """Whatever sys.stderr is when a log line is written (a test runner swaps it)."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()

    def isatty(self) -> bool:
        return sys.stderr.isatty()


def _preflight(settings) -> None:
    """What `serve` checks before it touches the database or starts a worker, so a bad
    deploy stops at once with one line (a worker that fails its start stops the service,
    exit 3): the settlement settings, settings that contradict each other, policy files
    present and able to be in force together (`_check_policy_files_alone`), and EUM_
    names no setting knows (a typo runs silently); an empty EUM_METRICS_TOKEN leaves
    /metrics open, and is a warning. The database and Redis are `_check_services`', after
    the port."""
    from dotenv import dotenv_values

    from settlement.config import SettlementConfig

    known = {f"EUM_{name.upper()}" for name in type(settings).model_fields}
    known |= {f"EUM_SETTLEMENT_{name.upper()}" for name in SettlementConfig.model_fields}
    given = set(os.environ) | (set(dotenv_values(".env")) if Path(".env").is_file() else set())  # both are read
    unknown = sorted(k for k in given if k.startswith("EUM_") and k not in known and k not in OTHER_NAMES
                     and (k.startswith("EUM_SETTLEMENT_") or not k.startswith(OTHER_ENV)))
    if unknown:
        typer.echo(f"warning: unknown settings ignored: {', '.join(unknown)}", err=True)
    _settlement_config()
    if settings.idempotency_lookup == "redis" and not settings.redis_url:  # it had run as `local`, silently
        typer.echo("error: EUM_IDEMPOTENCY_LOOKUP: redis needs EUM_REDIS_URL; set it, or unset "
                   "EUM_IDEMPOTENCY_LOOKUP (local: each worker's answers, then the book)", err=True)
        raise typer.Exit(2)
    if settings.metrics_token is not None and not settings.metrics_token.get_secret_value().strip():
        typer.echo("warning: EUM_METRICS_TOKEN is empty: /metrics is open, as when it is unset; set a token for "
                   "Prometheus to send, or unset it", err=True)
    _check_policy_dir(settings)
    if Path(".env").is_file():  # read by the workers from their environment, not by the settings
        for name, value in dotenv_values(".env").items():
            if name in WORKER_ENV and value is not None:
                os.environ.setdefault(name, value)  # the environment's own value first, as for the settings
    _check_switch_interval()


def _check_services(settings) -> None:
    """The database reachable and taking writes (`_check_database`), and Redis answering
    (else a warning: the service runs without it). `serve` checks them once it holds its
    port (`_listen`): a first connection makes the SQLite book's folder and empty file,
    which a start refused for its port had left behind."""
    _check_database(settings)
    if settings.redis_url:
        import redis

        try:
            redis.Redis.from_url(settings.redis_url, socket_timeout=1, socket_connect_timeout=1).ping()
        except Exception as error:  # noqa: BLE001
            typer.echo(f"warning: EUM_REDIS_URL: Redis does not answer ({error}); serving without it until it "
                       "does (replays answered by the book)", err=True)


def _check_switch_interval() -> None:
    """EUM_GIL_SWITCH_INTERVAL_S, read by api/batcher.py when a worker imports it: seconds
    from 0 (Python's own interval) to 1, else one `error:` line and exit 2 (it was a
    ValueError traceback from the worker)."""
    text = os.environ.get("EUM_GIL_SWITCH_INTERVAL_S")
    if text is None:
        return
    try:
        seconds = float(text)
    except ValueError:
        seconds = float("nan")
    if not 0 <= seconds <= 1:  # nan too
        typer.echo(f"error: EUM_GIL_SWITCH_INTERVAL_S: {text!r} is not a number of seconds from 0 to 1 "
                   "(unset: 0.0005)", err=True)
        raise typer.Exit(2)


def _probe_sqlite_write(engine) -> None:
    """A write, rolled back: SQLite opens a file its user may not write read-only, and
    says so only at a write. A write lock another process holds (a settlement run) is no
    refusal: that book takes writes; the probe does not wait for it."""
    import sqlite3

    raw = engine.raw_connection()
    try:
        cursor = raw.cursor()
        cursor.execute("PRAGMA busy_timeout=0")
        try:
            cursor.execute("BEGIN IMMEDIATE")
            cursor.execute("CREATE TABLE eum_write_probe (x INTEGER)")
        except sqlite3.OperationalError as error:
            if "locked" not in str(error) and "busy" not in str(error):
                raise
        finally:
            if raw.driver_connection.in_transaction:
                cursor.execute("ROLLBACK")
    finally:
        raw.invalidate()  # not back to the pool with its busy timeout of 0


def _check_database(settings) -> None:
    """The database answers a query within the connect timeout and takes writes, else one
    `error:` line and exit 3, as any command the database stops (`main`). SQLite too: a
    path under a file, or a file that is not a database, was a traceback; a file the
    service may not write (or a PostgreSQL standby) started a service that was ready and
    answered every write 503 "retry". A PostgreSQL database (or client encoding) other
    than UTF8 is a bad setting, one line and exit 2 (`ledger.db.encoding_problem`): it
    was migrated, then failed the start with a traceback or answered 500s."""
    from sqlalchemy import text

    from ledger.db import encoding_problem, make_engine

    try:
        problem = encoding_problem(settings.database_url, settings.db_connect_timeout_s)
    except Exception as error:  # noqa: BLE001 - any driver error: the database is not usable
        typer.echo(f"error: EUM_DATABASE_URL: cannot use the database ({_first_line(error)})", err=True)
        raise typer.Exit(3) from None
    if problem is not None:
        typer.echo(f"error: EUM_DATABASE_URL: {problem}", err=True)
        raise typer.Exit(2)
    engine = None
    try:
        engine = make_engine(settings.database_url, pool_size=1, connect_timeout_s=settings.db_connect_timeout_s)
        sqlite = engine.dialect.name == "sqlite"
        with engine.connect() as conn:
            if sqlite:  # a deferred BEGIN: no wait on a lock another process's write holds
                conn.execution_options(readonly=True)
            conn.execute(text("SELECT 1"))
            if not sqlite and conn.exec_driver_sql("SHOW transaction_read_only").scalar_one() == "on":
                raise RuntimeError("it is read-only: a standby, or default_transaction_read_only is on")
        if sqlite:
            _probe_sqlite_write(engine)
    except Exception as error:  # noqa: BLE001 - any driver error: the database is not usable
        typer.echo(f"error: EUM_DATABASE_URL: cannot use the database ({_first_line(error)})", err=True)
        raise typer.Exit(3) from None
    finally:
        if engine is not None:
            engine.dispose()

keys_app = typer.Typer(help="API keys", no_args_is_help=True)
db_app = typer.Typer(help="The book of record's database", no_args_is_help=True)
app.add_typer(keys_app, name="keys")
app.add_typer(db_app, name="db")
policy_app = typer.Typer(help="Policy files: validate, diff, simulate, submit", no_args_is_help=True)
app.add_typer(policy_app, name="policy")
grants_app = typer.Typer(help="Relief-grant programs: validate, submit, approve, list, bulk disbursement, expiry",
                         no_args_is_help=True)
app.add_typer(grants_app, name="grants")
payments_app = typer.Typer(help="Payments in bulk: a backfill, or the card app's payments the book missed",
                           no_args_is_help=True)
app.add_typer(payments_app, name="payments")


@policy_app.command("validate")
def policy_validate(files: list[Path]) -> None:
    """Check policy files; print each problem with its line and reason, and each variant
    that never applies (listed after its component's catch-all) as a WARN line."""
    from rules.compiled import PolicyTimeline, compile_policy
    from rules.loader import PolicyInvalid, file_text, ids_in_two_files, parse_policy_text, path_line, text_problems

    bad = 0
    compiled = []
    documents = []
    for path in files:
        try:
            text = file_text(path)
            document = parse_policy_text(text, str(path))
            if refused := text_problems(document, text):  # as POST /v1/policies refuses it (it said ok)
                raise PolicyInvalid(str(path), refused)
            if document.effective_from is not None and all(p.policy_id != document.policy_id for _, p in documents):
                compiled.append(compile_policy(document))  # an id twice: said once, below
            documents.append((path, document))
            typer.echo(f"ok   {path}: {document.policy_id} ({document.layer})")
            for where, _, reason in document.unreachable_variants():  # as the draft's `warnings` say
                typer.echo(f"WARN {path}:{path_line(text, where) or '-'}: {where}: {reason}")
        except PolicyInvalid as invalid:
            bad += 1
            _policy_problems(path, invalid)
        except OSError as error:
            bad += 1
            typer.echo(f"BAD  {path}: {error}")
    for policy_id, first, path in ids_in_two_files(documents):
        bad += 1
        typer.echo(f"BAD  together: policy_id {policy_id!r} is in both {first} and {path}; one id names one document")
    try:
        PolicyTimeline(compiled)
    except ValueError as error:
        bad += 1
        typer.echo(f"BAD  together: {error}")
    raise typer.Exit(1 if bad else 0)


def _policy_problems(path: Path, invalid, err: bool = False) -> None:
    for problem in invalid.problems:
        typer.echo(f"BAD  {path}:{problem.line or '-'}: {problem.path or '(document)'}: {problem.reason}", err=err)


@policy_app.command("schema")
def policy_schema() -> None:
    """Print the policy document's JSON Schema (also at GET /v1/policies/schema)."""
    import json

    from rules.document import policy_json_schema

    typer.echo(json.dumps(policy_json_schema(), indent=2, ensure_ascii=False))


@policy_app.command("diff")
def policy_diff(before: Path, after: Path) -> None:
    """A readable diff between two versions of a policy. Exit 2 when a file cannot be read
    or is not a policy (each problem with its line, as `policy validate` prints them)."""
    from ledger.policies import diff_documents
    from rules.loader import PolicyInvalid, load_policy_file

    documents = []
    for path in (before, after):
        try:
            documents.append(load_policy_file(path))
        except PolicyInvalid as invalid:
            _policy_problems(path, invalid, err=True)
        except OSError as error:
            typer.echo(f"BAD  {path}: {error}", err=True)
    if len(documents) < 2:
        raise typer.Exit(2)
    typer.echo(diff_documents(*documents) or "(no difference)")


def _moment_us(text: str, option: str) -> int:
    """A date (Asia/Seoul midnight) or an RFC 3339 time with its offset, in µs, within
    the span the API accepts (`rules.timeutil.in_span`: years 2000–2099, Seoul); else
    typer.BadParameter (a year-1 time east of UTC had overflowed into a traceback)."""
    import datetime as dt

    from rules.timeutil import in_span, local_midnight_us, to_the_microsecond, to_us

    try:
        moment = dt.date.fromisoformat(text) if len(text) == 10 else dt.datetime.fromisoformat(text)
    except ValueError:
        raise typer.BadParameter(f"{text!r}: give YYYY-MM-DD (Seoul) or an RFC 3339 time", param_hint=option) from None
    try:
        to_the_microsecond(text)  # fromisoformat cuts it to the microsecond, as the API's parse did
    except ValueError as error:
        raise typer.BadParameter(f"{text!r}: {error}", param_hint=option) from None
    if isinstance(moment, dt.datetime) and moment.tzinfo is None:
        raise typer.BadParameter(f"{text!r} has no UTC offset", param_hint=option)
    try:
        in_span(moment)
    except ValueError as error:
        raise typer.BadParameter(f"{text!r}: {error}", param_hint=option) from None
    return to_us(moment) if isinstance(moment, dt.datetime) else local_midnight_us(moment)


def _simulation_text(report: dict) -> str:
    """The simulation report as tables for a terminal (same figures as the JSON)."""
    out = [f"policy {', '.join(report['policy_ids'])} over {report['range']['from']} .. {report['range']['to']}",
           f"payments: {report['payments']['count']:,} ({report['payments']['counted_toward_month']:,} counted "
           f"toward the month, {report['payments']['declined_by_policy']:,} refused by the policy; "
           f"{report['recorded']['refunded_payments']:,} refunded)",
           f"actual: {report['actual_basis']}"]
    totals, recorded = report["totals"], report["recorded"]
    held = (f", {recorded['held_won']:,} won held after corrections"
            if recorded["held_won"] != recorded["cashback_won"] else "")
    out.append(f"cashback: simulated {totals['simulated_won']:,} won, actual {totals['actual_won']:,} won, "
               f"delta {totals['delta_won']:+,} won (recorded {recorded['cashback_won']:,} won{held})")
    for title, key, rows in (("by component", "component_id", report["by_component"]),
                             ("by funder", "source", report["by_funder"]),
                             ("by merchant district", "merchant_district", report["by_merchant_district"]),
                             ("by merchant tier", "tier", report["by_merchant_tier"])):
        out.append(f"\n{title}:")
        out.append(f"  {'':<18} {'simulated':>16} {'actual':>16} {'delta':>14}")
        for row in rows:
            out.append(f"  {row[key]:<18} {row['simulated_won']:>16,} {row['actual_won']:>16,} {row['delta_won']:>+14,}")
    out += _budget_outlook_text(report.get("budget_outlook", []))
    m = report["members"]
    out.append(f"\nmembers: {m['with_payments']:,} with payments, {m['affected']:,} affected: {m['gaining']:,} gain "
               f"{m['gained_won']:,} won, {m['losing']:,} lose {m['lost_won']:,} won")
    out += [f"note: {note}" for note in report["notes"]]
    return "\n".join(out)


def _budget_outlook_text(rows: list[dict]) -> list[str]:
    """The report's budget_outlook as a table: each budget the range touches, committed
    now and with the range's cashback replaced by the draft's."""
    if not rows:
        return []
    out = ["\nbudget outlook (committed with the range's cashback replaced by the draft's):",
           f"  {'':<10} {'period':<8} {'limit':>16} {'committed':>16} {'with the draft':>16} {'over limit':>14}"
           "  runs out"]
    for row in rows:
        limit = "no limit" if row["limit"] is None else f"{row['limit']:,}"
        line = (f"  {row['source']:<10} {row['period']:<8} {limit:>16} {row['committed']:>16,} "
                f"{row['simulated_committed']:>16,} {row['over_limit_won']:>14,}  {row['runs_out_on'] or ''}")
        out.append(line.rstrip())
    return out


@policy_app.command("simulate")
def policy_simulate(
        file: Path,
        from_: Annotated[str, typer.Option("--from", help="start, inclusive: YYYY-MM-DD (Seoul) or RFC 3339")],
        to: Annotated[str, typer.Option("--to", help="end, exclusive: YYYY-MM-DD (Seoul) or RFC 3339")],
        db: Annotated[Optional[str], typer.Option("--db", help="database URL (default: EUM_DATABASE_URL)")] = None,
        json_out: Annotated[bool, typer.Option("--json", help="the report as JSON (as the API returns it)")] = False,
) -> None:
    """Re-evaluate the recorded payments of [from, to) under a draft policy file, as if it
    had been activated at `from`, beside what was paid (the report of
    POST /v1/policies/{id}/simulate). Read-only: --db is checked as EUM_DATABASE_URL is
    (its URL, then its migrations), and a SQLite database that is not there is an
    `error:` line, exit 2, never an empty file made for it."""
    import orjson
    import psycopg
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, DBAPIError

    from api.services import load_timeline
    from eum.settings import Settings
    from ledger.db import make_engine, reader, sqlite_file
    from ledger.commands import RANGE_IN_FUTURE, starts_in_future
    from ledger.errors import RangeTooLarge
    from ledger.policies import PolicyFileChanged, recorded_otherwise
    from rules.compiled import PolicyClash, compile_policy
    from rules.loader import PolicyInvalid, load_policy_file
    from rules.timeutil import from_us
    from settlement.simulate import simulate, with_draft

    start, end = _moment_us(from_, "--from"), _moment_us(to, "--to")
    if end <= start:
        raise typer.BadParameter("--to must be after --from", param_hint="--to")
    if starts_in_future(start):
        raise typer.BadParameter(f"the range {RANGE_IN_FUTURE}", param_hint="--from")
    try:
        document = load_policy_file(file)
    except PolicyInvalid as invalid:
        _policy_problems(file, invalid, err=True)
        raise typer.Exit(2) from None
    except OSError as error:
        typer.echo(f"BAD  {file}: {error}", err=True)
        raise typer.Exit(2) from None
    settings = _settings()
    source = "--db" if db else "EUM_DATABASE_URL"
    if db:
        try:  # as the setting is checked (model_copy skips the settings' validators)
            settings = settings.model_copy(update={"database_url": Settings._database(db)})
        except ValueError as error:
            raise typer.BadParameter(f"{db!r}: {error}", param_hint="--db") from None
    try:
        url = make_url(settings.database_url)
    except ArgumentError as error:  # not a URL
        raise typer.BadParameter(f"{settings.database_url!r}: {error}; give sqlite:///PATH or "
                                 "postgresql://USER@HOST:PORT/DB", param_hint=source) from None
    book = sqlite_file(url)
    if book is not None and not Path(book).is_file():
        # Read-only: never the folders and empty database file a writing command makes.
        typer.echo(f"error: {source}: no SQLite database at {book}; nothing was made "
                   "(the book's file, e.g. var/eum.db)", err=True)
        raise typer.Exit(2)
    try:
        engine = make_engine(settings.database_url)
    except ArgumentError as error:  # one of a database SQLAlchemy has no driver for
        raise typer.BadParameter(f"{settings.database_url!r}: {error}; give sqlite:///PATH or "
                                 "postgresql://USER@HOST:PORT/DB", param_hint=source) from None
    try:
        read = reader(engine)
        with read.connect() as conn:
            if recorded_otherwise(conn, document):
                typer.echo(f"error: {file}: policy_id {document.policy_id!r} is recorded in the book with another "
                           "document (policies are never edited in place): give the draft a policy_id of its own",
                           err=True)
                raise typer.Exit(2)
        try:
            timeline = load_timeline(settings, read)
            draft = with_draft(timeline, compile_policy(document, from_us(start)), start, end)
        except (PolicyClash, PolicyFileChanged) as clash:
            typer.echo(f"error: {clash}", err=True)
            raise typer.Exit(2) from None
        # Not bound by EUM_SIMULATION_PAYMENTS_MAX, the API workers' bound: a process of
        # its own, run on purpose, with no payment path beside it. The simulator's own
        # ceiling (PAYMENTS_MAX, a month at Incheon scale with room) still holds.
        try:
            report = simulate(read, draft, start, end, actual_timeline=timeline)
        except RangeTooLarge as error:
            typer.echo(f"error: {error.detail}; nothing was simulated", err=True)
            raise typer.Exit(2) from None
    except (DBAPIError, psycopg.Error) as error:
        # main() checks EUM_DATABASE_URL's database; --db's is checked here, the same way
        # (left to main(), a --db that cannot be reached was judged by EUM_DATABASE_URL's:
        # "not migrated", and the default SQLite file made).
        if behind := _migrations_behind(settings.database_url):
            _not_migrated(behind, error)
        _stopped_there(error)
        raise
    finally:
        engine.dispose()
    typer.echo(orjson.dumps(report, option=orjson.OPT_INDENT_2).decode() if json_out else _simulation_text(report))


@policy_app.command("submit")
def policy_submit(file: Path,
                  api_url: Annotated[str, typer.Option(envvar="EUM_API_URL")] = "http://127.0.0.1:8000",
                  key: Annotated[str, typer.Option(envvar="EUM_API_KEY", help="a policy-editor key")] = "") -> None:
    """Submit a policy file as a draft (POST /v1/policies) for a second person to approve.
    A file that cannot be read is one `error:` line, exit 2, nothing sent."""
    from rules.loader import POLICY_FILE_BYTES_MAX
    from settlement.cli import _read

    # Bounded as the service bounds a policy document (it refuses more): no settlement setting.
    data = _read(file, str(file), "; nothing sent", POLICY_FILE_BYTES_MAX)
    response = _call("POST", api_url, "/v1/policies", key, content=data, headers={"Content-Type": "application/yaml"})
    typer.echo(response.text)
    raise typer.Exit(0 if response.status_code == 201 else 1)


ApiUrl = Annotated[str, typer.Option(envvar="EUM_API_URL", help="the service (default: EUM_API_URL)")]


def _api_client(api_url: str):
    """The HTTP client the grants commands talk through (tests put the app's TestClient here)."""
    import httpx

    return httpx.Client(base_url=api_url.rstrip("/"), timeout=30)


def _call(method: str, api_url: str, path: str, key: str, headers: dict | None = None, **kw):
    """One request to the service with the caller's key; no key, or no service at the URL,
    is one `error:` line and exit 2 (not a traceback)."""
    import httpx

    if not key.strip():
        typer.echo("error: no API key: pass --key or set EUM_API_KEY (`eum keys create --name NAME --role ROLE`)",
                   err=True)
        raise typer.Exit(2)
    try:
        with _api_client(api_url) as client:
            return client.request(method, path, headers={**(headers or {}), "Authorization": f"Bearer {key.strip()}"},
                                  **kw)
    except httpx.TransportError as error:
        typer.echo(f"error: cannot reach the service at {api_url} ({error}); is it running? (EUM_API_URL)", err=True)
        raise typer.Exit(2) from None


def _refused(response) -> None:
    """Print the problem document the service answered with, and exit 1."""
    try:
        problem = response.json()
        typer.echo(f"refused: {response.status_code} {problem.get('code', '')}: "
                   f"{problem.get('detail') or problem.get('title', '')}", err=True)
    except ValueError:
        typer.echo(f"refused: {response.status_code}: {response.text[:500]}", err=True)
    raise typer.Exit(1)


def _grant_file(path: Path):
    """The program in a file, or each problem with its line and reason (exit 2)."""
    from rules.grants import GrantProgramDocument
    from rules.loader import PolicyInvalid, file_text, parse_policy_text, text_problems

    try:
        text = file_text(path)
        program = parse_policy_text(text, str(path), model=GrantProgramDocument)
        if refused := text_problems(program, text):  # POST /v1/grant-programs refuses it (validate said ok)
            raise PolicyInvalid(str(path), refused)
        problems = program.amount_problems() + program.span_problems() + program.match_problems()  # the API's
        if not problems:
            return program
        for problem in problems:
            typer.echo(f"BAD  {path}: {problem}", err=True)
    except PolicyInvalid as invalid:
        for problem in invalid.problems:
            typer.echo(f"BAD  {path}:{problem.line or '-'}: {problem.path or '(document)'}: {problem.reason}", err=True)
    except (OSError, UnicodeDecodeError) as error:
        typer.echo(f"BAD  {path}: {error}", err=True)
    raise typer.Exit(2)


@grants_app.command("validate")
def grants_validate(files: list[Path]) -> None:
    """Check grant program files (policies/grants/*.yaml); print each problem with its line and reason."""
    bad = 0
    for path in files:
        try:
            program = _grant_file(path)
        except typer.Exit:
            bad += 1
            continue
        typer.echo(f"ok   {path}: {program.program_id}")
    raise typer.Exit(1 if bad else 0)


@grants_app.command("submit")
def grants_submit(file: Path, api_url: ApiUrl = "http://127.0.0.1:8000",
                  key: Annotated[str, typer.Option(envvar="EUM_API_KEY",
                                                   help="your policy-editor key: you are the program's author")] = "") -> None:
    """Create a grant program from a file as a `draft` (POST /v1/grant-programs). The file is
    checked first: a problem is printed with its line and nothing is sent. The draft
    disburses nothing until a policy-approver other than you runs `eum grants approve`."""
    program = _grant_file(file)
    body = program.model_dump(mode="json", exclude_none=True)
    response = _call("POST", api_url, "/v1/grant-programs", key, json=body)
    if response.status_code not in (200, 201):
        _refused(response)
    status = response.json()["status"]
    if response.status_code == 200:
        typer.echo(f"{program.program_id}: already submitted with these terms; status {status}")
        return
    typer.echo(f"{program.program_id}: {status}; a policy-approver other than you approves it with "
               f"`eum grants approve {program.program_id}`")


@grants_app.command("approve")
def grants_approve(program_id: str, api_url: ApiUrl = "http://127.0.0.1:8000",
                   key: Annotated[str, typer.Option(envvar="EUM_API_KEY",
                                                    help="your policy-approver key (not the author's)")] = "") -> None:
    """Approve a draft grant program (POST /v1/grant-programs/{id}/approve): a second person,
    by key and by name; the author is refused (403 self_approval). Audited."""
    response = _call("POST", api_url, f"/v1/grant-programs/{program_id}/approve", key)
    if response.status_code != 200:
        _refused(response)
    typer.echo(f"{program_id}: {response.json()['status']}; it can disburse")


@grants_app.command("list")
def grants_list(api_url: ApiUrl = "http://127.0.0.1:8000",
                key: Annotated[str, typer.Option(envvar="EUM_API_KEY", help="a policy-reading key")] = "",
                json_out: Annotated[bool, typer.Option("--json", help="as the API returns it")] = False) -> None:
    """Grant programs with their status (draft; open; expired once `eum grants expire` has
    returned the unspent money), author and approver."""
    import orjson

    response = _call("GET", api_url, "/v1/grant-programs", key)
    if response.status_code != 200:
        _refused(response)
    programs = response.json()["grant_programs"]
    if json_out:
        typer.echo(orjson.dumps(programs, option=orjson.OPT_INDENT_2).decode())
        return
    for p in programs:
        typer.echo(f"{p['program_id']:<24} {p['status']:<8} {p['valid_from']} until {p['valid_until']}  "
                   f"by {p['created_by']}, approved by {p['approved_by'] or '-'}  {p['name']}")


@grants_app.command("disburse")
def grants_disburse(program_id: str, file: Path,
                    on_behalf_of: Annotated[str, typer.Option("--on-behalf-of", "--actor", help=ON_BEHALF_OF_HELP)]
                    = "",
                    occurred_at: Annotated[Optional[str], typer.Option(
                        help="when the disbursements happen: an RFC 3339 time (or a Seoul date); part of each "
                             "row's request, as the API's occurred_at, so a file sent there with a time is resumed "
                             "here with the same one; default: now")] = None) -> None:
    """Disburse from a CSV of recipients: a header of disbursement_id and member_id, and as
    needed amount, district and the attributes the program's amount rules read
    (income_status, household_size, category, classes, ...); any other column refuses the file.
    Exit 0: every row disbursed or already given; 1: some rows refused (each named by its
    line, the others disbursed), or a line past the first chunk unreadable (the rows before
    it stay); 2: refused before anything is disbursed (one `error:`
    line: an unknown program or a draft, a file that cannot be read, is not UTF-8 or CP949
    text, has no disbursement_id and member_id header or a column named twice or one the
    rules do not read, a bad --occurred-at or --on-behalf-of); 3: the
    database stopped it (the chunks committed before stay; run the same file again)."""
    from eum.backfill import FILE_BYTES_MAX
    from eum.textfiles import BadUpload, read_bounded
    from rich.progress import Progress
    from sqlalchemy.exc import SQLAlchemyError

    from ledger import collector
    from ledger.book import Book
    from ledger.errors import EumError, Unavailable
    from ledger.grant_jobs import bulk_disburse, check_upload
    from settlement.cli import _progress, _refuse

    settings = _settings()
    on_behalf_of = _on_behalf_of(on_behalf_of)
    at_us = None
    if occurred_at:
        try:
            at_us = _moment_us(occurred_at, "--occurred-at")  # the API's span
        except typer.BadParameter as bad:
            _refuse(f"--occurred-at {bad.message}")
    try:
        data = read_bounded(file, FILE_BYTES_MAX)
    except (OSError, BadUpload) as error:
        _refuse(f"{file}: {getattr(error, 'strerror', None) or error}")
    lines = data.count(b"\n")
    engine = _engine()
    try:
        # The program and the file first: a command refused here records nothing, not
        # even the new policy files the book's timeline would (`_book_timeline`).
        check_upload(engine, program_id, data, at_us, bytes_max=FILE_BYTES_MAX)
        book = Book(engine, _book_timeline(settings, engine))
    except (EumError, ValueError) as error:  # the program, or the file (BadUpload is a ValueError)
        engine.dispose()
        _refuse(f"{error.code}: {error.detail}" if isinstance(error, EumError) else f"{file}: {error}")
    except SQLAlchemyError as error:
        engine.dispose()
        _stopped_by_database(error, "nothing disbursed")
    except BaseException:
        engine.dispose()
        raise
    done = 0  # rows in chunks written: a bad line found after them is not "nothing done"

    def advance(n: int) -> None:
        nonlocal done
        done += n
        progress.advance(task, n)

    try:
        # A process of its own: the cyclic collector paused, as for the payment replay (a
        # serving worker's upload keeps it on: the worker serves other requests meanwhile).
        with _progress(*Progress.get_default_columns()) as progress, collector.paused():
            task = progress.add_task(f"disbursing {program_id}", total=lines)
            report = bulk_disburse(book, engine, program_id, data, at_us, progress=advance, actor=_operator(),
                                   bytes_max=FILE_BYTES_MAX,  # a file on this machine, as payments replay's
                                   on_behalf_of=on_behalf_of)
    except Unavailable as error:  # the book could not write a chunk: the database, not the file
        _stopped_by_database(error, "chunks committed before it stay disbursed: run the same file again to finish")
    except (EumError, ValueError) as error:  # the program, or the file (BadUpload is a ValueError)
        reason = f"{error.code}: {error.detail}" if isinstance(error, EumError) else f"{file}: {error}"
        if not done:
            _refuse(reason)
        typer.echo(f"error: {reason}; the {done} rows before it were written (disbursed, or refused one by one): "
                   "fix the file and run it again (a row already given is answered as a replay)", err=True)
        raise typer.Exit(1) from None
    except SQLAlchemyError as error:
        _stopped_by_database(error, "chunks committed before it stay disbursed: run the same file again to finish")
    finally:
        engine.dispose()
    import orjson

    summary = report.as_dict()
    errors = summary.pop("errors")
    typer.echo(orjson.dumps(summary).decode())  # JSON, as the API answers it (it was a Python dict's repr)
    for error in errors:  # every one kept (it named the first 50 only: grant files audit)
        typer.echo(f"line {error['line']}: {error['error']}", err=True)
    if report.error_count > len(errors):
        typer.echo(f"... and {report.error_count - len(errors)} more, not named (the first {len(errors)} are); "
                   "send the file again once these are fixed: rows paid are replays", err=True)
    raise typer.Exit(0 if report.error_count == 0 else 1)


def _database_errors() -> tuple[type[BaseException], ...]:
    """What a database that stops a command raises as it reaches the command: SQLAlchemy's
    errors, the book's `Unavailable` (`Book.execute` gave up on a batch), and the drivers'
    own (a settlement run reads its day through psycopg and ADBC directly)."""
    import psycopg
    from sqlalchemy.exc import SQLAlchemyError

    from ledger.errors import Unavailable

    try:
        from adbc_driver_manager import Error as AdbcError
    except ImportError:  # no ADBC: the day is read through SQLAlchemy
        return SQLAlchemyError, Unavailable, psycopg.Error
    return SQLAlchemyError, Unavailable, psycopg.Error, AdbcError


def _stopped_by_database(error, after: str) -> NoReturn:
    """A database error's first line, what stays and what to do; exit 3."""
    typer.echo(f"stopped by the database ({type(error).__name__}: {_first_line(error)}); {after} (a new database needs "
               "`eum db upgrade` first)", err=True)
    raise typer.Exit(3)


class _AnswersNotWritten(Exception):
    """The --answers file could not take a committed window's answers (a full disk)."""


@payments_app.command("replay")
def payments_replay(
        file: Path,
        chunk: Annotated[int, typer.Option(min=1, max=50_000, help="payments per database transaction (each holds "
                                           "its members and budget rows until its COMMIT)")] = 1_000,  # ledger.replay.CHUNK_MAX
        threads: Annotated[Optional[int], typer.Option(
            min=1, max=8, help="member streams written at once (PostgreSQL; default 2, SQLite 1)")] = None,
        answers: Annotated[Optional[Path], typer.Option(
            help="write each payment's answer here, one JSON line each, in the order recorded, as each "
                 "window of payments commits")] = None) -> None:
    """Record a file of payments (CSV or JSON lines of `POST /v1/payments` bodies) through
    the bulk payment writer: the same decisions, postings and exactly-once as the API, in
    large transactions. Run again, the same file records nothing (every payment is
    answered as a replay). Exit 0: all recorded or replayed; 1: some payments were refused
    (their answers say why), or the answers could not be written (the windows committed
    before stay; run the same file again); 2: the file was refused, nothing recorded; 3:
    the database stopped it (the chunks committed before stay; run the same file again)."""
    import orjson
    from rich.progress import Progress
    from sqlalchemy.exc import SQLAlchemyError

    from eum.backfill import Rejected, read_file, read_payments
    from ledger.errors import Unavailable
    from ledger.programs import ProgramCache
    from ledger.replay import replay_book, replay_windows
    from settlement.cli import _progress, refuse_overwriting_input

    settings = _settings()
    if answers is not None:  # before the file is read: emptied for the answers, it was gone
        refuse_overwriting_input(answers, "--answers", file, "payments file", "nothing recorded")
    try:
        commands = read_payments(read_file(file))
    except OSError as error:
        typer.echo(f"error: {file}: {error.strerror or error}", err=True)
        raise typer.Exit(2)
    except Rejected as rejected:
        typer.echo(f"error: {file}: {rejected}", err=True)
        for line, reason in rejected.errors:
            typer.echo(f"line {line}: {reason}", err=True)
        if rejected.total > len(rejected.errors):
            typer.echo(f"... and {rejected.total - len(rejected.errors)} more", err=True)
        raise typer.Exit(2)
    if threads is not None and threads > 1 and settings.is_sqlite:
        typer.echo("error: --threads above 1 needs PostgreSQL: SQLite has one writer at a time", err=True)
        raise typer.Exit(2)
    engine = _engine()
    out = None
    decided = 0  # payments of the windows committed

    def write_answers(part, outcomes) -> None:
        nonlocal decided
        decided += len(part)
        progress.advance(task, len(part))
        if out is None:
            return
        try:
            for command, outcome in zip(part, outcomes):
                if outcome.error is not None:
                    out.write(orjson.dumps({"payment_id": command.payment_id, "error": {
                        "code": outcome.error.code, "detail": str(outcome.error)}}) + b"\n")
                else:
                    out.write((outcome.raw if outcome.raw is not None else orjson.dumps(outcome.body)) + b"\n")
        except OSError as error:  # the window is committed all the same: the run stops here
            raise _AnswersNotWritten(error) from None

    def open_answers(mode: str):
        try:
            return answers.open(mode)
        except OSError as error:
            engine.dispose()
            typer.echo(f"error: --answers {answers}: {error.strerror or error}", err=True)
            raise typer.Exit(2) from None

    if answers is not None:  # one that cannot be written refuses the run before the book records
        open_answers("ab").close()  # the new policy files (`_book_timeline`); kept as it is meanwhile
    try:
        timeline = _book_timeline(settings, engine)
        # Answers go to the file a window at a time (`replay_windows`), so a peak day's file
        # never holds every answer in memory at once. It is emptied only here, once nothing
        # can refuse the run (the database's migration, the policy files: it had been
        # emptied before them), and still before any payment is written.
        if answers is not None:
            out = open_answers("wb")
        # Progress by window, as each commits (a peak day takes minutes).
        with _progress(*Progress.get_default_columns(), transient=True) as progress:
            task = progress.add_task("recording payments", total=len(commands))
            book = replay_book(engine, timeline, ProgramCache())
            report = replay_windows(book, commands, chunk=chunk,
                                    threads=threads or (1 if settings.is_sqlite else 2), sink=write_answers)
        if out is not None:
            try:
                out.close()  # the last answers are written here
            except OSError as error:
                raise _AnswersNotWritten(error) from None
    except (SQLAlchemyError, Unavailable) as error:  # Unavailable: the book gave up on a chunk (Book.execute)
        # Each chunk is one database transaction: those committed stay, and the same
        # file run again records only the rest (the others come back as replays).
        _stopped_by_database(error, "chunks committed before it stay recorded: run the same file again to finish")
    except _AnswersNotWritten as unwritten:
        # Not the database's stop (3), nor a refusal before anything was done (2): the
        # command ran and wrote, as `grants disburse` stopped by a bad line after its
        # first chunks (1). It was two OSError tracebacks, exit 1 and no word of what stayed.
        error = unwritten.args[0]
        typer.echo(f"error: --answers {answers}: {error.strerror or error}; not every answer was written, but the "
                   f"windows committed stay as the book took them ({decided:,} payment{'s' if decided != 1 else ''}): "
                   "run the same file again to record the rest and get every answer (those in the book are answered "
                   "as replays)", err=True)
        raise typer.Exit(1) from None
    finally:
        engine.dispose()
        if out is not None and not out.closed:
            try:
                out.close()
            except OSError:  # stopped already (the database, or the answers): the same file again writes them
                pass
    declined = report.recorded - report.approved
    typer.echo(f"{report.payments} payments: {report.recorded} recorded ({report.approved} approved, {declined} "
               f"declined), {report.replayed} already in the book, {sum(report.errors.values())} refused; "
               f"{report.seconds:.1f} s ({report.payments / max(report.seconds, 1e-9):,.0f}/s)")
    for code, count in sorted(report.errors.items()):
        typer.echo(f"refused: {code} x {count}", err=True)
    raise typer.Exit(1 if report.errors else 0)


@grants_app.command("expire")
def grants_expire(program_id: str,
                  on_behalf_of: Annotated[str, typer.Option("--on-behalf-of", "--actor", help=ON_BEHALF_OF_HELP)]
                  = "") -> None:
    """Return the unspent money of an ended program to its funders. Exit 2, nothing
    returned, when refused (an unknown program, a draft, one that has not ended, a bad
    --on-behalf-of); 3 when
    the database stopped it (what was returned stays; run it again for the rest)."""
    from sqlalchemy.exc import SQLAlchemyError

    from ledger.book import Book
    from ledger.errors import ProgramNotExpired, ProgramNotFound, Unavailable
    from ledger.grant_jobs import check_expiry, expire_program
    from ledger.programs import ProgramNotApproved
    from settlement.cli import _refuse

    settings = _settings()
    on_behalf_of = _on_behalf_of(on_behalf_of)
    engine = _engine()
    try:
        check_expiry(engine, program_id)  # before the policy files are synced: a refusal records nothing
        result = expire_program(Book(engine, _book_timeline(settings, engine)), engine, program_id,
                                actor=_operator(), on_behalf_of=on_behalf_of)
    except (ProgramNotFound, ProgramNotApproved, ProgramNotExpired) as refused:  # before anything is written
        _refuse(f"{refused.code}: {refused.detail}")
    except (SQLAlchemyError, Unavailable) as error:  # Unavailable: the book could not write a batch of lots
        _stopped_by_database(error, "lots returned before it stay returned: run it again for the rest")
    finally:
        engine.dispose()
    import orjson

    typer.echo(orjson.dumps(result).decode())  # JSON, as the API answers it (it was a Python dict's repr)


def _book_timeline(settings, engine):
    """The policy timeline of a command that writes the book (`api.services.book_timeline`:
    new policy files recorded); files that are not the policies recorded under their ids,
    that do not parse, or that cannot be in force together are an `error:` naming each,
    exit 2, and nothing is written."""
    from api.services import book_timeline
    from ledger.policies import PolicyFileChanged
    from rules.compiled import PolicyClash
    from rules.loader import PolicyInvalid

    try:
        return book_timeline(settings, engine)
    except (PolicyFileChanged, PolicyInvalid, PolicyClash) as changed:
        # A file that does not parse, or policies that cannot be in force together, are
        # the policies folder's fault, whatever file the command was given.
        typer.echo(f"error: EUM_POLICIES_DIR: {changed}", err=True)
        raise typer.Exit(2) from None


def _check_policy_dir(settings) -> None:
    """The policy folder as `serve` checks it before anything else (`_preflight`) and `db
    upgrade` before it migrates: readable, with files, and the files by themselves
    (`_check_policy_files_alone`); else an `error:` line and exit 2."""
    if settings.policies_dir.is_dir() and not os.access(settings.policies_dir, os.R_OK | os.X_OK):
        typer.echo(f"error: EUM_POLICIES_DIR: {settings.policies_dir} cannot be read by this user "
                   "(its permissions)", err=True)
        raise typer.Exit(2)
    if not any(settings.policies_dir.glob("*.yaml")):
        typer.echo(f"error: EUM_POLICIES_DIR: no policy files (*.yaml) in {settings.policies_dir}", err=True)
        raise typer.Exit(2)
    _check_policy_files_alone(settings)


def _check_policy_files_alone(settings) -> None:
    """The policy files by themselves, before the database is touched (as `eum policy
    validate` reads them): each parses, one id per file, and they can be in force
    together, else an `error:` line and exit 2. A start refused for them had already
    migrated the database, on an upgrade to a head the old release then refuses (the
    new-user audit). What needs the book (a file edited since it was recorded, a clash
    with an activated policy) is `_check_policy_files`, after."""
    from rules.compiled import PolicyClash
    from rules.loader import PolicyInvalid, timeline_from_dir

    try:
        timeline_from_dir(settings.policies_dir)
    except (PolicyInvalid, PolicyClash) as error:
        typer.echo(f"error: EUM_POLICIES_DIR: {error}", err=True)
        raise typer.Exit(2) from None


def _check_policy_files(settings) -> None:
    """What `serve` checks once the database is migrated (and, on a book already started,
    `serve` and `db upgrade` before they migrate it: `_check_policy_files_before_migrating`):
    every policy file parses (UTF-8, one file per policy_id), is the policy recorded under
    its id, and can be in force with the others (`api.services.timeline_in`, as a worker
    builds it), else an `error:` naming each file, exit 2 (a worker would fail its start
    with a traceback)."""
    from api.services import load_files, timeline_in
    from ledger.db import make_engine, reader
    from ledger.policies import PolicyFileChanged
    from rules.compiled import PolicyClash
    from rules.loader import PolicyInvalid

    engine = make_engine(settings.database_url)
    try:
        with reader(engine).connect() as conn:
            timeline_in(conn, load_files(conn, settings.policies_dir))
    except (PolicyFileChanged, PolicyInvalid, PolicyClash) as error:
        typer.echo(f"error: EUM_POLICIES_DIR: {error}", err=True)
        raise typer.Exit(2) from None
    finally:
        engine.dispose()


def _check_policy_files_before_migrating(settings) -> bool:
    """`_check_policy_files` on the book as it is, before `db upgrade` or `serve` migrates
    it: a book the shipped files cannot be in force with (one first started before
    8be6c38 holds events after the 2023-09-01 file it never recorded) was migrated, exit
    0, and only the start then refused it, the schema moved (on SQLite the way back is a
    restore; the upgrade audit). No migration changes the policies or the events the
    check reads; a table the book does not have yet holds none of them. A new database
    has nothing to check against, and one a newer release migrated is left to
    `migrate`'s refusal. True when it checked (no migration changes what it read)."""
    state = _migration_state(settings.database_url)
    if state is None or state[0] is None or not state[2]:
        return False
    _check_policy_files(settings)
    return True


def _engine(migrated: bool = True, whole_book: bool = False):
    """The book's engine, for a command that reads or writes it: refused first, exit 2,
    when the database is not at this release's migration head (`_require_migrated`).
    `whole_book`: a check that reads every leg (`db check`, `audit-verify`) gets the
    settlement jobs' statement timeout (EUM_SETTLEMENT_STATEMENT_TIMEOUT_MS, 10 min), not
    a request's 5 s, which a book of a few million legs passed (grant files audit).
    `migrated=False` for `keys create` and `demo`, which migrate a new database themselves
    (`_migrate_if_new`)."""
    from ledger.db import make_engine

    settings = _settings()
    if migrated:
        _require_migrated(settings.database_url)
    if whole_book:
        return make_engine(settings.database_url, statement_timeout_ms=_settlement_config().statement_timeout_ms)
    return make_engine(settings.database_url)


def _migrate_if_new(url: str) -> None:
    """A new database (no migration yet) migrated to this release's head, for `keys
    create` and `demo`, which may be a fresh install's first command; one at another
    migration is refused as every command refuses it (`_require_migrated`). They had
    upgraded a book behind this release under the old release's running processes, which
    README's Upgrading forbids (new-user audit): that is `eum db upgrade`'s, after a
    backup."""
    state = _migration_state(url)
    if state is not None and state[0] is not None:
        _require_migrated(url)
    _migrate(url)


def _require_migrated(url: str) -> None:
    """One `error:` line and exit 2 when the database is behind this release's migrations,
    before the command reads or writes anything. (Found only after a database error
    before: `eum settle` settled a book two migrations behind, and on an empty file some
    commands said exit 3; the docs audit.) A database that
    cannot be reached passes here, for the command's own exit 3. So does a SQLite book
    that is not there, refused first (`_require_book_file`)."""
    _require_book_file(url)
    state = _migration_state(url)
    if state is None or state[0] == state[1]:
        return
    current, head, known = state
    if not known:  # not behind: ahead (`eum db upgrade` refuses it too: `_migrate`)
        from ledger.db import NewerMigration

        typer.echo(f"error: {NewerMigration(current)}", err=True)
        raise typer.Exit(2)
    typer.echo(f"error: the database is not migrated to this release (at {current or 'none'}, this release needs "
               f"{head}): run `eum db upgrade` (README, Upgrading); nothing was done", err=True)
    raise typer.Exit(2)


def _require_book_file(url: str) -> None:
    """A SQLite book that is not there: one `error:` line naming the path, exit 2, before
    a connection makes it. Every command that needs a migrated book had left an empty
    file and its folders there (a typo in EUM_DATABASE_URL, a fresh clone's first
    command), then said "not migrated: run `eum db upgrade`", which would have made a new
    book at the typo. A `file:` URI names its file by its path (`ledger.db.sqlite_file`)."""
    from ledger.db import sqlite_file

    path = sqlite_file(url)
    if path is None or Path(path).is_file():
        return
    if Path(path).is_dir():  # no command can make a book there: `db upgrade` would stop, exit 3
        typer.echo(f"error: EUM_DATABASE_URL: {path} is a folder, not a SQLite database; nothing was done", err=True)
        raise typer.Exit(2)
    typer.echo(f"error: EUM_DATABASE_URL: no SQLite database at {path}; nothing was made (a new book: "
               "`eum db upgrade`, `eum serve`, `eum demo` or `eum keys create` make it)", err=True)
    raise typer.Exit(2)


def _migrate(url: str) -> None:
    """`ledger.db.migrate`; a database a newer release migrated is refused as every
    command refuses it (`_require_migrated`): one `error:` line, exit 2, nothing done. So
    is a PostgreSQL database not in UTF8 (`ledger.db.encoding_problem`), whichever command
    migrates it: `keys create` and `demo` migrated an EUC_KR database, then `demo` died
    with a traceback and `keys create` stored a name other than the one given (review)."""
    from ledger.db import NewerMigration, encoding_problem, migrate

    try:
        problem = encoding_problem(url)
    except Exception:  # noqa: BLE001 - not reachable: the migration's own error says so (exit 3, `main`)
        problem = None
    if problem is not None:
        typer.echo(f"error: EUM_DATABASE_URL: {problem}", err=True)
        raise typer.Exit(2)
    try:
        migrate(url)
    except NewerMigration as refused:
        typer.echo(f"error: {refused}", err=True)
        raise typer.Exit(2) from None


@db_app.command("upgrade")
def db_upgrade() -> None:
    """Apply migrations (alembic upgrade head), once the policy files pass the checks the
    service's start makes against the book (nothing migrated otherwise)."""
    settings = _settings()
    _check_policy_dir(settings)  # before the database check, whose connection makes a SQLite book's file
    _check_database(settings)
    _check_policy_files_before_migrating(settings)
    _migrate(settings.database_url)
    typer.echo("database at head")


@db_app.command("check")
def db_check() -> None:
    """Check the money invariant: balanced transactions, balances = legs, no overdraft, budgets within limits."""
    from ledger.db import reader
    from ledger.queries import check_book

    with reader(_engine(whole_book=True)).connect() as conn:
        results = check_book(conn)
    for r in results:
        typer.echo(f"{'ok ' if r.ok else 'BAD'} {r.name} {r.detail}")
    raise typer.Exit(0 if all(r.ok for r in results) else 1)


@app.command("access-matrix")
def access_matrix() -> None:
    """Print the route × role table (docs/access.md is this output)."""
    from api.access import markdown
    from api.app import create_app

    typer.echo(ACCESS_HEADER + markdown(create_app()), nl=False)


ACCESS_HEADER = """# Access matrix

Who may call what. Generated from the routes (`eum access-matrix > docs/access.md`);
`tests/test_access.py` fails when the code and this table disagree, and calls every
route with every role and with no key. Public routes answer without a key;
`/metrics` asks for its own bearer token when `EUM_METRICS_TOKEN` is set (no API key
opens it).

"""


@app.command("audit-verify")
def audit_verify(expect_head: Annotated[Optional[str], typer.Option(
        help="a head printed by an earlier run and kept elsewhere: it must still be in the chain "
             "(else entries were cut off its end)")] = None) -> None:
    """Recompute the audit log's hash chain; exit 1 at the first broken link. Prints the
    head (the last entry's hash): keep it outside the database and pass it next time.
    Keyed links are checked with the keys in EUM_AUDIT_KEYS."""
    from ledger import audit
    from ledger.db import reader

    expect_head = _printed_head(expect_head)
    engine = _engine(whole_book=True)
    with reader(engine).connect() as conn:
        report = audit.verify(conn, expect_head, _settings().audit_keyring)
    kinds = f"{report.keyed} keyed, {report.unkeyed} unkeyed, {report.legacy} legacy"
    if report.ok:
        keyed = f"; keyed from entry {report.keyed_from}" if report.keyed_from is not None else ""
        typer.echo(f"audit chain intact: {report.entries} entries ({kinds}{keyed}); head {report.head}")
        if report.unkeyed and not _settings().audit_keyring.signing:
            typer.echo("warning: EUM_AUDIT_KEYS is not set: unkeyed links can be recomputed by anyone who can "
                       "write the database; only a head kept elsewhere shows a rewrite", err=True)
        return
    typer.echo(f"audit chain BROKEN at entry {report.broken_at}: {report.reason}", err=True)
    raise typer.Exit(1)


HEAD_PRINTED = re.compile(r"[0-9a-f]{64}")


def _printed_head(text: str | None) -> str | None:
    """`--expect-head` as this command prints a head: 64 lowercase hexadecimal characters
    (pasted with spaces around it or in capitals, the same head). Anything else is a
    mistake in the command, exit 2: compared as given, a typo read as "entries were cut
    off the end of the log" (exit 1), a tamper alarm for a typing error."""
    if text is None:
        return None
    head = text.strip().lower()
    if not HEAD_PRINTED.fullmatch(head):
        shown = text if len(text) <= 80 else text[:77] + "..."
        raise typer.BadParameter(f"{shown!r} is not a head `eum audit-verify` prints (64 hexadecimal characters); "
                                 "nothing was verified", param_hint="--expect-head")
    return head


# --expires-days at most ten years: a key meant to last longer is one that never expires
# (no option); 999999999999 days was past the column's bigint of microseconds.
KEY_EXPIRY_DAYS_MAX = 3_650


@keys_app.command("create")
def keys_create(name: Annotated[str, typer.Option(help="who holds the key")],
                role: Annotated[str, typer.Option(help="card-app, policy-editor, policy-approver, finance, auditor, admin")],
                expires_days: Annotated[Optional[int], typer.Option(
                    min=1, max=KEY_EXPIRY_DAYS_MAX,
                    help=f"days until the key expires, 1 to {KEY_EXPIRY_DAYS_MAX} (ten years); default: never")] = None
                ) -> None:
    """Print a new key once; only its hash is stored."""
    from ledger.keys import ROLES, create_key, name_problem

    if role not in ROLES:
        typer.echo(f"error: role must be one of: {', '.join(ROLES)} (not {role!r}); nothing was created", err=True)
        raise typer.Exit(2)
    if (problem := name_problem(name)) is not None:
        typer.echo(f"error: {problem}; nothing was created", err=True)
        raise typer.Exit(2)
    settings = _settings()
    _migrate_if_new(settings.database_url)
    expires = None if expires_days is None else time.time_ns() // 1000 + expires_days * 86_400_000_000
    key_id, token = create_key(_engine(migrated=False), name=name, role=role, pepper=settings.key_pepper.get_secret_value(),
                               expires_at_us=expires)
    typer.echo(token)
    typer.echo(f"key id {key_id}, role {role}: store it now, it is not shown again", err=True)


@keys_app.command("revoke")
def keys_revoke(key_id: str) -> None:
    """Revoke a key by its id (`eum keys list`), or by the key itself pasted (its id is in
    it; it is never printed back). Every worker refuses it within 5 s (their caches)."""
    from ledger.keys import KEY_PREFIX, list_keys, revoke_key
    from rules.timeutil import rfc3339

    shown = key_id
    if key_id.startswith(KEY_PREFIX) and key_id.count("_") >= 2:
        key_id = key_id[len(KEY_PREFIX):].split("_", 1)[0]
        shown = f"{key_id} (the key given)"
    engine = _engine()
    if revoke_key(engine, key_id):
        typer.echo(f"revoked {shown}; every worker refuses it within 5 s")
        return
    # An operator revoking a leaked key must tell "done already" from "no such key" (a
    # typo: the key still works); both said "no active key" (the keys audit).
    known = {k["key_id"]: k for k in list_keys(engine)}
    if key_id in known:
        typer.echo(f"key {shown} was already revoked, at {rfc3339(known[key_id]['revoked_at_us'])}")
        return
    typer.echo(f"error: no key {shown if len(key_id) <= 40 else key_id[:12] + '...'}: nothing revoked "
               "(`eum keys list` shows the ids)", err=True)
    raise typer.Exit(1)


@keys_app.command("list")
def keys_list() -> None:
    """One line a key: id, role, state, when it stopped or stops working, and its holder's name."""
    from ledger.keys import list_keys, name_problem
    from rules.timeutil import rfc3339

    def second(us: int) -> str:  # to the second: the lines stay aligned
        return rfc3339(us - us % 1_000_000)

    now_us = time.time_ns() // 1000
    for k in list_keys(_engine()):
        expires = k["expires_at_us"]
        expired = expires is not None and expires <= now_us
        state = "revoked" if k["revoked_at_us"] else "expired" if expired else "active"
        # When, too: an operator rotating keys sees which stop next week (it said only "active").
        when = (f"revoked {second(k['revoked_at_us'])}" if k["revoked_at_us"] else "never expires" if expires is None
                else f"{'expired' if expired else 'expires'} {second(expires)}")
        name = k["name"]  # one issued before such names were refused is shown escaped, not as it would print
        shown = name if name_problem(name) is None else f"{ascii(name)}  (name holds characters now refused)"
        typer.echo(f"{k['key_id']}  {k['role']:<16} {state:<8} {when:<33} {shown}")


DEMO_KEY_DAYS = 7


def _not_in_production(settings, what: str) -> None:
    if settings.environment == "production":
        typer.echo(f"error: {what} is for trying the service out, not for EUM_ENVIRONMENT=production", err=True)
        raise typer.Exit(2)


@app.command("demo")
def demo() -> None:
    """Load demo data (members in all ten districts, merchants, top-ups, and the shipped grant
    programs, each approved by a second demo actor) into an empty database. Exit 2, nothing
    loaded, when the database already holds data (`eum.demo.held_data`); 3 when the
    database stopped it (anything loaded before then stays)."""
    settings = _settings()
    _not_in_production(settings, "demo data")
    _check_policy_dir(settings)  # the files first: a refused demo makes no book (`_engine` would)
    _check_demo_grants(settings)
    _load_demo(settings, refuse_held=True)


def _check_demo_grants(settings) -> None:
    """The shipped grant program files the demo loads, read before any book is made or
    migrated: one that does not parse is an `error:` line naming it, exit 2 (it was a
    PolicyInvalid traceback, exit 1, once a new book had been made and migrated)."""
    from rules.loader import PolicyInvalid, load_grant_program_dir

    try:
        load_grant_program_dir(settings.policies_dir / "grants")
    except PolicyInvalid as invalid:
        typer.echo(f"error: EUM_POLICIES_DIR: {invalid}", err=True)
        raise typer.Exit(2) from None


def _load_demo(settings, refuse_held: bool = False) -> bool:
    """The demo data into an empty database: True when it was loaded now. On a database
    that already holds data nothing is loaded: `eum demo` (`refuse_held`) refuses, one
    `error:` line and exit 2 (it said "not loaded" on stdout and exited 0, read as done
    by a script that loads the demo); `serve --demo` says so and returns False, and
    serves (scripts/serve.sh passes --demo at every start)."""
    from ledger.book import Book
    from eum import demo as demo_data

    engine = _engine(migrated=False)
    try:
        _migrate_if_new(settings.database_url)
        if held := demo_data.held_data(engine):
            if refuse_held:
                typer.echo(f"error: the database already holds {held}: demo data goes into an empty database only; "
                           "nothing loaded (an empty one: point EUM_DATABASE_URL at a SQLite file not there yet, "
                           "or a new PostgreSQL database)", err=True)
                raise typer.Exit(2)
            typer.echo("database already has data; demo data not loaded")
            return False
        counts = demo_data.load(engine, Book(engine, _book_timeline(settings, engine)),
                                grants_dir=settings.policies_dir / "grants")
    except _database_errors() as error:
        _stopped_by_database(error, "anything loaded before it stopped stays, and the demo loads into an "
                                    "empty database only")
    except demo_data.DemoRefused as refused:  # the book refused its top-ups: said, not a traceback
        typer.echo(f"error: {refused}", err=True)
        raise typer.Exit(1) from None
    finally:
        engine.dispose()
    typer.echo(f"demo data loaded: {counts['members']:,} members, {counts['merchants']:,} merchants, "
               f"{counts['topups']:,} top-ups, {counts['grant_programs']:,} grant programs")
    return True


LISTEN_BACKLOG = 2048  # uvicorn's default: `_listen` listens with it, and each worker again (asyncio)


def _listen(host: str, port: int) -> socket.socket:
    """The service's listening socket, bound and listening before `serve` touches the
    database (a SQLite book's file is made by the first connection), migrates, loads the
    demo or makes a key, and handed to uvicorn as it is (`_serve_on`): the port is taken
    once. A host and port it cannot listen on (another service there, an unknown host) is
    one `error:` line and exit 2: the keys `--demo` prints were made and shown even when
    the service then could not start, and later an empty book file was left. It was tried
    and let go, and uvicorn bound it again after the migration, so a process that took the
    port meanwhile made uvicorn fail its own way (a traceback-free exit 3 naming errno 98,
    the book migrated and the demo's keys printed). Bound as uvicorn binds (IPv6 for a
    host with a colon, SO_REUSEADDR) and listening at once: on Linux a socket only bound
    with SO_REUSEADDR does not hold its port, another one with it binds the same port and
    the first to listen has it. A connection made before the workers serve waits in the
    backlog (it was refused)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(LISTEN_BACKLOG)
    except OSError as error:
        sock.close()
        typer.echo(f"error: cannot listen on {host}:{port} ({error.strerror or error}); nothing was started", err=True)
        raise typer.Exit(2) from None
    return sock


def _demo_keys(settings, host: str, port: int) -> None:
    """A card-app and an admin key to try the demo data just loaded, printed with a curl
    for each (they expire in DEMO_KEY_DAYS)."""
    import datetime as dt

    from ledger.keys import create_key
    from rules.timeutil import SEOUL

    pepper = settings.key_pepper.get_secret_value()
    engine = _engine()
    week = int((time.time() + DEMO_KEY_DAYS * 86_400) * 1_000_000)  # printed keys do not live for ever
    try:
        _, card = create_key(engine, name="demo card app", role="card-app", pepper=pepper, expires_at_us=week)
        _, admin = create_key(engine, name="demo admin", role="admin", pepper=pepper, expires_at_us=week)
    finally:
        engine.dispose()
    typer.echo(f"\n  card-app key: {card}\n  admin key:    {admin}\n")
    typer.echo(f"  try: curl -s -X POST http://{host}:{port}/v1/payments -H 'Authorization: Bearer {card}' "
               "-H 'Content-Type: application/json' -d '{\"payment_id\": \"try-now\", \"member_id\": "
               "\"m-seo-001\", \"merchant_id\": \"shop-seo-001\", \"amount\": 17000, "
               f"\"occurred_at\": \"{dt.datetime.now(SEOUL).replace(microsecond=0).isoformat()}\"}}'\n")
    typer.echo(f"  a relief grant (the shipped programs are loaded, approved by a second demo actor): "
               f"curl -s -X POST http://{host}:{port}/v1/grant-programs/coupon-2025-r1/disbursements "
               f"-H 'Authorization: Bearer {admin}' -H 'Content-Type: application/json' -d "
               "'{\"disbursement_id\": \"try-d1\", \"member_id\": \"m-ganghwa-001\", \"attributes\": "
               "{\"income_status\": \"general\", \"district\": \"ganghwa\"}, "
               "\"occurred_at\": \"2025-08-01T09:00:00+09:00\"}'\n")


@app.command("serve")
def serve(host: str = "127.0.0.1",
          port: Annotated[int, typer.Option(min=1, max=65_535, help="TCP port")] = 8000,
          workers: Annotated[int, typer.Option(min=1, help="uvicorn worker processes")] = 1,
          with_demo: Annotated[bool, typer.Option("--demo", help="load demo data and print keys to try it")] = False) -> None:
    """Migrate the database and serve the HTTP API."""
    settings = _settings()
    if with_demo:
        _not_in_production(settings, "--demo (demo data and two printed keys)")
    _preflight(settings)
    if with_demo:
        _check_demo_grants(settings)
    listening = _listen(host, port)  # before the database is touched: a refused start leaves no file
    try:
        _serve_bound(settings, listening, host, port, workers, with_demo)
    finally:
        listening.close()  # uvicorn closes it at its shutdown; a start stopped before serving, here


def _serve_bound(settings, listening: socket.socket, host: str, port: int, workers: int, with_demo: bool) -> None:
    """`serve` past its port: the database and Redis checked, the book migrated, the demo
    loaded, and uvicorn serving on `listening` (`_serve_on`)."""
    import uvicorn

    _check_services(settings)
    checked = _check_policy_files_before_migrating(settings)
    _migrate(settings.database_url)
    if not checked:  # a new database: its files against what the migrations left
        _check_policy_files(settings)
    if with_demo:
        if _load_demo(settings):
            _demo_keys(settings, host, port)
        else:
            typer.echo("no keys were made (they come with the demo data, loaded into an empty database only): make "
                       "one with `eum keys create --name NAME --role card-app` (or `--role admin`)")
    if workers > 1 and settings.is_sqlite:
        typer.echo("SQLite serves one worker; use PostgreSQL (EUM_DATABASE_URL) for more", err=True)
        workers = 1
    metrics_dir = None
    if workers > 1 and "PROMETHEUS_MULTIPROC_DIR" not in os.environ:
        metrics_dir = os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="eum-metrics-")
    os.environ.setdefault("EUM_GC_FREEZE", "1")  # workers: start-up heap out of the collector (api/services.py)
    options = dict(factory=True, host=host, port=port, workers=workers, log_level="info",  # info: a dead worker
                   access_log=False, server_header=False, backlog=LISTEN_BACKLOG)          # is logged
    if (log_config := uvicorn_log_config(settings.log_json)) is not None:  # uvicorn's lines as JSON too
        options["log_config"] = log_config
    try:
        _serve_on(uvicorn.Config("api.app:create_app", **options), listening)
    finally:
        if metrics_dir is not None:  # the workers' metric files: this run's only
            import shutil

            shutil.rmtree(metrics_dir, ignore_errors=True)


def _serve_on(config, listening: socket.socket) -> None:
    """uvicorn.run's serving, on the socket `serve` bound and listened on (`_listen`)
    rather than one uvicorn binds again: one worker serves it in this process, more are
    spawned by uvicorn's supervisor, each given it (`Multiprocess(sockets=...)`, as
    uvicorn.run does with the socket it binds for workers). A start that failed exits 3,
    as uvicorn.run's. uvicorn logs "running on" only for a socket it bound: said here.
    Not uvicorn's `fd=`: it takes the fd as an AF_UNIX socket (`socket.fromfd`), and
    asyncio then sets no TCP_NODELAY on the connections it accepts."""
    import logging

    import uvicorn

    listening.set_inheritable(True)  # as uvicorn's own bind_socket leaves it for its workers
    address = listening.getsockname()
    logging.getLogger("uvicorn.error").info(
        "Uvicorn running on http://%s:%d (Press CTRL+C to quit)",
        f"[{address[0]}]" if listening.family == socket.AF_INET6 else address[0], address[1])
    if config.workers > 1:
        _supervise(config, listening)
        return
    server = uvicorn.Server(config)
    try:
        server.run(sockets=[listening])
    except KeyboardInterrupt:  # uvicorn raises the SIGINT it handled again once shut down
        pass
    if not server.started:
        from uvicorn.config import STARTUP_FAILURE

        sys.exit(STARTUP_FAILURE)


def _supervise(config, listening: socket.socket) -> None:
    """uvicorn.run's way of serving with N workers, and exit 3 when a worker failed its
    start: uvicorn's supervisor then stops the others and returns as if asked to stop, so
    `eum serve --workers 2` (the Docker image's command) ended with exit 0 and supervisors
    saw a clean stop."""
    from uvicorn.config import STARTUP_FAILURE
    from uvicorn.supervisors.multiprocess import Multiprocess

    # The workers watch this process and stop once it is gone (api/app.py, _watch_supervisor):
    # uvicorn's workers outlive a supervisor killed alone, and hold the port.
    os.environ["EUM_SUPERVISOR_PID"] = str(os.getpid())
    supervisor = Multiprocess(config, sockets=[listening])
    supervisor.run()
    if any(process.exitcode == STARTUP_FAILURE for process in supervisor.processes):
        typer.echo("error: a worker failed its start (its log above); the service stopped", err=True)
        raise typer.Exit(3)


# Finance: eum settle --date, eum reconcile FILE, eum report --month (settlement/cli.py).
from settlement.cli import register as _register_finance  # noqa: E402

_register_finance(app)


def main() -> None:
    """The `eum` command (pyproject's entry point): refusals that surface from deep
    inside a command are one `error:` line and exit 2, as the commands' own are; a
    database that cannot be reached or stops answering is one line and exit 3 (it was a
    traceback and exit 1, which `db check` gives for BAD and `audit-verify` for BROKEN)."""
    try:
        sys.exit(app())
    except Exception as error:
        # Each library's error is looked for only where that library was imported (it
        # could not have raised otherwise), so that `eum --help` and the commands that
        # open no database don't import alembic and psycopg for this (~0.45 s at every
        # start; tests/test_cli_finance_errors.py, `test_help_imports_no_database_library`).
        if _raised(error, "ledger.audit", "UnkeyedAppend"):
            typer.echo(f"error: {error.detail}", err=True)
            sys.exit(2)
        if _raised(error, "alembic.util.exc", "CommandError"):
            if "Can't locate revision" not in str(error):
                raise
            typer.echo(f"error: the database is at a migration this release does not have ({error}): a newer "
                       "release upgraded it; run that release, or restore the backup taken before the upgrade",
                       err=True)
            sys.exit(2)
        # psycopg's own: settlement reads the book past SQLAlchemy
        if _raised(error, "sqlalchemy.exc", "DBAPIError") or _raised(error, "psycopg", "Error"):
            if behind := _migrations_behind():
                _not_migrated(behind, error)
            _stopped_there(error)
        raise


def _raised(error: Exception, module: str, name: str) -> bool:
    """Whether `error` is `module.name`'s, looked up only if `module` has been imported."""
    kind = getattr(sys.modules.get(module), name, None)
    return isinstance(kind, type) and isinstance(error, kind)


def _stopped_there(error: Exception) -> None:
    """A database that does not answer or broke off (not the command's fault): one line,
    exit 3; any other error returns, for the caller to raise."""
    import sqlite3

    import psycopg
    from sqlalchemy.exc import InterfaceError, OperationalError

    if isinstance(error, (OperationalError, InterfaceError, psycopg.OperationalError, psycopg.InterfaceError)) \
            or type(getattr(error, "orig", None)) is sqlite3.DatabaseError:  # "malformed", "not a database"
        typer.echo(f"error: cannot use the database ({_first_line(error)}); the command stopped there", err=True)
        sys.exit(3)


def _not_migrated(behind: str, error: Exception) -> NoReturn:
    """The database is behind this release's migrations: one line, exit 2."""
    cause = getattr(error, "orig", None) or error
    typer.echo(f"error: the database is not migrated to this release ({behind}): run `eum db upgrade` "
               f"(README, Upgrading); the command stopped at {type(cause).__name__}", err=True)
    sys.exit(2)


def _first_line(error: Exception) -> str:
    """A database error's reason: the driver's first line, not SQLAlchemy's wrapping."""
    return str(getattr(error, "orig", None) or error).strip().splitlines()[0][:300]


def _migration_state(url: str | None = None) -> tuple[str | None, str, bool] | None:
    """(the database's migration, this release's head, whether this release has the
    database's) for `url` (by default EUM_DATABASE_URL's); None when it cannot be read."""
    try:
        # alembic's own reading of the scripts and the version table costs every command
        # 0.16 s (quiet machine) of imports and script loading; these read the same
        # (tests/test_migration_state.py)
        from ledger.db import make_engine, reader, release_revisions, stored_revision

        url = url or get_settings().database_url
        revisions = release_revisions()
        engine = make_engine(url)
        try:
            # read only: on SQLite no write lock, which another process's write (a
            # settlement run) would hold it waiting for (`serve` reads it before migrating)
            with reader(engine).connect() as conn:
                current = stored_revision(conn)
        finally:
            engine.dispose()
        return current, revisions[-1], current is None or current in revisions
    except Exception:  # noqa: BLE001  (the original error is what matters then)
        return None


def _migrations_behind(url: str | None = None) -> str | None:
    """'at X, this release needs Y' when the database is not at the code's head."""
    state = _migration_state(url)
    if state is None or state[0] == state[1]:
        return None
    return f"at {state[0] or 'none'}, this release needs {state[1]}"


if __name__ == "__main__":  # `python -m eum.cli`, as `python -m eum`: it ran nothing and exited 0
    main()
