"""The configuration reference: every ``DOCKVM_`` setting of every service, made from the settings
classes themselves, so the document cannot say what the code does not.

    .venv/bin/python -m libs.common.settings_doc > docs/configuration.md

``tests/unit/test_settings_doc.py`` fails when ``docs/configuration.md`` differs from what this
prints. A setting's description is its ``Field(description=...)``, else the comment lines just
above its declaration in the class.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import textwrap
from typing import Any

from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from .settings import CommonSettings, HostAgentSettings, _env_name

__all__ = ["SERVICES", "render"]

# Each service's settings class, in the README's order of services.
SERVICES: tuple[tuple[str, str], ...] = (
    ("gateway", "services.gateway.settings:GatewaySettings"),
    ("ipam", "services.ipam.settings:IpamSettings"),
    ("provisioner", "services.provisioner.settings:ProvisionerSettings"),
    ("monitor", "services.monitor.settings:MonitorSettings"),
    ("imagesync", "services.imagesync.settings:ImagesyncSettings"),
    ("bastion", "services.bastion.settings:BastionSettings"),
    ("builder", "services.builder.settings:BuilderSettings"),
)

_HEADER = """# Configuration reference

Generated from the settings classes by `python -m libs.common.settings_doc > docs/configuration.md`
(a unit test fails when this file is out of date). Every service reads its settings once, from the
environment, at start; an invalid value stops it with one line naming the variable.

"""


def _load(path: str) -> type[CommonSettings]:
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


def _comments(cls: type) -> dict[str, str]:
    """The comment lines just above each field declared in ``cls``'s own body."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    lines = source.splitlines()
    out: dict[str, str] = {}
    for node in ast.parse(source).body[0].body:  # type: ignore[attr-defined]
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            above: list[str] = []
            i = node.lineno - 2
            while i >= 0 and lines[i].strip().startswith("#"):
                above.insert(0, lines[i].strip().lstrip("#").strip())
                i -= 1
            if above:
                out[node.target.id] = " ".join(above)
    return out


def _descriptions(cls: type[CommonSettings]) -> dict[str, str]:
    """Comments of the class and its bases, the nearest declaration winning."""
    out: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if isinstance(klass, type) and issubclass(klass, CommonSettings):
            out.update(_comments(klass))
    return out


def _default(info: FieldInfo) -> str:
    if info.default_factory is not None:
        return "(computed)"
    if info.default is PydanticUndefined:
        return "(required)"
    if info.default is None:
        return "(unset)"
    return f"`{info.default}`"


def _type(info: FieldInfo) -> str:
    ann: Any = info.annotation
    text = getattr(ann, "__name__", None) if isinstance(ann, type) else None
    text = text or str(ann)
    for noise in ("typing.", "pathlib.", "pydantic.types."):
        text = text.replace(noise, "")
    bounds = [
        f"{k} {getattr(m, k)}"
        for m in info.metadata
        for k in ("ge", "gt", "le", "lt", "pattern")
        if getattr(m, k, None) is not None
    ]
    return text + (f" ({', '.join(bounds)})" if bounds else "")


def _table(cls: type[CommonSettings], skip: set[str]) -> list[str]:
    notes = _descriptions(cls)
    rows = ["| variable | type | default | what it is |", "|---|---|---|---|"]
    for name, info in cls.model_fields.items():
        if name in skip:
            continue
        text = (info.description or notes.get(name, "")).replace("|", "\\|")
        cells = [f"`{_env_name(cls, name)}`", _type(info), _default(info)]
        rows.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + f" | {text} |")
    return rows


def render() -> str:
    """The whole reference, as Markdown."""
    common = set(CommonSettings.model_fields) - {"port"}
    agent = set(HostAgentSettings.model_fields) - common - {"port"}
    parts = [_HEADER, "## Every service\n", *_table(CommonSettings, {"port"}), ""]
    parts += ["## Host agents (provisioner, monitor)\n"]
    parts += [*_table(HostAgentSettings, common | {"port"}), ""]
    for service, path in SERVICES:
        cls = _load(path)
        skip = common | (agent if issubclass(cls, HostAgentSettings) else set())
        parts += [f"## {service}\n", *_table(cls, skip), ""]
    return "\n".join(parts)


if __name__ == "__main__":
    print(render(), end="")
