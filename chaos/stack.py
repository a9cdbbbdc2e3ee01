"""A private dockvm stack for the chaos suite: the five services as real processes on a fresh
vhost, database and state dir, two throwaway registries, a pool, and an admin API client that
rides out a gateway being down.

Everything it makes is named after one run id (host ``chaos-<run>``, Docker networks
``dvc<run>-vlan<id>``), and :meth:`ChaosStack.close` removes it, even after a failure.
"""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import docker

from libs.common.db import mongo_client
from tests.integration.test_imagesync_support import SECRET, RegistryProcess
from tests.support.services import ServiceProcess
from tests.support.stack import MONGO_URL, Vhost, create_vhost, delete_vhost, free_port

IMAGE = os.environ.get("DOCKVM_BASE_IMAGE", "dockvm/base:bookworm")
# Small machines, so 50 fit a shared 2-core host; XFS needs at least 300 MiB.
CPUS, MEMORY, DISK = 0.05, "64m", "512m"
# The agent's orphan removal is not under test here (but in the empty-database scenario): with
# a grace this long it never removes a container of anyone else's on the shared engine.
NO_ORPHAN_REMOVAL_S = "100000000"
SETTLED = {"running", "stopped", "failed", "destroyed"}
RETRY_STATUSES = {502, 503, 504}


class ApiDown(RuntimeError):
    """The gateway did not answer within the time given."""


@dataclass
class Api:
    """An admin client of the gateway that retries while the gateway is down or busy."""

    session: aiohttp.ClientSession

    async def call(
        self, method: str, path: str, timeout: float = 120.0, **kw: object
    ) -> tuple[int, dict]:
        """One request, repeated on a connection error or a 502/503/504 until ``timeout``."""
        async with asyncio.timeout(timeout):
            while True:
                try:
                    async with self.session.request(method, path, **kw) as r:  # type: ignore[arg-type]
                        if r.status not in RETRY_STATUSES:
                            body = await r.json(content_type=None) if r.content_length != 0 else {}
                            return r.status, body or {}
                except (aiohttp.ClientError, TimeoutError):
                    pass
                await asyncio.sleep(0.3)

    async def machines(self, ids: Iterable[str]) -> list[dict]:
        """The summaries of ``ids`` (in pages of 200 ids)."""
        ids = list(ids)
        out: list[dict] = []
        for i in range(0, len(ids), 200):
            chunk = ",".join(ids[i : i + 200])
            status, body = await self.call(
                "GET", "/v1/machines", params={"ids": chunk, "limit": "1000"}
            )
            if status != 200:
                raise RuntimeError(f"GET /v1/machines: {status} {body}")
            out.extend(body["items"])
        return out

    async def create(self, spec: dict, count: int) -> list[str]:
        """POST ``count`` machines (no wait); one Idempotency-Key, so a retry never doubles."""
        headers = {"Idempotency-Key": f"chaos-{uuid.uuid4().hex}"}
        status, body = await self.call(
            "POST", "/v1/machines", json={**spec, "count": count}, headers=headers
        )
        if status not in (200, 201, 202):
            raise RuntimeError(f"POST /v1/machines: {status} {body}")
        return [m["id"] for m in body["machines"]]

    async def delete(self, mid: str) -> int:
        """DELETE one machine; its status (202, or 404 when it is already gone)."""
        status, _ = await self.call("DELETE", f"/v1/machines/{mid}")
        return status

    async def settle(self, ids: list[str], timeout: float = 300.0) -> list[dict]:
        """Wait until no machine of ``ids`` has an operation in flight; their summaries."""
        try:
            async with asyncio.timeout(timeout):
                while True:
                    ms = await self.machines(ids)
                    if len(ms) == len(ids) and all(
                        m["pending"] is None and m["state"] in SETTLED for m in ms
                    ):
                        return ms
                    await asyncio.sleep(0.5)
        except TimeoutError:
            return await self.machines(ids)


@dataclass
class ChaosStack:
    """The services, registries, pool and API of one chaos run."""

    run: str = field(default_factory=lambda: uuid.uuid4().hex[:6])
    tmp: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="dockvm-chaos-")))
    vhost: Vhost | None = None
    db_name: str = ""
    services: dict[str, ServiceProcess] = field(default_factory=dict)
    registries: dict[str, RegistryProcess] = field(default_factory=dict)
    api: Api | None = None
    vlan: int = 0
    subnet: str = ""
    _session: aiohttp.ClientSession | None = None

    @property
    def host(self) -> str:
        """The provisioner's and monitor's host id."""
        return f"chaos-{self.run}"

    @property
    def prefix(self) -> str:
        """The Docker network prefix of this run's agent."""
        return f"dvc{self.run}"

    @property
    def agent_state(self) -> Path:
        """The provisioner's state dir (volumes, files)."""
        return self.tmp / "agent"

    def spec(self, app: str) -> dict:
        """A machine spec on this run's pool."""
        return {
            "app": app,
            "image": IMAGE,
            "cpus": CPUS,
            "memory": MEMORY,
            "disk": DISK,
            "dc": "dc1",
            "vlan_id": self.vlan,
        }

    def env(self) -> dict[str, str]:
        """What every service of the run shares."""
        assert self.vhost is not None
        return {
            "DOCKVM_AMQP_URL": self.vhost.url,
            "DOCKVM_MONGO_URL": MONGO_URL,
            "DOCKVM_MONGO_DB": self.db_name,
            "DOCKVM_STATE_DIR": str(self.tmp / "gw"),
            "DOCKVM_WEBHOOK_SECRET": SECRET,
            "DOCKVM_LOG_LEVEL": "info",
        }

    def _service(self, name: str, extra: dict[str, str], args: list[str]) -> ServiceProcess:
        return ServiceProcess(
            name,
            {**self.env(), **extra},
            free_port(),
            args,
            log_path=self.tmp / f"{name}.log",
        )

    def agent_env(self, **over: str) -> dict[str, str]:
        """The provisioner's settings (``over`` changes some, e.g. the orphan grace)."""
        return {
            "DOCKVM_STATE_DIR": str(self.agent_state),
            "DOCKVM_NETWORK_PREFIX": self.prefix,
            "DOCKVM_HEARTBEAT_INTERVAL_S": "1",
            "DOCKVM_RECONCILE_INTERVAL_S": "10",
            "DOCKVM_STOP_TIMEOUT_S": "2",
            "DOCKVM_ORPHAN_GRACE_S": NO_ORPHAN_REMOVAL_S,
            **over,
        }

    async def start(self) -> ChaosStack:
        """Start registries, services, the pool; warm the network and image with one machine."""
        self.vhost = await create_vhost()
        self.db_name = f"chaos_{self.run}"
        for dc in ("dc1", "dc2"):
            # The registries notify this run's imagesync, whose port is chosen here.
            self.registries[dc] = RegistryProcess(dc, self.tmp / "registries", "")
        imagesync_port = free_port()
        for reg in self.registries.values():
            reg.notify_url = f"http://127.0.0.1:{imagesync_port}/v1/registry-events"
            await reg.start()
        topology = ",".join(f"{r.dc}={r.url}" for r in self.registries.values())
        host_args = ["--host-id", self.host]
        self.services = {
            "ipam": self._service("ipam", {}, []),
            "provisioner": self._service("provisioner", self.agent_env(), host_args),
            "monitor": self._service("monitor", {}, host_args),
            "imagesync": self._service(
                "imagesync",
                {
                    "DOCKVM_REGISTRIES": topology,
                    "DOCKVM_RECONCILE_INTERVAL_S": "10",
                    "DOCKVM_SYNC_BACKOFF_INITIAL_S": "0.2",
                    "DOCKVM_SYNC_BACKOFF_MAX_S": "2",
                },
                [],
            ),
            # 50 machines of 0.05 CPU on a 2-core host: past the default 4x CPU overcommit.
            "gateway": self._service(
                "gateway",
                {"DOCKVM_OVERCOMMIT_CPU": "64", "DOCKVM_KNOWN_ANNOUNCE_S": "2"},
                [],
            ),
        }
        self.services["imagesync"].port = imagesync_port
        for svc in self.services.values():
            await svc.start(ready_timeout=120)
        await self._open_api()
        await self._make_pool()
        return self

    async def _open_api(self) -> None:
        token = (self.tmp / "gw" / "admin.token").read_text().strip()
        self._session = aiohttp.ClientSession(
            self.services["gateway"].url,
            headers={"Authorization": f"Bearer {token}"},
            timeout=aiohttp.ClientTimeout(total=60),
        )
        self.api = Api(self._session)

    async def _make_pool(self) -> None:
        x = random.randint(0, 63) * 4
        self.vlan, self.subnet = 3000 + x, f"10.236.{x}.0/22"
        pool = {
            "name": f"chaos{self.run}",
            "dc": "dc1",
            "vlan_id": self.vlan,
            "cidr": self.subnet,
            "gateway": f"10.236.{x}.1",
            "cooldown_s": 0,
        }
        assert self.api is not None
        status, body = await self.api.call("POST", "/v1/pools", json=pool)
        if status != 201:
            raise RuntimeError(f"pool: {status} {body}")
        async with asyncio.timeout(60):
            while True:
                _, hosts = await self.api.call("GET", "/v1/hosts")
                if any(h["id"] == self.host for h in hosts.get("items", [])):
                    break
                await asyncio.sleep(0.3)
        [warm] = await self.api.create(self.spec("warm"), 1)
        [m] = await self.api.settle([warm], timeout=300)
        if m["state"] != "running":
            raise RuntimeError(f"the warm-up machine ended {m['state']}: {m.get('reason')}")
        await self.api.delete(warm)
        await self.api.settle([warm])

    async def kill9(self, name: str) -> None:
        """``kill -9`` one service, then start it again on the same port and settings."""
        svc = self.services[name]
        svc.kill()
        if svc.proc is not None:
            await svc.proc.wait()
        await svc.start(ready_timeout=180)

    async def restart_service(self, name: str, env: dict[str, str]) -> None:
        """Stop one service, then start it with ``env`` merged into its settings."""
        svc = self.services[name]
        await svc.stop()
        svc.env = {**svc.env, **env}
        await svc.start(ready_timeout=180)

    async def ensure_up(self) -> None:
        """Start again any service or registry a failed round left dead."""
        for reg in self.registries.values():
            if reg.proc is None or reg.proc.returncode is not None:
                await reg.start()
        for svc in self.services.values():
            if svc.proc is None or svc.proc.returncode is not None:
                await svc.start(ready_timeout=180)

    async def close(self, keep_logs: bool = False) -> None:
        """Destroy what is left through the API, stop everything, remove every trace (but the
        services' logs, copied out first when ``keep_logs``)."""
        if keep_logs:
            kept = Path(tempfile.mkdtemp(prefix=f"dockvm-chaos-{self.run}-logs-"))
            for log in self.tmp.glob("*.log"):
                shutil.copy(log, kept / log.name)
            print(f"chaos: the services' logs are kept in {kept}")
        try:
            if self.api is not None and self.services["gateway"].proc is not None:
                await self._destroy_leftovers()
        except Exception as err:  # the engine cleanup below removes what the API could not
            print(f"chaos: destroying leftovers through the API failed: {err}")
        finally:
            await self._stop_all()

    async def _destroy_leftovers(self) -> None:
        assert self.api is not None
        client = mongo_client(MONGO_URL, "dockvm-chaos")
        try:
            docs = await client[self.db_name]["machines"].find({}, {"state": 1}).to_list()
        finally:
            await client.close()
        live = [d["_id"] for d in docs if d["state"] != "destroyed"]
        await asyncio.gather(*(self.api.delete(mid) for mid in live))
        await self.api.settle(live, timeout=180)

    async def _stop_all(self) -> None:
        if self._session is not None:
            await self._session.close()
        for svc in reversed(list(self.services.values())):
            if svc.proc is not None and svc.proc.returncode is None:
                try:
                    await svc.stop()
                except TimeoutError:
                    svc.kill()
        for reg in self.registries.values():
            await reg.stop()
        await asyncio.to_thread(remove_engine_traces, self.prefix, self.tmp)
        client = mongo_client(MONGO_URL, "dockvm-chaos")
        try:
            await client.drop_database(self.db_name)
        finally:
            await client.close()
        if self.vhost is not None:
            await delete_vhost(self.vhost)
        shutil.rmtree(self.tmp, ignore_errors=True)


def remove_engine_traces(prefix: str, state: Path) -> None:
    """Remove the containers on ``prefix`` networks, the networks, mounts and loops under state."""
    client = docker.DockerClient(base_url="unix:///var/run/docker.sock")
    try:
        for c in client.api.containers(all=True, filters={"label": "dockvm.machine_id"}):
            nets = (c.get("NetworkSettings") or {}).get("Networks") or {}
            if any(n.startswith(prefix) for n in nets):
                client.api.remove_container(c["Id"], force=True)
        for net in client.networks.list():
            if net.name.startswith(prefix):
                try:
                    net.remove()
                except docker.errors.APIError:
                    pass  # phantom endpoints after many parallel removals: a dockerd restart
    finally:
        client.close()
    for line in Path("/proc/self/mounts").read_text().splitlines():
        if line.split()[1].startswith(str(state)):
            subprocess.run(["umount", "-l", line.split()[1]], check=False)
    out = subprocess.run(
        ["losetup", "-a", "-O", "NAME,BACK-FILE", "-n"], capture_output=True, text=True, check=False
    ).stdout
    for line in out.splitlines():
        if str(state) in line:
            subprocess.run(["losetup", "-d", line.split()[0]], check=False)
