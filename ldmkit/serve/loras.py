"""The LoRAs a server applies to requests: only those of its folder (serve.loras), a role limited to its allow-list
(serve.lora_roles), and AUTOMATIC1111's `<lora:name:scale>` prompt syntax. No model maths here: the files are
read and matched by pipelines/lora.py, and applied per image by pipelines/batching.py."""

from __future__ import annotations

import re
from dataclasses import replace

from ..errors import ConfigError, InputError
from ..pipelines.lora import LoRAFolder, allowed
from ..pipelines.request import SampleRequest
from .auth import ROLES, AuthError, Principal
from .schemas import FieldError

A1111_TAG = re.compile(r"<lora:([^:<>]*)(?::([^:<>]*))?>")  # <lora:name> or <lora:name:scale>


def prompt_loras(prompt: str, field: str = "prompt") -> tuple[str, list[dict]]:
    """AUTOMATIC1111's LoRA syntax: (the prompt without its `<lora:name:scale>` tags, [{"name", "scale"}] in order);
    FieldError naming `field` for a tag without a name or with a scale that is not a number."""
    loras = []
    for m in A1111_TAG.finditer(prompt):
        name, scale = m.group(1).strip(), (m.group(2) or "1").strip()
        if not name:
            raise FieldError(field, f"{field}: {m.group(0)[:60]} names no LoRA; write <lora:NAME:SCALE>")
        try:
            value = float(scale)
        except ValueError:
            raise FieldError(
                field, f"{field}: the scale of {m.group(0)[:60]} is not a number; write e.g. <lora:{name[:40]}:0.8>"
            ) from None
        loras.append({"name": name, "scale": value})
    stripped = re.sub(r"\s+,", ",", re.sub(r"\s{2,}", " ", A1111_TAG.sub("", prompt))).strip(" ,")
    return stripped, loras


class ServedLoRAs:
    """A server's LoRA folder and each role's allow-list."""

    def __init__(self, folder: str, roles: tuple[str, ...] = ()):
        """folder: serve.loras ("" = no LoRAs); roles: serve.lora_roles, "ROLE:PATTERN" entries."""
        try:
            self.folder = LoRAFolder(folder) if folder else None
        except InputError as err:
            raise ConfigError(f"serve.loras = {folder!r}: {err}") from None
        self.patterns: dict[str, list[str]] = {}
        for entry in roles:
            role, sep, pattern = entry.partition(":")
            if not sep or role not in ROLES or not pattern:
                raise ConfigError(
                    f"serve.lora_roles entry {entry!r} is not ROLE:PATTERN; use a role of {', '.join(ROLES)} and a "
                    f'LoRA name or shell pattern, e.g. "user:styles/*"'
                )
            self.patterns.setdefault(role, []).append(pattern)

    def may_use(self, role: str, name: str) -> bool:
        """Whether keys of `role` may apply LoRA `name` (a role without an allow-list may apply any)."""
        return role not in self.patterns or allowed(self.patterns[role], name.removesuffix(LoRAFolder.SUFFIX))

    def names(self, role: str) -> list[str]:
        """The LoRAs of the folder that keys of `role` may apply."""
        return [n for n in self.folder.names() if self.may_use(role, n)] if self.folder else []

    def resolve(self, ldm, req: SampleRequest, field: str = "loras") -> SampleRequest:
        """`req` with its LoRAs found in the folder, read and matched to the model; FieldError (400) naming the
        LoRA when it leaves the folder, is not there, or does not fit the model."""
        if not req.loras:
            return req
        if self.folder is None:
            raise FieldError(field, "this server applies no LoRAs (it has no serve.loras folder); drop them")
        try:
            return replace(req, loras=self.folder.resolve(ldm, req.loras))
        except InputError as err:
            raise FieldError(field, str(err)) from None

    def check_role(self, req: SampleRequest, principal: Principal) -> None:
        """AuthError (403) naming the first LoRA of `req` that the key's role may not apply."""
        for spec in req.loras:
            if not self.may_use(principal.role, spec.name):
                mine = ", ".join(self.patterns[principal.role])
                raise AuthError(
                    f"key {principal.name} has role {principal.role}, which may apply only the LoRAs {mine}, not "
                    f"{spec.name[:80]!r}",
                    403,
                    "lora",
                    key_id=principal.key_id,
                    key_name=principal.name,
                )
