"""``dockvm image build|list|builds|registries|policy``: images made by the platform, under its
policy, and what each dc's registry holds.

``image build -f spec.yaml`` submits the spec (YAML or JSON), then follows the build's log as
the gateway streams it, with a bar of its steps; it exits 1 when the build fails (or the policy
refuses the spec: the 422 names every item).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
import yaml
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from .client import Transport
from .main import JsonOpt, _call, _print_json, _run, _size, err, out

__all__ = ["image_app", "load_spec"]

image_app = typer.Typer(help="Images built by the platform, under its policy.",
                        no_args_is_help=True)  # fmt: skip
STEPS = ("render", "base", "build", "verify", "push", "done")


def load_spec(path: Path) -> dict[str, Any]:
    """The spec in ``path`` (YAML, or JSON, which is YAML too)."""
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise typer.BadParameter(f"cannot read {path}: {e}", param_hint="-f") from e
    if not isinstance(data, dict):
        raise typer.BadParameter(f"{path} must hold a mapping (name, tag, base, ...)",
                                 param_hint="-f")  # fmt: skip
    return data


async def _follow(t: Transport, build_id: str, quiet: bool) -> dict[str, Any]:
    """Print the log as it comes, advance the step bar; the build at its end (a transport
    that cannot stream, as tests' fakes, shows no log)."""
    stream = getattr(t, "stream", None)
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[step]}"),
                  TimeElapsedColumn(), console=err, transient=True) as bar:  # fmt: skip
        task = bar.add_task(build_id, total=len(STEPS), step="queued")
        if stream is not None:
            async for line in stream(f"/v1/images/builds/{build_id}/log"):
                if line.startswith("==> ") and line[4:].strip() in STEPS:
                    step = line[4:].strip()
                    bar.update(task, completed=STEPS.index(step) + 1, step=step)
                if not quiet:
                    bar.console.print(line.rstrip("\n"), markup=False, highlight=False)
    return await _call(t, "GET", f"/v1/images/builds/{build_id}")


@image_app.command("build")
def image_build(
    ctx: typer.Context,
    file: Annotated[Path, typer.Option("-f", "--file", help="the spec (YAML or JSON)")],
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no log, only the result")] = False,
    json: JsonOpt = False,
) -> None:
    """Build an image from a spec and follow it; exit 1 if it fails."""
    spec = load_spec(file)

    async def go(t: Transport) -> dict[str, Any]:
        build = await _call(t, "POST", "/v1/images/builds", json=spec)
        err.print(f"build {build['id']}: {build['name']}:{build['tag']} "
                  f"(policy v{build['policy_version']})")  # fmt: skip
        return await _follow(t, build["id"], quiet or json)

    build = _run(ctx, go)
    if json:
        _print_json(build)
    elif build["state"] == "succeeded":
        out.print(f"[green]pushed[/] {build['image']}@{build['digest']} "
                  f"({build['layers']} layers, {_size(build['size'])})")  # fmt: skip
    else:
        err.print(f"[red]failed[/] ({build.get('reason')}): {build.get('detail') or ''}")
    if build["state"] != "succeeded":
        raise typer.Exit(1)


@image_app.command("list")
def image_list(
    ctx: typer.Context,
    name: Annotated[str | None, typer.Option(help="one repository")] = None,
    json: JsonOpt = False,
) -> None:
    """Tags the platform built, with who built each, from which spec, each dc's digest."""
    items = _run(ctx, lambda t: _call(t, "GET", "/v1/images", params={"name": name}))
    if json:
        _print_json(items)
        return
    dcs = sorted({dc for i in items for dc in i["digests"]})
    table = Table("IMAGE", "BUILD", "BY", "SPEC", "POLICY", *(dc.upper() for dc in dcs))
    for i in items:
        table.add_row(f"{i['name']}:{i['tag']}", i["build_id"] or "-", i["built_by"],
                      (i["spec_digest"] or "-")[:19],
                      "-" if i["policy_version"] is None else f"v{i['policy_version']}",
                      *((i["digests"].get(dc) or "-")[:19] for dc in dcs))  # fmt: skip
    out.print(table)


@image_app.command("builds")
def image_builds(
    ctx: typer.Context,
    state: Annotated[str | None, typer.Option(help="queued, running, succeeded, failed")] = None,
    json: JsonOpt = False,
) -> None:
    """Builds, newest first."""
    items = _run(ctx, lambda t: _call(t, "GET", "/v1/images/builds", params={"state": state}))
    if json:
        _print_json(items)
        return
    table = Table("BUILD", "IMAGE", "STATE", "STEP", "BY", "CREATED", "REASON")
    for b in items:
        table.add_row(b["id"], f"{b['name']}:{b['tag']}", b["state"], b.get("step") or "-",
                      b["requested_by"], str(b["created_at"])[:19],
                      b.get("reason") or "")  # fmt: skip
    out.print(table)


@image_app.command("registries")
def image_registries(
    ctx: typer.Context,
    dc: Annotated[str | None, typer.Option(help="one dc's registry")] = None,
    prefix: Annotated[str | None, typer.Option(help="repositories starting with this")] = None,
    json: JsonOpt = False,
) -> None:
    """What each dc's registry holds now (its catalog): repository, tag, digest."""
    params = {"dc": dc, "prefix": prefix, "limit": 1000}
    body = _run(ctx, lambda t: _call(t, "GET", "/v1/registries", params=params))
    if json:
        _print_json(body)
        return
    table = Table("DC", "REPOSITORY", "TAG", "DIGEST")
    for reg in body["registries"]:
        if not reg["reachable"]:
            err.print(f"{reg['dc']} ({reg['host']}): unreachable: {reg['error']}")
            continue
        for repo in reg["repositories"]:
            for t in repo["tags"]:
                table.add_row(reg["dc"], repo["repo"], t["tag"], t["digest"][:19])
        if reg["truncated"]:
            err.print(f"{reg['dc']}: the first 1000 repositories only; narrow with --prefix")
    out.print(table)


@image_app.command("policy")
def image_policy(
    ctx: typer.Context,
    set_file: Annotated[Path | None, typer.Option("--set", help="replace it (admin)")] = None,
) -> None:
    """Show the image policy in force, or replace it with a YAML/JSON file (``--set``)."""
    if set_file is None:
        _print_json(_run(ctx, lambda t: _call(t, "GET", "/v1/images/policy")))
        return
    policy = load_spec(set_file)
    _print_json(_run(ctx, lambda t: _call(t, "PUT", "/v1/images/policy", json=policy)))
