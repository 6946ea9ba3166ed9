"""Running a Hypothesis state machine against the real book, a fresh database per
example: a copy of one migrated SQLite file, or a PostgreSQL database made from a
migrated template (CREATE DATABASE ... TEMPLATE copies it in tens of milliseconds).
Fresh ids in one shared database would not do: budgets are global per source and
period, so one example's changes would leak into the next. A machine is a
`ServiceMachine`: it opens the service on `new_database()` -> (url, cleanup), which the
runners set, at the start of each example, and closes both in `teardown`."""

from __future__ import annotations

import shutil
import tempfile
import uuid
from pathlib import Path

import psycopg
from hypothesis import settings
from hypothesis.stateful import RuleBasedStateMachine, run_state_machine_as_test

from ledger.db import migrate
from tests.conftest import PG_ADMIN_URL, _pg_url, drop_pg_database, make_api


class ServiceMachine(RuleBasedStateMachine):
    """A state machine whose example runs against the service (`self.api`, the tests'
    client) on a database of its own."""

    new_database = None

    def __init__(self) -> None:
        super().__init__()
        self.url, self._cleanup = type(self).new_database()
        self.api = make_api(self.url)
        self.api.client.__enter__()

    def teardown(self) -> None:
        try:
            self.api.client.__exit__(None, None, None)
        finally:
            self._cleanup()


def run_on_sqlite(machine, machine_settings: settings) -> None:
    workdir = Path(tempfile.mkdtemp(prefix="eum-machine-"))
    template = workdir / "template.db"
    migrate(f"sqlite:///{template}")

    def new_database():
        path = workdir / f"{uuid.uuid4().hex}.db"
        shutil.copyfile(template, path)
        return f"sqlite:///{path}", lambda: [p.unlink(missing_ok=True) for p in workdir.glob(path.name + "*")]

    machine.new_database = staticmethod(new_database)
    try:
        run_state_machine_as_test(machine, settings=machine_settings)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def run_on_postgres(machine, machine_settings: settings, prefix: str = "eum_test_") -> None:
    template = f"{prefix}tpl_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{template}"')
    try:
        migrate(_pg_url(template))

        def new_database():
            name = f"{prefix}{uuid.uuid4().hex[:16]}"
            with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
                conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
            return _pg_url(name), lambda: drop_pg_database(name)

        machine.new_database = staticmethod(new_database)
        run_state_machine_as_test(machine, settings=machine_settings)
    finally:
        drop_pg_database(template)
