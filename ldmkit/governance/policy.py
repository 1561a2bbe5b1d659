"""Content policy on prompts: rules of blocked terms and patterns from a policy.toml, matched after normalisation.

A rule refuses a prompt when one of its terms appears as whole words, or one of its patterns matches, in any of
the prompt's normal forms:
- NFKC with case folding, zero-width and other invisible characters removed, look-alike letters of other scripts
  (Cyrillic "а", Greek "ο", ...) mapped to the Latin letters they imitate, and every run of other characters
  turned into one space;
- the same with the usual digit and symbol stand-ins read as letters ("n4k3d" -> "naked", "$" -> "s");
and a term may also be spelled out letter by letter ("n u d e", "a n.u.d.e portrait"): runs of single characters
are joined and searched for the term. Otherwise terms match whole words only, so a term never fires inside a
longer word ("ass" does not refuse "class").

The same Policy serves `ldmkit serve` (400 with the rule id, recorded in the audit trail), `ldmkit generate --policy`
and `ldmkit policy check`.
"""

from __future__ import annotations

import re
import tomllib
import unicodedata
from dataclasses import dataclass, fields
from pathlib import Path

from ..errors import ConfigError, InputError, MissingFileError
from .safety import SafetySettings

SCREEN_ACTIONS = ("flag", "withhold", "blur")  # what happens to an output too close to a training image


@dataclass(frozen=True)
class SimilaritySettings:
    """A policy's [similarity] table: screening outputs against the model's training-data index."""

    threshold: float | None = None  # similarity at or above which an output counts as a copy; None: the index's own
    action: str = "flag"  # flag: shown, recorded; withhold: refused; blur: a blurred stand-in is shown

    def __post_init__(self):
        if self.threshold is not None and (
            not isinstance(self.threshold, (int, float)) or not 0.0 < self.threshold <= 1.0
        ):
            raise ConfigError(f"[similarity] threshold = {self.threshold!r} must be a number above 0 and at most 1")
        if self.action not in SCREEN_ACTIONS:
            raise ConfigError(f"[similarity] action = {self.action!r} must be one of: {', '.join(SCREEN_ACTIONS)}")


@dataclass(frozen=True)
class ProvenanceSettings:
    """A policy's [provenance] table."""

    watermark: bool = True  # hide the request id in every output's pixels (ldmkit provenance reads it back)

    def __post_init__(self):
        if not isinstance(self.watermark, bool):
            raise ConfigError(f"[provenance] watermark = {self.watermark!r} must be true or false")


INVISIBLE = dict.fromkeys(
    map(
        ord,
        "\u00ad\u034f\u061c\u115f\u1160\u17b4\u17b5\u180e\u200b\u200c\u200d\u200e\u200f\u2060\u2061\u2062\u2063\u2064\ufeff",
    ),
    None,
)
CONFUSABLE = str.maketrans(  # letters of other scripts that look like Latin ones, after case folding
    "аеорсуххіјѕԁԛԝɡαβεικνορτυχ",
    "aeopcyxxijsdqwgabeikvoptux",
)
STAND_INS = str.maketrans({"0": "o", "1": "i", "3": "e", "4": "a", "5": "s", "7": "t", "@": "a", "$": "s", "!": "i"})
RULE_KEYS = {"id", "terms", "patterns", "roles", "message"}


def _words(text: str) -> str:
    """Lower-case letters and digits, every run of anything else one space, padded with spaces."""
    return " " + " ".join(re.findall(r"[^\W_]+", text)) + " "


def _base(text: str) -> str:
    base = unicodedata.normalize("NFKC", text).translate(INVISIBLE).casefold()
    return unicodedata.normalize("NFKC", base).translate(CONFUSABLE)


def normal_forms(text: str) -> list[str]:
    """The forms of `text` that rules are matched against (see the module docstring), each ' word word ... '."""
    base = _base(text)
    return list(dict.fromkeys([_words(base), _words(base.translate(STAND_INS))]))


def spelled_runs(text: str) -> list[str]:
    """Runs of three or more single characters, joined ("a n.u.d.e portrait" -> ["anude"]): a term spelled out
    letter by letter is looked for inside them, since where the spelled word starts is not known."""
    out = []
    for form in normal_forms(text):
        out += [m.group(0).replace(" ", "") for m in re.finditer(r"(?<= )(?:\w ){2,}\w(?= )", form)]
    return out


@dataclass(frozen=True)
class Rule:
    id: str
    message: str
    terms: tuple[str, ...] = ()  # words or phrases refused as whole words
    patterns: tuple[re.Pattern, ...] = ()  # regular expressions searched in the normal forms
    roles: tuple[str, ...] = ()  # the key roles the rule applies to; () = every role

    def matches(self, forms: list[str], runs: list[str] = ()) -> bool:
        """Whether a term is a whole word of a form or spelled out inside a run, or a pattern matches a form."""
        terms = self._terms
        return (
            any(f" {t} " in form for form in forms for t in terms)
            or any(t.replace(" ", "") in run for run in runs for t in terms)
            or any(p.search(form) for form in forms for p in self.patterns)
        )

    @property
    def _terms(self) -> list[str]:
        return [_words(t).strip() for t in self.terms]


@dataclass(frozen=True)
class Decision:
    allowed: bool
    rule: str | None = None  # the id of the refusing rule
    message: str = ""


class PolicyRefusal(InputError):
    """A prompt that a policy rule refuses; `.rule` is the rule's id, `.prompt` the prompt."""

    def __init__(self, message: str, rule: str, prompt: str = ""):
        super().__init__(message)
        self.rule, self.prompt = rule, prompt


@dataclass(frozen=True)
class Policy:
    rules: tuple[Rule, ...] = ()
    source: str = ""  # the file it was read from
    safety: SafetySettings | None = None  # the output filter's settings ([safety]); None: no output filter
    similarity: SimilaritySettings | None = None  # [similarity]; None: outputs are not compared with training data
    provenance: ProvenanceSettings | None = None  # [provenance]; None: the command's own default

    def check(self, prompt: str, role: str | None = None) -> Decision:
        """Whether `prompt` may be generated for a key of `role` (None: every rule applies)."""
        forms, runs = normal_forms(prompt), spelled_runs(prompt)
        for rule in self.rules:
            if rule.roles and role is not None and role not in rule.roles:
                continue
            if rule.matches(forms, runs):
                return Decision(False, rule.id, rule.message)
        return Decision(True)

    def enforce(self, prompts, role: str | None = None) -> None:
        """PolicyRefusal for the first of `prompts` that a rule refuses (naming the rule and its message)."""
        for prompt in dict.fromkeys(prompts):
            d = self.check(prompt, role)
            if not d.allowed:
                shown = prompt if len(prompt) <= 60 else prompt[:57] + "..."
                raise PolicyRefusal(
                    f"the prompt {shown!r} is refused by policy rule {d.rule!r}: {d.message}", d.rule, prompt
                )


def _line_of_rule(text: str, index: int) -> int:
    """The line number of the index-th [[rule]] table in `text` (1-based), for error messages."""
    lines = [i + 1 for i, ln in enumerate(text.splitlines()) if ln.strip().startswith("[[rule]]")]
    return lines[index] if index < len(lines) else 1


def _rule(raw, where: str) -> Rule:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: a rule must be a [[rule]] table")
    unknown = set(raw) - RULE_KEYS
    if unknown:
        raise ConfigError(f"{where}: unknown key {sorted(unknown)[0]!r}; a rule has {', '.join(sorted(RULE_KEYS))}")
    rule_id, message = raw.get("id"), raw.get("message")
    if not isinstance(rule_id, str) or not rule_id.strip():
        raise ConfigError(f'{where}: the rule has no id; give it id = "a-short-name"')
    if not isinstance(message, str) or not message.strip():
        raise ConfigError(f"{where}: rule {rule_id!r} has no message; say what the user may not ask for")
    lists = {}
    for key in ("terms", "patterns", "roles"):
        value = raw.get(key, [])
        if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
            raise ConfigError(f"{where}: rule {rule_id!r}: {key} must be a list of non-empty strings")
        lists[key] = tuple(value)
    if not lists["terms"] and not lists["patterns"]:
        raise ConfigError(f"{where}: rule {rule_id!r} has neither terms nor patterns, so it can never refuse")
    bad_roles = set(lists["roles"]) - {"viewer", "user", "admin"}
    if bad_roles:
        raise ConfigError(f"{where}: rule {rule_id!r}: role {sorted(bad_roles)[0]!r} is not viewer, user or admin")
    patterns = []
    for p in lists["patterns"]:
        try:
            patterns.append(re.compile(p))
        except re.error as e:
            raise ConfigError(f"{where}: rule {rule_id!r}: pattern {p!r} is not a regular expression ({e})") from None
    return Rule(rule_id, message, lists["terms"], tuple(patterns), lists["roles"])


def load_policy(path: str | Path) -> Policy:
    """The policy in `path`; a missing file, bad TOML or a bad rule is an error naming the file and line."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"policy file {path} does not exist; write one with [[rule]] tables (see the README)")
    text = path.read_text(encoding="utf-8", errors="replace")
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML ({e})") from None
    unknown = set(data) - {"rule", *TABLES}
    if unknown:
        raise ConfigError(
            f"{path}: unknown table or key {sorted(unknown)[0]!r}; a policy holds [[rule]] tables and "
            "[safety], [similarity] and [provenance] tables"
        )
    tables = {name: _table(data, name, path) for name in TABLES}
    raws = data.get("rule", [])
    if not isinstance(raws, list):
        raise ConfigError(f"{path}: write each rule as a [[rule]] table")
    rules = [_rule(raw, f"{path}, line {_line_of_rule(text, i)}") for i, raw in enumerate(raws)]
    ids = [r.id for r in rules]
    for i, rid in enumerate(ids):
        if rid in ids[:i]:
            raise ConfigError(f"{path}, line {_line_of_rule(text, i)}: rule id {rid!r} is used twice; ids must differ")
    return Policy(tuple(rules), str(path), **tables)


TABLES = {  # the settings tables of a policy: name -> (settings class, what its keys take)
    "safety": (SafetySettings, "threshold (0 to 1) and action (withhold or blur)"),
    "similarity": (SimilaritySettings, "threshold (0 to 1; default: the index's) and action (flag, withhold or blur)"),
    "provenance": (ProvenanceSettings, "watermark (true or false)"),
}


def _table(data: dict, name: str, path: Path):
    """The settings of the policy's [name] table, or None when it has none; errors name the file and the table."""
    raw = data.get(name)
    if raw is None:
        return None
    cls, takes = TABLES[name]
    if not isinstance(raw, dict) or set(raw) - {f.name for f in fields(cls)}:
        raise ConfigError(f"{path}: [{name}] takes {takes}")
    try:
        return cls(**raw)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
