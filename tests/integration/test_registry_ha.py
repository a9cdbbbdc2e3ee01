"""The registries in their production shape (issue 16): two Distribution replicas per dc on
Ceph's S3, HAProxy in front, imagesync on the balanced addresses. Real Ceph, HAProxy, registries,
Docker client and imagesync; each test makes its own dcs (scripts' settings, own buckets)."""

from __future__ import annotations

import asyncio
import hashlib
import re
import secrets
import subprocess
import tarfile
import time
import uuid
from io import BytesIO

import aiohttp
import pytest

from libs.common.contracts.imagesync import ImagePushed, ImageReplicated
from tests.integration.test_imagesync_support import (
    SECRET,
    http_session,
    push_image,
    random_layer,
    wait_for_digest,
)
from tests.integration.test_registry_ha_support import (
    HaDc,
    ceph_sh,
    ha_dc_factory,
    registry_client,
)
from tests.support.stack import free_port

__all__ = ["ha_dc_factory", "http_session"]  # fixtures imported for pytest

EVENTS_URL = "/v1/registry-events"
NOWHERE = "http://127.0.0.1:9/"
DUPLICATES = "dockvm_imagesync_webhook_events_total"


async def _imagesync(start_service, port: int, dcs: list[HaDc], **env: str):
    base = {
        "DOCKVM_REGISTRIES": ",".join(f"{d.dc}={d.url}" for d in dcs),
        "DOCKVM_WEBHOOK_SECRET": SECRET,
        "DOCKVM_SYNC_BACKOFF_INITIAL_S": "0.2",
        "DOCKVM_SYNC_BACKOFF_MAX_S": "1",
        "DOCKVM_RECONCILE_INTERVAL_S": "600",
    }
    return await start_service("imagesync", env={**base, **env}, port=port)


@pytest.fixture
async def synced(ha_dc_factory, start_service):
    """dc1 and dc2 (two replicas each) notifying a running imagesync; (svc, dc1, dc2)."""
    port = free_port()
    notify = f"http://127.0.0.1:{port}{EVENTS_URL}"
    dc1 = await ha_dc_factory("dc1", notify)
    dc2 = await ha_dc_factory("dc2", notify)
    return await _imagesync(start_service, port, [dc1, dc2]), dc1, dc2


def _repo() -> str:
    return f"ha/{uuid.uuid4().hex[:10]}"


async def _verify_pull(url: str, dc: str, session, repo: str, tag: str, digest: str) -> int:
    """Pull ``repo:tag`` from ``url`` alone, checking every digest; the bytes read."""
    reg = registry_client(url, dc, session)
    manifest = await reg.get_manifest(repo, tag)
    assert manifest.digest == digest
    total = 0
    for blob in manifest.blobs():
        h = hashlib.sha256()
        async with reg.open_blob(repo, blob.digest) as stream:
            async for chunk in stream.chunks():
                h.update(chunk)
                total += len(chunk)
        assert f"sha256:{h.hexdigest()}" == blob.digest
    return total


@pytest.fixture
def big_image():
    """A local image of one ~64 MB incompressible layer; removed after the test."""
    name = f"dockvm-ha-test/{uuid.uuid4().hex[:10]}:1"
    buf = BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        data = secrets.token_bytes(64 * 1024 * 1024)
        info = tarfile.TarInfo("blob.bin")
        info.size = len(data)
        tar.addfile(info, BytesIO(data))
    subprocess.run(
        ["docker", "import", "-", name], input=buf.getvalue(), check=True, capture_output=True
    )
    made = [name]
    yield name, made
    subprocess.run(["docker", "rmi", "-f", *made], capture_output=True)


async def _kill_the_replica_serving_the_upload(dc: HaDc, push: asyncio.Task) -> str:
    """Wait until one replica holds a request for 300 ms (the layer upload), then kill -9 it."""
    held: dict[str, float] = {}
    async with asyncio.timeout(60):
        while not push.done():
            now = time.monotonic()
            for name, row in dc.stats().items():
                if int(row["scur"] or 0) > 0:
                    held.setdefault(name, now)
                else:
                    held.pop(name, None)
            for name, since in held.items():
                if now - since >= 0.3:
                    dc.replica(name).kill()
                    return name
            await asyncio.sleep(0.02)
    raise AssertionError("the push ended before any replica held an upload")


async def test_a_push_survives_a_killed_replica_and_pulls_from_the_other_alone(
    ha_dc_factory, big_image, http_session
):
    dc1 = await ha_dc_factory("dc1", NOWHERE)
    name, made = big_image
    ref = f"{dc1.host}/{name}"
    await asyncio.to_thread(subprocess.run, ["docker", "tag", name, ref], check=True)
    made.append(ref)
    push = asyncio.create_task(
        asyncio.to_thread(
            subprocess.run, ["docker", "push", ref], capture_output=True, text=True, timeout=300
        )
    )
    killed = await _kill_the_replica_serving_the_upload(dc1, push)
    result = await push

    assert result.returncode == 0, result.stderr
    # The kill cut the upload (HAProxy counted the broken response) and the client retried it.
    cut = dc1.stats()[killed]
    assert int(cut["eresp"]) + int(cut["srv_abrt"]) >= 1
    assert "Retrying" in result.stdout
    digest = re.search(r"digest: (sha256:[0-9a-f]{64})", result.stdout).group(1)
    survivor = next(r for r in dc1.replicas if r.name != killed)
    repo, tag = name.split(":")
    # The killed replica is gone: everything below comes from the survivor's own address.
    assert await _verify_pull(survivor.url, "dc1", http_session, repo, tag, digest) > 64 << 20
    await dc1.wait_state({killed: "DOWN"}, 5)


async def test_the_balancer_marks_a_killed_replica_down_and_back_up(ha_dc_factory):
    dc1 = await ha_dc_factory("dc1", NOWHERE)
    r1 = dc1.replica("r1")
    r1.kill()
    await dc1.wait_state({"r1": "DOWN", "r2": "UP"}, 5)
    await r1.start()
    await dc1.wait_state({"r1": "UP", "r2": "UP"}, 10)


async def _metric(svc, name: str, label: str) -> float:
    async with aiohttp.ClientSession() as s, s.get(f"{svc.url}/metrics") as r:
        text = await r.text()
    m = re.search(rf"^{name}{{{label}}} ([0-9.e+]+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


async def test_one_push_notified_by_both_replicas_is_handled_once(
    synced, http_session, probe_factory
):
    svc, dc1, dc2 = synced
    probe = await probe_factory("image.*")
    repo = _repo()
    r1 = registry_client(dc1.replica("r1").url, "dc1", http_session)
    r2 = registry_client(dc1.replica("r2").url, "dc1", http_session)
    m = await push_image(r1, repo, "v1", [random_layer(30_000)])
    # The same manifest put again through the other replica: a second notification, from r2,
    # under another event id (what a client's retry after a replica's death produces).
    await r2.put_manifest(repo, "v1", m)

    async with asyncio.timeout(30):
        while (
            await _metric(svc, "dockvm_imagesync_webhook_events_total", 'outcome="duplicate"') < 1
        ):
            await asyncio.sleep(0.1)
    await probe.wait_for("image.replicated", lambda e: e.repo == repo)

    pushed = [e for e in probe.of_type("image.pushed") if e.repo == repo]
    assert [(e.dc, e.digest, e.registry) for e in pushed] == [("dc1", m.digest, dc1.host)]
    assert isinstance(pushed[0], ImagePushed)
    await wait_for_digest(registry_client(dc2.url, "dc2", http_session), repo, "v1", m.digest)


async def test_replication_works_with_one_replica_of_each_side_down(
    synced, http_session, probe_factory
):
    _, dc1, dc2 = synced
    probe = await probe_factory("image.*")
    for d in (dc1, dc2):
        d.replica("r1").kill()
    for d in (dc1, dc2):
        await d.wait_state({"r1": "DOWN"}, 5)
    repo = _repo()

    m = await push_image(
        registry_client(dc1.url, "dc1", http_session), repo, "v1", [random_layer(200_000)]
    )
    [done] = await probe.wait_for("image.replicated", lambda e: e.repo == repo)

    assert isinstance(done, ImageReplicated)
    assert (done.dc, done.digest, done.registry) == ("dc2", m.digest, dc2.host)
    await _verify_pull(dc2.replica("r2").url, "dc2", http_session, repo, "v1", m.digest)


async def test_the_catalog_reconcile_copies_through_the_balanced_addresses(
    ha_dc_factory, start_service, http_session
):
    # The replicas notify nobody: only the reconcile (at imagesync's start) can copy.
    dc1 = await ha_dc_factory("dc1", NOWHERE)
    dc2 = await ha_dc_factory("dc2", NOWHERE)
    repo = _repo()
    m = await push_image(
        registry_client(dc1.url, "dc1", http_session), repo, "v1", [random_layer(40_000)]
    )

    await _imagesync(start_service, free_port(), [dc1, dc2])

    await wait_for_digest(
        registry_client(dc2.url, "dc2", http_session), repo, "v1", m.digest, timeout=60
    )
    for r in dc2.replicas:  # one bucket: each replica serves the copy
        assert (
            await registry_client(r.url, "dc2", http_session).manifest_digest(repo, "v1")
            == m.digest
        )


async def test_tags_and_blobs_survive_a_restart_of_ceph_replicas_and_balancer(
    ha_dc_factory, http_session
):
    dc1 = await ha_dc_factory("dc1", NOWHERE)
    lb = registry_client(dc1.url, "dc1", http_session)
    repo = _repo()
    pushed = {
        tag: await push_image(lb, repo, tag, [random_layer(100_000), random_layer(5_000)])
        for tag in ("a", "b")
    }
    await dc1.stop_haproxy()
    for r in dc1.replicas:
        await r.stop()
    # The whole cluster: monitor, manager, OSD and gateway (the stack's registries see a
    # few seconds of 5xx meanwhile).
    await asyncio.to_thread(ceph_sh, "down")
    await asyncio.to_thread(ceph_sh, "up")
    for r in dc1.replicas:
        await r.start()
    await dc1.start_haproxy()

    assert sorted(await lb.tags(repo)) == ["a", "b"]
    for tag, m in pushed.items():
        await _verify_pull(dc1.url, "dc1", http_session, repo, tag, m.digest)
