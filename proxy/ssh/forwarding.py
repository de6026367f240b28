"""Remote port forwarding (``ssh -R``) through hoop: the host listens, hoop relays back to the client.

How this works. When a client asks hoop to listen (``tcpip-forward``) and the resource has
``allow.port_forwarding``, hoop asks the upstream connection to listen on the same address and
port (asyncssh ``create_server`` on the client connection). Each connection the host accepts
there arrives at hoop as a ``forwarded-tcpip`` channel; hoop opens a ``forwarded-tcpip`` channel
to the client for the address and port the client asked for (the port the host picked when the
client asked for port 0), and the two channels are spliced with asyncssh's ``SSHForwarder``
(flow control both ways). Cancelling the forward or closing the client connection closes the
listener, which cancels it on the host.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, cast

import asyncssh
from asyncssh import SSHForwarder

__all__ = ["listen_upstream"]

log = logging.getLogger(__name__)


async def listen_upstream(down: asyncssh.SSHServerConnection, up: asyncssh.SSHClientConnection, listen_host: str,
                          listen_port: int, on_accept: Callable[[str, int], None]) -> asyncssh.SSHListener:
    """Ask ``up`` to listen on ``listen_host:listen_port``; relay each connection to ``down``'s client.

    ``on_accept(orig_host, orig_port)`` is called for every connection the host accepted.
    Raises :class:`asyncssh.ChannelListenError` (or ``OSError``) when the host refuses.
    """
    bound = listen_port

    def accepted(orig_host: str, orig_port: int) -> Any:
        async def splice() -> SSHForwarder:
            on_accept(orig_host, orig_port)
            factory: Any = SSHForwarder
            _, peer = await down.create_connection(factory, listen_host, bound, orig_host, orig_port)
            return SSHForwarder(cast(SSHForwarder, peer))
        return splice()

    listener = await up.create_server(accepted, listen_host, listen_port)
    if listener is None:
        raise asyncssh.ChannelListenError("the host refused to listen")
    bound = int(listener.get_port())
    return listener
