"""Typed settings for every part of farm.

One `FarmConfig` describes a whole farm. It is read from (in increasing precedence)
the defaults below, a YAML file (``--config`` or ``FARM_CONFIG``), and ``FARM_*``
environment variables (nested with ``__``, e.g. ``FARM_GATEWAY__PORT=6000``).
Every field has a docstring: it is the reference documentation.
"""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from farm.domain.limits import ModelLimits, RenderDefaults
from farm.domain.spec import Task
from farm.families import Family, family_facts, tiny_models


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)


def default_home() -> Path:
    return Path(os.environ.get("FARM_HOME", "~/.farm")).expanduser()


class RateLimit(_Section):
    """A token bucket: `rate` calls a second on average, in bursts of up to `burst`."""

    rate: float | None = Field(None, ge=0)
    """Calls a second, on average (tokens added to the bucket a second); 0 or None: unlimited."""
    burst: int = Field(1, ge=1)
    """Calls that may come at once after a quiet spell (the size of the bucket)."""


class FailedAuthLimits(_Section):
    """Throttling of client addresses that present API keys the store refuses."""

    max_failures: int | None = Field(10, ge=0)
    """Refused keys from one client address within `window_s` after which every call from it
    is refused (RESOURCE_EXHAUSTED with RetryInfo) without its key being checked, valid or
    not; 0 or None: never. Calls without a `Bearer` key are not counted."""
    window_s: float = Field(60.0, gt=0)
    """The window in which an address's refused keys count towards `max_failures`."""
    backoff_s: float = Field(30.0, gt=0)
    """How long an address is refused the first time; each further time doubles it."""
    max_backoff_s: float = Field(900.0, gt=0)
    """The longest an address is refused; an address with no refused key for this long
    (after its last refusal ended) starts again from `backoff_s`."""

    @model_validator(mode="after")
    def _check_backoff(self) -> "FailedAuthLimits":
        if self.max_backoff_s < self.backoff_s:
            raise ValueError(f"failed_auth: max_backoff_s {self.max_backoff_s:g} < backoff_s {self.backoff_s:g}")
        return self


class RateLimitsConfig(_Section):
    """Limits of calls to the gateway, kept in memory in each gateway process (with N
    replicas a client may get up to N times these). Per tenant once its key is checked,
    and per client address (the gRPC peer, without its port) before, so that floods
    without a valid key are limited too. Health checks and reflection are never limited."""

    submits: RateLimit = Field(default_factory=lambda: RateLimit(rate=100, burst=500))
    """SubmitRender and EstimateCost, per tenant."""
    reads: RateLimit = Field(default_factory=lambda: RateLimit(rate=200, burst=1000))
    """Every other RenderService call (GetRender, ListRenders, GetUsage, ListModels,
    FetchArtifact, CancelRender) and each WatchRender as it opens, per tenant."""
    watches: int | None = Field(1000, ge=0)
    """WatchRender streams a tenant may have open at once; 0 or None: unlimited."""
    peer_submits: RateLimit = Field(default_factory=lambda: RateLimit(rate=200, burst=1000))
    """SubmitRender and EstimateCost per client address, whatever the tenant. Behind a proxy
    that ends gRPC connections (an L7 ingress) every client has the proxy's address: raise
    or disable the peer limits there."""
    peer_reads: RateLimit = Field(default_factory=lambda: RateLimit(rate=400, burst=2000))
    """The calls of `reads` per client address, whatever the tenant."""
    peer_watches: int | None = Field(1000, ge=0)
    """WatchRender streams one client address may have open at once; 0 or None: unlimited."""
    failed_auth: FailedAuthLimits = Field(default_factory=FailedAuthLimits)
    """Throttling of client addresses that present refused API keys."""


class GatewayConfig(_Section):
    host: str = "127.0.0.1"
    """Address the gRPC gateway binds to; loopback unless told otherwise."""
    port: int = Field(50051, ge=0, le=65535)
    """gRPC port (0 picks a free port)."""
    metrics_port: int = Field(9464, ge=0, le=65535)
    """Prometheus endpoint of the gateway on `host`; 0 disables it."""
    max_message_bytes: int | None = Field(None, ge=1024 * 1024)
    """Largest request the gateway accepts, in bytes; gRPC refuses a larger one with
    RESOURCE_EXHAUSTED before it is parsed. None (the default) derives it from the served
    models: the largest `max_image_bytes`, plus their longest prompt and negative prompt
    (4 bytes a character) and a fixed 64 KiB for the other fields. A value below that
    stops the gateway at start, since it would refuse legitimate images."""
    large_request_bytes: int = Field(1024 * 1024, ge=1024)
    """A request body larger than this (in practice: a spec carrying an image) is a large
    request, admitted only while fewer than `max_concurrent_large_requests` are in flight."""
    max_concurrent_large_requests: int = Field(4, ge=1)
    """Large requests the gateway handles at once; more are refused before they are parsed,
    with RESOURCE_EXHAUSTED and RetryInfo. Each one holds its body, the parsed spec and the
    decoded image (up to a few times the largest image), so this bounds their memory."""
    tls_cert_file: Path | None = None
    """PEM certificate chain the gateway presents; with `tls_key_file` the gateway speaks only
    TLS. Both are read again at the next connection after either file changes (modification
    time, size or inode), so a renewed certificate needs no restart; a pair that does not
    match (half written) keeps the previous one until it does."""
    tls_key_file: Path | None = None
    """PEM private key (unencrypted) of `tls_cert_file`."""
    tls_client_ca_file: Path | None = None
    """PEM CA certificates for mutual TLS: when set, every client (health checks included)
    must present a certificate signed by one of them, or its handshake is refused. Re-read on
    change like the certificate. Needs `tls_cert_file`."""
    allow_plaintext: bool = False
    """Serve plaintext on a `host` other than loopback. Without TLS the gateway refuses such
    an address at start, rather than warn: a warning in a log nobody reads leaves every API
    key readable on the network. Turn it on only where something else encrypts the traffic
    (a service mesh sidecar, a TLS-terminating proxy beside the gateway)."""
    stream_reauth_interval_s: float = Field(2.0, gt=0, le=60)
    """How often a long stream (WatchRender, FetchArtifact) checks its API key again: a
    revoked key's streams end with UNAUTHENTICATED within this."""
    watch_poll_interval_s: float = Field(0.04, gt=0, le=5)
    """How often WatchRender looks for new events in the store where commits are not
    announced to it (PostgreSQL); on SQLite it wakes at each commit instead."""
    fetch_chunk_bytes: int = Field(1024 * 1024, ge=4096, le=4 * 1024 * 1024)
    """Size of the chunks FetchArtifact streams."""
    health_interval_s: float = Field(1.0, gt=0)
    """How often the health service re-checks the store and the engine pools."""
    pool_stale_after_s: float = Field(15.0, gt=0)
    """An engine pool whose last heartbeat is older than this counts as down."""
    rate_limits: RateLimitsConfig = Field(default_factory=RateLimitsConfig)
    """Rate limits per tenant and per client address, open watch streams, and throttling of
    addresses that present refused API keys."""

    @property
    def tls(self) -> bool:
        return self.tls_cert_file is not None

    @model_validator(mode="after")
    def _check_tls(self) -> "GatewayConfig":
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("gateway.tls_cert_file and gateway.tls_key_file go together: set both or neither")
        if self.tls_client_ca_file is not None and not self.tls:
            raise ValueError("gateway.tls_client_ca_file (mutual TLS) needs gateway.tls_cert_file and tls_key_file")
        if not self.tls and not self.allow_plaintext and not is_loopback(self.host):
            raise ValueError(
                f"gateway.host {self.host!r} is not a loopback address and the gateway has no TLS: API keys "
                f"would cross the network in clear text. Set gateway.tls_cert_file and gateway.tls_key_file, "
                f"or gateway.allow_plaintext: true where something else encrypts the traffic (a service mesh)")
        return self


def is_loopback(host: str) -> bool:
    """Whether a bind address is loopback only: `localhost`, 127.0.0.0/8 or ::1 (an address
    of every interface, such as 0.0.0.0 or ::, is not; nor is any other name)."""
    name = host.strip().removeprefix("[").removesuffix("]")
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


class StoreConfig(_Section):
    url: str | None = None
    """SQLAlchemy URL of the job store. None means SQLite at $FARM_HOME/farm.db;
    a cluster uses PostgreSQL, e.g. postgresql+psycopg://farm@db/farm."""
    migrate: bool = True
    """Apply Alembic migrations at start (under a lock, so several processes may start at once)."""
    event_retention_days: float | None = Field(30.0, gt=0)
    """Events of a render that ended are deleted once this many days old, all but its final
    one (its row, attempts and ledger entries stay: GetRender, ListRenders, WatchRender and
    usage reports answer as before); None keeps every event."""
    image_retention_days: float | None = Field(30.0, gt=0)
    """The input image of an image-to-video render that ended this many days ago is dropped
    from the store (nothing reads it again); None keeps them."""
    prune_interval_s: float = Field(3600.0, gt=0)
    """How often the scheduler prunes by the two settings above (a few short transactions
    per autoscaling round until done; `farm store prune` does it at once)."""


class ArtifactConfig(_Section):
    url: str | None = None
    """fsspec URL under which MP4s and manifests are written. None means $FARM_HOME/artifacts."""


class PriorityClass(_Section):
    name: str = Field(pattern=r"^[a-z][a-z0-9-]{0,31}$")
    """Name shown in logs and metrics (e.g. batch, standard, urgent)."""
    min_priority: int = Field(ge=0, le=100)
    """Specs with a priority from here up to the next class's minimum belong to this class."""
    preempts: bool = False
    """A render of this class waiting for a full pool may preempt a running render of a
    lower class: that render checkpoints at its next denoising step and resumes later."""


def _default_priority_classes() -> list[PriorityClass]:
    return [
        PriorityClass(name="batch", min_priority=0),
        PriorityClass(name="standard", min_priority=34),
        PriorityClass(name="urgent", min_priority=67, preempts=True),
    ]


class SchedulerConfig(_Section):
    lease_seconds: float = Field(30.0, gt=1)
    """How long a claimed render stays owned without a heartbeat before it is requeued."""
    heartbeat_interval_s: float = Field(2.0, gt=0)
    """How often the scheduler renews its leases, publishes pool status and looks for cancels."""
    poll_interval_s: float = Field(0.005, gt=0, le=5)
    """How often the scheduler looks for queued renders while it has free engine slots (or
    urgent classes may preempt), where submits are not announced to it: normally they are
    (PostgreSQL's NOTIFY, or SQLite's doorbell on Linux) and it sleeps until one comes.
    A look costs microseconds (SQLite's commit counter); the store is queried only when
    it changed."""
    event_flush_interval_s: float = Field(0.1, gt=0, le=5)
    """Progress events are written to the store in batches at this interval (final
    states are written at once)."""
    prefetch_per_replica: int = Field(1, ge=0, le=8)
    """Renders dispatched to a busy engine replica to wait there, so it starts the
    next one the moment it finishes. They hold a lease and show stage LOADING."""
    postprocessing_per_replica: int = Field(2, ge=0, le=8)
    """Renders an engine replica may still hold while their frames are post-processed
    (stages POSTPROCESSING and WRITING), beyond those above: the engine starts the next
    render meanwhile instead of waiting for post-processing. Bounds the frames waiting."""
    cancel_poll_interval_s: float = Field(0.5, gt=0, le=5)
    """How often the scheduler asks the store which running renders were cancelled
    (progress writes also bring cancel requests back, within event_flush_interval_s)."""
    max_attempts: int = Field(3, ge=1, le=20)
    """A render whose lease is lost this many times fails."""
    metrics_port: int = Field(9465, ge=0, le=65535)
    """Prometheus endpoint of the Serve application (served by the scheduler replica); 0 disables it."""
    metrics_host: str = "127.0.0.1"
    """Address the Serve application's Prometheus endpoint binds to."""
    priority_classes: list[PriorityClass] = Field(default_factory=_default_priority_classes)
    """Priority classes by the lowest spec priority in each; a higher class always starts first."""
    max_preemptions: int = Field(3, ge=0, le=100)
    """A render preempted this many times is not preempted again (it cannot starve)."""
    failed_node_limit: int = Field(3, ge=1, le=100)
    """A render that engines failed this many times fails for good, with every node's reason.
    Each retry goes to a node it has not failed on where its pool has one, so on a farm of this
    many nodes that is as many different nodes; a smaller farm retries it on the nodes it has.
    (Attempts lost with their replica count against max_attempts instead.)"""
    stop_timeout_s: float = Field(8.0, gt=0, le=600)
    """On stopping, how long the scheduler waits for its renders to checkpoint (or finish
    post-processing) before withdrawing the rest; twice this at most in all. Kubernetes
    gives a pod 30 s."""
    autoscale_interval_s: float = Field(1.0, gt=0, le=60)
    """How often the scheduler recomputes each pool's wanted replicas from its backlog."""
    quarantine_after_failures: int = Field(3, ge=0, le=100)
    """A node on which this many renders failed (for reasons not their own) or lost their
    replica within `quarantine_window_s` gets no renders for `quarantine_s`; 0: never."""
    quarantine_window_s: float = Field(600.0, gt=0, le=86_400)
    """The window in which a node's failures count towards its quarantine."""
    quarantine_s: float = Field(300.0, gt=0, le=86_400)
    """How long a quarantined node is kept out of its pools."""

    @field_validator("priority_classes")
    @classmethod
    def _classes_cover_priorities(cls, classes: list[PriorityClass]) -> list[PriorityClass]:
        starts = [c.min_priority for c in classes]
        if not classes or starts[0] != 0 or starts != sorted(set(starts)):
            raise ValueError("scheduler.priority_classes: the first must start at 0 and minimums must increase")
        return classes

    @property
    def renders_per_replica(self) -> int:
        """The most renders an engine replica holds at once, in any stage."""
        return 1 + self.prefetch_per_replica + self.postprocessing_per_replica

    def priority_class(self, priority: int) -> PriorityClass:
        return [c for c in self.priority_classes if c.min_priority <= priority][-1]

    def class_rank(self, priority: int) -> int:
        """0 for the lowest class; renders compare by this, not by raw priority, to preempt."""
        return sum(1 for c in self.priority_classes if c.min_priority <= priority) - 1


class BackendConfig(_Section):
    """How a model's transformer runs: the backend, its ahead-of-time builds, step caching, VAE tiling."""

    name: Literal["eager", "compile", "fp8", "onnx"] = "eager"
    """eager: the diffusers model as loaded, in the model's dtype. compile: torch.compile of the
    transformer (with CUDA graphs on a GPU), built per shape by `farm engines build`. fp8: FP8 linear
    layers in the transformer blocks plus compile; needs a GPU with FP8 tensor cores (Ada, Hopper or
    newer). onnx: the transformer exported to ONNX per shape and run by ONNX Runtime (TensorRT or CUDA
    execution provider in FP16 on a GPU, CPU provider in float32 on CPU)."""
    first_block_cache_threshold: float | None = Field(None, ge=0)
    """First-Block Cache: a step whose first transformer block changes its output by less than this
    (relative mean absolute difference from the previous step) reuses the previous step's residual
    of the remaining blocks. None turns it off; 0 never skips; around 0.05-0.1 is typical. Not with onnx."""
    onnx_provider: Literal["auto", "tensorrt", "cuda", "cpu"] = "auto"
    """ONNX Runtime execution provider for the onnx backend. auto: TensorRT if onnxruntime offers it,
    else CUDA, on a GPU engine; CPU on a CPU engine."""
    cache_dir: str | None = None
    """Directory of ahead-of-time engine builds (ONNX graphs, TensorRT engines, compile caches).
    None means $FARM_HOME/engine-cache."""
    missing_build: Literal["eager", "refuse"] = "eager"
    """What a render does when the backend needs a build for its shape and none exists:
    eager runs it on the eager transformer and notes that in the render's manifest;
    refuse fails it with the command that would build the engine."""
    vae_tiling: bool = False
    """Decode with the VAE in spatial tiles and, where the VAE supports it, temporal tiles, so that
    long or large videos fit in memory (tile edges are blended; output differs slightly from untiled)."""

    @model_validator(mode="after")
    def _check_combination(self) -> "BackendConfig":
        if self.name == "onnx" and self.first_block_cache_threshold is not None:
            raise ValueError(
                "backend: first_block_cache_threshold cannot be used with the onnx backend "
                "(the exported graph runs every block); use eager, compile or fp8"
            )
        return self

    @property
    def resolved_cache_dir(self) -> Path:
        return Path(self.cache_dir).expanduser() if self.cache_dir else default_home() / "engine-cache"


class PoolConfig(_Section):
    """One engine pool of a model: its replicas all run on one kind of accelerator."""

    device_kind: str
    """Price-table kind of the pool's devices (H100, A100, L40S, CPU): what placement
    requirements name and what metering charges."""
    accelerator_type: str | None = None
    """Ray accelerator type the replicas must be placed on (the node resource
    `accelerator_type:<type>`). None: the device_kind for a GPU pool, no constraint for a CPU pool."""
    num_gpus: float = Field(0, ge=0)
    """GPUs per replica (Ray resource)."""
    num_cpus: float = Field(1, ge=0)
    """CPUs per replica (Ray resource)."""
    min_replicas: int = Field(1, ge=0, le=1024)
    """Fewest replicas; 0 lets the pool scale to zero when nothing waits for it."""
    max_replicas: int = Field(1, ge=0, le=1024)
    """Most replicas the backlog may ask for."""
    backlog_target_s: float = Field(60.0, gt=0)
    """The pool scales so that the work waiting for it (estimated device-seconds) would be
    done within this many seconds: wanted replicas = ceil(backlog / target) + busy replicas."""
    downscale_delay_s: float = Field(30.0, ge=0)
    """The backlog must have asked for fewer replicas for this long before the pool shrinks."""
    drain_timeout_s: float = Field(3600.0, gt=0)
    """A replica being removed first finishes its renders; after this long it is stopped anyway."""
    relative_speed: float = Field(1.0, gt=0)
    """Work per second relative to the model's other pools, for routing when this kind has no
    calibrated cost model yet (an H100 pool next to an A100 pool might say 2.0)."""

    @model_validator(mode="after")
    def _check_bounds(self) -> "PoolConfig":
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"pool {self.device_kind}: min_replicas {self.min_replicas} > max_replicas {self.max_replicas}")
        return self

    @property
    def ray_accelerator_type(self) -> str | None:
        if self.accelerator_type is not None:
            return self.accelerator_type
        return self.device_kind if self.num_gpus else None


class ModelConfig(_Section):
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9._-]{0,62}$")
    """The name clients put in a spec's `model`."""
    family: Family
    """Which engine wraps it (selects the diffusers pipeline classes)."""
    sources: dict[Task, str]
    """Per task, a hub id or a local directory for `from_pretrained`. A model whose tasks
    share weights (as its family module says) names the same source twice and loads it once."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) for hub ids."""
    dtype: str = "auto"
    """Weights and compute dtype: auto (bfloat16 on GPU, float32 on CPU), bfloat16, float16, float32."""
    device: str = "auto"
    """torch device for the engine: auto (cuda when present), cuda, cpu."""
    device_kind: str | None = None
    """Price-table kind of the device (H100, A100, L40S, CPU). None detects it from the GPU name."""
    replicas: int = Field(1, ge=0, le=1024)
    """Engine replicas for this model."""
    num_gpus: float = Field(0, ge=0)
    """GPUs per replica (Ray resource). 0 on CPU-only farms."""
    num_cpus: float = Field(1, ge=0)
    """CPUs per replica (Ray resource)."""
    cpu_threads: int | None = Field(None, ge=1)
    """torch threads in a CPU engine; None uses every core of the node."""
    cpu_threads_beside_postprocessing: int | None = Field(None, ge=1)
    """torch threads for a render that a CPU engine starts while its previous render is
    still being post-processed on the same cores. None: `cpu_threads` less the
    post-processing threads (postproc.replicas x postproc.num_cpus), at least 1. Each
    render's count goes into its manifest, and a resume keeps its checkpoint's."""
    limits: ModelLimits | None = None
    """What a spec may ask of this model; None takes the family's limits."""
    defaults: RenderDefaults | None = None
    """Values for fields a spec leaves empty; None takes the family's defaults."""
    backend: BackendConfig = Field(default_factory=BackendConfig)
    """How the transformer runs (eager, compile, fp8, onnx), step caching and VAE tiling."""
    pools: list[PoolConfig] | None = None
    """Engine pools, one per accelerator kind, each autoscaled between its bounds. None:
    one fixed pool of `replicas` replicas with `num_gpus`, `num_cpus` and `device_kind` above."""
    adapters: list[AdapterConfig] = Field(default_factory=list)
    """LoRA adapters of this model alone; the farm adds the top-level `adapters` of its family."""
    adapter_cache_mib: int = Field(2048, ge=1)
    """Adapter weights a replica keeps loaded (the least recently used go first)."""
    context_parallel: ContextParallelConfig | None = None
    """Split each render over several devices of a replica (large families on GPU nodes)."""

    @model_validator(mode="after")
    def _fill_family_values(self) -> "ModelConfig":
        if not self.sources:
            raise ValueError(f"model {self.name}: sources must name at least one task")
        parallel = self.context_parallel
        if parallel is not None:
            if self.backend.name != "eager" or self.backend.first_block_cache_threshold is not None:
                raise ValueError(f"model {self.name}: context_parallel runs the eager backend without "
                                 "first_block_cache_threshold")
            for pool in self.resolved_pools():
                if pool.num_gpus and pool.num_gpus != parallel.degree:
                    raise ValueError(f"model {self.name}: pool {pool.device_kind} gives a replica {pool.num_gpus:g} "
                                     f"GPUs; context_parallel.degree {parallel.degree} needs one per rank")
        facts = family_facts(self.family)
        if self.limits is None:
            self.limits = facts.limits.model_copy()
        if self.defaults is None:
            self.defaults = facts.defaults.model_copy()
        return self

    @property
    def tasks(self) -> list[Task]:
        return list(self.sources)

    @property
    def explicit_pools(self) -> bool:
        return self.pools is not None

    def resolved_pools(self) -> list[PoolConfig]:
        """The model's pools; without `pools`, one fixed pool from the flat fields (its
        device kind is None-detected at start, so it is named by `device_kind` or "auto")."""
        if self.pools is not None:
            return self.pools
        return [PoolConfig(device_kind=self.device_kind or "auto", num_gpus=self.num_gpus, num_cpus=self.num_cpus,
                           min_replicas=self.replicas, max_replicas=self.replicas)]

    def device_kinds(self) -> list[str]:
        """Known kinds of the model's pools (empty while the only pool's kind is auto-detected)."""
        return [p.device_kind for p in self.resolved_pools() if p.device_kind != "auto"]


class ContextParallelConfig(_Section):
    """One render across several devices of a replica: the transformer's attention is split
    over `degree` ranks (diffusers' context parallelism), one process per device."""

    degree: int = Field(ge=2, le=64)
    """Devices per render; a GPU pool's num_gpus must equal it."""
    mode: Literal["ulysses", "ring"] = "ulysses"
    """Ulysses (all-to-all of attention heads: the heads must divide by the degree) or ring
    attention (key/value blocks passed around; needs an attention backend that returns its
    log-sum-exp, i.e. a GPU one)."""
    attention_backend: str | None = None
    """diffusers attention backend for the split attention (None: diffusers' default)."""
    timeout_s: float = Field(300.0, gt=0)
    """How long rank 0 waits for the others at the end of a render before it gives the group up."""


class AdapterConfig(_Section):
    """A LoRA adapter renders may ask for by name (`spec.adapters`)."""

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9._-]{0,62}$")
    """What a spec calls it."""
    source: str
    """A Hugging Face hub id or a local directory (or file) holding its weights."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) for a hub id."""
    weight_name: str | None = None
    """The weights file inside source, where it holds several."""
    families: list[Family] = Field(min_length=1)
    """The model families it was trained for: only their models offer it."""
    surcharge: float = Field(0.0, ge=0, le=10)
    """Fraction added to the price of a render that applies it (0.2: +20%), e.g. a licence fee."""

    @field_validator("families")
    @classmethod
    def _families_take_lora(cls, families: list[Family]) -> list[Family]:
        without = [f.value for f in families if not family_facts(f).lora]
        if without:
            raise ValueError(f"families {without} cannot load LoRA adapters (their pipelines have no LoRA loader)")
        return families


class PriceConfig(_Section):
    dollars_per_device_hour: dict[str, float] = Field(
        default_factory=lambda: {"H100": 3.00, "A100": 1.80, "L40S": 1.10, "CPU": 0.04}
    )
    """Price of one device-hour per device kind. CPU is per core-hour."""

    @field_validator("dollars_per_device_hour")
    @classmethod
    def _prices_are_sane(cls, prices: dict[str, float]) -> dict[str, float]:
        for kind, price in prices.items():
            if not (0 <= price <= 10_000):
                raise ValueError(f"prices.dollars_per_device_hour[{kind}] must be within 0..10000, got {price}")
        return prices

    def price_of(self, device_kind: str) -> float:
        try:
            return self.dollars_per_device_hour[device_kind]
        except KeyError:
            raise KeyError(
                f"device kind {device_kind!r} has no price in prices.dollars_per_device_hour "
                f"(known: {sorted(self.dollars_per_device_hour)})"
            ) from None


GIB = 1024**3


def _default_memory_gib() -> dict[str, float]:
    return {"H100": 80.0, "H200": 141.0, "A100": 80.0, "L40S": 48.0, "L4": 24.0, "A10G": 24.0}


class DeviceConfig(_Section):
    """What farm knows of each device kind besides its price: how much a render may hold in it."""

    memory_gib: dict[str, float] = Field(default_factory=_default_memory_gib)
    """GPU memory of one device, in GiB, per device kind (an A100 40GB farm sets A100: 40). A render
    whose estimated peak (`farm.planning.memory`) exceeds what a pool's devices hold is never sent to
    that pool, and one that fits none of the pools it may run on is refused at submit. A replica with
    a fraction of a GPU (num_gpus 0.5) gets that fraction. CPU pools are not checked; a GPU pool whose
    kind is detected at start and missing here is not checked either."""
    memory_margin: float = Field(0.15, ge=0, le=4)
    """The estimated peak is multiplied by 1 + this before it is compared with a device's memory,
    for what the estimate leaves out (allocator fragmentation, kernel workspaces)."""

    @field_validator("memory_gib")
    @classmethod
    def _memory_is_sane(cls, memory: dict[str, float]) -> dict[str, float]:
        for kind, gib in memory.items():
            if not (1 <= gib <= 4096):
                raise ValueError(f"devices.memory_gib[{kind}] must be within 1..4096 GiB, got {gib}")
        return memory

    def memory_bytes(self, device_kind: str) -> int | None:
        """Bytes of one device of the kind; None when the table does not know it."""
        gib = self.memory_gib.get(device_kind)
        return None if gib is None else int(gib * GIB)


class RayConfig(_Section):
    address: str | None = None
    """Ray cluster to join (e.g. "auto" or ray://host:10001). None starts a local cluster."""
    num_cpus: int | None = None
    """Logical CPUs of a local cluster; None lets Ray count them."""
    app_name: str = "farm"
    """Name of the Serve application."""


class QualityGate(_Section):
    """Thresholds on the quality scores of a render's delivered clip and what happens
    when one is crossed. A threshold left None is not checked."""

    action: Literal["off", "fail", "retry"] = "off"
    """off: scores are only reported. fail: a render that crosses a threshold fails
    with the scores in its error. retry: it is rendered again with the next unused
    seed, up to max_retries times, and fails if it still crosses one."""
    min_temporal_consistency: float | None = Field(None, ge=0, le=1)
    """Lowest temporal consistency (1 when no frame-to-frame change stands out)."""
    max_flicker: float | None = Field(None, ge=0)
    """Highest flicker, luminance levels of brightness change that motion does not explain."""
    min_motion_smoothness: float | None = Field(None, ge=0, le=1)
    """Lowest motion smoothness (1 when the amount of motion is steady)."""
    reject_frozen: bool = True
    """Whether a frozen clip (it stands still) crosses the gate."""
    max_retries: int = Field(2, ge=0, le=10)
    """Renders again with a new seed at most this many times (action retry)."""


class PostprocConfig(_Section):
    """The post-processing deployment: frame-parallel interpolation, upscaling, color
    matching, quality scores and segment encoding of every render's frames."""

    replicas: int = Field(2, ge=1, le=4096)
    """Post-processing replicas (each single-threaded by default, so one per core)."""
    max_replicas: int | None = Field(None, ge=1, le=4096)
    """With a value above `replicas`, Serve autoscales the deployment between the two
    by the chunks waiting for a replica."""
    num_cpus: float = Field(1, gt=0)
    """CPUs per replica (Ray resource); also the threads OpenCV and x264 use in it, and
    the core-seconds per second that the replica's work is charged as."""
    num_gpus: float = Field(0, ge=0)
    """GPUs per replica (for the learned upscaler); 0 runs on CPU."""
    niceness: int = Field(10, ge=0, le=19)
    """CPU priority the replicas lower themselves to (Unix nice): where they share cores
    with an engine, the engine, which is the product, preempts them, and post-processing
    fills the gaps the engine leaves. 0 keeps them equal."""
    device_kind: str | None = None
    """Price-table kind the replicas are charged as. None: CPU (per core-second) for a CPU
    replica, the GPU's kind detected from its name for a GPU replica."""
    chunk_frames: int = Field(16, ge=2, le=1024)
    """Frames of the engine's output per chunk (neighbouring chunks share one seam frame).
    Smaller chunks spread a clip over more replicas; each chunk costs one round trip
    and one keyframe."""
    max_ongoing_requests: int = Field(2, ge=1, le=64)
    """Chunks a replica holds at once; it works on one at a time. 2: the next chunk waits
    in the replica with its frames already read, so the replica never idles between
    chunks (a chunk left waiting in the caller's router is retried with a backoff of up
    to 0.5 s). 1 balances a few uneven chunks better and loses one chunk, not two, when
    a replica dies; either way lost chunks are sent again."""
    chunk_retries: int = Field(3, ge=0, le=20)
    """A chunk whose replica died is sent again (Serve routes it to a live replica) at
    most this many times before the render fails; the render never restarts for it."""
    upscaler_weights: str | None = None
    """Weights of a learned super-resolution model (Real-ESRGAN, ESRGAN, SwinIR, ...; .pth or
    .safetensors) loaded through spandrel; None upscales with Lanczos. The model runs at its
    own scale and the result is resized to the requested factor."""
    upscaler_tile: int = Field(256, ge=32)
    """Tile side (input pixels) of the learned upscaler, bounding its memory."""
    interpolator_weights: str | None = None
    """A TorchScript file of a learned frame interpolator (RIFE family, exported with its
    (frame0, frame1, t) -> frame interface, float tensors (1, 3, H, W) in [0, 1] and a
    float t); None interpolates with optical flow."""
    quality: QualityGate = Field(default_factory=QualityGate)
    """Quality thresholds and what crossing one does."""

    @model_validator(mode="after")
    def _check(self) -> "PostprocConfig":
        if self.max_replicas is not None and self.max_replicas < self.replicas:
            raise ValueError(f"postproc.max_replicas ({self.max_replicas}) is below replicas ({self.replicas})")
        return self

    @property
    def threads(self) -> int:
        return max(1, int(self.num_cpus))


class TracingConfig(_Section):
    """OpenTelemetry tracing of every render: a span per RPC at the gateway, per queue wait
    and attempt in the scheduler, per phase in the engine, per chunk in post-processing."""

    otlp_endpoint: str | None = Field(None, pattern=r"^(https?://)?[^\s/]+(:\d+)?/?$")
    """OTLP/gRPC collector, e.g. http://otel-collector:4317 (http:// is plaintext). None:
    tracing is off, and costs nothing."""
    sample_ratio: float = Field(1.0, ge=0, le=1)
    """Share of new traces kept; a caller's traceparent decides for its own trace."""
    flush_interval_s: float = Field(2.0, gt=0, le=60)
    """How often each process exports its batched spans."""
    headers: dict[str, str] = Field(default_factory=dict)
    """Sent with every export (e.g. a collector's API key)."""


class FarmConfig(BaseSettings):
    """The whole farm. See the module docstring for where values come from."""

    model_config = SettingsConfigDict(
        env_prefix="FARM_", env_nested_delimiter="__", extra="forbid", use_attribute_docstrings=True
    )

    home: Path = Field(default_factory=default_home)
    """Directory holding every piece of embedded state: database, artifacts, tiny models, keys, logs."""
    gateway: GatewayConfig = Field(default_factory=GatewayConfig)
    """The gRPC gateway."""
    store: StoreConfig = Field(default_factory=StoreConfig)
    """The job store."""
    artifacts: ArtifactConfig = Field(default_factory=ArtifactConfig)
    """Where MP4s and manifests go."""
    scheduler: SchedulerConfig = Field(default_factory=SchedulerConfig)
    """The scheduler deployment."""
    models: list[ModelConfig] | None = None
    """The models served. None serves the tiny random-weight models under $FARM_HOME/models
    (written by `farm models make-tiny`, or at first start)."""
    prices: PriceConfig = Field(default_factory=PriceConfig)
    """Device prices for metering."""
    devices: DeviceConfig = Field(default_factory=DeviceConfig)
    """GPU memory per device kind, against which renders are checked at submit and routed."""
    ray: RayConfig = Field(default_factory=RayConfig)
    """The Ray cluster."""
    postproc: PostprocConfig = Field(default_factory=PostprocConfig)
    """Post-processing replicas and quality thresholds."""
    tracing: TracingConfig = Field(default_factory=TracingConfig)
    """OpenTelemetry traces of renders (off by default)."""
    adapters: list[AdapterConfig] = Field(default_factory=list)
    """LoRA adapters offered to every model of the families each names."""

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (env_settings, init_settings)

    @model_validator(mode="after")
    def _check(self) -> "FarmConfig":
        self.home = self.home.expanduser()
        adapter_names = [a.name for a in self.adapters]
        if len(adapter_names) != len(set(adapter_names)):
            raise ValueError(f"adapters: names must be unique, got {adapter_names}")
        names = [m.name for m in self.served_models()]
        if len(names) != len(set(names)):
            raise ValueError(f"models: names must be unique, got {names}")
        for model in self.served_models():
            kind = model.device_kind
            if kind is not None and kind not in self.prices.dollars_per_device_hour:
                raise ValueError(
                    f"models[{model.name}].device_kind {kind!r} has no price in prices.dollars_per_device_hour"
                )
            adapter_names = [a.name for a in model.adapters]
            if len(adapter_names) != len(set(adapter_names)):
                raise ValueError(f"models[{model.name}].adapters: names must be unique, got {adapter_names}")
            if adapter_names and model.backend.name in ("onnx", "fp8"):
                # An exported graph never sees LoRA layers, and peft cannot wrap FP8 layers.
                raise ValueError(f"models[{model.name}] offers adapters {adapter_names}, which the "
                                 f"{model.backend.name} backend cannot apply: use eager or compile")
            kinds = [p.device_kind for p in model.pools or ()]
            if len(kinds) != len(set(kinds)):
                raise ValueError(f"models[{model.name}].pools: one pool per device kind, got {kinds}")
            for kind in kinds:
                if kind not in self.prices.dollars_per_device_hour:
                    raise ValueError(
                        f"models[{model.name}].pools device_kind {kind!r} has no price in prices.dollars_per_device_hour"
                    )
            for pool in model.resolved_pools():
                if pool.num_gpus and pool.device_kind != "auto" and pool.device_kind not in self.devices.memory_gib:
                    raise ValueError(
                        f"models[{model.name}] pool {pool.device_kind!r} runs on GPUs (num_gpus {pool.num_gpus:g}) but "
                        f"devices.memory_gib has no {pool.device_kind!r}: give its GiB, so that renders it cannot "
                        f"hold are refused at submit"
                    )
        return self

    # Derived locations of the embedded defaults: all under `home`.
    @property
    def store_url(self) -> str:
        return self.store.url or f"sqlite:///{self.home / 'farm.db'}"

    @property
    def artifacts_url(self) -> str:
        return self.artifacts.url or str(self.home / "artifacts")

    @property
    def models_dir(self) -> Path:
        return self.home / "models"

    @property
    def keys_dir(self) -> Path:
        return self.home / "keys"

    @property
    def logs_dir(self) -> Path:
        return self.home / "logs"

    def served_models(self) -> list[ModelConfig]:
        """The models served, each with the adapters it offers (its own and the farm's of its family)."""
        models = self.models if self.models is not None else tiny_model_configs(self.models_dir)
        if not self.adapters:
            return models
        return [model.model_copy(update={"adapters": model.adapters + [
            adapter for adapter in self.adapters
            if model.family in adapter.families and adapter.name not in {a.name for a in model.adapters}]})
            for model in models]

    def model(self, name: str) -> ModelConfig | None:
        return next((m for m in self.served_models() if m.name == name), None)


def tiny_model_configs(models_dir: Path) -> list[ModelConfig]:
    """The models a farm serves when its config names none: each family's tiny one under
    models_dir (written by `farm.engines.tiny.make_tiny_models`).

    They take their family's limits unchanged and small defaults for a quick demo.
    """
    models_dir = Path(models_dir)
    return [
        ModelConfig(
            name=tiny.name,
            family=family,
            sources={task: str(models_dir / directory) for task, directory in tiny.directories.items()},
            defaults=tiny.defaults.model_copy(),
        )
        for family, tiny in tiny_models()
    ]


def load_config(path: str | Path | None = None, **overrides: Any) -> FarmConfig:
    """Builds the config from a YAML file (or $FARM_CONFIG), env vars and overrides."""
    path = path or os.environ.get("FARM_CONFIG")
    data: dict[str, Any] = {}
    if path:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
    data.update(overrides)
    return FarmConfig(**data)
