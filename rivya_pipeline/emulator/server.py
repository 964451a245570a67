"""RivyaEmulator: the API host and the media host as two real uvicorn servers on one background event loop."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from types import TracebackType

import uvicorn

from .app import build_api_app
from .config import EmulatorConfig, FaultRule
from .media import build_media_app
from .state import EmulatorState

_STARTUP_TIMEOUT_SECONDS = 10.0


def _bind(host: str, port: int) -> socket.socket:
    """Bind before serving so that port 0 resolves to a known free port before any URL is handed out.
    The explicit IPPROTO_TCP matters: asyncio only sets TCP_NODELAY on such sockets (else ~40 ms per request)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    return sock


def _url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


class RivyaEmulator:
    """`with RivyaEmulator(config) as emu:` serves the API at emu.base_url and results at emu.media_base_url."""

    def __init__(
        self, config: EmulatorConfig | None = None, host: str = "127.0.0.1", port: int = 0, media_port: int = 0
    ) -> None:
        self._initial_config = config or EmulatorConfig()
        self._host, self._port, self._media_port = host, port, media_port
        self._servers: list[tuple[uvicorn.Server, socket.socket]] = []
        self._thread: threading.Thread | None = None
        self.base_url = ""
        self.media_base_url = ""
        self.state: EmulatorState | None = None

    def start(self) -> RivyaEmulator:
        api_socket, media_socket = _bind(self._host, self._port), _bind(self._host, self._media_port)
        self.base_url, self.media_base_url = _url(api_socket), _url(media_socket)
        self.state = EmulatorState(self._initial_config, self.media_base_url)
        self._servers = [
            (self._server(build_api_app(self.state)), api_socket),
            (self._server(build_media_app(self.state)), media_socket),
        ]
        self._thread = threading.Thread(target=self._run, name="rivya-emulator", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + _STARTUP_TIMEOUT_SECONDS
        while not all(server.started for server, _ in self._servers):
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the Rivya emulator did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        for server, _ in self._servers:
            server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=_STARTUP_TIMEOUT_SECONDS)
        for _, sock in self._servers:
            sock.close()
        self._servers, self._thread = [], None

    @property
    def config(self) -> EmulatorConfig:
        return self._running_state().config

    def stats(self) -> dict:
        return self._running_state().snapshot()

    def set_faults(self, rules: list[FaultRule]) -> None:
        """Replace the fault rules until the next reset (which reinstalls the config's own rules)."""
        self._running_state().faults.replace(rules)

    def reset(self, config: EmulatorConfig | None = None) -> None:
        """Forget tasks, files, idempotency keys, stats and wallets; optionally switch to a new config."""
        state = self._running_state()
        state.reset(config or state.config)

    def set_credits(self, account: str, credits: int) -> None:
        self._running_state().set_credits(account, credits)

    def __enter__(self) -> RivyaEmulator:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def _running_state(self) -> EmulatorState:
        if self.state is None:
            raise RuntimeError("start the emulator first")
        return self.state

    @staticmethod
    def _server(app: object) -> uvicorn.Server:
        config = uvicorn.Config(
            app, log_config=None, log_level="warning", access_log=False, lifespan="off", timeout_graceful_shutdown=2
        )
        return uvicorn.Server(config)

    def _run(self) -> None:
        """Both servers on one event loop (uvloop when installed, as uvicorn itself would pick)."""
        with asyncio.Runner(loop_factory=self._servers[0][0].config.get_loop_factory()) as runner:
            runner.run(self._serve())

    async def _serve(self) -> None:
        await asyncio.gather(*(server.serve(sockets=[sock]) for server, sock in self._servers))
