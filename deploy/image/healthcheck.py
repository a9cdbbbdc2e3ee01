"""The image's HEALTHCHECK: GET /readyz of whichever dockvm service this container runs.

The service is the process running ``python -m services.<name>`` (found in /proc, so that
the check follows the command, whatever chose it); its port is its ``--port`` argument, else
``DOCKVM_<NAME>_PORT``, else the default of its settings class. Exit 0 when /readyz answers 200.
"""

from __future__ import annotations

import importlib
import os
import sys
import urllib.request
from pathlib import Path


def running_service() -> tuple[str, list[str]] | None:
    """(name, argv) of the ``python -m services.<name>`` process in this container."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        for i, arg in enumerate(argv[:-1]):
            if arg == "-m" and argv[i + 1].startswith("services."):
                return argv[i + 1].split(".", 1)[1], argv[i + 2 :]
    return None


def port_of(name: str, argv: list[str]) -> int:
    """The HTTP port the service listens on."""
    for i, arg in enumerate(argv):
        if arg == "--port" and i + 1 < len(argv):
            return int(argv[i + 1])
        if arg.startswith("--port="):
            return int(arg.split("=", 1)[1])
    env = os.environ.get(f"DOCKVM_{name.upper()}_PORT")
    if env:
        return int(env)
    module = importlib.import_module(f"services.{name}.settings")
    cls = next(
        v
        for k, v in vars(module).items()
        if k.endswith("Settings")
        and "port" in getattr(v, "model_fields", {})
        and v.__module__ == module.__name__
    )
    return int(cls.model_fields["port"].default)


def main() -> int:
    """Probe /readyz; print why when it fails (docker inspect shows the output)."""
    found = running_service()
    if found is None:
        print("no dockvm service process")
        return 1
    name, argv = found
    host = os.environ.get("DOCKVM_BIND_HOST", "127.0.0.1")
    if host in ("", "0.0.0.0", "::"):
        host = "127.0.0.1"
    url = f"http://{host}:{port_of(name, argv)}/readyz"
    try:
        with urllib.request.urlopen(url, timeout=3) as r:
            ok = r.status == 200
    except OSError as e:
        print(f"{name}: {url}: {e}")
        return 1
    print(f"{name}: {url}: {'ready' if ok else 'not ready'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
