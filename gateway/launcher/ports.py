"""Which of the ports a server is about to listen on are taken, and by whom.

Triton binds its ports only after its models have loaded, so a port taken by another server would
otherwise be found out late, while that other server answers the health checks meant for ours.
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Iterable
from typing import NamedTuple

import psutil


class Listener(NamedTuple):
    name: str
    """What listens there, for messages: ``Triton gRPC``, ``gateway``."""
    address: str
    port: int


def free_port() -> int:
    """A loopback TCP port no one listens on now (the kernel's pick), for servers started by tests and benchmarks."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def taken(listeners: Iterable[Listener]) -> list[str]:
    """One line per listener whose port cannot be bound now, naming the process that holds it where visible."""
    return [
        f"{listener.name} port {listener.port} on {listener.address} is in use by {holder(listener.port)}"
        for listener in listeners
        if not _bindable(listener)
    ]


def holder(port: int) -> str:
    """``pid N: command line`` of the process listening on TCP ``port``, as far as this user may see."""
    for connection in psutil.net_connections(kind="tcp"):
        if (
            connection.status == psutil.CONN_LISTEN
            and connection.laddr
            and connection.laddr.port == port
            and connection.pid is not None
        ):
            try:
                return f"pid {connection.pid}: {' '.join(psutil.Process(connection.pid).cmdline())}"
            except psutil.Error:
                return f"pid {connection.pid}"
    return "another process"


def listens(pid: int, port: int) -> bool:
    """Whether process ``pid`` itself listens on TCP ``port``."""
    try:
        connections = psutil.Process(pid).net_connections(kind="tcp")
    except psutil.Error:
        return False
    return any(c.status == psutil.CONN_LISTEN and c.laddr.port == port for c in connections)


def _bindable(listener: Listener) -> bool:
    """Bind as servers do (``SO_REUSEADDR``, so connections of an earlier run in TIME_WAIT do not count).

    Only "address in use" counts as taken; other bind errors are left for the server to report.
    """
    family = socket.AF_INET6 if ":" in listener.address else socket.AF_INET
    try:
        with socket.create_server((listener.address, listener.port), family=family):
            return True
    except OSError as exc:
        return exc.errno != errno.EADDRINUSE
