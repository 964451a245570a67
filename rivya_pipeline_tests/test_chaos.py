"""Chaos, sized for CI: 40 briefs through `rivya-pipeline run`'s code path while the API and S3 misbehave.

The emulator answers with 429 + Retry-After, 5xx pages, dropped connections and lost create answers, and
fails a seeded share of generations; the S3 leg runs through a proxy that answers a seeded share of requests,
multipart part uploads included, with 500/503. The verdict comes from the emulator's wallet and task records
and from the S3 server itself, never from the pipeline's own report of what it did.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from dagster import DagsterInstance

from rivya_pipeline.briefs import load_briefs
from rivya_pipeline.emulator import FAIL_MARKER, FaultRule
from rivya_pipeline.emulator.s3_fault_proxy import S3FaultProxy
from rivya_pipeline.headless import HeadlessRun
from rivya_pipeline.settings import REPO_ROOT
from rivya_pipeline.storage import MIN_PART_BYTES
from rivya_pipeline_tests.fixtures_emulator import TEST_ACCOUNT, TEST_CREDITS
from rivya_pipeline_tests.fixtures_pipeline import FAST_LIFECYCLE
from rivya_pipeline_tests.helpers import KLING_PRICE, s3_bytes, s3_keys

SEED = 20260511
SUBJECTS = [
    "a lighthouse on a basalt cliff",
    "a paper boat on a rain gutter",
    "a fox crossing a snowy field",
    "a vintage tram climbing a hill",
    "a hummingbird at a red flower",
    "a potter shaping a clay bowl",
    "a kite over sand dunes",
    "a koi pond under falling leaves",
    "a night market with lanterns",
    "a glacier calving into the sea",
]
TREATMENTS = ["in golden-hour light", "as a slow dolly shot", "in soft overcast light", "from a high drone angle"]
ASPECTS = ["16:9", "9:16", "1:1"]
DOOMED = {6, 29}  # the FAIL marker: these always fail, whatever the seed
REFERENCES = {
    3: ["images/product.png"],
    14: ["images/city-day.jpg"],
    25: ["images/city-day.jpg", "images/city-night.webp"],
    36: ["images/product.png", "images/city-night.webp"],
}
BRIEFS_PER_FILE = 8
BRIEF_COUNT = len(SUBJECTS) * len(TREATMENTS)
# Every API route the pipeline calls; the media host is left alone (a CDN fault is a store-run retry, not chaos).
API_ENDPOINTS = ("upload_file", "create_generation", "get_generation")
API_FAULTS = [
    rule
    for endpoint in API_ENDPOINTS
    for rule in (
        FaultRule(endpoint=endpoint, kind="rate_limited", rate=0.03, retry_after=1),
        FaultRule(endpoint=endpoint, kind="server_error", rate=0.04, status=502),
        FaultRule(endpoint=endpoint, kind="internal_error", rate=0.03),
        FaultRule(endpoint=endpoint, kind="drop_connection", rate=0.04),
    )
] + [
    FaultRule(endpoint="create_generation", kind="lost_response", rate=0.12),
    FaultRule(endpoint="create_generation", kind="lost_response", rate=0.12, lost_as="drop_connection"),
]
GENERATION_FAILURE_RATE = 0.15
# Results just over one part, so every stored video is a real multipart upload of two parts (and no bigger:
# every byte crosses the media host, the proxy and the S3 server in this one process).
RESULT_BYTES = MIN_PART_BYTES + 100_000
S3_FAULT_RATES = {"*": 0.02, "UploadPart": 0.12}
RUN_TIMEOUT_SECONDS = 900  # far above any real run: the test must not depend on the machine's speed


def brief_yaml(index: int) -> str:
    subject, treatment = SUBJECTS[index % len(SUBJECTS)], TREATMENTS[index // len(SUBJECTS)]
    prompt = f"Chaos brief {index}: {subject}, {treatment}."
    if index in DOOMED:
        prompt += f" {FAIL_MARKER}"
    lines = [
        f"  - id: chaos-{index:02d}",
        f"    prompt: {json.dumps(prompt)}",
        f'    params: {{duration: {3 + index % 2}, aspect_ratio: "{ASPECTS[index % len(ASPECTS)]}"}}',
    ]
    if index in REFERENCES:
        lines.append(f"    references: {json.dumps(REFERENCES[index])}")
    return "\n".join(lines)


def write_chaos_briefs(folder: Path) -> None:
    """40 distinct briefs in files of 8 (some image-to-video), with the sample images beside them."""
    shutil.copytree(REPO_ROOT / "requests" / "images", folder / "images")
    for start in range(0, BRIEF_COUNT, BRIEFS_PER_FILE):
        body = "\n".join(brief_yaml(i) for i in range(start, start + BRIEFS_PER_FILE))
        (folder / f"batch-{start // BRIEFS_PER_FILE}.yaml").write_text(f"requests:\n{body}\n", encoding="utf-8")


@pytest.fixture
def memory_backed_home(tmp_path: Path) -> Iterator[Path]:
    """A folder on tmpfs (when the machine has one) for the Dagster instance and the ledger.

    70 runs make Dagster's SQLite storage commit thousands of times; on a disk every commit waits for an
    fsync, and the test would measure the disk (and whoever else is using it) instead of the pipeline.
    """
    shm = Path("/dev/shm")  # noqa: S108 - only a parent for mkdtemp, which makes a private folder
    if not shm.is_dir():
        yield tmp_path
        return
    with tempfile.TemporaryDirectory(dir=shm, prefix="rivya-chaos-") as folder:
        yield Path(folder)


@pytest.fixture
def s3_fault_proxy(s3_endpoint_url: str) -> Iterator[S3FaultProxy]:
    with S3FaultProxy(s3_endpoint_url, S3_FAULT_RATES, seed=SEED) as proxy:
        yield proxy


def stored_objects(s3_bucket, prefix: str) -> dict[str, bytes]:
    """Every object under the prefix, read straight from the S3 server (not through the proxy)."""
    return {key: s3_bytes(s3_bucket, key) for key in s3_keys(s3_bucket, prefix)}


def open_multipart_uploads(s3_bucket) -> list[str]:
    client, bucket = s3_bucket
    pages = client.get_paginator("list_multipart_uploads").paginate(Bucket=bucket)
    return [upload["Key"] for page in pages for upload in page.get("Uploads", [])]


def test_chaos_every_success_stored_once_and_the_wallet_charged_only_for_successes(
    tmp_path, memory_backed_home, pipeline_settings, configure_emulator, s3_bucket, s3_fault_proxy
):
    folder = tmp_path / "chaos"
    folder.mkdir()
    write_chaos_briefs(folder)
    briefs = load_briefs(folder)
    assert len(briefs) == BRIEF_COUNT == 40
    settings = dataclasses.replace(
        pipeline_settings,
        requests_path=folder,
        s3_endpoint_url=s3_fault_proxy.url,
        s3_chunk_mb=MIN_PART_BYTES // 1024**2,
        ledger_url=f"sqlite:///{memory_backed_home / 'ledger.sqlite'}",
    )
    emulator = configure_emulator(
        **FAST_LIFECYCLE,
        failure_rate=GENERATION_FAILURE_RATE,
        seed=SEED,
        result_min_bytes=RESULT_BYTES,
        faults=API_FAULTS,
    )

    (memory_backed_home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    with DagsterInstance.local_temp(str(memory_backed_home)) as instance:
        started = time.monotonic()
        run = HeadlessRun(settings=settings, instance=instance)
        outcomes = {o.brief_id: o for o in run.run(briefs, timeout_seconds=RUN_TIMEOUT_SECONDS)}
        seconds = time.monotonic() - started
        run.ledger.close()

    stats = emulator.stats()
    stored = {b: o for b, o in outcomes.items() if o.status == "stored"}
    failed = {b: o for b, o in outcomes.items() if o.status == "failed"}
    print(
        f"\nchaos tallies: {len(briefs)} briefs in {seconds:.1f}s -> {len(stored)} stored, {len(failed)} failed "
        f"(refunded), other {sorted((b, o.status) for b, o in outcomes.items() if b not in stored | failed)}\n"
        f"  emulator: {stats['creates_performed']} creates performed, {stats['idempotent_replays']} idempotent "
        f"replays, {len(stats['charges'])} charges, {sum(c['refunded'] for c in stats['charges'])} refunded, "
        f"wallet {TEST_CREDITS} -> {stats['wallets'][TEST_ACCOUNT]}, requests {stats['requests']}\n"
        f"  emulator faults injected: {stats['faults_injected']}\n"
        f"  S3 proxy 5xx injected: {s3_fault_proxy.injected()} / forwarded {s3_fault_proxy.forwarded()}"
    )

    # Every brief reached an end: stored, or failed by the generator (transient faults never end a brief).
    assert stored.keys() | failed.keys() == set(outcomes) == {b.id for b in briefs}
    assert {f"chaos-{i:02d}" for i in DOOMED} <= failed.keys()
    # The emulator's wallet: one charge per brief (no double spend), refunded exactly for the failures.
    charges = {c["task_id"]: c for c in stats["charges"]}
    assert stats["creates_performed"] == len(charges) == len(outcomes)
    assert set(charges) == {o.task_id for o in outcomes.values()}
    assert {t for t, c in charges.items() if not c["refunded"]} == {o.task_id for o in stored.values()}
    assert {t for t, c in charges.items() if c["refunded"]} == {o.task_id for o in failed.values()}
    assert stats["wallets"][TEST_ACCOUNT] == TEST_CREDITS - KLING_PRICE * len(stored)
    assert stats["tasks_by_status"] == {"succeeded": len(stored), "failed": len(failed)}
    assert stats["media_authorization_headers_seen"] == 0
    # Failures are reported with their code and refund.
    for outcome in failed.values():
        assert outcome.error.startswith("generation_failed")
        assert (outcome.final_credits, outcome.refunded_credits) == (0, KLING_PRICE)
    for outcome in stored.values():
        assert (outcome.final_credits, outcome.refunded_credits) == (KLING_PRICE, 0)

    # S3's own view: exactly one video, its two pictures and its sidecar per success, nothing else, hashes
    # agreeing, no open uploads.
    prefix = settings.s3_prefix
    objects = stored_objects(s3_bucket, f"{prefix}/")
    extensions = ("mp4", "json", "poster.jpg", "sheet.jpg")
    expected_keys = {f"{prefix}/{b}/{o.task_id}.{ext}" for b, o in stored.items() for ext in extensions}
    assert set(objects) == expected_keys
    for brief_id, outcome in stored.items():
        video = objects[f"{prefix}/{brief_id}/{outcome.task_id}.mp4"]
        sidecar = json.loads(objects[f"{prefix}/{brief_id}/{outcome.task_id}.json"])
        assert len(video) == RESULT_BYTES
        assert sidecar["sha256"] == hashlib.sha256(video).hexdigest()
        assert (sidecar["brief_id"], sidecar["task_id"]) == (brief_id, outcome.task_id)
        assert outcome.s3_uri == f"s3://{s3_bucket[1]}/{prefix}/{brief_id}/{outcome.task_id}.mp4"
    assert open_multipart_uploads(s3_bucket) == []

    # The chaos really happened: every kind of fault fired, on both legs, part uploads included.
    injected = Counter(kind.split(":")[1] for kind, n in stats["faults_injected"].items() for _ in range(n))
    assert {"rate_limited", "server_error", "internal_error", "drop_connection", "lost_response"} <= set(injected)
    assert s3_fault_proxy.injected().get("UploadPart", 0) > 0
    assert sum(s3_fault_proxy.injected().values()) > s3_fault_proxy.injected()["UploadPart"]


def test_create_answered_with_an_already_failed_task_is_reported_with_its_code_and_refund(pipeline, configure_emulator):
    """A replayed create can return a task that has already ended; nothing polls a terminal task afterwards."""
    emulator = configure_emulator(queued_seconds=0, processing_seconds=0)  # over the moment it is created
    pipeline.write_brief("doomed.yaml", f'id: doomed-now\nprompt: "A vase falling {FAIL_MARKER}"\n')
    (brief,) = [b for b in load_briefs(pipeline.requests_path) if b.id == "doomed-now"]

    (outcome,) = HeadlessRun(settings=pipeline.settings, instance=pipeline.instance).run([brief], timeout_seconds=30)

    (charge,) = emulator.stats()["charges"]
    assert (outcome.status, outcome.task_id, charge["refunded"]) == ("failed", charge["task_id"], True)
    assert outcome.error.startswith("generation_failed")
    assert (outcome.final_credits, outcome.refunded_credits) == (0, KLING_PRICE)
