"""Writes ledger/confusables.py's TABLE: Unicode's confusable prototypes (UTS #39,
confusables.txt, as ICU's SpoofChecker applies them) for the letters of the scripts
whose letters are confused with one another in people's names, Latin, Greek and
Cyrillic, and for the digits that read as letters. Needs PyICU (`pip install pyicu`,
built against the system's ICU); the service does not: it reads the table written here.

    .venv/bin/python scripts/confusables_table.py > /tmp/table.py   # then paste it over TABLE
"""

from __future__ import annotations

import unicodedata

import icu

SCRIPTS = ("LATIN", "GREEK", "CYRILLIC")


def script(c: str) -> str | None:
    name = unicodedata.name(c, "")
    return next((s for s in SCRIPTS if name.startswith(s + " ")), None)


def ours(c: str) -> bool:
    return script(c) is not None or c.isdigit() and c.isascii()


def main() -> None:
    checker = icu.SpoofChecker()
    print(f"# Unicode {icu.UNICODE_VERSION}, ICU {icu.ICU_VERSION}")
    print("TABLE = {")
    for code in range(0x30000):
        c = chr(code)
        if not (unicodedata.category(c).startswith("L") or c.isdigit()) or not ours(c):
            continue
        if unicodedata.normalize("NFKC", c) != c or unicodedata.normalize("NFD", c) != c:
            continue  # folded before the table is read (NFKC, then NFD)
        prototype = checker.getSkeleton(0, c)
        if prototype == c or not all(ours(p) or unicodedata.category(p).startswith("M") for p in prototype):
            continue  # its own prototype, or one outside these scripts (an apostrophe, Lisu, Deseret)
        source = c.encode("unicode_escape").decode()
        target = "".join(p if p.isascii() else p.encode("unicode_escape").decode() for p in prototype)
        names = " + ".join(unicodedata.name(p, f"U+{ord(p):04X}") for p in prototype)
        print(f'    "{source}": "{target}",  # {unicodedata.name(c)} -> {names}')
    print("}")


if __name__ == "__main__":
    main()
