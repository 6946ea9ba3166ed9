"""The policy document: the format policy staff write (YAML files under `policies/`,
or JSON through `POST /v1/policies`).

A document is the whole cashback stack in force from `effective_from` until the next
policy takes over. It is validated here with pydantic; `rules.compiled` turns a valid
document into the frozen, fast form that `rules.evaluate` reads.

Money is integer won, rates are integer basis points (1% = 100 bp).
"""

from __future__ import annotations

import datetime as dt
from enum import StrEnum
from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from rules.timeutil import in_span, time_text

DISTRICTS: tuple[str, ...] = (
    "jung", "dong", "michuhol", "yeonsu", "namdong",
    "bupyeong", "gyeyang", "seo", "ganghwa", "ongjin",
)
District = Literal[
    "jung", "dong", "michuhol", "yeonsu", "namdong",
    "bupyeong", "gyeyang", "seo", "ganghwa", "ongjin",
]
# Placeholders a funding split may name instead of a fixed district.
FUNDER_PLACEHOLDERS: tuple[str, ...] = ("$merchant_district", "$member_district")
FIXED_FUNDERS: tuple[str, ...] = ("national", "city", "merchant", *DISTRICTS)

# The layer whose policy sets what applies to every payment and top-up (CITY_ONLY); the
# policies of other layers only add components (rules.compiled.merge_layers).
BASE_LAYER = "city"
CITY_ONLY: tuple[str, ...] = ("topup", "withdrawal", "spend_order", "cashback_on", "declined_categories",
                              "cashback_eligibility", "monthly_cashback_cap_won")

AMOUNT_WON_MAX = 10**12
RATE_BP_MAX = 10_000
BP_WHOLE = 10_000

IdText = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._-]+$")]
# The ids callers choose (payments, members, merchants, disbursements...), 1-64 of these:
# no "/", the account ids' separator (ledger/accounts.py). api.schemas.CallerId, the merchant
# list's cursor and bulk files' rows use it.
CALLER_ID_PATTERN = r"^[A-Za-z0-9._:-]+$"
# Names and free text shown to people (registry, reports, the audit log): no control
# characters (PostgreSQL refuses NUL outright; the rest spoof terminals and logs) and no
# bidirectional overrides (text that reads other than it is stored). Text may keep its
# tabs and line breaks.
NO_CONTROLS = r"^[^\x00-\x1f\x7f\u202a-\u202e\u2066-\u2069]*$"
TEXT_CHARS = r"^[^\x00-\x08\x0b\x0c\x0e-\x1f\x7f\u202a-\u202e\u2066-\u2069]*$"
NameText = Annotated[str, Field(min_length=1, max_length=200, pattern=NO_CONTROLS)]


def shown_char(c: str) -> str:
    """A character as a refusal names it: "U+0009 TAB", "U+202E RIGHT-TO-LEFT OVERRIDE"."""
    import unicodedata

    return f"U+{ord(c):04X} " + (unicodedata.name(c, "") or {"\t": "TAB", "\n": "LINE FEED",
                                                         "\r": "CARRIAGE RETURN"}.get(c, "CONTROL"))


def text_problems(fields: list[tuple[str, str, bool]]) -> list[str]:
    """The paths of (path, text, is_name) whose text has characters NO_CONTROLS (names) or
    TEXT_CHARS (longer text) refuse. Checked where documents come in (the API's create
    routes), not where stored ones are read back: a document stored before these rules
    must still load."""
    import re

    # fullmatch: Python's `$` also matches before a final line feed, so a name ending in
    # one passed (the patterns' `$` means the end to pydantic's regex engine; the review).
    name, text = re.compile(NO_CONTROLS), re.compile(TEXT_CHARS)
    return [path for path, value, is_name in fields if not (name if is_name else text).fullmatch(value)]
# The validation context of a document coming in (rules.loader.validate): checks that
# stored documents, which an earlier release accepted, are not held to.
INPUT = "new_document"
Won = Annotated[int, Field(ge=0, le=AMOUNT_WON_MAX, strict=True)]
RateBp = Annotated[int, Field(ge=0, le=RATE_BP_MAX, strict=True)]
# A yes/no of a document: true or false, or the words YAML 1.1 meant as them (yes/no,
# on/off, any case: a file written so reads as its author meant, tests/test_policy_text.py),
# never a number nor another text. Lax, pydantic also read 1, "1", "t" and "y" as true and
# 0, "0", "f" and "n" as false (the policy audit). Stored documents hold JSON booleans.
FLAG_WORDS = {"true": True, "false": False, "yes": True, "no": False, "on": True, "off": False}


def _flag(value):
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in FLAG_WORDS:
        return FLAG_WORDS[value.strip().lower()]
    raise ValueError(f"{value!r} is not true or false (YAML's yes/no and on/off are taken too)")


Flag = Annotated[bool, BeforeValidator(_flag), Field(strict=True)]


class Balance(StrEnum):
    grants = "grants"
    points = "points"
    charged = "charged"


class Weekday(StrEnum):
    mon = "mon"
    tue = "tue"
    wed = "wed"
    thu = "thu"
    fri = "fri"
    sat = "sat"
    sun = "sun"


def remainder_named(data):
    """A document's `remainder_to`, when it names none, as the first funder of its
    `funding` as written (a `mode="before"` validator's work, while that order is known):
    compared, audited or stored with sorted keys, the document names who takes the won
    that flooring leaves, which the order alone no longer tells."""
    if isinstance(data, dict) and data.get("remainder_to") is None:
        funding = data.get("funding")
        first = next(iter(funding), None) if isinstance(funding, dict) else None
        if isinstance(first, str):
            data = {**data, "remainder_to": first}
    return data


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# The condition lists that a value must be one of (`CompiledConditions.holds`), by what
# they name: given empty, they hold for no payment. The exclude lists and
# merchant_flags_all, empty, hold for every payment.
MATCH_LISTS = {"categories_include": "merchant category", "merchant_districts": "merchant district",
               "member_districts": "member district", "weekdays": "day"}


class Conditions(Strict):
    """All given conditions must hold (AND); an empty block always holds."""

    merchant_sales_min_won: Won | None = Field(None, description="annual sales > this")
    merchant_sales_max_won: Won | None = Field(None, description="annual sales <= this")
    categories_include: tuple[str, ...] | None = None
    categories_exclude: tuple[str, ...] | None = None
    merchant_districts: tuple[District, ...] | None = None
    merchant_districts_exclude: tuple[District, ...] | None = None
    member_districts: tuple[District, ...] | None = None
    same_district: Flag | None = Field(
        None, description="true: merchant's district equals the member's; false: differs"
    )
    merchant_flags_all: tuple[str, ...] | None = None
    merchant_flags_none: tuple[str, ...] | None = None
    date_from: dt.date | None = Field(None, description="local (Asia/Seoul) date, inclusive")
    date_until: dt.date | None = Field(None, description="local (Asia/Seoul) date, inclusive")
    weekdays: tuple[Weekday, ...] | None = None

    @field_validator("date_from", "date_until", mode="before")
    @classmethod
    def _text(cls, value, info: ValidationInfo):
        # A bare number is Unix seconds to pydantic (1714521600 read as 2024-05-01): refused
        # where documents come in (rules.loader.validate passes INPUT), as effective_from's
        # is. Stored documents, read without it, load as they were stored.
        return time_text(value) if info.context and info.context.get(INPUT) else value

    def empty_lists(self) -> list[tuple[str, str]]:
        """(field, what it names) of each MATCH_LISTS condition given as an empty list."""
        return [(name, what) for name, what in MATCH_LISTS.items() if getattr(self, name) == ()]

    @model_validator(mode="after")
    def _ranges(self) -> "Conditions":
        lo, hi = self.merchant_sales_min_won, self.merchant_sales_max_won
        if lo is not None and hi is not None and lo >= hi:
            raise ValueError("merchant_sales_min_won must be below merchant_sales_max_won")
        if self.date_from and self.date_until and self.date_from > self.date_until:
            raise ValueError("date_from must not be after date_until")
        return self


class Band(Strict):
    """One rate band over the member's monthly eligible spend.

    Bands of a variant are listed in order; each runs from the previous band's
    `up_to_won` (or 0) to its own `up_to_won` (null: no upper end). Beyond the last
    band nothing is earned.
    """

    up_to_won: Won | None = None
    rate_bp: RateBp | None = None
    rate_from: Literal["merchant_share_bp"] | None = Field(
        None, description="take the rate from the merchant's own 상생 share"
    )

    @model_validator(mode="after")
    def _one_rate(self) -> "Band":
        if (self.rate_bp is None) == (self.rate_from is None):
            raise ValueError("a band needs exactly one of rate_bp or rate_from")
        return self


class Variant(Strict):
    """A rate schedule chosen by conditions. The first variant of a component whose
    conditions hold is the one applied; if none holds the component earns nothing."""

    id: IdText
    when: Conditions = Conditions()
    bands: tuple[Band, ...] = Field(min_length=1, max_length=16)

    @field_validator("bands")
    @classmethod
    def _ascending(cls, bands: tuple[Band, ...]) -> tuple[Band, ...]:
        previous = 0
        for index, band in enumerate(bands):
            last = index == len(bands) - 1
            if band.up_to_won is None:
                if not last:
                    raise ValueError("only the last band may be open-ended (up_to_won: null)")
                continue
            if band.up_to_won <= previous:
                raise ValueError("bands must rise: each up_to_won above the previous one")
            previous = band.up_to_won
        return bands


class Component(Strict):
    """One stacked layer of cashback (city base, district top-up, 상생 share, promotion)."""

    id: IdText
    name: str = Field("", max_length=200)
    variants: tuple[Variant, ...] = Field(min_length=1, max_length=32)
    funding: dict[str, Annotated[int, Field(gt=0, le=BP_WHOLE, strict=True)]] = Field(
        min_length=1, description="share of the component's amount per funder: in bp summing to 10000, "
        "or in parts (funding_unit)"
    )
    funding_unit: Literal["bp", "parts"] = Field(
        "bp",
        description='"bp": the shares are basis points and sum to 10000; "parts": the shares are '
        "in proportion to these whole numbers, e.g. {national: 2, city: 1} for two thirds and one "
        "third of every amount, which no split in bp gives exactly",
    )
    remainder_to: str | None = Field(
        None, description="funder that takes what flooring the split leaves; default: the first funder "
        "as written in `funding`, filled in when the document is read (a stored document names it)"
    )
    on_budget_short: Literal["partial", "skip"] = "partial"
    monthly_cashback_cap_won: Won | None = None

    @model_validator(mode="before")
    @classmethod
    def _first_funder(cls, data):
        """No `remainder_to`: the first funder as written, named here, while that order is
        known. Documents are stored with sorted keys (ledger/policies.py), so taking the
        first funder later paid another funder than the text says on the API's path."""
        return remainder_named(data)

    @field_validator("funding")
    @classmethod
    def _funding(cls, funding: dict[str, int]) -> dict[str, int]:
        for source in funding:
            if source not in FIXED_FUNDERS and source not in FUNDER_PLACEHOLDERS:
                raise ValueError(
                    f"unknown funder {source!r}; use national, city, merchant, a district "
                    f"or one of {', '.join(FUNDER_PLACEHOLDERS)}"
                )
        return funding

    @model_validator(mode="after")
    def _remainder(self) -> "Component":
        if self.funding_unit == "bp" and sum(self.funding.values()) != BP_WHOLE:
            raise ValueError(f"funding shares must sum to {BP_WHOLE} bp, not {sum(self.funding.values())} "
                             '(or say funding_unit: parts for shares in proportion)')
        if self.remainder_to is not None and self.remainder_to not in self.funding:
            raise ValueError("remainder_to must be one of the component's funders")
        ids = [variant.id for variant in self.variants]
        if len(set(ids)) != len(ids):
            raise ValueError("variant ids must be unique within a component")
        return self


class TopupLimits(Strict):
    # min_won above monthly_max_won is refused in new documents (PolicyDocument.input_problems)
    min_won: Won = 10_000
    monthly_max_won: Won = 2_000_000


class WithdrawalRule(Strict):
    """When a member may take back unspent charged money (잔액 환불). DOMAIN.md: once 60–80%
    of it has been used, the exact share set by ordinance (?). The default is the rule of
    Korea's local currencies: 60% of the charged money, 80% where it was 1만 or less. The
    share is of the charged money put in since the member's last withdrawal (top-ups, and
    what refunds of payments made before it restored), against what of it is left
    (docs/design.md, "Withdrawals")."""

    used_min_bp: RateBp = Field(6_000, description="the least share of the charged money put in that must "
                                "have been used, in bp (6000: 60%)")
    small_up_to_won: Won = Field(10_000, description="charged money put in of at most this is small: "
                                 "`small_used_min_bp` applies instead (0: none is)")
    small_used_min_bp: RateBp = Field(8_000, description="the least share used where the charged money put in "
                                      "is small, in bp (8000: 80%)")


# The condition fields that name merchant categories or flags (free text in the
# registry). Not `declined_categories`: it names the kinds of business the card may not
# be used at (department stores, large marts), which the registry is meant not to hold.
REGISTRY_NAME_FIELDS = {"categories_include": "category", "categories_exclude": "category",
                        "merchant_flags_all": "flag", "merchant_flags_none": "flag"}


class PolicyDocument(Strict):
    schema_version: Literal[1] = 1
    policy_id: IdText
    name: str = Field(min_length=1, max_length=200)
    description: str = Field("", max_length=4000)
    effective_from: dt.datetime | None = Field(
        None, description="RFC 3339 with offset; files carry it, API drafts get it on activation"
    )
    supersedes: IdText | None = Field(
        None, description="the policy this one replaces (for the review diff); approved policies are never edited"
    )
    layer: IdText = Field(
        BASE_LAYER,
        description="lower case; policies of different layers stack (a district card's top-up beside the "
        "city's cashback); within a layer the latest effective_from in force wins. Only the `city` layer "
        "sets top-up limits, the withdrawal rule, spend order, cashback_on, declined categories, eligibility "
        "and the total cap (another layer setting them is refused); other layers add components. A non-city "
        "policy with `components: []` ends its layer.",
    )
    topup: TopupLimits = TopupLimits()
    withdrawal: WithdrawalRule = Field(WithdrawalRule(), description="when a member may withdraw unspent "
                                       "charged money; a document without it takes these defaults")
    spend_order: tuple[Balance, ...] = (Balance.grants, Balance.points, Balance.charged)
    cashback_on: tuple[Balance, ...] = Field(
        (Balance.charged,), description="which balances' spending earns cashback"
    )
    declined_categories: tuple[str, ...] = Field(
        (), description="merchant categories where the card is refused outright"
    )
    cashback_eligibility: Conditions = Field(
        Conditions(), description="a payment earns cashback (and counts toward the monthly "
        "eligible spend) only where these hold"
    )
    monthly_cashback_cap_won: Won | None = None
    components: tuple[Component, ...] = Field((), max_length=32)

    @field_validator("effective_from", mode="before")
    @classmethod
    def _text(cls, value):
        return time_text(value)

    @field_validator("effective_from")
    @classmethod
    def _aware(cls, value: dt.datetime | None) -> dt.datetime | None:
        if value is not None and value.utcoffset() is None:
            raise ValueError("effective_from needs a UTC offset, e.g. 2025-09-01T00:00:00+09:00")
        if value is not None and not 1900 <= value.year <= 2999:  # the model's own bound; new ones: input_problems
            raise ValueError("effective_from must be 2000-01-01T00:00:00+09:00 to 2099-12-31")
        return value  # its span is checked in new documents (input_problems)

    @field_validator("spend_order")
    @classmethod
    def _order(cls, order: tuple[Balance, ...]) -> tuple[Balance, ...]:
        if sorted(order) != sorted(Balance):
            raise ValueError("spend_order must name grants, points and charged once each")
        return order

    @model_validator(mode="after")
    def _unique_components(self) -> "PolicyDocument":
        ids = [component.id for component in self.components]
        if len(set(ids)) != len(ids):
            raise ValueError("component ids must be unique")
        return self

    def text_problems(self) -> list[str]:
        """Paths of names and text with control characters or bidi overrides, refused in new
        drafts (`rules.document.text_problems`); stored documents still load."""
        fields = [("name", self.name, True), ("description", self.description, False)]
        fields += [(f"components[{n}].name", c.name, True) for n, c in enumerate(self.components)]
        return text_problems(fields)

    def registry_names(self) -> list[tuple[str, str, str]]:
        """(path, "category" or "flag", name) of every merchant category and flag the
        document's conditions name, in document order: names the registry holds as free
        text, so a misspelt one validates and matches nothing (`categories_exclude:
        [pharmcy]` excludes no pharmacy; `ledger.policies.registry_warnings`)."""
        out: list[tuple[str, str, str]] = []

        def walk(value, path: str) -> None:
            if isinstance(value, dict):
                for key, item in value.items():
                    kind = REGISTRY_NAME_FIELDS.get(key)
                    where = f"{path}.{key}" if path else key
                    if kind is not None and isinstance(item, (list, tuple)):
                        out.extend((f"{where}[{n}]", kind, name) for n, name in enumerate(item))
                    else:
                        walk(item, where)
            elif isinstance(value, (list, tuple)):
                for n, item in enumerate(value):
                    walk(item, f"{path}[{n}]")

        walk(self.model_dump(mode="json", exclude_none=True), "")
        return out

    def unreachable_variants(self) -> list[tuple[str, str, str]]:
        """(path, variant id, reason) of each variant listed after one of its component
        whose `when` is empty: the first variant that holds applies, and an empty block
        always holds, so the later ones never apply. A pharmacy rate added below the
        standard variant validates, pays nothing, and its preview shows no change to be
        suspicious of (`ledger.policies.document_warnings`; the policy-workflow audit)."""
        out: list[tuple[str, str, str]] = []
        for i, component in enumerate(self.components):
            always = next((j for j, variant in enumerate(component.variants) if variant.when == Conditions()), None)
            if always is None:
                continue
            first = component.variants[always].id
            out += [(f"components[{i}].variants[{j}]", variant.id,
                     f"variant {first!r} before it has no conditions and always applies, so {variant.id!r} never "
                     "does: list it before the catch-all")
                    for j, variant in enumerate(component.variants[always + 1:], always + 1)]
        return out

    def input_problems(self) -> list[tuple[tuple[str | int, ...], str]]:
        """(path, reason) of what a new document may not say, checked where documents come
        in (rules.loader.validate), not by the model: a document an earlier release stored
        (a top-up minimum above the maximum, later superseded; a draft dated 1999) must
        still load, or the service would not start, or its page would be a 500."""
        problems = self.layer_problems()
        problems += [(path, "a cashback cap must be at least 1 won (leave the component out to pay nothing)")
                     for path in self.zero_caps()]
        problems += self.empty_list_problems()
        if self.topup.min_won > self.topup.monthly_max_won:
            problems.append((("topup", "min_won"), f"min_won {self.topup.min_won} is above monthly_max_won "
                                                   f"{self.topup.monthly_max_won}: no top-up could be approved"))
        try:
            in_span(self.effective_from)
        except ValueError as error:
            problems.append((("effective_from",), str(error)))
        return problems

    def layer_problems(self) -> list[tuple[tuple[str, ...], str]]:
        """(path, reason) of what a new document says that its layer does not apply: a
        non-city layer's settings of CITY_ONLY fields (merge_layers takes the city
        policy's, so these were accepted and ignored), and a layer not in lower case (`City`
        is not the city layer: its components stacked on the city's). A value equal to
        the default is no setting: every stored document spells the defaults out. Refused
        where documents come in (rules.loader.validate); stored ones still load."""
        if self.layer != self.layer.lower():
            return [(("layer",), f"layers are lower case and matched exactly: {self.layer!r} would be a layer "
                                 f"of its own beside {self.layer.lower()!r}; write {self.layer.lower()!r}")]
        if self.layer == BASE_LAYER:
            return []
        why = (f"only the {BASE_LAYER} layer's policy sets this; layer {self.layer!r} would have it ignored: "
               "leave it out")
        problems = []
        for name in CITY_ONLY:
            value, default = getattr(self, name), type(self).model_fields[name].default
            if isinstance(value, BaseModel):  # name the settings inside: their lines
                problems += [((name, sub), why) for sub in type(value).model_fields
                             if getattr(value, sub) != getattr(default, sub)]
            elif value != default:
                problems.append(((name,), why))
        return problems

    def empty_list_problems(self) -> list[tuple[tuple[str | int, ...], str]]:
        """(path, reason) of each condition list given empty that holds for no payment
        (`MATCH_LISTS`): `member_districts: []` read as "any member" validated, and its
        variant, or with `cashback_eligibility` the whole policy, never paid, with nothing
        said. Refused in new documents (`input_problems`); stored ones still load."""
        blocks = [(("cashback_eligibility",), self.cashback_eligibility, "no payment would earn cashback")]
        blocks += [(("components", i, "variants", j, "when"), variant.when, f"variant {variant.id!r} would never apply")
                   for i, component in enumerate(self.components) for j, variant in enumerate(component.variants)]
        return [((*path, name), f"an empty list holds for no payment, so {consequence}: leave {name} out to "
                                f"allow any {what}, or name at least one")
                for path, conditions, consequence in blocks for name, what in conditions.empty_lists()]

    def zero_caps(self) -> list[tuple[str | int, ...]]:
        """Paths of cashback caps of 0 won. Refused where documents come in (`input_problems`:
        a cap that pays nothing is a policy without the component), but still read in
        stored documents, which an earlier version accepted. Only the API refused them, with
        no line: `eum policy validate` said ok to a file that `policy submit` then had
        refused, and a new file with one was loaded at start (the policy-workflow audit)."""
        paths: list[tuple[str | int, ...]] = [("monthly_cashback_cap_won",)] if self.monthly_cashback_cap_won == 0 else []
        return paths + [("components", i, "monthly_cashback_cap_won") for i, c in enumerate(self.components)
                        if c.monthly_cashback_cap_won == 0]


def policy_json_schema() -> dict:
    return PolicyDocument.model_json_schema()
