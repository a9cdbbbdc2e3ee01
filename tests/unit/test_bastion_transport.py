"""The bastion's changes to asyncssh's transport and its batched recording writer."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime
from pathlib import Path

import pytest
from asyncssh.constants import MSG_CHANNEL_DATA, MSG_IGNORE
from asyncssh.packet import String

from services.bastion import recording
from services.bastion.machine import _CIPHERS
from services.bastion.recording import CastWriter
from services.bastion.sshd import CIPHERS
from services.bastion.transport import (
    PIECE,
    CoalescedWrites,
    in_pieces,
    without_cbc_padding_packets,
)


class FakeTransport:
    """What asyncio's transport does, as far as the writes go."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = self.aborted = False

    def write(self, data: bytes) -> None:
        self.writes.append(bytes(data))

    def is_closing(self) -> bool:
        return self.closed or self.aborted

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.aborted = True

    def get_extra_info(self, name: str) -> str:
        return f"info:{name}"


class FakeConn:
    def __init__(self) -> None:
        self.sent: list[tuple[int, tuple[bytes, ...]]] = []
        self.received: list[bytes] = []

    def send_packet(self, pkttype: int, *args: bytes, handler: object = None) -> None:
        # asyncssh's own send_packet calls self.send_packet for the padding packet.
        if pkttype != MSG_IGNORE:
            self.send_packet(MSG_IGNORE, String(b""))
        self.sent.append((pkttype, args))

    def data_received(self, data: bytes, datatype: object = None) -> None:
        self.received.append(bytes(data))


def test_no_cbc_cipher_on_either_leg():
    # What makes dropping the CBC countermeasure packets safe.
    assert not [c for c in (*CIPHERS, *_CIPHERS) if "cbc" in c]


def test_only_the_empty_ignore_packets_are_dropped():
    conn = FakeConn()
    without_cbc_padding_packets(conn)  # type: ignore[arg-type]
    conn.send_packet(MSG_CHANNEL_DATA, b"x")
    conn.send_packet(MSG_IGNORE, String(b"probe"))
    assert conn.sent == [(MSG_CHANNEL_DATA, (b"x",)), (MSG_IGNORE, (String(b"probe"),))]


def test_received_data_goes_in_pieces_in_order():
    conn = FakeConn()
    in_pieces(conn)  # type: ignore[arg-type]
    data = bytes(range(256)) * (PIECE * 3 // 256 + 7)
    conn.data_received(data)
    conn.data_received(b"small")
    assert [len(p) for p in conn.received[:-1]] == [PIECE, PIECE, PIECE, len(data) - 3 * PIECE]
    assert b"".join(conn.received) == data + b"small"


async def test_writes_of_one_turn_go_out_as_one_and_close_sends_what_waits():
    fake = FakeTransport()
    t = CoalescedWrites(fake)  # type: ignore[arg-type]
    t.write(b"a")
    t.write(b"b")
    assert fake.writes == []
    await asyncio.sleep(0)
    assert fake.writes == [b"ab"]
    t.write(b"c")
    t.close()
    assert (fake.writes, fake.closed) == ([b"ab", b"c"], True)
    assert t.get_extra_info("peername") == "info:peername"
    t.write(b"lost")
    await asyncio.sleep(0)
    assert fake.writes == [b"ab", b"c"]  # nothing is written to a closing transport


def _events(path: Path) -> list[list]:
    lines = path.read_bytes().splitlines()
    assert json.loads(lines[0])["version"] == 2
    return [json.loads(line) for line in lines[1:]]


async def test_a_cast_writes_small_events_within_the_flush_interval(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(recording, "FLUSH_S", 0.05)
    path = tmp_path / "s.cast"
    cast = CastWriter(path, 80, 24, datetime.now(UTC), {}, "t", record_input=True)
    await cast.output(b"$ ")
    await cast.input(b"ls\r")
    await cast.resize(100, 30)
    assert _events(path) == []  # waiting in memory
    async with asyncio.timeout(5):
        while len(_events(path)) < 3:
            await asyncio.sleep(0.01)
    events = _events(path)
    assert [e[1:] for e in events] == [["o", "$ "], ["i", "ls\r"], ["r", "100x30"]]
    assert [e[0] for e in events] == sorted(e[0] for e in events)
    await cast.close()
    assert cast.size == path.stat().st_size


async def test_a_cast_writes_a_full_batch_at_once_and_everything_at_close(
    tmp_path: Path, monkeypatch
):
    monkeypatch.setattr(recording, "FLUSH_S", 3600)  # only size and close write here
    monkeypatch.setattr(recording, "FLUSH_BYTES", 1000)
    path = tmp_path / "s.cast"
    cast = CastWriter(path, 80, 24, datetime.now(UTC), {}, "t", record_input=False)
    await cast.input(b"not recorded")
    for i in range(30):
        await cast.output(b"line %d\r\n" % i * 5)
    async with asyncio.timeout(5):  # the full batch is written in a thread
        while not _events(path):
            await asyncio.sleep(0.01)
    assert len(_events(path)) < 30  # the rest waits for a full batch, the timer or close
    await cast.output(b"last")
    await cast.close()
    events = _events(path)
    assert [e[2] for e in events] == [f"line {i}\r\n" * 5 for i in range(30)] + ["last"]
    assert cast.size == path.stat().st_size
    await cast.close()  # idempotent


async def test_a_failed_batch_write_fails_the_next_event(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(recording, "FLUSH_S", 0.01)
    cast = CastWriter(tmp_path / "s.cast", 80, 24, datetime.now(UTC), {}, "t", record_input=False)

    def full_disk(fd: int, lines: list[bytes]) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(recording, "_write_all", full_disk)
    await cast.output(b"x")
    with pytest.raises(OSError, match="No space"):
        async with asyncio.timeout(5):
            while True:
                await asyncio.sleep(0.02)
                await cast.output(b"y")
    await cast.close()  # logs, does not raise: the session is over either way
