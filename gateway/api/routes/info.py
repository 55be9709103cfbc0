"""What the web page shows before any key is entered: the weights, the job options, where keys are."""

from __future__ import annotations

from fastapi import APIRouter
from pydantic import BaseModel, Field

from gateway.api.deps import RuntimeDep, SettingsDep
from gateway.backends.served import demo_weights, served_defaults
from gateway.core.auth import LOCAL_KEY_FILE
from gateway.jobs.schemas import OptionRule, option_rules

router = APIRouter()


class KeyPlaces(BaseModel):
    """Where API keys are configured, by kind: never a key or a server path."""

    env: str = Field(description="the environment variable that holds keys")
    local_key_file: str | None = Field(description="the key file's name in the data folder when `up` made one")
    keys_file: bool = Field(description="whether an api_keys_file is configured")


class Info(BaseModel):
    """What the web page is built from."""

    weights: str | None
    demo_weights: str
    api_keys: KeyPlaces
    options: dict[str, OptionRule]
    defaults: dict[str, int | float | str] = Field(
        description="what a job that leaves an option out gets from the served configuration; "
        "those that depend on the weights only once Triton has said which it serves"
    )


@router.get("/v1/info")
def info(settings: SettingsDep, runtime: RuntimeDep) -> Info:
    """Says where keys are configured, by kind, never a key or a server path (anyone may ask)."""
    local = (settings.data_dir / LOCAL_KEY_FILE).is_file()  # made by `lipsync-serve up` when no key is configured
    return Info(
        weights=runtime.weights.value,
        demo_weights=demo_weights(),
        api_keys=KeyPlaces(
            env=settings.api_keys_env,
            local_key_file=LOCAL_KEY_FILE if local else None,
            keys_file=bool(settings.api_keys_file),
        ),
        options=option_rules(),
        defaults=served_defaults(runtime.weights.value, runtime.jobs.media),
    )
