"""What the routes take as typed dependencies: the service, and the caller's key checked for a role
(`Depends(require("user"))` gives the Principal); the JSON answer every route writes, and the body parser.
FastAPI and pydantic come with the `serve` extra, so these are built on first use: the CLI imports serve/ without
them. (No `from __future__ import annotations` here: FastAPI reads these functions' annotations.)"""

import functools
import json
from types import SimpleNamespace
from typing import Annotated

from .auth import ROLES, Principal
from .health import find_non_finite
from .schemas import FieldError
from .service import Service


@functools.cache
def require(role: str):
    """The dependency of a route open to keys of `role` and of the roles after it in auth.ROLES: the caller's
    Principal, or AuthError (401, 403 or 429, audited) before the route reads its body. One function a role, so a
    test can tell from a route's dependencies which role it needs (`role_of`)."""
    from fastapi import Request

    if role not in ROLES:
        raise ValueError(f"require({role!r}): the roles are {', '.join(ROLES)}")

    async def authorized(request: Request) -> Principal:
        return await request.app.state.service.authorize(request, role)

    authorized.role = role
    return authorized


def role_of(call) -> str | None:
    """The role a dependency made by `require` checks; None for any other callable."""
    role = getattr(call, "role", None)
    return role if role in ROLES and call is require(role) else None


@functools.cache
def typed() -> SimpleNamespace:
    """The typed dependencies of the routes, as the parameters' annotations: ServiceDep (the Service), ViewerKey,
    UserKey and AdminKey (the caller's Principal, checked for that role); and JSON, the answer's class."""
    from fastapi import Depends, Request
    from fastapi.responses import JSONResponse

    async def service(request: Request) -> Service:  # async: no thread for reading app.state
        """The app's Service (create_app puts it in app.state)."""
        return request.app.state.service

    class JSON(JSONResponse):
        """JSON in ASCII: a string the client sent (an unpaired surrogate included) is echoed escaped, never lost."""

        def render(self, content) -> bytes:
            return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode()

    return SimpleNamespace(
        JSON=JSON,
        ServiceDep=Annotated[Service, Depends(service)],
        ViewerKey=Annotated[Principal, Depends(require("viewer"))],
        UserKey=Annotated[Principal, Depends(require("user"))],
        AdminKey=Annotated[Principal, Depends(require("admin"))],
    )


async def parse_body(request, model):
    """The JSON body as the pydantic `model`, read after the key was checked (FieldError naming the first bad
    field)."""
    raw = await request.body()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise FieldError("body", f"the body is not valid UTF-8 (byte {e.start}); send JSON encoded as UTF-8") from None
    try:
        data = json.loads(text, parse_constant=float)  # NaN and Infinity, which JSON does not allow: refused below
    except (ValueError, RecursionError):
        raise FieldError("body", "the body is not valid JSON; send a JSON object") from None
    if not isinstance(data, dict):
        raise FieldError("body", f"the body is a JSON {type(data).__name__}; send a JSON object") from None
    found = find_non_finite(data)  # so is 1e309; refused naming the field, ignored extras included
    if found is not None:
        field, why = found
        raise FieldError(field, f"{field}: {why}")
    return validated(model, data)


def validated(model, data: dict):
    """`data` (a parsed body) as the pydantic `model`; FieldError naming the first bad field."""
    from pydantic import ValidationError

    try:
        return model.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        param = ".".join(str(p) for p in first.get("loc", ())) or "body"
        raise FieldError(param, f"{param}: {first.get('msg', 'invalid value')}") from None
