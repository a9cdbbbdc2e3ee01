"""``dockvm alert list``: the alerts Prometheus raised, as Alertmanager's default receiver (the
gateway's audit log, ``who: alertmanager``) recorded them, newest first."""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.table import Table

from .client import Transport
from .main import JsonOpt, _call, _print_json, _run, out

__all__ = ["alert_app"]

alert_app = typer.Typer(help="Alerts from Prometheus (through the audit log).",
                        no_args_is_help=True)  # fmt: skip


@alert_app.command("list")
def alert_list(
    ctx: typer.Context,
    limit: Annotated[int, typer.Option(help="at most this many entries")] = 50,
    json: JsonOpt = False,
) -> None:
    """Alerts fired and resolved, newest first."""

    async def go(t: Transport) -> list[dict[str, Any]]:
        page = await _call(t, "GET", "/v1/audit", params={"who": "alertmanager",
                                                          "limit": str(limit)})  # fmt: skip
        return page["items"]

    items = _run(ctx, go)
    if json:
        _print_json(items)
        return
    table = Table("AT", "STATE", "ALERT", "TARGET", "SUMMARY")
    for e in items:
        detail = e.get("detail") or {}
        state = (e.get("event") or "").removeprefix("alert.")
        table.add_row(e["at"], state, detail.get("alert", ""), e.get("target") or "-",
                      detail.get("summary", ""))  # fmt: skip
    out.print(table)
