"""``dockvm user|grant|session|rule``: the bastion's people, their grants, their recorded
sessions (and their replay in the terminal), and the commands it refuses."""

from __future__ import annotations

import re
import sys
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table
from rich.text import Text

from .cast import CastError, parse_cast, play
from .client import ApiError, Transport
from .main import JsonOpt, _call, _print_json, _run, err, out

__all__ = ["grant_app", "parse_ttl", "rule_app", "session_app", "user_app"]

user_app = typer.Typer(help="People who may log in through the bastion.", no_args_is_help=True)
grant_app = typer.Typer(help="Who may log in where, for how long.", no_args_is_help=True)
session_app = typer.Typer(help="Recorded bastion sessions, and their replay.",
                          no_args_is_help=True)  # fmt: skip
rule_app = typer.Typer(help="Commands the bastion refuses.", no_args_is_help=True)

_TTL = re.compile(r"^\s*(\d+)\s*([smhd]?)\s*$")
_UNIT_S = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_ttl(value: str) -> int:
    """``90``, ``90s``, ``30m``, ``8h`` or ``2d`` in seconds."""
    m = _TTL.match(value.lower())
    if not m or int(m.group(1)) == 0:
        raise typer.BadParameter("give a duration such as 90s, 30m, 8h or 2d", param_hint="--ttl")
    return int(m.group(1)) * _UNIT_S[m.group(2)]


def _when(value: Any) -> str:
    return str(value or "-").replace("T", " ")[:19]


# --- users -----------------------------------------------------------------------------------


@user_app.command("add")
def user_add(
    ctx: typer.Context,
    name: str,
    key: Annotated[list[str] | None, typer.Option(help="OpenSSH public key (repeatable)")] = None,
    key_file: Annotated[list[Path] | None, typer.Option(help="public key file (repeatable)")]
    = None,
    json: JsonOpt = False,
) -> None:
    """Register a person with her SSH keys (again: her keys are replaced)."""
    keys = list(key or []) + [p.read_text().strip() for p in key_file or []]
    if not keys:
        raise typer.BadParameter("give at least one --key or --key-file", param_hint="--key")
    res = _run(ctx, lambda t: _call(t, "POST", "/v1/users", json={"name": name, "ssh_keys": keys}))
    if json:
        _print_json(res)
        return
    out.print(f"user {res['name']}: {', '.join(res['fingerprints'])}")


@user_app.command("list")
def user_list(ctx: typer.Context, json: JsonOpt = False) -> None:
    """Registered users and their key fingerprints."""
    res = _run(ctx, lambda t: _call(t, "GET", "/v1/users"))
    if json:
        _print_json(res["items"])
        return
    table = Table("NAME", "KEYS", "UPDATED")
    for u in res["items"]:
        table.add_row(u["name"], "\n".join(u["fingerprints"]), _when(u["updated_at"]))
    out.print(table)


@user_app.command("remove")
def user_remove(ctx: typer.Context, name: str) -> None:
    """Remove a user: her grants go, her live sessions end."""
    res = _run(ctx, lambda t: _call(t, "DELETE", f"/v1/users/{name}"))
    out.print(f"user {name} removed ({res.get('grants_revoked', 0)} grants revoked, "
              f"{res.get('sessions_ended', 0)} sessions ended)")  # fmt: skip


# --- grants ----------------------------------------------------------------------------------


@grant_app.command("add")
def grant_add(
    ctx: typer.Context,
    user: str,
    app_name: Annotated[str | None, typer.Option("--app", help="every machine of this app")]
    = None,
    machine: Annotated[str | None, typer.Option(help="one machine id")] = None,
    login: Annotated[str, typer.Option(help="the login on the machine")] = "root",
    ttl: Annotated[str, typer.Option(help="how long: 90s, 30m, 8h, 2d")] = "1h",
    record_input: Annotated[bool, typer.Option(help="record her keystrokes too")] = False,
    grant_id: Annotated[str | None, typer.Option("--id", help="idempotency: the same id once")]
    = None,
    json: JsonOpt = False,
) -> None:
    """Let USER log in as --login on one machine or on every machine of an app."""
    if (app_name is None) == (machine is None):
        raise typer.BadParameter("give exactly one of --app and --machine", param_hint="--app")
    body: dict[str, Any] = {"user": user, "login": login, "ttl_s": parse_ttl(ttl),
                            "record_input": record_input}  # fmt: skip
    body.update({k: v for k, v in (("app", app_name), ("machine_id", machine), ("id", grant_id))
                 if v is not None})  # fmt: skip
    res = _run(ctx, lambda t: _call(t, "POST", "/v1/grants", json=body))
    if json:
        _print_json(res)
        return
    where = f"app {res['app']}" if res.get("app") else f"machine {res['machine_id']}"
    out.print(f"grant {res['id']}: {res['user']} as {res['login']} on {where} "
              f"until {_when(res['expires_at'])}")  # fmt: skip


@grant_app.command("list")
def grant_list(
    ctx: typer.Context,
    user: Annotated[str | None, typer.Option(help="one user's grants")] = None,
    all_: Annotated[bool, typer.Option("--all", help="expired ones too")] = False,
    json: JsonOpt = False,
) -> None:
    """Live grants (all with --all)."""
    params = {"user": user, "include_expired": "true" if all_ else None}
    res = _run(ctx, lambda t: _call(t, "GET", "/v1/grants", params=params))
    if json:
        _print_json(res["items"])
        return
    table = Table("ID", "USER", "LOGIN", "ON", "EXPIRES", "INPUT", "ACTIVE")
    for g in res["items"]:
        on = f"app {g['app']}" if g.get("app") else f"machine {g['machine_id']}"
        table.add_row(g["id"], g["user"], g["login"], on, _when(g["expires_at"]),
                      "recorded" if g.get("record_input") else "", "yes" if g["active"] else "no")
    out.print(table)


@grant_app.command("revoke")
def grant_revoke(ctx: typer.Context, grant_id: str) -> None:
    """Revoke a grant: the sessions it let in end."""
    res = _run(ctx, lambda t: _call(t, "DELETE", f"/v1/grants/{grant_id}"))
    out.print(f"grant {grant_id} revoked ({res.get('sessions_ended', 0)} sessions ended)")


# --- sessions --------------------------------------------------------------------------------


@session_app.command("list")
def session_list(
    ctx: typer.Context,
    user: Annotated[str | None, typer.Option()] = None,
    ip: Annotated[str | None, typer.Option(help="the machine's IP")] = None,
    machine: Annotated[str | None, typer.Option(help="the machine's id")] = None,
    since: Annotated[datetime | None, typer.Option("--from", help="started at or after")] = None,
    until: Annotated[datetime | None, typer.Option("--to", help="started at or before")] = None,
    live: Annotated[bool, typer.Option(help="live sessions only")] = False,
    limit: Annotated[int, typer.Option(min=1, max=1000)] = 100,
    json: JsonOpt = False,
) -> None:
    """Sessions, newest first."""
    params = {"user": user, "ip": ip, "machine_id": machine, "limit": limit,
              "from": since.isoformat() if since else None,
              "to": until.isoformat() if until else None, "live": "true" if live else None}
    res = _run(ctx, lambda t: _call(t, "GET", "/v1/sessions", params=params))
    if json:
        _print_json(res["items"])
        return
    table = Table("ID", "USER", "TARGET", "KIND", "STARTED", "ENDED", "EXIT", "BYTES OUT")
    for s in res["items"]:
        ended = "live" if s["live"] else f"{_when(s['ended_at'])} ({s.get('end_reason')})"
        exit_status = "-" if s.get("exit_status") is None else str(s["exit_status"])
        table.add_row(s["id"], s["user"], f"{s['login']}@{s.get('ip') or s.get('machine_id')}",
                      s["kind"], _when(s["started_at"]), ended, exit_status, str(s["bytes_out"]))
    out.print(table)


@session_app.command("show")
def session_show(ctx: typer.Context, session_id: str) -> None:
    """One session's facts."""
    _print_json(_run(ctx, lambda t: _call(t, "GET", f"/v1/sessions/{session_id}")))


@session_app.command("end")
def session_end(ctx: typer.Context, session_id: str) -> None:
    """End a live session."""
    res = _run(ctx, lambda t: _call(t, "DELETE", f"/v1/sessions/{session_id}"))
    out.print(f"session {session_id} " + ("ended" if res["was_live"] else "was already over"))


async def _recording(t: Transport, session_id: str) -> str:
    status, body = await t.request("GET", f"/v1/sessions/{session_id}/recording")
    if status != 200:
        raise ApiError(status, body)
    if not isinstance(body, str):
        raise ApiError(status, "the gateway did not answer with an asciicast")
    return body


@session_app.command("play")
def session_play(
    ctx: typer.Context,
    session_id: str,
    speed: Annotated[float, typer.Option(min=0.01, max=1000, help="2 plays twice as fast")] = 1.0,
    idle_limit: Annotated[float | None, typer.Option(help="cap every pause at this (s)")] = None,
) -> None:
    """Replay a session's recording in this terminal at its real pace (or --speed times)."""
    try:
        cast = parse_cast(_run(ctx, lambda t: _recording(t, session_id)))
    except CastError as e:
        err.print(f"[red]error:[/] {e}")
        raise typer.Exit(1) from e
    size = f"{cast.header.get('width', '?')}x{cast.header.get('height', '?')}"
    err.print(f"session {session_id}: {size}, {cast.duration:.1f} s at {speed:g}x "
              "(Ctrl-C stops)")  # fmt: skip

    def write(data: str) -> None:
        sys.stdout.write(data)
        sys.stdout.flush()

    try:
        play(cast.frames, write, speed=speed, idle_limit=idle_limit)
    except KeyboardInterrupt:
        raise typer.Exit(130) from None
    if cast.truncated:
        err.print("\n(the recording's last line was cut short, as a crash leaves it)")


# --- command rules ---------------------------------------------------------------------------


@rule_app.command("add")
def rule_add(
    ctx: typer.Context,
    pattern: Annotated[str, typer.Argument(help="a Python regular expression")],
    description: Annotated[str, typer.Option(help="why")] = "",
) -> None:
    """Refuse exec commands and shell lines that match PATTERN."""
    body = {"pattern": pattern, "description": description}
    res = _run(ctx, lambda t: _call(t, "POST", "/v1/command-rules", json=body))
    out.print(f"rule {res['id']}: {res['pattern']}", markup=False, highlight=False)


@rule_app.command("list")
def rule_list(ctx: typer.Context, json: JsonOpt = False) -> None:
    """The command rules."""
    res = _run(ctx, lambda t: _call(t, "GET", "/v1/command-rules"))
    if json:
        _print_json(res["items"])
        return
    table = Table("ID", "PATTERN", "DESCRIPTION")
    for r in res["items"]:
        table.add_row(r["id"], Text(r["pattern"]), Text(r.get("description") or ""))
    out.print(table)


@rule_app.command("remove")
def rule_remove(ctx: typer.Context, rule_id: str) -> None:
    """Remove a command rule."""
    _run(ctx, lambda t: _call(t, "DELETE", f"/v1/command-rules/{rule_id}"))
    out.print(f"rule {rule_id} removed")
