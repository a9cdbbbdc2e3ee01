"""A route's declaration is the only source: its OpenAPI entry and its validation share models.

The routes run in an in-memory aiohttp app on loopback; a request that breaks a declared model is
refused by the wrapper before any handler runs, so the store is a stub that knows tokens and
records audit entries, and the driver and RPC client are absent.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from services.gateway.api import GatewayState, build_api, problem_middleware
from services.gateway.api.framework import ANY, Route, RouteTable
from services.gateway.api.releases import add_release_routes
from services.gateway.domain.models import TokenCreate
from services.gateway.settings import GatewaySettings

TOKENS = {"t-admin": "admin", "t-viewer": "viewer"}


class _AuthStore:
    """The part of the gateway store the route wrapper uses: tokens and the audit log."""

    def __init__(self) -> None:
        self.audit: list[dict[str, Any]] = []
        self.audit_queries: list[tuple[Any, ...]] = []

    async def token_by_secret(self, token: str) -> dict[str, Any] | None:
        role = TOKENS.get(token)
        return {"name": role, "role": role} if role else None

    async def audit_write(self, entry: dict[str, Any]) -> None:
        self.audit.append(entry)

    async def audit_list(self, limit: int, who: str | None) -> list[dict[str, Any]]:
        self.audit_queries.append((limit, who))
        return [
            {
                "at": datetime(2024, 1, 1, tzinfo=UTC),
                "who": "admin",
                "role": "admin",
                "method": "POST",
                "path": "/v1/tokens",
                "status": 201,
            }
        ]


def _api(store: _AuthStore | None = None):
    state = GatewayState(store=store, driver=None, rpc=None, settings=GatewaySettings())  # type: ignore[arg-type]
    api = build_api(state)
    add_release_routes(api, None, None)  # type: ignore[arg-type]
    return api


ROUTES = _api().routes
DOC = _api().openapi()


def _route_id(route: Route) -> str:
    return f"{route.method} {route.path}"


def _operation(route: Route) -> dict[str, Any]:
    return DOC["paths"][route.path][route.method.lower()]


def _body_schema(route: Route) -> dict[str, Any]:
    ref = _operation(route)["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    return DOC["components"]["schemas"][ref.rsplit("/", 1)[1]]


def _url(route: Route, query: str = "") -> str:
    # A value every declared path model accepts ({ip} is an IPv4 address).
    path = "/".join(
        ("10.0.0.1" if seg == "{ip}" else "x") if seg.startswith("{") else seg
        for seg in route.path.split("/")
    )
    return f"{path}?{query}" if query else path


BODY_ROUTES = [r for r in ROUTES if r.body is not None]
QUERY_ROUTES = [r for r in ROUTES if r.query is not None]


@pytest.fixture
async def stub_store() -> _AuthStore:
    return _AuthStore()


@pytest.fixture
async def client(stub_store: _AuthStore) -> AsyncIterator[TestClient]:
    app = web.Application(middlewares=[problem_middleware])
    _api(stub_store).mount(app)
    async with TestClient(
        TestServer(app, host="127.0.0.1"), headers={"Authorization": "Bearer t-admin"}
    ) as c:
        yield c


def test_every_declared_route_is_in_the_document_under_its_handler_name():
    assert len(ROUTES) == 53  # 50 routes, 3 release routes
    assert {(r.path, r.method.lower(), r.operation_id) for r in ROUTES} == {
        (path, method, op["operationId"])
        for path, ops in DOC["paths"].items()
        for method, op in ops.items()
    }


@pytest.mark.parametrize("route", BODY_ROUTES, ids=_route_id)
def test_the_documented_body_schema_is_the_declared_model(route):
    expected = route.body.model_json_schema(ref_template="#/components/schemas/{model}")
    expected.pop("$defs", None)

    assert _body_schema(route) == expected
    assert _body_schema(route)["additionalProperties"] is False


@pytest.mark.parametrize("route", QUERY_ROUTES, ids=_route_id)
def test_the_documented_query_parameters_are_the_declared_model(route):
    schema = route.query.model_json_schema(ref_template="#/components/schemas/{model}")
    params = [p for p in _operation(route)["parameters"] if p["in"] == "query"]

    assert {p["name"]: p["schema"] for p in params} == schema["properties"]
    assert {p["name"] for p in params if p["required"]} == set(schema.get("required", []))


@pytest.mark.parametrize("route", BODY_ROUTES, ids=_route_id)
async def test_a_body_breaking_the_declared_model_is_422_naming_every_field(client, route):
    async with client.request(route.method, _url(route), json={"not_a_field": 1}) as r:
        problem = await r.json(content_type=None)

    assert r.status == 422
    assert r.content_type == "application/problem+json"
    assert {e["field"] for e in problem["errors"]} == {
        "not_a_field",
        *_body_schema(route).get("required", []),
    }


@pytest.mark.parametrize("route", QUERY_ROUTES, ids=_route_id)
async def test_a_query_breaking_the_declared_model_is_422_naming_every_parameter(client, route):
    required = set(_body_schema(route).get("required", [])) if route.body else set()
    async with client.request(route.method, _url(route, "not_a_param=1")) as r:
        problem = await r.json(content_type=None)

    assert r.status == 422
    assert {e["field"] for e in problem["errors"]} == {"query.not_a_param", *required}


async def test_the_handler_receives_the_validated_query(client, stub_store):
    async with client.get("/v1/audit?limit=3&who=admin") as r:
        page = await r.json()

    assert r.status == 200
    assert stub_store.audit_queries == [(3, "admin")]
    assert page["items"][0]["path"] == "/v1/tokens"


async def test_malformed_json_is_a_400_problem(client):
    async with client.post(
        "/v1/tokens", data=b"{not json", headers={"Content-Type": "application/json"}
    ) as r:
        problem = await r.json(content_type=None)

    assert r.status == 400
    assert problem["reason"] == "malformed_json"


async def test_the_role_is_checked_before_the_body_and_a_refusal_is_audited(client, stub_store):
    async with client.post(
        "/v1/tokens", json={"bad": 1}, headers={"Authorization": "Bearer t-viewer"}
    ) as r:
        problem = await r.json(content_type=None)

    assert r.status == 403
    assert problem["reason"] == "forbidden"
    assert [(e["who"], e["status"]) for e in stub_store.audit] == [("viewer", 403)]


async def test_no_token_is_401_before_validation(client):
    async with client.post("/v1/tokens", json={"bad": 1}, headers={"Authorization": ""}) as r:
        problem = await r.json(content_type=None)

    assert r.status == 401
    assert problem["reason"] == "unauthorized"


async def test_a_refused_mutation_is_audited_with_its_status(client, stub_store):
    async with client.post("/v1/tokens", json={"name": "eve"}) as r:
        assert r.status == 422

    assert [(e["method"], e["path"], e["status"]) for e in stub_store.audit] == [
        ("POST", "/v1/tokens", 422)
    ]


def test_a_handler_must_take_the_body_its_route_declares():
    table = RouteTable()

    with pytest.raises(TypeError, match="must take body: TokenCreate"):

        @table.route("POST", "/v1/x", roles=ANY, summary="x", body=TokenCreate)
        async def no_body(request: web.Request) -> web.Response:
            raise AssertionError

    assert list(table) == []


def test_a_handler_may_not_take_a_query_its_route_does_not_declare():
    table = RouteTable()

    with pytest.raises(TypeError, match="takes query but its route declares none"):

        @table.route("GET", "/v1/x", roles=ANY, summary="x")
        async def stray_query(request: web.Request, query: TokenCreate) -> web.Response:
            raise AssertionError


async def test_a_repeated_query_parameter_is_422_naming_it(client):
    async with client.get("/v1/audit?limit=1&limit=2&who=a") as r:
        problem = await r.json(content_type=None)

    assert r.status == 422
    assert [(e["field"], e["type"]) for e in problem["errors"]] == [("query.limit", "repeated")]


async def test_a_path_parameter_breaking_its_model_is_422_and_documented(client):
    async with client.get("/v1/ips/10.0.0.256") as r:
        problem = await r.json(content_type=None)
    ip = next(p for p in DOC["paths"]["/v1/ips/{ip}"]["get"]["parameters"] if p["name"] == "ip")

    assert r.status == 422
    assert [e["field"] for e in problem["errors"]] == ["path.ip"]
    assert ip["schema"] == {"format": "ipv4", "title": "Ip", "type": "string"}
