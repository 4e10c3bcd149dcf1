"""The master <-> worker channel: a SOCK_SEQPACKET socketpair carrying one msgpack map per packet.

master -> worker: ``{"cmd": "quit" | "terminate" | "reopen"}``, ``{"cmd": "peers", "peers": [...]}``
worker -> master: ``{"event": "ready" | "load_failed" | "heartbeat", ...}``

Signals stay a fallback (as in nginx): a worker whose channel is broken still obeys QUIT/TERM.
"""

from __future__ import annotations

import socket
from typing import Any

import msgpack

MAX_PACKET = 1 << 20
HEARTBEAT_EVERY = 1.0  # seconds between a worker's heartbeats; the master's worker_timeout counts them
# Exit status of a worker that cannot load its models: the master does not respawn it (no restart storm).
EXIT_FATAL = 2


class Channel:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    @classmethod
    def pair(cls) -> tuple[Channel, Channel]:
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        return cls(a), cls(b)

    def fileno(self) -> int:
        return self.sock.fileno()

    def send(self, message: dict[str, Any]) -> bool:
        """Send without blocking; False if the peer is gone or its buffer is full."""
        try:
            self.sock.send(msgpack.packb(message), socket.MSG_DONTWAIT)
            return True
        except OSError:
            return False

    def recv(self) -> dict[str, Any] | None:
        """One message, or None at EOF (the peer exited)."""
        data = self.sock.recv(MAX_PACKET)
        if not data:
            return None
        return msgpack.unpackb(data)

    def close(self) -> None:
        self.sock.close()
