"""``dockvm machine migrate`` and ``dockvm host evacuate``: cold migration, with its progress.

A migration is asked once (``POST /v1/machines/{id}/migrate``) and followed from the machine's
transitions: each step of it (exported, imported, switching back) is one, with its reason.
Evacuating a drained host is a loop over its machines, one migration at a time, each to the
host placement chooses (so each choice sees where the previous machine went).
"""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

import typer
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from .client import ApiError, Transport
from .main import JsonOpt, _call, _print_json, _run, err, host_app, machine_app, out

__all__ = ["host_evacuate", "machine_migrate"]

# Machines in these states can migrate; others stay where they are (evacuate says so).
MOVABLE = {"running", "stopped"}


async def _follow(
    t: Transport, machine_id: str, accepted: dict[str, Any], timeout: float, quiet: bool
) -> dict[str, Any]:
    """Poll the machine until its migration ended, showing each step's reason; the machine."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                        console=err, disable=quiet)  # fmt: skip
    seen = 0
    with progress:
        task = progress.add_task(f"{machine_id}: {accepted['source']} → {accepted['target']}")
        while True:
            m = await _call(t, "GET", f"/v1/machines/{machine_id}")
            steps = [tr for tr in m["transitions"] if tr["state"] == "migrating"]
            for tr in steps[seen:]:
                progress.update(task, description=f"{machine_id}: {tr.get('reason') or ''}")
            seen = max(seen, len(steps))
            if (m["state"] != "migrating" and not m.get("pending")) or loop.time() > deadline:
                return m
            await asyncio.sleep(0.5)


def _moved(m: dict[str, Any], target: str) -> bool:
    return m["host"] == target and m["state"] in MOVABLE


def _say(m: dict[str, Any], accepted: dict[str, Any]) -> str:
    if _moved(m, accepted["target"]):
        return f"{m['id']}: moved {accepted['source']} → {accepted['target']}, {m['state']}"
    if m["state"] == "migrating":
        return f"{m['id']}: still migrating to {accepted['target']} (stopped waiting)"
    return f"{m['id']}: stayed on {m['host']}, {m['state']}: {m.get('reason') or 'no reason'}"


async def migrate_one(
    t: Transport, machine_id: str, to: str | None, timeout: float, quiet: bool
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Migrate one machine and follow it; (the accepted answer, the machine at the end)."""
    body = {"host": to} if to else {}
    accepted = await _call(t, "POST", f"/v1/machines/{machine_id}/migrate", json=body)
    return accepted, await _follow(t, machine_id, accepted, timeout, quiet)


@machine_app.command("migrate")
def machine_migrate(
    ctx: typer.Context,
    machine_id: str,
    to: Annotated[
        str | None, typer.Option("--to", help="target host (default: placement's)")
    ] = None,
    timeout: Annotated[float, typer.Option(help="how long to follow it (s)")] = 900,
    json: JsonOpt = False,
) -> None:
    """Move a machine (stopped, its disk and identity copied) to another host of its dc."""
    accepted, m = _run(ctx, lambda t: migrate_one(t, machine_id, to, timeout, json))
    if json:
        _print_json({"accepted": accepted, "machine": m})
    else:
        out.print(_say(m, accepted))
    if not _moved(m, accepted["target"]):
        raise typer.Exit(1)


async def _evacuate(t: Transport, host_id: str, timeout: float, quiet: bool) -> list[str]:
    host = await _call(t, "GET", f"/v1/hosts/{host_id}")
    if not host.get("drained"):
        raise ApiError(409, {"detail": f"{host_id} is not drained: dockvm host drain {host_id}",
                             "reason": "host_not_drained"})  # fmt: skip
    page = await _call(t, "GET", "/v1/machines", params={"host": host_id, "limit": 1000})
    lines: list[str] = []

    def note(line: str) -> None:
        lines.append(line)
        if not quiet:
            out.print(line)

    for m in page["items"]:
        if m["state"] not in MOVABLE or m.get("pending"):
            note(f"{m['id']}: skipped ({m['state']}{', busy' if m.get('pending') else ''})")
            continue
        try:
            accepted, after = await migrate_one(t, m["id"], None, timeout, quiet)
        except ApiError as e:
            note(f"{m['id']}: not migrated: {e}")
            continue
        note(_say(after, accepted))
    return lines


@host_app.command("evacuate")
def host_evacuate(
    ctx: typer.Context,
    host_id: str,
    timeout: Annotated[float, typer.Option(help="how long to follow each machine (s)")] = 900,
    json: JsonOpt = False,
) -> None:
    """Migrate every machine of a drained host elsewhere, one at a time."""
    lines = _run(ctx, lambda t: _evacuate(t, host_id, timeout, json))
    if json:
        _print_json(lines)
    moved = sum(": moved " in line for line in lines)
    if not json:
        out.print(f"{host_id}: {moved} of {len(lines)} machines moved")
    if moved != len(lines):
        raise typer.Exit(1)
