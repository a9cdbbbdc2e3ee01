"""The ``/v1`` routes: machines, apps, hosts, pools, IPs, images, tokens and the audit log.

Handlers are thin: they validate, call the saga driver or the store, and shape the answer.
Queries that belong to another service (pools, IP history, metrics, sync jobs) go over RPC.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from ipaddress import IPv4Address
from typing import Any, Protocol

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

from libs.common.contracts import Message, ipam
from libs.common.contracts import imagesync as isync
from libs.common.contracts import monitor as mon
from libs.common.errors import ConflictError, DomainError, NotFoundError, TransientError

from ..domain import State, largest
from ..domain.models import (
    Accepted,
    AcceptedMachine,
    ActionAccepted,
    AppScale,
    AuditPage,
    HostOut,
    IpInfo,
    MachineCreate,
    MachineOut,
    MachinePage,
    MachinePatch,
    MachineQuery,
    PoolCreateBody,
    PoolPatchBody,
    ScaleResult,
    TokenCreate,
    TokenCreated,
    TokenOut,
    WaitQuery,
)
from ..sagas import SagaDriver, host_views
from ..settings import GatewaySettings
from ..store import GatewayStore, now
from .framework import (
    ADMIN,
    ANY,
    OPS,
    Api,
    FieldErrors,
    json_response,
    parse_body,
    parse_query,
)

__all__ = ["GatewayState", "Rpc", "build_api", "machine_out"]


class Rpc(Protocol):
    """Port: request/reply over the bus."""

    async def request(
        self, msg: Message, *, routing_key: str | None = None, timeout: float = 10.0
    ) -> Message:
        """Send ``msg`` and return the reply."""
        ...


@dataclass
class GatewayState:
    """What the route handlers use."""

    store: GatewayStore
    driver: SagaDriver
    rpc: Rpc
    settings: GatewaySettings


def machine_out(doc: dict[str, Any]) -> MachineOut:
    """The API view of a machine document."""
    mid = doc["_id"]
    return MachineOut(
        id=mid,
        type=doc["type"],
        app=doc["app"],
        state=doc["state"],
        reason=doc.get("reason"),
        image=doc["image"],
        cpus=doc["cpus"],
        memory=doc["memory"],
        disk=doc["disk"],
        dc=doc["dc"],
        vlan_id=doc["vlan_id"],
        hostname=doc["hostname"],
        ip=doc.get("ip"),
        host=doc.get("host"),
        pending=(doc.get("saga") or {}).get("op"),
        created_at=doc["created_at"],
        updated_at=doc["updated_at"],
        transitions=doc.get("transitions") or [],
        links=_links(mid),
    )


def _links(mid: str) -> dict[str, str]:
    return {"self": f"/v1/machines/{mid}"}


class _Empty(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _PoolQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")
    dc: str | None = None


class _AuditQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")
    limit: int = Field(default=100, ge=1, le=1000)
    who: str | None = None


class _MetricsQuery(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    from_: datetime | None = Field(default=None, alias="from")
    to: datetime | None = None
    step: str = "1m"


class _SyncJobsQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")
    state: str | None = None
    repo: str | None = None
    limit: int = Field(default=100, ge=1, le=1000)


class _ActionQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")
    wait: float = Field(default=0, ge=0, le=3600)


def build_api(state: GatewayState) -> Api:
    """Declare every route on a new :class:`Api`."""
    api = Api(state.store)
    store, driver, settings = state.store, state.driver, state.settings

    async def rpc(msg: Message, routing_key: str | None = None) -> Message:
        try:
            return await state.rpc.request(
                msg, routing_key=routing_key, timeout=settings.rpc_timeout_s
            )
        except TransientError as err:
            raise TransientError(f"{msg.TYPE}: {err}") from err

    # --- machines ---------------------------------------------------------------------------

    async def check_create(spec: MachineCreate) -> None:
        """Context checks after the schema: capacity of the largest host, pool existence."""
        errors: list[dict[str, Any]] = []
        views = host_views(await store.list_hosts(), {}, settings, now())
        big = largest(views, spec.dc)
        if big is not None:
            for name, want, have in (
                ("cpus", spec.cpus, big.cpus),
                ("memory", spec.memory, big.memory),
                ("disk", spec.disk, big.disk),
            ):
                if want > have:
                    errors.append(
                        {"field": name, "type": "too_large",
                         "message": f"{want} exceeds the largest host of {spec.dc} ({have})"}
                    )
        try:
            listing = await rpc(ipam.PoolList(dc=spec.dc))
        except TransientError:
            listing = None  # ipam is slow or down: the ip step will fail with its reason
        if isinstance(listing, ipam.PoolListing) and not any(
            p.vlan_id == spec.vlan_id for p in listing.pools
        ):
            errors.append(
                {"field": "vlan_id", "type": "unknown_pool",
                 "message": f"no pool on vlan {spec.vlan_id} in dc {spec.dc}"}
            )
        if errors:
            raise FieldErrors(errors)

    @api.route("POST", "/v1/machines", roles=OPS, summary="Create machines", body=MachineCreate,
               query=WaitQuery, response=Accepted, status=202, errors=(409,))
    async def create_machines(request: web.Request) -> web.Response:
        spec = await parse_body(request, MachineCreate)
        wait = parse_query(request, WaitQuery).wait
        key = request.headers.get("Idempotency-Key")
        ids = driver.new_ids(spec.count)
        fingerprint = hashlib.sha256(spec.model_dump_json().encode()).hexdigest()
        earlier = None
        if key:
            if len(key) > 200:
                raise FieldErrors([{"field": "header.Idempotency-Key", "type": "too_long",
                                    "message": "at most 200 characters"}])
            earlier = await store.get_idempotency(key)
        if earlier is None:
            await check_create(spec)
            if key:
                earlier = await store.claim_idempotency(key, fingerprint, ids)
        if earlier is not None:
            if earlier["fingerprint"] != fingerprint:
                raise ConflictError(
                    "this Idempotency-Key was used with a different request",
                    reason="idempotency_key_reused",
                )
            ids = earlier["ids"]
        docs = await driver.create(spec.model_dump(mode="json"), ids)
        request["audit_target"] = ",".join(ids)
        if wait:
            docs = await driver.wait_terminal(ids, min(wait, settings.wait_max_s))
        return json_response(
            Accepted(
                machines=[AcceptedMachine(id=d["_id"], state=d["state"], links=_links(d["_id"]))
                          for d in docs],
                idempotency_key=key,
            ),
            status=202,
        )

    @api.route("GET", "/v1/machines", roles=ANY, summary="List machines", query=MachineQuery,
               response=MachinePage)
    async def list_machines(request: web.Request) -> web.Response:
        q = parse_query(request, MachineQuery)
        filters: dict[str, Any] = {}
        if q.app:
            filters["app"] = q.app
        if q.state:
            if q.state not in State.__members__.values():
                raise FieldErrors([{"field": "query.state", "type": "enum",
                                    "message": f"one of {', '.join(s.value for s in State)}"}])
            filters["state"] = q.state
        if q.host:
            if q.host not in {h["_id"] for h in await store.list_hosts()}:
                raise FieldErrors([{"field": "query.host", "type": "unknown_host",
                                    "message": f"no host {q.host}"}])
            filters["host"] = q.host
        if q.ip:
            filters["ip"] = _ip(q.ip, "query.ip")
        if q.ids:
            filters["_id"] = {"$in": [i for i in q.ids.split(",") if i]}
        docs = await store.find(filters, q.limit + 1, q.after)
        page = docs[: q.limit]
        nxt = page[-1]["_id"] if len(docs) > q.limit else None
        return json_response(MachinePage(items=[machine_out(d) for d in page], next=nxt))

    @api.route("GET", "/v1/machines/{id}", roles=ANY, summary="Show a machine",
               response=MachineOut, errors=(404,))
    async def show_machine(request: web.Request) -> web.Response:
        doc = await store.get(request.match_info["id"])
        if doc is None:
            mid = request.match_info["id"]
            raise NotFoundError(f"no machine {mid}", reason="machine_not_found")
        return json_response(machine_out(doc))

    def action_route(action: str) -> None:
        async def handler(request: web.Request) -> web.Response:
            wait = parse_query(request, _ActionQuery).wait
            mid = request.match_info["id"]
            doc, op_id = await driver.begin_action(mid, action)
            status = 202
            if wait:
                last = await driver.wait_op(mid, op_id, min(wait, settings.wait_max_s))
                if last is not None and not last.get("ok"):
                    raise ConflictError(f"{action} failed: {last.get('reason')}",
                                        reason=f"{action}_failed")
                status = 200 if last is not None else 202
                doc = await store.get(mid) or doc
            return json_response(
                ActionAccepted(id=mid, action=action, state=doc["state"], links=_links(mid)),
                status=status,
            )

        handler.__name__ = f"{action}_machine"
        api.route("POST", f"/v1/machines/{{id}}/{action}", roles=OPS,
                  summary=f"{action.capitalize()} a machine", query=_ActionQuery,
                  response=ActionAccepted, status=202, errors=(404, 409))(handler)

    for _action in ("start", "stop", "restart"):
        action_route(_action)

    @api.route("PATCH", "/v1/machines/{id}", roles=OPS, summary="Resize a machine live",
               body=MachinePatch, response=MachineOut, errors=(404, 409))
    async def resize_machine(request: web.Request) -> web.Response:
        patch = await parse_body(request, MachinePatch)
        mid = request.match_info["id"]
        _, op_id = await driver.begin_resize(mid, patch.cpus, patch.memory, patch.disk, patch.force)
        last = await driver.wait_op(mid, op_id, settings.resize_wait_s)
        if last is not None and not last.get("ok"):
            detail = f": {last['detail']}" if last.get("detail") else ""
            raise ConflictError(f"resize refused: {last.get('reason')}{detail}",
                                reason=last.get("reason") or "resize_failed")
        doc = await store.get(mid)
        assert doc is not None
        return json_response(machine_out(doc), status=200 if last is not None else 202)

    @api.route("DELETE", "/v1/machines/{id}", roles=OPS, summary="Destroy a machine",
               query=_ActionQuery, response=ActionAccepted, status=202, errors=(404, 409))
    async def delete_machine(request: web.Request) -> web.Response:
        wait = parse_query(request, _ActionQuery).wait
        mid = request.match_info["id"]
        doc = await driver.begin_destroy(mid)
        if wait:
            docs = await driver.wait_terminal([mid], min(wait, settings.wait_max_s))
            doc = docs[0] if docs else doc
        return json_response(
            ActionAccepted(id=mid, action="destroy", state=doc["state"], links=_links(mid)),
            status=202,
        )

    # --- apps -------------------------------------------------------------------------------

    @api.route("POST", "/v1/apps/{app}/scale", roles=OPS, summary="Scale an app", body=AppScale,
               response=ScaleResult, errors=(404,))
    async def scale_app(request: web.Request) -> web.Response:
        body = await parse_body(request, AppScale)
        name = request.match_info["app"]
        app = await store.get_app(name)
        if app is None:
            raise FieldErrors([{"field": "app", "type": "unknown_app",
                                "message": f"no app {name}: create its first machine first"}])
        active = await store.app_machines(name)
        created: list[str] = []
        destroying: list[str] = []
        if body.count > len(active):
            ids = driver.new_ids(body.count - len(active))
            await driver.create({**app["spec"], "count": len(ids)}, ids)
            created = ids
        elif body.count < len(active):
            excess = len(active) - body.count
            by_id = {d["_id"]: d for d in active}
            unknown = [i for i in body.ids or [] if i not in by_id]
            if unknown:
                raise FieldErrors([{"field": "ids", "type": "unknown_machine",
                                    "message": f"not active machines of {name}: {unknown}"}])
            chosen = list(dict.fromkeys(body.ids or []))[:excess]
            # The newest go first (ids sort by creation time).
            for doc in sorted(active, key=lambda d: d["_id"], reverse=True):
                if len(chosen) >= excess:
                    break
                if doc["_id"] not in chosen:
                    chosen.append(doc["_id"])
            for mid in chosen:
                try:
                    await driver.begin_destroy(mid)
                    destroying.append(mid)
                except DomainError:
                    continue
        request["audit_target"] = name
        return json_response(
            ScaleResult(app=name, count=body.count, created=created, destroying=destroying)
        )

    # --- hosts ------------------------------------------------------------------------------

    @api.route("GET", "/v1/hosts", roles=ANY, summary="List hosts", response=None)
    async def list_hosts(request: web.Request) -> web.Response:
        hosts = await store.list_hosts()
        at = now()
        out = []
        for dc in sorted({h["dc"] for h in hosts}):
            allocs = await store.allocations(dc)
            for view, h in zip(
                host_views([h for h in hosts if h["dc"] == dc], allocs, settings, at),
                [h for h in hosts if h["dc"] == dc],
                strict=True,
            ):
                out.append(
                    HostOut(
                        id=view.host_id,
                        dc=dc,
                        status=view.status,
                        last_seen=h["last_seen"],
                        capacity={"cpus": view.capacity.cpus, "memory": view.capacity.memory,
                                  "disk": view.capacity.disk},
                        allocated={"cpus": view.allocated.cpus, "memory": view.allocated.memory,
                                   "disk": view.allocated.disk},
                        machines=h.get("machines", 0),
                        labels=h.get("labels") or {},
                        version=h.get("version"),
                    ).model_dump(mode="json")
                )
        return json_response({"items": out})

    # --- pools and IPs ----------------------------------------------------------------------

    @api.route("POST", "/v1/pools", roles=OPS, summary="Create a pool", body=PoolCreateBody,
               status=201, errors=(409, 503))
    async def create_pool(request: web.Request) -> web.Response:
        body = await parse_body(request, PoolCreateBody)
        try:
            cmd = ipam.PoolCreate.model_validate(body.model_dump())
        except ValueError as err:
            raise DomainError(str(err), reason="invalid") from err
        reply = await rpc(cmd)
        request["audit_target"] = body.name
        if isinstance(reply, ipam.PoolRejected):
            if reply.reason in _POOL_INPUT_REASONS:
                field = _POOL_INPUT_REASONS[reply.reason]
                raise FieldErrors([{"field": field, "type": reply.reason,
                                    "message": reply.detail or reply.reason}])
            raise ConflictError(f"pool rejected: {reply.reason}: {reply.detail}",
                                reason=reply.reason)
        return json_response({"name": body.name, "status": "created"}, status=201)

    def _pool_outcome(reply: Message, name: str) -> None:
        if not isinstance(reply, ipam.PoolRejected):
            return
        if reply.reason == "unknown_pool":
            raise NotFoundError(f"no pool {name}", reason="pool_not_found")
        if reply.reason in _POOL_INPUT_REASONS:
            # The body model already bounds cooldown_s: what ipam can find wrong is reserved.
            raise FieldErrors([{"field": "reserved", "type": reply.reason,
                                "message": reply.detail or reply.reason}])
        raise ConflictError(f"pool {name}: {reply.reason}: {reply.detail}", reason=reply.reason)

    @api.route("PATCH", "/v1/pools/{name}", roles=OPS, summary="Change a pool's reserved "
               "addresses or cooldown", body=PoolPatchBody, errors=(404, 409, 503))
    async def patch_pool(request: web.Request) -> web.Response:
        name = request.match_info["name"]
        body = await parse_body(request, PoolPatchBody)
        request["audit_target"] = name
        reply = await rpc(ipam.PoolUpdate(name=name, reserved=body.reserved,
                                          cooldown_s=body.cooldown_s))
        _pool_outcome(reply, name)
        return json_response({"name": name, "status": "updated"})

    @api.route("DELETE", "/v1/pools/{name}", roles=OPS, summary="Delete a pool without leases",
               errors=(404, 409, 503))
    async def delete_pool(request: web.Request) -> web.Response:
        name = request.match_info["name"]
        request["audit_target"] = name
        _pool_outcome(await rpc(ipam.PoolDelete(name=name)), name)
        return json_response({"name": name, "status": "deleted"})

    @api.route("GET", "/v1/pools", roles=ANY, summary="List pools with usage", query=_PoolQuery)
    async def list_pools(request: web.Request) -> web.Response:
        q = parse_query(request, _PoolQuery)
        reply = await rpc(ipam.PoolList(dc=q.dc))
        assert isinstance(reply, ipam.PoolListing)
        return json_response(reply.model_dump(mode="json"))

    @api.route("GET", "/v1/ips/{ip}", roles=ANY, summary="Owner and history of an IP",
               response=IpInfo)
    async def show_ip(request: web.Request) -> web.Response:
        ip = _ip(request.match_info["ip"], "ip")
        docs = await store.machines_on_ip(ip)
        owner = next((d for d in reversed(docs) if d["state"] not in ("destroyed", "failed")), None)
        history = [
            {"machine_id": d["_id"], "app": d["app"], "state": d["state"],
             "from": d["created_at"],
             "until": d["updated_at"] if d["state"] == "destroyed" else None}
            for d in docs
        ]
        lease = None
        try:
            info = await rpc(ipam.IpLookup(ip=IPv4Address(ip)))
            lease = info.model_dump(mode="json")
        except TransientError:
            lease = None
        return json_response(
            IpInfo(ip=ip, owner=machine_out(owner) if owner else None, history=history, lease=lease)
        )

    @api.route("GET", "/v1/ips/{ip}/metrics", roles=ANY, summary="Metrics history of an IP",
               query=_MetricsQuery)
    async def ip_metrics(request: web.Request) -> web.Response:
        ip = _ip(request.match_info["ip"], "ip")
        q = parse_query(request, _MetricsQuery)
        to = q.to or datetime.now(UTC)
        frm = q.from_ or to - timedelta(hours=1)
        try:
            query = mon.MetricsQuery(ip=IPv4Address(ip), from_=frm, to=to, step=q.step)
        except ValueError as err:
            raise FieldErrors([{"field": "query", "type": "invalid", "message": str(err)}]) from err
        reply = await rpc(query, routing_key=mon.MetricsQuery.TYPE)
        return json_response(reply.model_dump(mode="json", by_alias=True))

    @api.route("GET", "/v1/images/sync-jobs", roles=ANY, summary="Image replication jobs",
               query=_SyncJobsQuery)
    async def sync_jobs(request: web.Request) -> web.Response:
        q = parse_query(request, _SyncJobsQuery)
        try:
            cmd = isync.SyncJobsList(state=q.state, repo=q.repo, limit=q.limit)
        except ValueError as err:
            raise FieldErrors([{"field": "query", "type": "invalid", "message": str(err)}]) from err
        reply = await rpc(cmd)
        return json_response(reply.model_dump(mode="json"))

    # --- tokens and audit -------------------------------------------------------------------

    @api.route("POST", "/v1/tokens", roles=ADMIN, summary="Create a token", body=TokenCreate,
               response=TokenCreated, status=201)
    async def create_token(request: web.Request) -> web.Response:
        body = await parse_body(request, TokenCreate)
        secret = f"dvm_{secrets.token_urlsafe(32)}"
        doc = await store.add_token(secret, body.name, body.role)
        request["audit_target"] = doc["_id"]
        return json_response(
            TokenCreated(id=doc["_id"], name=doc["name"], role=doc["role"],
                         created_at=doc["created_at"], token=secret),
            status=201,
        )

    @api.route("GET", "/v1/tokens", roles=ADMIN, summary="List tokens")
    async def list_tokens(request: web.Request) -> web.Response:
        docs = await store.list_tokens()
        return json_response({"items": [
            TokenOut(id=d["_id"], name=d["name"], role=d["role"], created_at=d["created_at"],
                     revoked=d.get("revoked", False)).model_dump(mode="json")
            for d in docs
        ]})

    @api.route("DELETE", "/v1/tokens/{id}", roles=ADMIN, summary="Revoke a token", status=204,
               errors=(404,))
    async def revoke_token(request: web.Request) -> web.Response:
        if not await store.revoke_token(request.match_info["id"]):
            raise NotFoundError(f"no token {request.match_info['id']}", reason="token_not_found")
        return web.Response(status=204)

    @api.route("GET", "/v1/audit", roles=OPS, summary="Read the audit log", query=_AuditQuery,
               response=AuditPage)
    async def audit(request: web.Request) -> web.Response:
        q = parse_query(request, _AuditQuery)
        docs = await store.audit_list(q.limit, q.who)
        return json_response(AuditPage(items=docs))  # type: ignore[arg-type]

    return api


# Rejections that are bad input (422 on a field) rather than a conflict with existing pools.
_POOL_INPUT_REASONS = {
    "invalid_cidr": "cidr",
    "invalid_gateway": "gateway",
    "gateway_outside": "gateway",
    "invalid_reserved": "reserved",
    "invalid": "cidr",
}


def _ip(raw: str, field: str) -> str:
    try:
        return str(IPv4Address(raw))
    except ValueError as err:
        raise FieldErrors(
            [{"field": field, "type": "ip", "message": f"{raw!r} is not an IPv4 address"}]
        ) from err

