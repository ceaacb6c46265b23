"""Render specs: what a client asks for (`RenderSpec`), and what an engine runs
(`ResolvedSpec`: every default filled in, every field within its model's limits;
`farm.jobs.validation` makes one from the other)."""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
import re


class Task(str, enum.Enum):
    TEXT_TO_VIDEO = "text-to-video"
    IMAGE_TO_VIDEO = "image-to-video"


MAX_SEED = 2**63 - 1
MIN_PRIORITY, MAX_PRIORITY, DEFAULT_PRIORITY = 0, 100, 50
MAX_LABELS = 32
LABEL_KEY = re.compile(r"^[a-z0-9]([a-z0-9._/-]{0,61}[a-z0-9])?$")
MAX_LABEL_VALUE_CHARS = 256
MAX_IDEMPOTENCY_KEY_CHARS = 128
MAX_DEVICE_KIND_CHARS = 32
# What spec.image may hold (the contract's formats, as Pillow names them): Pillow is
# not asked to decode anything else a client might send.
IMAGE_FORMATS = ("PNG", "JPEG")
# Other formats a client may well send, named in the refusal.
OTHER_IMAGE_SIGNATURES = {b"GIF87a": "GIF", b"GIF89a": "GIF", b"BM": "BMP", b"II*\x00": "TIFF", b"MM\x00*": "TIFF"}


# LoRA adapters (see AdapterRequest in protos/farm/v1/render.proto).
MAX_ADAPTER_WEIGHT = 4.0
DEFAULT_ADAPTER_WEIGHT = 1.0


@dataclasses.dataclass(frozen=True)
class AdapterRequest:
    """A LoRA adapter a spec asks for: its name in the farm's config; weight None: 1.0."""

    name: str
    weight: float | None = None


# Post-processing (see PostprocessSpec in protos/farm/v1/render.proto).
MIN_INTERPOLATION_FACTOR = 2
MIN_UPSCALE_FACTOR = 2
MAX_CRF = 51
DEFAULT_CRF = 18
MIN_BITRATE_KBPS, MAX_BITRATE_KBPS = 100, 100_000
CODECS = ("h264",)
ENCODER_PRESETS = ("ultrafast", "superfast", "veryfast", "faster", "fast", "medium", "slow", "slower", "veryslow")
DEFAULT_PRESET = "veryfast"
MAX_REFERENCE_ID_CHARS = 32
# Bounds of Lab statistics: L is 0..100, a and b about -128..127.
LAB_MEAN_RANGES = ((0.0, 100.0), (-128.0, 128.0), (-128.0, 128.0))
MAX_LAB_STD = 128.0


@dataclasses.dataclass(frozen=True)
class ColorReference:
    """Colors to match: another render (render_id, resolved into its statistics by the
    gateway at submit so the stored spec stands alone) or Lab statistics."""

    render_id: str = ""
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    strength: float | None = None

    @classmethod
    def from_dict(cls, data: dict) -> "ColorReference":
        mean, std = data.get("mean"), data.get("std")
        return cls(render_id=data.get("render_id", ""), mean=tuple(mean) if mean is not None else None,
                   std=tuple(std) if std is not None else None, strength=data.get("strength"))


@dataclasses.dataclass(frozen=True)
class EncoderSettings:
    codec: str = ""
    crf: int | None = None
    bitrate_kbps: int | None = None
    preset: str = ""


@dataclasses.dataclass(frozen=True)
class PostprocessSpec:
    """A spec's post-processing as the client sent it; None means "not asked"."""

    interpolation_factor: int | None = None
    target_fps: int | None = None
    upscale_factor: int | None = None
    color_reference: ColorReference | None = None
    encoder: EncoderSettings = dataclasses.field(default_factory=EncoderSettings)
    candidates: int | None = None


@dataclasses.dataclass(frozen=True)
class ResolvedPostprocess:
    """Checked post-processing with every default filled in: what the engine and the
    post-processing replicas do with a render's frames."""

    interpolation_factor: int = 1
    """1: no interpolation. A target_fps was turned into target_fps / fps."""
    upscale_factor: int = 1
    """1: no upscaling."""
    color_reference: ColorReference | None = None
    """With mean, std and strength filled in (render_id kept to say where they came from)."""
    codec: str = "h264"
    crf: int | None = DEFAULT_CRF
    """None when bitrate_kbps is set."""
    bitrate_kbps: int | None = None
    preset: str = DEFAULT_PRESET
    candidates: int = 1
    target_fps: int | None = None
    """The frame rate asked for, if it was asked that way (for the record)."""

    def output_fps(self, fps: int) -> int:
        return fps * self.interpolation_factor

    def output_frames(self, num_frames: int) -> int:
        return (num_frames - 1) * self.interpolation_factor + 1

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "ResolvedPostprocess":
        data = dict(data)
        if data.get("color_reference") is not None:
            data["color_reference"] = ColorReference.from_dict(data["color_reference"])
        return cls(**data)


@dataclasses.dataclass(frozen=True)
class RenderSpec:
    """A spec as the client sent it; None means "the model's default"."""

    model: str
    task: Task | None
    prompt: str = ""
    negative_prompt: str = ""
    image: bytes = b""
    postprocess: PostprocessSpec | None = None
    width: int | None = None
    height: int | None = None
    num_frames: int | None = None
    fps: int | None = None
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    seed: int | None = None
    priority: int | None = None
    labels: dict[str, str] = dataclasses.field(default_factory=dict)
    idempotency_key: str = ""
    require_device_kind: str = ""
    prefer_device_kind: str = ""
    adapters: tuple[AdapterRequest, ...] = ()
    motion_bucket_id: int | None = None
    noise_aug_strength: float | None = None
    decode_chunk_size: int | None = None

    def fingerprint(self) -> str:
        """Identifies the request as sent, for idempotency: the same key with a
        different spec is refused rather than silently answered with another render."""
        data = dataclasses.asdict(self)
        data["image"] = hashlib.sha256(self.image).hexdigest()
        data["task"] = self.task.value if self.task else None
        # Fields added later count only when set, so that a stored key's fingerprint stays.
        for field in ("adapters", "motion_bucket_id", "noise_aug_strength", "decode_chunk_size"):
            if data[field] in ((), [], None):
                del data[field]
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


@dataclasses.dataclass(frozen=True)
class ResolvedSpec:
    """A checked spec with every default filled in. `image` travels separately in the
    store, so `to_json` never carries it."""

    model: str
    task: Task
    prompt: str
    negative_prompt: str
    width: int
    height: int
    num_frames: int
    fps: int
    num_inference_steps: int
    guidance_scale: float
    seed: int
    priority: int
    labels: dict[str, str]
    idempotency_key: str
    postprocess: ResolvedPostprocess | None = None
    """None: nothing asked (the clip is encoded with the default settings)."""
    image: bytes = b""
    require_device_kind: str = ""
    """Empty: any pool of the model."""
    prefer_device_kind: str = ""
    memory_bytes: int | None = None
    """GPU memory the render needs, estimated by the gateway at submit (`farm.planning.memory`);
    only pools whose devices hold it run it. None: not estimated, any pool may."""
    adapters: tuple[tuple[str, float], ...] = ()
    """LoRA adapters (name, weight) applied, in the order asked."""
    surcharge: float = 0.0
    """Fraction its adapters add to its price, fixed at submit (a later config change does not reprice it)."""
    motion_bucket_id: int | None = None
    """Motion conditioning of the families that take it; None: the family's default (or none)."""
    noise_aug_strength: float | None = None
    decode_chunk_size: int | None = None

    def to_json(self) -> str:
        data = dataclasses.asdict(self)
        data.pop("image")
        data["task"] = self.task.value
        return json.dumps(data, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, image: bytes | None = None) -> "ResolvedSpec":
        data = json.loads(text)
        data["task"] = Task(data["task"])
        if data.get("postprocess") is not None:
            data["postprocess"] = ResolvedPostprocess.from_dict(data["postprocess"])
        data["adapters"] = tuple((name, float(weight)) for name, weight in data.get("adapters", ()))
        return cls(**data, image=image or b"")
