"""The history `bench growth` measures against: a year of briefs in a folder, a Dagster instance and a ledger.

Everything goes through Dagster's own storage code (`add_run`, `store_event_batch`, `add_dynamic_partitions`), so the
rows are the ones a real deployment writes. What would take an hour at 10,000 briefs is each such write's own
connection and commit on SQLite; `one_transaction` gives a storage one open connection per database for the
duration of the seed (setup, not what is measured).
"""

from __future__ import annotations

import contextlib
import json
import random
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
from dagster import AssetCheckEvaluation, AssetKey, AssetMaterialization, DagsterInstance, DagsterRun, DagsterRunStatus
from dagster._core.definitions.asset_checks.asset_check_evaluation import AssetCheckEvaluationPlanned
from dagster._core.definitions.partitions.subset import DefaultPartitionsSubset
from dagster._core.events import DagsterEvent, DagsterEventType, StepMaterializationData
from dagster._core.events.log import EventLogEntry
from PIL import Image
from sqlalchemy import create_engine
from sqlalchemy.pool import NullPool

from ..briefs import Brief, scan_briefs
from ..defs.assets import BATCH_TAG
from ..defs.schedules import VERSION_TAG, brief_version
from ..defs.sensors import MAX_RETRIES_TAG, PARTITION_TAG
from ..defs.store_batch import STORE_BATCH_SIZE, STORE_VIDEOS_JOB, store_videos_run_config
from ..ledger import Ledger
from .common import insert_ledger_rows

STORED_VIDEO = AssetKey("stored_video")
REFERENCE_IMAGES = 50
REFERENCE_SHARE = 5  # one brief in five has a reference image
CHECK_FAILURE_SHARE = 33  # one partition in 33 has a failed check: 3%
HISTORY_DAYS = 365
SUBMIT_JOB = "__ASSET_JOB"  # the job of discovery's runs (its target is an asset selection)


@dataclass(frozen=True)
class Template:
    """A real stored video's materialization metadata and its seven check evaluations, copied to every partition."""

    materialization: dict[str, Any]
    checks: list[AssetCheckEvaluation]


def write_reference_images(folder: Path) -> list[str]:
    """REFERENCE_IMAGES JPEGs of about 1 MB (noise compresses badly), their paths relative to `folder`."""
    images = folder / "images"
    images.mkdir(parents=True, exist_ok=True)
    generator = np.random.default_rng(7)
    names = []
    for index in range(REFERENCE_IMAGES):
        pixels = generator.integers(0, 256, size=(700, 700, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(images / f"ref-{index:02d}.jpg", quality=90)
        names.append(f"images/ref-{index:02d}.jpg")
    return names


def brief_text(brief_id: str, index: int, references: Sequence[str]) -> str:
    text = f"id: {brief_id}\nprompt: Take {index} of a paper kite over a windy beach at dawn.\n"
    text += "params: {duration: 5, aspect_ratio: '16:9'}\n"
    if references and index % REFERENCE_SHARE == 0:
        text += f"references: [{references[index // REFERENCE_SHARE % len(references)]}]\n"
    return text


def write_briefs(folder: Path, ids: Sequence[str], references: Sequence[str], first_index: int = 0) -> None:
    """One file per brief (the usual layout of a briefs folder), in subfolders of 1,000."""
    for offset, brief_id in enumerate(ids):
        index = first_index + offset
        path = folder / f"batch-{index // 1000:03d}" / f"{brief_id}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(brief_text(brief_id, index, [f"../{r}" for r in references]), encoding="utf-8")


def brief_ids(count: int, prefix: str = "brief") -> list[str]:
    return [f"{prefix}-{index:06d}" for index in range(count)]


@contextlib.contextmanager
def one_transaction(storage: Any, attribute: str, key: Callable[..., str]) -> Iterator[None]:
    """While open, `storage.<attribute>(...)` (a context manager yielding a connection in a transaction) yields
    one connection per database (`key` of its arguments), committed when this closes."""
    real = getattr(storage, attribute)
    connections: dict[str, Any] = {}
    with contextlib.ExitStack() as stack:

        @contextlib.contextmanager
        def shared(*args: Any) -> Iterator[Any]:
            name = key(*args)
            if name not in connections:
                with real(*args) as first:  # the storage creates and migrates the database as it would
                    url = first.engine.url
                engine = create_engine(url, poolclass=NullPool)
                connection = stack.enter_context(engine.connect())
                stack.enter_context(connection.begin())
                connections[name] = connection
            yield connections[name]

        setattr(storage, attribute, shared)
        try:
            yield
        finally:
            delattr(storage, attribute)  # the class's own method again


def seed_runs(instance: DagsterInstance, briefs: Sequence[Brief], task_ids: dict[str, str]) -> list[str]:
    """A succeeded submit run per brief, with discovery's tags, and a store batch per STORE_BATCH_SIZE briefs;
    the batch run ids, one per brief, in order."""
    batch_of: list[str] = []
    with one_transaction(instance.run_storage, "connect", lambda: "runs"):
        for brief in briefs:
            tags = {PARTITION_TAG: brief.id, VERSION_TAG: brief_version(brief), BATCH_TAG: "discovery-seed"}
            instance.add_run(
                DagsterRun(job_name=SUBMIT_JOB, run_id=str(uuid.uuid4()), tags=tags, status=DagsterRunStatus.SUCCESS)
            )
        for start in range(0, len(briefs), STORE_BATCH_SIZE):
            batch = briefs[start : start + STORE_BATCH_SIZE]
            run = DagsterRun(
                job_name=STORE_VIDEOS_JOB,
                run_id=str(uuid.uuid4()),
                run_config=store_videos_run_config([task_ids[b.id] for b in batch]),
                tags={MAX_RETRIES_TAG: "0", BATCH_TAG: "sensor-seed"},
                status=DagsterRunStatus.SUCCESS,
            )
            instance.add_run(run)
            batch_of += [run.run_id] * len(batch)
    return batch_of


def _entry(run_id: str, event_type: DagsterEventType, data: Any, timestamp: float) -> EventLogEntry:
    return EventLogEntry(
        error_info=None,
        level=20,
        user_message="",
        run_id=run_id,
        timestamp=timestamp,
        dagster_event=DagsterEvent(event_type.value, job_name=STORE_VIDEOS_JOB, event_specific_data=data),
    )


def seed_events(instance: DagsterInstance, briefs: Sequence[Brief], batch_of: list[str], template: Template) -> int:
    """Per partition, in its batch's run: the stored_video materialization (the template's metadata, pictures
    included) and seven check evaluations, each planned and then evaluated (one partition in 33 fails one)."""
    events = []
    now = time.time()
    for index, (brief, run_id) in enumerate(zip(briefs, batch_of, strict=True)):
        moment = now - (len(briefs) - index)
        materialization = AssetMaterialization(STORED_VIDEO, partition=brief.id, metadata=template.materialization)
        events.append(
            _entry(run_id, DagsterEventType.ASSET_MATERIALIZATION, StepMaterializationData(materialization), moment)
        )
        for number, check in enumerate(template.checks):
            planned = AssetCheckEvaluationPlanned(
                asset_key=STORED_VIDEO,
                check_name=check.check_name,
                partitions_subset=DefaultPartitionsSubset({brief.id}),
            )
            failed = index % CHECK_FAILURE_SHARE == 0 and number == len(template.checks) - 1
            evaluation = AssetCheckEvaluation(
                asset_key=STORED_VIDEO,
                check_name=check.check_name,
                passed=check.passed and not failed,
                metadata=check.metadata,
                severity=check.severity,
                partition=brief.id,
            )
            events.append(_entry(run_id, DagsterEventType.ASSET_CHECK_EVALUATION_PLANNED, planned, moment))
            events.append(_entry(run_id, DagsterEventType.ASSET_CHECK_EVALUATION, evaluation, moment))
    storage = instance.event_log_storage
    with one_transaction(storage, "_connect", lambda shard: shard):
        storage.store_event_batch(events)
    return len(events)


def seed_ledger(ledger_url: str, briefs: Sequence[Brief], task_ids: dict[str, str]) -> None:
    """A stored task per brief, submitted over the last HISTORY_DAYS (one statement: setup, not measured)."""
    Ledger(ledger_url).close()  # creates the schema
    now = datetime.now(UTC)
    spread = random.Random(11)
    rows = []
    for brief in briefs:
        sent = now - timedelta(days=spread.uniform(1, HISTORY_DAYS))
        task_id = task_ids[brief.id]
        rows.append(
            {
                "idempotency_key": brief.request.idempotency_key(),
                "brief_id": brief.id,
                "run_id": "discovery-seed",
                "model": brief.request.model,
                "price_credits": brief.request.price_credits,
                "body": json.dumps({"model": brief.request.model, "prompt": brief.request.prompt}),
                "task_id": task_id,
                "status": "succeeded",
                "reserved_credits": brief.request.price_credits,
                "final_credits": brief.request.price_credits,
                "submitted_at": sent,
                "updated_at": sent + timedelta(minutes=3),
                "stored_uri": f"s3://rivya-bench/videos/{brief.id}/{task_id}.mp4",
                "stored_sha256": "0" * 64,
                "stored_at": sent + timedelta(minutes=4),
                "store_queued_at": sent + timedelta(minutes=3),
            }
        )
    insert_ledger_rows(ledger_url, rows)


def seed(instance: DagsterInstance, ledger_url: str, folder: Path, count: int, template: Template) -> dict[str, int]:
    """`count` briefs in `folder` and their history in `instance` and the ledger; the counts read back."""
    references = write_reference_images(folder)
    write_briefs(folder, brief_ids(count), references)
    briefs, errors = scan_briefs(folder)
    if errors or len(briefs) != count:
        raise RuntimeError(f"seeded {count} briefs, read {len(briefs)}: {errors[:3]}")
    task_ids = {brief.id: f"task-{uuid.uuid4().hex}" for brief in briefs}
    instance.add_dynamic_partitions("briefs", [brief.id for brief in briefs])
    batch_of = seed_runs(instance, briefs, task_ids)
    events = seed_events(instance, briefs, batch_of, template)
    seed_ledger(ledger_url, briefs, task_ids)
    return {"briefs": len(briefs), "events": events}
