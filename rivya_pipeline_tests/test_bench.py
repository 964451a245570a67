"""`rivya-pipeline bench all --json --quick`, as CI runs it: every benchmark runs and reports the figures the
README's Benchmarks table quotes, and they hang together. Correctness only: no speed goal is asserted (a shared
machine is noisy; the full benchmark and its goals are in the README)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from rivya_pipeline.bench import BENCHMARKS, SCALE_PROFILES, calls, chaos, e2e, poll, qc, scale
from rivya_pipeline.bench.runner import run_benchmarks

pytestmark = pytest.mark.timeout(1500)  # the module's first test waits for `bench all --quick`

BENCH = [sys.executable, "-m", "rivya_pipeline.cli", "bench"]
TRANSFER_MB = 40  # the size option, in the place of the quick default
GROWTH_SIZES = (100, 400)  # the sizes of history, in the place of the quick default (200, 2000): CI's time

README_KEYS = {  # what the README's Benchmarks table reads from `bench all --json`
    "poll": {
        "tick_seconds",
        "sequential_seconds",
        "speedup",
        "max_observed_rps",
        "cpu_ms_per_poll",
        "httpx_floor_cpu_ms_per_request",
    },
    "transfer": {"peak_rss_mb", "mb_per_s", "baseline_mb_per_s", "ratio"},
    "e2e": {"pipeline_seconds", "bare_seconds", "ratio"},
    "calls": {"polls_per_task"},
    "qc": {"cpu_seconds_per_clip_second", "peak_rss_mb"},
    "scale": {"seconds_per_brief", "inprocess_seconds_per_brief", "ratio_to_inprocess", "bare_seconds_per_brief"},
    "chaos": {"lost", "duplicate_charges", "abandoned", "stored", "minutes_to_heal"},
    "growth": {
        "event_log_kb_per_video_batch",
        "event_log_kb_per_video_lone_run",
        "discovery_nothing_new_cpu_s",
        "lookups_cpu_s",
        "sensor_tick_cpu_s",
        "run_cpu_s",
        "report_cpu_s",
        "ui_partition_status_after_add_wall_s",
    },
}


@pytest.fixture(scope="module")
def report() -> dict:
    done = subprocess.run(
        [
            *BENCH,
            "all",
            "--json",
            "--quick",
            "--transfer-mb",
            str(TRANSFER_MB),
            "--sizes",
            ",".join(map(str, GROWTH_SIZES)),
        ],
        capture_output=True,
        text=True,
        timeout=1200,  # `scale` alone waits for a discovery tick per profile
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)  # stdout is the JSON object alone: progress goes to stderr


def test_one_object_keyed_by_benchmark_with_the_readme_keys(report):
    assert list(report) == list(BENCHMARKS)  # `all` runs every benchmark, in their order
    for name, keys in README_KEYS.items():
        assert keys <= set(report[name]), name
        assert isinstance(report[name]["goals_met"], bool)


def test_poll_polls_every_due_task_once_within_the_rate(report):
    figures = report["poll"]
    assert figures["tick_polled"] == poll.QUICK["tick_tasks"]
    assert figures["sequential_seconds"] > 0 and figures["tick_seconds"] > 0 and figures["cpu_ms_per_poll"] > 0
    assert figures["speedup"] == pytest.approx(figures["sequential_seconds"] / figures["tick_seconds"], rel=0.02)
    assert 0 < figures["max_observed_rps"] <= figures["configured_rps"]
    assert figures["backlog_tasks"] == poll.QUICK["backlog_tasks"] and figures["backlog_unpolled"] == 0
    assert figures["backlog_ticks"] >= 1 and figures["backlog_max_observed_rps"] <= figures["configured_rps"]
    floor = figures["httpx_floor_cpu_ms_per_request"]
    assert floor > 0
    assert figures["cpu_ratio_to_httpx_floor"] == pytest.approx(figures["cpu_ms_per_poll"] / floor, abs=0.01)


def test_transfer_stores_the_whole_video_intact(report):
    figures = report["transfer"]
    assert figures["bytes"] == TRANSFER_MB * 1024**2
    assert figures["sha256_matches"] and figures["decodable"]
    assert figures["peak_rss_mb"] >= figures["rss_before_transfer_mb"] > 0
    assert figures["ratio"] == pytest.approx(figures["mb_per_s"] / figures["baseline_mb_per_s"], rel=0.02)


def test_e2e_stores_every_brief_on_both_sides(report):
    figures = report["e2e"]
    assert figures["pipeline_stored"] == figures["bare_stored"] == e2e.QUICK_BRIEFS
    assert figures["ratio"] == pytest.approx(figures["pipeline_seconds"] / figures["bare_seconds"], rel=0.02)
    # a submit run per brief, and the stores in one store_videos batch or more (a batch per poll round)
    assert e2e.QUICK_BRIEFS + 1 <= figures["dagster_runs"] <= 2 * e2e.QUICK_BRIEFS
    assert 0 < figures["dagster_floor_seconds"] < figures["pipeline_seconds"]
    assert figures["floor_ratio"] == pytest.approx(figures["dagster_floor_seconds"] / figures["bare_seconds"], rel=0.02)


def test_calls_follow_the_cadence_and_never_ask_about_ended_tasks(report):
    figures = report["calls"]
    assert figures["tasks"] == calls.QUICK["tasks"]
    # 2.5 s, then every 10 s: a 60 s task is over by the 7th call; late ticks only ever make fewer calls.
    assert 1 <= figures["polls_per_task"] <= figures["max_polls_for_a_task"] <= 7
    assert figures["polls_after_terminal"] == 0 and figures["polls_of_already_terminal_tasks"] == 0
    assert figures["baseline_polls_per_task"] >= 1


def test_qc_decodes_every_frame_of_both_clips_and_samples_a_few(report):
    figures = report["qc"]
    short_seconds, long_seconds = qc.QUICK["seconds"]
    assert (figures["short_clip_seconds"], figures["clip_seconds"]) == (short_seconds, long_seconds)
    assert figures["decoded_frames"] == long_seconds * qc.FPS
    assert 0 < figures["sampled_frames"] < figures["decoded_frames"]
    assert figures["cpu_seconds_per_clip_second"] == pytest.approx(figures["cpu_seconds"] / long_seconds, abs=0.01)
    assert figures["peak_rss_mb"] >= figures["rss_before_qc_mb"] > 0
    assert figures["checks_passed"]


def test_scale_stores_every_brief_once_under_every_profile_this_machine_runs(report):
    figures = report["scale"]
    measured = [name for name in SCALE_PROFILES if name in figures]
    assert "default" in measured and figures["best_profile"] in measured
    for name in measured:
        profile = figures[name]
        assert (profile["stored"], profile["duplicate_charges"]) == (scale.QUICK_BRIEFS, 0)
        # A submit run per brief; the stores in store_videos batches, none of them retried alone in a clean run.
        assert 1 <= profile["store_batch_runs"] <= scale.QUICK_BRIEFS
        assert profile["runs"] == scale.QUICK_BRIEFS + profile["store_batch_runs"]
        assert profile["seconds_per_brief"] == pytest.approx(profile["seconds"] / scale.QUICK_BRIEFS, abs=0.01)
        assert profile["cpu_seconds"] > 0
    assert figures["seconds_per_brief"] == min(figures[name]["seconds_per_brief"] for name in measured)
    assert figures["bare_stored"] == scale.QUICK_BRIEFS
    assert 0 < figures["bare_seconds_per_brief"] < figures["inprocess_seconds_per_brief"]


def test_chaos_strikes_every_fault_on_the_production_path_and_nothing_is_lost_or_bought_twice(report):
    """Failure modes at once: lost create answers, 429s, a media-host outage, an S3 outage, three daemon kills and a
    run's process killed. The verdict is the emulator's charges and the S3 server's objects."""
    figures = report["chaos"]
    assert figures["profile"] == ("default" if scale.celery_unavailable() else "celery")
    faults = figures["faults"]
    assert (faults["daemon_kills"], faults["worker_kills"]) == (3, 1)
    assert faults["lost_create_answers"] >= 2 and faults["rate_limited"] >= 2
    assert faults["media_503s"] > 0 and faults["s3_refusals"] > 0
    left = {key: figures[key] for key in ("stored", "lost", "abandoned", "duplicate_charges", "stored_twice")}
    assert left == {"stored": chaos.QUICK_BRIEFS, "lost": 0, "abandoned": 0, "duplicate_charges": 0, "stored_twice": 0}
    assert isinstance(figures["minutes_to_heal"], float) and figures["minutes_to_heal"] >= 0
    assert figures["runs_failed"] < figures["runs"]


def test_a_transfer_size_below_one_mib_is_refused_before_anything_starts():
    done = subprocess.run(
        [*BENCH, "transfer", "--transfer-mb", "0"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 2 and "--transfer-mb: must be at least 1 (got 0)" in done.stderr


def test_a_name_that_is_no_benchmark_is_refused_before_any_server_starts(monkeypatch):
    monkeypatch.setenv("RIVYA_LEDGER_URL", "sqlite:///kept.db")  # the stack would clear it: it must not start
    with pytest.raises(ValueError, match=re.escape(f"unknown benchmarks ['stack']; known: {', '.join(BENCHMARKS)}")):
        run_benchmarks(["poll", "stack"], quick=True, as_json=True)
    assert os.environ["RIVYA_LEDGER_URL"] == "sqlite:///kept.db"


def test_growth_seeds_each_size_whole_and_times_each_operation_at_both(report):
    growth = report["growth"]
    small, big = (str(size) for size in GROWTH_SIZES)
    # Per brief: a materialization and seven checks, each planned and evaluated.
    assert growth["seeded_events"] == {small: 15 * GROWTH_SIZES[0], big: 15 * GROWTH_SIZES[1]}
    for name in README_KEYS["growth"] - {"event_log_kb_per_video_batch", "event_log_kb_per_video_lone_run"}:
        figure = growth[name]
        assert figure[small] > 0 and figure[big] > 0, name
        assert figure["ratio"] == round(figure[big] / figure[small], 2), name
    # A real video's pictures and checks: tens of KB, the lone run more than the batch's share.
    assert 5 < growth["event_log_kb_per_video_batch"] < growth["event_log_kb_per_video_lone_run"] < 200
    assert 5 < growth["event_log_kb_lone_run_video_record"] < growth["event_log_kb_per_video_lone_run"]
    assert 0 < growth["ledger_kb_per_video"][big] < 10
