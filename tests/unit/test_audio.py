"""A render's sound in its MP4: an AAC track as long as the video, the video untouched."""

from __future__ import annotations

import numpy as np
import pytest

from farm.postproc.audio import fit_to_duration, mux_audio, probe_audio
from farm.postproc.encode import encode_mp4, probe_mp4

SAMPLE_RATE = 24_000


def tone(seconds: float, channels: int = 1, hertz: float = 440.0) -> np.ndarray:
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    return np.stack([0.5 * np.sin(2 * np.pi * hertz * (c + 1) * t) for c in range(channels)]).astype(np.float32)


def clip(frames: int) -> np.ndarray:
    return np.random.default_rng(frames).integers(0, 256, (frames, 64, 64, 3), dtype=np.uint8)


@pytest.mark.parametrize("channels", [1, 2])
@pytest.mark.parametrize("audio_seconds", [0.6, 1.0, 1.3])  # shorter, as long as, longer than the video
def test_the_track_lasts_as_long_as_the_video_within_one_frame(channels, audio_seconds):
    frames, fps = 25, 24
    video = encode_mp4(clip(frames), fps)
    muxed = mux_audio(video, tone(audio_seconds, channels), SAMPLE_RATE, frames, fps)

    shown, heard = probe_mp4(muxed), probe_audio(muxed)
    assert heard["codec"] == "aac" and heard["sample_rate"] == SAMPLE_RATE and heard["channels"] == channels
    assert abs(heard["duration_s"] - shown["duration_s"]) <= 1 / fps
    # The video stream is copied, not re-encoded.
    assert shown["frames"] == frames
    assert np.array_equal(shown["pixels"], probe_mp4(video)["pixels"])


def test_the_sound_is_the_waveform_given_and_silence_after_it_ends():
    frames, fps = 49, 24
    video = encode_mp4(clip(frames), fps)
    heard = probe_audio(mux_audio(video, tone(1.0), SAMPLE_RATE, frames, fps))["samples"][0]
    # AAC is lossy and delays by its priming samples: compare loudness, not samples.
    loud, quiet = heard[4_000:20_000], heard[int(1.1 * SAMPLE_RATE):int(1.9 * SAMPLE_RATE)]
    assert 0.25 < np.sqrt(np.mean(loud ** 2)) < 0.45  # a 0.5-amplitude sine: rms 0.354
    assert np.sqrt(np.mean(quiet ** 2)) < 0.01


def test_interpolated_video_keeps_the_rendered_sound_in_sync():
    """Interpolation puts frames between the rendered ones at the same instants: the
    sound fits the longer clip at the higher rate."""
    frames, fps, factor = 17, 8, 3
    out_frames = (frames - 1) * factor + 1
    video = encode_mp4(clip(out_frames), fps * factor)
    muxed = mux_audio(video, tone(frames / fps), SAMPLE_RATE, out_frames, fps * factor)
    assert abs(probe_audio(muxed)["duration_s"] - out_frames / (fps * factor)) <= 1 / (fps * factor)


def test_fit_to_duration_cuts_and_pads_to_the_exact_sample_count():
    audio = np.ones((2, 1000), np.float32)
    assert fit_to_duration(audio, 1000, 0.5).shape == (2, 500)
    padded = fit_to_duration(audio, 1000, 1.5)
    assert padded.shape == (2, 1500) and padded[:, 1000:].max() == 0 and padded[:, :1000].min() == 1


def test_bad_audio_is_refused_with_its_shape():
    video = encode_mp4(clip(9), 24)
    with pytest.raises(ValueError, match="channels"):
        mux_audio(video, np.zeros((3, 100), np.float32), SAMPLE_RATE, 9, 24)
    with pytest.raises(ValueError, match="sample rate"):
        mux_audio(video, np.zeros((1, 100), np.float32), 0, 9, 24)


def test_a_silent_mp4_has_no_track():
    assert probe_audio(encode_mp4(clip(9), 24)) is None
