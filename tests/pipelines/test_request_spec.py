"""The generation-parameter table (pipelines/request.py) is the one declaration: every surface (the command line's
options, SampleRequest, the three APIs' request bodies and checks, the prompt templates, synth) has each field's
default and bounds from it, and names a refused field as that surface calls it."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from ldmkit.cli import build_parser, main
from ldmkit.config import ServeLimits
from ldmkit.errors import InputError
from ldmkit.pipelines.request import APIS, FIELDS, MAX_STEPS, SPEC, SampleRequest, api_names, taken_by
from ldmkit.serve.prompts import PARAMS, Rendered, TemplateError, check_params, merge
from ldmkit.serve.schemas import A1111_SAMPLERS, FieldError, api_models, parse_size, sample_request
from ldmkit.shipped import resolve_model
from ldmkit.synth.export import SynthOptions
from ldmkit.tasks import task_names

SCHEMAS = {"openai": "OpenAIImageRequest", "a1111": "A1111Request", "native": "JobRequest"}
WIDE = ServeLimits(max_n=256, max_steps=MAX_STEPS, max_side=4096, max_cfg=1e9)  # limits that never bind first
BASE = dict(prompt="", negative_prompt="", n=1, steps=2, cfg=3.0, seed=1, sampler="dpmpp_2m", width=0, height=0)

# Where a default differs from the field's own, on purpose: the number of images and the batch per command, the
# served models' guidance and AUTOMATIC1111's own steps and guidance, and the APIs' random seed. Any other
# difference is a surface that stopped deriving from the table.
EXCEPTIONS = {
    "n": {"generate", "img2img", "inpaint", "outpaint", "upscale", "evaluate", "video", "openai", "native", "a1111"},
    "steps": {"a1111"},
    "cfg": {"openai", "native", "a1111"},
    "seed": {"openai", "native", "a1111"},
    "batch_size": {"inpaint", "outpaint", "upscale", "evaluate", "synth", "video"},
}


def _subparsers() -> dict:
    action = next(a for a in build_parser()._actions if a.dest == "command")
    return action.choices


def _option(parser, flag: str):
    return next(a for a in parser._actions if flag in a.option_strings)


def _schema_field(surface: str, name: str):
    return getattr(api_models(), SCHEMAS[surface]).model_fields[name]


def _refused(fn, *args, **kw) -> Exception:
    with pytest.raises(InputError) as e:
        fn(*args, **kw)
    return e.value


def test_the_declared_differences_are_the_only_ones():
    differing = {p.name: {w for w, v in p.defaults.items() if v != p.default} for p in FIELDS if p.defaults}
    assert {k: v for k, v in differing.items() if v} == EXCEPTIONS


@pytest.mark.parametrize("p", FIELDS, ids=lambda p: p.name)
def test_each_field_has_the_tables_default_and_bounds_on_every_surface(p):
    # SampleRequest, the library's surface
    assert {f.name: f.default for f in dataclasses.fields(SampleRequest)}[p.name] == p.default
    # the command line: every command the table names declares the option with its default, type and bounds
    subs = _subparsers()
    for command in p.commands:
        act = _option(subs[command], p.names["cli"])
        assert act.default == (None if p.kind is list else p.default_for(command)), command
        assert act.type in (p.item, p.kind) or (p.kind is str and act.type is None)
        low, high = p.bounds()
        if low is not None:
            assert (f"at least {low}" if high is None else f"between {low} and {high}") in act.help, (command, act)
    # the three APIs' request bodies
    for surface in APIS:
        name = p.names.get(surface)
        if name is None:
            assert p.name not in {"n", "steps", "cfg", "sampler", "seed", "width", "height", "negative_prompt"}
            continue
        if name == "size":  # OpenAI's one field for width and height: its default is the training resolution
            assert parse_size(_schema_field(surface, "size").default) == (p.default, p.default)
            continue
        field = _schema_field(surface, name)
        if name == "sampler_name":
            assert A1111_SAMPLERS[field.default] == p.default_for(surface)
        else:
            assert field.default == p.default_for(surface), (surface, name)
        bounds = {k: v for k, v in (("minimum", p.low), ("maximum", p.high)) if v is not None}
        assert (field.json_schema_extra or {}) == bounds, (surface, name)
    # the prompt templates and synth
    assert (p.names.get("template") in PARAMS) == ("template" in p.names)
    if "synth" in p.commands:
        assert {f.name: f.default for f in dataclasses.fields(SynthOptions)}[p.name] == p.default_for("synth")
        assert _option(_subparsers()["synth"], p.names["cli"]).default == p.default_for("synth")
    assert set(p.tasks) <= set(task_names())


def _outside(p):
    """(value, why) pairs just outside the field's bounds."""
    out = []
    if p.low is not None:
        out.append(p.low - 1 if p.kind in (int, list) else p.low - 0.5)
    if p.high is not None:
        out.append(p.high + 1 if p.kind is int else p.high + 0.5)
    return out


@pytest.mark.parametrize("p", [p for p in FIELDS if p.low is not None or p.high is not None], ids=lambda p: p.name)
def test_each_surface_refuses_the_same_values_naming_the_field_its_way(p):
    for bad in _outside(p):
        value = [bad] if p.kind is list else bad
        extra = {"sampler": "ddim"} if p.name == "eta" else {}
        # SampleRequest and the command line: the option's name
        err = _refused(SampleRequest, **{p.name: value, **extra})
        assert str(err).startswith(p.names["cli"] + " "), err
        # a template: "param NAME"
        if "template" in p.names:
            err = _refused(check_params, {p.names["template"]: value, **extra})
            assert isinstance(err, TemplateError) and str(err).startswith(f"param {p.names['template']} "), err
        # each API: the field as the client sent it
        for surface in APIS:
            key = p.name if p.name in BASE or p.name == "labels" else None
            if key is None or (surface not in p.names and p.name != "labels"):
                continue
            if p.name == "labels" and surface != "native":
                continue
            names = api_names(surface)
            sent = -2 if p.name == "seed" and value == -1 else value  # -1 asks the APIs for a random seed
            err = _refused(sample_request, BASE | {p.name: sent}, WIDE, names=names)
            assert isinstance(err, FieldError) and err.field == p.names[surface], (surface, err)
    # the bounds themselves are taken everywhere
    for ok in (p.low, p.high):
        if ok is None:
            continue
        value = [int(ok)] if p.kind is list else ok
        kw = {"n": 1} if p.name == "seed" else {}
        SampleRequest(**{p.name: value, **kw, **({"sampler": "ddim"} if p.name == "eta" else {})})
        if "template" in p.names:
            check_params({p.names["template"]: value})
        if p.name in BASE:
            sample_request(BASE | {p.name: value}, WIDE, names=api_names("native"))


def test_the_server_lowers_the_high_bounds_to_its_limits_and_says_so():
    limits = ServeLimits(max_n=2, max_steps=6, max_cfg=10.0)
    a1111 = api_names("a1111")
    for key, value, field in [("n", 3, "batch_size"), ("steps", 7, "steps"), ("cfg", 10.5, "cfg_scale")]:
        err = _refused(sample_request, BASE | {key: value}, limits, names=a1111)
        assert err.field == field and str(err).startswith(f"{field} {value} ") and "--" not in str(err), err
    sample_request(BASE | {"n": 2, "steps": 6, "cfg": 10.0}, limits, names=a1111)


def test_an_error_names_the_field_as_the_surface_calls_it(capsys):
    assert main(["sample", "fashion-mnist", "--cfg", "-1", "--out", "unused.png"]) == 2
    assert capsys.readouterr().err.startswith("error: --cfg -1.0 must be a finite number from 0")
    assert str(_refused(sample_request, BASE | {"cfg": -1.0}, WIDE, names=api_names("a1111"))).startswith("cfg_scale")
    assert _refused(sample_request, BASE | {"width": -8}, WIDE, names=api_names("openai")).field == "size"
    assert str(_refused(check_params, {"cfg_scale": -1})).startswith("param cfg -1")
    assert str(_refused(SampleRequest, cfg_rescale=2.0)).startswith("--guidance-rescale 2.0")
    err = _refused(sample_request, BASE | {"eta": 0.5, "sampler": "euler"}, WIDE, names=api_names("openai"))
    assert err.field == "eta" and "not sampler euler" in str(err)


def test_sample_takes_a_shipped_models_name_as_generate_does(monkeypatch, tmp_path, capsys):
    seen = {}

    def fake(checkpoint, req, out, *args, **kw):
        seen["checkpoint"] = Path(checkpoint)
        return [Path(out.path)]

    monkeypatch.setattr("ldmkit.pipelines.generate.generate_to_file", fake)  # imported when sample runs
    out = tmp_path / "s.png"
    assert main(["sample", "fashion-mnist", "--n", "1", "--steps", "1", "--out", str(out)]) == 0
    assert seen["checkpoint"] == resolve_model("fashion-mnist")
    assert main(["sample", "no-such-model", "--out", str(out)]) == 2
    assert re.search(r"unknown model 'no-such-model'; shipped models: .*fashion-mnist", capsys.readouterr().err)


def test_the_template_parameters_are_the_tables():
    assert PARAMS == tuple(p.names["template"] for p in taken_by("template"))
    assert check_params({"guidance_scale": 4, "size": "64x32"}) == {"cfg": 4.0, "height": 32, "width": 64}
    assert SPEC["cfg"].aliases == ("cfg_scale", "guidance_scale")


def test_a_template_fills_only_the_fields_the_client_did_not_send():
    filled = Rendered("a mug", "blurry", {"cfg": 6.0, "steps": 30}, "shot", 2)
    fields = BASE | {"cfg": 7.0}
    merged = merge(fields, filled, {"cfg_scale", "prompt"}, api_names("a1111"))
    assert merged == fields | {"steps": 30, "prompt": "a mug", "negative_prompt": "blurry"}
    assert merge(BASE, filled, set(), {})["cfg"] == 6.0


def test_every_automatic1111_sampler_name_is_a_registered_sampler():
    from ldmkit.samplers import SAMPLERS

    assert set(A1111_SAMPLERS.values()) <= set(SAMPLERS)
    assert {"UniPC", "LCM"} <= set(A1111_SAMPLERS)
