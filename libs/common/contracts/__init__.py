"""Versioned bus contracts: the envelope, plus one module per service for its messages."""

from . import bastion, builder, gateway, imagesync, ipam, monitor, provisioner, releases
from .envelope import (
    Command,
    Envelope,
    Event,
    Message,
    RequestRejected,
    UnknownMessageType,
    message_model,
    register,
)

__all__ = [
    "Command",
    "Envelope",
    "Event",
    "Message",
    "RequestRejected",
    "UnknownMessageType",
    "bastion",
    "builder",
    "gateway",
    "imagesync",
    "ipam",
    "message_model",
    "monitor",
    "provisioner",
    "register",
    "releases",
]
