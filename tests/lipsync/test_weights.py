"""Checkpoint layout and the verified downloader, against a local fake Hugging Face endpoint."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
import torch
import yaml
from huggingface_hub._local_folder import (
    get_local_download_paths,  # private: only to fake a stale partial file
)

from lipsync.config import CONFIG_DIR, HOME, ConfigError
from lipsync.weights import (
    WEIGHTS_CONFIG,
    DownloadError,
    WeightsError,
    auxiliary_paths,
    chosen_version,
    download_auxiliary,
    download_weights,
    load_weights_config,
    missing,
    present_weights,
    weight_paths,
)

UNET_REPO = "ByteDance/LatentSync-1.5"
VAE_REPO = "stabilityai/sd-vae-ft-mse"
AUX_REPO = "ByteDance/LatentSync-1.6"
AUX_FILES = ("auxiliary/models/buffalo_l/det_10g.onnx", "auxiliary/models/buffalo_l/2d106det.onnx")
COMMIT = "0123456789abcdef0123456789abcdef01234567"
CHUNK = 10 * 1024 * 1024  # huggingface_hub's DOWNLOAD_CHUNK_SIZE: resume points fall on its multiples

REPO = Path(__file__).resolve().parents[2]


class FakeHub:
    """Serves ``/{repo}/resolve/{revision}/{filename}`` with the headers huggingface_hub 2.4 reads.

    HEAD and GET carry ``X-Repo-Commit``, ``ETag``/``X-Linked-Etag`` (sha256, as for LFS files),
    ``X-Linked-Size`` and ``Content-Length``; GET honours ``Range: bytes=N-`` with a 206.
    ``advertised`` overrides the size a file is announced with; ``drop_after`` makes the next GET of
    a file stop after that many bytes and close the connection.
    """

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.advertised: dict[str, int] = {}
        self.drop_after: dict[str, int] = {}
        self.requests: list[tuple[str, str, str | None]] = []
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def add(self, repo: str, filename: str, data: bytes) -> None:
        self.files[f"{repo}/{filename}"] = data

    def gets(self, filename: str) -> list[str | None]:
        """The ``Range`` header of every GET of ``filename`` (None for a whole-file GET)."""
        return [range_ for method, key, range_ in self.requests if method == "GET" and key.endswith("/" + filename)]

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_HEAD(self) -> None:
                self._serve(body=False)

            def do_GET(self) -> None:
                self._serve(body=True)

            def _serve(self, body: bool) -> None:
                parts = unquote(urlsplit(self.path).path).strip("/").split("/")
                key = "/".join(parts[:2] + parts[4:])
                range_ = self.headers.get("Range")
                hub.requests.append((self.command, key, range_))
                data = hub.files.get(key)
                if len(parts) < 5 or parts[2] != "resolve" or parts[3] not in ("main", COMMIT) or data is None:
                    self.send_response(404)
                    self.send_header("X-Error-Code", "EntryNotFound")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                start = int(range_.removeprefix("bytes=").split("-")[0]) if range_ else 0
                etag = f'"{hashlib.sha256(data).hexdigest()}"'
                self.send_response(206 if start else 200)
                self.send_header("X-Repo-Commit", COMMIT)
                self.send_header("ETag", etag)
                self.send_header("X-Linked-Etag", etag)
                self.send_header("X-Linked-Size", str(hub.advertised.get(key, len(data))))
                self.send_header("Accept-Ranges", "bytes")
                self.send_header("Content-Length", str(len(data) - start))
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.end_headers()
                if body:
                    stop = hub.drop_after.pop(key, len(data)) if self.command == "GET" else len(data)
                    self.wfile.write(data[start:stop])
                    self.close_connection = True

        return Handler


@pytest.fixture()
def hub() -> Iterator[FakeHub]:
    fake = FakeHub()
    thread = threading.Thread(target=fake.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield fake
    fake.server.shutdown()
    fake.server.server_close()


def _payloads(unet_size: int = 4096) -> dict[tuple[str, str], bytes]:
    return {
        (UNET_REPO, "latentsync_unet.pt"): os.urandom(unet_size),
        (UNET_REPO, "whisper/tiny.pt"): os.urandom(3000),
        (VAE_REPO, "config.json"): b'{"_class_name": "AutoencoderKL"}',
        (VAE_REPO, "diffusion_pytorch_model.safetensors"): os.urandom(2000),
    }


@pytest.fixture()
def served(hub: FakeHub) -> dict[tuple[str, str], bytes]:
    payloads = _payloads()
    for (repo, filename), data in payloads.items():
        hub.add(repo, filename, data)
    return payloads


@pytest.fixture()
def small_config(tmp_path: Path):
    """The real weights config with the UNet size floor lowered so tiny payloads pass."""
    raw = yaml.safe_load(WEIGHTS_CONFIG.read_text())
    raw["versions"]["1.5"]["unet"]["min_size"] = 1024
    for entry in raw["auxiliary"]["files"].values():
        entry["min_size"] = 1024
    path = tmp_path / "weights.yaml"
    path.write_text(yaml.safe_dump(raw))
    return load_weights_config(path)


def _dead_endpoint() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def _run_cli(dest: Path, endpoint: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_ENDPOINT": endpoint}
    script = str(REPO / "scripts" / "download_weights.py")
    return subprocess.run(
        [sys.executable, script, *(args or ("--version", "1.5")), "--dest", str(dest)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )


# --- layout ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("version", "unet", "unet_config"),
    [
        ("1.5", "checkpoints/latentsync-1.5/latentsync_unet.pt", "unet/stage2.yaml"),
        ("1.6", "checkpoints/latentsync-1.6/latentsync_unet.pt", "unet/stage2_512.yaml"),
        ("tiny", "checkpoints/tiny/latentsync_unet.pt", "unet/tiny.yaml"),
    ],
)
def test_default_paths(version: str, unet: str, unet_config: str) -> None:
    paths = weight_paths(version)
    root = HOME / ("checkpoints/tiny" if version == "tiny" else "checkpoints")
    assert paths.unet == HOME / unet
    assert paths.unet_config == CONFIG_DIR / unet_config and paths.unet_config.is_file()
    assert paths.whisper == root / "whisper" / "tiny.pt"
    assert paths.vae_dir == root / "sd-vae-ft-mse"
    assert paths.vae_files == ("config.json", "diffusion_pytorch_model.safetensors")


def test_versions_share_whisper_and_vae_but_not_unet(tmp_path: Path) -> None:
    v15, v16 = weight_paths("1.5", tmp_path), weight_paths("1.6", tmp_path)
    assert v15.whisper == v16.whisper == tmp_path / "whisper" / "tiny.pt"
    assert v15.vae_dir == v16.vae_dir == tmp_path / "sd-vae-ft-mse"
    assert v15.unet != v16.unet


def test_config_origins() -> None:
    config = load_weights_config()
    assert [file.repo for file in config.files("1.6")] == ["ByteDance/LatentSync-1.6"] * 2 + [VAE_REPO] * 2
    assert config.version("1.5").unet.min_size == 5_000_000_000
    assert not config.version("tiny").downloadable


def test_auxiliary_paths(tmp_path: Path) -> None:
    assert auxiliary_paths() == tuple(HOME / "checkpoints" / name for name in AUX_FILES)
    assert auxiliary_paths(tmp_path) == tuple(tmp_path / name for name in AUX_FILES)
    aux = load_weights_config().auxiliary
    assert aux.detector.repo == aux.landmarks.repo == AUX_REPO
    assert (aux.detector.min_size, aux.landmarks.min_size) == (10_000_000, 3_000_000)


def test_missing_lists_absent_files(tmp_path: Path) -> None:
    paths = weight_paths("1.5", tmp_path)
    assert missing(paths) == list(paths.required)[1:]  # the UNet config ships with the repo
    paths.whisper.parent.mkdir(parents=True)
    paths.whisper.write_bytes(b"w")
    assert paths.whisper not in missing(paths) and paths.unet in missing(paths)


def test_unknown_version() -> None:
    with pytest.raises(ConfigError, match="unknown weights version '2.0'.*1.5, 1.6, tiny"):
        weight_paths("2.0")


@pytest.mark.parametrize("text", ["versions: [", "vae: {}\nversions: {}", "- a list"])
def test_malformed_config(tmp_path: Path, text: str) -> None:
    (tmp_path / "w.yaml").write_text(text)
    with pytest.raises(ConfigError, match="weights config"):
        load_weights_config(tmp_path / "w.yaml")


# --- downloads ------------------------------------------------------------------------------------


def test_download(hub: FakeHub, served: dict, small_config, tmp_path: Path) -> None:
    paths = download_weights("1.5", tmp_path, endpoint=hub.url, config=small_config)
    assert paths == weight_paths("1.5", tmp_path, small_config)
    assert missing(paths) == []
    assert paths.unet.read_bytes() == served[(UNET_REPO, "latentsync_unet.pt")]
    assert paths.whisper.read_bytes() == served[(UNET_REPO, "whisper/tiny.pt")]
    for name in paths.vae_files:
        assert (paths.vae_dir / name).read_bytes() == served[(VAE_REPO, name)]

    hub.requests.clear()
    download_weights("1.5", tmp_path, endpoint=hub.url, config=small_config)
    assert [method for method, _, _ in hub.requests] == ["HEAD"] * 4  # up to date: nothing fetched again


def test_advertised_size_mismatch(hub: FakeHub, served: dict, small_config, tmp_path: Path) -> None:
    hub.advertised[f"{UNET_REPO}/latentsync_unet.pt"] = 5000
    with pytest.raises(DownloadError, match="(?s)latentsync_unet.pt failed.*should be of size 5000 but has size 4096"):
        download_weights("1.5", tmp_path, endpoint=hub.url, config=small_config)
    assert not weight_paths("1.5", tmp_path, small_config).unet.exists()


def test_local_file_size_mismatch(hub: FakeHub, served: dict, small_config, tmp_path: Path) -> None:
    paths = download_weights("1.5", tmp_path, endpoint=hub.url, config=small_config)
    paths.unet.write_bytes(paths.unet.read_bytes()[:100])  # truncated behind the hub's back
    with pytest.raises(WeightsError, match="has 100 bytes but the server reports 4,096.*delete it"):
        download_weights("1.5", tmp_path, endpoint=hub.url, config=small_config)


def test_below_size_floor_is_refused_before_transfer(hub: FakeHub, served: dict, tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match="4,096 bytes, expected at least 5,000,000,000"):
        download_weights("1.5", tmp_path, endpoint=hub.url)
    assert hub.gets("latentsync_unet.pt") == []


def test_dropped_connection_resumes_with_range(hub: FakeHub, small_config, tmp_path: Path) -> None:
    payloads = _payloads(unet_size=CHUNK + CHUNK // 5)
    for (repo, filename), data in payloads.items():
        hub.add(repo, filename, data)
    hub.drop_after[f"{UNET_REPO}/latentsync_unet.pt"] = CHUNK + 1000
    paths = download_weights("1.5", tmp_path, endpoint=hub.url, config=small_config)
    assert paths.unet.read_bytes() == payloads[(UNET_REPO, "latentsync_unet.pt")]
    assert hub.gets("latentsync_unet.pt") == [None, f"bytes={CHUNK}-"]


def test_stale_partial_file_is_not_appended_to(hub: FakeHub, served: dict, small_config, tmp_path: Path) -> None:
    """A partial file from an interrupted run (old hub naming) is ignored: the download restarts cleanly."""
    data = served[(UNET_REPO, "latentsync_unet.pt")]
    local_dir = tmp_path / "latentsync-1.5"
    stale = get_local_download_paths(local_dir, "latentsync_unet.pt").incomplete_path(hashlib.sha256(data).hexdigest())
    stale.write_bytes(b"garbage from an interrupted run")
    paths = download_weights("1.5", tmp_path, endpoint=hub.url, config=small_config)
    assert paths.unet.read_bytes() == data
    assert hub.gets("latentsync_unet.pt") == [None]


def test_missing_remote_file(hub: FakeHub, served: dict, small_config, tmp_path: Path) -> None:
    del hub.files[f"{VAE_REPO}/config.json"]
    with pytest.raises(DownloadError, match="sd-vae-ft-mse/resolve/main/config.json"):
        download_weights("1.5", tmp_path, endpoint=hub.url, config=small_config)


def test_server_down(small_config, tmp_path: Path) -> None:
    endpoint = _dead_endpoint()
    with pytest.raises(DownloadError, match=f"cannot get metadata of {endpoint}/"):
        download_weights("1.5", tmp_path, endpoint=endpoint, config=small_config)


def test_generated_version_is_not_downloadable(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match="generated locally.*make_tiny_weights"):
        download_weights("tiny", tmp_path)


def test_cli_server_down_is_one_line(tmp_path: Path) -> None:
    result = _run_cli(tmp_path, _dead_endpoint())
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: cannot get metadata") and "HF_ENDPOINT" in lines[0]


def test_cli_honours_hf_endpoint(hub: FakeHub, served: dict, tmp_path: Path) -> None:
    result = _run_cli(tmp_path, hub.url)
    assert result.returncode == 1
    assert result.stderr.startswith(f"error: {hub.url}/{UNET_REPO}/resolve/main/latentsync_unet.pt")
    assert "expected at least 5,000,000,000" in result.stderr
    assert hub.requests and "Traceback" not in result.stderr


# --- InsightFace models (opt-in, non-commercial) ----------------------------------------------------


def test_download_auxiliary(hub: FakeHub, small_config, tmp_path: Path) -> None:
    payloads = {name: os.urandom(2048 + index) for index, name in enumerate(AUX_FILES)}
    for name, data in payloads.items():
        hub.add(AUX_REPO, name, data)
    detector, landmarks = download_auxiliary(tmp_path, endpoint=hub.url, config=small_config)
    assert (detector, landmarks) == auxiliary_paths(tmp_path, small_config)
    assert detector == tmp_path / "auxiliary/models/buffalo_l/det_10g.onnx"
    assert landmarks == tmp_path / "auxiliary/models/buffalo_l/2d106det.onnx"
    assert detector.read_bytes() == payloads[AUX_FILES[0]] and landmarks.read_bytes() == payloads[AUX_FILES[1]]


def test_download_script_insightface_flag(hub: FakeHub, tmp_path: Path) -> None:
    help_text = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "download_weights.py"), "--help"],
        capture_output=True, text=True, timeout=60,
    ).stdout
    assert "--insightface" in help_text and "non-commercial" in " ".join(help_text.split())
    for name in AUX_FILES:
        hub.add(AUX_REPO, name, os.urandom(2048))
    result = _run_cli(tmp_path, hub.url, "--insightface")  # alone: the InsightFace models only
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.startswith(f"error: {hub.url}/{AUX_REPO}/resolve/main/{AUX_FILES[0]}")
    assert "expected at least 10,000,000" in result.stderr
    assert not any("latentsync_unet.pt" in key for _, key, _ in hub.requests)


def _lipsync_run_insightface(checkpoints: Path, tmp_path: Path) -> list[str]:
    """``lipsync run --tiny --detector insightface``, which must fail; its non-blank stderr lines."""
    result = subprocess.run(
        [
            sys.executable, "-m", "lipsync.cli", "run", "--tiny", "--checkpoints", str(checkpoints),
            "--detector", "insightface", "--video", str(tmp_path / "v.mp4"), "--audio", str(tmp_path / "a.wav"),
            "--out", str(tmp_path / "out.mp4"),
        ],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr
    return [line for line in result.stderr.splitlines() if line.strip()]


def test_lipsync_run_insightface_without_models_is_one_line(tmp_path: Path) -> None:
    """Checked before anything heavy: no tiny weights are written, the inputs are never opened."""
    checkpoints = tmp_path / "checkpoints"
    lines = _lipsync_run_insightface(checkpoints, tmp_path)
    assert len(lines) == 1 and lines[0].startswith("error: InsightFace models missing")
    assert "download_weights.py --insightface" in lines[0] and "non-commercial" in lines[0]
    assert str(checkpoints / AUX_FILES[0]) in lines[0]
    assert not checkpoints.exists()


@pytest.mark.skipif(importlib.util.find_spec("insightface") is not None, reason="insightface is installed")
def test_lipsync_run_insightface_not_installed_is_one_line(tmp_path: Path) -> None:
    checkpoints = tmp_path / "checkpoints"
    for model in auxiliary_paths(checkpoints):
        model.parent.mkdir(parents=True, exist_ok=True)
        model.write_bytes(b"onnx")
    lines = _lipsync_run_insightface(checkpoints, tmp_path)
    assert len(lines) == 1 and lines[0].startswith("error: the InsightFace face backend needs")
    assert "[insightface]" in lines[0]
    assert not (checkpoints / "latentsync_unet.pt").exists()


# --- tiny set -------------------------------------------------------------------------------------


def test_write_tiny_weights(tmp_path: Path) -> None:
    from lipsync.tiny import write_tiny_weights
    from lipsync.vae import load_vae

    paths = write_tiny_weights(tmp_path / "tiny", seed=0)
    assert paths == weight_paths("tiny", tmp_path / "tiny")
    assert missing(paths) == []
    assert set(torch.load(paths.unet, map_location="cpu", weights_only=True)) == {"state_dict", "global_step"}
    assert set(torch.load(paths.whisper, map_location="cpu", weights_only=True)) == {"dims", "model_state_dict"}
    assert load_vae(paths.vae_dir).config.latent_channels == 4


def test_make_tiny_weights_script(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "make_tiny_weights.py"), "--dest", str(tmp_path / "t")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert missing(weight_paths("tiny", tmp_path / "t")) == []


def test_auto_chooses_1_5_when_all_its_files_are_present_and_tiny_otherwise(tmp_path: Path) -> None:
    assert chosen_version("auto", tmp_path) == "tiny"
    paths = weight_paths("1.5", tmp_path)
    for path in missing(paths):  # the UNet config is the repository's own
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()
    assert chosen_version("auto", tmp_path) == "1.5"
    assert chosen_version("1.6", tmp_path) == "1.6"  # a named version is taken as named
    assert present_weights("1.5", tmp_path) == paths
    with pytest.raises(WeightsError, match=r"LatentSync 1\.6 weights are missing: .*latentsync_unet\.pt.*--version 1\.6"):
        present_weights("1.6", tmp_path)
