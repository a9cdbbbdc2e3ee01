"""``dockvm release``: start a rolling release of a Maven artifact and follow it."""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

import typer
from rich.table import Table

from .client import Transport
from .main import JsonOpt, _call, _print_json, _run, err, out

__all__ = ["release_app"]

release_app = typer.Typer(help="Rolling releases of a Maven artifact.", no_args_is_help=True)


def _check(spec: str, timeout_s: float, fail_after: int | None) -> dict[str, Any]:
    """``http:8000/health`` or ``tcp:22`` → a health_check body (a command check must be
    declared for the app: ``dockvm app check set``, then ``--check-name``)."""
    kind, sep, target = spec.partition(":")
    if not sep or kind not in ("http", "tcp") or not target:
        raise typer.BadParameter(
            "give TYPE:TARGET with TYPE http or tcp; a cmd check is declared for the app "
            "(dockvm app check set) and named with --check-name",
            param_hint="--check",
        )
    return {"type": kind, "target": target, "timeout_s": timeout_s, "fail_after": fail_after}


def _table(doc: dict[str, Any]) -> Table:
    table = Table(title=f"{doc['id']}  {doc['app']} {doc['version']}  {doc['status']}")
    table.add_column("MACHINE", no_wrap=True)
    for name in ("BATCH", "HOST", "IP", "STATUS", "VERSION", "REASON"):
        table.add_column(name)
    for i, batch in enumerate(doc["batches"]):
        for mid in batch:
            m = doc["machines"][mid]
            reason = m.get("reason") or ""
            if m.get("rolled_back"):
                reason += " (rolled back)"
            table.add_row(mid, str(i + 1), m.get("host") or "-", m.get("ip") or "-",
                          m["status"], m.get("version") or "-", reason)
    return table


async def _follow(t: Transport, rid: str, timeout: float) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        doc = await _call(t, "GET", f"/v1/releases/{rid}")
        if doc["status"] != "running" or loop.time() >= deadline:
            return doc
        await asyncio.sleep(1)


@release_app.command("create")
def release_create(
    ctx: typer.Context,
    app_name: Annotated[str, typer.Argument(metavar="APP")],
    group: Annotated[str, typer.Option(help="Maven groupId")],
    artifact: Annotated[str, typer.Option(help="Maven artifactId")],
    version: Annotated[str, typer.Option(help="version (a -SNAPSHOT resolves to its latest)")],
    check: Annotated[
        str | None, typer.Option(help="inline health check TYPE:TARGET, e.g. http:8000/health")
    ] = None,
    check_name: Annotated[
        str | None, typer.Option(help="or the name of a check declared for the app")
    ] = None,
    packaging: Annotated[str, typer.Option(help="tar.gz, jar or war")] = "tar.gz",
    classifier: Annotated[str | None, typer.Option()] = None,
    batch_size: Annotated[int | None, typer.Option(help="machines per batch")] = None,
    batch_percent: Annotated[int | None, typer.Option(help="or a share of them, in %")] = None,
    max_failures: Annotated[int, typer.Option(help="failures tolerated in all")] = 0,
    check_timeout: Annotated[float, typer.Option(help="health check timeout (s)")] = 30,
    check_fail_after: Annotated[
        int | None, typer.Option(help="give up after N unhealthy answers in a row (e.g. HTTP 404)")
    ] = None,
    activate: Annotated[
        str, typer.Option(help="restart, or reload (a war: Tomcat redeploys it, JVM kept)")
    ] = "restart",
    release_id: Annotated[str | None, typer.Option(help="idempotency: the same id starts once")]
    = None,
    wait: Annotated[bool, typer.Option(help="follow the release until it ends")] = True,
    timeout: Annotated[float, typer.Option(help="how long to follow it (s)")] = 1800,
    json: JsonOpt = False,
) -> None:
    """Start a rolling release on the app's running machines; exit 1 if it fails."""
    if (check is None) == (check_name is None):
        raise typer.BadParameter("give exactly one of --check and --check-name")
    if batch_size is None and batch_percent is None:
        batch_size = 1
    body: dict[str, Any] = {
        "app": app_name, "group_id": group, "artifact_id": artifact, "version": version,
        "packaging": packaging, "classifier": classifier, "batch_size": batch_size,
        "batch_percent": batch_percent, "max_failures": max_failures,
        "health_check": _check(check, check_timeout, check_fail_after) if check else None,
        "check": check_name,
        "activate": activate,
        "release_id": release_id,
    }
    body = {k: v for k, v in body.items() if v is not None}

    async def go(t: Transport) -> dict[str, Any]:
        doc = await _call(t, "POST", "/v1/releases", json=body)
        return await _follow(t, doc["id"], timeout) if wait else doc

    doc = _run(ctx, go)
    if json:
        _print_json(doc)
    else:
        out.print(_table(doc))
        if doc.get("reason"):
            out.print(doc["reason"])
    if doc["status"] == "failed":
        raise typer.Exit(1)
    if wait and doc["status"] == "running":
        err.print(f"{doc['id']} still running after {timeout:g} s")
        raise typer.Exit(1)


@release_app.command("list")
def release_list(
    ctx: typer.Context, app_name: Annotated[str | None, typer.Option("--app")] = None,
    json: JsonOpt = False,
) -> None:
    """Newest releases first."""
    res = _run(ctx, lambda t: _call(t, "GET", "/v1/releases", params={"app": app_name}))
    if json:
        _print_json(res["items"])
        return
    table = Table()
    table.add_column("ID", no_wrap=True)
    for name in ("APP", "VERSION", "STATUS", "BATCH", "MACHINES", "BY", "CREATED"):
        table.add_column(name)
    for r in res["items"]:
        done = sum(m["status"] in ("succeeded", "failed") for m in r["machines"].values())
        table.add_row(r["id"], r["app"], r["version"], r["status"],
                      f"{r['current_batch'] + 1}/{len(r['batches'])}",
                      f"{done}/{len(r['machines'])}", r["requested_by"], str(r["created_at"]))
    out.print(table)


@release_app.command("show")
def release_show(ctx: typer.Context, release_id: str, json: JsonOpt = False) -> None:
    """One release, machine by machine."""
    doc = _run(ctx, lambda t: _call(t, "GET", f"/v1/releases/{release_id}"))
    if json:
        _print_json(doc)
    else:
        out.print(_table(doc))
