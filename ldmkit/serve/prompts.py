"""Named, versioned prompt templates of `ldmkit serve`: text with `{variable}` fields, a negative prompt (which may
use the same variables) and default generation parameters. No HTTP here: the app renders a template into a prompt
and records the template's name and version in the audit row.

Versions count 1, 2, 3 per name and are never changed or deleted; retiring a name stamps every version of it, after
which `show` still reads them but no request may render one and no version may be added.

Templates are parsed by a single left-to-right scan of our own, never by str.format: `{{` and `}}` are literal
braces, `{identifier}` is a variable, and every other use of braces (positional `{}` / `{0}`, attribute or item
access such as `{0.__class__}`, format specs, conversions, unbalanced braces) is refused when the template is
added. Rendering splices each value in as plain text, so braces in a value are never expanded again.
"""

from __future__ import annotations

import json
import re
import unicodedata
from dataclasses import asdict, dataclass
from datetime import datetime, timezone

from ..config import ServeLimits
from ..errors import InputError
from ..pipelines.request import check_eta_sampler, taken_by
from .store import Conflict, Store

NAME_RE = re.compile(r"[a-z0-9_-]{1,64}")  # template names; no "@", so "name@3" splits one way only
VARIABLE_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")  # an ASCII identifier of at most 64 characters
TEXT_MAX = ServeLimits.max_prompt_chars  # characters of a template's text or negative prompt (the server's default)
DESCRIPTION_MAX = 500
VALUE_MAX = 500  # characters of one variable's value
# The parameters a template may set, their other names and types: the parameter table's (pipelines/request.py)
PARAMS = tuple(p.names["template"] for p in taken_by("template"))  # the native request fields
ALIASES = {alias: p.names["template"] for p in taken_by("template") for alias in p.aliases}  # stored as the native
WHOLE = {p.names["template"]: p.low for p in taken_by("template") if p.kind is int}  # whole-number fields -> least
NUMBERS = tuple(p.names["template"] for p in taken_by("template") if p.kind is float)
ALLOWED_HELP = f"{', '.join(PARAMS)} (also size=WIDTHxHEIGHT, and cfg_scale or guidance_scale for cfg)"


class TemplateError(InputError):
    """A template, reference, parameter or variable value that cannot be used; the message says what to change.
    reason: "invalid" (fix the input), "missing" (no such name or version), "retired" or "conflict"."""

    def __init__(self, message: str, reason: str = "invalid"):
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class Template:
    """One version of a named template, as stored."""

    name: str
    version: int  # 1, 2, 3, ... per name
    text: str  # the prompt, with {variable} fields
    negative_prompt: str  # may use the same variables
    params: dict  # default generation fields (keys from PARAMS)
    description: str
    created: str  # UTC, ISO 8601, to the second
    created_by: str | None  # the admin key's name (HTTP) or "cli:USER"
    retired: str | None  # when the name was retired (UTC), or None
    variables: tuple[str, ...]  # the variables of text and negative prompt, in order of first appearance
    retired_by: str | None = None

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"

    def as_dict(self) -> dict:
        """The template as JSON-ready values: its fields (params a fresh dict, variables a list) and its ref."""
        return {"ref": self.ref, **asdict(self), "variables": list(self.variables)}


@dataclass(frozen=True)
class Rendered:
    """A template filled in: what a request generates from, and which template version it came from."""

    prompt: str
    negative_prompt: str
    params: dict  # the template's default generation fields; a request's own fields take precedence
    template: str
    version: int


# --- parsing --------------------------------------------------------------------------------------------------------
def parse_ref(ref: str) -> tuple[str, int | None]:
    """A template reference -> (name, version): `name` -> (name, None), the newest version; `name@3` -> (name, 3)."""
    if not isinstance(ref, str):
        raise TemplateError(f"a template reference is text such as product-shot or product-shot@2, not {ref!r}")
    name, at, version = ref.partition("@")
    check_name(name)
    if not at:
        return name, None
    if not re.fullmatch(r"[1-9][0-9]{0,8}", version):
        raise TemplateError(
            f"template reference {ref[:80]!r}: the version after @ must be a whole number from 1, such as "
            f"{name}@2; or leave @VERSION out for the newest version"
        )
    return name, int(version)


def check_name(name: str) -> str:
    """`name` if it is a template name (NAME_RE); a TemplateError saying what names look like otherwise."""
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        shown = repr(name[:80]) if isinstance(name, str) else repr(name)
        raise TemplateError(
            f"template name {shown} is not allowed: use 1 to 64 lowercase letters, digits, - and _, "
            f"such as product-shot"
        )
    return name


def segments(text: str, what: str = "text") -> list[tuple[bool, str]]:
    """Template text -> [(is_variable, literal text or variable name), ...].

    One left-to-right scan: `{{` and `}}` are literal braces, `{identifier}` a variable; any other brace is refused,
    naming its position (1-based) in `what`."""
    out: list[tuple[bool, str]] = []
    literal: list[str] = []
    i = 0
    while i < len(text):
        ch = text[i]
        if ch in "{}" and text[i + 1 : i + 2] == ch:  # a doubled brace: one literal brace
            literal.append(ch)
            i += 2
        elif ch == "}":
            raise TemplateError(
                f"the {what} has an unmatched '}}' at character {i + 1}; write '}}}}' for a literal brace"
            )
        elif ch != "{":
            literal.append(ch)
            i += 1
        else:
            end = text.find("}", i + 1)
            inner = text[i + 1 : end]
            if end == -1 or "{" in inner:
                raise TemplateError(
                    f"the {what} has a '{{' at character {i + 1} that is not closed by a '}}' before the next "
                    f"brace; write '{{{{' for a literal brace, or close the variable as {{name}}"
                )
            if not VARIABLE_RE.fullmatch(inner):
                raise TemplateError(_field_problem(what, inner, i + 1))
            if literal:
                out.append((False, "".join(literal)))
                literal = []
            out.append((True, inner))
            i = end + 1
    if literal:
        out.append((False, "".join(literal)))
    return out


def _field_problem(what: str, inner: str, at: int) -> str:
    """Why `{inner}` is not a variable, and what to write instead."""
    shown = "{" + inner[:40] + ("..." if len(inner) > 40 else "") + "}"
    start = f"the {what} has {shown!r} at character {at}"
    first = min((inner.find(c) for c in ".[!:" if c in inner), default=-1)
    if inner == "" or inner.isdigit():
        return f"{start}, a positional field; name the variable instead, such as {{product}}"
    if first >= 0 and inner[first] in ".[":
        return f"{start}: attribute and item access are not allowed; use a plain variable such as {{product}}"
    if first >= 0 and inner[first] == "!":
        return f"{start}: conversions (!r, !s, !a) are not allowed; write the plain variable {{name}}"
    if first >= 0:
        return f"{start}: format specs (after ':') are not allowed; write the plain variable {{name}}"
    return (
        f"{start}, which is not a variable name: use ASCII letters, digits and _, not starting with a digit, at "
        f"most 64 characters; write '{{{{' and '}}}}' for literal braces"
    )


def variables_of(text: str, negative_prompt: str = "") -> tuple[str, ...]:
    """The variables of a template's text and negative prompt, each once, in order of first appearance."""
    found = [v for is_var, v in segments(text) + segments(negative_prompt, "negative prompt") if is_var]
    return tuple(dict.fromkeys(found))


def _check_text(what: str, text, limit: int, required: bool = False) -> str:
    """Refuse what is not text of at most `limit` characters without control characters (tabs and newlines
    allowed) or unpaired surrogates."""
    if not isinstance(text, str):
        raise TemplateError(f"the {what} must be text, not {type(text).__name__}")
    if required and not text.strip():
        raise TemplateError(f"the {what} is empty; give the prompt, such as 'a {{product}} on a white background'")
    if len(text) > limit:
        raise TemplateError(f"the {what} has {len(text)} characters; the limit is {limit}, so shorten it")
    for i, ch in enumerate(text):
        if ch not in "\t\n" and unicodedata.category(ch) in ("Cc", "Cs"):
            raise TemplateError(f"the {what} holds control character U+{ord(ch):04X} at character {i + 1}; remove it")
    return text


# --- parameters -----------------------------------------------------------------------------------------------------
def check_params(params: dict | None) -> dict:
    """The default generation fields of a template, checked: only the native request fields (aliases and size
    turned into them), each of its type and within the bounds every server has. A server's own [limits] are checked
    again when a request uses the template."""
    if params is None:
        return {}
    if not isinstance(params, dict):
        raise TemplateError(f"params must be a mapping of field to value, such as {{'steps': 30}}, not {params!r}")
    out: dict = {}
    for key, value in params.items():
        key = ALIASES.get(key, key)
        if key == "size":
            width, height = _size(value)
            _put(out, "width", width)
            _put(out, "height", height)
        elif key in PARAMS:
            _put(out, key, _check_param(key, value))
        else:
            raise TemplateError(f"param {str(key)[:40]!r} is not a generation field; the allowed ones: {ALLOWED_HELP}")
    if "sampler" in out:
        check_eta_sampler(out.get("eta"), out["sampler"], "template", _refusal)
    return dict(sorted(out.items()))


def _put(out: dict, key: str, value) -> None:
    if key in out:
        raise TemplateError(f"param {key} is given twice (directly, through size, or under another name); give it once")
    out[key] = value


def _size(value) -> tuple[int, int]:
    m = re.fullmatch(r"(\d{1,5})x(\d{1,5})", value) if isinstance(value, str) else None
    if not m:
        raise TemplateError(f"param size {str(value)[:40]!r} is not WIDTHxHEIGHT; give one such as 512x512")
    return int(m.group(1)), int(m.group(2))


def _check_param(key: str, value):
    """One field's value, of its type and in range, as the parameter table says."""
    p = next(p for p in taken_by("template") if p.names["template"] == key)
    if p.optional and value is None:  # a template's eta is a number: leave it out for the sampler's own
        raise TemplateError(f"param {key} must be a number; leave it out for the sampler's default")
    return p.check(value, "template", fail=_refusal)


def _refusal(_field: str, message: str) -> TemplateError:
    return TemplateError(message)


def merge(fields: dict, filled: Rendered, sent: set[str], names: dict[str, str] | None = None) -> dict:
    """A request's fields with a rendered template filled in: the template's prompt and negative prompt, and its
    parameters where the request did not send its own. fields: the request's values under the native names (cfg,
    width, ...); sent: the fields the client sent, as it named them (cfg_scale, size); names: the API's name of a
    native field where it differs (pipelines.request.api_names)."""
    names = names or {}
    sent_native = {names.get(k, k) for k in sent}
    defaults = {k: v for k, v in filled.params.items() if names.get(k, k) not in sent_native}
    return fields | defaults | {"prompt": filled.prompt, "negative_prompt": filled.negative_prompt}


def params_from_text(items: list[str]) -> dict:
    """`--param KEY=VALUE` options -> a params dict, each value read as its field's type (steps=30 -> 30)."""
    params: dict = {}
    for item in items:
        key, eq, text = (part.strip() for part in item.partition("="))
        if not eq or not key:
            raise TemplateError(f"--param {item[:60]!r} is not KEY=VALUE; give one such as steps=30 or sampler=euler")
        if key in params:
            raise TemplateError(f"--param {key} is given twice; give it once")
        field = ALIASES.get(key, key)
        try:
            params[key] = int(text) if field in WHOLE else float(text) if field in NUMBERS else text
        except ValueError:
            kind = "a whole number" if field in WHOLE else "a number"
            raise TemplateError(f"--param {key}={text[:40]} is not {kind}; give one such as {key}=30") from None
    return params


# --- the store ------------------------------------------------------------------------------------------------------
def _stamp() -> str:
    """Now, UTC, to the second, in ISO 8601."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _template(row: dict) -> Template:
    """A Template from its table row."""
    stored = ("name", "text", "negative_prompt", "description", "created", "created_by", "retired", "retired_by")
    return Template(
        **{k: row[k] for k in stored},
        version=int(row["version"]),
        params=json.loads(row["params"]),
        variables=variables_of(row["text"], row["negative_prompt"]),
    )


def _versions_phrase(n: int) -> str:
    return "version 1 only" if n == 1 else f"versions 1..{n}"


class Templates:
    """The prompt templates kept in `store`; one instance serves any number of threads."""

    def __init__(self, store: Store):
        self.store = store

    # --- managing templates -----------------------------------------------------------------------------------------
    def add(
        self,
        name: str,
        text: str,
        negative_prompt: str = "",
        params: dict | None = None,
        description: str = "",
        created_by: str | None = None,
    ) -> Template:
        """Store the next version of `name` (1 for a new name). Admins adding at once get distinct versions: the
        version is read and written in one locked write, and (name, version) is the table's primary key."""
        check_name(name)
        _check_text("text", text, TEXT_MAX, required=True)
        _check_text("negative prompt", negative_prompt, TEXT_MAX)
        _check_text("description", description, DESCRIPTION_MAX)
        variables = variables_of(text, negative_prompt)  # refuses every brace that is not a plain variable
        params = check_params(params)
        created = _stamp()
        try:
            with self.store.write(lock=True) as db:
                last = db.execute(
                    "SELECT MAX(version) AS version, MAX(retired) AS retired FROM prompts WHERE name = ?", (name,)
                )[0]
                if last["retired"] is not None:
                    raise TemplateError(
                        f"template {name!r} was retired at {last['retired']}; retired names take no new versions "
                        f"(their old ones stay readable); choose another name",
                        "retired",
                    )
                version = int(last["version"] or 0) + 1
                db.execute(
                    "INSERT INTO prompts (name, version, text, negative_prompt, params, description, created,"
                    " created_by) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (name, version, text, negative_prompt, json.dumps(params), description, created, created_by),
                )
        except Conflict:  # only a writer that skipped the lock can get here
            raise TemplateError(
                f"another version of template {name!r} was added at the same moment; add yours again", "conflict"
            ) from None
        return Template(name, version, text, negative_prompt, params, description, created, created_by, None, variables)

    def list(self, include_retired: bool = False) -> list[Template]:
        """The newest version of each name, by name; retired names only when `include_retired`."""
        rows = self.store.query(
            "SELECT p.* FROM prompts p JOIN (SELECT name, MAX(version) AS version FROM prompts GROUP BY name) m"
            " ON p.name = m.name AND p.version = m.version"
        )
        found = [_template(r) for r in rows if include_retired or r["retired"] is None]
        return sorted(found, key=lambda t: t.name)

    def versions(self, name: str) -> list[Template]:
        """Every version of `name`, oldest first, retired ones included."""
        check_name(name)
        rows = self.store.query("SELECT * FROM prompts WHERE name = ? ORDER BY version", (name,))
        if not rows:
            raise self._missing(name)
        return [_template(r) for r in rows]

    def show(self, ref: str) -> Template:
        """The version `ref` names ("name" for the newest, "name@3"), retired or not."""
        name, version = parse_ref(ref)
        newest = self.store.query("SELECT MAX(version) AS version FROM prompts WHERE name = ?", (name,))[0]["version"]
        if newest is None:
            raise self._missing(name)
        if version is not None and version > newest:
            raise TemplateError(
                f"template {name!r} has {_versions_phrase(newest)}; there is no version {version}: ask for one of "
                f"those, or for {name} alone to get the newest",
                "missing",
            )
        rows = self.store.query(
            "SELECT * FROM prompts WHERE name = ? AND version = ?", (name, newest if version is None else version)
        )
        return _template(rows[0])

    def retire(self, name: str, by: str | None = None) -> Template:
        """Stamp every version of `name` retired (nothing is deleted), for every server sharing the store at once;
        retiring twice keeps the first stamp. Returns the newest version."""
        check_name(name)
        with self.store.write(lock=True) as db:
            if not db.execute("SELECT version FROM prompts WHERE name = ?", (name,)):
                raise self._missing(name)
            db.execute(
                "UPDATE prompts SET retired = ?, retired_by = ? WHERE name = ? AND retired IS NULL",
                (_stamp(), by, name),
            )
        return self.show(name)

    # --- using templates --------------------------------------------------------------------------------------------
    def render(self, ref: str, variables: dict[str, str] | None) -> Rendered:
        """The prompt and negative prompt of template `ref` with every variable replaced by its value, inserted as
        plain text (braces in a value stay as they are), and the template's default parameters."""
        t = self.show(ref)
        if t.retired is not None:
            by = f" by {t.retired_by}" if t.retired_by else ""
            raise TemplateError(
                f"template {t.name!r} was retired at {t.retired}{by}; no request may use any of its versions; "
                f"`ldmkit prompts list` (GET /v1/prompts) shows the templates in use",
                "retired",
            )
        values = _check_values(t, variables)
        return Rendered(
            prompt=_fill(segments(t.text), values),
            negative_prompt=_fill(segments(t.negative_prompt, "negative prompt"), values),
            params=dict(t.params),
            template=t.name,
            version=t.version,
        )

    @staticmethod
    def _missing(name: str) -> TemplateError:
        return TemplateError(
            f"no template is named {name!r}; `ldmkit prompts list --retired` shows every name", "missing"
        )


def _check_values(t: Template, variables: dict | None) -> dict[str, str]:
    """`variables` if it gives exactly the template's variables, each a string of at most VALUE_MAX characters
    without control characters; else a TemplateError naming the unknown, missing or bad ones."""
    variables = {} if variables is None else variables
    if not isinstance(variables, dict):
        raise TemplateError("variables must be a mapping of name to text, such as {'product': 'red mug'}")
    known = ", ".join(t.variables) if t.variables else "none"
    unknown = [str(k)[:40] for k in variables if k not in t.variables]
    missing = [v for v in t.variables if v not in variables]
    if unknown or missing:
        parts = [f"it has no variable {', '.join(map(repr, unknown))}" if unknown else ""]
        parts.append(f"values are missing for {', '.join(missing)}" if missing else "")
        raise TemplateError(f"template {t.ref}: {'; '.join(p for p in parts if p)}; its variables are: {known}")
    for key, value in variables.items():
        if not isinstance(value, str):
            raise TemplateError(f"variable {key} of template {t.ref} is {type(value).__name__}; give it as text")
        if len(value) > VALUE_MAX:
            raise TemplateError(
                f"variable {key} of template {t.ref} has {len(value)} characters; the limit is {VALUE_MAX}"
            )
        for i, ch in enumerate(value):
            if unicodedata.category(ch) in ("Cc", "Cs"):
                raise TemplateError(
                    f"variable {key} of template {t.ref} holds the control character U+{ord(ch):04X} at character "
                    f"{i + 1}; remove it (values are one line of text)"
                )
    return variables


def _fill(parts: list[tuple[bool, str]], values: dict[str, str]) -> str:
    """Join the parsed text, each variable replaced by its value verbatim."""
    return "".join(values[v] if is_var else v for is_var, v in parts)
