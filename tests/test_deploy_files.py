"""Dockerfile and docker-compose.yml read as files (no Docker here): CPU default, CUDA target, gpu profile."""

from __future__ import annotations

import re
from pathlib import Path

import yaml
from test_architecture import ALLOWED

REPO_ROOT = Path(__file__).resolve().parents[1]


def dockerfile_stages() -> dict[str, tuple[str, str]]:
    """``{stage: (base, instructions)}`` of the Dockerfile, in order; comments and blank lines left out."""
    lines = (REPO_ROOT / "Dockerfile").read_text().splitlines()
    text = "\n".join(line for line in lines if line.strip() and not line.lstrip().startswith("#"))
    parts = re.split(r"^FROM\s+(\S+)\s+AS\s+(\S+)\s*$", text, flags=re.MULTILINE | re.IGNORECASE)
    return {name: (base, body) for base, name, body in zip(parts[1::3], parts[2::3], parts[3::3], strict=True)}


def compose() -> dict:
    return yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text())


def test_the_image_holds_every_package_and_a_plain_build_is_the_cpu_image() -> None:
    stages = dockerfile_stages()
    assert list(stages) == ["cpu", "cuda", "runtime"]
    cpu_body = stages["cpu"][1]
    for package in ALLOWED:
        assert re.search(rf"^COPY {package} {package}$", cpu_body, flags=re.MULTILINE), f"{package} not copied"
    assert stages["runtime"][0] == "cpu", "without --target, docker build makes the CPU image"
    assert "and-cuda" not in cpu_body and "and-cuda" not in stages["runtime"][1]


def test_the_cuda_target_adds_tensorflow_and_cuda_at_the_installed_version_and_drops_root() -> None:
    base, body = dockerfile_stages()["cuda"]
    assert base == "cpu"
    install = re.search(r'pip install "tensorflow\[and-cuda\]==(.+)"', body)
    assert install and "version(\"tensorflow\")" in install.group(1), "pinned to the TensorFlow already installed"
    assert body.strip().splitlines()[-1] == "USER covid"


def test_the_gpu_profile_runs_a_cuda_worker_with_one_gpu_reserved() -> None:
    services = compose()["services"]
    gpu = services["worker-gpu"]
    assert gpu["profiles"] == ["gpu"]
    assert gpu["build"] == {"context": ".", "target": "cuda"}
    assert gpu["command"] == ["worker", "--queues", "gpu"]
    assert gpu["deploy"]["resources"]["reservations"]["devices"] == [
        {"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert gpu["environment"]["COVID_CXR_BROKER_URL"] == services["worker"]["environment"]["COVID_CXR_BROKER_URL"]
    assert "COVID_CXR_MIXED_PRECISION" in gpu["environment"]
    # A plain `docker compose up` is unchanged: every other service runs without a profile, none reserves a GPU.
    for name, service in services.items():
        if name != "worker-gpu":
            assert "profiles" not in service and "deploy" not in service, name
