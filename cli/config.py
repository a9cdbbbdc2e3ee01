"""Where the CLI finds the gateway and its token.

Order: ``--url``/``--token`` options, then ``DOCKVM_URL``/``DOCKVM_TOKEN``, then
``~/.config/dockvm/config.toml`` (``url = ...``, ``token = ...`` or ``token_file = ...``),
then the local defaults: ``http://127.0.0.1:8080`` and ``$DOCKVM_STATE_DIR/admin.token``
(``/var/lib/dockvm/admin.token``), as k3s does with its kubeconfig.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

__all__ = ["DEFAULT_URL", "CliConfig", "ConfigError", "resolve"]

DEFAULT_URL = "http://127.0.0.1:8080"


class ConfigError(Exception):
    """The configuration cannot be used; the message says what to fix."""


@dataclass(frozen=True)
class CliConfig:
    """The gateway URL and bearer token to use."""

    url: str
    token: str | None
    token_source: str


def _read_file(path: Path) -> dict:
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        return {}
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: {err}") from err


def _read_token(path: Path) -> str | None:
    try:
        return path.read_text().strip() or None
    except FileNotFoundError:
        return None
    except PermissionError as err:
        raise ConfigError(f"cannot read the token file {path}: {err}") from err


def resolve(
    env: Mapping[str, str],
    home: Path,
    url: str | None = None,
    token: str | None = None,
) -> CliConfig:
    """Resolve the URL and token from options, environment, config file and defaults."""
    file = _read_file(home / ".config" / "dockvm" / "config.toml")
    final_url = url or env.get("DOCKVM_URL") or file.get("url") or DEFAULT_URL
    if token:
        return CliConfig(final_url.rstrip("/"), token, "--token")
    if env.get("DOCKVM_TOKEN"):
        return CliConfig(final_url.rstrip("/"), env["DOCKVM_TOKEN"], "DOCKVM_TOKEN")
    if file.get("token"):
        return CliConfig(final_url.rstrip("/"), str(file["token"]), "config.toml")
    if file.get("token_file"):
        path = Path(str(file["token_file"])).expanduser()
        return CliConfig(final_url.rstrip("/"), _read_token(path), str(path))
    state = Path(env.get("DOCKVM_STATE_DIR", "/var/lib/dockvm"))
    path = state / "admin.token"
    return CliConfig(final_url.rstrip("/"), _read_token(path), str(path))
