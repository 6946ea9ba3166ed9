"""Writes ledger/confusables.py's TABLE and PUNCTUATION: Unicode's confusable prototypes
(UTS #39, confusables.txt, as ICU's SpoofChecker applies them) for the letters of the
scripts whose letters are confused with one another in people's names, Latin, Greek and
Cyrillic, and for the digits that read as letters (TABLE); and for every character that
reads as the punctuation names are written with, a hyphen, an apostrophe, a full stop or
a comma (PUNCTUATION: "Min‐jun" with U+2010 HYPHEN reads "Min-jun"). Needs PyICU (`pip
install pyicu`, built against the system's ICU); the service does not: it reads the
tables written here.

    .venv/bin/python scripts/confusables_table.py > /tmp/table.py   # then paste it over both
"""

from __future__ import annotations

import unicodedata

import icu

SCRIPTS = ("LATIN", "GREEK", "CYRILLIC")
NAME_PUNCTUATION = ("-", "'", ".", ",")


def script(c: str) -> str | None:
    name = unicodedata.name(c, "")
    return next((s for s in SCRIPTS if name.startswith(s + " ")), None)


def ours(c: str) -> bool:
    return script(c) is not None or c.isdigit() and c.isascii()


def entry(c: str, prototype: str) -> str:
    source = c.encode("unicode_escape").decode()
    target = "".join(p if p.isascii() else p.encode("unicode_escape").decode() for p in prototype)
    names = " + ".join(unicodedata.name(p, f"U+{ord(p):04X}") for p in prototype)
    return f'    "{source}": "{target}",  # {unicodedata.name(c)} -> {names}'


def folded(c: str) -> bool:
    """Changed before the tables are read (NFKC, then NFD)."""
    return unicodedata.normalize("NFKC", c) != c or unicodedata.normalize("NFD", c) != c


def main() -> None:
    checker = icu.SpoofChecker()
    print(f"# Unicode {icu.UNICODE_VERSION}, ICU {icu.ICU_VERSION}")
    print("TABLE = {")
    for code in range(0x30000):
        c = chr(code)
        if not (unicodedata.category(c).startswith("L") or c.isdigit()) or not ours(c) or folded(c):
            continue
        prototype = checker.getSkeleton(0, c)
        if prototype == c or not all(ours(p) or unicodedata.category(p).startswith("M") for p in prototype):
            continue  # its own prototype, or one outside these scripts (an apostrophe, Lisu, Deseret)
        print(entry(c, prototype))
    print("}")
    print()
    print("PUNCTUATION = {")
    for code in range(0x30000):
        c = chr(code)
        if c in NAME_PUNCTUATION or unicodedata.category(c) in ("Cn", "Cs", "Co") or folded(c):
            continue
        if (prototype := checker.getSkeleton(0, c)) in NAME_PUNCTUATION:
            print(entry(c, prototype))
    print("}")


if __name__ == "__main__":
    main()
