"""The policy document's JSON Schema as published: `docs/policy.schema.json` is written
by hand from `eum policy schema` whenever the format changes, so it is held here to
the schema the code gives (`rules.document.policy_json_schema`, also served at
GET /v1/policies/schema); a field added to the format and not to the file fails."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from eum.cli import app
from eum.settings import REPO_ROOT
from rules.document import policy_json_schema


def test_the_published_schema_is_the_one_the_code_validates_with():
    published = json.loads((REPO_ROOT / "docs" / "policy.schema.json").read_text(encoding="utf-8"))
    assert published == policy_json_schema(), "docs/policy.schema.json is stale: eum policy schema > it"


def test_eum_policy_schema_prints_it():
    result = CliRunner().invoke(app, ["policy", "schema"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output) == policy_json_schema()
