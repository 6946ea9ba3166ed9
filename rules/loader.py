"""Loading policy documents from YAML/JSON text, with errors that name the line."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import yaml
from pydantic import ValidationError
from yaml.constructor import ConstructorError

from rules.compiled import CompiledPolicy, PolicyTimeline, compile_policy
from rules.document import INPUT, PolicyDocument
from rules.timeutil import to_the_microsecond

POLICY_FILE_BYTES_MAX = 256_000  # ~100x the largest shipped policy; pure-Python YAML (no libyaml) takes seconds per MB


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


_DECIMAL = re.compile(r"[-+]?(?:0|[1-9][0-9_]*)")
_BOOL = "tag:yaml.org,2002:bool"


class PolicyLoader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):
    """`yaml.SafeLoader` that reads policy and grant program text as its writer means it,
    or refuses it: a key given twice (YAML and JSON keep the last one silently: a band's
    `rate_bp: 700, rate_bp: 7000` paid 70%), and YAML 1.1's other bases for numbers
    (`0700` was octal 448, `11:40` base 60 for 700, `0x2bc` hex), with the line. Only
    true/false are booleans (YAML 1.2, JSON): yes/no/on/off are text, so a category or
    an income status named `no` stays text; a boolean field reads them as before
    (pydantic), and a number field refuses them (a household size of `yes` was 1).

    Parsed by libyaml where PyYAML was built with it (its wheels are): a third of the
    time of the pure-Python parser, which every worker's start (27 shipped files) and
    every test's app paid; nesting past libyaml's 1,000 levels is refused as not valid
    YAML, as deeper text was by the RecursionError below."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor`: keys given here win, as YAML says
                    continue
                key = self.construct_object(key_node, deep=deep)
                try:
                    first = seen.setdefault(key, key_node)
                except TypeError:  # unhashable: SafeLoader says so below
                    continue
                if first is not key_node:
                    raise ConstructorError(
                        None, None, f"key {key!r} given twice (first on line {first.start_mark.line + 1}); "
                        "only one is read, so which was meant is not known: keep one", key_node.start_mark)
        return super().construct_mapping(node, deep=deep)

    def construct_yaml_int(self, node):
        text = str(node.value)
        if not _DECIMAL.fullmatch(text):
            digits = text.lstrip("+-").replace("_", "")
            why = ("octal in YAML 1.1" if digits[:1] == "0" and digits.isdigit()
                   else "base 60 in YAML 1.1" if ":" in digits else "not a decimal number")
            raise ConstructorError(None, None, f"{text} is {why} (read as {super().construct_yaml_int(node)}): "
                                   "write numbers in decimal without leading zeros, or quote text",
                                   node.start_mark)
        return super().construct_yaml_int(node)

    def construct_yaml_timestamp(self, node):
        """An unquoted date or time, read by YAML itself: one that does not exist (30
        February, month 13) is refused with its line, not as the whole document's. One
        finer than a microsecond stays text, as if quoted: YAML would cut it to the
        microsecond, and the field's own check then refuses it by its name and line
        (`rules.timeutil.time_text`)."""
        try:
            to_the_microsecond(node.value)
        except ValueError:
            return node.value
        try:
            return super().construct_yaml_timestamp(node)
        except (ValueError, OverflowError) as exc:
            raise ConstructorError(None, None, f"{node.value} is not a date or time: {exc}", node.start_mark) from None

    def construct_refused(self, node):
        """Tags that make the text say something other than what a reviewer reads: base64
        (`!!binary`: `YmluLTI=` is a policy id), sets and ordered maps of YAML 1.1."""
        raise ConstructorError(None, None, f"{node.tag.rsplit(':', 1)[-1]} values are not read: write the value "
                                           "as plain text", node.start_mark)


PolicyLoader.add_constructor("tag:yaml.org,2002:int", PolicyLoader.construct_yaml_int)
PolicyLoader.add_constructor("tag:yaml.org,2002:timestamp", PolicyLoader.construct_yaml_timestamp)
for _tag in ("binary", "set", "omap", "pairs"):
    PolicyLoader.add_constructor(f"tag:yaml.org,2002:{_tag}", PolicyLoader.construct_refused)
PolicyLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != _BOOL]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
PolicyLoader.add_implicit_resolver(_BOOL, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))


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


# Values a document may hold with its aliases expanded: as many as its bytes allow, so a
# document that writes its values out is never refused. Ten levels of ten aliases each (a
# 2 kB "billion laughs") were fine for YAML, which shares what an alias names, but a field
# refusing the list reprs it whole in its error (`enum.Enum`'s "... is not a valid"): 10^10
# values, a request that never answered while its worker's memory grew (the security audit).
EXPANDED_VALUES_MAX = POLICY_FILE_BYTES_MAX


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    return list(node.value) if isinstance(node, yaml.SequenceNode) else []


def expanded_values(root: yaml.Node, limit: int = EXPANDED_VALUES_MAX) -> int:
    """The values (nodes) of a document with every alias expanded, each node counted as
    often as it is reached, worked out once per node; past `limit` (or an alias inside
    what it names: no end) `limit + 1`."""
    sizes: dict[int, int] = {}
    expanding: set[int] = set()
    stack = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        if children_done:
            sizes[id(node)] = min(1 + sum(sizes[id(child)] for child in _children(node)), limit + 1)
            expanding.discard(id(node))
        elif id(node) in expanding:
            return limit + 1
        elif id(node) not in sizes:
            expanding.add(id(node))
            stack.append((node, True))
            stack.extend((child, False) for child in _children(node))
    return sizes[id(root)]


def parse_policy_text(text: str, source: str = "<policy>", model=PolicyDocument):
    """A policy document (or, with `model`, another document in the same format: a grant
    program) from YAML/JSON text; PolicyInvalid names each problem's line and reason."""
    if len(text.encode()) > POLICY_FILE_BYTES_MAX:
        raise PolicyInvalid(source, [PolicyProblem(None, "", f"larger than {POLICY_FILE_BYTES_MAX} bytes")])
    try:
        loader = PolicyLoader(text)
        try:
            node = loader.get_single_node()
            if node is not None and expanded_values(node) > EXPANDED_VALUES_MAX:
                raise PolicyInvalid(source, [PolicyProblem(None, "", f"its aliases (*name) expand to more than "
                                                                     f"{EXPANDED_VALUES_MAX:,} values: write them out")])
            data = loader.construct_document(node) if node is not None else None
        finally:
            loader.dispose()
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        raise PolicyInvalid(source, [PolicyProblem(line, "", f"not valid YAML/JSON: {getattr(exc, 'problem', exc)}")]) from None
    except RecursionError:  # nesting far deeper than any policy (found by tests/test_fuzz_inputs.py)
        raise PolicyInvalid(source, [PolicyProblem(None, "", "nested too deeply to be a policy")]) from None
    except PolicyInvalid:  # a ValueError, said already
        raise
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
    """`model.model_validate(data)`, its errors as PolicyProblems with their lines; for a
    policy, also what a new document may not say (`PolicyDocument.input_problems`)."""
    try:
        document = model.model_validate(data, context={INPUT: True})
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        problems = [
            PolicyProblem(
                _line_of(node, tuple(err["loc"])) if node is not None else None,
                ".".join(str(part) for part in err["loc"]),
                err["msg"],
            )
            for err in errors if not _echo_of_an_item(err, errors)
        ]
        raise PolicyInvalid(source, problems) from None
    if isinstance(document, PolicyDocument) and (refused := document.input_problems()):
        raise PolicyInvalid(source, [PolicyProblem(_line_of(node, path) if node is not None else None,
                                                   ".".join(map(str, path)), reason) for path, reason in refused])
    return document


def _echo_of_an_item(err: dict, errors: list[dict]) -> bool:
    """A list's "at least N items after validation" where one of its items is refused
    itself: pydantic counts only the items that passed, so a band with a negative rate
    also said its list of one band had none, a second line about a list that has one."""
    loc = tuple(err["loc"])
    return err["type"] == "too_short" and any(
        len(other["loc"]) > len(loc) and tuple(other["loc"][:len(loc)]) == loc for other in errors)


_PATH_PART = re.compile(r"([^.\[\]]+)|\[(\d+)\]")


def _path_parts(path: str) -> tuple:
    """"components[0].name" as ("components", 0, "name"), for `_line_of`."""
    return tuple(name if name else int(index) for name, index in _PATH_PART.findall(path))


def text_problems(document, text: str | None = None) -> list[PolicyProblem]:
    """What the create routes refuse in a new policy's or grant program's names and text
    (`document.text_problems()`: control characters, bidirectional overrides), each with
    the line `text` (the document's YAML or JSON) gives it and the characters found. Not
    checked in `validate`: files read at the service's start are held to it only where
    documents come in (the API, `eum policy validate`, `eum grants validate` and
    `submit`), so one accepted before still loads."""
    from rules.document import NO_CONTROLS, TEXT_CHARS, shown_char

    paths = document.text_problems()
    if not paths:
        return []
    node = _document_node(text) if text is not None else None
    problems = []
    for path in paths:
        parts = _path_parts(path)
        value = document
        for part in parts:
            value = value[part] if isinstance(part, int) else getattr(value, part)
        allowed = re.compile(NO_CONTROLS if parts[-1] == "name" else TEXT_CHARS)
        found = sorted({c for c in value if not allowed.fullmatch(c)})  # `$` passes a line feed to .match
        problems.append(PolicyProblem(_line_of(node, parts) if node is not None else None, path,
                                      "control character or bidirectional override (found "
                                      + ", ".join(map(shown_char, found)) + ")"))
    return problems


def path_line(text: str, path: str) -> int | None:
    """The line of `path` ("components[0].variants[2]") in a document's YAML or JSON text,
    for what is said of a document that parsed (`eum policy validate`'s warnings)."""
    node = _document_node(text)
    return _line_of(node, _path_parts(path)) if node is not None else None


def _document_node(text: str):
    """The YAML node tree of a document's text (its lines), or None when it does not parse."""
    try:
        loader = PolicyLoader(text)
        try:
            return loader.get_single_node()
        finally:
            loader.dispose()
    except yaml.YAMLError:
        return None


def file_text(path: Path) -> str:
    """A policy or grant program file's text: UTF-8, as the API takes a document, or
    PolicyInvalid naming the line of the first byte that is not (it was a
    UnicodeDecodeError traceback from the commands and the service's start). A file that
    cannot be read (a dangling link, a folder named *.yaml, no permission) is PolicyInvalid
    too, saying why (it was an OSError traceback)."""
    try:
        data = path.read_bytes()
    except OSError as error:
        raise PolicyInvalid(str(path), [PolicyProblem(None, "", f"cannot be read: {error.strerror or error}")]) from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise PolicyInvalid(str(path), [PolicyProblem(line, "", "not UTF-8 text")]) from None


def load_policy_file(path: Path) -> PolicyDocument:
    return parse_policy_text(file_text(path), str(path))


def load_grant_program_file(path: Path):
    """A grant program file (policies/grants/*.yaml), validated with line-numbered problems."""
    from rules.grants import GrantProgramDocument

    return parse_policy_text(file_text(path), str(path), model=GrantProgramDocument)


def ids_in_two_files(documents: list[tuple[Path, PolicyDocument]]) -> list[tuple[str, Path, Path]]:
    """(policy_id, first file, other file) for each policy_id that two files give: one id
    names one document (the payments a policy judged name it by its id), whatever the two say."""
    first: dict[str, Path] = {}
    twice = []
    for path, document in documents:
        seen = first.setdefault(document.policy_id, path)
        if seen.resolve() != path.resolve():  # one file named twice is one file
            twice.append((document.policy_id, seen, path))
    return twice


def load_grant_program_dir(directory: Path) -> list:
    """Every grant program file under a directory, in file-name order."""
    return [load_grant_program_file(path) for path in sorted(directory.glob("*.yaml"))]


def load_policy_dir(directory: Path) -> list[CompiledPolicy]:
    """Every `*.yaml` policy under a directory (not grant programs), compiled; one
    policy_id in two files is PolicyInvalid (recorded, the second was a unique-key
    violation in the service's worker)."""
    documents = [(path, load_policy_file(path)) for path in sorted(directory.glob("*.yaml"))]
    for policy_id, first, path in ids_in_two_files(documents):
        raise PolicyInvalid(str(path), [PolicyProblem(None, "policy_id", f"{policy_id!r} is also the id of "
                                                                         f"{first}; one id names one document")])
    return [compile_policy(document) for _, document in documents]


def timeline_from_dir(directory: Path) -> PolicyTimeline:
    return PolicyTimeline(load_policy_dir(directory))


class _Pairs(dict):
    """A JSON object with the keys it was given more than once."""

    __slots__ = ("twice",)


def _pairs(pairs: list[tuple[str, object]]) -> _Pairs:
    out = _Pairs(pairs)
    seen: set[str] = set()
    out.twice = [key for key, _ in pairs if key in seen or seen.add(key)] if len(out) < len(pairs) else []
    return out


def json_duplicate_keys(text: bytes | str) -> list[str]:
    """The paths (`amount_rules.base.0.amount_won`) of keys given twice in JSON text, which
    `json.loads`, and so FastAPI, read as the last one given; [] for text that is not
    JSON (the route's own parse answers that). For JSON bodies not read by
    `parse_policy_text` (a grant program's)."""
    found: list[str] = []

    def walk(value, path: tuple) -> None:
        if isinstance(value, dict):
            found.extend(".".join((*path, key)) for key in getattr(value, "twice", ()))
            for key, item in value.items():
                walk(item, (*path, key))
        elif isinstance(value, list):
            for index, item in enumerate(value):
                walk(item, (*path, str(index)))

    try:
        walk(json.loads(text, object_pairs_hook=_pairs), ())
    except (ValueError, RecursionError):
        return []
    return found


def document_json(document: PolicyDocument) -> str:
    return json.dumps(document.model_dump(mode="json", exclude_none=True), ensure_ascii=False, sort_keys=True)
