"""Every route, every role and no token: gets the status its declaration documents.

The table below states, route by route, who may call it. The routes' own declarations must agree
with it (the OpenAPI ``x-roles``), and a route that is not in the table fails
:func:`test_every_route_has_an_entry`: adding a route means saying who may call it. The requests
go through the real route wrapper on loopback, with each handler replaced by a stub that answers
the route's success status (and its input models dropped, so the stub is reached): what is
tested is the wrapper's decision alone, 401 without a token, 403 below the route's roles, the
handler otherwise.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from services.gateway.api import GatewayState, build_api, problem_middleware
from services.gateway.api.framework import ROLES, Api, Route
from services.gateway.api.releases import add_release_routes
from services.gateway.settings import GatewaySettings

# Who may call a route, by name.
ACCESS = {
    "any": ROLES,
    "ops": frozenset({"admin", "ops"}),
    "release": frozenset({"admin", "release"}),
    "admin": frozenset({"admin"}),
}

EXPECTED = {
    "POST /v1/machines": "ops",
    "GET /v1/machines": "any",
    "GET /v1/machines/{id}": "any",
    "POST /v1/machines/{id}/start": "ops",
    "POST /v1/machines/{id}/stop": "ops",
    "POST /v1/machines/{id}/restart": "ops",
    "POST /v1/machines/{id}/migrate": "ops",
    "PATCH /v1/machines/{id}": "ops",
    "DELETE /v1/machines/{id}": "ops",
    "POST /v1/apps/{app}/scale": "ops",
    "PUT /v1/apps/{app}/checks/{name}": "ops",
    "GET /v1/apps/{app}/checks": "any",
    "DELETE /v1/apps/{app}/checks/{name}": "ops",
    "GET /v1/hosts": "any",
    "GET /v1/hosts/{id}": "any",
    "POST /v1/hosts/{id}/orphans/{machine_id}/purge": "ops",
    "POST /v1/hosts/{id}/drain": "ops",
    "POST /v1/hosts/{id}/undrain": "ops",
    "POST /v1/pools": "ops",
    "PATCH /v1/pools/{name}": "ops",
    "DELETE /v1/pools/{name}": "ops",
    "GET /v1/pools": "any",
    "GET /v1/ips/{ip}": "any",
    "GET /v1/ips/{ip}/metrics": "any",
    "GET /v1/images/sync-jobs": "any",
    "GET /v1/registries": "any",
    "POST /v1/images/builds": "ops",
    "GET /v1/images/builds": "any",
    "GET /v1/images/builds/{id}": "any",
    "GET /v1/images/builds/{id}/log": "any",
    "GET /v1/images": "any",
    "GET /v1/images/policy": "any",
    "PUT /v1/images/policy": "admin",
    "POST /v1/tokens": "admin",
    "GET /v1/tokens": "admin",
    "DELETE /v1/tokens/{id}": "admin",
    "GET /v1/audit": "ops",
    "POST /v1/users": "admin",
    "GET /v1/users": "ops",
    "DELETE /v1/users/{name}": "admin",
    "POST /v1/command-rules": "admin",
    "GET /v1/command-rules": "ops",
    "DELETE /v1/command-rules/{id}": "admin",
    "POST /v1/grants": "ops",
    "GET /v1/grants": "ops",
    "DELETE /v1/grants/{id}": "ops",
    "GET /v1/sessions": "any",
    "GET /v1/sessions/{id}": "any",
    "DELETE /v1/sessions/{id}": "ops",
    "GET /v1/sessions/{id}/recording": "ops",
    "POST /v1/releases": "release",
    "GET /v1/releases": "any",
    "GET /v1/releases/{release_id}": "any",
}


def _key(route: Route) -> str:
    return f"{route.method} {route.path}"


def _api(store: Any = None) -> Api:
    state = GatewayState(store=store, driver=None, rpc=None, settings=GatewaySettings())  # type: ignore[arg-type]
    api = build_api(state)
    add_release_routes(api, None, None)  # type: ignore[arg-type]
    return api


API = _api()
ROUTES = API.routes
DOC = API.openapi()
CASES = [(r, role) for r in ROUTES for role in (*sorted(ROLES), None)]


class _TokenStore:
    """Tokens named after their role, and an audit log that takes anything."""

    async def token_by_secret(self, token: str) -> dict[str, Any] | None:
        role = token.removeprefix("t-")
        return {"name": role, "role": role} if role in ROLES else None

    async def audit_write(self, entry: dict[str, Any]) -> None:
        pass


def _stubbed(route: Route) -> Route:
    """The route with a handler that answers its success status and no input to validate."""

    async def stub(request: web.Request, **_: Any) -> web.Response:
        return web.Response(status=route.status, headers={"X-Reached": "1"})

    stub.__name__ = route.handler.__name__
    return dataclasses.replace(route, handler=stub, body=None, query=None, params=None, owner=None)


@pytest.fixture(scope="module")
async def client() -> AsyncIterator[TestClient]:
    api = _api(_TokenStore())
    api.routes = [_stubbed(r) for r in api.routes]
    app = web.Application(middlewares=[problem_middleware])
    api.mount(app)
    async with TestClient(TestServer(app, host="127.0.0.1")) as c:
        yield c


def _url(route: Route) -> str:
    return "/".join("x" if seg.startswith("{") else seg for seg in route.path.split("/"))


def test_every_route_has_an_entry():
    assert sorted(_key(r) for r in ROUTES) == sorted(EXPECTED)


@pytest.mark.parametrize("route", ROUTES, ids=_key)
def test_the_declared_roles_are_the_tables(route):
    operation = DOC["paths"][route.path][route.method.lower()]

    assert route.roles == ACCESS[EXPECTED[_key(route)]]
    assert operation["x-roles"] == sorted(ACCESS[EXPECTED[_key(route)]])


def _case_id(value: Route | str | None) -> str:
    return _key(value) if isinstance(value, Route) else f"{value or 'no token'}"


@pytest.mark.parametrize(("route", "role"), CASES, ids=_case_id)
async def test_route_role_and_no_token_get_the_documented_status(client, route, role):
    allowed = ACCESS[EXPECTED[_key(route)]]
    expected = 401 if role is None else route.status if role in allowed else 403
    headers = {"Authorization": f"Bearer t-{role}"} if role else {}
    documented = DOC["paths"][route.path][route.method.lower()]["responses"]

    async with client.request(route.method, _url(route), headers=headers) as r:
        reached = r.headers.get("X-Reached") == "1"

    assert (r.status, reached) == (expected, expected == route.status)
    assert str(expected) in documented
