"""The builder's use cases over its fakes: a build that passes is pushed and announced with its
copies ordered; one that fails (engine, verification, timeout) pushes nothing and discards its
image; a build whose builder died midway runs again, or fails once its attempts are spent; the
log is served in chunks and ends with the build."""

from __future__ import annotations

import asyncio

import pytest

from libs.common.bus.fakes import MemoryPublisher
from libs.common.contracts.builder import (
    DEFAULT_POLICY,
    BuildLog,
    BuildRun,
    BuildSpec,
    BuildSubmit,
    ImageBuilt,
    spec_digest,
)
from libs.common.contracts.imagesync import ImageSync
from libs.common.errors import TransientError
from services.builder.fakes import BASE_DPKG, FakeEngine, MemoryBuildStore, MemoryRegistries
from services.builder.handlers import log_chunks
from services.builder.service import Builds, Runner

pytestmark = pytest.mark.unit


class _Rig:
    def __init__(self, **engine: object) -> None:
        self.registries = MemoryRegistries()
        self.engine = FakeEngine(self.registries, **engine)  # type: ignore[arg-type]
        self.store = MemoryBuildStore()
        self.publisher = MemoryPublisher()
        runner = Runner(self.engine, "dc1", "reg1:5000", ("dc2",), timeout_s=5, attempts=2,
                        settle_s=0)  # fmt: skip
        self.builds = Builds(self.store, runner, self.registries, self.publisher)

    async def submit(self, tag: str = "1", **fields: object) -> str:
        spec = BuildSpec(name="team/web", tag=tag, base="debian-bookworm", **fields)  # type: ignore[arg-type]
        cmd = BuildSubmit(id=f"b-{tag}aaaaaa", spec=spec, policy=DEFAULT_POLICY, policy_version=3,
                          requested_by="ann", spec_digest=spec_digest(spec))  # fmt: skip
        return (await self.builds.submit(cmd))["_id"]

    async def log(self, build_id: str) -> str:
        chunk = await log_chunks(self.builds, BuildLog(id=build_id), None)  # type: ignore[arg-type]
        return "".join(c.text for c in chunk.chunks)  # type: ignore[attr-defined]


JQ = BASE_DPKG + "jq\t1.6\t\tlibc6\t\tii \n"


async def test_a_passing_build_is_pushed_announced_and_its_copy_ordered():
    rig = _Rig(dpkg=JQ, sockets='tcp LISTEN 0 5 0.0.0.0:22 0.0.0.0:* users:(("sshd",pid=7,fd=3))')
    build_id = await rig.submit(packages=["jq"])

    await rig.builds.run(build_id)

    doc = await rig.store.get(build_id)
    assert doc["state"] == "succeeded" and doc["step"] == "done" and doc["attempt"] == 1
    assert doc["image"] == "reg1:5000/team/web:1" and doc["sbom"][-1] == "libc6=2.36"
    assert "jq=1.6" in doc["sbom"] and doc["listening"] == ["tcp/22 (sshd pid 7)"]
    assert rig.registries.held[("dc1", "team/web", "1")] == doc["digest"]
    (built,) = rig.publisher.of_type(ImageBuilt.TYPE)
    assert (built.digest, built.policy_version, built.requested_by) == (doc["digest"], 3, "ann")
    (sync,) = rig.publisher.of_type(ImageSync.TYPE)
    assert (sync.source, sync.target, sync.digest) == ("dc1", "dc2", doc["digest"])
    assert len(doc["sync_jobs"]) == 1
    log = await rig.log(build_id)
    assert log.index("==> build") < log.index("==> verify") < log.index("==> push")
    assert log.endswith("==> done\n")


@pytest.mark.parametrize(
    ("engine", "reason"),
    [
        ({"fail_build": "Unable to locate package x"}, "build_failed"),
        ({"dpkg": BASE_DPKG + "jq\t1\t\t\t\tii \nstray\t1\t\t\t\tii \n"}, "verification_failed"),
        ({"dpkg": JQ, "sockets": "tcp LISTEN 0 5 0.0.0.0:3306 0.0.0.0:*"}, "verification_failed"),
        ({"dpkg": JQ, "shape_of": (20, 10)}, "verification_failed"),
    ],
)
async def test_a_failing_build_pushes_nothing_and_discards_its_image(engine, reason):
    rig = _Rig(**engine)
    build_id = await rig.submit(packages=["jq"])

    await rig.builds.run(build_id)

    doc = await rig.store.get(build_id)
    assert (doc["state"], doc["reason"]) == ("failed", reason)
    assert rig.registries.held == {}
    assert rig.publisher.of_type(ImageBuilt.TYPE) == []
    assert rig.engine.discarded == ([] if reason == "build_failed" else [doc["image_id"]])
    assert "==> failed: " in await rig.log(build_id)


async def test_a_build_past_its_time_fails_as_timeout():
    rig = _Rig(build_gate=asyncio.Event())
    rig.builds.runner.timeout_s = 0.2
    build_id = await rig.submit()

    await rig.builds.run(build_id)

    assert (await rig.store.get(build_id))["reason"] == "timeout"


async def test_a_build_interrupted_midway_runs_again_then_fails_when_attempts_are_spent():
    rig = _Rig(dpkg=JQ)
    first = await rig.submit("a", packages=["jq"])
    await rig.store.update(first, {"state": "running", "attempt": 1})
    spent = await rig.submit("b", packages=["jq"])
    await rig.store.update(spent, {"state": "running", "attempt": 2})

    await rig.builds.run(first)
    await rig.builds.run(spent)

    a, b = await rig.store.get(first), await rig.store.get(spent)
    assert (a["state"], a["attempt"]) == ("succeeded", 2)
    assert (b["state"], b["reason"]) == ("failed", "interrupted")
    assert rig.engine.builds == 1
    assert "stopped during attempt 2" in await rig.log(spent)


async def test_submit_is_idempotent_and_an_ended_build_is_not_run_again():
    rig = _Rig(dpkg=JQ)
    build_id = await rig.submit(packages=["jq"])
    await rig.submit(packages=["jq"])
    await rig.builds.run(build_id)

    await rig.builds.run(build_id)

    # The second submit (a retry: its first publish may have been lost) queues the run again;
    # the second run finds the build ended and does nothing.
    assert len(rig.publisher.of_type(BuildRun.TYPE)) == 2
    assert rig.engine.builds == 1
    assert len(rig.store.builds) == 1


async def test_the_log_is_done_only_when_the_build_ended_and_every_chunk_was_read():
    gate = asyncio.Event()
    rig = _Rig(dpkg=JQ, build_gate=gate)
    build_id = await rig.submit(packages=["jq"])
    task = asyncio.ensure_future(rig.builds.run(build_id))
    while (await rig.store.get(build_id)).get("log_seq", 0) == 0:
        await asyncio.sleep(0.05)

    running = await log_chunks(rig.builds, BuildLog(id=build_id), None)  # type: ignore[arg-type]
    gate.set()
    await task
    first = await log_chunks(rig.builds, BuildLog(id=build_id, limit=1), None)  # type: ignore[arg-type]
    final = await log_chunks(rig.builds, BuildLog(id=build_id), None)  # type: ignore[arg-type]

    assert running.state == "running" and not running.done and running.chunks
    assert not first.done or final.chunks[-1].seq == first.chunks[-1].seq
    assert final.done and final.state == "succeeded"


async def test_an_image_with_the_layers_and_config_of_one_started_before_is_not_started_again():
    rig = _Rig(dpkg=JQ, fingerprint="same-layers")
    first = await rig.submit("a", packages=["jq"])
    second = await rig.submit("b", packages=["jq"])

    await rig.builds.run(first)
    await rig.builds.run(second)

    assert rig.engine.verified == 1
    assert (await rig.store.get(second))["sbom"] == (await rig.store.get(first))["sbom"]
    assert "what it showed is reused" in await rig.log(second)


async def test_the_image_listing_shows_builds_and_the_base_with_each_dcs_digest():
    rig = _Rig(dpkg=JQ)
    build_id = await rig.submit(packages=["jq"])
    await rig.builds.run(build_id)
    rig.registries.held[("dc1", "dockvm/base", "bookworm")] = "sha256:base"

    images = await rig.builds.images(None, ["dc1", "dc2"], ["dockvm/base:bookworm"])

    base, built = images
    assert (base.name, base.build_id) == ("dockvm/base", None)
    assert base.built_by == "scripts/base-image.sh"
    assert base.digests == {"dc1": "sha256:base", "dc2": None}
    assert (built.name, built.build_id, built.built_by, built.policy_version) == (
        "team/web", build_id, "ann", 3)  # fmt: skip
    assert built.digests["dc1"] == (await rig.store.get(build_id))["digest"]
    assert await rig.builds.images("team/web", ["dc1"], ["dockvm/base:bookworm"]) == [
        built.model_copy(update={"digests": {"dc1": built.digests["dc1"]}})]  # fmt: skip


async def test_a_registry_that_does_not_answer_leaves_the_listing_whole():
    rig = _Rig(dpkg=JQ)
    rig.registries.held[("dc1", "dockvm/base", "bookworm")] = "sha256:base"
    answer = rig.registries.digest

    async def dc2_down(dc: str, repo: str, tag: str) -> str | None:
        if dc == "dc2":
            raise TransientError("dc2 registry: connection refused")
        return await answer(dc, repo, tag)

    rig.registries.digest = dc2_down  # type: ignore[method-assign]

    [base] = await rig.builds.images(None, ["dc1", "dc2"], ["dockvm/base:bookworm"])

    assert base.digests == {"dc1": "sha256:base", "dc2": None}
