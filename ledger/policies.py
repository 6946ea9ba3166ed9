"""The policy lifecycle: draft → approved (by a second person) → activated at
`effective_from` (shown as scheduled until then, active after, superseded once a later
policy of its layer is active). Approved policies are never edited; a new version
supersedes them. A draft, an approved policy, or a scheduled one far enough ahead can be
withdrawn (with a reason); its id stays taken. Every step is written to the audit log
with who and what changed."""

from __future__ import annotations

import difflib
import hashlib
import time
from pathlib import Path

import orjson
import yaml
from sqlalchemy import Connection, select, update

from ledger import audit
from ledger import schema as s
from ledger.commands import FUTURE_SKEW_S, FUTURE_SKEW_US
from ledger.db import dialect_insert
from ledger.errors import Conflict, NotFound, SelfApproval
from ledger.keys import Principal, refuse_if_author_revoked, same_person
from rules.compiled import CompiledPolicy, PolicyClash
from rules.document import PolicyDocument
from rules.timeutil import local_date, rfc3339, to_us

ACTIVATION_LEAD_S = 10  # every worker reloads policies well within this (see api.policies)
FILE_AUTHOR = "policy-files"


class PolicyNotFound(NotFound):
    code, title = "policy_not_found", "Policy not found"


class PolicyExists(Conflict):
    code, title = "policy_exists", "A policy with this id exists; submit a new version with a new id"


class PolicyStateConflict(Conflict):
    code, title = "policy_state_conflict", "The policy is not in a state that allows this"


class ActivationInPast(Conflict):
    code, title = "activation_in_past", "A policy cannot take effect in the past"


def _now_us() -> int:
    return time.time_ns() // 1000


def _canonical(document: PolicyDocument) -> str:
    return orjson.dumps(document.model_dump(mode="json", exclude_none=True), option=orjson.OPT_SORT_KEYS).decode()


def document_sha256(text: str) -> str:
    """The stored document's digest, kept in its audit entries: the audit chain then
    vouches for the rules themselves, and a document edited in the table shows
    (`ledger.queries.check_book`, "policy documents are as audited")."""
    return hashlib.sha256(text.encode()).hexdigest()


def recorded_otherwise(conn: Connection, document: PolicyDocument) -> bool:
    """Whether the book records another document under `document`'s policy_id: a draft
    file reusing a taken id (it could never be submitted; previewed, its figures were
    labelled with the recorded policy's id)."""
    text = conn.execute(select(s.policies.c.document)
                        .where(s.policies.c.policy_id == document.policy_id)).scalar_one_or_none()
    # Read again, as `file_policy_changes` compares: a book an earlier release recorded
    # stores its form, without fields added since with their defaults.
    return text is not None and _canonical(PolicyDocument.model_validate_json(text)) != _canonical(document)


class PolicyFileChanged(ValueError):
    """Policy files that are not the policies recorded under their ids: the service, and
    every command that loads the files into a book, does not start."""

    def __init__(self, changes: dict[str, str], policies_dir: Path | None = None):
        self.changes = changes
        files = _files_holding(policies_dir, set(changes)) if policies_dir is not None else {}
        super().__init__(
            "policy files differ from the policies recorded under their ids; a policy is never edited in place "
            "(the payments it judged name it by its id): put each file back as it was, and ship a change as a "
            "new file with a new policy_id (naming the old one in `supersedes`)\n"
            + "\n".join(f"{files.get(policy_id, policies_dir or 'policies')}: {policy_id}: {change}"
                        for policy_id, change in changes.items()))


def file_policy_changes(conn: Connection, compiled: list[CompiledPolicy]) -> dict[str, str]:
    """How the shipped files differ from what is recorded under their ids, by policy id:
    an edited document (as a diff), an id that a policy made through the API holds, a file
    policy recorded before that no file holds now. Documents are compared parsed, so
    comments and layout change freely."""
    t = s.policies
    stored = {row.policy_id: row for row in conn.execute(select(t.c.policy_id, t.c.document, t.c.origin,
                                                                t.c.status, t.c.created_at_us))}
    changes = {}
    for policy in compiled:
        row = stored.get(policy.policy_id)
        if row is None:
            continue
        if row.origin != "file":
            changes[policy.policy_id] = f"the id of a policy made through the API ({row.status})"
            continue
        before = PolicyDocument.model_validate_json(row.document)
        if _canonical(before) != (shipped_json := _canonical(policy.document)):
            after = PolicyDocument.model_validate_json(shipped_json)  # its mappings in the stored order: a diff of values
            changes[policy.policy_id] = (f"edited since it was recorded on {rfc3339(row.created_at_us)}:\n"
                                         + diff_documents(before, after).rstrip("\n"))
    shipped = {policy.policy_id for policy in compiled}
    for row in stored.values():
        if row.origin == "file" and row.policy_id not in shipped:
            changes[row.policy_id] = f"recorded from a file on {rfc3339(row.created_at_us)}, and no file holds it now"
    return changes


def _files_holding(directory: Path, policy_ids: set[str]) -> dict[str, Path]:
    """Which file holds each of these policy ids (read again, for an error message only)."""
    from rules.loader import PolicyInvalid, load_policy_file

    out = {}
    for path in sorted(directory.glob("*.yaml")):
        try:
            policy_id = load_policy_file(path).policy_id
        except (PolicyInvalid, OSError):
            continue
        if policy_id in policy_ids:
            out[policy_id] = path
    return out


class PolicyFileInPast(PolicyFileChanged):
    """New policy files dated at or before an event the book already recorded: loaded,
    they would judge the rest of a month some of whose events another policy judged."""

    def __init__(self, late: dict[str, str], policies_dir: Path | None = None):
        self.changes = late
        files = _files_holding(policies_dir, set(late)) if policies_dir is not None else {}
        ValueError.__init__(
            self,
            "new policy files take effect at or before an event the book already recorded; a policy never takes "
            "effect in the past relative to recorded events (each was judged by the policy in force then): give "
            "each an effective_from after the book's latest event (ahead of now, as an activation), or remove it\n"
            + "\n".join(f"{files.get(policy_id, policies_dir or 'policies')}: {policy_id}: {why}"
                        for policy_id, why in late.items()))


def _event_at_or_after(conn: Connection, at_us: int) -> tuple[str, int] | None:
    """An event the book recorded dated at or after `at_us` (its kind and time), if any.
    Events that moved money are ledger transactions, found through their business date's
    index; declined payments, top-ups and withdrawals (judged too) only by their tables,
    read only when `at_us` is not beyond what the book accepts now (no event can lie
    there). A table the book does not have yet holds none of its events: `eum db upgrade`
    reads a book behind this release's migrations so, before it migrates (withdrawals
    came with 0016)."""
    from sqlalchemy import inspect

    x = s.ledger_txns
    row = conn.execute(select(x.c.kind, x.c.occurred_at_us)
                       .where(x.c.business_date >= local_date(at_us).isoformat())
                       .where(x.c.occurred_at_us >= at_us).limit(1)).first()
    if row is not None:
        return row.kind, row.occurred_at_us
    if at_us > _now_us() + FUTURE_SKEW_US:  # the book refuses events dated further ahead
        return None
    tables = set(inspect(conn).get_table_names())
    for table, kind in ((s.payments, "payment"), (s.topups, "topup"), (s.refunds, "refund"),
                        (s.withdrawals, "withdrawal")):
        if table.name not in tables:
            continue
        found = conn.execute(select(table.c.occurred_at_us).where(table.c.occurred_at_us >= at_us).limit(1)
                             ).scalar_one_or_none()
        if found is not None:
            return kind, found
    return None


def new_file_policies_in_past(conn: Connection, compiled: list[CompiledPolicy]) -> dict[str, str]:
    """The policy files not yet recorded whose `effective_from` is at or before an event
    the book holds, by policy id (why, as text). Read only when a new file appears: the
    files already recorded were checked when they were. A book that has recorded no
    policy at all takes its files as they are: every path that writes the book records
    the files first, so its events (if any: a book seeded directly through
    `ledger.book.Book`, as the load tests' and benchmarks') were judged by these files."""
    t = s.policies
    if conn.execute(select(t.c.policy_id).limit(1)).first() is None:
        return {}
    ids = [policy.policy_id for policy in compiled]
    known = set(conn.execute(select(t.c.policy_id).where(t.c.policy_id.in_(ids))).scalars()) if ids else set()
    late = {}
    for policy in compiled:
        if policy.policy_id in known:
            continue
        event = _event_at_or_after(conn, policy.effective_from_us)
        if event is not None:
            late[policy.policy_id] = (f"takes effect at {rfc3339(policy.effective_from_us)}, and the book holds a "
                                      f"{event[0]} dated {rfc3339(event[1])}")
    return late


def check_file_policies(conn: Connection, compiled: list[CompiledPolicy], policies_dir: Path | None = None) -> None:
    """Raise PolicyFileChanged unless every shipped file is the policy recorded under its
    id, and PolicyFileInPast (one) if a new file is dated at or before a recorded event."""
    if changes := file_policy_changes(conn, compiled):
        raise PolicyFileChanged(changes, policies_dir)
    if late := new_file_policies_in_past(conn, compiled):
        raise PolicyFileInPast(late, policies_dir)


def sync_file_policies(conn: Connection, compiled: list[CompiledPolicy], policies_dir: Path | None = None) -> int:
    """Record the policies shipped as files (active by definition) so they are listed,
    diffed against and audited like the others; refuse (PolicyFileChanged) files that are
    not what is recorded under their ids. Returns how many were new."""
    t = s.policies
    check_file_policies(conn, compiled, policies_dir)
    known = set(conn.execute(select(t.c.policy_id)).scalars())
    added = 0
    for policy in compiled:
        if policy.policy_id in known:
            continue
        now = _now_us()
        text = _canonical(policy.document)
        conn.execute(t.insert().values(
            policy_id=policy.policy_id, document=text, status="activated", origin="file",
            author=FILE_AUTHOR, approver=FILE_AUTHOR, effective_from_us=policy.effective_from_us,
            supersedes=policy.document.supersedes, created_at_us=now, updated_at_us=now))
        audit.append(conn, at_us=now, actor=FILE_AUTHOR, action="policy.load_file", object_type="policy",
                     object_id=policy.policy_id, detail={"effective_from": rfc3339(policy.effective_from_us),
                                                         "layer": policy.layer, "document_sha256": document_sha256(text)})
        added += 1
    return added


def registry_warnings(conn: Connection, document: PolicyDocument) -> list[dict]:
    """A warning for each category or flag a condition of `document` names that no
    merchant in the registry carries now (`PolicyDocument.registry_names`): the registry
    holds them as free text, so a misspelt `categories_exclude: [pharmcy]` validates and
    excludes no pharmacy, and the policy preview shows no change to be suspicious of.
    Warnings, not refusals: a policy may name a category before its first merchant is
    registered, and a book with no merchants yet gives none. Read in one scan of the
    merchants' two columns (policy staff's path, not the payment path)."""
    named = document.registry_names()
    if not named:
        return []
    m = s.merchants
    categories: set[str] = set()
    flags: set[str] = set()
    for category, flag_text in conn.execute(select(m.c.category, m.c.flags).distinct()):
        categories.add(category)
        flags.update(flag for flag in flag_text.split(",") if flag)
    if not categories:
        return []
    known = {"category": categories, "flag": flags}
    return [{"path": path, "name": name,
             "reason": f"no merchant in the registry has the {kind} {name!r}: the condition matches none now"}
            for path, kind, name in named if name not in known[kind]]


def document_warnings(conn: Connection, document: PolicyDocument) -> list[dict]:
    """What a draft's author and approver are warned of (`warnings`): the registry's
    (`registry_warnings`), then each variant that never applies, listed after a
    catch-all of its component (`PolicyDocument.unreachable_variants`)."""
    return registry_warnings(conn, document) + [{"path": path, "name": name, "reason": reason}
                                                for path, name, reason in document.unreachable_variants()]


def create_draft(conn: Connection, document: PolicyDocument, author: Principal) -> dict:
    t = s.policies
    if conn.execute(select(t.c.policy_id).where(t.c.policy_id == document.policy_id)).first() is not None:
        raise PolicyExists(f"policy {document.policy_id!r} exists")
    if document.supersedes is not None:
        replaced = _row(conn, document.supersedes)
        if replaced is None:
            raise PolicyNotFound(f"supersedes {document.supersedes!r}, which does not exist")
        if not _replaceable(replaced, document):
            layer = PolicyDocument.model_validate_json(replaced.document).layer
            raise PolicyStateConflict(
                f"supersedes {document.supersedes!r}, a policy {replaced.status} of layer {layer!r}: the diff its "
                f"approver reads is against the policy it names, so it names one of layer {document.layer!r} "
                "put in force (activated, scheduled or a file), or none (the diff is then against the layer's "
                "policy in force)")
    now = _now_us()
    text = _canonical(document)
    done = conn.execute(dialect_insert(conn)(t).values(
        policy_id=document.policy_id, document=text, status="draft", origin="api",
        author=author.actor, approver=None, effective_from_us=None, supersedes=document.supersedes,
        created_at_us=now, updated_at_us=now).on_conflict_do_nothing().returning(t.c.policy_id)).first()
    if done is None:  # created by a request racing this one
        raise PolicyExists(f"policy {document.policy_id!r} exists")
    warnings = document_warnings(conn, document)
    audit.append(conn, at_us=now, actor=author.actor, action="policy.create", object_type="policy",
                 object_id=document.policy_id,
                 detail={"supersedes": document.supersedes, "diff": diff_text(conn, document),
                         "document_sha256": document_sha256(text),
                         **({"warnings": warnings} if warnings else {})})
    return {"policy_id": document.policy_id, "status": "draft", "warnings": warnings}


def approve(conn: Connection, policy_id: str, approver: Principal) -> dict:
    row = _require(conn, policy_id)
    if row.status != "draft":
        raise PolicyStateConflict(f"policy {policy_id!r} is {row.status}, only drafts are approved")
    if _same_person(row.author, approver):
        raise SelfApproval("a second person must approve a policy: the approver's key and name differ from the "
                           "author's")
    refuse_if_author_revoked(conn, row.author, f"policy {policy_id!r}")
    now = _now_us()
    done = conn.execute(update(s.policies).where((s.policies.c.policy_id == policy_id) & (s.policies.c.status == "draft"))
                        .values(status="approved", approver=approver.actor, updated_at_us=now))
    if done.rowcount != 1:
        raise PolicyStateConflict(f"policy {policy_id!r} changed while approving")
    audit.append(conn, at_us=now, actor=approver.actor, action="policy.approve", object_type="policy",
                 object_id=policy_id, detail={"author": row.author, "document_sha256": document_sha256(row.document)})
    return {"policy_id": policy_id, "status": "approved"}


def activate(conn: Connection, policy_id: str, effective_from_us: int, actor: Principal) -> dict:
    row = _require(conn, policy_id)
    if row.status == "activated":
        raise PolicyStateConflict(f"policy {policy_id!r} is already activated, from "
                                  f"{rfc3339(row.effective_from_us)}; a change is a new draft")
    if row.status != "approved":
        raise PolicyStateConflict(f"policy {policy_id!r} is {row.status}; it must be approved first")
    document = PolicyDocument.model_validate_json(row.document)
    now = _now_us()
    if document.effective_from is not None and to_us(document.effective_from) < now + _lead_us():
        # Its own date gone by, no date can be activated: at that date the answer was
        # "at least N s from now", and at the `earliest` it gave "activate it then".
        raise ActivationInPast(f"the approved document of {policy_id!r} takes effect at "
                               f"{document.effective_from.isoformat()}, which has passed (or is within "
                               f"{_lead_us() // 1_000_000} s): it can no longer be activated; submit a new draft "
                               "with a later date (or none, to choose it on activation) for approval")
    if document.effective_from is not None and to_us(document.effective_from) != effective_from_us:
        # The approver approved the document with its date: another date was not reviewed.
        raise PolicyStateConflict(f"the approved document of {policy_id!r} takes effect at "
                                  f"{document.effective_from.isoformat()}; activate it then, or submit a new "
                                  "draft with the date wanted (or none) for approval")
    if effective_from_us < now + _lead_us():
        raise ActivationInPast(f"effective_from must be at least {_lead_us() // 1_000_000} s from now "
                               f"({rfc3339(now)}); policies never take effect in the past, nor before an event "
                               "already recorded",
                               earliest=rfc3339(now + _lead_us()))
    clash = conn.execute(select(s.policies.c.policy_id, s.policies.c.document)
                         .where(s.policies.c.status == "activated")
                         .where(s.policies.c.effective_from_us == effective_from_us)).all()
    for other_id, other_doc in clash:  # the timeline's check (api.services.timeline_in) and its code, 409
        if PolicyDocument.model_validate_json(other_doc).layer == document.layer:  # policy_clash, found early
            raise PolicyClash(f"{other_id!r} already takes effect in layer {document.layer!r} at that instant "
                              f"({rfc3339(effective_from_us)}); {policy_id!r} cannot take effect then too")
    done = conn.execute(update(s.policies).where((s.policies.c.policy_id == policy_id) & (s.policies.c.status == "approved"))
                        .values(status="activated", effective_from_us=effective_from_us, updated_at_us=now))
    if done.rowcount != 1:
        raise PolicyStateConflict(f"policy {policy_id!r} changed while activating")
    audit.append(conn, at_us=now, actor=actor.actor, action="policy.activate", object_type="policy",
                 object_id=policy_id, detail={"effective_from": rfc3339(effective_from_us), "layer": document.layer})
    return {"policy_id": policy_id, "status": "scheduled", "effective_from": rfc3339(effective_from_us)}


def _lead_us() -> int:
    """How far ahead of now an activation (or the withdrawal of one) must lie: beyond the
    events the book may already hold dated ahead of its clock (FUTURE_SKEW_S), and far
    enough for every worker to reload its timeline first (ACTIVATION_LEAD_S)."""
    return (ACTIVATION_LEAD_S + FUTURE_SKEW_S) * 1_000_000


def withdraw(conn: Connection, policy_id: str, reason: str, actor: Principal) -> dict:
    """Take a draft, an approved policy or a scheduled activation back before it decides
    anything. An activation already in force (or within the lead, where a worker or an
    event dated ahead may have used it) is history: a change is a new policy."""
    row = _require(conn, policy_id)
    now = _now_us()
    if row.status == "withdrawn":
        raise PolicyStateConflict(f"policy {policy_id!r} is already withdrawn")
    if row.origin == "file":
        raise PolicyStateConflict(f"policy {policy_id!r} ships as a file under policies/; it is changed by a "
                                  "new policy that supersedes it, not withdrawn")
    if row.status == "activated" and row.effective_from_us < now + _lead_us():
        raise PolicyStateConflict(f"policy {policy_id!r} took effect (or takes effect within "
                                  f"{_lead_us() // 1_000_000} s) at {rfc3339(row.effective_from_us)}; what it "
                                  "decided stays recorded: submit a new policy to change it")
    done = conn.execute(update(s.policies).where((s.policies.c.policy_id == policy_id)
                                                 & (s.policies.c.status == row.status))
                        .values(status="withdrawn", updated_at_us=now))
    if done.rowcount != 1:
        raise PolicyStateConflict(f"policy {policy_id!r} changed while withdrawing")
    # Read with the row claimed, after any approval that read it (`ledger.corrections.
    # _right_policy_usable` reads it FOR SHARE) has committed.
    paid = conn.execute(select(s.corrections.c.correction_id)
                        .where((s.corrections.c.right_policy_id == policy_id)
                               & s.corrections.c.status.in_(("approved", "posted")))
                        .order_by(s.corrections.c.correction_id).limit(5)).scalars().all()
    if paid:
        raise PolicyStateConflict(f"policy {policy_id!r} is the right policy of approved correction(s) "
                                  f"{', '.join(paid)}: its rules have paid, so it stays recorded")
    was = display_status(row, now, set())
    detail = {"was": was, "reason": reason}
    if row.effective_from_us is not None:
        detail["effective_from"] = rfc3339(row.effective_from_us)
    audit.append(conn, at_us=now, actor=actor.actor, action="policy.withdraw", object_type="policy",
                 object_id=policy_id, detail=detail)
    return {"policy_id": policy_id, "status": "withdrawn", "was": was}


def _same_person(author: str, approver: Principal) -> bool:
    """Maker-checker for policies, grant programs and corrections: the rule of
    `ledger.keys.same_person` (one key, or one name on any key, is one person)."""
    return same_person(author, approver.actor)


def _row(conn: Connection, policy_id: str):
    return conn.execute(select(s.policies).where(s.policies.c.policy_id == policy_id)).first()


def _require(conn: Connection, policy_id: str):
    row = _row(conn, policy_id)
    if row is None:
        raise PolicyNotFound(f"no policy {policy_id!r}")
    return row


def display_status(row, now_us: int, superseded: set[str]) -> str:
    if row.status != "activated":
        return row.status
    if row.effective_from_us > now_us:
        return "scheduled"
    return "superseded" if row.policy_id in superseded else "active"


def _superseded(rows, now_us: int) -> set[str]:
    """Policies replaced by a later one of the same layer that is already in force."""
    latest: dict[str, tuple[int, str]] = {}
    for row in rows:
        if row.status == "activated" and row.effective_from_us <= now_us:
            layer = PolicyDocument.model_validate_json(row.document).layer
            if layer not in latest or row.effective_from_us > latest[layer][0]:
                latest[layer] = (row.effective_from_us, row.policy_id)
    current = {policy_id for _, policy_id in latest.values()}
    return {row.policy_id for row in rows if row.status == "activated" and row.effective_from_us <= now_us
            and row.policy_id not in current}


def summary(row, status: str) -> dict:
    document = orjson.loads(row.document)
    return {"policy_id": row.policy_id, "name": document.get("name"), "layer": document.get("layer", "city"),
            "status": status, "origin": row.origin, "author": row.author, "approver": row.approver,
            "effective_from": rfc3339(row.effective_from_us) if row.effective_from_us is not None else None,
            "supersedes": row.supersedes, "created_at": rfc3339(row.created_at_us)}


def list_policies(conn: Connection) -> list[dict]:
    rows = conn.execute(select(s.policies).order_by(s.policies.c.effective_from_us.is_(None),
                                                    s.policies.c.effective_from_us, s.policies.c.policy_id)).all()
    now = _now_us()
    gone = _superseded(rows, now)
    return [summary(row, display_status(row, now, gone)) for row in rows]


def get_policy(conn: Connection, policy_id: str) -> dict:
    row = _require(conn, policy_id)
    rows = conn.execute(select(s.policies)).all()
    now = _now_us()
    out = summary(row, display_status(row, now, _superseded(rows, now)))
    document = PolicyDocument.model_validate_json(row.document)
    out["document"] = orjson.loads(row.document)
    out["diff"] = diff_text(conn, document, row.effective_from_us)
    out["warnings"] = document_warnings(conn, document)  # against the registry now: what an approver reads
    return out


def _replaceable(row, document: PolicyDocument) -> bool:
    """Whether the policy `row` is one `document` may name in `supersedes`: put in force
    (activated: from a file, or through the API, scheduled included) and of its layer.
    The review diff is taken against it: a draft of the author's own, never approved,
    made a draft tripling the rates read as a change of name (the security audit)."""
    return row.status == "activated" and PolicyDocument.model_validate_json(row.document).layer == document.layer


def _previous(conn: Connection, document: PolicyDocument, start_us: int | None = None) -> PolicyDocument | None:
    """What a document is reviewed against: the policy it supersedes (`_replaceable`), else the policy of
    its layer in force just before it starts (`start_us`, else its own date; a draft
    without one: in force now), which is what it replaces. Not the layer's newest (a
    policy of 2019 is not a change from one of 2026), and only activated policies:
    a withdrawn or unapproved one never was in force."""
    if document.supersedes:
        row = _row(conn, document.supersedes)
        if row is not None and _replaceable(row, document):
            return PolicyDocument.model_validate_json(row.document)
        # Another layer's, or one never in force (a draft, as an earlier release took):
        # reviewed against what it does replace, not against what its author named.
    if start_us is None:
        start_us = to_us(document.effective_from) if document.effective_from is not None else _now_us() + 1
    rows = conn.execute(select(s.policies).where(s.policies.c.status == "activated")
                        .where(s.policies.c.policy_id != document.policy_id)
                        .where(s.policies.c.effective_from_us < start_us)
                        .order_by(s.policies.c.effective_from_us.desc())).all()
    for row in rows:
        candidate = PolicyDocument.model_validate_json(row.document)
        if candidate.layer == document.layer:
            return candidate
    return None


def as_yaml(document: PolicyDocument) -> str:
    return yaml.safe_dump(document.model_dump(mode="json", exclude_none=True), sort_keys=False, allow_unicode=True)


def diff_documents(before: PolicyDocument | None, after: PolicyDocument) -> str:
    old = as_yaml(before).splitlines(keepends=True) if before else []
    new = as_yaml(after).splitlines(keepends=True)
    return "".join(difflib.unified_diff(old, new, fromfile=before.policy_id if before else "(none)",
                                        tofile=after.policy_id))


def diff_text(conn: Connection, document: PolicyDocument, start_us: int | None = None) -> str:
    return diff_documents(_previous(conn, document, start_us), document)


def policies_version(conn: Connection) -> tuple[int, int, int]:
    """Changes when any policy is activated or withdrawn: workers poll it to reload their
    timeline. The counts change with every such step whatever the hosts' clocks say (a
    withdrawal and an activation within one poll still move the withdrawn count)."""
    from sqlalchemy import case, func

    t = s.policies
    row = conn.execute(select(func.count(case((t.c.status == "activated", 1))),
                              func.count(case((t.c.status == "withdrawn", 1))),
                              func.coalesce(func.max(t.c.updated_at_us), 0))
                       .where(t.c.status.in_(("activated", "withdrawn")))).one()
    return tuple(row)

