"""What the bastion changes in asyncssh's SSH transport, on both of its legs, for bulk output.

- **No CBC padding packets.** asyncssh puts an empty ``SSH_MSG_IGNORE`` packet before every
  packet it sends after the key exchange: RFC 4251 9.3.1's countermeasure against the
  chosen-plaintext attack on CBC ciphers. The bastion offers and accepts no CBC cipher (AES-GCM
  to users; GCM, chacha20-poly1305 or CTR to machines), where that attack does not apply, and on
  bulk output the extra packet doubled the packets it encrypts and the writes it makes. So a
  bastion connection drops exactly those empty ignore packets; any other ignore packet is sent.
- **One socket write per turn of the loop.** asyncssh writes each packet to the socket as it is
  made, and an OpenSSH client takes 32 KiB packets: a 256 KiB read from the machine became 8
  ``send`` calls (TCP_NODELAY is on), each paying the kernel's fixed cost. Packets made in one
  turn of the event loop now go out in one write, in order, at the end of that turn; closing
  the connection writes what is waiting first.
- **Received data in packet-sized pieces.** asyncssh appends what the socket gives (up to
  256 KiB) to its input buffer and, for every packet it takes from the front, copies the rest
  of the buffer twice: eight 32 KiB packets in one read cost 2 MiB of copying. Fed in pieces of
  :data:`PIECE`, the buffer holds about one packet, and the copying is about twice the data.
"""

from __future__ import annotations

import asyncio
from typing import Any

from asyncssh.connection import SSHConnection
from asyncssh.constants import MSG_IGNORE
from asyncssh.packet import String

__all__ = ["PIECE", "CoalescedWrites", "in_pieces", "tune", "without_cbc_padding_packets"]

_EMPTY = String(b"")
PIECE = 32 << 10


def without_cbc_padding_packets(conn: SSHConnection) -> None:
    """Make ``conn`` skip the empty ignore packet asyncssh sends before each packet."""
    send = conn.send_packet

    def send_packet(pkttype: int, *args: bytes, handler: Any = None) -> None:
        if pkttype == MSG_IGNORE and args == (_EMPTY,):
            return
        send(pkttype, *args, handler=handler)

    conn.send_packet = send_packet  # type: ignore[method-assign]


def in_pieces(conn: SSHConnection) -> None:
    """Make ``conn`` take what it receives :data:`PIECE` bytes at a time."""
    receive = conn.data_received

    def data_received(data: bytes, datatype: Any = None) -> None:
        if len(data) <= PIECE:
            receive(data)
            return
        view = memoryview(data)
        for start in range(0, len(data), PIECE):
            receive(view[start : start + PIECE])  # type: ignore[arg-type]

    conn.data_received = data_received  # type: ignore[method-assign]


class CoalescedWrites:
    """A transport whose writes wait for the end of the loop's turn and go out as one."""

    def __init__(self, transport: asyncio.Transport) -> None:
        self._transport = transport
        self._pending: list[bytes] = []

    def write(self, data: bytes) -> None:
        """Queue ``data``; the first write of a turn schedules the flush."""
        if not self._pending:
            asyncio.get_running_loop().call_soon(self.flush)
        self._pending.append(data)

    def flush(self) -> None:
        """Write what is queued, in one call."""
        if self._pending:
            data = self._pending[0] if len(self._pending) == 1 else b"".join(self._pending)
            self._pending.clear()
            if not self._transport.is_closing():
                self._transport.write(data)

    def close(self) -> None:
        """Write what is queued, then close."""
        self.flush()
        self._transport.close()

    def abort(self) -> None:
        """Drop what is queued and close now."""
        self._pending.clear()
        self._transport.abort()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


def tune(conn: SSHConnection) -> None:
    """The three changes, on a connection whose transport is set (``connection_made``)."""
    without_cbc_padding_packets(conn)
    in_pieces(conn)
    # asyncssh has no hook for its writes: its transport is replaced by one that gathers them.
    transport = conn._transport
    if isinstance(transport, asyncio.Transport):
        conn._transport = CoalescedWrites(transport)  # type: ignore[assignment]
