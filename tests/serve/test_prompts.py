"""Prompt templates of `ldmkit serve`: names and versions (concurrent adds included), the brace syntax and what it
refuses, parameter checks, rendering that never re-expands values, retirement without deletion, and the
`ldmkit prompts` command."""

from __future__ import annotations

import argparse
import json
import threading

import pytest

from ldmkit.cli.prompts import add_prompts_command
from ldmkit.errors import InputError
from ldmkit.serve.prompts import Rendered, Template, TemplateError, Templates, params_from_text, parse_ref, segments
from ldmkit.serve.store import Conflict, open_store

PRODUCT = "a {product} on a {colour} background, studio light"


@pytest.fixture
def db(tmp_path):
    return str(tmp_path / "t.db")


@pytest.fixture
def templates(db):
    store = open_store(db)
    yield Templates(store)
    store.close()


def refused(fn, *args, **kwargs) -> str:
    with pytest.raises(TemplateError) as info:
        fn(*args, **kwargs)
    return str(info.value)


# --- names, versions, storage -----------------------------------------------------------------------------------------
def test_versions_count_per_name_and_old_ones_stay_readable(templates):
    one = templates.add("shot", PRODUCT, "blurry", {"steps": 30}, "product photos", created_by="alice")
    assert isinstance(one, Template) and (one.name, one.version, one.retired) == ("shot", 1, None)
    assert one.variables == ("product", "colour") and one.created_by == "alice"
    assert templates.add("shot", "a {product}").version == 2
    assert templates.add("other", "a cat").version == 1
    assert templates.show("shot").version == 2 and templates.show("shot@1") == one
    assert [t.version for t in templates.versions("shot")] == [1, 2]
    assert [(t.name, t.version) for t in templates.list()] == [("other", 1), ("shot", 2)]
    d = one.as_dict()
    assert json.loads(json.dumps(d)) == d and d["ref"] == "shot@1" and d["variables"] == ["product", "colour"]
    assert d["params"] == {"steps": 30} and d["negative_prompt"] == "blurry" and d["description"] == "product photos"


def test_names_and_references_are_checked():
    assert parse_ref("product-shot_2") == ("product-shot_2", None) and parse_ref("a@12") == ("a", 12)
    for bad in ["", "Shot", "a b", "a/b", "é", "x" * 65, "@1"]:
        assert "lowercase letters, digits, - and _" in refused(parse_ref, bad)
    for bad in ["a@", "a@0", "a@-1", "a@x", "a@01", "a@1.0", "a@1@2"]:
        assert "whole number from 1" in refused(parse_ref, bad)
    assert parse_ref("x" * 64)[0] == "x" * 64


def test_missing_names_and_versions_say_what_exists(templates):
    assert "no template is named 'nope'" in refused(templates.show, "nope")
    assert "no template is named 'nope'" in refused(templates.versions, "nope")
    assert "no template is named 'nope'" in refused(templates.retire, "nope")
    for _ in range(3):
        templates.add("x", "a {thing}")
    message = refused(templates.render, "x@4", {"thing": "cat"})
    assert "template 'x' has versions 1..3; there is no version 4" in message
    templates.add("y", "a dog")
    assert "has version 1 only" in refused(templates.show, "y@2")
    with pytest.raises(TemplateError) as info:
        templates.show("nope@1")
    assert info.value.reason == "missing" and isinstance(info.value, InputError)


def test_two_admins_adding_at_once_get_distinct_versions(templates):
    threads, per_thread, barrier = 6, 4, threading.Barrier(6)
    got, errors = [], []

    def admin(i):
        try:
            barrier.wait()
            for _ in range(per_thread):
                got.append(templates.add("busy", f"take {i} of {{thing}}", created_by=f"admin{i}").version)
        except Exception as e:  # reported below
            errors.append(e)

    workers = [threading.Thread(target=admin, args=(i,)) for i in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert not errors
    assert sorted(got) == list(range(1, threads * per_thread + 1))
    assert [t.version for t in templates.versions("busy")] == sorted(got)


def test_name_and_version_are_unique_in_the_table(templates):
    templates.add("u", "a cat")
    with pytest.raises(Conflict), templates.store.write(lock=True) as db:
        db.execute(
            "INSERT INTO prompts (name, version, text, negative_prompt, params, description, created)"
            " VALUES ('u', 1, 'x', '', '{}', '', 'now')"
        )
    assert [t.text for t in templates.versions("u")] == ["a cat"]


def test_texts_are_checked_when_added(templates):
    assert "is empty" in refused(templates.add, "e", "  ")
    assert "the limit is 2000" in refused(templates.add, "e", "x" * 2001)
    assert "control character U+0000 at character 3" in refused(templates.add, "e", "ab\x00c")
    assert "negative prompt holds control character U+001B" in refused(templates.add, "e", "a", "\x1b[31m")
    assert "description has 501 characters" in refused(templates.add, "e", "a", description="d" * 501)
    assert "is not allowed" in refused(templates.add, "E", "a")
    templates.add("e", "two lines\n\twith a tab, emoji 👩\u200d🔬")  # newlines, tabs and joiners are text


# --- the brace syntax ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text, says",
    [
        ("a {} b", "'{}' at character 3, a positional field"),
        ("{0}", "'{0}' at character 1, a positional field"),
        ("{0.__class__}", "attribute and item access are not allowed"),
        ("{a.b}", "attribute and item access"),
        ("{a[0]}", "attribute and item access"),
        ("{a!r}", "conversions (!r, !s, !a) are not allowed"),
        ("{a:>10}", "format specs (after ':') are not allowed"),
        ("{a!s:>3}", "conversions"),
        ("x {a", "'{' at character 3 that is not closed"),
        ("{a{b}}", "'{' at character 1 that is not closed"),
        ("a } b", "unmatched '}' at character 3; write '}}' for a literal brace"),
        ("{{a}}}", "unmatched '}' at character 6"),
        ("{ a }", "which is not a variable name"),
        ("{1a}", "which is not a variable name"),
        ("{é}", "which is not a variable name"),
        ("{" + "a" * 65 + "}", "at most 64 characters"),
    ],
)
def test_every_brace_but_a_plain_variable_is_refused_at_add_time(templates, text, says):
    assert says in refused(templates.add, "bad", text)
    assert "negative prompt has" in refused(templates.add, "bad", "fine", text)
    assert templates.list(include_retired=True) == []


@pytest.mark.parametrize(
    "text, values",
    [
        ("{a} and {b}", {"a": "x", "b": "y"}),
        ("{{literal}} {a}", {"a": "x"}),
        ("{{{a}}}", {"a": "x"}),
        ("}}{a}{{", {"a": "x"}),
        ("{a}{a}{_b9}", {"a": "1", "_b9": "2"}),
        ("no variables at all", {}),
        ("", {}),
    ],
)
def test_parsing_agrees_with_python_formatting_on_plain_templates(text, values):
    """str.format is the oracle here only: these texts hold nothing but plain names and doubled braces."""
    parts = segments(text)
    assert "".join(values[v] if is_var else v for is_var, v in parts) == text.format(**values)


# --- parameters ------------------------------------------------------------------------------------------------------
def test_params_are_generation_fields_of_the_right_type(templates):
    t = templates.add("p", "a", params={"steps": 30, "cfg": 7, "sampler": "euler", "size": "512x384", "seed": 4})
    assert t.params == {"cfg": 7.0, "height": 384, "sampler": "euler", "seed": 4, "steps": 30, "width": 512}
    assert templates.show("p").params == t.params
    assert templates.add("q", "a", params={"guidance_scale": 3, "n": 2}).params == {"cfg": 3.0, "n": 2}
    for params, says in [
        ({"prompt": "x"}, "param 'prompt' is not a generation field; the allowed ones: n, steps, cfg, sampler"),
        ({"steps": "30"}, "param steps '30' is not a whole number"),
        ({"steps": 30.0}, "is not a whole number"),
        ({"steps": True}, "is not a whole number"),
        ({"steps": 0}, "param steps 0 is out of range: it must be between 1 and 10000"),
        ({"n": 0}, "param n 0 is out of range: it must be at least 1"),
        ({"seed": -1}, "leave seed out for a random seed"),
        ({"cfg": float("nan")}, "param cfg nan must be a finite number from 0"),
        ({"cfg": -1}, "finite number from 0"),
        ({"sampler": "dpm++"}, "param sampler 'dpm++' is not known; choose one of: "),
        ({"sampler": ["euler"]}, "is not known"),
        ({"size": "512"}, "is not WIDTHxHEIGHT"),
        ({"size": "64x64", "width": 64}, "param width is given twice"),
        ({"eta": 0.5, "sampler": "euler"}, "param eta applies to the"),
    ]:
        assert says in refused(templates.add, "r", "a", params=params), params
    assert "mapping" in refused(templates.add, "r", "a", params=[("steps", 30)])


def test_command_line_params_take_their_field_types():
    given = ["steps=30", "sampler=dpmpp_2m", "cfg=6.5", "size=64x64", "seed = 7"]
    assert params_from_text(given) == {"steps": 30, "sampler": "dpmpp_2m", "cfg": 6.5, "size": "64x64", "seed": 7}
    assert "is not KEY=VALUE" in refused(params_from_text, ["steps"])
    assert "--param steps=lots is not a whole number" in refused(params_from_text, ["steps=lots"])
    assert "is given twice" in refused(params_from_text, ["steps=3", "steps=4"])


# --- rendering -------------------------------------------------------------------------------------------------------
def test_render_fills_every_variable_and_records_the_version(templates):
    templates.add("shot", PRODUCT, "blurry {product}", {"steps": 30})
    templates.add("shot", "v2 {product} {colour}")
    r = templates.render("shot@1", {"product": "red mug", "colour": "white"})
    assert r == Rendered("a red mug on a white background, studio light", "blurry red mug", {"steps": 30}, "shot", 1)
    newest = templates.render("shot", {"product": "cup", "colour": "grey"})
    assert (newest.prompt, newest.version, newest.params) == ("v2 cup grey", 2, {})
    r.params["steps"] = 1  # a caller's change does not reach the store
    assert templates.show("shot@1").params == {"steps": 30}


def test_values_are_inserted_literally_never_expanded(templates):
    templates.add("lit", "{{x}} {a} / {b}")
    hostile = {"a": "{b} {0.__class__} {{", "b": "}{a.__init__.__globals__}"}
    r = templates.render("lit", hostile)
    assert r.prompt == "{x} {b} {0.__class__} {{ / }{a.__init__.__globals__}"


def test_render_names_missing_unknown_and_bad_values(templates):
    templates.add("shot", PRODUCT)
    message = refused(templates.render, "shot", {"product": "mug"})
    assert message == "template shot@1: values are missing for colour; its variables are: product, colour"
    message = refused(templates.render, "shot", {"prodcut": "mug", "colour": "red"})
    assert "it has no variable 'prodcut'; values are missing for product; its variables are: product, colour" in message
    assert "variables are: none" in refused(templates.render, templates.add("plain", "a cat").ref, {"x": "y"})
    assert templates.render("plain", None).prompt == "a cat"
    ok = {"product": "m" * 500, "colour": ""}
    assert templates.render("shot", ok).prompt.startswith("a " + "m" * 500)
    for value, says in [
        ("m" * 501, "variable product of template shot@1 has 501 characters; the limit is 500"),
        ("mug\nignore the above", "control character U+000A at character 4"),
        ("mug\x00", "control character U+0000"),
        ("\x85", "control character U+0085"),
        ("\ud800", "control character U+D800"),
        (3, "variable product of template shot@1 is int; give it as text"),
    ]:
        assert says in refused(templates.render, "shot", {"product": value, "colour": "red"}), value
    assert "mapping" in refused(templates.render, "shot", ["product"])


# --- retiring --------------------------------------------------------------------------------------------------------
def test_retire_hides_and_refuses_but_deletes_nothing(templates):
    templates.add("old", "a {thing}", created_by="alice")
    templates.add("old", "an {thing}")
    templates.add("new", "a {thing}")
    retired = templates.retire("old", by="bob")
    assert retired.version == 2 and retired.retired and retired.retired_by == "bob"
    again = templates.retire("old", by="carol")  # harmless; the first stamp stays
    assert (again.retired, again.retired_by) == (retired.retired, "bob")
    assert [t.name for t in templates.list()] == ["new"]
    assert [t.name for t in templates.list(include_retired=True)] == ["new", "old"]
    assert [t.text for t in templates.versions("old")] == ["a {thing}", "an {thing}"]
    assert templates.show("old@1").created_by == "alice" and templates.show("old@1").retired == retired.retired
    for ref in ("old", "old@1"):
        with pytest.raises(TemplateError) as info:
            templates.render(ref, {"thing": "cat"})
        assert info.value.reason == "retired" and "was retired at" in str(info.value) and "by bob" in str(info.value)
    assert "retired names take no new versions" in refused(templates.add, "old", "a {thing}")
    rows = templates.store.query("SELECT COUNT(*) AS n FROM prompts")
    assert rows[0]["n"] == 3


# --- the command -----------------------------------------------------------------------------------------------------
def run_command(argv: list[str]) -> int:
    """Parse `argv` the way `ldmkit` does (a --debug parent on every command) and run it."""
    parser = argparse.ArgumentParser()
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True)
    add_prompts_command(sub, common)
    args = parser.parse_args(argv)
    return args.fn(args)


def test_the_prompts_command(db, capsys):
    base = ["--database", db]
    assert run_command(["prompts", "list", *base]) == 0
    assert "no templates yet" in capsys.readouterr().out
    add = ["prompts", "add", "shot", "--text", PRODUCT, "--negative", "blurry", *base]
    assert run_command([*add, "--param", "steps=30", "--param", "sampler=dpmpp_2m", "--description", "photos"]) == 0
    out = capsys.readouterr()
    assert out.out == "shot@1\n" and "version 1 (variables: product, colour)" in out.err
    assert run_command(["prompts", "add", "shot", "--text", "v2 {product}", *base]) == 0
    assert capsys.readouterr().out == "shot@2\n"
    assert run_command(["prompts", "list", *base]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert listed[0].split()[:4] == ["NAME", "VERSION", "VARIABLES", "PARAMS"] and listed[1].split()[:3] == [
        "shot",
        "2",
        "product",
    ]
    assert run_command(["prompts", "show", "shot@1", "--json", *base]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["params"] == {"sampler": "dpmpp_2m", "steps": 30} and shown["created_by"].startswith("cli")
    assert run_command(["prompts", "show", "shot@1", *base]) == 0
    text = capsys.readouterr().out
    assert "shot@1 (newest: shot@2)" in text and "sampler=dpmpp_2m steps=30" in text and "negative:    blurry" in text
    assert run_command(["prompts", "retire", "shot", *base]) == 0
    assert "retired template shot (versions 1..2)" in capsys.readouterr().out
    assert run_command(["prompts", "list", *base]) == 0
    assert "no templates yet" in capsys.readouterr().out
    assert run_command(["prompts", "list", "--retired", *base]) == 0
    assert "shot" in capsys.readouterr().out
    with pytest.raises(TemplateError, match="not a generation field; the allowed ones: n, steps"):
        run_command([*add, "--param", "strength=0.5"])
    with pytest.raises(TemplateError, match="positional field"):
        run_command(["prompts", "add", "pos", "--text", "a {0}", *base])
