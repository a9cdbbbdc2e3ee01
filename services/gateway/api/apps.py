"""The ``/v1/apps`` routes: scale an app out with its last spec, or in from its newest machines."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from libs.common.errors import DomainError, TransientError

from ..domain.models import AppScale, ScaleFailure, ScaleResult
from ..service import SagaDriver
from .deps import DRIVER, STORE
from .framework import AUDIT_TARGET, OPS, FieldErrors, RouteTable, json_response

__all__ = ["routes"]

routes = RouteTable()


def _chosen_for_removal(
    name: str, active: list[dict[str, Any]], excess: int, wanted: list[str]
) -> list[str]:
    """The ``excess`` machines to destroy: the ones asked for, then the newest."""
    by_id = {d["_id"] for d in active}
    unknown = [i for i in wanted if i not in by_id]
    if unknown:
        raise FieldErrors.one("ids", "unknown_machine", f"not active machines of {name}: {unknown}")
    chosen = list(dict.fromkeys(wanted))[:excess]
    # The newest go first (ids sort by creation time).
    for doc in sorted(active, key=lambda d: d["_id"], reverse=True):
        if len(chosen) >= excess:
            break
        if doc["_id"] not in chosen:
            chosen.append(doc["_id"])
    return chosen


async def _scale_in(driver: SagaDriver, chosen: list[str]) -> tuple[list[str], list[ScaleFailure]]:
    """Begin destroying each chosen machine; the ones that could not, with the reason."""
    destroying: list[str] = []
    failed: list[ScaleFailure] = []
    for mid in chosen:
        try:
            await driver.begin_destroy(mid)
        except DomainError as err:
            # Busy (a saga in flight) or gone: the caller decides whether to retry.
            failed.append(ScaleFailure(id=mid, reason=err.reason, detail=str(err)))
        except TransientError as err:
            # The others may already be destroying: say so rather than fail the whole call.
            failed.append(ScaleFailure(id=mid, reason="unavailable", detail=str(err)))
        else:
            destroying.append(mid)
    return destroying, failed


@routes.route(
    "POST",
    "/v1/apps/{app}/scale",
    roles=OPS,
    summary="Scale an app",
    body=AppScale,
    response=ScaleResult,
    errors=(404,),
)
async def scale_app(request: web.Request, body: AppScale) -> web.Response:
    """Create or destroy machines until the app has ``count`` active ones."""
    store, driver = request.app[STORE], request.app[DRIVER]
    name = request.match_info["app"]
    app = await store.get_app(name)
    if app is None:
        raise FieldErrors.one(
            "app", "unknown_app", f"no app {name}: create its first machine first"
        )
    active = await store.app_machines(name)
    created: list[str] = []
    destroying: list[str] = []
    failed: list[ScaleFailure] = []
    if body.count > len(active):
        created = driver.new_ids(body.count - len(active))
        await driver.create({**app["spec"], "count": len(created)}, created)
    elif body.count < len(active):
        chosen = _chosen_for_removal(name, active, len(active) - body.count, body.ids or [])
        destroying, failed = await _scale_in(driver, chosen)
    request[AUDIT_TARGET] = name
    result = ScaleResult(
        app=name, count=body.count, created=created, destroying=destroying, failed=failed
    )
    return json_response(result)
