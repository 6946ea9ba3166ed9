"""Helpers for settlement tests and demos: throw-away databases and a generated book.

`temp_database("sqlite")` gives a migrated SQLite file; `temp_database("postgresql")` a
uniquely named PostgreSQL database (created on the `postgres` database with autocommit,
dropped at the end). `EUM_TEST_PG_URL` (as for the whole suite) overrides the admin URL.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from sqlalchemy import Engine

from ledger.book import Book
from ledger.db import make_engine, migrate
from ledger.commands import Outcome
from settlement import datagen

# The suite's one setting (README, tests/conftest.py); the older name still works.
PG_ADMIN_URL = os.environ.get("EUM_TEST_PG_URL") or os.environ.get(
    "EUM_TEST_PG_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres")


def postgres_available() -> bool:
    try:
        import psycopg

        with psycopg.connect(PG_ADMIN_URL, connect_timeout=2):
            return True
    except Exception:  # noqa: BLE001 — any failure means "not here"
        return False


@contextlib.contextmanager
def temp_database(backend: str) -> Iterator[str]:
    if backend == "sqlite":
        with tempfile.TemporaryDirectory(prefix="eum-settle-") as folder:
            url = f"sqlite:///{Path(folder) / 'book.db'}"
            migrate(url)
            yield url
        return
    import psycopg

    name = f"{os.environ.get('EUM_TEST_DB_PREFIX', 'eum_test_')}{uuid.uuid4().hex}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    base = PG_ADMIN_URL.rsplit("/", 1)[0]
    url = f"{base}/{name}"
    try:
        migrate(url)
        yield url
    finally:
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@dataclass
class GeneratedBook:
    engine: Engine
    book: Book
    plan: datagen.CommandPlan
    outcomes: list[Outcome]
    start: dt.date
    days: int


def generated_book(url: str, *, seed: int = 11, start: dt.date = dt.date(2026, 11, 2), days: int = 4,
                   members: int = 200, merchants: int = 40, payments_per_day: int = 150,
                   farming_on: dt.date | None = None) -> GeneratedBook:
    engine = make_engine(url)
    plan = datagen.command_plan(seed, start, days, members=members, merchants=merchants,
                                payments_per_day=payments_per_day)
    if farming_on is not None:
        datagen.plant_farming(plan, farming_on)
    with engine.begin() as conn:
        datagen.register(conn, plan)
    book = Book(engine, datagen.demo_timeline())
    outcomes: list[Outcome] = []
    for batch in plan.batches():
        outcomes.extend(book.execute(batch))
    return GeneratedBook(engine, book, plan, outcomes, start, days)
