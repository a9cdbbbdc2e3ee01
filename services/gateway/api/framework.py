"""The small frame every API route goes through: roles, body validation, problems, audit, OpenAPI.

A route is declared once with its roles and pydantic models; from that declaration the gateway
checks the bearer token's role, validates the body (unknown fields rejected), writes the audit
entry of a mutating request, and generates the OpenAPI document.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import structlog
from aiohttp import web
from pydantic import BaseModel, ValidationError
from pydantic.json_schema import models_json_schema

from libs.common.errors import DomainError, TransientError

from ..domain.models import Problem
from ..store import GatewayStore, now

__all__ = [
    "ADMIN",
    "ANY",
    "OPS",
    "PROBLEM_TYPE",
    "Api",
    "FieldErrors",
    "Handler",
    "Route",
    "Who",
    "json_response",
    "parse_body",
    "parse_query",
    "problem_middleware",
]

log = structlog.get_logger("gateway.api")

PROBLEM_TYPE = "application/problem+json"
ANY = frozenset({"admin", "ops", "release", "viewer"})
OPS = frozenset({"admin", "ops"})
ADMIN = frozenset({"admin"})

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
M = TypeVar("M", bound=BaseModel)


@dataclass(frozen=True, slots=True)
class Who:
    """The caller, from its bearer token."""

    name: str
    role: str


@dataclass(frozen=True)
class Route:
    """One API operation."""

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


@web.middleware
async def problem_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Turn every error into an RFC 9457 problem."""
    try:
        return await handler(request)
    except FieldErrors as err:
        return _problem(
            422, "Unprocessable Content", str(err), reason=err.reason, errors=err.errors,
            instance=request.path,
        )
    except DomainError as err:
        status = getattr(err, "status", 400)
        return _problem(status, _TITLES.get(status, "Bad Request"), str(err), reason=err.reason,
                        instance=request.path)
    except TransientError as err:
        return _problem(503, "Service Unavailable", str(err), reason="unavailable",
                        instance=request.path)
    except web.HTTPException as err:
        if err.status < 400:
            raise
        return _problem(err.status, err.reason, err.text if err.text != err.reason else None,
                        instance=request.path)
    except Exception:
        log.exception("unhandled API error", path=request.path)
        return _problem(500, "Internal Server Error", instance=request.path)


_TITLES = {400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found",
           409: "Conflict", 422: "Unprocessable Content"}


async def parse_body(request: web.Request, model: type[M]) -> M:
    """Validate the JSON body into ``model``; 422 naming each failing field."""
    raw = await request.read()
    try:
        return model.model_validate_json(raw or b"{}")
    except ValidationError as err:
        if any(e["type"] == "json_invalid" for e in err.errors()):
            raise DomainError("the body is not valid JSON", reason="malformed_json") from err
        raise FieldErrors(_field_errors(err)) from err


def parse_query(request: web.Request, model: type[M]) -> M:
    """Validate the query string into ``model``; 422 naming each failing parameter."""
    try:
        return model.model_validate(dict(request.query))
    except ValidationError as err:
        raise FieldErrors(_field_errors(err, "query.")) from err


def json_response(model: BaseModel | dict | list, status: int = 200) -> web.Response:
    """A JSON response from a model or plain data."""
    if isinstance(model, BaseModel):
        text = model.model_dump_json()
    else:
        text = json.dumps(model, default=str)
    return web.Response(status=status, text=text, content_type="application/json")


class Api:
    """The route table: mounts the routes on an aiohttp app and builds the OpenAPI document."""

    def __init__(
        self, store: GatewayStore, title: str = "dockvm gateway", version: str = "1"
    ) -> None:
        self.store = store
        self.title = title
        self.version = version
        self.routes: list[Route] = []

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
    ) -> Callable[[Handler], Handler]:
        """Declare a route (decorator)."""

        def deco(fn: Handler) -> Handler:
            self.routes.append(
                Route(method, path, fn, roles, summary, body, query, response, status, errors)
            )
            return fn

        return deco

    def mount(self, app: web.Application) -> None:
        """Add every route (wrapped with auth and audit) and ``/v1/openapi.json``."""
        for r in self.routes:
            app.router.add_route(r.method, r.path, self._wrap(r))
        doc = self.openapi()

        async def openapi(_: web.Request) -> web.Response:
            return json_response(doc)

        app.router.add_get("/v1/openapi.json", openapi)

    def _wrap(self, route: Route) -> Handler:
        mutating = route.method not in ("GET", "HEAD")

        async def handler(request: web.Request) -> web.StreamResponse:
            who = await self._authenticate(request)
            if who.role not in route.roles:
                resp: web.StreamResponse = _problem(
                    403, "Forbidden", f"role {who.role} may not {route.summary.lower()}",
                    reason="forbidden", instance=request.path,
                )
            else:
                request["who"] = who
                resp = await problem_middleware(request, route.handler)
            if mutating:
                await self._audit(request, who, resp)
            return resp

        return handler

    async def _authenticate(self, request: web.Request) -> Who:
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise _Unauthorized("a bearer token is required (Authorization: Bearer <token>)")
        doc = await self.store.token_by_secret(token.strip())
        if doc is None:
            raise _Unauthorized("the token is invalid or revoked")
        return Who(doc["name"], doc["role"])

    async def _audit(self, request: web.Request, who: Who, resp: web.StreamResponse) -> None:
        try:
            await self.store.audit_write(
                {
                    "at": now(),
                    "who": who.name,
                    "role": who.role,
                    "method": request.method,
                    "path": request.path_qs,
                    "status": resp.status,
                    "target": request.get("audit_target") or request.match_info.get("id"),
                }
            )
        except Exception:
            # The action already happened; a lost audit line must be loud, not a 500.
            log.exception("audit write failed", path=request.path)

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
        paths: dict[str, dict[str, Any]] = {}
        for r in self.routes:
            op: dict[str, Any] = {
                "summary": r.summary,
                "operationId": r.handler.__name__,
                "security": [{"bearer": []}],
                "x-roles": sorted(r.roles),
                "responses": {},
            }
            params = [
                {"name": p, "in": "path", "required": True, "schema": {"type": "string"}}
                for p in _path_params(r.path)
            ]
            if r.query:
                schema = r.query.model_json_schema()
                for name, prop in schema.get("properties", {}).items():
                    params.append({"name": name, "in": "query",
                                   "required": name in schema.get("required", []),
                                   "schema": prop})
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
            for code in sorted({401, 403, *r.errors, *((422,) if r.body or r.query else ())}):
                op["responses"][str(code)] = {
                    "description": _TITLES.get(code, "error"),
                    "content": {PROBLEM_TYPE: {"schema": _ref(Problem)}},
                }
            paths.setdefault(r.path, {})[r.method.lower()] = op
        return {
            "openapi": "3.1.0",
            "info": {"title": self.title, "version": self.version},
            "paths": paths,
            "components": {
                "schemas": defs.get("$defs", {}),
                "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            },
        }


class _Unauthorized(DomainError):
    reason = "unauthorized"
    status = 401


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def _path_params(path: str) -> list[str]:
    return [seg[1:-1].split(":")[0] for seg in path.split("/") if seg.startswith("{")]

