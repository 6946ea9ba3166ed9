"""Policies shipped as files are recorded once under their ids, and a policy id always
names the rules that judged a payment: a file whose document differs from the one
recorded under its id (edited in place), or a recorded file policy no file holds any
more, stops the service and every command that loads the files into a book, naming the
file and the id; nothing is recorded meanwhile. Comments change freely; a new file with a
new id is loaded and audited."""

from __future__ import annotations

import re
import shutil

import pytest
from sqlalchemy import func, select
from typer.testing import CliRunner

from eum import settings as settings_module
from eum.cli import app as cli
from ledger import schema as s
from tests.book_helpers import pay, put_member, put_merchant, topup
from tests.conftest import POLICIES, at, make_api

EDITED = "2024-01-10-and-5.yaml"
runner = CliRunner()


@pytest.fixture
def shipped(tmp_path):
    """A copy of the shipped policies the settings point at, edited by the tests."""
    directory = tmp_path / "policies"
    shutil.copytree(POLICIES, directory)
    return directory


def _march_payment(api, payment_id: str) -> dict:
    """100,000 won charged at a merchant with sales of 3억 (a member of its own: no points)."""
    put_member(api, payment_id)
    topup(api, f"t-{payment_id}", payment_id, 100_000, at("2024-03-01"))
    return pay(api, payment_id, payment_id, "small", 100_000, at("2024-03-05"))


def _audit(api, **params) -> list[dict]:
    return api.get("/v1/audit-log", role="auditor", params=params).json()["items"]


def _start(db_url, directory):
    api = make_api(db_url, policies_dir=directory)
    api.client.__enter__()
    return api


def test_a_policy_file_edited_in_place_stops_the_start_and_changes_nothing(db_url, shipped):
    api = _start(db_url, shipped)
    try:
        put_merchant(api, "small", sales=300_000_000)
        paid = _march_payment(api, "p1")
        assert paid["cashback"]["amount"] == 10_000 and paid["policy_id"].startswith("incheon-2024-01")
        # An edit on disk while serving is not read: the timeline is the one checked at start.
        path = shipped / EDITED
        original = path.read_text(encoding="utf-8")
        path.write_text(original.replace("rate_bp: 1000", "rate_bp: 1500"), encoding="utf-8")
        api.services.reload_policies()
        assert _march_payment(api, "p2")["cashback"]["amount"] == 10_000
    finally:
        api.client.__exit__(None, None, None)

    with pytest.raises(ValueError) as refused:
        _start(db_url, shipped)
    message = str(refused.value)
    assert EDITED in message and "incheon-2024-01" in message and "new policy_id" in message, message
    assert re.search(r"^-\s+rate_bp: 1000$", message, re.M) and re.search(r"^\+\s+rate_bp: 1500$", message, re.M)
    assert "national" not in message, message  # a diff of what changed, not of how it was stored

    # Restored, with a comment changed (not the document): it starts, as it was.
    path.write_text("# reviewed again\n" + original.replace("# (DOMAIN.md", "#   (DOMAIN.md"), encoding="utf-8")
    api = _start(db_url, shipped)
    try:
        assert _march_payment(api, "p3")["cashback"]["amount"] == 10_000
        detail = api.get("/v1/policies/incheon-2024-01", role="auditor").json()
        assert detail["document"]["components"][0]["variants"][0]["bands"][0]["rate_bp"] == 1000
        assert [e["action"] for e in _audit(api, object_id="incheon-2024-01")] == ["policy.load_file"]
    finally:
        api.client.__exit__(None, None, None)


def test_a_removed_policy_file_stops_the_start(db_url, shipped):
    api = _start(db_url, shipped)
    api.client.__exit__(None, None, None)
    (shipped / EDITED).unlink()
    with pytest.raises(ValueError) as refused:
        _start(db_url, shipped)
    assert "incheon-2024-01" in str(refused.value) and "no file" in str(refused.value), str(refused.value)


def test_a_new_policy_file_is_loaded_and_audited(db_url, shipped):
    api = _start(db_url, shipped)
    api.client.__exit__(None, None, None)
    text = (shipped / "2025-10-cap-50man.yaml").read_text(encoding="utf-8")
    (shipped / "2031-01-new.yaml").write_text(
        text.replace("policy_id: incheon-2025-10", "policy_id: incheon-2031-01")
        .replace('effective_from: "2025-10-01T00:00:00+09:00"', 'effective_from: "2031-01-01T00:00:00+09:00"'),
        encoding="utf-8")
    api = _start(db_url, shipped)
    try:
        assert any(p.policy_id == "incheon-2031-01" for p in api.services.timeline)
        listed = {p["policy_id"]: p for p in api.get("/v1/policies", role="auditor").json()["policies"]}
        assert listed["incheon-2031-01"]["origin"] == "file" and listed["incheon-2031-01"]["status"] == "scheduled"
        log = _audit(api, object_id="incheon-2031-01")
        assert [(e["action"], e["actor"]) for e in log] == [("policy.load_file", "policy-files")]
        assert log[0]["detail"]["effective_from"].startswith("2031-01-01")
    finally:
        api.client.__exit__(None, None, None)


def _copy_of_2025_10(shipped, policy_id: str, day: str) -> None:
    text = (shipped / "2025-10-cap-50man.yaml").read_text(encoding="utf-8")
    (shipped / f"{policy_id}.yaml").write_text(
        text.replace("policy_id: incheon-2025-10", f"policy_id: {policy_id}")
        .replace('effective_from: "2025-10-01T00:00:00+09:00"', f'effective_from: "{day}T00:00:00+09:00"'),
        encoding="utf-8")


def test_a_new_policy_file_dated_before_a_recorded_event_stops_the_start(db_url, shipped):
    """A new file dated in the past was loaded without a check and rewrote history: with
    September's payments recorded, a file from 2025-09-15 judged the payments of
    2025-09-30 by other rules than those of the 10th (one month, two policies). Now a new
    file dated at or before an event the book holds (one that moved money, or a declined
    payment) stops the start, naming the file, and nothing is recorded; a file dated after
    every event loads."""
    api = _start(db_url, shipped)
    try:
        put_merchant(api, "small", sales=300_000_000)
        put_member(api, "m1")
        topup(api, "t1", "m1", 100_000, at("2025-09-01"))
        assert pay(api, "p1", "m1", "small", 50_000, at("2025-09-10"))["status"] == "approved"
        assert pay(api, "p2", "m1", "small", 900_000, at("2025-09-12"))["status"] == "declined"  # no ledger txn
        policies_before = api.get("/v1/policies", role="auditor").json()["policies"]
    finally:
        api.client.__exit__(None, None, None)
    for day, found in (("2025-09-05", "payment dated 2025-09-10"), ("2025-09-12", "payment dated 2025-09-12")):
        _copy_of_2025_10(shipped, "incheon-2025-09-late", day)
        with pytest.raises(ValueError) as refused:
            _start(db_url, shipped)
        message = str(refused.value)
        assert "incheon-2025-09-late.yaml" in message and "incheon-2025-09-late" in message, message
        assert f"takes effect at {day}T00:00:00+09:00" in message and found in message, message
        assert "effective_from after the book's latest event" in message, message
    _copy_of_2025_10(shipped, "incheon-2025-09-late", "2025-09-13")  # after every event: loaded
    api = _start(db_url, shipped)
    try:
        listed = {p["policy_id"] for p in api.get("/v1/policies", role="auditor").json()["policies"]}
        assert listed == {p["policy_id"] for p in policies_before} | {"incheon-2025-09-late"}
        # Recorded now: the next start does not look again, and an event dated before it is judged as before.
        assert pay(api, "p3", "m1", "small", 10_000, at("2025-09-12", "23:00:00"))["policy_id"] != "incheon-2025-09-late"
    finally:
        api.client.__exit__(None, None, None)
    _start(db_url, shipped).client.__exit__(None, None, None)


@pytest.fixture
def cli_settings(monkeypatch, shipped):
    def point_at(database_url: str) -> None:
        monkeypatch.setenv("EUM_DATABASE_URL", database_url)
        monkeypatch.setenv("EUM_POLICIES_DIR", str(shipped))
        settings_module.get_settings.cache_clear()

    yield point_at
    settings_module.get_settings.cache_clear()


def test_commands_that_load_the_files_refuse_an_edited_one(db_url, shipped, cli_settings, tmp_path, monkeypatch):
    """`eum serve` stops before any worker starts; `eum payments replay` records nothing."""

    api = _start(db_url, shipped)
    api.client.__exit__(None, None, None)
    path = shipped / EDITED
    path.write_text(path.read_text(encoding="utf-8").replace("rate_bp: 1000", "rate_bp: 1500"), encoding="utf-8")
    cli_settings(db_url)
    monkeypatch.setattr("eum.cli._serve_on", lambda *a, **kw: pytest.fail("a worker was started"))
    served = runner.invoke(cli, ["serve"])
    assert served.exit_code == 2 and EDITED in served.output and "incheon-2024-01" in served.output, served.output

    payments = tmp_path / "payments.csv"
    payments.write_text("payment_id,member_id,merchant_id,amount,occurred_at\n"
                        f"r1,m1,small,100000,{at('2024-03-05')}\n", encoding="utf-8")
    replay = runner.invoke(cli, ["payments", "replay", str(payments)])
    assert replay.exit_code == 2 and EDITED in replay.output, replay.output
    with api.services.engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(s.payments)).scalar_one() == 0


@pytest.mark.parametrize("clash", ["same-instant", "same-id", "not-utf-8"])
def test_a_folder_whose_files_cannot_be_in_force_together_stops_serve_before_a_worker(
        db_url, shipped, cli_settings, monkeypatch, clash):
    """Two files of one layer at one instant passed `eum serve`'s checks and failed each
    worker's start with a PolicyClash traceback; one policy_id in two files, on a fresh
    book, with a unique-key violation; a file that is not UTF-8 with a traceback. Each is
    one `error:` line naming it, exit 2, before any worker starts."""

    october = (shipped / "2025-10-cap-50man.yaml").read_text(encoding="utf-8")
    zz = shipped / "zz.yaml"
    if clash == "same-instant":
        zz.write_text(october.replace("policy_id: incheon-2025-10", "policy_id: t-overlap"), encoding="utf-8")
        says = "t-overlap and incheon-2025-10 take effect in the same layer at the same instant"
    elif clash == "same-id":
        zz.write_text(october.replace("2025-10-01T00", "2025-11-01T00"), encoding="utf-8")
        says = f"{zz}: policy_id: 'incheon-2025-10' is also the id of {shipped / '2025-10-cap-50man.yaml'}"
    else:
        zz.write_bytes(b"policy_id: x\n\xff\xfe\n")
        says = f"{zz}: line 2: (document): not UTF-8 text"
    cli_settings(db_url)
    monkeypatch.setattr("eum.cli._serve_on", lambda *a, **kw: pytest.fail("a worker was started"))
    served = runner.invoke(cli, ["serve"])
    assert served.exit_code == 2 and "Traceback" not in served.output, served.output
    assert served.stderr.startswith(f"error: EUM_POLICIES_DIR: {says}"), served.stderr


def test_a_book_a_shipped_file_came_after_is_refused_by_db_upgrade_before_it_migrates(
        db_url, shipped, cli_settings, monkeypatch):
    """A book first started before 8be6c38 (which shipped the 2023-09-01 top-up limit's
    file) holding an event from 2023-09-01 on: `eum db upgrade` migrated it, exit 0, and
    `eum serve` then refused it, exit 2, on the new file dated before the book's events;
    the schema had moved (the upgrade audit; on SQLite the way back is a restore). Both
    now run the start's policy-file checks first, on the book as the older release left
    it (here at 0015: no withdrawals table yet), with the same error and exit, migrating
    nothing; the same book with the files it was started with upgrades."""
    from alembic import command
    from alembic.runtime.migration import MigrationContext
    from alembic.script import ScriptDirectory

    from ledger.db import alembic_config, make_engine

    def revision() -> str:
        engine = make_engine(db_url)
        try:
            with engine.connect() as conn:
                return MigrationContext.configure(conn).get_current_revision()
        finally:
            engine.dispose()

    later = shipped / "2023-09-01-topup-150man.yaml"
    text = later.read_text(encoding="utf-8")
    later.unlink()  # the files of a release before 8be6c38
    api = _start(db_url, shipped)
    try:
        put_member(api, "m1")
        topup(api, "t1", "m1", 100_000, at("2025-09-01"))
    finally:
        api.client.__exit__(None, None, None)
    command.downgrade(alembic_config(db_url), "0015")  # a book behind this release
    later.write_text(text, encoding="utf-8")
    cli_settings(db_url)
    monkeypatch.setattr("eum.cli._serve_on", lambda *a, **kw: pytest.fail("a worker was started"))
    for args in (["db", "upgrade"], ["serve"]):
        refused = runner.invoke(cli, args)
        assert refused.exit_code == 2 and "Traceback" not in refused.output, (args, refused.output)
        assert refused.stderr.startswith("error: EUM_POLICIES_DIR: new policy files take effect at or before an event "
                                         "the book already recorded"), (args, refused.stderr)
        assert f"{later}: incheon-2023-09: takes effect at 2023-09-01T00:00:00+09:00, and the book holds a topup " \
               f"dated {at('2025-09-01')}" in refused.stderr, (args, refused.stderr)
        assert revision() == "0015", args  # nothing migrated
    later.unlink()
    upgraded = runner.invoke(cli, ["db", "upgrade"])
    assert upgraded.exit_code == 0, upgraded.output
    assert revision() == ScriptDirectory.from_config(alembic_config(db_url)).get_current_head()
