"""Loading policy documents from YAML/JSON text, with errors that name the line."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import yaml
from pydantic import ValidationError

from rules.compiled import CompiledPolicy, PolicyTimeline, compile_policy
from rules.document import PolicyDocument

POLICY_FILE_BYTES_MAX = 256_000  # ~100x the largest shipped policy; pure-Python YAML takes seconds per MB


@dataclass(frozen=True)
class PolicyProblem:
    line: int | None
    path: str
    reason: str

    def __str__(self) -> str:
        where = f"line {self.line}: " if self.line else ""
        return f"{where}{self.path or '(document)'}: {self.reason}"


class PolicyInvalid(ValueError):
    def __init__(self, source: str, problems: list[PolicyProblem]):
        self.source = source
        self.problems = problems
        super().__init__(f"{source}: " + "; ".join(str(p) for p in problems))


def _line_of(node: yaml.Node | None, loc: tuple) -> int | None:
    """Follow a pydantic error location through the YAML node tree to a line number."""
    line = node.start_mark.line + 1 if node is not None else None
    for key in loc:
        if isinstance(node, yaml.MappingNode):
            match = next((v for k, v in node.value if getattr(k, "value", None) == key), None)
            if match is None:
                break
            node = match
        elif isinstance(node, yaml.SequenceNode) and isinstance(key, int) and key < len(node.value):
            node = node.value[key]
        else:
            break
        line = node.start_mark.line + 1
    return line


def parse_policy_text(text: str, source: str = "<policy>", model=PolicyDocument):
    """A policy document (or, with `model`, another document in the same format: a grant
    program) from YAML/JSON text; PolicyInvalid names each problem's line and reason."""
    if len(text.encode()) > POLICY_FILE_BYTES_MAX:
        raise PolicyInvalid(source, [PolicyProblem(None, "", f"larger than {POLICY_FILE_BYTES_MAX} bytes")])
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        raise PolicyInvalid(source, [PolicyProblem(line, "", f"not valid YAML/JSON: {getattr(exc, 'problem', exc)}")]) from None
    except RecursionError:  # nesting far deeper than any policy (found by tests/test_fuzz_inputs.py)
        raise PolicyInvalid(source, [PolicyProblem(None, "", "nested too deeply to be a policy")]) from None
    except (ValueError, TypeError, OverflowError) as exc:  # a scalar YAML cannot build, e.g. 2025-13-01
        raise PolicyInvalid(source, [PolicyProblem(None, "", f"not valid YAML/JSON: {exc}")]) from None
    if not isinstance(data, dict):
        raise PolicyInvalid(source, [PolicyProblem(1, "", "a policy document is a mapping of fields")])
    try:
        return validate(model, data, source, node)
    except RecursionError:
        raise PolicyInvalid(source, [PolicyProblem(None, "", "nested too deeply to be a policy")]) from None


def validate_policy_data(data: dict, source: str = "<policy>", node: yaml.Node | None = None) -> PolicyDocument:
    return validate(PolicyDocument, data, source, node)


def validate(model, data: dict, source: str = "<policy>", node: yaml.Node | None = None):
    """`model.model_validate(data)`, its errors as PolicyProblems with their lines."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        problems = [
            PolicyProblem(
                _line_of(node, tuple(err["loc"])) if node is not None else None,
                ".".join(str(part) for part in err["loc"]),
                err["msg"],
            )
            for err in exc.errors(include_url=False)
        ]
        raise PolicyInvalid(source, problems) from None


def load_policy_file(path: Path) -> PolicyDocument:
    return parse_policy_text(path.read_text(encoding="utf-8"), str(path))


def load_grant_program_file(path: Path):
    """A grant program file (policies/grants/*.yaml), validated with line-numbered problems."""
    from rules.grants import GrantProgramDocument

    return parse_policy_text(path.read_text(encoding="utf-8"), str(path), model=GrantProgramDocument)


def load_grant_program_dir(directory: Path) -> list:
    """Every grant program file under a directory, in file-name order."""
    return [load_grant_program_file(path) for path in sorted(directory.glob("*.yaml"))]


def load_policy_dir(directory: Path) -> list[CompiledPolicy]:
    """Every `*.yaml` policy under a directory (not grant programs), compiled."""
    compiled = []
    for path in sorted(directory.glob("*.yaml")):
        compiled.append(compile_policy(load_policy_file(path)))
    return compiled


def timeline_from_dir(directory: Path) -> PolicyTimeline:
    return PolicyTimeline(load_policy_dir(directory))


def document_json(document: PolicyDocument) -> str:
    return json.dumps(document.model_dump(mode="json", exclude_none=True), ensure_ascii=False, sort_keys=True)
