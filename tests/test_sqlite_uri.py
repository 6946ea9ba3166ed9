"""A SQLite book named by an SQLite URI (`sqlite:///file:PATH?...&uri=true`): the file it
names is the URI's path, for the folder made for a new book, the read-only commands'
"no database there" check and a correction's lock file beside the book. Taken as a
path, `file:/srv/eum.db` made a folder named `file:` in the current folder (`eum serve`
on a read-only URI left one in the checkout), and a correction on such a book looked
for its lock file under it."""

from __future__ import annotations

import pytest
from sqlalchemy import text

from ledger import corrections
from ledger.db import make_engine, migrate, sqlite_file


@pytest.mark.parametrize("url,path", [
    ("sqlite:///var/eum.db", "var/eum.db"),
    ("sqlite:////srv/eum.db", "/srv/eum.db"),
    ("sqlite:///file:/srv/eum.db?mode=ro&uri=true", "/srv/eum.db"),
    ("sqlite:///file:var/eum.db?uri=true", "var/eum.db"),
    ("sqlite:///file:///srv/eum.db?uri=true", "/srv/eum.db"),
    ("sqlite:///file:var/eum.db", "file:var/eum.db"),  # no uri=true: SQLite takes the name as it is
    ("sqlite://", None),
    ("sqlite:///:memory:", None),
    ("sqlite:///file::memory:?cache=shared&uri=true", None),
    ("sqlite:///file:book?mode=memory&cache=shared&uri=true", None),
    ("postgresql://postgres@127.0.0.1:5432/eum", None),
])
def test_the_file_a_sqlite_url_names(url, path):
    assert sqlite_file(url) == path


def test_a_read_only_uri_makes_no_folder_and_a_writable_one_makes_the_books(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    book = tmp_path / "new" / "eum.db"
    migrate(f"sqlite:///file:{book}?uri=true")  # the book's folder made, not one named `file:`
    assert book.is_file()
    engine = make_engine(f"sqlite:///file:{tmp_path / 'gone' / 'eum.db'}?mode=ro&uri=true")
    try:
        with pytest.raises(Exception, match="unable to open"):
            with engine.connect() as conn:
                conn.execute(text("SELECT 1"))
    finally:
        engine.dispose()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new"]


def test_a_corrections_lock_file_lies_beside_a_uri_named_book(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    book = tmp_path / "eum.db"
    url = f"sqlite:///file:{book}?uri=true"
    migrate(url)
    engine = make_engine(url)
    try:
        with corrections._posting_lock(engine):
            assert (tmp_path / "eum.db.corrections-lock").is_file()
    finally:
        engine.dispose()
    assert not (tmp_path / "file:").exists()
