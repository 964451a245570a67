"""QC end to end through `stored_video` on a real Dagster instance: the emulator's bad clips (a prompt marker or a
fault rule) fail their check and a good clip passes it, with the check's severity, measured values and thresholds
recorded; a failed check never costs the stored video; the partition page carries the pictures, inline and small."""

from __future__ import annotations

import base64
import io

import pytest
from dagster import AssetCheckSeverity, AssetKey, AssetRecordsFilter
from dagster._serdes import serialize_value
from PIL import Image

from rivya_pipeline.definitions import ASSETS, build_resources
from rivya_pipeline.defs import video_qc
from rivya_pipeline.defs.assets import stored_video
from rivya_pipeline.emulator import FaultRule
from rivya_pipeline.emulator.config import VideoFault, video_fault_marker
from rivya_pipeline.headless import failure_text
from rivya_pipeline.qc.checks import AUDIO_MATCHES, NOT_BLACK, NOT_FROZEN
from rivya_pipeline.qc.pictures import INLINE_MAX_BYTES
from rivya_pipeline.qc.thresholds import QcThresholds
from rivya_pipeline.settings import Settings, SettingsError
from rivya_pipeline_tests.fixtures_pipeline import stored_videos
from rivya_pipeline_tests.helpers import materialization, s3_bytes, s3_keys

SEVERITY = {
    AUDIO_MATCHES: AssetCheckSeverity.ERROR,
    NOT_BLACK: AssetCheckSeverity.ERROR,
    NOT_FROZEN: AssetCheckSeverity.WARN,
}
THRESHOLDS = {
    AUDIO_MATCHES: {"silence_max_dbfs"},
    NOT_BLACK: {"black_max_seconds", "black_max_fraction", "black_pixel_luma", "black_picture_share"},
    NOT_FROZEN: {"freeze_max_seconds", "freeze_noise_db"},
}
MEASURED = {
    AUDIO_MATCHES: {"sound_wanted", "audio_present"},
    NOT_BLACK: {"longest_black_seconds", "black_fraction"},
    NOT_FROZEN: {"longest_frozen_seconds"},
}
# The event of one stored video's materialization holds two inline thumbnails of at most INLINE_MAX_BYTES each
# (base64: 4 bytes for 3) and a few hundred bytes of text.
MATERIALIZATION_EVENT_MAX_BYTES = 2 * INLINE_MAX_BYTES * 4 // 3 + 8_000


def store_brief(pipeline, brief_id: str, prompt: str, *, sound: bool = True, aspect_ratio: str = "16:9"):
    """One run of all four assets for a new short std-mode brief, as the UI's "Materialize all" launches it."""
    pipeline.write_brief(
        f"{brief_id}.yaml",
        f'id: {brief_id}\nprompt: "{prompt}"\n'
        f'params: {{duration: 3, mode: std, sound: {str(sound).lower()}, aspect_ratio: "{aspect_ratio}"}}\n',
    )
    pipeline.add_partitions([brief_id])
    return pipeline.materialize(ASSETS, brief_id, raise_on_error=False)


def evaluations(result) -> dict:
    return {evaluation.check_name: evaluation for evaluation in result.get_asset_check_evaluations()}


def values(evaluation) -> dict:
    return {label: value.value for label, value in evaluation.metadata.items()}


def assert_recorded_with_thresholds(evaluation, thresholds: QcThresholds) -> None:
    recorded = values(evaluation)
    assert evaluation.severity == SEVERITY[evaluation.check_name]
    assert evaluation.blocking is False
    assert recorded["measured"]
    assert MEASURED[evaluation.check_name] <= recorded.keys()
    assert {label: value for label, value in recorded.items() if label.startswith("threshold.")} == {
        f"threshold.{name}": getattr(thresholds, name) for name in THRESHOLDS[evaluation.check_name]
    }


def assert_stored(pipeline, s3_bucket, result, brief_id: str) -> None:
    """The video is in S3, materialized on its partition and marked stored in the ledger, whatever QC found."""
    stored = materialization(result, "stored_video")
    key = stored["s3_uri"].removeprefix(f"s3://{s3_bucket[1]}/")
    assert s3_bytes(s3_bucket, key)[4:8] == b"ftyp"
    assert len(s3_keys(s3_bucket, f"{pipeline.settings.s3_prefix}/{brief_id}/")) == 4  # video, sidecar, 2 pictures
    records = pipeline.instance.fetch_materializations(
        AssetRecordsFilter(asset_key=AssetKey("stored_video"), asset_partitions=[brief_id]), limit=1
    ).records
    assert [record.asset_materialization.metadata["s3_uri"].value for record in records] == [stored["s3_uri"]]
    assert pipeline.ledger.latest_for_brief(brief_id).stored_uri == stored["s3_uri"]


@pytest.mark.parametrize(
    ("fault", "failing"),
    [
        pytest.param(None, set(), id="good-clip-passes-all"),
        pytest.param("silent", {AUDIO_MATCHES}, id="silent"),
        pytest.param("black", {NOT_BLACK, NOT_FROZEN}, id="black"),  # a black picture also holds still
        pytest.param("frozen", {NOT_FROZEN}, id="frozen"),
    ],
)
def test_each_qc_check_fails_on_its_bad_clip_and_the_video_stays_stored(
    pipeline, emulator, s3_bucket, fault: VideoFault | None, failing
):
    brief_id = f"qc-{fault or 'good'}"
    marker = video_fault_marker(fault) if fault else ""
    result = store_brief(pipeline, brief_id, f"Surf rolling onto a beach at dawn. {marker}")

    assert result.success, failure_text(result)  # QC checks do not block: the store step succeeded
    checks = evaluations(result)
    assert {name for name, evaluation in checks.items() if not evaluation.passed} == failing
    for name in (AUDIO_MATCHES, NOT_BLACK, NOT_FROZEN):
        assert_recorded_with_thresholds(checks[name], QcThresholds())
    assert_stored(pipeline, s3_bucket, result, brief_id)


def test_the_qc_listing_names_each_briefs_latest_failures_only_whatever_the_history_holds(
    pipeline, emulator, monkeypatch
):
    """`run` and `report` list the failed checks of each brief's latest video: a failure that a later video of the
    brief passed is not listed, and the failed executions are read a page at a time (a page of one here)."""
    monkeypatch.setattr(video_qc, "HISTORY_PAGE", 1)
    store_brief(pipeline, "qc-frozen", f"Surf at dawn. {video_fault_marker('frozen')}")
    # Its not_frozen failure is newer than qc-frozen's: finding qc-frozen's takes a second page.
    store_brief(pipeline, "qc-mended", f"Surf at dawn. {video_fault_marker('black')}")
    store_brief(pipeline, "qc-silent", f"Surf at dawn. {video_fault_marker('silent')}")
    store_brief(pipeline, "qc-mended", "Surf at dawn, the clip good this time.")  # a new video of the brief

    listed = video_qc.qc_failures(pipeline.instance, ["qc-mended", "qc-frozen", "qc-silent"])
    everyone = video_qc.qc_failures(pipeline.instance)
    one = video_qc.qc_failures(pipeline.instance, ["qc-silent"])

    assert [(f.brief_id, f.check, f.severity) for f in listed] == [
        ("qc-frozen", NOT_FROZEN, "WARN"),
        ("qc-silent", AUDIO_MATCHES, "ERROR"),
    ]
    assert listed[0].measured.startswith("longest frozen stretch") and listed[1].measured.startswith("silent")
    assert everyone == listed and one == listed[1:]


def test_audio_matches_fails_without_the_sound_asked_for_and_passes_without_sound_when_none_was(
    pipeline, emulator, s3_bucket
):
    emulator.set_faults([FaultRule(endpoint="create_generation", kind="bad_video", video="no_audio", times=1)])
    missing = evaluations(store_brief(pipeline, "sound-missing", "A drummer on a rooftop."))[AUDIO_MATCHES]
    quiet = evaluations(store_brief(pipeline, "no-sound-wanted", "A drummer on a rooftop.", sound=False))

    assert not missing.passed
    assert values(missing) | {"sound_wanted": True, "audio_present": False} == values(missing)
    assert values(missing)["measured"] == "no audio stream; sound was asked for"
    assert quiet[AUDIO_MATCHES].passed and values(quiet[AUDIO_MATCHES])["audio_present"] is False
    assert all(evaluation.passed for evaluation in quiet.values())


def test_thresholds_are_settings_that_reach_the_checks(make_pipeline, emulator):
    lenient = QcThresholds(freeze_max_seconds=10.0, silence_max_dbfs=-90.0)
    pipeline = make_pipeline(freeze_max_seconds=lenient.freeze_max_seconds, silence_max_dbfs=lenient.silence_max_dbfs)

    checks = evaluations(store_brief(pipeline, "long-still", f"A still harbour. {video_fault_marker('frozen')}"))

    assert checks[NOT_FROZEN].passed  # the 3 s still would fail at the default of 2 s
    for name in (AUDIO_MATCHES, NOT_BLACK, NOT_FROZEN):
        assert_recorded_with_thresholds(checks[name], lenient)


def test_the_wrong_aspect_clip_fails_the_blocking_aspect_check_and_the_video_is_still_materialized(
    pipeline, emulator, s3_bucket
):
    result = store_brief(pipeline, "boxy", f"A lighthouse at dusk. {video_fault_marker('wrong_aspect')}")

    aspect = evaluations(result)["aspect_ratio_matches"]
    assert not aspect.passed and aspect.blocking and aspect.severity == AssetCheckSeverity.ERROR
    assert values(aspect) == {"wanted": "16:9", "actual": "640x480"}
    # Dagster fails the step of a blocking check that failed, after it recorded the materialization.
    assert not result.success and "blocking asset check failed" in failure_text(result)
    assert_stored(pipeline, s3_bucket, result, "boxy")


def thumbnail(markdown: str) -> Image.Image:
    uri = markdown.split("](", 1)[1].split(")", 1)[0]
    assert uri.startswith("data:image/jpeg;base64,")
    image = Image.open(io.BytesIO(base64.b64decode(uri.removeprefix("data:image/jpeg;base64,"))))
    image.load()
    return image


def test_the_partition_page_gets_inline_pictures_and_the_full_size_uris_in_a_small_event(pipeline, emulator, s3_bucket):
    result = store_brief(pipeline, "kite-beach", "A red kite over a windy beach.")

    stored = materialization(result, "stored_video")
    prefix = stored["s3_uri"].removesuffix(".mp4")
    assert (stored["poster_uri"], stored["contact_sheet_uri"]) == (f"{prefix}.poster.jpg", f"{prefix}.sheet.jpg")
    for label, uri in (("poster", stored["poster_uri"]), ("contact_sheet", stored["contact_sheet_uri"])):
        image = thumbnail(stored[label])
        full = Image.open(io.BytesIO(s3_bytes(s3_bucket, uri.removeprefix(f"s3://{s3_bucket[1]}/"))))
        assert image.format == full.format == "JPEG"
        assert 0 < image.width < full.width
        assert image.width / image.height == pytest.approx(full.width / full.height, rel=0.02)
        assert uri in stored[label]  # the dialog names the full-size picture too

    (event,) = [
        entry
        for entry in pipeline.instance.all_logs(result.run_id)
        if entry.dagster_event
        and entry.dagster_event.is_step_materialization
        and entry.dagster_event.asset_key == AssetKey("stored_video")
    ]
    assert len(serialize_value(event)) <= MATERIALIZATION_EVENT_MAX_BYTES


INLINE_PICTURE = "data:image/jpeg;base64,"
STORE_PATH_BRIEFS = ["product-spin", "sunrise-timelapse", "city-morph"]


@pytest.mark.parametrize("store_path", ["store_videos batch", "stored_video run"])
def test_each_picture_is_written_to_the_event_log_once_on_every_store_path(pipeline, store_path: str):
    """The sensor's batches and a run of the asset (the UI, a lone retry) write the two inline pictures of each
    video into its materialization only: an asset's MaterializeResult metadata would be copied into the step's
    output event too, doubling the biggest part of what the event log keeps per video."""
    for brief_id in STORE_PATH_BRIEFS:
        pipeline.submit(brief_id)
    requests = pipeline.store_requests(
        pipeline.tick_until(lambda ticks: len(pipeline.store_requests(ticks)) == len(STORE_PATH_BRIEFS))
    )
    if store_path == "store_videos batch":
        (batch,) = {id(request): request for request in requests.values()}.values()
        result, stored = pipeline.launch(batch), STORE_PATH_BRIEFS
    else:
        result, stored = pipeline.materialize([stored_video], STORE_PATH_BRIEFS[0]), STORE_PATH_BRIEFS[:1]

    events = [serialize_value(entry) for entry in pipeline.instance.all_logs(result.run_id)]
    assert sum(event.count(INLINE_PICTURE) for event in events) == 2 * len(stored)  # a poster and a sheet each
    assert sorted(stored_videos(result)) == sorted(stored)
    assert all(INLINE_PICTURE in metadata["poster"] for metadata in stored_videos(result).values())


def test_each_threshold_is_read_from_its_variable_and_a_value_that_cannot_work_names_it():
    settings = Settings.from_env({"RIVYA_QC_BLACK_MAX_SECONDS": "3.5", "RIVYA_QC_SILENCE_MAX_DBFS": "-70"})
    thresholds = build_resources(settings)["video_qc"].thresholds()

    assert thresholds == QcThresholds(black_max_seconds=3.5, silence_max_dbfs=-70.0)
    for variable, value, rule in [
        ("RIVYA_QC_BLACK_PICTURE_SHARE", "1.5", "less than or equal to 1"),
        ("RIVYA_QC_FREEZE_MAX_SECONDS", "0", "greater than 0"),
        ("RIVYA_QC_FREEZE_NOISE_DB", "quiet", "must be a number"),
    ]:
        with pytest.raises(SettingsError, match=rf"^{variable}: .*{rule}"):
            Settings.from_env({variable: value})
