"""Relief-grant program documents (지원금): validity, restrictions, funding, amounts.

`amount_rules` compute a recipient's amount from their attributes (category,
household size, income status, district, a unit count such as daycare classes):
  amount = first matching `base` rule's amount (or its per-unit amount × the unit
           attribute), + every matching `add_ons` rule's amount.
"""

from __future__ import annotations

import datetime as dt
from functools import cached_property
from typing import Annotated, Any, Literal, Sequence

from pydantic import Field, field_validator, model_validator

from rules.document import (AMOUNT_WON_MAX, BP_WHOLE, DISTRICTS, FIXED_FUNDERS, District, Flag, IdText, Strict,
                            Won, remainder_named, text_problems)
from rules.facts import GrantProgramFacts, GrantRestrictions
from rules.timeutil import SEOUL, in_span, local_midnight_us, time_text, to_us


# Recipient attributes the amount rules may read that are whole numbers; the rest are
# text, and `district` one of Incheon's.
INT_ATTRIBUTES = ("household_size", "classes", "units")
ATTRIBUTE_INT_MAX = 10_000
NAMES_LISTED_MAX = 20  # names a refusal of a file's header lists; the rest are counted


def names_listed(names: Sequence[str]) -> str:
    """`names` joined for a refusal, the first NAMES_LISTED_MAX of them and a count of
    the rest: a header of 100,000 names is not echoed whole."""
    listed = ", ".join(names[:NAMES_LISTED_MAX])
    return listed + (f" and {len(names) - NAMES_LISTED_MAX:,} more" if len(names) > NAMES_LISTED_MAX else "")
_DISTRICT_SET = frozenset(DISTRICTS)


def check_attributes(attrs: dict[str, Any]) -> dict[str, Any]:
    """`attrs` when each has the type the rules compare it as; else a ValueError that
    names it (a string household size once reached a comparison with an int: a 500)."""
    for key, value in attrs.items():
        if key in INT_ATTRIBUTES:
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= ATTRIBUTE_INT_MAX:
                raise ValueError(f"attribute {key!r} must be a whole number from 0 to {ATTRIBUTE_INT_MAX:,}, "
                                 f"not {value!r}")
        elif not isinstance(value, str):
            raise ValueError(f"attribute {key!r} must be text, not {value!r}")
        elif key == "district" and value not in _DISTRICT_SET:
            raise ValueError(f"attribute 'district' must be one of {', '.join(DISTRICTS)}, not {value!r}")
    return attrs


class RecipientMatch(Strict):
    """Conditions over a recipient's attributes; all given must hold."""

    category: tuple[str, ...] | None = None
    # Whole numbers as written: lax, "3" was read as 3 (and a recipient's "3" is refused,
    # check_attributes). Stored documents hold JSON numbers: they load.
    household_size: tuple[Annotated[int, Field(strict=True)], ...] | None = None
    household_size_min: Annotated[int, Field(strict=True)] | None = None
    income_status: tuple[str, ...] | None = None
    district: tuple[District, ...] | None = None

    def holds(self, attrs: dict[str, Any]) -> bool:
        if self.category is not None and attrs.get("category") not in self.category:
            return False
        size = attrs.get("household_size")
        if self.household_size is not None and size not in self.household_size:
            return False
        if self.household_size_min is not None and (size is None or size < self.household_size_min):
            return False
        if self.income_status is not None and attrs.get("income_status") not in self.income_status:
            return False
        if self.district is not None and attrs.get("district") not in self.district:
            return False
        return True


class AmountRule(Strict):
    id: IdText
    when: RecipientMatch = RecipientMatch()
    amount_won: Won | None = None
    per_unit_won: Won | None = None
    unit: str | None = Field(None, description="recipient attribute holding the unit count, e.g. classes")

    @model_validator(mode="after")
    def _one(self) -> "AmountRule":
        if (self.amount_won is None) == (self.per_unit_won is None):
            raise ValueError("an amount rule needs exactly one of amount_won or per_unit_won")
        if self.per_unit_won is not None and not self.unit:
            raise ValueError("per_unit_won needs unit: the attribute that counts units")
        return self

    def most(self) -> int:
        """The most this rule gives anyone (a per-unit rule at the largest unit count)."""
        return self.amount_won if self.amount_won is not None else self.per_unit_won * ATTRIBUTE_INT_MAX

    def amount(self, attrs: dict[str, Any]) -> int:
        if self.amount_won is not None:
            return self.amount_won
        units = attrs.get(self.unit)
        if not isinstance(units, int) or units < 0:
            raise ValueError(f"recipient needs a whole number {self.unit!r}")
        return self.per_unit_won * units


class AmountRules(Strict):
    base: tuple[AmountRule, ...] = Field(min_length=1)
    add_ons: tuple[AmountRule, ...] = ()

    def most(self) -> int:
        """The most any recipient can be given: the largest base and every add-on."""
        return max(rule.most() for rule in self.base) + sum(rule.most() for rule in self.add_ons)

    def attributes_read(self) -> frozenset[str]:
        """The recipient attributes the rules look at: those their `when`s compare
        (`household_size_min` reads `household_size`) and their per-unit counts."""
        names = set()
        for rule in (*self.base, *self.add_ons):
            names.update("household_size" if name == "household_size_min" else name
                         for name in RecipientMatch.model_fields if getattr(rule.when, name) is not None)
            if rule.unit:
                names.add(rule.unit)
        return frozenset(names)

    def amount_for(self, attrs: dict[str, Any]) -> int:
        base = next((rule for rule in self.base if rule.when.holds(attrs)), None)
        if base is None:
            raise ValueError(f"no amount rule matches this recipient{self._unnamed(attrs)}")
        return base.amount(attrs) + sum(rule.amount(attrs) for rule in self.add_ons if rule.when.holds(attrs))

    def _unnamed(self, attrs: dict[str, Any]) -> str:
        """Which of the recipient's attributes no base rule names (an income status the
        program does not know, say, a household size no rule pays, or none sent), with the
        values the rules do name (a household size as its sizes and `household_size_min`s:
        a file's blank household_size was refused "no amount rule matches this recipient",
        not saying which)."""
        problems = []
        for name in ("category", "income_status", "district"):
            named = list(dict.fromkeys(v for rule in self.base for v in getattr(rule.when, name) or ()))
            if named and attrs.get(name) not in named:
                given = f"{name} {attrs[name]!r} is not one the rules name" if name in attrs else \
                    f"no {name} was sent, which the rules read"
                problems.append(f"{given} ({', '.join(named)})")
        sizes = sorted({v for rule in self.base for v in rule.when.household_size or ()})
        least = min((rule.when.household_size_min for rule in self.base if rule.when.household_size_min is not None),
                    default=None)
        size = attrs.get("household_size")
        if (sizes or least is not None) and not (size in sizes or (least is not None and size is not None
                                                                    and size >= least)):
            given = f"household_size {size!r} is not one the rules name" if "household_size" in attrs else \
                "no household_size was sent, which the rules read"
            named = [str(v) for v in sizes] + ([f"{least} or more"] if least is not None else [])
            problems.append(f"{given} ({', '.join(named)})")
        return f": {'; '.join(problems)}" if problems else ""


class Restrictions(Strict):
    merchant_sales_max_won: Won | None = None
    categories_include: tuple[str, ...] | None = None
    categories_exclude: tuple[str, ...] | None = None
    merchant_districts: tuple[District, ...] | None = None


class UnspentReturn(Strict):
    """Unspent money all to one of the program's funders, whoever's share it was (the
    2025 coupon's leftovers go to the national treasury)."""

    return_to: str


class GrantProgramDocument(Strict):
    program_id: IdText
    name: str = Field(min_length=1, max_length=200)
    description: str = Field("", max_length=4000)
    amount_rules: AmountRules | None = None
    valid_from: dt.datetime | dt.date
    valid_until: dt.datetime | dt.date = Field(
        description="a date: money usable through the end of that day (Asia/Seoul); a time: until that instant"
    )
    restrictions: Restrictions = Restrictions()
    funding: dict[str, Annotated[int, Field(gt=0, le=BP_WHOLE, strict=True)]]
    remainder_to: str | None = None
    cashback_on_spend: Flag = False
    unspent: Literal["return_to_funders"] | UnspentReturn = Field(
        "return_to_funders", description="where unspent money goes at expiry and by a refund after it: "
                                         "return_to_funders (by the funding split), or {return_to: FUNDER}, all "
                                         "of it to that one of the funders")
    once_per_member: Flag = Field(True, description="a member receives the program at most once (false: the "
                                                    "officer may disburse to one member again, e.g. per category)")

    @model_validator(mode="before")
    @classmethod
    def _first_funder(cls, data):
        """No `remainder_to`: the first funder as written. Left unnamed, the audit entry
        (keys sorted) did not say who takes the flooring's won, a create with the funders
        in another order was a replay of other terms, and the book check (which compares
        the stored program with its entry whatever the keys' order) let the stored order,
        and so the remainder's funder, change unseen (policy audit)."""
        return remainder_named(data)

    @field_validator("funding")
    @classmethod
    def _funding(cls, funding: dict[str, int]) -> dict[str, int]:
        for source in funding:
            if source not in FIXED_FUNDERS:
                raise ValueError(f"unknown funder {source!r}")
        if sum(funding.values()) != BP_WHOLE:
            raise ValueError(f"funding shares must sum to {BP_WHOLE} bp")
        return funding

    @field_validator("valid_from", "valid_until", mode="before")
    @classmethod
    def _plain_date(cls, value):
        # "2025-11-30" is a date (through the end of that day), not midnight of a naive time.
        value = time_text(value)
        if isinstance(value, str) and len(value) == 10:
            return dt.date.fromisoformat(value)
        return value

    @field_validator("valid_from", "valid_until")
    @classmethod
    def _aware(cls, value):
        if isinstance(value, dt.datetime) and value.utcoffset() is None:
            raise ValueError("a time needs a UTC offset")
        if not 1900 <= value.year <= 2999:  # the model's own bound (dates compute); new ones: span_problems
            raise ValueError("a date must be 2000-01-01T00:00:00+09:00 to 2099-12-31")
        return value

    @model_validator(mode="after")
    def _window(self) -> "GrantProgramDocument":
        if self.valid_until_us <= self.valid_from_us:
            raise ValueError("valid_until must be after valid_from")
        if self.remainder_to is not None and self.remainder_to not in self.funding:
            raise ValueError("remainder_to must be one of the funders")
        if isinstance(self.unspent, UnspentReturn) and self.unspent.return_to not in self.funding:
            raise ValueError("unspent return_to must be one of the funders")
        return self

    @property
    def valid_from_us(self) -> int:
        v = self.valid_from
        return to_us(v) if isinstance(v, dt.datetime) else local_midnight_us(v)

    @property
    def valid_until_us(self) -> int:
        v = self.valid_until
        return to_us(v) if isinstance(v, dt.datetime) else local_midnight_us(v + dt.timedelta(days=1))

    def text_problems(self) -> list[str]:
        return text_problems([("name", self.name, True), ("description", self.description, False)])

    def span_problems(self) -> list[str]:
        """Dates outside the book's span (2000–2099). Checked when a program is created, not
        by the model: a program stored by a release without the check (valid until
        2100-12-31, say) must still load, or its members could not pay at all."""
        problems = []
        for name in ("valid_from", "valid_until"):
            try:
                in_span(getattr(self, name))
            except ValueError as error:
                problems.append(f"{name}: {error}")
        return problems

    def amount_problems(self) -> list[str]:
        """Amount rules that can give one recipient more than a disbursement may be (a
        per-unit amount at up to 10,000 units, with every add-on), and per-unit rules whose
        `unit` is no whole-number attribute (`INT_ATTRIBUTES`): every other attribute is
        text, so such a rule gave no recipient an amount (`unit: district` was approved,
        then each recipient was refused "needs a whole number 'district'"); also two rules
        of one id, and household sizes no household has. Checked when a program is
        created, not by the model: a program stored before the check must still load."""
        rules = self.amount_rules
        if rules is None:
            return []
        problems = [f"amount rule {rule.id!r}: unit {rule.unit!r} is not a whole-number attribute "
                    f"({', '.join(INT_ATTRIBUTES)}), so the rule could give no recipient an amount"
                    for rule in (*rules.base, *rules.add_ons) if rule.unit and rule.unit not in INT_ATTRIBUTES]
        # A rule's id is what the disbursement's `why` and the audit name: two rules of
        # one id could not be told apart there (base and add-ons share one set).
        ids = [rule.id for rule in (*rules.base, *rules.add_ons)]
        problems += [f"amount rule id {rule_id!r} is given {ids.count(rule_id)} times: each rule needs an id of "
                     "its own (a disbursement names the rules that gave its amount)"
                     for rule_id in dict.fromkeys(ids) if ids.count(rule_id) > 1]
        # Household sizes a recipient can have (check_attributes): below 0, a minimum held
        # for every household and a listed size for none, which reads as a typo, not a rule.
        problems += [f"amount rule {rule.id!r}: when.{name} {value} is not a household size: sizes run from 0 to "
                     f"{ATTRIBUTE_INT_MAX:,}"
                     for rule in (*rules.base, *rules.add_ons)
                     for name, values in (("household_size", rule.when.household_size or ()),
                                          ("household_size_min", (rule.when.household_size_min,)))
                     for value in values if value is not None and not 0 <= value <= ATTRIBUTE_INT_MAX]
        if rules.most() > AMOUNT_WON_MAX:
            problems.append(f"the amount rules can give one recipient up to {rules.most():,} won (a per-unit amount "
                            f"counts up to {ATTRIBUTE_INT_MAX:,} units), more than the {AMOUNT_WON_MAX:,} won a "
                            "disbursement may be")
        return problems

    def match_problems(self) -> list[str]:
        """Condition lists given empty, which hold for nothing (a value must be one of the
        list's): restrictions allowing no merchant (the money disbursed could be spent
        nowhere, and went back to the funders at expiry) and amount rules matching no
        recipient. Checked when a program is created, not by the model, as `amount_problems`."""
        problems = [f"restrictions.{name}: an empty list allows no merchant, so the grant money could be spent "
                    f"nowhere: leave {name} out to allow any, or name at least one"
                    for name in ("categories_include", "merchant_districts") if getattr(self.restrictions, name) == ()]
        rules = self.amount_rules
        if rules is not None:
            problems += [f"amount rule {rule.id!r}: when.{name}: an empty list matches no recipient, so the rule "
                         f"never applies: leave {name} out to match any, or name at least one"
                         for rule in (*rules.base, *rules.add_ons) for name in ("category", "household_size",
                                                                                 "income_status", "district")
                         if getattr(rule.when, name) == ()]
        return problems

    @cached_property
    def attribute_names(self) -> frozenset[str]:
        """The recipient attributes a disbursement may send: those the amount rules read,
        and `district` whichever program (a member's is the registry's: where the rules
        read it, one sent is checked against it; elsewhere it changes nothing). Another
        name is refused, not ignored: `houshold_size` (a typo) was dropped, and the
        household paid the rules' fallback amount."""
        rules = self.amount_rules
        return frozenset({"district", *(rules.attributes_read() if rules is not None else ())})

    def check_attribute_names(self, names, columns: tuple[str, ...] = ()) -> None:
        """An AttributesNotRead naming those of `names` (attributes sent, or a file's header
        with its other `columns`) that are not `attribute_names`, with the ones the rules read."""
        if unread := sorted(set(names) - self.attribute_names - set(columns)):
            read = ", ".join(sorted(self.attribute_names - {"district"})) or "none"
            what = f"{'column' if columns else 'attribute'}{'s' if len(unread) > 1 else ''}"
            named = names_listed([repr(name) for name in unread])
            known = (f"a recipients file's columns are {', '.join(columns)}, district and the attributes they "
                     f"read ({read})" if columns else f"they read {read}, and a member's district may be sent")
            raise AttributesNotRead(f"the program's amount rules do not read the {what} "
                                    f"{named}: {known}; nothing was disbursed")

    def checked_attributes(self, attrs: dict[str, Any]) -> dict[str, Any]:
        """`attrs` when the rules read each (`check_attribute_names`) and each has its
        type (`check_attributes`); else the ValueError that says which."""
        self.check_attribute_names(attrs)
        return check_attributes(attrs)

    @property
    def reads_district(self) -> bool:
        """Whether the amount rules look at the recipient's district (an add-on for
        Ganghwa and Ongjin residents, say)."""
        rules = self.amount_rules
        return rules is not None and any(rule.when.district is not None for rule in (*rules.base, *rules.add_ons))

    def with_registry_district(self, attrs: dict[str, Any], district: str | None,
                               amount: int | None = None) -> dict[str, Any]:
        """The attributes the rules read, the district the member's from the registry
        when the rules read one: a district sent that differs is refused (a resident's
        district is the registry's, not the sender's word). An amount sent with no
        attributes is held to the most the rules give anyone, so nothing is added then."""
        if district is None or not self.reads_district or (amount is not None and not attrs):
            return attrs
        # a district not Incheon's is a bad attribute, not another district
        given = self.checked_attributes(attrs).get("district")
        if given is not None and given != district:
            raise RegistryDistrictMismatch(district_mismatch(district, given))
        return {**attrs, "district": district}

    def disbursement_amount(self, amount: int | None, attrs: dict[str, Any]) -> int:
        """What one recipient is given. With no amount sent, what the program's amount
        rules give for the recipient's attributes. An amount sent (an amount worked out
        elsewhere) is paid, but never more than the rules give: for these attributes when
        they are sent, else for any recipient. The rules are what a second person approved;
        an amount above them was not. A program without rules pays the amount sent. A
        ValueError says why not (AttributesNotRead for an attribute the rules do not read)."""
        self.checked_attributes(attrs)
        rules = self.amount_rules
        if rules is None:
            if amount is None:
                raise ValueError("this program has no amount rules: give the amount")
            return amount
        if amount is None:
            given = rules.amount_for(attrs)
            if not 1 <= given <= AMOUNT_WON_MAX:  # a disbursement's amount, as one sent: 0 was recorded as paid
                none = sorted({f"0 {rule.unit!r}" for rule in (*rules.base, *rules.add_ons)
                               if rule.unit and attrs.get(rule.unit) == 0})
                why = f" ({', '.join(none)})" if given < 1 and none else ""
                raise ValueError(f"the program's amount rules give this recipient {given:,} won{why}; a "
                                 f"disbursement is from 1 to {AMOUNT_WON_MAX:,} won")
            return given
        most, whom = (rules.amount_for(attrs), "this recipient") if attrs else (rules.most(), "any recipient")
        if amount > most:
            raise ValueError(f"{amount:,} won is more than the program's amount rules give {whom} "
                             f"({most:,} won at most)")
        return amount

    def facts(self) -> GrantProgramFacts:
        r = self.restrictions
        return GrantProgramFacts(
            program_id=self.program_id,
            valid_from_us=self.valid_from_us,
            valid_until_us=self.valid_until_us,
            cashback_on_spend=self.cashback_on_spend,
            restrictions=GrantRestrictions(
                merchant_sales_max_won=r.merchant_sales_max_won,
                categories_include=frozenset(r.categories_include) if r.categories_include is not None else None,
                categories_exclude=frozenset(r.categories_exclude) if r.categories_exclude is not None else None,
                merchant_districts=frozenset(r.merchant_districts) if r.merchant_districts is not None else None,
            ),
            funding=tuple(self.funding.items()),
            remainder_to=self.remainder_to,  # named (`_first_funder`)
            once_per_member=self.once_per_member,
            unspent_to=self.unspent.return_to if isinstance(self.unspent, UnspentReturn) else None,
        )


__all__ = ["GrantProgramDocument", "AmountRules", "AmountRule", "RecipientMatch", "Restrictions", "UnspentReturn",
           "SEOUL"]


class AttributesNotRead(ValueError):
    """Attributes sent, or a file's columns, that the amount rules do not read (the API's
    422 `validation_error` for one disbursement, `bad_csv` for a file)."""


class RegistryDistrictMismatch(ValueError):
    """A district sent for a member that is not the registry's (the API's 422 `district_mismatch`)."""


def district_mismatch(registry: str, given: str) -> str:
    """Why a district sent for a member is refused (one path or in bulk)."""
    return f"the member lives in {registry!r} by the registry, not {given!r}"
