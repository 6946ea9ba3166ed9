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


@pytest.mark.parametrize("url,path", [
    # SQLAlchemy decodes the URL once and SQLite decodes its URI's path again: a `%`
    # left after the first is SQLite's escape, and the file is named by the second.
    ("sqlite:///file:/srv/my%2520book/eum.db?uri=true", "/srv/my book/eum.db"),
    ("sqlite:///file:/srv/100%2525/eum.db?uri=true", "/srv/100%/eum.db"),
    ("sqlite:///file://localhost/srv/eum.db?mode=rwc&uri=true", "/srv/eum.db"),
    ("sqlite:///file:/srv/eum.db?vfs=memdb&uri=true", None),  # the memdb VFS: in memory, no file
    # Not a `file:` URI: SQLite takes the name as it is, and SQLAlchemy has put the URI's
    # options in it.
    ("sqlite:////srv/eum.db?mode=ro&uri=true", "/srv/eum.db?mode=ro"),
])
def test_the_file_a_sqlite_uri_names_as_sqlite_reads_it(url, path):
    """`sqlite_file` took a `file:` URI's path undecoded, and a `vfs=memdb` book for a
    file: the check, the folder made and the lock file were for a file SQLite never
    opens (and `eum db check` refused a book that was there)."""
    assert sqlite_file(url) == path


@pytest.mark.parametrize("uri,opened", [
    ("file:{d}/my%2520book/eum.db?uri=true", "my book/eum.db"),
    ("file:{d}/100%2525/eum.db?uri=true", "100%/eum.db"),
    ("file://localhost{d}/sub/eum.db?uri=true", "sub/eum.db"),
    ("file:{d}/sub/eum.db?mode=rwc&uri=true", "sub/eum.db"),
    ("{d}/sub/eum.db?mode=ro&uri=true", "sub/eum.db?mode=ro"),
])
def test_the_book_sqlite_writes_is_the_file_named(tmp_path, uri, opened):
    """What SQLite writes is the file `sqlite_file` names, and its folder is the one
    made: `my%2520book` made a folder `my%20book` and SQLite, opening `my book/`, failed."""
    (tmp_path / "my book").mkdir()
    (tmp_path / "100%").mkdir()
    url = "sqlite:///" + uri.format(d=tmp_path)
    engine = make_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(text("CREATE TABLE t (x INTEGER)"))
    finally:
        engine.dispose()
    assert sqlite_file(url) == str(tmp_path / opened)
    assert (tmp_path / opened).is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted({"my book", "100%", opened.split("/")[0]})


@pytest.mark.parametrize("query", ["mode=rw", "vfs=memdb", "mode=memory&cache=shared"])
def test_a_book_sqlite_will_not_create_gets_no_folder(tmp_path, query):
    """A book SQLite will not create (`mode=rw`: it must be there) or keeps in memory
    (`vfs=memdb`, `mode=memory`) had its folder made all the same: the stray folder
    that `sqlite_file` was to stop."""
    engine = make_engine(f"sqlite:///file:{tmp_path / 'gone' / 'eum.db'}?{query}&uri=true")
    engine.dispose()
    assert list(tmp_path.iterdir()) == []


def test_a_book_in_memory_by_uri_names_its_pool(recwarn):
    """SQLAlchemy 2.1 deprecates choosing the pool by a URI's `mode=memory` (a later
    release gives such a URL a QueuePool, whose connections another thread may take):
    the engine names the pool it has always had, a connection per thread, and the book
    made on one connection is the one the next use in the thread sees."""
    import warnings

    from sqlalchemy.pool import SingletonThreadPool

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        engine = make_engine("sqlite:///file:eum-pool-test?mode=memory&cache=shared&uri=true")
    try:
        assert isinstance(engine.pool, SingletonThreadPool)
        with engine.begin() as conn:
            conn.execute(text("CREATE TABLE t (x INTEGER)"))
            conn.execute(text("INSERT INTO t VALUES (7)"))
        with engine.connect() as conn:
            assert conn.execute(text("SELECT x FROM t")).scalar_one() == 7
    finally:
        engine.dispose()
