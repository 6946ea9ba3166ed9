"""The policy preview's points feedback, modelled: cashback is paid as points, and a
policy that spends points before charged money re-splits a member's later payments when
the member holds more (or fewer) points under the draft than the book did. Evaluated
on the recorded split, a raise would be overstated (a cut understated); here each
payment is re-split by the points the member holds under the draft, and evaluated
again, until no split moves (docs/design.md, "the kept split").

    evaluate_with_points(policy, payments, start, held, member, actual_timeline=None)
        -> (Evaluation, PointsFeedback)

The model, per member in time order over the range (members are independent):
- Δ_i, the points the member holds under the draft less those the book held, before
  payment i: 0 at `from` (the range starts from the book as it stands), then
  Δ_{i+1} = R_i + (s_i − h_i), with s_i the draft's cashback of payment i, h_i what the
  book's payment holds, and R_i what of Δ_i is left after payment i.
- A payment the draft declines (its category; no policy in force) and the book paid
  spends nothing under the draft and earns nothing (s_i = 0): the p_i points it spent in
  the book stay with the member, R_i = Δ_i + p_i. (Beside an `actual_timeline`, one that
  timeline declines too passes Δ on, as any payment kept on its split: both sides
  decline it.)
- Payment i (grants, then points, then charged money, under the draft and under the
  book) spent p_i points and c_i charged money in the book, which held B_i points
  before it. If c_i > 0 the book spent every point it held (B_i = p_i). If c_i = 0,
  B_i follows from the member's next payment j that spent charged money:
  B_i = p_j − Σ_{i≤k<j} (h_k − p_k), no other flow of points between them where no
  refund intervenes; with no such j it is unknown. Under the draft the payment spends
  min(B_i + Δ_i, p_i + c_i) points: x_i = Δ_i − R_i more (fewer, when negative), with
  R_i = max(p_i − B_i, Δ_i − c_i) the difference left after it. Where B_i is unknown the
  split stays and R_i = Δ_i; with Δ_i < 0 and p_i > 0 such a payment is *unresolved*
  (a cut only: the draft's fewer points may not cover it), kept on its split and
  bounded in the report.
- For fixed s this recursion is R_i = max(L_i, R_{i−1} + v_i), v_i = (s − h)_{i−1} + u_i,
  u_i = −c_i for a payment re-split, +p_i for one the draft declines, 0 for one kept on
  its split, with the floor L_i = p_i − B_i where B_i is known and −∞ elsewhere (a Lindley
  recursion with floors), so R = V − min(0, running min of V − L where L is known), V
  the running sum of v: column arithmetic (`_resplit`), no loop over payments.
- s depends on the split (the base) and on the month's earlier bases (bands, caps), so
  the split and the evaluation are iterated to their fixed point. Each round takes
  the split the last evaluation implies (exact for each member's first payment whose
  split moves), refines it with a cheap per-row model of the cashback (each line's rate
  over its base, floored: exact inside one band with no cap reached), and evaluates
  again only the members whose split moved, from their first moved payment on (their
  month's state before it taken from the last evaluation). It stops when the split the
  evaluation implies is the split evaluated: then every figure is what the book under
  the draft pays. Each round fixes at least one more payment of each member, so it ends.

What it leaves out (the note says so where it bears): refunds (the net payment model
re-splits what is left of a refunded payment; the book clawed back on its own dates);
payments the book declined for want of money, which a raise's points (or the money of
a payment the draft declines) might have paid: counted (`insufficient_payments`, read by
`settlement.simulate`) and noted, not modelled, since paying one spends charged money
the book kept, a balance the model does not carry (and a cut's missing points might
decline others); posted corrections' points (their parts
are in h_i, not their dates); budgets (not applied anywhere in the preview). Payments
under a stack whose spend order is not grants, points, charged (under the draft, or
the book's `actual_timeline` when given; without it the book is taken to have spent in
the draft's order) keep their split, and pass Δ on.
"""

from __future__ import annotations

from dataclasses import dataclass

import polars as pl

from rules.compiled import CompiledPolicy, PolicyTimeline
from rules.simulate import Evaluation, MonthStart, evaluate_frame, month_key_of

Policy = CompiledPolicy | PolicyTimeline

RESPLIT_ORDER = ("grants", "points", "charged")
ROUNDS_MAX = 200  # evaluations; each fixes at least one more payment per member (never reached in practice)
INNER_ROUNDS_MAX = 60


@dataclass
class PointsFeedback:
    """`simulate`'s `points_feedback`: what the points the draft pays more or less than
    the book re-split. `members`, `payments`: the payments the model re-split (their
    figures are in the report) and their members; `points_won`: Σ over those members of
    the most points the draft held more or less than the book before one of them
    (Σ|Δ_m|); `rate_bp`: the highest rate a won of base earns under the draft (its
    components' highest band rates added up); `unresolved_payments`: payments kept on
    their recorded split because the model cannot tell theirs (a cut, paid with points
    alone: the book's balance decides); `bound_won`: how far those can put the figures
    off, their members' Σ|Δ_m| × rate_bp / 10000 plus a won each (0 when none);
    `declined_payments`, `declined_points_won`: payments the draft declines that spent
    points in the book (modelled: those points stay with the member);
    `insufficient_payments`: the range's payments the book declined for want of money
    (not modelled); `declined_grant_payments`, `declined_grants_won`: payments the draft
    declines that spent grant money in the book (not modelled: that money stays in the
    member's lots under the draft and pays their later payments first)."""

    members: int = 0
    payments: int = 0
    points_won: int = 0
    rate_bp: int = 0
    unresolved_payments: int = 0
    unresolved_points_won: int = 0
    # Payments the draft declines (and the side compared with paid) that spent points in
    # the book: modelled, their points stay with the member under the draft and re-split
    # the later payments; counted so a reader sees where the figures come from.
    declined_payments: int = 0
    declined_points_won: int = 0
    # Payments in the range the book declined for want of money: not modelled (a draft
    # holding more points, or the money of a payment it declines, may have paid them).
    insufficient_payments: int = 0
    # Payments the draft declines (and the side compared with paid) that spent grant
    # money in the book: not modelled (under the draft the money stays in the member's
    # lots and pays their later payments first, where grant money earns by its program,
    # a balance and restrictions the model does not follow; the review of 2026-12-06i:
    # a member previewed 32,719 where the book under the draft pays 31,456).
    declined_grant_payments: int = 0
    declined_grants_won: int = 0

    @property
    def bound_won(self) -> int:
        return self.unresolved_points_won * self.rate_bp // 10_000 + self.unresolved_payments

    def merge(self, other: "PointsFeedback") -> None:
        self.members += other.members
        self.payments += other.payments
        self.points_won += other.points_won
        self.rate_bp = max(self.rate_bp, other.rate_bp)
        self.unresolved_payments += other.unresolved_payments
        self.unresolved_points_won += other.unresolved_points_won
        self.declined_payments += other.declined_payments
        self.declined_points_won += other.declined_points_won
        self.insufficient_payments += other.insufficient_payments
        self.declined_grant_payments += other.declined_grant_payments
        self.declined_grants_won += other.declined_grants_won

    def report(self) -> dict:
        return {"modelled": True, "members": self.members, "payments": self.payments,
                "points_won": self.points_won, "rate_bp": self.rate_bp,
                "unresolved_payments": self.unresolved_payments, "bound_won": self.bound_won,
                "declined_payments": self.declined_payments, "declined_points_won": self.declined_points_won,
                "insufficient_payments": self.insufficient_payments,
                "declined_grant_payments": self.declined_grant_payments,
                "declined_grants_won": self.declined_grants_won}

    def note(self) -> list[str]:
        notes = []
        if self.payments:
            notes.append(
                f"points feedback: cashback is paid as points, spent before charged money, and the draft pays "
                f"{self.members:,} members points more or less than the book did (Σ|Δ_m| = {self.points_won:,} "
                f"won) before {self.payments:,} of their payments; those payments are re-split as the draft's "
                "balance would have paid them (more points, less charged money that earns, or the reverse) and "
                "evaluated so: the figures include it (see points_feedback)")
        if self.declined_payments:
            notes.append(
                f"points feedback: {self.declined_payments:,} payment(s) the draft declines spent "
                f"{self.declined_points_won:,} won of points in the book; under the draft those points stay with "
                "their members and pay part of their later payments: modelled, the later payments re-split and "
                "evaluated so, the figures include it (see points_feedback)")
        if self.declined_grant_payments:
            notes.append(
                f"points feedback: {self.declined_grant_payments:,} payment(s) the draft declines spent "
                f"{self.declined_grants_won:,} won of grant money in the book; under the draft that money stays in "
                "their members' lots and pays their later payments first, which the preview does not model: those "
                "later payments keep their recorded split of grant money, so their members' figures may be off "
                "(grant money earns by its program, not as charged money does; see points_feedback)")
        if self.insufficient_payments and (self.payments or self.declined_payments):
            notes.append(
                f"points feedback: the book declined {self.insufficient_payments:,} payment(s) in the range for want "
                "of money; under the draft a member holding more points (or the money of a payment the draft "
                "declines) may have paid some of them, which the preview does not model: they stay declined and "
                "earn nothing in the figures. Paying one would spend charged money the book kept, a balance the "
                "model does not follow (a later payment may then lack it), and grant money the book's lots and "
                "their restrictions decide (see points_feedback)")
        if self.unresolved_payments:
            notes.append(
                f"points feedback: {self.unresolved_payments:,} payment(s) paid with points alone would find fewer "
                "points under the draft; whether they still cover it depends on the book's balance, which the "
                "preview does not read, so they keep their recorded split: where charged money earns and points "
                "do not, such a payment may take charged money under the draft and earn on it, so the figures may "
                f"overstate the cut's saving, by up to about {self.bound_won:,} won (see points_feedback)")
        return notes


def _stacks(policy: Policy) -> list[CompiledPolicy]:
    if isinstance(policy, CompiledPolicy):
        return [policy]
    return [stack for stack in (policy.in_force(layer.effective_from_us) for layer in policy) if stack is not None]


def _sign(stack: CompiledPolicy) -> int:
    """How a won more of points spent moves the base: −1 where charged money earns and
    points do not, +1 the reverse, 0 where both or neither do."""
    return int("points" in stack.cashback_on) - int("charged" in stack.cashback_on)


def _run_sum(x: pl.Expr) -> pl.Expr:
    """Inclusive running sum within each member's run (`first` marks a run's first row)."""
    total = x.cum_sum()
    return total - pl.when(pl.col("first")).then(total - x).forward_fill()


def _resplit(f: pl.DataFrame, s: pl.Series) -> pl.DataFrame:
    """For the cashback `s` (member-run order), each row's Δ before it (`delta`) and the
    points it spends more under the draft (`x`), by the closed form of the recursion
    (module doc): R_i = max(L_i, R_{i-1} + v_i) where the floor L_i = p_i − B_i is known,
    v_i = d_{i-1} + u_i (`u`: −c_i where the payment is re-split, +p_i where the draft
    declines it, 0 where it keeps its split)."""
    f = f.select("first", "run", "ok", "c", "p", "L", "u", (s - f["h"]).alias("d"))
    d_prev = pl.when(pl.col("first")).then(0).otherwise(pl.col("d").shift(1)).fill_null(0)
    f = f.with_columns(d_prev.alias("d_prev")).with_columns(_run_sum(pl.col("d_prev") + pl.col("u")).alias("V"))
    gap = pl.col("V") - pl.col("L")
    spread = f.select((pl.col("V").abs().max() + gap.abs().max().fill_null(0) + 1).alias("s")).item()
    spread = int(spread or 1)
    runs = int(f["run"][-1]) + 1 if f.height else 0
    big = 2 * spread + 1
    floored = pl.col("L").is_not_null()
    if big * runs < 2**62:
        # The running min within each run in one pass: each run's keys lie below every
        # earlier run's (offset by run × big); rows with no floor take a key above the run's.
        offset = pl.col("run").cast(pl.Int64) * big
        low = (pl.when(floored).then(gap).otherwise(spread) - offset).cum_min() + offset
    else:
        low = pl.when(floored).then(gap).otherwise(None).cum_min().over("run").fill_null(spread)
    r = pl.col("V") - pl.min_horizontal(low, pl.lit(0, pl.Int64))
    f = f.lazy().with_columns(r.alias("R")).with_columns(
        pl.when(pl.col("first")).then(0).otherwise(pl.col("R").shift(1) + pl.col("d_prev")).fill_null(0)
        .alias("delta"))
    x = pl.when(pl.col("ok")).then((pl.col("delta") - pl.col("R")).clip(-pl.col("p"), pl.col("c"))).otherwise(0)
    return f.select(x.alias("x"), "delta").collect()


def _approx(f: pl.DataFrame, s: pl.Series, x_at: pl.Series, x: pl.Series, components: int) -> pl.Series:
    """The cashback at split `x`, from the evaluation at split `x_at` (cashback `s`):
    each component's line base moved by the re-split, floored at its rate."""
    moved = (x - x_at) * f["sign"]
    out = s
    for k in range(components):
        b, r = f[f"b{k}"], f[f"r{k}"]
        out = out + (b + moved).clip(lower_bound=0) * r // 10_000 - b * r // 10_000
    return out


def evaluate_with_points(policy: Policy, payments: pl.DataFrame, start: MonthStart, held: pl.Series,
                         member: pl.Series, actual_timeline: PolicyTimeline | None = None, *,
                         as_given: bool = False) -> tuple[Evaluation, PointsFeedback]:
    """`evaluate_frame(policy, payments, start)` with each payment re-split by the points
    the member holds under the draft (module doc). `payments` in time order, as
    `settlement.simulate._group_payments` gives them, or with `as_given` each member's
    in the order the book paid them (it drew on the member's points in that order too),
    evaluated so (`evaluate_frame(..., as_given=True)`); `held` the cashback each has on
    the side the draft is compared with (what it holds in the book, or the in-force
    timeline re-evaluated: then the same policy re-splits nothing, refunds or not);
    `member` each row's member (its code, or its id as `start` keys it)."""
    first_eval = evaluate_frame(policy, payments, start, as_given=as_given)
    stacks = _stacks(policy)
    feedback = PointsFeedback()
    feeding = {stack.policy_id: _sign(stack) for stack in stacks if tuple(stack.spend_order) == RESPLIT_ORDER}
    n = payments.height
    if n == 0:
        return first_eval, feedback
    p = first_eval.payments
    rows = p["row"]
    book_ok = pl.repeat(True, n, dtype=pl.Boolean, eager=True)
    # The payments the side compared with declines too: the book declined none of them (they
    # are approved ones); the policies in force re-evaluated decline a category they
    # decline (the merchant's as registered now) and where none is in force.
    compared_declines = pl.repeat(False, n, dtype=pl.Boolean, eager=True)
    if actual_timeline is not None:
        # The book's stack at each payment: its timeline's intervals, looked up by time.
        starts = sorted({layer.effective_from_us for layer in actual_timeline})
        in_force = [None, *(actual_timeline.in_force(at) for at in starts)]
        fits = [stack is not None and tuple(stack.spend_order) == RESPLIT_ORDER for stack in in_force]
        interval = pl.Series(starts, dtype=pl.Int64).search_sorted(payments["occurred_at_us"].cast(pl.Int64),
                                                                   side="right")
        book_ok = pl.Series(fits, dtype=pl.Boolean).gather(interval)
        compared_declines = pl.Series([stack is None for stack in in_force], dtype=pl.Boolean).gather(interval)
        by_categories: dict[frozenset, list[int]] = {}
        for k, stack in enumerate(in_force):
            if stack is not None and stack.declined_categories:
                by_categories.setdefault(frozenset(stack.declined_categories), []).append(k)
        for categories, intervals in by_categories.items():
            compared_declines = compared_declines | (interval.is_in(intervals) & payments["category"].cast(pl.String)
                                                     .is_in(sorted(categories)))
    policy_sign = pl.repeat(0, n, dtype=pl.Int8, eager=True).scatter(rows, p["policy_id"].cast(pl.String).replace_strict(
        {k: v for k, v in feeding.items()}, default=None, return_dtype=pl.Int8).fill_null(-128))
    declined = pl.repeat(False, n, dtype=pl.Boolean, eager=True).scatter(rows, p["declined"])
    # A payment the draft declines and the side compared with paid: under the draft the
    # points it spent stay with the member (Δ grows by them) and pay part of later payments.
    gives_back = declined & ~compared_declines
    # Grant money given back is counted whatever the draft's points do (it pays later
    # payments first and earns by its program: a draft earning on charged money and
    # points alike, which re-splits nothing, had no count and no note; the review).
    spent_grants = payments["spent_grants_won"].cast(pl.Int64)
    feedback.declined_grant_payments = int((gives_back & (spent_grants > 0)).sum())
    feedback.declined_grants_won = int(spent_grants.filter(gives_back).sum())
    if not any(feeding.values()):  # no stack re-splits: points given back move nothing
        return first_eval, feedback
    spent_points = payments["spent_points_won"].cast(pl.Int64)
    feedback.declined_payments = int((gives_back & (spent_points > 0)).sum())
    feedback.declined_points_won = int(spent_points.filter(gives_back).sum())
    # Member runs in time order: as a single policy's evaluation gives its rows (by member
    # code, then time); else, or `as_given` (an evaluation's rows go by member-month, and a
    # member's order across months is the frame's), sorted so: the sort is stable.
    if isinstance(policy, CompiledPolicy) and not as_given:
        order = rows
    else:
        order = member.to_frame("m").select(pl.arg_sort_by("m", maintain_order=True)).to_series().cast(pl.UInt32)
    mem = member.gather(order)
    first = (mem != mem.shift(1)).fill_null(True)
    sign = policy_sign.gather(order)
    f = pl.DataFrame({
        "idx": order, "first": first, "run": (first.cum_sum() - 1).cast(pl.UInt32),
        "p": payments["spent_points_won"].cast(pl.Int64).gather(order),
        "c": payments["spent_charged_won"].cast(pl.Int64).gather(order),
        "h": held.cast(pl.Int64).gather(order),
        "ok": (sign != -128) & book_ok.gather(order) & ~declined.gather(order),
        "back": gives_back.gather(order),
        "sign": sign.replace(-128, 0).cast(pl.Int64),
    })
    # u_i, what payment i adds to Δ besides the cashback (module doc): the charged money a
    # re-split payment can take points for, the points a payment the draft declines keeps.
    f = f.with_columns(pl.when(pl.col("ok")).then(-pl.col("c")).when(pl.col("back")).then(pl.col("p"))
                       .otherwise(0).alias("u")).drop("back")
    # The floor L_i = p_i − B_i (B_i the book's points before payment i) where B_i is
    # known: 0 where the payment spent charged money (B_i = p_i); where it did not, from
    # the member's next payment that did, B_i = p_j − Σ_{i≤k<j} (h_k − p_k) (no other
    # flow of points between them where no refund intervenes); unknown (null) otherwise.
    after = _run_sum(pl.col("h") - pl.col("p"))  # Σ_{k≤i} (h_k − p_k) within the run
    reset = pl.col("ok") & (pl.col("c") > 0)
    f = f.with_columns(after.alias("A"))
    anchor = pl.when(reset).then(pl.col("p") - (pl.col("A") - (pl.col("h") - pl.col("p"))))
    f = f.with_columns(anchor.backward_fill().alias("anchor"),
                       pl.when(reset).then(pl.col("run")).backward_fill().alias("anchor_run"))
    balance = pl.col("anchor") + (pl.col("A") - (pl.col("h") - pl.col("p")))  # B_i = p_j − Σ_{i≤k<j} (h_k − p_k)
    known = pl.col("ok") & (pl.col("anchor_run") == pl.col("run")) & (balance >= pl.col("p"))
    f = f.with_columns(pl.when(reset).then(pl.lit(0, pl.Int64)).when(known).then(pl.col("p") - balance)
                       .otherwise(None).alias("L")).drop("A", "anchor", "anchor_run")
    position = pl.repeat(0, n, dtype=pl.UInt32, eager=True).scatter(order, pl.int_range(n, dtype=pl.UInt32,
                                                                                          eager=True))
    components = sorted({c.component_id for stack in stacks for c in stack.components})
    capped = {c.component_id for stack in stacks for c in stack.components if c.monthly_cashback_cap_won is not None}
    banded = {c.component_id for stack in stacks for c in stack.components if max(len(v.bands) for v in c.variants) > 1}
    if order is rows:
        month, member_idx = p["month_key"], p["member_idx"]
    else:
        month = payments.select(month_key_of(pl.col("occurred_at_us")).alias("m"))["m"].gather(order)
        member_idx = pl.repeat(0, n, dtype=pl.UInt32, eager=True).scatter(rows, p["member_idx"]).gather(order)
    names = ["s", "counted", *(f"{kind}{k}" for k, c in enumerate(components)
                               for kind in ("b", "r", *(("k",) if c in capped else ())))]

    def per_row(evaluation: Evaluation, where: pl.Series) -> dict[str, tuple[pl.Series, pl.Series]]:
        """The evaluation's per-row figures, by run position (`where`: its rows' input rows)."""
        q = evaluation.payments
        at = position.gather(where.gather(q["row"]))
        values = {"s": (at, q["cashback_won"]),
                  "counted": (at, q.select(pl.when(pl.col("counts_toward_month")).then(pl.col("base_won"))
                                           .otherwise(0)).to_series())}
        lines = evaluation.lines
        for k, component in enumerate(components):
            one = lines.filter(pl.col("component_id").cast(pl.String) == component)
            if component in banded:  # one line per band: added up per payment
                one = one.group_by("row").agg(pl.col("base_won").sum(), pl.col("rate_bp").max(),
                                              pl.col("amount_won").sum())
            one_at = position.gather(where.gather(one["row"]))
            values[f"b{k}"] = (one_at, one["base_won"])
            values[f"r{k}"] = (one_at, one["rate_bp"])
            if component in capped:
                values[f"k{k}"] = (one_at, one["amount_won"])
        return values

    def put(frame: pl.DataFrame, values: dict, clear: pl.Series | None) -> pl.DataFrame:
        """`values` (by run position) into `frame` (rows at run positions `frame["pos"]`),
        the line columns of the rows `clear` first cleared."""
        cols = []
        for name in names:
            column = frame[name].clone() if name in frame.columns else \
                pl.repeat(0, frame.height, dtype=pl.Int64, eager=True)  # (scatter writes in place)
            if clear is not None and name in frame.columns and name not in ("s", "counted"):
                column = column.zip_with(~clear, pl.repeat(0, frame.height, dtype=pl.Int64, eager=True))
            if name in values:
                at, series = values[name]
                if clear is not None:
                    at = frame["pos"].search_sorted(at)
                column = column.scatter(at, series.cast(pl.Int64))
            cols.append(column.alias(name))
        return frame.with_columns(cols)

    def top_rate(frame: pl.DataFrame) -> int:
        return int(frame.select(pl.sum_horizontal(pl.col(f"r{k}") for k in range(len(components))).max()).item()
                   or 0) if components else 0

    everyone = pl.int_range(n, dtype=pl.UInt32, eager=True)
    f = f.with_columns(pl.int_range(n, dtype=pl.UInt32).alias("pos"))
    f = put(f, per_row(first_eval, everyone), None)
    f = f.with_columns(pl.repeat(0, n, dtype=pl.Int64, eager=True).alias("xe"), month.alias("month"),
                       mem.alias("member"))
    feedback.rate_bp = top_rate(f)
    evaluations: list[tuple[pl.Series, Evaluation]] = [(everyone, first_eval)]  # (input rows, evaluation)
    owner = pl.repeat(0, n, dtype=pl.UInt16, eager=True)  # per input row: the evaluation that holds it
    final_x = pl.repeat(0, n, dtype=pl.Int64, eager=True)  # per run position, as the last check found them
    final_delta = final_x.clone()
    g = f  # the runs still moving: whole runs, in run order
    for _round in range(ROUNDS_MAX):
        exact = _resplit(g, g["s"])
        x = exact["x"]
        final_x, final_delta = final_x.scatter(g["pos"], x), final_delta.scatter(g["pos"], exact["delta"])
        moved = x != g["xe"]
        if not moved.any():
            break
        # Only the runs with a move go on (the others are settled: nothing of theirs changes).
        keep = g.select(pl.col("run").is_in(g["run"].filter(moved).unique().implode())).to_series()
        g, x = g.filter(keep), x.filter(keep)
        # Refined with the per-row model of the cashback, then evaluated from the first move.
        # (A run whose guess did not change is settled: its cashback model stays the same.)
        active, rows_active = g, None
        for _inner in range(INNER_ROUNDS_MAX):
            x_active = x if rows_active is None else x.gather(rows_active)
            guess = _resplit(active, _approx(active, active["s"], active["xe"], x_active, len(components)))["x"]
            changed = guess != x_active
            if not changed.any():
                break
            x = x.clone().scatter(rows_active if rows_active is not None else
                                  pl.int_range(g.height, dtype=pl.UInt32, eager=True), guess)
            runs_changed = active["run"].filter(changed).unique().implode()
            rows_active = g.select(pl.col("run").is_in(runs_changed)).to_series().arg_true()
            active = g[rows_active]
        g = g.with_columns(x.alias("xg"))
        g = g.with_columns((_run_sum((pl.col("xg") != pl.col("xe")).cast(pl.Int64)) > 0).alias("tail"))
        tail_rows = g.filter("tail")
        # The tail's rows in the frame's (time) order: a mask, no sort.
        in_tail = pl.repeat(False, n, dtype=pl.Boolean, eager=True).scatter(tail_rows["idx"], True)
        x_input = pl.repeat(0, n, dtype=pl.Int64, eager=True).scatter(tail_rows["idx"], tail_rows["xg"])
        rows_tail = in_tail.arg_true().cast(pl.UInt32)
        frame = payments.with_columns(x_input.alias("_x")).filter(in_tail).with_columns(
            (pl.col("spent_points_won") + pl.col("_x")).cast(payments.schema["spent_points_won"]),
            (pl.col("spent_charged_won") - pl.col("_x")).cast(payments.schema["spent_charged_won"])).drop("_x")
        # Each tail's months start from their state before it (the last evaluation's): in
        # time order only its first month has rows before the tail; in the book's order a
        # payment backdated into an earlier month can start a tail ahead of its later month's.
        firsts = g.filter(pl.col("tail") & (pl.col("first") | ~pl.col("tail").shift(1).fill_null(False)))
        before = g.filter(~pl.col("tail")).join(tail_rows.select("run", "month").unique(), on=["run", "month"],
                                                how="semi")
        key = [pl.col("member").alias("member_id"), pl.col("month").cast(pl.Int32).alias("month_key")]
        affected = firsts["member"].implode()
        start_member = pl.col("member_id").cast(member.dtype)
        sums = before.group_by("member", "month").agg(
            pl.col("counted").sum().alias("eligible_spend_won"), pl.col("s").sum().alias("cashback_won"),
            *(pl.col(f"k{k}").sum() for k, c in enumerate(components) if c in capped))
        months = pl.concat([
            start.months.filter(start_member.is_in(affected)).select(
                start_member, pl.col("month_key").cast(pl.Int32),
                pl.col("eligible_spend_won").cast(pl.Int64), pl.col("cashback_won").cast(pl.Int64)),
            sums.select(*key, "eligible_spend_won", "cashback_won")])
        comps = [start.components.filter(start_member.is_in(affected)).select(
            start_member, pl.col("month_key").cast(pl.Int32),
            pl.col("component_id").cast(pl.String), pl.col("cashback_won").cast(pl.Int64))]
        comps += [sums.select(*key, pl.lit(c).alias("component_id"), pl.col(f"k{k}").alias("cashback_won"))
                  for k, c in enumerate(components) if c in capped]
        again = evaluate_frame(policy, frame, MonthStart(months, pl.concat(comps)), as_given=as_given)
        if len(evaluations) >= 2**16 - 1:
            raise RuntimeError("points feedback: too many evaluations")
        evaluations.append((rows_tail, again))
        owner = owner.scatter(rows_tail, len(evaluations) - 1)
        g = g.filter(pl.col("run").is_in(tail_rows["run"].unique().implode()))
        g = put(g, per_row(again, rows_tail), g["tail"]).with_columns(pl.col("xg").alias("xe")).drop("xg", "tail")
        feedback.rate_bp = max(feedback.rate_bp, top_rate(g))
    else:
        raise RuntimeError("points feedback: the re-split did not settle")
    final = _assemble(evaluations, owner, position, member_idx, first_eval)
    f = f.select("run", "ok", "L", "p", final_x.alias("x"), final_delta.alias("delta"))
    moved = f.filter(pl.col("x") != 0)
    unresolved = f.filter(pl.col("ok") & pl.col("L").is_null() & (pl.col("p") > 0) & (pl.col("delta") < 0))
    if moved.height:
        per_member = moved.group_by("run").agg(pl.col("delta").abs().max())
        feedback.members, feedback.payments = per_member.height, moved.height
        feedback.points_won = int(per_member["delta"].sum())
    if unresolved.height:
        feedback.unresolved_payments = unresolved.height
        feedback.unresolved_points_won = int(unresolved.group_by("run").agg(pl.col("delta").abs().max())["delta"]
                                             .sum())
    return final, feedback


def _assemble(evaluations: list[tuple[pl.Series, Evaluation]], owner: pl.Series, position: pl.Series,
              member_idx: pl.Series, first_eval: Evaluation) -> Evaluation:
    """One evaluation of every input row: each row's from the last evaluation of it, its
    `row` the input position and its `member_idx` the first evaluation's."""
    if len(evaluations) == 1:
        return first_eval
    member_idx_of_row = member_idx.gather(position)  # input row -> first evaluation's member_idx
    payments, lines, funding = [], [], []
    for number, (where, evaluation) in enumerate(evaluations):
        def mine(frame: pl.DataFrame) -> pl.DataFrame:
            input_row = where.gather(frame["row"])
            return (frame.with_columns(input_row.alias("row"))
                    .filter(owner.gather(input_row) == number))
        q = mine(evaluation.payments)
        payments.append(q.with_columns(member_idx_of_row.gather(q["row"]).alias("member_idx")))
        lines.append(mine(evaluation.lines))
        funding.append(mine(evaluation.funding))
    return Evaluation(pl.concat(payments, how="vertical_relaxed"), first_eval.members,
                      pl.concat(lines, how="vertical_relaxed"), pl.concat(funding, how="vertical_relaxed"))
