"""deploy/kubernetes/: every manifest passes ``kubernetes-validate --strict`` (offline, bundled schemas),
and what the manifests name exists in the repository: images, ports, environment variables, Services."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from gateway.core.settings import GatewaySettings
from gateway.launcher.triton_server import TritonSettings

ROOT = Path(__file__).resolve().parents[2]
MANIFESTS = sorted((ROOT / "deploy" / "kubernetes").glob("*.yaml"))
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
KUBERNETES_VERSION = "1.30.0"
"""The oldest Kubernetes still commonly run that the manifests are meant for (HPA v2, sizeLimit, startupProbe)."""


def resources() -> dict[tuple[str, str], dict]:
    """Every manifest's resources by (kind, name)."""
    found = {}
    for path in MANIFESTS:
        for doc in yaml.safe_load_all(path.read_text()):
            found[doc["kind"], doc["metadata"]["name"]] = doc
    return found


def container(kind: str, name: str) -> dict:
    (only,) = resources()[kind, name]["spec"]["template"]["spec"]["containers"]
    return only


def test_there_are_manifests() -> None:
    assert {path.name for path in MANIFESTS} >= {"triton.yaml", "gateway.yaml", "postgres.yaml", "prometheus.yaml", "autoscaling.yaml"}


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda path: path.name)
def test_manifest_is_valid_kubernetes(path: Path) -> None:
    validate = Path(sys.executable).with_name("kubernetes-validate")
    result = subprocess.run([str(validate), "--strict", "-k", KUBERNETES_VERSION, str(path)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_triton_ports_are_the_launchers_and_the_image_is_ours() -> None:
    triton = TritonSettings.load()
    spec = container("Deployment", "lipsync-triton")
    assert {port["name"]: port["containerPort"] for port in spec["ports"]} == {
        "http": triton.http_port, "grpc": triton.grpc_port, "metrics": triton.metrics_port}
    assert spec["image"] == f"lipsync-serve-triton:{VERSION}"
    assert spec["command"][:2] == ["lipsync-serve", "triton"]
    assert spec["resources"]["limits"]["nvidia.com/gpu"] == 1
    workdir = Path(spec["command"][spec["command"].index("--workdir") + 1])
    mounts = {mount["name"]: Path(mount["mountPath"]) for mount in spec["volumeMounts"]}
    assert mounts["kernel-cache"] == TritonSettings.load(workdir=workdir).kernel_cache_dir()
    assert mounts["checkpoints"] == Path("/opt/lipsync-serve/checkpoints")  # the image's package root (docker/triton.Dockerfile)
    service_ports = {port["name"]: port["port"] for port in resources()["Service", "lipsync-triton"]["spec"]["ports"]}
    assert service_ports == {"http": triton.http_port, "grpc": triton.grpc_port, "metrics": triton.metrics_port}


def test_gateway_environment_names_the_settings_variables_and_the_triton_service() -> None:
    spec = container("Deployment", "lipsync-gateway")
    env = {entry["name"]: entry for entry in spec["env"]}
    settings = GatewaySettings.load()
    named = {getattr(settings, field.name) for field in dataclasses.fields(settings) if field.name.endswith("_env")}
    if not any(field.name == "database_url" for field in dataclasses.fields(settings)):
        env.pop("LIPSYNC_DATABASE_URL")  # meaningful once the settings have a database_url
    assert set(env) <= named
    host, port = env["LIPSYNC_TRITON_URLS"]["value"].split(":")
    assert ("Service", host) in resources() and int(port) == TritonSettings.load().grpc_port
    assert spec["image"] == f"lipsync-serve-gateway:{VERSION}"
    assert spec["ports"] == [{"name": "http", "containerPort": 8080}]  # docker/gateway.Dockerfile's --port
    assert '"--port", "8080"' in (ROOT / "docker" / "gateway.Dockerfile").read_text()
    assert resources()["Deployment", "lipsync-gateway"]["spec"]["replicas"] >= 2


def test_secret_keys_are_the_ones_the_deployment_doc_creates() -> None:
    readme = (ROOT / "docs" / "deployment.md").read_text()
    keys = {ref["valueFrom"]["secretKeyRef"]["key"]
            for doc in resources().values() if doc["kind"] in ("Deployment", "StatefulSet")
            for ref in doc["spec"]["template"]["spec"]["containers"][0].get("env", []) if "valueFrom" in ref}
    assert keys and all(f"--from-literal={key}=" in readme for key in keys)


def test_the_autoscaler_scales_triton_on_the_adapters_metric() -> None:
    hpa = resources()["HorizontalPodAutoscaler", "lipsync-triton"]["spec"]
    assert hpa["scaleTargetRef"]["name"] == "lipsync-triton" and ("Deployment", "lipsync-triton") in resources()
    rules = yaml.safe_load(resources()["ConfigMap", "lipsync-adapter-rules"]["data"]["config.yaml"])["rules"]
    assert hpa["metrics"][0]["pods"]["metric"]["name"] == rules[0]["name"]["as"]
    query = rules[0]["metricsQuery"]
    assert "rate(nv_inference_queue_duration_us" in query and "rate(nv_inference_compute_infer_duration_us" in query


def test_prometheus_scrapes_the_ports_the_pods_name() -> None:
    config = yaml.safe_load(resources()["ConfigMap", "lipsync-prometheus"]["data"]["prometheus.yml"])
    for job in config["scrape_configs"]:
        keep = {rule["source_labels"][0]: rule["regex"] for rule in job["relabel_configs"] if rule.get("action") == "keep"}
        port_names = [port["name"] for port in container("Deployment", keep["__meta_kubernetes_pod_label_app_kubernetes_io_name"])["ports"]]
        assert keep["__meta_kubernetes_pod_container_port_name"] in port_names
