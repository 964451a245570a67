"""A TCP proxy that can lose its connections, so tests can cut a service (PostgreSQL, RabbitMQ) off from the
processes that use it without touching the machine's own server.

It listens on 127.0.0.1 (a free port) in front of an upstream host:port and copies bytes both ways, on one asyncio
event loop in a background thread, the way the tests' other small servers run (emulator/serving.py). `cut(seconds)`
resets every open connection at once, on both sides (RST: the client and the server each see the connection
lost, as when a network path or a load balancer goes), and for `seconds` resets every new connection as soon as
it is accepted (a client sees its connect fail at the first read); then it forwards again. Standard library only.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
import time
from dataclasses import dataclass
from types import TracebackType

from rivya_pipeline.emulator.serving import STARTUP_TIMEOUT_SECONDS, bind

CHUNK_BYTES = 64 * 1024
CONNECT_TIMEOUT_SECONDS = 10.0


@dataclass
class ProxyCounts:
    accepted: int = 0  # connections forwarded to the upstream
    cut: int = 0  # live connections reset by a cut
    refused: int = 0  # connections reset at once because a cut was on


class TcpFaultProxy:
    """`with TcpFaultProxy("127.0.0.1", 5432) as proxy:` point clients at 127.0.0.1:`proxy.port`;
    `proxy.cut(60)` loses every connection and refuses new ones for a minute."""

    def __init__(self, upstream_host: str, upstream_port: int, name: str = "tcp-fault-proxy") -> None:
        self.upstream = (upstream_host, upstream_port)
        self.name = name
        self.host, self.port = "127.0.0.1", 0
        self._lock = threading.Lock()
        self._counts = ProxyCounts()
        self._cut_until = 0.0  # time.monotonic() until which every connection is refused
        self._cuts: list[tuple[float, float]] = []  # (time.time() the cut began, its end)
        self._live: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.Server | None = None
        self._thread: threading.Thread | None = None
        self._started = threading.Event()

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> TcpFaultProxy:
        sock = bind()
        sock.listen(128)
        self.host, self.port = sock.getsockname()[:2]
        self._thread = threading.Thread(target=self._run, args=(sock,), name=self.name, daemon=True)
        self._thread.start()
        if not self._started.wait(STARTUP_TIMEOUT_SECONDS):
            raise RuntimeError(f"{self.name} did not start")
        return self

    def stop(self) -> None:
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._stop_on_loop)
            self._thread.join(timeout=STARTUP_TIMEOUT_SECONDS)
        self._thread = None

    def __enter__(self) -> TcpFaultProxy:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # -- faults and tallies ------------------------------------------------------------------

    def cut(self, seconds: float) -> None:
        """Reset every open connection now, and every new one for `seconds`."""
        assert self._loop is not None, "start the proxy first"
        with self._lock:
            self._cut_until = time.monotonic() + seconds
            now = time.time()
            self._cuts.append((now, now + seconds))
        asyncio.run_coroutine_threadsafe(self._reset_live(), self._loop).result(timeout=STARTUP_TIMEOUT_SECONDS)

    def is_cut(self) -> bool:
        with self._lock:
            return time.monotonic() < self._cut_until

    def counts(self) -> ProxyCounts:
        with self._lock:
            return ProxyCounts(**vars(self._counts))

    def cuts(self) -> list[tuple[float, float]]:
        """(start, end) of each cut, as time.time(): to compare with timestamps in logs and in the instance."""
        with self._lock:
            return list(self._cuts)

    # -- the proxy ---------------------------------------------------------------------------

    def _run(self, sock: object) -> None:
        asyncio.run(self._serve(sock))

    async def _serve(self, sock: object) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopped = asyncio.Event()
        self._server = await asyncio.start_server(self._handle, sock=sock)  # type: ignore[arg-type]
        self._started.set()
        await self._stopped.wait()
        self._server.close()
        await self._reset_live()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._server.wait_closed(), STARTUP_TIMEOUT_SECONDS)

    def _stop_on_loop(self) -> None:
        self._stopped.set()

    async def _reset_live(self) -> None:
        with self._lock:
            pairs, self._live = list(self._live), set()
            self._counts.cut += len(pairs)
        for client, upstream in pairs:
            _reset(client)
            _reset(upstream)

    async def _handle(self, client_reader: asyncio.StreamReader, client: asyncio.StreamWriter) -> None:
        if self.is_cut():
            with self._lock:
                self._counts.refused += 1
            _reset(client)
            return
        try:
            upstream_reader, upstream = await asyncio.wait_for(
                asyncio.open_connection(*self.upstream), CONNECT_TIMEOUT_SECONDS
            )
        except (OSError, TimeoutError):
            _reset(client)
            return
        pair = (client, upstream)
        with self._lock:
            if time.monotonic() < self._cut_until:  # a cut began while this one connected upstream
                self._counts.refused += 1
                pair = None
            else:
                self._counts.accepted += 1
                self._live.add((client, upstream))
        if pair is None:
            _reset(client)
            _reset(upstream)
            return
        await asyncio.gather(_pipe(client_reader, upstream), _pipe(upstream_reader, client))
        with self._lock:
            self._live.discard((client, upstream))
        client.close()
        upstream.close()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Copy until end of file, then pass the end on (half-close); a reset ends it quietly."""
    try:
        while data := await reader.read(CHUNK_BYTES):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except (OSError, RuntimeError):  # reset by a cut or by the other side; RuntimeError: write after abort
        _reset(writer)


def _reset(writer: asyncio.StreamWriter) -> None:
    """Drop the connection with a RST (SO_LINGER 0, then close), not an orderly FIN."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()
