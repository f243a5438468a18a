"""The wire between Graft's processes: pickled messages whose arrays travel as raw bytes.

Used by the link between API workers and the backbone runner (`service/runner_server.py`,
`service/runner_client.py`) and by the training decoder's (`service/decoder.py`).
"""

from __future__ import annotations

import contextlib
import os
import pickle
import socket
from multiprocessing.connection import Connection
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from service.settings import Settings

SOCKET_BUFFER_BYTES = 4 * 1024 * 1024


def send(conn: Connection, message: object) -> None:
    # Arrays go out of band, as their own raw messages: pickling them in band copies
    # them again (about 1 ms for 8 images).
    buffers: list[pickle.PickleBuffer] = []
    head = pickle.dumps(message, protocol=5, buffer_callback=buffers.append)
    conn.send_bytes(len(buffers).to_bytes(4, "little") + head)
    for buffer in buffers:
        conn.send_bytes(buffer.raw())


def recv(conn: Connection) -> Any:
    """The message `send` sent; its arrays are read-only views of the received bytes."""
    data = conn.recv_bytes()
    buffers = [conn.recv_bytes() for _ in range(int.from_bytes(data[:4], "little"))]
    return pickle.loads(memoryview(data)[4:], buffers=buffers)


def widen(conn: Connection) -> Connection:
    """Socket buffers that hold a batch of images: with the default (208 KiB) a message of
    8 images crosses in six wake-ups of each side. Over TCP, no Nagle delay: a request's
    last small message goes out at once."""
    with socket.socket(fileno=os.dup(conn.fileno())) as sock:
        for option in (socket.SO_SNDBUF, socket.SO_RCVBUF):
            sock.setsockopt(socket.SOL_SOCKET, option, SOCKET_BUFFER_BYTES)
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return conn


def hang_up(conn: Connection) -> None:
    """Ends the connection for both sides at once. A plain close leaves the socket open
    while a thread of this process is still blocked reading it: neither that thread nor
    the other side would hear of the end."""
    with contextlib.suppress(OSError), socket.socket(fileno=os.dup(conn.fileno())) as sock:
        sock.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(OSError):
        conn.close()


# Where the link is: a Unix socket's path, or (host, port) over TCP.
Address = Path | str | tuple[str, int]


def link_address(settings: Settings) -> tuple[Address, bytes | None]:
    """The runner link's address, and the key that TCP needs (None on a Unix socket)."""
    if settings.runner_link_address is None or settings.runner_key is None:
        return settings.runner_socket, None  # (settings refuse a TCP link without a key)
    return settings.runner_link_address, settings.runner_key.encode()


def socket_family(address: Address) -> str:
    return "AF_INET" if isinstance(address, tuple) else "AF_UNIX"
