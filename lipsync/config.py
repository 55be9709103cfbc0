"""Configuration files: the ``configs/`` folder shipped inside the package, read once, checked by schemas.

Every settings class is a pydantic dataclass (:data:`SCHEMA`: frozen, unknown fields refused).
:func:`load_settings` validates a file, or one section of it, plus keyword overrides (command-line flags,
config.pbtxt parameters) against its class, so a missing, unknown or ill-typed field raises
:class:`ConfigError` naming the file and the field. A file is parsed once per process and again only
when it changes on disk.

Relative data paths in the configs (checkpoint roots, the serving work folder, a mask image) are taken
from :data:`HOME`: the repository root when the package runs from a source checkout, the current
working directory otherwise.

:func:`load_config` reads LatentSync-format UNet configs: either a whole inference config
(``stage2.yaml`` with ``data``, ``run`` and ``model`` sections) or a bare ``model`` section, both
normalised to the whole form.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Hashable, Mapping
from functools import lru_cache
from importlib.resources import files
from pathlib import Path
from typing import Any, TypeVar, cast

import yaml
from pydantic import ConfigDict, TypeAdapter, ValidationError

from lipsync.errors import LipSyncError

CONFIG_DIR = Path(str(files("lipsync") / "configs"))
"""The package's ``configs/`` folder (in a checkout, a link to the repository's top-level ``configs/``)."""
PIPELINE_CONFIG = CONFIG_DIR / "pipeline.yaml"
"""How one job runs (``lipsync.pipeline.PipelineSettings``), its ETA's learning included."""

_CHECKOUT = Path(str(files("lipsync"))).resolve().parent
HOME = _CHECKOUT if (_CHECKOUT / "pyproject.toml").is_file() else Path.cwd()
"""Where relative data paths of the configs are taken from."""

SCHEMA = ConfigDict(extra="forbid")
"""Pydantic config of every settings dataclass: a field the schema does not know is an error."""

T = TypeVar("T")


class ConfigError(LipSyncError):
    """A config file is missing, unreadable or lacks a required section: the server's fault, never the job's."""


def home_path(path: str | Path) -> Path:
    """``path`` as given when absolute, else below :data:`HOME`."""
    return HOME / Path(path)


def read_yaml(path: str | Path, what: str) -> Any:
    """Parse the YAML (or JSON) file at ``path``, once per version of the file.

    An unreadable file or bad YAML raises :class:`ConfigError`; ``what`` names the file in messages
    (e.g. ``"faces config"``). Each caller gets its own copy: editing it leaves the parsed file as read.
    """
    return copy.deepcopy(_parse(*_version(path, what), what))


def _version(path: str | Path, what: str) -> tuple[Path, int]:
    """The file's absolute path and modification time: the cache key of its parsed content."""
    path = Path(path)
    try:
        return path.resolve(), path.stat().st_mtime_ns
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc}") from None


@lru_cache(maxsize=64)
def _parse(path: Path, modified: int, what: str) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
        return json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc}") from None
    except (yaml.YAMLError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{what} {path} is not valid YAML: {exc}") from None


def load_settings(schema: type[T], path: str | Path, what: str, section: str | None = None, **overrides: Any) -> T:
    """Validate the file at ``path`` (or its ``section``) against ``schema``; ``None`` overrides are ignored.

    Relative paths among the overrides (command-line flags) are taken from the working directory, not
    :data:`HOME`. Without overrides the result is cached with the parsed file, so every caller shares one object.
    """
    given = {
        key: value.absolute() if isinstance(value, Path) else value
        for key, value in overrides.items()
        if value is not None
    }
    if not given:
        return cast(T, _validated(cast(Hashable, schema), *_version(path, what), what, section))  # classes hash
    return _validate(schema, _section(read_yaml(path, what), path, what, section) | given, path, what)


@lru_cache(maxsize=64)
def _validated(schema: Any, path: Path, modified: int, what: str, section: str | None) -> Any:
    """:func:`_validate` of the file's ``modified`` version, cached (``schema`` is a class or a type form)."""
    return _validate(schema, _section(_parse(path, modified, what), path, what, section), path, what)


def _section(raw: Any, path: str | Path, what: str, section: str | None) -> dict[str, Any]:
    values = raw.get(section) if section is not None and isinstance(raw, dict) else raw
    if not isinstance(values, dict):
        where = f"section {section!r} of " if section else ""
        raise ConfigError(f"{where}{what} {path} must be a mapping")
    return dict(values)


def _validate(schema: type[T], values: dict[str, Any], path: str | Path, what: str) -> T:
    try:
        return TypeAdapter(schema).validate_python(values)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(map(str, error['loc'])) or 'top level'}: {error['msg']}" for error in exc.errors()
        )
        raise ConfigError(f"{what} {path} is malformed: {problems}") from None


def load_config(path: str | Path) -> dict[str, Any]:
    """Return the UNet config at ``path`` as ``{"model": {...}, "data": {...}, "run": {...}}``.

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


RUN_OPTIONS = ("inference_steps", "guidance_scale", "seed")
"""The job options whose only default is the served UNet config's ``run`` section."""


def run_defaults(config: Mapping[str, Any]) -> dict[str, Any]:
    """The ``run`` section's :data:`RUN_OPTIONS` of a UNet config (:func:`load_config`): what a job sending none gets."""
    run = config.get("run", {})
    missing = [name for name in RUN_OPTIONS if name not in run]
    if missing:
        raise ConfigError(f"the UNet config's run section lacks {', '.join(missing)}")
    return {name: run[name] for name in RUN_OPTIONS}
