"""The gateway's settings: ``configs/serving.yaml`` section ``gateway``, then command-line overrides."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BeforeValidator,
    NonNegativeFloat,
    PositiveFloat,
    PositiveInt,
)
from pydantic.dataclasses import dataclass

from lipsync.config import CONFIG_DIR, SCHEMA, home_path, load_settings, read_yaml

QueuePolicy = Literal["fair", "fifo"]
"""Which queued job runs next: ``fair`` takes turns between API keys, ``fifo`` goes by submission (``gateway.store.queue``)."""

SERVING_CONFIG = CONFIG_DIR / "serving.yaml"


def _entries(value: Any) -> Any:
    """A flag gives ``"a,b"``, YAML a list."""
    return [entry.strip() for entry in value.split(",") if entry.strip()] if isinstance(value, str) else value


@dataclass(frozen=True, config=SCHEMA)
class GatewaySettings:
    address: str = "127.0.0.1"
    port: int = 8080
    public_url: str = ""
    data_dir: Annotated[Path, AfterValidator(home_path)] = Path(".serve/gateway")
    """Relative paths in the config are taken from :data:`lipsync.config.HOME`."""
    database_url: str = ""
    """Empty: SQLite in ``data_dir``. ``$database_url_env``, when set, takes its place (it holds a password)."""
    database_url_env: str = "LIPSYNC_DATABASE_URL"
    database_pool_size: PositiveInt = 40
    """PostgreSQL connections a gateway keeps open: as many as requests it runs at once (its thread pool's 40)."""
    lease_s: PositiveFloat = 30
    queue_policy: QueuePolicy = "fair"
    """Which queued job runs next: ``fair`` (round-robin across API keys) or ``fifo`` (:mod:`gateway.store.queue`)."""
    position_ttl_s: NonNegativeFloat = 1.0
    """How long the per-key figures behind ``fair`` queue positions are reused while this gateway changes no job."""
    triton_grpc: str = "127.0.0.1:8001"
    triton_urls: Annotated[tuple[str, ...], BeforeValidator(_entries)] = ()
    """Several Triton gRPC endpoints (``host:port``) to spread jobs over; empty = ``triton_grpc`` alone."""
    triton_urls_env: str = "LIPSYNC_TRITON_URLS"
    triton_health_ttl_s: PositiveFloat = 2.0
    """How long an endpoint's readiness answer is trusted before it is asked again."""
    api_keys_env: str = "LIPSYNC_API_KEYS"
    api_keys_file: str = ""
    max_body_mb: PositiveFloat = 200
    max_batch_items: PositiveInt = 10
    max_batch_body_mb: PositiveFloat = 500
    estimate_history_jobs: PositiveInt = 50
    """Succeeded jobs (newest first) an estimate learns this deployment's stage rates from."""
    rate_limit: str = "600/minute"
    submit_rate_limit: str = "30/minute"
    max_active_jobs: PositiveInt = 16
    max_concurrent_submits: PositiveInt = 2
    quota_retry_after_s: int = 10
    store_retry_s: PositiveInt = 2
    """While the job database is unreachable: the ``Retry-After`` of the 503s, and how often workers try again."""
    concurrency: PositiveInt = 2
    max_attempts: PositiveInt = 2
    triton_wait_s: float = 120
    job_timeout_s: float = 3600
    cancel_poll_s: float = 0.5
    retention_h: float = 24
    min_free_mb: NonNegativeFloat = 256
    cleanup_interval_s: float = 600
    webhook_attempts: PositiveInt = 12
    webhook_backoff_s: float = 2.0
    webhook_backoff_max_s: float = 3600.0
    webhook_timeout_s: float = 10.0
    webhook_concurrency: PositiveInt = 32
    webhook_per_owner: PositiveInt = 4
    webhook_allow: Annotated[tuple[str, ...], BeforeValidator(_entries)] = ()
    webhook_secret_env: str = "LIPSYNC_WEBHOOK_SECRET"
    webhook_secret_file: str = ""

    @classmethod
    def load(cls, path: Path = SERVING_CONFIG, **overrides: Any) -> GatewaySettings:
        """Read ``path`` (once); ``None`` overrides are ignored. ``$triton_urls_env``, when set, replaces
        ``triton_urls`` (an override still wins). An empty ``triton_grpc`` means the triton section's."""
        settings = load_settings(cls, path, "serving config", section="gateway", **overrides)
        env_urls = os.environ.get(settings.triton_urls_env, "")
        if env_urls and overrides.get("triton_urls") is None:
            settings = replace(settings, triton_urls=_entries(env_urls))
        if settings.triton_grpc:
            return settings
        triton = read_yaml(path, "serving config")["triton"]
        return replace(settings, triton_grpc=f"{triton['address']}:{triton['grpc_port']}")

    @property
    def triton_endpoints(self) -> tuple[str, ...]:
        """The gRPC endpoints jobs are sent to."""
        return self.triton_urls or (self.triton_grpc,)

    @property
    def webhook_secret_path(self) -> Path:
        """Where the webhook signing secret is kept when ``$webhook_secret_env`` holds none."""
        return home_path(self.webhook_secret_file) if self.webhook_secret_file else self.data_dir / "webhook_secret"

    @property
    def database(self) -> str:
        """The job table's SQLAlchemy URL; empty for the embedded SQLite table."""
        return os.environ.get(self.database_url_env) or self.database_url

    @property
    def base_url(self) -> str:
        """Where clients reach the gateway: the base of every result URL (status answers and webhooks).

        Taken from the configuration only, never from a request's ``Host`` header, which the client chooses.
        """
        return (self.public_url or f"http://{self.address}:{self.port}").rstrip("/")

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 1024 * 1024)

    @property
    def max_batch_body_bytes(self) -> int:
        return int(self.max_batch_body_mb * 1024 * 1024)
