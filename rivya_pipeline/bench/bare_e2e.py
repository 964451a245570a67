"""`python -m rivya_pipeline.bench.bare_e2e`: the e2e baseline, a bare httpx + boto3 script.

It makes the calls the pipeline makes for each brief (upload the references, create the task, poll it
until it ends, download the video, put it in S3) and nothing else: no Dagster, no ledger, no checks. The
job (API, key, bucket and the briefs' ready-made request bodies) arrives as JSON on stdin.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import boto3
import httpx

POLL_SECONDS = 0.5


def main(job: dict[str, Any]) -> None:
    api = httpx.Client(
        base_url=job["api_url"] + "/api/v1", headers={"Authorization": f"Bearer {job['api_key']}"}, timeout=60
    )
    media = httpx.Client(timeout=60)
    s3 = boto3.client("s3", endpoint_url=job["s3_url"], region_name="us-east-1")
    task_ids = {}
    for brief in job["briefs"]:
        items = []
        for ref in brief["references"]:
            with Path(ref["path"]).open("rb") as image:
                files = {"file": (ref["name"], image, ref["mime_type"])}
                uploaded = api.post("/files", data={"kind": "image"}, files=files).raise_for_status().json()
            items.append({"url": uploaded["url"], "kind": "image", "name": ref["name"], "mimeType": ref["mime_type"]})
        params = brief["params"] | ({"referenceMediaItems": items} if items else {})
        body = {"model": brief["model"], "prompt": brief["prompt"], "params": params}
        created = api.post("/generations", json=body, headers={"Idempotency-Key": brief["key"]}).raise_for_status()
        task_ids[brief["id"]] = created.json()["id"]
    for brief_id, task_id in task_ids.items():
        while (task := api.get(f"/generations/{task_id}").raise_for_status().json())["status"] not in (
            "succeeded",
            "failed",
        ):
            time.sleep(POLL_SECONDS)
        video = media.get(task["result"]["primary_url"]).raise_for_status().content
        s3.put_object(Bucket=job["bucket"], Key=f"bare/{brief_id}/{task_id}.mp4", Body=video)
    print(json.dumps({"stored": len(task_ids)}))


if __name__ == "__main__":
    main(json.loads(sys.stdin.read()))
