"""The API's route table and its generated OpenAPI document (no server, no I/O)."""

from __future__ import annotations

import pytest

from services.gateway.api import GatewayState, build_api
from services.gateway.settings import GatewaySettings


@pytest.fixture(scope="module")
def doc() -> dict:
    state = GatewayState(store=None, driver=None, rpc=None, settings=GatewaySettings())  # type: ignore[arg-type]
    return build_api(state).openapi()


@pytest.mark.parametrize(
    ("method", "path", "roles"),
    [
        ("post", "/v1/machines", ["admin", "ops"]),
        ("get", "/v1/machines", ["admin", "ops", "release", "viewer"]),
        ("get", "/v1/machines/{id}", ["admin", "ops", "release", "viewer"]),
        ("patch", "/v1/machines/{id}", ["admin", "ops"]),
        ("delete", "/v1/machines/{id}", ["admin", "ops"]),
        ("post", "/v1/machines/{id}/start", ["admin", "ops"]),
        ("post", "/v1/machines/{id}/stop", ["admin", "ops"]),
        ("post", "/v1/machines/{id}/restart", ["admin", "ops"]),
        ("post", "/v1/apps/{app}/scale", ["admin", "ops"]),
        ("get", "/v1/hosts", ["admin", "ops", "release", "viewer"]),
        ("get", "/v1/hosts/{id}", ["admin", "ops", "release", "viewer"]),
        ("post", "/v1/hosts/{id}/orphans/{machine_id}/purge", ["admin", "ops"]),
        ("post", "/v1/pools", ["admin", "ops"]),
        ("get", "/v1/pools", ["admin", "ops", "release", "viewer"]),
        ("patch", "/v1/pools/{name}", ["admin", "ops"]),
        ("delete", "/v1/pools/{name}", ["admin", "ops"]),
        ("get", "/v1/ips/{ip}", ["admin", "ops", "release", "viewer"]),
        ("post", "/v1/tokens", ["admin"]),
        ("delete", "/v1/tokens/{id}", ["admin"]),
        ("get", "/v1/audit", ["admin", "ops"]),
    ],
)
def test_every_route_is_documented_with_its_roles(doc, method, path, roles):
    assert doc["paths"][path][method]["x-roles"] == roles


def test_request_models_forbid_unknown_fields_in_the_schema(doc):
    schemas = doc["components"]["schemas"]

    assert schemas["MachineCreate"]["additionalProperties"] is False
    assert schemas["MachinePatch"]["additionalProperties"] is False
    assert set(schemas["MachineCreate"]["required"]) == {
        "app", "image", "cpus", "memory", "disk", "dc", "vlan_id"}


def test_errors_are_problem_documents(doc):
    post = doc["paths"]["/v1/machines"]["post"]["responses"]

    assert post["422"]["content"]["application/problem+json"]["schema"] == {
        "$ref": "#/components/schemas/Problem"}
    assert {"202", "401", "403", "409", "422"} <= set(post)
