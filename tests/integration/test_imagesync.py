"""imagesync end to end: real Distribution registries notify a real imagesync process, which
copies through the Registry API on the test's own vhost and database."""

from __future__ import annotations

import asyncio
import json
import subprocess
import tarfile
import uuid
from io import BytesIO

import aiohttp
import pytest

from libs.common.bus import RpcClient
from libs.common.contracts.imagesync import (
    ImagePushed,
    ImageReplicated,
    RegistryCatalogList,
    RegistryCatalogListed,
    SyncJobsList,
    SyncJobsListed,
)
from services.imagesync.domain import EVENTS_MEDIA_TYPE
from tests.integration.test_imagesync_support import (
    OCI_MANIFEST,
    SECRET,
    client,
    http_session,
    push_image,
    push_index,
    random_layer,
    registry_factory,
    wait_for_digest,
)
from tests.support.stack import free_port

__all__ = ["http_session", "registry_factory"]  # fixtures imported for pytest

EVENTS_URL = "/v1/registry-events"


async def _imagesync(start_service, port: int, regs, **env: str):
    topology = ",".join(f"{r.dc}={r.url}" for r in regs)
    base = {
        "DOCKVM_REGISTRIES": topology,
        "DOCKVM_WEBHOOK_SECRET": SECRET,
        "DOCKVM_SYNC_BACKOFF_INITIAL_S": "0.2",
        "DOCKVM_SYNC_BACKOFF_MAX_S": "1",
        "DOCKVM_RECONCILE_INTERVAL_S": "600",
        # Registry listings read live: a test stops a registry and lists again at once.
        "DOCKVM_CATALOG_CACHE_S": "0",
    }
    return await start_service("imagesync", env={**base, **env}, port=port)


@pytest.fixture
async def pair(registry_factory, start_service, http_session):
    """dc1 and dc2 registries notifying a running imagesync; (svc, dc1, dc2, c1, c2)."""
    port = free_port()
    notify = f"http://127.0.0.1:{port}{EVENTS_URL}"
    dc1 = await registry_factory("dc1", notify)
    dc2 = await registry_factory("dc2", notify)
    svc = await _imagesync(start_service, port, [dc1, dc2])
    return svc, dc1, dc2, client(dc1, http_session), client(dc2, http_session)


async def _jobs(amqp, **query) -> list:
    rpc = RpcClient(amqp, source="tests")
    try:
        reply = await rpc.request(SyncJobsList(**query), timeout=10)
    finally:
        await rpc.close()
    assert isinstance(reply, SyncJobsListed)
    return reply.jobs


def _repo() -> str:
    return f"it/{uuid.uuid4().hex[:10]}"


@pytest.fixture
def docker_image():
    """A tiny image made with ``docker import`` (no pull), removed after the test."""
    refs: list[str] = []

    def make(ref: str) -> str:
        buf = BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            data = uuid.uuid4().bytes * 64
            info = tarfile.TarInfo("etc/dockvm-test")
            info.size = len(data)
            tar.addfile(info, BytesIO(data))
        subprocess.run(
            ["docker", "import", "--change", "LABEL dockvm.test=imagesync", "-", ref],
            input=buf.getvalue(),
            check=True,
            capture_output=True,
        )
        refs.append(ref)
        return ref

    yield make
    for ref in refs:
        subprocess.run(["docker", "rmi", "-f", ref], capture_output=True)


async def test_docker_push_to_dc1_appears_in_dc2_with_the_same_digest(
    pair, docker_image, probe_factory
):
    _, dc1, _, c1, c2 = pair
    probe = await probe_factory("image.#")
    repo = _repo()
    ref = docker_image(f"{dc1.host}/{repo}:v1")

    await asyncio.to_thread(
        subprocess.run, ["docker", "push", ref], check=True, capture_output=True
    )
    digest = await c1.manifest_digest(repo, "v1")
    await wait_for_digest(c2, repo, "v1", digest)

    [replicated] = await probe.wait_for("image.replicated")
    assert isinstance(replicated, ImageReplicated)
    assert (replicated.dc, replicated.repo, replicated.tag, replicated.digest) == (
        "dc2",
        repo,
        "v1",
        digest,
    )
    assert replicated.ref.endswith(f"/{repo}:v1")


async def test_second_image_with_shared_base_layers_moves_only_its_new_blobs(
    pair, amqp, probe_factory
):
    _, _, _, c1, c2 = pair
    probe = await probe_factory("image.replicated")
    base = [random_layer(300_000), random_layer(200_000)]
    first, second = _repo(), _repo()
    m1 = await push_image(c1, first, "v1", base)
    await probe.wait_for("image.replicated", lambda m: m.repo == first)

    new_layer = random_layer(100_000)
    m2 = await push_image(c1, second, "v1", [*base, new_layer])
    await probe.wait_for("image.replicated", lambda m: m.repo == second)

    [job] = await _jobs(amqp, repo=second)
    config_size = json.loads(m2.raw)["config"]["size"]
    assert job.state == "done"
    assert job.bytes_copied == len(new_layer) + config_size
    assert (job.blobs_copied, job.blobs_mounted) == (2, 2)
    assert await c2.manifest_digest(first, "v1") == m1.digest
    assert await c2.manifest_digest(second, "v1") == m2.digest


async def test_multi_platform_index_copies_every_child(pair, probe_factory):
    _, _, _, c1, c2 = pair
    probe = await probe_factory("image.replicated")
    repo = _repo()
    arches = ["amd64", "arm64", "ppc64le"]
    children = [
        await push_image(c1, repo, None, [random_layer(50_000)], OCI_MANIFEST, arch=a)
        for a in arches
    ]
    index = await push_index(c1, repo, "v1", children, arches)

    await probe.wait_for("image.replicated", lambda m: m.repo == repo)

    assert await c2.manifest_digest(repo, "v1") == index.digest
    assert [await c2.manifest_digest(repo, c.digest) for c in children] == [
        c.digest for c in children
    ]
    assert [(await c2.get_manifest(repo, c.digest)).raw for c in children] == [
        c.raw for c in children
    ]


async def test_our_own_copies_are_not_replicated_back(pair, amqp, probe_factory):
    svc, _, _, c1, _ = pair
    probe = await probe_factory("image.*")
    repo = _repo()
    await push_image(c1, repo, "v1", [random_layer(10_000)])
    await probe.wait_for("image.replicated", lambda m: m.repo == repo)

    # dc2 notifies imagesync of our copy; wait until that notification was answered.
    async with aiohttp.ClientSession() as s, asyncio.timeout(30):
        while 'outcome="ignored"' not in await (await s.get(f"{svc.url}/metrics")).text():
            await asyncio.sleep(0.1)

    pushed = probe.of_type("image.pushed")
    assert [(p.dc, p.repo) for p in pushed if isinstance(p, ImagePushed)] == [("dc1", repo)]
    assert [(j.source, j.target) for j in await _jobs(amqp, repo=repo)] == [("dc1", "dc2")]


def _notification(event_id: str, repo: str, digest: str, host: str) -> bytes:
    return json.dumps(
        {
            "events": [
                {
                    "id": event_id,
                    "timestamp": "2026-01-01T00:00:00Z",
                    "action": "push",
                    "target": {
                        "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
                        "digest": digest,
                        "size": 500,
                        "repository": repo,
                        "tag": "v1",
                        "url": f"http://{host}/v2/{repo}/manifests/{digest}",
                    },
                    "request": {"id": "r", "host": host, "method": "PUT", "useragent": "docker/27"},
                    "actor": {},
                    "source": {"addr": host},
                }
            ]
        }
    ).encode()


async def test_a_replayed_event_id_is_copied_once(
    registry_factory, start_service, http_session, amqp, probe_factory
):
    # These registries notify nobody: the only notifications are the ones the test replays.
    dc1 = await registry_factory("dc1", "http://127.0.0.1:9/")
    dc2 = await registry_factory("dc2", "http://127.0.0.1:9/")
    c1, c2 = client(dc1, http_session), client(dc2, http_session)
    svc = await _imagesync(start_service, free_port(), [dc1, dc2])
    probe = await probe_factory("image.*")
    repo = _repo()
    layer = random_layer(20_000)
    m = await push_image(c1, repo, "v1", [layer])
    body = _notification(str(uuid.uuid4()), repo, m.digest, dc1.host)
    headers = {"Authorization": f"Bearer {SECRET}", "Content-Type": EVENTS_MEDIA_TYPE}

    async with aiohttp.ClientSession(headers=headers) as s:
        answers = []
        for _ in range(3):
            async with s.post(f"{svc.url}{EVENTS_URL}", data=body) as r:
                answers.append((r.status, (await r.json())["duplicates"]))
    await probe.wait_for("image.replicated", lambda e: e.repo == repo)

    assert answers == [(202, 0), (202, 1), (202, 1)]
    assert len(probe.of_type("image.pushed")) == 1
    assert await c2.manifest_digest(repo, "v1") == m.digest
    jobs = await _jobs(amqp, repo=repo)
    config_size = json.loads(m.raw)["config"]["size"]
    assert [(j.state, j.attempts, j.bytes_copied) for j in jobs] == [
        ("done", 1, len(layer) + config_size)
    ]


@pytest.fixture
async def lone_service(start_service, registry_factory):
    """imagesync with one (silent) registry, for the webhook's refusals."""
    dc1 = await registry_factory("dc1", "http://127.0.0.1:9/")
    return await _imagesync(start_service, free_port(), [dc1])


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong-secret"},
        {"Authorization": f"Basic {SECRET}"},
        {"Authorization": f"Bearer {SECRET}x"},
    ],
)
async def test_a_wrong_or_missing_secret_gets_401_and_records_nothing(
    lone_service, mongo_db, headers
):
    body = _notification("ev-401", "it/app", "sha256:" + "a" * 64, "127.0.0.1:1")
    async with aiohttp.ClientSession() as s:
        async with s.post(
            f"{lone_service.url}{EVENTS_URL}",
            data=body,
            headers={**headers, "Content-Type": EVENTS_MEDIA_TYPE},
        ) as r:
            status = r.status
    assert status == 401
    assert await mongo_db["seen_events"].count_documents({}) == 0


@pytest.mark.parametrize(
    ("content_type", "body", "reason"),
    [
        (EVENTS_MEDIA_TYPE, b"{not json", "not valid JSON"),
        (EVENTS_MEDIA_TYPE, b'{"events": 3}', "events"),
        ("application/json", b'{"events": []}', "content type must be"),
        ("text/plain", b"hello", "content type must be"),
        (
            EVENTS_MEDIA_TYPE,
            _notification("ev-x", "it/app", "sha256:" + "b" * 64, "10.9.9.9:1"),
            "not in the topology",
        ),
    ],
)
async def test_malformed_notifications_get_400_with_a_reason(
    lone_service, mongo_db, content_type, body, reason
):
    headers = {"Authorization": f"Bearer {SECRET}", "Content-Type": content_type}
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{lone_service.url}{EVENTS_URL}", data=body, headers=headers) as r:
            status, answer = r.status, await r.json()
    assert status == 400
    assert reason in answer["reason"]
    assert await mongo_db["seen_events"].count_documents({}) == 0


async def test_dc2_down_during_a_push_the_job_retries_and_completes_when_it_is_back(
    registry_factory, start_service, http_session, amqp, probe_factory
):
    port = free_port()
    notify = f"http://127.0.0.1:{port}{EVENTS_URL}"
    dc1 = await registry_factory("dc1", notify)
    dc2 = await registry_factory("dc2", notify)
    await _imagesync(start_service, port, [dc1, dc2], DOCKVM_SYNC_ATTEMPTS="60")
    c1, c2 = client(dc1, http_session), client(dc2, http_session)
    probe = await probe_factory("image.*")
    await dc2.stop()
    repo = _repo()

    m = await push_image(c1, repo, "v1", [random_layer(100_000)])
    async with asyncio.timeout(30):
        while not [j for j in await _jobs(amqp, repo=repo) if j.attempts >= 2]:
            await asyncio.sleep(0.2)
    await dc2.start()
    await probe.wait_for("image.replicated", lambda e: e.repo == repo, timeout=60)

    [job] = await _jobs(amqp, repo=repo)
    assert await c2.manifest_digest(repo, "v1") == m.digest
    assert job.state == "done"
    assert job.attempts >= 2
    assert probe.of_type("image.sync_failed") == []


async def _catalog(amqp, **query) -> dict:
    rpc = RpcClient(amqp, source="tests")
    try:
        reply = await rpc.request(RegistryCatalogList(**query), timeout=20)
    finally:
        await rpc.close()
    assert isinstance(reply, RegistryCatalogListed)
    return {r.dc: r for r in reply.registries}


async def test_the_catalog_rpc_lists_what_each_registry_holds_and_names_one_that_is_down(
    pair, amqp, probe_factory
):
    _, _, dc2, c1, _ = pair
    probe = await probe_factory("image.replicated")
    repo = _repo()
    m = await push_image(c1, repo, "v1", [random_layer(10_000)])
    await push_image(c1, repo, "v2", [random_layer(10_000)])
    await probe.wait_for("image.replicated", lambda e: e.repo == repo and e.tag == "v1")
    await probe.wait_for("image.replicated", lambda e: e.repo == repo and e.tag == "v2")

    both = await _catalog(amqp, prefix=repo)
    await dc2.stop()
    one_down = await _catalog(amqp, prefix=repo)
    unknown = await _catalog(amqp, dc="dc9")

    assert sorted(both) == ["dc1", "dc2"]
    for holding in both.values():
        [held] = holding.repositories
        assert holding.reachable and held.repo == repo
        assert [t.tag for t in held.tags] == ["v1", "v2"]
        assert held.tags[0].digest == m.digest
    assert one_down["dc1"].reachable and one_down["dc1"].repositories == both["dc1"].repositories
    assert not one_down["dc2"].reachable and one_down["dc2"].error
    assert one_down["dc2"].repositories == []
    assert unknown == {}


async def test_dc2_down_for_good_the_job_fails_and_says_so(
    registry_factory, start_service, http_session, amqp, probe_factory
):
    port = free_port()
    notify = f"http://127.0.0.1:{port}{EVENTS_URL}"
    dc1 = await registry_factory("dc1", notify)
    dc2 = await registry_factory("dc2", notify)
    await _imagesync(start_service, port, [dc1, dc2], DOCKVM_SYNC_ATTEMPTS="3")
    probe = await probe_factory("image.sync_failed")
    await dc2.stop()
    repo = _repo()

    await push_image(client(dc1, http_session), repo, "v1", [random_layer(1000)])
    [failed] = await probe.wait_for("image.sync_failed", lambda e: e.repo == repo)

    [job] = await _jobs(amqp, repo=repo)
    assert (failed.dc, failed.reason, failed.attempts) == ("dc2", "unreachable", 3)
    assert (job.state, job.attempts) == ("failed", 3)
    assert "unreachable" in job.error


async def test_imagesync_down_during_a_push_the_catalog_reconcile_catches_up(
    registry_factory, start_service, http_session, amqp, probe_factory
):
    port = free_port()
    notify = f"http://127.0.0.1:{port}{EVENTS_URL}"
    dc1 = await registry_factory("dc1", notify)
    dc2 = await registry_factory("dc2", notify)
    c1, c2 = client(dc1, http_session), client(dc2, http_session)
    repo = _repo()
    # Nobody listens on the port yet, and dc1 keeps its notifications in memory only: its
    # restart loses the one of this push for good.
    m = await push_image(c1, repo, "v1", [random_layer(50_000)])
    await dc1.stop()
    await dc1.start()

    probe = await probe_factory("image.replicated")

    await _imagesync(start_service, port, [dc1, dc2])
    await probe.wait_for("image.replicated", lambda e: e.repo == repo)

    [job] = await _jobs(amqp, repo=repo)
    assert await c2.manifest_digest(repo, "v1") == m.digest
    assert (job.source, job.target, job.reason, job.state) == ("dc1", "dc2", "reconcile", "done")
