"""Times finer than the book keeps. The book records a time as integer microseconds; a
fraction of a second past its 6th digit was cut off, so `...00.1234567` and
`...00.1234568` were one instant, and a payment sent again under its id with another
7th digit was answered as a replay of the first where it is another request (409 by
its id, or an error). Digits past the 6th are refused, naming the field, wherever a
time comes in; trailing zeros (a nanosecond clock's `...123456000`) are the same
instant and stay taken."""

from __future__ import annotations

import pytest
import typer

from rules.timeutil import FINEST_TEXT, to_the_microsecond
from tests.book_helpers import assert_problem, put_member, put_merchant, snapshot, topup
from tests.conftest import at

FINE = "2025-09-15T12:00:00.123456+09:00"
FINER = "2025-09-15T12:00:00.1234567+09:00"  # a 7th digit: below a microsecond
NANO_ZEROS = "2025-09-15T12:00:00.123456000+09:00"  # the same instant as FINE


@pytest.mark.parametrize("text", [FINE, NANO_ZEROS, "2025-09-15T12:00:00+09:00", "2025-09-15T12:00:00.5Z",
                                  "2025-09-15T12:00:00.1234560+09:00", "2025-09-15", "2025-09-15T12:00:00,123456Z"])
def test_a_time_to_the_microsecond_passes_as_it_is(text):
    assert to_the_microsecond(text) is text


@pytest.mark.parametrize("text", [FINER, "2025-09-15T12:00:00.000000001Z", "2025-09-15T12:00:00.1234560001+09:00",
                                  "2025-09-15 12:00:00,9999999+09:00"])
def test_a_digit_past_the_sixth_is_refused_saying_why(text):
    with pytest.raises(ValueError, match=FINEST_TEXT):
        to_the_microsecond(text)


def setup(api) -> None:
    put_member(api, "m1")
    put_merchant(api, "shop")
    topup(api, "t-setup", "m1", 100_000, at("2025-09-01"))


def payment(occurred_at: str) -> dict:
    return {"payment_id": "p1", "member_id": "m1", "merchant_id": "shop", "amount": 17_000,
            "occurred_at": occurred_at}


def assert_finer_refused(response, field: str) -> dict:
    problem = assert_problem(response, 422)
    said = problem["detail"] + " ".join(p["reason"] + p["path"] for p in problem.get("problems", []))
    assert field in said and FINEST_TEXT in said, problem
    return problem


def test_a_payment_sent_again_with_another_seventh_digit_is_no_replay_of_the_first(api):
    setup(api)
    first = api.post("/v1/payments", payment(FINE))
    assert first.status_code == 201, first.text
    assert first.json()["occurred_at"] == FINE
    before = snapshot(api)
    assert_finer_refused(api.post("/v1/payments", payment(FINER)), "occurred_at")
    assert_finer_refused(api.post("/v1/payments", payment(FINER.replace("+09:00", "Z"))), "occurred_at")
    again = api.post("/v1/payments", payment(NANO_ZEROS))  # the same instant, written to the nanosecond
    assert again.status_code == 200 and again.headers["idempotent-replayed"] == "true"
    assert again.json() == first.json()
    assert snapshot(api) == before


def _bodies() -> list[tuple[str, str, str, dict | None, dict | None, str, str]]:
    """(label, method, path, JSON body, query, role, field): every time the API takes,
    with a 7th digit. Refused before anything is looked up, so the ids need not exist."""
    card = [("topup", "/v1/topups", {"topup_id": "t1", "member_id": "m1", "amount": 1_000, "occurred_at": FINER}),
            ("payment", "/v1/payments", payment(FINER)),
            ("refund", "/v1/payments/p-any/refunds", {"refund_id": "r1", "amount": 1_000, "occurred_at": FINER}),
            ("withdrawal", "/v1/members/m1/withdrawals", {"withdrawal_id": "w1", "occurred_at": FINER})]
    cases = [(label, "post", path, body, None, "card-app", "occurred_at") for label, path, body in card]
    window = {"valid_from": "2025-09-01", "valid_until": "2025-12-31"}
    program = {"program_id": "g-fine", "name": "g", "funding": {"national": 10_000}, **window}
    cases += [
        ("disbursement", "post", "/v1/grant-programs/g1/disbursements",
         {"disbursement_id": "d1", "member_id": "m1", "amount": 1_000, "occurred_at": FINER}, None, "policy-editor",
         "occurred_at"),
        ("bulk disbursement", "post", "/v1/grant-programs/g1/disbursements/bulk", None, {"occurred_at": FINER},
         "policy-editor", "occurred_at"),
        ("expiry", "post", "/v1/grant-programs/g1/expire", {"as_of": FINER}, None, "policy-editor", "as_of"),
        ("program valid_from", "post", "/v1/grant-programs", {**program, "valid_from": FINER}, None,
         "policy-editor", "valid_from"),
        ("program valid_until", "post", "/v1/grant-programs", {**program, "valid_until": FINER}, None,
         "policy-editor", "valid_until"),
        ("activation", "post", "/v1/policies/x/activate", {"effective_from": FINER}, None, "policy-editor",
         "effective_from"),
        ("simulation from", "post", "/v1/policies/x/simulate", {"from": FINER, "to": at("2025-10-01")}, None,
         "policy-editor", "from"),
        ("simulation to", "post", "/v1/policies/x/simulate", {"from": at("2025-08-01"), "to": FINER}, None,
         "policy-editor", "to"),
        ("correction", "post", "/v1/corrections", {"correction_id": "c1", "wrong_policy_id": "a",
                                                   "right_policy_id": "b", "from": FINER, "to": at("2025-10-01")},
         None, "policy-editor", "from"),
        ("audit since", "get", "/v1/audit-log", None, {"since": FINER}, "auditor", "since"),
        ("audit until", "get", "/v1/audit-log", None, {"until": FINER}, "auditor", "until"),
    ]
    return cases


@pytest.mark.parametrize("label, method, path, body, query, role, field", _bodies(), ids=[c[0] for c in _bodies()])
def test_every_time_the_api_takes_is_refused_past_the_microsecond(api, label, method, path, body, query, role, field):
    setup(api)
    before = snapshot(api)
    kwargs = {"params": query} if query else {}
    if method == "get":
        response = api.get(path, role=role, **kwargs)
    elif body is None:
        response = api.client.post(path, content=b"disbursement_id,member_id,amount\n", headers={
            **api.h(role), "Content-Type": "text/csv"}, **kwargs)
    else:
        response = api.post(path, body, role=role, **kwargs)
    assert_finer_refused(response, field)
    assert snapshot(api) == before


POLICY_YAML = """\
policy_id: fine-{n}
name: fine
effective_from: {when}
components: []
"""


@pytest.mark.parametrize("when, quoted", [(FINER, True), (FINER, False)])
def test_a_policy_documents_time_is_refused_past_the_microsecond_quoted_or_not(api, when, quoted):
    text = POLICY_YAML.format(n=int(quoted), when=f'"{when}"' if quoted else when)
    response = api.client.post("/v1/policies", content=text.encode(), headers={
        **api.h("policy-editor"), "Content-Type": "application/yaml"})
    problem = assert_finer_refused(response, "effective_from")
    assert problem["code"] == "policy_invalid" and problem["problems"][0]["line"] == 3
    assert api.get("/v1/policies/fine-0", role="auditor").status_code == 404


def test_a_policy_document_to_the_nanosecond_with_trailing_zeros_is_taken(api):
    text = POLICY_YAML.format(n=2, when=NANO_ZEROS)
    response = api.client.post("/v1/policies", content=text.encode(), headers={
        **api.h("policy-editor"), "Content-Type": "application/yaml"})
    assert response.status_code == 201, response.text
    assert api.get("/v1/policies/fine-2", role="auditor").json()["document"]["effective_from"] == FINE


def test_a_replay_file_refuses_the_line_past_the_microsecond():
    from eum.backfill import Rejected, read_payments

    lines = "payment_id,member_id,merchant_id,amount,occurred_at\n" \
            f"p1,m1,shop,1000,{FINE}\np2,m1,shop,1000,{FINER}\np3,m1,shop,1000,{NANO_ZEROS}\n"
    with pytest.raises(Rejected) as rejected:
        read_payments(lines.encode())
    assert [line for line, _ in rejected.value.errors] == [3]
    assert FINEST_TEXT in rejected.value.errors[0][1] and "occurred_at" in rejected.value.errors[0][1]


def test_the_cli_refuses_a_time_past_the_microsecond():
    from eum.cli import _moment_us

    assert _moment_us(NANO_ZEROS, "--from") == _moment_us(FINE, "--from")
    with pytest.raises(typer.BadParameter, match=FINEST_TEXT):
        _moment_us(FINER, "--from")
