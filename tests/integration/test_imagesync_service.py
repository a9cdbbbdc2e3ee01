"""The job logic of SyncService on the real MongoDB API (sync_jobs), with in-memory registries
whose failures the test injects: retries, terminal failure, idempotence, concurrency."""

from __future__ import annotations

import asyncio
import json

import pytest

from libs.common.contracts.imagesync import ImageReplicated, ImageSync, ImageSyncFailed
from services.imagesync.copier import Copier
from services.imagesync.domain import Manifest
from services.imagesync.fakes import MemoryBlobIndex, MemoryRegistry
from services.imagesync.service import RetryPolicy, SyncService
from services.imagesync.store import SyncStore

SCHEMA2 = "application/vnd.docker.distribution.manifest.v2+json"


class Sent(list):
    """Collects what the service publishes."""

    async def __call__(self, msg) -> None:
        self.append(msg)


def _push(reg: MemoryRegistry, repo: str, tag: str) -> Manifest:
    layer, config = reg.add_blob(repo, b"layer" * 100), reg.add_blob(repo, b'{"os":"linux"}')
    doc = {
        "schemaVersion": 2,
        "mediaType": SCHEMA2,
        "config": {
            "mediaType": "application/vnd.docker.container.image.v1+json",
            "digest": config,
            "size": 14,
        },
        "layers": [
            {
                "mediaType": "application/vnd.docker.image.rootfs.diff.tar.gzip",
                "digest": layer,
                "size": 500,
            }
        ],
    }
    m = Manifest(SCHEMA2, json.dumps(doc).encode())
    reg.add_manifest(repo, m, tag)
    return m


@pytest.fixture
async def world(mongo_db):
    store = SyncStore(mongo_db)
    await store.setup()
    dc1, dc2 = MemoryRegistry("dc1", "r1:5000"), MemoryRegistry("dc2", "r2:5000")
    service = SyncService(
        [dc1, dc2],
        store,
        Copier(MemoryBlobIndex()),
        RetryPolicy(attempts=4, initial_s=0.01, max_s=0.02),
    )
    return service, store, dc1, dc2


def _cmd(digest: str | None = None, **over) -> ImageSync:
    return ImageSync(
        **{
            "source": "dc1",
            "target": "dc2",
            "repo": "team/app",
            "tag": "v1",
            "digest": digest,
            "reason": "push",
            **over,
        }
    )


async def test_transient_failures_are_retried_then_the_job_is_done(world):
    service, _, dc1, dc2 = world
    m = _push(dc1, "team/app", "v1")
    dc2.fail_next = 2
    sent = Sent()

    job = await service.sync(_cmd(m.digest), sent)

    assert (job["state"], job["attempts"]) == ("done", 3)
    assert await dc2.manifest_digest("team/app", "v1") == m.digest
    assert [type(x) for x in sent] == [ImageReplicated]
    assert sent[0].ref == "r2:5000/team/app:v1"


async def test_after_its_attempts_the_job_fails_and_says_why(world):
    service, store, dc1, dc2 = world
    m = _push(dc1, "team/app", "v1")
    dc2.fail_next = 100
    sent = Sent()

    job = await service.sync(_cmd(m.digest), sent)

    assert (job["state"], job["attempts"]) == ("failed", 4)
    assert "injected failure" in job["error"]
    [failed] = sent
    assert isinstance(failed, ImageSyncFailed)
    assert (failed.reason, failed.attempts, failed.dc) == ("unreachable", 4, "dc2")
    [view] = await store.list_jobs(state="failed")
    assert view.digest == m.digest


async def test_a_failed_job_runs_again_when_asked_again(world):
    service, _, dc1, dc2 = world
    m = _push(dc1, "team/app", "v1")
    dc2.fail_next = 100
    await service.sync(_cmd(m.digest), Sent())
    dc2.fail_next = 0

    job = await service.sync(_cmd(m.digest, reason="reconcile"), Sent())

    assert job["state"] == "done"
    assert await dc2.manifest_digest("team/app", "v1") == m.digest


async def test_the_same_copy_asked_twice_at_once_runs_once(world):
    service, store, dc1, _ = world
    m = _push(dc1, "team/app", "v1")
    sent = Sent()

    results = await asyncio.gather(*(service.sync(_cmd(m.digest), sent) for _ in range(4)))

    assert sum(r is not None for r in results) == 1
    assert [type(x) for x in sent] == [ImageReplicated]
    [job] = await store.list_jobs()
    assert (job.state, job.attempts, job.blobs_copied) == ("done", 1, 2)


async def test_without_a_digest_the_source_tag_is_resolved(world):
    service, _, dc1, dc2 = world
    m = _push(dc1, "team/app", "v1")

    job = await service.sync(_cmd(None, reason="manual"), Sent())

    assert job["digest"] == m.digest
    assert await dc2.manifest_digest("team/app", "v1") == m.digest


@pytest.mark.parametrize(
    ("cmd", "reason"),
    [
        (_cmd(None, tag="missing"), "not_found"),
        (_cmd(None, target="dc9"), "unknown_dc"),
        (_cmd(None, source="dc2", target="dc1"), "not_found"),
        (_cmd(None, source="dc2"), "unknown_dc"),
        (_cmd("sha256:" + "1" * 64), "not_found"),
    ],
)
async def test_impossible_copies_fail_with_a_reason(world, cmd, reason):
    service, _, dc1, _ = world
    _push(dc1, "team/app", "v1")
    sent = Sent()

    await service.sync(cmd, sent)

    [failed] = sent
    assert isinstance(failed, ImageSyncFailed)
    assert failed.reason == reason


async def test_reconcile_plans_copies_for_what_differs(world):
    service, _, dc1, dc2 = world
    m = _push(dc1, "team/app", "v1")
    other = _push(dc2, "team/other", "v2")

    orders = await service.reconcile()

    assert sorted((o.source, o.target, o.repo, o.digest) for o in orders) == [
        ("dc1", "dc2", "team/app", m.digest),
        ("dc2", "dc1", "team/other", other.digest),
    ]


class _GatedRegistry(MemoryRegistry):
    """Uploads wait for ``gate``: a copy that is still running when the test wants it."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.gate = asyncio.Event()
        self.uploading = asyncio.Event()

    async def upload_blob(self, repo, digest, chunks, size=None):
        self.uploading.set()
        await self.gate.wait()
        return await super().upload_blob(repo, digest, chunks, size)


async def test_shutdown_hands_running_jobs_back_and_another_worker_finishes_them(mongo_db):
    store = SyncStore(mongo_db)
    await store.setup()
    dc1, dc2 = MemoryRegistry("dc1"), _GatedRegistry("dc2")
    policy = RetryPolicy(attempts=2, initial_s=0.01, max_s=0.02)
    first = SyncService([dc1, dc2], store, Copier(MemoryBlobIndex()), policy)
    m = _push(dc1, "team/app", "v1")
    running = asyncio.ensure_future(first.sync(_cmd(m.digest), Sent()))
    await dc2.uploading.wait()

    await first.shutdown()
    [held] = await store.list_jobs()
    dc2.gate.set()
    second = SyncService([dc1, dc2], store, Copier(MemoryBlobIndex()), policy)
    job = await second.sync(_cmd(m.digest), Sent())

    assert running.cancelled()
    assert held.state == "pending"
    assert (job["state"], job["attempts"]) == ("done", 2)
    assert await dc2.manifest_digest("team/app", "v1") == m.digest
