"""Whether a book is at this release's migrations, read without alembic
(`ledger.db.release_revisions`, `ledger.db.stored_revision`): every `eum` command asks
before it reads or writes, and alembic's own reading cost each one 0.16 s on a quiet machine.
Held here to what alembic reads from the same scripts and the same databases."""

import os
import subprocess
import sys

import pytest
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import text

from ledger.db import alembic_config, make_engine, migrate, release_revisions, stored_revision, stored_revisions


def test_the_release_s_revisions_are_alembic_s_line_oldest_first():
    """Each script's revision is its file's number and follows the one before: the line
    alembic walks down from its head, in the order it was written."""
    scripts = ScriptDirectory.from_config(alembic_config("sqlite://"))
    line = [script.revision for script in scripts.walk_revisions()][::-1]  # walk: head first
    assert release_revisions() == tuple(line), (release_revisions(), line)
    assert release_revisions()[-1] == scripts.get_current_head()
    for script in scripts.walk_revisions():
        assert script.path.rsplit("/", 1)[-1].startswith(f"{script.revision}_"), script.path


def _both(url: str) -> tuple[str | None, str | None]:
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            context = MigrationContext.configure(conn)
            assert stored_revisions(conn) == list(context.get_current_heads())
            return stored_revision(conn), context.get_current_revision()
    finally:
        engine.dispose()


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def test_the_stored_revision_is_the_one_alembic_reads(backend, tmp_path):
    """A database never migrated, one at an old migration, one at head and one a newer
    release migrated: the same answer as alembic's, and two rows refused as it refuses
    them."""
    from tests.conftest import create_pg_database, drop_pg_database

    made = []

    def new_book(label: str) -> str:
        if backend == "sqlite":
            return f"sqlite:///{tmp_path / label}.db"
        name, url = create_pg_database()
        made.append(name)
        return url

    try:
        empty, old, head = new_book("empty"), new_book("old"), new_book("head")
        make_engine(empty).dispose()
        migrate(old, "0010")
        migrate(head)
        assert _both(empty) == (None, None)
        assert _both(old) == ("0010", "0010")
        assert _both(head) == (release_revisions()[-1],) * 2
        engine = make_engine(head)
        try:
            with engine.begin() as conn:
                conn.execute(text("UPDATE alembic_version SET version_num = '0099'"))
            assert _both(head) == ("0099", "0099")
            with engine.begin() as conn:
                conn.execute(text("INSERT INTO alembic_version (version_num) VALUES ('0098')"))
            with engine.connect() as conn:
                heads = MigrationContext.configure(conn).get_current_heads()
                assert sorted(stored_revisions(conn)) == sorted(heads) == ["0098", "0099"]
                with pytest.raises(ValueError, match="2 revisions"):
                    stored_revision(conn)
        finally:
            engine.dispose()
    finally:
        for name in made:
            drop_pg_database(name)


def test_a_command_on_a_migrated_book_imports_no_alembic(tmp_path):
    """`eum keys list` on a book at head: it checks the migration and reads the keys, and
    alembic is not imported for it."""
    url = f"sqlite:///{tmp_path / 'eum.db'}"
    migrate(url)
    code = ("import os, sys\n"
            f"os.environ['EUM_DATABASE_URL'] = {url!r}\n"
            "sys.argv = ['eum', 'keys', 'list']\n"
            "from eum.cli import main\n"
            "try:\n    main()\nexcept SystemExit as ended:\n    assert not ended.code, ended.code\n"
            "print('alembic' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "EUM_LOG_LEVEL": "WARNING"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.splitlines()[-1] == "False", done.stdout[-500:]
