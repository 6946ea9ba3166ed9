"""Engines for the book of record: SQLite (embedded default) or PostgreSQL."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import parse_qsl, unquote, urlsplit

from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import URL, make_url
from sqlalchemy.util import asbool

# alembic is imported where a migration runs, not here: ~0.1-0.4 s (a quiet machine, a
# loaded one) that every `eum` command and worker paid at start
# (tests/test_cli_finance_errors.py, `test_help_imports_no_database_library`)
if TYPE_CHECKING:
    from alembic.config import Config

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
VERSION_TABLE = "alembic_version"  # alembic's default, which ledger/migrations/env.py keeps


# A dead peer on a real network (no RST, no FIN) is noticed by the kernel: keepalive
# probes on an idle connection, and tcp_user_timeout for data sent but never
# acknowledged. Without them a worker could wait on a lost connection for minutes.
TCP_KEEPALIVES = {"keepalives": 1, "keepalives_idle": 5, "keepalives_interval": 2, "keepalives_count": 3}
TCP_USER_TIMEOUT_MS = 10_000
# PostgreSQL keeps some plans per connection until the tables' statistics change: a
# foreign-key check planned while `ledger_txns` was a page or two stays a sequential
# scan for the connection's life if nothing analyzes the table (autovacuum off). A
# connection older than this is replaced (the pool's recycle; the writers' kept
# connection, `ledger.book.PinnedConnection`), so no plan outlives it (docs/design.md).
CONNECTION_MAX_AGE_S = 600
# Every session of the engine is named so (an operator's own name in the URL is kept
# after it): the settlement's watermark waits for these sessions' open transactions,
# which may be recording, and not for other read-only sessions (settlement.service).
APPLICATION_NAME = "eum"


def error_kind(error: BaseException) -> str:
    """A database error as a log line tells it: its class, SQLSTATE and constraint; for a
    lost, refused or timed-out connection (OperationalError) also its first line, which
    names the host and port, never a row. Not the rest: on PostgreSQL an integrity error's
    DETAIL quotes the row (`Key (account_id)=(member/...)`, `Failing row contains (...)`),
    a trigger's message names the accounts it refused, and a data error's first line
    quotes the value, a member id among them (docs/design.md, Logs)."""
    from sqlalchemy.exc import OperationalError

    orig = getattr(error, "orig", None) or error
    parts = [type(orig).__name__]
    if sqlstate := getattr(orig, "sqlstate", None):
        parts.append(f"SQLSTATE {sqlstate}")
    if constraint := getattr(getattr(orig, "diag", None), "constraint_name", None):
        parts.append(f"constraint {constraint}")
    text = " ".join(parts)
    if isinstance(error, OperationalError):
        text += ": " + str(orig).strip().split("\n", 1)[0][:200]
    return text


def where(url: str) -> str:
    """Where a database URL points, for a log line: its host, port and database (a SQLite
    book's path), never its password, in the URL's user part or in its query
    (`?password=...`, which libpq and SQLAlchemy take too)."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        return f"sqlite:///{parsed.database or ''}"
    host = f"[{parsed.host}]" if parsed.host and ":" in parsed.host else parsed.host or ""
    return f"{host}{f':{parsed.port}' if parsed.port else ''}/{parsed.database or ''}"


def make_engine(url: str, *, pool_size: int = 4, statement_timeout_ms: int = 5_000, connect_timeout_s: int = 3,
                pool_timeout_s: float = 5.0, connection_max_age_s: int = CONNECTION_MAX_AGE_S) -> Engine:
    """Every wait is bounded: opening a connection (`connect_timeout_s`), waiting for one
    from the pool (`pool_timeout_s`), a statement or a lock on the server
    (`statement_timeout_ms`), a silent network (keepalives, tcp_user_timeout). A pooled
    connection is checked before use (pre-ping), so after a database restart the first
    request on each stale connection reconnects instead of failing. A connection older
    than `connection_max_age_s` is replaced at checkout (`CONNECTION_MAX_AGE_S`)."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        return _sqlite_engine(url)
    if parsed.drivername == "postgresql":
        url = str(parsed.set(drivername="postgresql+psycopg"))
    name = parsed.query.get("application_name")
    name = name if isinstance(name, str) and name.startswith(APPLICATION_NAME) else (
        APPLICATION_NAME if name is None else f"{APPLICATION_NAME}:{name}")
    return create_engine(
        url,
        # A database error's text names the statement, never its values (member ids,
        # amounts): such errors reach the logs (docs/design.md, Logs).
        hide_parameters=True,
        pool_size=pool_size,
        max_overflow=pool_size,
        pool_pre_ping=True,
        pool_recycle=connection_max_age_s,
        pool_timeout=pool_timeout_s,
        connect_args={
            "connect_timeout": connect_timeout_s,
            "options": f"-c statement_timeout={statement_timeout_ms} -c lock_timeout={statement_timeout_ms}",
            "tcp_user_timeout": TCP_USER_TIMEOUT_MS,
            "application_name": name,
            # psycopg prepares a query run 5 times on a connection, and on that
            # connection's next ROLLBACK sends DEALLOCATE ALL, which takes the book's own
            # statements with it (`pgstore.Pipeline`, named and kept per connection). A
            # pooled connection that had served reads became the writer's: the first
            # rollback of a batch (a lock timeout, a retried race) left the attempt after
            # it failing as "prepared statement lost", one of the batch's three attempts
            # spent (a lock held 10 s: the batch 503 at its third attempt). The book
            # prepares what it runs often itself; psycopg prepares nothing.
            "prepare_threshold": None,
            **TCP_KEEPALIVES,
        },
    )


def encoding_problem(url: str, connect_timeout_s: int = 3) -> str | None:
    """Why a PostgreSQL database cannot hold the book's text, or None (SQLite: always
    UTF-8). Its encoding must be UTF8: EUC_KR lacks characters names and the shipped
    policies use (an en dash; 똠, 뷁), so the start failed with a traceback or a merchant
    of such a name was a 500, and SQL_ASCII hands the driver bytes, not text. So must the
    client encoding the driver is given (PGCLIENTENCODING, a URL's client_encoding): the
    server converts to it and fails where it lacks a character. Read from the connection's
    parameters, before SQLAlchemy's first query, which SQL_ASCII's bytes break."""
    import psycopg

    parsed = make_url(url)
    if parsed.get_backend_name() != "postgresql":
        return None
    conninfo = parsed.set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(conninfo, connect_timeout=connect_timeout_s) as conn:
        server = conn.info.parameter_status("server_encoding")
        client = conn.info.parameter_status("client_encoding")
    if server != "UTF8":
        return (f"the database's encoding is {server}, not UTF8, and the book's Korean text would fail or be "
                "garbled in it: create it anew with CREATE DATABASE name ENCODING 'UTF8' TEMPLATE template0 "
                "and point EUM_DATABASE_URL at it; nothing was done")
    if client != "UTF8":
        return (f"the connection's client encoding is {client}, not UTF8 (set by PGCLIENTENCODING or the URL's "
                "client_encoding): unset it, or set it to UTF8; nothing was done")
    return None


def database_trouble(exc: BaseException) -> bool:
    """An error that says the database cannot be reached or did not answer in time (a
    refused or dropped connection, a restart, a statement or lock timeout, an exhausted
    pool), as opposed to a bug or a constraint. A retry later may work; a write's
    retry must carry the same id (it may have committed)."""
    import psycopg
    from sqlalchemy import exc as sa

    if isinstance(exc, (sa.OperationalError, sa.InterfaceError, sa.TimeoutError,
                        psycopg.OperationalError, psycopg.InterfaceError)):
        return True
    return isinstance(exc, sa.DBAPIError) and exc.connection_invalidated


def _sqlite_uri(parsed: URL) -> tuple[str, dict[str, str]] | None:
    """With `uri=true`: the name SQLAlchemy hands SQLite (a `file:` URI's options are
    put after its `?`) and, for a `file:` URI, its parameters as SQLite reads them (the
    first of two); None without `uri=true`."""
    if not asbool(parsed.query.get("uri", False)):
        return None
    args, _ = parsed.get_dialect()().create_connect_args(parsed)
    name = args[0]
    params: dict[str, str] = {}
    if name.startswith("file:"):
        for key, value in parse_qsl(urlsplit(name).query, keep_blank_values=True):
            params.setdefault(key, value)
    return name, params


def book_tag(engine: Engine) -> str:
    """A short name of the book an engine writes, for keys other services may share (the
    answers in Redis, `api.fastpath.IdempotencyCache`): two books never get one, a book
    gets the same one from every worker of a service. PostgreSQL: where the URL points
    and the database's oid (a database dropped and made again, or restored into a new
    one, is another book); SQLite: the file's device and inode (a copy is another), or
    this process's own for a book in memory. A service on two spellings of one address
    gets two tags: cache misses, each answered by the book."""
    import hashlib
    import os
    import uuid

    url = engine.url
    if url.get_backend_name() == "sqlite":
        path = sqlite_file(url)
        if path is None:
            return uuid.uuid4().hex[:12]
        stat = os.stat(path)
        identity = f"sqlite:{os.path.realpath(path)}:{stat.st_dev}:{stat.st_ino}"
    else:
        with engine.connect() as conn:
            oid = conn.exec_driver_sql("SELECT oid FROM pg_database WHERE datname = current_database()").scalar_one()
        identity = f"pg:{where(url.render_as_string(hide_password=True))}:{oid}"
    return hashlib.sha256(identity.encode()).hexdigest()[:12]


def sqlite_file(url: str | URL) -> str | None:
    """The file a SQLite URL's book is in, as SQLite opens it; None for a book in memory
    (`sqlite://`, `:memory:`, a `file::memory:`, `mode=memory` or `vfs=memdb` URI) and
    for any other backend.

    With `uri=true` the database part is an SQLite URI (`file:/srv/eum.db`,
    `file:var/eum.db`, `file:///srv/eum.db`): the file is its path, %-escapes decoded as
    SQLite decodes them. (Taken as a path, the URI made a folder named `file:` in the
    current one, `eum serve` on a read-only URI, and a correction's lock file was looked
    for under it.) With `uri=true` and a name that is not a `file:` URI, SQLAlchemy puts
    the URI's options in the name (`eum.db?mode=ro`), and SQLite opens that name as it is."""
    parsed = make_url(url) if isinstance(url, str) else url
    database = parsed.database
    if parsed.get_backend_name() != "sqlite" or not database or database == ":memory:":
        return None
    uri = _sqlite_uri(parsed)
    if uri is None:
        return database
    name, params = uri
    if not name.startswith("file:"):
        return name
    if params.get("mode") == "memory" or params.get("vfs") == "memdb":
        return None
    path = unquote(urlsplit(name).path)
    return None if path in ("", ":memory:") else path


def _sqlite_folder(url: str) -> None:
    """SQLite creates the database file, not the folder it goes in (`var/` on a fresh
    clone). A URI whose book SQLite does not create (`mode=ro`, `mode=rw`: it must be
    there; in memory) makes nothing."""
    parsed = make_url(url)
    path = sqlite_file(parsed)
    if path is None:
        return
    uri = _sqlite_uri(parsed)  # a name that is not a `file:` URI has no parameters: SQLite creates it
    if uri is not None and uri[1].get("mode", "rwc") != "rwc":
        return
    folder = Path(path).parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as error:
        # mkdir names only the part that is in the way: say what it is to the path
        blocking = next((p for p in (folder, *folder.parents) if p.exists() and not p.is_dir()), None)
        if blocking is None:
            raise
        raise NotADirectoryError(f"{blocking} is a file, not a folder: the SQLite database {path} "
                                 "cannot go under it") from error


def _sqlite_engine(url: str) -> Engine:
    _sqlite_folder(url)
    options = {}
    if make_url(url).query.get("mode") == "memory":
        # the pool SQLAlchemy 2.0 and 2.1 choose for a `mode=memory` URI, a connection per
        # thread, named: 2.1 deprecates choosing it by the query, and a later release's
        # QueuePool would hand a thread's book to another thread
        from sqlalchemy.pool import SingletonThreadPool

        options["poolclass"] = SingletonThreadPool
    engine = create_engine(url, hide_parameters=True, connect_args={"check_same_thread": False, "timeout": 30},
                           **options)

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn, _record):
        # Let SQLAlchemy, not pysqlite, decide when transactions begin (see "begin").
        dbapi_conn.isolation_level = None
        cursor = dbapi_conn.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        # FULL: a commit is on disk before it is answered, as on PostgreSQL.
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn):
        # IMMEDIATE takes the write lock up front: the one-writer rule of SQLite becomes
        # the serialisation point, as row locks are on PostgreSQL. Readers (see
        # `reader`) begin deferred and never wait for a writer, thanks to WAL.
        if conn.get_execution_options().get("readonly"):
            conn.exec_driver_sql("BEGIN")
        else:
            conn.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


def dialect_insert(conn: Connection):
    """The dialect's `insert`, which has `on_conflict_do_nothing` (insert-if-absent)."""
    return pg_insert if conn.dialect.name == "postgresql" else sqlite_insert


def alembic_config(url: str) -> Config:
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def release_revisions() -> tuple[str, ...]:
    """This release's migrations, oldest first, the last its head. Each script's revision
    is its file name's number (`0024_leg_guard_planned_once.py` is '0024') and follows the
    one before, one line with no branches: `tests/test_migration_state.py` holds this to
    alembic's own reading of the scripts. Read without importing alembic and its scripts,
    0.16 s of every `eum` command's start on a quiet machine (`keys list` 0.66 s, now 0.50),
    which only asks whether the book is at this release's head."""
    return tuple(sorted(path.name.split("_", 1)[0] for path in (MIGRATIONS_DIR / "versions").glob("[0-9]*_*.py")))


def stored_revisions(conn: Connection) -> list[str]:
    """The migrations alembic's version table holds (what `MigrationContext.get_current_heads`
    reads): one row at most for these scripts, none for a database never migrated."""
    from sqlalchemy import inspect, text

    if not inspect(conn).has_table(VERSION_TABLE):
        return []
    return list(conn.execute(text(f"SELECT version_num FROM {VERSION_TABLE}")).scalars())


def stored_revision(conn: Connection) -> str | None:
    """The migration the database is at (what `MigrationContext.get_current_revision`
    reads); None for a database never migrated. More than one row (branches, which these
    scripts never make) is refused, as alembic refuses it."""
    rows = stored_revisions(conn)
    if len(rows) > 1:
        raise ValueError(f"the version table holds {len(rows)} revisions: {sorted(rows)}")
    return rows[0] if rows else None


class NewerMigration(Exception):
    """The database is at a migration this release does not have: a newer release
    upgraded it. The text is the one every `eum` command refuses such a database with."""

    def __init__(self, revision: str):
        self.revision = revision
        super().__init__(f"the database is at a migration this release does not have ({revision}): a newer release "
                         "upgraded it; run that release, or restore the backup taken before the upgrade; nothing "
                         "was done")


def migrate(url: str, revision: str = "head") -> None:
    """Upgrade to `revision`. Refused (`NewerMigration`) before alembic runs when the
    database is at a revision these scripts do not have: alembic's own "Can't locate
    revision" reached `eum db upgrade` and `eum serve` as a traceback (the upgrade audit)."""
    from alembic import command

    _sqlite_folder(url)  # migrations run first, on an engine of their own
    config = alembic_config(url)
    _refuse_newer(url)
    command.upgrade(config, revision)


def _refuse_newer(url: str) -> None:
    engine = make_engine(url)
    try:
        with reader(engine).connect() as conn:  # on SQLite no write lock: another process's write is no wait
            stored = stored_revisions(conn)
    finally:
        engine.dispose()
    for revision in stored:
        if revision not in release_revisions():
            raise NewerMigration(revision)


def reader(engine: Engine) -> Engine:
    """The same engine for read-only work, each transaction reading one state of the book:
    an answer made of several statements (a balance and its month, a grant program's
    money, a history page) never mixes what it read before a commit with what it read
    after. On SQLite a deferred BEGIN, which does not take the write lock, reads one WAL
    snapshot. On PostgreSQL REPEATABLE READ READ ONLY: under READ COMMITTED each statement
    took a snapshot of its own. The driver puts both in the BEGIN it sends anyway (no
    round trip of their own), and they are reset when the connection goes back to the
    pool, so the writers' transactions stay READ COMMITTED (docs/design.md, Where state
    lives)."""
    if engine.dialect.name == "postgresql":
        return engine.execution_options(readonly=True, isolation_level="REPEATABLE READ", postgresql_readonly=True)
    return engine.execution_options(readonly=True)
