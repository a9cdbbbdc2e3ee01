"""The image platform on the real stack: a gateway, a builder and an imagesync on the test's vhost
and database, the main engine and the dc1/dc2 registries.

One small real build (the base + jq) carries most asserts: it ends pushed to dc1, replicated to
dc2 with the same digest, labelled, with its SBOM, and a container from it has the package. The
failures are builds that stop before anything is pushed (an apt step that fails, a dependency
the policy denies, a process listening on a denied port), and specs the gateway refuses with a
422 before anything starts. Every tag and image a test makes is removed afterwards.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import docker
import pytest

from libs.common.contracts.builder import DEFAULT_POLICY
from services.provisioner.domain import container_name
from tests.support.subnets import free_24

pytestmark = pytest.mark.integration

DC = {"dc1": "127.0.0.1:5001", "dc2": "127.0.0.1:5002"}
MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"


@dataclass
class Platform:
    """The gateway's API as admin, and what the test pushed (removed afterwards)."""

    api: aiohttp.ClientSession
    repo: str
    gateway: Any
    builder: Any
    token: str
    tmp: Path
    start: Any

    def spec(self, tag: str, **fields: Any) -> dict[str, Any]:
        """A build spec of this test's repository."""
        return {"name": self.repo, "tag": tag, "base": "debian-bookworm", **fields}

    async def build(self, spec: dict[str, Any]) -> tuple[dict[str, Any], str]:
        """Submit, follow the log to its end; the final build and the whole log."""
        async with self.api.post("/v1/images/builds", json=spec) as r:
            body = await r.json()
            assert r.status == 202, body
        timeout = aiohttp.ClientTimeout(total=300)
        async with self.api.get(f"/v1/images/builds/{body['id']}/log", timeout=timeout) as r:
            assert r.status == 200
            text = await r.text()
        async with self.api.get(f"/v1/images/builds/{body['id']}") as r:
            return await r.json(), text


async def _digest(dc: str, repo: str, tag: str) -> str | None:
    async with aiohttp.ClientSession() as s, s.head(
        f"http://{DC[dc]}/v2/{repo}/manifests/{tag}", headers={"Accept": MANIFEST}
    ) as r:  # fmt: skip
        return r.headers.get("Docker-Content-Digest") if r.status == 200 else None


async def _forget(repo: str) -> None:
    """Delete every tag of ``repo`` from both registries, and its images from the engine."""
    async with aiohttp.ClientSession() as s:
        for host in DC.values():
            async with s.get(f"http://{host}/v2/{repo}/tags/list") as r:
                tags = (await r.json()).get("tags") or [] if r.status == 200 else []
            for tag in tags:
                digest = await _digest(next(d for d, h in DC.items() if h == host), repo, tag)
                if digest:
                    await s.delete(f"http://{host}/v2/{repo}/manifests/{digest}")
    client = docker.APIClient(version="auto")
    for img in client.images():
        for ref in img.get("RepoTags") or []:
            if f"/{repo}:" in ref:
                client.remove_image(ref, force=True)
    client.close()


@pytest.fixture
async def platform(
    start_service: Any, service_env: dict[str, str], tmp_path: Path
) -> AsyncIterator[Platform]:
    """gateway + builder + imagesync on the test's vhost and database."""
    env = {"DOCKVM_BUILD_TIMEOUT_S": "240"}
    builder = await start_service("builder", env=env)
    await start_service("imagesync")
    gateway = await start_service(
        "gateway", env={"DOCKVM_RPC_TIMEOUT_S": "10", "DOCKVM_REQUIRE_BUILT_IMAGES": "true"}
    )
    token = (Path(service_env["DOCKVM_STATE_DIR"]) / "admin.token").read_text().strip()
    repo = f"test-builder-{uuid.uuid4().hex[:8]}/web"
    headers = {"Authorization": f"Bearer {token}"}
    try:
        async with aiohttp.ClientSession(gateway.url, headers=headers) as api:
            yield Platform(api, repo, gateway, builder, token, tmp_path, start_service)
    finally:
        await _forget(repo)


async def _cli(platform: Platform, *args: str) -> tuple[int, str, str]:
    """Run ``dockvm`` against the test's gateway; exit code, stdout, stderr."""
    proc = await asyncio.create_subprocess_exec(
        str(Path(sys.executable).parent / "dockvm"), "--url", platform.gateway.url, *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        # The token in the environment, never in argv (ps shows argv to every user).
        env={**os.environ, "COLUMNS": "200", "DOCKVM_TOKEN": platform.token},
    )  # fmt: skip
    stdout, stderr = await asyncio.wait_for(proc.communicate(), 300)
    return proc.returncode or 0, stdout.decode(), stderr.decode()


async def _wait_for(pred: Any, timeout: float = 60) -> Any:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        value = await pred()
        if value:
            return value
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.3)


async def test_a_build_within_policy_is_pushed_replicated_labelled_and_runs(platform: Platform):
    spec = platform.spec("1.0", packages=["jq"], env={"GREETING": 'say "hi" $HOME'},
                         ports=[8080], files={"/opt/web/hello.txt": "hello\n"},
                         labels={"team": "web"})  # fmt: skip

    build, log = await platform.build(spec)

    assert build["state"] == "succeeded", (build, log)
    assert "==> build" in log and "==> verify" in log and "pushed " in log
    assert build["image"] == f"{DC['dc1']}/{platform.repo}:1.0"
    assert build["policy_version"] == 0 and build["requested_by"] == "admin"
    assert any(p.startswith("jq=") for p in build["sbom"])
    assert any(p.startswith("libonig5=") for p in build["sbom"])  # a dependency of jq
    assert any(s.startswith("tcp/22 (sshd") for s in build["listening"])
    assert await _digest("dc1", platform.repo, "1.0") == build["digest"]
    # Replicated by imagesync (the build ordered the copy): the same digest in dc2.
    assert await _wait_for(lambda: _digest("dc2", platform.repo, "1.0")) == build["digest"]
    assert len(build["sync_jobs"]) == 1

    client = docker.from_env()
    try:
        image = client.images.get(build["image"])
        labels = image.labels
        assert labels["dockvm.build.id"] == build["id"]
        assert labels["dockvm.build.spec_digest"] == build["spec_digest"]
        assert labels["org.opencontainers.image.version"] == "1.0" and labels["team"] == "web"
        # As a machine would run it (its own init), the package and the file are there.
        out = client.containers.run(
            build["image"],
            ["sh", "-c", 'dpkg -s jq | grep Status; cat /opt/web/hello.txt; echo "$GREETING"'],
            remove=True, network_mode="none",
        ).decode()  # fmt: skip
    finally:
        client.close()
    assert "Status: install ok installed" in out
    assert "hello" in out and 'say "hi" $HOME' in out

    async with platform.api.get("/v1/images", params={"name": platform.repo}) as r:
        images = await r.json()
    assert images == [{
        "name": platform.repo, "tag": "1.0", "build_id": build["id"], "built_by": "admin",
        "spec_digest": build["spec_digest"], "policy_version": 0,
        "built_at": images[0]["built_at"], "digests": {"dc1": build["digest"],
                                                      "dc2": build["digest"]},
    }]  # fmt: skip
    code, listed, _ = await _cli(platform, "image", "list", "--name", platform.repo, "--json")
    assert code == 0 and json.loads(listed) == images
    await _a_machine_of_it_runs_with_the_package(platform, build["image"])

    # With DOCKVM_REQUIRE_BUILT_IMAGES: a machine of an image the platform did not make is a
    # 409 naming it; this build's image and the base pass the check (and fail later, for want
    # of a pool, which is not what is tested here).
    outcomes = {}
    for image in (f"{DC['dc1']}/{platform.repo}:other", build["image"],
                  f"{DC['dc1']}/{platform.repo}@{build['digest']}",
                  "127.0.0.1:5001/dockvm/base:bookworm"):  # fmt: skip
        machine = {"type": "docker", "app": "web", "image": image, "cpus": 0.5,
                   "memory": "256m", "disk": "1g", "dc": "dc1", "vlan_id": 4000}  # fmt: skip
        async with platform.api.post("/v1/machines", json=machine) as r:
            outcomes[image] = (await r.json()).get("reason")
    refused, *passed = outcomes.values()
    assert refused == "image_not_built" and "image_not_built" not in passed, outcomes


async def _a_machine_of_it_runs_with_the_package(platform: Platform, image: str) -> None:
    """ipam and an agent join the test's services; a machine of ``image`` runs and has jq."""
    n, prefix = free_24(100, 250), f"dvbld{uuid.uuid4().hex[:4]}"
    await platform.start("ipam")
    await platform.start("provisioner", "--host-id", f"bld-{prefix}", env={
        "DOCKVM_NETWORK_PREFIX": prefix, "DOCKVM_HEARTBEAT_INTERVAL_S": "1",
        "DOCKVM_STATE_DIR": str(platform.tmp / "agent")})  # fmt: skip
    pool = {"name": f"b{n}", "dc": "dc1", "vlan_id": 2300 + n, "cidr": f"10.234.{n}.0/24",
            "gateway": f"10.234.{n}.1"}  # fmt: skip
    async with platform.api.post("/v1/pools", json=pool) as r:
        assert r.status == 201, await r.text()

    async def online() -> bool:
        async with platform.api.get("/v1/hosts") as r:
            return any(h["status"] == "online" for h in (await r.json())["items"])

    await _wait_for(online)
    spec = {"type": "docker", "app": "built", "image": image, "cpus": 0.5, "memory": "256m",
            "disk": "1g", "dc": "dc1", "vlan_id": 2300 + n}  # fmt: skip
    client = docker.APIClient(version="auto")
    try:
        async with platform.api.post("/v1/machines?wait=120", json=spec) as r:
            (machine,) = (await r.json())["machines"]
        try:
            assert machine["state"] == "running", machine
            run = client.exec_create(container_name(machine["id"]), ["dpkg", "-s", "jq"])
            out = client.exec_start(run["Id"]).decode()
            assert "Status: install ok installed" in out
        finally:
            async with platform.api.delete(f"/v1/machines/{machine['id']}"):
                pass

            async def destroyed() -> bool:
                async with platform.api.get(f"/v1/machines/{machine['id']}") as r:
                    return (await r.json())["state"] in ("destroyed", "failed")

            await _wait_for(destroyed, timeout=120)
    finally:
        for net in client.networks(names=[f"{prefix}-vlan{2300 + n}"]):
            client.remove_network(net["Id"])
        client.close()


async def test_a_spec_the_policy_refuses_is_a_422_naming_every_item_and_starts_nothing(
    platform: Platform,
):
    spec = platform.spec(
        "bad", packages=["curl", "gcc", "cowsay"], ports=[8080, 2375],
        files={"/etc/ssh/sshd_config": "PermitRootLogin yes\n"}, run=["id"],
    )  # fmt: skip
    spec["base"] = "alpine:3"

    async with platform.api.post("/v1/images/builds", json=spec) as r:
        problem = await r.json()
    async with platform.api.get("/v1/images/builds") as r:
        builds = await r.json()

    assert r.status == 200 and builds == []
    assert {(e["field"], e["type"]) for e in problem["errors"]} == {
        ("base", "unknown_base"),
        ("packages.1", "denied_package"),
        ("packages.2", "unlisted_package"),
        ("ports.1", "denied_port"),
        ("files./etc/ssh/sshd_config", "forbidden_path"),
        ("run", "run_not_allowed"),
    }
    assert problem["status"] == 422


async def test_policy_versions_are_audited_and_failed_builds_push_nothing(platform: Platform):
    policy = DEFAULT_POLICY.model_dump(mode="json")
    policy["packages"]["allow"] += ["no-such-package-dockvm"]
    policy["packages"]["deny"] += ["libonig5"]
    async with platform.api.put("/v1/images/policy", json=policy) as r:
        put = await r.json()
        assert r.status == 200, put
    async with platform.api.put("/v1/images/policy", json=policy, headers={"If-Match": "0"}) as r:
        assert r.status == 409  # version 0 is no longer the latest
    async with platform.api.get("/v1/images/policy") as r:
        current = await r.json()
    async with platform.api.get("/v1/audit") as r:
        audit = await r.json()

    assert put["version"] == 1 and current["version"] == 1 and current["set_by"] == "admin"
    entries = audit if isinstance(audit, list) else audit.get("entries", audit.get("items"))
    assert any(e["path"] == "/v1/images/policy" and e["target"] == "image-policy v1"
               for e in entries)  # fmt: skip

    spec_file = platform.tmp / "spec.yaml"
    spec_file.write_text(f"name: {platform.repo}\ntag: apt\nbase: debian-bookworm\n"
                         "packages: [no-such-package-dockvm]\n")  # fmt: skip
    code, cli_out, cli_err = await _cli(platform, "image", "build", "-f", str(spec_file))
    async with platform.api.get("/v1/images/builds", params={"name": platform.repo}) as r:
        (apt,) = await r.json()
    async with platform.api.get(f"/v1/images/builds/{apt['id']}/log") as r:
        apt_log = await r.text()
    dep, _ = await platform.build(platform.spec("dep", packages=["jq"]))
    script = "#!/bin/sh\nexec python3 -m http.server 3306\n"
    port, port_log = await platform.build(
        platform.spec("port", files={"/app/current/bin/start": script})
    )

    assert (apt["state"], apt["reason"]) == ("failed", "build_failed")
    assert "Unable to locate package no-such-package-dockvm" in apt_log
    # The CLI showed the log live and exited 1 with the reason.
    assert code == 1 and "Unable to locate package" in cli_out + cli_err
    assert "failed (build_failed)" in cli_err
    assert (dep["state"], dep["reason"], dep["policy_version"]) == (
        "failed", "verification_failed", 1)  # fmt: skip
    assert "libonig5 (pulled in by jq) is denied" in dep["detail"]
    assert (port["state"], port["reason"]) == ("failed", "verification_failed")
    assert "port 3306/tcp is listening, opened by python3" in port["detail"], port_log
    for tag in ("apt", "dep", "port"):
        assert await _digest("dc1", platform.repo, tag) is None


async def test_a_builder_killed_mid_build_runs_it_again_and_never_leaves_a_half_made_tag(
    platform: Platform, start_service: Any
):
    async with platform.api.post("/v1/images/builds",
                                 json=platform.spec("kill", packages=["jq"])) as r:  # fmt: skip
        build_id = (await r.json())["id"]

    async def building() -> bool:
        async with platform.api.get(f"/v1/images/builds/{build_id}") as r:
            return (await r.json())["step"] == "build"

    await _wait_for(building)
    platform.builder.kill()
    await platform.builder.proc.wait()
    assert await _digest("dc1", platform.repo, "kill") is None
    await start_service("builder")

    async def ended() -> dict[str, Any] | None:
        async with platform.api.get(f"/v1/images/builds/{build_id}") as r:
            doc = await r.json()
        return doc if doc["state"] in ("succeeded", "failed") else None

    build = await _wait_for(ended, timeout=240)
    async with platform.api.get(f"/v1/images/builds/{build_id}/log") as r:
        log = await r.text()

    assert (build["state"], build["attempt"]) == ("succeeded", 2), log
    assert "the builder stopped during attempt 1" in log
    assert await _digest("dc1", platform.repo, "kill") == build["digest"]
    client = docker.APIClient(version="auto")
    try:
        left = client.containers(all=True, filters={"name": f"dockvm-verify-{build_id}"})
    finally:
        client.close()
    assert left == []
