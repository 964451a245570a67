"""Runs the chosen benchmarks on one stack and prints their figures (text, or one JSON object)."""

from __future__ import annotations

import importlib
import json
import logging
import signal
import sys
from collections.abc import Sequence

from . import BENCHMARKS
from .common import BenchResult
from .stack import BenchStack


def run_benchmarks(
    names: Sequence[str],
    *,
    quick: bool,
    as_json: bool,
    transfer_mb: int | None = None,
    scale_briefs: int | None = None,
    scale_profile: str | None = None,
    growth_sizes: tuple[int, int] | None = None,
) -> int:
    """Run `names` (from BENCHMARKS) in order on one stack; `transfer_mb` overrides the transfer's video size (MiB),
    `scale_briefs` the briefs of `scale` and `chaos`, `scale_profile` the one profile of `scale`, `growth_sizes` the
    two sizes of history of `growth`."""
    unknown = sorted(set(names) - set(BENCHMARKS))
    if unknown:
        raise ValueError(f"unknown benchmarks {unknown}; known: {', '.join(BENCHMARKS)}")
    logging.getLogger("rivya_pipeline").setLevel(logging.WARNING)  # progress lines would interleave with figures
    # A benchmark stopped with SIGTERM unwinds as with Ctrl-C: its daemon, workers and servers are stopped too.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    results: dict[str, BenchResult] = {}
    with BenchStack() as stack:
        for name in names:
            print(f"bench {name}{' (quick)' if quick else ''} ...", file=sys.stderr, flush=True)
            options = {
                "transfer": {"mebibytes": transfer_mb},
                "scale": {"briefs": scale_briefs, "profile": scale_profile},
                "chaos": {"briefs": scale_briefs},
                "growth": {"sizes": growth_sizes},
            }.get(name, {})
            benchmark = importlib.import_module(f"{__package__}.{name}")
            results[name] = benchmark.run(stack, quick, **options)
            if not as_json:
                print(results[name].text(), flush=True)
                print(flush=True)
    if as_json:
        print(json.dumps({name: result.as_json() for name, result in results.items()}, indent=2))
    return 0
