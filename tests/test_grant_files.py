"""The shipped grant programs (policies/grants/) loaded from files through maker-checker:
`eum grants submit FILE` (a draft, as the key's holder) → `eum grants approve ID` (a
second person) → disbursement; the author approving is refused; a bad file names its line
and changes nothing; `eum demo` has every shipped program, approved by a second actor."""

from __future__ import annotations

import contextlib

import pytest
from sqlalchemy import func, select
from typer.testing import CliRunner

from eum import cli
from eum import settings as settings_module
from eum.cli import app
from ledger import audit
from ledger import schema as s
from ledger.db import make_engine, reader
from ledger.keys import create_key
from ledger.queries import check_book
from tests.conftest import POLICIES, at, make_api

COUPON = POLICIES / "grants" / "2025-07-livelihood-coupon-round1.yaml"
SHIPPED = {"relief-2020-05", "relief-2021-tailored", "recovery-2021-12", "coupon-2025-r1", "coupon-2025-r2"}
runner = CliRunner()


@pytest.fixture
def cli_api(api, monkeypatch):
    """The CLI's HTTP calls go to the test app (the same routes, keys and roles)."""
    monkeypatch.setattr(cli, "_api_client", lambda url: contextlib.nullcontext(api.client))
    return api


def _eum(*args: str):
    return runner.invoke(app, list(args))


def _audit(api) -> list[tuple[str, str, str]]:
    with api.services.reader.connect() as conn:
        return [tuple(r) for r in conn.execute(select(s.audit_log.c.actor, s.audit_log.c.action, s.audit_log.c.object_id)
                                               .where(s.audit_log.c.object_type == "grant_program")
                                               .order_by(s.audit_log.c.entry_id))]


def _programs(api) -> dict[str, str]:
    with api.services.reader.connect() as conn:
        return dict(conn.execute(select(s.grant_programs.c.program_id, s.grant_programs.c.status)).all())


def _people(api) -> None:
    for member, district in (("m1", "seo"), ("m2", "ganghwa")):
        assert api.put(f"/v1/members/{member}", {"district": district}).status_code == 201
    api.put("/v1/merchants/small", {"name": "small", "district": "ganghwa", "category": "grocery",
                                    "annual_sales": 200_000_000, "registered_from": "2019-01-01"})


def test_submit_then_another_approves_then_disburse(cli_api):
    api = cli_api
    _people(api)
    out = _eum("grants", "submit", str(COUPON), "--key", api.tokens["policy-editor"])
    assert out.exit_code == 0, out.output
    assert "coupon-2025-r1: draft" in out.output
    assert _programs(api) == {"coupon-2025-r1": "draft"}
    body = {"disbursement_id": "d1", "member_id": "m2", "occurred_at": at("2025-08-01"),
            "attributes": {"income_status": "general", "district": "ganghwa"}}
    early = api.post("/v1/grant-programs/coupon-2025-r1/disbursements", body, role="policy-editor")
    assert early.status_code == 409 and early.json()["code"] == "grant_program_not_approved"

    again = _eum("grants", "submit", str(COUPON), "--key", api.tokens["policy-editor"])
    assert again.exit_code == 0 and "already submitted" in again.output, again.output

    approved = _eum("grants", "approve", "coupon-2025-r1", "--key", api.tokens["policy-approver"])
    assert approved.exit_code == 0, approved.output
    assert _programs(api) == {"coupon-2025-r1": "open"}
    assert _audit(api) == [("test policy-editor (" + _key_id(api, "policy-editor") + ")", "grant_program.create",
                            "coupon-2025-r1"),
                           ("test policy-approver (" + _key_id(api, "policy-approver") + ")",
                            "grant_program.approve", "coupon-2025-r1")]

    # The file's amount rules: 15만 general + 5만 Ganghwa add-on; spent first, no cashback on it.
    r = api.post("/v1/grant-programs/coupon-2025-r1/disbursements", body, role="policy-editor")
    assert r.status_code == 201 and r.json()["amount"] == 200_000, r.text
    pay = api.post("/v1/payments", {"payment_id": "p1", "member_id": "m2", "merchant_id": "small", "amount": 30_000,
                                    "occurred_at": at("2025-09-10")})
    assert pay.status_code == 201, pay.text
    assert pay.json()["spent"] == {"grants": 30_000, "points": 0, "charged": 0}
    assert pay.json()["cashback"]["amount"] == 0
    money = api.get("/v1/grant-programs/coupon-2025-r1", role="auditor").json()["money"]
    assert money["disbursed"] == 200_000 and money["held_by_members"] == 170_000
    with api.services.reader.connect() as conn:
        assert all(r.ok for r in check_book(conn))

    listed = _eum("grants", "list", "--key", api.tokens["auditor"])
    assert listed.exit_code == 0, listed.output
    assert "coupon-2025-r1" in listed.output and "open" in listed.output and "test policy-approver" in listed.output


def _key_id(api, role: str) -> str:
    return api.tokens[role].split("_")[1]


def test_the_author_approving_is_refused(cli_api):
    api = cli_api
    assert _eum("grants", "submit", str(COUPON), "--key", api.tokens["policy-editor"]).exit_code == 0
    # The author's name on a policy-approver key is still the author.
    engine = make_engine(api.settings.database_url)
    _, same_name = create_key(engine, name="test policy-editor", role="policy-approver",
                              pepper=api.settings.key_pepper.get_secret_value())
    engine.dispose()
    refused = _eum("grants", "approve", "coupon-2025-r1", "--key", same_name)
    assert refused.exit_code == 1
    assert "403 self_approval" in refused.output
    # An editor's key cannot approve at all.
    by_editor = _eum("grants", "approve", "coupon-2025-r1", "--key", api.tokens["policy-editor"])
    assert by_editor.exit_code == 1 and "403 forbidden" in by_editor.output
    assert _programs(api) == {"coupon-2025-r1": "draft"}
    assert [action for _, action, _ in _audit(api)] == ["grant_program.create"]
    # Another person can; then it is no longer a draft to approve.
    assert _eum("grants", "approve", "coupon-2025-r1", "--key", api.tokens["policy-approver-2"]).exit_code == 0
    twice = _eum("grants", "approve", "coupon-2025-r1", "--key", api.tokens["policy-approver"])
    assert twice.exit_code == 1 and "409 grant_program_state_conflict" in twice.output


def _line_of(text: str, starts: str) -> int:
    return next(n for n, line in enumerate(text.splitlines(), 1) if line.startswith(starts))


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
@pytest.mark.parametrize("change, field, reason", [
    (("funding: {national: 8000, city: 2000}", "funding: {national: 8000, city: 1000}"), "funding",
     "funding shares must sum to 10000 bp"),
    (("valid_until: 2025-11-30", "valid_until: someday"), "valid_until", "a date is YYYY-MM-DD"),
    (("    - {id: general, when: {income_status: [general, 일반]}, amount_won: 150000}",
      "    - {id: general, when: {income_status: [general, 일반]}, amount_won: -5}"),
     "amount_rules.base.2.amount_won", "greater than or equal to 0"),
    (("cashback_on_spend: false", "cashback_on_spend: false\nsurprise: 1"), "surprise", "Extra inputs"),
])
def test_a_bad_file_gives_the_line_and_reason_and_changes_nothing(cli_api, tmp_path, change, field, reason):
    api = cli_api
    text = COUPON.read_text(encoding="utf-8").replace(*change)
    assert text != COUPON.read_text(encoding="utf-8")
    bad = tmp_path / "coupon.yaml"
    bad.write_text(text, encoding="utf-8")
    line = _line_of(text, change[1].split("\n")[-1][:12])
    before = _audit(api)

    out = _eum("grants", "submit", str(bad), "--key", api.tokens["policy-editor"])
    assert out.exit_code == 2, out.output
    assert f"BAD  {bad}:{line}: {field}: " in out.output, out.output
    assert reason in out.output
    assert _programs(api) == {} and _audit(api) == before

    checked = _eum("grants", "validate", str(bad), str(COUPON))
    assert checked.exit_code == 1 and f"{bad}:{line}:" in checked.output and f"ok   {COUPON}" in checked.output


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_every_shipped_file_validates(db_url):
    out = _eum("grants", "validate", *map(str, sorted((POLICIES / "grants").glob("*.yaml"))))
    assert out.exit_code == 0, out.output
    assert out.output.count("ok   ") == len(SHIPPED)


def test_the_demo_has_the_shipped_programs_approved_by_a_second_actor(db_url, monkeypatch):
    monkeypatch.setenv("EUM_DATABASE_URL", db_url)
    settings_module.get_settings.cache_clear()
    try:
        out = _eum("demo")
    finally:
        settings_module.get_settings.cache_clear()
    assert out.exit_code == 0, out.output
    assert "5 grant programs" in out.output  # the counts in words since b37ab4e (a dict's repr before)
    engine = make_engine(db_url)
    with reader(engine).connect() as conn:
        status = dict(conn.execute(select(s.grant_programs.c.program_id, s.grant_programs.c.status)).all())
        log = conn.execute(select(s.audit_log.c.actor, s.audit_log.c.action, s.audit_log.c.object_id)
                           .where(s.audit_log.c.object_type == "grant_program")).all()
        assert audit.verify(conn).ok
    engine.dispose()
    assert status == {program: "open" for program in SHIPPED}
    for program in SHIPPED:
        actors = {action: actor for actor, action, object_id in log if object_id == program}
        assert set(actors) == {"grant_program.create", "grant_program.approve"}
        assert actors["grant_program.create"] != actors["grant_program.approve"]
        assert "demo policy editor" in actors["grant_program.create"]
        assert "demo policy approver" in actors["grant_program.approve"]

    # The README's demo: disburse the 2025 coupon to a Ganghwa member and spend it.
    demo = make_api(db_url)
    with demo.client:
        r = demo.post("/v1/grant-programs/coupon-2025-r1/disbursements",
                      {"disbursement_id": "try-d1", "member_id": "m-ganghwa-001", "occurred_at": at("2025-08-01"),
                       "attributes": {"income_status": "general", "district": "ganghwa"}}, role="admin")
        assert r.status_code == 201 and r.json()["amount"] == 200_000, r.text
        pay = demo.post("/v1/payments", {"payment_id": "try-g1", "member_id": "m-ganghwa-001",
                                         "merchant_id": "shop-ganghwa-001", "amount": 30_000,
                                         "occurred_at": at("2025-09-10", "12:30:00")})
        assert pay.status_code == 201, pay.text
        assert pay.json()["spent"] == {"grants": 30_000, "points": 0, "charged": 0}
        assert pay.json()["balances"]["grants"] == [{"program_id": "coupon-2025-r1", "amount": 170_000,
                                                     "expires_at": "2025-12-01T00:00:00+09:00"}]
        with demo.services.reader.connect() as conn:
            assert all(r.ok for r in check_book(conn))
            assert conn.execute(select(func.count()).select_from(s.grant_disbursements)).scalar_one() == 1


def test_no_key_or_no_service_is_one_error_line_not_a_traceback(monkeypatch):
    monkeypatch.delenv("EUM_API_KEY", raising=False)
    for args in (["grants", "list"], ["grants", "approve", "coupon-2025-r1"], ["grants", "submit", str(COUPON)],
                 ["policy", "submit", str(POLICIES / "2025-10-cap-50man.yaml")]):
        out = _eum(*args)
        assert out.exit_code == 2 and "no API key" in out.output and "Traceback" not in out.output, (args, out.output)
    down = _eum("grants", "list", "--key", "eum_x", "--api-url", "http://127.0.0.1:9")
    assert down.exit_code == 2 and "cannot reach the service" in down.output, down.output


def test_an_install_without_the_dev_extra_has_what_every_command_imports():
    """`pip install .` (the Dockerfile's install) left out httpx, a dev extra, and `eum
    policy submit`, `eum grants submit|approve|list` failed on importing it. Every module
    the installed packages import is the standard library's, the project's, or comes with
    a runtime dependency (pyproject's `dependencies` and what they require)."""
    import ast
    import importlib.metadata as metadata
    import sys
    import tomllib

    from packaging.requirements import Requirement

    from eum.settings import REPO_ROOT

    pyproject = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    project = pyproject["project"]
    installed: set[str] = set()
    wanted = [Requirement(text) for text in project["dependencies"]]
    while wanted:
        requirement = wanted.pop()
        name = requirement.name.lower().replace("_", "-")
        if name in installed:
            continue
        installed.add(name)
        for text in metadata.requires(requirement.name) or []:
            nested = Requirement(text)
            if nested.marker is None or any(nested.marker.evaluate({"extra": extra})
                                            for extra in requirement.extras | {""}):
                wanted.append(nested)
    ours = {pattern.rstrip("*") for pattern in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]}
    imported: dict[str, str] = {}
    for package in sorted(ours):
        for path in sorted((REPO_ROOT / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                names = ([alias.name for alias in node.names] if isinstance(node, ast.Import)
                         else [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
                for name in names:
                    imported.setdefault(name.split(".")[0], str(path.relative_to(REPO_ROOT)))
    providers = metadata.packages_distributions()
    missing = {module: where for module, where in imported.items()
               if module not in sys.stdlib_module_names and module not in ours and module != "__future__"
               and not any(d.lower().replace("_", "-") in installed for d in providers.get(module, []))}
    assert not missing, f"imported, but no runtime dependency brings it: {missing}"
