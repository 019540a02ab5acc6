"""k8s/ images: pinned and built by `make image`, containers bounded and unprivileged, Dockerfiles
with pinned bases running as the pod's user, and a cpu image holding what the tiny-model writer
imports."""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import pytest

from tests.k8s_manifests import K8S, KUSTOMIZATIONS, ROOT, all_containers, manifests, pod_of


def _makefile_image_tag() -> str:
    match = re.search(r"^IMAGE_TAG \?= (\S+)$", (ROOT / "Makefile").read_text(), re.M)
    assert match, "Makefile: IMAGE_TAG ?= ... (the `make image` tag)"
    return match.group(1)


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_images_are_pinned_and_built_by_make_image(built: dict[str, Path], name: str) -> None:
    tag = _makefile_image_tag()
    for component in ("router", "shard"):
        images = {c["image"] for c in all_containers(pod_of(manifests(built, name), component))}
        assert len(images) == 1, f"{component}: one image for all its containers, not {images}"
        for image in images:
            repo, _, ref = image.rpartition("@") if "@" in image else image.rpartition(":")
            assert repo and "/" in repo, f"{image}: placeholder not replaced by kustomize images:"
            assert ref and ref != "latest", f"{image}: pin a tag or digest"
            assert "@" in image or ref.startswith(tag), f"{image}: `make image` builds {tag}"


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_containers_are_bounded_and_unprivileged(built: dict[str, Path], name: str) -> None:
    for component in ("router", "shard"):
        pod = pod_of(manifests(built, name), component)
        pod_sec = pod["spec"]["securityContext"]
        assert pod_sec["runAsNonRoot"] is True and pod_sec["runAsUser"] != 0
        assert pod["spec"]["automountServiceAccountToken"] is False
        emptydirs = {v["name"] for v in pod["spec"]["volumes"] if "emptyDir" in v}
        for c in all_containers(pod):
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
    pod_user = pod_of(manifests(built, "base"), image)["spec"]["securityContext"]["runAsUser"]
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
