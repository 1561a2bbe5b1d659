"""What the generation APIs share: a request's fields checked against the limits and the model, each refusal naming
the field as that API calls it, the model's own sampling settings where the request gives none, and a named prompt
template filled in."""

from dataclasses import replace

from ...errors import InputError
from ...pipelines.request import lcm_note
from ..prompts import TemplateError
from ..schemas import FieldError, check_for_model, option_field, sample_request
from ..service import Service


def templated(svc: Service, served, body, fields: dict, names: dict) -> tuple[dict, dict]:
    """The request's fields with the model's own sampler, steps and guidance where the request did not set them (a
    distilled model's: ServedModel.own_sampling) and its prompt template filled in (when it names one): the
    template's prompt and negative prompt, its parameters where the request did not set its own; and what the audit
    row records of the template (template "name@version" and the variables). names: the API's name of a field
    (OpenAI says size, A1111 cfg_scale)."""
    given = set(body.model_fields_set)
    fields = fields | {k: v for k, v in served.own_sampling().items() if names.get(k, k) not in given}
    if body.template is None:
        if body.variables:
            raise FieldError("variables", "variables fill a template: give template too, or drop variables")
        return fields, {}
    if body.prompt or body.negative_prompt:
        raise FieldError("template", "give either a template (with variables) or a prompt, not both")
    try:
        filled = svc.templates.render(body.template, body.variables or {})
    except TemplateError as err:
        raise FieldError("template", str(err)) from None
    defaults = {k: v for k, v in filled.params.items() if names.get(k, k) not in given}
    fields = fields | defaults | {"prompt": filled.prompt, "negative_prompt": filled.negative_prompt}
    return fields, {"template": f"{filled.template}@{filled.version}", "variables": body.variables or {}}


def checked_request(svc: Service, served, fields: dict, names: dict, route: str):
    """The request checked against the limits and against the model (its routes, sizes and labels) before any
    work, each refusal naming the field as the client sent it; with a template's eta (the APIs take none of their
    own) and the server's sampling precision (serve.precision: every request samples in it)."""
    ldm = served.ldm
    if route not in served.routes():
        raise FieldError(names.get("model", "model"), served.refusal(route, svc.models))
    try:
        req = sample_request(
            fields, svc.limits, names=names, class_names=ldm.class_names, text=ldm.text_encoder is not None
        )
    except FieldError:
        raise
    except InputError as err:
        raise FieldError(*option_field(str(err), names)) from None
    check_for_model(req, served.describe()["multiple"], ldm.num_classes, names)
    req = svc.loras.resolve(ldm, req, names.get("loras", "loras"))  # from the server's folder only
    req = replace(req, precision=svc.run.serve.precision)
    return req if fields.get("eta") is None else replace(req, eta=fields["eta"])


def notes(req) -> list[str]:
    """What an answer with a place for notes says about a request it allows but advises against (more LCM steps
    than a consistency model needs)."""
    note = lcm_note(req.sampler, req.steps, "steps")
    return [note.removeprefix("note: ")] if note else []
