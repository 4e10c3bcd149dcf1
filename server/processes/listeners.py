"""The listening sockets: bound by the master before it forks, inherited by workers and by a new binary.

A binary upgrade (USR2) passes them through ``exec`` by number in ``MODELSRV_INHERIT``
("kind:host:port=fd;...", nginx's ``NGINX="fd;fd;"``), so no connection is refused while two
masters serve.
"""

from __future__ import annotations

import os
import socket

from server.config import Config, listener_keys, split_listener_key
from server.logs import log

INHERIT_ENV = "MODELSRV_INHERIT"


def open_listeners(cfg: Config, listeners: dict[str, socket.socket]) -> None:
    """Add to ``listeners`` what ``cfg`` asks for and is not open yet: adopted from a previous binary, or bound."""
    inherited = _inherited()
    for key in listener_keys(cfg):
        if key in listeners:
            continue
        if key in inherited:
            sock = socket.socket(fileno=inherited.pop(key))
            log.info("using inherited socket %s (fd %d)", key, sock.fileno())
        else:
            _, host, port = split_listener_key(key)
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
            sock.listen(1024)
        # non-blocking, or a worker that loses an accept race stalls its other connections
        sock.setblocking(False)
        listeners[key] = sock
    for fd in inherited.values():
        os.close(fd)


def close_unused(cfg: Config, listeners: dict[str, socket.socket]) -> None:
    wanted = set(listener_keys(cfg))
    for key in list(listeners):
        if key not in wanted:
            listeners.pop(key).close()


def inherit_env(listeners: dict[str, socket.socket]) -> dict[str, str]:
    """The environment entry that hands ``listeners`` to a new binary (their fds must be inheritable)."""
    return {INHERIT_ENV: ";".join(f"{key}={sock.fileno()}" for key, sock in listeners.items())}


def _inherited() -> dict[str, int]:
    value = os.environ.pop(INHERIT_ENV, "")
    result = {}
    for item in filter(None, value.split(";")):
        key, _, fd = item.rpartition("=")
        result[key] = int(fd)
    return result
