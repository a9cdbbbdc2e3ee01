"""The ``dockvm`` command line (typer + rich): ops on the gateway API, and the local stack."""

__all__: list[str] = []
