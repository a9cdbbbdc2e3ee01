"""``dockvm app check``: the health checks ops declare for an app, which its releases name.

Only a declared check may run a command in the app's machines: a release names one with
``dockvm release create APP --check-name NAME`` (an inline ``--check`` may only be http or tcp).
"""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from .main import JsonOpt, _call, _print_json, _run, out

__all__ = ["check_app"]

check_app = typer.Typer(help="Health checks declared for an app.", no_args_is_help=True)


@check_app.command("set")
def check_set(
    ctx: typer.Context,
    app_name: Annotated[str, typer.Argument(metavar="APP")],
    name: str,
    kind: Annotated[str, typer.Option("--type", help="http, tcp or cmd")],
    target: Annotated[str, typer.Option(help="PORT[/PATH] for http and tcp, a command for cmd")],
    timeout: Annotated[float, typer.Option(help="how long a release waits for it (s)")] = 30,
    fail_after: Annotated[
        int | None, typer.Option(help="give up after N unhealthy answers in a row (e.g. HTTP 404)")
    ] = None,
    json: JsonOpt = False,
) -> None:
    """Declare (or replace) the check NAME of APP (ops)."""
    body = {"type": kind, "target": target, "timeout_s": timeout, "fail_after": fail_after}
    res = _run(ctx, lambda t: _call(t, "PUT", f"/v1/apps/{app_name}/checks/{name}", json=body))
    if json:
        _print_json(res)
    else:
        out.print(f"{app_name}/{name}: {res['type']} {res['target']} ({res['timeout_s']:g} s)")


@check_app.command("list")
def check_list(
    ctx: typer.Context,
    app_name: Annotated[str, typer.Argument(metavar="APP")],
    json: JsonOpt = False,
) -> None:
    """List the checks declared for APP."""
    res = _run(ctx, lambda t: _call(t, "GET", f"/v1/apps/{app_name}/checks"))
    if json:
        _print_json(res["items"])
        return
    table = Table("NAME", "TYPE", "TARGET", "TIMEOUT", "FAIL AFTER", "DECLARED BY", "UPDATED")
    for c in res["items"]:
        fail_after = str(c["fail_after"]) if c.get("fail_after") else "-"
        table.add_row(c["name"], c["type"], c["target"], f"{c['timeout_s']:g}", fail_after,
                      c["declared_by"], str(c["updated_at"]))
    out.print(table)


@check_app.command("rm")
def check_rm(
    ctx: typer.Context,
    app_name: Annotated[str, typer.Argument(metavar="APP")],
    name: str,
) -> None:
    """Withdraw the check NAME of APP (releases already running keep it)."""
    _run(ctx, lambda t: _call(t, "DELETE", f"/v1/apps/{app_name}/checks/{name}"))
    out.print(f"{app_name}/{name} withdrawn")
