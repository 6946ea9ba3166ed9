"""Policy and grant program text is read as written, or refused with its line: a key given
twice (YAML and JSON keep the last: `rate_bp: 700, rate_bp: 7000` stored 70%), YAML 1.1's
octal and base-60 numbers (`0700` was 448, `11:40` was 700), and yes/no/on/off, which YAML
1.1 reads as booleans, are text where the document wants text."""

from __future__ import annotations

import json

import pytest
import yaml
from typer.testing import CliRunner

from eum.cli import app
from rules.grants import GrantProgramDocument
from rules.loader import PolicyInvalid, load_grant_program_dir, load_policy_file, parse_policy_text
from tests.conftest import POLICIES

DOC = (POLICIES / "2025-09-all-under-30eok.yaml").read_text(encoding="utf-8")
BAND = "- {up_to_won: 300000, rate_bp: 1500}"  # the first band of the small merchants' variant
COUPON = (POLICIES / "grants" / "2025-07-livelihood-coupon-round1.yaml").read_text(encoding="utf-8")


def _line(text: str, needle: str) -> int:
    return next(n for n, line in enumerate(text.splitlines(), 1) if needle in line)


def _refused(text: str, model=None) -> PolicyInvalid:
    with pytest.raises(PolicyInvalid) as caught:
        parse_policy_text(text, "t", **({"model": model} if model else {}))
    return caught.value


def test_a_key_given_twice_is_refused_with_both_lines():
    assert BAND in DOC
    flow = DOC.replace(BAND, "- {up_to_won: 300000, rate_bp: 1500, rate_bp: 7000}")
    problem = _refused(flow).problems[0]
    assert problem.line == _line(flow, "rate_bp: 7000") and "rate_bp" in problem.reason and "twice" in problem.reason
    block = DOC.replace("policy_id: incheon-2025-09\n", "policy_id: incheon-2025-09\npolicy_id: other\n")
    problem = _refused(block).problems[0]
    assert problem.line == _line(block, "policy_id: other") and f"line {_line(DOC, 'policy_id:')}" in problem.reason
    # JSON, as POST /v1/policies takes it
    document = yaml.safe_load(DOC)
    text = json.dumps(document, default=str, indent=1).replace('"policy_id":', '"name": "other",\n "policy_id":')
    assert "name" in str(_refused(text))
    # a grant program file
    assert "funding" in str(_refused(COUPON + "funding: {city: 10000}\n", GrantProgramDocument))


@pytest.mark.parametrize("written,why", [("0700", "octal"), ("11:40", "base 60"), ("0x2bc", "decimal"),
                                         ("0b1010111100", "decimal"), ("-0700", "octal")])
def test_yaml_1_1_numbers_are_refused_not_read_in_another_base(written, why):
    text = DOC.replace(BAND, f"- {{up_to_won: 300000, rate_bp: {written}}}")
    problem = _refused(text).problems[0]
    assert problem.line == _line(text, written) and why in problem.reason and written in problem.reason
    assert why in str(_refused(COUPON.replace("amount_won: 400000", f"amount_won: {written}"),
                               GrantProgramDocument))


def test_a_refused_band_is_one_problem_not_also_an_empty_list():
    """pydantic counts a list's items that passed: a variant whose one band had a negative
    rate also said "bands: Tuple should have at least 1 item after validation, not 0", a
    second line about a list that holds one. A list left truly empty still says so."""
    single = "bands:\n          - {up_to_won: 300000, rate_bp: 1500}"
    assert single in DOC, "the test's policy changed: pick a variant with one band"
    text = DOC.replace(single, single.replace("rate_bp: 1500", "rate_bp: -1500"), 1)
    problems = _refused(text).problems
    assert [(p.line, p.path.rsplit(".", 1)[-1]) for p in problems] == [(_line(text, "rate_bp: -1500"), "rate_bp")], \
        problems
    empty = _refused(DOC.replace(single, "bands: []", 1)).problems
    assert [p.path.rsplit(".", 1)[-1] for p in empty] == ["bands"] and "at least 1" in empty[0].reason, empty


@pytest.mark.parametrize("written", ["2025-02-30", "2025-02-30T00:00:00+09:00", "2025-13-01"])
def test_an_impossible_unquoted_date_is_refused_with_its_line(written):
    """YAML reads an unquoted date itself, and one that does not exist (30 February) failed
    the whole document with no line: `(document): day is out of range for month`."""
    text = DOC.replace('effective_from: "2025-09-01T00:00:00+09:00"', f"effective_from: {written}")
    assert text != DOC
    problem = _refused(text).problems[0]
    assert problem.line == _line(text, "effective_from:") and written in problem.reason, problem


def test_decimal_numbers_quoted_text_and_booleans_read_as_written():
    assert parse_policy_text(DOC.replace(BAND, "- {up_to_won: 300_000, rate_bp: +1500}"), "t") \
        == parse_policy_text(DOC, "t")
    # yes/no/on/off are text (YAML 1.2, JSON): a category, a flag, a grant's income status
    text = DOC.replace("declined_categories: [department_store,", "declined_categories: [on, no, department_store,")
    assert parse_policy_text(text, "t").declined_categories[:3] == ("on", "no", "department_store")
    program = parse_policy_text(COUPON.replace("[basic_livelihood, 기초생활수급]", "[yes]"), "t", model=GrantProgramDocument)
    assert program.amount_rules.base[0].when.income_status == ("yes",)
    # ...and a boolean where the document wants one, as YAML 1.1 meant it
    assert parse_policy_text(COUPON.replace("cashback_on_spend: false", "cashback_on_spend: yes"), "t",
                             model=GrantProgramDocument).cashback_on_spend is True
    # ...but never a number: a household size of `yes` was 1
    sized = COUPON.replace("{income_status: [basic_livelihood, 기초생활수급]}", "{household_size: [yes]}")
    assert "household_size" in str(_refused(sized, GrantProgramDocument))


def test_every_shipped_file_reads_as_before():
    """The shipped policies and grant programs read to the same data as `yaml.safe_load`
    gave them: none uses a form now refused or read otherwise."""
    from rules.loader import PolicyLoader

    files = sorted(POLICIES.glob("*.yaml")) + sorted((POLICIES / "grants").glob("*.yaml"))
    assert len(files) > 30
    for path in files:
        text = path.read_text(encoding="utf-8")
        assert yaml.load(text, Loader=PolicyLoader) == yaml.safe_load(text), path
    assert all(load_policy_file(path) for path in sorted(POLICIES.glob("*.yaml")))
    assert len(load_grant_program_dir(POLICIES / "grants")) == 5


def test_eum_policy_validate_names_the_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(DOC.replace(BAND, "- {up_to_won: 300000, rate_bp: 0700}"), encoding="utf-8")
    result = CliRunner().invoke(app, ["policy", "validate", str(bad)])
    assert result.exit_code == 1 and f"BAD  {bad}:{_line(bad.read_text(), '0700')}:" in result.output, result.output


def test_validate_refuses_a_tab_in_a_name_as_the_api_does_with_its_line(tmp_path, api):
    """A name holding a tab (pasted from an Excel cell): `eum policy validate` and `eum
    grants validate` said ok, and POST /v1/policies refused the same file (422 "control
    character", line null). The commands run the create routes' text check, with the
    line; the API's answer gives the line too (Korean text audit, repro_4)."""
    policy = DOC.replace('name: "', 'name: "한빛\t', 1)
    program = COUPON.replace('name: "', 'name: "민생\t', 1)
    assert policy != DOC and program != COUPON
    for kind, text, doc in (("policy", policy, DOC), ("grants", program, COUPON)):
        bad = tmp_path / f"{kind}.yaml"
        bad.write_text(text, encoding="utf-8")
        line = _line(text, "\t")
        out = CliRunner().invoke(app, [kind, "validate", str(bad)])
        assert out.exit_code != 0 and f"BAD  {bad}:{line}: name: control character" in out.output, out.output
        assert "U+0009" in out.output, out.output
    r = api.client.post("/v1/policies", content=policy.encode(),
                        headers={**api.h("policy-editor"), "Content-Type": "application/yaml"})
    assert r.status_code == 422 and r.json()["code"] == "policy_invalid", r.text
    assert [(p["line"], p["path"]) for p in r.json()["problems"]] == [(_line(policy, "\t"), "name")], r.text


def test_the_api_refuses_a_key_given_twice_and_stores_nothing(api):
    document = {**yaml.safe_load(DOC), "policy_id": "twice"}
    document.pop("effective_from")
    text = json.dumps(document, default=str).replace('"rate_bp": 1500', '"rate_bp": 1500, "rate_bp": 7000', 1)
    r = api.client.post("/v1/policies", content=text,
                        headers={**api.h("policy-editor"), "Content-Type": "application/json"})
    assert r.status_code == 422 and r.json()["code"] == "policy_invalid" and "rate_bp" in r.json()["detail"], r.text
    assert api.get("/v1/policies/twice", role="auditor").status_code == 404
    program = {**yaml.safe_load(COUPON), "program_id": "twice"}
    body = json.dumps(program, default=str).replace('"amount_won": 400000',
                                                    '"amount_won": 400000, "amount_won": 4000000')
    r = api.client.post("/v1/grant-programs", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 401, r.text  # the key is checked first, whatever the body
    r = api.client.post("/v1/grant-programs", content=body,
                        headers={**api.h("policy-editor"), "Content-Type": "application/json"})
    assert r.status_code == 422 and "amount_won" in r.json()["detail"], r.text
    assert "amount_rules.base.0" in r.json()["detail"]
    assert api.get("/v1/grant-programs/twice", role="auditor").status_code == 404
    # the same body without the second key is created
    r = api.client.post("/v1/grant-programs", content=json.dumps(program, default=str),
                        headers={**api.h("policy-editor"), "Content-Type": "application/json"})
    assert r.status_code == 201, r.text


def test_a_tag_that_hides_what_is_written_is_refused():
    """`!!binary YmluLTI=` is read as the policy id "bin-2": a reviewer of the file reads
    base64. Refused with its line, as the other YAML 1.1 surprises are."""
    from rules.loader import PolicyInvalid, parse_policy_text

    text = (POLICIES / "2025-10-cap-50man.yaml").read_text()
    for tagged in ("policy_id: !!binary YmluLTI=", "policy_id: !!set {a: null}"):
        with pytest.raises(PolicyInvalid, match="not read"):
            parse_policy_text(text.replace("policy_id: incheon-2025-10", tagged, 1), "t")


def test_eum_policy_commands_refuse_a_file_they_cannot_read_in_lines_not_a_traceback(tmp_path):
    """A file that is not UTF-8 was a UnicodeDecodeError traceback from `policy validate`
    (which then never checked the files after it) and `policy simulate`; `policy diff`
    and `policy submit` gave tracebacks for an invalid or missing file."""
    shipped = POLICIES / "2025-10-cap-50man.yaml"
    binary = tmp_path / "bin.yaml"
    binary.write_bytes(b"policy_id: x\n\xff\xfe garbage\n")
    bad = tmp_path / "bad.yaml"
    bad.write_text("policy_id: x\n  bad: [\n")
    missing = tmp_path / "missing.yaml"
    runner = CliRunner()
    out = runner.invoke(app, ["policy", "validate", str(binary), str(shipped)])
    assert out.exit_code == 1 and isinstance(out.exception, (SystemExit, type(None))), out.exception
    assert out.output.splitlines() == [f"BAD  {binary}:2: (document): not UTF-8 text",
                                       f"ok   {shipped}: incheon-2025-10 (city)"], out.output
    for args, said in ((["diff", str(shipped), str(bad)], f"BAD  {bad}:2: (document): not valid YAML/JSON"),
                       (["diff", str(shipped), str(missing)],
                        f"BAD  {missing}:-: (document): cannot be read: No such file or directory"),
                       (["diff", str(binary), str(shipped)], f"BAD  {binary}:2: (document): not UTF-8 text"),
                       (["submit", str(missing), "--key", "eum_x", "--api-url", "http://127.0.0.1:9"],
                        f"error: {missing}: No such file or directory; nothing sent")):
        out = runner.invoke(app, ["policy", *args])
        assert out.exit_code == 2 and out.stdout == "", (args, out.output)
        assert not isinstance(out.exception, Exception) or isinstance(out.exception, SystemExit), (args, out.exception)
        assert out.stderr.startswith(said) and len(out.stderr.splitlines()) == 1, (args, out.stderr)


def test_eum_policy_validate_refuses_one_policy_id_in_two_files(tmp_path):
    """Two files giving incheon-2025-10 with other terms were each "ok", exit 0: one id
    names one document (the service's start failed on such a folder). The same file
    named twice is one file."""
    shipped = POLICIES / "2025-10-cap-50man.yaml"
    later = tmp_path / "same-id.yaml"
    later.write_text(shipped.read_text(encoding="utf-8").replace("2025-10-01T00", "2025-11-01T00"))
    out = CliRunner().invoke(app, ["policy", "validate", str(shipped), str(later)])
    assert out.exit_code == 1, out.output
    assert out.output.splitlines()[-1] == (f"BAD  together: policy_id 'incheon-2025-10' is in both {shipped} and "
                                           f"{later}; one id names one document"), out.output
    out = CliRunner().invoke(app, ["policy", "validate", str(shipped), str(shipped)])
    assert out.exit_code == 0 and "BAD" not in out.output, out.output


def test_a_line_feed_in_a_name_is_named_and_refused_even_at_the_end(api, tmp_path):
    """Python's `$` matches before a final line feed, so checked with `re.match` a policy
    name ending in one was accepted (201), one holding one was refused "(found )" naming
    nothing, and a merchant name ending in one was refused quoting the pattern (the
    review of 2026-12-06i)."""
    import yaml
    from typer.testing import CliRunner

    from eum.cli import app
    from tests.conftest import POLICIES

    text = (POLICIES / "2025-09-all-under-30eok.yaml").read_text(encoding="utf-8")
    doc = {**yaml.safe_load(text), "policy_id": "lf-end"}
    doc.pop("effective_from")
    doc["name"] += "\n"
    created = api.post("/v1/policies", doc, role="policy-editor")
    assert created.status_code == 422 and "U+000A" in created.json()["problems"][0]["reason"], created.text
    path = tmp_path / "p.yaml"
    path.write_text(text.replace('name: "', 'name: "한빛\\n', 1), encoding="utf-8")
    out = CliRunner().invoke(app, ["policy", "validate", str(path)])
    assert out.exit_code != 0 and "U+000A" in out.output, out.output
    r = api.put("/v1/merchants/k-lf", {"name": "한빛 떡볶이\n", "district": "seo", "category": "restaurant",
                                       "annual_sales": 1, "registered_from": "2024-01-01"})
    assert r.status_code == 422 and "U+000A" in r.json()["detail"] and "pattern" not in r.json()["detail"], r.text


def test_validate_refuses_a_zero_cap_as_the_api_does_with_its_line(tmp_path, api):
    """A cap of 0 won: POST /v1/policies refused it (422, line null) while `eum policy
    validate` said ok and a new file holding one was loaded at start (the policy-workflow
    audit). It is refused where documents come in, with its line, as the layer's fields
    are; a document an earlier release stored with one still loads
    (tests/test_policy_lifecycle.py)."""
    text = DOC.replace("remainder_to: city", "remainder_to: city\n    monthly_cashback_cap_won: 0", 1) \
        .replace("policy_id: incheon-2025-09", "policy_id: cap-zero")
    assert "cap-zero" in text and "_won: 0" in text
    bad = tmp_path / "cap.yaml"
    bad.write_text(text, encoding="utf-8")
    line = _line(text, "monthly_cashback_cap_won: 0")
    out = CliRunner().invoke(app, ["policy", "validate", str(bad)])
    assert out.exit_code == 1, out.output
    assert f"BAD  {bad}:{line}: components.0.monthly_cashback_cap_won: a cashback cap must be at least 1 won" \
        in out.output, out.output
    with pytest.raises(PolicyInvalid, match="at least 1 won"):
        load_policy_file(bad)
    r = api.client.post("/v1/policies", content=text.replace("effective_from:", "#").encode(),
                        headers={**api.h("policy-editor"), "Content-Type": "application/yaml"})
    assert r.status_code == 422 and r.json()["code"] == "policy_invalid", r.text
    assert [(p["line"], p["path"]) for p in r.json()["problems"]] == \
        [(line, "components.0.monthly_cashback_cap_won")], r.text
    assert api.get("/v1/policies/cap-zero", role="auditor").status_code == 404



def _alias_bomb(text: str, levels: int) -> str:
    """`text` with `cashback_on` a list of `levels` anchored lists, each ten aliases of the
    one before: 10^levels values in ~200 bytes a level."""
    lists = "\n  - &a0 [" + ",".join(["charged"] * 10) + "]"
    lists += "".join(f"\n  - &a{i} [" + ",".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, levels))
    assert "cashback_on: [charged]" in text
    return text.replace("cashback_on: [charged]", "cashback_on:" + lists)


def test_aliases_that_expand_past_what_a_document_holds_are_refused_before_it_is_read(api):
    """Seven levels of ten aliases (1.6 kB, 10^7 values) took seconds and 250 MB, and ten
    never answered, the worker's memory growing: YAML shares what an alias names, but a
    field refusing the list wrote it out whole in its error (the security audit). A
    document whose aliases expand past EXPANDED_VALUES_MAX values is refused at once (a
    grant program's too); one whose aliases stay within still reads."""
    import time

    import rules.loader

    started = time.perf_counter()
    for levels in (7, 10):  # 7 first: without the bound, 10 never ends
        reasons = [p.reason for p in _refused(_alias_bomb(DOC, levels)).problems]
        refusal = f"its aliases (*name) expand to more than {getattr(rules.loader, 'EXPANDED_VALUES_MAX', 0):,} values"
        assert reasons == [refusal + ": write them out"], reasons[:3]
    program = COUPON + "x0: &x0 [1,1,1,1,1,1,1,1,1,1]\n" + "".join(
        f"x{i}: &x{i} [" + ",".join([f"*x{i - 1}"] * 10) + "]\n" for i in range(1, 10))
    assert [p.reason for p in _refused(program, GrantProgramDocument).problems] == [refusal + ": write them out"]
    assert time.perf_counter() - started < 1
    shared = DOC.replace("cashback_on: [charged]", "cashback_on: &on [charged]\nx-on: *on")
    assert "x-on" in str(_refused(shared))  # read (aliases within the bound), then refused as a field it has not
    r = api.client.post("/v1/policies", content=_alias_bomb(DOC, 10).replace("incheon-2025-09", "bomb-1").encode(),
                        headers={**api.h("policy-editor"), "Content-Type": "application/yaml"})
    assert r.status_code == 422 and "expand to more than" in r.text, r.text[:300]
    assert api.get("/v1/policies/bomb-1", role="policy-editor").status_code == 404
