"""Reading LatentSync-format YAML configs.

A config file is either a whole inference config (``stage2.yaml`` with ``data``, ``run`` and
``model`` sections) or a bare ``model`` section. Both are normalised to the whole form.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from lipsync.errors import LipSyncError

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
"""Repository ``configs/`` folder (UNet configs and the DDIM scheduler config)."""


class ConfigError(LipSyncError):
    """A config file is missing, unreadable or lacks a required section: the server's fault, never the job's."""


def read_yaml(path: str | Path, what: str) -> Any:
    """Parse the YAML file at ``path``; an unreadable file or bad YAML raises :class:`ConfigError`.

    ``what`` names the file in messages (e.g. ``"faces config"``).
    """
    path = Path(path)
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{what} {path} is not valid YAML: {exc}") from None


def load_config(path: str | Path) -> dict[str, Any]:
    """Return the config at ``path`` as ``{"model": {...}, "data": {...}, "run": {...}}``.

    A bare model section (a mapping that has ``block_out_channels`` at top level) is wrapped
    as ``{"model": section}`` with empty ``data`` and ``run`` sections.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"UNet config not found: {path}")
    raw = read_yaml(path, "UNet config")
    if not isinstance(raw, dict):
        raise ConfigError(f"UNet config {path} must be a mapping, got {type(raw).__name__}")
    if "model" in raw:
        config = dict(raw)
    elif "block_out_channels" in raw:
        config = {"model": raw}
    else:
        raise ConfigError(f"UNet config {path} has neither a 'model' section nor UNet fields")
    if not isinstance(config["model"], dict):
        raise ConfigError(f"UNet config {path}: 'model' must be a mapping")
    config.setdefault("data", {})
    config.setdefault("run", {})
    return config
