"""`rivya-pipeline run` as a user runs it: a subprocess, pointed at the emulator and the S3 server by environment.

The emulator's request counters are the witness: invalid input and `--dry-run` must reach it zero times
(RIVYA_BASE_URL and RIVYA_API_KEY point at it, so any call would be counted).
"""

from __future__ import annotations

import base64
import json
import os
import pty
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest

from rivya_pipeline.cli import parse_args
from rivya_pipeline.emulator import FAIL_MARKER, FaultRule
from rivya_pipeline.emulator.config import video_fault_marker
from rivya_pipeline.ledger import CreditLimits, Ledger
from rivya_pipeline.settings import REPO_ROOT, utc_now
from rivya_pipeline_tests.fixtures_emulator import TEST_API_KEY
from rivya_pipeline_tests.fixtures_pipeline import FAST_LIFECYCLE, SAMPLE_BRIEFS
from rivya_pipeline_tests.helpers import KLING_PRICE, free_ports, s3_keys

RIVYA_PIPELINE = Path(sys.executable).parent / "rivya-pipeline"
EXIT_OK, EXIT_FAILED, EXIT_INVALID = 0, 1, 2
ONE_PIXEL_GIF = base64.b64decode("R0lGODlhAQABAIAAAAAAAP///yH5BAEAAAAALAAAAAABAAEAAAIBRAA7")

# name -> (files of the folder, one (file, brief id or None, field, part of the rule) per expected error line)
MALFORMED = {
    "unknown model": (
        {"a.yaml": "id: unknown-model\nmodel: kling-9-9\nprompt: A lighthouse at dusk.\n"},
        [("a.yaml", "unknown-model", "model", "unknown model 'kling-9-9'")],
    ),
    "three references": (
        {
            "b.yaml": "id: three-refs\nprompt: A city at night.\n"
            "references: [images/product.png, images/city-day.jpg, images/city-night.webp]\n"
        },
        [("b.yaml", "three-refs", "references", "3 given")],
    ),
    "GIF reference": (
        {"c.yaml": "id: gif-ref\nprompt: A spinning logo.\nreferences: [logo.gif]\n", "logo.gif": ONE_PIXEL_GIF},
        [("c.yaml", "gif-ref", "references[0]", "image/gif")],
    ),
    "duration 16": (
        {"d.yaml": "id: too-long\nprompt: A slow pan over a harbour.\nparams: {duration: 16}\n"},
        [("d.yaml", "too-long", "params.duration", "got 16")],
    ),
    "duplicate id across files": (
        {"e.yaml": "id: twice\nprompt: A cat on a fence.\n", "f.yaml": "id: twice\nprompt: A dog in the sea.\n"},
        [("f.yaml", "twice", "id", "e.yaml")],
    ),
    "YAML syntax error": (  # the file cannot be parsed, so there is no brief id to name
        {"g.yaml": 'id: broken\nprompt: "never closed\nparams: {duration: 5\n'},
        [("g.yaml", None, "yaml", "syntax error")],
    ),
}


def cli_env(*, api_key: str, base_url: str, bucket: str, s3_endpoint_url: str, dagster_home: Path) -> dict[str, str]:
    """This process's environment without any RIVYA_/DAGSTER_ setting, then pointed at the test stack."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RIVYA_", "DAGSTER_"))}
    return env | {
        "RIVYA_API_KEY": api_key,
        "RIVYA_BASE_URL": base_url,
        "RIVYA_ALLOW_LOCAL_MEDIA": "1",
        "RIVYA_S3_BUCKET": bucket,
        "AWS_ENDPOINT_URL_S3": s3_endpoint_url,
        "DAGSTER_HOME": str(dagster_home),
    }


def run_cli(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(RIVYA_PIPELINE), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def run_on_terminal(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """The command with stdout and stderr on a pseudo-terminal, as a person at a shell runs it: `stdout` is all
    the terminal showed."""
    controller, terminal = pty.openpty()
    process = subprocess.Popen(
        [str(RIVYA_PIPELINE), *args], cwd=cwd, env=env | {"COLUMNS": "200"}, stdout=terminal, stderr=terminal
    )
    os.close(terminal)
    shown = bytearray()
    while True:
        try:
            chunk = os.read(controller, 65536)
        except OSError:  # the command exited and closed its side
            break
        if not chunk:
            break
        shown += chunk
    os.close(controller)
    return subprocess.CompletedProcess(args, process.wait(timeout=300), shown.decode(errors="replace"), "")


@pytest.fixture
def cli(tmp_path, configure_emulator, s3_bucket, s3_endpoint_url) -> Callable[..., subprocess.CompletedProcess[str]]:
    """`cli("run", "--requests", path)`: the command against the emulator (fast lifecycle) and the test bucket;
    `cli(..., RIVYA_X="1")` sets more variables."""
    emulator = configure_emulator(**FAST_LIFECYCLE)
    env = cli_env(
        api_key=TEST_API_KEY,
        base_url=emulator.base_url,
        bucket=s3_bucket[1],
        s3_endpoint_url=s3_endpoint_url,
        dagster_home=tmp_path / "dagster_home",
    )
    return lambda *args, terminal=False, **more_env: (run_on_terminal if terminal else run_cli)(
        list(args), env | more_env, tmp_path
    )


def sample_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "requests"
    shutil.copytree(REPO_ROOT / "requests", folder)
    return folder


def assert_nothing_reached_rivya_or_s3(emulator, s3_bucket) -> None:
    stats = emulator.stats()
    assert stats["requests"] == {}
    assert (stats["creates_performed"], stats["uploads_performed"]) == (0, 0)
    assert s3_keys(s3_bucket) == []


def write_folder(folder: Path, files: dict[str, str | bytes]) -> None:
    """Adds `files` (text or bytes) to `folder`, beside a copy of the sample images."""
    shutil.copytree(REPO_ROOT / "requests" / "images", folder / "images", dirs_exist_ok=True)
    for name, content in files.items():
        path = folder / name
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content, encoding="utf-8")


@pytest.mark.parametrize("case", [*MALFORMED, "all of them at once"])
def test_malformed_folder_exits_2_with_one_line_per_problem_and_spends_nothing(
    case, tmp_path, cli, emulator, s3_bucket
):
    cases = [MALFORMED[case]] if case in MALFORMED else list(MALFORMED.values())
    folder = tmp_path / "briefs"
    for files, _ in cases:
        write_folder(folder, files)
    problems = sorted(problem for _, case_problems in cases for problem in case_problems)

    done = cli("run", "--requests", str(folder))

    assert done.returncode == EXIT_INVALID
    header, *lines = done.stderr.splitlines()
    assert header == f"Invalid briefs ({len(problems)}); nothing was submitted:"
    for line, (file, brief_id, field, rule) in zip(sorted(lines), problems, strict=True):
        where = f"{folder / file}: brief '{brief_id}'" if brief_id else str(folder / file)
        assert line.startswith(f"  {where}: {field}: "), line
        assert rule in line
    assert done.stdout == ""
    assert_nothing_reached_rivya_or_s3(emulator, s3_bucket)


def test_dry_run_prices_the_samples_and_calls_nothing(tmp_path, cli, emulator, s3_bucket):
    folder = sample_folder(tmp_path)

    table = cli("run", "--requests", str(folder), "--dry-run")
    as_json = cli("run", "--requests", str(folder), "--dry-run", "--json")

    assert (table.returncode, as_json.returncode) == (EXIT_OK, EXIT_OK)
    for brief_id in SAMPLE_BRIEFS:
        assert brief_id in table.stdout
    assert f"{len(SAMPLE_BRIEFS)} task(s) would cost {KLING_PRICE * len(SAMPLE_BRIEFS)} credits" in table.stdout
    report = json.loads(as_json.stdout)
    assert report["dry_run"] is True
    assert report["total_credits"] == 270
    assert sorted((row["brief"], row["credits"]) for row in report["briefs"]) == [
        (brief_id, KLING_PRICE) for brief_id in sorted(SAMPLE_BRIEFS)
    ]
    assert_nothing_reached_rivya_or_s3(emulator, s3_bucket)


def test_run_json_stores_the_samples_and_exits_0(tmp_path, cli, emulator, s3_bucket):
    done = cli("run", "--json", "--requests", str(sample_folder(tmp_path)))

    assert done.returncode == EXIT_OK, done.stderr
    outcomes = json.loads(done.stdout)
    assert set(outcomes) == set(SAMPLE_BRIEFS)
    charged = {c["task_id"] for c in emulator.stats()["charges"] if not c["refunded"]}
    assert {o["task_id"] for o in outcomes.values()} == charged
    bucket = s3_bucket[1]
    for brief_id, outcome in outcomes.items():
        assert outcome["status"] == "stored"
        assert outcome["s3_uri"] == f"s3://{bucket}/videos/{brief_id}/{outcome['task_id']}.mp4"
        assert (outcome["reserved_credits"], outcome["final_credits"], outcome["refunded_credits"]) == (
            KLING_PRICE,
            KLING_PRICE,
            0,
        )
    assert sorted(s3_keys(s3_bucket)) == sorted(
        o["s3_uri"].removeprefix(f"s3://{bucket}/").removesuffix(".mp4") + ext
        for o in outcomes.values()
        for ext in (".mp4", ".json", ".poster.jpg", ".sheet.jpg")  # + the QC pictures
    )


def test_run_with_a_failing_brief_exits_1_and_reports_its_code_and_refund(tmp_path, cli, emulator):
    folder = tmp_path / "doomed"
    write_folder(folder, {"doomed.yaml": f'id: doomed-vase\nprompt: "A vase falling {FAIL_MARKER}"\n'})

    done = cli("run", "--json", "--requests", str(folder))

    assert done.returncode == EXIT_FAILED
    outcome = json.loads(done.stdout)["doomed-vase"]
    (charge,) = emulator.stats()["charges"]
    assert (outcome["status"], outcome["task_id"], charge["refunded"]) == ("failed", charge["task_id"], True)
    assert outcome["error"].startswith("generation_failed")
    assert (outcome["final_credits"], outcome["refunded_credits"], outcome["s3_uri"]) == (0, KLING_PRICE, None)


def test_report_gives_spend_per_day_and_brief_from_the_ledger(tmp_path, cli, emulator):
    folder = tmp_path / "mixed"
    write_folder(
        folder,
        {
            "ok.yaml": "id: calm-lake\nprompt: A calm lake at dawn\n",
            "doomed.yaml": f'id: doomed-vase\nprompt: "A vase falling {FAIL_MARKER}"\n',
        },
    )
    assert cli("run", "--requests", str(folder)).returncode == EXIT_FAILED

    done = cli("report", "--json")

    assert done.returncode == 0
    report = json.loads(done.stdout)
    assert report["qc_failures"] == []
    rows = {row["brief_id"]: row for row in report["spend"]}
    assert set(rows) == {"calm-lake", "doomed-vase"}
    assert (rows["calm-lake"]["tasks"], rows["calm-lake"]["final"], rows["calm-lake"]["refunded"]) == (1, 90, 0)
    assert (rows["doomed-vase"]["final"], rows["doomed-vase"]["refunded"]) == (0, KLING_PRICE)
    assert {row["day"] for row in rows.values()} == {datetime.now(UTC).date().isoformat()}
    assert sum(c["credits"] for c in emulator.stats()["charges"] if not c["refunded"]) == 90


QC_BRIEFS = {
    "good.yaml": "id: calm-lake\nprompt: A calm lake at dawn\nparams: {duration: 3, mode: std}\n",
    "silent.yaml": f'id: quiet-drums\nprompt: "A drummer on a rooftop {video_fault_marker("silent")}"\n'
    "params: {duration: 3, mode: std, sound: true}\n",
    "black.yaml": f'id: dark-street\nprompt: "A street at night {video_fault_marker("black")}"\n'
    "params: {duration: 3, mode: std}\n",
}
# brief -> (check, severity, start of the measured value) of each QC failure, in check order
QC_FAILURES = {
    "dark-street": [("not_black", "ERROR", "longest black stretch 3.0 s"), ("not_frozen", "WARN", "longest frozen")],
    "quiet-drums": [("audio_matches", "ERROR", "silent: at or below -60 dBFS")],
}


def assert_lists_the_qc_failures(text: str) -> None:
    """The text output's QC section: a line per failed check, and the hint to pay for a new video."""
    assert "3 QC check(s) failed on 2 stored video(s)" in text
    assert "bump `regenerate` in a brief to pay for a new video" in text
    for brief_id, failures in QC_FAILURES.items():
        for check, severity, measured in failures:
            assert re.search(rf"^{brief_id}\s+{check}\s+{severity}\s+{re.escape(measured)}", text, re.MULTILINE), text


def assert_carries_the_qc_failures(failures: list[dict], brief_ids: set[str]) -> None:
    """The JSON's `qc_failures`: brief, check, severity, measured value and hint, in brief and check order."""
    expected = [(brief_id, *failure) for brief_id in sorted(brief_ids) for failure in QC_FAILURES[brief_id]]
    assert [(f["brief_id"], f["check"], f["severity"]) for f in failures] == [e[:3] for e in expected]
    for failure, (*_, measured) in zip(failures, expected, strict=True):
        assert failure["measured"].startswith(measured) and "bump `regenerate`" in failure["hint"]


def test_run_and_report_list_the_stored_videos_that_failed_qc_and_exit_0(tmp_path, cli, emulator, s3_bucket):
    folder = tmp_path / "qc"
    write_folder(folder, QC_BRIEFS)

    first = cli("run", "--requests", str(folder))
    again = cli("run", "--json", "--requests", str(folder))  # stores nothing new: QC comes from the instance
    report, report_json = cli("report"), cli("report", "--json")

    assert [done.returncode for done in (first, again, report, report_json)] == [EXIT_OK] * 4, first.stderr
    assert_lists_the_qc_failures(first.stdout)
    assert_lists_the_qc_failures(report.stdout)
    outcomes = json.loads(again.stdout)
    assert {brief_id: o["status"] for brief_id, o in outcomes.items()} == dict.fromkeys(
        ["calm-lake", "quiet-drums", "dark-street"], "stored"
    )
    assert outcomes["calm-lake"]["qc_failures"] == []
    for brief_id in QC_FAILURES:
        assert_carries_the_qc_failures(outcomes[brief_id]["qc_failures"], {brief_id})
    assert_carries_the_qc_failures(json.loads(report_json.stdout)["qc_failures"], set(QC_FAILURES))
    assert len(s3_keys(s3_bucket)) == 3 * 4  # every video kept, with its sidecar and pictures
    assert emulator.stats()["creates_performed"] == 3


def test_run_on_a_terminal_shows_a_live_progress_line_and_stays_quiet_under_json_or_when_piped(tmp_path, cli):
    """Failure mode: a run over 200 briefs (real generations take minutes each) that prints nothing until it ends."""
    folder = sample_folder(tmp_path)

    on_terminal = cli("run", "--requests", str(folder), terminal=True)
    json_on_terminal = cli("run", "--json", "--requests", str(folder), terminal=True)
    piped = cli("run", "--requests", str(folder))

    assert [on_terminal.returncode, json_on_terminal.returncode, piped.returncode] == [EXIT_OK] * 3, on_terminal.stdout
    lines = re.findall(
        r"validated (\d+) · submitted (\d+) · generating (\d+) · stored (\d+) · failed (\d+) · (\d+) credits",
        on_terminal.stdout,
    )
    assert lines[-1] == ("3", "3", "0", "3", "0", str(3 * KLING_PRICE)), on_terminal.stdout
    assert any(line[2] != "0" for line in lines)  # shown while generating: each submit updates the line
    assert "brief_id" in on_terminal.stdout  # the table follows the line
    shown = json_on_terminal.stdout  # stderr's warnings too: the terminal shows both
    outcomes, _ = json.JSONDecoder().raw_decode(shown[shown.index("{") :])
    assert "validated" not in shown and outcomes["product-spin"]["status"] == "stored"
    assert "validated" not in piped.stdout + piped.stderr


def test_report_of_an_instance_that_spent_nothing_is_the_header_alone(cli, emulator):
    done = cli("report")

    assert done.returncode == EXIT_OK, done.stderr
    period, header = done.stdout.splitlines()
    assert re.fullmatch(r"Since \d{4}-\d\d-\d\d \d\d:\d\d UTC \(--since all: everything\)", period)
    assert header.split() == ["day", "brief_id", "tasks", "reserved", "final", "refunded"]


def unanswered_creates(home: Path, sent: dict[str, datetime]) -> None:
    """Creates under these keys, sent at these times, never answered, in the ledger `report` opens."""
    ledger = Ledger(Ledger.default_url(home))
    try:
        for key, moment in sent.items():
            ledger.begin_submit(
                idempotency_key=key,
                brief_id=f"brief-{key}",
                run_id="dead-run",
                model="kling-3-0",
                price_credits=KLING_PRICE,
                body={"model": "kling-3-0", "prompt": f"a create whose answer never came ({key})"},
                limits=CreditLimits(),
                wallet_credits=None,
                now=moment,
            )
    finally:
        ledger.close()


def test_report_lists_a_create_unanswered_past_the_idempotency_window_as_unknown_outcome(tmp_path, cli, emulator):
    """Such a create was invisible: Rivya never answered, so its reserved credits are 0, and it may have been paid."""
    unanswered_creates(
        tmp_path / "dagster_home",
        {"lost": utc_now() - timedelta(hours=25), "in-flight": utc_now() - timedelta(hours=1)},
    )

    text, as_json = cli("report"), cli("report", "--json")

    assert (text.returncode, as_json.returncode) == (EXIT_OK, EXIT_OK), text.stderr
    assert "1 create(s) never got an answer and were sent 24 h ago or more" in text.stdout
    assert f"unknown outcome, {KLING_PRICE} credits at most" in text.stdout
    assert "GET /api/v1/credits for a charge; the pipeline will not re-send them" in text.stdout
    assert re.search(rf"^\S+\s+brief-lost\s+{KLING_PRICE}\s+lost\s*$", text.stdout, re.MULTILINE), text.stdout
    assert "brief-in-flight" not in text.stdout.split("never got an answer")[1]
    report = json.loads(as_json.stdout)
    assert set(report) == {"since", "spend", "qc_failures", "unknown_outcomes", "not_stored"}
    (unknown,) = report["unknown_outcomes"]
    assert (unknown["brief_id"], unknown["idempotency_key"], unknown["price_credits"]) == ("brief-lost", "lost", 90)
    assert "will not re-send" in unknown["hint"]
    rows = {row["brief_id"]: row for row in report["spend"]}
    assert {
        b: (r["tasks"], r["reserved"], r["unknown_outcome"], r["unknown_outcome_credits"]) for b, r in rows.items()
    } == {
        "brief-lost": (1, 0, 1, KLING_PRICE),
        "brief-in-flight": (1, 0, 0, 0),
    }
    assert emulator.stats()["requests"] == {}  # the report asks Rivya nothing, and re-sends nothing


def test_report_covers_the_last_30_days_unless_told_a_period(tmp_path, cli, emulator):
    now = utc_now()
    unanswered_creates(
        tmp_path / "dagster_home",
        {"last-year": now - timedelta(days=300), "last-week": now - timedelta(days=7), "today": now},
    )

    def reported(*since: str) -> tuple[set[str], set[str]]:
        done = cli("report", "--json", *since)
        assert done.returncode == EXIT_OK, done.stderr
        report = json.loads(done.stdout)
        return {r["brief_id"] for r in report["spend"]}, {r["brief_id"] for r in report["unknown_outcomes"]}

    assert reported() == ({"brief-last-week", "brief-today"}, {"brief-last-week"})
    assert reported("--since", "8d") == reported()
    assert reported("--since", "6d") == ({"brief-today"}, set())
    assert reported("--since", "all") == (
        {"brief-last-year", "brief-last-week", "brief-today"},
        {"brief-last-year", "brief-last-week"},
    )
    assert reported("--since", f"{now - timedelta(days=301):%Y-%m-%d}") == reported("--since", "all")


def test_retire_dry_run_changes_nothing_then_retire_removes_the_gone_briefs_partition(tmp_path, cli, emulator):
    folder = sample_folder(tmp_path)
    assert cli("run", "--requests", str(folder)).returncode == EXIT_OK
    (folder / "text-only.yaml").unlink()  # sunrise-timelapse leaves the folder

    kept = json.loads(cli("retire", "--requests", str(folder), "--json").stdout)  # default: 90 days after storing
    dry = cli("retire", "--requests", str(folder), "--after", "0d", "--dry-run")
    done = json.loads(cli("retire", "--requests", str(folder), "--after", "0d", "--json").stdout)
    again = json.loads(cli("retire", "--requests", str(folder), "--after", "0d", "--json").stdout)

    assert (kept["retired"], kept["partitions"], list(kept["kept"].values())) == (0, [], [1])
    assert dry.returncode == EXIT_OK and dry.stdout.startswith("Would retire 1 partition(s) of briefs gone from")
    assert re.search(r"^sunrise-timelapse +2\S+ \S+ +s3://\S+/videos/sunrise-timelapse/", dry.stdout, re.MULTILINE)
    assert (done["retired"], [p["brief_id"] for p in done["partitions"]]) == (1, ["sunrise-timelapse"])
    assert (again["retired"], again["partitions"]) == (0, [])  # dry run retired nothing; the real one did it all


@pytest.mark.parametrize(
    ("args", "error"),
    [
        (
            ["report", "--since", "last tuesday"],
            "argument --since: must be a number of days (30d), a UTC date (2026-01-31) or all (got 'last tuesday')",
        ),
        (
            ["retire", "--after", "three months"],
            "argument --after: must be a number of days, as 90d (got 'three months')",
        ),
    ],
    ids=["report-since", "retire-after"],
)
def test_a_period_the_command_cannot_read_is_refused_in_one_line(cli, emulator, args, error):
    done = cli(*args)

    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].endswith(error)


def test_the_emulator_command_passes_every_option_on_to_the_emulator():
    assert parse_args(["emulator", "--port", "8787", "--media-port", "8788", "--seed=-1", "-h"]).emulator_args == [
        "--port",
        "8787",
        "--media-port",
        "8788",
        "--seed=-1",
        "-h",
    ]
    assert parse_args(["emulator"]).emulator_args == []


def test_the_emulator_serves_on_the_ports_given_as_the_readme_writes_them():
    api_port, media_port = free_ports(2)
    command = [str(RIVYA_PIPELINE), "emulator", "--port", str(api_port), "--media-port", str(media_port)]
    process = subprocess.Popen([*command, "--credits", "77"], stdout=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                credits = httpx.get(
                    f"http://127.0.0.1:{api_port}/api/v1/credits", headers={"Authorization": f"Bearer {TEST_API_KEY}"}
                )
                break
            except httpx.TransportError:
                assert process.poll() is None and time.monotonic() < deadline, "the emulator did not start"
                time.sleep(0.2)
        assert credits.json() == {"current_credits": 77}
        assert httpx.get(f"http://127.0.0.1:{media_port}/media/task_unknown.mp4").status_code == 404
    finally:
        process.send_signal(signal.SIGINT)
        code = process.wait(timeout=30)
    assert code == EXIT_OK  # Ctrl-C is how it is meant to stop


def test_an_option_the_emulator_lacks_is_refused_by_its_own_parser():
    done = subprocess.run(
        [str(RIVYA_PIPELINE), "emulator", "--port", "0", "--colour", "red"], capture_output=True, text=True, timeout=60
    )

    assert done.returncode == EXIT_INVALID
    assert "rivya-pipeline emulator: error: unrecognized arguments: --colour red" in done.stderr


def test_the_other_commands_still_refuse_options_they_lack():
    done = subprocess.run([str(RIVYA_PIPELINE), "report", "--port", "8787"], capture_output=True, text=True, timeout=60)

    assert done.returncode == EXIT_INVALID
    assert "rivya-pipeline: error: unrecognized arguments: --port 8787" in done.stderr


def test_run_and_report_name_a_paid_video_whose_store_window_ran_out_and_what_to_do(tmp_path, cli, emulator):
    """Failure mode: a video given up on was only a line in a run's log; nobody knew it was paid and not stored."""
    emulator.set_faults([FaultRule(endpoint="media", kind="server_error", status=503)])
    fast = {"RIVYA_STORE_RETRY_FIRST_SECONDS": "0.2", "RIVYA_STORE_WINDOW_HOURS": str(2 / 3600)}  # a 2 s window
    folder = tmp_path / "requests"
    folder.mkdir()
    shutil.copy(REPO_ROOT / "requests" / "text-only.yaml", folder)

    run = cli("run", "--requests", str(folder), "--timeout", "60", **fast)
    capped = cli("run", "--requests", str(folder), RIVYA_MAX_CREDITS_PER_DAY="900", **fast)
    text, as_json = cli("report"), cli("report", "--json")

    assert run.returncode == EXIT_FAILED, run.stdout + run.stderr
    assert "store_gave_up" in run.stdout and "materialize stored_video for this partition" in run.stdout
    assert "spend is unbounded" in run.stderr and "spend is unbounded" not in capped.stderr
    assert "store_gave_up" in capped.stdout  # reported again, not tried again: it left the store queue
    assert "1 paid video(s) not stored: Given up after" in text.stdout
    (not_stored,) = json.loads(as_json.stdout)["not_stored"]
    assert not_stored["brief_id"] == "sunrise-timelapse" and not_stored["store_attempts"] >= 2
    assert "media host answered HTTP 503" in not_stored["last_error"]
    assert len(emulator.stats()["charges"]) == 1
