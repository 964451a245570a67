"""The API key never leaves the API requests: the whole pipeline runs with a recognizable key, then every
place a secret could end up is searched for it.

Searched: the Dagster event log of every run (serialized), run configs and tags, the text of every step and
run failure, captured stdout/stderr and log records, every S3 object (videos and sidecars), the ledger's
database bytes and every file under DAGSTER_HOME. The runs take failure paths on purpose (a failed
generation, a media host error, a missing bucket, a refused create) so that exception texts exist to search.
The media host records whether any request carried an Authorization header.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from dagster import DagsterInstance
from dagster._core.instance.ref import InstanceRef
from dagster._serdes import serialize_value

from rivya_pipeline.briefs import load_briefs
from rivya_pipeline.emulator import FAIL_MARKER, ApiKeyConfig, FaultRule
from rivya_pipeline.headless import HeadlessRun
from rivya_pipeline.settings import REPO_ROOT
from rivya_pipeline_tests.fixtures_emulator import TEST_ACCOUNT
from rivya_pipeline_tests.fixtures_pipeline import FAST_LIFECYCLE, SAMPLE_BRIEFS
from rivya_pipeline_tests.helpers import KLING_PRICE, s3_bytes, s3_keys
from rivya_pipeline_tests.test_cli import EXIT_FAILED, cli_env, run_cli

CANARY_SECRET = "CANARY_7f3a9c"  # noqa: S105 - a marker to search for, accepted only by the emulator
CANARY_KEY = f"rvya_sk_{CANARY_SECRET}"
# Positive control: the searches must find this prompt text where it belongs (the key, never).
DOOMED_PROMPT = "A kite tangled in a tree"
DOOMED_BRIEF = f'id: doomed-kite\nprompt: "{DOOMED_PROMPT} {FAIL_MARKER}"\nparams: {{duration: 3}}\n'
UNPAID_BRIEF = 'id: unpaid-harbour\nprompt: "Boats in a harbour at dusk"\nparams: {duration: 3}\n'
LATE_BRIEF = 'id: late-lantern\nprompt: "A paper lantern rising over a lake"\nparams: {duration: 3}\n'
MISSING_BUCKET = "rivya-no-such-bucket"


def canary_emulator(configure_emulator, *faults: FaultRule):
    """The emulator accepting only the canary key; the first result download fails (an exception to search; the
    video is stored when it is retried alone)."""
    media_error = FaultRule(endpoint="media", kind="server_error", times=1)
    return configure_emulator(**FAST_LIFECYCLE, api_keys=[ApiKeyConfig(key=CANARY_KEY)], faults=[media_error, *faults])


def failure_texts(instance: DagsterInstance) -> list[str]:
    """The full text (message, stack, causes) of every step and run failure in every run."""
    texts = []
    for run in instance.get_runs():
        for record in instance.all_logs(run.run_id):
            event = record.dagster_event
            if event is None:
                continue
            error = None
            if event.is_step_failure:
                error = event.step_failure_data.error
            elif event.is_run_failure:
                error = event.job_failure_data.error
            if error is not None:
                texts.append(error.to_string())
    return texts


def instance_places(instance: DagsterInstance, needle: str) -> list[str]:
    """Where in the instance's runs `needle` appears: event logs, run configs, tags, failure texts."""
    places = []
    for run in instance.get_runs():
        searched = {"run config": run.run_config, "tags": run.tags, "event log": instance.all_logs(run.run_id)}
        places += [f"run {run.run_id}: {what}" for what, value in searched.items() if needle in serialize_value(value)]
    places += [f"failure text: {text[:200]}" for text in failure_texts(instance) if needle in text]
    return places


def files_containing(root: Path, needle: str) -> list[str]:
    return [str(p) for p in sorted(root.rglob("*")) if p.is_file() and needle.encode() in p.read_bytes()]


def s3_objects_containing(s3_bucket, needle: str) -> tuple[int, list[str]]:
    """(objects read, keys of those holding `needle`): every object in the bucket, downloaded."""
    keys = s3_keys(s3_bucket)
    return len(keys), [k for k in keys if needle.encode() in s3_bytes(s3_bucket, k)]


def test_headless_run_with_failures_leaves_the_key_nowhere(
    tmp_path, make_pipeline, configure_emulator, s3_bucket, monkeypatch, capfd, caplog
):
    caplog.set_level(logging.DEBUG)  # every logger at its most talkative: httpx, botocore, dagster, ours
    monkeypatch.setenv("RIVYA_API_KEY", CANARY_KEY)
    pipeline = make_pipeline()
    emulator = canary_emulator(configure_emulator)
    pipeline.write_brief("doomed.yaml", DOOMED_BRIEF)
    briefs = load_briefs(pipeline.requests_path)

    first = {
        o.brief_id: o
        for o in HeadlessRun(settings=pipeline.settings, instance=pipeline.instance).run(briefs, timeout_seconds=60)
    }
    # Second run: a new brief is paid for with the wallet's last credits and stored into a bucket that does not
    # exist, and the next meets the empty wallet, so an S3 error and a refused create join the failures.
    pipeline.write_brief("late.yaml", LATE_BRIEF)
    pipeline.write_brief("unpaid.yaml", UNPAID_BRIEF)
    emulator.set_credits(TEST_ACCOUNT, KLING_PRICE)
    by_id = {b.id: b for b in load_briefs(pipeline.requests_path)}
    again = [by_id["late-lantern"], by_id["unpaid-harbour"]]  # submitted in this order
    broken = make_pipeline(s3_bucket=MISSING_BUCKET)
    second = {
        o.brief_id: o
        for o in HeadlessRun(settings=broken.settings, instance=broken.instance).run(again, timeout_seconds=60)
    }

    statuses = {b: o.status for b, o in [*first.items(), *second.items()]}
    assert statuses == {
        **dict.fromkeys(SAMPLE_BRIEFS, "stored"),  # the first download failed in its batch, then stored alone
        "doomed-kite": "failed",
        "late-lantern": "store_failed",
        "unpaid-harbour": "not_submitted",
    }
    errors = "\n".join(failure_texts(pipeline.instance))
    for expected in ("media host answered HTTP 502", "NoSuchBucket", "insufficient_credits"):
        assert expected in errors

    assert instance_places(pipeline.instance, DOOMED_PROMPT)  # the search sees what the runs recorded
    assert instance_places(pipeline.instance, CANARY_SECRET) == []
    captured = capfd.readouterr()
    assert captured.out + captured.err  # something was printed (Dagster's failure logs), and none of it is the key
    assert CANARY_SECRET not in captured.out + captured.err
    assert caplog.records and CANARY_SECRET not in caplog.text
    assert all(CANARY_SECRET not in str(o) for o in [*first.values(), *second.values()])
    stored = len(SAMPLE_BRIEFS)
    objects_per_video = 4  # the video, its poster, its contact sheet and its sidecar
    read, sidecars = s3_objects_containing(s3_bucket, "dagster_run_id")
    assert (read, len(sidecars)) == (objects_per_video * stored, stored)
    assert s3_objects_containing(s3_bucket, CANARY_SECRET) == (objects_per_video * stored, [])
    ledger = Path(pipeline.settings.ledger_url.removeprefix("sqlite:///"))
    assert any(Path(p).name.startswith(ledger.name) for p in files_containing(ledger.parent, DOOMED_PROMPT))
    assert files_containing(Path(pipeline.instance.root_directory), DOOMED_PROMPT)
    assert files_containing(tmp_path, CANARY_SECRET) == []  # the ledger, DAGSTER_HOME and everything else here
    stats = emulator.stats()
    assert stats["media_requests"] > 0
    assert stats["media_authorization_headers_seen"] == 0


def test_cli_run_leaves_the_key_nowhere(tmp_path, configure_emulator, s3_bucket, s3_endpoint_url):
    emulator = canary_emulator(configure_emulator)
    requests = tmp_path / "requests"
    shutil.copytree(REPO_ROOT / "requests", requests)
    (requests / "doomed.yaml").write_text(DOOMED_BRIEF)
    home = tmp_path / "dagster_home"
    env = cli_env(
        api_key=CANARY_KEY,
        base_url=emulator.base_url,
        bucket=s3_bucket[1],
        s3_endpoint_url=s3_endpoint_url,
        dagster_home=home,
    )

    done = run_cli(["run", "--json", "--requests", str(requests)], env, tmp_path)

    assert done.returncode == EXIT_FAILED, done.stderr
    outcomes = json.loads(done.stdout)
    # the first download failed in its batch and the video was stored when retried alone
    assert sorted(o["status"] for o in outcomes.values()) == ["failed", "stored", "stored", "stored"]
    assert CANARY_SECRET not in done.stdout + done.stderr
    with DagsterInstance.from_ref(InstanceRef.from_dir(str(home))) as instance:
        assert len(instance.get_runs()) >= len(outcomes)
        assert any("media host answered HTTP 502" in text for text in failure_texts(instance))
        assert instance_places(instance, DOOMED_PROMPT)
        assert instance_places(instance, CANARY_SECRET) == []
    assert any(Path(p).name.startswith("rivya_ledger.sqlite") for p in files_containing(home, DOOMED_PROMPT))
    assert files_containing(home, CANARY_SECRET) == []  # instance storage, compute logs and the ledger
    assert s3_objects_containing(s3_bucket, CANARY_SECRET) == (12, [])  # three videos, each with 3 more objects
    stats = emulator.stats()
    assert stats["media_requests"] > 0
    assert stats["media_authorization_headers_seen"] == 0
