import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Task(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TASK_UNSPECIFIED: _ClassVar[Task]
    TASK_TEXT_TO_VIDEO: _ClassVar[Task]
    TASK_IMAGE_TO_VIDEO: _ClassVar[Task]

class RenderState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    RENDER_STATE_UNSPECIFIED: _ClassVar[RenderState]
    RENDER_STATE_QUEUED: _ClassVar[RenderState]
    RENDER_STATE_RUNNING: _ClassVar[RenderState]
    RENDER_STATE_SUCCEEDED: _ClassVar[RenderState]
    RENDER_STATE_FAILED: _ClassVar[RenderState]
    RENDER_STATE_CANCELLED: _ClassVar[RenderState]

class Stage(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    STAGE_UNSPECIFIED: _ClassVar[Stage]
    STAGE_LOADING: _ClassVar[Stage]
    STAGE_ENCODING_PROMPT: _ClassVar[Stage]
    STAGE_DENOISING: _ClassVar[Stage]
    STAGE_DECODING: _ClassVar[Stage]
    STAGE_POSTPROCESSING: _ClassVar[Stage]
    STAGE_WRITING: _ClassVar[Stage]

class ArtifactKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ARTIFACT_KIND_VIDEO: _ClassVar[ArtifactKind]
    ARTIFACT_KIND_MANIFEST: _ClassVar[ArtifactKind]

class UsageGrouping(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    USAGE_GROUPING_MODEL: _ClassVar[UsageGrouping]
    USAGE_GROUPING_DEVICE: _ClassVar[UsageGrouping]
    USAGE_GROUPING_DAY: _ClassVar[UsageGrouping]
    USAGE_GROUPING_PHASE: _ClassVar[UsageGrouping]
TASK_UNSPECIFIED: Task
TASK_TEXT_TO_VIDEO: Task
TASK_IMAGE_TO_VIDEO: Task
RENDER_STATE_UNSPECIFIED: RenderState
RENDER_STATE_QUEUED: RenderState
RENDER_STATE_RUNNING: RenderState
RENDER_STATE_SUCCEEDED: RenderState
RENDER_STATE_FAILED: RenderState
RENDER_STATE_CANCELLED: RenderState
STAGE_UNSPECIFIED: Stage
STAGE_LOADING: Stage
STAGE_ENCODING_PROMPT: Stage
STAGE_DENOISING: Stage
STAGE_DECODING: Stage
STAGE_POSTPROCESSING: Stage
STAGE_WRITING: Stage
ARTIFACT_KIND_VIDEO: ArtifactKind
ARTIFACT_KIND_MANIFEST: ArtifactKind
USAGE_GROUPING_MODEL: UsageGrouping
USAGE_GROUPING_DEVICE: UsageGrouping
USAGE_GROUPING_DAY: UsageGrouping
USAGE_GROUPING_PHASE: UsageGrouping

class RenderSpec(_message.Message):
    __slots__ = ("model", "task", "prompt", "negative_prompt", "image", "width", "height", "num_frames", "fps", "num_inference_steps", "guidance_scale", "seed", "priority", "labels", "idempotency_key", "postprocess", "placement", "adapters", "motion")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    NEGATIVE_PROMPT_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    NUM_FRAMES_FIELD_NUMBER: _ClassVar[int]
    FPS_FIELD_NUMBER: _ClassVar[int]
    NUM_INFERENCE_STEPS_FIELD_NUMBER: _ClassVar[int]
    GUIDANCE_SCALE_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    POSTPROCESS_FIELD_NUMBER: _ClassVar[int]
    PLACEMENT_FIELD_NUMBER: _ClassVar[int]
    ADAPTERS_FIELD_NUMBER: _ClassVar[int]
    MOTION_FIELD_NUMBER: _ClassVar[int]
    model: str
    task: Task
    prompt: str
    negative_prompt: str
    image: bytes
    width: int
    height: int
    num_frames: int
    fps: int
    num_inference_steps: int
    guidance_scale: float
    seed: int
    priority: int
    labels: _containers.ScalarMap[str, str]
    idempotency_key: str
    postprocess: PostprocessSpec
    placement: Placement
    adapters: _containers.RepeatedCompositeFieldContainer[AdapterRequest]
    motion: MotionConditioning
    def __init__(self, model: _Optional[str] = ..., task: _Optional[_Union[Task, str]] = ..., prompt: _Optional[str] = ..., negative_prompt: _Optional[str] = ..., image: _Optional[bytes] = ..., width: _Optional[int] = ..., height: _Optional[int] = ..., num_frames: _Optional[int] = ..., fps: _Optional[int] = ..., num_inference_steps: _Optional[int] = ..., guidance_scale: _Optional[float] = ..., seed: _Optional[int] = ..., priority: _Optional[int] = ..., labels: _Optional[_Mapping[str, str]] = ..., idempotency_key: _Optional[str] = ..., postprocess: _Optional[_Union[PostprocessSpec, _Mapping]] = ..., placement: _Optional[_Union[Placement, _Mapping]] = ..., adapters: _Optional[_Iterable[_Union[AdapterRequest, _Mapping]]] = ..., motion: _Optional[_Union[MotionConditioning, _Mapping]] = ...) -> None: ...

class AdapterRequest(_message.Message):
    __slots__ = ("name", "weight")
    NAME_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    name: str
    weight: float
    def __init__(self, name: _Optional[str] = ..., weight: _Optional[float] = ...) -> None: ...

class MotionConditioning(_message.Message):
    __slots__ = ("motion_bucket_id", "noise_aug_strength", "decode_chunk_size")
    MOTION_BUCKET_ID_FIELD_NUMBER: _ClassVar[int]
    NOISE_AUG_STRENGTH_FIELD_NUMBER: _ClassVar[int]
    DECODE_CHUNK_SIZE_FIELD_NUMBER: _ClassVar[int]
    motion_bucket_id: int
    noise_aug_strength: float
    decode_chunk_size: int
    def __init__(self, motion_bucket_id: _Optional[int] = ..., noise_aug_strength: _Optional[float] = ..., decode_chunk_size: _Optional[int] = ...) -> None: ...

class Placement(_message.Message):
    __slots__ = ("require_device_kind", "prefer_device_kind")
    REQUIRE_DEVICE_KIND_FIELD_NUMBER: _ClassVar[int]
    PREFER_DEVICE_KIND_FIELD_NUMBER: _ClassVar[int]
    require_device_kind: str
    prefer_device_kind: str
    def __init__(self, require_device_kind: _Optional[str] = ..., prefer_device_kind: _Optional[str] = ...) -> None: ...

class PostprocessSpec(_message.Message):
    __slots__ = ("interpolation_factor", "target_fps", "upscale_factor", "color_reference", "encoder", "candidates")
    INTERPOLATION_FACTOR_FIELD_NUMBER: _ClassVar[int]
    TARGET_FPS_FIELD_NUMBER: _ClassVar[int]
    UPSCALE_FACTOR_FIELD_NUMBER: _ClassVar[int]
    COLOR_REFERENCE_FIELD_NUMBER: _ClassVar[int]
    ENCODER_FIELD_NUMBER: _ClassVar[int]
    CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    interpolation_factor: int
    target_fps: int
    upscale_factor: int
    color_reference: ColorReference
    encoder: EncoderSettings
    candidates: int
    def __init__(self, interpolation_factor: _Optional[int] = ..., target_fps: _Optional[int] = ..., upscale_factor: _Optional[int] = ..., color_reference: _Optional[_Union[ColorReference, _Mapping]] = ..., encoder: _Optional[_Union[EncoderSettings, _Mapping]] = ..., candidates: _Optional[int] = ...) -> None: ...

class ColorReference(_message.Message):
    __slots__ = ("render_id", "statistics", "strength")
    RENDER_ID_FIELD_NUMBER: _ClassVar[int]
    STATISTICS_FIELD_NUMBER: _ClassVar[int]
    STRENGTH_FIELD_NUMBER: _ClassVar[int]
    render_id: str
    statistics: LabStatistics
    strength: float
    def __init__(self, render_id: _Optional[str] = ..., statistics: _Optional[_Union[LabStatistics, _Mapping]] = ..., strength: _Optional[float] = ...) -> None: ...

class LabStatistics(_message.Message):
    __slots__ = ("mean", "std")
    MEAN_FIELD_NUMBER: _ClassVar[int]
    STD_FIELD_NUMBER: _ClassVar[int]
    mean: _containers.RepeatedScalarFieldContainer[float]
    std: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, mean: _Optional[_Iterable[float]] = ..., std: _Optional[_Iterable[float]] = ...) -> None: ...

class EncoderSettings(_message.Message):
    __slots__ = ("codec", "crf", "bitrate_kbps", "preset")
    CODEC_FIELD_NUMBER: _ClassVar[int]
    CRF_FIELD_NUMBER: _ClassVar[int]
    BITRATE_KBPS_FIELD_NUMBER: _ClassVar[int]
    PRESET_FIELD_NUMBER: _ClassVar[int]
    codec: str
    crf: int
    bitrate_kbps: int
    preset: str
    def __init__(self, codec: _Optional[str] = ..., crf: _Optional[int] = ..., bitrate_kbps: _Optional[int] = ..., preset: _Optional[str] = ...) -> None: ...

class QualityReport(_message.Message):
    __slots__ = ("temporal_consistency", "flicker", "motion_smoothness", "frozen", "issues")
    TEMPORAL_CONSISTENCY_FIELD_NUMBER: _ClassVar[int]
    FLICKER_FIELD_NUMBER: _ClassVar[int]
    MOTION_SMOOTHNESS_FIELD_NUMBER: _ClassVar[int]
    FROZEN_FIELD_NUMBER: _ClassVar[int]
    ISSUES_FIELD_NUMBER: _ClassVar[int]
    temporal_consistency: float
    flicker: float
    motion_smoothness: float
    frozen: bool
    issues: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, temporal_consistency: _Optional[float] = ..., flicker: _Optional[float] = ..., motion_smoothness: _Optional[float] = ..., frozen: _Optional[bool] = ..., issues: _Optional[_Iterable[str]] = ...) -> None: ...

class CandidateScore(_message.Message):
    __slots__ = ("seed", "quality", "score", "chosen")
    SEED_FIELD_NUMBER: _ClassVar[int]
    QUALITY_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    CHOSEN_FIELD_NUMBER: _ClassVar[int]
    seed: int
    quality: QualityReport
    score: float
    chosen: bool
    def __init__(self, seed: _Optional[int] = ..., quality: _Optional[_Union[QualityReport, _Mapping]] = ..., score: _Optional[float] = ..., chosen: _Optional[bool] = ...) -> None: ...

class SubmitRenderRequest(_message.Message):
    __slots__ = ("spec",)
    SPEC_FIELD_NUMBER: _ClassVar[int]
    spec: RenderSpec
    def __init__(self, spec: _Optional[_Union[RenderSpec, _Mapping]] = ...) -> None: ...

class PhaseCost(_message.Message):
    __slots__ = ("phase", "device_kind", "device_seconds", "dollars", "attempt")
    PHASE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_KIND_FIELD_NUMBER: _ClassVar[int]
    DEVICE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    DOLLARS_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    phase: str
    device_kind: str
    device_seconds: float
    dollars: float
    attempt: int
    def __init__(self, phase: _Optional[str] = ..., device_kind: _Optional[str] = ..., device_seconds: _Optional[float] = ..., dollars: _Optional[float] = ..., attempt: _Optional[int] = ...) -> None: ...

class CostBreakdown(_message.Message):
    __slots__ = ("total_dollars", "phases")
    TOTAL_DOLLARS_FIELD_NUMBER: _ClassVar[int]
    PHASES_FIELD_NUMBER: _ClassVar[int]
    total_dollars: float
    phases: _containers.RepeatedCompositeFieldContainer[PhaseCost]
    def __init__(self, total_dollars: _Optional[float] = ..., phases: _Optional[_Iterable[_Union[PhaseCost, _Mapping]]] = ...) -> None: ...

class Render(_message.Message):
    __slots__ = ("id", "spec", "state", "stage", "step", "total_steps", "attempt", "created_at", "started_at", "finished_at", "artifact_uri", "manifest_uri", "cost", "error", "seed", "cancel_requested", "quality", "candidates", "preemptions", "device_kind")
    ID_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    TOTAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    FINISHED_AT_FIELD_NUMBER: _ClassVar[int]
    ARTIFACT_URI_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_URI_FIELD_NUMBER: _ClassVar[int]
    COST_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    CANCEL_REQUESTED_FIELD_NUMBER: _ClassVar[int]
    QUALITY_FIELD_NUMBER: _ClassVar[int]
    CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    PREEMPTIONS_FIELD_NUMBER: _ClassVar[int]
    DEVICE_KIND_FIELD_NUMBER: _ClassVar[int]
    id: str
    spec: RenderSpec
    state: RenderState
    stage: Stage
    step: int
    total_steps: int
    attempt: int
    created_at: _timestamp_pb2.Timestamp
    started_at: _timestamp_pb2.Timestamp
    finished_at: _timestamp_pb2.Timestamp
    artifact_uri: str
    manifest_uri: str
    cost: CostBreakdown
    error: str
    seed: int
    cancel_requested: bool
    quality: QualityReport
    candidates: _containers.RepeatedCompositeFieldContainer[CandidateScore]
    preemptions: int
    device_kind: str
    def __init__(self, id: _Optional[str] = ..., spec: _Optional[_Union[RenderSpec, _Mapping]] = ..., state: _Optional[_Union[RenderState, str]] = ..., stage: _Optional[_Union[Stage, str]] = ..., step: _Optional[int] = ..., total_steps: _Optional[int] = ..., attempt: _Optional[int] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., started_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., finished_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., artifact_uri: _Optional[str] = ..., manifest_uri: _Optional[str] = ..., cost: _Optional[_Union[CostBreakdown, _Mapping]] = ..., error: _Optional[str] = ..., seed: _Optional[int] = ..., cancel_requested: _Optional[bool] = ..., quality: _Optional[_Union[QualityReport, _Mapping]] = ..., candidates: _Optional[_Iterable[_Union[CandidateScore, _Mapping]]] = ..., preemptions: _Optional[int] = ..., device_kind: _Optional[str] = ...) -> None: ...

class GetRenderRequest(_message.Message):
    __slots__ = ("render_id",)
    RENDER_ID_FIELD_NUMBER: _ClassVar[int]
    render_id: str
    def __init__(self, render_id: _Optional[str] = ...) -> None: ...

class WatchRenderRequest(_message.Message):
    __slots__ = ("render_id", "after_sequence")
    RENDER_ID_FIELD_NUMBER: _ClassVar[int]
    AFTER_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    render_id: str
    after_sequence: int
    def __init__(self, render_id: _Optional[str] = ..., after_sequence: _Optional[int] = ...) -> None: ...

class RenderEvent(_message.Message):
    __slots__ = ("render_id", "sequence", "time", "state", "stage", "step", "total_steps", "attempt", "message")
    RENDER_ID_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    TOTAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    render_id: str
    sequence: int
    time: _timestamp_pb2.Timestamp
    state: RenderState
    stage: Stage
    step: int
    total_steps: int
    attempt: int
    message: str
    def __init__(self, render_id: _Optional[str] = ..., sequence: _Optional[int] = ..., time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., state: _Optional[_Union[RenderState, str]] = ..., stage: _Optional[_Union[Stage, str]] = ..., step: _Optional[int] = ..., total_steps: _Optional[int] = ..., attempt: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class CancelRenderRequest(_message.Message):
    __slots__ = ("render_id",)
    RENDER_ID_FIELD_NUMBER: _ClassVar[int]
    render_id: str
    def __init__(self, render_id: _Optional[str] = ...) -> None: ...

class ListRendersRequest(_message.Message):
    __slots__ = ("states", "model", "page_size", "page_token")
    STATES_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    states: _containers.RepeatedScalarFieldContainer[RenderState]
    model: str
    page_size: int
    page_token: str
    def __init__(self, states: _Optional[_Iterable[_Union[RenderState, str]]] = ..., model: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListRendersResponse(_message.Message):
    __slots__ = ("renders", "next_page_token")
    RENDERS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    renders: _containers.RepeatedCompositeFieldContainer[Render]
    next_page_token: str
    def __init__(self, renders: _Optional[_Iterable[_Union[Render, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class FetchArtifactRequest(_message.Message):
    __slots__ = ("render_id", "kind", "offset")
    RENDER_ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    render_id: str
    kind: ArtifactKind
    offset: int
    def __init__(self, render_id: _Optional[str] = ..., kind: _Optional[_Union[ArtifactKind, str]] = ..., offset: _Optional[int] = ...) -> None: ...

class ArtifactChunk(_message.Message):
    __slots__ = ("data", "offset", "total_bytes", "content_type")
    DATA_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    CONTENT_TYPE_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    offset: int
    total_bytes: int
    content_type: str
    def __init__(self, data: _Optional[bytes] = ..., offset: _Optional[int] = ..., total_bytes: _Optional[int] = ..., content_type: _Optional[str] = ...) -> None: ...

class EstimateCostRequest(_message.Message):
    __slots__ = ("spec",)
    SPEC_FIELD_NUMBER: _ClassVar[int]
    spec: RenderSpec
    def __init__(self, spec: _Optional[_Union[RenderSpec, _Mapping]] = ...) -> None: ...

class CostEstimate(_message.Message):
    __slots__ = ("dollars", "device_seconds", "device_kind", "calibrated", "phases")
    DOLLARS_FIELD_NUMBER: _ClassVar[int]
    DEVICE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    DEVICE_KIND_FIELD_NUMBER: _ClassVar[int]
    CALIBRATED_FIELD_NUMBER: _ClassVar[int]
    PHASES_FIELD_NUMBER: _ClassVar[int]
    dollars: float
    device_seconds: float
    device_kind: str
    calibrated: bool
    phases: _containers.RepeatedCompositeFieldContainer[PhaseCost]
    def __init__(self, dollars: _Optional[float] = ..., device_seconds: _Optional[float] = ..., device_kind: _Optional[str] = ..., calibrated: _Optional[bool] = ..., phases: _Optional[_Iterable[_Union[PhaseCost, _Mapping]]] = ...) -> None: ...

class GetUsageRequest(_message.Message):
    __slots__ = ("since", "until", "group_by")
    SINCE_FIELD_NUMBER: _ClassVar[int]
    UNTIL_FIELD_NUMBER: _ClassVar[int]
    GROUP_BY_FIELD_NUMBER: _ClassVar[int]
    since: _timestamp_pb2.Timestamp
    until: _timestamp_pb2.Timestamp
    group_by: UsageGrouping
    def __init__(self, since: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., until: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., group_by: _Optional[_Union[UsageGrouping, str]] = ...) -> None: ...

class UsageRow(_message.Message):
    __slots__ = ("key", "renders", "device_seconds", "dollars", "nanodollars")
    KEY_FIELD_NUMBER: _ClassVar[int]
    RENDERS_FIELD_NUMBER: _ClassVar[int]
    DEVICE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    DOLLARS_FIELD_NUMBER: _ClassVar[int]
    NANODOLLARS_FIELD_NUMBER: _ClassVar[int]
    key: str
    renders: int
    device_seconds: float
    dollars: float
    nanodollars: int
    def __init__(self, key: _Optional[str] = ..., renders: _Optional[int] = ..., device_seconds: _Optional[float] = ..., dollars: _Optional[float] = ..., nanodollars: _Optional[int] = ...) -> None: ...

class Budget(_message.Message):
    __slots__ = ("period", "budget_dollars", "spent_dollars", "reserved_dollars", "left_dollars")
    PERIOD_FIELD_NUMBER: _ClassVar[int]
    BUDGET_DOLLARS_FIELD_NUMBER: _ClassVar[int]
    SPENT_DOLLARS_FIELD_NUMBER: _ClassVar[int]
    RESERVED_DOLLARS_FIELD_NUMBER: _ClassVar[int]
    LEFT_DOLLARS_FIELD_NUMBER: _ClassVar[int]
    period: str
    budget_dollars: float
    spent_dollars: float
    reserved_dollars: float
    left_dollars: float
    def __init__(self, period: _Optional[str] = ..., budget_dollars: _Optional[float] = ..., spent_dollars: _Optional[float] = ..., reserved_dollars: _Optional[float] = ..., left_dollars: _Optional[float] = ...) -> None: ...

class UsageReport(_message.Message):
    __slots__ = ("rows", "total_dollars", "total_nanodollars", "budget")
    ROWS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_DOLLARS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_NANODOLLARS_FIELD_NUMBER: _ClassVar[int]
    BUDGET_FIELD_NUMBER: _ClassVar[int]
    rows: _containers.RepeatedCompositeFieldContainer[UsageRow]
    total_dollars: float
    total_nanodollars: int
    budget: Budget
    def __init__(self, rows: _Optional[_Iterable[_Union[UsageRow, _Mapping]]] = ..., total_dollars: _Optional[float] = ..., total_nanodollars: _Optional[int] = ..., budget: _Optional[_Union[Budget, _Mapping]] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelLimits(_message.Message):
    __slots__ = ("size_multiple", "max_width", "max_height", "frame_step", "min_frames", "max_frames", "max_steps", "max_prompt_chars", "max_image_bytes", "min_steps", "min_size", "max_fps", "max_guidance_scale", "max_image_pixels", "max_adapters")
    SIZE_MULTIPLE_FIELD_NUMBER: _ClassVar[int]
    MAX_WIDTH_FIELD_NUMBER: _ClassVar[int]
    MAX_HEIGHT_FIELD_NUMBER: _ClassVar[int]
    FRAME_STEP_FIELD_NUMBER: _ClassVar[int]
    MIN_FRAMES_FIELD_NUMBER: _ClassVar[int]
    MAX_FRAMES_FIELD_NUMBER: _ClassVar[int]
    MAX_STEPS_FIELD_NUMBER: _ClassVar[int]
    MAX_PROMPT_CHARS_FIELD_NUMBER: _ClassVar[int]
    MAX_IMAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MIN_STEPS_FIELD_NUMBER: _ClassVar[int]
    MIN_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_FPS_FIELD_NUMBER: _ClassVar[int]
    MAX_GUIDANCE_SCALE_FIELD_NUMBER: _ClassVar[int]
    MAX_IMAGE_PIXELS_FIELD_NUMBER: _ClassVar[int]
    MAX_ADAPTERS_FIELD_NUMBER: _ClassVar[int]
    size_multiple: int
    max_width: int
    max_height: int
    frame_step: int
    min_frames: int
    max_frames: int
    max_steps: int
    max_prompt_chars: int
    max_image_bytes: int
    min_steps: int
    min_size: int
    max_fps: int
    max_guidance_scale: float
    max_image_pixels: int
    max_adapters: int
    def __init__(self, size_multiple: _Optional[int] = ..., max_width: _Optional[int] = ..., max_height: _Optional[int] = ..., frame_step: _Optional[int] = ..., min_frames: _Optional[int] = ..., max_frames: _Optional[int] = ..., max_steps: _Optional[int] = ..., max_prompt_chars: _Optional[int] = ..., max_image_bytes: _Optional[int] = ..., min_steps: _Optional[int] = ..., min_size: _Optional[int] = ..., max_fps: _Optional[int] = ..., max_guidance_scale: _Optional[float] = ..., max_image_pixels: _Optional[int] = ..., max_adapters: _Optional[int] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("name", "family", "tasks", "limits", "defaults", "ready", "device_kind", "device_kinds", "postprocess_limits", "adapters", "uses_prompt", "audio")
    NAME_FIELD_NUMBER: _ClassVar[int]
    FAMILY_FIELD_NUMBER: _ClassVar[int]
    TASKS_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    DEFAULTS_FIELD_NUMBER: _ClassVar[int]
    READY_FIELD_NUMBER: _ClassVar[int]
    DEVICE_KIND_FIELD_NUMBER: _ClassVar[int]
    DEVICE_KINDS_FIELD_NUMBER: _ClassVar[int]
    POSTPROCESS_LIMITS_FIELD_NUMBER: _ClassVar[int]
    ADAPTERS_FIELD_NUMBER: _ClassVar[int]
    USES_PROMPT_FIELD_NUMBER: _ClassVar[int]
    AUDIO_FIELD_NUMBER: _ClassVar[int]
    name: str
    family: str
    tasks: _containers.RepeatedScalarFieldContainer[Task]
    limits: ModelLimits
    defaults: RenderSpec
    ready: bool
    device_kind: str
    device_kinds: _containers.RepeatedScalarFieldContainer[str]
    postprocess_limits: PostprocessLimits
    adapters: _containers.RepeatedCompositeFieldContainer[AdapterInfo]
    uses_prompt: bool
    audio: bool
    def __init__(self, name: _Optional[str] = ..., family: _Optional[str] = ..., tasks: _Optional[_Iterable[_Union[Task, str]]] = ..., limits: _Optional[_Union[ModelLimits, _Mapping]] = ..., defaults: _Optional[_Union[RenderSpec, _Mapping]] = ..., ready: _Optional[bool] = ..., device_kind: _Optional[str] = ..., device_kinds: _Optional[_Iterable[str]] = ..., postprocess_limits: _Optional[_Union[PostprocessLimits, _Mapping]] = ..., adapters: _Optional[_Iterable[_Union[AdapterInfo, _Mapping]]] = ..., uses_prompt: _Optional[bool] = ..., audio: _Optional[bool] = ...) -> None: ...

class AdapterInfo(_message.Message):
    __slots__ = ("name", "surcharge")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SURCHARGE_FIELD_NUMBER: _ClassVar[int]
    name: str
    surcharge: float
    def __init__(self, name: _Optional[str] = ..., surcharge: _Optional[float] = ...) -> None: ...

class PostprocessLimits(_message.Message):
    __slots__ = ("max_interpolation_factor", "max_output_fps", "max_upscale_factor", "max_output_pixels", "max_output_frames", "max_candidates")
    MAX_INTERPOLATION_FACTOR_FIELD_NUMBER: _ClassVar[int]
    MAX_OUTPUT_FPS_FIELD_NUMBER: _ClassVar[int]
    MAX_UPSCALE_FACTOR_FIELD_NUMBER: _ClassVar[int]
    MAX_OUTPUT_PIXELS_FIELD_NUMBER: _ClassVar[int]
    MAX_OUTPUT_FRAMES_FIELD_NUMBER: _ClassVar[int]
    MAX_CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    max_interpolation_factor: int
    max_output_fps: int
    max_upscale_factor: int
    max_output_pixels: int
    max_output_frames: int
    max_candidates: int
    def __init__(self, max_interpolation_factor: _Optional[int] = ..., max_output_fps: _Optional[int] = ..., max_upscale_factor: _Optional[int] = ..., max_output_pixels: _Optional[int] = ..., max_output_frames: _Optional[int] = ..., max_candidates: _Optional[int] = ...) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelInfo]
    def __init__(self, models: _Optional[_Iterable[_Union[ModelInfo, _Mapping]]] = ...) -> None: ...
