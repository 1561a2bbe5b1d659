"""The forms of a prompt that content-policy rules are matched against, and the matchers built from rule terms.

Every form starts from `clean(text)`:
- case folded, then NFKD, so full-width letters, ligatures and accented letters come apart;
- every format character (Unicode's Cf: zero-width characters, soft hyphens, bidirectional overrides), every
  combining mark (Mn, Me: accents, the variation selectors U+FE0F and friends, the combining grapheme joiner) and
  the Hangul fillers are dropped;
- every letter of another script that Unicode's confusables data (UTS #39, from the `confusable-homoglyphs`
  package) gives as a look-alike of Latin letters or digits is replaced by them ("г" -> "r", "օ" -> "o"), and so is
  every Latin letter variant named after a basic letter ("ɢ" LATIN LETTER SMALL CAPITAL G -> "g");
- NFKC at the end recomposes what other scripts need.
ASCII text passes through unchanged apart from case, so ordinary English prompts are never rewritten.

From the clean text (and its stand-in reading, "n4k3d" -> "naked", "6ore" -> "gore"):
- `words`: letters and digits, every run of anything else one space, padded with spaces (" a red apple ");
- `plain`: the clean text with its punctuation kept and every run of white space one space, padded;
- `joined`: letters spelled out one by one, joined ("n u d e", "n.u.d.e" -> "nude"): runs of three or more single
  letters with the same separator throughout, never across a dot and a space (the end of an abbreviation, so
  "e.g. o r e" joins only "ore"); and every two adjacent words joined ("go re" -> "gore").
"""

from __future__ import annotations

import functools
import re
import unicodedata
from dataclasses import dataclass

from confusable_homoglyphs import utils as confusables_data

DROPPED = ("Cf", "Mn", "Me")  # format characters and combining marks
HANGUL_FILLERS = frozenset("\u115f\u1160\u3164\uffa0")  # default-ignorable letters (Lo) that show nothing
STAND_INS = str.maketrans(
    {"0": "o", "1": "i", "3": "e", "4": "a", "5": "s", "6": "g", "7": "t", "8": "b", "9": "g"}
    | {"@": "a", "$": "s", "!": "i"}
)
LATIN_NAME = re.compile(r"LATIN (?:SMALL |CAPITAL )?LETTER (?:SMALL CAPITAL |SCRIPT |DOTLESS )?([A-Z])(?: WITH .+)?")
LATIN_BLOCKS = (  # code point ranges holding Latin letter variants without a decomposition
    (0x00C0, 0x02AF),  # Latin-1 letters, Latin Extended-A and -B, IPA extensions
    (0x1D00, 0x1DBF),  # phonetic extensions (small capitals)
    (0x1E00, 0x1EFF),
    (0x2C60, 0x2C7F),
    (0xA720, 0xA7FF),
    (0xAB30, 0xAB6F),
    (0x10780, 0x107BF),
    (0x1DF00, 0x1DFFF),
)
WORD = r"[^\W_]"  # a letter or digit


def _latin_letter(ch: str) -> str | None:
    """The basic Latin letter a Latin letter variant is named after ("ɢ" -> "g"), or None."""
    m = LATIN_NAME.fullmatch(unicodedata.name(ch, ""))
    return m.group(1).lower() if m else None


@functools.cache
def lookalikes() -> dict[int, str]:
    """A str.translate table: non-ASCII character -> the lower-case ASCII letters or digits it imitates.

    Unicode's confusables data pairs each character with its prototype; the package stores the pairs both ways, so
    a non-ASCII character listed beside an ASCII letter or digit string imitates that string. A character paired
    only with a Latin letter variant ("ԍ" with "ɢ") takes the letter that variant is named after."""
    data = confusables_data.load("confusables.json")
    table: dict[int, str] = {}
    for lo, hi in LATIN_BLOCKS:
        for code in range(lo, hi + 1):
            letter = _latin_letter(chr(code))
            if letter:
                table[code] = letter
    for ch, pairs in data.items():
        if len(ch) != 1 or ch.isascii():
            continue
        others = [p["c"] for p in pairs]
        ascii_ = [o.casefold() for o in others if o.isascii() and o.isalnum()]
        if ascii_:
            table[ord(ch)] = ascii_[0]
        elif ord(ch) not in table:
            named = [_latin_letter(o) for o in others if len(o) == 1]
            if any(named):
                table[ord(ch)] = next(n for n in named if n)
    return table


def _drop_invisible(text: str) -> str:
    return "".join(c for c in text if unicodedata.category(c) not in DROPPED and c not in HANGUL_FILLERS)


def clean(text: str) -> str:
    """Case folded, invisible characters and combining marks dropped, look-alikes read as the letters they imitate."""
    text = _drop_invisible(unicodedata.normalize("NFKD", text.casefold()))
    text = text.translate(lookalikes()).casefold()
    return _drop_invisible(unicodedata.normalize("NFKC", text))


def words(text: str) -> str:
    """Letters and digits, every run of anything else one space, padded with spaces."""
    return " " + " ".join(re.findall(rf"{WORD}+", text)) + " "


def plain(text: str) -> str:
    """`text` with every run of white space one space, padded with spaces."""
    return " " + " ".join(text.split()) + " "


def spelled_runs(text: str) -> list[str]:
    """Runs of three or more single letters with one separator throughout, joined ("n.u.d.e" -> "nude"); a dot
    followed by white space ends an abbreviation ("e.g. "), so no run crosses it."""
    parts = re.split(rf"({WORD}+)", text)  # separator, word, separator, word, ..., separator
    tokens, gaps = parts[1::2], parts[2:-1:2]  # gaps[i] lies between tokens[i] and tokens[i + 1]
    runs, run, sep = [], [], None  # the run so far and its separator (None while it has one letter)
    for i, tok in enumerate(tokens):
        gap = gaps[i - 1] if i else ""
        if len(tok) != 1 or not run or re.search(r"\.\s", gap):  # a word, a first letter, an abbreviation's end
            runs.append("".join(run))
            run, sep = ([tok] if len(tok) == 1 else []), None
        elif sep is None or gap == sep:
            run.append(tok)
            sep = gap
        else:  # another separator: a new run starts at the last letter
            runs.append("".join(run))
            run, sep = [run[-1], tok], gap
    runs.append("".join(run))
    return [r for r in runs if len(r) >= 3]


@dataclass(frozen=True)
class Forms:
    """A prompt's forms (see the module docstring), computed once and matched against every rule."""

    words: tuple[str, ...]
    plain: tuple[str, ...]
    runs: tuple[str, ...]  # spelled-out letters, joined
    pairs: tuple[str, ...]  # two adjacent words, joined

    @classmethod
    def of(cls, text: str) -> Forms:
        base = clean(text)
        readings = list(dict.fromkeys([base, base.translate(STAND_INS)]))
        ws = [words(r) for r in readings]
        pairs = [a + b for w in ws for a, b in zip(w.split(), w.split()[1:])]
        runs = [r for reading in readings for r in spelled_runs(reading)]
        return cls(
            tuple(dict.fromkeys(ws)),
            tuple(dict.fromkeys(plain(r) for r in readings)),
            tuple(dict.fromkeys(runs)),
            tuple(dict.fromkeys(pairs)),
        )


INFLECTIONS = ("y", "ier", "iest", "ily", "ies", "ied", "ing")  # endings that replace a final "e" ("gore" -> "gory")


def _stretchable(letters: str) -> str:
    """A regex for `letters` with each run of one letter allowed to be longer ("gore" also "gooore", "ggoorree")."""
    out = []
    for m in re.finditer(r"(.)\1*", letters):
        n = len(m.group(0))
        out.append(re.escape(m.group(1)) + ("+" if n == 1 else f"{{{n},}}"))
    return "".join(out)


@dataclass(frozen=True)
class TermMatcher:
    """One rule term: a word or phrase matched as whole words, or with a final "*" as the start of a word."""

    whole: re.Pattern  # searched in the word forms
    joined: re.Pattern  # searched in spelled-out runs (where the spelled word starts is not known) and matched
    # in full against two adjacent words joined

    @classmethod
    def of(cls, term: str) -> TermMatcher:
        prefix = term.rstrip().endswith("*")
        text = words(clean(term.rstrip().removesuffix("*"))).strip()
        core = " ".join(_stretchable(w) for w in text.split())
        if not prefix:
            whole = f"(?<= ){core}(?= )"
        elif text.endswith("e"):  # "gore*": gores, gorefest, and gory, gorier, goring
            stem = core.removesuffix("e+").removesuffix("e{2,}")
            whole = f"(?<= )(?:{core}|{stem}(?:{'|'.join(INFLECTIONS)})(?= ))"
        else:
            whole = f"(?<= ){core}"
        joined = core.replace(" ", "")
        return cls(re.compile(whole), re.compile(joined))

    def matches(self, forms: Forms) -> bool:
        return (
            any(self.whole.search(f) for f in forms.words)
            or any(self.joined.search(r) for r in forms.runs)
            or any(self.joined.fullmatch(p) for p in forms.pairs)
        )
