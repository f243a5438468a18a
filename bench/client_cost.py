"""What a load client costs its machine per request: httpx against aiohttp.

    python bench/client_cost.py     # a few seconds

Each client posts 3,000 predict-like requests (a 20 kB raw body) over 32 connections to
a bare HTTP server on loopback (in a process of its own, answering a fixed JSON body at
once), so what is measured is the client: its CPU milliseconds per request, and the
requests per second it reaches. A benchmark's clients share the cores with the server
they load (a GPU host's included); what they spend, the server does not get.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import sys
import time
from pathlib import Path

import aiohttp
import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from deploy.local_server import free_port

ANSWER = b'{"predictions":[{"label":"temple","score":0.93}]}'
BODY = os.urandom(20_000)
REQUESTS, CONNECTIONS = 3000, 32


def bare_server(port: int) -> None:
    """Answers every request on keep-alive connections with ANSWER, reading its body."""

    async def connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        await reader.readexactly(int(line.split(b":")[1]))
                writer.write(
                    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                    b"content-length: %d\r\n\r\n%s" % (len(ANSWER), ANSWER)
                )
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            return

    async def serve() -> None:
        server = await asyncio.start_server(connection, "127.0.0.1", port)
        await server.serve_forever()

    asyncio.run(serve())


def request_of(port: int) -> tuple[str, dict]:
    headers = {"Authorization": "Bearer key", "Content-Type": "image/jpeg"}
    return f"http://127.0.0.1:{port}/v1/heads/h/predict", headers


async def with_httpx(port: int) -> None:
    url, headers = request_of(port)
    limits = httpx.Limits(max_connections=CONNECTIONS)
    async with httpx.AsyncClient(limits=limits) as client:

        async def one() -> None:
            for _ in range(REQUESTS // CONNECTIONS):
                (await client.post(url, content=BODY, headers=headers)).json()

        await asyncio.gather(*(one() for _ in range(CONNECTIONS)))


async def with_aiohttp(port: int) -> None:
    url, headers = request_of(port)
    connector = aiohttp.TCPConnector(limit=CONNECTIONS)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def one() -> None:
            for _ in range(REQUESTS // CONNECTIONS):
                async with session.post(url, data=BODY, headers=headers) as response:
                    await response.json()

        await asyncio.gather(*(one() for _ in range(CONNECTIONS)))


def main() -> None:
    port = free_port()
    server = multiprocessing.Process(target=bare_server, args=(port,), daemon=True)
    server.start()
    time.sleep(1)
    sent = REQUESTS // CONNECTIONS * CONNECTIONS
    print(f"# {sent} requests over {CONNECTIONS} connections to a bare loopback server")
    for name, client in (("httpx", with_httpx), ("aiohttp", with_aiohttp)):
        cpu, start = time.process_time(), time.perf_counter()
        asyncio.run(client(port))
        cpu, elapsed = time.process_time() - cpu, time.perf_counter() - start
        print(f"{name:8} {1000 * cpu / sent:6.3f} ms CPU per request, {sent / elapsed:6.0f} req/s")
    server.terminate()


if __name__ == "__main__":
    main()
