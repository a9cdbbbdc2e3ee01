"""Whether an image came from the platform (``DOCKVM_REQUIRE_BUILT_IMAGES``).

An image is platform-built when it is a base the image policy in force lists (the base image,
made by ``scripts/base-image.sh``, is registered so), or when the builder's ``image_builds``
holds a succeeded build of its repository and tag (or digest). The gateway only reads that
collection; the builder is its one writer. The read is a scan of the builds (FerretDB v1 does
not push the filter down): one small document per build.
"""

from __future__ import annotations

from typing import Any

from pymongo.asynchronous.database import AsyncDatabase

from libs.common.errors import ConflictError

from .image_policy import PolicyVersions

__all__ = ["BuiltImages", "split_ref"]


def split_ref(image: str) -> tuple[str, str | None, str | None]:
    """``host:5001/team/web:1`` → ``("team/web", "1", None)``; ``team/web@sha256:..`` →
    ``("team/web", None, "sha256:..")``. A first component with a dot, a colon or
    ``localhost`` is a registry and is dropped."""
    name, _, digest = image.partition("@")
    first, sep, rest = name.partition("/")
    if sep and ("." in first or ":" in first or first == "localhost"):
        name = rest
    tag = None
    if not digest:
        head, colon, tail = name.rpartition(":")
        name, tag = (head, tail) if colon and "/" not in tail else (name, "latest")
    return name, tag, digest or None


class BuiltImages:
    """Refuses (409 ``image_not_built``) an image the platform did not make."""

    def __init__(self, db: AsyncDatabase, policy: PolicyVersions) -> None:
        self.builds = db["image_builds"]
        self.policy = policy

    async def check(self, image: str) -> None:
        """Return if ``image`` is platform-built; otherwise a 409 naming it."""
        repo, tag, digest = split_ref(image)
        bases = {split_ref(b.image)[:2] for b in (await self.policy.current()).policy.bases}
        if (repo, tag) in bases:
            return
        query: dict[str, Any] = {"name": repo, "state": "succeeded"}
        query.update({"digest": digest} if digest else {"tag": tag})
        if await self.builds.find_one(query, {"_id": 1}) is None:
            raise ConflictError(
                f"image {image} was not built by the platform (dockvm image build); "
                "DOCKVM_REQUIRE_BUILT_IMAGES is on",
                reason="image_not_built",
            )
