"""The ``/v1/machines`` routes: create, list, show, start/stop/restart, resize and destroy.

Creation checks what the schema cannot (the largest host's capacity, the pool's existence) and
honours an ``Idempotency-Key``; everything else is one call to the saga driver or the store.
"""

from __future__ import annotations

import hashlib
from typing import Any

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

from libs.common.clock import utcnow
from libs.common.contracts import ipam
from libs.common.errors import ConflictError, NotFoundError, TransientError

from ..domain import largest
from ..domain.models import (
    Accepted,
    AcceptedMachine,
    ActionAccepted,
    MachineCreate,
    MachineOut,
    MachinePage,
    MachinePatch,
    MachineQuery,
    WaitQuery,
)
from ..service import host_views
from .deps import DRIVER, SETTINGS, STORE, rpc_call
from .framework import ANY, AUDIT_TARGET, OPS, FieldErrors, RouteTable, json_response
from .limits import check_disk, disk_errors
from .policy import BUILT
from .scopes import machine_app
from .views import ipv4, machine_links, machine_out, summary_out

__all__ = ["ActionQuery", "routes"]

routes = RouteTable()


class ActionQuery(BaseModel):
    """``?wait=<seconds>`` on an action or a destroy."""

    model_config = ConfigDict(extra="forbid")
    wait: float = Field(default=0, ge=0, le=3600)


async def _capacity_errors(request: web.Request, spec: MachineCreate) -> list[dict[str, Any]]:
    """Resources larger than the dc's largest host (no host could ever take the machine)."""
    app = request.app
    views = host_views(await app[STORE].list_hosts(), {}, app[SETTINGS], utcnow())
    big = largest(views, spec.dc)
    if big is None:
        return []
    return [
        {
            "field": name,
            "type": "too_large",
            "message": f"{want} exceeds the largest host of {spec.dc} ({have})",
        }
        for name, want, have in (
            ("cpus", spec.cpus, big.cpus),
            ("memory", spec.memory, big.memory),
            ("disk", spec.disk, big.disk),
        )
        if want > have
    ]


async def _pool_errors(request: web.Request, spec: MachineCreate) -> list[dict[str, Any]]:
    """The VLAN has no pool in the dc (asked of ipam)."""
    try:
        listing = await rpc_call(request, ipam.PoolList(dc=spec.dc))
    except TransientError:
        return []  # ipam is slow or down: the ip step will fail with its reason
    if isinstance(listing, ipam.PoolListing) and not any(
        p.vlan_id == spec.vlan_id for p in listing.pools
    ):
        return [
            {
                "field": "vlan_id",
                "type": "unknown_pool",
                "message": f"no pool on vlan {spec.vlan_id} in dc {spec.dc}",
            }
        ]
    return []


async def _check_create(request: web.Request, spec: MachineCreate) -> None:
    """Context checks after the schema: capacity of the largest host, the hosts' smallest
    disk, pool existence."""
    errors = (
        await _capacity_errors(request, spec)
        + await disk_errors(request, spec.disk, spec.dc)
        + await _pool_errors(request, spec)
    )
    if errors:
        raise FieldErrors(errors)
    # 409 when the dc cannot hold the batch: nothing stored, no IP taken.
    await request.app[DRIVER].creates.check_fits(spec.model_dump(mode="json"), spec.count)


async def _machine_ids(request: web.Request, spec: MachineCreate) -> list[str]:
    """Fresh ids, or those an earlier request with the same Idempotency-Key was given."""
    store = request.app[STORE]
    key = request.headers.get("Idempotency-Key")
    ids = request.app[DRIVER].new_ids(spec.count)
    fingerprint = hashlib.sha256(spec.model_dump_json().encode()).hexdigest()
    earlier = None
    if key:
        if len(key) > 200:
            raise FieldErrors.one("header.Idempotency-Key", "too_long", "at most 200 characters")
        earlier = await store.get_idempotency(key)
    if earlier is None:
        await _check_create(request, spec)
        if key:
            earlier = await store.claim_idempotency(key, fingerprint, ids)
    if earlier is None:
        return ids
    if earlier["fingerprint"] != fingerprint:
        raise ConflictError(
            "this Idempotency-Key was used with a different request",
            reason="idempotency_key_reused",
        )
    return earlier["ids"]


@routes.route(
    "POST",
    "/v1/machines",
    roles=OPS,
    summary="Create machines",
    body=MachineCreate,
    query=WaitQuery,
    response=Accepted,
    status=202,
    errors=(409,),
)
async def create_machines(
    request: web.Request, body: MachineCreate, query: WaitQuery
) -> web.Response:
    """Start the creation saga of ``count`` machines (and wait for them if asked)."""
    driver = request.app[DRIVER]
    if request.app[SETTINGS].require_built_images:
        await request.app[BUILT].check(body.image)
    ids = await _machine_ids(request, body)
    docs = await driver.create(body.model_dump(mode="json"), ids)
    request[AUDIT_TARGET] = ",".join(ids)
    if query.wait:
        docs = await driver.wait_terminal(ids, min(query.wait, request.app[SETTINGS].wait_max_s))
    return json_response(
        Accepted(
            machines=[
                AcceptedMachine(id=d["_id"], state=d["state"], links=machine_links(d["_id"]))
                for d in docs
            ],
            idempotency_key=request.headers.get("Idempotency-Key"),
        ),
        status=202,
    )


async def _machine_filters(request: web.Request, q: MachineQuery) -> dict[str, Any]:
    """The store filter of a listing; values the schema cannot check are checked here."""
    filters: dict[str, Any] = {}
    if q.app:
        filters["app"] = q.app
    if q.state:
        filters["state"] = q.state.value
    if q.host:
        if q.host not in {h["_id"] for h in await request.app[STORE].list_hosts()}:
            raise NotFoundError(f"no host {q.host}", reason="host_not_found")
        filters["host"] = q.host
    if q.ip:
        filters["ip"] = ipv4(q.ip, "query.ip")
    if q.ids:
        filters["_id"] = {"$in": [i for i in q.ids.split(",") if i]}
    return filters


@routes.route(
    "GET",
    "/v1/machines",
    roles=ANY,
    summary="List machines",
    query=MachineQuery,
    response=MachinePage,
    errors=(404,),
)
async def list_machines(request: web.Request, query: MachineQuery) -> web.Response:
    """One page of machines matching the filters, in id (creation) order, from their summaries
    (a list item has no transitions: ``GET /v1/machines/{id}`` has them)."""
    filters = await _machine_filters(request, query)
    docs = await request.app[STORE].summaries(filters, query.limit + 1, query.after)
    page = docs[: query.limit]
    nxt = page[-1]["_id"] if len(docs) > query.limit else None
    return json_response(MachinePage(items=[summary_out(d) for d in page], next=nxt))


@routes.route(
    "GET",
    "/v1/machines/{id}",
    roles=ANY,
    summary="Show a machine",
    response=MachineOut,
    owner=machine_app,
    errors=(404,),
)
async def show_machine(request: web.Request) -> web.Response:
    """One machine, with its transitions."""
    mid = request.match_info["id"]
    doc = await request.app[STORE].get(mid)
    if doc is None:
        raise NotFoundError(f"no machine {mid}", reason="machine_not_found")
    return json_response(machine_out(doc))


async def _act(request: web.Request, query: ActionQuery, action: str) -> web.Response:
    """Begin ``action`` on the machine; with ``wait``, 200 once done or 409 if it failed."""
    driver, mid = request.app[DRIVER], request.match_info["id"]
    doc, op_id = await driver.begin_action(mid, action)
    status = 202
    if query.wait:
        wait = min(query.wait, request.app[SETTINGS].wait_max_s)
        last = await driver.wait_op(mid, op_id, wait)
        if last is not None and not last.get("ok"):
            raise ConflictError(f"{action} failed: {last.get('reason')}", reason=f"{action}_failed")
        status = 200 if last is not None else 202
        doc = await request.app[STORE].get(mid) or doc
    return json_response(
        ActionAccepted(id=mid, action=action, state=doc["state"], links=machine_links(mid)),
        status=status,
    )


@routes.route(
    "POST",
    "/v1/machines/{id}/start",
    roles=OPS,
    summary="Start a machine",
    query=ActionQuery,
    response=ActionAccepted,
    status=202,
    owner=machine_app,
    errors=(404, 409),
)
async def start_machine(request: web.Request, query: ActionQuery) -> web.Response:
    """Start a stopped machine."""
    return await _act(request, query, "start")


@routes.route(
    "POST",
    "/v1/machines/{id}/stop",
    roles=OPS,
    summary="Stop a machine",
    query=ActionQuery,
    response=ActionAccepted,
    status=202,
    owner=machine_app,
    errors=(404, 409),
)
async def stop_machine(request: web.Request, query: ActionQuery) -> web.Response:
    """Stop a running machine (it keeps its IP)."""
    return await _act(request, query, "stop")


@routes.route(
    "POST",
    "/v1/machines/{id}/restart",
    roles=OPS,
    summary="Restart a machine",
    query=ActionQuery,
    response=ActionAccepted,
    status=202,
    owner=machine_app,
    errors=(404, 409),
)
async def restart_machine(request: web.Request, query: ActionQuery) -> web.Response:
    """Restart a machine."""
    return await _act(request, query, "restart")


@routes.route(
    "PATCH",
    "/v1/machines/{id}",
    roles=OPS,
    summary="Resize a machine live",
    body=MachinePatch,
    response=MachineOut,
    owner=machine_app,
    errors=(404, 409),
)
async def resize_machine(request: web.Request, body: MachinePatch) -> web.Response:
    """Resize live; 200 once applied, 409 if refused, 202 if still under way."""
    driver, mid = request.app[DRIVER], request.match_info["id"]
    if body.disk is not None and (machine := await request.app[STORE].get(mid)) is not None:
        await check_disk(request, body.disk, machine["dc"])
    _, op_id = await driver.begin_resize(mid, body.cpus, body.memory, body.disk, body.force)
    last = await driver.wait_op(mid, op_id, request.app[SETTINGS].resize_wait_s)
    if last is not None and not last.get("ok"):
        detail = f": {last['detail']}" if last.get("detail") else ""
        raise ConflictError(
            f"resize refused: {last.get('reason')}{detail}",
            reason=last.get("reason") or "resize_failed",
        )
    doc = await request.app[STORE].get(mid)
    if doc is None:
        # A destroy that finished while the resize was waited for.
        raise NotFoundError(f"machine {mid} was destroyed meanwhile", reason="machine_not_found")
    return json_response(machine_out(doc), status=200 if last is not None else 202)


@routes.route(
    "DELETE",
    "/v1/machines/{id}",
    roles=OPS,
    summary="Destroy a machine",
    query=ActionQuery,
    response=ActionAccepted,
    status=202,
    owner=machine_app,
    errors=(404, 409),
)
async def delete_machine(request: web.Request, query: ActionQuery) -> web.Response:
    """Begin destroying a machine (and wait for it if asked)."""
    driver, mid = request.app[DRIVER], request.match_info["id"]
    doc = await driver.begin_destroy(mid)
    if query.wait:
        docs = await driver.wait_terminal([mid], min(query.wait, request.app[SETTINGS].wait_max_s))
        doc = docs[0] if docs else doc
    return json_response(
        ActionAccepted(id=mid, action="destroy", state=doc["state"], links=machine_links(mid)),
        status=202,
    )
