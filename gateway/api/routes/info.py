"""What the web page shows before any key is entered: the weights, the job options, where keys are."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from fastapi import APIRouter

from gateway.api.deps import RuntimeDep, SettingsDep
from gateway.backends.served import demo_weights
from gateway.core.auth import LOCAL_KEY_FILE
from gateway.jobs.schemas import option_rules

router = APIRouter()


@router.get("/v1/info")
def info(settings: SettingsDep, runtime: RuntimeDep) -> dict[str, Any]:
    """Says where keys are configured, by kind, never a key or a server path (anyone may ask)."""
    local = (settings.data_dir / LOCAL_KEY_FILE).is_file()  # made by `lipsync-serve up` when no key is configured
    return {
        "weights": runtime.weights.value, "demo_weights": demo_weights(),
        "api_keys": {"env": settings.api_keys_env, "local_key_file": LOCAL_KEY_FILE if local else None,
                     "keys_file": bool(settings.api_keys_file)},
        "options": option_rules(), "defaults": asdict(settings.defaults),
    }
