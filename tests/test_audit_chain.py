"""The audit log's links: legacy entries keep verifying, new ones are length-prefixed and,
with EUM_AUDIT_KEYS, an HMAC that someone who can write the database cannot recompute."""

from __future__ import annotations

import pytest
from sqlalchemy import text
from typer.testing import CliRunner

from eum.cli import app as cli
from eum.settings import Settings, get_settings
from ledger import audit
from ledger import schema as s
from ledger.db import make_engine, migrate

KEY_A = "2026a:" + "a" * 32
KEY_B = "2026b:" + "b" * 32


@pytest.fixture
def book(tmp_path, monkeypatch):
    monkeypatch.setattr(audit, "_configured", audit._UNSET)  # whatever a test sets is undone after it
    url = f"sqlite:///{tmp_path / 'eum.db'}"
    migrate(url)
    return make_engine(url)


def _append(engine, n: int, actor: str = "Kim (k1)", action: str = "budget.put") -> None:
    with engine.begin() as conn:
        for i in range(n):
            audit.append(conn, at_us=1_700_000_000_000_000 + i, actor=actor, action=action, object_type="budget",
                         object_id=f"city/2026-{i + 1:02d}", detail={"limit": i})


def _append_legacy(engine, detail: str = '{"limit":1}') -> None:
    """An entry as written before migration 0011: a `|`-joined sha256 link, no chain kind
    (on a SQLite book; the trigger of 0013, which now refuses such inserts, is lifted
    around it as if the entry were older)."""
    t = s.audit_log
    with engine.begin() as conn:
        trigger = conn.execute(text("SELECT sql FROM sqlite_master WHERE name = 'audit_log_chain_required'")).scalar()
        conn.execute(text("DROP TRIGGER audit_log_chain_required"))
        prev = conn.execute(text("SELECT entry_hash FROM audit_log ORDER BY entry_id DESC LIMIT 1")).scalar() \
            or audit.GENESIS
        digest = audit._legacy_digest(prev, 1, "old (k0)", "budget.put", "budget", "city/2025", detail)
        conn.execute(t.insert().values(at_us=1, actor="old (k0)", action="budget.put", object_type="budget",
                                       object_id="city/2025", detail=detail, prev_hash=prev, entry_hash=digest,
                                       chain=None))
        conn.execute(text(trigger))


def _verify(engine, keys: str | None = None, **kw):
    with engine.connect() as conn:
        return audit.verify(conn, keyring=audit.Keyring.parse(keys), **kw)


def test_legacy_then_unkeyed_then_keyed_links_verify_and_are_counted(book):
    _append_legacy(book)
    _append_legacy(book)
    audit.configure(audit.Keyring.parse(None))
    _append(book, 2)
    audit.configure(audit.Keyring.parse(KEY_A))
    _append(book, 3)
    report = _verify(book, KEY_A)
    assert report.ok, report.reason
    assert (report.entries, report.legacy, report.unkeyed, report.keyed, report.keyed_from) == (7, 2, 2, 3, 5)
    with book.connect() as conn:
        chains = [r[0] for r in conn.execute(text("SELECT chain FROM audit_log ORDER BY entry_id"))]
    assert chains == [None, None, "v2", "v2", "v2:2026a", "v2:2026a", "v2:2026a"]


def test_without_the_key_a_keyed_chain_cannot_be_verified_nor_extended_unkeyed(book):
    audit.configure(audit.Keyring.parse(KEY_A))
    _append(book, 2)
    no_key = _verify(book)
    assert not no_key.ok and no_key.broken_at == 1 and "does not hold that key" in no_key.reason
    wrong = _verify(book, "2026a:" + "x" * 32)
    assert not wrong.ok and "does not match its hash" in wrong.reason
    # A forger without the key can only append weaker links (written here by hand: the
    # engine's own writer refuses to), and those break the chain.
    with book.begin() as conn:
        prev = conn.execute(text("SELECT entry_hash FROM audit_log ORDER BY entry_id DESC LIMIT 1")).scalar()
        digest = audit._v2_digest("v2", None, prev, 9, "forger", "budget.put", "budget", "city/2026", "{}")
        conn.execute(s.audit_log.insert().values(at_us=9, actor="forger", action="budget.put", object_type="budget",
                                                 object_id="city/2026", detail="{}", prev_hash=prev,
                                                 entry_hash=digest, chain="v2"))
    forged = _verify(book, KEY_A)
    assert not forged.ok and forged.broken_at == 3 and "unkeyed link after a stronger one" in forged.reason
    # ... and so does a legacy link after v2 ones.


def test_a_legacy_link_after_a_v2_one_is_a_break(book):
    audit.configure(audit.Keyring.parse(None))
    _append(book, 1)
    _append_legacy(book)
    report = _verify(book)
    assert not report.ok and report.broken_at == 2 and "legacy link after a stronger one" in report.reason


def test_an_edited_keyed_entry_is_caught(book):
    audit.configure(audit.Keyring.parse(KEY_A))
    _append(book, 3)
    with book.begin() as conn:  # someone with write access to the database drops the guard
        conn.execute(text("DROP TRIGGER audit_log_no_update"))
        conn.execute(text("UPDATE audit_log SET detail = :d WHERE entry_id = 2"), {"d": '{"limit":999999}'})
    report = _verify(book, KEY_A)
    assert not report.ok and report.broken_at == 2 and "does not match its hash" in report.reason


def test_a_rotated_key_still_verifies_the_entries_it_signed(book):
    audit.configure(audit.Keyring.parse(KEY_A))
    _append(book, 2)
    audit.configure(audit.Keyring.parse(f"{KEY_B},{KEY_A}"))  # the new key first, the old one kept
    _append(book, 2)
    assert _verify(book, f"{KEY_B},{KEY_A}").ok
    only_new = _verify(book, KEY_B)
    assert not only_new.ok and "'v2:2026a'" in only_new.reason


def test_v2_fields_cannot_borrow_each_others_bytes():
    """The legacy link joined fields with `|`: an actor "a|b" with action "c" hashed like
    actor "a" with action "b|c". Length prefixes tell them apart."""
    assert audit._legacy_digest("0", 1, "a|b", "c", "t", "o", "{}") == audit._legacy_digest("0", 1, "a", "b|c", "t",
                                                                                            "o", "{}")
    assert audit._v2_digest("v2", None, "0", 1, "a|b", "c", "t", "o", "{}") != audit._v2_digest(
        "v2", None, "0", 1, "a", "b|c", "t", "o", "{}")


@pytest.mark.parametrize("keys,says", [
    ("nosecret", "id:secret"),
    ("a b:" + "x" * 20, "id:secret"),
    ("k1:short", "at least 16"),
    (f"{KEY_A},{KEY_A}", "listed twice"),
])
def test_bad_audit_keys_are_refused_without_echoing_the_secret(keys, says):
    with pytest.raises(ValueError) as refused:
        Settings(audit_keys=keys)
    assert says in str(refused.value)
    secret = keys.partition(":")[2].split(",")[0]
    assert len(secret) < 4 or secret not in str(refused.value)


def test_production_needs_audit_keys():
    base = {"environment": "production", "database_url": "postgresql://x@127.0.0.1/y", "key_pepper": "p" * 32}
    with pytest.raises(ValueError, match="EUM_AUDIT_KEYS"):
        Settings(**base)
    assert Settings(**base, audit_keys=KEY_A).audit_keyring.signing == "2026a"


def test_audit_verify_prints_the_kinds_and_fails_without_the_key(book, tmp_path, monkeypatch):
    audit.configure(audit.Keyring.parse(KEY_A))
    _append(book, 2)
    monkeypatch.setenv("EUM_DATABASE_URL", str(book.url))
    monkeypatch.setenv("EUM_AUDIT_KEYS", KEY_A)
    get_settings.cache_clear()
    try:
        ok = CliRunner().invoke(cli, ["audit-verify"])
        assert ok.exit_code == 0, ok.output
        assert "2 entries (2 keyed, 0 unkeyed, 0 legacy; keyed from entry 1)" in ok.output
        monkeypatch.delenv("EUM_AUDIT_KEYS")
        get_settings.cache_clear()
        broken = CliRunner().invoke(cli, ["audit-verify"])
        assert broken.exit_code == 1 and "does not hold that key" in broken.output
    finally:
        get_settings.cache_clear()


def test_the_service_signs_with_its_settings_keys(tmp_path, monkeypatch):
    from tests.conftest import make_api

    monkeypatch.setattr(audit, "_configured", audit._UNSET)
    url = f"sqlite:///{tmp_path / 'eum.db'}"
    migrate(url)
    api = make_api(url, audit_keys=KEY_A)
    with api.client:
        assert api.put("/v1/budgets/city/2026", {"amount": 1_000}, role="finance").status_code == 200
        entry = api.get("/v1/audit-log", role="auditor", params={"action": "budget.put"}).json()["items"][-1]
    assert entry["chain"] == "v2:2026a"
    assert _verify(make_engine(url), KEY_A).ok


def test_the_migration_keeps_the_legacy_chain_and_will_not_downgrade_past_v2_links(db_url, monkeypatch):
    """A book that was already in use: its legacy entries still verify after 0011, new
    entries chain on from its head, and going back below 0011 is refused once v2 links
    exist (the old verifier could not recompute them)."""
    from alembic import command

    from ledger.db import alembic_config

    monkeypatch.setattr(audit, "_configured", audit._UNSET)
    command.downgrade(alembic_config(db_url), "0010")
    engine = make_engine(db_url)
    with engine.begin() as conn:
        digest = audit._legacy_digest(audit.GENESIS, 5, "old (k0)", "budget.put", "budget", "city/2025", "{}")
        conn.execute(text("INSERT INTO audit_log (at_us, actor, action, object_type, object_id, detail, prev_hash, "
                          "entry_hash) VALUES (5, 'old (k0)', 'budget.put', 'budget', 'city/2025', '{}', :p, :h)"),
                     {"p": audit.GENESIS, "h": digest})
    with pytest.raises(Exception, match="append-only"), engine.begin() as conn:  # the downgrade kept the guard
        conn.execute(text("UPDATE audit_log SET detail = '{}'"))
    engine.dispose()
    migrate(db_url)
    engine = make_engine(db_url)
    assert _verify(engine).legacy == 1
    audit.configure(audit.Keyring.parse(KEY_A))
    _append(engine, 1)
    report = _verify(engine, KEY_A)
    assert report.ok and (report.legacy, report.keyed) == (1, 1)
    engine.dispose()
    with pytest.raises(RuntimeError, match="unverifiable"):
        command.downgrade(alembic_config(db_url), "0010")



def test_an_unkeyed_entry_written_from_0011_on_refuses_a_downgrade_too(db_url, monkeypatch):
    """Not only keyed entries: one written without EUM_AUDIT_KEYS from 0011 on has a v2
    link (length-prefixed sha256) the code before 0011 cannot recompute either, so it
    refuses the downgrade as well (README, Upgrading, had said only keyed ones did)."""
    from alembic import command

    from ledger.db import alembic_config

    monkeypatch.setattr(audit, "_configured", audit._UNSET)
    audit.configure(audit.Keyring.parse(None))
    engine = make_engine(db_url)
    _append(engine, 1)
    with engine.connect() as conn:
        assert conn.execute(text("SELECT chain FROM audit_log")).scalars().all() == ["v2"]
    engine.dispose()
    with pytest.raises(RuntimeError, match="unverifiable"):
        command.downgrade(alembic_config(db_url), "0010")

def test_a_process_without_the_key_cannot_append_after_keyed_entries(book):
    """Its unkeyed link would break the chain for good (the log is append-only): it is
    refused, and the change it belonged to rolls back with it."""
    audit.configure(audit.Keyring.parse(KEY_A))
    _append(book, 1)
    audit.configure(audit.Keyring.parse(None))
    with pytest.raises(audit.UnkeyedAppend, match="EUM_AUDIT_KEYS"):
        _append(book, 1)
    report = _verify(book, KEY_A)
    assert report.ok and report.entries == 1


def test_with_keys_a_log_rewritten_in_the_weaker_kinds_is_caught(book):
    """Every entry rewritten as legacy links passes the link checks; with the keys in hand
    the verifier wants the newest entry keyed."""
    _append_legacy(book)
    _append_legacy(book, '{"limit":999}')
    assert _verify(book).ok  # without keys: nothing to tell it from a log kept before 0011
    report = _verify(book, KEY_A)
    assert not report.ok and "newest entry is not keyed" in report.reason


def test_a_service_started_with_new_keys_keys_the_head_at_once(tmp_path):
    """Keys set on a log kept without them: the first start signs one entry saying so, so
    that `eum audit-verify` with the keys is green at once (it wants the newest entry
    keyed), and later starts add nothing."""
    from tests.conftest import make_api

    url = f"sqlite:///{tmp_path / 'eum.db'}"
    migrate(url)
    engine = make_engine(url)
    audit.configure(audit.Keyring.parse(None))
    _append(engine, 2)  # a log kept without keys
    for _ in range(2):
        api = make_api(url, audit_keys=KEY_A)
        with api.client:
            pass
    with engine.connect() as conn:
        actions = [r[0] for r in conn.execute(text("SELECT action FROM audit_log ORDER BY entry_id"))]
    assert actions.count("audit.keyed") == 1
    report = _verify(engine, KEY_A)
    assert report.ok and report.keyed >= 1, report


def test_a_legacy_link_after_the_upgrade_is_refused_by_the_database(book):
    """A process of a release before 0011 still running in a rolling deploy wrote legacy
    links after v2 ones, and the chain stayed broken for good; the database refuses them."""
    _append(book, 1)
    engine = book if hasattr(book, "connect") else book.engine
    with pytest.raises(Exception, match="before 0011"), engine.begin() as conn:
        conn.execute(text("INSERT INTO audit_log (at_us, actor, action, object_type, object_id, detail, prev_hash, "
                          "entry_hash) VALUES (5, 'old (k0)', 'budget.put', 'budget', 'city/2025', '{}', 'x', 'y')"))
    assert _verify(engine).ok


def test_audit_verify_takes_a_head_as_printed_and_refuses_one_it_never_prints(book, monkeypatch):
    """`--expect-head` is a head an earlier run printed, kept elsewhere (README,
    Upgrading). Pasted with a trailing newline or in capitals it is still that head; a
    value that is no head at all (a typo, a truncated paste) is a mistake in the command,
    exit 2 naming the option, not exit 1 "audit chain BROKEN ... cut off": that was a
    tamper alarm for a typo, which sent an operator hunting for a rewrite of the log."""
    _append(book, 3)
    monkeypatch.setenv("EUM_DATABASE_URL", str(book.url))
    get_settings.cache_clear()
    try:
        printed = CliRunner().invoke(cli, ["audit-verify"])
        assert printed.exit_code == 0, printed.output
        head = printed.output.split("head ")[1].split()[0]
        for given in (head, head.upper(), f" {head}\n"):
            ok = CliRunner().invoke(cli, ["audit-verify", "--expect-head", given])
            assert ok.exit_code == 0 and "audit chain intact" in ok.output, (given, ok.output)
        for typo in (head[:-1], head[:12], head[:-1] + "g", "zz"):
            refused = CliRunner().invoke(cli, ["audit-verify", "--expect-head", typo])
            assert refused.exit_code == 2, (typo, refused.output)
            assert "--expect-head" in refused.output and "64 hexadecimal" in refused.output, refused.output
            assert "BROKEN" not in refused.output
        # a well-formed head the chain does not hold is still the break it reports
        other = CliRunner().invoke(cli, ["audit-verify", "--expect-head", "ab" * 32])
        assert other.exit_code == 1 and "BROKEN" in other.output and "cut off" in other.output
    finally:
        get_settings.cache_clear()
