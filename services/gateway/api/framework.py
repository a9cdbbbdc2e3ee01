"""The small frame every API route goes through: roles, scopes, validation, problems, audit,
OpenAPI.

A route is declared once, with its roles, its path, body and query models, and how to find the
app it acts on. From that one declaration the wrapper checks the bearer token's role, validates
the path parameters, the query string (unknown or repeated parameters rejected) and the JSON body
(unknown fields rejected, 422 naming every failing field) and hands the validated models to the
handler as ``body=`` and ``query=``; it checks that a token scoped to some apps names only those
(the ``app`` of the path, body or query, and the app of the machine or release the route's
``owner`` finds); it writes the audit entry of a mutating request; and the OpenAPI document is
generated from the same models, with every status the wrapper itself can answer. A handler never
parses its input itself, and a handler whose signature disagrees with its declaration is refused
at import time.
"""

from __future__ import annotations

import inspect
import json
import typing
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import structlog
from aiohttp import web
from pydantic import BaseModel, ValidationError
from pydantic.json_schema import models_json_schema

from libs.common.clock import utcnow
from libs.common.errors import DomainError, TransientError

from ..domain.models import Problem
from .deps import STORE

__all__ = [
    "ADMIN",
    "ANY",
    "AUDIT_TARGET",
    "OPS",
    "PROBLEM_TYPE",
    "ROLES",
    "WHO",
    "Api",
    "FieldErrors",
    "Handler",
    "Owner",
    "Route",
    "RouteTable",
    "Who",
    "json_response",
    "problem_middleware",
]

log = structlog.get_logger("gateway.api")

PROBLEM_TYPE = "application/problem+json"
ANY = frozenset({"admin", "ops", "release", "viewer"})
OPS = frozenset({"admin", "ops"})
ADMIN = frozenset({"admin"})
# Every role a token can have (a route's ``roles`` is a subset).
ROLES = ANY

Handler = Callable[..., Awaitable[web.StreamResponse]]
# Finds the app of the thing a route's path names (a machine, a release); None if there is none.
Owner = Callable[[web.Request], Awaitable[str | None]]
H = TypeVar("H", bound=Handler)
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Who:
    """The caller, from its bearer token."""

    name: str
    role: str
    # The apps this token may act on; None for every app.
    apps: frozenset[str] | None = None
    token_id: str | None = None


WHO = web.RequestKey("gateway.who", Who)
# What a mutating request acted on, for its audit entry (the path's ``{id}`` when not set).
AUDIT_TARGET = web.RequestKey("gateway.audit_target", str)


@dataclass(frozen=True)
class Route:
    """One API operation: the single source of its checks, its validation and its document."""

    method: str
    path: str
    handler: Handler
    roles: frozenset[str]
    summary: str
    body: type[BaseModel] | None = None
    query: type[BaseModel] | None = None
    response: type[BaseModel] | None = None
    status: int = 200
    errors: tuple[int, ...] = ()
    params: type[BaseModel] | None = None
    owner: Owner | None = None

    @property
    def operation_id(self) -> str:
        """The OpenAPI ``operationId``: the handler's name."""
        return self.handler.__name__


class RouteTable:
    """The routes one module declares, in declaration order."""

    def __init__(self) -> None:
        self._routes: list[Route] = []

    def __iter__(self) -> Iterator[Route]:
        return iter(self._routes)

    def route(
        self,
        method: str,
        path: str,
        *,
        roles: frozenset[str],
        summary: str,
        body: type[BaseModel] | None = None,
        query: type[BaseModel] | None = None,
        response: type[BaseModel] | None = None,
        status: int = 200,
        errors: tuple[int, ...] = (),
        params: type[BaseModel] | None = None,
        owner: Owner | None = None,
    ) -> Callable[[H], H]:
        """Declare a route (decorator); the handler takes ``body``/``query`` iff declared.

        ``params`` validates (and documents) the path parameters; ``owner`` finds the app of
        the machine or release the path names, for a token's scope."""

        def deco(fn: H) -> H:
            _check_signature(fn, body=body, query=query)
            unknown = set(params.model_fields) - set(_path_params(path)) if params else set()
            if unknown:
                raise TypeError(f"{fn.__name__}: {sorted(unknown)} are not parameters of {path}")
            self._routes.append(
                Route(
                    method,
                    path,
                    fn,
                    roles,
                    summary,
                    body,
                    query,
                    response,
                    status,
                    errors,
                    params,
                    owner,
                )
            )
            return fn

        return deco


def _check_signature(fn: Handler, **declared: type[BaseModel] | None) -> None:
    """Refuse a handler whose ``body``/``query`` parameters disagree with the declaration."""
    params = inspect.signature(fn).parameters
    hints = typing.get_type_hints(fn)
    for name, model in declared.items():
        if model is None and name in params:
            raise TypeError(f"{fn.__name__} takes {name} but its route declares none")
        if model is not None and hints.get(name) is not model:
            raise TypeError(f"{fn.__name__} must take {name}: {model.__name__}, as declared")


def _problem(status: int, title: str, detail: str | None = None, **extra: Any) -> web.Response:
    body = Problem(title=title, status=status, detail=detail, **extra).model_dump(exclude_none=True)
    return web.Response(
        status=status, text=json.dumps(body, default=str), content_type=PROBLEM_TYPE
    )


def _field_errors(err: ValidationError, prefix: str = "") -> list[dict[str, Any]]:
    out = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(body)"
        out.append({"field": f"{prefix}{loc}", "message": e["msg"], "type": e["type"]})
    return out


class FieldErrors(DomainError):
    """422 naming each failing field."""

    reason = "invalid"
    status = 422

    def __init__(self, errors: list[dict[str, Any]]) -> None:
        super().__init__("; ".join(f"{e['field']}: {e['message']}" for e in errors))
        self.errors = errors

    @classmethod
    def one(cls, field: str, kind: str, message: str) -> FieldErrors:
        """The 422 of a single failing field."""
        return cls([{"field": field, "type": kind, "message": message}])


@web.middleware
async def problem_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Turn every error into an RFC 9457 problem."""
    try:
        return await handler(request)
    except FieldErrors as err:
        return _problem(
            422,
            "Unprocessable Content",
            str(err),
            reason=err.reason,
            errors=err.errors,
            instance=request.path,
        )
    except DomainError as err:
        status = getattr(err, "status", 400)
        return _problem(
            status,
            _TITLES.get(status, "Bad Request"),
            str(err),
            reason=err.reason,
            instance=request.path,
        )
    except TransientError as err:
        return _problem(
            503, "Service Unavailable", str(err), reason="unavailable", instance=request.path
        )
    except web.HTTPException as err:
        if err.status < 400:
            raise
        return _problem(
            err.status,
            err.reason,
            err.text if err.text != err.reason else None,
            instance=request.path,
        )
    except Exception:
        log.exception("unhandled API error", path=request.path)
        return _problem(500, "Internal Server Error", instance=request.path)


_TITLES = {
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    409: "Conflict",
    422: "Unprocessable Content",
    503: "Service Unavailable",
}


def _query(
    model: type[BaseModel], request: web.Request
) -> tuple[BaseModel | None, list[dict[str, Any]]]:
    """The query, validated, or the failing parameters (a repeated one among them: no
    parameter is a list, and which of two values counts would be a guess)."""
    errors = [
        {"field": f"query.{k}", "type": "repeated", "message": "given more than once"}
        for k in sorted({k for k in request.query if len(request.query.getall(k)) > 1})
    ]
    try:
        return model.model_validate(dict(request.query)), errors
    except ValidationError as err:
        return None, _field_errors(err, "query.") + errors


async def _validated_input(route: Route, request: web.Request) -> dict[str, BaseModel]:
    """The declared path, body and query, validated; one 422 naming every failing field."""
    found: dict[str, BaseModel] = {}
    errors: list[dict[str, Any]] = []
    if route.params is not None:
        try:
            route.params.model_validate(dict(request.match_info))
        except ValidationError as err:
            errors += _field_errors(err, "path.")
    if route.body is not None:
        raw = await request.read()
        try:
            found["body"] = route.body.model_validate_json(raw or b"{}")
        except ValidationError as err:
            if any(e["type"] == "json_invalid" for e in err.errors()):
                raise DomainError("the body is not valid JSON", reason="malformed_json") from err
            errors += _field_errors(err)
    if route.query is not None:
        query, query_errors = _query(route.query, request)
        errors += query_errors
        if query is not None:
            found["query"] = query
    if errors:
        raise FieldErrors(errors)
    return found


def json_response(model: BaseModel | dict | list, status: int = 200) -> web.Response:
    """A JSON response from a model or plain data."""
    if isinstance(model, BaseModel):
        text = model.model_dump_json()
    else:
        text = json.dumps(model, default=str)
    return web.Response(status=status, text=text, content_type="application/json")


class Api:
    """The assembled route table and the dependencies its handlers read from the app."""

    def __init__(self, title: str = "dockvm gateway", version: str = "1") -> None:
        self.title = title
        self.version = version
        self.routes: list[Route] = []
        self._deps: dict[web.AppKey[Any], Any] = {}

    def include(self, routes: Iterable[Route]) -> None:
        """Add a module's declared routes."""
        self.routes.extend(routes)

    def provide(self, key: web.AppKey[T], value: T) -> None:
        """Give the handlers a dependency under ``key`` once mounted."""
        self._deps[key] = value

    def mount(self, app: web.Application) -> None:
        """Store the dependencies, add every wrapped route and ``/v1/openapi.json``."""
        for key, value in self._deps.items():
            app[key] = value
        for r in self.routes:
            app.router.add_route(r.method, r.path, _wrap(r))
        doc = self.openapi()

        async def openapi(_: web.Request) -> web.Response:
            return json_response(doc)

        app.router.add_get("/v1/openapi.json", openapi)

    def openapi(self) -> dict[str, Any]:
        """The OpenAPI 3.1 document, generated from the routes' pydantic models."""
        models: set[tuple[type[BaseModel], str]] = {(Problem, "serialization")}
        for r in self.routes:
            if r.body:
                models.add((r.body, "validation"))
            if r.response:
                models.add((r.response, "serialization"))
        _, defs = models_json_schema(
            sorted(models, key=lambda m: m[0].__name__),
            ref_template="#/components/schemas/{model}",
        )
        schemas = dict(defs.get("$defs", {}))
        paths: dict[str, dict[str, Any]] = {}
        for r in self.routes:
            paths.setdefault(r.path, {})[r.method.lower()] = _operation(r)
            # What a parameter's schema refers to (an enum) goes with the other schemas.
            for model in (r.params, r.query):
                schemas.update(_param_schema(model).get("$defs", {}) if model else {})
        return {
            "openapi": "3.1.0",
            "info": {"title": self.title, "version": self.version},
            "paths": paths,
            "components": {
                "schemas": schemas,
                "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            },
        }


def _wrap(route: Route) -> Handler:
    mutating = route.method not in ("GET", "HEAD")

    async def call(request: web.Request) -> web.StreamResponse:
        inputs = await _validated_input(route, request)
        await _check_scope(route, request, inputs)
        return await route.handler(request, **inputs)

    async def handler(request: web.Request) -> web.StreamResponse:
        who = await _authenticate(request)
        if who.role not in route.roles:
            resp: web.StreamResponse = _problem(
                403,
                "Forbidden",
                f"role {who.role} may not {route.summary.lower()}",
                reason="forbidden",
                instance=request.path,
            )
        else:
            request[WHO] = who
            resp = await problem_middleware(request, call)
        if mutating:
            await _audit(request, who, resp)
        return resp

    return handler


class _OutOfScope(DomainError):
    reason = "out_of_scope"
    status = 403


async def _apps_named(route: Route, request: web.Request, inputs: dict[str, BaseModel]) -> set[str]:
    """Every app the request names: an ``app`` in its path, body or query, the app of a
    ``machine_id`` there (a grant's, a session filter's), and the app of the machine or release
    the route's owner finds."""
    named = {request.match_info.get("app")}
    named |= {getattr(model, "app", None) for model in inputs.values()}
    machines = {request.match_info.get("machine_id")}
    machines |= {getattr(model, "machine_id", None) for model in inputs.values()}
    for mid in machines:
        doc = await request.app[STORE].get(mid) if isinstance(mid, str) else None
        named.add(doc["app"] if doc is not None else None)
    if route.owner is not None:
        named.add(await route.owner(request))
    return {a for a in named if isinstance(a, str)}


async def _check_scope(route: Route, request: web.Request, inputs: dict[str, BaseModel]) -> None:
    """Refuse (403) a token scoped to some apps that names another."""
    allowed = request[WHO].apps
    if allowed is None:
        return
    outside = sorted(await _apps_named(route, request, inputs) - allowed)
    if outside:
        raise _OutOfScope(
            f"token {request[WHO].name} is scoped to {', '.join(sorted(allowed))}, "
            f"not to {', '.join(outside)}"
        )


async def _authenticate(request: web.Request) -> Who:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise _Unauthorized("a bearer token is required (Authorization: Bearer <token>)")
    doc = await request.app[STORE].token_by_secret(token.strip())
    if doc is None:
        raise _Unauthorized("the token is invalid or revoked")
    apps = doc.get("apps")
    return Who(doc["name"], doc["role"], None if apps is None else frozenset(apps), doc.get("_id"))


async def _audit(request: web.Request, who: Who, resp: web.StreamResponse) -> None:
    try:
        await request.app[STORE].audit_write(
            {
                "at": utcnow(),
                "who": who.name,
                "role": who.role,
                "method": request.method,
                "path": request.path_qs,
                "status": resp.status,
                "target": request.get(AUDIT_TARGET) or request.match_info.get("id"),
            }
        )
    except Exception:
        # The action already happened; a lost audit line must be loud, not a 500.
        log.exception("audit write failed", path=request.path)


def _operation(r: Route) -> dict[str, Any]:
    op: dict[str, Any] = {
        "summary": r.summary,
        "operationId": r.operation_id,
        "security": [{"bearer": []}],
        "x-roles": sorted(r.roles),
        "responses": {},
    }
    path_schema = _param_schema(r.params)["properties"] if r.params else {}
    params = [
        {"name": p, "in": "path", "required": True, "schema": path_schema.get(p, _STRING)}
        for p in _path_params(r.path)
    ]
    if r.query:
        schema = _param_schema(r.query)
        for name, prop in schema.get("properties", {}).items():
            params.append(
                {
                    "name": name,
                    "in": "query",
                    "required": name in schema.get("required", []),
                    "schema": prop,
                }
            )
    if params:
        op["parameters"] = params
    if r.body:
        op["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": _ref(r.body)}},
        }
    ok: dict[str, Any] = {"description": "success"}
    if r.response:
        ok["content"] = {"application/json": {"schema": _ref(r.response)}}
    op["responses"][str(r.status)] = ok
    for code in sorted({*_WRAPPER_STATUSES, *r.errors, *_input_statuses(r)}):
        op["responses"][str(code)] = {
            "description": _TITLES.get(code, "error"),
            "content": {PROBLEM_TYPE: {"schema": _ref(Problem)}},
        }
    return op


_STRING = {"type": "string"}


def _param_schema(model: type[BaseModel]) -> dict[str, Any]:
    """The JSON schema of a path or query model, referring to the document's components."""
    return model.model_json_schema(ref_template="#/components/schemas/{model}")


# What the wrapper may answer on any route: no or a bad token, a role or scope refused, and a
# store or peer that did not answer in time.
_WRAPPER_STATUSES = (401, 403, 503)


def _input_statuses(r: Route) -> tuple[int, ...]:
    """What validating the route's declared input may answer: 400 for a body that is not JSON,
    422 for input that breaks a model."""
    return ((400,) if r.body else ()) + ((422,) if r.body or r.query or r.params else ())


class _Unauthorized(DomainError):
    reason = "unauthorized"
    status = 401


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def _path_params(path: str) -> list[str]:
    return [seg[1:-1].split(":")[0] for seg in path.split("/") if seg.startswith("{")]
