"""`rivya-pipeline emulator ...`: run the emulator as a standalone process for demos and manual runs."""

from __future__ import annotations

import argparse
import signal
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from .config import DEFAULT_ACCOUNT, ApiKeyConfig, EmulatorConfig
from .server import RivyaEmulator

# flag dest -> EmulatorConfig field, for the knobs that map one to one
_DIRECT_KNOBS = {
    "credits": "initial_credits",
    "queued_seconds": "queued_seconds",
    "processing_seconds": "processing_seconds",
    "time_scale": "time_scale",
    "failure_rate": "failure_rate",
    "seed": "seed",
    "latency_seconds": "latency_seconds",
    "result_min_bytes": "result_min_bytes",
}


def build_parser(prog: str = "rivya-pipeline emulator") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description="Run the local Rivya API emulator until Ctrl-C.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8787, help="API port (0 = any free port)")
    parser.add_argument("--media-port", type=int, default=8788, help="media host port (0 = any free port)")
    parser.add_argument("--config", type=Path, help="YAML or JSON file with EmulatorConfig fields")
    parser.add_argument(
        "--api-key", action="append", help=f"accepted key of account {DEFAULT_ACCOUNT} (repeatable; replaces defaults)"
    )
    parser.add_argument("--credits", type=int, help="starting credits of every account")
    parser.add_argument("--queued-seconds", type=float)
    parser.add_argument("--processing-seconds", type=float)
    parser.add_argument("--time-scale", type=float, help="emulated seconds per real second")
    parser.add_argument("--failure-rate", type=float, help="probability that a task fails (seeded)")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--latency-seconds", type=float, help="added to every API request")
    parser.add_argument("--result-min-bytes", type=int, help="pad result videos up to this many bytes")
    return parser


def config_from_args(args: argparse.Namespace) -> EmulatorConfig:
    """The config file's values, overridden by every flag given on the command line."""
    values: dict[str, Any] = (yaml.safe_load(args.config.read_text()) or {}) if args.config else {}
    for flag, field in _DIRECT_KNOBS.items():
        if getattr(args, flag) is not None:
            values[field] = getattr(args, flag)
    if args.api_key:
        values["api_keys"] = [ApiKeyConfig(key=key).model_dump() for key in args.api_key]
    return EmulatorConfig.model_validate(values)


def serve(argv: Sequence[str] | None = None) -> int:
    """Start both hosts, print their URLs, and serve until SIGINT or SIGTERM."""
    args = build_parser().parse_args(argv)
    config = config_from_args(args)
    stop = threading.Event()
    for signal_number in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signal_number, lambda *_: stop.set())
    with RivyaEmulator(config, host=args.host, port=args.port, media_port=args.media_port) as emulator:
        print(f"Rivya emulator API:   {emulator.base_url}", flush=True)
        print(f"Rivya emulator media: {emulator.media_base_url}", flush=True)
        print(f"export RIVYA_BASE_URL={emulator.base_url}  # Ctrl-C to stop", flush=True)
        while not stop.wait(0.5):
            pass
    return 0
