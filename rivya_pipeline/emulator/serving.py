"""ASGI apps served by uvicorn on one event loop in a background thread: the emulator's two hosts, and the
small servers of the test suite (the S3 fault proxy, a media host), all started and stopped the same way."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractAsyncContextManager
from types import TracebackType

import uvicorn
from starlette.types import ASGIApp

STARTUP_TIMEOUT_SECONDS = 10.0


def bind(host: str = "127.0.0.1", port: int = 0) -> socket.socket:
    """Bind before serving so that port 0 resolves to a known free port before any URL is handed out.
    The explicit IPPROTO_TCP matters: asyncio only sets TCP_NODELAY on such sockets (else Nagle's algorithm waits
    for Linux's delayed ACK, 40 ms, on every request)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


class BackgroundServers:
    """`with BackgroundServers("name", [(app, bind())]):` serves each app on its socket until the block ends.

    `around` is entered on the servers' event loop before they serve and left after they stop: where an app
    keeps something bound to that loop (an async HTTP client) for its whole life.
    """

    def __init__(
        self,
        name: str,
        apps: Sequence[tuple[ASGIApp, socket.socket]],
        *,
        log_level: str = "warning",
        around: Callable[[], AbstractAsyncContextManager[object]] = contextlib.nullcontext,
    ) -> None:
        self._name, self._around = name, around
        self._servers = [
            (
                uvicorn.Server(
                    uvicorn.Config(
                        app,
                        log_config=None,
                        log_level=log_level,
                        access_log=False,
                        lifespan="off",
                        timeout_graceful_shutdown=2,
                    )
                ),
                sock,
            )
            for app, sock in apps
        ]
        self._thread: threading.Thread | None = None

    def start(self) -> BackgroundServers:
        self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + STARTUP_TIMEOUT_SECONDS
        while not all(server.started for server, _ in self._servers):
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{self._name} did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        for server, _ in self._servers:
            server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=STARTUP_TIMEOUT_SECONDS)
        for _, sock in self._servers:
            sock.close()
        self._thread = None

    def __enter__(self) -> BackgroundServers:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def _run(self) -> None:
        """All servers on one event loop (uvloop when installed, as uvicorn itself would pick)."""
        with asyncio.Runner(loop_factory=self._servers[0][0].config.get_loop_factory()) as runner:
            runner.run(self._serve())

    async def _serve(self) -> None:
        async with self._around():
            await asyncio.gather(*(server.serve(sockets=[sock]) for server, sock in self._servers))
