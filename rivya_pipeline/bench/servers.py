"""`python -m rivya_pipeline.bench.servers {emulator,s3}`: one server in a process of its own.

The benchmarks measure the client side; a server in the measured process would share its GIL and its
cores and, for moto, add every stored byte to its memory. So each server runs here,
prints its URL(s) on the first line, and serves until its stdin closes: it never outlives the
benchmark that started it, even one that was killed.
"""

from __future__ import annotations

import logging
import sys

from moto.server import ThreadedMotoServer

from ..emulator import RivyaEmulator


def _serve_until_stdin_closes(urls: list[str]) -> None:
    print(" ".join(urls), flush=True)
    sys.stdin.read()


def main(kind: str) -> None:
    if kind == "emulator":
        # Its real config arrives over HTTP (POST /_emulator/reset) from each benchmark.
        with RivyaEmulator() as emulator:
            _serve_until_stdin_closes([emulator.base_url, emulator.media_base_url])
        return
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one access-log line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        _serve_until_stdin_closes([f"http://{host}:{port}"])
    finally:
        server.stop()


if __name__ == "__main__":
    main(sys.argv[1])
