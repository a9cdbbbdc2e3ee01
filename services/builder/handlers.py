"""Bus entrypoints of the builder: its RPCs (queue ``builder``) and its work queue
(``builder.work``), thin translations between :mod:`libs.common.contracts.builder` and
:class:`~services.builder.service.Builds`.

Delivery guarantee: at least once, without dedupe. ``builder.build.submit`` is idempotent by
the build id; ``build.run`` of a build already ended does nothing, and of a build already
running means its builder died midway (see :mod:`.service`). The work queue is consumed
``builder_concurrency`` messages at a time and a message is acked only when its build ended,
so a build queued or running when the builder stops is run again when it starts. A refused
RPC is answered with ``builder.rejected`` and never dead-lettered.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from libs.common.bus import Handler, MessageContext
from libs.common.contracts.builder import (
    BuildGet,
    BuildInfo,
    BuildList,
    BuildListing,
    BuildLog,
    BuildLogChunk,
    BuildRejected,
    BuildRun,
    BuildSpec,
    BuildSubmit,
    ImageList,
    ImageListing,
    LogLine,
)
from libs.common.contracts.envelope import Message
from libs.common.errors import DomainError

from .documents import BuildDoc
from .service import Builds

__all__ = ["RPC_TYPES", "WORK_TYPES", "build_info", "rpc_handlers", "work_handlers"]


def build_info(doc: BuildDoc) -> BuildInfo:
    """A stored build as the contract shows it."""
    fields = {k: v for k, v in doc.items() if k in BuildInfo.model_fields and k != "spec"}
    spec = BuildSpec.model_validate_json(doc["spec"])
    return BuildInfo(id=doc["_id"], spec=spec, **fields)  # type: ignore[arg-type]


async def submit(builds: Builds, msg: BuildSubmit, ctx: MessageContext) -> Message:
    """``builder.build.submit`` → ``builder.build``."""
    return build_info(await builds.submit(msg))


async def get(builds: Builds, msg: BuildGet, ctx: MessageContext) -> Message:
    """``builder.build.get`` → ``builder.build``."""
    return build_info(await builds.get(msg.id))


async def list_builds(builds: Builds, msg: BuildList, ctx: MessageContext) -> Message:
    """``builder.build.list`` → ``builder.build.listing``."""
    docs = await builds.store.list(msg.state, msg.name, msg.limit)
    return BuildListing(builds=[build_info(d) for d in docs])


async def log_chunks(builds: Builds, msg: BuildLog, ctx: MessageContext) -> Message:
    """``builder.build.log`` → ``builder.build.log_chunk``."""
    doc = await builds.get(msg.id)
    upto = min(doc.get("log_seq", 0), msg.after + msg.limit)
    chunks = await builds.store.chunks(msg.id, msg.after, upto)
    ended = doc["state"] in ("succeeded", "failed")
    return BuildLogChunk(
        id=msg.id,
        chunks=[LogLine(seq=s, text=t) for s, t in chunks],
        state=doc["state"],  # type: ignore[arg-type]
        step=doc.get("step"),
        # Read before the chunks: the last chunk is written before the build is marked ended.
        done=ended and upto >= doc.get("log_seq", 0),
    )


async def image_list(builds: Builds, msg: ImageList, ctx: MessageContext) -> Message:
    """``builder.image.list`` → ``builder.image.listing``, over every dc's registry."""
    dcs = [builds.runner.dc, *builds.runner.other_dcs]
    return ImageListing(images=await builds.images(msg.name, dcs, msg.bases))


async def run(builds: Builds, msg: BuildRun, ctx: MessageContext) -> None:
    """``build.run``: the whole build, acked when it ended."""
    await builds.run(msg.id)


_RPC: dict[str, Callable[[Builds, Any, MessageContext], Awaitable[Message]]] = {
    BuildSubmit.TYPE: submit,
    BuildGet.TYPE: get,
    BuildList.TYPE: list_builds,
    BuildLog.TYPE: log_chunks,
    ImageList.TYPE: image_list,
}
RPC_TYPES = tuple(_RPC)
WORK_TYPES = (BuildRun.TYPE,)


def _rejected(err: DomainError) -> BuildRejected:
    reason = err.reason if err.reason in ("not_found", "conflict") else "invalid"
    return BuildRejected(reason=reason, detail=str(err))  # type: ignore[arg-type]


def _answering(fn: Callable[..., Awaitable[Message]], builds: Builds) -> Handler:
    """Bind ``fn`` to the use cases; a refusal becomes a ``builder.rejected`` reply."""

    async def handler(msg: Any, ctx: MessageContext) -> Message:
        try:
            return await fn(builds, msg, ctx)
        except DomainError as err:
            return _rejected(err)

    return handler


def _working(fn: Callable[..., Awaitable[None]], builds: Builds) -> Handler:
    """Bind ``fn`` to the use cases (a failure is the consumer's: requeued or dead-lettered)."""

    async def handler(msg: Any, ctx: MessageContext) -> None:
        await fn(builds, msg, ctx)

    return handler


def rpc_handlers(builds: Builds) -> dict[str, Handler]:
    """The handler table of the ``builder`` queue (its bindings are its keys)."""
    return {t: _answering(fn, builds) for t, fn in _RPC.items()}


def work_handlers(builds: Builds) -> dict[str, Handler]:
    """The handler table of the ``builder.work`` queue."""
    return {BuildRun.TYPE: _working(run, builds)}
