"""In-memory fakes of the builder's ports, for unit tests of the build logic.

:class:`MemoryBuildStore` follows the Mongo store's contract (tests/integration/
test_builder.py runs the same checks against both); :class:`FakeEngine` plays a Docker Engine
whose build, verification and push answer what the test set up.
"""

from __future__ import annotations

import asyncio
import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .documents import BuildDoc
from .ports import BuildError, Verification

__all__ = ["FakeEngine", "MemoryBuildStore", "MemoryRegistries"]


class MemoryBuildStore:
    """Builds and log chunks in dicts."""

    def __init__(self) -> None:
        self.builds: dict[str, BuildDoc] = {}
        self.logs: dict[tuple[str, int], str] = {}

    async def insert(self, doc: BuildDoc) -> BuildDoc:
        """Store a new build; the existing one if its id is taken (idempotent submit)."""
        return copy.deepcopy(self.builds.setdefault(doc["_id"], copy.deepcopy(doc)))

    async def get(self, build_id: str) -> BuildDoc | None:
        """One build."""
        doc = self.builds.get(build_id)
        return copy.deepcopy(doc) if doc else None

    async def update(self, build_id: str, fields: dict[str, Any]) -> None:
        """Set fields of a build."""
        if build_id in self.builds:
            self.builds[build_id].update(copy.deepcopy(fields))  # type: ignore[typeddict-item]

    async def list(self, state: str | None, name: str | None, limit: int) -> list[BuildDoc]:
        """Builds, newest first."""
        docs = [
            copy.deepcopy(d)
            for d in self.builds.values()
            if (state is None or d["state"] == state) and (name is None or d["name"] == name)
        ]
        docs.sort(key=lambda d: (d["created_at"], d["_id"]), reverse=True)
        return docs[:limit]

    async def add_chunk(self, build_id: str, seq: int, text: str) -> None:
        """Insert one log chunk (idempotent by build and seq), then count it on the build."""
        self.logs.setdefault((build_id, seq), text)
        if build_id in self.builds:
            doc = self.builds[build_id]
            doc["log_seq"] = max(doc.get("log_seq", 0), seq)

    async def chunks(self, build_id: str, after: int, upto: int) -> list[tuple[int, str]]:
        """Chunks ``after < seq <= upto``, in order."""
        return sorted(
            (s, t) for (b, s), t in self.logs.items() if b == build_id and after < s <= upto
        )


@dataclass
class MemoryRegistries:
    """``{(dc, repo, tag): digest}``."""

    held: dict[tuple[str, str, str], str] = field(default_factory=dict)

    async def digest(self, dc: str, repo: str, tag: str) -> str | None:
        """The manifest digest of ``repo:tag`` in ``dc``'s registry, or None."""
        return self.held.get((dc, repo, tag))


BASE_DPKG = "base-files\t12\t\t\t\tii \nlibc6\t2.36\t\t\t\tii \n"


@dataclass
class FakeEngine:
    """A Docker Engine that answers what the test set: ``fail_build`` (a message),
    ``dpkg`` and ``sockets`` of the started image, ``shape``; ``build_gate`` holds a build
    until set. Pushes land in ``registries`` under ``dc``."""

    registries: MemoryRegistries
    dc: str = "dc1"
    fail_build: str | None = None
    dpkg: str = BASE_DPKG
    sockets: str = ""
    shape_of: tuple[int, int] = (2, 1000)
    build_gate: asyncio.Event | None = None
    fingerprint: str | None = None
    verified: int = 0
    builds: int = 0
    discarded: list[str] = field(default_factory=list)

    async def ensure_image(self, image: str, registry: str) -> None:
        """Every base is here."""

    async def build(
        self,
        context: bytes,
        labels: dict[str, str],
        on_line: Callable[[str], None],
        cancelled: Callable[[], bool],
    ) -> str:
        """Log two lines; fail or give an image id."""
        self.builds += 1
        on_line("Step 1/2 : FROM base\n")
        if self.build_gate is not None:
            await self.build_gate.wait()
        if self.fail_build:
            on_line(f"E: {self.fail_build}\n")
            raise BuildError(self.fail_build)
        on_line("Successfully built\n")
        return f"sha256:{self.builds:064x}"

    async def shape(self, image_id: str) -> tuple[int, int, str]:
        """What the test set; the fingerprint is ``fingerprint`` or the image id."""
        return (*self.shape_of, self.fingerprint or image_id)

    async def packages(self, image: str) -> str:
        """The base's packages."""
        return BASE_DPKG

    async def verify(self, image_id: str, name: str, settle_s: float) -> Verification:
        """What the test set."""
        self.verified += 1
        return Verification(dpkg=self.dpkg, sockets=self.sockets)

    async def push(self, image_id: str, repo: str, tag: str, on_line: Callable[[str], None]) -> str:
        """Record the tag under the dc."""
        digest = "sha256:" + image_id[-64:]
        self.registries.held[(self.dc, repo.split("/", 1)[1], tag)] = digest
        return digest

    async def discard(self, image_id: str) -> None:
        """Remember what was discarded."""
        self.discarded.append(image_id)
