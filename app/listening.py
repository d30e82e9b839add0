"""The listening sockets: every address ``--host`` names, on one port, or one clear error.

A name can resolve to several addresses (``localhost`` is often both 127.0.0.1 and ::1):
the service listens on each of them, on the same port. Resolving and binding happen here,
before waitress is involved, so that a name that does not resolve, a port in use or an
address that is not on this machine is one line naming the setting, never a traceback.
"""

from __future__ import annotations

import errno
import socket

from app.settings import SettingsError

__all__ = ["bind_listeners", "resolve"]

# With --port 0, the port the first address got may be taken on another of the addresses;
# then every socket is closed and the binding starts over on a new port, this many times.
_PORT_ATTEMPTS = 5

Address = tuple[int, tuple[str, int] | tuple[str, int, int, int]]


def resolve(host: str, port: int) -> list[Address]:
    """(family, sockaddr) of every address ``host`` names, IPv4 first, each once.

    ``host`` is one name or address, or several separated by commas.
    """
    found: list[Address] = []
    for name in filter(None, (part.strip() for part in host.split(","))):
        try:
            infos = socket.getaddrinfo(name.strip("[]"), port, socket.AF_UNSPEC,
                                       socket.SOCK_STREAM, socket.IPPROTO_TCP,
                                       socket.AI_PASSIVE)
        except (socket.gaierror, UnicodeError) as error:
            reason = error.strerror if isinstance(error, socket.gaierror) else str(error)
            raise SettingsError(f"--host {name}: cannot be resolved ({reason})") from None
        for family, _type, _proto, _name, sockaddr in infos:
            if family in (socket.AF_INET, socket.AF_INET6) and (family, sockaddr) not in found:
                found.append((family, sockaddr))  # type: ignore[arg-type]
    if not found:
        raise SettingsError(f"--host {host}: resolves to no IPv4 or IPv6 address")
    found.sort(key=lambda address: address[0] != socket.AF_INET)  # stable: IPv4 first
    return found


def _bind_one(family: int, sockaddr: tuple[str, int] | tuple[str, int, int, int],
              port: int) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:  # an IPv6 socket for IPv6 only: 0.0.0.0 gets its own
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((sockaddr[0], port, *sockaddr[2:]))
    except BaseException:
        sock.close()
        raise
    return sock


def bind_listeners(host: str, port: int) -> list[socket.socket]:
    """Bound (not yet listening) sockets, one per address of ``host``, all on one port."""
    addresses = resolve(host, port)
    for attempt in range(_PORT_ATTEMPTS):
        sockets: list[socket.socket] = []
        chosen = port
        try:
            for family, sockaddr in addresses:
                sockets.append(_bind_one(family, sockaddr, chosen))
                chosen = sockets[0].getsockname()[1]
            return sockets
        except OSError as error:
            for sock in sockets:
                sock.close()
            retry = (port == 0 and sockets and error.errno == errno.EADDRINUSE
                     and attempt + 1 < _PORT_ATTEMPTS)
            if not retry:
                shown = f"[{sockaddr[0]}]" if family == socket.AF_INET6 else sockaddr[0]
                raise SettingsError(f"--host {host} --port {port}: cannot listen on "
                                    f"{shown}:{chosen} ({error.strerror or error})") from None
    raise AssertionError("unreachable")  # pragma: no cover

