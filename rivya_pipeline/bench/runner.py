"""Runs the chosen benchmarks on one stack and prints their figures (text, or one JSON object)."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable

from . import calls, e2e, poll, transfer
from .common import BenchResult
from .stack import BenchStack

BENCHMARKS: dict[str, Callable[..., BenchResult]] = {
    "poll": poll.run,
    "transfer": transfer.run,
    "e2e": e2e.run,
    "calls": calls.run,
}


def run_benchmarks(names: list[str], *, quick: bool, as_json: bool, transfer_mb: int | None = None) -> int:
    """Run `names` in order on one stack; `transfer_mb` overrides the transfer's video size (MiB)."""
    logging.getLogger("rivya_pipeline").setLevel(logging.WARNING)  # progress lines would interleave with figures
    results: dict[str, BenchResult] = {}
    with BenchStack() as stack:
        for name in names:
            print(f"bench {name}{' (quick)' if quick else ''} ...", file=sys.stderr, flush=True)
            options = {"mebibytes": transfer_mb} if name == "transfer" else {}
            results[name] = BENCHMARKS[name](stack, quick, **options)
            if not as_json:
                print(results[name].text(), flush=True)
                print(flush=True)
    if as_json:
        print(json.dumps({name: result.as_json() for name, result in results.items()}, indent=2))
    return 0
