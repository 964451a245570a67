"""`bench poll`: one sensor tick over 1,000 due tasks against a sequential loop over the same tasks.

The tick is `TaskPoller.poll_due`, built by `RivyaResource.poller` exactly as the sensor builds it, with
the sensor's per-tick bounds. Every request waits `LATENCY_SECONDS` on the emulator. The defaults
(20 requests/s, 16 workers) are sized for a polite production rate and would need 50 s for 1,000
polls; the benchmark configures `RIVYA_POLL_REQUESTS_PER_SECOND=500` and `RIVYA_POLL_CONCURRENCY=32`
(500 requests/s at 50 ms need 25 in flight; more threads only fight over the GIL).

The rate is checked from the client side: each poll's `last_polled_at`, which the poller stamps
right after the rate limiter lets the request go, counted in every 1 s window.

`cpu_ms_per_poll` is the CPU time of this process during the tick divided by the polls made (the
emulator and S3 run in processes of their own). The tick starts after a full garbage collection, as
in a sensor's settled process: otherwise it pays for collecting the 10,000 tasks the setup created.
Beside it, `httpx_floor_cpu_ms_per_request`: the CPU of one bare httpx GET of a task over a kept-alive
connection, measured in the same run, the floor under any poll on this machine.

A second figure works through a backlog (10,000 tasks) with ticks of a small time budget, one tick
after the other as a busy sensor would run them, and reports the longest tick against its budget.
"""

from __future__ import annotations

import gc
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
from dagster import build_init_resource_context

from ..defs.resources import POLL_RETRY, RivyaResource
from ..defs.sensors import MAX_POLLS_PER_TICK, TICK_TIME_BUDGET_SECONDS
from ..ledger import Ledger, TaskRecord
from .common import BenchResult, create_tasks, max_in_any_window, seed_pending
from .stack import BENCH_API_KEY, BenchStack

LATENCY_SECONDS = 0.05
REQUESTS_PER_SECOND = 500
CONCURRENCY = 32
MAX_CPU_MS_PER_POLL = 1.0
FULL = {"tick_tasks": 1000, "backlog_tasks": 10_000, "backlog_budget": 2.0, "floor_requests": 500}
QUICK = {"tick_tasks": 30, "backlog_tasks": 200, "backlog_budget": 0.3, "floor_requests": 50}
FAR_FUTURE = datetime(9999, 1, 1, tzinfo=UTC)


def _pending(ledger: Ledger, count: int) -> list[TaskRecord]:
    return ledger.due_for_poll(FAR_FUTURE, limit=count)


def _sequential_loop(stack: BenchStack, ledger: Ledger, records: list[TaskRecord]) -> None:
    """The baseline: what a plain loop does for each task, one after the other: ask, then write it down."""
    with stack.client(retry=POLL_RETRY) as client:
        for record in records:
            polled_at = datetime.now(UTC)
            assert record.task_id is not None  # a task due for a poll was created, so it has its id
            task = client.get_generation(record.task_id)
            ledger.update_status(
                task.id,
                status=task.status,
                final_credits=task.final_credits,
                refunded_credits=task.refunded_credits,
                next_poll_at=polled_at + timedelta(seconds=10),
                polled_at=polled_at,
            )


def _resource(stack: BenchStack) -> RivyaResource:
    return RivyaResource(
        api_key=BENCH_API_KEY,
        base_url=stack.api_url,
        poll_requests_per_second=REQUESTS_PER_SECOND,
        poll_concurrency=CONCURRENCY,
    )


def httpx_floor_cpu_ms(stack: BenchStack, requests: int) -> float:
    """CPU ms of one bare httpx GET of a task over a kept-alive connection, nothing else: what any poll costs here."""
    stack.configure(queued_seconds=3600, processing_seconds=3600)
    with stack.client() as client:
        (task,) = create_tasks(client, 1, "floor")
    with httpx.Client(headers={"Authorization": f"Bearer {BENCH_API_KEY}"}) as bare:
        url = f"{stack.api_url}/api/v1/generations/{task.id}"
        bare.get(url).raise_for_status()
        gc.collect()
        started = time.process_time()
        for _ in range(requests):
            bare.get(url).content  # noqa: B018 -- the body read, as a poll reads it
        return round(1000 * (time.process_time() - started) / requests, 3)


def run(stack: BenchStack, quick: bool) -> BenchResult:
    size = QUICK if quick else FULL
    floor_cpu_ms = httpx_floor_cpu_ms(stack, size["floor_requests"])
    # Tasks stay pending for the whole benchmark, so every poll is a real status request.
    stack.configure(latency_seconds=LATENCY_SECONDS, queued_seconds=3600, processing_seconds=3600)
    with stack.client() as client:
        created = create_tasks(client, size["backlog_tasks"], "poll")
    with tempfile.TemporaryDirectory(prefix="rivya-bench-poll-") as tmp:
        tick_tasks = created[: size["tick_tasks"]]
        ledger = seed_pending(Ledger.default_url(Path(tmp) / "tick"), tick_tasks, due_since=timedelta(minutes=1))
        rivya = _resource(stack)
        gc.collect()
        started, cpu_started = time.perf_counter(), time.process_time()
        report = rivya.poller(ledger).poll_due(
            max_tasks=MAX_POLLS_PER_TICK, time_budget_seconds=TICK_TIME_BUDGET_SECONDS
        )
        tick_seconds, tick_cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
        polls_made = report.polled + len(report.errors) + len(report.lost)
        cpu_ms_per_poll = round(1000 * tick_cpu_seconds / max(polls_made, 1), 3)
        polled = _pending(ledger, len(tick_tasks))
        max_rps = max_in_any_window([r.last_polled_at.timestamp() for r in polled if r.last_polled_at])

        started = time.perf_counter()
        _sequential_loop(stack, ledger, polled)
        sequential_seconds = time.perf_counter() - started
        rivya.teardown_after_execution(build_init_resource_context())
        ledger.close()

        backlog = _work_through_backlog(
            stack, Ledger.default_url(Path(tmp) / "backlog"), created, size["backlog_budget"]
        )
    speedup = sequential_seconds / tick_seconds
    return BenchResult(
        name="poll",
        setup=f"{len(tick_tasks)} due tasks, {LATENCY_SECONDS * 1000:.0f} ms emulator latency per request, "
        f"poll rate {REQUESTS_PER_SECOND}/s, {CONCURRENCY} workers",
        figures={
            "tick_seconds": round(tick_seconds, 3),
            "sequential_seconds": round(sequential_seconds, 3),
            "speedup": round(speedup, 1),
            "max_observed_rps": max_rps,
            "configured_rps": REQUESTS_PER_SECOND,
            "tick_polled": report.polled,
            "cpu_ms_per_poll": cpu_ms_per_poll,
            "httpx_floor_cpu_ms_per_request": floor_cpu_ms,
            "cpu_ratio_to_httpx_floor": round(cpu_ms_per_poll / floor_cpu_ms, 2),
            **backlog,
        },
        goals=[
            (f"each due task polled once ({report.polled}/{len(tick_tasks)})", report.polled == len(tick_tasks)),
            (f"tick >= 20x faster than sequential ({speedup:.1f}x)", speedup >= 20),
            (f"tick < 5 s ({tick_seconds:.2f} s)", tick_seconds < 5),
            (
                f"at most {MAX_CPU_MS_PER_POLL:g} ms of CPU per poll ({cpu_ms_per_poll} ms)",
                cpu_ms_per_poll <= MAX_CPU_MS_PER_POLL,
            ),
            (f"never above {REQUESTS_PER_SECOND}/s (max {max_rps} in any 1 s)", max_rps <= REQUESTS_PER_SECOND),
            (
                f"{backlog['backlog_tasks']} tasks worked through in {backlog['backlog_ticks']} ticks, none over its "
                f"{backlog['backlog_tick_budget_seconds']} s budget (longest {backlog['backlog_max_tick_seconds']} s)",
                backlog["backlog_unpolled"] == 0
                and backlog["backlog_max_tick_seconds"] <= backlog["backlog_tick_budget_seconds"],
            ),
            (
                f"backlog never above {REQUESTS_PER_SECOND}/s across ticks (max {backlog['backlog_max_observed_rps']})",
                backlog["backlog_max_observed_rps"] <= REQUESTS_PER_SECOND,
            ),
        ],
        bounds="the client's CPU: the Python work of each poll (httpx, pydantic, thread hand-offs under the GIL; a "
        f"bare httpx GET alone costs {floor_cpu_ms} ms of CPU on this machine) "
        f"against the {1000 / REQUESTS_PER_SECOND:g} ms per request that {REQUESTS_PER_SECOND}/s allows; "
        f"{len(tick_tasks)} polls under that rate alone need {len(tick_tasks) / REQUESTS_PER_SECOND:.2f} s",
    )


def _work_through_backlog(stack: BenchStack, ledger_url: str, created: list, budget: float) -> dict[str, float | int]:
    """Ticks back to back until every task was polled once; each tick gets a fresh poller, as the sensor does."""
    ledger = seed_pending(ledger_url, created, due_since=timedelta(hours=1))
    rivya = _resource(stack)
    tick_seconds: list[float] = []
    # Polled tasks come due again 10 s later, after all never-polled ones (those are due since an hour).
    while _pending(ledger, len(created))[0].last_polled_at is None and len(tick_seconds) < 10 * len(created):
        started = time.perf_counter()
        rivya.poller(ledger).poll_due(max_tasks=MAX_POLLS_PER_TICK, time_budget_seconds=budget)
        tick_seconds.append(time.perf_counter() - started)
    records = _pending(ledger, len(created))
    moments = [r.last_polled_at.timestamp() for r in records if r.last_polled_at]
    rivya.teardown_after_execution(build_init_resource_context())
    ledger.close()
    return {
        "backlog_tasks": len(created),
        "backlog_ticks": len(tick_seconds),
        "backlog_tick_budget_seconds": budget,
        "backlog_max_tick_seconds": round(max(tick_seconds), 3),
        "backlog_unpolled": len(records) - len(moments),
        "backlog_max_observed_rps": max_in_any_window(moments),
    }
