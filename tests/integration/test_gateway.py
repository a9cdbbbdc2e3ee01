"""The gateway as a real subprocess on the real RabbitMQ and MongoDB API.

Its peers (ipam, the provisioner agents, the legacy KVM system) are played by :class:`Peers`,
a small bus-level stand-in that answers the gateway's commands the way the contracts say; the
end-to-end test (test_e2e.py) runs the real ones.
"""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aio_pika
import aiohttp
import pytest

from libs.common.bus import EXCHANGE, AmqpPublisher
from libs.common.contracts import Envelope, ipam, provisioner
from libs.common.contracts import gateway as gw

GIB = 1 << 30
GW_ENV = {
    "DOCKVM_IP_STEP_TIMEOUT_S": "2",
    "DOCKVM_CONTAINER_STEP_TIMEOUT_S": "2",
    "DOCKVM_ACTION_STEP_TIMEOUT_S": "2",
    "DOCKVM_STEP_ATTEMPTS": "2",
    "DOCKVM_SAGA_TICK_S": "0.2",
    "DOCKVM_RESIZE_WAIT_S": "10",
    "DOCKVM_RPC_TIMEOUT_S": "3",
    "DOCKVM_HOST_STALE_S": "3",
    "DOCKVM_HOST_DOWN_S": "4",
    "DOCKVM_HOST_CHECK_S": "0.5",
}
SPEC = {
    "app": "web",
    "image": "127.0.0.1:5001/dockvm/base:bookworm",
    "cpus": 1,
    "memory": "512m",
    "disk": "1g",
    "dc": "dc1",
    "vlan_id": 233,
}


class Peers:
    """Plays ipam, two provisioner agents and the KVM system on the test's vhost."""

    def __init__(self, connection: aio_pika.abc.AbstractRobustConnection, subnet: str) -> None:
        self.connection = connection
        self.publisher = AmqpPublisher(connection, source="peers")
        self.net = ipaddress.ip_network(subnet)
        self.leases: dict[str, str] = {}
        self.free = [str(ip) for ip in list(self.net.hosts())[9:]]
        self.silent_hosts: set[str] = set()
        self.beating: dict[str, asyncio.Task] = {}
        self.min_memory = 256 << 20  # below this a resize is refused without force
        self.commands: list[tuple[str, Envelope]] = []

    async def start(self) -> Peers:
        """Bind the command keys the peers answer."""
        channel = await self.connection.channel()
        self.channel = channel
        exchange = await channel.declare_exchange(
            EXCHANGE, aio_pika.ExchangeType.TOPIC, durable=True
        )
        queue = await channel.declare_queue(exclusive=True, auto_delete=True)
        for key in ("ip.allocate", "ip.allocate_many", "ip.release", "pool.list",
                    "host.*.container.*", "host.*.machines.known", "kvm.machine.*"):
            await queue.bind(exchange, routing_key=key)
        await queue.consume(self._on_message, no_ack=True)
        return self

    def beat(self, host_id: str, cpus: float = 8, memory: int = 16 * GIB, disk: int = 100 * GIB,
             dc: str = "dc1") -> None:
        """Send heartbeats for ``host_id`` every 0.5 s until :meth:`stop_beat`."""

        async def loop() -> None:
            while True:
                await self.publisher.publish(
                    provisioner.HostHeartbeat(
                        host_id=host_id, dc=dc, version="test", at=datetime.now(UTC),
                        capacity=provisioner.Resources(cpus=cpus, memory=memory, disk=disk),
                        allocated=provisioner.Resources(cpus=0, memory=0, disk=0),
                    )
                )
                await asyncio.sleep(0.5)

        self.beating[host_id] = asyncio.create_task(loop())

    def stop_beat(self, host_id: str) -> None:
        """Stop the heartbeats of ``host_id``."""
        self.beating.pop(host_id).cancel()

    async def close(self) -> None:
        """Stop everything."""
        for task in self.beating.values():
            task.cancel()
        await self.publisher.close()
        await self.channel.close()

    def sent(self, type_: str) -> list[Any]:
        """Commands of ``type_`` the gateway sent."""
        return [env.parse() for _, env in self.commands if env.type == type_]

    async def _on_message(self, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        env = Envelope.from_bytes(message.body)
        key = message.routing_key or ""
        self.commands.append((key, env))
        msg = env.parse()
        pub = self.publisher.publish
        if isinstance(msg, ipam.PoolList):
            listing = ipam.PoolListing(pools=[ipam.PoolInfo(
                name="p1", dc="dc1", vlan_id=233, cidr=str(self.net),
                gateway=next(self.net.hosts()), reserved=[], cooldown_s=60,
                usage=ipam.PoolUsage(total=254, allocated=0, cooling=0, reserved=0, free=254),
            )])
            reply = Envelope.wrap(listing, source="peers")
            await self.channel.default_exchange.publish(
                aio_pika.Message(reply.to_bytes(), correlation_id=message.correlation_id),
                routing_key=message.reply_to or "",
            )
        elif isinstance(msg, ipam.IpAllocate):
            await pub(self._lease(msg.machine_id))
        elif isinstance(msg, ipam.IpAllocateMany):
            await pub(ipam.IpAllocatedMany(
                request_id=msg.request_id,
                allocations=[self._lease(mid) for mid in msg.machine_ids],
            ))
        elif isinstance(msg, ipam.IpRelease):
            ip = self.leases.pop(msg.machine_id, None)
            if ip is not None:
                await pub(ipam.IpReleased(machine_id=msg.machine_id, ip=ip, pool="p1"))
        elif key.startswith("host."):
            await self._host(key.split(".")[1], msg)
        elif isinstance(msg, gw.KvmMachineCreate):
            await pub(gw.KvmMachineCreated(machine_id=msg.machine_id, host="kvm-legacy-1"))
        elif isinstance(msg, gw.KvmMachineDestroy):
            await pub(gw.KvmMachineDestroyed(machine_id=msg.machine_id))

    def _lease(self, machine_id: str) -> ipam.IpAllocated:
        ip = self.leases.get(machine_id) or self.free.pop(0)
        self.leases[machine_id] = ip
        return ipam.IpAllocated(
            machine_id=machine_id, ip=ip, prefix_len=self.net.prefixlen,
            gateway=next(self.net.hosts()), vlan_id=233, pool="p1", dc="dc1",
        )

    async def _host(self, host: str, msg: Any) -> None:
        if host in self.silent_hosts:
            return
        pub = self.publisher.publish
        mid = getattr(msg, "machine_id", None)
        if isinstance(msg, provisioner.ContainerCreate):
            await pub(provisioner.ContainerCreated(
                machine_id=mid, container_id=f"c-{mid}", host=host, ip=msg.ip,
                started_at=datetime.now(UTC),
            ))
        elif isinstance(msg, provisioner.ContainerDestroy):
            await pub(provisioner.ContainerDestroyed(machine_id=mid, host=host))
        elif isinstance(msg, provisioner.ContainerResize):
            if msg.memory is not None and msg.memory < self.min_memory and not msg.force:
                await pub(provisioner.ContainerResizeFailed(
                    machine_id=mid, host=host, reason="memory_below_usage",
                    detail=f"usage is {self.min_memory} bytes",
                ))
            else:
                await pub(provisioner.ContainerResized(
                    machine_id=mid, host=host, cpus=msg.cpus or 1, memory=msg.memory or 512 << 20,
                    disk=msg.disk or GIB,
                ))
        elif isinstance(msg, provisioner.ContainerStart | provisioner.ContainerStop
                        | provisioner.ContainerRestart):
            action = msg.TYPE.split(".")[1]
            await pub(provisioner.ContainerActionDone(
                machine_id=mid, host=host, action=action,
                state="exited" if action == "stop" else "running",
            ))


@pytest.fixture
async def peers(amqp) -> AsyncIterator[Peers]:
    """The simulated peers, with two hosts beating."""
    p = await Peers(amqp, "10.233.1.0/24").start()
    p.beat("h1")
    p.beat("h2")
    yield p
    await p.close()


@pytest.fixture
async def gateway(start_service, service_env, peers):
    """The gateway subprocess."""
    return await start_service("gateway", env=GW_ENV)


def _admin_token(service_env: dict[str, str]) -> str:
    return (Path(service_env["DOCKVM_STATE_DIR"]) / "admin.token").read_text().strip()


@pytest.fixture
async def api(gateway, service_env) -> AsyncIterator[aiohttp.ClientSession]:
    """An admin HTTP client of the gateway."""
    headers = {"Authorization": f"Bearer {_admin_token(service_env)}"}
    async with aiohttp.ClientSession(gateway.url, headers=headers) as s:
        await _hosts_known(s, {"h1", "h2"})
        yield s


async def _hosts_known(api: aiohttp.ClientSession, hosts: set[str]) -> None:
    """Wait until the gateway has had a heartbeat from each of ``hosts``."""
    async with asyncio.timeout(10):
        while True:
            async with api.get("/v1/hosts") as r:
                if {h["id"] for h in (await r.json())["items"]} >= hosts:
                    return
            await asyncio.sleep(0.1)


async def _create(api: aiohttp.ClientSession, wait: float = 20, **over: Any) -> dict:
    async with api.post(f"/v1/machines?wait={wait}", json={**SPEC, **over}) as r:
        assert r.status == 202, await r.text()
        return await r.json()


async def _machine(api: aiohttp.ClientSession, mid: str) -> dict:
    async with api.get(f"/v1/machines/{mid}") as r:
        assert r.status == 200
        return await r.json()


async def _until(
    api: aiohttp.ClientSession, mid: str, state: str, timeout: float = 20, settled: bool = True
) -> dict:
    async with asyncio.timeout(timeout):
        while True:
            m = await _machine(api, mid)
            if m["state"] == state and (m["pending"] is None or not settled):
                return m
            await asyncio.sleep(0.1)


async def test_create_runs_spread_over_hosts_with_distinct_ips_and_transitions(api, peers):
    body = await _create(api, count=3)
    machines = [await _machine(api, m["id"]) for m in body["machines"]]

    assert [m["state"] for m in machines] == ["running"] * 3
    assert len({m["ip"] for m in machines}) == 3
    assert {m["host"] for m in machines} == {"h1", "h2"}
    assert [t["state"] for t in machines[0]["transitions"]] == [
        "requested", "ip_assigned", "placed", "creating", "running"
    ]


async def test_same_idempotency_key_returns_same_machines(api, peers):
    headers = {"Idempotency-Key": "k-123"}
    async with api.post("/v1/machines", json={**SPEC, "count": 2}, headers=headers) as r:
        first = await r.json()
    async with api.post("/v1/machines", json={**SPEC, "count": 2}, headers=headers) as r:
        second = await r.json()
    async with api.post("/v1/machines", json={**SPEC, "count": 3}, headers=headers) as r:
        conflict = r.status
    async with api.get("/v1/machines") as r:
        listed = (await r.json())["items"]

    assert [m["id"] for m in second["machines"]] == [m["id"] for m in first["machines"]]
    assert len(listed) == 2
    assert conflict == 409


async def test_kvm_request_goes_to_the_kvm_channel_with_its_full_spec(api, peers):
    body = await _create(api, type="kvm", ssh_keys=["ssh-ed25519 AAAAC3Nza op@desk"],
                         direct_ssh=True)  # fmt: skip
    mid = body["machines"][0]["id"]
    machine = await _machine(api, mid)
    sent = peers.sent("kvm.machine.create")

    assert machine["state"] == "running"
    assert machine["host"] == "kvm-legacy-1"
    assert [(c.machine_id, c.app, c.cpus, c.memory, c.disk, str(c.ip), c.vlan_id)
            for c in sent] == [(mid, "web", 1.0, 512 << 20, GIB, machine["ip"], 233)]
    assert sent[0].ssh_authorized_keys == ["ssh-ed25519 AAAAC3Nza op@desk"]
    assert peers.sent("container.create") == []


async def test_no_capacity_is_refused_before_an_ip_or_a_machine_exists(api, peers):
    await _create(api, cpus=30, count=2)  # h1 and h2 have 8 cpus x 4 overcommit = 32 each
    allocations = len(peers.sent("ip.allocate")) + len(peers.sent("ip.allocate_many"))
    async with api.post("/v1/machines?wait=20", json={**SPEC, "cpus": 30}) as r:
        refused, problem = r.status, await r.json()
    async with api.get("/v1/machines", params={"limit": "100"}) as r:
        listed = (await r.json())["items"]

    assert (refused, problem["reason"]) == (409, "no_capacity")
    assert len(listed) == 2
    assert len(peers.sent("ip.allocate")) + len(peers.sent("ip.allocate_many")) == allocations


async def test_silent_host_times_out_then_compensates(api, peers):
    peers.silent_hosts.update({"h1", "h2"})
    body = await _create(api, wait=0)
    mid = body["machines"][0]["id"]
    machine = await _until(api, mid, "failed")

    assert machine["reason"].startswith("timeout")
    assert len(peers.sent("container.create")) == 2  # sent, re-sent once, then given up
    assert {c.machine_id for c in peers.sent("container.destroy")} == {mid}
    assert mid in [c.machine_id for c in peers.sent("ip.release")]


@pytest.mark.parametrize(
    ("body", "fields"),
    [
        ({**SPEC, "cpus": 0, "memory": "12q", "disk": "-1g"}, {"cpus", "memory", "disk"}),
        ({**SPEC, "cpus": 64}, {"cpus"}),  # larger than the largest host (8 x 4)
        ({**SPEC, "vlan_id": 999}, {"vlan_id"}),  # no pool on that vlan
        (
            {**{k: v for k, v in SPEC.items() if k != "app"}, "image": "Bad Image!",
             "hostname_prefix": "-bad-", "count": 0, "vlan_id": 4095, "type": "lxc", "colour": 1},
            {"app", "image", "hostname_prefix", "count", "vlan_id", "type", "colour"},
        ),
    ],
)
async def test_bad_input_is_422_naming_every_field_and_creates_nothing(api, peers, body, fields):
    async with api.post("/v1/machines", json=body) as r:
        status, ctype, problem = r.status, r.content_type, await r.json()
    async with api.get("/v1/machines") as r:
        listed = (await r.json())["items"]

    assert (status, ctype) == (422, "application/problem+json")
    assert {e["field"] for e in problem["errors"]} == fields
    assert listed == []


async def test_roles_tokens_and_audit(api, gateway):
    async with api.post("/v1/tokens", json={"name": "eve", "role": "viewer"}) as r:
        viewer = (await r.json())["token"]
    bearer = {"Authorization": f"Bearer {viewer}"}
    async with aiohttp.ClientSession(gateway.url) as anon:
        async with anon.get("/v1/machines") as r:
            missing = r.status
        async with anon.get("/v1/machines", headers={"Authorization": "Bearer nope"}) as r:
            invalid = r.status
        async with anon.get("/v1/machines", headers=bearer) as r:
            read = r.status
        async with anon.post("/v1/machines", json=SPEC, headers=bearer) as r:
            forbidden = r.status
    async with api.get("/v1/audit") as r:
        audit = (await r.json())["items"]

    assert (missing, invalid, read, forbidden) == (401, 401, 200, 403)
    assert [(a["who"], a["method"], a["path"], a["status"]) for a in audit] == [
        ("eve", "POST", "/v1/machines", 403),
        ("admin", "POST", "/v1/tokens", 201),
    ]


async def test_resize_guard_is_409_unless_forced(api, peers):
    mid = (await _create(api))["machines"][0]["id"]
    async with api.patch(f"/v1/machines/{mid}", json={"memory": "128m"}) as r:
        refused, problem = r.status, await r.json()
    async with api.patch(f"/v1/machines/{mid}", json={"memory": "128m", "force": True}) as r:
        forced, after = r.status, await r.json()
    async with api.patch(f"/v1/machines/{mid}", json={"disk": "512m"}) as r:
        shrink = r.status

    assert (refused, problem["reason"]) == (409, "memory_below_usage")
    assert (forced, after["memory"], after["state"]) == (200, 128 << 20, "running")
    assert shrink == 409


async def test_stop_start_and_destroy_release_the_ip(api, peers):
    mid = (await _create(api))["machines"][0]["id"]
    async with api.post(f"/v1/machines/{mid}/stop?wait=10") as r:
        stopped = (await r.json())["state"]
    async with api.post(f"/v1/machines/{mid}/start?wait=10") as r:
        started = (await r.json())["state"]
    async with api.delete(f"/v1/machines/{mid}?wait=10") as r:
        destroyed = (await r.json())["state"]

    assert (stopped, started, destroyed) == ("stopped", "running", "destroyed")
    assert mid not in peers.leases


async def test_scale_out_uses_last_spec_and_scale_in_removes_the_newest(api, peers):
    first = (await _create(api, count=2, cpus=2))["machines"]
    async with api.post("/v1/apps/web/scale", json={"count": 4}) as r:
        out = await r.json()
    for mid in out["created"]:
        await _until(api, mid, "running")
    async with api.post("/v1/apps/web/scale", json={"count": 1}) as r:
        back = await r.json()
    async with api.post("/v1/apps/nope/scale", json={"count": 1}) as r:
        unknown = r.status

    assert len(out["created"]) == 2
    assert (await _machine(api, out["created"][0]))["cpus"] == 2
    assert set(back["destroying"]) == {*out["created"], first[1]["id"]}
    assert unknown == 404


async def test_host_down_marks_its_machines_unknown(api, peers):
    body = await _create(api, count=2)
    ids = [m["id"] for m in body["machines"]]
    on_h1 = [m for m in [await _machine(api, i) for i in ids] if m["host"] == "h1"]
    peers.stop_beat("h1")
    machine = await _until(api, on_h1[0]["id"], "unreachable", timeout=30)
    async with api.get("/v1/hosts") as r:
        hosts = {h["id"]: h["status"] for h in (await r.json())["items"]}

    assert machine["reason"] == "host_down"
    assert hosts == {"h1": "down", "h2": "online"}


async def test_restart_mid_saga_resumes_from_the_database(api, peers, gateway):
    peers.silent_hosts.update({"h1", "h2"})
    ids = [m["id"] for m in (await _create(api, wait=0, count=5))["machines"]]
    await _until(api, ids[-1], "creating", settled=False)
    gateway.kill()
    await gateway.proc.wait()
    peers.silent_hosts.clear()
    await gateway.start()
    machines = [await _until(api, mid, "running") for mid in ids]

    assert len({m["ip"] for m in machines}) == 5
    assert sorted(peers.leases) == sorted(ids)


async def test_openapi_is_generated_from_the_models(api):
    async with api.get("/v1/openapi.json") as r:
        doc = await r.json()

    assert doc["paths"]["/v1/machines"]["post"]["requestBody"]["content"]["application/json"] == {
        "schema": {"$ref": "#/components/schemas/MachineCreate"}
    }
    assert "hostname_prefix" in doc["components"]["schemas"]["MachineCreate"]["properties"]
    assert doc["components"]["schemas"]["MachineCreate"]["additionalProperties"] is False


async def test_first_start_writes_the_admin_token_0600(gateway, service_env):
    path = Path(service_env["DOCKVM_STATE_DIR"]) / "admin.token"

    assert path.stat().st_mode & 0o777 == 0o600
    assert path.read_text().startswith("dvm_")



async def test_metrics_and_sync_jobs_are_answered_by_monitor_and_imagesync(
    api, start_service
):
    await start_service("monitor", "--host-id", "h1")
    await start_service("imagesync")
    async with api.get("/v1/ips/10.233.1.77/metrics") as r:
        metrics_status, metrics = r.status, await r.json()
    # A repo no one pushes: imagesync reconciles the shared registries, so another run's
    # push (make image, a build) may be copying meanwhile.
    async with api.get("/v1/images/sync-jobs?limit=5&repo=never/pushed-here") as r:
        jobs_status, jobs = r.status, await r.json()
    async with api.get("/v1/ips/10.233.1.999/metrics") as r:
        bad_ip = r.status
    async with api.get("/v1/registries?prefix=never/pushed-here") as r:
        held_status, held = r.status, await r.json()
    async with api.get("/v1/registries?dc=dc9") as r:
        no_dc = r.status

    assert (metrics_status, metrics["ip"], metrics["points"]) == (200, "10.233.1.77", [])
    assert (jobs_status, jobs["jobs"]) == (200, [])
    assert bad_ip == 422
    # The shared stack's two registries (behind their balancers), each read live.
    assert held_status == 200
    assert [(r["dc"], r["reachable"], r["repositories"]) for r in held["registries"]] == [
        ("dc1", True, []),
        ("dc2", True, []),
    ]
    assert no_dc == 404


async def test_pools_are_changed_and_deleted_through_ipam(api, start_service):
    await start_service("ipam")
    pool = {"name": "gw-pool", "dc": "dc9", "vlan_id": 901, "cidr": "10.199.0.0/24",
            "gateway": "10.199.0.1"}
    codes = {}
    async with api.post("/v1/pools", json=pool) as r:
        codes["create"] = r.status
    async with api.patch("/v1/pools/gw-pool",
                         json={"reserved": ["10.199.0.10-10.199.0.19"], "cooldown_s": 60}) as r:
        codes["patch"] = r.status
    async with api.patch("/v1/pools/gw-pool", json={"reserved": ["not-an-ip"]}) as r:
        codes["bad reserved"], bad = r.status, await r.json()
    async with api.patch("/v1/pools/gw-pool", json={"vlan_id": 3}) as r:
        codes["unknown field"] = r.status
    async with api.patch("/v1/pools/nope", json={"cooldown_s": 1}) as r:
        codes["unknown pool"] = r.status
    async with api.delete("/v1/pools/gw-pool") as r:
        codes["delete"] = r.status
    async with api.delete("/v1/pools/gw-pool") as r:
        codes["delete again"] = r.status
    async with api.post("/v1/pools", json={**pool, "cidr": "10.198.0.0/24",
                                           "gateway": "10.198.0.1"}) as r:
        codes["name free again"] = r.status

    assert codes == {"create": 201, "patch": 200, "bad reserved": 422, "unknown field": 422,
                     "unknown pool": 404, "delete": 200, "delete again": 404,
                     "name free again": 201}
    assert [e["field"] for e in bad["errors"]] == ["reserved"]
