"""``dockvm``: the ops CLI of the gateway, plus ``up|down|status`` for the local stack.

Tables by default, ``--json`` for scripts. The gateway URL and token come from options, the
environment, ``~/.config/dockvm/config.toml`` or the local defaults (see :mod:`cli.config`).
"""

from __future__ import annotations

import asyncio
import json as jsonlib
import os
import subprocess
import sys
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from .client import ApiError, GatewayClient, Transport
from .config import CliConfig, ConfigError, resolve

__all__ = ["app", "make_transport"]

REPO = Path(__file__).resolve().parents[1]
TERMINAL = {"running", "stopped", "failed", "destroyed"}

app = typer.Typer(help="dockvm: Docker containers with the contract of KVM machines.",
                  no_args_is_help=True, pretty_exceptions_enable=False)
machine_app = typer.Typer(help="Create, inspect, resize and remove machines.", no_args_is_help=True)
app_app = typer.Typer(help="Apps: groups of identical machines.", no_args_is_help=True)
pool_app = typer.Typer(help="Address pools (through ipam).", no_args_is_help=True)
host_app = typer.Typer(help="Docker hosts, from their heartbeats.", no_args_is_help=True)
token_app = typer.Typer(help="API tokens (admin only).", no_args_is_help=True)
app.add_typer(machine_app, name="machine")
app.add_typer(app_app, name="app")
app.add_typer(pool_app, name="pool")
app.add_typer(host_app, name="host")
app.add_typer(token_app, name="token")

out = Console()
err = Console(stderr=True)

JsonOpt = Annotated[bool, typer.Option("--json", help="print JSON instead of a table")]


def make_transport(config: CliConfig) -> AbstractAsyncContextManager[Transport]:
    """The transport the commands use (tests replace this)."""
    return GatewayClient(config.url, config.token)


@app.callback()
def _main(
    ctx: typer.Context,
    url: Annotated[str | None, typer.Option(help="gateway URL (env DOCKVM_URL)")] = None,
    token: Annotated[str | None, typer.Option(help="bearer token (env DOCKVM_TOKEN)")] = None,
) -> None:
    """Global options."""
    ctx.obj = {"url": url, "token": token}


def _config(ctx: typer.Context) -> CliConfig:
    obj = ctx.obj or {}
    try:
        return resolve(os.environ, Path.home(), obj.get("url"), obj.get("token"))
    except ConfigError as e:
        err.print(f"[red]error:[/] {e}")
        raise typer.Exit(2) from e


def _run(ctx: typer.Context, fn: Callable[[Transport], Awaitable[Any]]) -> Any:
    config = _config(ctx)

    async def go() -> Any:
        async with make_transport(config) as t:
            return await fn(t)

    try:
        return asyncio.run(go())
    except ApiError as e:
        err.print(f"[red]error:[/] {e}")
        if e.status == 401 and not config.token:
            err.print(f"no token found (looked at {config.token_source}); set DOCKVM_TOKEN")
        raise typer.Exit(1) from e


async def _call(t: Transport, method: str, path: str, ok: tuple[int, ...] = (200, 201, 202, 204),
                **kw: Any) -> Any:
    status, body = await t.request(method, path, **kw)
    if status not in ok:
        raise ApiError(status, body)
    return body


def _print_json(data: Any) -> None:
    out.print_json(jsonlib.dumps(data, default=str))


def _size(n: int | float | None) -> str:
    if n is None:
        return "-"
    for unit, size in (("t", 1 << 40), ("g", 1 << 30), ("m", 1 << 20), ("k", 1 << 10)):
        if n >= size:
            return f"{n / size:g}{unit}"
    return str(n)


def _machines_table(items: list[dict[str, Any]]) -> Table:
    table = Table("ID", "APP", "STATE", "IP", "HOST", "CPUS", "MEMORY", "DISK", "HOSTNAME")
    for m in items:
        state = m["state"] + (f" ({m['pending']})" if m.get("pending") else "")
        if m["state"] == "failed" and m.get("reason"):
            state += f": {m['reason']}"
        table.add_row(m["id"], m["app"], state, m.get("ip") or "-", m.get("host") or "-",
                      f"{m['cpus']:g}", _size(m["memory"]), _size(m["disk"]), m["hostname"])
    return table


# --- local stack -----------------------------------------------------------------------------


def _script(*args: str) -> int:
    return subprocess.call([str(REPO / "scripts" / args[0]), *args[1:]])


@app.command()
def up() -> None:
    """Start the local stack and the five services (scripts/stack.sh, scripts/services.sh)."""
    code = _script("stack.sh", "up") or _script("services.sh", "start")
    raise typer.Exit(code)


@app.command()
def down() -> None:
    """Stop the services, then the local stack."""
    code = _script("services.sh", "stop")
    raise typer.Exit(code or _script("stack.sh", "down"))


@app.command()
def status() -> None:
    """Show the local stack and the services."""
    a = _script("stack.sh", "status")
    b = _script("services.sh", "status")
    raise typer.Exit(a or b)


# --- machines --------------------------------------------------------------------------------


@machine_app.command("create")
def machine_create(
    ctx: typer.Context,
    app_name: Annotated[str, typer.Option("--app", help="app name")],
    image: Annotated[str, typer.Option(help="image reference")],
    cpus: Annotated[float, typer.Option(help="CPUs, e.g. 0.5")],
    memory: Annotated[str, typer.Option(help="memory, e.g. 512m")],
    disk: Annotated[str, typer.Option(help="data disk, e.g. 10g")],
    dc: Annotated[str, typer.Option(help="datacenter")],
    vlan: Annotated[int, typer.Option("--vlan", help="VLAN id")],
    count: Annotated[int, typer.Option(help="how many machines")] = 1,
    type_: Annotated[str, typer.Option("--type", help="docker or kvm")] = "docker",
    hostname_prefix: Annotated[str | None, typer.Option(help="hostname prefix")] = None,
    ssh_key: Annotated[list[str] | None, typer.Option(help="public key (repeatable)")] = None,
    ssh_key_file: Annotated[list[Path] | None, typer.Option(help="public key file")] = None,
    direct_ssh: Annotated[bool, typer.Option(
        help="break-glass: root gets the --ssh-key keys, SSH bypasses the bastion")] = False,
    idempotency_key: Annotated[str | None, typer.Option(help="retry-safe request key")] = None,
    wait: Annotated[bool, typer.Option(help="wait with a progress bar")] = True,
    timeout: Annotated[float, typer.Option(help="how long to wait (s)")] = 900,
    json: JsonOpt = False,
) -> None:
    """Create machines and wait until each runs or fails."""
    keys = list(ssh_key or []) + [p.read_text().strip() for p in ssh_key_file or []]
    body: dict[str, Any] = {"type": type_, "app": app_name, "image": image, "cpus": cpus,
                            "memory": memory, "disk": disk, "dc": dc, "vlan_id": vlan,
                            "count": count, "ssh_keys": keys}
    if hostname_prefix:
        body["hostname_prefix"] = hostname_prefix
    if direct_ssh:
        body["direct_ssh"] = True
    headers = {"Idempotency-Key": idempotency_key} if idempotency_key else None

    async def go(t: Transport) -> list[dict[str, Any]]:
        accepted = await _call(t, "POST", "/v1/machines", json=body, headers=headers)
        ids = [m["id"] for m in accepted["machines"]]
        if not wait:
            return accepted["machines"]
        return await _wait_machines(t, ids, timeout, quiet=json)

    machines = _run(ctx, go)
    if json:
        _print_json(machines)
        return
    out.print(_machines_table(machines) if wait else "\n".join(m["id"] for m in machines))
    if any(m["state"] == "failed" for m in machines):
        raise typer.Exit(1)


async def _wait_machines(
    t: Transport, ids: list[str], timeout: float, quiet: bool
) -> list[dict[str, Any]]:
    """Poll until every machine is terminal, with a progress bar."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TimeElapsedColumn(), console=err, disable=quiet)
    with progress:
        task = progress.add_task("creating", total=len(ids))
        while True:
            page = await _call(t, "GET", "/v1/machines",
                               params={"ids": ",".join(ids), "limit": len(ids)})
            items = page["items"]
            done = [m for m in items if m["state"] in TERMINAL and not m.get("pending")]
            progress.update(task, completed=len(done))
            if len(done) == len(ids) or loop.time() > deadline:
                return items
            await asyncio.sleep(0.5)


@machine_app.command("list")
def machine_list(
    ctx: typer.Context,
    app_name: Annotated[str | None, typer.Option("--app")] = None,
    state: Annotated[str | None, typer.Option()] = None,
    host: Annotated[str | None, typer.Option()] = None,
    ip: Annotated[str | None, typer.Option()] = None,
    limit: Annotated[int, typer.Option(help="page size")] = 100,
    all_pages: Annotated[bool, typer.Option("--all", help="follow every page")] = False,
    json: JsonOpt = False,
) -> None:
    """List machines, filtered."""

    async def go(t: Transport) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = []
        after = None
        while True:
            page = await _call(t, "GET", "/v1/machines", params={
                "app": app_name, "state": state, "host": host, "ip": ip, "limit": limit,
                "after": after})
            items += page["items"]
            after = page.get("next")
            if not all_pages or not after:
                return items

    items = _run(ctx, go)
    if json:
        _print_json(items)
    else:
        out.print(_machines_table(items))


@machine_app.command("show")
def machine_show(ctx: typer.Context, machine_id: str, json: JsonOpt = False) -> None:
    """Show a machine and every state transition."""
    m = _run(ctx, lambda t: _call(t, "GET", f"/v1/machines/{machine_id}"))
    if json:
        _print_json(m)
        return
    out.print(_machines_table([m]))
    table = Table("AT", "STATE", "REASON", title="transitions")
    for tr in m["transitions"]:
        table.add_row(str(tr["at"]), tr["state"], tr.get("reason") or "")
    out.print(table)


@machine_app.command("resize")
def machine_resize(
    ctx: typer.Context,
    machine_id: str,
    cpus: Annotated[float | None, typer.Option()] = None,
    memory: Annotated[str | None, typer.Option()] = None,
    disk: Annotated[str | None, typer.Option()] = None,
    force: Annotated[bool, typer.Option(help="override the scale-down guard")] = False,
    json: JsonOpt = False,
) -> None:
    """Resize a machine live."""
    body = {k: v for k, v in {"cpus": cpus, "memory": memory, "disk": disk}.items()
            if v is not None}
    if force:
        body["force"] = True
    m = _run(ctx, lambda t: _call(t, "PATCH", f"/v1/machines/{machine_id}", json=body))
    if json:
        _print_json(m)
    else:
        out.print(_machines_table([m]))


def _action(action: str) -> None:
    def command(
        ctx: typer.Context,
        machine_id: str,
        wait: Annotated[float, typer.Option(help="seconds to wait for the result")] = 60,
        json: JsonOpt = False,
    ) -> None:
        path = f"/v1/machines/{machine_id}" + ("" if action == "delete" else f"/{action}")
        method = "DELETE" if action == "delete" else "POST"
        res = _run(ctx, lambda t: _call(t, method, path, params={"wait": wait}))
        if json:
            _print_json(res)
        else:
            out.print(f"{res['id']}: {res['state']}")

    command.__doc__ = f"{action.capitalize()} a machine."
    machine_app.command(action)(command)


for _a in ("start", "stop", "restart", "delete"):
    _action(_a)


# --- apps, pools, hosts, tokens -----------------------------------------------------------


@app_app.command("scale")
def app_scale(
    ctx: typer.Context,
    name: str,
    count: int,
    ids: Annotated[list[str] | None, typer.Option("--id", help="machine to remove first")] = None,
    json: JsonOpt = False,
) -> None:
    """Scale an app to COUNT machines (out: the last spec; in: the newest go)."""
    body: dict[str, Any] = {"count": count}
    if ids:
        body["ids"] = ids
    res = _run(ctx, lambda t: _call(t, "POST", f"/v1/apps/{name}/scale", json=body))
    if json:
        _print_json(res)
        return
    out.print(f"{name}: {count} machines; created {len(res['created'])}, "
              f"destroying {len(res['destroying'])}")
    failed = res.get("failed") or []
    for f in failed:
        out.print(f"[red]not scaled in[/red] {f['id']}: {f['reason']}"
                  + (f" ({f['detail']})" if f.get("detail") else ""))
    if failed:
        raise typer.Exit(1)


@pool_app.command("create")
def pool_create(
    ctx: typer.Context,
    name: str,
    dc: Annotated[str, typer.Option()],
    vlan: Annotated[int, typer.Option("--vlan")],
    cidr: Annotated[str, typer.Option()],
    gateway: Annotated[str, typer.Option()],
    reserved: Annotated[list[str] | None, typer.Option(help="reserved IP or range")] = None,
    cooldown: Annotated[int | None, typer.Option(help="cool-down seconds")] = None,
    json: JsonOpt = False,
) -> None:
    """Create an address pool."""
    body: dict[str, Any] = {"name": name, "dc": dc, "vlan_id": vlan, "cidr": cidr,
                            "gateway": gateway, "reserved": reserved or []}
    if cooldown is not None:
        body["cooldown_s"] = cooldown
    res = _run(ctx, lambda t: _call(t, "POST", "/v1/pools", json=body))
    if json:
        _print_json(res)
    else:
        out.print(f"pool {name} created")


@pool_app.command("update")
def pool_update(
    ctx: typer.Context,
    name: str,
    reserved: Annotated[
        list[str] | None, typer.Option(help="reserved IP or range (replaces the list)")
    ] = None,
    cooldown: Annotated[int | None, typer.Option(help="cool-down seconds")] = None,
    json: JsonOpt = False,
) -> None:
    """Change a pool's reserved addresses and/or cool-down."""
    body: dict[str, Any] = {}
    if reserved is not None:
        body["reserved"] = reserved
    if cooldown is not None:
        body["cooldown_s"] = cooldown
    res = _run(ctx, lambda t: _call(t, "PATCH", f"/v1/pools/{name}", json=body))
    if json:
        _print_json(res)
    else:
        out.print(f"pool {name} updated")


@pool_app.command("delete")
def pool_delete(ctx: typer.Context, name: str, json: JsonOpt = False) -> None:
    """Delete a pool that has no leases."""
    res = _run(ctx, lambda t: _call(t, "DELETE", f"/v1/pools/{name}"))
    if json:
        _print_json(res)
    else:
        out.print(f"pool {name} deleted")


@pool_app.command("list")
def pool_list(
    ctx: typer.Context, dc: Annotated[str | None, typer.Option()] = None, json: JsonOpt = False
) -> None:
    """List pools with their usage."""
    res = _run(ctx, lambda t: _call(t, "GET", "/v1/pools", params={"dc": dc}))
    if json:
        _print_json(res["pools"])
        return
    table = Table("NAME", "DC", "VLAN", "CIDR", "GATEWAY", "ALLOCATED", "COOLING", "FREE")
    for p in res["pools"]:
        u = p["usage"]
        table.add_row(p["name"], p["dc"], str(p["vlan_id"]), p["cidr"], p["gateway"],
                      str(u["allocated"]), str(u["cooling"]), str(u["free"]))
    out.print(table)


@host_app.command("list")
def host_list(ctx: typer.Context, json: JsonOpt = False) -> None:
    """List hosts with status, capacity and allocation."""
    res = _run(ctx, lambda t: _call(t, "GET", "/v1/hosts"))
    if json:
        _print_json(res["items"])
        return
    table = Table("ID", "DC", "STATUS", "MACHINES", "CPUS", "MEMORY", "DISK", "IMAGES",
                  "LAST SEEN")
    for h in res["items"]:
        c, a = h["capacity"], h["allocated"]
        table.add_row(h["id"], h["dc"], h["status"], str(h["machines"]),
                      f"{a['cpus']:g}/{c['cpus']:g}",
                      f"{_size(a['memory'])}/{_size(c['memory'])}",
                      f"{_size(a['disk'])}/{_size(c['disk'])}", str(len(h.get("images", []))),
                      str(h["last_seen"]))
    out.print(table)


def _drain(ctx: typer.Context, host_id: str, action: str, json: bool) -> None:
    res = _run(ctx, lambda t: _call(t, "POST", f"/v1/hosts/{host_id}/{action}"))
    if json:
        _print_json(res)
    else:
        out.print(f"{host_id} {action}ed" + ("" if res["changed"] else " (already)"))


@host_app.command("drain")
def host_drain(ctx: typer.Context, host_id: str, json: JsonOpt = False) -> None:
    """Place no new machine on the host (those it holds stay)."""
    _drain(ctx, host_id, "drain", json)


@host_app.command("undrain")
def host_undrain(ctx: typer.Context, host_id: str, json: JsonOpt = False) -> None:
    """Place machines on the host again."""
    _drain(ctx, host_id, "undrain", json)


@host_app.command("show")
def host_show(ctx: typer.Context, host_id: str, json: JsonOpt = False) -> None:
    """Show a host, the machines it quarantined (orphans) and its alerts."""
    h = _run(ctx, lambda t: _call(t, "GET", f"/v1/hosts/{host_id}"))
    if json:
        _print_json(h)
        return
    c, a = h["capacity"], h["allocated"]
    out.print(f"{h['id']} ({h['dc']}): {h['status']}, {h['machines']} machines, "
              f"cpus {a['cpus']:g}/{c['cpus']:g}, last seen {h['last_seen']}")
    table = Table("MACHINE", "WAS RUNNING", "QUARANTINED", "DELETED AFTER", title="quarantined")
    for q in h.get("quarantined", []):
        table.add_row(q["machine_id"], "yes" if q["was_running"] else "no",
                      str(q["quarantined_at"]), str(q["purge_after"]))
    out.print(table)
    for alert in h.get("alerts", []):
        out.print(f"alert {alert['reason']} ({alert['at']}): {alert['detail']}")


@host_app.command("purge")
def host_purge(ctx: typer.Context, host_id: str, machine_id: str, json: JsonOpt = False) -> None:
    """Delete a machine the host quarantined: its container and its disk."""
    res = _run(ctx, lambda t: _call(t, "POST", f"/v1/hosts/{host_id}/orphans/{machine_id}/purge"))
    if json:
        _print_json(res)
    else:
        out.print(f"{machine_id} purged from {host_id}")


@token_app.command("create")
def token_create(
    ctx: typer.Context,
    name: str,
    role: Annotated[str, typer.Option(help="admin, ops, release or viewer")],
    apps: Annotated[
        list[str] | None, typer.Option("--app", help="scope it to this app (repeatable)")
    ] = None,
    json: JsonOpt = False,
) -> None:
    """Create a token, optionally scoped to some apps; its secret is shown once."""
    body: dict[str, Any] = {"name": name, "role": role}
    if apps:
        body["apps"] = apps
    res = _run(ctx, lambda t: _call(t, "POST", "/v1/tokens", json=body))
    if json:
        _print_json(res)
    else:
        out.print(f"token {res['id']} ({res['role']}) for {res['name']}:")
        print(res["token"], file=sys.stdout)


@token_app.command("list")
def token_list(ctx: typer.Context, json: JsonOpt = False) -> None:
    """List tokens (never their secrets)."""
    res = _run(ctx, lambda t: _call(t, "GET", "/v1/tokens"))
    if json:
        _print_json(res["items"])
        return
    table = Table("ID", "NAME", "ROLE", "APPS", "CREATED", "REVOKED")
    for tk in res["items"]:
        table.add_row(tk["id"], tk["name"], tk["role"], ",".join(tk.get("apps") or []) or "all",
                      str(tk["created_at"]), "yes" if tk["revoked"] else "")
    out.print(table)


@token_app.command("revoke")
def token_revoke(ctx: typer.Context, token_id: str) -> None:
    """Revoke a token."""
    _run(ctx, lambda t: _call(t, "DELETE", f"/v1/tokens/{token_id}"))
    out.print(f"token {token_id} revoked")


# Registered last: cli.releases builds on the helpers above.
from .releases import release_app  # noqa: E402

app.add_typer(release_app, name="release")

from .checks import check_app  # noqa: E402

app_app.add_typer(check_app, name="check")

from .bastion import grant_app, rule_app, session_app, user_app  # noqa: E402

app.add_typer(user_app, name="user")
app.add_typer(grant_app, name="grant")
app.add_typer(session_app, name="session")
app.add_typer(rule_app, name="rule")

from .images import image_app  # noqa: E402

app.add_typer(image_app, name="image")

from .alerts import alert_app  # noqa: E402

app.add_typer(alert_app, name="alert")

from . import migrate  # noqa: E402, F401  (registers machine migrate and host evacuate)
