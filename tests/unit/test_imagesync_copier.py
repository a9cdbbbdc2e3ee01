"""The copy order and its accounting, on in-memory registries: skip, mount, stream, verify."""

from __future__ import annotations

import json

import pytest

from libs.common.errors import NotFoundError
from services.imagesync.adapters import DigestMismatch
from services.imagesync.copier import Copier
from services.imagesync.domain import Manifest, SyncStats, digest_of
from services.imagesync.fakes import MemoryBlobIndex, MemoryRegistry

SCHEMA2 = "application/vnd.docker.distribution.manifest.v2+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"


def _manifest(config: str, layers: list[tuple[str, int]], media_type: str = SCHEMA2) -> Manifest:
    doc = {
        "schemaVersion": 2,
        "mediaType": media_type,
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": config,
            "size": 2,
        },
        "layers": [
            {"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": d, "size": n}
            for d, n in layers
        ],
    }
    return Manifest(media_type, json.dumps(doc).encode())


def _push(
    reg: MemoryRegistry, repo: str, tag: str | None, layers: list[bytes], media_type: str = SCHEMA2
) -> Manifest:
    config = reg.add_blob(repo, json.dumps({"layers": len(layers), "tag": tag}).encode())
    digests = [(reg.add_blob(repo, data), len(data)) for data in layers]
    m = _manifest(config, digests, media_type)
    reg.add_manifest(repo, m, tag)
    return m


def _index(children: list[Manifest]) -> Manifest:
    doc = {
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [
            {
                "mediaType": c.media_type,
                "digest": c.digest,
                "size": len(c.raw),
                "platform": {"architecture": arch, "os": "linux"},
            }
            for c, arch in zip(children, ["amd64", "arm64", "s390x"], strict=False)
        ],
    }
    return Manifest(OCI_INDEX, json.dumps(doc).encode())


@pytest.fixture
def dcs():
    return MemoryRegistry("dc1", "r1:5000"), MemoryRegistry("dc2", "r2:5000")


@pytest.fixture
def copier():
    return Copier(MemoryBlobIndex(), blob_concurrency=2)


@pytest.mark.parametrize("media_type", [SCHEMA2, OCI_MANIFEST])
async def test_image_is_copied_blobs_first_then_the_tag(dcs, copier, media_type):
    src, dst = dcs
    layers = [b"base" * 100, b"app" * 50]
    m = _push(src, "team/app", "v1", layers, media_type)

    stats = await copier.copy(src, dst, "team/app", "v1", m.digest, SyncStats())

    assert await dst.manifest_digest("team/app", "v1") == m.digest
    assert dst.blobs == src.blobs
    assert stats.blobs_copied == 3
    assert stats.bytes_copied == sum(len(b) for b in src.blobs.values())
    assert dst.calls.index("put_manifest") > max(
        i for i, c in enumerate(dst.calls) if c == "upload_blob"
    )


async def test_blobs_already_in_the_repository_are_skipped(dcs, copier):
    src, dst = dcs
    base = [b"L1" * 1000, b"L2" * 1000]
    first = _push(src, "team/app", "v1", base)
    await copier.copy(src, dst, "team/app", "v1", first.digest, SyncStats())
    second = _push(src, "team/app", "v2", [*base, b"new layer"])

    stats = await copier.copy(src, dst, "team/app", "v2", second.digest, SyncStats())

    config = json.loads(second.raw)["config"]["digest"]
    assert stats.blobs_skipped == 2
    assert stats.bytes_copied == len(b"new layer") + len(src.blobs[config])


async def test_blobs_of_another_repository_are_mounted_not_copied(dcs, copier):
    src, dst = dcs
    base = [b"L1" * 1000, b"L2" * 1000]
    first = _push(src, "team/base", "v1", base)
    await copier.copy(src, dst, "team/base", "v1", first.digest, SyncStats())
    for data in base:
        src.add_blob("team/other", data)
    second = _push(src, "team/other", "v1", [*base, b"new"])

    stats = await copier.copy(src, dst, "team/other", "v1", second.digest, SyncStats())

    assert stats.blobs_mounted == 2
    assert stats.blobs_copied == 2  # the new layer and the config
    assert await dst.manifest_digest("team/other", "v1") == second.digest


async def test_every_child_of_an_index_is_copied(dcs, copier):
    src, dst = dcs
    children = [
        _push(src, "team/multi", None, [f"layer-{arch}".encode()]) for arch in ("amd64", "arm64")
    ]
    index = _index(children)
    src.add_manifest("team/multi", index, "v1")

    stats = await copier.copy(src, dst, "team/multi", "v1", index.digest, SyncStats())

    assert [await dst.manifest_digest("team/multi", c.digest) for c in children] == [
        c.digest for c in children
    ]
    assert await dst.manifest_digest("team/multi", "v1") == index.digest
    assert stats.manifests_put == 3


async def test_a_tag_already_at_the_digest_is_left_alone(dcs, copier):
    src, dst = dcs
    m = _push(src, "team/app", "v1", [b"x"])
    await copier.copy(src, dst, "team/app", "v1", m.digest, SyncStats())

    stats = await copier.copy(src, dst, "team/app", "v1", m.digest, SyncStats())

    assert stats.already_present
    assert stats.bytes_copied == 0


async def test_a_newer_push_is_never_rolled_back(dcs, copier):
    src, dst = dcs
    old = _push(src, "team/app", "v1", [b"old"])
    _push(src, "team/app", "v1", [b"new"])

    stats = await copier.copy(src, dst, "team/app", "v1", old.digest, SyncStats())

    assert stats.superseded
    assert await dst.manifest_digest("team/app", "v1") is None


async def test_a_corrupt_source_blob_is_refused_and_the_tag_not_written(dcs, copier):
    src, dst = dcs
    m = _push(src, "team/app", "v1", [b"good bytes"])
    src.blobs[digest_of(b"good bytes")] = b"evil bytes"

    with pytest.raises(DigestMismatch):
        await copier.copy(src, dst, "team/app", "v1", m.digest, SyncStats())
    assert await dst.manifest_digest("team/app", "v1") is None


async def test_a_missing_source_manifest_is_final(dcs, copier):
    src, dst = dcs
    with pytest.raises(NotFoundError):
        await copier.copy(src, dst, "team/app", "v1", digest_of(b"nothing"), SyncStats())
