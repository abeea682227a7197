"""Free TCP ports on the loopback interface, for the local servers a command or test starts (SeaweedFS,
a Ray head and its agents)."""

from __future__ import annotations

import socket


def free_ports(n: int) -> list[int]:
    """n distinct ports that nothing on 127.0.0.1 listens on now.

    All n sockets are held until every port is picked, so the ports differ from each other; another
    process may still take one before the caller binds it (the usual race of this idiom)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def free_port() -> int:
    return free_ports(1)[0]
