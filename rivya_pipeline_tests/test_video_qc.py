"""Video QC on clips the emulator makes: each check fails on its bad clip and passes on a good one, the pictures
are real JPEGs of the planned sizes, and one pass reads the file once and looks closely at a sample of frames."""

from __future__ import annotations

import io
from pathlib import Path

import av
import httpx
import numpy as np
import pydantic
import pytest
from PIL import Image, ImageStat

from rivya_pipeline.emulator.config import FaultRule, VideoFault, video_fault_marker
from rivya_pipeline.emulator.video import FRAME_SIZES, encode_mp4, write_clip
from rivya_pipeline.probe import ProbeError, VideoInspection, inspect_video
from rivya_pipeline.qc.checks import (
    AUDIO_MATCHES,
    NOT_BLACK,
    NOT_FROZEN,
    QC_CHECKS,
    audio_matches,
    not_black,
    not_frozen,
    qc_verdicts,
)
from rivya_pipeline.qc.measures import SAMPLES_PER_SECOND, SILENCE_FLOOR_DBFS, LumaMeter
from rivya_pipeline.qc.pictures import INLINE_MAX_BYTES, SHEET_FRAMES, SHEET_GAP, timestamp
from rivya_pipeline.qc.thresholds import QcThresholds
from rivya_pipeline.rivya import RivyaClient
from rivya_pipeline_tests.fixtures_emulator import TEST_API_KEY

SECONDS = 5
FPS = 8  # the emulator's default frame rate
DEFAULTS = QcThresholds()


def inspected(
    tmp_path: Path, *, fault: VideoFault | None = None, sound: bool = True, aspect: str = "16:9", mode: str = "std"
) -> VideoInspection:
    path = tmp_path / f"{fault or 'good'}-{sound}-{aspect.replace(':', 'x')}-{mode}.mp4"
    path.write_bytes(encode_mp4(SECONDS, aspect, FPS, mode=mode, sound=sound, fault=fault))
    return inspect_video(path)


# --- audio_matches ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sound", "fault", "sound_wanted", "passes", "measured"),
    [
        pytest.param(True, None, True, True, "audio RMS -15", id="tone-asked-for"),
        pytest.param(False, None, False, True, "no audio stream", id="no-audio-none-asked-for"),
        pytest.param(True, "no_audio", True, False, "no audio stream; sound was asked for", id="missing-audio"),
        pytest.param(True, "silent", True, False, "silent: at or below -60 dBFS", id="silent-audio"),
        pytest.param(True, None, False, False, "an audio stream; no sound was asked for", id="audio-not-asked-for"),
    ],
)
def test_audio_matches_wants_a_stream_exactly_when_sound_was_asked_for_and_then_not_silence(
    tmp_path, sound, fault, sound_wanted, passes, measured
):
    qc = inspected(tmp_path, fault=fault, sound=sound).qc
    verdict = audio_matches(qc, sound_wanted=sound_wanted, thresholds=DEFAULTS)
    assert verdict.check == AUDIO_MATCHES and verdict.passed is passes
    assert verdict.measured.startswith(measured)
    assert verdict.metadata["threshold.silence_max_dbfs"] == -60.0
    assert verdict.metadata["sound_wanted"] is sound_wanted


def test_audio_levels_are_measured_over_the_whole_track(tmp_path):
    tone = inspected(tmp_path).qc
    silent = inspected(tmp_path, fault="silent").qc
    assert tone.audio_present and tone.audio_rms_dbfs == pytest.approx(-15, abs=1.5)  # a 0.25 sine: -15 dBFS
    assert tone.audio_rms_dbfs < tone.audio_peak_dbfs < 0  # the decoder's overshoot keeps the peak under full scale
    assert tone.audio_seconds == pytest.approx(SECONDS, abs=0.1)
    assert silent.audio_present and silent.audio_rms_dbfs == silent.audio_peak_dbfs == SILENCE_FLOOR_DBFS
    assert silent.audio_seconds == pytest.approx(SECONDS, abs=0.1)


# --- not_black and not_frozen --------------------------------------------------------------------------------


def test_not_black_fails_on_a_black_clip_and_passes_on_a_moving_one(tmp_path):
    black = not_black(inspected(tmp_path, fault="black").qc, DEFAULTS)
    good = not_black(inspected(tmp_path).qc, DEFAULTS)
    assert not black.passed and good.passed
    assert black.metadata["longest_black_seconds"] == pytest.approx(SECONDS, abs=0.01)
    assert black.metadata["black_fraction"] == pytest.approx(1.0)
    assert good.metadata["longest_black_seconds"] == 0.0 and good.metadata["black_fraction"] == 0.0
    assert black.measured == "longest black stretch 5.0 s, 100% of the clip black"
    assert {key: black.metadata[key] for key in black.metadata if key.startswith("threshold.")} == {
        "threshold.black_max_seconds": 2.0,
        "threshold.black_max_fraction": 0.5,
        "threshold.black_pixel_luma": 0.10,
        "threshold.black_picture_share": 0.98,
    }


def test_not_frozen_fails_on_a_still_clip_and_passes_on_a_moving_one(tmp_path):
    frozen = not_frozen(inspected(tmp_path, fault="frozen").qc, DEFAULTS)
    good = not_frozen(inspected(tmp_path).qc, DEFAULTS)
    assert not frozen.passed and good.passed
    assert frozen.metadata["longest_frozen_seconds"] == SECONDS
    assert good.metadata["longest_frozen_seconds"] == 0.0
    assert frozen.metadata["threshold.freeze_max_seconds"] == 2.0
    assert frozen.metadata["threshold.freeze_noise_db"] == -60.0


def flat_frame(luma: int, pix_fmt: str = "yuv420p") -> av.VideoFrame:
    return av.VideoFrame.from_ndarray(np.full((96, 64), luma, dtype=np.uint8), format=pix_fmt)  # 64x64, U=V=luma


@pytest.mark.parametrize(
    ("frame", "black"),
    [
        pytest.param(flat_frame(30), True, id="video-range-30-is-black"),  # at or below 16 + 0.10 * 219
        pytest.param(flat_frame(40), False, id="video-range-40-is-not"),
        pytest.param(flat_frame(30, "yuvj420p"), False, id="jpeg-range-30-is-not"),  # above 0.10 * 255
        pytest.param(flat_frame(20, "yuvj420p"), True, id="jpeg-range-20-is-black"),
        pytest.param(flat_frame(30).reformat(format="yuv420p10le"), True, id="10-bit-converted"),
    ],
)
def test_black_follows_the_frames_luma_range_like_blackdetect(frame, black):
    meter = LumaMeter(DEFAULTS)
    for index in range(3 * 4):  # three seconds at four frames a second
        meter.offer(frame, index / 4, 1 / 4)
    meter.finish()
    assert meter.longest_black == (3.0 if black else 0.0)
    assert meter.longest_frozen == 3.0  # one picture throughout


def test_thresholds_are_settings_that_move_the_verdicts(tmp_path):
    qc = inspected(tmp_path, fault="frozen").qc
    lenient = QcThresholds(freeze_max_seconds=SECONDS + 1)
    assert not not_frozen(qc, DEFAULTS).passed and not_frozen(qc, lenient).passed
    assert not_frozen(qc, lenient).metadata["threshold.freeze_max_seconds"] == SECONDS + 1
    with pytest.raises(pydantic.ValidationError):
        QcThresholds(black_picture_share=1.5)


def test_every_check_passes_on_a_good_clip_and_only_its_own_fails_on_a_bad_one(tmp_path):
    def failing(fault: VideoFault | None) -> list[str]:
        verdicts = qc_verdicts(inspected(tmp_path, fault=fault).qc, sound_wanted=True, thresholds=DEFAULTS)
        assert [verdict.check for verdict in verdicts] == list(QC_CHECKS)
        return [verdict.check for verdict in verdicts if not verdict.passed]

    assert failing(None) == []
    assert failing("frozen") == [NOT_FROZEN]
    assert failing("silent") == [AUDIO_MATCHES]
    assert failing("black") == [NOT_BLACK, NOT_FROZEN]  # a black picture also holds still, as freezedetect says
    assert failing("wrong_aspect") == []


# --- aspect ratio (the probe's existing check) ------------------------------------------------------------------


@pytest.mark.parametrize("aspect", ["16:9", "9:16", "1:1"])
def test_the_wrong_aspect_clip_fails_the_aspect_check_and_a_good_one_passes(tmp_path, aspect):
    good = inspected(tmp_path, aspect=aspect, mode="pro").probe
    wrong = inspected(tmp_path, aspect=aspect, mode="pro", fault="wrong_aspect").probe
    assert good.matches_aspect(aspect) and good.resolution == "x".join(map(str, FRAME_SIZES["pro"][aspect]))
    assert not wrong.matches_aspect(aspect) and wrong.resolution == "960x720"


def test_a_file_that_is_no_video_is_a_probe_error(tmp_path):
    path = tmp_path / "noise.mp4"
    path.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(4096))
    with pytest.raises(ProbeError):
        inspect_video(path)


# --- pictures ----------------------------------------------------------------------------------------------------


def jpeg(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()  # decodes the whole file: a truncated JPEG fails here
    assert image.format == "JPEG"
    return image


@pytest.mark.parametrize(
    ("aspect", "poster_size", "tile_size"),
    [("16:9", (640, 360), (320, 180)), ("9:16", (360, 640), (180, 320)), ("1:1", (640, 640), (320, 320))],
)
def test_poster_and_sheet_are_jpegs_of_the_planned_sizes_and_moments(tmp_path, aspect, poster_size, tile_size):
    pictures = inspected(tmp_path, aspect=aspect, mode="pro").pictures
    poster, sheet = pictures.poster, pictures.sheet
    assert jpeg(poster.jpeg).size == (poster.width, poster.height) == poster_size
    columns, rows = 3, 2
    sheet_size = (columns * tile_size[0] + (columns + 1) * SHEET_GAP, rows * tile_size[1] + (rows + 1) * SHEET_GAP)
    assert jpeg(sheet.jpeg).size == (sheet.width, sheet.height) == sheet_size
    assert poster.at_seconds == (SECONDS / 2,)
    assert len(sheet.at_seconds) == SHEET_FRAMES and list(sheet.at_seconds) == sorted(sheet.at_seconds)
    assert 0 < sheet.at_seconds[0] < 1 and SECONDS - 1 < sheet.at_seconds[-1] < SECONDS


def test_inline_thumbnails_are_small_jpeg_data_uris(tmp_path):
    pictures = inspected(tmp_path, mode="pro").pictures
    for picture in (pictures.poster, pictures.sheet):
        thumbnail = jpeg(picture.thumbnail_jpeg)
        assert len(picture.thumbnail_jpeg) <= INLINE_MAX_BYTES
        assert thumbnail.width < picture.width and thumbnail.height < picture.height
        assert picture.thumbnail_data_uri().startswith("data:image/jpeg;base64,/9j/")  # base64 of FF D8 FF


def test_the_poster_shows_colour_and_the_black_clip_poster_is_black(tmp_path):
    colourful = jpeg(inspected(tmp_path).pictures.poster.jpeg).convert("HSV")
    black = jpeg(inspected(tmp_path, fault="black").pictures.poster.jpeg).convert("L")
    assert ImageStat.Stat(colourful).mean[1] > 100  # mean saturation: far from a grey picture
    assert ImageStat.Stat(black).extrema[0][1] < 20


def test_sheet_labels_read_minutes_seconds_and_tenths():
    assert [timestamp(seconds) for seconds in (0, 2.54, 61.25, 3599.99)] == ["0:00.0", "0:02.5", "1:01.2", "60:00.0"]


# --- one pass, sampled -------------------------------------------------------------------------------------------


def packets_in(path: Path) -> tuple[int, int]:
    """Demuxed packets (without the empty flush packets) and video frames, counted without decoding."""
    with av.open(str(path)) as container:
        packets = [packet for packet in container.demux() if packet.size > 0]
        video = container.streams.video[0]
        return len(packets), sum(1 for packet in packets if packet.stream is video)


def test_one_pass_reads_every_packet_once_decodes_every_frame_and_analyses_a_sample(tmp_path):
    path = tmp_path / "24fps.mp4"
    write_clip(path, (640, 360), SECONDS, 24, sound="tone")
    inspection = inspect_video(path)
    packets, video_packets = packets_in(path)
    counts = inspection.counts
    assert counts.packets == packets  # read once: a second pass would count each packet twice
    assert counts.video_frames == video_packets == inspection.probe.frames == SECONDS * 24
    assert counts.audio_frames > 0
    assert counts.sampled_frames == inspection.qc.sampled_frames == SECONDS * SAMPLES_PER_SECOND
    assert counts.sampled_frames < counts.video_frames / 5


# --- the emulator's video faults over HTTP ---------------------------------------------------------------------


def result_inspection(client: RivyaClient, tmp_path: Path, prompt: str, key: str) -> VideoInspection:
    body = {"model": "kling-3-0", "prompt": prompt, "params": {"duration": "3", "mode": "std", "sound": "true"}}
    task = client.get_generation(client.create_generation(body, idempotency_key=key).id)
    path = tmp_path / f"{key}.mp4"
    path.write_bytes(httpx.get(task.result.video_url).raise_for_status().content)
    return inspect_video(path)


def test_a_bad_video_fault_rule_spoils_the_next_task_only(configure_emulator, tmp_path):
    emulator = configure_emulator(queued_seconds=0, processing_seconds=0)
    emulator.set_faults([FaultRule(endpoint="create_generation", kind="bad_video", video="no_audio", times=1)])
    with RivyaClient(TEST_API_KEY, emulator.base_url) as client:
        spoilt = result_inspection(client, tmp_path, "Surf at dawn.", "first")
        fine = result_inspection(client, tmp_path, "Surf at dawn.", "second")
    assert not spoilt.qc.audio_present and fine.qc.audio_present
    assert fine.probe.resolution == "854x480" and round(fine.probe.duration_seconds) == 3
    assert emulator.stats()["faults_injected"] == {"create_generation:bad_video": 1}


@pytest.mark.parametrize("fault", ["black", "frozen", "silent", "wrong_aspect"])
def test_a_prompt_marker_gives_its_brief_the_faulty_video(configure_emulator, tmp_path, fault):
    emulator = configure_emulator(queued_seconds=0, processing_seconds=0)
    with RivyaClient(TEST_API_KEY, emulator.base_url) as client:
        inspection = result_inspection(client, tmp_path, f"Surf at dawn. {video_fault_marker(fault)}", fault)
    verdicts = {
        verdict.check: verdict.passed for verdict in qc_verdicts(inspection.qc, sound_wanted=True, thresholds=DEFAULTS)
    }
    expected_failures = {
        "black": {NOT_BLACK, NOT_FROZEN},
        "frozen": {NOT_FROZEN},
        "silent": {AUDIO_MATCHES},
        "wrong_aspect": set(),
    }[fault]
    assert {check for check, passed in verdicts.items() if not passed} == expected_failures
    assert inspection.probe.matches_aspect("16:9") is (fault != "wrong_aspect")


def test_bad_video_rules_apply_to_creates_only():
    with pytest.raises(pydantic.ValidationError, match="bad_video applies only to endpoint 'create_generation'"):
        FaultRule(endpoint="media", kind="bad_video")
