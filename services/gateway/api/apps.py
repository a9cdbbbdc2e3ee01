"""The ``/v1/apps`` routes: scale an app out with its last spec, or in from its newest machines;
declare the health checks its releases may name (only those run commands in its machines)."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from libs.common.errors import DomainError, NotFoundError, TransientError

from ..domain.models import (
    AppCheckList,
    AppCheckOut,
    AppPath,
    AppScale,
    CheckDeclare,
    CheckPath,
    ScaleFailure,
    ScaleResult,
)
from ..service import SagaDriver
from .deps import DRIVER, STORE
from .framework import ANY, AUDIT_TARGET, OPS, WHO, FieldErrors, RouteTable, json_response
from .limits import check_disk

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
    params=AppPath,
    response=ScaleResult,
    errors=(404, 409),
)
async def scale_app(request: web.Request, body: AppScale) -> web.Response:
    """Create or destroy machines until the app has ``count`` active ones."""
    store, driver = request.app[STORE], request.app[DRIVER]
    name = request.match_info["app"]
    app = await store.get_app(name)
    if app is None:
        # The app the path names does not exist: a 404, as for a machine.
        raise NotFoundError(
            f"no app {name}: create its first machine first", reason="app_not_found"
        )
    active = await store.app_machines(name)
    created: list[str] = []
    destroying: list[str] = []
    failed: list[ScaleFailure] = []
    if body.count > len(active):
        spec = app["spec"]
        # The spec was checked when it was stored; the hosts may make less since.
        await check_disk(request, spec.get("disk"), spec.get("dc"), whose="the app's disk ")
        created = driver.new_ids(body.count - len(active))
        await driver.creates.check_fits(spec, len(created))  # 409 before anything is stored
        await driver.create({**app["spec"], "count": len(created)}, created)
    elif body.count < len(active):
        chosen = _chosen_for_removal(name, active, len(active) - body.count, body.ids or [])
        destroying, failed = await _scale_in(driver, chosen)
    request[AUDIT_TARGET] = name
    result = ScaleResult(
        app=name, count=body.count, created=created, destroying=destroying, failed=failed
    )
    return json_response(result)


@routes.route(
    "PUT",
    "/v1/apps/{app}/checks/{name}",
    roles=OPS,
    summary="Declare a health check",
    body=CheckDeclare,
    params=CheckPath,
    response=AppCheckOut,
)
async def declare_check(request: web.Request, body: CheckDeclare) -> web.Response:
    """Declare (or replace) a health check the app's releases may name."""
    app, name = request.match_info["app"], request.match_info["name"]
    request[AUDIT_TARGET] = f"{app}/{name}"
    doc = await request.app[STORE].checks.declare(
        app, name, body.model_dump(), by=request[WHO].name
    )
    return json_response(AppCheckOut(**doc))


@routes.route(
    "GET",
    "/v1/apps/{app}/checks",
    roles=ANY,
    summary="List an app's health checks",
    params=AppPath,
    response=AppCheckList,
)
async def list_checks(request: web.Request) -> web.Response:
    """The health checks declared for the app, by name."""
    docs = await request.app[STORE].checks.app_checks(request.match_info["app"])
    return json_response(AppCheckList(items=[AppCheckOut(**d) for d in docs]))


@routes.route(
    "DELETE",
    "/v1/apps/{app}/checks/{name}",
    roles=OPS,
    summary="Withdraw a health check",
    params=CheckPath,
    status=204,
    errors=(404,),
)
async def withdraw_check(request: web.Request) -> web.Response:
    """Withdraw a declared check; releases that already run it keep it."""
    app, name = request.match_info["app"], request.match_info["name"]
    request[AUDIT_TARGET] = f"{app}/{name}"
    if not await request.app[STORE].checks.withdraw(app, name):
        raise NotFoundError(f"no health check {name} declared for {app}", reason="check_not_found")
    return web.Response(status=204)
