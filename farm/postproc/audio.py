"""A render's generated sound as the MP4's AAC track, in sync with its video.

The families that make sound (`FamilyFacts.audio`) return a waveform as long as the
clip they rendered; post-processing never moves a frame in time (interpolation adds
frames between the rendered ones, at the same instants), so the sound stays in sync
as long as it starts with the first frame and is cut to the delivered video's length.
`mux_audio` adds it to the finished MP4 without re-encoding the video.
"""

from __future__ import annotations

import fractions
import io

import numpy as np

AUDIO_CODEC = "aac"
AUDIO_BITRATE = 128_000
# Channel layouts PyAV names by count.
_LAYOUTS = {1: "mono", 2: "stereo"}


def fit_to_duration(audio: np.ndarray, sample_rate: int, duration_s: float | fractions.Fraction) -> np.ndarray:
    """The waveform (channels, samples) cut or padded with silence to exactly the
    samples of duration_s (rounded), so the track ends with the video."""
    wanted = round(fractions.Fraction(duration_s) * sample_rate)
    have = audio.shape[1]
    if have >= wanted:
        return audio[:, :wanted]
    return np.concatenate([audio, np.zeros((audio.shape[0], wanted - have), dtype=audio.dtype)], axis=1)


def mux_audio(video: bytes, audio: np.ndarray, sample_rate: int, frames: int,
              fps: int | float | fractions.Fraction) -> bytes:
    """The MP4 `video` (its video stream copied as it is) with `audio` (float (channels,
    samples) in [-1, 1], starting at the first frame) as an AAC track as long as the video:
    frames / fps seconds."""
    import av

    from farm.postproc.encode import frame_rate

    if audio.ndim != 2 or audio.shape[0] not in _LAYOUTS:
        raise ValueError(f"audio must be (channels, samples) with 1 or 2 channels, got shape {audio.shape}")
    if sample_rate <= 0:
        raise ValueError(f"audio sample rate must be positive, got {sample_rate}")
    duration = fractions.Fraction(frames) / frame_rate(fps)
    samples = np.ascontiguousarray(np.clip(fit_to_duration(audio, sample_rate, duration), -1.0, 1.0),
                                   dtype=np.float32)
    output = io.BytesIO()
    with av.open(io.BytesIO(video)) as source, av.open(output, mode="w", format="mp4") as target:
        video_in = source.streams.video[0]
        video_out = target.add_stream_from_template(video_in)
        audio_out = target.add_stream(AUDIO_CODEC, rate=sample_rate, layout=_LAYOUTS[samples.shape[0]])
        audio_out.bit_rate = AUDIO_BITRATE
        for packet in source.demux(video_in):
            if packet.size == 0:
                continue
            packet.stream = video_out
            target.mux(packet)
        frame_size = audio_out.codec_context.frame_size or 1024
        for start in range(0, samples.shape[1], frame_size):
            frame = av.AudioFrame.from_ndarray(samples[:, start:start + frame_size], format="fltp",
                                               layout=_LAYOUTS[samples.shape[0]])
            frame.sample_rate = sample_rate
            frame.pts = start
            frame.time_base = fractions.Fraction(1, sample_rate)
            for packet in audio_out.encode(frame):
                target.mux(packet)
        for packet in audio_out.encode():
            target.mux(packet)
    return output.getvalue()


def probe_audio(data: bytes) -> dict | None:
    """The MP4's audio track as a player sees it (None when it has none): codec, sample
    rate, channels, the track's duration (the container's, which leaves out the encoder's
    padding of the last AAC frame), and the decoded samples."""
    import av

    with av.open(io.BytesIO(data)) as container:
        if not container.streams.audio:
            return None
        stream = container.streams.audio[0]
        chunks = [frame.to_ndarray() for frame in container.decode(stream)]
        samples = np.concatenate(chunks, axis=1) if chunks else np.zeros((stream.channels, 0), np.float32)
        return {
            "codec": stream.codec_context.name,
            "sample_rate": stream.codec_context.sample_rate,
            "channels": stream.codec_context.channels,
            "duration_s": float(stream.duration * stream.time_base) if stream.duration else None,
            "samples": samples,
        }
