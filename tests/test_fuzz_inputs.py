"""Hypothesis fuzzing of what staff upload: policy documents (YAML/JSON), grant
recipient CSVs and clearing files — malformed, huge, in the wrong encoding (CP949 from
Korean Excel, BOMs), or carrying spreadsheet formulas.

The properties:
- a policy text is either a valid policy (that also compiles) or `PolicyInvalid` whose
  every problem has a reason (and a line when the text parsed as YAML) — never another
  exception;
- a recipient CSV gives rows or `BadUpload`/`ValueError` with the line; a clearing file
  gives a frame or `ClearingFileInvalid` — never another exception;
- every CSV and xlsx export neutralises cells a spreadsheet would run as a formula."""

from __future__ import annotations

import copy
import io
import json
import zipfile

import polars as pl
import pytest
import yaml
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from eum.textfiles import FORMULA_LEADS, BadUpload, decode_text
from rules.compiled import compile_policy
from rules.document import PolicyDocument
from rules.loader import PolicyInvalid, parse_policy_text
from settlement import export
from settlement.reconcile import ClearingFileInvalid, parse_clearing
from tests.conftest import POLICIES

FUZZ = settings(max_examples=150, deadline=None, database=None, suppress_health_check=list(HealthCheck))
POLICY_FILES = sorted(POLICIES.glob("*.yaml"))
REAL_POLICIES = [yaml.safe_load(p.read_text(encoding="utf-8")) for p in POLICY_FILES]

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(10**20), max_value=10**20)
    | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=12)


def _paths(node, prefix=()):
    yield prefix
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _paths(value, (*prefix, key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from _paths(value, (*prefix, index))


@st.composite
def mutated_policies(draw) -> dict:
    """A real policy with a few of its nodes replaced, removed or given a new key."""
    document = copy.deepcopy(draw(st.sampled_from(REAL_POLICIES)))
    for _ in range(draw(st.integers(1, 3))):
        paths = [p for p in _paths(document) if p]
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        parent = document
        for key in path[:-1]:
            parent = parent[key]
        action = draw(st.sampled_from(["replace", "delete", "add"]))
        if action == "replace":
            parent[path[-1]] = draw(json_values)
        elif action == "delete":
            del parent[path[-1]]
        elif isinstance(parent, dict):
            parent[draw(st.text(min_size=1, max_size=10))] = draw(json_values)
    return document


def _check_policy_text(text: str) -> None:
    try:
        document = parse_policy_text(text, "fuzz")
    except PolicyInvalid as invalid:
        assert invalid.problems, "PolicyInvalid with no problem"
        for problem in invalid.problems:
            assert problem.reason, problem
            assert problem.line is None or problem.line >= 1, problem
        return
    assert isinstance(document, PolicyDocument)
    if document.effective_from is not None:
        compile_policy(document)  # a valid document is also one the engine can use


@FUZZ
@given(mutated_policies(), st.sampled_from(["yaml", "json"]))
def test_mutated_policy_documents_are_valid_or_named_invalid(document, form):
    text = yaml.safe_dump(document, allow_unicode=True, sort_keys=False) if form == "yaml" \
        else json.dumps(document, ensure_ascii=False, default=str)
    _check_policy_text(text)


@FUZZ
@given(st.text(max_size=400))
@example("a: &a [*a]")  # a recursive alias
@example("a: " + "[" * 5_000)  # nesting deeper than any policy
@example("a: " + "[" * 100_000 + "]" * 100_000)  # closed, near the size limit: refused by libyaml's depth
@example("a:\n" + "".join(" " * i + "b:\n" for i in range(1, 700)))  # a mapping 700 deep (~245 kB)
@example("---\na: 1\n---\nb: 2")  # two documents
@example("? [a]\n: b")  # an unhashable key
@example("policy_id: x\nname: y\neffective_from: 2025-13-01")  # a date YAML cannot read
@example("\x00\x01")
@example("lol: &a [1,1,1,1,1,1,1,1,1]\nlol2: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]\nlol3: &c [*b,*b,*b,*b,*b,*b,*b,*b]\n"
         "lol4: &d [*c,*c,*c,*c,*c,*c,*c,*c]\nlol5: &e [*d,*d,*d,*d,*d,*d,*d,*d]\nlol6: [*e,*e,*e,*e,*e,*e,*e,*e]")
def test_any_text_is_a_policy_or_a_named_invalid(text):
    _check_policy_text(text)


def test_policy_larger_than_the_limit_is_refused_by_size():
    with pytest.raises(PolicyInvalid, match="larger than"):
        parse_policy_text("name: x\n" + "#" * 1_100_000)


# ---------------------------------------------------------------- upload encodings


KOREAN_ROWS = "disbursement_id,member_id,amount,category\nd-1,m-1,100000,소상공인\nd-2,m-2,50000,일반\n"


@pytest.mark.parametrize("data,encoding", [
    (KOREAN_ROWS.encode("utf-8"), "utf-8"),
    (b"\xef\xbb\xbf" + KOREAN_ROWS.encode("utf-8"), "utf-8-sig"),
    (KOREAN_ROWS.encode("cp949"), "cp949"),  # what Excel in Korea saves as "CSV"
])
def test_uploads_in_the_encodings_staff_send(data, encoding):
    text, found = decode_text(data)
    assert found == encoding and text == KOREAN_ROWS


@pytest.mark.parametrize("encoding", ["utf-8", "cp949"])
def test_a_bad_byte_is_named_by_its_line_in_the_encoding_the_file_is_in(encoding):
    """A CP949 file with a byte that is not CP949 on line 4 was refused naming line 1: the
    line of its first byte that is not UTF-8, its Korean header (clearing-file
    reconciliation audit). The line is that of the decoding that reads further, so a
    UTF-8 file's is still its own bad byte's, not where CP949 gives up on its Korean."""
    data = KOREAN_ROWS.encode(encoding) + b"d-3,m-3,1000,\xff\xff\n"  # line 4
    with pytest.raises(BadUpload) as refused:
        decode_text(data)
    assert refused.value.line == 4 and "(line 4)" in str(refused.value), str(refused.value)
    clearing = ("승인번호,가맹점번호,거래금액,거래일시,비고\np1,S1,12000,20250930120000,가\n".encode(encoding)
                + b"p2,S1,5000,20250930130000,\xff\xff\n")
    with pytest.raises(ClearingFileInvalid) as invalid:
        parse_clearing(clearing)
    assert [e["line"] for e in invalid.value.extra["errors"]] == [3] and "(line 3)" in invalid.value.detail


@pytest.mark.parametrize("end", ["\n", "\r\n", "\r"])
def test_a_bad_byte_is_named_by_its_line_whatever_the_line_ends(end):
    """The bad byte's line was counted by LF alone: in a file of CR line ends (read as
    such elsewhere) every bad byte was on line 1 (the review)."""
    data = end.join(["a,b", "1,2", "3,4", "5,\xff"]).encode("latin-1") + end.encode()
    with pytest.raises(BadUpload) as refused:
        decode_text(data)
    assert refused.value.line == 4, str(refused.value)


@FUZZ
@given(st.binary(max_size=300))
def test_any_bytes_decode_or_name_the_line(data):
    try:
        text, encoding = decode_text(data)
    except BadUpload as bad:
        assert bad.line is not None and bad.line >= 1
        return
    assert encoding in ("utf-8", "utf-8-sig", "cp949") and isinstance(text, str)


COUPON_TEXT = (POLICIES / "grants" / "2025-07-livelihood-coupon-round1.yaml").read_text()


@FUZZ
@given(st.lists(st.lists(st.text(max_size=12) | st.integers().map(str), min_size=0, max_size=6), max_size=8),
       st.sampled_from(["utf-8", "utf-8-sig", "cp949", "latin-1"]), st.booleans())
def test_recipient_csv_rows_or_a_clear_refusal(rows, encoding, with_header):
    from ledger.grant_jobs import _rows
    from rules.grants import GrantProgramDocument

    program = GrantProgramDocument.model_validate(yaml.safe_load(COUPON_TEXT))

    lines = (["disbursement_id,member_id,amount"] if with_header else []) + [",".join(r) for r in rows]
    try:
        data = "\n".join(lines).encode(encoding)
    except UnicodeEncodeError:
        assume(False)
    try:
        for line, row in _rows(decode_text(data)[0], program):
            assert line >= 2 and isinstance(row, dict)
    except (BadUpload, ValueError) as refused:
        assert str(refused)


CLEARING_HEADER = "approval_id,merchant_id,amount_won,transacted_at"


@FUZZ
@given(st.lists(st.tuples(st.text(max_size=10), st.text(max_size=10), st.text(max_size=8) | st.integers().map(str),
                          st.text(max_size=25) | st.just("2026-11-03 12:00:00")), max_size=6),
       st.sampled_from(["utf-8", "utf-8-sig", "cp949"]), st.sampled_from(["\n", "\r\n", "\r"]),
       st.booleans())
@example([], "utf-8", "\n", True)
def test_clearing_file_parses_or_lists_the_lines_at_fault(rows, encoding, newline, ragged):
    lines = [CLEARING_HEADER] + [",".join(r) + ("," if ragged and i % 2 else "") for i, r in enumerate(rows)]
    try:
        data = newline.join(lines).encode(encoding)
    except UnicodeEncodeError:
        assume(False)
    if encoding == "utf-8-sig" and not data.startswith(b"\xef\xbb\xbf"):
        data = b"\xef\xbb\xbf" + data
    try:
        frame, facts = parse_clearing(data)
    except ClearingFileInvalid as invalid:
        assert invalid.detail
        return
    assert frame.height == facts["lines"] <= len(rows)


@FUZZ
@given(st.binary(max_size=200))
@example(b"\n" + CLEARING_HEADER.encode())  # a blank first line: once a hung request
@example(b"\r\r\r")
@example(b"\xef\xbb\xbf")
def test_clearing_file_of_any_bytes_never_crashes(data):
    try:
        parse_clearing(data)
    except ClearingFileInvalid:
        pass


KOREAN_CLEARING_HEADER = "승인번호,가맹점번호,거래금액,거래일시"


@FUZZ
@given(st.binary(max_size=60) | st.lists(st.text(max_size=12), max_size=4).flatmap(
           lambda cells: st.sampled_from(["utf-8", "utf-8-sig", "cp949"]).map(
               lambda encoding: _encoded(KOREAN_CLEARING_HEADER + "\n" + ",".join(cells) + "\r\n", encoding))),
       st.integers(1, 5))
@example(b"\xef\xbb\xbf", 1)
@example("가,나\n".encode("cp949")[:-2], 2)  # a double-byte character cut at the end
@example("승인번호\n".encode("cp949") + b"\xff\n", 3)
def test_the_clearing_files_utf8_is_its_decoded_text(data, chunk):
    """decode_utf8 (a chunk at a time, no str of the whole file) reads what `decode` reads:
    the same text, as UTF-8, and the same encoding; or the same refusal, in the same words
    and line. Chunks of a few bytes, so characters straddle them."""
    import settlement.reconcile as reconcile

    saved = reconcile.DECODE_CHUNK_BYTES
    reconcile.DECODE_CHUNK_BYTES = chunk
    try:
        try:
            text, encoding = reconcile.decode(data, 10**6)
        except ClearingFileInvalid as refused:
            with pytest.raises(ClearingFileInvalid) as again:
                reconcile.decode_utf8(data, 10**6)
            assert (again.value.detail, again.value.extra) == (refused.detail, refused.extra)
            return
        utf8, encoding_now, codec = reconcile.decode_utf8(data, 10**6)
        assert (utf8.decode(codec), encoding_now) == (text, encoding)
    finally:
        reconcile.DECODE_CHUNK_BYTES = saved


def _encoded(text: str, encoding: str) -> bytes:
    try:
        return text.encode(encoding)
    except UnicodeEncodeError:
        return text.encode("utf-8")


def test_huge_uploads_are_refused_by_size_before_reading():
    from settlement.config import get_config

    limit = get_config().clearing_file_bytes_max
    with pytest.raises(ClearingFileInvalid, match="larger than"):
        parse_clearing(b"x" * (limit + 1))


def test_a_clearing_files_limit_is_its_setting_not_an_uploads(monkeypatch):
    """Off HTTP a clearing file past an upload's 256 MiB was refused whatever
    clearing_file_bytes_max said (512 MiB by default): the decode step applied its own
    upload limit (clearing-file reconciliation audit). Shown with that limit shrunk."""
    import eum.textfiles
    from settlement.config import SettlementConfig

    data = (CLEARING_HEADER + "\np1,S1,12000,2025-09-30 12:00:00\n").encode() + b"\n" * 2_000  # blank lines: skipped
    monkeypatch.setattr(eum.textfiles, "UPLOAD_BYTES_MAX", 1_024)  # an upload's limit, made tiny
    frame, _ = parse_clearing(data, SettlementConfig(clearing_file_bytes_max=len(data)))
    assert frame["amount_won"].to_list() == [12_000]
    with pytest.raises(ClearingFileInvalid, match=f"larger than {len(data) - 1} bytes"):
        parse_clearing(data, SettlementConfig(clearing_file_bytes_max=len(data) - 1))


# ---------------------------------------------------------------- formula injection in exports


risky_text = st.tuples(st.sampled_from(FORMULA_LEADS + ("＝", " =", "'=")), st.text(max_size=15)).map("".join)


def _cells_of_xlsx(data: bytes) -> list[str]:
    with zipfile.ZipFile(io.BytesIO(data)) as book:
        shared = book.read("xl/sharedStrings.xml").decode("utf-8") if "xl/sharedStrings.xml" in book.namelist() \
            else ""
        sheet = book.read("xl/worksheets/sheet1.xml").decode("utf-8")
    import re

    strings = [re.sub(r"<[^>]+>", "", s) for s in re.findall(r"<si>(.*?)</si>", shared, flags=re.S)]
    assert "<f>" not in sheet, "a formula was written"
    return strings


@FUZZ
@given(st.lists(risky_text | st.text(max_size=15), min_size=1, max_size=8))
def test_exports_never_start_a_cell_with_a_formula_lead(texts):
    import csv
    from xml.sax.saxutils import unescape

    frame = pl.DataFrame({"merchant_id": texts, "name": list(reversed(texts)),
                          "tags": [[t] for t in texts], "amount_won": [-1_000] * len(texts)})
    body = export.csv_bytes(frame)
    assert body.startswith(export.BOM)
    rows = list(csv.reader(io.StringIO(body[len(export.BOM):].decode("utf-8"), newline="")))
    for row in rows[1:]:
        for cell in row[:3]:
            assert not cell.startswith(FORMULA_LEADS), row
        assert row[3] == "-1000"  # numbers are numbers: a negative amount stays negative
    for cell in _cells_of_xlsx(export.xlsx_bytes({"data": frame})):
        assert not unescape(cell).startswith(FORMULA_LEADS), cell


def _json_text(pairs: list[tuple[str, object]], escape: list[bool], spaces: list[str]) -> bytes:
    """A JSON object written as given, keys possibly escaped (`\\u0061mount`), with
    whitespace between its tokens: what a client may send."""
    parts = []
    for (key, value), esc, space in zip(pairs, escape, spaces):
        name = "".join(f"\\u{ord(c):04x}" for c in key) if esc else json.dumps(key)[1:-1]
        parts.append(f'{space}"{name}"{space}:{space}{json.dumps(value, ensure_ascii=False)}')
    return ("{" + ",".join(parts) + "}").encode()


@FUZZ
@given(data=st.data(), kind=st.sampled_from(["payment", "topup"]))
def test_the_fast_paths_screen_misses_no_key_given_twice(data, kind):
    """`api.cardfast.may_give_a_key_twice` keeps the fast path off the JSON parse that
    finds keys given twice: it may say "maybe" for a body without one, never "no" for a
    body with one (the route's exact check then refuses it)."""
    from api.cardfast import QUOTED_KEYS, may_give_a_key_twice
    from rules.loader import json_duplicate_keys

    names = [key.decode()[1:-1] for key in QUOTED_KEYS[kind]]
    values = st.one_of(st.integers(), st.text(max_size=12), st.sampled_from(names))
    pairs = data.draw(st.lists(st.tuples(st.sampled_from(names), values), min_size=1, max_size=8))
    escape = data.draw(st.lists(st.booleans(), min_size=len(pairs), max_size=len(pairs)))
    spaces = data.draw(st.lists(st.sampled_from(["", " ", "\n", "\t "]), min_size=len(pairs), max_size=len(pairs)))
    raw = _json_text(pairs, escape, spaces)
    if json_duplicate_keys(raw):
        assert may_give_a_key_twice(kind, raw), raw
    if len({key for key, _ in pairs}) == len(pairs) and not any(escape) and b"\\" not in raw \
            and not any(isinstance(value, str) and value in names for _, value in pairs):
        assert not may_give_a_key_twice(kind, raw), raw
