"""All configuration, from `GRAFT_*` environment variables, validated at start-up.

Secrets can also come as files, one per setting, named like its variable, in the folder
`GRAFT_SECRETS_DIR` names: a Kubernetes Secret mounted as a volume, or Docker's secrets
(`GRAFT_SECRETS_DIR=/run/secrets` holding a file `GRAFT_ADMIN_KEY`). A variable set in
the environment wins over its file; a folder that does not exist is warned of.
"""

from __future__ import annotations

import hashlib
import os
import socket
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from models.quantize import Variant
from models.registry import BackboneFileError, BackboneSpec, load_catalog

# The backbones a server loads unless GRAFT_BACKBONES says otherwise: two of each modality
# where there are two, so that `auto` has a choice, and the two cheapest of each:
# EfficientNet-Lite0 and MobileNetV2 (about equally accurate on flowers, each best on some
# sets), MiniLM-L6 (fast) and MPNet (the most accurate with a few examples, about 3x
# slower); and the one speech encoder (17 MB). Lite1 and Lite2 cost more for a point or
# two; an operator adds them (README, Backbones).
DEFAULT_BACKBONES = (
    "efficientnet_lite0",
    "mobilenet_v2",
    "minilm_l6",
    "mpnet_base_v2",
    "resemblyzer_ge2e",
)

# AF_UNIX socket paths are limited to 108 bytes, the final NUL included.
MAX_SOCKET_PATH = 107


def _host_and_folder(data_dir: Path) -> str:
    digest = hashlib.sha256(os.fsencode(data_dir)).hexdigest()[:8]
    return f"{socket.gethostname()}-{digest}"


def usable_cores() -> int:
    """The cores this process may run on (a container's cpuset), not the host's."""
    return len(os.sched_getaffinity(0))


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="GRAFT_", extra="ignore", secrets_dir=os.environ.get("GRAFT_SECRETS_DIR")
    )

    # A default below that depends on another setting is computed from it: `data` holds
    # the settings declared above it, already validated.
    data_dir: Path = Field(Path(".graft"), description="SQLite database and state")
    database_url: str = Field(
        default_factory=lambda data: f"sqlite:///{data['data_dir'] / 'graft.sqlite3'}",
        description="SQLAlchemy URL of the store: default a SQLite file in the data directory;"
        " postgresql+psycopg://user:password@host/db for a fleet of replicas",
    )
    backbone_dir: Path = Field(
        default_factory=lambda data: data["data_dir"] / "backbones",
        description="cache of exported ONNX backbones; default <data_dir>/backbones",
    )
    admin_key: str | None = Field(
        None, description="admin bearer key; when unset, read from <data_dir>/admin.key"
    )
    backbones_file: Path | None = Field(
        None,
        description="a TOML file declaring backbones beside the built-in ones"
        " (models/backbones.toml; README, Backbones)",
    )
    backbones: str = Field(
        ",".join(DEFAULT_BACKBONES),
        description="ids of the backbones this server loads, comma-separated",
    )
    device: Literal["cpu", "cuda", "auto"] = "cpu"
    variant: Variant = Field(
        "fp32",
        description="backbone weights served: fp32, INT8 (ONNX Runtime quantised, for the"
        " CPU) or fp16 (for a GPU)",
    )
    fine_tuning: bool = Field(
        True,
        description="serve backbones that split as a shared trunk and top, so that heads may be"
        " fine-tuned (README, Fine-tuning); off: whole graphs, frozen heads only",
    )
    # Off by default: a line per request costs about 7% of predict throughput on 2 cores
    # (bench/serving.py); /metrics still counts every request.
    access_log: bool = Field(False, description="one log line per request (BentoML's)")
    end_with_parent: bool = Field(
        True,
        description="the server ends (every process of it) when the process that started it"
        " dies (make serve, a supervisor); false for one left running on purpose (nohup)",
    )
    api_workers: int = Field(
        default_factory=usable_cores,
        ge=1,
        le=256,
        description="API worker processes (HTTP, decoding, heads, training); default: the cores",
    )
    runner_socket: Path = Field(
        default_factory=lambda data: data["data_dir"] / "run" / "runner.sock",
        description="the backbone runner's Unix socket; default <data_dir>/run/runner.sock",
    )
    runner_link: str | None = Field(
        None,
        description="tcp://host:port: the runner's link over TCP, for a runner in pods of its"
        " own (it listens there; API workers connect there); needs GRAFT_RUNNER_KEY",
    )
    runner_key: str | None = Field(
        None, description="the secret both ends of a TCP runner link prove they hold"
    )
    runner_url: str | None = Field(
        None,
        description="the runner service's HTTP URL when it runs on its own (`bentoml serve"
        " service.service:BackboneRunner`); this server then starts none",
    )
    backbone_lanes: int = Field(
        # On the CPU, one single-threaded pass per core costs 10-15% less CPU per row than
        # one pass over every core (its threads wake each other); a GPU is one.
        default_factory=lambda data: 1 if data.get("device") == "cuda" else usable_cores(),
        ge=1,
        le=256,
        description="backbone passes the runner runs side by side, per backbone; default:"
        " the cores on the CPU (a thread each), 1 on cuda",
    )
    intra_op_threads: int = Field(
        0, ge=0, description="ONNX Runtime threads per backbone pass; 0 = the cores ÷ lanes"
    )
    backbone_batch_size: int = Field(
        # A GPU's throughput keeps growing to a few hundred rows (BENCHMARKS.md). On the CPU
        # a one-thread pass costs 5-10% less per row at 1-4 rows than at 8-32 (the
        # activations stay in cache), and the lanes run such passes side by side.
        default_factory=lambda data: 256 if data.get("device") == "cuda" else 4,
        ge=1,
        le=1024,
        description="max rows per backbone pass; default 4, 256 on cuda",
    )
    batch_max_latency_ms: float = Field(
        5.0, ge=0, le=1000, description="longest a row waits for its batch to fill"
    )
    training_slice_ms: float = Field(
        20.0,
        gt=0,
        le=10_000,
        description="longest backbone pass of training rows, run only while no predict waits",
    )
    head_cache_bytes: int = Field(256 * 1024 * 1024, ge=0, description="LRU of served heads")
    cache_poll_s: float = Field(
        0.1,
        gt=0,
        le=0.4,
        description="how often each process reads the store's change count; a change"
        " anywhere reaches its cached heads and keys within about this",
    )
    predict_timeout_s: float = Field(60.0, gt=0)

    # Training
    training_workers: int = Field(1, ge=1, le=16)
    replica_id: str = Field(
        default_factory=lambda data: _host_and_folder(data["data_dir"]),
        description="this replica's name in training-job leases, unique in a fleet; default"
        " the host name and a hash of the data directory",
    )
    job_lease_s: float = Field(
        30.0,
        ge=3,
        le=3600,
        description="a training job whose process stops renewing its lease for this long is"
        " taken over by another (replicas' clocks must agree to well within it)",
    )
    sync_training_timeout_s: float = Field(
        20.0, ge=0, description="answer 201 if training finishes within this, else 202"
    )

    # Limits on what a request may carry
    max_body_bytes: int = Field(64 * 1024 * 1024, ge=1024)
    max_examples_per_request: int = Field(5000, ge=1)
    max_predict_inputs: int = Field(256, ge=1)
    max_image_pixels: int = Field(40_000_000, ge=1)
    max_text_chars: int = Field(10_000, ge=1)
    # A clip's bytes count against max_body_bytes like an image's; its length is capped
    # here (the graph's work grows with it: one partial window per 0.77 s).
    max_audio_seconds: float = Field(30.0, gt=0, le=3600)
    max_labels: int = Field(1000, ge=2)
    max_label_chars: int = Field(200, ge=1)
    max_archive_files: int = Field(10_000, ge=1)
    max_archive_bytes: int = Field(512 * 1024 * 1024, ge=1)

    # Per-tenant limits: what one tenant may hold and how fast it may call
    max_heads_per_tenant: int = Field(1000, ge=1)
    max_examples_per_head: int = Field(20_000, ge=2)
    # Unlabelled examples of the domain a head serves (adaptation is fitted on a third).
    max_unlabeled_per_head: int = Field(2_000, ge=1)
    rate_limit_per_s: float = Field(
        200.0, ge=0, description="sustained requests per second per tenant key; 0 = no limit"
    )
    rate_limit_burst: int = Field(400, ge=1, description="requests a tenant may send at once")

    @field_validator("data_dir")
    @classmethod
    def _absolute(cls, data_dir: Path) -> Path:
        return data_dir.expanduser().resolve()

    @field_validator("device")
    @classmethod
    def _resolve_device(cls, device: str) -> str:
        # Resolved once, here: the batch size, the lanes and the runner's GPU request all
        # follow the device actually used.
        if device != "auto":
            return device
        import onnxruntime

        return "cuda" if "CUDAExecutionProvider" in onnxruntime.get_available_providers() else "cpu"

    @model_validator(mode="after")
    def _check(self) -> Settings:
        self.backbone_dir = self.backbone_dir.expanduser().resolve()
        if self.backbones_file is not None:
            self.backbones_file = self.backbones_file.expanduser().resolve()
        ids = list(dict.fromkeys(i.strip() for i in self.backbones.split(",") if i.strip()))
        if not ids:
            raise ValueError("GRAFT_BACKBONES names no backbone")
        self.backbones = ",".join(ids)
        # A bad backbones file, an unknown id or a missing weights file fails here, at
        # start, naming the entry.
        try:
            catalog = load_catalog(self.backbones_file, self.sources_dir, check_files=ids)
        except BackboneFileError as exc:
            raise ValueError(str(exc)) from None
        unknown = [i for i in ids if i not in catalog]
        if unknown:
            raise ValueError(
                f"GRAFT_BACKBONES: unknown backbones {unknown}; known: {', '.join(catalog)}"
            )
        if self.intra_op_threads == 0:
            self.intra_op_threads = max(1, usable_cores() // self.backbone_lanes)
        if len(os.fsencode(self.runner_socket)) > MAX_SOCKET_PATH:
            raise ValueError(
                f"the runner socket path {self.runner_socket} is over {MAX_SOCKET_PATH} bytes"
                " (a Unix socket limit): set GRAFT_RUNNER_SOCKET to a shorter path"
            )
        if self.runner_link is not None:
            if self.runner_link_address is None:
                raise ValueError(
                    f"GRAFT_RUNNER_LINK must be tcp://host:port, not {self.runner_link!r}"
                )
            if self.runner_key is None or len(self.runner_key) < 16:
                raise ValueError("GRAFT_RUNNER_LINK needs GRAFT_RUNNER_KEY, at least 16 characters")
        if self.admin_key is not None and len(self.admin_key) < 16:
            raise ValueError("GRAFT_ADMIN_KEY must be at least 16 characters")
        return self

    @property
    def run_dir(self) -> Path:
        """State of this machine's running server only: the runner's socket, rate buckets."""
        return self.data_dir / "run"

    @property
    def runner_link_address(self) -> tuple[str, int] | None:
        """GRAFT_RUNNER_LINK as (host, port); None when unset or not tcp://host:port."""
        if self.runner_link is None or not self.runner_link.startswith("tcp://"):
            return None
        host, _, port = self.runner_link.removeprefix("tcp://").rpartition(":")
        return (host.strip("[]"), int(port)) if host and port.isdigit() else None

    @property
    def backbone_ids(self) -> list[str]:
        """The backbones this server loads (GRAFT_BACKBONES, or the default set)."""
        return self.backbones.split(",")

    @property
    def sources_dir(self) -> Path:
        """Where weights shipped in pieces are joined and unpacked, once."""
        return self.backbone_dir / "sources"

    @property
    def catalog(self) -> dict[str, BackboneSpec]:
        """Every declared backbone: the built-ins and GRAFT_BACKBONES_FILE's."""
        return load_catalog(self.backbones_file, self.sources_dir)

    def documented_limits(self) -> str:
        """What a request may carry on this server, as the API document states it."""
        return (
            f"Limits on this server: a request body of at most {self.max_body_bytes:,} bytes;"
            f" at most {self.max_predict_inputs} inputs per predict and"
            f" {self.max_examples_per_request:,} examples per request; images of at most"
            f" {self.max_image_pixels:,} pixels; texts of at most {self.max_text_chars:,}"
            f" characters; clips of at most {self.max_audio_seconds:g} s each (their bytes"
            " count against the body's)."
        )

    def loaded_backbones(self) -> list[BackboneSpec]:
        """The backbones this server loads, lists, trains and serves."""
        catalog = self.catalog
        return [catalog[i] for i in self.backbone_ids]

    def fine_tunable(self, spec: BackboneSpec) -> bool:
        """Whether heads on this backbone may be fine-tuned here: a backbone that can be
        split (models/split.py), served in fp32 (its trunk and top are not quantised)."""
        return self.fine_tuning and self.variant == "fp32" and spec.build_split is not None

    @property
    def publish_delay_s(self) -> float:
        """How long after a write its answer waits, so that every polling process has seen
        it: two polls, and a margin for a busy machine."""
        return 2 * self.cache_poll_s + 0.05

    @property
    def admin_key_path(self) -> Path:
        return self.data_dir / "admin.key"


def list_backbones(ids: Sequence[str] | None = None) -> list[BackboneSpec]:
    """Every declared backbone of this process's settings (the built-ins and
    GRAFT_BACKBONES_FILE's), or those named by `ids`, in that order."""
    catalog = Settings().catalog
    if ids is None:
        return list(catalog.values())
    unknown = [i for i in ids if i not in catalog]
    if unknown:
        raise KeyError(f"unknown backbones {unknown}; known: {', '.join(catalog)}")
    return [catalog[i] for i in ids]


def get_backbone(backbone_id: str) -> BackboneSpec | None:
    return Settings().catalog.get(backbone_id)
