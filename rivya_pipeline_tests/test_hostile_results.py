"""Hostile result URLs through the real `stored_video` path (the one `rivya-pipeline run` takes).

A succeeded task's result URL is data from the API, not ours: an http URL, a private or loopback host, a
redirect to a refused target and a body over the size cap are each refused, reported with the rule that
stopped them, given up at once (no retry can change them: they leave the store queue), and leave nothing in S3
(no object at the key, no open multipart upload).

A redirect from a public https host to a private address cannot be staged on 127.0.0.1 (the first hop
would have to be public https); the redirect case here uses local media mode, where every hop still has
to pass the scheme check, and `test_media.py` covers the per-hop checks of the fetcher itself.
"""

from __future__ import annotations

import pytest

from rivya_pipeline.briefs import load_briefs
from rivya_pipeline.headless import HeadlessRun
from rivya_pipeline_tests.fixtures_pipeline import FAST_LIFECYCLE

BRIEF = "sunrise-timelapse"  # text-only: nothing to upload, so the only media fetched is the result
CASES = {
    "not https": ({"allow_local_media": False}, {}, "scheme 'http' is not allowed"),
    "private address": (
        {"allow_local_media": False},
        {"result_url_base": "https://10.20.30.40"},
        "host resolves to non-public address 10.20.30.40",
    ),
    "loopback by name": (
        {"allow_local_media": False},
        {"result_url_base": "https://localhost:9"},
        "host resolves to non-public address",
    ),
    "redirect to a refused target": (
        {"allow_local_media": True},
        {"media_redirect_to": "file:///etc/passwd"},
        "scheme 'file' is not allowed (file:///etc/passwd)",
    ),
    "more bytes than the cap": (
        {"allow_local_media": True, "max_media_mb": 1},
        {"result_min_bytes": 3_000_000},
        "declared size 3000000 exceeds the 1000000-byte cap",
    ),
}
MEDIA_REQUESTS = {"not https": 0, "private address": 0, "loopback by name": 0}


@pytest.mark.parametrize("case", list(CASES))
def test_hostile_result_is_refused_reported_and_nothing_is_stored(case, make_pipeline, configure_emulator, s3_bucket):
    settings_overrides, emulator_overrides, message = CASES[case]
    pipeline = make_pipeline(**settings_overrides)
    emulator = configure_emulator(**FAST_LIFECYCLE, **emulator_overrides)
    (brief,) = [b for b in load_briefs(pipeline.requests_path) if b.id == BRIEF]

    (outcome,) = HeadlessRun(settings=pipeline.settings, instance=pipeline.instance).run([brief], timeout_seconds=60)

    assert outcome.status == "store_gave_up"
    assert message in outcome.error
    assert outcome.s3_uri is None
    record = pipeline.ledger.find_by_task(outcome.task_id)
    assert (record.stored_uri, record.store_due_at, record.store_attempts) == (None, None, 1)
    client, bucket = s3_bucket
    assert client.list_objects_v2(Bucket=bucket).get("KeyCount") == 0
    assert client.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []
    stats = emulator.stats()
    assert stats["creates_performed"] == 1
    if case in MEDIA_REQUESTS:  # refused before any connection to the media host
        assert stats["media_requests"] == 0
