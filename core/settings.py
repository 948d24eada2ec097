"""Settings of the service and the workers: one typed object read from ``HSC_*`` environment variables.

Every field is documented in the README ("Settings"); ``docker-compose.yml`` may only set variables
named here (a test checks it). ``model`` and ``training`` never read the environment.

List fields accept a comma-separated string (``HSC_API_KEYS=key1,key2``) or a JSON list.
Without ``HSC_REDIS_URL`` the service runs **embedded**: the same task code in a bounded pool of
local processes, job state on local disk under ``HSC_RESULTS_DIR``.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AliasChoices, Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

__all__ = ["DEMO_CHECKPOINT", "Settings", "get_settings"]

#: The small checkpoint the project ships (width-0.125 HSC trained on the synthetic dataset).
DEMO_CHECKPOINT = Path(__file__).resolve().parent / "assets" / "hsc-demo-synth.safetensors"

StrList = Annotated[list[str], NoDecode]


def _split_list(value: object) -> object:
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            return json.loads(text)
        return [part.strip() for part in text.split(",") if part.strip()]
    return value


# the ``winograd`` setting as the Predictor's argument (None: its own choice for the CPU and mode)
WINOGRAD_CHOICES: dict[str, bool | None] = {"auto": None, "on": True, "off": False}


class Settings(BaseSettings):
    """What an operator sets. Read once per process (:func:`get_settings`)."""

    model_config = SettingsConfigDict(env_prefix="HSC_", extra="ignore", frozen=True, populate_by_name=True)

    # --- where things are
    redis_url: str | None = Field(
        default=None,
        description="Redis for the Celery broker and the job records, e.g. redis://redis:6379/0. "
        "Unset: embedded mode (in-process pool, job records on disk).",
    )
    results_dir: Path = Field(
        default=Path("hsc-results"), description="job outputs, uploads, embedded job records"
    )
    checkpoints: StrList = Field(
        default_factory=lambda: [str(DEMO_CHECKPOINT)],
        description="checkpoint files served (ours .safetensors or the official .pth); model id = file stem",
    )
    default_model: str | None = Field(default=None, description="model id used when a request names none")
    allowed_roots: StrList = Field(
        default_factory=list, description="folders server-side job datasets may come from (none: uploads)"
    )
    # --- inference
    device: str = Field(default="auto", description="auto, cpu, cuda or cuda:N")
    mode: Literal["exact", "fast"] = Field(default="exact", description="exact fp32, or fast bf16/fp16")
    winograd: Literal["auto", "on", "off"] = Field(
        default="auto",
        description="Winograd for the wide 3x3 convolutions on the CPU (exact: float32 F(4x4,3x3), "
        "fast: bfloat16 F(2x2,3x3)); auto: exact always, fast where it pays (AVX-512 bf16, no AMX)",
    )
    compile: bool = Field(
        default=False,
        description="torch.compile the network at load (tens of seconds once, then 10-20 % faster on CPU)",
    )
    crf_workers: int = Field(default=1, ge=0, description="CRF processes beside the network per worker")
    batch_images: int = Field(
        default=0,
        ge=0,
        description="images of one size per network batch in a job; 0: 4 on CUDA, 1 on the CPU",
    )
    torch_threads: int = Field(
        default=0,
        ge=0,
        description="CPU threads per model process; 0: OMP_NUM_THREADS, else the CPUs shared among them",
    )
    # --- limits
    max_upload_bytes: int = Field(default=50 * 1024 * 1024, gt=0)
    max_pixels: int = Field(default=50_000_000, gt=0, description="checked from the image header")
    sync_timeout_s: float = Field(default=60.0, gt=0, description="wait of POST /pseudo-label")
    queue_max: int = Field(default=1000, gt=0, description="queued messages before 503 queue_full")
    job_chunk: int = Field(default=32, gt=0, description="images per worker task of a job")
    max_job_items: int = Field(default=100_000, gt=0)
    idempotency_ttl_h: float = Field(default=24.0, gt=0)
    # --- service
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    api_keys: StrList = Field(
        default_factory=list, description="accepted API keys (X-API-Key or Bearer); none: auth off"
    )
    embedded_workers: int = Field(default=1, ge=1, description="pool processes in embedded mode")
    # --- job webhooks
    webhook_progress_interval_s: float = Field(
        default=5.0, gt=0, description="at most one 'progress' webhook per job in this many seconds"
    )
    webhook_timeout_s: float = Field(default=10.0, gt=0, description="time limit of one webhook POST")
    webhook_attempts: int = Field(
        default=5, ge=1, le=10, description="tries of one webhook delivery (connection errors, 5xx)"
    )
    webhook_hosts: StrList = Field(
        default_factory=list,
        description="hosts job webhooks may go to: names, *.domain, IP addresses or networks; none: any",
    )
    # --- worker (Celery)
    queue: str = Field(default="hsc", description="Celery queue the API sends to and workers read")
    worker_concurrency: int = Field(default=1, ge=1)
    worker_pool: Literal["solo", "prefork", "threads"] = Field(
        default="solo", description="solo on CUDA (one process per GPU); prefork is safe on CPU"
    )
    visibility_timeout_s: float = Field(
        default=7200.0, gt=0, description="redelivery of an unacknowledged task (a killed worker's)"
    )
    task_soft_time_limit_s: float = Field(default=1800.0, gt=0)
    task_time_limit_s: float = Field(default=2100.0, gt=0)
    heartbeat_s: float = Field(default=5.0, gt=0, description="worker heartbeat into Redis")
    log_level: str = "info"
    # --- Label Studio ML backend (/integrations/label-studio)
    ls_url: str | None = Field(
        default=None,
        validation_alias=AliasChoices("HSC_LS_URL", "LABEL_STUDIO_URL", "LABEL_STUDIO_HOST"),
        description="Label Studio base URL, for relative /data/... image links and presigned storage",
    )
    ls_api_key: str | None = Field(
        default=None,
        validation_alias=AliasChoices("HSC_LS_API_KEY", "LABEL_STUDIO_API_KEY", "LABEL_STUDIO_ACCESS_TOKEN"),
        description="sent as 'Authorization: Token ...' to that host only",
    )
    ls_labels_field: str = Field(default="labels", description="task data field with the image-level labels")
    ls_predict_budget_s: float = Field(default=80.0, gt=0, description="time budget of one /predict call")

    @field_validator("checkpoints", "allowed_roots", "api_keys", "webhook_hosts", mode="before")
    @classmethod
    def _lists(cls, value: object) -> object:
        return _split_list(value)

    @property
    def embedded(self) -> bool:
        return not self.redis_url


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
