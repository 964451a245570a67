"""RivyaEmulator: the API host and the media host as two real uvicorn servers on one background event loop."""

from __future__ import annotations

from types import TracebackType

from .app import build_api_app
from .config import EmulatorConfig, FaultRule
from .media import build_media_app
from .serving import BackgroundServers, bind, url_of
from .state import EmulatorState


class RivyaEmulator:
    """`with RivyaEmulator(config) as emu:` serves the API at emu.base_url and results at emu.media_base_url."""

    def __init__(
        self, config: EmulatorConfig | None = None, host: str = "127.0.0.1", port: int = 0, media_port: int = 0
    ) -> None:
        self._initial_config = config or EmulatorConfig()
        self._host, self._port, self._media_port = host, port, media_port
        self._servers: BackgroundServers | None = None
        self.base_url = ""
        self.media_base_url = ""
        self.state: EmulatorState | None = None

    def start(self) -> RivyaEmulator:
        api_socket, media_socket = bind(self._host, self._port), bind(self._host, self._media_port)
        self.base_url, self.media_base_url = url_of(api_socket), url_of(media_socket)
        self.state = EmulatorState(self._initial_config, self.media_base_url)
        apps = [(build_api_app(self.state), api_socket), (build_media_app(self.state), media_socket)]
        self._servers = BackgroundServers("rivya-emulator", apps).start()
        return self

    def stop(self) -> None:
        if self._servers is not None:
            self._servers.stop()
        self._servers = None

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
