"""Port forwarding between the node's network namespace and the root one."""

from __future__ import annotations

import asyncio
import ctypes
import os
import socket
import threading
from typing import Any

CLONE_NEWNET = 0x40000000


def listen_in_netns(netns: str, host: str, port: int) -> socket.socket:
    """A listening socket inside another network namespace (setns on a throwaway thread: the
    socket keeps its namespace, the rest of the process stays in the root one)."""
    result: list[Any] = []

    def work() -> None:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        try:
            fd = os.open(f"/run/netns/{netns}", os.O_RDONLY)
            if libc.setns(fd, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns")
            os.close(fd)
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
            sock.listen(64)
            sock.setblocking(False)
            result.append(sock)
        except OSError as exc:
            result.append(exc)
        # The thread ends here, in the other namespace; no other code runs on it.

    t = threading.Thread(target=work)
    t.start()
    t.join()
    if isinstance(result[0], Exception):
        raise result[0]
    return result[0]


async def forward(netns: str, port: int, target_port: int, host: str = "127.0.0.1") -> asyncio.AbstractServer:
    """Node-namespace ``host:port`` → root-namespace 127.0.0.1:<target_port>: servers of the root
    namespace stay on loopback (the apiserver, KEDA's gRPC), and what runs inside the node namespace
    (kube-proxy, KEDA's metrics apiserver, CoreDNS) or in pods (through the ``kubernetes`` Service,
    ``host`` = the node's address) still reaches them."""

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    async def handle(r1: asyncio.StreamReader, w1: asyncio.StreamWriter) -> None:
        try:
            r2, w2 = await asyncio.open_connection("127.0.0.1", target_port)
        except OSError:
            w1.close()
            return
        await asyncio.gather(pipe(r1, w2), pipe(r2, w1))

    return await asyncio.start_server(handle, sock=listen_in_netns(netns, host, port))
