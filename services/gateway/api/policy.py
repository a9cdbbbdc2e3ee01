"""The ``/v1/images/policy`` routes: the image policy, which the gateway owns and versions.

Anyone with a token may read it; only an admin may change it. A ``PUT`` stores the whole new
policy as the next version (:mod:`services.gateway.image_policy`); ``If-Match: <version>``
makes it conditional on the version the admin read (409 otherwise), and without it the change
applies over the latest. The route wrapper writes the audit entry, whose target names the
version the change made.
"""

from __future__ import annotations

from aiohttp import web

from libs.common.contracts.builder import ImagePolicy
from libs.common.errors import ConflictError

from ..built_images import BuiltImages
from ..image_policy import PolicyVersions
from .framework import ADMIN, ANY, AUDIT_TARGET, WHO, FieldErrors, RouteTable, json_response

__all__ = ["BUILT", "POLICY", "routes"]

routes = RouteTable()

POLICY = web.AppKey("gateway.image_policy", PolicyVersions)
# Whether an image came from the platform (machine creation, DOCKVM_REQUIRE_BUILT_IMAGES).
BUILT = web.AppKey("gateway.built_images", BuiltImages)


def _if_match(request: web.Request) -> int | None:
    raw = request.headers.get("If-Match")
    if raw is None:
        return None
    try:
        return int(raw.strip().strip('"'))
    except ValueError as err:
        raise FieldErrors.one("If-Match", "invalid", "give the version number read") from err


@routes.route("GET", "/v1/images/policy", roles=ANY, summary="The image policy in force")
async def get_policy(request: web.Request) -> web.Response:
    """The latest version of the policy (version 0: the shipped default)."""
    current = await request.app[POLICY].current()
    return json_response(current.out(), status=200)


@routes.route(
    "PUT",
    "/v1/images/policy",
    roles=ADMIN,
    summary="Replace the image policy",
    body=ImagePolicy,
    errors=(409,),
)
async def put_policy(request: web.Request, body: ImagePolicy) -> web.Response:
    """Store ``body`` as the next version; the next build is checked against it."""
    store = request.app[POLICY]
    expected = _if_match(request)
    current = await store.current()
    if expected is not None and expected != current.version:
        raise ConflictError(
            f"the policy is at version {current.version}, not {expected}: read it and retry",
            reason="policy_changed",
        )
    stored = await store.put(body, request[WHO].name, current.version)
    request[AUDIT_TARGET] = f"image-policy v{stored.version}"
    return json_response(stored.out(), status=200)
