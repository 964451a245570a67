"""What several test modules read the same way: the price of a task, what a run recorded, what S3 holds."""

from __future__ import annotations

import socket
import time
from datetime import UTC, datetime, timedelta
from typing import Any

from dagster import (
    AssetKey,
    AssetRecordsFilter,
    DagsterInstance,
    EventLogRecord,
    ExecuteInProcessResult,
    JobExecutionResult,
)

from rivya_pipeline.emulator import RivyaEmulator
from rivya_pipeline.ledger import CreditLimits, Ledger

KLING_PRICE = 90  # credits of one kling-3-0 task, as Rivya prices it: the figure every charge is checked against
TASK_BODY = {"model": "kling-3-0", "prompt": "A kite over a beach.", "params": {"duration": "5"}}  # a valid create


def metadata_values(entry: Any) -> dict[str, Any]:
    """The plain values of an event's metadata (a materialization, an observation)."""
    return {key: value.value for key, value in entry.metadata.items()}


def materialization(result: ExecuteInProcessResult | JobExecutionResult, asset: str) -> dict[str, Any]:
    """The metadata of the one materialization of `asset` in a run."""
    (event,) = result.asset_materializations_for_node(asset)
    return metadata_values(event)


def latest_stored_video(instance: DagsterInstance, brief_id: str) -> EventLogRecord:
    """The record of the brief's partition's latest stored_video materialization."""
    (record,) = instance.fetch_materializations(
        AssetRecordsFilter(asset_key=AssetKey("stored_video"), asset_partitions=[brief_id]), limit=1
    ).records
    return record


def track_due_task(ledger: Ledger, task_id: str, key: str) -> None:
    """Track `task_id` in the ledger as an accepted create under `key`, its first poll due now."""
    now = datetime.now(UTC)
    ledger.begin_submit(
        idempotency_key=key,
        brief_id="brief",
        run_id="run",
        model="kling-3-0",
        price_credits=KLING_PRICE,
        body=TASK_BODY,
        limits=CreditLimits(),
        wallet_credits=None,
    )
    ledger.record_task(
        key,
        task_id=task_id,
        status="queued",
        reserved_credits=KLING_PRICE,
        final_credits=0,
        deadline_at=now + timedelta(hours=1),
        next_poll_at=now - timedelta(seconds=1),
    )


def s3_keys(s3_bucket: tuple[Any, str], prefix: str = "") -> list[str]:
    """Every key under `prefix`, read from the S3 server page by page."""
    client, bucket = s3_bucket
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return [item["Key"] for page in pages for item in page.get("Contents", [])]


def s3_bytes(s3_bucket: tuple[Any, str], key: str) -> bytes:
    client, bucket = s3_bucket
    return client.get_object(Bucket=bucket, Key=key)["Body"].read()


def free_ports(count: int) -> list[int]:
    """`count` distinct TCP ports free on 127.0.0.1 right now, for a server started in another process."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def wait_until_outages_end(emulator: RivyaEmulator, give_up_seconds: float = 30.0) -> None:
    """Until no `for_seconds` outage of the emulator is open (bounded: a test never hangs on it)."""
    give_up = time.monotonic() + give_up_seconds
    while any(window["state"] == "open" for window in emulator.stats()["fault_windows"]):
        assert time.monotonic() < give_up, emulator.stats()["fault_windows"]
        time.sleep(0.05)
