"""Content policy on prompts: rules of blocked terms and patterns from a policy.toml, matched after normalisation.

A rule refuses a prompt when one of its terms or patterns matches one of the prompt's forms (`textforms`): the
text case folded, with invisible characters and combining marks dropped and look-alike letters of other scripts
read as the Latin letters they imitate (Unicode's confusables data), with and without digit and symbol stand-ins
("n4k3d", "6ore"), and with letters spelled out one by one ("n u d e", "n.u.d.e") or a word split in two ("go re")
joined. Terms match whole words, so a term never fires inside a longer word ("ass" does not refuse "class"), but
a word with letters repeated ("gooore") still matches; a term ending in "*" matches every word that starts with
it ("gore*": "gores", "gorefest", and for a stem ending in "e" also "gory", "goring"). Patterns are regular
expressions searched case-insensitively in the word form (" a red apple "), in the text with its punctuation
kept, and in spelled-out letters joined (not in split words joined, so a term that two ordinary words spell,
"an al", can be written as a pattern instead); a pattern that names a character no form can hold is refused at load.

The same Policy serves `ldmkit serve` (400 with the rule id, recorded in the audit trail), `ldmkit generate --policy`
and `ldmkit policy check`.
"""

from __future__ import annotations

import functools
import re
import re._constants as re_constants  # re's own parser: the literal characters a pattern needs
import re._parser as re_parser
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path

from ..errors import ConfigError, InputError, MissingFileError
from .safety import SafetySettings
from .textforms import Forms, TermMatcher, clean

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


RULE_KEYS = {"id", "terms", "patterns", "roles", "message"}


@dataclass(frozen=True)
class Rule:
    id: str
    message: str
    terms: tuple[str, ...] = ()  # words or phrases refused as whole words; "word*": every word that starts so
    patterns: tuple[re.Pattern, ...] = ()  # regular expressions, case-insensitive, searched in every form
    roles: tuple[str, ...] = ()  # the key roles the rule applies to; () = every role

    def matches(self, forms: Forms) -> bool:
        """Whether a term matches (see TermMatcher) or a pattern is found in a form or in spelled-out letters."""
        return (
            any(t.matches(forms) for t in self._matchers)
            or any(p.search(f) for p in self.patterns for f in (*forms.words, *forms.plain))
            or any(p.search(f" {r} ") for p in self.patterns for r in forms.runs)
        )

    @functools.cached_property
    def _matchers(self) -> tuple[TermMatcher, ...]:
        return tuple(TermMatcher.of(t) for t in self.terms)


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
        forms = Forms.of(prompt)
        for rule in self.rules:
            if rule.roles and role is not None and role not in rule.roles:
                continue
            if rule.matches(forms):
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
    for t in lists["terms"]:
        if "*" in t.rstrip()[:-1] or not clean(t.rstrip().removesuffix("*")).strip():
            raise ConfigError(
                f"{where}: rule {rule_id!r}: term {t!r} must hold letters or digits, with at most a final * "
                '(as in "gore*", every word that starts with gore)'
            )
    patterns = []
    for p in lists["patterns"]:
        try:
            patterns.append(re.compile(p, re.IGNORECASE))
        except re.error as e:
            raise ConfigError(f"{where}: rule {rule_id!r}: pattern {p!r} is not a regular expression ({e})") from None
        unseen = [c for c in _literals(re_parser.parse(p, re.IGNORECASE)) if clean(c) != c.lower() or c in "\t\n\r"]
        if unseen:
            c = unseen[0]
            raise ConfigError(
                f"{where}: rule {rule_id!r}: pattern {p!r} can never match: {c!r} never reaches patterns, which see "
                "the prompt case folded, one space for any white space, accents and invisible characters removed "
                f"and look-alike letters read as Latin ones; write {clean(c).strip() or 'nothing'!r} in its place"
            )
    return Rule(rule_id, message, lists["terms"], tuple(patterns), lists["roles"])


def _literals(parsed) -> list[str]:
    """The literal characters of a parsed regular expression (re's own parser), sets included, at any depth."""
    out = []
    for op, av in parsed:
        if op is re_constants.LITERAL:
            out.append(chr(av))
        elif op is re_constants.IN:
            out += [chr(a) for o, a in av if o is re_constants.LITERAL]
        elif op is not re_constants.NOT_LITERAL:
            for part in av if isinstance(av, (tuple, list)) else (av,):
                for sub in part if isinstance(part, list) else (part,):
                    if isinstance(sub, re_parser.SubPattern):
                        out += _literals(sub)
    return out


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
