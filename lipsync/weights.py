"""Checkpoint layout (``configs/weights.yaml``), presence checks and verified Hub downloads.

Downloads go through ``huggingface_hub``, so ``HF_ENDPOINT`` selects a mirror (the hub reads it once,
at import) and ``HF_TOKEN`` / the stored login are used as usual. No exact sizes are published for the
LatentSync checkpoints, so each file is checked against the size the server reports for it, plus the
sanity floors from the config.

Resuming, as huggingface_hub 2.4 does it: a connection dropped mid-transfer is resumed in-process with
an HTTP ``Range`` request (up to 5 times), and Xet-backed repos reuse the ``hf_xet`` chunk cache across
runs. A partial ``*.incomplete`` file left by a killed process is *not* resumed: each download writes
to its own temporary file (huggingface_hub PR #4228), so an interrupted plain-HTTP download restarts.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import httpx2
from huggingface_hub import get_hf_file_metadata, hf_hub_download, hf_hub_url
from pydantic import AfterValidator, NonNegativeInt, model_validator
from pydantic.dataclasses import dataclass as pydantic_dataclass

from lipsync.config import CONFIG_DIR, SCHEMA, ConfigError, home_path, load_settings
from lipsync.errors import WeightsError

WEIGHTS_CONFIG = CONFIG_DIR / "weights.yaml"

HomePath = Annotated[Path, AfterValidator(home_path)]
"""A weights root: relative paths are taken from :data:`lipsync.config.HOME`."""
ConfigPath = Annotated[Path, AfterValidator(lambda path: CONFIG_DIR / path)]
"""A UNet config: relative paths are taken from the configs folder."""


class DownloadError(WeightsError):
    """A file could not be fetched from the Hub (connection, HTTP or transfer failure)."""


@pydantic_dataclass(frozen=True, config=SCHEMA)
class WeightFile:
    """One checkpoint file: where it lands below a root and, if downloadable, its Hub origin.

    The layout is the one ``hf_hub_download(repo, filename, local_dir=root / local_dir)`` produces,
    so ``filename`` is both the name inside the repo and the path below ``local_dir``.
    """

    filename: str
    local_dir: str
    repo: str | None = None
    revision: str = "main"
    size: NonNegativeInt | None = None
    min_size: NonNegativeInt | None = None

    def path(self, root: Path) -> Path:
        return root / self.local_dir / self.filename


@pydantic_dataclass(frozen=True, config=SCHEMA)
class VAESpec:
    """The VAE folder (shared by all versions) and the latent scaling official inference forces."""

    local_dir: str
    files: tuple[WeightFile, ...]
    scaling_factor: float
    shift_factor: float


@pydantic_dataclass(frozen=True, config=SCHEMA)
class VersionSpec:
    """One LatentSync version: its UNet config, default root and version-specific files."""

    name: str
    label: str
    """How the service names this weight set when it reports what it serves, e.g. ``tiny-demo``."""
    root: HomePath
    unet_config: ConfigPath
    unet: WeightFile
    whisper: WeightFile

    @property
    def downloadable(self) -> bool:
        return self.unet.repo is not None


@pydantic_dataclass(frozen=True, config=SCHEMA)
class AuxiliarySpec:
    """The opt-in InsightFace backend's ONNX models (non-commercial weights) and their default root."""

    root: HomePath
    detector: WeightFile
    landmarks: WeightFile


@pydantic_dataclass(frozen=True, config=SCHEMA)
class WeightsConfig:
    """Parsed ``configs/weights.yaml``."""

    vae: VAESpec
    versions: dict[str, VersionSpec]
    auxiliary: AuxiliarySpec

    @model_validator(mode="before")
    @classmethod
    def _from_file(cls, raw: Any) -> Any:
        """Reshape the file's layout: a section's ``repo`` and ``revision`` go to each of its files."""
        if not isinstance(raw, dict):
            return raw  # constructed in code, or not a mapping (refused by validation)
        vae, versions, auxiliary = (_mapping(raw, key) for key in ("vae", "versions", "auxiliary"))
        vae_files = _mapping(vae, "files")
        aux_files = _mapping(auxiliary, "files")
        return {
            "vae": {
                "local_dir": vae.get("local_dir"),
                "files": [
                    {"filename": name, "local_dir": vae.get("local_dir"), **_origin(vae), **(entry or {})}
                    for name, entry in vae_files.items()
                ],
                "scaling_factor": vae.get("scaling_factor"),
                "shift_factor": vae.get("shift_factor"),
            },
            "versions": {
                str(name): {
                    key: value for key, value in _mapping(versions, name).items() if key not in ("repo", "revision")
                }
                | {"name": str(name)}
                | {part: {**_origin(versions[name]), **_mapping(versions[name], part)} for part in ("unet", "whisper")}
                for name in versions
            },
            "auxiliary": {
                "root": auxiliary.get("root"),
                "detector": {**_origin(auxiliary), **_mapping(aux_files, "detector")},
                "landmarks": {**_origin(auxiliary), **_mapping(aux_files, "landmarks_106")},
            },
        }

    def version(self, name: str) -> VersionSpec:
        try:
            return self.versions[name]
        except KeyError:
            known = ", ".join(self.versions)
            raise ConfigError(f"unknown weights version {name!r} (known: {known})") from None

    def files(self, version: str) -> tuple[WeightFile, ...]:
        """Every file ``version`` needs, UNet first."""
        spec = self.version(version)
        return (spec.unet, spec.whisper, *self.vae.files)


def _mapping(raw: dict[str, Any], key: str) -> dict[str, Any]:
    value = raw.get(key)
    if not isinstance(value, dict):
        raise ValueError(f"{key} must be a mapping, got {type(value).__name__}")
    return value


def _origin(section: dict[str, Any]) -> dict[str, Any]:
    return {"repo": section.get("repo"), "revision": section.get("revision", "main")}


@dataclass(frozen=True)
class WeightPaths:
    """Local paths of everything inference loads for one version."""

    unet_config: Path
    unet: Path
    whisper: Path
    vae_dir: Path
    vae_files: tuple[str, ...]
    """Names of the files ``vae_dir`` must hold (diffusers folder format)."""

    @property
    def required(self) -> tuple[Path, ...]:
        return (self.unet_config, self.unet, self.whisper, *(self.vae_dir / name for name in self.vae_files))


def load_weights_config(path: str | Path = WEIGHTS_CONFIG) -> WeightsConfig:
    """The weights config at ``path`` (read once); malformed content raises :class:`ConfigError`."""
    return load_settings(WeightsConfig, path, "weights config")


def weight_paths(version: str, root: str | Path | None = None, config: WeightsConfig | None = None) -> WeightPaths:
    """Resolve the local paths of ``version`` below ``root`` (default: the version's root in the config)."""
    config = config or load_weights_config()
    spec = config.version(version)
    root = spec.root if root is None else Path(root)
    return WeightPaths(
        unet_config=spec.unet_config,
        unet=spec.unet.path(root),
        whisper=spec.whisper.path(root),
        vae_dir=root / config.vae.local_dir,
        vae_files=tuple(file.filename for file in config.vae.files),
    )


def auxiliary_paths(root: str | Path | None = None, config: WeightsConfig | None = None) -> tuple[Path, Path]:
    """Local paths of the InsightFace models ``(detector, landmarks)`` below ``root`` (default: the config's)."""
    aux = (config or load_weights_config()).auxiliary
    root = aux.root if root is None else Path(root)
    return aux.detector.path(root), aux.landmarks.path(root)


def missing(paths: WeightPaths) -> list[Path]:
    """The required files that do not exist, in load order (empty when everything is in place)."""
    return [path for path in paths.required if not path.is_file()]


def chosen_version(choice: str, root: str | Path | None = None) -> str:
    """The version a weights choice names: ``choice`` itself, or for "auto" LatentSync 1.5 when all its
    files are present below ``root`` (default: the config's roots), the tiny demo weights otherwise."""
    if choice != "auto":
        return choice
    return "1.5" if not missing(weight_paths("1.5", root)) else "tiny"


def present_weights(version: str, root: str | Path | None = None) -> WeightPaths:
    """The paths of a real ``version`` below ``root``; :class:`WeightsError` naming what is missing and how to get it."""
    paths = weight_paths(version, root)
    absent = missing(paths)
    if absent:
        raise WeightsError(
            f"LatentSync {version} weights are missing: {', '.join(map(str, absent))}; "
            f"download them with: python scripts/download_weights.py --version {version}"
        )
    return paths


def download_file(file: WeightFile, root: Path, *, endpoint: str | None = None) -> Path:
    """Fetch ``file`` into ``root`` (no-op when an up-to-date copy is there) and verify its size.

    The server's metadata is read first, so a wrong file (size below ``min_size``) is rejected before
    gigabytes are transferred, and the download is pinned to the commit that metadata came from.
    """
    if file.repo is None:
        raise WeightsError(f"{file.filename} is generated locally and has no Hub origin")
    url = hf_hub_url(file.repo, file.filename, revision=file.revision, endpoint=endpoint)
    try:
        metadata = get_hf_file_metadata(url, endpoint=endpoint)
    except (httpx2.HTTPError, OSError) as exc:
        raise DownloadError(f"cannot get metadata of {url}: {exc}") from exc
    reported = metadata.size
    if reported is None:
        raise WeightsError(f"{url}: the server reports no size, so the download cannot be verified")
    if file.size is not None and reported != file.size:
        raise WeightsError(f"{url}: the server reports {reported:,} bytes, the weights config expects {file.size:,}")
    if file.min_size is not None and reported < file.min_size:
        raise WeightsError(
            f"{url}: the server reports {reported:,} bytes, expected at least {file.min_size:,} "
            "(wrong repo or version?)"
        )
    try:
        local = Path(
            hf_hub_download(
                file.repo,
                file.filename,
                revision=metadata.commit_hash,
                local_dir=root / file.local_dir,
                endpoint=endpoint,
            )
        )
    except (httpx2.HTTPError, OSError) as exc:
        raise DownloadError(f"downloading {url} failed: {exc}") from exc
    actual = local.stat().st_size
    if actual != reported:
        raise WeightsError(
            f"{local} has {actual:,} bytes but the server reports {reported:,} for {url}; delete it and download again"
        )
    return local


def download_weights(
    version: str,
    root: str | Path | None = None,
    *,
    endpoint: str | None = None,
    config: WeightsConfig | None = None,
) -> WeightPaths:
    """Download and verify every file ``version`` needs below ``root``; return the resolved paths.

    ``endpoint`` overrides ``HF_ENDPOINT`` for this call (e.g. a mirror chosen at run time).
    """
    config = config or load_weights_config()
    spec = config.version(version)
    if not spec.downloadable:
        raise WeightsError(
            f"version {version!r} is generated locally, not downloaded: run scripts/make_tiny_weights.py"
        )
    root = spec.root if root is None else Path(root)
    for file in config.files(version):
        download_file(file, root, endpoint=endpoint)
    return weight_paths(version, root, config)


def download_auxiliary(
    root: str | Path | None = None,
    *,
    endpoint: str | None = None,
    config: WeightsConfig | None = None,
) -> tuple[Path, Path]:
    """Download and verify the InsightFace models below ``root``; return ``(detector, landmarks)``.

    Their pretrained weights are for non-commercial research use only, so this is never implied by
    :func:`download_weights`.
    """
    config = config or load_weights_config()
    aux = config.auxiliary
    root = aux.root if root is None else Path(root)
    for file in (aux.detector, aux.landmarks):
        download_file(file, root, endpoint=endpoint)
    return auxiliary_paths(root, config)
