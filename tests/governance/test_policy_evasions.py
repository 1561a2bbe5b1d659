"""Content policy against evasions (issue 27, items 10-13): invisible and combining characters, look-alikes from
Unicode's confusables data, stand-ins, elongation, split and spelled-out words, dead patterns, inflections, and the
false positives that joining letters must not make."""

import string

import pytest

from ldmkit.errors import ConfigError
from ldmkit.governance.policy import load_policy
from ldmkit.governance.textforms import Forms, clean, spelled_runs

PATTERN = "\\\\bdismember(ed|ing|ment)?\\\\b"


def _policy(tmp_path, terms, patterns=()):
    path = tmp_path / "policy.toml"
    quoted = lambda xs: "[" + ", ".join(f'"{x}"' for x in xs) + "]"  # noqa: E731
    path.write_text(f'[[rule]]\nid = "gore"\nterms = {quoted(terms)}\npatterns = {quoted(patterns)}\nmessage = "m"\n')
    return load_policy(path)


@pytest.fixture
def gore(tmp_path):
    return _policy(tmp_path, ["gore"], [PATTERN])


@pytest.mark.parametrize(
    "prompt",
    [
        "g\ufe0fore",  # variation selector inside the word
        "go\u202ere",  # right-to-left override
        "g\u0301ore",  # combining acute
        "go\u0332re scene",  # combining low line
        "go\u0433e",  # Cyrillic ghe for r
        "\u050dore",  # Cyrillic komi sje for g
        "g\u0585re",  # Armenian oh for o
        "\u0262\u1d0f\u0280\u1d07",  # small capitals
        "6ore",
        "9ore",
        "gooore",
        "ggoorree",
        "go re",
        "d i s m e m b e r e d",
        "a d-i-s-m-e-m-b-e-r-i-n-g scene",
    ],
)
def test_evasions_are_refused(gore, prompt):
    assert not gore.check(prompt).allowed, Forms.of(prompt)


@pytest.mark.parametrize(
    "prompt",
    ["e.g. o r e mining", "i.e. o r e", "category", "Georgia", "go rest", "ego rent", "a gorgeous gorilla", "goes"],
)
def test_joining_and_elongation_make_no_false_positive(gore, prompt):
    assert gore.check(prompt).allowed


def test_split_words_join_for_terms_but_not_for_patterns(tmp_path):
    assert not _policy(tmp_path, ["dismembered"]).check("dis membered").allowed
    assert _policy(tmp_path, [], [PATTERN]).check("dis membered").allowed  # a term two words spell: a pattern


def test_elongation_never_shortens_a_term(tmp_path):
    policy = _policy(tmp_path, ["ass"])
    assert policy.check("asss").rule == "gore" and policy.check("a-s-s-s-s").rule == "gore"
    assert policy.check("as red as a rose").allowed and policy.check("class").allowed


def test_prefix_terms_are_opt_in(tmp_path, gore):
    assert gore.check("gores").allowed  # a plain term is a whole word
    star = _policy(tmp_path, ["gore*"])
    for word in ("gores", "gory", "gorier", "gorefest", "gored", "goring", "GOOORY"):
        assert star.check(f"a {word} scene").rule == "gore", word
    for word in ("category", "Georgia", "gorgeous", "gorilla", "algore", "gorp"):
        assert star.check(f"a {word} scene").allowed, word


@pytest.mark.parametrize("term", ["go*re", "*", "\u200b"])
def test_a_malformed_term_is_refused_at_load(tmp_path, term):
    with pytest.raises(ConfigError, match="must hold letters or digits, with at most a final"):
        _policy(tmp_path, [term])


@pytest.mark.parametrize(
    "pattern, prompt",
    [("Dismember", "dismember him"), ("gore-fest", "a GORE-FEST poster"), ("g\\\\.o\\\\.r\\\\.e", "G.O.R.E")],
)
def test_patterns_written_with_case_or_punctuation_match(tmp_path, pattern, prompt):
    policy = _policy(tmp_path, [], [pattern])
    assert policy.check(prompt).rule == "gore" and policy.check("a red apple").allowed


@pytest.mark.parametrize("pattern, says", [("nud\u00e9", "'é' never reaches patterns"), ("go\u0433e", "write 'r'")])
def test_a_pattern_that_can_never_match_is_refused_at_load(tmp_path, pattern, says):
    with pytest.raises(ConfigError, match=says):
        _policy(tmp_path, [], [pattern])


def test_ascii_is_only_case_folded_and_look_alikes_become_latin():
    printable = string.printable
    assert clean(printable) == printable.lower()
    assert clean("\u0430\u0435\u043e\u0440\u0441") == "aeopc"  # Cyrillic a e o p c
    assert clean("\uff47\u1d52re") == "gore"  # full-width g, superscript o


def test_spelled_runs_keep_one_separator_and_stop_at_abbreviations():
    assert spelled_runs("a n.u.d.e portrait") == ["nude"]
    assert spelled_runs("e.g. o r e") == ["ore"]
    assert spelled_runs("x y z, a-b-c") == ["xyz", "abc"]
    assert spelled_runs("a b") == [] and spelled_runs("ab cd ef") == []
