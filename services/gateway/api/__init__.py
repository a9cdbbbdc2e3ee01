"""The gateway's HTTP API under ``/v1``."""

from .framework import Api, problem_middleware
from .routes import GatewayState, Rpc, build_api, machine_out

__all__ = ["Api", "GatewayState", "Rpc", "build_api", "machine_out", "problem_middleware"]
