"""Alembic environment: runs migrations against the URL the caller configured."""

from alembic import context
from sqlalchemy import create_engine, pool

from ledger.schema import metadata
import settlement.schema  # noqa: F401

config = context.config
MIGRATION_LOCK_KEY = 7_301_004  # PostgreSQL advisory lock (ledger.audit's is 7_301_001, settlement's 7_301_002)
MIGRATION_CONNECT_TIMEOUT_S = 10


def run_migrations_offline() -> None:
    context.configure(url=config.get_main_option("sqlalchemy.url"), target_metadata=metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    url = config.get_main_option("sqlalchemy.url")
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url[len("postgresql://"):]
    postgres = url.startswith("postgresql")
    # A bounded connect (a database that accepts and never answers would hang a start
    # silently), and one migrator at a time: replicas starting together on a first
    # deploy wait for each other, then find the schema at head.
    engine = create_engine(url, poolclass=pool.NullPool,
                           connect_args={"connect_timeout": MIGRATION_CONNECT_TIMEOUT_S} if postgres else {})
    with engine.connect() as connection:
        if postgres:
            connection.exec_driver_sql(f"SELECT pg_advisory_lock({MIGRATION_LOCK_KEY})")
            connection.commit()  # the lock is the session's; alembic runs its own transaction
        context.configure(connection=connection, target_metadata=metadata, render_as_batch=url.startswith("sqlite"))
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
