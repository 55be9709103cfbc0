"""What the web page shows before any key is entered: the weights, the job options, where keys are."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter

from gateway.api.deps import RuntimeDep, SettingsDep
from gateway.cli import LOCAL_KEY_FILE
from gateway.schemas import Info, KeyPlaces, option_rules
from gateway.served import demo_weights, served_defaults

router = APIRouter()


@router.get("/v1/info")
def info(settings: SettingsDep, runtime: RuntimeDep) -> Info:
    """Names the files that hold keys, never a key itself."""
    candidates = [settings.data_dir / LOCAL_KEY_FILE]  # made by `lipsync-serve up` when no key is configured
    if settings.api_keys_file:
        candidates.append(Path(settings.api_keys_file).resolve())
    files = [str(path) for path in candidates if path.is_file()]
    return Info(
        weights=runtime.weights.value, demo_weights=demo_weights(),
        api_keys=KeyPlaces(env=settings.api_keys_env, files=files),
        options=option_rules(), defaults=served_defaults(runtime.weights.value),
    )
