"""`eum payments replay FILE`: a file of payments through the bulk payment writer, with
the API's checks and fingerprints, on SQLite and PostgreSQL."""

from __future__ import annotations

import os
import time

import orjson
import pytest
from sqlalchemy import func, select
from typer.testing import CliRunner

from api.cardfast import _command
from eum import settings as settings_module
from eum.backfill import Rejected, read_payments
from eum.cli import app
from ledger import schema as s
from ledger.queries import check_book
from tests.conftest import POLICIES, at

runner = CliRunner()


@pytest.fixture
def shop(api, monkeypatch):
    """Two members with money and two merchants, set up through the API; the CLI's
    settings point at the same database."""
    for member, district in (("m1", "seo"), ("m2", "jung")):
        assert api.put(f"/v1/members/{member}", {"district": district}).status_code == 201
    for merchant, district in (("s1", "seo"), ("s2", "jung")):
        assert api.put(f"/v1/merchants/{merchant}", {
            "name": merchant, "district": district, "category": "restaurant", "annual_sales": 100_000_000,
            "registered_from": "2019-01-01"}).status_code == 201
    for member in ("m1", "m2"):
        r = api.post("/v1/topups", {"topup_id": f"t-{member}", "member_id": member, "amount": 100_000,
                                    "occurred_at": at("2025-09-01", "09:00:00")})
        assert r.status_code == 201, r.text
    monkeypatch.setenv("EUM_DATABASE_URL", api.settings.database_url)
    monkeypatch.setenv("EUM_POLICIES_DIR", str(api.settings.policies_dir))
    settings_module.get_settings.cache_clear()
    yield api
    settings_module.get_settings.cache_clear()


def _replay_on(monkeypatch, database: str, *args: str):
    """`eum payments replay ARGS` on `database`, the settings read afresh."""
    monkeypatch.setenv("EUM_DATABASE_URL", database)
    settings_module.get_settings.cache_clear()
    try:
        return runner.invoke(app, ["payments", "replay", *args])
    finally:
        settings_module.get_settings.cache_clear()


def _payments(api) -> int:
    with api.services.reader.connect() as conn:
        return conn.execute(select(func.count()).select_from(s.payments)).scalar_one()


BODIES = [  # in the file out of time order: m1's 12:00 payment is decided before its 13:00 one
    {"payment_id": "b-3", "member_id": "m1", "merchant_id": "s1", "amount": 30_000, "occurred_at": at("2025-09-15", "13:00:00")},
    {"payment_id": "b-1", "member_id": "m1", "merchant_id": "s1", "amount": 50_000, "occurred_at": at("2025-09-15", "12:00:00")},
    {"payment_id": "b-2", "member_id": "m2", "merchant_id": "s2", "amount": 12_000, "occurred_at": at("2025-09-15", "12:30:00")},
    {"payment_id": "b-4", "member_id": "m1", "merchant_id": "s2", "amount": 90_000, "occurred_at": at("2025-09-15", "14:00:00")},
]


def _csv(bodies) -> str:
    lines = ["Payment_ID,member_id,merchant_id,amount_won,occurred_at"]
    lines += [f"{b['payment_id']},{b['member_id']},{b['merchant_id']},\"{b['amount']:,}\",{b['occurred_at']}" for b in bodies]
    return "\r\n".join(lines) + "\r\n"


@pytest.mark.parametrize("form", ["csv", "jsonl"])
def test_a_file_is_recorded_once_as_the_api_would(shop, tmp_path, form):
    api = shop
    path = tmp_path / f"payments.{form}"
    if form == "csv":
        path.write_text(_csv(BODIES), encoding="utf-8")
    else:
        path.write_bytes(b"\n".join(orjson.dumps(b) for b in BODIES) + b"\n")
    answers = tmp_path / "answers.jsonl"
    out = runner.invoke(app, ["payments", "replay", str(path), "--chunk", "2", "--answers", str(answers)])
    # b-4 overdraws m1 (100,000 won topped up, ~80,000 spent before it): declined, and recorded.
    assert out.exit_code == 0, out.output
    assert "4 payments: 4 recorded (3 approved, 1 declined), 0 already in the book, 0 refused" in out.output
    written = [orjson.loads(line) for line in answers.read_bytes().splitlines()]
    assert [a["payment_id"] for a in written] == ["b-1", "b-2", "b-3", "b-4"]  # in time order
    assert [a["status"] for a in written] == ["approved", "approved", "approved", "declined"]
    # b-1 first: it finds no points yet; b-3 spends the points b-1 earned before its charged money.
    assert written[0]["spent"] == {"grants": 0, "points": 0, "charged": 50_000}
    assert written[2]["spent"]["points"] == written[0]["cashback"]["amount"] > 0
    assert sum(written[2]["spent"].values()) == 30_000
    with api.services.reader.connect() as conn:
        assert all(r.ok for r in check_book(conn))
        stored = dict(conn.execute(select(s.payments.c.payment_id, s.payments.c.response)).all())
    assert {a["payment_id"]: a for a in written} == {k: orjson.loads(v) for k, v in stored.items()}

    # The card app sending the same payments: one payment each, answered from the book.
    for body in BODIES:
        r = api.post("/v1/payments", body)
        assert r.status_code == 200 and r.headers.get("idempotent-replayed") == "true", r.text
        assert r.json() == orjson.loads(stored[body["payment_id"]])
    other = api.post("/v1/payments", {**BODIES[0], "amount": 31_000})
    assert other.status_code == 409 and other.json()["code"] == "idempotency_conflict"

    again = runner.invoke(app, ["payments", "replay", str(path)])
    assert again.exit_code == 0, again.output
    assert "4 payments: 0 recorded (0 approved, 0 declined), 4 already in the book, 0 refused" in again.output
    assert _payments(api) == 4


def test_a_file_in_windows_gives_the_answers_of_one_pass(shop, tmp_path, monkeypatch):
    """A file larger than one window (here: windows of one payment) is recorded window by
    window, its answers written as each commits: the same answers, in the same order, as
    the whole file in one window; an answers file that cannot be written refuses the run
    before anything is recorded."""
    from ledger import replay

    api = shop
    path = tmp_path / "payments.jsonl"
    path.write_bytes(b"\n".join(orjson.dumps(b) for b in BODIES) + b"\n")
    refused = runner.invoke(app, ["payments", "replay", str(path), "--answers", str(tmp_path / "no" / "a.jsonl")])
    assert refused.exit_code == 2 and "a.jsonl" in refused.output, refused.output
    assert _payments(api) == 0

    windows = []
    real = replay.replay_payments
    monkeypatch.setattr(replay, "WINDOW_CHUNKS", 1)
    monkeypatch.setattr(replay, "replay_payments", lambda book, part, **kw: windows.append(len(part)) or real(
        book, part, **kw))
    answers = tmp_path / "answers.jsonl"
    out = runner.invoke(app, ["payments", "replay", str(path), "--chunk", "1", "--threads", "1",
                                "--answers", str(answers)])
    assert out.exit_code == 0, out.output
    assert windows == [1, 1, 1, 1]
    assert "4 payments: 4 recorded (3 approved, 1 declined), 0 already in the book, 0 refused" in out.output
    written = [orjson.loads(line) for line in answers.read_bytes().splitlines()]
    assert [(a["payment_id"], a["status"]) for a in written] == [
        ("b-1", "approved"), ("b-2", "approved"), ("b-3", "approved"), ("b-4", "declined")]
    with api.services.reader.connect() as conn:
        stored = dict(conn.execute(select(s.payments.c.payment_id, s.payments.c.response)).all())
        assert all(r.ok for r in check_book(conn))
    assert {a["payment_id"]: a for a in written} == {k: orjson.loads(v) for k, v in stored.items()}


def test_a_payment_the_book_refuses_is_reported_and_the_rest_recorded(shop, tmp_path):
    api = shop
    bodies = [BODIES[1], {**BODIES[2], "payment_id": "b-1"}]  # b-1 again with another body
    path = tmp_path / "p.jsonl"
    path.write_bytes(b"\n".join(orjson.dumps(b) for b in bodies))
    answers = tmp_path / "a.jsonl"
    out = runner.invoke(app, ["payments", "replay", str(path), "--answers", str(answers)])
    assert out.exit_code == 1, out.output
    assert "1 refused" in out.output and "refused: idempotency_conflict x 1" in out.output
    lines = [orjson.loads(x) for x in answers.read_bytes().splitlines()]
    assert lines[0]["status"] == "approved" and lines[1]["error"]["code"] == "idempotency_conflict"
    assert _payments(api) == 1


def test_answers_to_the_payments_file_itself_are_refused_before_it_is_read(shop, tmp_path):
    """`--answers` naming the payments file (or a link to it) emptied the file for the
    answers: the payments were gone, and with them the advice to run the same file again
    after a stop (the security audit). Refused, exit 2, the file as it was, nothing
    recorded."""
    api = shop
    path = tmp_path / "payments.csv"
    path.write_text(_csv(BODIES), encoding="utf-8")
    link = tmp_path / "answers.jsonl"
    link.symlink_to(path)
    for answers in (path, link, tmp_path / "." / "payments.csv"):
        out = runner.invoke(app, ["payments", "replay", str(path), "--answers", str(answers)])
        assert out.exit_code == 2 and "Traceback" not in out.output, out.output
        assert out.stderr.startswith(f"error: --answers {answers} is the payments file {path} itself"), out.stderr
        assert "nothing recorded" in out.stderr
    assert path.read_bytes() == _csv(BODIES).encode() and _payments(api) == 0


def test_a_header_of_thousands_of_columns_is_refused_at_once_naming_a_few(tmp_path):
    """A header of 30,000 names was checked for a name given twice by counting each name
    in the whole header: seconds before the refusal, which then named every one (the
    security audit). Refused at once, the first 20 named and the rest counted."""
    header = "payment_id,member_id,merchant_id,amount,occurred_at," + ",".join(f"c{i}" for i in range(30_000))
    started = time.perf_counter()
    with pytest.raises(Rejected) as refused:
        read_payments((header + "\n").encode())
    assert time.perf_counter() - started < 2
    (line, reason), = refused.value.errors
    assert line == 1 and reason.startswith("unknown column(s) c0, c1, c2,") and "c19 and 29,980 more" in reason, reason
    assert len(reason) < 500, reason[:600]


def test_a_bad_file_is_refused_whole(shop, tmp_path):
    api = shop
    bad = _csv(BODIES[:1]) + "b-9,m1,s1,12.5,2025-09-15T12:00:00+09:00\r\n" \
        "b-10,m1,s1,1000,2025-09-15 12:00:00\r\n" "b 11,m1,s1,1000,2025-09-15T12:00:00+09:00\r\n" \
        "b-12,m1,s1,0,2025-09-15T12:00:00+09:00\r\n" "b-13,m1,s1\r\n"
    path = tmp_path / "bad.csv"
    path.write_text(bad)
    out = runner.invoke(app, ["payments", "replay", str(path)])
    assert out.exit_code == 2, out.output
    assert out.stderr.startswith(f"error: {path}: 5 bad lines; nothing was recorded\n"), out.stderr
    for line, word in ((3, "amount"), (4, "occurred_at"), (5, "payment_id"), (6, "amount"), (7, "3 cells")):
        assert any(f"line {line}: " in x and word in x for x in out.output.splitlines()), (line, out.output)
    assert _payments(api) == 0

    for text, reason in (("payment_id,member_id,merchant_id,amount,occured_at\r\n", "unknown column(s) occured_at"),
                         ("payment_id,member_id,merchant_id,amount\r\n", "missing column(s) occurred_at"),
                         ("", "holds no payments"),
                         ('{"payment_id": "x", "member_id": "m1", "merchant_id": "s1", "amount": "1000", '
                          '"occurred_at": "2025-09-15T12:00:00+09:00"}\n', "amount"),
                         # a key given twice, as POST /v1/payments refuses it (JSON reads the last)
                         ('{"payment_id": "x", "member_id": "m1", "merchant_id": "s1", "amount": 100, '
                          '"occurred_at": "2025-09-15T12:00:00+09:00", "amount": 90000}\n', "amount: given twice"),
                         ('{"payment_id": "x", "member_id": "m1", "merchant_id": "s1", "amount": 100, '
                          '"occurred_at": "2025-09-15T12:00:00+09:00", "\\u0061mount": 90000}\n', "amount: given twice")):
        path.write_text(text)
        out = runner.invoke(app, ["payments", "replay", str(path)])
        assert out.exit_code == 2 and reason in out.output, (text, out.output)
        assert out.stderr.startswith("error: "), out.stderr  # as the other commands refuse
    path.write_bytes(orjson.dumps(BODIES[0]))  # a good file, and answers to a folder
    for args in ([str(tmp_path / "absent.csv")], [str(tmp_path)], [str(path), "--answers", str(tmp_path)]):
        out = runner.invoke(app, ["payments", "replay", *args])
        assert out.exit_code == 2 and out.stderr.startswith("error: ") and len(out.stderr.splitlines()) == 1, (
            args, out.output)
    assert _payments(api) == 0


def test_the_fingerprint_is_the_apis_and_the_order_is_by_time():
    body = {"payment_id": "p1", "member_id": "m1", "merchant_id": "s1", "amount": 12_000,
            "occurred_at": "2025-09-15T03:00:00Z"}
    later = {**body, "payment_id": "p0", "occurred_at": "2025-09-15T12:00:01+09:00"}
    same_time = {**body, "payment_id": "p2", "occurred_at": "2025-09-15T12:00:00+09:00"}
    from_json = read_payments(b"\n".join(orjson.dumps(b) for b in (later, body, same_time)))
    assert [c.payment_id for c in from_json] == ["p1", "p2", "p0"]  # by time; the file's order among equals
    assert from_json[0] == _command("payment", orjson.dumps(body))
    csv_text = "occurred_at,amount,merchant_id,member_id,payment_id\n2025-09-15T03:00:00Z,\"12,000\",s1,m1,p1\n"
    assert read_payments(csv_text.encode("cp949")) == [from_json[0]]
    assert read_payments(b"\xef\xbb\xbf" + csv_text.encode()) == [from_json[0]]
    # A BOM'd file saved again with one (two BOMs): the first column was "unknown
    # \ufeffoccurred_at; missing occurred_at" (Korean text audit, repro_7).
    assert read_payments(b"\xef\xbb\xbf\xef\xbb\xbf" + csv_text.encode()) == [from_json[0]]
    with pytest.raises(Rejected) as refused:
        read_payments(b"\xff\xfe\x00garbage")
    assert refused.value.errors[0][0] == 1
    many = "payment_id,member_id,merchant_id,amount,occurred_at\n" + "x,m1,s1,-1,2025-09-15T03:00:00Z\n" * 80
    with pytest.raises(Rejected) as refused:
        read_payments(many.encode())
    assert refused.value.total == 80 and len(refused.value.errors) == 50


def test_the_file_limit_is_the_commands_not_an_uploads(monkeypatch):
    """A local file may be larger than an upload (a peak day as JSON lines with UUID ids
    is ~280 MB, past 256 MiB); past its own limit it is refused like any bad file."""
    from eum import backfill, textfiles

    body = {"payment_id": "p1", "member_id": "m1", "merchant_id": "s1", "amount": 12_000,
            "occurred_at": "2025-09-15T03:00:00Z"}
    data = orjson.dumps(body) + b"\n"
    assert backfill.FILE_BYTES_MAX > textfiles.UPLOAD_BYTES_MAX
    monkeypatch.setattr(textfiles, "UPLOAD_BYTES_MAX", len(data) - 1)
    with pytest.raises(textfiles.BadUpload, match="larger than"):
        textfiles.decode_text(data)  # an upload's limit
    assert [c.payment_id for c in read_payments(data)] == ["p1"]
    monkeypatch.setattr(backfill, "FILE_BYTES_MAX", len(data) - 1)
    with pytest.raises(Rejected) as refused:
        read_payments(data)
    assert "larger than" in refused.value.errors[0][1]


def test_a_database_never_migrated_refuses_the_replay_with_what_to_do(tmp_path, monkeypatch):
    """A database never migrated refuses the command before it reads a line, exit 2, and
    says what to do; no traceback (it was exit 3 once the book's first write failed)."""
    path = tmp_path / "p.jsonl"
    path.write_bytes(orjson.dumps(BODIES[0]))
    (tmp_path / "empty.db").touch()  # there, never migrated (a book not there is refused as such)
    out = _replay_on(monkeypatch, f"sqlite:///{tmp_path / 'empty.db'}", str(path))
    assert out.exit_code == 2, out.output
    assert "not migrated to this release (at none" in out.output and "eum db upgrade" in out.output
    assert out.exception is None or isinstance(out.exception, SystemExit)


def test_a_book_that_cannot_write_stops_the_replay_with_exit_3(shop, tmp_path, monkeypatch):
    """The book gives up on a chunk with Unavailable (a database error that persists: its
    backends terminated during the COPY, say): the command caught only SQLAlchemy's
    errors, so it printed a traceback and exited 1. It is the database's stop: exit 3,
    one line, the chunks committed before stay, the same file again records the rest."""
    from ledger.book import Book
    from ledger.errors import Unavailable

    path = tmp_path / "p.jsonl"
    path.write_bytes(b"\n".join(orjson.dumps(b) for b in BODIES) + b"\n")
    execute, chunks = Book.execute, []

    def stops_at_the_second_chunk(self, commands, **kwargs):
        chunks.append(commands)
        if len(chunks) == 2:
            raise Unavailable("the book of record could not be written; retry with the same id")
        return execute(self, commands, **kwargs)

    monkeypatch.setattr(Book, "execute", stops_at_the_second_chunk)
    out = runner.invoke(app, ["payments", "replay", str(path), "--chunk", "2", "--threads", "1"])
    assert out.exit_code == 3, (out.output, out.exception)
    assert out.exception is None or isinstance(out.exception, SystemExit), out.exception
    assert "Traceback" not in out.output
    [line] = [line for line in out.stderr.splitlines() if line.startswith("stopped by the database")]
    assert line.startswith("stopped by the database (Unavailable: the book of record could not be written")
    assert "run the same file again" in line
    assert _payments(shop) == 2  # the first chunk stays
    monkeypatch.setattr(Book, "execute", execute)
    again = runner.invoke(app, ["payments", "replay", str(path), "--chunk", "2", "--threads", "1"])
    assert again.exit_code == 0 and "2 recorded" in again.output and "2 already in the book" in again.output, \
        again.output
    assert _payments(shop) == 4


@pytest.mark.parametrize("digits", [31, 4_301, 5_001])
def test_an_amount_of_thousands_of_digits_is_a_bad_line_not_a_traceback(digits):
    """An amount past Python's 4,300-digit int() limit was a ValueError traceback, exit 1,
    where a 31-digit one was a bad line: both are the line's error now, the whole file
    refused (nothing recorded), and the error does not repeat the thousands of digits."""
    text = ("payment_id,member_id,merchant_id,amount,occurred_at\n"
            f"x-1,m1,s1,1{'0' * (digits - 1)},2025-09-15T12:00:00+09:00\n")
    with pytest.raises(Rejected) as refused:
        read_payments(text.encode())
    [(line, reason)] = refused.value.errors
    assert line == 2 and reason.startswith("amount: ") and "1000000000000" in reason and len(reason) < 200, reason


@pytest.mark.parametrize("character", ["\u2028", "\u2029", "\x85", "\x0c", "\x0b", "\x1c", "\x1d", "\x1e", "\r"])
def test_a_bad_json_line_is_named_by_its_line_in_the_file(character):
    """A JSON line holding a character Python's str.splitlines() also breaks at (U+2028,
    U+0085, a form feed, \\x1c-\\x1e, a lone CR) was split there: a 5-line file with bad
    lines 2 and 4 was refused as "3 bad lines" on 2, 3 and 5 (the payments replay
    audit). Lines end at a newline, as the CSV reader, `wc -l` and an editor count them."""
    good = {"payment_id": "p1", "member_id": "m1", "merchant_id": "s1", "amount": 1000,
            "occurred_at": "2025-11-21T12:30:00+09:00"}
    lines = [orjson.dumps({**good, "payment_id": f"p{n}"}).decode() for n in range(1, 6)]
    lines[1] = lines[1].replace('"p2"', f'"p2{character}"')  # bad: a character an id may not hold
    lines[3] = lines[3].replace('"amount":1000', '"amount":0')  # bad: no amount
    with pytest.raises(Rejected) as refused:
        read_payments(("\n".join(lines) + "\n").encode())
    assert (refused.value.total, [line for line, _ in refused.value.errors]) == (2, [2, 4]), refused.value.errors
    assert refused.value.errors[1][1].startswith("amount: ")
    crlf = "\r\n".join(lines[:1] + lines[2:3]) + "\r\n"  # Windows line ends are still one line each
    assert [c.payment_id for c in read_payments(crlf.encode())] == ["p1", "p3"]


def test_a_run_refused_before_anything_leaves_the_answers_file_alone(sqlite_url, tmp_path, monkeypatch):
    """The answers file was emptied before the database's migration and the policy files
    were checked, so a run refused there ("nothing was done", exit 2) had erased the
    answers of the run before it (the payments replay audit). It is opened once nothing
    can refuse the run, still before any payment is written."""
    path = tmp_path / "p.jsonl"
    path.write_bytes(orjson.dumps(BODIES[0]) + b"\n")
    answers = tmp_path / "answers.jsonl"
    earlier = b'{"payment_id":"b-0","status":"approved"}\n'
    answers.write_bytes(earlier)
    bad_policies = tmp_path / "policies"
    bad_policies.mkdir()
    (bad_policies / "base.yaml").write_text("policy_id: [not closed\n")
    for database, policies, says in ((f"sqlite:///{tmp_path / 'never-migrated.db'}", None, "eum db upgrade"),
                                     (sqlite_url, str(bad_policies), "EUM_POLICIES_DIR")):
        if policies is not None:
            monkeypatch.setenv("EUM_POLICIES_DIR", policies)
        out = _replay_on(monkeypatch, database, str(path), "--answers", str(answers))
        assert out.exit_code == 2 and out.stderr.startswith("error: ") and says in out.stderr, out.output
        assert answers.read_bytes() == earlier, out.output


def test_a_file_past_the_limit_is_refused_by_its_size_unread(tmp_path, monkeypatch):
    """The file was read whole before its size was checked: one larger than memory was a
    MemoryError traceback and exit 1 (a 2 GB one took ~2.2 GB for 8 s before its refusal;
    the payments replay audit). Its size is read first: refused as any file past the
    limit, exit 2. (A sparse 1 TiB file, no disk used; reading it stands for running
    out of memory.)"""
    from pathlib import Path

    from eum.backfill import FILE_BYTES_MAX

    path = tmp_path / "day.jsonl"
    with open(path, "wb") as f:
        f.truncate(1 << 40)

    def out_of_memory(self):
        raise MemoryError

    monkeypatch.setattr(Path, "read_bytes", out_of_memory)
    out = _replay_on(monkeypatch, f"sqlite:///{tmp_path / 'eum.db'}", str(path))
    assert out.exception is None or isinstance(out.exception, SystemExit), repr(out.exception)
    assert out.exit_code == 2, out.output
    assert out.stderr == (f"error: {path}: 1 bad line; nothing was recorded\n"
                          f"line 1: file larger than {FILE_BYTES_MAX} bytes\n"), out.stderr


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (a disk that is always full)")
def test_answers_that_cannot_be_written_are_one_line_and_what_was_committed_stays(shop, tmp_path, monkeypatch):
    """An answers file on a full disk ended the run in two OSError tracebacks (the window's
    write, then the file's close), exit 1 and no word of what was recorded (the payments
    replay audit). It is one `error:` line naming the file and what stays, exit 1 (it
    ran and wrote; not the database's 3): the run stops at the window whose answers did
    not fit, and the same file run again records the rest and answers every payment."""
    from ledger import replay

    api = shop
    bodies = [{"payment_id": f"w-{n}", "member_id": f"m{1 + n % 2}", "merchant_id": "s1", "amount": 100,
               "occurred_at": at("2025-09-16", f"12:{n:02d}:00")} for n in range(40)]
    path = tmp_path / "p.jsonl"
    path.write_bytes(b"\n".join(orjson.dumps(b) for b in bodies) + b"\n")
    one = tmp_path / "one.jsonl"
    one.write_bytes(orjson.dumps(BODIES[1]) + b"\n")
    monkeypatch.setattr(replay, "WINDOW_CHUNKS", 1)
    recorded = 0
    # Windows of one payment: a write fails once the file's buffer fills. One payment: the
    # answer is written only as the file is closed.
    for file, more in ((path, None), (one, 1)):
        out = runner.invoke(app, ["payments", "replay", str(file), "--chunk", "1", "--threads", "1",
                                  "--answers", "/dev/full"])
        assert out.exit_code == 1, out.output
        assert out.exception is None or isinstance(out.exception, SystemExit), repr(out.exception)
        assert "Traceback" not in out.output
        [line] = [line for line in out.stderr.splitlines() if line.startswith("error: ")]
        assert line.startswith("error: --answers /dev/full: No space left on device;"), line
        assert "stay" in line and "run the same file again" in line, line
        if more is None:
            recorded = _payments(api)
            assert 0 < recorded < len(bodies)  # it stopped there; the windows before stay
            assert f"({recorded} payments)" in line, line
        else:
            assert _payments(api) == recorded + 1 and "(1 payment)" in line, line

    answers = tmp_path / "answers.jsonl"
    again = runner.invoke(app, ["payments", "replay", str(path), "--answers", str(answers)])
    assert again.exit_code == 0, again.output
    assert f"{len(bodies) - recorded} recorded" in again.output, again.output
    assert f"{recorded} already in the book" in again.output, again.output
    written = [orjson.loads(line) for line in answers.read_bytes().splitlines()]
    assert [a["payment_id"] for a in written] == [b["payment_id"] for b in bodies]
    with api.services.reader.connect() as conn:
        assert all(r.ok for r in check_book(conn))


def test_an_answers_path_that_cannot_be_opened_refuses_before_the_book_records_anything(sqlite_url, tmp_path,
                                                                                          monkeypatch):
    """Opened after the policy files were recorded (so that a refusal before it leaves an
    earlier run's answers alone), an answers path that could not be opened refused the
    run (exit 2, "nothing recorded") after the book had recorded the new policy files and
    audited each (the review of that change). Whether it can be written is tried first."""
    from sqlalchemy import func, select

    from ledger import schema as s
    from ledger.db import make_engine

    def counts() -> tuple[int, int]:
        engine = make_engine(sqlite_url)
        try:
            with engine.connect() as conn:
                return (conn.execute(select(func.count()).select_from(s.policies)).scalar_one(),
                        conn.execute(select(func.count()).select_from(s.audit_log)).scalar_one())
        finally:
            engine.dispose()

    path = tmp_path / "p.jsonl"
    path.write_bytes(orjson.dumps(BODIES[0]) + b"\n")
    monkeypatch.setenv("EUM_POLICIES_DIR", str(POLICIES))
    before = counts()
    out = _replay_on(monkeypatch, sqlite_url, str(path), "--answers", str(tmp_path / "no-such-dir" / "a.jsonl"))
    assert out.exit_code == 2 and out.stderr.startswith("error: --answers"), out.output
    assert counts() == before


def test_the_commands_chunk_is_the_replays_own_by_default():
    """`eum payments replay` writes `ledger.replay.CHUNK_MAX` payments per transaction
    unless told `--chunk`: 1,000, since a chunk of 5,000 held the budget rows every online
    payment draws on for long enough to stall the live service's payments for seconds
    (docs/design.md, "Budget rows are not skipped")."""
    import inspect

    from eum.cli import payments_replay
    from ledger.replay import CHUNK_MAX

    assert inspect.signature(payments_replay).parameters["chunk"].default == CHUNK_MAX == 1_000
