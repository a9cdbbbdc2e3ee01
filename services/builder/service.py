"""The builder's use cases: take a build, run it (render, base, build, verify, push), answer
queries.

A build runs at most ``attempts`` times: a ``build.run`` redelivered for a build already
``running`` means the builder that ran it died midway; it is run again from the start (nothing
was pushed: the push is the last step, and a registry makes a tag only once its manifest is
complete) or, once its attempts are spent, marked failed. Each run is bounded by ``timeout_s``.
A failed build leaves no tag in any registry and its image is removed from the engine.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import structlog
from prometheus_client import Counter, Histogram

from libs.common.bus import Publisher
from libs.common.clock import utcnow
from libs.common.contracts.builder import (
    BuildFailed,
    BuildRun,
    BuildSpec,
    BuildSubmit,
    ImageBuilt,
    ImagePolicy,
    ImageTag,
    Violation,
    policy_violations,
)
from libs.common.contracts.imagesync import ImageSync
from libs.common.errors import NotFoundError, TransientError

from . import domain
from .documents import BuildDoc
from .domain import Step
from .ports import BuildError, BuildStore, Engine, Registries, Verification

__all__ = ["BuildFailure", "Builds", "LogSink", "Runner"]

log = structlog.get_logger("builder")
_BUILDS = Counter("dockvm_builder_builds_total", "Builds by outcome", ["outcome"])
_SECONDS = Histogram(
    "dockvm_builder_build_seconds",
    "Build time, verification included",
    buckets=(5, 10, 20, 40, 60, 120, 300, 600, 1200),
)
# A log chunk is written at least this often while lines come, and when it grows this big.
FLUSH_S = 0.5
CHUNK_BYTES = 64 * 1024
# Verifications remembered by image fingerprint (see Builds._remember).
VERIFIED_KEPT = 256


class BuildFailure(Exception):
    """A build ends failed: a stable ``reason`` and the detail people read."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def _violations(reason: str, found: list[Violation]) -> BuildFailure:
    return BuildFailure(reason, "; ".join(f"{v.type}: {v.message}" for v in found))


class LogSink:
    """A build's log: lines from any thread, written as chunks (one document each)."""

    def __init__(self, store: BuildStore, build_id: str, first_seq: int) -> None:
        self._store = store
        self._id = build_id
        self._seq = first_seq
        self._buf: list[str] = []
        self._mutex = threading.Lock()

    def write(self, text: str) -> None:
        """Add text (thread-safe; the engine's threads call this)."""
        with self._mutex:
            self._buf.append(text)

    async def flush(self) -> None:
        """Write what is buffered as chunks of at most CHUNK_BYTES."""
        with self._mutex:
            text, self._buf = "".join(self._buf), []
        for i in range(0, len(text), CHUNK_BYTES):
            self._seq += 1
            await self._store.add_chunk(self._id, self._seq, text[i : i + CHUNK_BYTES])

    async def pump(self) -> None:
        """Flush every FLUSH_S until cancelled."""
        while True:
            await asyncio.sleep(FLUSH_S)
            await self.flush()


@dataclass
class Runner:
    """How builds run here: the engine, where they are pushed, their bounds."""

    engine: Engine
    dc: str
    registry: str  # host:port of the dc's registry
    other_dcs: tuple[str, ...]
    timeout_s: float
    attempts: int
    settle_s: float


class Builds:
    """Submit, run and query builds."""

    def __init__(
        self, store: BuildStore, runner: Runner, registries: Registries, publisher: Publisher
    ) -> None:
        self.store = store
        self.runner = runner
        self.registries = registries
        self.publisher = publisher
        self._base_packages: dict[str, dict[str, domain.Package]] = {}
        self._verified: dict[str, Verification] = {}

    async def submit(self, cmd: BuildSubmit) -> BuildDoc:
        """Store the build (idempotent by id) and queue its run."""
        doc: BuildDoc = {
            "_id": cmd.id,
            "name": cmd.spec.name,
            "tag": cmd.spec.tag,
            "state": "queued",
            "spec": cmd.spec.model_dump_json(),
            "spec_digest": cmd.spec_digest,
            "policy": cmd.policy.model_dump_json(),
            "policy_version": cmd.policy_version,
            "requested_by": cmd.requested_by,
            "created_at": utcnow(),
            "attempt": 0,
            "step": Step.QUEUED,
            "sbom": [],
            "listening": [],
            "sync_jobs": [],
            "log_seq": 0,
        }
        stored = await self.store.insert(doc)
        if stored["state"] == "queued":
            await self.publisher.publish(BuildRun(id=cmd.id))
        return stored

    async def requeue(self) -> int:
        """Queue again the builds stored but never started (a publish lost to a crash)."""
        queued = await self.store.list("queued", None, 1000)
        for doc in queued:
            await self.publisher.publish(BuildRun(id=doc["_id"]))
        return len(queued)

    async def get(self, build_id: str) -> BuildDoc:
        """One build, or NotFoundError."""
        doc = await self.store.get(build_id)
        if doc is None:
            raise NotFoundError(f"no build {build_id}")
        return doc

    async def run(self, build_id: str) -> None:
        """Run a queued build to its end (a redelivery of a finished one does nothing)."""
        doc = await self.get(build_id)
        if doc["state"] in ("succeeded", "failed"):
            return
        attempt = doc.get("attempt", 0) + 1
        sink = LogSink(self.store, build_id, doc.get("log_seq", 0))
        if doc["state"] == "running":
            sink.write(f"==> the builder stopped during attempt {attempt - 1}\n")
            if attempt > self.runner.attempts:
                await sink.flush()
                await self._fail(
                    doc,
                    BuildFailure(
                        "interrupted", f"the builder stopped during each of {attempt - 1} attempts"
                    ),
                )
                return
        await self.store.update(
            build_id,
            {"state": "running", "attempt": attempt, "started_at": utcnow(), "step": Step.RENDER},
        )
        started = asyncio.get_running_loop().time()
        pump = asyncio.ensure_future(sink.pump())
        try:
            result = await asyncio.wait_for(self._pipeline(doc, sink), self.runner.timeout_s)
        except TimeoutError:
            result = BuildFailure("timeout", f"the build took over {self.runner.timeout_s:g} s")
        except BuildFailure as failure:
            result = failure
        finally:
            pump.cancel()
        failed = isinstance(result, BuildFailure)
        sink.write(f"==> {'failed: ' + str(result) if failed else 'done'}\n")
        await sink.flush()
        _SECONDS.observe(asyncio.get_running_loop().time() - started)
        if isinstance(result, BuildFailure):
            await self._fail(doc, result)
        else:
            await self._succeed(doc, result)

    async def _fail(self, doc: BuildDoc, failure: BuildFailure) -> None:
        _BUILDS.labels("failed").inc()
        await self.store.update(
            doc["_id"],
            {
                "state": "failed",
                "finished_at": utcnow(),
                "reason": failure.reason,
                "detail": failure.detail,
            },
        )
        log.info("build failed", build_id=doc["_id"], reason=failure.reason)
        await self.publisher.publish(
            BuildFailed(
                build_id=doc["_id"],
                repo=doc["name"],
                tag=doc["tag"],
                reason=failure.reason,
                detail=failure.detail[:2000],
            )
        )

    async def _succeed(self, doc: BuildDoc, fields: dict[str, Any]) -> None:
        _BUILDS.labels("succeeded").inc()
        await self.store.update(
            doc["_id"], {**fields, "state": "succeeded", "step": Step.DONE, "finished_at": utcnow()}
        )
        log.info("build pushed", build_id=doc["_id"], image=fields["image"])
        # The registry's notification makes imagesync copy the push too; these orders are the
        # same jobs (imagesync keys a copy by its natural key), so the copy does not depend on
        # the webhook, and they are the sync jobs the build record names.
        for target in self.runner.other_dcs:
            await self.publisher.publish(
                ImageSync(
                    source=self.runner.dc,
                    target=target,
                    repo=doc["name"],
                    tag=doc["tag"],
                    digest=fields["digest"],
                    reason="push",
                )
            )
        await self.publisher.publish(
            ImageBuilt(
                build_id=doc["_id"],
                registry=self.runner.registry,
                dc=self.runner.dc,
                repo=doc["name"],
                tag=doc["tag"],
                digest=fields["digest"],
                spec_digest=doc["spec_digest"],
                policy_version=doc["policy_version"],
                requested_by=doc["requested_by"],
            )
        )

    async def _step(self, doc: BuildDoc, sink: LogSink, step: Step) -> None:
        sink.write(f"==> {step}\n")
        await self.store.update(doc["_id"], {"step": step})

    async def _pipeline(self, doc: BuildDoc, sink: LogSink) -> dict[str, Any]:
        """Render, build, verify, push; the fields of a succeeded build, or BuildFailure."""
        spec = BuildSpec.model_validate_json(doc["spec"])
        policy = ImagePolicy.model_validate_json(doc["policy"])
        found = policy_violations(spec, policy)
        base = policy.base(spec.base)
        if found or base is None:
            raise _violations("policy", found)
        context = domain.render_context(spec, base, doc["_id"])
        sink.write(domain.render_dockerfile(spec, base, doc["_id"]))
        await self._step(doc, sink, Step.BASE)
        try:
            await self.runner.engine.ensure_image(base.image, self.runner.registry)
        except BuildError as err:
            raise BuildFailure("base_unavailable", str(err)) from err
        await self._step(doc, sink, Step.BUILD)
        labels = domain.image_labels(
            doc["_id"],
            spec,
            doc["spec_digest"],
            doc["policy_version"],
            doc["requested_by"],
            utcnow(),
            base,
        )
        cancelled = threading.Event()
        try:
            image_id = await self.runner.engine.build(context, labels, sink.write, cancelled.is_set)
        except BuildError as err:
            raise BuildFailure("build_failed", str(err)) from err
        except asyncio.CancelledError:
            cancelled.set()  # the build thread stops at its next line, closing the stream
            raise
        try:
            checked = await self._verify(doc, sink, spec, policy, image_id)
            await self._step(doc, sink, Step.PUSH)
            return {**checked, **await self._push(doc, sink, image_id)}
        except BaseException:
            await self.runner.engine.discard(image_id)
            raise

    def _remember(self, fingerprint: str, seen: Verification) -> None:
        # What a started image showed depends only on its layers and runtime config (the
        # fingerprint): a rebuild from the cache (new labels, same layers) is not started again.
        if len(self._verified) >= VERIFIED_KEPT:
            self._verified.pop(next(iter(self._verified)))
        self._verified[fingerprint] = seen

    async def _base_packages_of(self, image: str) -> dict[str, domain.Package]:
        if image not in self._base_packages:
            self._base_packages[image] = domain.parse_dpkg(await self.runner.engine.packages(image))
        return self._base_packages[image]

    async def _verify(
        self, doc: BuildDoc, sink: LogSink, spec: BuildSpec, policy: ImagePolicy, image_id: str
    ) -> dict[str, Any]:
        await self._step(doc, sink, Step.VERIFY)
        base = policy.base(spec.base)
        layers, size, fingerprint = await self.runner.engine.shape(image_id)
        sink.write(f"image {image_id[:19]}: {layers} layers, {size} bytes\n")
        try:
            seen = self._verified.get(fingerprint)
            if seen is None:
                seen = await self.runner.engine.verify(
                    image_id, f"dockvm-verify-{doc['_id']}", self.runner.settle_s
                )
                self._remember(fingerprint, seen)
            else:
                sink.write("verification: the same layers and runtime config as an image "
                           "started before: what it showed is reused\n")  # fmt: skip
            base_pkgs = await self._base_packages_of(base.image)
        except BuildError as err:
            raise BuildFailure("verification_failed", str(err)) from err
        pkgs = domain.parse_dpkg(seen.dpkg)
        listeners = domain.parse_listeners(seen.sockets)
        sink.write(
            f"sbom: {len(pkgs)} packages ({len(set(pkgs) - set(base_pkgs))} over the "
            f"base); listening: {', '.join(map(str, sorted(listeners))) or 'nothing'}\n"
        )
        found = (
            domain.shape_violations(layers, size, policy)
            + domain.sbom_violations(pkgs, base_pkgs, spec.packages, policy)
            + domain.listening_violations(listeners, base, policy)
        )
        fields = {
            "image_id": image_id,
            "layers": layers,
            "size": size,
            "sbom": [f"{p.name}={p.version}" for p in sorted(pkgs.values(), key=lambda p: p.name)],
            "listening": [str(s) for s in sorted(listeners)],
        }
        await self.store.update(doc["_id"], fields)
        if found:
            for v in found:
                sink.write(f"verification: {v.type}: {v.message}\n")
            raise _violations("verification_failed", found)
        return fields

    async def _push(self, doc: BuildDoc, sink: LogSink, image_id: str) -> dict[str, Any]:
        repo = f"{self.runner.registry}/{doc['name']}"
        try:
            digest = await self.runner.engine.push(image_id, repo, doc["tag"], sink.write)
        except BuildError as err:
            raise BuildFailure("push_failed", str(err)) from err
        except TransientError as err:
            raise BuildFailure("push_failed", str(err)) from err
        sink.write(f"pushed {repo}:{doc['tag']}@{digest}\n")
        jobs = [
            domain.sync_job_id(self.runner.dc, t, doc["name"], doc["tag"], digest)
            for t in self.runner.other_dcs
        ]
        return {"image": f"{repo}:{doc['tag']}", "digest": digest, "sync_jobs": jobs}

    async def _digest(self, dc: str, repo: str, tag: str) -> str | None:
        """What ``dc``'s registry holds of ``repo:tag``; None also when that registry does not
        answer: one dc down must not take the whole listing down with it (it was a 503)."""
        try:
            return await self.registries.digest(dc, repo, tag)
        except TransientError as err:
            log.warning("registry unreachable for the image list", dc=dc, error=str(err))
            return None

    async def images(
        self,
        name: str | None,
        dcs: list[str],
        bases: Sequence[str] = (),
    ) -> list[ImageTag]:
        """The latest succeeded build of each tag, and the base images, with what each dc's
        registry holds now."""
        latest: dict[tuple[str, str], BuildDoc] = {}
        for doc in await self.store.list("succeeded", name, 1000):
            latest.setdefault((doc["name"], doc["tag"]), doc)
        out = []
        for base in bases:
            repo, _, tag = base.rpartition(":")
            if name in (None, repo):
                digests = await asyncio.gather(
                    *(self._digest(dc, repo, tag) for dc in dcs)
                )
                out.append(
                    ImageTag(
                        name=repo,
                        tag=tag,
                        build_id=None,
                        built_by="scripts/base-image.sh",
                        spec_digest=None,
                        policy_version=None,
                        built_at=None,
                        digests=dict(zip(dcs, digests, strict=True)),
                    )
                )
        for (repo, tag), doc in sorted(latest.items()):
            digests = await asyncio.gather(*(self._digest(dc, repo, tag) for dc in dcs))
            out.append(
                ImageTag(
                    name=repo,
                    tag=tag,
                    build_id=doc["_id"],
                    built_by=doc["requested_by"],
                    spec_digest=doc["spec_digest"],
                    policy_version=doc["policy_version"],
                    built_at=doc.get("finished_at"),
                    digests=dict(zip(dcs, digests, strict=True)),
                )
            )
        return out
