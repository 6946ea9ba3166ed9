"""Every route × every role × no key, against the written matrix in docs/access.md."""

import re

import pytest

from api.access import matrix, markdown
from eum.settings import REPO_ROOT
from ledger.keys import ROLES


def _table(text: str) -> str:
    return text[text.index("| method"):]


def test_written_matrix_matches_the_code(api):
    written = (REPO_ROOT / "docs" / "access.md").read_text()
    assert _table(written) == markdown(api.client.app), "regenerate docs/access.md from api.access.markdown"
    from eum.cli import ACCESS_HEADER

    assert written == ACCESS_HEADER + markdown(api.client.app), "regenerate: eum access-matrix > docs/access.md"


def _concrete(path: str) -> str:
    return re.sub(r"\{[^}]+\}", "x1", path).replace("/budgets/x1/x1", "/budgets/city/2026")


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_every_route_admits_exactly_its_roles(api):
    routes = matrix(api.client.app)
    assert len(routes) > 20
    for method, path, roles in routes:
        url = _concrete(path)
        anonymous = api.client.request(method, url, json={})
        if roles is None:
            assert anonymous.status_code not in (401, 403), (method, path)
            continue
        assert anonymous.status_code == 401, (method, path, anonymous.status_code)
        assert anonymous.headers["content-type"].startswith("application/problem+json")
        bad_key = api.client.request(method, url, json={}, headers={"Authorization": "Bearer eum_nope_nope"})
        assert bad_key.status_code == 401, (method, path)
        for role in ROLES:
            response = api.client.request(method, url, json={}, headers=api.h(role))
            if role in roles:
                assert response.status_code not in (401, 403), (method, path, role, response.text)
            else:
                assert response.status_code == 403, (method, path, role, response.status_code)
                assert response.json()["code"] == "forbidden"


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_access_is_decided_before_the_body_is_read(api):
    """A body that cannot be decoded (not JSON, not UTF-8) does not get past the key
    check with a 422: no key is 401 and a role the route does not admit is 403, as with a
    good body; only an admitted role learns that its body is bad."""
    bodies = [b"{not json", b"\xff\xfe{\"amount\": 1}"]
    checked = 0
    for method, path, roles in matrix(api.client.app):
        if roles is None or method not in ("POST", "PUT", "PATCH"):
            continue
        url = _concrete(path)
        for raw in bodies:
            plain = {"content-type": "application/json"}
            assert api.client.request(method, url, content=raw, headers=plain).status_code == 401, (method, path)
            for role in ROLES:
                response = api.client.request(method, url, content=raw, headers={**plain, **api.h(role)})
                if role in roles:
                    assert response.status_code not in (401, 403), (method, path, role)
                else:
                    assert response.status_code == 403, (method, path, role, response.status_code, response.text)
                    assert response.json()["code"] == "forbidden"
                checked += 1
    assert checked > 100


def test_a_401_names_its_scheme_and_a_trailing_slash_is_not_redirected(api):
    """RFC 9110: a 401 carries WWW-Authenticate (both paths: the card app's fast path
    hands a bad key to the full stack). A path with a trailing slash was a 307 to an
    absolute http:// URL built from the Host header, before any auth; now a 404 problem.
    Probes may send HEAD to /healthz."""
    for path in ("/v1/payments", "/v1/settlements"):
        r = api.client.post(path, json={}, headers={"Authorization": "Bearer eum_nope"})
        assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer"), (path, r.headers)
    r = api.client.post("/v1/payments/", json={}, headers=api.h("card-app"), follow_redirects=False)
    assert r.status_code == 404 and r.headers["content-type"].startswith("application/problem+json")
    assert api.client.head("/healthz").status_code == 200


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_every_route_that_takes_a_json_body_reads_it_once_in_utf_8(api):
    """Each route whose body FastAPI parses into a model depends on `json_keys_once`,
    which refuses a key given twice and a body not in UTF-8 (`json.loads` of bytes
    guesses UTF-16 and UTF-32: a payment sent in UTF-16 paid). A route added without it
    would take both."""
    from api.access import _api_routes
    from api.auth import json_keys_once

    def calls(dependant):
        for dependency in dependant.dependencies:
            yield dependency.call
            yield from calls(dependency)

    with_body = [route for route in _api_routes(api.client.app.routes) if route.body_field is not None]
    assert len(with_body) > 15
    missing = [(sorted(route.methods), route.path) for route in with_body if json_keys_once not in set(calls(route.dependant))]
    assert not missing, missing
