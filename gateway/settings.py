"""The gateway's settings: ``configs/serving.yaml`` section ``gateway``, then command-line overrides."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gateway.triton_server import REPO_ROOT, SERVING_CONFIG
from lipsync.config import read_yaml


@dataclass(frozen=True)
class JobDefaults:
    """What a submit that leaves these fields out gets."""

    inference_steps: int = 20
    guidance_scale: float = 1.5
    seed: int = 1247


@dataclass(frozen=True)
class GatewaySettings:
    address: str = "127.0.0.1"
    port: int = 8080
    public_url: str = ""
    data_dir: Path = Path(".serve/gateway")
    triton_grpc: str = "127.0.0.1:8001"
    api_keys_env: str = "LIPSYNC_API_KEYS"
    api_keys_file: str = ""
    max_body_mb: float = 200
    rate_limit: str = "600/minute"
    submit_rate_limit: str = "30/minute"
    max_active_jobs: int = 16
    max_concurrent_submits: int = 2
    quota_retry_after_s: int = 10
    concurrency: int = 2
    max_attempts: int = 2
    triton_wait_s: float = 120
    job_timeout_s: float = 3600
    cancel_poll_s: float = 0.5
    retention_h: float = 24
    cleanup_interval_s: float = 600
    webhook_attempts: int = 12
    webhook_backoff_s: float = 2.0
    webhook_backoff_max_s: float = 3600.0
    webhook_timeout_s: float = 10.0
    webhook_concurrency: int = 32
    webhook_per_owner: int = 4
    webhook_allow: tuple[str, ...] = ()
    webhook_secret_env: str = "LIPSYNC_WEBHOOK_SECRET"
    webhook_secret_file: str = ""
    defaults: JobDefaults = field(default_factory=JobDefaults)

    @classmethod
    def load(cls, path: Path = SERVING_CONFIG, **overrides: Any) -> GatewaySettings:
        """Read ``path``; ``None`` overrides are ignored. An empty ``triton_grpc`` means the triton section's."""
        config = read_yaml(path, "serving config")
        values = dict(config["gateway"])
        values["defaults"] = JobDefaults(**values.get("defaults", {}))
        if not values.get("triton_grpc"):
            values["triton_grpc"] = f"{config['triton']['address']}:{config['triton']['grpc_port']}"
        values.update({key: value for key, value in overrides.items() if value is not None})
        values["data_dir"] = REPO_ROOT / Path(values["data_dir"])  # absolute paths stay as they are
        allow = values.get("webhook_allow") or ()
        entries = allow.split(",") if isinstance(allow, str) else allow  # a flag gives "a,b"; YAML a list
        values["webhook_allow"] = tuple(entry.strip() for entry in entries if entry.strip())
        settings = cls(**values)
        if settings.concurrency < 1 or settings.max_attempts < 1:
            raise ValueError("gateway concurrency and max_attempts must be at least 1")
        if min(settings.webhook_attempts, settings.webhook_concurrency, settings.webhook_per_owner) < 1:
            raise ValueError("gateway webhook_attempts, webhook_concurrency and webhook_per_owner must be at least 1")
        return settings

    @property
    def webhook_secret_path(self) -> Path:
        """Where the webhook signing secret is kept when ``$webhook_secret_env`` holds none."""
        return REPO_ROOT / self.webhook_secret_file if self.webhook_secret_file else self.data_dir / "webhook_secret"

    @property
    def base_url(self) -> str:
        """Where clients reach the gateway: the base of every result URL (status answers and webhooks).

        Taken from the configuration only, never from a request's ``Host`` header, which the client chooses.
        """
        return (self.public_url or f"http://{self.address}:{self.port}").rstrip("/")

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 1024 * 1024)
